"""``/api/models...`` and ``/api/tables...``: what is under the data roots, read with pyarrow (no Spark).

Every name a client sends is resolved inside the data roots first (:func:`safe_path`); the reading
itself is :mod:`sparkvision.web.browse`, run in a worker thread so a big footer never blocks the loop.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from sparkvision.web import browse
from sparkvision.web.routes.state import StateDep
from sparkvision.web.security import ApiError, Settings, safe_path

router = APIRouter(tags=["data"])


def model_path(name: str, settings: Settings) -> str:
    path = safe_path(name, settings.data_roots, must_exist=True, what="model")
    if not browse.is_model_dir(path):
        raise ApiError(404, f"{name!r} is not a sparkvision model directory", "not_a_model")
    return path


@router.get("/api/models")
async def models(sv: StateDep):
    """Model directories under the data roots, with config, classes, preprocessing and metrics."""
    return {"models": await run_in_threadpool(browse.list_models, sv.settings.data_roots)}


# Before /api/models/{name:path}, which would otherwise take ".../confusion.png" as the model's name.
@router.get("/api/models/{name:path}/confusion.png")
async def model_confusion_png(name: str, sv: StateDep):
    path = os.path.join(model_path(name, sv.settings), "confusion_matrix.png")
    if not os.path.isfile(path):
        raise ApiError(404, f"model {name!r} has no confusion matrix yet: run an evaluate job", "not_found")
    return FileResponse(path, media_type="image/png")


@router.get("/api/models/{name:path}")
async def model(name: str, sv: StateDep):
    return browse.describe_model(model_path(name, sv.settings), sv.settings.data_roots)


@router.get("/api/tables")
async def tables(sv: StateDep):
    """Parquet tables under the data roots: image, prediction, features tables, with row counts."""
    return {"tables": await run_in_threadpool(browse.list_tables, sv.settings.data_roots)}


@router.get("/api/tables/{name:path}/rows")
async def table_rows(
    name: str,
    sv: StateDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(24, ge=1, le=200),
    source: str | None = Query(None, description="Image table to take thumbnails from (prediction tables)."),
):
    """One page of rows with a thumbnail (PNG data URL) per row where the image can be found."""
    roots = sv.settings.data_roots
    path = safe_path(name, roots, must_exist=True, what="table")
    src = (
        safe_path(source, roots, must_exist=True, what="source")
        if source
        else browse.source_table_of(path, roots)
    )
    return await run_in_threadpool(browse.table_rows, path, offset, limit, src)


@router.get("/api/tables/{name:path}")
async def table(name: str, sv: StateDep):
    path = safe_path(name, sv.settings.data_roots, must_exist=True, what="table")
    return await run_in_threadpool(browse.describe_table, path, sv.settings.data_roots)
