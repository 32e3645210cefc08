"""torch DDP launched on Spark barrier execution.

``run_on_barrier`` repartitions a DataFrame into one partition per rank and runs ``rank_fn`` in a
barrier stage (``mapInArrow(..., barrier=True)``): Spark schedules every rank at once or not at
all, so a rank can never wait for a peer that was never started. Rank 0 picks a free port and
shares it with ``BarrierTaskContext.allGather``; no SSH, MPI or reservation server is involved.
Each rank reads its shard as Arrow batches through Spark's own I/O and returns one small result.

If any rank fails, Spark fails the whole barrier stage and kills the others, so a crash never
leaves peers hanging in an all-reduce; the gloo timeout is a second guard. Spark does not retry a
failed barrier result stage, so a rank lost with its executor or Python worker comes back as
:class:`LostRanks` (told apart from a rank's own error by :func:`lost_reason`): the training driver
(:mod:`sparkvision.train.driver`) relaunches the job, and the ranks resume from the last checkpoint.

The helpers :func:`rank`, :func:`world_size` and :func:`all_reduce_sum` do the right thing outside
a process group (rank 0 of 1), so training code runs unchanged in a single-process unit test.
"""

from __future__ import annotations

import base64
import json
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import pyarrow as pa
import torch
import torch.distributed as dist
from pyspark import BarrierTaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import BinaryType, StructField, StructType

from sparkvision.errors import JobFailed, ParamError
from sparkvision.spark.compat import default_parallelism, master_of
from sparkvision.spark.session import cores_of_master, is_connect

RESULT_SCHEMA = StructType([StructField("result", BinaryType(), True)])


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    threads: int
    device: torch.device
    attempt: int  # > 0 when Spark re-ran the barrier stage after a failure

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier_slots(spark: SparkSession) -> int:
    """How many tasks the cluster can run at once (what a barrier stage may ask for)."""
    master = master_of(spark)
    if master.startswith("local"):
        return cores_of_master(master)
    return default_parallelism(spark)


