"""The one place a SparkSession is built.

Every command (CLI, web, Python API) goes through :func:`get_spark`, so the same code runs on
``local[*]``, ``local-cluster[...]``, ``spark://``, ``yarn`` and ``k8s://`` masters, and as a Spark
Connect client (``remote="sc://host:port"``). The defaults suit a single machine; every one of
them can be overridden with ``--conf key=value``.

Executors run Python too. On a local master they share this machine, so they are pointed at this
interpreter (the venv that ran the command). On a cluster they are not: either the cluster's nodes
have the package installed (a container image, a bootstrap script), or ``ship_env=True`` packs
this environment and ships it with ``spark.archives`` (see :mod:`sparkvision.spark.shipenv`).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import cast

from pyspark.sql import SparkSession

from sparkvision.errors import ParamError

ENV_MASTER = "SPARKVISION_MASTER"
ENV_REMOTE = "SPARK_REMOTE"  # pyspark's own variable for a Spark Connect server
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


def is_local(master: str) -> bool:
    """Whether every executor runs on this machine (and so can use this interpreter and paths)."""
    return master == "local" or master.startswith(("local[", "local-cluster["))


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect client session (no SparkContext, no RDDs, no JVM)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


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
        # Barrier training stages hold every slot: when too few are free, Spark re-checks every 5 s
        # and gives up after 6 tries (30 s) instead of waiting forever; a relaunch after a lost
        # executor (train/driver.py) keeps asking until the executors are back.
        "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "5s",
        "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "6",
        "spark.sql.parquet.compression.codec": "zstd",
    }
    if is_local(master):
        # Same interpreter for driver and workers, so the venv that ran the CLI runs the tasks. Only
        # here: on a cluster this path need not exist on the nodes (see ship_env).
        conf["spark.pyspark.python"] = sys.executable
        conf["spark.pyspark.driver.python"] = sys.executable
        conf["spark.driver.memory"] = os.environ.get("SPARKVISION_DRIVER_MEMORY", "4g")
    if master.startswith("local-cluster"):
        # Executors are separate JVMs: they need the package on their PYTHONPATH like on a cluster.
        conf["spark.executorEnv.PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return conf


# Settings a Spark Connect client may set on its session (the server owns the static ones).
CONNECT_CONF = (
    "spark.sql.execution.arrow.pyspark.enabled",
    "spark.sql.execution.arrow.maxRecordsPerBatch",
    "spark.sql.shuffle.partitions",
    "spark.sql.adaptive.enabled",
    "spark.sql.parquet.compression.codec",
)


def active_session() -> SparkSession | None:
    """The session this process already runs, classic or Spark Connect."""
    active = SparkSession.getActiveSession()
    if active is None:
        from pyspark.sql.connect.session import SparkSession as ConnectSession

        active = cast(SparkSession | None, ConnectSession.getActiveSession())
    return active


def get_spark(
    master: str | None = None,
    conf: Mapping[str, str] | None = None,
    app_name: str = "sparkvision",
    remote: str | None = None,
    ship_env: bool = False,
) -> SparkSession:
    """Build (or reuse) the SparkSession for this process.

    ``master`` falls back to ``$SPARKVISION_MASTER`` and then to ``local[*]``. ``remote``
    (``sc://host:port``, or ``$SPARK_REMOTE``) makes a Spark Connect client instead; the server
    then owns the master and the static settings. ``conf`` overrides the defaults key by key.
    ``ship_env`` packs this Python environment and ships it to the executors (a cluster whose
    nodes lack the package). A session already running is reused only where it agrees with what
    is asked: runtime settings are applied to it, and a different master or a different static
    setting is an error naming it (a process has one SparkContext), never silently ignored.
    """
    active = active_session()
    if active is not None:
        reuse(active, master, conf or {})
        return active
    remote = remote or os.environ.get(ENV_REMOTE)
    if remote:
        if master:
            raise ParamError("remote", "give a Spark Connect server or a master, not both")
        if ship_env:
            raise ParamError(
                "ship_env", "a Spark Connect server runs its own Python; install the package there"
            )
        return connect_session(remote, conf or {}, app_name)
    master = resolve_master(master)
    settings = default_conf(master)
    shipped: dict[str, str] = {}
    if ship_env:
        if is_local(master):
            raise ParamError(
                "ship_env", f"{master} runs this machine's Python already; --ship-env is for clusters"
            )
        from sparkvision.spark.shipenv import ship_env_conf

        shipped = ship_env_conf()
        settings.update(shipped)
    settings.update(conf or {})
    user_archives = (conf or {}).get("spark.archives")
    if shipped.get("spark.archives") and user_archives:  # the user's archives travel too
        settings["spark.archives"] = f"{shipped['spark.archives']},{user_archives}"
    # pyspark takes the workers' Python from this variable only (SparkContext.pythonExec), not from
    # spark.pyspark.python: without it local tasks run a system python that lacks our packages.
    if "spark.pyspark.python" in settings:
        os.environ.setdefault("PYSPARK_PYTHON", settings["spark.pyspark.python"])
    if ship_env:  # the shipped environment's interpreter, unpacked beside each executor
        os.environ["PYSPARK_PYTHON"] = settings["spark.pyspark.python"]
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARKVISION_LOG_LEVEL", "ERROR"))
    return spark


def connect_session(remote: str, conf: Mapping[str, str], app_name: str) -> SparkSession:
    """A Spark Connect client on ``remote``, with sparkvision's runtime defaults applied."""
    if not remote.startswith("sc://"):
        raise ParamError("remote", f"{remote!r} is not a Spark Connect URL (sc://host:port)")
    check_reachable(remote)
    try:
        builder = SparkSession.builder.remote(remote).appName(app_name)
    except ImportError as e:  # grpcio & co. are the `connect` extra of pyspark
        raise ParamError("remote", f"the Spark Connect client needs pyspark[connect]: {e}") from None
    spark = builder.getOrCreate()
    defaults = default_conf("connect")
    settings = {k: defaults[k] for k in CONNECT_CONF if k in defaults}
    settings.update(conf)
    for key, value in settings.items():
        if key in conf and not spark.conf.isModifiable(key) and spark.conf.get(key, None) != value:
            raise ParamError(
                "conf",
                f"{key} is fixed by the Spark Connect server; set it with start-connect-server.sh --conf",
            )
        spark.conf.set(key, value)
    return spark


def check_reachable(remote: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at the Connect URL: the client itself
    would retry for minutes before saying anything."""
    hostport = remote[len("sc://") :].split("/", 1)[0].split(";", 1)[0]
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "15002")
    try:
        with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ParamError("remote", f"no Spark Connect server answers at {hostport}: {e}") from None


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
    active = active_session()
    if active is not None:
        active.stop()
