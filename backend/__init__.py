"""ReLU Atlas service: FastAPI app, job runner on Dask, SQL job store, file storage."""
