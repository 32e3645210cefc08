"""What the driver asks of a session, answered for classic Spark and Spark Connect alike.

A Spark Connect client has no SparkContext, RDDs or JVM gateway, so driver code never reaches
for ``spark.sparkContext``; the few facts it needs about the cluster come from here.
"""

from __future__ import annotations

from typing import Any

from sparkvision.spark.session import cores_of_master, is_connect


def master_of(spark: Any) -> str:
    """The master URL the session runs on (a Connect client: the server's)."""
    if not is_connect(spark):
        return str(spark.sparkContext.master)
    return str(spark.conf.get("spark.master", "unknown"))


def default_parallelism(spark: Any) -> int:
    """Task slots of the cluster right now (classic: the live count of executor cores)."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    explicit = spark.conf.get("spark.default.parallelism", None)
    if explicit:
        return int(explicit)
    return cores_of_master(master_of(spark))
