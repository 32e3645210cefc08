"""Supervised data-parallel training: ``train(spark, table, out, TrainConfig(...))``.

Names load on first use, as in :mod:`sparkvision.retrieval`: the command line builds its options
from :mod:`sparkvision.train.config` alone, and importing the package eagerly pulled the engine
(and with it torchvision, FAISS, matplotlib...) into every ``sparkvision`` start.
"""

from typing import TYPE_CHECKING

from sparkvision.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["AugmentConfig", "BatchAugment", "TrainConfig", "parse_augment", "train", "train_df"]
