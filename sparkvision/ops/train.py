"""``train``: a classifier, data-parallel (torch DDP on Spark barrier tasks)."""

from __future__ import annotations

from typing import Any

import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import read_table
from sparkvision.models import create_model, list_models
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

TrainParams = params_model(
    "TrainParams",
    "Train a classifier data-parallel (torch DDP on Spark barrier tasks).",
    table=table_in("Image table to train on (its train split)."),
    out=model_dir_out("Model directory to write (checkpoints, logs, weights)."),
    overwrite=overwrite(),
    **config_fields(TrainConfig),
)


MAX_PARAMETERS = 1_000_000_000  # ~4 GB of float32 weights before gradients and optimizer state


def check_model(name: str, model_kwargs: dict[str, Any] | None = None) -> None:
    """The model is registered, takes every argument given to it, and can be built at a size a
    worker can hold: built on PyTorch's meta device (shapes only, no memory), so a
    ``{"hidden": 1e9}`` is refused here instead of exhausting an executor after Spark starts."""
    if name not in list_models():
        raise ParamError("model", f"{name!r} is not registered; choose from {', '.join(list_models())}")
    known = model_arguments(name)
    unknown = sorted(set(model_kwargs or {}) - set(known)) if known is not None else []
    if unknown:
        raise ParamError(
            "model_kwargs",
            f"unknown argument(s) {', '.join(unknown)} of model {name!r}; it takes {', '.join(known or [])}",
        )
    try:
        with torch.device("meta"):
            model = create_model(name, 10, 3, **(model_kwargs or {}))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ParamError("model_kwargs", f"model {name!r} cannot be built with {model_kwargs}: {e}") from None
    n = sum(t.numel() for t in model.parameters())
    if n > MAX_PARAMETERS:
        raise ParamError(
            "model_kwargs",
            f"model {name!r} with {model_kwargs} has {n:,} parameters, over the "
            f"{MAX_PARAMETERS:,} a worker can train",
        )


def check_splits(spark: SparkSession, table: str, **splits: str | None) -> None:
    """Each named split has rows, before a training run starts: a typo in ``eval_split`` must not
    mean 20 epochs without evaluation (one small aggregate over the split column)."""
    wanted = {name: s for name, s in splits.items() if s is not None}
    if not wanted:
        return
    present = {
        r["split"]
        for r in read_table(spark, table)
        .where(F.col("split").isin(list(wanted.values())))
        .select("split")
        .distinct()
        .collect()
    }
    for name, s in wanted.items():
        if s not in present:
            raise ParamError(name, f"{table} has no rows in split {s!r}")


def config(p: Any) -> TrainConfig:
    cfg = config_from(TrainConfig, p)
    cfg.validate()
    return cfg


def check(p: Any) -> None:
    check_model(p.model, p.model_kwargs)
    config(p)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.train.engine import train

    check_splits(spark, p.table, train_split=p.train_split, eval_split=p.eval_split)
    progress.check_cancelled()
    return train(spark, p.table, p.out, config(p))


OPERATION = register(
    Operation(
        "train",
        TrainParams,
        run,
        "Train a classifier data-parallel (DDP on Spark barrier tasks).",
        inputs=("table",),
        optional_inputs=("init_weights",),
        outputs=("out",),
        result_key="out",
        resumable=True,
        continues=when_resuming,
        reports_epochs=True,
        produces_model=True,
        module="sparkvision.train.engine",
        check=check,
    )
)
