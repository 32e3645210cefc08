"""The ``sparkvision`` command: a thin layer over the operations layer (:mod:`sparkvision.ops`).

Each operation's options are generated from its parameters model (:mod:`sparkvision.cli.operation`);
the modules here only add how a summary is shown. Every command takes ``--json`` (its summary as
one JSON object on stdout), and those that run on Spark ``--master`` and ``--conf``.
"""

from __future__ import annotations

import typer

from sparkvision.cli import detect, infer, ingest, retrieval, serve, ssl, train

app = typer.Typer(
    name="sparkvision",
    help="Computer-vision deep learning on Apache Spark: ingest, train, classify, embed, search.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
for module in (ingest, train, infer, ssl, retrieval, serve, detect):
    module.register(app)


def main() -> None:
    app()
