"""The FastAPI application: ``create_app(settings)`` builds it; ``sparkvision serve`` runs it.

A thin layer: every endpoint validates its input (paths inside the data roots, upload limits,
params against the job kind's schema) and then calls the same library functions as the CLI,
through :mod:`sparkvision.web.kinds` for jobs and :mod:`sparkvision.web.batching` for
classification. The endpoints live in :mod:`sparkvision.web.routes`, one router per concern; this
module only builds their shared :class:`~sparkvision.web.routes.state.State`, the middleware, the
error handlers and the start-up / shutdown work, and includes the routers.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparkvision.spark.session import get_spark
from sparkvision.web.jobs import JobStore
from sparkvision.web.routes import classify, data, detect, jobs, pages, search
from sparkvision.web.routes.errors import error_response, validation_message
from sparkvision.web.routes.state import State
from sparkvision.web.runner import Runner
from sparkvision.web.security import ApiError, RedactTokens, Settings, check_startup

log = logging.getLogger("sparkvision.web")
ACCESS_LOGGER = "uvicorn.access"  # logs each request's path with its query string
GC_THRESHOLD = (10_000, 20, 20)  # while serving; see lifespan()
ROUTERS = (pages.router, classify.router, search.router, detect.router, jobs.router, data.router)


class BodyLimit:
    """Hold every request body to its endpoint's limit (pure ASGI).

    A Content-Length over the limit is refused before anything is read; a body without one
    (chunked) is counted as the endpoint reads it and refused (413) as soon as it passes the
    limit, so no endpoint ever receives, spools or parses more. ``limits`` maps the paths that
    take uploads to theirs; every other endpoint (a job submission is JSON) gets ``default``.
    """

    def __init__(self, app: ASGIApp, default: int, limits: dict[str, int]) -> None:
        self.app = app
        self.default = default
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    n = -1
                if n < 0 or n > limit:
                    msg = (
                        "Content-Length is not a number"
                        if n < 0
                        else f"request body is {n:,} bytes; the limit is {limit:,}"
                    )
                    await error_response(400 if n < 0 else 413, msg, "bad_request" if n < 0 else "too_large")(
                        scope, receive, send
                    )
                    return
                # The server ends the body at its Content-Length: nothing to count (the hot path).
                await self.app(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # raised inside the endpoint: the ApiError handler answers 413
                    raise ApiError(413, f"request body is over the {limit:,}-byte limit", "too_large")
            return message

        await self.app(scope, counted, send)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: mark jobs a dead server left running, load ``--model``, start the runner; and undo it."""
    sv: State = app.state.sv
    settings = sv.settings
    access_log = logging.getLogger(ACCESS_LOGGER)  # uvicorn's, configured by now
    if not any(isinstance(f, RedactTokens) for f in access_log.filters):
        access_log.addFilter(RedactTokens())
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)  # batching, not threads, gives throughput
    for job_id in sv.store.mark_interrupted():
        sv.store.append_log(job_id, "interrupted: the server restarted while this job ran")
    if settings.model_dir:
        await run_in_threadpool(sv.classifier, settings.model_dir)
    if settings.start_runner:
        sv.runner.start()
    # Garbage collection was the largest source of tail latency under load. Everything loaded
    # so far (torch, FastAPI, the model: ~450k objects) lives as long as the server: frozen, a
    # full collection no longer walks it (those had stalled the event loop 0.3-0.4 s every few
    # seconds). And a request frees almost all it allocates by reference counting, so the
    # default 700-allocation young-generation threshold only bought ~500 pointless
    # collections per 5,000 requests (~14% of the loop's time); both are restored on shutdown.
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
        sv.runner.stop()
        for b in sv.batchers.values():
            await b.close()


async def api_error(request: Request, e: ApiError):
    return error_response(e.status, e.message, e.code)


async def invalid_request(request: Request, e: RequestValidationError):
    errors = json.loads(json.dumps(e.errors(), default=str))
    return error_response(422, validation_message(errors), "invalid_params", details=errors)


async def http_error(request: Request, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), "http_error")


async def internal_error(request: Request, e: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return error_response(
        500, f"internal error ({type(e).__name__}); the server log has the details", "internal"
    )


def create_app(
    settings: Settings, *, store: JobStore | None = None, spark_factory: Callable[[], Any] | None = None
) -> FastAPI:
    """The app for ``settings``; refuses an unsafe configuration (see :func:`check_startup`).

    ``store`` and ``spark_factory`` replace the job registry at ``settings.db_url`` and the
    session from ``settings.master`` / ``settings.conf`` (tests pass their own).
    """
    check_startup(settings)
    app = FastAPI(
        title="sparkvision",
        version="0.1.0",
        description="Classify, detect, search, and run Spark jobs (ingest, train, evaluate, predict, embed, "
        "index, dedup, train-detector, detect) over image tables. Mutating endpoints need `Authorization: Bearer TOKEN` when a "
        "token is configured.",
        lifespan=lifespan,
    )
    store = store or JobStore(settings.db_url)
    runner = Runner(
        store,
        spark_factory
        or partial(
            get_spark, settings.master, settings.conf, remote=settings.remote, ship_env=settings.ship_env
        ),
    )
    app.state.sv = State(settings, store, runner)

    # Starlette types a handler as taking any Exception; it calls each with its own class only.
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(
        BodyLimit,
        default=settings.max_json_bytes,
        limits={
            "/api/classify": settings.upload_request_bytes(settings.max_files),
            "/api/search": settings.upload_request_bytes(search.MAX_FILES),
            "/api/detect": settings.upload_request_bytes(detect.MAX_FILES),
        },
    )

    # The routers' routes go onto the app as they are, not through include_router: FastAPI 0.165
    # resolves an included router on every request, measured at 40-45 us more per request, a sixth
    # of /api/classify's event-loop CPU. Nothing here needs what include_router adds (a prefix,
    # router-level dependencies, app.dependency_overrides).
    for router in ROUTERS:
        app.router.routes.extend(router.routes)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    return app
