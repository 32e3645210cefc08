"""Searching an index: from the Python API, for image files, or for every row of a table on the executors.

Image files and image tables are embedded with the same model (recorded in ``index.json`` by
``sparkvision index``, or given explicitly), the same preprocessing and the same TorchScript path
as ``sparkvision embed`` (:mod:`sparkvision.inference.embed`), so a query lands where its copy in the
table would. A binary index encodes the query features with the hasher saved beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import is_image_table, read_table
from sparkvision.detect.crop import SOURCE_COLUMNS as CROP_SOURCE
from sparkvision.detect.crop import crop_settings, features_df, features_of_images
from sparkvision.detect.inference import detector_blob, ship_detector
from sparkvision.errors import ParamError
from sparkvision.inference.embed import embed_df
from sparkvision.inference.modelref import ship_model
from sparkvision.inference.runtime import (
    configure_workers,
    read_blob,
    run_model,
    task_threads,
    worker_model,
)
from sparkvision.retrieval.codes import Hasher
from sparkvision.retrieval.index import (
    HASHER_DIR,
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    local_path,
    set_search_params,
    vectors_of,
)
from sparkvision.retrieval.shard_online import ShardedSearchIndex
from sparkvision.retrieval.shard_search import is_sharded, sharded_search_df
from sparkvision.retrieval.shards import Neighbours
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress
from sparkvision.transforms.preprocess import preprocess_batch

RESULT_SCHEMA = (
    "query_content_id string, query_path string, rank int, content_id string, path string, "
    "label_name string, score float, error string"
)

RESULT_ARROW_SCHEMA = pa.schema(
    [
        ("query_content_id", pa.string()),
        ("query_path", pa.string()),
        ("rank", pa.int32()),
        ("content_id", pa.string()),
        ("path", pa.string()),
        ("label_name", pa.string()),
        ("score", pa.float32()),
        ("error", pa.string()),
    ]
)


class SearchIndex:
    """A loaded index: FAISS index, id mapping and (for codes) the hasher.

    Scores are cosine similarities for float indexes and ``1 - hamming / bits`` for binary ones,
    so higher is closer for both.
    """

    def __init__(self, directory: str, nprobe: int | None = None, ef_search: int | None = None) -> None:
        directory = local_path(directory)
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"{directory} is not an index directory ({META_FILE} is missing); build one with `sparkvision index`"
            )
        with open(meta_path) as f:
            self.meta: dict[str, Any] = json.load(f)
        self.directory = directory
        self.binary = self.meta["metric"] == "hamming"
        path = os.path.join(directory, INDEX_FILE)
        self.index = faiss.read_index_binary(path) if self.binary else faiss.read_index(path)
        params = dict(self.meta["choice"].get("params", {}))
        if nprobe is not None:
            params["nprobe"] = nprobe
        if ef_search is not None:
            params["efSearch"] = ef_search
        set_search_params(self.index, {k: v for k, v in params.items() if k in ("nprobe", "efSearch")})
        self.ids = pq.read_table(os.path.join(directory, IDS_FILE))
        self._content_id = (
            self.ids.column("content_id").to_pylist() if "content_id" in self.ids.column_names else None
        )
        self._path = self.ids.column("path").to_pylist() if "path" in self.ids.column_names else None
        self._label = (
            self.ids.column("label_name").to_pylist() if "label_name" in self.ids.column_names else None
        )
        self.hasher = None
        if self.binary and self.meta.get("hasher"):
            self.hasher = Hasher.load(os.path.join(directory, HASHER_DIR))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def model_dir(self) -> str | None:
        return self.meta.get("model_dir")

    def search(self, queries: np.ndarray, k: int = 10) -> Neighbours:
        """``queries``: float features ``(Q, D)`` (encoded with the hasher for a binary index) or
        packed codes ``(Q, bits/8)`` uint8 for a binary index."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(queries)
        if self.binary:
            if q.dtype != np.uint8:
                if self.hasher is None:
                    raise ValueError("this binary index has no hasher; pass packed uint8 codes")
                q = self.hasher.encode(q)
            dist, rows = self.index.search(np.ascontiguousarray(q), k)
            scores = 1.0 - dist.astype(np.float32) / self.meta["dim"]
        else:
            q = np.ascontiguousarray(q, dtype=np.float32)
            if q.ndim != 2 or q.shape[1] != self.meta["dim"]:
                raise ValueError(f"queries have shape {q.shape}; the index expects (Q, {self.meta['dim']})")
            scores, rows = self.index.search(q, k)
        return Neighbours(np.where(rows >= 0, scores, np.nan).astype(np.float32), rows)

    def describe(self, row: int) -> dict[str, Any]:
        return {
            "row": int(row),
            "content_id": self._content_id[row] if self._content_id else None,
            "path": self._path[row] if self._path else None,
            "label_name": self._label[row] if self._label else None,
        }

    def results(self, nb: Neighbours) -> list[list[dict[str, Any]]]:
        """Neighbours as plain dicts (rank, score, content_id, path, label_name) per query."""
        out = []
        for srow, rrow in zip(nb.scores, nb.rows, strict=False):
            hits = []
            for rank, (s, r) in enumerate(zip(srow, rrow, strict=False)):
                if r < 0:
                    continue
                hits.append({"rank": rank + 1, "score": round(float(s), 5), **self.describe(int(r))})
            out.append(hits)
        return out


