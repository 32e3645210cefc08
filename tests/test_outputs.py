"""Training outputs anywhere Spark writes, atomic checkpoints, and mid-epoch resume.

* the driver's output sink (real sockets): chunked transfers, an aborted upload leaves nothing,
  a wrong token or a path outside the run is refused;
* a crash mid-checkpoint (truncated tensors, tensors that do not match their JSON, no JSON, a
  temporary file left behind) is skipped and the previous checkpoint loads;
* a run resumed from a mid-epoch checkpoint ends with the same weights and history as the
  undisturbed run;
* ``train``'s ``out`` on a scheme only Hadoop's client knows (``svtest://``: Hadoop's
  ``ViewFileSystemOverloadScheme`` over a local directory) receives checkpoints, metrics,
  TensorBoard events and the model directory, with ``spark.driver.maxResultSize`` below the
  weights' size (so they cannot have come back in the collected row), and ``evaluate`` (through
  ``predict``'s model loading) reads the model from that URI and writes its reports there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparkvision.spark.filestore import CHUNK, LocalStore, read_bytes, write_bytes
from sparkvision.spark.sink import OutputSink, SinkError, SinkStore
from sparkvision.train import AugmentConfig, TrainConfig, train
from sparkvision.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

TIMING = ("images_per_s", "epoch_time_s")


# ----------------------------------------------------------------------------- the sink
@pytest.fixture
def sink(tmp_path):
    with OutputSink(LocalStore(str(tmp_path / "out")), "127.0.0.1", "127.0.0.1") as s:
        yield s


def test_sink_moves_files_in_chunks_and_refuses_strangers(sink, tmp_path):
    rank = SinkStore(sink.ticket)
    data = os.urandom(2 * CHUNK + 123)  # more than one frame each way
    write_bytes(rank.child("checkpoints"), "epoch-1.safetensors", data)
    assert (tmp_path / "out" / "checkpoints" / "epoch-1.safetensors").read_bytes() == data
    assert read_bytes(rank, "checkpoints/epoch-1.safetensors") == data
    assert rank.list("checkpoints") == ["epoch-1.safetensors"] and rank.exists("checkpoints")
    with pytest.raises(FileNotFoundError):
        read_bytes(rank, "nothing.json")

    # An upload cut off mid-way (the rank dies) leaves nothing, not half a file.
    with pytest.raises(RuntimeError), rank.writer("model.safetensors") as write:
        write(data[:CHUNK])
        raise RuntimeError("rank lost")
    # The driver's thread notices the closed connection: at once on an idle machine, but a CI
    # run on 2 loaded cores once took more than 10 s (the loop ends as soon as it has).
    deadline = time.monotonic() + 60
    while os.listdir(tmp_path / "out") != ["checkpoints"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(tmp_path / "out") == ["checkpoints"]

    rank.delete("checkpoints")
    assert not (tmp_path / "out" / "checkpoints").exists()

    rank.progress({"epoch": 1, "epochs": 2, "step": 3, "steps": 4, "loss": 0.5, "images_per_s": 9.0})
    assert sink.progress is not None and sink.progress["step"] == 3

    with pytest.raises(SinkError, match="not a relative output path"):
        SinkStore(sink.ticket, "..").exists("x")  # the driver checks paths itself
    with pytest.raises(ValueError):
        rank.child("/etc")
    with pytest.raises((ConnectionError, OSError)):
        SinkStore({**sink.ticket, "token": "0" * 64}).exists("")  # closed without a word
    assert sorted(os.listdir(tmp_path / "out")) == ["progress.json"]


# ----------------------------------------------------------------------------- checkpoints
def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_a_crash_mid_checkpoint_loads_the_previous_one(tmp_path):
    store = LocalStore(str(tmp_path))
    first, opt1 = _model_and_optimizer(1)
    second, opt2 = _model_and_optimizer(2)
    save_checkpoint(store, 1, first, opt1, {"history": [{"epoch": 1}]}, keep=5)
    save_checkpoint(store, 1, second, opt2, {"history": [{"epoch": 1}]}, keep=5, step=3)
    assert list_checkpoints(store) == ["epoch-1", "epoch-1-step-3"]
    newest = tmp_path / "epoch-1-step-3.safetensors"
    good = newest.read_bytes()

    def loads() -> tuple[str, torch.Tensor]:
        target, opt = _model_and_optimizer(9)
        found = load_checkpoint(str(tmp_path), target, opt)
        assert found is not None
        return found.name, target.weight.detach().clone()

    assert loads()[0] == "epoch-1-step-3"
    # Truncated mid-upload, and a whole but different tensors file (replaced without its JSON):
    other = tmp_path / "other.safetensors"
    save_file({"model/weight": torch.zeros(3, 4), "model/bias": torch.zeros(3)}, str(other))
    for broken in (good[: len(good) // 2], other.read_bytes()):
        newest.write_bytes(broken)
        name, weight = loads()
        assert name == "epoch-1" and torch.equal(weight, first.weight.detach())
    other.unlink()

    # The tensors written but not the JSON (the crash came between the two), plus a temporary
    # file the crash left: neither counts, and the next save clears them away.
    newest.write_bytes(good)
    (tmp_path / "epoch-1-step-3.json").unlink()
    (tmp_path / "epoch-2.safetensors.tmp-0a1b2c3d").write_bytes(b"partial")
    assert list_checkpoints(store) == ["epoch-1"] and loads()[0] == "epoch-1"
    save_checkpoint(store, 2, second, opt2, {"history": []}, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["epoch-2.json", "epoch-2.safetensors"]
    meta = json.loads((tmp_path / "epoch-2.json").read_text())
    assert meta["tensors"]["bytes"] == (tmp_path / "epoch-2.safetensors").stat().st_size


# ----------------------------------------------------------------------------- mid-epoch resume
@pytest.mark.parametrize(
    "cache,reshuffle", [("memory", False), ("stream", True)], ids=["memory", "stream-reshuffle"]
)
def test_resuming_mid_epoch_matches_the_undisturbed_run(spark, tiny_table, tmp_path, cache, reshuffle):
    """2 ranks, 4 steps an epoch, a checkpoint every 3 steps: resuming from the one 2 steps into
    epoch 2 (with augmentation and dropout drawing random numbers) ends exactly where the run that
    never stopped did: same data order, same draws, no row seen twice. With the stream cache and
    the rows dealt afresh every epoch (one job per epoch) too."""
    cfg = dict(
        cache=cache,
        reshuffle=reshuffle,
        epochs=2,
        workers=2,
        batch_size=16,
        lr=3e-3,
        seed=5,
        checkpoint_every=3,
        keep_checkpoints=10,
        augment=AugmentConfig(hflip=0.5, crop_padding=2),
        model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.3},
    )
    out = tmp_path / "m"
    calm = train(spark, tiny_table, str(out), TrainConfig(**cfg))
    assert list_checkpoints(str(out / "checkpoints")) == [
        "epoch-0-step-3",
        "epoch-1",
        "epoch-1-step-2",
        "epoch-2",
    ]
    weights = load_file(str(out / "model.safetensors"))

    # The run "died" 2 steps into epoch 2: its last checkpoint is epoch-1-step-2 (metrics.jsonl
    # already lists epoch 2: it must not, twice, after the resume).
    for ext in ("json", "safetensors"):
        (out / "checkpoints" / f"epoch-2.{ext}").unlink()
    (out / "model.safetensors").unlink()
    resumed = train(spark, tiny_table, str(out), TrainConfig(**cfg, resume=True))

    assert resumed["resumed_from_epoch"] == 1
    assert (calm["deals"], resumed["deals"]) == ((2, 1) if reshuffle else (1, 1))
    assert calm["cache"] == resumed["cache"] == cache
    strip = [{k: v for k, v in h.items() if k not in TIMING} for h in resumed["history"]]
    assert strip == [{k: v for k, v in h.items() if k not in TIMING} for h in calm["history"]]
    again = load_file(str(out / "model.safetensors"))
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights), "the resumed run diverged"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # TensorBoard: both runs' event files are there; the resumed writer purged epoch 2's first copy.
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    losses = [(e.step, round(e.value, 5)) for e in board.Scalars("loss/train")]
    assert losses == [(h["epoch"], h["train_loss"]) for h in calm["history"]], losses


# ----------------------------------------------------------------------------- a Hadoop-only URI
def test_outputs_reach_a_scheme_only_hadoop_knows(tiny_table, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    spark_opts = [
        "--master",
        "local[2]",
        # svtest:// exists only in this Hadoop configuration: a view of the local dir `root`.
        "--conf",
        "spark.hadoop.fs.svtest.impl=org.apache.hadoop.fs.viewfs.ViewFileSystemOverloadScheme",
        "--conf",
        f"spark.hadoop.fs.viewfs.mounttable.box.linkFallback=file://{root}",
    ]
    with pytest.raises((ValueError, OSError)):
        pafs.FileSystem.from_uri("svtest://box/m")  # nothing but Hadoop's client can reach it
    # train, then evaluate (it reads the model as predict does, inference.modelref, and writes its
    # reports there) and distill (the model as its teacher and the student's starting weights), in
    # one Python API process: one cold driver JVM, not two (CI's time; the CLI is a thin layer over
    # the same operations, and its own output paths run in every CLI test).
    conf = dict(spark_opts[i + 1].split("=", 1) for i in range(2, len(spark_opts), 2))
    p = subprocess.run(
        [sys.executable, "-c", TRAIN_EVAL_DISTILL, json.dumps(conf), tiny_table],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    s, e, d = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["model_dir"] == "svtest://box/m" and s["epochs"] == 2
    m = root / "m"
    assert (m / "model.safetensors").stat().st_size > 2**20
    assert sorted(p.name for p in (m / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        f"{n}.{x}" for n in ("epoch-1-step-2", "epoch-2") for x in ("json", "safetensors")
    ]
    assert [json.loads(r)["epoch"] for r in (m / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in (m / "tensorboard").iterdir())
    for name in ("config.json", "preprocess.json", "classes.json", "metrics.json", "train_config.json"):
        assert (m / name).exists(), name
    assert json.loads((m / "progress.json").read_text())["epoch"] == 2

    assert e["rows"] == 32 and 0 <= e["accuracy"] <= 1
    assert json.loads((m / "evaluation.json").read_text())["rows"] == 32
    assert (m / "confusion_matrix.png").stat().st_size > 0
    assert d["model_dir"] == "svtest://box/d" and d["epochs"] == 1, d
    assert (root / "d" / "model.safetensors").stat().st_size > 2**20


TRAIN_EVAL_DISTILL = """
import json, sys
from sparkvision import api

conf, table = json.loads(sys.argv[1]), sys.argv[2]
# 1.1 MB of weights against a 1 MB maxResultSize: the weights cannot come back to the driver in a row.
spark = api.get_spark("local[2]", {**conf, "spark.driver.maxResultSize": "1m"})
t = api.train(
    spark, table=table, out="svtest://box/m", epochs=2, workers=2, batch_size=16, checkpoint_every=3,
    augment="none", model_kwargs={"widths": [8, 16], "hidden": 1024, "dropout": 0.0},
)
e = api.evaluate(spark, model_dir="svtest://box/m", table=table)
d = api.distill(
    spark, teacher="svtest://box/m", encoder="svtest://box/m", table=table, out="svtest://box/d",
    unlabeled_split="train", epochs=1, augment="none",
)
print(json.dumps([t, e, d], default=str))
"""
