"""``pretrain``: self-supervised pretraining of an encoder on unlabelled images (DDP on Spark barrier tasks).

Its recipe is a named preset (:data:`sparkvision.ssl.presets.PRESETS`); every field given here
overrides the preset's, and an absent one (``None``) keeps it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.data.table import read_table
from sparkvision.ops.base import Cli, Operation, Progress, config_fields, params_model, register
from sparkvision.ops.fields import model_dir_out, overwrite, table_in
from sparkvision.ops.paths import when_resuming
from sparkvision.ops.train import check_model
from sparkvision.ssl.presets import PRESET_FIELDS, PRESETS, PretrainConfig, resolve

# A field some preset sets defaults to None here, "the preset's value"; the rest keep the recipe's default.
_fields = config_fields(PretrainConfig, optional=PRESET_FIELDS, exclude=("pool_split",))
PretrainParams = params_model(
    "PretrainParams",
    "Self-supervised pretraining of an encoder on unlabelled images (DDP on Spark barrier "
    "tasks); a field left out keeps the preset's value.",
    table=table_in("Image table; pretrains on its pool split (labels ignored)."),
    out=model_dir_out("Encoder model directory to write (checkpoints, logs, weights)."),
    preset=(str, Field("cpu-small", description=f"{' | '.join(PRESETS)} (see docs/ssl.md)")),
    pool_split=(
        Annotated[str | None, Cli(flags=("--pool",))],
        Field(
            None,
            description=(
                "Split of images to pretrain on (labels ignored); default: unlabeled when the table has it, else train."
            ),
        ),
    ),
    overwrite=overwrite(),
    **_fields,
)

OVERRIDES = tuple(_fields) + ("pool_split",)


def overrides(p: Any) -> dict[str, Any]:
    """PretrainConfig fields for :func:`resolve`; an absent pool is chosen from the table at run time."""
    return {k: getattr(p, k) for k in OVERRIDES if not (k == "pool_split" and p.pool_split is None)}


def check(p: Any) -> None:
    cfg = resolve(p.preset, **overrides(p))
    check_model(cfg.model, cfg.model_kwargs)


def default_pool(spark: SparkSession, table: str) -> str:
    """``unlabeled`` when the table has such rows, else ``train``: a labelled table needs no flag."""
    return "unlabeled" if read_table(spark, table, "unlabeled").limit(1).count() else "train"


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.ssl.pretrain import pretrain

    given = overrides(p)
    given.setdefault("pool_split", default_pool(spark, p.table))
    return pretrain(spark, p.table, p.out, preset=p.preset, **given)


OPERATION = register(
    Operation(
        "pretrain",
        PretrainParams,
        run,
        "Self-supervised pretraining on unlabelled images.",
        inputs=("table",),
        outputs=("out",),
        result_key="out",
        resumable=True,
        continues=when_resuming,
        reports_epochs=True,
        produces_model=True,
        module="sparkvision.ssl.pretrain",
        check=check,
    )
)
