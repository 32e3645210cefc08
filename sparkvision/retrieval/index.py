"""FAISS indexes built from a Parquet features table, one shard (Parquet file) at a time.

::

    INDEX/
      index.faiss     the FAISS index (FAISS's own binary format; no pickle)
      ids.parquet     row i of the index -> content_id, path and whatever label columns exist
      index.json      what was built and why (kind, factory, metric, dim, rows, reason, search params)
      hasher/         for binary indexes: the hasher that turns float features into codes

The driver never holds more than one shard of features plus, for IVF, a training sample: the
first pass reads row counts from Parquet footers, the second draws the sample, the third adds
shard by shard and streams the id mapping to ``ids.parquet``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sparkvision.errors import ParamError

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
HASHER_DIR = "hasher"
FEATURES_META = "_retrieval.json"  # written by `sparkvision embed` beside the Parquet files
FEATURES_HASHER = "_hasher"
ID_COLUMNS = ("content_id", "path", "label", "label_name", "split", "height", "width")

EXACT_MAX_ROWS = 100_000  # float: brute force stays under ~10 ms/query at d=256 up to here
EXACT_MAX_ROWS_BINARY = 5_000_000  # binary: 64-bit Hamming scan is ~40x cheaper per row
FLAT_MAX_BYTES = 32 << 30  # beyond this, uncompressed vectors do not fit a typical driver/worker


@dataclass
class IndexChoice:
    """Which index to build, its FAISS factory string, search-time parameters and why."""

    kind: str  # flat | ivf | ivfpq | hnsw | binary_flat | binary_ivf
    factory: str
    binary: bool
    params: dict[str, int] = field(default_factory=dict)  # nlist, nprobe, M, efSearch ...
    reason: str = ""

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf", "ivfpq", "binary_ivf")


def _nlist_for(n: int) -> int:
    """FAISS's guideline of ~4*sqrt(n) lists, rounded to a power of two, at most n / 39 (k-means
    wants 39+ training points per centroid)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    return int(max(1, min(nlist, 65536, n // 39 or 1)))


def choose_index(n: int, d: int, binary: bool = False, kind: str = "auto") -> IndexChoice:
    """Pick the index for ``n`` vectors of dimension ``d`` (bits when ``binary``); pure.

    ``kind`` forces one (flat, ivf, ivfpq, hnsw; binary ones follow ``binary``) and the reason
    says so. IVF is the default approximate index, not HNSW, because it is built shard by shard
    after training on a sample, builds in seconds per million rows on a few cores, and its
    ``nprobe`` trades recall for speed at search time; HNSW has better recall at equal speed
    but builds ~10x slower, which dominates on a 2-core driver (see docs/retrieval.md).
    """
    if n < 1 or d < 1:
        raise ValueError(f"cannot index {n} rows of dimension {d}: the features table has no usable rows")
    if binary:
        if d % 8:
            raise ValueError(f"binary codes of {d} bits are not whole bytes; use 32, 64 or 128 bits")
        if kind in ("flat", "binary_flat") or (kind == "auto" and n <= EXACT_MAX_ROWS_BINARY):
            why = "forced by kind" if kind != "auto" else f"{n:,} rows <= {EXACT_MAX_ROWS_BINARY:,}"
            return IndexChoice(
                "binary_flat",
                "BFlat",
                True,
                {},
                f"exact Hamming scan ({why}; {n * d // 8 / 1e6:.1f} MB of codes)",
            )
        nlist = _nlist_for(n)
        why = "forced by kind" if kind != "auto" else f"{n:,} rows > {EXACT_MAX_ROWS_BINARY:,}"
        return IndexChoice(
            "binary_ivf",
            f"BIVF{nlist}",
            True,
            {"nlist": nlist, "nprobe": max(1, nlist // 64)},
            f"inverted lists over Hamming space ({why}), {nlist} lists, nprobe {max(1, nlist // 64)}",
        )
    flat_bytes = n * d * 4
    if kind == "flat" or (kind == "auto" and n <= EXACT_MAX_ROWS):
        why = "forced by kind" if kind != "auto" else f"{n:,} rows <= {EXACT_MAX_ROWS:,}"
        return IndexChoice(
            "flat", "Flat", False, {}, f"exact inner-product search ({why}); results are exact"
        )
    if kind == "hnsw":
        return IndexChoice(
            "hnsw",
            "HNSW32,Flat",
            False,
            {"M": 32, "efConstruction": 80, "efSearch": 64},
            "HNSW graph (forced by kind): best recall per query-second, slow to build",
        )
    nlist = _nlist_for(n)
    nprobe = max(1, nlist // 128)
    if kind == "ivfpq" or (kind == "auto" and flat_bytes > FLAT_MAX_BYTES):
        m = next(m for m in (d // 4, d // 8, d // 16, 1) if m >= 1 and d % m == 0)
        why = (
            "forced by kind"
            if kind != "auto"
            else f"{flat_bytes / 2**30:.0f} GiB of raw vectors > {FLAT_MAX_BYTES >> 30} GiB"
        )
        return IndexChoice(
            "ivfpq",
            f"IVF{nlist},PQ{m}",
            False,
            {"nlist": nlist, "nprobe": nprobe * 2},
            f"IVF with product quantisation ({why}): {m} bytes per vector, {nlist} lists, nprobe {nprobe * 2}",
        )
    if kind not in ("auto", "ivf"):
        raise ParamError("kind", f"{kind!r} is not one of auto, flat, ivf, ivfpq, hnsw")
    why = "forced by kind" if kind != "auto" else f"{n:,} rows > {EXACT_MAX_ROWS:,}"
    return IndexChoice(
        "ivf",
        f"IVF{nlist},Flat",
        False,
        {"nlist": nlist, "nprobe": nprobe},
        f"IVF ({why}): {nlist} lists (~4*sqrt(n)), nprobe {nprobe}; raise nprobe for recall",
    )


# ---------------------------------------------------------------------------------------------
# Reading the features table shard by shard
# ---------------------------------------------------------------------------------------------


def local_path(uri: str) -> str:
    """``file:///x`` -> ``/x``; other schemes are not supported by the single-machine index build."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if uri.startswith("file:"):
        return uri[len("file:") :]
    if "://" in uri:
        raise ValueError(
            f"{uri}: index build reads Parquet through the local file system; copy it locally first"
        )
    return uri


def features_dataset(features: str) -> pads.Dataset:
    path = local_path(features)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"features table {features} does not exist (make it with `sparkvision embed`)"
        )
    return pads.dataset(path, format="parquet")


def vectors_of(table: pa.Table, column: str) -> np.ndarray:
    """A list<float> column -> (N, D) float32, or a binary column of packed codes -> (N, B/8) uint8."""
    col = table.column(column).combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    if pa.types.is_binary(col.type) or pa.types.is_fixed_size_binary(col.type):
        raw = col.to_pylist()
        return np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), -1)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(col), -1)


def iter_shards(
    features: str, column: str, columns: tuple[str, ...] = ID_COLUMNS
) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(vectors, id columns) for each Parquet file in turn; rows with a null vector are skipped."""
    ds = features_dataset(features)
    if column not in ds.schema.names:
        raise KeyError(
            f"features table {features} has no column {column!r}; columns: {', '.join(ds.schema.names)}"
        )
    keep = [c for c in columns if c in ds.schema.names]
    for frag in ds.get_fragments():
        t = frag.to_table(columns=[column, *keep])
        t = t.filter(pa.compute.is_valid(t.column(column)))
        if t.num_rows:
            yield vectors_of(t, column), t.select(keep)


def count_rows(features: str) -> int:
    """From the Parquet footers: no data is read."""
    return sum(frag.count_rows() for frag in features_dataset(features).get_fragments())


def features_meta(features: str) -> dict[str, Any]:
    p = os.path.join(local_path(features), FEATURES_META)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def new_index(choice: IndexChoice, d: int):
    if choice.binary:
        if choice.kind == "binary_flat":
            return faiss.IndexBinaryFlat(d)
        quantizer = faiss.IndexBinaryFlat(d)
        ivf = faiss.IndexBinaryIVF(quantizer, d, choice.params["nlist"])
        ivf.own_fields = True
        quantizer.this.disown()  # type: ignore[attr-defined]  # SWIG's `this` handle is not in faiss's stubs
        return ivf
    if choice.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, choice.params["M"], faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = choice.params["efConstruction"]
        return hnsw
    return faiss.index_factory(d, choice.factory, faiss.METRIC_INNER_PRODUCT)


def _set_nprobe(index: Any, nprobe: int) -> None:
    if isinstance(index, faiss.IndexBinaryIVF):
        index.nprobe = nprobe
    else:
        faiss.extract_index_ivf(index).nprobe = nprobe


def set_search_params(index: Any, params: dict[str, int]) -> None:
    if "nprobe" in params:
        _set_nprobe(index, int(params["nprobe"]))
    if "efSearch" in params:
        index.hnsw.efSearch = int(params["efSearch"])


def _training_sample(features: str, column: str, n: int, size: int, seed: int) -> np.ndarray:
    """A uniform sample of ``size`` rows, drawn shard by shard (keeps each row with p = size/n)."""
    rng = np.random.default_rng(seed)
    p = min(1.0, size / max(n, 1))
    parts = []
    for vecs, _ in iter_shards(features, column, ()):
        parts.append(vecs[rng.random(len(vecs)) < p])
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def build_index(
    features: str,
    out: str,
    *,
    column: str | None = None,
    kind: str = "auto",
    params: dict[str, int] | None = None,
    train_size: int = 100_000,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Build ``out`` from the features table; returns a summary whose ``explain`` says why.

    ``column`` defaults to ``code`` when ``kind`` is binary or the table has only codes, else
    ``embedding``. ``params`` overrides the chosen search parameters (nprobe, efSearch).
    """
    t0 = time.perf_counter()
    ds = features_dataset(features)
    names = ds.schema.names
    if column is None:
        column = "code" if kind.startswith("binary") or "embedding" not in names else "embedding"
    binary = column == "code" or kind.startswith("binary")
    n = count_rows(features)
    first = next(iter_shards(features, column, ()), None)
    if first is None:
        raise ValueError(f"features table {features} has no rows with a non-null {column!r}")
    d = first[0].shape[1] * (8 if binary else 1)
    choice = choose_index(n, d, binary, kind)
    choice.params.update(params or {})
    index = new_index(choice, d)

    if choice.needs_training:
        size = max(train_size, 39 * choice.params["nlist"])
        sample = _training_sample(features, column, n, size, seed)
        index.train(sample)
        del sample

    os.makedirs(out, exist_ok=True)
    ids_path = os.path.join(out, IDS_FILE)
    writer: pq.ParquetWriter | None = None
    added = 0
    for vecs, ids in iter_shards(features, column):
        index.add(np.ascontiguousarray(vecs))
        if writer is None:
            writer = pq.ParquetWriter(ids_path, ids.schema)
        writer.write_table(ids.cast(writer.schema) if ids.schema != writer.schema else ids)
        added += len(vecs)
        if progress is not None:
            progress(len(vecs), f"{added:,} rows")
    if writer is not None:
        writer.close()
    set_search_params(index, choice.params)
    (faiss.write_index_binary if binary else faiss.write_index)(index, os.path.join(out, INDEX_FILE))

    fmeta = features_meta(features)
    hasher_src = os.path.join(local_path(features), FEATURES_HASHER)
    if binary and os.path.isdir(hasher_src):
        shutil.copytree(hasher_src, os.path.join(out, HASHER_DIR), dirs_exist_ok=True)
    meta = {
        "features": features,
        "column": column,
        "rows": added,
        "dim": d,
        "metric": "hamming" if binary else "inner_product",
        "choice": asdict(choice),
        "model_dir": fmeta.get("model_dir"),
        "detector": fmeta.get(
            "detector"
        ),  # features of crops (`sparkvision features`): queries are cropped too
        "crop": fmeta.get("crop"),
        "hasher": HASHER_DIR if binary and os.path.isdir(hasher_src) else None,
        "build_s": round(time.perf_counter() - t0, 3),
    }
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return {
        "index": out,
        "kind": choice.kind,
        "factory": choice.factory,
        "rows": added,
        "dim": d,
        "metric": meta["metric"],
        "params": choice.params,
        "explain": choice.reason,
        "build_s": meta["build_s"],
    }
