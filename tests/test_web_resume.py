"""A distill job through the web API: interrupted mid-run, the server restarted, resumed, and it
continues from its checkpoint with its epochs shown, because the operation declares itself
resumable and epoch-reporting (no list of kind names in the runner)."""

from __future__ import annotations

import json
import os
import time

from fastapi.testclient import TestClient

from sparkvision.ssl.config import FinetuneConfig
from sparkvision.ssl.finetune import finetune
from sparkvision.web.app import create_app
from sparkvision.web.security import Settings

CNN = {"widths": [8, 16], "hidden": 32, "dropout": 0.0}
EPOCHS = 60  # a tiny epoch takes 0.05-0.3 s: enough of them that the cancel lands mid-run


def wait_for(c, jid, pred, timeout=300):
    t0 = time.time()
    j = None
    while time.time() - t0 < timeout:
        j = c.get(f"/api/jobs/{jid}").json()
        if pred(j):
            return j
        time.sleep(0.2)
    raise AssertionError(f"job {jid} did not get there: {j}")


def test_distill_job_interrupted_resumes_from_its_checkpoint(spark, tiny_table, tmp_path):
    root = os.path.dirname(os.path.dirname(tiny_table))  # holds the table; the jobs write beside it
    teacher = os.path.join(root, "teacher")
    finetune(
        spark,
        tiny_table,
        teacher,
        None,
        FinetuneConfig(label_fraction=0.5, epochs=3, batch_size=16, lr=5e-3, model_kwargs=CNN),
    )
    out = os.path.join(root, "student")
    settings = Settings(data_roots=[root], db_url=f"sqlite:///{tmp_path / 'jobs.db'}", start_runner=True)
    params = {
        "teacher": teacher,
        "table": tiny_table,
        "out": out,
        "unlabeled_split": "train",
        "epochs": EPOCHS,
        "batch_size": 16,
        "model_kwargs": CNN,
        "eval_split": "test",
    }

    with TestClient(create_app(settings, spark_factory=lambda: spark)) as c:
        r = c.post("/api/jobs", json={"kind": "distill", "params": params})
        assert r.status_code == 201, r.text
        jid = r.json()["id"]
        # Progress is shown while it runs: the epoch, of how many, and the last epoch's metrics.
        j = wait_for(
            c,
            jid,
            lambda j: (
                j["state"] in ("failed", "succeeded")
                or j["metrics"].get("last_epoch", {}).get("epoch", 0) >= 2
            ),
        )
        assert j["state"] == "running", j
        assert j["metrics"]["epochs"] == EPOCHS and 0 < j["progress"] < 100
        assert any(" epoch {" in line for line in j["log_tail"]), j["log_tail"]
        assert c.post(f"/api/jobs/{jid}/cancel").status_code == 200
        j = wait_for(c, jid, lambda j: j["state"] in ("cancelled", "failed", "succeeded"), timeout=60)
        assert j["state"] == "cancelled", j

    with open(os.path.join(out, "metrics.jsonl")) as f:
        done_before = [json.loads(line)["epoch"] for line in f if line.strip()]
    assert 2 <= max(done_before) < EPOCHS
    checkpoints = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert checkpoints, "a cancelled run keeps its last checkpoint"

    # A new server on the same job registry resumes it: from the checkpoint, not from epoch 1.
    with TestClient(create_app(settings, spark_factory=lambda: spark)) as c:
        r = c.post(f"/api/jobs/{jid}/resume")
        assert r.status_code == 200, r.text
        assert r.json()["params"]["resume"] is True, (
            checkpoints,
            os.listdir(os.path.join(out, "checkpoints")),
        )
        seen_running = wait_for(c, jid, lambda j: j["state"] != "queued")
        j = wait_for(c, jid, lambda j: j["state"] in ("failed", "succeeded", "cancelled"))
        assert j["state"] == "succeeded", j
        assert seen_running["state"] in ("running", "succeeded")
        result = j["result"]
        assert 2 <= result["resumed_from_epoch"] < EPOCHS  # the rank loaded the checkpoint
        assert result["epochs"] == EPOCHS and len(result["history"]) == EPOCHS
        assert j["progress"] == 100
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f if line.strip()]
    assert epochs == list(
        range(1, EPOCHS + 1)
    )  # the checkpoint's history, then the epochs after it, once each
