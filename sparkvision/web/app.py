"""The FastAPI application: REST API, job tracker and the static web pages.

A thin layer: every endpoint validates its input (paths inside the data roots, upload limits,
params against the job kind's schema) and then calls the same library functions as the CLI,
through :mod:`sparkvision.web.kinds` for jobs and :mod:`sparkvision.web.batching` for
classification. ``create_app(settings)`` builds the app; ``sparkvision serve`` runs it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparkvision.data.images import RejectError
from sparkvision.web import browse
from sparkvision.web.batching import Classifier, MicroBatcher
from sparkvision.web.jobs import FINAL_STATES, STATES, JobStore
from sparkvision.web.kinds import KINDS
from sparkvision.web.runner import Runner, read_metrics_history
from sparkvision.web.security import ApiError, Settings, check_image, check_startup, check_token, reject_to_api, safe_path
from sparkvision.web.uploads import (
    FAST_MULTIPART_BYTES,
    capped,
    multipart_boundary,
    parse_simple_multipart,
    read_body,
    replay,
)

log = logging.getLogger("sparkvision.web")
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
RAW_TYPES = ("image/", "application/octet-stream")
INLINE_DECODE_BYTES = 64 * 1024
MAX_MODELS = 4  # classifiers kept loaded (the --model one plus ?model= ones)
GC_THRESHOLD = (10_000, 20, 20)  # while serving; see lifespan()

UPLOAD_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


CLASSIFY_OPENAPI = {
    **UPLOAD_BODY,
    "parameters": [
        {"name": "top_k", "in": "query", "required": False, "description": "Probabilities returned per image.",
         "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 3}},
        {"name": "model", "in": "query", "required": False,
         "description": "Model directory inside a data root (default: --model).", "schema": {"type": "string"}},
    ],
}


def _int_param(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """A query integer in [lo, hi] or a 422 that names it (what FastAPI's Query(ge, le) would say)."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"invalid parameters: {name}: must be an integer, got {raw[:40]!r}",
                       "invalid_params") from None
    if not lo <= value <= hi:
        raise ApiError(422, f"invalid parameters: {name}: must be from {lo} to {hi}, got {value}",
                       "invalid_params")
    return value


