"""`sparkvision predict`: distributed batch classification."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sparkvision.cli.common import Conf, JsonOut, Master, emit, guarded, spark_from


def predict(
    model_dir: Annotated[str, typer.Argument(help="Model directory.")],
    table: Annotated[str, typer.Argument(help="Image table to classify.")],
    out: Annotated[str, typer.Argument(help="Output Parquet table of predictions.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Probabilities kept per row.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 512,
    split: Annotated[str | None, typer.Option(help="Only this split (default: every row).")] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Classify every image of a table on the executors; undecodable rows get an error column."""
    from sparkvision.inference.runtime import predict_table

    def body() -> dict[str, Any]:
        return predict_table(spark_from(master, conf), model_dir, table, out, top_k=top_k, batch_size=batch_size,
                             split=split)

    emit(guarded(body, json_out), json_out)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
