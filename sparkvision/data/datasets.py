"""Known data sets, ingested from a local copy (nothing is downloaded at run time)."""

from __future__ import annotations

import os

from pyspark.sql import SparkSession

from sparkvision.data.idx import FASHION_MNIST_CLASSES
from sparkvision.data.ingest import IngestSummary, ingest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class DatasetMissing(FileNotFoundError):
    pass


def fashion_mnist_dir(source: str | None = None) -> str:
    """Where the Fashion-MNIST IDX files are, or a :class:`DatasetMissing` that says how to get them."""
    d = source or os.environ.get("SPARKVISION_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    missing = [f for f in FASHION_MNIST_FILES if not os.path.exists(os.path.join(d, f))]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}).\n"
            "  On Debian or Ubuntu:  sudo apt-get install dataset-fashion-mnist\n"
            f"  (installs the four IDX files into {FASHION_MNIST_DIR}).\n"
            "  Elsewhere: download the four *-ubyte.gz files from "
            "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and give\n"
            "  that folder as source, or set SPARKVISION_FASHION_MNIST_DIR."
        )
    return d


def ingest_fashion_mnist(
    spark: SparkSession, dest: str, source: str | None = None, mode: str = "overwrite"
) -> IngestSummary:
    """Fashion-MNIST as an image table: 60,000 train and 10,000 test rows, 10 classes."""
    d = fashion_mnist_dir(source)
    return ingest(spark, d, dest, kind="idx", class_names=list(FASHION_MNIST_CLASSES), mode=mode)
