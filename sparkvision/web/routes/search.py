"""``POST /api/search``: an uploaded image -> the k most similar images of the ``--index`` index."""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from sparkvision.errors import ParamError
from sparkvision.ops.search import SearchParams
from sparkvision.retrieval.index import features_meta
from sparkvision.retrieval.search import AnyIndex, embed_images, query_meta
from sparkvision.web import browse
from sparkvision.web.routes.detect import detector_dir
from sparkvision.web.routes.state import StateDep
from sparkvision.web.security import ApiError, Settings, check_image, safe_path
from sparkvision.web.uploads import UPLOAD_OPENAPI, read_uploads

router = APIRouter(tags=["inference"])
MAX_FILES = 1  # one query image per request (also sizes the endpoint's body limit)


def local(uri: str) -> str:
    return uri.removeprefix("file://").removeprefix("file:")


def with_thumbs(hits: list[dict[str, Any]], idx: AnyIndex, settings: Settings) -> list[dict[str, Any]]:
    """``hits`` with a ``thumb`` each: from the index's source image table, else the file inside a data root."""
    images: dict[str, bytes] = {}
    src = features_meta(idx.meta.get("features", "")).get("table") if idx.meta.get("features") else None
    if src and os.path.isdir(local(src)):
        images = browse.images_by_content_id(local(src), [h.get("content_id") for h in hits])
    for h in hits:
        cid = h.get("content_id")
        data = images.get(cid) if cid else None
        path = local(h.get("path") or "")
        if data is None and path and os.path.isfile(path):
            try:
                safe_path(path, settings.data_roots, must_exist=True)
                with open(path, "rb") as f:
                    data = f.read(settings.max_upload_bytes)
            except ApiError:
                data = None
        h["thumb"] = browse.thumbnail(data)
    return hits


@router.post("/api/search", openapi_extra=UPLOAD_OPENAPI)
async def search(
    request: Request,
    sv: StateDep,
    k: int = Query(8, ge=1, le=200, description="Neighbours to return."),
    detector: str | None = Query(None, description=SearchParams.model_fields["detector"].description),
):
    """An uploaded image (multipart field ``file`` or a raw body) -> its k most similar images."""
    t0 = time.perf_counter()
    settings = sv.settings
    det = None if detector is None else await run_in_threadpool(detector_dir, detector, settings, "detector")
    idx = await run_in_threadpool(sv.search_index)
    files = await read_uploads(request, settings, ("file", "files"), MAX_FILES)
    name, data = files[0]
    await run_in_threadpool(check_image, data, settings, name)
    model_dir = idx.model_dir
    if not model_dir:
        raise ApiError(503, "the index does not record the model that made its features", "no_model")

    def run() -> list[dict[str, Any]]:
        try:
            # cropped first with the given detector, or the index's for an index of crops
            feats, errors = embed_images(model_dir, [data], query_meta(idx.meta, det))
        except (ParamError, FileNotFoundError) as e:  # the server's index names a model that cannot load
            raise ApiError(
                503, f"the index's model {e.message if isinstance(e, ParamError) else e}", "bad_model"
            ) from None
        if errors[0]:
            raise ApiError(422, f"{name}: {errors[0]}", "bad_image")
        hits = idx.results(idx.search(feats, k))[0]
        return with_thumbs(hits, idx, settings)

    hits = await run_in_threadpool(run)
    assert settings.index_dir is not None  # search_index() answered 503 without one
    return {
        "query": name,
        "k": k,
        "index": os.path.basename(settings.index_dir.rstrip("/")),
        "neighbours": hits,
        "latency_ms": round(1000 * (time.perf_counter() - t0), 2),
    }
