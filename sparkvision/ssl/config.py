"""The fine-tuning, linear-evaluation and distillation recipe as data (saved beside every model).

Every default and bound is written here once; ``sparkvision finetune`` and ``sparkvision distill``
(CLI, web and Python) take their options from these fields (:mod:`sparkvision.ops.finetune`,
:mod:`sparkvision.ops.distill`, which holds distillation's own defaults).
"""

from __future__ import annotations

from pydantic import Field
from pydantic.dataclasses import dataclass

from sparkvision.fields import (
    CACHE,
    CHECKPOINT_EVERY,
    MAX_RESTARTS,
    RESHUFFLE,
    BatchSize,
    Cache,
    CheckpointEvery,
    Checkpoints,
    Epochs,
    JsonObject,
    LabelSmoothing,
    LearningRate,
    MaxRestarts,
    Momentum,
    OptionalSplit,
    Recipe,
    Reshuffle,
    Threads,
    Warmup,
    WeightDecay,
    Workers,
)
from sparkvision.train.augment import AugmentConfig, AugmentSpec
from sparkvision.train.config import RECIPE, Optimizer, Schedule, TrainConfig


def strong_augment_default() -> AugmentConfig:
    """FixMatch's strong view (the paper: RandAugment + cutout), sized for small images: flip, a
    4-pixel shift, brightness/contrast jitter and a half-side cutout. No rotation or zoom: on
    Fashion-MNIST they cost the supervised recipe 1.5 points on a validation split."""
    return AugmentConfig(hflip=0.5, crop_padding=4, brightness=0.3, contrast=0.3, cutout=0.5)


@dataclass(config=RECIPE)
class FinetuneConfig(Recipe):
    label_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description=("Stratified share of the labelled training rows, e.g. 0.01 or 0.05."),
    )
    sample_seed: int = Field(default=0, description="Seed of the label sample.")
    linear: bool = Field(
        default=False, description="Linear evaluation: freeze the encoder, train only a linear head."
    )
    model: str = Field(
        default="cnn", description="Backbone when there is no pretrained encoder (it brings its own)."
    )
    model_kwargs: JsonObject = Field(default_factory=dict, description="Extra model arguments (JSON).")
    epochs: Epochs = Field(default=40, description="Epochs.")
    batch_size: BatchSize = Field(default=128, description="Global batch size, split over the workers.")
    optimizer: Optimizer = Field(default="adamw", description="adamw | sgd")
    lr: LearningRate = Field(default=2e-3, description="Peak learning rate of the head.")
    encoder_lr_scale: float = Field(
        default=0.1, ge=0, le=10, description="Encoder LR = lr x this when fine-tuning."
    )
    projector_layers: int = Field(
        default=0,
        ge=0,
        description=(
            "Keep this many pretraining projector layers under the head (SimCLRv2's fine-tuning from the projector)."
        ),
    )
    momentum: Momentum = Field(default=0.9, description="SGD momentum.")
    weight_decay: WeightDecay = Field(default=5e-4, description="Weight decay.")
    schedule: Schedule = Field(default="onecycle", description="onecycle | cosine | constant")
    warmup_epochs: Warmup = Field(default=0.0, description="Linear warm-up (cosine / constant).")
    label_smoothing: LabelSmoothing = Field(default=0.1, description="Label smoothing.")
    augment: AugmentSpec = Field(
        default_factory=AugmentConfig,
        description=("Augmentations as for train's augment (default hflip=0.5,crop_padding=2)."),
    )
    seed: int = Field(default=0, description="Random seed.")
    workers: Workers = Field(default=1, description="DDP ranks (Spark barrier tasks).")
    threads_per_rank: Threads = Field(default=None, description="Torch threads per rank.")
    train_split: str = Field(default="train", description="Split to sample labelled rows from.")
    eval_split: OptionalSplit = Field(
        default="test", description="Split scored every few epochs ('none' to skip)."
    )
    unlabeled_split: str = Field(
        default="unlabeled",
        description=(
            "Unlabelled pool (its labels are never read): FixMatch's, or the one a teacher labels in distillation."
        ),
    )
    distill_temperature: float = Field(
        default=1.0, gt=0, le=100, description=("Distillation: softmax temperature of teacher and student.")
    )
    consistency_weight: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description=(
            "FixMatch: weight of the loss on the unlabelled pool (0 = off; 1 as in the paper; use label_smoothing 0 "
            "with it: smoothing caps the softmax below the confidence threshold)."
        ),
    )
    confidence: float = Field(
        default=0.95, ge=0, lt=1, description="FixMatch: pseudo-label confidence threshold."
    )
    unlabeled_ratio: int = Field(
        default=7, ge=1, description="FixMatch: unlabelled images per labelled one in a step."
    )
    strong_augment: AugmentSpec = Field(
        default_factory=strong_augment_default,
        description=(
            "FixMatch: the strong view, as augment (default hflip=0.5,crop_padding=4,brightness=0.3,"
            "contrast=0.3,cutout=0.5)."
        ),
    )
    resume: bool = Field(
        default=False, description="Continue from the last checkpoint in the output directory."
    )
    keep_checkpoints: Checkpoints = Field(default=1, description="Checkpoints kept.")
    max_restarts: MaxRestarts = MAX_RESTARTS
    cache: Cache = CACHE
    checkpoint_every: CheckpointEvery = CHECKPOINT_EVERY
    reshuffle: Reshuffle = RESHUFFLE

    def validate(self) -> None:
        """The rules between fields (each field's own bounds are checked on construction)."""
        if self.consistency_weight > 0 and self.linear:
            raise ValueError(
                "consistency_weight trains the whole model; it cannot be combined with linear evaluation"
            )
        self.strong_augment.validate()
        TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            schedule=self.schedule,
            warmup_epochs=self.warmup_epochs,
            label_smoothing=self.label_smoothing,
            workers=self.workers,
            augment=self.augment,
        ).validate()
