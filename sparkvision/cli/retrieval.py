"""How ``embed``, ``index``, ``search`` and ``dedup`` show their results; options from :mod:`sparkvision.ops`."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from sparkvision.cli.common import console, render_kv
from sparkvision.cli.operation import register as register_op
from sparkvision.ops import OPERATIONS


def render_search(s: dict[str, Any]) -> None:
    if "results" not in s:
        render_kv(s)
        return
    for q in s["results"]:
        if q["error"]:
            console.print(f"[red]{q['query']}[/red]: {q['error']}")
            continue
        t = Table(title=q["query"])
        for col in ("rank", "score", "path", "label", "content_id"):
            t.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for h in q["neighbours"]:
            t.add_row(
                str(h["rank"]),
                f"{h['score']:.4f}",
                str(h["path"]),
                str(h["label_name"] or ""),
                h["content_id"][:12],
            )
        console.print(t)


def register(app: typer.Typer) -> None:
    register_op(app, OPERATIONS["index"])
    register_op(app, OPERATIONS["search"], render_search)
    register_op(app, OPERATIONS["dedup"])
