"""``datasets fashion-mnist``: Fashion-MNIST from a local copy (the Debian package) as an image table."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.ops.base import Operation, Progress, params_model, register
from sparkvision.ops.fields import overwrite, positional

FashionMnistParams = params_model(
    "FashionMnistParams",
    "Fashion-MNIST (Debian package dataset-fashion-mnist) as an image table: 60k train, 10k test.",
    dest=positional("Output image table.", "DEST"),
    source=(
        str | None,
        Field(None, description="Folder with the four IDX .gz files (default: the Debian package's)."),
    ),
    overwrite=overwrite(),
)


def check(p: Any) -> None:
    from sparkvision.data.datasets import fashion_mnist_dir

    fashion_mnist_dir(p.source)  # says how to get the data before a JVM starts


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.data.datasets import fashion_mnist_dir, ingest_fashion_mnist

    return ingest_fashion_mnist(spark, p.dest, fashion_mnist_dir(p.source)).to_json()


# Not a web job kind: the web ingests any IDX folder inside its data roots through ``ingest``.
OPERATION = register(
    Operation(
        "fashion-mnist",
        FashionMnistParams,
        run,
        "Fashion-MNIST from the Debian package as an image table.",
        outputs=("dest",),
        result_key="dest",
        module="sparkvision.data.datasets",
        web=False,
        check=check,
    )
)
