"""Semi-supervised fine-tuning with FixMatch: the loss, cutout, and the end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from pyspark.sql import functions as SF
from typer.testing import CliRunner

from sparkvision.cli import app
from sparkvision.data.table import read_meta, read_table, write_meta
from sparkvision.ssl.config import FinetuneConfig
from sparkvision.ssl.finetune import finetune
from sparkvision.ssl.losses import FixMatchLoss
from sparkvision.train.augment import AugmentConfig, BatchAugment, parse_augment

CNN = {"widths": [8, 16], "hidden": 32, "dropout": 0.0}


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9])
def test_fixmatch_loss_matches_equation(tau):
    g = torch.Generator().manual_seed(0)
    strong, weak = torch.randn(12, 5, generator=g), 3 * torch.randn(12, 5, generator=g)
    q = torch.exp(weak) / torch.exp(weak).sum(1, keepdim=True)
    conf, pseudo = q.max(1)
    log_p = strong - torch.log(torch.exp(strong).sum(1, keepdim=True))
    per_image = -log_p[torch.arange(12), pseudo]
    mask = (conf >= tau).float()
    expected = (mask * per_image).sum() / 12  # mean over all mu*B images, confident or not
    loss_fn = FixMatchLoss(tau)
    assert torch.allclose(loss_fn(strong, weak), expected, atol=1e-6)
    assert loss_fn.last_mask_rate == pytest.approx(float(mask.mean()))


def test_fixmatch_gradient_reaches_the_strong_view_only_and_unconfident_images_are_ignored():
    g = torch.Generator().manual_seed(1)
    strong = torch.randn(6, 4, generator=g, requires_grad=True)
    weak = torch.randn(6, 4, generator=g, requires_grad=True)
    weak_conf = weak.detach().clone()
    weak_conf[:3, 0] = 20.0  # the first three images are confidently class 0, the rest near-uniform
    weak_conf[3:] = 0.01 * weak_conf[3:]
    weak_conf.requires_grad_(True)
    FixMatchLoss(0.95)(strong, weak_conf).backward()
    assert weak_conf.grad is None
    assert strong.grad[:3].abs().sum() > 0 and strong.grad[3:].abs().max() == 0
    # Nothing above the threshold: no loss at all (and so no harm from a clueless model early on).
    loss_fn = FixMatchLoss(0.99)
    assert float(loss_fn(strong, 0.01 * weak).detach()) == 0.0 and loss_fn.last_mask_rate == 0.0
    with pytest.raises(ValueError, match="threshold"):
        FixMatchLoss(1.0)
    with pytest.raises(ValueError, match="same shape"):
        FixMatchLoss()(torch.zeros(2, 3), torch.zeros(3, 3))


def test_cutout_erases_one_square_per_image_at_its_own_place():
    x = torch.zeros(64, 1, 20, 20)
    y = BatchAugment(AugmentConfig(hflip=0.0, crop_padding=0, cutout=0.25))(
        x, torch.Generator().manual_seed(0)
    )
    grey = y == 0.5
    assert set(torch.unique(y).tolist()) <= {0.0, 0.5}
    counts = grey.flatten(1).sum(1)
    # A 5x5 square, clipped where its centre is near the border; never more, never none.
    assert int(counts.max()) == 25 and int(counts.min()) > 0
    rows, cols = grey.any(3).squeeze(1), grey.any(2).squeeze(1)
    assert (rows.sum(1) <= 5).all() and (cols.sum(1) <= 5).all()
    # Each image draws its own place.
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 5
    assert parse_augment("cutout=0.5").cutout == 0.5
    with pytest.raises(ValueError, match="cutout"):
        parse_augment("cutout=1.5")


@pytest.fixture(scope="module")
def pool_table(spark, tiny_table, tmp_path_factory):
    """The tiny table plus an 'unlabeled' split: the train images again with their labels removed."""
    df = read_table(spark, tiny_table)
    pool = (
        df.where("split = 'train'")
        .withColumn("label", SF.lit(None).cast("int"))
        .withColumn("label_name", SF.lit(None).cast("string"))
        .withColumn("split", SF.lit("unlabeled"))
    )
    out = str(tmp_path_factory.mktemp("tables") / "with_pool")
    df.unionByName(pool).write.parquet(out)
    write_meta(spark, out, read_meta(spark, tiny_table))
    return out


def test_fixmatch_trains_on_the_unlabelled_pool_on_two_ranks(spark, pool_table, tmp_path):
    cfg = FinetuneConfig(
        label_fraction=0.25,
        epochs=6,
        batch_size=16,
        lr=5e-3,
        model_kwargs=CNN,
        workers=2,
        consistency_weight=1.0,
        confidence=0.6,
        unlabeled_ratio=3,
        unlabeled_split="unlabeled",
    )
    s = finetune(spark, pool_table, str(tmp_path / "fm"), None, cfg, eval_every=6)
    # 16 labelled rows set the epoch; the unlabelled rows (labels null) come on top through the loss.
    assert s["fixmatch"] and s["mode"] == "scratch" and s["train_rows"] == 16
    rates = [h["pseudo_label_rate"] for h in s["history"]]
    assert all(0.0 <= r <= 1.0 for r in rates)
    # As the model learns, more of the pool is confident enough to pseudo-label.
    assert rates[-1] > rates[0] and rates[-1] > 0.2, rates
    assert s["test_acc"] is not None
    metrics = [json.loads(line) for line in open(tmp_path / "fm" / "metrics.jsonl")]
    assert [m["pseudo_label_rate"] for m in metrics] == rates


def test_fixmatch_errors_name_the_problem(spark, pool_table, tmp_path):
    with pytest.raises(ValueError, match="no rows in split 'nosuch'"):
        finetune(
            spark,
            pool_table,
            str(tmp_path / "a"),
            None,
            FinetuneConfig(consistency_weight=1.0, unlabeled_split="nosuch", label_fraction=0.25, epochs=1),
        )
    with pytest.raises(ValueError, match="unlabeled_split 'test' is also the eval split"):
        finetune(
            spark,
            pool_table,
            str(tmp_path / "b"),
            None,
            FinetuneConfig(consistency_weight=1.0, unlabeled_split="test"),
        )
    with pytest.raises(ValueError, match="pick one"):
        finetune(
            spark,
            pool_table,
            str(tmp_path / "c"),
            None,
            FinetuneConfig(consistency_weight=1.0),
            teacher=str(tmp_path / "whatever"),
        )
    for kwargs, name in (
        ({"consistency_weight": -1}, "consistency_weight"),
        ({"confidence": 1.0}, "confidence"),
        ({"unlabeled_ratio": 0}, "unlabeled_ratio"),
        ({"consistency_weight": 1.0, "linear": True}, "linear"),
    ):
        with pytest.raises(ValueError, match=name):
            FinetuneConfig(**kwargs).validate()


def test_cli_finetune_with_fixmatch(spark, pool_table, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "finetune",
            "--table",
            pool_table,
            "--out",
            str(tmp_path / "m"),
            "--label-fraction",
            "0.25",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--consistency-weight",
            "1",
            "--unlabeled-split",
            "unlabeled",
            "--unlabeled-ratio",
            "2",
            "--strong-augment",
            "hflip=0.5,cutout=0.3",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["fixmatch"] and "pseudo_label_rate" in out["history"][0]
    saved = json.load(open(tmp_path / "m" / "finetune_config.json"))
    assert saved["consistency_weight"] == 1.0 and saved["strong_augment"]["cutout"] == 0.3
