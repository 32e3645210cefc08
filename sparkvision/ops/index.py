"""``index``: a FAISS index from a features table, one Parquet shard at a time."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.ops.base import Cli, Operation, Progress, counting, params_model, register
from sparkvision.ops.fields import overwrite, positional
from sparkvision.retrieval.index import build_index, count_rows

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
    overwrite=overwrite(),
)


def run(spark: SparkSession | None, p: Any, progress: Progress) -> dict[str, Any]:
    params: dict[str, int] = {}
    if p.nprobe is not None:
        params["nprobe"] = p.nprobe
    if p.ef_search is not None:
        params["efSearch"] = p.ef_search
    return build_index(
        p.features,
        p.out,
        column="code" if p.codes or p.kind.startswith("binary") else None,
        kind=p.kind.removeprefix("binary_") if p.codes else p.kind,
        params=params,
        progress=counting(progress, count_rows(p.features)),
    )


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
        summary_keys=("kind", "rows", "build_s"),
    )
)
