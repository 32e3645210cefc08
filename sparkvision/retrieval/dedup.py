"""Duplicate and near-duplicate images in a table, grouped transitively, with a rule for which to keep.

Exact duplicates share a content id (sha256 of the bytes). Near-duplicates are pairs whose
descriptors have cosine similarity >= ``threshold``; pairs come from a FAISS kNN search of every
row against the table itself, and groups are the connected components of those pairs (so A~B and
B~C puts A, B and C together even when A and C are further apart).

Descriptors are computed on the executors and are mirror-invariant by construction, because a
horizontal flip is the most common edit that a feature extractor does not undo:

* ``pixels`` (no model needed): the grayscale image at 32x32, centred on its intensity centroid,
  box-blurred, zero mean and unit norm (:func:`pixel_descriptor`), averaged with its mirror image;
* a model directory: the L2-normalised backbone features of the image plus those of its mirror.

Outputs, under OUT::

    OUT/groups.parquet    group_id, kind (exact|near), content_id, path, height, width, keep, best_score
    OUT/_dedup.json       the summary
    OUT/_descriptors/     the descriptors (Parquet), reusable
    OUT/_index/           the FAISS index over them
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

KEEP_RULES = ("largest", "earliest")
PIXEL_SIZE = 32
DEFAULT_THRESHOLD = {"pixels": 0.97, "model": 0.95}  # see docs/retrieval.md: set per data set
DESCRIPTOR_SCHEMA = (
    "content_id string, path string, height int, width int, descriptor array<float>, error string"
)


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def union_find(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected components of ``n`` nodes joined by ``pairs``; each node's label is the smallest
    node of its component (so labels are stable and need no renumbering).

    Union by smaller root with path halving: near-linear in ``n + len(pairs)``.
    """
    parent = np.arange(n, dtype=np.int64)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    for a, b in pairs:
        if not (0 <= a < n and 0 <= b < n):
            raise ValueError(f"pair ({a}, {b}) is out of range for {n} nodes")
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            parent[hi] = lo
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def keeper(members: Sequence[dict[str, Any]], rule: str = "largest") -> int:
    """Index of the member to keep: ``largest`` (most pixels, then earliest path) or ``earliest``
    (smallest path, i.e. first in sorted order, then most pixels)."""
    if not members:
        raise ValueError("a group has at least one member")

    def pixels(m: dict[str, Any]) -> int:
        return int(m.get("height") or 0) * int(m.get("width") or 0)

    if rule == "largest":
        return min(range(len(members)), key=lambda i: (-pixels(members[i]), str(members[i]["path"])))
    if rule == "earliest":
        return min(range(len(members)), key=lambda i: (str(members[i]["path"]), -pixels(members[i])))
    raise ValueError(f"keep rule {rule!r} is not one of {', '.join(KEEP_RULES)}")


def pixel_descriptor(arr: np.ndarray, blur: int = 5) -> np.ndarray:
    """``(H, W[, 1])`` grayscale -> unit vector, invariant to brightness, contrast, mirroring and
    small shifts.

    The image is shifted (bilinear, sub-pixel) so its intensity centroid sits at the centre, which
    undoes translations and most of what a small crop does; a ``blur`` x ``blur`` box filter then
    absorbs small rotations, rescaling and noise; the mean is removed and the result is averaged
    with its mirror image and L2-normalised.
    """
    from scipy import ndimage

    x = np.asarray(arr, np.float32).reshape(arr.shape[0], arr.shape[1])
    w = x - x.min()
    total = w.sum()
    if total > 1e-6:
        ys, xs = np.indices(w.shape)
        cy, cx = (w * ys).sum() / total, (w * xs).sum() / total
        w = ndimage.shift(w, ((w.shape[0] - 1) / 2 - cy, (w.shape[1] - 1) / 2 - cx), order=1, mode="constant")
    if blur > 1:
        w = ndimage.uniform_filter(w, size=blur, mode="constant")
    w = w + w[:, ::-1]  # mirror-symmetric
    w = w - w.mean()
    norm = np.linalg.norm(w)
    return (w / norm).ravel().astype(np.float32) if norm > 1e-6 else np.zeros(w.size, np.float32)


