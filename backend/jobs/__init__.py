"""Asynchronous analysis jobs: SQL job records, Dask submission, the worker-side task."""
