"""``search``: nearest neighbours of image files, or of every row of a table on the executors."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Cli, Operation, ParamError, Progress, params_model, register
from sparkvision.ops.fields import inference_batch, overwrite, positional

SearchParams = params_model(
    "SearchParams",
    "Nearest neighbours with scores and paths.",
    index=positional("Index directory from `sparkvision index`.", "INDEX"),
    images=(
        Annotated[list[str], Cli(positional=True, metavar="IMAGE...")],
        Field(default_factory=list, description="Query image files."),
    ),
    k=(
        Annotated[int, Cli(flags=("-k", "--k"))],
        Field(10, ge=1, le=10_000, description="Neighbours per query."),
    ),
    model_dir=(
        Annotated[str | None, Cli(flags=("--model",))],
        Field(None, description=("Model directory (default: the one that built the index).")),
    ),
    table=(
        str | None,
        Field(None, description="Batch mode: search every row of this image or features table."),
    ),
    out=(str | None, Field(None, description="Batch mode output (Parquet), one row per (query, neighbour).")),
    split=(OptionalSplit, Field(None, description="Batch mode: only this split.")),
    nprobe=(
        int | None,
        Field(None, ge=1, description="IVF lists searched per query (overrides the index's)."),
    ),
    exclude_self=(bool, Field(False, description="Batch mode: drop a query's own row.")),
    detector=(
        str | None,
        Field(
            None,
            description=(
                "Detector model directory: crop each query image to its best box before embedding it "
                "(default: the index's, when `features` built it), e.g. scenes against a catalogue indexed whole."
            ),
        ),
    ),
    overwrite=overwrite(),
    batch_size=inference_batch(),
)


def check(p: Any) -> None:
    if p.table is not None and p.out is None:
        raise ParamError("out", "batch mode (table) needs out for the results table")
    if p.table is None and not p.images:
        raise ParamError("images", "give one or more image files, or table and out for batch mode")


def run(spark: SparkSession | None, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.retrieval.search import search_images, search_table

    if p.table is not None:
        assert spark is not None  # spark_when: batch mode is given a session
        return search_table(
            spark,
            p.index,
            p.table,
            p.out,
            k=p.k,
            model_dir=p.model_dir,
            split=p.split,
            nprobe=p.nprobe,
            exclude_self=p.exclude_self,
            batch_size=p.batch_size,
            detector=p.detector,
        )
    return {
        "index": p.index,
        "k": p.k,
        "results": search_images(p.index, list(p.images), p.k, p.model_dir, p.nprobe, p.detector),
    }


# Not a web job kind: its query files are paths on the machine that runs it (the web has /api/search).
OPERATION = register(
    Operation(
        "search",
        SearchParams,
        run,
        "Nearest neighbours of image files or of every row of a table.",
        inputs=("index",),
        optional_inputs=("table", "model_dir", "detector"),
        outputs=("out",),
        staged_outputs=("out",),
        models=("model_dir",),
        result_key="out",
        module="sparkvision.retrieval.search",
        web=False,
        check=check,
        needs_spark=False,
        spark_when=lambda p: p.table is not None,
    )
)
