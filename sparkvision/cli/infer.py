"""``predict`` and ``embed``: batch inference on the executors; options from :mod:`sparkvision.ops`."""

from __future__ import annotations

import typer

from sparkvision.cli.operation import register as register_op
from sparkvision.ops import OPERATIONS


def register(app: typer.Typer) -> None:
    register_op(app, OPERATIONS["predict"])
    register_op(app, OPERATIONS["embed"])
