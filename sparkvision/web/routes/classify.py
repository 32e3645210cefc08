"""``POST /api/classify``: uploaded images -> label and top-k probabilities, micro-batched.

The hot path of the server: no FastAPI dependency solving (query parameters are parsed here and
documented through ``CLASSIFY_OPENAPI``) and no ``jsonable_encoder`` (the response is plain JSON
types, serialised once). See docs/web.md, "The classify hot path".
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from sparkvision.data.images import RejectError
from sparkvision.errors import ParamError
from sparkvision.web import browse
from sparkvision.web.batching import Classifier
from sparkvision.web.detecting import is_detector_dir
from sparkvision.web.routes.state import get_state
from sparkvision.web.security import ApiError, Settings, check_image, reject_to_api, safe_path
from sparkvision.web.uploads import UPLOAD_OPENAPI, read_uploads

INLINE_DECODE_BYTES = (
    64 * 1024
)  # up to this much in total, decode on the event loop (cheaper than a thread hop)

CLASSIFY_OPENAPI: dict[str, Any] = {
    **UPLOAD_OPENAPI,
    "parameters": [
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "description": "Probabilities returned per image.",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 3},
        },
        {
            "name": "model",
            "in": "query",
            "required": False,
            "description": "Model directory inside a data root (default: --model).",
            "schema": {"type": "string"},
        },
    ],
}


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


def int_param(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """A query integer in [lo, hi] or a 422 that names it (what FastAPI's Query(ge, le) would say)."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            422, f"invalid parameters: {name}: must be an integer, got {raw[:40]!r}", "invalid_params"
        ) from None
    if not lo <= value <= hi:
        raise ApiError(
            422, f"invalid parameters: {name}: must be from {lo} to {hi}, got {value}", "invalid_params"
        )
    return value


def model_dir_for(model: str | None, settings: Settings) -> str:
    """``?model=`` (a model directory inside a data root) or the server's ``--model``."""
    if model is not None:
        model_dir = safe_path(model, settings.data_roots, must_exist=True, what="model")
        if not browse.is_model_dir(model_dir):
            raise ApiError(404, f"model {model!r} is not a sparkvision model directory", "not_a_model")
        return model_dir
    if settings.model_dir:
        return settings.model_dir
    raise ApiError(503, "no model loaded: start the server with --model DIR or pass ?model=", "no_model")


def prepare(clf: Classifier, files: list[tuple[str, bytes]], settings: Settings) -> list:
    """The model inputs of the uploads, each checked against the limits before it is decoded."""
    out = []
    for name, data in files:
        check_image(data, settings, name)
        try:
            out.append(clf.preprocess(data))
        except RejectError as e:
            raise reject_to_api(e, name) from None
    return out


async def classify(request: Request) -> Response:
    """One or many images (multipart field ``files``, or one raw ``image/*`` body) -> label,
    top-k probabilities and latency. Concurrent requests share model calls (micro-batching)."""
    t0 = time.perf_counter()
    sv = get_state(request)
    settings = sv.settings
    query = request.query_params
    top_k = int_param(query.get("top_k"), "top_k", 3, 1, 1000)
    model_dir = model_dir_for(query.get("model"), settings)
    files = await read_uploads(request, settings, ("files", "file"), settings.max_files)
    if model_dir in sv.classifiers:  # loaded: no hop to a worker thread
        clf, batcher = sv.classifiers[model_dir], sv.batchers[model_dir]
    else:
        await sv.evict_models(keep=settings.model_dir)
        try:
            clf, batcher = await run_in_threadpool(sv.classifier, model_dir)
        except (ParamError, FileNotFoundError) as e:  # corrupt weights, weights that do not fit, ...
            if is_detector_dir(model_dir):  # checked only here, off the hot path
                raise ApiError(
                    422, f"model {query.get('model')!r} is a detector: use /api/detect", "not_a_classifier"
                ) from None
            raise ApiError(
                422, f"model {e.message if isinstance(e, ParamError) else e}", "bad_model"
            ) from None
    # Small images decode faster than a hop to a worker thread; big ones must not block the loop.
    if sum(len(d) for _, d in files) <= INLINE_DECODE_BYTES:
        inputs = prepare(clf, files, settings)
    else:
        inputs = await run_in_threadpool(prepare, clf, files, settings)
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
    body = {
        "model": os.path.basename(model_dir.rstrip("/")),
        "results": results,
        "latency_ms": round(1000 * (time.perf_counter() - t0), 2),
    }
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), media_type="application/json"
    )


router = APIRouter(tags=["inference"])
router.add_api_route(
    "/api/classify",
    classify,
    methods=["POST"],
    openapi_extra=CLASSIFY_OPENAPI,
    route_class_override=DirectRoute,
)
