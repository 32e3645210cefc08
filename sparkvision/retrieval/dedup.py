"""Duplicate and near-duplicate images in a table, grouped transitively, with a rule for which to keep.

Exact duplicates share a content id (sha256 of the bytes). Near-duplicates are found in two
stages, the classic retrieval + verification pipeline (Philbin et al., CVPR 2007; Chum et al.,
BMVC 2008, for near-duplicate image detection):

1. **Candidates**: a descriptor per image on the executors, a FAISS index over them and a kNN
   search (``k`` neighbours) of every row against the table; pairs with cosine similarity
   ``>= candidate_threshold`` are candidates.
2. **Verification** (``verify=True``, the default): each candidate pair is aligned and scored on
   the executors by :mod:`sparkvision.retrieval.verify` (ECC similarity alignment with mirroring,
   then how well one image explains the other through a blur/sharpen filter and a tone curve), and
   linked by ``link``:

   * ``mutual`` (default): a pair with score ``>= threshold`` links when each image is the other's
     best-scoring candidate; a pair with score ``>= strict_threshold`` always links. A look-alike
     product that matches an image nearly as well as that image's real copy is not linked, while
     groups of several near-exact copies still form.
   * ``all``: every pair with score ``>= threshold`` links.

   With ``verify=False`` the cosine similarity itself is the score and every pair ``>= threshold``
   links (the single-stage behaviour).

Groups are the connected components of the links (so A~B and B~C puts A, B and C together even when
A and C are further apart).

Descriptors are mirror-invariant by construction, because a horizontal flip is the most common
edit that a feature extractor does not undo:

* ``pixels`` (no model needed): the grayscale image at 32x32, centred on its intensity centroid,
  box-blurred, zero mean and unit norm (:func:`pixel_descriptor`), averaged with its mirror image;
* a model directory: the L2-normalised backbone features of the image plus those of its mirror.

Why two stages (``benchmarks/bench_dedup.py``, Fashion-MNIST test split + 2,000 edited copies):
a single cosine threshold on the pixel descriptor needs 0.9995 to keep precision >= 0.98 and then
finds half of the copies, because distinct look-alike products are as close as edited copies once
the descriptor has blurred away their detail; supervised CNN features are worse (a classifier maps
all shirts to one point). Verification at full detail, after alignment, separates them; see
docs/retrieval.md for the figures.

Outputs, under OUT::

    OUT/groups.parquet    group_id, kind (exact|near), content_id, path, height, width, keep, best_score
    OUT/_dedup.json       the summary
    OUT/_descriptors/     the descriptors (Parquet; with verification also 32x32 grayscale thumbnails)
    OUT/_index/           the FAISS index over them
    OUT/_pairs/           with verification: every candidate pair with its cosine and score, so
                          thresholds can be re-chosen without recomputing
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
LINK_RULES = ("mutual", "all")
PIXEL_SIZE = 32
# Without verification: the cosine similarity that links a pair (see docs/retrieval.md: set per data set).
DEFAULT_THRESHOLD = {"pixels": 0.97, "model": 0.95}
# With verification: the cosine floor for a candidate pair (it only bounds the work; the
# verification score decides), and the verification scores that link a pair. General defaults:
# distinct photos score below 0.97 against each other and edited copies (flip, crop, JPEG,
# brightening) above 0.996 (tests/test_dedup.py); JPEG at quality 60 scores ~0.999, hence a strict
# threshold of 0.998. Fashion-MNIST, a worst case of look-alike 28x28 products, calibrates to
# 0.997 (benchmarks/results/dedup.md); calibrate on a labelled sample of your own data.
DEFAULT_CANDIDATE_THRESHOLD = {"pixels": 0.9, "model": 0.8}
DEFAULT_VERIFY_THRESHOLD = 0.995
DEFAULT_STRICT_THRESHOLD = 0.998
DESCRIPTOR_SCHEMA = (
    "content_id string, path string, height int, width int, descriptor array<float>, thumb binary, "
    "error string"
)
PAIR_SCHEMA = (
    "a long, b long, content_id_a string, path_a string, content_id_b string, path_b string, "
    "cosine float, score float"
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


def candidate_pairs(
    scores: np.ndarray, rows: np.ndarray, offset: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`pairs_above`, as arrays ``(a, b, cosine)`` with ``a < b``, each pair once."""
    q_idx, k_idx = np.nonzero((scores >= threshold) & (rows >= 0))
    a = offset + q_idx.astype(np.int64)
    b = rows[q_idx, k_idx].astype(np.int64)
    s = scores[q_idx, k_idx].astype(np.float32)
    keep = a != b
    a, b, s = np.minimum(a, b)[keep], np.maximum(a, b)[keep], s[keep]
    return dedupe_pairs(a, b, s)


