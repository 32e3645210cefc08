"""Distributed detection (``sparkvision detect``): a detector over a whole table on the executors.

As :mod:`sparkvision.inference.predict`: the detector's directory is read and checked once on the
driver, shipped as its safetensors bytes (a broadcast; over Spark Connect its path, see
:mod:`sparkvision.inference.modelref`), built once per Python worker and run over Arrow batches
with ``mapInArrow``. Each image is decoded and resized to the detector's input with the shared
transform and its ``preprocess.json``; boxes come back in pixels of the stored image (each row's
own ``width`` x ``height``), after NMS and the score filter (:func:`sparkvision.detect.boxes.filter_detections`).
A row that cannot be decoded gets an ``error`` and no detections, never a failed job.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pyspark.sql import DataFrame, SparkSession
from safetensors.torch import load as st_load
from torchvision.utils import draw_bounding_boxes, make_grid

from sparkvision.detect.boxes import clip_boxes, filter_detections, rescale_boxes
from sparkvision.errors import ParamError
from sparkvision.inference.modelref import ModelRef, PathModel, model_dir_here
from sparkvision.inference.runtime import ModelBlob, rebatch
from sparkvision.models.detector import DetectorSpec, load_detector_dir
from sparkvision.models.modeldir import Preprocess
from sparkvision.spark.filestore import local_path
from sparkvision.spark.session import is_connect
from sparkvision.transforms.preprocess import preprocess_batch

DETECTION_STRUCT = (
    "struct<x1: float, y1: float, x2: float, y2: float, score: float, label: int, label_name: string>"
)
DETECT_SCHEMA = f"content_id string, path string, detections array<{DETECTION_STRUCT}>, error string"
SOURCE_COLUMNS = ("image", "content_id", "path", "width", "height")
DETECTION_TYPE = pa.list_(
    pa.struct(
        [
            *(pa.field(k, pa.float32()) for k in ("x1", "y1", "x2", "y2", "score")),
            pa.field("label", pa.int32()),
            pa.field("label_name", pa.string()),
        ]
    )
)
NMS_IOU = 0.5

# One detector per Python worker process (Spark reuses workers across tasks), by weights digest.
_DETECTORS: dict[str, tuple[torch.nn.Module, Preprocess]] = {}


def ship_detector(spark: SparkSession, model_dir: str) -> ModelRef:
    """Read and check the detector's directory on the driver; the tasks' way to its weights."""
    if is_connect(spark) and local_path(model_dir) is None:
        raise ParamError("model_dir", f"{model_dir}: over Spark Connect give a directory the executors share")
    with model_dir_here(spark, model_dir) as here:
        blob = detector_blob(here)
    if not is_connect(spark):
        return spark.sparkContext.broadcast(blob)
    return PathModel(os.path.abspath(model_dir), blob.key, blob.spec, blob.preprocess, blob.class_names)


def detector_blob(model_dir: str) -> ModelBlob:
    """A local detector directory, read and checked, as what a task builds its detector from."""
    found = load_detector_dir(model_dir)
    return ModelBlob(
        key=hashlib.sha1(found.weights).hexdigest(), weights=found.weights, spec=found.spec.to_json(),
        preprocess=found.preprocess.to_json(), class_names=found.class_names,
    )  # fmt: skip


def worker_detector(blob: ModelBlob, threads: int) -> tuple[torch.nn.Module, Preprocess]:
    torch.set_num_threads(threads)
    hit = _DETECTORS.get(blob.key)
    if hit is not None:
        return hit
    model = DetectorSpec.from_json(blob.spec).build()
    model.load_state_dict(st_load(blob.weights))
    model.eval()
    if torch.cuda.is_available():
        model = model.cuda()
    _DETECTORS.clear()  # one detector per worker at a time keeps memory flat across jobs
    _DETECTORS[blob.key] = (model, Preprocess.from_json(blob.preprocess))
    return _DETECTORS[blob.key]


def detections_of(
    out: dict[str, torch.Tensor],
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    class_names: list[str],
    min_score: float,
    max_detections: int,
    class_agnostic: bool,
) -> list[dict[str, Any]]:
    """One image's detector output as rows of ``detections``: filtered, suppressed, best first,
    in pixels of the stored image (``image_size = (width, height)``; ``input_size`` likewise)."""
    boxes, scores, labels = out["boxes"].float().cpu(), out["scores"].float().cpu(), out["labels"].cpu()
    keep = filter_detections(
        boxes, scores, labels, min_score=min_score, iou_threshold=NMS_IOU,
        class_agnostic=class_agnostic, max_detections=max_detections,
    )  # fmt: skip
    xyxy = clip_boxes(rescale_boxes(boxes[keep], input_size, image_size), image_size)
    rows = []
    for (x1, y1, x2, y2), s, k in zip(
        xyxy.tolist(), scores[keep].tolist(), labels[keep].tolist(), strict=True
    ):
        label = int(k) - 1  # 0 is the background
        name = class_names[label] if 0 <= label < len(class_names) else None
        rows.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": s, "label": label, "label_name": name})
    return rows


def detect_batches(
    model: ModelRef,
    min_score: float,
    max_detections: int,
    batch_size: int,
    threads: int,
    keep_image: bool = False,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: :data:`SOURCE_COLUMNS` -> :data:`DETECT_SCHEMA` (and ``image`` when ``keep_image``)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        blob = model.value
        net, pre = worker_detector(blob, threads)
        for batch in rebatch(batches, batch_size):
            detections, errors = detect_batch(net, pre, blob, batch, min_score, max_detections)
            cols = {
                "content_id": batch.column("content_id"),
                "path": batch.column("path"),
                "detections": pa.array(detections, DETECTION_TYPE),
                "error": pa.array(errors, pa.string()),
            }
            if keep_image:
                cols["image"] = batch.column("image")
            yield pa.RecordBatch.from_pydict(cols)

    return run


def detect_batch(
    net: torch.nn.Module,
    pre: Preprocess,
    blob: ModelBlob,
    batch: pa.RecordBatch,
    min_score: float,
    max_detections: int,
) -> tuple[list[list[dict[str, Any]] | None], list[str | None]]:
    """Detections of one Arrow batch (``image``, ``width``, ``height``): per row, boxes in pixels
    of the stored image, best first (None where the image does not decode), and the error; what
    ``detect``, ``crop`` and ``features`` all run."""
    x, errors = preprocess_batch(batch.column("image").to_pylist(), pre)
    outs = run_detector(net, x)
    input_size = (pre.size[1], pre.size[0])
    agnostic = bool(blob.spec["class_agnostic"])
    widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
    detections = [
        None if err is not None else detections_of(
            o, input_size, (w, h), blob.class_names, min_score, max_detections, agnostic
        )
        for o, w, h, err in zip(outs, widths, heights, errors, strict=True)
    ]  # fmt: skip
    return detections, errors


def run_detector(net: torch.nn.Module, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One call of a torchvision detector on a batch (a list of images, as it takes them)."""
    device = next(net.parameters()).device
    with torch.inference_mode():
        return net(list(x.to(device)))


