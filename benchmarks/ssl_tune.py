"""Tune the few-label fine-tuning recipe on a validation split, never on the test split.

``bench_ssl.py`` scores every cell on the test split, so choosing a recipe by its test accuracy
would flatter it. This script carves a stratified-by-hash 10% ``val`` split out of the train
split (into a copy of the table under benchmarks/out/ssl/), samples the label fraction from the
remaining train rows and scores each named recipe on ``val``. The recipe chosen here is then run
once by ``bench_ssl.py`` and scored on test.

    .venv/bin/python benchmarks/ssl_tune.py --encoder benchmarks/out/ssl/pretrain-improved-simclr-cpu-small \
        --fraction 0.01 --recipes scratch,ft-0.1,ft-1.0

Results: benchmarks/results/ssl_tune.json (cached per recipe, encoder and fraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pyspark.sql import functions as F  # noqa: E402

from sparkvision.data.table import is_image_table, read_meta, read_table, write_meta  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.ssl.config import FinetuneConfig  # noqa: E402
from sparkvision.ssl.finetune import finetune  # noqa: E402
from sparkvision.train.augment import parse_augment  # noqa: E402

RESULTS = os.path.join(HERE, "results", "ssl_tune.json")
SCHEDULE = {0.01: (60, 64), 0.05: (40, 128), 0.1: (30, 128)}
ROT = "hflip=0.5,crop_padding=2,rotation=10,scale=0.9:1.1"
# name -> (uses the encoder, FinetuneConfig overrides); epochs/batch default to SCHEDULE's.
RECIPES: dict[str, tuple[bool, dict]] = {
    "scratch": (False, {}),
    "scratch-2x-epochs": (False, {"epochs_x": 2}),
    "scratch-rot-scale": (False, {"augment": ROT}),
    "ft-0.1": (True, {"encoder_lr_scale": 0.1}),
    "ft-0.3": (True, {"encoder_lr_scale": 0.3}),
    "ft-1.0": (True, {"encoder_lr_scale": 1.0}),
    "ft-1.0-2x-epochs": (True, {"encoder_lr_scale": 1.0, "epochs_x": 2}),
    "ft-1.0-rot-scale": (True, {"encoder_lr_scale": 1.0, "augment": ROT}),
    "ft-0.3-rot-scale": (True, {"encoder_lr_scale": 0.3, "augment": ROT}),
    "ft-1.0-lr-1e-3": (True, {"encoder_lr_scale": 1.0, "lr": 1e-3}),
    "ft-1.0-lr-4e-3": (True, {"encoder_lr_scale": 1.0, "lr": 4e-3}),
    "ft-1.0-ls-0": (True, {"encoder_lr_scale": 1.0, "label_smoothing": 0.0}),
    # SimCLRv2: fine-tune from the projector's first layer (kept under the head).
    "ftv2-1.0": (True, {"encoder_lr_scale": 1.0, "projector_layers": 1}),
    "ftv2-0.1": (True, {"encoder_lr_scale": 0.1, "projector_layers": 1}),
    "ftv2-0.3": (True, {"encoder_lr_scale": 0.3, "projector_layers": 1}),
    # FixMatch on the (train-minus-val) pool, labels never read.
    "fixmatch-scratch": (False, {"consistency_weight": 1.0, "unlabeled_split": "train"}),
    "fixmatch-ft-1.0": (
        True,
        {"encoder_lr_scale": 1.0, "consistency_weight": 1.0, "unlabeled_split": "train"},
    ),
    "fixmatch-ft-1.0-tau-0.8": (
        True,
        {"encoder_lr_scale": 1.0, "consistency_weight": 1.0, "unlabeled_split": "train", "confidence": 0.8},
    ),
    # Label smoothing 0.1 caps the softmax near 0.91, under FixMatch's 0.95 threshold (the paper uses none).
    "fixmatch-ft-1.0-ls-0": (
        True,
        {
            "encoder_lr_scale": 1.0,
            "consistency_weight": 1.0,
            "unlabeled_split": "train",
            "label_smoothing": 0.0,
        },
    ),
    "fixmatch-ft-1.0-ls-0-3x-epochs": (
        True,
        {
            "encoder_lr_scale": 1.0,
            "consistency_weight": 1.0,
            "unlabeled_split": "train",
            "label_smoothing": 0.0,
            "epochs_x": 3,
        },
    ),
    "fixmatch-scratch-ls-0": (
        False,
        {"consistency_weight": 1.0, "unlabeled_split": "train", "label_smoothing": 0.0},
    ),
}


def val_table(spark, table: str, out: str) -> str:
    """``table`` with a hash-chosen 10% of its train rows relabelled ``val`` (written once)."""
    if is_image_table(spark, out):
        return out
    df = read_table(spark, table)
    pick = (F.pmod(F.xxhash64(F.lit(7), F.col("content_id")), F.lit(10)) == 0) & (F.col("split") == "train")
    df.withColumn("split", F.when(pick, F.lit("val")).otherwise(F.col("split"))).write.mode(
        "overwrite"
    ).parquet(out)
    write_meta(spark, out, read_meta(spark, table))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument(
        "--encoder", default=os.path.join(HERE, "out", "ssl", "pretrain-improved-simclr-cpu-small")
    )
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out", "ssl", "tune"))
    args = ap.parse_args()
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    spark = get_spark(args.master, {"spark.sql.shuffle.partitions": "8", "spark.driver.memory": "6g"})
    table = val_table(spark, args.table, os.path.join(args.out_dir, "fashion-mnist-val"))
    res = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            res = json.load(f)
    epochs, batch = SCHEDULE.get(args.fraction, (30, 128))
    for name in args.recipes.split(","):
        uses_encoder, over = RECIPES[name]
        enc = args.encoder if uses_encoder else None
        key = f"{name}|{os.path.relpath(enc, HERE) if enc else '-'}|{args.fraction}"
        if key in res:
            print(f"{key}: cached {res[key]['val_acc']}")
            continue
        over = dict(over)
        ep = epochs * over.pop("epochs_x", 1)
        if "augment" in over:
            over["augment"] = parse_augment(over["augment"])
        cfg = FinetuneConfig(
            label_fraction=args.fraction, epochs=ep, batch_size=batch, eval_split="val", **over
        )
        t0 = time.time()
        s = finetune(spark, table, os.path.join(args.out_dir, name), enc, cfg, eval_every=ep)
        res[key] = {
            "recipe": name,
            "encoder": enc and os.path.relpath(enc, HERE),
            "fraction": args.fraction,
            "val_acc": s["test_acc"],
            "train_rows": s["train_rows"],
            "epochs": ep,
            "batch_size": batch,
            "wall_s": round(time.time() - t0, 1),
            "config": {
                k: v
                for k, v in cfg.to_json().items()
                if k
                in (
                    "lr",
                    "encoder_lr_scale",
                    "augment",
                    "label_smoothing",
                    "epochs",
                    "consistency_weight",
                    "confidence",
                )
            },
        }
        print(f"{key}: val_acc {s['test_acc']} ({res[key]['wall_s']} s)", flush=True)
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
