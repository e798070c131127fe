"""HTTP API: thin routes over the storage, job store and job runner."""
