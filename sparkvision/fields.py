"""Parameter types shared by the training recipes and the operations' parameters.

Each carries its own parsing from the forms a front-end sends (the CLI sends strings, the web
JSON), so that ``--eval-split none``, ``"eval_split": null`` and ``eval_split=None`` mean the
same thing through one rule, written here once.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter


def _none_word(v: Any) -> Any:
    return None if isinstance(v, str) and v.strip().lower() in ("none", "") else v


def json_object(v: Any) -> Any:
    """A dict, or its JSON text (as a command line gives it); None is {}."""
    if isinstance(v, str):
        try:
            v = json.loads(v) if v.strip() else {}
        except ValueError as e:
            raise ValueError(f"not valid JSON: {e}") from None
    return {} if v is None else v


def _size(v: Any) -> Any:
    """``32`` / ``"32"`` -> (32, 32); ``"32x48"`` -> (32, 48) (height x width); lists -> tuples."""
    v = _none_word(v)
    if v is None:
        return None
    if isinstance(v, str):
        parts = v.lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected SIZE or HEIGHTxWIDTH, got {v!r}") from None
        return (nums[0], nums[0]) if len(nums) == 1 else tuple(nums)
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) in (1, 2):
        return (v[0], v[0]) if len(v) == 1 else tuple(v)
    raise ValueError(f"expected SIZE, HEIGHTxWIDTH or [HEIGHT, WIDTH], got {v!r}")


def _comma_list(v: Any) -> Any:
    v = _none_word(v)
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


OptionalSplit = Annotated[str | None, BeforeValidator(_none_word)]
"""A split name, or None for "all rows" / "skip"; the word ``none`` means None."""

JsonObject = Annotated[dict[str, Any], BeforeValidator(json_object)]
"""Free-form keyword arguments (e.g. a model's): a dict, or its JSON text on the command line."""

ImageSize = Annotated[
    tuple[Annotated[int, Field(ge=4, le=2048)], Annotated[int, Field(ge=4, le=2048)]] | None,
    BeforeValidator(_size),
]
"""Resize target (height, width); one number for a square; None keeps the table's size."""

CommaList = Annotated[list[str] | None, BeforeValidator(_comma_list)]
"""A list of names; ``a,b,c`` on the command line."""


def check_known(cls: type, d: dict[str, Any], what: str) -> None:
    """Unknown keys of a dataclass's JSON are an error that names them, never dropped."""
    known = list(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} field(s) {', '.join(unknown)}; known: {', '.join(known)}")


class Recipe:
    """JSON round trip of a pydantic-dataclass recipe (saved beside every model it produced).

    Unknown keys are an error that names them, never silently dropped.
    """

    def to_json(self) -> dict[str, Any]:
        # mypy misreads a class object as unhashable for functools.cache (python/mypy#11470).
        return _adapter(type(self)).dump_python(self, mode="json")  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Any:
        check_known(cls, d, cls.__name__)
        return _adapter(cls).validate_python(d)  # type: ignore[arg-type]  # python/mypy#11470, as above


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


# Bounds shared by every recipe and operation that has such a field (each default stays with its
# recipe or operation: fine-tuning's 40 epochs are not training's 20).
Epochs = Annotated[int, Field(ge=1, le=100_000)]
BatchSize = Annotated[int, Field(ge=1, le=65_536)]
LearningRate = Annotated[float, Field(gt=0, le=10)]
Momentum = Annotated[float, Field(ge=0, le=1)]
WeightDecay = Annotated[float, Field(ge=0, le=1)]
Warmup = Annotated[float, Field(ge=0)]
LabelSmoothing = Annotated[float, Field(ge=0, lt=1)]
Workers = Annotated[int, Field(ge=1, le=1024)]
Threads = Annotated[int | None, Field(ge=1, le=1024)]
Checkpoints = Annotated[int, Field(ge=1)]
# Where a training rank keeps its shard (every recipe; see sparkvision/train/data.py): "memory"
# decodes it once into RAM, "stream" keeps the encoded rows (local disk, or RAM when small) and
# decodes each batch ahead of the step, "auto" picks memory when the decoded shard fits with room.
CacheMode = Literal["auto", "memory", "stream"]
CACHE: CacheMode = "auto"
Cache = Annotated[
    CacheMode,
    Field(
        description="Shard cache: memory (decoded in RAM), stream (encoded rows, decoded each "
        "batch ahead of the step; memory bounded by batch and prefetch sizes), auto (memory when it "
        "fits with room to spare)."
    ),
]
# Deal the rows to the ranks afresh before every epoch (every recipe): one Spark shuffle and one
# barrier job per epoch, resumed from the epoch's checkpoint, instead of one deal per run.
RESHUFFLE = False
Reshuffle = Annotated[
    bool,
    Field(
        description="Deal the rows to the ranks afresh before every epoch (a Spark shuffle and a "
        "barrier job per epoch); default: once per run, each epoch reshuffling within a rank's shard."
    ),
]
# Checkpoint every N optimizer steps as well as at every epoch's end (0: epochs only).
CHECKPOINT_EVERY = 0
CheckpointEvery = Annotated[
    int,
    Field(ge=0, description="Also checkpoint every N steps within an epoch (0: at epoch ends only)."),
]
# Relaunches of a training job whose rank lost its executor or Python worker (every recipe: the
# same default, defined here).
MAX_RESTARTS = 3
MaxRestarts = Annotated[
    int,
    Field(
        ge=0,
        le=100,
        description="Relaunch the job this many times when a rank's executor dies, resuming from "
        "the last checkpoint (0: fail at once).",
    ),
]
