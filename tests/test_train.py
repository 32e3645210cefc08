"""Distributed training: learns, resumes, survives skewed partitions, gives clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from pyspark.sql import functions as F
from safetensors.torch import load as st_load

from sparkvision.data.images import encode_png
from sparkvision.data.table import read_meta, read_table
from sparkvision.errors import ParamError
from sparkvision.models.modeldir import load_model_dir
from sparkvision.spark import distributed as D
from sparkvision.train import AugmentConfig, BatchAugment, TrainConfig, parse_augment, train, train_df
from sparkvision.train.data import (
    available_memory_bytes,
    check_shard_fits,
    decode_shard,
    epoch_indices,
    steps_per_epoch,
)
from sparkvision.train.optim import lr_factor
from sparkvision.train.rank import RankTraining

FAST = dict(
    batch_size=16,
    lr=3e-3,
    model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.0},
    augment=AugmentConfig.none(),
)


def test_two_ranks_learn_a_separable_set(spark, tiny_table, tmp_path):
    out = tmp_path / "m"
    s = train(spark, tiny_table, str(out), TrainConfig(epochs=5, workers=2, **FAST))
    assert s["workers"] == 2 and s["train_rows"] == 64 and s["eval_rows"] == 32
    assert s["test_acc"] >= 0.75, s["history"]  # chance is 0.25
    # The model directory is complete and loads without pickle.
    lm = load_model_dir(str(out))
    assert lm.class_names == read_meta(spark, tiny_table).class_names
    assert lm.preprocess.size == (16, 16) and lm.preprocess.channels == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4, 5]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))


def test_resume_continues_from_saved_epoch(spark, tiny_table, tmp_path):
    out = str(tmp_path / "r")
    first = train(spark, tiny_table, out, TrainConfig(epochs=1, workers=1, **FAST))  # "interrupted" after 1
    assert os.path.exists(os.path.join(out, "checkpoints", "epoch-1.safetensors"))
    resumed = train(spark, tiny_table, out, TrainConfig(epochs=3, workers=1, resume=True, **FAST))
    assert resumed["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][0] == first["history"][0]  # epoch 1 was not re-run


def test_resume_without_checkpoint_is_a_clear_error(spark, tiny_table, tmp_path):
    with pytest.raises(ParamError, match="^resume: no checkpoint"):
        train(spark, tiny_table, str(tmp_path / "none"), TrainConfig(epochs=1, resume=True, **FAST))


def test_unequal_partitions_do_not_hang(spark, tiny_table, tmp_path):
    df = read_table(spark, tiny_table).where("split in ('train', 'test')")
    # ~1/8 of the rows in one partition, the rest in the other (a range shuffle, as real skew would be).
    # Two key values that Spark's hash partitioner sends to different partitions.
    part = {v: spark.range(1).select(F.pmod(F.hash(F.lit(v)), F.lit(2))).first()[0] for v in range(8)}
    a = next(v for v in part if part[v] == 0)
    b = next(v for v in part if part[v] == 1)
    small = (F.abs(F.hash("content_id")) % 6 == 0) & (F.col("split") == "train")
    skewed = df.withColumn("_k", F.when(small, a).otherwise(b)).repartition(2, "_k").drop("_k")
    sizes = skewed.rdd.glom().map(len).collect()
    assert len(sizes) == 2 and min(sizes) > 0 and max(sizes) > 4 * min(sizes), sizes
    s = train_df(
        spark,
        skewed,
        read_meta(spark, tiny_table).class_names,
        str(tmp_path / "s"),
        TrainConfig(epochs=1, workers=2, **FAST),
        repartition=False,
    )
    assert s["epochs"] == 1


def test_more_workers_than_slots_is_a_clear_error(spark, tiny_table, tmp_path):
    with pytest.raises(ValueError, match="^workers: 8 is more than the 2 task slots"):
        train(spark, tiny_table, str(tmp_path / "x"), TrainConfig(epochs=1, workers=8, batch_size=16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=15, workers=2), "batch_size 15 is not divisible by workers 2"),
        (dict(optimizer="lamb"), r"optimizer\s+Input should be 'sgd' or 'adamw'"),
        (dict(schedule="step"), r"schedule\s+Input should be 'onecycle', 'cosine' or 'constant'"),
        (dict(epochs=0), r"epochs\s+Input should be greater than or equal to 1"),
    ],
)
def test_bad_config_names_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs).validate()


def test_steps_are_equal_and_epochs_reshuffle():
    assert steps_per_epoch(100, 16) == 7
    a = epoch_indices(10, 7, 8, seed=0, epoch=0, rank=0)
    b = epoch_indices(10, 7, 8, seed=0, epoch=1, rank=0)
    assert a.shape == (7, 8) and int(a.max()) < 10
    assert not torch.equal(a, b)
    assert torch.equal(a, epoch_indices(10, 7, 8, seed=0, epoch=0, rank=0))
    # every local row is used before any repeats
    assert sorted(a.flatten()[:10].tolist()) == list(range(10))


def _batches(rows):
    cols = {"image": [r[0] for r in rows], "label": [r[1] for r in rows], "split": [r[2] for r in rows]}
    table = pa.table(
        cols, schema=pa.schema([("image", pa.binary()), ("label", pa.int32()), ("split", pa.string())])
    )
    return iter(table.to_batches(max_chunksize=2))


def test_decode_shard_keeps_order_and_counts_bad_rows():
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (6, 5), dtype=np.uint8) for _ in range(4)]
    rows = [
        (encode_png(pixels[0]), 3, "train"),
        (b"not an image", 1, "train"),
        (encode_png(pixels[1]), None, "unlabeled"),
        (None, 2, "test"),
        (encode_png(pixels[2]), 0, "test"),
        (encode_png(pixels[3]), 9, "val"),
    ]
    shard, splits = decode_shard(_batches(rows), 1, (6, 5))
    assert shard.bad_rows == 2 and len(shard) == 4 and shard.images.shape == (4, 1, 6, 5)
    assert splits == ["train", "unlabeled", "test", "val"]
    assert shard.labels.tolist() == [3, -1, 0, 9]
    for got, want in zip(shard.images, pixels, strict=True):
        assert torch.equal(got[0], torch.from_numpy(want))
    rgb, _ = decode_shard(_batches(rows[:1]), 3, (6, 5))  # grey replicated to 3 channels, (N, C, H, W)
    assert rgb.images.shape == (1, 3, 6, 5) and torch.equal(rgb.images[0, 2], torch.from_numpy(pixels[0]))


def test_oversized_shard_is_a_clear_error_before_decoding():
    rows = [(encode_png(np.zeros((8, 8), dtype=np.uint8)), 0, "train")] * 10
    with pytest.raises(
        ValueError, match=r"10 images at 3x8x8 needs .* GiB decoded.*more workers.*smaller image_size"
    ):
        decode_shard(_batches(rows), 3, (8, 8), available_bytes=10 * 3 * 8 * 8 - 1)
    shard, _ = decode_shard(_batches(rows), 3, (8, 8), available_bytes=10 * 3 * 8 * 8)  # exactly fits
    assert len(shard) == 10
    check_shard_fits(10**15, None, 1, (1, 1, 1))  # unknown memory: no check
    free = available_memory_bytes()
    assert free is None or free > 0


def test_lr_schedules_shape():
    assert lr_factor(0, 100, "onecycle") == pytest.approx(1 / 25)
    assert lr_factor(25, 100, "onecycle") == pytest.approx(1.0)
    assert lr_factor(100, 100, "onecycle") < 1e-3
    assert lr_factor(0, 100, "cosine", warmup_steps=10) == pytest.approx(1 / 25)
    assert lr_factor(10, 100, "cosine", warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.0)


def test_augment_spec_reads_back_as_the_same_config():
    """``to_spec`` is what docs/commands.md shows as the default: it must be a valid --augment."""
    assert AugmentConfig().to_spec() == "hflip=0.5,crop_padding=2"
    assert AugmentConfig.none().to_spec() == "none"
    cfg = AugmentConfig(hflip=0.25, crop_padding=4, scale=(0.9, 1.1), hue=0.05, cutout=0.5)
    assert parse_augment(cfg.to_spec()) == cfg


def test_batch_augment_is_per_sample_and_keeps_shape():
    x = torch.rand(64, 3, 16, 16)
    aug = BatchAugment(parse_augment("hflip=0.5,crop_padding=2,brightness=0.3,grayscale=0.5"))
    y = aug(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    changed = [(not torch.allclose(x[i], y[i])) for i in range(64)]
    assert 0 < sum(changed)
    # Different samples get different draws (v2 on a batch would give all the same).
    flipped = [torch.allclose(y[i], x[i].flip(-1)) for i in range(64)]
    assert not all(flipped)
    with pytest.raises(ValueError, match="augment item"):
        parse_augment("wobble=1")


def test_batch_augment_hue_is_per_sample():
    x = torch.rand(32, 3, 8, 8)
    y = BatchAugment(parse_augment("hue=0.5"))(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    # The value channel (max over RGB) is what a hue rotation keeps; the colours move, by different amounts.
    assert torch.allclose(y.amax(1), x.amax(1), atol=1e-5)
    moved = (y - x).abs().flatten(1).mean(1)
    assert (moved > 1e-3).sum() > 24 and moved.std() > 1e-3
    with pytest.raises(ValueError, match="hue"):
        parse_augment("hue=0.6").validate()


class _BrightnessRank(RankTraining):
    """A toy method on the rank skeleton: a linear classifier of dark vs bright images."""

    config_class = TrainConfig

    def select(self, shard, splits):
        return shard, torch.tensor([float(len(shard))], dtype=torch.float64)

    def build(self):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        return model, [{"params": list(model.parameters())}]

    def step_loss(self, b):
        x = (self.rows.images[b].float() / 255 - self.mean) / self.std
        return torch.nn.functional.cross_entropy(self.net(x), self.rows.labels[b])

    def end_epoch(self, epoch):
        return {"seen": epoch}, {"toy/seen": float(epoch)}


def test_rank_skeleton_trains_logs_checkpoints_and_resumes_in_one_process(tmp_path):
    rng = np.random.default_rng(0)
    pixels = [(rng.integers(0, 60, (4, 4), dtype=np.uint8) + 190 * k, k) for k in (0, 1) for _ in range(8)]
    rows = [(encode_png(p), k, "train") for p, k in pixels]
    ctx = D.RankContext(rank=0, world_size=1, threads=1, device=torch.device("cpu"), attempt=0)

    def run(epochs, ctx):
        cfg = TrainConfig(
            epochs=epochs, batch_size=8, lr=0.05, schedule="constant", augment=AugmentConfig.none()
        )
        payload = {
            "cfg": cfg.to_json(),
            "out": str(tmp_path),
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "channels": 1,
            "size": [4, 4],
            "num_classes": 2,
        }
        return D.decode_result(_BrightnessRank.main(ctx, _batches(rows), payload))

    info, blobs = run(4, ctx)
    history = info["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and info["steps_per_epoch"] == 2
    assert list(history[0]) == ["epoch", "train_loss", "seen", "images_per_s", "epoch_time_s", "lr"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2, history
    assert info["mean"][0] == pytest.approx(float(np.mean([p for p, _ in pixels])) / 255, abs=1e-6)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        f"epoch-{e}.{x}" for e in (3, 4) for x in ("json", "safetensors")
    ]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    assert info["files"] == {"weights": "model.safetensors"} and blobs == {}  # uploaded, not in the row
    model.load_state_dict(st_load((tmp_path / "model.safetensors").read_bytes()))
    # A re-run of the stage by Spark (attempt 1) resumes from the last checkpoint, not from scratch.
    again, _ = run(6, D.RankContext(0, 1, 1, torch.device("cpu"), attempt=1))
    assert again["start_epoch"] == 4 and again["history"][:4] == history and len(again["history"]) == 6
