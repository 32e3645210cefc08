"""How ``pretrain``, ``finetune`` and ``distill`` show their results; their options come from :mod:`sparkvision.ops`."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from sparkvision.cli.common import console, render_kv
from sparkvision.cli.operation import register as register_op
from sparkvision.ops import OPERATIONS


def render_pretrain(s: dict[str, Any]) -> None:
    t = Table(title=f"pretraining ({s['method']})")
    for col in ("epoch", "loss", "kNN acc", "std x sqrt(d)", "images/s", "epoch s"):
        t.add_column(col, justify="right")
    for h in s["history"]:
        knn = "-" if h["knn_acc"] is None else f"{h['knn_acc']:.4f}"
        std = f"{h['output_std_x_sqrt_d']:.3f}" + (
            " [red]collapse?[/red]" if h.get("collapse_warning") else ""
        )
        t.add_row(
            str(h["epoch"]),
            f"{h['train_loss']:.4f}",
            knn,
            std,
            f"{h['images_per_s']:.0f}",
            f"{h['epoch_time_s']:.1f}",
        )
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def render_finetune(s: dict[str, Any]) -> None:
    if s["mode"] == "distill":
        title = f"distill from {s['teacher']} ({s['train_rows']:,} rows, teacher's soft labels)"
    else:
        title = f"{s['mode']} ({100 * s['label_fraction']:g}% of the labels, {s['train_rows']:,} rows)"
        if s.get("fixmatch"):
            title += " + FixMatch on the unlabelled pool"
    t = Table(title=title)
    cols = ["epoch", "train loss", "test acc", "epoch s"] + (["pseudo-labelled"] if s.get("fixmatch") else [])
    for col in cols:
        t.add_column(col, justify="right")
    for h in s["history"]:
        acc = "-" if h["test_acc"] is None else f"{h['test_acc']:.4f}"
        extra = [f"{100 * h['pseudo_label_rate']:.1f}%"] if "pseudo_label_rate" in h else []
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", acc, f"{h['epoch_time_s']:.1f}", *extra)
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def register(app: typer.Typer) -> None:
    register_op(app, OPERATIONS["pretrain"], render_pretrain)
    register_op(app, OPERATIONS["finetune"], render_finetune)
    register_op(app, OPERATIONS["distill"], render_finetune)
