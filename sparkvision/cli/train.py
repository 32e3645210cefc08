"""How ``train``, ``evaluate`` and ``models`` show their results; their options come from :mod:`sparkvision.ops`."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from sparkvision.cli.common import JsonOut, console, emit, render_kv
from sparkvision.cli.operation import register as register_op
from sparkvision.models import list_models
from sparkvision.ops import OPERATIONS


def render_train(s: dict[str, Any]) -> None:
    t = Table(title="training")
    for col in ("epoch", "train loss", "test acc", "images/s", "epoch s"):
        t.add_column(col, justify="right")
    for h in s["history"]:
        acc = "-" if h["test_acc"] is None else f"{h['test_acc']:.4f}"
        t.add_row(
            str(h["epoch"]),
            f"{h['train_loss']:.4f}",
            acc,
            f"{h['images_per_s']:.0f}",
            f"{h['epoch_time_s']:.1f}",
        )
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def render_evaluate(s: dict[str, Any]) -> None:
    t = Table(title=f"accuracy {s['accuracy']:.4f}  macro F1 {s['macro_f1']:.4f}  ({s['rows']:,} rows)")
    for col in ("class", "precision", "recall", "F1", "support"):
        t.add_column(col, justify="right")
    for name, m in s["per_class"].items():
        t.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    console.print(t)
    render_kv(
        {
            "evaluation": s["evaluation_json"],
            "confusion matrix": s["confusion_matrix_png"],
            "undecodable rows": s["undecodable_rows"],
            "elapsed": f"{s['elapsed_s']:.1f} s",
        }
    )


def render_plan(s: dict[str, Any]) -> None:
    t = Table(title=f"plan (cost in {s['cost_unit']})")
    for col in ("", "workers", "threads", "batch", "epochs", "time s", "accuracy", "cost"):
        t.add_column(col, justify="right")
    for label, o in [("choice", s["choice"])] + [("runner-up", o) for o in s["runners_up"]]:
        t.add_row(
            label,
            *(
                str(o[k])
                for k in ("workers", "threads_per_rank", "batch_size", "epochs", "time_s", "accuracy", "cost")
            ),
        )
    console.print(t)
    if s["ruled_out"]:
        console.print("[bold]ruled out[/bold]")
        for line in s["ruled_out"]:
            console.print(f"  {line}", highlight=False)
    render_kv({k: v for k, v in s.items() if k not in ("choice", "runners_up", "ruled_out", "message")})


def models(json_out: JsonOut = False) -> None:
    """List the registered models."""
    emit({"models": list_models()}, json_out)


def register(app: typer.Typer) -> None:
    register_op(app, OPERATIONS["train"], render_train)
    register_op(app, OPERATIONS["plan"], render_plan)
    register_op(app, OPERATIONS["evaluate"], render_evaluate)
    app.command("models")(models)
