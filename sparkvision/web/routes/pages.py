"""``/`` (the one web page; its scripts and styles are mounted at ``/static`` by ``create_app``) and ``/api/health``."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import FileResponse

from sparkvision.web.routes.state import StateDep

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "static")

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index_page():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))


@router.get("/api/health", tags=["server"])
async def health(sv: StateDep):
    settings = sv.settings
    return {
        "ok": True,
        "model": settings.model_dir,
        "index": settings.index_dir,
        "data_roots": settings.data_roots,
        "token_required": bool(settings.token),
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "max_files": settings.max_files,
        },
        "batching": {k: b.stats.to_json() for k, b in sv.batchers.items()},
        "running_job": sv.runner.current_job,
    }
