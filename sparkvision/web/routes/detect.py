"""``POST /api/detect``: an uploaded image and a detector directory -> its boxes, in pixels.

The score filter and the box count are the ``detect`` operation's own parameters (their defaults
and bounds are read from :data:`~sparkvision.ops.detect.DetectParams`, not written again), and
the detection itself is :class:`~sparkvision.web.detecting.Detector`, the batch operation's
functions for one image.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sparkvision.data.images import RejectError
from sparkvision.errors import ParamError
from sparkvision.ops.detect import DetectParams
from sparkvision.web import browse
from sparkvision.web.detecting import Detector, Found, is_detector_dir
from sparkvision.web.routes.state import StateDep
from sparkvision.web.security import ApiError, Settings, check_image, reject_to_api, relative_name, safe_path
from sparkvision.web.uploads import UPLOAD_OPENAPI, read_uploads

router = APIRouter(tags=["inference"])
MAX_FILES = 1  # one image per request (also sizes the endpoint's body limit)
COORD_DECIMALS = 2  # box corners in pixels: hundredths are below what anyone can see


class DetectQuery(BaseModel):
    """The query of ``/api/detect``; unknown names are an error (a misspelt ``min_scor`` must not
    silently give the default)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Detector directory inside a data root (from train-detector).")
    min_score: Annotated[float, DetectParams.model_fields["min_score"]]
    max_detections: Annotated[int, DetectParams.model_fields["max_detections"]]


def detector_dir(model: str, settings: Settings, param: str = "model") -> str:
    """``?model=`` (or ``param``) resolved inside the data roots: a detector's directory, else a
    4xx naming why."""
    path = safe_path(model, settings.data_roots, must_exist=True, what=param)
    if not browse.is_model_dir(path):
        raise ApiError(404, f"{param} {model!r} is not a sparkvision model directory", "not_a_model")
    if not is_detector_dir(path):
        raise ApiError(
            422,
            f"{param} {model!r} is not a detector (a classifier? use /api/classify); "
            "detectors come from train-detector",
            "not_a_detector",
        )
    return path


def detect_one(det: Detector, name: str, data: bytes, q: DetectQuery, settings: Settings) -> Found:
    """Limits first (from the header), then the detector; an image that does not decode is a 422."""
    check_image(data, settings, name)
    try:
        found = det.detect(data, q.min_score, q.max_detections)
    except RejectError as e:
        raise reject_to_api(e, name) from None
    if found.error is not None:
        raise ApiError(422, f"{name}: {found.error}", found.error.split(":")[0])
    return found


def box_json(d: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: round(float(d[k]), COORD_DECIMALS) for k in ("x1", "y1", "x2", "y2")},
        "score": float(d["score"]),
        "label": d["label"],
        "label_name": d["label_name"],
    }


@router.post("/api/detect", openapi_extra=UPLOAD_OPENAPI)
async def detect(request: Request, sv: StateDep, q: Annotated[DetectQuery, Query()]):
    """One image (multipart field ``file`` or a raw ``image/*`` body) -> its detections, best
    first, as ``x1, y1, x2, y2`` in pixels of the uploaded image, with score and label."""
    t0 = time.perf_counter()
    settings = sv.settings
    model_dir = detector_dir(q.model, settings)
    name, data = (await read_uploads(request, settings, ("file", "files"), MAX_FILES))[0]
    try:
        det = await run_in_threadpool(sv.detector, model_dir)
    except (ParamError, FileNotFoundError) as e:  # corrupt weights, weights that do not fit, ...
        raise ApiError(422, f"model {e.message if isinstance(e, ParamError) else e}", "bad_model") from None
    found = await run_in_threadpool(detect_one, det, name, data, q, settings)
    return {
        "model": relative_name(model_dir, settings.data_roots),
        "filename": name,
        "width": found.width,
        "height": found.height,
        "class_names": det.class_names,
        "min_score": q.min_score,
        "max_detections": q.max_detections,
        "detections": [box_json(d) for d in found.detections],
        "latency_ms": round(1000 * (time.perf_counter() - t0), 2),
    }
