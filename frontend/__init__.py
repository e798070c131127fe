"""ReLU Atlas frontend: a Streamlit app that talks to the backend over HTTP only."""
