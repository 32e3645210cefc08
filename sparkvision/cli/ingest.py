"""`sparkvision ingest` and `sparkvision datasets`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sparkvision.data.images import MAX_PIXELS_DEFAULT
from sparkvision.data.ingest import SOURCE_KINDS
from sparkvision.data.schema import SPLITS
from sparkvision.cli.common import Conf, JsonOut, Master, console, counts_table, emit, guarded, render_kv, spark_from

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


def _one_of(values: tuple[str, ...]):
    """A typer callback: reject a value outside ``values`` with click's usage error (exit code 2)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in values:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(values)}")
        return value

    return check


def ingest(
    source: Annotated[str, typer.Argument(help="Image folder, IDX file/folder or image table (any Spark URI).")],
    table: Annotated[str, typer.Argument(help="Output image table (Parquet directory, any Spark URI).")],
    kind: Annotated[str, typer.Option(help="auto | folder | idx | table", callback=_one_of(SOURCE_KINDS))] = "auto",
    split: Annotated[
        str | None,
        typer.Option(help="Force every row into this split (train/test/val/unlabeled).", callback=_one_of(SPLITS)),
    ] = None,
    unlabeled: Annotated[bool, typer.Option("--unlabeled", help="Ignore class folders.")] = False,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Reject images with more pixels (decompression bombs).")
    ] = MAX_PIXELS_DEFAULT,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the table instead of appending.")] = False,
    rejects: Annotated[str | None, typer.Option(help="Rejects table (default TABLE_rejects).")] = None,
    glob: Annotated[str | None, typer.Option(help="Only files whose name matches, e.g. '*.jpg'.")] = None,
    class_names: Annotated[
        str | None, typer.Option(help="Comma-separated class names for IDX labels 0..N-1.")
    ] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Ingest images into a Parquet image table; bad files go to the rejects table with a reason."""
    from sparkvision.data.ingest import ingest as run_ingest

    def body() -> dict[str, Any]:
        spark = spark_from(master, conf)
        return run_ingest(
            spark,
            source,
            table,
            kind=kind,
            split=split,
            labeled=not unlabeled,
            class_names=class_names.split(",") if class_names else None,
            max_pixels=max_pixels,
            mode="overwrite" if overwrite else "append",
            rejects=rejects,
            glob=glob,
        ).to_json()

    emit(guarded(body, json_out), json_out, render_ingest)


@datasets_app.command("fashion-mnist")
def fashion_mnist(
    dest: Annotated[str, typer.Argument(help="Output image table.")],
    source: Annotated[
        str | None, typer.Option(help="Folder with the four IDX .gz files (default the Debian package's).")
    ] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Fashion-MNIST (Debian package dataset-fashion-mnist) as an image table: 60k train, 10k test."""
    from sparkvision.data.datasets import fashion_mnist_dir, ingest_fashion_mnist

    def body() -> dict[str, Any]:
        files = fashion_mnist_dir(source)  # says how to get the data before a JVM starts
        return ingest_fashion_mnist(spark_from(master, conf), dest, files).to_json()

    emit(guarded(body, json_out), json_out, render_ingest)
