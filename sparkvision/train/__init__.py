"""Supervised data-parallel training: ``train(spark, table, out, TrainConfig(...))``.

Names load on first use, as in :mod:`sparkvision.retrieval`: the command line builds its options
from :mod:`sparkvision.train.config` alone, and importing the package eagerly pulled the engine
(and with it torchvision, FAISS, matplotlib...) into every ``sparkvision`` start.
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AugmentConfig": "augment",
    "BatchAugment": "augment",
    "parse_augment": "augment",
    "TrainConfig": "config",
    "train": "engine",
    "train_df": "engine",
}

if TYPE_CHECKING:
    from sparkvision.train.augment import AugmentConfig, BatchAugment, parse_augment
    from sparkvision.train.config import TrainConfig
    from sparkvision.train.engine import train, train_df


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparkvision.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparkvision.train.{module}"), name)


__all__ = ["AugmentConfig", "BatchAugment", "TrainConfig", "parse_augment", "train", "train_df"]
