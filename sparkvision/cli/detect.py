"""``train-detector`` and ``detect``: options from :mod:`sparkvision.ops`; how their results show."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from sparkvision.cli.common import console, render_kv
from sparkvision.cli.operation import register as register_op
from sparkvision.ops import OPERATIONS


def render_train_detector(s: dict[str, Any]) -> None:
    t = Table(title="detector training")
    for col in ("epoch", "train loss", "mAP@0.5", "mAP@[.5:.95]", "images/s", "epoch s"):
        t.add_column(col, justify="right")
    for h in s["history"]:
        m50, m = h.get("map_50"), h.get("map")
        t.add_row(
            str(h["epoch"]),
            f"{h['train_loss']:.4f}",
            "-" if m50 is None else f"{m50:.4f}",
            "-" if m is None else f"{m:.4f}",
            f"{h['images_per_s']:.0f}",
            f"{h['epoch_time_s']:.1f}",
        )
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def register(app: typer.Typer) -> None:
    register_op(app, OPERATIONS["train-detector"], render_train_detector)
    register_op(app, OPERATIONS["detect"])
    register_op(app, OPERATIONS["crop"])
    register_op(app, OPERATIONS["features"])
