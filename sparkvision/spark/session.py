"""The one place a SparkSession is built.

Every command (CLI, web, Python API) goes through :func:`get_spark`, so the same code runs on
``local[*]``, ``local-cluster[...]``, ``spark://``, ``yarn`` and ``k8s://`` masters. The defaults
suit a single machine; every one of them can be overridden with ``--conf key=value``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping

from pyspark.sql import SparkSession

from sparkvision.errors import ParamError

ENV_MASTER = "SPARKVISION_MASTER"
DEFAULT_MASTER = "local[*]"


def parse_conf(pairs: Iterable[str]) -> dict[str, str]:
    """Turn ``["k=v", ...]`` (the CLI's repeated ``--conf``) into the ``conf`` dict of :func:`get_spark`,
    naming any malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParamError("conf", f"{pair!r} is not of the form key=value (e.g. spark.executor.memory=4g)")
        out[key.strip()] = value.strip()
    return out


def resolve_master(master: str | None = None) -> str:
    return master or os.environ.get(ENV_MASTER) or DEFAULT_MASTER


def cores_of_master(master: str) -> int:
    """Total task slots a master gives on this machine, used to size shuffle partitions."""
    m = re.fullmatch(r"local\[(\*|\d+)(?:,\s*\d+)?\]", master)
    if m:
        return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    m = re.fullmatch(r"local-cluster\[(\d+),\s*(\d+),\s*\d+\]", master)
    if m:
        return int(m.group(1)) * int(m.group(2))
    if master == "local":
        return 1
    return os.cpu_count() or 1


def default_conf(master: str) -> dict[str, str]:
    """Defaults that suit one machine; a real cluster's spark-defaults or --conf take precedence."""
    cores = cores_of_master(master)
    conf = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
        "spark.sql.shuffle.partitions": str(max(2, 2 * cores)),
        "spark.sql.adaptive.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "false",
        # Same interpreter for driver and workers, so the venv that ran the CLI runs the tasks.
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        # Barrier training stages hold every slot; fail fast instead of waiting forever for slots.
        "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "3",
        "spark.sql.parquet.compression.codec": "zstd",
    }
    if master.startswith("local"):
        conf["spark.driver.memory"] = os.environ.get("SPARKVISION_DRIVER_MEMORY", "4g")
    if master.startswith("local-cluster"):
        # Executors are separate JVMs: they need the package on their PYTHONPATH like on a cluster.
        conf["spark.executorEnv.PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return conf


def get_spark(
    master: str | None = None,
    conf: Mapping[str, str] | None = None,
    app_name: str = "sparkvision",
) -> SparkSession:
    """Build (or reuse) the SparkSession for this process.

    ``master`` falls back to ``$SPARKVISION_MASTER`` and then to ``local[*]``. ``conf`` overrides the
    defaults key by key. A session already running is reused only where it agrees with what is
    asked: runtime settings are applied to it, and a different master or a different static
    setting is an error naming it (a process has one SparkContext), never silently ignored.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        reuse(active, master, conf or {})
        return active
    master = resolve_master(master)
    settings = default_conf(master)
    settings.update(conf or {})
    # pyspark takes the workers' Python from this variable only (SparkContext.pythonExec), not from
    # spark.pyspark.python: without it local tasks run a system python that lacks our packages.
    os.environ.setdefault("PYSPARK_PYTHON", settings["spark.pyspark.python"])
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARKVISION_LOG_LEVEL", "ERROR"))
    return spark


def reuse(spark: SparkSession, master: str | None, conf: Mapping[str, str]) -> None:
    """Check that the running ``spark`` can serve a request for ``master`` and ``conf``."""
    running = spark.conf.get("spark.master", None)
    if master is not None and running is not None and master != running:
        raise ValueError(
            f"master: a SparkSession on {running} is already running in this process; "
            f"{master} needs a new process (or stop_spark() first)"
        )
    for key, value in conf.items():
        if spark.conf.get(key, None) == value:
            continue
        if not spark.conf.isModifiable(key):
            raise ValueError(
                f"conf: {key} is fixed when the SparkSession starts and the running one has "
                f"{spark.conf.get(key, None)!r}; set it in a new process"
            )
        spark.conf.set(key, value)


def stop_spark() -> None:
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
