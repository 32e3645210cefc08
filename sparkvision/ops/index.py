"""``index``: a FAISS index from a features table, built here or as N shards on the executors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.ops.base import Cli, Operation, ParamError, Progress, counting, params_model, register
from sparkvision.ops.fields import overwrite, positional
from sparkvision.retrieval.shards import DEFAULT_SHARD_MEMORY_MB, parse_shards

IndexParams = params_model(
    "IndexParams",
    "Build a FAISS index from a features table; says which kind and why.",
    features=positional("Features table from `sparkvision embed`.", "FEATURES"),
    out=positional("Output index directory.", "INDEX"),
    kind=(
        Literal["auto", "flat", "ivf", "ivfpq", "hnsw", "binary_flat", "binary_ivf"],
        Field("auto", description="auto | flat | ivf | ivfpq | hnsw | binary_flat | binary_ivf"),
    ),
    codes=(
        Annotated[bool, Cli(flags=("--codes",))],
        Field(False, description="Index the binary `code` column (Hamming)."),
    ),
    nprobe=(int | None, Field(None, ge=1, description="IVF lists searched per query (default: chosen).")),
    ef_search=(int | None, Field(None, ge=1, description="HNSW efSearch (default 64).")),
    shards=(
        str | None,
        Field(
            None,
            description=(
                "Build N shard indexes on the executors (or 'auto': as many as fit shard_memory_mb each), "
                "searched one shard per task; default one index built here."
            ),
        ),
    ),
    shard_memory_mb=(
        int,
        Field(
            DEFAULT_SHARD_MEMORY_MB,
            ge=16,
            description="With shards auto: memory per task a shard may use half of.",
        ),
    ),
    check=(
        Annotated[bool, Cli(flags=("--check",))],
        Field(
            False,
            description="Then report recall@k against brute force on sampled rows, at 1x, 2x, 4x nprobe.",
        ),
    ),
    check_queries=(int, Field(1000, ge=1, le=100_000, description="With check: rows sampled as queries.")),
    check_k=(int, Field(10, ge=1, le=1000, description="With check: the k of recall@k.")),
    overwrite=overwrite(),
)


def check(p: Any) -> None:
    parse_shards(p.shards)
    if p.shards is not None and (p.codes or p.kind.startswith("binary")):
        raise ParamError("shards", "sharded indexes hold float features; index binary codes without shards")
    if p.check and (p.codes or p.kind.startswith("binary")):
        raise ParamError("check", "recall is checked for float indexes, not binary codes")


def run(spark: SparkSession | None, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.retrieval.index import build_index, count_rows
    from sparkvision.retrieval.recall import check_recall
    from sparkvision.retrieval.shard_build import build_sharded_index

    params: dict[str, int] = {}
    if p.nprobe is not None:
        params["nprobe"] = p.nprobe
    if p.ef_search is not None:
        params["efSearch"] = p.ef_search
    if p.shards is not None:
        assert spark is not None  # spark_when: a sharded build is given a session
        summary = build_sharded_index(
            spark,
            p.features,
            p.out,
            shards=parse_shards(p.shards) or "auto",
            kind=p.kind,
            params=params,
            shard_memory_mb=p.shard_memory_mb,
        )
    else:
        summary = build_index(
            p.features,
            p.out,
            column="code" if p.codes or p.kind.startswith("binary") else None,
            kind=p.kind.removeprefix("binary_") if p.codes else p.kind,
            params=params,
            progress=counting(progress, count_rows(p.features)),
        )
    if p.check:
        assert spark is not None  # spark_when: the check runs on the executors
        summary["check"] = check_recall(spark, p.out, p.features, k=p.check_k, queries=p.check_queries)
    return summary


OPERATION = register(
    Operation(
        "index",
        IndexParams,
        run,
        "Build a FAISS index from a features table.",
        inputs=("features",),
        outputs=("out",),
        staged_outputs=("out",),
        result_key="out",
        module="sparkvision.retrieval.index",
        needs_spark=False,
        spark_when=lambda p: p.shards is not None or p.check,
        check=check,
        summary_keys=("kind", "rows", "shards", "build_s"),
    )
)