AnyIndex = SearchIndex | ShardedSearchIndex  # what open_index returns: the same calls


def open_index(directory: str, nprobe: int | None = None) -> AnyIndex:
    """The index at ``directory`` for search in this process, sharded (memory-mapped shards within
    a budget, :mod:`~sparkvision.retrieval.shard_online`) or not."""
    if is_sharded(None, directory):
        return ShardedSearchIndex(directory, nprobe=nprobe)
    return SearchIndex(directory, nprobe=nprobe)


def embed_images(
    model_dir: str, images: list[bytes], meta: dict[str, Any] | None = None
) -> tuple[np.ndarray, list[str | None]]:
    """L2-normalised features of encoded images with the model's own preprocessing (driver side).

    With an index's ``meta`` that names a detector (an index of crop features, from
    ``sparkvision features``), each image's best box is cropped first, as the indexed images were:
    a whole scene would not find its product among crops.
    """
    if meta and meta.get("detector"):
        return features_of_images(
            detector_blob(meta["detector"]), read_blob(model_dir), meta.get("crop") or {}, images
        )
    fn, pre = worker_model(read_blob(model_dir), "features")
    x, errors = preprocess_batch(images, pre)
    return run_model(fn, x).float().numpy(), errors


def query_meta(meta: dict[str, Any], detector: str | None) -> dict[str, Any]:
    """The index's ``meta`` with ``detector`` to crop queries by, when one is given.

    An index of crops (built from ``features``) names its detector already; a catalogue of clean
    product pictures is better indexed whole (``embed``: a detector trained on busy scenes frames
    a plain picture differently from a scene's crop) and searched with scenes, whose product must
    still be cut out first. The crop settings stay the index's, else ``crop``'s defaults.
    """
    return {**meta, "detector": detector} if detector else meta


def search_images(
    index_dir: str,
    paths: list[str],
    k: int = 10,
    model_dir: str | None = None,
    nprobe: int | None = None,
    detector: str | None = None,
) -> list[dict[str, Any]]:
    """Nearest neighbours of image files; one entry per file with its hits or its error."""
    idx = open_index(index_dir, nprobe=nprobe)
    model_dir = model_dir or idx.model_dir
    if not model_dir:
        raise ParamError("model_dir", "required: the index does not record which model made its features")
    images = []
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"query image {p} does not exist")
        with open(p, "rb") as f:
            images.append(f.read())
    feats, errors = embed_images(model_dir, images, query_meta(idx.meta, detector))
    hits = idx.results(idx.search(feats, k))
    return [
        {"query": p, "error": e, "neighbours": [] if e else h}
        for p, e, h in zip(paths, errors, hits, strict=False)
    ]


# ---------------------------------------------------------------------------------------------
# Batch mode on the executors
# ---------------------------------------------------------------------------------------------

# One loaded index per Python worker process, reused by every task that worker runs.
_INDEXES: dict[tuple[str, int, int | None], SearchIndex] = {}


def _worker_index(directory: str, nprobe: int | None, threads: int) -> SearchIndex:
    faiss.omp_set_num_threads(threads)  # every task: a reused worker may come from another job
    key = (directory, os.stat(os.path.join(directory, INDEX_FILE)).st_mtime_ns, nprobe)
    hit = _INDEXES.get(key)
    if hit is None:
        _INDEXES.clear()
        hit = _INDEXES[key] = SearchIndex(directory, nprobe=nprobe)
    return hit


