"""The FastAPI application: ``create_app(settings)`` wires storage, job store and runner.

Start-up registers the sample models, starts (or connects to) Dask, and re-queues the jobs a
previous run left queued or running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from backend.analyses import load_all
from backend.api.deps import Services, require_token
from backend.api.errors import BodySizeLimit, install_error_handlers
from backend.api.routes import analyses, batches, datasets, health, inputs, jobs, models, patterns
from backend.api.validation import RejectUnsafeText
from backend.config import Settings
from backend.jobs.runner import JobRunner
from backend.jobs.store import JobStore
from backend.sandbox import ModelChecker
from backend.storage import Storage

log = logging.getLogger(__name__)
MULTIPART_SLACK_BYTES = 64 * 1024


def _start(settings: Settings, owners: dict[str, str]) -> Services:
    """Blocking start-up work (seconds): storage, samples, Dask, re-queue."""
    load_all(settings.extra_analyses)
    store = JobStore(settings.db_url)
    checker = ModelChecker(settings.upload_memory_mb, settings.upload_check_timeout_s,
                           settings.load_limits(), settings.max_upload_bytes,
                           settings.data_dir / "tmp")
    checker.start()
    storage = Storage(settings.data_dir, settings.db_url, checker)
    if settings.register_samples:
        log.info("registered %d sample models", storage.register_samples())
    runner = JobRunner(settings, store)
    runner.start()
    requeued = store.requeue_interrupted()
    for job_id in requeued:
        runner.submit(job_id)
    if requeued:
        log.info("re-queued %d interrupted jobs", len(requeued))
    return Services(settings=settings, storage=storage, store=store, runner=runner,
                    owners=owners)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.data_dir = settings.data_dir.resolve()
    settings.prepare()
    owners = settings.token_owners()  # a malformed ATLAS_API_TOKENS fails here, not later

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await asyncio.to_thread(_start, settings, owners)
        app.state.services = services
        try:
            yield
        finally:
            services.storage.checker.close()
            await asyncio.to_thread(services.runner.close)

    docs = {} if not owners else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="ReLU Atlas",
        description="Open up a ReLU network and see why it decides what it decides.",
        version="0.1.0",
        lifespan=lifespan,
        **docs,
    )
    if owners:
        app.include_router(_protected_docs(app))
    app.include_router(health.router, prefix="/api")
    api = APIRouter(prefix="/api", dependencies=[Depends(require_token)])
    for module in (models, inputs, datasets, analyses, jobs, batches, patterns):
        api.include_router(module.router)
    app.include_router(api)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES)
    app.add_middleware(RejectUnsafeText)
    return app


def _protected_docs(app: FastAPI) -> APIRouter:
    """With tokens configured the schema and the docs pages need one too."""
    router = APIRouter(dependencies=[Depends(require_token)], include_in_schema=False)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return router
