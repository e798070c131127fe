# One image for every service of the scaled deployment (see docker-compose.yml):
# the API, the Streamlit frontend, the Dask scheduler and the Dask workers.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_NUM_THREADS=1 \
    ATLAS_DATA_DIR=/data

WORKDIR /app

# CPU-only torch first (the pinned version), so the project install does not pull CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY app ./app
COPY backend ./backend
COPY frontend ./frontend
COPY sample_models ./sample_models
RUN pip install . && mkdir -p /data

EXPOSE 8000 8501 8786
CMD ["relu-atlas", "serve", "--host", "0.0.0.0"]
