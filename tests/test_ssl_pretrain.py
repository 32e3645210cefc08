"""A tiny pretraining run lowers the loss; the encoder fine-tunes; the CLI runs end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparkvision import api
from sparkvision.cli import app
from sparkvision.models.modeldir import load_model_dir
from sparkvision.ssl.config import FinetuneConfig
from sparkvision.ssl.finetune import finetune
from sparkvision.ssl.pretrain import export_projector, pretrain

TINY = dict(
    preset="cpu-small",
    batch_size=32,
    pool_split="train",
    monitor_split="test",
    warmup_epochs=0,
    model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.0},
    proj_dim=64,
    proj_hidden=64,
)


def test_simclr_pretraining_lowers_the_loss_and_writes_an_encoder(spark, tiny_table, tmp_path):
    out = tmp_path / "enc"
    s = pretrain(spark, tiny_table, str(out), method="simclr", epochs=6, base_lr=0.1, **TINY)
    losses = [h["train_loss"] for h in s["history"]]
    assert min(losses[-2:]) < losses[0], losses
    assert s["knn_acc"] is not None and 0 <= s["knn_acc"] <= 1
    assert all(h["output_std"] > 0 for h in s["history"])
    lm = load_model_dir(str(out))  # a plain model directory: embed / finetune / retrieval can use it
    assert lm.spec.model == "cnn" and lm.preprocess.size == (16, 16)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    # Resume: two more epochs from the checkpoint, not from scratch.
    r = pretrain(spark, tiny_table, str(out), method="simclr", epochs=8, base_lr=0.1, resume=True, **TINY)
    assert r["resumed_from_epoch"] == 6 and [h["epoch"] for h in r["history"]] == list(range(1, 9))

    f = finetune(
        spark,
        tiny_table,
        str(tmp_path / "ft"),
        str(out),
        FinetuneConfig(label_fraction=0.5, epochs=3, batch_size=16, workers=2),
    )
    assert f["train_rows"] == 32 and f["mode"] == "finetune" and f["test_acc"] is not None
    lin = finetune(
        spark,
        tiny_table,
        str(tmp_path / "lin"),
        str(out),
        FinetuneConfig(label_fraction=0.25, linear=True, epochs=2, batch_size=16),
    )
    assert lin["train_rows"] == 16 and lin["mode"] == "linear"
    enc = load_model_dir(str(out)).model.state_dict()
    tuned = load_model_dir(str(tmp_path / "lin")).model.state_dict()
    assert all((enc[k] == tuned[k]).all() for k in enc if not k.startswith("head."))  # frozen encoder

    # SimCLRv2-style: the projector's first layer is kept under the head (encoder LR 0: it stays as pretrained).
    proj = load_file(str(out / "projector.safetensors"))
    # Older encoder dirs: the same tensors come from the last checkpoint.
    os.remove(out / "projector.safetensors")
    again = load_file(export_projector(str(out)))
    assert again.keys() == proj.keys() and all(torch.equal(again[k], proj[k]) for k in proj)
    v2 = finetune(
        spark,
        tiny_table,
        str(tmp_path / "v2"),
        str(out),
        FinetuneConfig(
            label_fraction=0.25, epochs=1, batch_size=16, projector_layers=1, encoder_lr_scale=0.0
        ),
    )
    m = load_model_dir(v2["model_dir"]).model
    assert m.arch["neck"] == [64] and torch.equal(m.neck[0].weight, proj["net.0.weight"])
    with pytest.raises(ValueError, match="^projector_layers: 5 must be below the depth"):
        finetune(spark, tiny_table, str(tmp_path / "v3"), str(out), FinetuneConfig(projector_layers=5))


@pytest.mark.parametrize("method", ["improved-simclr", "simsiam"])
def test_siamese_methods_run_two_ranks(spark, tiny_table, tmp_path, method):
    s = pretrain(spark, tiny_table, str(tmp_path / method), method=method, epochs=2, workers=2, **TINY)
    assert len(s["history"]) == 2 and s["history"][-1]["train_loss"] < 0.5


def test_cli_pretrain_and_finetune(spark, tiny_table, tmp_path):
    runner = CliRunner()
    enc = str(tmp_path / "e")
    r = runner.invoke(
        app,
        [
            "pretrain",
            "--method",
            "simsiam",
            "--table",
            tiny_table,
            "--out",
            enc,
            "--pool",
            "train",
            "--monitor-split",
            "test",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--proj-dim",
            "64",
            "--model-kwargs",
            '{"widths": [8, 16], "hidden": 32}',
            "--master",
            "local[2]",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["epochs"] == 2
    r = runner.invoke(
        app,
        [
            "finetune",
            "--encoder",
            enc,
            "--table",
            tiny_table,
            "--out",
            str(tmp_path / "f"),
            "--label-fraction",
            "0.25",
            "--linear",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["train_rows"] == 16
    r = runner.invoke(app, ["pretrain", "--method", "byol", "--table", tiny_table, "--out", enc, "--json"])
    assert r.exit_code == 2 and "improved-simclr" in r.output


def test_a_first_try_needs_neither_pool_nor_warmup(spark, tiny_table, tmp_path):
    """`pretrain --epochs 1` on a labelled table: the pool is its train split (it has no unlabeled
    rows) and the preset's 1-epoch warm-up shrinks with the run, instead of two errors."""
    s = api.pretrain(
        spark,
        table=tiny_table,
        out=str(tmp_path / "first"),
        epochs=1,
        batch_size=32,
        monitor_split="test",
        model_kwargs=TINY["model_kwargs"],
        proj_dim=64,
        proj_hidden=64,
    )
    assert s["pool_split"] == "train" and s["epochs"] == 1 and s["pool_rows"] == 64
    with open(tmp_path / "first" / "pretrain_config.json") as f:
        assert 0 < json.load(f)["warmup_epochs"] < 1
