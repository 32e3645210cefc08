"""sparkvision on a real Spark standalone cluster (tests/standalone.py: a master and two 1-core
workers started with ``spark-class`` from the pyspark installation), through the CLI as a user runs it.

The driver is a subprocess, as for a user: one Python process holds one SparkContext, and the test
session's own ``local[2]`` session must stay untouched. sparkvision points executors at the driver's
interpreter only on local masters, so without ``--ship-env`` the driver tells them which Python to
run with ``PYSPARK_PYTHON`` (a cluster whose nodes have the same venv at the same path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cluster

# A driver that starts an application, reports once both executors run, waits for the test to look
# at them, then reports which interpreter and process each task ran in.
PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master(sys.argv[1]).appName("probe").getOrCreate()
    sc = spark.sparkContext
    deadline = time.time() + 120
    while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < 2 and time.time() < deadline:
        time.sleep(0.2)
    print("ready", flush=True)
    sys.stdin.readline()
    seen = sc.parallelize(range(8), 8).map(lambda _: (sys.executable, os.getpid(), os.getcwd())).collect()
    print(json.dumps({"app": sc.applicationId, "tasks": sorted(set(seen))}), flush=True)
    spark.stop()
    """
)


def driver_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "SPARKVISION_PROGRESS": "0", "PYSPARK_PYTHON": sys.executable}
    env.update(extra)
    return env


def test_cluster_runs_an_application_on_both_workers(standalone_cluster):
    cluster = standalone_cluster
    assert cluster.master_url.startswith("spark://127.0.0.1:")
    assert cluster.state()["aliveworkers"] == 2
    p = subprocess.Popen(
        [sys.executable, "-c", PROBE, cluster.master_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=driver_env(),
    )
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
        executors = cluster.executor_pids()
        assert len(executors) == 2, executors
        out, err = p.communicate("go\n", timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    tasks = report["tasks"]
    assert {exe for exe, _, _ in tasks} == {sys.executable}
    # The tasks ran in each worker's own work dir (work/<app>/<executor>), never the driver's.
    work_dirs = {os.path.dirname(os.path.dirname(cwd)) for _, _, cwd in tasks}
    assert work_dirs == {str(w) for w in cluster.work_dirs}
    cluster.wait_no_executors()  # the application ended: the workers stop its executors