def plan_threads(spark: SparkSession, workers: int, threads_per_rank: int | None) -> int:
    """Threads per rank = cores per task.

    On one machine (local, local-cluster) the cores are shared out among the ranks; on a cluster
    each task owns ``spark.task.cpus`` cores (set it, e.g. ``--conf spark.task.cpus=8``).
    """
    if threads_per_rank is not None:
        if threads_per_rank < 1:
            raise ValueError(f"threads_per_rank must be >= 1, got {threads_per_rank}")
        return threads_per_rank
    master = master_of(spark)
    if master.startswith("local"):
        return max(1, cores_of_master(master) // workers)
    return max(1, int(cast(str, spark.conf.get("spark.task.cpus", "1"))))  # str: a default is given


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def encode_result(obj: dict[str, Any], blobs: dict[str, bytes] | None = None) -> bytes:
    payload = {"json": obj, "blobs": {k: base64.b64encode(v).decode() for k, v in (blobs or {}).items()}}
    return json.dumps(payload).encode()


def decode_result(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    payload = json.loads(data)
    return payload["json"], {k: base64.b64decode(v) for k, v in payload["blobs"].items()}


def run_on_barrier(
    spark: SparkSession,
    df: DataFrame,
    workers: int,
    rank_fn: Callable[[RankContext, Iterator[pa.RecordBatch], Any], bytes | None],
    payload: Any,
    threads_per_rank: int | None = None,
    repartition: bool = True,
    timeout_s: int = 1800,
) -> bytes:
    """Run ``rank_fn`` on ``workers`` ranks over ``df``'s rows and return rank 0's result bytes.

    ``rank_fn(ctx, batches, payload)`` receives its shard as Arrow batches; the process group is
    initialised before it runs (when ``workers > 1``) and destroyed after. With
    ``repartition=False`` the DataFrame must already have exactly ``workers`` partitions.
    """
    if workers < 1:
        raise ParamError("workers", f"must be >= 1, got {workers}")
    slots = barrier_slots(spark)
    if workers > slots:
        raise ParamError(
            "workers",
            f"{workers} is more than the {slots} task slots of master {master_of(spark)}; "
            "lower it or add executors/cores",
        )
    threads = plan_threads(spark, workers, threads_per_rank)
    if repartition:
        df = df.repartition(workers)
    elif not is_connect(spark) and df.rdd.getNumPartitions() != workers:  # Connect: no RDD to ask
        raise ValueError(f"DataFrame has {df.rdd.getNumPartitions()} partitions, expected workers={workers}")

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ctx = BarrierTaskContext.get()
        r = ctx.partitionId()
        port = _free_port() if r == 0 else 0
        infos = ctx.getTaskInfos()
        host = infos[0].address.split(":")[0]
        ports = ctx.allGather(str(port))
        master_port = int(ports[0])
        # The rank's share of the cores, set on this process's torch (not through the environment,
        # which torch reads only at start-up and a reused Python worker would carry into its next task).
        torch.set_num_threads(threads)
        device = torch.device("cpu")
        if torch.cuda.is_available():
            gpus = ctx.resources().get("gpu")  # the GPU Spark assigned to this task, if any
            device = torch.device("cuda", int(gpus.addresses[0]) if gpus and gpus.addresses else 0)
            torch.cuda.set_device(device)
        rc = RankContext(r, workers, threads, device, ctx.attemptNumber())
        if workers > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend,
                init_method=f"tcp://{host}:{master_port}",
                rank=r,
                world_size=workers,
                timeout=timedelta(seconds=timeout_s),
            )
        try:
            out = rank_fn(rc, batches, payload)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if r == 0:
            yield pa.RecordBatch.from_pydict({"result": [out]}, schema=pa.schema([("result", pa.binary())]))

    try:
        rows = df.mapInArrow(task, RESULT_SCHEMA, barrier=True).collect()  # one small row, from rank 0
    except Exception as e:  # noqa: BLE001 - re-raised with the rank's own error message
        err = rank_error(e)
        lost = lost_reason(str(e)) if not isinstance(err, tuple(_PY_ERRORS.values())) else None
        if lost is not None:
            raise LostRanks(lost) from None
        raise err from None
    results = [r.result for r in rows if r.result is not None]
    if not results:
        raise RuntimeError("rank 0 returned no result")
    return results[0]


class LostRanks(RuntimeError):
    """A rank's executor or Python worker died, or too few slots came back to run every rank: not
    the rank's own error, so running the job again can succeed. ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def slots_short(self) -> bool:
        """The cluster had fewer free slots than ranks (executors not back yet): nothing ran."""
        return self.reason.startswith("too few task slots")


# What Spark and gloo say when a rank is lost to its process rather than to its own error.
_LOST = [
    (
        re.compile(r"ExecutorLostFailure \(executor (\S+) exited[^)]*\)(?: Reason: ([^\n]*))?"),
        "executor {0} lost ({1})",
    ),
    (re.compile(r"Python worker exited unexpectedly \(crashed\)"), "a rank's Python worker crashed"),
    (re.compile(r"[Ee]xecutor (\S+) (?:lost|exited|removed)[^\n]*"), "executor {0} lost"),
    (re.compile(r"Connection (?:closed|reset) by peer"), "a peer rank's connection dropped"),
    (
        re.compile(r"BARRIER_JOB_SLOTS_NUMBER_CHECK_FAILED|requires more slots than the total number"),
        "too few task slots",
    ),
    (re.compile(r"Worker (\S+) (?:lost|removed)"), "worker {0} lost"),
]


def lost_reason(text: str) -> str | None:
    """One line saying which process was lost, when ``text`` (a failed job's error) shows a rank
    lost to its executor, Python worker or connection; ``None`` for a rank's own error."""
    for pattern, words in _LOST:
        m = pattern.search(text)
        if m:
            groups = [g.strip() if g else "killed" for g in m.groups()]
            return words.format(*groups)
    return None


_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def spark_failure(e: Exception) -> Exception:
    """A failed Spark job as one line the user can act on. An executor whose Python lacks a
    package (a cluster node without sparkvision's environment) names the module and the fix."""
    m = _NO_MODULE.search(str(e))
    if m:
        return JobFailed(
            f"the executors' Python cannot import {m.group(1)}: run with --ship-env, or set "
            "spark.pyspark.python (PYSPARK_PYTHON) to a Python with sparkvision's packages on every node"
        )
    return rank_error(e)


_ERROR_LINE = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception)): ([^\n]+)")
_PY_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


def rank_error(e: Exception) -> Exception:
    """Turn Spark's wrapped Java/Python traceback into the rank's own exception and message.

    A ``ValueError`` raised in a rank (bad data, bad parameter) comes back as a ``ValueError`` so
    the CLI prints one clear line instead of two screens of JVM stack.
    """
    text = str(e)
    found = [(m.group(1).rsplit(".", 1)[-1], m.group(2).strip()) for m in _ERROR_LINE.finditer(text)]
    found = [
        (k, msg)
        for k, msg in found
        if k not in ("Py4JJavaError", "PythonException", "SparkException")
        and not msg.startswith("An error occurred while calling")
    ]
    py = [(k, msg) for k, msg in found if k in _PY_ERRORS]
    kind, msg = (py or found or [("", "")])[-1 if py else 0]
    if not kind:
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return JobFailed(f"distributed run failed: {first}")
    cls = _PY_ERRORS.get(kind)
    return cls(msg) if cls else JobFailed(f"{kind}: {msg}")