def detect_df(
    spark: SparkSession,
    model: ModelRef,
    df: DataFrame,
    min_score: float,
    max_detections: int,
    batch_size: int,
    threads: int,
    keep_image: bool = False,
) -> DataFrame:
    """Lazy detections of ``df``'s rows (columns :data:`SOURCE_COLUMNS`)."""
    schema = DETECT_SCHEMA + (", image binary" if keep_image else "")
    body = detect_batches(model, min_score, max_detections, batch_size, threads, keep_image)
    return df.select(*SOURCE_COLUMNS).mapInArrow(body, schema)


def draw_preview(rows: list[Any], path: str, tile: int = 256) -> int:
    """A PNG grid of ``rows`` (``image`` bytes and ``detections``) with the boxes drawn; returns
    how many images it shows. Each image is scaled to fit a ``tile`` square first (up or down),
    so boxes and scores are drawn at a size one can read whatever the image's."""
    tiles = []
    for r in rows:
        if r.error is not None:
            continue
        img = Image.open(io.BytesIO(r.image)).convert("RGB")
        scale = tile / max(img.size)
        fitted = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        t = torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1)
        dets = r.detections or []
        if dets:
            boxes = rescale_boxes(
                torch.tensor([[d.x1, d.y1, d.x2, d.y2] for d in dets]), img.size, fitted.size
            )
            labels = [f"{d.label_name or d.label} {d.score:.2f}" for d in dets]
            t = draw_bounding_boxes(t, boxes, labels=labels, colors="red", width=2)
        canvas = Image.new("RGB", (tile, tile))
        canvas.paste(
            Image.fromarray(t.permute(1, 2, 0).numpy()),
            ((tile - fitted.width) // 2, (tile - fitted.height) // 2),
        )
        tiles.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
    if not tiles:
        return 0
    grid = make_grid(tiles, nrow=min(4, len(tiles)), padding=4)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, format="PNG")
    return len(tiles)
