"""The detector's training recipe as data: one pydantic dataclass, saved beside every detector.

``sparkvision train-detector`` (CLI, web and Python) takes its options from these fields
(:mod:`sparkvision.ops.train_detector`); the engine's own fields (epochs, optimizer, schedule,
workers, checkpoints, cache) mean what they mean in :class:`~sparkvision.train.config.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass as plain_dataclass

from pydantic import Field
from pydantic.dataclasses import dataclass

from sparkvision.fields import (
    CACHE,
    CHECKPOINT_EVERY,
    MAX_RESTARTS,
    BatchSize,
    Cache,
    CheckpointEvery,
    Checkpoints,
    Epochs,
    JsonObject,
    LearningRate,
    MaxRestarts,
    Momentum,
    OptionalSplit,
    Recipe,
    Threads,
    Warmup,
    WeightDecay,
    Workers,
)
from sparkvision.train.config import RECIPE, Optimizer, Schedule

MIN_SCORE = 0.5  # boxes scoring less are dropped: detect, crop, features and search queries
DETECT_BATCH = 64  # images per detector call on the executors


@plain_dataclass(frozen=True)
class CropSpec:
    """How boxes become crops; saved in the features table's ``_retrieval.json`` so a query image
    is cropped the same way."""

    margin: float = 0.1  # of the box's own width/height, on every side
    all_boxes: bool = False  # every box above min_score, not only the best
    max_side: int | None = None  # crops (in the crops table) shrunk to this longer side; None: as cut


@dataclass(config=RECIPE)
class DetectorConfig(Recipe):
    model: str = Field(default="fasterrcnn_mobilenet_v3", description="Registered detector name.")
    model_kwargs: JsonObject = Field(
        default_factory=dict,
        description='Detector arguments (JSON), e.g. {"box_batch_size_per_image": 64}.',
    )
    weights: str | None = Field(
        default=None,
        description=(
            "Weights file to start from (safetensors, or a torch file read with weights_only): the "
            "detector's own, or a MobileNetV3 backbone's. Default: random weights."
        ),
    )
    per_class: bool = Field(
        default=False, description="One class per table class (default: one class-agnostic 'product')."
    )
    image_size: int = Field(default=128, ge=32, le=1024, description="Side of the detector's square input.")
    epochs: Epochs = Field(default=30, description="Epochs.")
    batch_size: BatchSize = Field(default=16, description="Global batch size, split evenly over the workers.")
    optimizer: Optimizer = Field(default="adamw", description="sgd | adamw")
    lr: LearningRate = Field(default=1e-3, description="Peak learning rate.")
    momentum: Momentum = Field(default=0.9, description="SGD momentum.")
    weight_decay: WeightDecay = Field(default=1e-4, description="Weight decay (not on biases and norms).")
    schedule: Schedule = Field(default="onecycle", description="onecycle | cosine | constant")
    warmup_epochs: Warmup = Field(default=0.0, description="Linear warm-up from lr/25 (cosine / constant).")
    hflip: float = Field(default=0.5, ge=0, le=1, description="Probability of a horizontal flip (boxes too).")
    seed: int = Field(default=0, description="Random seed.")
    workers: Workers = Field(default=1, description="DDP ranks, one Spark barrier task each.")
    threads_per_rank: Threads = Field(
        default=None, description="Torch threads per rank (default: cores per task)."
    )
    train_split: str = Field(default="train", description="Split to train on.")
    eval_split: OptionalSplit = Field(
        default="test", description="Split whose mAP is measured each epoch ('none' to skip)."
    )
    resume: bool = Field(
        default=False, description="Continue from the last checkpoint in the output directory."
    )
    keep_checkpoints: Checkpoints = Field(default=2, description="Checkpoints kept.")
    max_restarts: MaxRestarts = MAX_RESTARTS
    cache: Cache = CACHE
    checkpoint_every: CheckpointEvery = CHECKPOINT_EVERY

    def validate(self) -> None:
        """The rules between fields (each field's own bounds are checked on construction)."""
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than workers {self.workers}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be below epochs ({self.epochs}), got {self.warmup_epochs}")
