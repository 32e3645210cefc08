"""The operations layer: one module per operation, each a parameters model and a ``run``.

The CLI, the web job API and the Python API (:mod:`sparkvision.api`) are all built from
:data:`OPERATIONS`; see :mod:`sparkvision.ops.base` for what an operation declares.
"""

from sparkvision.ops import (  # noqa: F401 - each module registers its operation
    crop,
    datasets,
    dedup,
    detect,
    distill,
    embed,
    evaluate,
    features,
    finetune,
    index,
    ingest,
    ingest_raster,
    plan,
    predict,
    pretrain,
    scenes,
    search,
    synthetic_landsat,
    train,
    train_detector,
)
from sparkvision.ops.base import NO_PROGRESS, OPERATIONS, Operation, ParamError, Params, Progress

__all__ = ["NO_PROGRESS", "OPERATIONS", "Operation", "ParamError", "Params", "Progress"]
