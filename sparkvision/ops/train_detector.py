"""``train-detector``: an object detector trained data-parallel (torch DDP on Spark barrier tasks)."""

from __future__ import annotations

from typing import Any

from pyspark.sql import SparkSession

from sparkvision.data.detection import is_detection_table
from sparkvision.detect.config import DetectorConfig
from sparkvision.ops.base import (
    Operation,
    ParamError,
    Progress,
    config_fields,
    config_from,
    params_model,
    register,
)
from sparkvision.ops.fields import overwrite, positional
from sparkvision.ops.paths import when_resuming
from sparkvision.ops.train import check_splits

TrainDetectorParams = params_model(
    "TrainDetectorParams",
    "Train an object detector on a detection table (docs/detection.md), data-parallel on Spark.",
    table=positional("Detection table to train on (its train split).", "TABLE"),
    out=positional("Detector directory to write (checkpoints, logs, weights).", "OUT"),
    overwrite=overwrite(),
    **config_fields(DetectorConfig),
)


def config(p: Any) -> DetectorConfig:
    cfg = config_from(DetectorConfig, p)
    try:
        cfg.validate()
    except ValueError as e:
        raise ParamError("batch_size" if "batch_size" in str(e) else "warmup_epochs", str(e)) from None
    return cfg


def check(p: Any) -> None:
    """The detector is registered and takes every argument given, before Spark starts."""
    from sparkvision.models.detector import create_detector, detector_arguments, list_detectors

    if p.model not in list_detectors():
        raise ParamError(
            "model", f"{p.model!r} is not a registered detector; choose from {', '.join(list_detectors())}"
        )
    unknown = sorted(set(p.model_kwargs) - set(detector_arguments(p.model)))
    if unknown:
        raise ParamError(
            "model_kwargs",
            f"unknown argument(s) {', '.join(unknown)} of {p.model!r}; it takes {', '.join(detector_arguments(p.model))}",
        )
    try:
        create_detector(p.model, 2, p.image_size, **p.model_kwargs)
    except (TypeError, ValueError) as e:
        raise ParamError("model_kwargs", f"{p.model!r} cannot be built with {p.model_kwargs}: {e}") from None
    config(p)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.detect.train import train_detector

    if not is_detection_table(spark, p.table):
        raise ParamError(
            "table", f"{p.table} has no boxes; make a detection table with `sparkvision datasets scenes`"
        )
    check_splits(spark, p.table, train_split=p.train_split, eval_split=p.eval_split)
    progress.check_cancelled()
    return train_detector(spark, p.table, p.out, config(p))


OPERATION = register(
    Operation(
        "train-detector",
        TrainDetectorParams,
        run,
        "Train an object detector data-parallel (DDP on Spark barrier tasks).",
        inputs=("table",),
        optional_inputs=("weights",),
        outputs=("out",),
        result_key="out",
        resumable=True,
        continues=when_resuming,
        reports_epochs=True,
        produces_model=True,
        module="sparkvision.detect.train",
        check=check,
        summary_keys=("map_50", "map", "train_loss", "images_per_s", "wall_s"),
    )
)
