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

Descriptors are mirror-invariant by construction (:mod:`sparkvision.retrieval.descriptors`): the
``pixels`` descriptor needs no model; with a model directory they are its backbone features.

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

The modules, in pipeline order: :mod:`~sparkvision.retrieval.descriptors` (executors),
:mod:`~sparkvision.retrieval.index` + :class:`~sparkvision.retrieval.search.SearchIndex` (kNN on
the driver), :mod:`~sparkvision.retrieval.scoring` (verification on the executors),
:mod:`~sparkvision.retrieval.linking` (links, groups and keepers; pure), and this module's
:func:`dedup_table`, which runs them and writes the groups.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import read_table
from sparkvision.errors import ParamError
from sparkvision.inference.modelref import ship_model
from sparkvision.inference.runtime import configure_workers
from sparkvision.retrieval.descriptors import DESCRIPTOR_SCHEMA, PIXEL_SIZE, descriptor_batches
from sparkvision.retrieval.index import build_index, iter_shards, local_path
from sparkvision.retrieval.linking import (
    KEEP_RULES,
    LINK_RULES,
    candidate_pairs,
    dedupe_pairs,
    keeper,
    link_pairs,
    union_find,
)
from sparkvision.retrieval.scoring import score_candidates
from sparkvision.retrieval.search import SearchIndex
from sparkvision.retrieval.shard_build import build_sharded_index
from sparkvision.retrieval.shard_search import read_meta, shard_ids_table, sharded_pairs
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress

