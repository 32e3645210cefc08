"""The supervised training recipe as data: one pydantic dataclass, saved beside every model it produced.

Every default and bound of supervised training is written here once; ``sparkvision train`` (CLI,
web and Python) takes its options from these fields (:mod:`sparkvision.ops.train`).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field, StringConstraints
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
    ImageSize,
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
from sparkvision.models.modeldir import Resize
from sparkvision.train.augment import RESIZED_CROP_SCALE, AugmentConfig, AugmentSpec
from sparkvision.train.transfer import DEFAULT_BACKBONE_LR_SCALE

Optimizer = Literal["sgd", "adamw"]
Normalize = Literal["auto", "table", "imagenet"]
ResizeOption = Literal["auto", "crop", "stretch"]
# none | backbone | N (the first N stages of the backbone)
Freeze = Annotated[str, StringConstraints(pattern=r"^(none|backbone|[0-9]{1,3})$")]
Schedule = Literal["onecycle", "cosine", "constant"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)

RECIPE = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


@dataclass(config=RECIPE)
class TrainConfig(Recipe):
    model: str = Field(default="cnn", description="Registered model name (see `sparkvision models`).")
    model_kwargs: JsonObject = Field(default_factory=dict, description="Extra model arguments (JSON).")
    epochs: Epochs = Field(default=20, description="Epochs.")
    batch_size: BatchSize = Field(
        default=128, description="Global batch size, split evenly over the workers."
    )
    optimizer: Optimizer = Field(default="adamw", description="sgd | adamw")
    lr: LearningRate = Field(default=2e-3, description="Peak learning rate.")
    momentum: Momentum = Field(default=0.9, description="SGD momentum.")
    weight_decay: WeightDecay = Field(default=5e-4, description="Weight decay (not on biases and norms).")
    schedule: Schedule = Field(default="onecycle", description="onecycle | cosine | constant")
    warmup_epochs: Warmup = Field(default=0.0, description="Linear warm-up from lr/25 (cosine / constant).")
    label_smoothing: LabelSmoothing = Field(default=0.05, description="Label smoothing.")
    seed: int = Field(default=0, description="Random seed.")
    workers: Workers = Field(default=1, description="DDP ranks, one Spark barrier task each.")
    threads_per_rank: Threads = Field(
        default=None, description="Torch threads per rank (default: cores per task)."
    )
    augment: AugmentSpec = Field(
        default_factory=AugmentConfig,
        description=(
            "Augmentations, e.g. 'hflip=0.5,crop_padding=2,rotation=10,scale=0.9:1.1,brightness=0.2,contrast=0.2,"
            "saturation=0.2,hue=0.05,grayscale=0.1,cutout=0.5', or 'none'. Default hflip=0.5,crop_padding=2."
        ),
    )
    image_size: ImageSize = Field(
        default=None, description=("Resize to SIZE x SIZE (default: the table's most common size).")
    )
    channels: Literal[1, 3] | None = Field(
        default=None, description="1 or 3 input channels (default: from the table)."
    )
    init_weights: str | None = Field(
        default=None,
        description=(
            "Weights file to start from: a torchvision/timm state dict (.pth read with weights_only, "
            "or .safetensors); never downloaded. Unmatched keys are listed; another architecture's file is refused."
        ),
    )
    freeze: Freeze = Field(
        default="none",
        description="Train all ('none'), only the head ('backbone'), or all but the first N stages.",
    )
    backbone_lr_scale: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"Learning rate of the pretrained layers relative to the head's (default {DEFAULT_BACKBONE_LR_SCALE} with --init-weights, else 1).",
    )
    normalize: Normalize = Field(
        default="auto",
        description="Input normalisation: the table's statistics, or ImageNet's ('auto': ImageNet with --init-weights).",
    )
    resize: ResizeOption = Field(
        default="auto",
        description=(
            "How images of another shape meet the model's input size: 'crop' (shorter side to it, centre "
            "crop; random resized crops of area "
            f"{RESIZED_CROP_SCALE[0]:g}-{RESIZED_CROP_SCALE[1]:g} in training when augmenting), 'stretch' "
            "(resized straight, aspect changed), 'auto' (crop with --init-weights, else stretch). Saved in "
            "preprocess.json: predict, evaluate, embed and the web use it."
        ),
    )
    train_split: str = Field(default="train", description="Split to train on.")
    eval_split: OptionalSplit = Field(default="test", description="Split scored each epoch ('none' to skip).")
    resume: bool = Field(
        default=False, description="Continue from the last checkpoint in the output directory."
    )
    bf16: bool = Field(default=True, description="bfloat16 autocast (GPU only).")
    channels_last: bool = Field(default=True, description="channels_last memory format.")
    keep_checkpoints: Checkpoints = Field(default=2, description="Checkpoints kept.")
    max_restarts: MaxRestarts = MAX_RESTARTS
    cache: Cache = CACHE
    checkpoint_every: CheckpointEvery = CHECKPOINT_EVERY
    reshuffle: Reshuffle = RESHUFFLE

    def resize_policy(self) -> Resize:
        """The resize policy the model directory gets (``preprocess.json``'s ``resize``).

        ``auto``, the default, is "crop" with ``--init-weights`` and "stretch" without. Crop with
        pretrained weights because that is how torchvision and timm train and evaluate them
        (random resized crops; shorter side then centre crop), so objects keep the proportions
        the weights learnt, where stretching a 4:3 photo to a square squeezes every product by a
        quarter. Stretch from scratch because it keeps every recipe without weights as it was:
        on square tables (Fashion-MNIST) evaluation is identical either way, but "crop" adds
        random resized crops to training, a different (for 28x28 digits and garments, heavier)
        augmentation that would change the models and benchmarks of every existing recipe.
        Photo tables trained from scratch can ask for ``crop``; long items (dresses, skis) that
        a centre crop would cut can keep ``stretch`` with pretrained weights.
        """
        if self.resize == "auto":
            return "crop" if self.init_weights else "stretch"
        return self.resize

    def validate(self) -> None:
        """The rules between fields (each field's own bounds are checked on construction)."""
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than workers {self.workers}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be below epochs ({self.epochs}), got {self.warmup_epochs}")
        self.augment.validate()
