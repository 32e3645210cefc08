"""Training configuration as data: one dataclass, saved beside every model it produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparkvision.train.augment import AugmentConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class TrainConfig:
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 128  # global: split evenly over the ranks
    optimizer: str = "adamw"
    lr: float = 2e-3  # peak learning rate
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0  # cosine / constant: linear warm-up from lr/25
    label_smoothing: float = 0.05
    seed: int = 0
    workers: int = 1  # DDP ranks, one Spark barrier task each
    threads_per_rank: int | None = None  # default: cores per task
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: tuple[int, int] | None = None  # default: the table's most common size
    channels: int | None = None  # default: the table's channel count (1 or 3)
    train_split: str = "train"
    eval_split: str | None = "test"  # accuracy each epoch; None to skip
    resume: bool = False
    bf16: bool = True  # autocast on GPU only
    channels_last: bool = True
    keep_checkpoints: int = 2

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than workers {self.workers}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        self.augment.validate()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_json()
        if self.image_size is not None:
            d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["augment"] = AugmentConfig.from_json(d.get("augment", {}))
        if d.get("image_size") is not None:
            d["image_size"] = tuple(d["image_size"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
