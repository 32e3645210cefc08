"""What the driver asks of a session, answered for classic Spark and Spark Connect alike.

A Spark Connect client has no SparkContext, RDDs or JVM gateway, so driver code never reaches
for ``spark.sparkContext``; the few facts it needs about the cluster come from here.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import functions as F

from sparkvision.spark.session import cores_of_master, is_connect, is_local


def master_of(spark: Any) -> str:
    """The master URL the session runs on (a Connect client: the server's)."""
    if not is_connect(spark):
        return str(spark.sparkContext.master)
    return str(spark.conf.get("spark.master", "unknown"))


def default_parallelism(spark: Any) -> int:
    """Task slots of the cluster right now (classic: the live count of executor cores).

    A Connect client on a local master counts that master's cores; on a cluster it asks Spark,
    since this machine's cores say nothing about it: ``range`` without a partition count is split
    into the default parallelism (the live executor cores, as classic reports), and the highest
    partition id is read back (a tiny job, no Python).
    """
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    explicit = spark.conf.get("spark.default.parallelism", None)
    if explicit:
        return int(explicit)
    master = master_of(spark)
    if is_local(master):
        return cores_of_master(master)
    row = spark.range(0, 1 << 20).select(F.spark_partition_id().alias("p")).agg(F.max("p")).first()
    return max(1, int(row[0]) + 1) if row is not None and row[0] is not None else cores_of_master(master)