def dedupe_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per ``(a, b)`` (the highest score), sorted by ``(a, b)``."""
    if len(a) == 0:
        return a.astype(np.int64), b.astype(np.int64), s.astype(np.float32)
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first]


def link_pairs(
    n: int,
    a: np.ndarray,
    b: np.ndarray,
    score: np.ndarray,
    threshold: float,
    rule: str = "mutual",
    strict_threshold: float | None = None,
) -> np.ndarray:
    """Which scored candidate pairs ``(a[i], b[i])`` of ``n`` rows become links (a bool mask).

    ``all``: ``score >= threshold``. ``mutual``: ``score >= strict_threshold``, or ``score >=
    threshold`` and the pair is the best-scoring candidate of both of its rows (ties count for
    both) -- mutual nearest neighbours, the standard guard against one-sided matches in image
    matching (Lowe, IJCV 2004, uses the ratio to the second match for the same purpose). It stops a
    look-alike from joining an image that already has a closer copy, while near-exact copies
    (``>= strict_threshold``) still group however many there are.
    """
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    score = np.asarray(score, np.float32)
    above = score >= threshold
    if rule == "all":
        return above
    if rule != "mutual":
        raise ValueError(f"link rule {rule!r} is not one of {', '.join(LINK_RULES)}")
    best = np.full(n, -np.inf, np.float32)
    np.maximum.at(best, a, score)
    np.maximum.at(best, b, score)
    mutual = (score >= best[a]) & (score >= best[b])
    strict = score >= (np.inf if strict_threshold is None else strict_threshold)
    return strict | (above & mutual)


# ---------------------------------------------------------------------------------------------
# Descriptors on the executors
# ---------------------------------------------------------------------------------------------


def descriptor_batches(blob_bc: Any, batch_size: int, thumb_size: int | None = None):
    """mapInArrow body: (content_id, path, image, height, width) -> DESCRIPTOR_SCHEMA.

    With ``thumb_size`` also the grayscale image at ``thumb_size`` x ``thumb_size`` (raw uint8
    bytes) for verification.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from sparkvision.data.images import RejectError, decode_to_array
        from sparkvision.inference.runtime import _rebatch, _run_model, get_model, preprocess_batch

        fn = pre = None
        if blob_bc is not None:
            fn, pre = get_model(blob_bc.value, "features")
        for batch in _rebatch(batches, batch_size):
            images = batch.column("image").to_pylist()
            errors: list[str | None] = [None] * len(images)
            thumbs: list[bytes | None] = [None] * len(images)
            if fn is None:
                d = PIXEL_SIZE * PIXEL_SIZE
                feats = np.zeros((len(images), d), np.float32)
                for i, data in enumerate(images):
                    try:
                        arr = decode_to_array(data or b"", 1, (PIXEL_SIZE, PIXEL_SIZE))
                        feats[i] = pixel_descriptor(arr)
                        if thumb_size == PIXEL_SIZE:
                            thumbs[i] = arr.tobytes()
                    except RejectError as e:
                        errors[i] = str(e)
            else:
                x, errors = preprocess_batch(images, pre)
                f = _run_model(fn, x) + _run_model(fn, x.flip(-1).contiguous())  # (B, D) + mirror
                f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                feats = f.float().numpy()
                d = feats.shape[1]
            if thumb_size is not None and (fn is not None or thumb_size != PIXEL_SIZE):
                for i, data in enumerate(images):
                    if errors[i] is None:
                        try:
                            thumbs[i] = decode_to_array(data or b"", 1, (thumb_size, thumb_size)).tobytes()
                        except RejectError as e:
                            errors[i] = str(e)
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
                    "thumb": pa.array(thumbs, pa.binary()),
                    "error": pa.array(errors, pa.string()),
                }
            )

    return run


