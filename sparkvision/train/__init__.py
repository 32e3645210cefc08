"""Supervised data-parallel training: ``train(spark, table, out, TrainConfig(...))``."""

from .augment import AugmentConfig, BatchAugment, parse_augment
from .config import TrainConfig
from .engine import train, train_df

__all__ = ["AugmentConfig", "BatchAugment", "TrainConfig", "parse_augment", "train", "train_df"]
