"""Supervised data-parallel training: ``train(spark, table, out, TrainConfig(...))``."""

from sparkvision.train.augment import AugmentConfig, BatchAugment, parse_augment
from sparkvision.train.config import TrainConfig
from sparkvision.train.engine import train, train_df

__all__ = ["AugmentConfig", "BatchAugment", "TrainConfig", "parse_augment", "train", "train_df"]
