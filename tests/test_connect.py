"""The commands as a Spark Connect client (``--remote sc://...``), against the Connect server that
ships with pyspark (tests/connect_server.py).

The client runs in subprocesses (CLI commands, and the Python API for the inference operations):
a Connect client and this test session's classic SparkSession cannot share one process. The web runner's cancel and progress over Connect (query
tags, the server's progress reports) run in a subprocess too: this file, run as a script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image_folder, write_tiny_model

from sparkvision.data.globs import glob_matcher
from sparkvision.inference.modelref import PathModel
from sparkvision.inference.runtime import read_blob
from sparkvision.models.modeldir import WEIGHTS

pytestmark = pytest.mark.connect

CLI = [sys.executable, "-m", "sparkvision.cli"]
CNN = '{"widths": [8, 16], "hidden": 32, "dropout": 0.0}'


def run_cli(*args: str, timeout: int = 300) -> dict:
    env = {**os.environ, "SPARKVISION_PROGRESS": "0"}
    env.pop("SPARKVISION_MASTER", None)
    p = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# slow (make test-all, not CI's make test): see the README's "Tests" paragraph.
@pytest.mark.slow
def test_ingest_train_evaluate_predict_embed_over_connect(connect_server, tmp_path):
    remote = ("--remote", connect_server.url)
    images = tmp_path / "images"
    for split, n, seed in (("train", 8, 0), ("test", 4, 1000)):
        write_image_folder(images / split, {k: n for k in "abcd"}, start_seed=seed)
    table, model = str(tmp_path / "table"), str(tmp_path / "model")

    ing = run_cli("ingest", str(images), table, *remote)
    assert ing["rows_written"] == 48 and ing["rows_by_split"] == {"train": 32, "test": 16}, ing
    assert ing["class_names"] == ["a", "b", "c", "d"] and ing["rejects_by_reason"] == {}
    assert os.path.exists(os.path.join(table, "_sparkvision.json"))  # written through pyarrow.fs

    # Training: a barrier mapInArrow with allGather, over Connect.
    tr = run_cli(
        "train", "--table", table, "--out", model, "--workers", "2", "--epochs", "1", "--batch-size", "16",
        "--augment", "none", "--model-kwargs", CNN, *remote,
    )  # fmt: skip
    assert tr["workers"] == 2 and tr["train_rows"] == 32 and len(tr["history"]) == 1, tr
    assert os.path.exists(os.path.join(model, "model.safetensors"))

    # The three inference operations in one client process through the Python API (the CLI's own
    # --remote path ran above; a client process is a second of CPU-bound imports on this machine):
    # one server-side session, whose Python workers stay up with torch imported and the model loaded.
    p = subprocess.run(
        [sys.executable, "-c", INFER, connect_server.url, model, table, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "SPARKVISION_MASTER"},
    )
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    ev, pr, em = json.loads(p.stdout.strip().splitlines()[-1])
    assert ev["rows"] == 16 and ev["split"] == "test" and 0.0 <= ev["accuracy"] <= 1.0, ev
    assert len(ev["confusion_matrix"]) == 4

    # Inference: the executors read the model directory by its path (no broadcast over Connect).
    assert pr["rows"] == 48 and pr["errors"] == 0, pr
    preds = pq.read_table(str(tmp_path / "preds"))
    assert preds.num_rows == 48
    assert {"content_id", "pred_label", "pred_name", "confidence", "topk_probs"} <= set(preds.column_names)
    assert set(preds.column("pred_name").to_pylist()) <= {"a", "b", "c", "d"}

    assert em["rows"] == 48 and em["errors"] == 0 and em["dim"] == 32, em
    emb = pq.read_table(str(tmp_path / "emb"), columns=["content_id", "embedding"])
    assert emb.num_rows == 48 and all(len(v) == 32 for v in emb.column("embedding").to_pylist())


INFER = """
import json, os, sys
from sparkvision import api