# Without verification: the cosine similarity that links a pair (see docs/retrieval.md: set per data set).
DEFAULT_THRESHOLD = {"pixels": 0.97, "model": 0.95}
# With verification: the cosine floor for a candidate pair (it only bounds the work; the
# verification score decides), and the verification scores that link a pair. General defaults,
# not calibrated on any benchmark's edits: distinct photos score below 0.97 against each other and
# edited copies (flip, crop, JPEG 25-60, WEBP, brightening, downscale-then-pad) above 0.996
# (tests/test_dedup.py), near-exact ones ~0.999, hence a strict threshold of 0.998.
# benchmarks/results/dedup.md measures them per edit family on Fashion-MNIST, a worst case of
# look-alike 28x28 products; calibrate on a labelled sample of your own data where it matters.
DEFAULT_CANDIDATE_THRESHOLD = {"pixels": 0.9, "model": 0.8}
DEFAULT_VERIFY_THRESHOLD = 0.995
DEFAULT_STRICT_THRESHOLD = 0.998
GROUP_SCHEMA = pa.schema(
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


def resolve_thresholds(
    descriptor: str,
    verify: bool,
    threshold: float | None,
    candidate_threshold: float | None,
    strict_threshold: float | None,
) -> tuple[float, float, float | None]:
    """``(threshold, candidate_threshold, strict_threshold)`` with the defaults filled in and checked.

    With verification ``threshold`` is a verification score in [0, 1]; without it, a cosine
    similarity that is also the candidate floor, and there is no strict threshold.
    """
    if not verify:
        threshold = DEFAULT_THRESHOLD[descriptor] if threshold is None else float(threshold)
        if not -1.0 <= threshold <= 1.0:
            raise ParamError("threshold", f"{threshold} must be a cosine similarity in [-1, 1]")
        return threshold, threshold, None
    threshold = DEFAULT_VERIFY_THRESHOLD if threshold is None else float(threshold)
    strict = DEFAULT_STRICT_THRESHOLD if strict_threshold is None else float(strict_threshold)
    candidate = (
        DEFAULT_CANDIDATE_THRESHOLD[descriptor] if candidate_threshold is None else float(candidate_threshold)
    )
    if not 0.0 <= threshold <= 1.0:
        raise ParamError("threshold", f"{threshold} must be a verification score in [0, 1]")
    if not -1.0 <= candidate <= 1.0:
        raise ParamError("candidate_threshold", f"{candidate} must be a cosine similarity in [-1, 1]")
    return threshold, candidate, strict


def search_candidates(
    desc_dir: str,
    index_dir: str,
    k: int,
    candidate_threshold: float,
    progress: Any = None,
    spark: SparkSession | None = None,
    shards: int | str | None = None,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Index the descriptors and search every row against them: ``(n, a, b, cosine, index summary)``
    with each candidate pair ``a < b`` once; rows are those of the index's ``ids.parquet`` (with
    ``shards``: of its shards' id mappings in order, built and searched on the executors)."""
    if shards is not None and spark is not None:
        index_summary = build_sharded_index(spark, desc_dir, index_dir, shards=shards, column="descriptor")
        a, b, cosine = dedupe_pairs(
            *sharded_pairs(spark, index_dir, desc_dir, "descriptor", k, candidate_threshold)
        )
        return index_summary["rows"], a, b, cosine, index_summary
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
    a = b = np.zeros(0, np.int64)
    cosine = np.zeros(0, np.float32)
    if found:
        a, b, cosine = dedupe_pairs(*(np.concatenate(x) for x in zip(*found, strict=True)))
    return n, a, b, cosine, index_summary


def exact_pairs(content_ids: list[str], duplicated: set[str]) -> np.ndarray:
    """``(m, 2)`` rows joining every later copy of a duplicated content id to its first row."""
    first_of: dict[str, int] = {}
    out = []
    for row, cid in enumerate(content_ids):
        if cid in duplicated:
            if cid in first_of:
                out.append((first_of[cid], row))
            else:
                first_of[cid] = row
    return np.array(out, np.int64).reshape(-1, 2)


def group_table(
    ids: pa.Table, links: np.ndarray, scores: np.ndarray, keep: str
) -> tuple[pa.Table, dict[str, int]]:
    """Rows in a group of two or more (connected components of ``links``), one kept per group,
    each with the best score of its links; and the counts for the summary."""
    n = ids.num_rows
    labels = union_find(n, links)
    best = np.full(n, np.nan, np.float32)
    np.fmax.at(best, links[:, 0], scores)  # fmax: NaN (no link yet) loses to any score
    np.fmax.at(best, links[:, 1], scores)
    counts = np.bincount(labels, minlength=n)
    grouped = np.flatnonzero(counts[labels] > 1)
    cids = ids.column("content_id").to_pylist()
    paths = ids.column("path").to_pylist()
    heights = ids.column("height").to_pylist()
    widths = ids.column("width").to_pylist()
    groups: dict[int, list[int]] = {}
    for g in grouped:
        groups.setdefault(int(labels[g]), []).append(int(g))
    rows: dict[str, list[Any]] = {name: [] for name in GROUP_SCHEMA.names}
    n_exact = 0
    for gid, (_, members) in enumerate(sorted(groups.items())):
        kidx = keeper([{"path": paths[r], "height": heights[r], "width": widths[r]} for r in members], keep)
        kind = "exact" if len({cids[r] for r in members}) == 1 else "near"
        n_exact += kind == "exact"
        for i, r in enumerate(members):
            rows["group_id"].append(gid)
            rows["kind"].append(kind)
            rows["content_id"].append(cids[r])
            rows["path"].append(paths[r])
            rows["height"].append(heights[r])
            rows["width"].append(widths[r])
            rows["keep"].append(i == kidx)
            rows["best_score"].append(None if np.isnan(best[r]) else float(best[r]))
    counts_out = {
        "exact_groups": n_exact,
        "near_groups": len(groups) - n_exact,
        "rows_in_groups": len(grouped),
        "rows_to_remove": len(grouped) - len(groups),
    }
    return pa.Table.from_pydict(rows, schema=GROUP_SCHEMA), counts_out


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
    shards: int | str | None = None,
) -> dict[str, Any]:
    """Find exact and near-duplicate groups in an image table and write them under ``out``.

    ``k`` bounds how many neighbours each image is compared with directly; bigger groups still
    form through transitivity. With ``verify`` (the default) candidates are pairs among the ``k``
    nearest neighbours with cosine ``>= candidate_threshold``, each is scored by
    :mod:`sparkvision.retrieval.verify`, and ``threshold`` / ``strict_threshold`` / ``link`` apply
    to that score (:func:`~sparkvision.retrieval.linking.link_pairs`); without, ``threshold`` is a
    cosine similarity and every pair above it links. Defaults: :data:`DEFAULT_VERIFY_THRESHOLD`,
    :data:`DEFAULT_STRICT_THRESHOLD`, :data:`DEFAULT_CANDIDATE_THRESHOLD` and
    :data:`DEFAULT_THRESHOLD` (docs/retrieval.md explains how to calibrate them).
    """
    if keep not in KEEP_RULES:
        raise ParamError("keep", f"{keep!r} is not one of {', '.join(KEEP_RULES)}")
    if link not in LINK_RULES:
        raise ParamError("link", f"{link!r} is not one of {', '.join(LINK_RULES)}")
    descriptor = "model" if model_dir else "pixels"
    verify = bool(verify) and not exact_only
    threshold, candidate_threshold, strict_threshold = resolve_thresholds(
        descriptor, verify, threshold, candidate_threshold, strict_threshold
    )
    if verify and verify_size < 16:
        raise ParamError("verify_size", f"must be >= 16 pixels, got {verify_size}")
    if k < 2:
        raise ParamError("k", f"must be >= 2 (itself plus one neighbour), got {k}")
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
        with spark_progress(spark, "dedup: list rows"):
            df.select("content_id", "path", "height", "width").write.mode("overwrite").parquet(
                storage.qualify(desc_dir)
            )
    else:
        model = ship_model(spark, model_dir) if model_dir else None
        threads = configure_workers(spark, batch_size)
        desc_df = df.mapInArrow(
            descriptor_batches(model, batch_size, verify_size if verify else None, threads, rescale=verify),
            DESCRIPTOR_SCHEMA,
        )
        with spark_progress(spark, "dedup: descriptors"):
            desc_df.write.mode("overwrite").parquet(storage.qualify(desc_dir))
    times["descriptors_s"] = timer.elapsed

    a = b = np.zeros(0, np.int64)
    score = np.zeros(0, np.float32)
    linked = np.zeros(0, bool)
    index_summary: dict[str, Any] = {}
    id_columns = ["content_id", "path", "height", "width"]
    if exact_only:
        ids = pq.read_table(desc_dir, columns=id_columns)
    else:
        n, a, b, cosine, index_summary = search_candidates(
            desc_dir, index_dir, k, candidate_threshold, progress, spark, shards
        )
        if shards is not None:  # the shards' id mappings, in the order sharded_pairs numbers rows
            ids = shard_ids_table(index_dir, id_columns, read_meta(spark, index_dir))
        else:
            ids = pq.read_table(os.path.join(index_dir, "ids.parquet"), columns=id_columns)
        times["search_s"] = timer.elapsed - sum(times.values())
        if verify:
            score = np.zeros(0, np.float32)
            if len(a):
                score = score_candidates(
                    spark, desc_dir, pairs_dir, ids, a, b, cosine, verify_size, batch_size
                )
            times["verify_s"] = timer.elapsed - sum(times.values())
            linked = link_pairs(n, a, b, score, threshold, link, strict_threshold)
        else:
            score = cosine
            linked = score >= threshold

    exact = exact_pairs(ids.column("content_id").to_pylist(), dup_ids)
    links = np.concatenate([exact, np.stack([a[linked], b[linked]], axis=1)])
    link_scores = np.concatenate([np.ones(len(exact), np.float32), score[linked].astype(np.float32)])
    groups, counts = group_table(ids, links, link_scores, keep)
    pq.write_table(groups, os.path.join(out_local, "groups.parquet"))

    summary = {
        "table": table,
        "output": out,
        "rows": ids.num_rows,
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
        **counts,
        "candidate_pairs": int(len(a)),
        "pairs_above_threshold": int((score >= threshold).sum()) if not exact_only else 0,
        "links": int(linked.sum()),
        "index": index_summary.get("kind"),
        "times_s": {key: round(v, 3) for key, v in times.items()},
        "elapsed_s": round(timer.elapsed, 3),
    }
    with open(os.path.join(out_local, "_dedup.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
