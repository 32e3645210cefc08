"""``finetune``: fine-tune or linearly evaluate a pretrained encoder on a stratified label fraction
(optionally semi-supervised: FixMatch on an unlabelled split)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.ops.base import (
    Operation,
    ParamError,
    Progress,
    config_fields,
    config_from,
    params_model,
    register,
)
from sparkvision.ops.fields import model_dir_out, overwrite, table_in
from sparkvision.ops.paths import when_resuming
from sparkvision.ops.train import check_model, check_splits
from sparkvision.ssl.config import FinetuneConfig

FinetuneParams = params_model(
    "FinetuneParams",
    "Fine-tune or linearly evaluate a pretrained encoder on a stratified label fraction "
    "(optionally semi-supervised: FixMatch on an unlabelled split).",
    table=table_in("Labelled image table."),
    out=model_dir_out("Classifier model directory to write."),
    encoder=(
        str | None,
        Field(
            None,
            description=(
                "Encoder model directory from `sparkvision pretrain` (none: train the model from scratch)."
            ),
        ),
    ),
    eval_every=(int, Field(5, ge=1, description="Score eval_split every this many epochs (and at the end).")),
    overwrite=overwrite(),
    **config_fields(FinetuneConfig, exclude=("distill_temperature",)),
)


def config(p: Any, **extra: Any) -> FinetuneConfig:
    cfg = config_from(FinetuneConfig, p, **extra)
    cfg.validate()
    return cfg


def check(p: Any) -> None:
    if p.linear and not p.encoder:
        raise ParamError("linear", "linear evaluation needs a pretrained encoder")
    if not p.encoder:
        check_model(p.model, p.model_kwargs)
    config(p)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.ssl.finetune import finetune

    check_splits(spark, p.table, train_split=p.train_split, eval_split=p.eval_split)
    progress.check_cancelled()
    return finetune(spark, p.table, p.out, encoder=p.encoder, cfg=config(p), eval_every=p.eval_every)


OPERATION = register(
    Operation(
        "finetune",
        FinetuneParams,
        run,
        "Fine-tune a pretrained backbone on labelled images.",
        inputs=("table",),
        optional_inputs=("encoder",),
        outputs=("out",),
        models=("encoder",),
        result_key="out",
        resumable=True,
        continues=when_resuming,
        reports_epochs=True,
        produces_model=True,
        module="sparkvision.ssl.finetune",
        check=check,
    )
)