class BodyLimit:
    """Refuse a request whose Content-Length is over the limit before its body is read (pure ASGI)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for key, value in scope["headers"]:
                if key == b"content-length":
                    try:
                        n = int(value)
                    except ValueError:
                        n = -1
                    if n < 0 or n > self.limit:
                        msg = ("Content-Length is not a number" if n < 0 else
                               f"request body is {n:,} bytes; the limit is {self.limit:,}")
                        await _err(400 if n < 0 else 413, msg, "bad_request" if n < 0 else "too_large")(
                            scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class DirectRoute(APIRoute):
    """A route whose endpoint takes the :class:`Request` and returns a :class:`Response` itself.

    FastAPI's handler (dependency solving, response serialisation) cost ~30 us per request on
    the classify hot path for nothing: that endpoint parses its own query and body. The route is
    still an ``APIRoute``, so it is in the OpenAPI schema (parameters via ``openapi_extra``).
    """

    def get_route_handler(self):
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request)

        return handler


class JobSubmit(BaseModel):
    kind: str = Field(description="One of GET /api/jobs/kinds.")
    params: dict[str, Any] = Field(default_factory=dict, description="Validated against the kind's schema.")


def _err(status: int, message: str, code: str | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "code": code, **extra}, status_code=status)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {e.get('msg')}")
    return "invalid parameters: " + "; ".join(parts)


class State:
    """Everything the endpoints share, built at startup."""

    def __init__(self, settings: Settings, store: JobStore, runner: Runner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.classifiers: dict[str, Classifier] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.index = None
        self.index_lock = threading.Lock()
        self.model_lock = threading.Lock()

    def classifier(self, model_dir: str) -> tuple[Classifier, MicroBatcher]:
        with self.model_lock:
            if model_dir not in self.classifiers:
                clf = Classifier(model_dir)
                self.classifiers[model_dir] = clf
                self.batchers[model_dir] = MicroBatcher(clf.probabilities, self.settings.batch_size,
                                                        self.settings.batch_wait_ms)
            return self.classifiers[model_dir], self.batchers[model_dir]

    async def evict_models(self, keep: str | None) -> None:
        """Bound memory: at most MAX_MODELS loaded; the oldest other than ``keep`` goes first."""
        while len(self.classifiers) >= MAX_MODELS:
            victim = next((k for k in self.classifiers if k != keep), None)
            if victim is None:
                return
            with self.model_lock:
                self.classifiers.pop(victim, None)
                batcher = self.batchers.pop(victim, None)
            if batcher is not None:
                await batcher.close()

    def search_index(self):
        from sparkvision.retrieval.search import SearchIndex

        with self.index_lock:
            if self.index is None:
                if not self.settings.index_dir:
                    raise ApiError(503, "no index loaded: start the server with --index DIR", "no_index")
                self.index = SearchIndex(self.settings.index_dir)
            return self.index


def create_app(settings: Settings, *, store: JobStore | None = None, spark_factory=None) -> FastAPI:
    """The app for ``settings``; refuses an unsafe configuration (see :func:`check_startup`)."""
    check_startup(settings)

    def default_spark():
        from sparkvision.spark.session import get_spark

        return get_spark(settings.master, settings.conf)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = app.state.sv
        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)  # batching, not threads, gives throughput
        interrupted = st.store.mark_interrupted()
        for job_id in interrupted:
            st.store.append_log(job_id, "interrupted: the server restarted while this job ran")
        if settings.model_dir:
            await run_in_threadpool(st.classifier, settings.model_dir)
        if settings.start_runner:
            st.runner.start()
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
            st.runner.stop()
            for b in st.batchers.values():
                await b.close()

    app = FastAPI(
        title="sparkvision",
        version="0.1.0",
        description="Classify, search, and run Spark jobs (ingest, train, evaluate, predict, embed, index, "
                    "dedup) over image tables. Mutating endpoints need `Authorization: Bearer TOKEN` when a "
                    "token is configured.",
        lifespan=lifespan,
    )
    store = store or JobStore(settings.db_url)
    app.state.sv = State(settings, store, Runner(store, spark_factory or default_spark))

    def st() -> State:
        return app.state.sv

    # ------------------------------------------------------------------ errors and limits
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _err(e.status, e.message, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errors = json.loads(json.dumps(e.errors(), default=str))
        return _err(422, _validation_message(errors), "invalid_params", details=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _err(e.status_code, str(e.detail), "http_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _err(500, f"internal error ({type(e).__name__}); the server log has the details", "internal")

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    def require_token(authorization: str | None, x_api_token: str | None) -> None:
        check_token(settings, authorization, x_api_token)

    # ------------------------------------------------------------------ uploads
    async def uploads(request: Request, field_names: tuple[str, ...], max_files: int) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        limit = settings.max_upload_bytes
        if ctype.startswith("multipart/form-data"):
            length = request.headers.get("content-length", "")
            parts = None
            if length.isdigit() and int(length) <= FAST_MULTIPART_BYTES:  # small: read it, split it
                body = await read_body(request, FAST_MULTIPART_BYTES)
                boundary = multipart_boundary(ctype)
                parts = parse_simple_multipart(body, boundary, max_files, max_files + 10) if boundary else None
                if parts is None:
                    request = replay(request, body)
            else:  # big or chunked: Starlette's parser streams it to spooled files, bounded in total
                request = capped(request, settings.max_request_bytes)
            if parts is not None:  # the usual shape, split without the general parser
                out = []
                for key, filename, data in parts:
                    if key in field_names and filename is not None:
                        name = filename or key
                        if len(data) > limit:
                            raise ApiError(413, f"{name} is over the {limit:,}-byte upload limit", "too_large")
                        out.append((name, data))
            else:
                out = await form_uploads(request, field_names, max_files, limit)
            if not out:
                raise ApiError(422, f"no image uploaded: send multipart field {' or '.join(field_names)!s}",
                               "no_upload")
            return out
        if ctype.startswith(RAW_TYPES):
            data = await read_body(request, limit)  # one image: never hold more than the per-file limit
            if len(data) > limit:
                raise ApiError(413, f"upload is {len(data):,} bytes; the limit is {limit:,}", "too_large")
            return [("upload", data)]
        raise ApiError(415, "send images as multipart/form-data (field 'files') or as a raw image/* body",
                       "unsupported_media_type")

    async def form_uploads(request: Request, field_names: tuple[str, ...], max_files: int,
                           limit: int) -> list[tuple[str, bytes]]:
        """Any multipart body, through Starlette's general parser (the fallback of the fast path)."""
        out = []
        try:
            async with request.form(max_files=max_files, max_fields=max_files + 10) as form:
                for key, value in form.multi_items():
                    if key in field_names and isinstance(value, UploadFile):
                        data = await value.read(limit + 1)
                        name = value.filename or key
                        if len(data) > limit:
                            raise ApiError(413, f"{name} is over the {limit:,}-byte upload limit", "too_large")
                        out.append((name, data))
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - malformed multipart is the client's error
            raise ApiError(400, f"could not read the multipart body: {e}", "bad_upload") from None
        return out

    # ------------------------------------------------------------------ pages
    @app.get("/", include_in_schema=False)
    async def index_page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health", tags=["server"])
    async def health():
        s = st()
        return {
            "ok": True,
            "model": settings.model_dir,
            "index": settings.index_dir,
            "data_roots": settings.data_roots,
            "token_required": bool(settings.token),
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                       "max_files": settings.max_files},
            "batching": {k: b.stats.to_json() for k, b in s.batchers.items()},
            "running_job": s.runner._current,
        }

    # ------------------------------------------------------------------ classify
    # The hot path of the server: no FastAPI dependency solving (query parameters are parsed here and
    # documented through CLASSIFY_OPENAPI) and no jsonable_encoder (the response is plain JSON types).
    async def classify(request: Request) -> Response:
        """One or many images (multipart field ``files``, or one raw ``image/*`` body) -> label,
        top-k probabilities and latency. Concurrent requests share model calls (micro-batching)."""
        t0 = time.perf_counter()
        query = request.query_params
        top_k = _int_param(query.get("top_k"), "top_k", 3, 1, 1000)
        model = query.get("model")
        if model is not None:
            model_dir = safe_path(model, settings.data_roots, must_exist=True, what="model")
            if not browse.is_model_dir(model_dir):
                raise ApiError(404, f"model {model!r} is not a sparkvision model directory", "not_a_model")
        elif settings.model_dir:
            model_dir = settings.model_dir
        else:
            raise ApiError(503, "no model loaded: start the server with --model DIR or pass ?model=", "no_model")
        files = await uploads(request, ("files", "file"), settings.max_files)
        state = st()
        if model_dir in state.classifiers:  # loaded: no hop to a worker thread
            clf, batcher = state.classifiers[model_dir], state.batchers[model_dir]
        else:
            await state.evict_models(keep=settings.model_dir)
            clf, batcher = await run_in_threadpool(state.classifier, model_dir)

        def prepare(items: list[tuple[str, bytes]]) -> list:
            out = []
            for name, data in items:
                check_image(data, settings, name)
                try:
                    out.append(clf.preprocess(data))
                except RejectError as e:
                    raise reject_to_api(e, name) from None
            return out

        # Small images decode faster than a hop to a worker thread; big ones must not block the loop.
        if sum(len(d) for _, d in files) <= INLINE_DECODE_BYTES:
            inputs = prepare(files)
        else:
            inputs = await run_in_threadpool(prepare, files)
        if len(inputs) == 1:
            probs = [await batcher.submit(inputs[0])]  # no task per image for the common case
        else:
            probs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        k = min(top_k, len(clf.class_names))
        results = []
        for (name, _), p in zip(files, probs, strict=True):
            idx = np.argsort(-p, kind="stable")[:k].tolist()
            top = [{"label": clf.class_names[i], "index": i, "prob": round(float(p[i]), 6)} for i in idx]
            results.append({"filename": name, "label": top[0]["label"], "top_k": top})
        body = {"model": os.path.basename(model_dir.rstrip("/")), "results": results,
                "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}
        return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                        media_type="application/json")

    app.router.add_api_route("/api/classify", classify, methods=["POST"], tags=["inference"],
                             openapi_extra=CLASSIFY_OPENAPI, route_class_override=DirectRoute)

    # ------------------------------------------------------------------ search
    @app.post("/api/search", tags=["inference"], openapi_extra=UPLOAD_BODY)
    async def search(request: Request, k: int = Query(8, ge=1, le=200, description="Neighbours to return.")):
        """An uploaded image (multipart field ``file`` or a raw body) -> its k most similar images."""
        from sparkvision.retrieval.search import embed_images

        t0 = time.perf_counter()
        idx = await run_in_threadpool(st().search_index)
        files = await uploads(request, ("file", "files"), 1)
        name, data = files[0]
        await run_in_threadpool(check_image, data, settings, name)
        model_dir = idx.model_dir
        if not model_dir:
            raise ApiError(503, "the index does not record the model that made its features", "no_model")

        def run():
            feats, errors = embed_images(model_dir, [data])
            if errors[0]:
                raise ApiError(422, f"{name}: {errors[0]}", "bad_image")
            hits = idx.results(idx.search(feats, k))[0]
            return _with_thumbs(hits, idx)

        hits = await run_in_threadpool(run)
        return {"query": name, "k": k, "index": os.path.basename(settings.index_dir.rstrip("/")),
                "neighbours": hits, "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}

    def _with_thumbs(hits: list[dict[str, Any]], idx) -> list[dict[str, Any]]:
        from sparkvision.retrieval.index import features_meta

        images: dict[str, bytes] = {}
        src = features_meta(idx.meta.get("features", "")).get("table") if idx.meta.get("features") else None
        if src:
            src_path = src.removeprefix("file://").removeprefix("file:")
            if os.path.isdir(src_path):
                images = browse.images_by_content_id(src_path, [h.get("content_id") for h in hits])
        for h in hits:
            data = images.get(h.get("content_id"))
            path = (h.get("path") or "").removeprefix("file://").removeprefix("file:")
            if data is None and path and os.path.isfile(path):
                try:
                    safe_path(path, settings.data_roots, must_exist=True)
                    with open(path, "rb") as f:
                        data = f.read(settings.max_upload_bytes)
                except ApiError:
                    data = None
            h["thumb"] = browse.thumbnail(data)
        return hits

    # ------------------------------------------------------------------ jobs
    @app.get("/api/jobs/kinds", tags=["jobs"])
    async def job_kinds():
        """Every job kind with its parameter schema and whether this build has it."""
        return {"kinds": [k.describe() for k in KINDS.values()]}

    @app.post("/api/jobs", status_code=201, tags=["jobs"])
    async def submit_job(
        body: JobSubmit = Body(...),
        authorization: str | None = Header(None),
        x_api_token: str | None = Header(None),
    ):
        """Queue a job; its params are validated against the kind's schema and paths against the roots."""
        require_token(authorization, x_api_token)
        kind = KINDS.get(body.kind)
        if kind is None:
            raise ApiError(422, f"unknown job kind {body.kind!r}; choose from {', '.join(KINDS)}", "unknown_kind")
        why = kind.unavailable()
        if why:
            raise ApiError(422, why, "kind_unavailable")
        try:
            params = kind.params.model_validate(body.params)
        except ValidationError as e:
            errors = json.loads(json.dumps(e.errors(include_url=False), default=str))
            raise ApiError(422, _validation_message(errors).replace("invalid parameters",
                           f"invalid {body.kind} parameters"), "invalid_params") from None
        if kind.check is not None:
            try:
                kind.check(params)
            except (ValueError, TypeError, KeyError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                raise ApiError(422, f"invalid {body.kind} parameters: {msg}", "invalid_params") from None
        values = params.model_dump()
        optional = kind.extra.get("optional_inputs", ())
        for fname in (*kind.inputs, *optional):
            if values.get(fname) is not None:
                values[fname] = safe_path(values[fname], settings.data_roots, must_exist=True, what=fname)
        for fname in kind.outputs:
            if values.get(fname) is not None:
                values[fname] = safe_path(values[fname], settings.data_roots, what=fname)
                if values[fname] in settings.data_roots:
                    raise ApiError(422, f"{fname} must be a directory inside a data root, not the root itself",
                                   "bad_path")
        job = st().store.create(kind.name, values, values.get(kind.result_key) if kind.result_key else None)
        st().runner.wake()
        return JSONResponse(st().store.get(job.id).to_json(), status_code=201)

    @app.get("/api/jobs", tags=["jobs"])
    async def list_jobs(
        state: str | None = Query(None, description="Only jobs in this state."),
        kind: str | None = Query(None),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ):
        if state is not None and state not in STATES:
            raise ApiError(422, f"state {state!r} is not one of {', '.join(STATES)}", "invalid_params")
        jobs = st().store.list(state=state, kind=kind, limit=limit, offset=offset)
        return {"jobs": [j.to_json() for j in jobs], "limit": limit, "offset": offset}

    def get_job_or_404(job_id: str):
        job = st().store.get(job_id)
        if job is None:
            raise ApiError(404, f"no job with id {job_id!r}", "unknown_job")
        return job

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str):
        """State, progress %, current metrics, log tail and where the results are."""
        return get_job_or_404(job_id).to_json()

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(job_id: str, authorization: str | None = Header(None),
                         x_api_token: str | None = Header(None)):
        require_token(authorization, x_api_token)
        job = get_job_or_404(job_id)
        if job.state in FINAL_STATES:
            raise ApiError(409, f"job {job_id} already {job.state}; nothing to cancel", "job_finished")
        new_state = st().store.request_cancel(job_id)
        if new_state == "running":
            await run_in_threadpool(st().runner.cancel, job_id)
        return st().store.get(job_id).to_json()

    @app.post("/api/jobs/{job_id}/resume", tags=["jobs"])
    async def resume_job(job_id: str, authorization: str | None = Header(None),
                         x_api_token: str | None = Header(None)):
        """Queue an interrupted, failed or cancelled job again; training resumes from its checkpoint."""
        require_token(authorization, x_api_token)
        job = get_job_or_404(job_id)
        if job.state not in ("interrupted", "failed", "cancelled"):
            raise ApiError(409, f"job {job_id} is {job.state}; only interrupted, failed or cancelled jobs resume",
                           "not_resumable")
        params = st().runner.resume_params(job.kind, job.params)
        st().store.requeue(job_id, params)
        st().store.append_log(job_id, "resumed" + (" from checkpoint" if params.get("resume") else ""))
        st().runner.wake()
        return st().store.get(job_id).to_json()

    @app.get("/api/jobs/{job_id}/metrics", tags=["jobs"])
    async def job_metrics(job_id: str):
        """Per-epoch history (loss, accuracy, throughput) and the confusion matrix, when there are any."""
        job = get_job_or_404(job_id)
        out = job.params.get("out") if job.kind in ("train", "pretrain", "finetune", "distill") else None
        model_dir = out or job.params.get("model_dir")
        history = read_metrics_history(out) if out else []
        if not history and isinstance(job.result, dict):
            history = job.result.get("history", []) or []
        evaluation = None
        if job.kind == "evaluate" and isinstance(job.result, dict):
            evaluation = job.result
        elif model_dir and os.path.isfile(os.path.join(model_dir, "evaluation.json")):
            evaluation = browse._read_json(os.path.join(model_dir, "evaluation.json"))
        confusion = None
        if evaluation and evaluation.get("confusion_matrix") is not None:
            confusion = {"class_names": evaluation.get("class_names"), "matrix": evaluation["confusion_matrix"],
                         "accuracy": evaluation.get("accuracy"), "split": evaluation.get("split")}
        return {"job": job_id, "kind": job.kind, "history": history, "confusion": confusion}

    # ------------------------------------------------------------------ models and tables
    @app.get("/api/models", tags=["data"])
    async def models():
        """Model directories under the data roots, with config, classes, preprocessing and metrics."""
        return {"models": await run_in_threadpool(browse.list_models, settings.data_roots)}

    def model_path(name: str) -> str:
        path = safe_path(name, settings.data_roots, must_exist=True, what="model")
        if not browse.is_model_dir(path):
            raise ApiError(404, f"{name!r} is not a sparkvision model directory", "not_a_model")
        return path

    @app.get("/api/models/{name:path}/confusion.png", tags=["data"])
    async def model_confusion_png(name: str):
        path = os.path.join(model_path(name), "confusion_matrix.png")
        if not os.path.isfile(path):
            raise ApiError(404, f"model {name!r} has no confusion matrix yet: run an evaluate job", "not_found")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/models/{name:path}", tags=["data"])
    async def model(name: str):
        return browse.describe_model(model_path(name), settings.data_roots)

    @app.get("/api/tables", tags=["data"])
    async def tables():
        """Parquet tables under the data roots: image, prediction, features tables, with row counts."""
        return {"tables": await run_in_threadpool(browse.list_tables, settings.data_roots)}

    @app.get("/api/tables/{name:path}/rows", tags=["data"])
    async def table_rows(
        name: str,
        offset: int = Query(0, ge=0),
        limit: int = Query(24, ge=1, le=200),
        source: str | None = Query(None, description="Image table to take thumbnails from (prediction tables)."),
    ):
        """One page of rows with a thumbnail (PNG data URL) per row where the image can be found."""
        path = safe_path(name, settings.data_roots, must_exist=True, what="table")
        src = safe_path(source, settings.data_roots, must_exist=True, what="source") if source else \
            browse.source_table_of(path, settings.data_roots)
        return await run_in_threadpool(browse.table_rows, path, offset, limit, src)

    @app.get("/api/tables/{name:path}", tags=["data"])
    async def table(name: str):
        path = safe_path(name, settings.data_roots, must_exist=True, what="table")
        return await run_in_threadpool(browse.describe_table, path, settings.data_roots)

    return app
