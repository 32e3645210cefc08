"""``train``: a classifier, data-parallel (torch DDP on Spark barrier tasks)."""

from __future__ import annotations

from typing import Any

from pyspark.sql import SparkSession

from sparkvision.models import list_models
from sparkvision.models.registry import model_arguments
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
from sparkvision.train.config import TrainConfig
from sparkvision.train.engine import train

TrainParams = params_model(
    "TrainParams", "Train a classifier data-parallel (torch DDP on Spark barrier tasks).",
    table=table_in("Image table to train on (its train split)."),
    out=model_dir_out("Model directory to write (checkpoints, logs, weights)."),
    overwrite=overwrite(),
    **config_fields(TrainConfig),
)


def check_model(name: str, model_kwargs: dict[str, Any] | None = None) -> None:
    """The model is registered and takes every argument given to it."""
    if name not in list_models():
        raise ParamError("model", f"{name!r} is not registered; choose from {', '.join(list_models())}")
    known = model_arguments(name)
    unknown = sorted(set(model_kwargs or {}) - set(known)) if known is not None else []
    if unknown:
        raise ParamError("model_kwargs", f"unknown argument(s) {', '.join(unknown)} of model {name!r}; "
                                         f"it takes {', '.join(known or [])}")


def config(p: Any) -> TrainConfig:
    cfg = config_from(TrainConfig, p)
    cfg.validate()
    return cfg


def check(p: Any) -> None:
    check_model(p.model, p.model_kwargs)
    config(p)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    return train(spark, p.table, p.out, config(p))


OPERATION = register(Operation(
    "train", TrainParams, run, "Train a classifier data-parallel (DDP on Spark barrier tasks).",
    inputs=("table",), outputs=("out",), result_key="out", resumable=True, continues=when_resuming, reports_epochs=True, produces_model=True,
    module="sparkvision.train.engine", check=check,
))