def pairs_above(
    scores: np.ndarray, rows: np.ndarray, offset: int, threshold: float
) -> list[tuple[int, int, float]]:
    """kNN results of queries ``offset..offset+Q`` -> (i, j, score) pairs, i < j, score >= threshold."""
    out = []
    q_idx, k_idx = np.nonzero((scores >= threshold) & (rows >= 0))
    for qi, ki in zip(q_idx, k_idx, strict=False):
        i, j = offset + int(qi), int(rows[qi, ki])
        if i != j:
            out.append((min(i, j), max(i, j), float(scores[qi, ki])))
    return out


# ---------------------------------------------------------------------------------------------
# Descriptors on the executors
# ---------------------------------------------------------------------------------------------


def descriptor_batches(blob_bc: Any, batch_size: int):
    """mapInArrow body: (content_id, path, image, height, width) -> DESCRIPTOR_SCHEMA."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from ..images import RejectError, decode_to_array
        from ..infer import _rebatch, _run_model, get_model, preprocess_batch

        fn = pre = None
        if blob_bc is not None:
            fn, pre = get_model(blob_bc.value, "features")
        for batch in _rebatch(batches, batch_size):
            images = batch.column("image").to_pylist()
            errors: list[str | None] = [None] * len(images)
            if fn is None:
                d = PIXEL_SIZE * PIXEL_SIZE
                feats = np.zeros((len(images), d), np.float32)
                for i, data in enumerate(images):
                    try:
                        feats[i] = pixel_descriptor(decode_to_array(data or b"", 1, (PIXEL_SIZE, PIXEL_SIZE)))
                    except RejectError as e:
                        errors[i] = str(e)
            else:
                x, errors = preprocess_batch(images, pre)
                f = _run_model(fn, x) + _run_model(fn, x.flip(-1).contiguous())  # (B, D) + mirror
                f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                feats = f.float().numpy()
                d = feats.shape[1]
            flat = pa.array(feats.reshape(-1), pa.float32())
            desc = pa.ListArray.from_arrays(pa.array(np.arange(0, (len(feats) + 1) * d, d), pa.int32()), flat)
            if any(errors):
                mask = pa.array([e is not None for e in errors])
                desc = pa.compute.if_else(mask, pa.nulls(len(feats), desc.type), desc)
            yield pa.RecordBatch.from_pydict(
                {
                    "content_id": batch.column("content_id"),
                    "path": batch.column("path"),
                    "height": batch.column("height"),
                    "width": batch.column("width"),
                    "descriptor": desc,
                    "error": pa.array(errors, pa.string()),
                }
            )

    return run


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def dedup_table(
    spark: SparkSession,
    table: str,
    out: str,
    *,
    model_dir: str | None = None,
    threshold: float | None = None,
    keep: str = "largest",
    split: str | None = None,
    k: int = 16,
    exact_only: bool = False,
    batch_size: int = 512,
    progress: Any = None,
) -> dict[str, Any]:
    """Find exact and near-duplicate groups in an image table and write them under ``out``.

    ``k`` bounds how many neighbours each image links to directly; bigger groups still form
    through transitivity. ``threshold`` defaults to the descriptor's calibrated value
    (docs/retrieval.md).
    """
    from pyspark.sql import functions as F

    from .. import storage
    from ..infer import _configure_workers, read_blob
    from ..progress import Timer, spark_progress
    from ..table import read_table
    from .index import build_index, iter_shards, local_path
    from .search import SearchIndex

    if keep not in KEEP_RULES:
        raise ValueError(f"--keep {keep!r} is not one of {', '.join(KEEP_RULES)}")
    descriptor = "model" if model_dir else "pixels"
    threshold = DEFAULT_THRESHOLD[descriptor] if threshold is None else float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold} must be a cosine similarity in [-1, 1]")
    if k < 2:
        raise ValueError(f"k must be >= 2 (itself plus one neighbour), got {k}")
    timer = Timer()
    out_local = local_path(out)
    os.makedirs(out_local, exist_ok=True)
    df = read_table(spark, table, split).select("content_id", "path", "image", "height", "width")

    # Exact duplicates: content ids that occur more than once (normally few; ingest drops most).
    dup_ids = {r.content_id for r in df.groupBy("content_id").count().where(F.col("count") > 1).collect()}

    desc_dir = os.path.join(out_local, "_descriptors")
    index_dir = os.path.join(out_local, "_index")
    if exact_only:
        desc_df = df.select("content_id", "path", "height", "width")
        with spark_progress(spark, "dedup: list rows"):
            desc_df.write.mode("overwrite").parquet(storage.qualify(desc_dir))
    else:
        blob = spark.sparkContext.broadcast(read_blob(model_dir)) if model_dir else None
        _configure_workers(spark, batch_size)
        desc_df = df.mapInArrow(descriptor_batches(blob, batch_size), DESCRIPTOR_SCHEMA)
        with spark_progress(spark, "dedup: descriptors"):
            desc_df.write.mode("overwrite").parquet(storage.qualify(desc_dir))

    pairs: list[tuple[int, int, float]] = []
    n = 0
    ids_path = None
    index_summary: dict[str, Any] = {}
    if exact_only:
        ids = pq.read_table(desc_dir, columns=["content_id", "path", "height", "width"])
        n = ids.num_rows
    else:
        index_summary = build_index(desc_dir, index_dir, column="descriptor")
        idx = SearchIndex(index_dir)
        n = idx.ntotal
        offset = 0
        for vecs, _ in iter_shards(desc_dir, "descriptor", ()):
            nb = idx.search(vecs, min(k, n))
            pairs.extend(pairs_above(nb.scores, nb.rows, offset, threshold))
            offset += len(vecs)
            if progress is not None:
                progress(len(vecs), f"{offset:,}/{n:,} searched")
        ids_path = os.path.join(index_dir, "ids.parquet")
        ids = pq.read_table(ids_path, columns=["content_id", "path", "height", "width"])

    cids = ids.column("content_id").to_pylist()
    first_of: dict[str, int] = {}
    exact_pairs = []
    for row, cid in enumerate(cids):
        if cid in dup_ids:
            if cid in first_of:
                exact_pairs.append((first_of[cid], row, 1.0))
            else:
                first_of[cid] = row
    all_pairs = exact_pairs + pairs
    labels = union_find(n, ((a, b) for a, b, _ in all_pairs))
    best = np.full(n, np.nan, np.float32)
    for a, b, s in all_pairs:
        for r in (a, b):
            if np.isnan(best[r]) or s > best[r]:
                best[r] = s

    counts = np.bincount(labels, minlength=n)
    grouped = np.flatnonzero(counts[labels] > 1)
    paths = ids.column("path").to_pylist()
    heights = ids.column("height").to_pylist()
    widths = ids.column("width").to_pylist()
    groups: dict[int, list[int]] = {}
    for r in grouped:
        groups.setdefault(int(labels[r]), []).append(int(r))

    rows: dict[str, list[Any]] = {
        c: [] for c in ("group_id", "kind", "content_id", "path", "height", "width", "keep", "best_score")
    }
    n_exact = n_near = 0
    for gid, (_, members) in enumerate(sorted(groups.items())):
        info = [{"path": paths[r], "height": heights[r], "width": widths[r]} for r in members]
        kidx = keeper(info, keep)
        kind = "exact" if len({cids[r] for r in members}) == 1 else "near"
        n_exact += kind == "exact"
        n_near += kind == "near"
        for i, r in enumerate(members):
            rows["group_id"].append(gid)
            rows["kind"].append(kind)
            rows["content_id"].append(cids[r])
            rows["path"].append(paths[r])
            rows["height"].append(heights[r])
            rows["width"].append(widths[r])
            rows["keep"].append(i == kidx)
            rows["best_score"].append(None if np.isnan(best[r]) else float(best[r]))
    schema = pa.schema(
        [
            ("group_id", pa.int64()),
            ("kind", pa.string()),
            ("content_id", pa.string()),
            ("path", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("keep", pa.bool_()),
            ("best_score", pa.float32()),
        ]
    )
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), os.path.join(out_local, "groups.parquet"))

    summary = {
        "table": table,
        "output": out,
        "rows": n,
        "descriptor": descriptor if not exact_only else "content_id",
        "model_dir": model_dir,
        "threshold": threshold if not exact_only else None,
        "keep_rule": keep,
        "exact_groups": n_exact,
        "near_groups": n_near,
        "rows_in_groups": len(grouped),
        "rows_to_remove": len(grouped) - len(groups),
        "pairs_above_threshold": len(pairs),
        "index": index_summary.get("kind"),
        "elapsed_s": round(timer.elapsed, 3),
    }
    with open(os.path.join(out_local, "_dedup.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