url, model, table, tmp = sys.argv[1:]
spark = api.get_spark(remote=url)
ev = api.evaluate(spark, model_dir=model, table=table)
pr = api.predict(spark, model_dir=model, table=table, out=os.path.join(tmp, "preds"))
em = api.embed(spark, model_dir=model, table=table, out=os.path.join(tmp, "emb"))
print(json.dumps([ev, pr, em], default=str))
"""


def test_web_runner_cancels_and_follows_a_job_over_connect(connect_server, tmp_path):
    """The web runner tags a job's queries, follows its tasks and interrupts it by its tag."""
    p = subprocess.run(
        [sys.executable, __file__, connect_server.url, str(tmp_path / "jobs.db")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "SPARKVISION_PROGRESS": "0"},
    )
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["progress_while_running"] >= 49, got  # 2 of its 4 tasks done: from the server's reports
    assert got["state"] == "cancelled" and got["cancel_s"] < 20, got


def test_path_model_reads_the_weights_once_and_names_what_is_wrong(tmp_path):
    """What an executor does over Connect: read the weights by path once, checked against the driver's digest."""
    d = write_tiny_model(tmp_path / "m", ["a", "b"])
    blob = read_blob(d)
    ref = PathModel(d, blob.key, blob.spec, blob.preprocess, blob.class_names)
    assert ref.value.weights == blob.weights and ref.value.class_names == ["a", "b"]
    os.rename(os.path.join(d, WEIGHTS), os.path.join(d, "moved"))
    assert ref.value.key == blob.key  # kept by the worker: not read again
    gone = PathModel(str(tmp_path / "elsewhere"), "0" * 40, blob.spec, blob.preprocess, blob.class_names)
    with pytest.raises(FileNotFoundError, match="executors cannot read model.safetensors"):
        _ = gone.value
    other = PathModel(write_tiny_model(tmp_path / "m2", ["a", "b", "c"]), "1" * 40, {}, {}, [])
    with pytest.raises(ValueError, match="changed while the job ran"):
        _ = other.value


GLOBS = ["*.png", "*.{png,jpg}", "im?.png", "[ab]*", "[!ab]*", "a\\*b", "{a,b{c,d}}.x", "*.(png)", "x+y$"]
NAMES = ["a.png", "a.jpg", "img.png", "im.png", "b.gif", "c.gif", "a*b", "axb", "a.x", "bd.x", "be.x"]
NAMES += ["x.(png)", "x.png", "x+y$", "xxy"]


def test_glob_port_matches_hadoop(spark):
    """Over Connect the ingest glob is matched in Python: the same answers as Hadoop's GlobPattern."""
    jvm = spark.sparkContext._jvm
    for glob in GLOBS:
        pattern = jvm.org.apache.hadoop.fs.GlobPattern(glob)
        ours = glob_matcher(glob)
        for name in NAMES:
            assert ours(name) == bool(pattern.matches(name)), (glob, name)


# ------------------------------------------------------------------ run as a script: the web runner


def sleep_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Rows with id >= 2 sleep a minute; the others return at once."""
    for b in batches:
        if any(v >= 2 for v in b.column("id").to_pylist()):
            time.sleep(60)
        yield b


def _cancel_over_connect(url: str, db: str) -> dict:
    from sparkvision.ops.base import Params
    from sparkvision.spark.session import get_spark
    from sparkvision.web.jobs import JobStore
    from sparkvision.web.kinds import KINDS, Kind
    from sparkvision.web.runner import Runner

    class SleepParams(Params):
        parts: int = 4

    def run_sleep(spark_, p, progress):
        spark_.range(0, p.parts, 1, p.parts).mapInArrow(sleep_batches, "id long").collect()
        return {}

    KINDS["sleep"] = Kind("sleep", SleepParams, run_sleep, "Sleep in a Spark job.")
    spark = get_spark(remote=url)
    store = JobStore(f"sqlite:///{db}")
    runner = Runner(store, lambda: spark, poll_s=0.2)
    runner.start()
    job = store.create("sleep", {"parts": 4})
    runner.wake()
    seen = 0.0
    deadline = time.time() + 120
    while time.time() < deadline and seen < 49:
        j = store.get(job.id)
        assert j is not None and j.state in ("queued", "running"), j and j.to_json()
        seen = max(seen, j.progress or 0.0)
        time.sleep(0.2)
    t0 = time.time()
    runner.cancel(job.id)
    while time.time() - t0 < 60:
        j = store.get(job.id)
        assert j is not None
        if j.state not in ("queued", "running"):
            break
        time.sleep(0.2)
    runner.stop()
    return {"state": j.state, "cancel_s": round(time.time() - t0, 2), "progress_while_running": seen}


if __name__ == "__main__":
    print(json.dumps(_cancel_over_connect(sys.argv[1], sys.argv[2])))
