"""Recovery on a real standalone cluster (tests/standalone.py): a training run whose executor is
SIGKILLed finishes by itself (and with --max-restarts 0 ends in one line), and a predict whose
driver was killed writes each row once when re-run (on local[2]: see that test).

Spark does not retry a failed barrier stage; sparkvision's training driver relaunches the job and
every rank resumes from the last checkpoint (sparkvision/train/driver.py). The drivers are CLI
subprocesses, as for a user; the executors run the driver's interpreter (``PYSPARK_PYTHON``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import write_image_folder, write_tiny_model

pytestmark = pytest.mark.cluster

CLI = [sys.executable, "-m", "sparkvision.cli"]
EPOCHS = 6
KILL_AFTER = 3  # epochs checkpointed before an executor is killed


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory) -> str:
    """4 classes of 16x16 images, 800 training rows: a few seconds an epoch on 1-core ranks, so
    there is time to kill an executor mid-run."""
    from sparkvision.data.ingest import ingest

    root = tmp_path_factory.mktemp("recovery_images")
    write_image_folder(root / "train", {k: 200 for k in "abcd"}, start_seed=0)
    write_image_folder(root / "test", {k: 25 for k in "abcd"}, start_seed=50_000)
    out = str(tmp_path_factory.mktemp("recovery_tables") / "t")
    ingest(spark, str(root), out)
    return out


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "SPARKVISION_PROGRESS": "0", "PYSPARK_PYTHON": sys.executable}
    return subprocess.Popen(
        [*CLI, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def train(table: str, out: Path, master: str) -> subprocess.Popen:
    return cli(
        "train",
        "--table",
        table,
        "--out",
        str(out),
        "--epochs",
        str(EPOCHS),
        "--workers",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.003",
        "--augment",
        "none",
        "--seed",
        "7",
        "--master",
        master,
    )


def finish(p: subprocess.Popen, timeout: float = 400) -> tuple[dict, str]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:] + out[-2000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def calm(standalone_cluster, table, tmp_path_factory) -> tuple[dict, Path]:
    """An undisturbed run (its summary and model directory): the reference for the killed one."""
    out = tmp_path_factory.mktemp("calm") / "m"
    summary, _ = finish(train(table, out, standalone_cluster.master_url))
    assert summary["restarts"] == 0 and summary["resumed_from_epoch"] == 0
    return summary, out


# slow (make test-all, not CI's make test): see the README's "Tests" paragraph.
@pytest.mark.slow
def test_training_survives_a_killed_executor(standalone_cluster, table, calm, tmp_path):
    cluster = standalone_cluster
    calm_summary = calm[0]

    p = train(table, tmp_path / "hit", cluster.master_url)
    # A checkpoint is whole once its JSON lands, after its tensors (train/checkpoint.py); a kill
    # between the two rightly resumes from the one before.
    marker = tmp_path / "hit" / "checkpoints" / f"epoch-{KILL_AFTER}.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of epoch 3"
        time.sleep(0.05)
    victims = cluster.executor_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)

    hit, err = finish(p)
    # One kill, one relaunch; once (CI of 2026-12-01, under load) a second loss followed the first
    # relaunch and the run still recovered. Allowed, and the log naming each loss is printed.
    assert hit["restarts"] in (1, 2), err[-4000:]
    if hit["restarts"] == 2:
        print(err[-4000:])
    assert KILL_AFTER <= hit["resumed_from_epoch"] < EPOCHS, hit
    assert hit["epochs"] == EPOCHS and [h["epoch"] for h in hit["history"]] == list(range(1, EPOCHS + 1))
    assert abs(hit["test_acc"] - calm_summary["test_acc"]) <= 0.01, (
        hit["test_acc"],
        calm_summary["test_acc"],
    )
    # One line says what was lost and where the run resumed; no Python traceback reaches the user.
    recovered = [line for line in err.splitlines() if line.startswith("train: recovered from executor")]
    assert len(recovered) == 1 and "resumed from the checkpoint of epoch" in recovered[0], err[-3000:]
    assert "Traceback" not in err
    rows = [json.loads(r) for r in (tmp_path / "hit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))


# slow (make test-all, not CI's make test): see the README's "Tests" paragraph.
@pytest.mark.slow
def test_exhausted_restarts_are_one_line(standalone_cluster, table, tmp_path):
    """With --max-restarts 0 a killed executor ends the run with one line saying how to resume."""
    cluster = standalone_cluster
    out = tmp_path / "m"
    p = cli(
        "train",
        "--table",
        table,
        "--out",
        str(out),
        "--epochs",
        "20",
        "--workers",
        "2",
        "--augment",
        "none",
        "--max-restarts",
        "0",
        "--master",
        cluster.master_url,
    )
    marker = out / "checkpoints" / "epoch-1.safetensors"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(cluster.executor_pids()[0], signal.SIGKILL)
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    line = json.loads(stdout.strip().splitlines()[-1])["error"]
    assert "executor" in line and "--resume" in line and "\n" not in line, line
    assert "Traceback" not in err
    cluster.wait_no_executors()


def test_predict_rerun_after_a_killed_driver_writes_each_row_once(spark, table, tmp_path):
    """A predict whose driver dies mid-write leaves nothing where the user looks; the re-run writes
    each row once. Its driver runs ``local[2]``: what is tested is the driver's staged output and
    commit (ops/paths.py), the same on any master, and a standalone application's two executor
    JVMs cost this test two thirds of its time (CI's budget); the executor-loss tests above keep
    the cluster. The killed predict is a CLI process; the re-run goes through the Python API on
    the test session's own Spark session (the same operation; a second cold driver cost ~40 s)."""
    from sparkvision import api

    model = write_tiny_model(tmp_path / "m", ["a", "b", "c", "d"])
    out = tmp_path / "pred"
    local = ("--master", "local[2]")
    p = cli("predict", model, table, str(out), *local)
    deadline = time.monotonic() + 300
    while not any(tmp_path.glob("pred._sparkvision-tmp-*")):  # the staged output is being written
        assert p.poll() is None, "predict ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.kill()
    p.wait()
    assert not out.exists()  # nothing half-written where the user looks

    summary = api.predict(spark, model_dir=model, table=table, out=str(out))
    ids = ds.dataset(str(out), format="parquet").to_table(columns=["path"]).column("path").to_pylist()
    assert len(ids) == len(set(ids)) == 900 == summary["rows"]
