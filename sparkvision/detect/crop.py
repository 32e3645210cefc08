"""Detect -> crop -> embed on the executors: ``sparkvision crop`` and ``sparkvision features``.

Why crop at all (JD's product pipeline): a product photo's subject is often small on a busy
background, and whole-image features describe the background as much as the product. So each
image's best box (or every box above the score, ``all_boxes``) is grown by a margin, cut from the
stored image's pixels and, for ``features``, embedded, all inside one ``mapInArrow`` task: the
image is decoded once, the crops never leave the Python worker, and no intermediate table is
written. ``crop`` writes the crops instead, as an image table (PNG bytes) with where each came from.

An image where nothing scores high enough falls back to the whole image, marked ``fallback``, so
every source row has its crop: a search over crops never silently loses an image.

The geometry (margin, clipping, whole pixels, the fallback box) is :mod:`sparkvision.detect.boxes`;
the detector is run as ``detect`` runs it (:func:`sparkvision.detect.inference.detect_batch`); the
embedder as ``embed`` runs it (:func:`sparkvision.inference.runtime.worker_model`), fed through
the same resize (:func:`sparkvision.transforms.preprocess.image_pixels`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pyspark.sql import DataFrame
from torchvision.ops import box_iou

from sparkvision.data.images import RejectError, content_id, open_image
from sparkvision.detect.boxes import as_boxes, crop_rect, expand_boxes
from sparkvision.detect.config import MIN_SCORE, CropSpec
from sparkvision.detect.inference import DETECTION_TYPE, detect_batch, worker_detector
from sparkvision.inference.modelref import ModelRef
from sparkvision.inference.runtime import rebatch, run_model, vectors_column, worker_model
from sparkvision.transforms.preprocess import decode_image, image_pixels, normalize, to_unit

if TYPE_CHECKING:  # a hasher is only called here; importing retrieval would make a cycle
    from sparkvision.retrieval.codes import Hasher

# What the source rows must have (an image table, or a detection table).
SOURCE_COLUMNS = (
    "image",
    "content_id",
    "path",
    "width",
    "height",
    "channels",
    "label",
    "label_name",
    "split",
)
BOX_TYPE = DETECTION_TYPE.value_type  # struct<x1, y1, x2, y2, score, label, label_name>
BOX_DDL = "struct<x1: float, y1: float, x2: float, y2: float, score: float, label: int, label_name: string>"
# The crops table: an image table (train, embed, search and dedup take it) plus where each crop came from.
CROPS_SCHEMA = (
    "content_id string, path string, image binary, format string, height int, width int, channels int, "
    f"label int, label_name string, split string, source_content_id string, box {BOX_DDL}, "
    "fallback boolean, error string"
)
# The features table: ``embed``'s columns (index, search and dedup take it) plus the crop's origin;
# ``content_id``/``path`` are the source image's, ``crop`` numbers its boxes (0 = the best).
FEATURES_SCHEMA = (
    "content_id string, path string, split string, label int, label_name string, embedding array<float>, "
    f"error string, crop int, box {BOX_DDL}, fallback boolean"
)


def crop_settings(crop: dict[str, Any]) -> tuple[CropSpec, float]:
    """The crop and score threshold a features table was made with (its ``_retrieval.json``
    ``crop`` entry), for cropping its queries the same way: always the best box."""
    return CropSpec(margin=float(crop.get("margin", CropSpec.margin))), float(
        crop.get("min_score", MIN_SCORE)
    )


def pick_boxes(detections: list[dict[str, Any]], all_boxes: bool) -> list[dict[str, Any]]:
    """The boxes to crop, best first: the best one (JD's "keep the highest-scoring box"), or every
    one (``detections`` are already filtered by score and suppressed, best first)."""
    return list(detections) if all_boxes else list(detections[:1])


def crop_pixels(
    img: Image.Image, box: dict[str, Any] | None, margin: float
) -> tuple[Image.Image, dict[str, Any]]:
    """The crop of ``box`` grown by ``margin`` (the whole image when ``box`` is None) and the box
    actually cut, in pixels of ``img``: the margin is clipped at the border, never padded."""
    size = img.size
    if box is None:
        return img, {"x1": 0.0, "y1": 0.0, "x2": float(size[0]), "y2": float(size[1]),
                     "score": None, "label": None, "label_name": None}  # fmt: skip
    grown = expand_boxes(as_boxes([[box["x1"], box["y1"], box["x2"], box["y2"]]]), margin, size)[0]
    left, top, right, bottom = crop_rect(grown, size)
    return img.crop((left, top, right, bottom)), {**box, "x1": float(left), "y1": float(top),
                                                  "x2": float(right), "y2": float(bottom)}  # fmt: skip


def crops_of(
    data: bytes, channels: int, detections: list[dict[str, Any]], spec: CropSpec
) -> list[tuple[Image.Image, dict[str, Any], bool]]:
    """``(crop, box, fallback)`` for each picked box of one stored image; the whole image, marked
    ``fallback``, when there is none. Raises :class:`RejectError` for bytes that do not decode."""
    arr = decode_image(data, 1 if channels == 1 else 3)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    picked = pick_boxes(detections, spec.all_boxes)
    if not picked:
        crop, box = crop_pixels(img, None, spec.margin)
        return [(crop, box, True)]
    return [(*crop_pixels(img, b, spec.margin), False) for b in picked]


def encode_png(img: Image.Image, max_side: int | None) -> bytes:
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _source_crops(
    batch: pa.RecordBatch, detections: list[Any], errors: list[str | None], spec: CropSpec
) -> Iterator[tuple[int, int, Image.Image | None, dict[str, Any] | None, bool | None, str | None]]:
    """``(source row, crop number, crop, box, fallback, error)`` of a batch; one error row per
    source row whose image does not decode."""
    images, channels = batch.column("image").to_pylist(), batch.column("channels").to_pylist()
    for i, (data, ch, dets, err) in enumerate(zip(images, channels, detections, errors, strict=True)):
        if err is None:
            try:
                for k, (crop, box, fallback) in enumerate(crops_of(data, ch, dets or [], spec)):
                    yield i, k, crop, box, fallback, None
                continue
            except RejectError as e:
                err = f"{e.reason}: {e.detail}" if e.detail else e.reason
        yield i, 0, None, None, None, err


MATCH_IOU = 0.5  # a crop takes a true box's label when its detection overlaps it this much


def matched_box(det: dict[str, Any] | None, truth: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The true box (of a detection table's ``boxes``) that detection ``det`` overlaps most, with
    IoU >= :data:`MATCH_IOU`, or None: so a crop of a scene of several items is labelled with the
    item it shows, not with the scene's label (its largest item's), and can train a classifier."""
    if det is None or not truth:
        return None
    ious = box_iou(
        torch.tensor([[det["x1"], det["y1"], det["x2"], det["y2"]]], dtype=torch.float32),
        torch.tensor([[t["x1"], t["y1"], t["x2"], t["y2"]] for t in truth], dtype=torch.float32),
    )[0]
    best = int(torch.argmax(ious))
    return truth[best] if float(ious[best]) >= MATCH_IOU else None


def crop_batches(
    detector: ModelRef, spec: CropSpec, min_score: float, batch_size: int, threads: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: :data:`SOURCE_COLUMNS` (and a detection table's ``boxes``) ->
    :data:`CROPS_SCHEMA` (PNG crops). With true boxes, a crop's ``label``/``label_name`` are those
    of the true box its detection matches (:func:`matched_box`), else the source row's."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        blob = detector.value
        net, pre = worker_detector(blob, threads)
        for batch in rebatch(batches, batch_size):
            dets, errors = detect_batch(net, pre, blob, batch, min_score, 1000)
            rows: dict[str, list[Any]] = {k: [] for k in _CROP_FIELDS}
            src = {
                c: batch.column(c).to_pylist() for c in ("content_id", "path", "label", "label_name", "split")
            }
            truth = batch.column("boxes").to_pylist() if "boxes" in batch.schema.names else None
            for i, k, crop, box, fallback, err in _source_crops(batch, dets, errors, spec):
                label, name = src["label"][i], src["label_name"][i]
                if truth is not None:
                    found = dets[i]
                    hit = matched_box(found[k] if found and not fallback else None, truth[i])
                    label, name = (hit["label"], hit["label_name"]) if hit else (label, name)
                png = encode_png(crop, spec.max_side) if crop is not None else None
                shown = Image.open(io.BytesIO(png)) if png is not None else None
                rows["content_id"].append(content_id(png) if png is not None else None)
                rows["path"].append(f"{src['path'][i]}#crop{k}")
                rows["image"].append(png)
                rows["format"].append("PNG" if png is not None else None)
                rows["height"].append(shown.height if shown else None)
                rows["width"].append(shown.width if shown else None)
                rows["channels"].append(len(shown.getbands()) if shown else None)
                rows["label"].append(label)
                rows["label_name"].append(name)
                rows["split"].append(src["split"][i])
                rows["source_content_id"].append(src["content_id"][i])
                rows["box"].append(box)
                rows["fallback"].append(fallback)
                rows["error"].append(err)
            yield pa.RecordBatch.from_pydict({k: pa.array(v, _CROP_TYPES.get(k)) for k, v in rows.items()})

    return run


_CROP_FIELDS = (
    "content_id", "path", "image", "format", "height", "width", "channels", "label", "label_name",
    "split", "source_content_id", "box", "fallback", "error",
)  # fmt: skip
_CROP_TYPES: dict[str, pa.DataType] = {
    "content_id": pa.string(), "path": pa.string(), "image": pa.binary(), "format": pa.string(),
    "height": pa.int32(), "width": pa.int32(), "channels": pa.int32(), "label": pa.int32(),
    "label_name": pa.string(), "split": pa.string(), "source_content_id": pa.string(), "box": BOX_TYPE,
    "fallback": pa.bool_(), "error": pa.string(),
}  # fmt: skip


def embed_crops(fn: Any, pre: Any, crops: list[Image.Image | None]) -> np.ndarray:
    """L2-normalised features of crops (zeros for None), through the embedder's own preprocessing."""
    h, w = pre.size
    x = torch.zeros(len(crops), pre.channels, h, w, dtype=torch.uint8)
    for i, c in enumerate(crops):
        if c is not None:
            x[i] = torch.tensor(image_pixels(c, pre.channels, pre.size, resize=pre.resize))  # a copy
    return run_model(fn, normalize(to_unit(x), pre.mean, pre.std)).float().numpy()


def features_batches(
    detector: ModelRef,
    embedder: ModelRef,
    spec: CropSpec,
    min_score: float,
    batch_size: int,
    threads: int,
    hasher: Hasher | None = None,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: :data:`SOURCE_COLUMNS` -> :data:`FEATURES_SCHEMA` (+ ``code`` with a hasher):
    detect, crop and embed in one pass over each batch."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        dblob, eblob = detector.value, embedder.value
        net, dpre = worker_detector(dblob, threads)
        fn, epre = worker_model(eblob, "features", threads)
        for batch in rebatch(batches, batch_size):
            dets, errors = detect_batch(net, dpre, dblob, batch, min_score, 1000)
            found = list(_source_crops(batch, dets, errors, spec))
            take = pa.array([r[0] for r in found], pa.int64())
            feats = embed_crops(fn, epre, [r[2] for r in found])
            row_errors = [r[5] for r in found]
            cols = {
                c: batch.column(c).take(take) for c in ("content_id", "path", "split", "label", "label_name")
            }
            cols["embedding"] = vectors_column(feats, row_errors)
            cols["error"] = pa.array(row_errors, pa.string())
            cols["crop"] = pa.array([r[1] for r in found], pa.int32())
            cols["box"] = pa.array([r[3] for r in found], BOX_TYPE)
            cols["fallback"] = pa.array([r[4] for r in found], pa.bool_())
            if hasher is not None:
                codes = hasher.encode(feats)
                cols["code"] = pa.array(
                    [None if e is not None else c.tobytes() for c, e in zip(codes, row_errors, strict=True)],
                    pa.binary(),
                )
            yield pa.RecordBatch.from_pydict(cols)

    return run


@dataclass(frozen=True)
class InHand:
    """A model blob already on this process (the driver, the web server): a :class:`ModelRef`
    without a broadcast."""

    value: Any


def image_rows(images: list[bytes]) -> pa.RecordBatch:
    """Encoded images as a batch of :data:`SOURCE_COLUMNS` (sizes from their headers; an image
    whose header does not read gets 1x1 and fails, with its reason, where it is decoded)."""
    sizes = []
    for data in images:
        try:
            img = open_image(data)
            sizes.append((img.width, img.height, len(img.getbands())))
        except (RejectError, OSError, ValueError):
            sizes.append((1, 1, 3))
    return pa.RecordBatch.from_pydict(
        {
            "image": pa.array(images, pa.binary()),
            "content_id": pa.array([content_id(d) for d in images]),
            "path": pa.array([f"query/{i}" for i in range(len(images))]),
            "width": pa.array([s[0] for s in sizes], pa.int32()),
            "height": pa.array([s[1] for s in sizes], pa.int32()),
            "channels": pa.array([1 if s[2] == 1 else 3 for s in sizes], pa.int32()),
            "label": pa.nulls(len(images), pa.int32()),
            "label_name": pa.nulls(len(images), pa.string()),
            "split": pa.array(["unlabeled"] * len(images)),
        }
    )


def features_of_images(
    detector: Any, embedder: Any, crop: dict[str, Any], images: list[bytes]
) -> tuple[np.ndarray, list[str | None]]:
    """The best crop's features of each query image, cropped as a features table's images were
    (``crop`` is its ``_retrieval.json`` entry): the batch pipeline's own body, in this process.
    ``detector``/``embedder`` are :class:`~sparkvision.inference.runtime.ModelBlob`\\ s."""
    spec, min_score = crop_settings(crop)
    body = features_batches(InHand(detector), InHand(embedder), spec, min_score, max(1, len(images)), 1)
    out = pa.Table.from_batches(list(body(iter([image_rows(images)]))))
    errors = out.column("error").to_pylist()
    vecs = out.column("embedding").to_pylist()
    dim = next((len(v) for v in vecs if v is not None), 0)
    filled = [v if v is not None else [0.0] * dim for v in vecs]
    return np.asarray(filled, np.float32).reshape(len(vecs), dim), errors


def features_df(
    detector: ModelRef,
    embedder: ModelRef,
    source: DataFrame,
    spec: CropSpec,
    min_score: float,
    batch_size: int,
    threads: int,
    hasher: Hasher | None = None,
) -> DataFrame:
    """Lazy: detect -> crop -> embed (-> code) of ``source``'s rows (:data:`SOURCE_COLUMNS`), one mapInArrow."""
    schema = FEATURES_SCHEMA + (", code binary" if hasher is not None else "")
    body = features_batches(detector, embedder, spec, min_score, batch_size, threads, hasher)
    return source.mapInArrow(body, schema)