def verify_batches(size: int, batch_size: int):
    """mapInArrow body: candidate pairs with both thumbnails -> PAIR_SCHEMA with the verification score.

    Pairs of identical bytes (same content id) score 1 without being computed.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        from sparkvision.inference.runtime import _rebatch
        from sparkvision.retrieval.verify import VerifyConfig, verify_pairs

        torch.set_num_threads(int(os.environ.get("SPARKVISION_INFER_THREADS", "1")))
        cfg = VerifyConfig(size=size)
        for batch in _rebatch(batches, batch_size):
            n = batch.num_rows
            same = np.asarray(
                pa.compute.equal(batch.column("content_id_a"), batch.column("content_id_b")).to_numpy(
                    zero_copy_only=False
                ),
                bool,
            )
            score = np.ones(n, np.float32)
            todo = np.flatnonzero(~same)
            if len(todo):
                ta = batch.column("thumb_a").to_pylist()
                tb = batch.column("thumb_b").to_pylist()
                a = np.frombuffer(b"".join(ta[i] for i in todo), np.uint8).reshape(-1, size, size)
                b = np.frombuffer(b"".join(tb[i] for i in todo), np.uint8).reshape(-1, size, size)
                score[todo] = verify_pairs(a.astype(np.float32) / 255, b.astype(np.float32) / 255, cfg)
            yield pa.RecordBatch.from_pydict(
                {
                    **{
                        c: batch.column(c)
                        for c in ("a", "b", "content_id_a", "path_a", "content_id_b", "path_b")
                    },
                    "cosine": batch.column("cosine"),
                    "score": pa.array(score, pa.float32()),
                }
            )

    return run


def _verify(
    spark: SparkSession,
    desc_dir: str,
    pairs_dir: str,
    ids: pa.Table,
    a: np.ndarray,
    b: np.ndarray,
    cosine: np.ndarray,
    size: int,
    batch_size: int,
) -> np.ndarray:
    """Scores for candidate pairs ``(a, b)`` (index rows), computed on the executors.

    The pairs go to Parquet (``pairs_dir``/``_input``), are joined on the executors with the
    thumbnails in the descriptor table by (content_id, path), scored, and written to ``pairs_dir``;
    the driver reads back only the scores.
    """
    from pyspark.sql import functions as F

    from sparkvision.spark import storage
    from sparkvision.spark.progress import spark_progress

    cids = ids.column("content_id")
    paths = ids.column("path")
    ta = pa.array(a, pa.int64())
    tb = pa.array(b, pa.int64())
    table = pa.table(
        {
            "a": ta,
            "b": tb,
            "content_id_a": cids.take(ta),
            "path_a": paths.take(ta),
            "content_id_b": cids.take(tb),
            "path_b": paths.take(tb),
            "cosine": pa.array(cosine, pa.float32()),
        }
    )
    input_dir = pairs_dir + "_input"
    os.makedirs(input_dir, exist_ok=True)
    pq.write_table(table, os.path.join(input_dir, "pairs.parquet"))
    thumbs = (
        spark.read.parquet(storage.qualify(desc_dir))
        .where(F.col("thumb").isNotNull())
        .select("content_id", "path", "thumb")
        .dropDuplicates(["content_id", "path"])
    )
    ta_df = thumbs.select(
        F.col("content_id").alias("content_id_a"),
        F.col("path").alias("path_a"),
        F.col("thumb").alias("thumb_a"),
    )
    tb_df = thumbs.select(
        F.col("content_id").alias("content_id_b"),
        F.col("path").alias("path_b"),
        F.col("thumb").alias("thumb_b"),
    )
    n_parts = max(1, min(len(a) // 2000 + 1, 4 * spark.sparkContext.defaultParallelism))
    joined = (
        spark.read.parquet(storage.qualify(input_dir))
        .repartition(n_parts)
        .join(ta_df, ["content_id_a", "path_a"])
        .join(tb_df, ["content_id_b", "path_b"])
    )
    with spark_progress(spark, "dedup: verify pairs"):
        joined.mapInArrow(verify_batches(size, batch_size), PAIR_SCHEMA).write.mode("overwrite").parquet(
            storage.qualify(pairs_dir)
        )
    import shutil

    shutil.rmtree(input_dir, ignore_errors=True)
    got = pq.read_table(pairs_dir, columns=["a", "b", "score"])
    ga, gb, gs = (got.column(c).to_numpy() for c in ("a", "b", "score"))
    order = np.lexsort((gb, ga))
    ga, gb, gs = ga[order], gb[order], gs[order]
    if len(ga) != len(a) or not (np.array_equal(ga, a) and np.array_equal(gb, b)):
        raise RuntimeError(f"verification returned {len(ga)} of {len(a)} candidate pairs")
    return gs.astype(np.float32)


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
    verify: bool = True,
    candidate_threshold: float | None = None,
    link: str = "mutual",
    strict_threshold: float | None = None,
    verify_size: int = PIXEL_SIZE,
    progress: Any = None,
) -> dict[str, Any]:
    """Find exact and near-duplicate groups in an image table and write them under ``out``.

    ``k`` bounds how many neighbours each image is compared with directly; bigger groups still
    form through transitivity. With ``verify`` (the default) candidates are pairs among the ``k``
    nearest neighbours with cosine ``>= candidate_threshold``, each is scored by
    :mod:`sparkvision.retrieval.verify`, and ``threshold`` / ``strict_threshold`` / ``link`` apply
    to that score (:func:`link_pairs`); without, ``threshold`` is a cosine similarity and every
    pair above it links. Defaults: :data:`DEFAULT_VERIFY_THRESHOLD`,
    :data:`DEFAULT_STRICT_THRESHOLD`, :data:`DEFAULT_CANDIDATE_THRESHOLD` and
    :data:`DEFAULT_THRESHOLD` (docs/retrieval.md explains how to calibrate them).
    """
    from pyspark.sql import functions as F

    from sparkvision.spark import storage
    from sparkvision.inference.runtime import _configure_workers, read_blob
    from sparkvision.spark.progress import Timer, spark_progress
    from sparkvision.data.table import read_table
    from sparkvision.retrieval.index import build_index, iter_shards, local_path
    from sparkvision.retrieval.search import SearchIndex

    if keep not in KEEP_RULES:
        raise ValueError(f"--keep {keep!r} is not one of {', '.join(KEEP_RULES)}")
    if link not in LINK_RULES:
        raise ValueError(f"--link {link!r} is not one of {', '.join(LINK_RULES)}")
    descriptor = "model" if model_dir else "pixels"
    verify = bool(verify) and not exact_only
    if verify:
        threshold = DEFAULT_VERIFY_THRESHOLD if threshold is None else float(threshold)
        strict_threshold = DEFAULT_STRICT_THRESHOLD if strict_threshold is None else float(strict_threshold)
        candidate_threshold = (
            DEFAULT_CANDIDATE_THRESHOLD[descriptor]
            if candidate_threshold is None
            else float(candidate_threshold)
        )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold {threshold} must be a verification score in [0, 1]")
        if not -1.0 <= candidate_threshold <= 1.0:
            raise ValueError(
                f"--candidate-threshold {candidate_threshold} must be a cosine similarity in [-1, 1]"
            )
        if verify_size < 16:
            raise ValueError(f"--verify-size must be >= 16 pixels, got {verify_size}")
    else:
        threshold = DEFAULT_THRESHOLD[descriptor] if threshold is None else float(threshold)
        candidate_threshold = threshold
        strict_threshold = None
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold {threshold} must be a cosine similarity in [-1, 1]")
    if k < 2:
        raise ValueError(f"k must be >= 2 (itself plus one neighbour), got {k}")
    timer = Timer()
    times: dict[str, float] = {}
    out_local = local_path(out)
    os.makedirs(out_local, exist_ok=True)
    df = read_table(spark, table, split).select("content_id", "path", "image", "height", "width")

    # Exact duplicates: content ids that occur more than once (normally few; ingest drops most).
    dup_ids = {r.content_id for r in df.groupBy("content_id").count().where(F.col("count") > 1).collect()}

    desc_dir = os.path.join(out_local, "_descriptors")
    index_dir = os.path.join(out_local, "_index")
    pairs_dir = os.path.join(out_local, "_pairs")
    if exact_only:
        desc_df = df.select("content_id", "path", "height", "width")
        with spark_progress(spark, "dedup: list rows"):
            desc_df.write.mode("overwrite").parquet(storage.qualify(desc_dir))
    else:
        blob = spark.sparkContext.broadcast(read_blob(model_dir)) if model_dir else None
        _configure_workers(spark, batch_size)
        thumb = verify_size if verify else None
        desc_df = df.mapInArrow(descriptor_batches(blob, batch_size, thumb), DESCRIPTOR_SCHEMA)
        with spark_progress(spark, "dedup: descriptors"):
            desc_df.write.mode("overwrite").parquet(storage.qualify(desc_dir))
    times["descriptors_s"] = timer.elapsed

    a = b = np.zeros(0, np.int64)
    cosine = score = np.zeros(0, np.float32)
    linked = np.zeros(0, bool)
    n = 0
    index_summary: dict[str, Any] = {}
    if exact_only:
        ids = pq.read_table(desc_dir, columns=["content_id", "path", "height", "width"])
        n = ids.num_rows
    else:
        index_summary = build_index(desc_dir, index_dir, column="descriptor")
        idx = SearchIndex(index_dir)
        n = idx.ntotal
        offset = 0
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for vecs, _ in iter_shards(desc_dir, "descriptor", ()):
            nb = idx.search(vecs, min(k, n))
            found.append(candidate_pairs(nb.scores, nb.rows, offset, candidate_threshold))
            offset += len(vecs)
            if progress is not None:
                progress(len(vecs), f"{offset:,}/{n:,} searched")
        if found:
            a, b, cosine = dedupe_pairs(*(np.concatenate(x) for x in zip(*found, strict=True)))
        ids = pq.read_table(
            os.path.join(index_dir, "ids.parquet"), columns=["content_id", "path", "height", "width"]
        )
        times["search_s"] = timer.elapsed - sum(times.values())
        if verify:
            if len(a):
                score = _verify(spark, desc_dir, pairs_dir, ids, a, b, cosine, verify_size, batch_size)
            else:
                score = np.zeros(0, np.float32)
            times["verify_s"] = timer.elapsed - sum(times.values())
            linked = link_pairs(n, a, b, score, threshold, link, strict_threshold)
        else:
            score = cosine
            linked = score >= threshold
    pairs = list(zip(a[linked].tolist(), b[linked].tolist(), score[linked].tolist(), strict=True))

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
    labels = union_find(n, ((i, j) for i, j, _ in all_pairs))
    best = np.full(n, np.nan, np.float32)
    for i, j, sc in all_pairs:
        for r in (i, j):
            if np.isnan(best[r]) or sc > best[r]:
                best[r] = sc

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
        "verify": verify,
        "threshold": threshold if not exact_only else None,
        "candidate_threshold": candidate_threshold if verify else None,
        "strict_threshold": strict_threshold if verify and link == "mutual" else None,
        "link": link if verify else "all",
        "verify_size": verify_size if verify else None,
        "k": k,
        "keep_rule": keep,
        "exact_groups": n_exact,
        "near_groups": n_near,
        "rows_in_groups": len(grouped),
        "rows_to_remove": len(grouped) - len(groups),
        "candidate_pairs": int(len(a)),
        "pairs_above_threshold": int((score >= threshold).sum()) if not exact_only else 0,
        "links": len(pairs),
        "index": index_summary.get("kind"),
        "times_s": {key: round(v, 3) for key, v in times.items()},
        "elapsed_s": round(timer.elapsed, 3),
    }
    with open(os.path.join(out_local, "_dedup.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
