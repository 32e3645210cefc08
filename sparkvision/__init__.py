"""sparkvision: computer-vision deep learning on Apache Spark.

The Python API mirrors the CLI; heavy modules are imported lazily so ``import sparkvision`` is
cheap on executors.
"""

__version__ = "0.1.0"

from sparkvision.spark.session import get_spark  # noqa: E402

__all__ = ["__version__", "get_spark"]