def search_batches(
    index_dir: str, k: int, nprobe: int | None, exclude_self: bool, threads: int = 1
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: (content_id, path, embedding, error) -> one row per (query, neighbour),
    searched with ``threads`` FAISS threads."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        idx = _worker_index(index_dir, nprobe, threads)
        kk = k + 1 if exclude_self else k
        for batch in batches:
            t = pa.Table.from_batches([batch])
            cids, paths = t.column("content_id").to_pylist(), t.column("path").to_pylist()
            errs = t.column("error").to_pylist() if "error" in t.column_names else [None] * t.num_rows
            valid = pc.is_valid(t.column("embedding")).to_numpy(zero_copy_only=False)
            rows: list[tuple[Any, ...]] = []  # (query row, rank, hit, error)
            good = np.flatnonzero(valid)
            for qi in np.flatnonzero(~valid):
                rows.append((int(qi), None, None, errs[qi] or "no embedding"))
            if len(good):
                feats = vectors_of(t.take(pa.array(good)), "embedding")
                for qi, hits in zip(good, idx.results(idx.search(feats, kk)), strict=False):
                    if exclude_self:
                        hits = [h for h in hits if h["content_id"] != cids[qi]][:k]
                    for rank, h in enumerate(hits, 1):
                        rows.append((int(qi), rank, h, None))
            yield pa.RecordBatch.from_pydict(
                {
                    "query_content_id": [cids[q] for q, _, _, _ in rows],
                    "query_path": [paths[q] for q, _, _, _ in rows],
                    "rank": [r for _, r, _, _ in rows],
                    "content_id": [h and h["content_id"] for _, _, h, _ in rows],
                    "path": [h and h["path"] for _, _, h, _ in rows],
                    "label_name": [h and h["label_name"] for _, _, h, _ in rows],
                    "score": [h and h["score"] for _, _, h, _ in rows],
                    "error": [e for _, _, _, e in rows],
                },
                schema=RESULT_ARROW_SCHEMA,
            )

    return run


def search_df(
    spark: SparkSession,
    index_dir: str,
    queries: DataFrame,
    k: int = 10,
    nprobe: int | None = None,
    exclude_self: bool = False,
) -> DataFrame:
    """Lazy: every row of a features DataFrame (content_id, path, embedding[, error]) searched on
    the executors. ``index_dir`` must be readable at the same path on every executor (local mode,
    or a shared/NFS mount on a cluster)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if is_sharded(spark, index_dir):  # one shard per task, merged by Spark (shard_search)
        res = sharded_search_df(spark, index_dir, queries, k, nprobe, exclude_self)
        return res.select(*RESULT_ARROW_SCHEMA.names)
    index_dir = os.path.abspath(local_path(index_dir))
    SearchIndex(index_dir)  # fail on the driver, with a clear message, before any task starts
    cols = [c for c in ("content_id", "path", "embedding", "error") if c in queries.columns]
    return queries.select(*cols).mapInArrow(
        search_batches(index_dir, k, nprobe, exclude_self, task_threads(spark)), RESULT_SCHEMA
    )


def search_table(
    spark: SparkSession,
    index_dir: str,
    table: str,
    out: str,
    *,
    k: int = 10,
    model_dir: str | None = None,
    split: str | None = None,
    nprobe: int | None = None,
    exclude_self: bool = False,
    batch_size: int = 512,
    detector: str | None = None,
) -> dict[str, Any]:
    """Search every row of ``table`` and write one Parquet row per (query, neighbour).

    ``table`` is either a features table from ``sparkvision embed`` (searched as is) or an image
    table, embedded on the fly with ``model_dir`` (default: the model that built the index).
    """
    timer = Timer()
    if is_image_table(spark, table):
        imeta = query_meta(open_index(index_dir).meta, detector)
        model_dir = model_dir or imeta.get("model_dir")
        if not model_dir:
            raise ParamError(
                "model_dir", "required to embed the image table: the index does not record its model"
            )
        if imeta.get("detector"):  # an index of crops: the queries are cropped the same way
            spec, min_score = crop_settings(imeta.get("crop") or {})
            queries = features_df(
                ship_detector(spark, imeta["detector"]), ship_model(spark, model_dir),
                read_table(spark, table, split).select(*CROP_SOURCE),
                spec, min_score, batch_size, configure_workers(spark, batch_size),
            ).drop("crop", "box", "fallback")  # fmt: skip
        else:
            src = read_table(spark, table, split).select(
                "image", "content_id", "path", "split", "label", "label_name"
            )
            queries = embed_df(spark, model_dir, src, batch_size)
    else:
        queries = spark.read.parquet(storage.qualify(table))
        if "embedding" not in queries.columns:
            raise ValueError(
                f"{table} is neither an image table nor a features table with an 'embedding' column"
            )
        if split is not None and "split" in queries.columns:
            queries = queries.where(F.col("split") == split)
    res = search_df(spark, index_dir, queries, k, nprobe, exclude_self)
    out_q = storage.qualify(out)
    with spark_progress(spark, "search"):
        res.write.mode("overwrite").parquet(out_q)
    agg = (
        spark.read.parquet(out_q)
        .agg(
            F.countDistinct("query_content_id").alias("queries"),
            F.count("content_id").alias("hits"),
            F.sum(F.col("error").isNotNull().cast("int")).alias("errors"),
        )
        .first()
    )
    assert agg is not None  # a global aggregate has exactly one row
    elapsed = timer.elapsed
    return {
        "output": out,
        "queries": int(agg.queries),
        "hits": int(agg.hits),
        "errors": int(agg.errors or 0),
        "k": k,
        "elapsed_s": round(elapsed, 3),
        "queries_per_s": round(agg.queries / max(elapsed, 1e-9), 1),
    }
