"""Training and prediction with executors in separate JVMs (local-cluster), through the real CLI.

A subprocess keeps this master apart from the test session's shared local[2] SparkSession.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster

CLI = [sys.executable, "-m", "sparkvision.cli"]


def run_cli(*args: str, timeout: int = 400) -> dict:
    env = {**os.environ, "SPARKVISION_PROGRESS": "0"}
    p = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_train_and_predict_on_local_cluster(tiny_table, tmp_path):
    master = "local-cluster[2,1,1024]"
    out = str(tmp_path / "m")
    s = run_cli(
        "train",
        "--table",
        tiny_table,
        "--out",
        out,
        "--epochs",
        "5",
        "--workers",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.003",
        "--augment",
        "none",
        "--model-kwargs",
        '{"widths": [8, 16], "hidden": 32, "dropout": 0.0}',
        "--master",
        master,
    )
    assert s["workers"] == 2 and s["threads_per_rank"] == 1
    assert s["test_acc"] >= 0.75, s
    p = run_cli("predict", out, tiny_table, str(tmp_path / "pred"), "--split", "test", "--master", master)
    assert p["rows"] == 32 and p["errors"] == 0 and p["accuracy_on_labelled_rows"] >= 0.75
