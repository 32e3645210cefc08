"""``distill``: a fine-tuned teacher distilled into a student on unlabelled images (SimCLRv2's third step).

Distillation's recipe is fine-tuning's (:class:`~sparkvision.ssl.config.FinetuneConfig`) with
its own defaults, written here once: a larger batch and fewer epochs over the much larger
unlabelled pool, no label smoothing (the teacher's soft labels already are), and the encoder
at the head's learning rate (the student learns a new task, not a few labels).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.ops.base import Cli, Operation, Progress, config_fields, config_from, params_model, register
from sparkvision.ops.fields import model_dir_out, overwrite, table_in
from sparkvision.ops.paths import when_resuming
from sparkvision.ops.train import check_model, check_splits
from sparkvision.ssl.config import FinetuneConfig

RECIPE = {"batch_size": 256, "epochs": 10, "label_smoothing": 0.0, "encoder_lr_scale": 1.0}
# FixMatch, linear evaluation and the projector neck are fine-tuning's, not distillation's.
NOT_DISTILL = (
    "linear",
    "consistency_weight",
    "confidence",
    "unlabeled_ratio",
    "strong_augment",
    "projector_layers",
    "distill_temperature",
)

DistillParams = params_model(
    "DistillParams",
    "Distil a fine-tuned teacher into a student on unlabelled images (SimCLRv2's third step).",
    teacher=(
        Annotated[str, Cli(flags=("--teacher",))],
        Field(
            description=(
                "Classifier model directory whose soft labels train the student (e.g. the output of `sparkvision finetune`)."
            )
        ),
    ),
    table=table_in("Image table holding the unlabelled pool."),
    out=model_dir_out("Student classifier model directory to write."),
    encoder=(
        str | None,
        Field(
            None,
            description=(
                "Initialise the student from this encoder model directory (none: the model from random weights)."
            ),
        ),
    ),
    temperature=(float, Field(1.0, gt=0, le=100, description="Softmax temperature of teacher and student.")),
    overwrite=overwrite(),
    **config_fields(FinetuneConfig, exclude=NOT_DISTILL, defaults=RECIPE),
)


def config(p: Any) -> FinetuneConfig:
    cfg = config_from(FinetuneConfig, p, distill_temperature=p.temperature)
    cfg.validate()
    return cfg


def check(p: Any) -> None:
    if not p.encoder:
        check_model(p.model, p.model_kwargs)
    config(p)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.ssl.finetune import finetune

    check_splits(spark, p.table, unlabeled_split=p.unlabeled_split, eval_split=p.eval_split)
    progress.check_cancelled()
    return finetune(spark, p.table, p.out, encoder=p.encoder, cfg=config(p), eval_every=1, teacher=p.teacher)


OPERATION = register(
    Operation(
        "distill",
        DistillParams,
        run,
        "Distil a fine-tuned teacher into a student on unlabelled images (SimCLRv2).",
        inputs=("teacher", "table"),
        optional_inputs=("encoder",),
        outputs=("out",),
        models=("teacher", "encoder"),
        result_key="out",
        resumable=True,
        continues=when_resuming,
        reports_epochs=True,
        produces_model=True,
        module="sparkvision.ssl.finetune",
        check=check,
    )
)
