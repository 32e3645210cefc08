"""How ``ingest`` and ``datasets`` show their results; their options come from :mod:`sparkvision.ops`."""

from __future__ import annotations

from typing import Any

import typer

from sparkvision.cli.common import console, counts_table, render_kv
from sparkvision.cli.operation import register as register_op
from sparkvision.ops import OPERATIONS

datasets_app = typer.Typer(help="Ingest well-known data sets from a local copy.", no_args_is_help=True)


def render_ingest(s: dict[str, Any]) -> None:
    console.print(counts_table("rows per split", s["rows_by_split"]))
    console.print(counts_table("rows per class", s["rows_by_class"]))
    if s["rejects_by_reason"]:
        console.print(counts_table("rejects per reason", s["rejects_by_reason"]))
    render_kv(
        {
            "table": s["table"],
            "rejects": s["rejects_table"],
            "rows written": f"{s['rows_written']:,}",
            "duplicates in source": s["duplicates_in_source"],
            "already in table": s["duplicates_of_table"],
            "classes": len(s["class_names"]),
            "elapsed": f"{s['elapsed_s']:.1f} s",
            "throughput": f"{s['images_per_s']:,.0f} images/s",
        }
    )


def render_scenes(s: dict[str, Any]) -> None:
    console.print(counts_table("scenes per split", s["rows_by_split"]))
    console.print(counts_table("scenes per item count", s["scenes_by_items"]))
    render_kv(
        {
            "table": s["table"],
            "scenes": f"{s['scenes']:,}",
            "items used": f"{s['items_used']:,} of {s['source_rows']:,}",
            "elapsed": f"{s['elapsed_s']:.1f} s",
            "throughput": f"{s['scenes_per_s']:,.1f} scenes/s",
        }
    )


def register(app: typer.Typer) -> None:
    register_op(app, OPERATIONS["ingest"], render_ingest)
    register_op(datasets_app, OPERATIONS["fashion-mnist"], render_ingest)
    register_op(datasets_app, OPERATIONS["scenes"], render_scenes)
    register_op(app, OPERATIONS["ingest-raster"])
    register_op(datasets_app, OPERATIONS["synthetic-landsat"])
    app.add_typer(datasets_app, name="datasets")
