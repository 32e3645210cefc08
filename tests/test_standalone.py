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

import pyarrow.parquet as pq
import pytest
from conftest import write_image_folder

pytestmark = pytest.mark.cluster


def driver_env(**extra: str) -> dict[str, str]:
    # SPARK_LOCAL_IP: the driver listens on loopback like the cluster, not on the host's address.
    env = {
        **os.environ,
        "SPARKVISION_PROGRESS": "0",
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    env.update(extra)
    return env


# The user flow as one application: a driver process that runs the five operations through the
# Python API on one SparkSession (the CLI's path on the cluster is the same operation; the recovery
# and bare-Python tests drive the CLI itself). One application, not five: each costs a driver JVM,
# two executor JVMs and their Python workers, about 50 s on this 2-core machine.
FLOW = textwrap.dedent(
    """
    import json, os, sys
    from sparkvision import api

    master, src, table, model, pred, feat = sys.argv[1:]
    spark = api.get_spark(master)
    out = {"ingest": api.ingest(spark, source=src, table=table)}
    out["train"] = api.train(
        spark, table=table, out=model, epochs=4, workers=2, batch_size=16, lr=0.003, augment="none",
        model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.0},
    )
    out["evaluate"] = api.evaluate(spark, model_dir=model, table=table, split="test")
    out["predict"] = api.predict(spark, model_dir=model, table=table, out=pred, split="test")
    out["embed"] = api.embed(spark, model_dir=model, table=table, out=feat)
    # Where the tasks ran: which interpreter, in which process and working directory.
    probe = spark.sparkContext.parallelize(range(8), 8)
    out["tasks"] = sorted(set(probe.map(lambda _: (sys.executable, os.getpid(), os.getcwd())).collect()))
    print(json.dumps(out, default=str))
    spark.stop()
    """
)


def test_ingest_train_evaluate_predict_embed(standalone_cluster, tmp_path):
    """The whole user flow against ``spark://``: 2 DDP ranks, one on each 1-core worker (a barrier
    stage of 2 tasks needs both workers' only slot)."""
    cluster = standalone_cluster
    assert cluster.master_url.startswith("spark://127.0.0.1:")
    assert cluster.state()["aliveworkers"] == 2
    src = tmp_path / "images"
    for split, n, seed in (("train", 12, 0), ("test", 6, 10_000)):
        write_image_folder(src / split, {"a": n, "b": n, "c": n, "d": n}, start_seed=seed)
    paths = [str(tmp_path / name) for name in ("table", "model", "pred", "feat")]
    p = subprocess.run(
        [sys.executable, "-c", FLOW, standalone_cluster.master_url, str(src), *paths],
        capture_output=True,
        text=True,
        timeout=500,
        env=driver_env(),
    )
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    ingested, trained = out["ingest"], out["train"]
    assert ingested["rows_by_split"] == {"test": 24, "train": 48} and ingested["rejects_by_reason"] == {}
    assert trained["workers"] == 2 and trained["threads_per_rank"] == 1 and trained["restarts"] == 0
    assert trained["test_acc"] >= 0.75, trained
    evaluated, predicted, embedded = out["evaluate"], out["predict"], out["embed"]
    assert evaluated["rows"] == 24 and evaluated["accuracy"] >= 0.75, evaluated
    assert predicted["rows"] == 24 and predicted["errors"] == 0, predicted
    assert predicted["accuracy_on_labelled_rows"] >= 0.75, predicted
    assert embedded["rows"] == 72 and embedded["errors"] == 0 and embedded["dim"] == 32, embedded
    # What the executors wrote is there for anyone to read, one row per input row.
    assert pq.read_table(tmp_path / "pred").num_rows == 24
    feats = pq.read_table(tmp_path / "feat")
    assert feats.num_rows == 72 and len(feats.column("path").unique()) == 72
    # The tasks ran the driver's interpreter (PYSPARK_PYTHON) in each worker's own work dir
    # (work/<app>/<executor>), never the driver's.
    tasks = out["tasks"]
    assert {exe for exe, _, _ in tasks} == {sys.executable}
    work_dirs = {os.path.dirname(os.path.dirname(cwd)) for _, _, cwd in tasks}
    assert work_dirs == {str(w) for w in cluster.work_dirs}
    cluster.wait_no_executors()  # the application ended: the workers stop its executors


# --ship-env: the executors get the driver's environment from the archive alone. The driver says
# PYSPARK_PYTHON=/usr/bin/python3, a system Python without torch, pyarrow or sparkvision, as on a
# node that never saw the driver's venv. Packing goes to the user's cache ($SPARKVISION_CACHE or
# ~/.cache/sparkvision/envs), so a machine packs once for as long as its environment stays the same.
BARE_PYTHON = "/usr/bin/python3"

SHIPPED = textwrap.dedent(
    """
    import json, sys
    from sparkvision.spark.session import get_spark

    # One executor: each one copies and unpacks the whole environment, and one shows it.
    spark = get_spark(sys.argv[1], {"spark.cores.max": "1"}, ship_env=True)

    def where(_):
        import os, sys, torch, sparkvision.data.ingest
        x = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3)).sum().item()
        return [sys.executable, sys.prefix, os.getcwd(), os.path.abspath(sparkvision.__file__), x]

    print(json.dumps(spark.sparkContext.parallelize(range(2), 2).map(where).collect()))
    spark.stop()
    """
)


def run_bare(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """A driver whose executors are told to run the bare system Python."""
    assert os.path.exists(BARE_PYTHON), f"this test needs a system Python at {BARE_PYTHON}"
    bare = subprocess.run([BARE_PYTHON, "-c", "import torch"], capture_output=True)
    assert bare.returncode != 0, f"{BARE_PYTHON} has torch: it cannot stand for a bare node"
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=driver_env(PYSPARK_PYTHON=BARE_PYTHON),
    )


# slow (make test-all, not CI's make test): see the README's "Tests" paragraph.
@pytest.mark.slow
def test_without_ship_env_a_bare_executor_python_fails_in_one_line(standalone_cluster, tmp_path):
    src = write_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    master = ["--master", standalone_cluster.master_url]
    once = ["--conf", "spark.task.maxFailures=1"]  # the same failure four times says nothing more
    p = run_bare(
        ["-m", "sparkvision.cli", "ingest", str(src), str(tmp_path / "t"), *master, *once], timeout=300
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "cannot import" in error[0] and "--ship-env" in error[0], p.stderr[-3000:]


# Packing, then Spark copying and unpacking the archive on the driver and on the executor, moves
# about 35 GB on disk for this 5.8 GB CUDA torch environment: 2 minutes on a quiet machine, 5 in a
# loaded CI run, a quarter of CI's budget for one test. So it is `slow`: `make test-all` runs it,
# `make test` (CI) does not; tests/test_ship_env.py checks what the archive holds in seconds.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ship_env_runs_executors_on_the_packed_environment(standalone_cluster):
    """The driver asks for the bare Python, and --ship-env's archives override it: the tasks run
    the packed interpreter and import torch and sparkvision from their executor's directory."""
    p = run_bare(["-c", SHIPPED, standalone_cluster.master_url], timeout=850)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sparkvision: shipping the Python environment" in p.stderr
    tasks = json.loads(p.stdout.strip().splitlines()[-1])
    work_dirs = [str(w) for w in standalone_cluster.work_dirs]
    python = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for executable, prefix, cwd, package, conv in tasks:
        assert any(cwd.startswith(w) for w in work_dirs), cwd  # an executor's working directory
        assert executable == os.path.join(cwd, "environment", "bin", python)
        assert prefix == os.path.join(cwd, "environment")  # a Python of its own, not the driver's venv
        assert package == os.path.join(cwd, "sparkvision", "__init__.py")  # not the editable source
        assert conv == 36.0
    standalone_cluster.clean_apps()  # the executor unpacked gigabytes
