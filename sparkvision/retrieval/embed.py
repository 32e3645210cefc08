"""``sparkvision embed``: the features table of :func:`sparkvision.inference.embed.embed_table`, optionally with codes.

Codes are a post-processing step over the embeddings: a hasher (DeepBit, ITQ or LSH) is fitted on
the driver from a sample of at most ``sample`` embeddings, then applied on the executors, which
add a ``code`` column (packed bits, ``binary``). The hasher is saved beside the table (``_hasher/``)
with ``_retrieval.json`` naming the model, so ``sparkvision index`` and ``search`` can encode new
queries the same way. Files starting with ``_`` are invisible to Spark and pyarrow readers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession

from sparkvision.errors import ParamError
from sparkvision.inference.embed import embed_table
from sparkvision.retrieval.codes import DEFAULT_METHOD, Hasher, fit_hasher
from sparkvision.retrieval.index import FEATURES_HASHER, FEATURES_META, local_path, vectors_of
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress


def code_batches(
    projection: np.ndarray, bias: np.ndarray
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: adds ``code`` (packed bits; null where the embedding is null)."""
    hasher = Hasher("apply", projection, bias)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            t = pa.Table.from_batches([batch])
            valid = pc.is_valid(t.column("embedding")).to_numpy(zero_copy_only=False)
            codes: list[bytes | None] = [None] * t.num_rows
            good = np.flatnonzero(valid)
            if len(good):
                packed = hasher.encode(vectors_of(t.take(pa.array(good)), "embedding"))
                for i, c in zip(good, packed, strict=False):
                    codes[int(i)] = c.tobytes()
            yield batch.append_column("code", pa.array(codes, pa.binary()))

    return run


def add_codes(df: DataFrame, hasher: Hasher) -> DataFrame:
    """Lazy: a features DataFrame with a ``code`` column from ``hasher``."""
    schema = df.schema.simpleString()[len("struct<") : -1].replace(":", " ") + ", code binary"
    return df.mapInArrow(code_batches(hasher.projection, hasher.bias), schema)


def sample_embeddings(spark: SparkSession, features: str, limit: int, seed: int = 0) -> np.ndarray:
    """At most ``limit`` non-null embeddings, sampled uniformly on the executors."""
    df = spark.read.parquet(features).where("embedding is not null")
    n = df.count()
    if n == 0:
        raise ValueError(f"{features} has no rows with an embedding; nothing to fit codes on")
    frac = min(1.0, 1.1 * limit / n)
    rows = df.sample(fraction=frac, seed=seed).select("embedding").limit(limit).toArrow()
    return vectors_of(rows, "embedding")


def write_features_meta(out: str, meta: dict[str, Any]) -> None:
    with open(os.path.join(local_path(out), FEATURES_META), "w") as f:
        json.dump(meta, f, indent=2)


def embed_with_codes(
    spark: SparkSession,
    model_dir: str,
    table: str,
    out: str,
    *,
    bits: int | None = None,
    method: str = DEFAULT_METHOD,
    sample: int = 100_000,
    split: str | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Embed ``table`` with ``model_dir`` into ``out``; with ``bits``, fit a hasher and add codes."""
    timer = Timer()
    if bits is not None and bits not in (32, 64, 128):
        raise ParamError("bits", f"{bits} is not 32, 64 or 128")
    out_q = storage.qualify(out)
    target = out_q if bits is None else out_q.rstrip("/") + "_embed_tmp"
    summary = embed_table(spark, model_dir, table, target, batch_size=batch_size, split=split)
    meta: dict[str, Any] = {
        "model_dir": os.path.abspath(model_dir),
        "table": table,
        "split": split,
        "dim": summary.get("dim"),
    }
    if bits is not None:
        x = sample_embeddings(spark, target, sample, seed)
        hasher = fit_hasher(method, x, bits, seed=seed)
        coded = add_codes(spark.read.parquet(target), hasher)
        with spark_progress(spark, "codes"):
            coded.write.mode("overwrite").parquet(out_q)
        storage.delete(spark, target)
        hasher.save(os.path.join(local_path(out_q), FEATURES_HASHER))
        balance = np.unpackbits(hasher.encode(x), axis=1).mean(0)
        meta.update({"code_method": method, "bits": bits, "fit_rows": len(x)})
        summary.update(
            {
                "output": out,
                "code_method": method,
                "bits": bits,
                "fit_rows": len(x),
                "bit_balance_min": round(float(balance.min()), 3),
                "bit_balance_max": round(float(balance.max()), 3),
            }
        )
    write_features_meta(out_q, meta)
    summary["elapsed_s"] = round(timer.elapsed, 3)
    return summary
