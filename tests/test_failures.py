"""How a failed barrier job is read: a rank lost to its process is retried, a rank's own error is
not, and both reach the user as one line. The texts are what Spark 4 and gloo print."""

from __future__ import annotations

import pytest

from sparkvision.errors import JobFailed
from sparkvision.spark.distributed import LostRanks, lost_reason, rank_error

EXECUTOR_LOST = (
    "An error occurred while calling o134.collectToPython.\n: org.apache.spark.SparkException: Job aborted "
    "due to stage failure: Could not recover from a failed barrier ResultStage. Most recent failure reason: "
    "Stage failed because barrier task ResultTask(3, 1) finished unsuccessfully.\nExecutorLostFailure "
    "(executor 1 exited caused by one of the running tasks) Reason: Command exited with code 137\n\tat org..."
)
WORKER_CRASHED = (
    "Job aborted due to stage failure: ... org.apache.spark.SparkException: Python worker exited "
    "unexpectedly (crashed)\n\tat org.apache.spark.api.python.BasePythonRunner..."
)
PEER_DROPPED = (
    "PythonException: \n  An exception was thrown from the Python worker. Please see the stack trace "
    "below.\nTraceback (most recent call last):\n  ...\nRuntimeError: [../third_party/gloo/gloo/transport/"
    "tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41219"
)
SLOTS = (
    "[BARRIER_JOB_SLOTS_NUMBER_CHECK_FAILED] Barrier execution mode does not allow run a barrier stage "
    "that requires more slots than the total number of slots in the cluster currently."
)
OWN_ERROR = (
    "PythonException: \n  An exception was thrown from the Python worker.\nTraceback (most recent call "
    "last):\n  File ...\nValueError: rank 1 got no training rows: 3 rows for 2 workers\n"
    "RuntimeError: Connection closed by peer"
)
OWN_RUNTIME = (
    "PythonException: \nTraceback (most recent call last):\n  File ...\nRuntimeError: mat1 and mat2 "
    "shapes cannot be multiplied (32x64 and 128x10)"
)


@pytest.mark.parametrize(
    "text, reason",
    [
        (EXECUTOR_LOST, "executor 1 lost (Command exited with code 137)"),
        (WORKER_CRASHED, "a rank's Python worker crashed"),
        (PEER_DROPPED, "a peer rank's connection dropped"),
        (SLOTS, "too few task slots"),
        (OWN_RUNTIME, None),
    ],
)
def test_lost_reason(text, reason):
    assert lost_reason(text) == reason


def test_slots_short_is_waiting_not_a_restart():
    assert LostRanks(lost_reason(SLOTS) or "").slots_short
    assert not LostRanks(lost_reason(EXECUTOR_LOST) or "").slots_short


def test_a_ranks_own_error_wins_and_is_one_line():
    e = rank_error(Exception(OWN_ERROR))
    assert isinstance(e, ValueError) and str(e) == "rank 1 got no training rows: 3 rows for 2 workers"
    runtime = rank_error(Exception(OWN_RUNTIME))
    assert isinstance(runtime, JobFailed) and "\n" not in str(runtime) and "mat1 and mat2" in str(runtime)


def test_an_unreachable_connect_server_is_one_line_in_seconds():
    import socket
    import time

    from sparkvision.errors import ParamError
    from sparkvision.spark.session import check_reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ParamError, match=f"no Spark Connect server answers at 127.0.0.1:{port}"):
        check_reachable(f"sc://127.0.0.1:{port}/;session_id=x")
    assert time.monotonic() - t0 < 6


def test_ship_env_is_refused_on_a_local_master():
    """In a fresh process (this one may hold a session, which get_spark would reuse)."""
    import subprocess
    import sys

    code = (
        "from sparkvision.spark.session import get_spark\n"
        "try:\n    get_spark('local-cluster[2,1,1024]', ship_env=True)\n"
        "except ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ship_env: local-cluster[2,1,1024] runs this machine's Python already"), out
