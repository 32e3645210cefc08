"""The path parameters operations share: an input table, an output directory, a model directory.

Their wording and CLI form are written once here; which of them an operation reads or writes
is declared on its :class:`~sparkvision.ops.base.Operation`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from sparkvision.fields import BatchSize
from sparkvision.ops.base import Cli


def table_in(description: str = "Image table.", positional: bool = False) -> Any:
    return (
        Annotated[str, Cli(positional=positional, flags=() if positional else ("--table",))],
        Field(description=description),
    )


def model_dir_out(description: str = "Model directory to write.") -> Any:
    return (Annotated[str, Cli(flags=("--out",))], Field(description=description))


def positional(description: str, metavar: str | None = None) -> Any:
    return (Annotated[str, Cli(positional=True, metavar=metavar)], Field(description=description))


def inference_batch() -> Any:
    """Images per model call on the executors: one default for every operation that runs a model."""
    return (BatchSize, Field(512, description="Images per model call on the executors."))


def overwrite() -> Any:
    """Every operation that writes outputs refuses to replace existing data without it."""
    return (bool, Field(False, description="Replace an output that already holds data (refused otherwise)."))
