"""What exists under the data roots: models, tables and their rows, read with pyarrow.

Listing and paging read Parquet footers and only the row groups a page needs, so browsing stays
fast and never waits behind a Spark job. Thumbnails are small PNG data URLs made from the image
bytes: from the table itself (image tables), or, for prediction and features tables (which keep
``content_id`` but not the bytes), from the image table they were made from.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from sparkvision.data.images import WIDE_GRAY_MODES, to_8bit
from sparkvision.data.schema import META_FILE
from sparkvision.web.security import ApiError, relative_name

MAX_DEPTH = 4
THUMB_PX = 64
SKIP_DIRS = {"checkpoints", "tensorboard", "hasher", "_hasher", ".git", "__pycache__"}


def _walk(roots: list[str]):
    for root in roots:
        base_depth = root.rstrip(os.sep).count(os.sep)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            depth = dirpath.count(os.sep) - base_depth
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            if depth >= MAX_DEPTH:
                dirnames[:] = []
            yield dirpath, dirnames, set(filenames)


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(
        os.path.join(path, "config.json")
    )


def describe_model(path: str, roots: list[str]) -> dict[str, Any]:
    metrics = read_json(os.path.join(path, "metrics.json"), {}) or {}
    evaluation = read_json(os.path.join(path, "evaluation.json"))
    return {
        "name": relative_name(path, roots),
        "path": path,
        "config": read_json(os.path.join(path, "config.json"), {}),
        "classes": read_json(os.path.join(path, "classes.json"), []),
        "preprocess": read_json(os.path.join(path, "preprocess.json"), {}),
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
        "history": metrics.get("history", []),
        "evaluation": None
        if evaluation is None
        else {
            k: evaluation.get(k)
            for k in (
                "accuracy",
                "macro_f1",
                "rows",
                "split",
                "table",
                "class_names",
                "confusion_matrix",
                "per_class",
            )
        },
        "has_confusion_png": os.path.isfile(os.path.join(path, "confusion_matrix.png")),
    }


def list_models(roots: list[str]) -> list[dict[str, Any]]:
    out = []
    for dirpath, dirnames, files in _walk(roots):
        if "model.safetensors" in files and "config.json" in files:
            out.append(describe_model(dirpath, roots))
            dirnames[:] = []
    return out


def _parquet_files(path: str) -> list[str]:
    files = []
    for dirpath, _, names in os.walk(path):
        files += [
            os.path.join(dirpath, n) for n in names if n.endswith(".parquet") and not n.startswith(("_", "."))
        ]
    return sorted(files)


def table_kind(path: str, names: list[str]) -> str:
    if os.path.isfile(os.path.join(path, META_FILE)):
        return "image"
    if "pred_label" in names:
        return "predictions"
    if "embedding" in names or "code" in names:
        return "features"
    if "group" in names or "group_id" in names:
        return "dedup"
    return "parquet"


def dataset(path: str) -> pads.Dataset:
    files = _parquet_files(path)
    if not files:
        raise ApiError(404, f"{path} is not a Parquet table (no .parquet files)", "not_a_table")
    return pads.dataset(files, format="parquet")


def describe_table(path: str, roots: list[str]) -> dict[str, Any]:
    ds = dataset(path)
    names = ds.schema.names
    kind = table_kind(path, names)
    info: dict[str, Any] = {
        "name": relative_name(path, roots),
        "path": path,
        "kind": kind,
        "rows": sum(f.count_rows() for f in ds.get_fragments()),
        "columns": names,
    }
    meta = read_json(os.path.join(path, META_FILE))
    if meta:
        info["class_names"] = meta.get("class_names", [])
        info["sources"] = meta.get("sources", [])
    extra = read_json(os.path.join(path, "_retrieval.json"))
    if extra:
        info["retrieval"] = extra
    return info


def list_tables(roots: list[str]) -> list[dict[str, Any]]:
    out = []
    for dirpath, dirnames, files in _walk(roots):
        if META_FILE in files or "_SUCCESS" in files or any(f.endswith(".parquet") for f in files):
            if is_model_dir(dirpath) or "index.faiss" in files:  # a model or a search index, not a table
                continue
            try:
                out.append(describe_table(dirpath, roots))
            except (ApiError, pa.ArrowInvalid, OSError):
                continue
            dirnames[:] = []
    return out


def thumbnail(data: bytes | None, px: int = THUMB_PX) -> str | None:
    """A PNG data URL no bigger than ``px`` on a side, or None for bytes that do not decode."""
    if not data:
        return None
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        img.draft("RGB", (px, px))
        gray = img.mode == "L" or img.mode in WIDE_GRAY_MODES
        img = to_8bit(img, "L" if gray else "RGB")  # 16-bit scaled like every decode, not clipped
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - a broken image gets no thumbnail, not an error
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def images_by_content_id(table_path: str, content_ids: Sequence[str | None]) -> dict[str, bytes]:
    """Image bytes for these content ids from an image table (reads only matching row groups);
    missing ids (None) are skipped."""
    ids = [c for c in content_ids if c]
    if not ids:
        return {}
    ds = dataset(table_path)
    if "image" not in ds.schema.names or "content_id" not in ds.schema.names:
        return {}
    t = ds.to_table(columns=["content_id", "image"], filter=pc.field("content_id").isin(ids))
    return dict(zip(t.column("content_id").to_pylist(), t.column("image").to_pylist(), strict=True))


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return None
    if isinstance(v, float) and v != v:  # NaN
        return None
    return v


def table_rows(path: str, offset: int, limit: int, source: str | None = None) -> dict[str, Any]:
    """One page of a table, with a thumbnail per row where the image can be found."""
    ds = dataset(path)
    names = ds.schema.names
    total = 0
    pieces: list[pa.Table] = []
    want_end = offset + limit
    columns = [c for c in names if c not in ("embedding",)]
    for frag in ds.get_fragments():
        n = frag.count_rows()
        lo, hi = total, total + n
        total = hi
        if hi <= offset or lo >= want_end or len(pieces) and sum(p.num_rows for p in pieces) >= limit:
            continue
        t = frag.to_table(columns=columns)
        pieces.append(t.slice(max(0, offset - lo), min(hi, want_end) - max(lo, offset)))
    page = (
        pa.concat_tables(pieces)
        if pieces
        else pa.table({c: pa.array([], ds.schema.field(c).type) for c in columns})
    )
    rows = page.to_pylist()
    images: dict[str, bytes] = {}
    if "image" not in names and source and "content_id" in names:
        images = images_by_content_id(source, [r.get("content_id") for r in rows])
    out_rows = []
    for r in rows:
        data = r.get("image") if "image" in names else images.get(r.get("content_id"))
        out_rows.append({**{k: _jsonable(v) for k, v in r.items() if k != "image"}, "thumb": thumbnail(data)})
    return {
        "table": path,
        "kind": table_kind(path, names),
        "offset": offset,
        "limit": limit,
        "total": total,
        "columns": [c for c in columns if c != "image"],
        "rows": out_rows,
        "source": source,
    }


def source_table_of(path: str, roots: list[str]) -> str | None:
    """The image table a derived table was made from, if it recorded one inside the data roots."""
    meta = (
        read_json(os.path.join(path, "_sparkvision_source.json"))
        or read_json(os.path.join(path, "_retrieval.json"))
        or {}
    )
    src = meta.get("table")
    if isinstance(src, str):
        src = src.removeprefix("file://").removeprefix("file:")
        real = os.path.realpath(src)
        if any(os.path.commonpath([real, r]) == r for r in roots) and os.path.isdir(real):
            return real
    return None
