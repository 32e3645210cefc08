"""The `sparkvision` command: a thin layer over the library API.

Each command lives in a module named for what it does and is registered here; every command
takes ``--json`` (summary as one JSON object on stdout), ``--master`` and ``--conf``.
"""

from __future__ import annotations

import typer

from sparkvision.cli import ingest as _ingest

app = typer.Typer(
    name="sparkvision",
    help="Computer-vision deep learning on Apache Spark: ingest, train, classify, embed, search.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.command("ingest")(_ingest.ingest)
app.add_typer(_ingest.datasets_app, name="datasets")


def _register_optional() -> None:
    """Commands from later modules; each registers itself so this file stays a list."""
    import importlib

    for name in ("train", "infer", "ssl", "retrieval", "serve"):
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(app)


_register_optional()


def main() -> None:
    app()
