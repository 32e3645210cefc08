"""``dedup``: exact and near-duplicate groups of an image table, one member of each marked to keep."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Cli, Operation, Progress, counting, params_model, register
from sparkvision.ops.fields import inference_batch, overwrite, positional

DedupParams = params_model(
    "DedupParams",
    "Find exact and near-duplicate images, group them transitively and mark one per group to keep.",
    table=positional("Image table.", "TABLE"),
    out=positional("Output directory: groups.parquet, _dedup.json and the scored _pairs.", "OUT"),
    model_dir=(
        Annotated[str | None, Cli(flags=("--model",))],
        Field(
            None,
            description=(
                "Model directory whose embeddings propose candidates (default: a pixel descriptor)."
            ),
        ),
    ),
    verify=(
        Annotated[bool, Cli(flags=("--verify/--no-verify",))],
        Field(
            True,
            description=(
                "Verify each candidate pair by aligning the two images and comparing pixels (robust to flips, shifts, "
                "small rotations and scaling, blur, tone changes, JPEG); off links on the descriptor's cosine alone."
            ),
        ),
    ),
    threshold=(
        float | None,
        Field(
            None,
            ge=-1,
            le=1,
            description=(
                "Score that makes a near-duplicate: the verification score in [0, 1] (default 0.995), or without "
                "verification the cosine similarity (default 0.97 pixels, 0.95 model)."
            ),
        ),
    ),
    link=(
        Literal["mutual", "all"],
        Field(
            "mutual",
            description=(
                "mutual: a verified pair above threshold links only if each image is the other's best match (stops "
                "look-alikes joining); all: every pair above threshold links."
            ),
        ),
    ),
    strict_threshold=(
        float | None,
        Field(
            None,
            ge=-1,
            le=1,
            description=("With link mutual: pairs scoring at least this always link (default 0.998)."),
        ),
    ),
    candidate_threshold=(
        float | None,
        Field(
            None,
            ge=-1,
            le=1,
            description=(
                "With verification: cosine a neighbour needs to become a candidate (default 0.9 pixels, 0.8 model); "
                "it only bounds the work."
            ),
        ),
    ),
    verify_size=(
        int,
        Field(32, ge=8, le=512, description="Side in pixels of the thumbnails compared in verification."),
    ),
    keep=(
        Literal["largest", "earliest"],
        Field("largest", description="Which member to keep: largest | earliest"),
    ),
    k=(
        Annotated[int, Cli(flags=("-k", "--k"))],
        Field(16, ge=2, le=1000, description=("Neighbours compared per image (groups grow transitively).")),
    ),
    exact_only=(bool, Field(False, description="Only identical bytes (content id).")),
    shards=(
        str | None,
        Field(
            None,
            description="Candidate search over N index shards (or 'auto') built and searched on the executors.",
        ),
    ),
    split=(OptionalSplit, Field(None, description="Only this split.")),
    overwrite=overwrite(),
    batch_size=inference_batch(),
)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.retrieval.dedup import dedup_table
    from sparkvision.retrieval.shards import parse_shards

    return dedup_table(
        spark,
        p.table,
        p.out,
        model_dir=p.model_dir,
        threshold=p.threshold,
        keep=p.keep,
        split=p.split,
        k=p.k,
        exact_only=p.exact_only,
        batch_size=p.batch_size,
        verify=p.verify,
        candidate_threshold=p.candidate_threshold,
        link=p.link,
        strict_threshold=p.strict_threshold,
        verify_size=p.verify_size,
        progress=counting(progress, None),
        shards=parse_shards(p.shards),
    )


OPERATION = register(
    Operation(
        "dedup",
        DedupParams,
        run,
        "Exact and near-duplicate groups of an image table.",
        inputs=("table",),
        optional_inputs=("model_dir",),
        outputs=("out",),
        staged_outputs=("out",),
        models=("model_dir",),
        result_key="out",
        module="sparkvision.retrieval.dedup",
        summary_keys=("rows", "groups", "duplicates", "elapsed_s"),
    )
)
