"""Deep belief network accuracy (issue 20): ingest -> train (layer-wise CD-1 pretraining, then
backprop fine-tuning) -> evaluate, through the library, with 2 workers on local[2].

1. scikit-learn's digits (1,797 8x8 images, written as PNG files and ingested as images; a seeded
   stratified 80/20 split). Target >= 0.97 (scikit-learn's RBM + logistic regression example:
   0.95).
2. Fashion-MNIST (the Debian package's 60,000 + 10,000). Target >= 0.897 (the SVC-RBF entry of
   the Fashion-MNIST benchmark table).
3. The synthetic Landsat-8-like raster, when ``ingest-raster`` is available: per-class accuracy.

Each also runs without pretraining (``pretrain_epochs`` 0, the same network and fine-tuning) so
the pretraining's worth is measured, not assumed.

    .venv/bin/python benchmarks/bench_dbn.py [--only digits,fashion,raster] [--epochs 30]

Results: benchmarks/results/dbn.json and dbn.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sparkvision.api import evaluate, ingest, ingest_raster, synthetic_landsat, train  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402

RESULTS = HERE / "results"
OUT = HERE / "out" / "dbn"


def digits_table(spark: Any) -> str:
    """sklearn's digits as PNG files in root/<split>/<class>/, ingested as an image table."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    table = OUT / "digits"
    if (table / "_SUCCESS").exists():
        return str(table)
    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(x)), test_size=0.2, stratify=d.target, random_state=0
    )
    root = OUT / "digits-png"
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(x[i], mode="L").save(buf, format="PNG")
            (folder / f"{i}.png").write_bytes(buf.getvalue())
    ingest(spark, source=str(root), table=str(table), overwrite=True)
    return str(table)


def raster_table(spark: Any, size: int) -> str:
    """The synthetic Landsat-8-like scene (seed 0) ingested as per-pixel NDVI, DVI, RVI, EVI rows."""
    table = OUT / f"landsat-{size}"
    if (table / "_SUCCESS").exists():
        return str(table)
    scene = OUT / f"landsat-{size}-scene"
    synthetic_landsat(spark, out=str(scene), height=size, width=size, seed=0, overwrite=True)
    ingest_raster(
        spark,
        raster=str(scene / "scene.tif"),
        labels=str(scene / "labels.tif"),
        table=str(table),
        class_names=["water", "forest", "cropland", "bare_soil", "urban"],
        overwrite=True,
    )
    return str(table)


def run(
    spark: Any,
    name: str,
    table: str,
    kwargs: dict[str, Any],
    epochs: int,
    batch: int,
    lr: float,
    **extra: Any,
) -> dict[str, Any]:
    rows = {}
    for label, pre in (("pretrained", kwargs["pretrain_epochs"]), ("no pretraining", 0)):
        out = OUT / f"{name}-{'pre' if pre else 'scratch'}"
        t0 = time.perf_counter()
        res = train(
            spark,
            table=table,
            out=str(out),
            overwrite=True,
            model="dbn",
            model_kwargs={**kwargs, "pretrain_epochs": pre},
            epochs=epochs,
            batch_size=batch,
            lr=lr,
            workers=2,
            augment="none",
            **extra,
        )
        wall = time.perf_counter() - t0
        ev = evaluate(spark, model_dir=str(out), table=table)
        rows[label] = {
            "test_acc": ev["accuracy"],
            "per_class_recall": {c: v["recall"] for c, v in (ev.get("per_class") or {}).items()},
            "wall_s": round(wall, 1),
            "pretrain": res.get("pretrain", []),
        }
        print(name, label, rows[label]["test_acc"], f"{wall:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="digits,fashion")
    ap.add_argument("--fashion", default="data/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--fashion-epochs", type=int, default=15)
    ap.add_argument("--render", action="store_true", help="write dbn.md from dbn.json; train nothing")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    spark = get_spark(master="local[2]")
    if args.render:
        print(render(json.loads((RESULTS / "dbn.json").read_text())))
        return
    results: dict[str, Any] = {"run": time.strftime("%Y-%m-%d %H:%M")}
    only = args.only.split(",")
    if "digits" in only:
        kw = {"hidden": [256, 256], "pretrain_epochs": 20, "cd_k": 1, "pretrain_lr": 0.01}
        results["digits"] = {
            "model_kwargs": kw,
            "epochs": args.epochs,
            "target": 0.97,
            **run(spark, "digits", digits_table(spark), kw, args.epochs, 32, 2e-3),
        }
    if "fashion" in only:
        kw = {"hidden": [500, 500], "pretrain_epochs": 5, "cd_k": 1, "pretrain_lr": 0.01}
        results["fashion"] = {
            "model_kwargs": kw,
            "epochs": args.fashion_epochs,
            "target": 0.897,
            **run(spark, "fashion", args.fashion, kw, args.fashion_epochs, 128, 2e-3),
        }
    if "raster" in only:
        kw = {"hidden": [64, 64], "pretrain_epochs": 2, "cd_k": 1, "pretrain_lr": 0.01}
        results["raster"] = {
            "model_kwargs": kw,
            "epochs": 5,
            "target": 0.0,  # no target: per-class accuracy is what the issue asks for
            **run(spark, "raster", raster_table(spark, 256), kw, 5, 256, 1e-2, image_size=4),
        }
    RESULTS.mkdir(exist_ok=True)
    old = json.loads((RESULTS / "dbn.json").read_text()) if (RESULTS / "dbn.json").exists() else {}
    results = {**old, **results}
    (RESULTS / "dbn.json").write_text(json.dumps(results, indent=1))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    """dbn.md from the results (also written by ``--render``)."""
    lines = ["# Deep belief network accuracy (2 workers, local[2])", ""]
    lines += [
        "| data | target | pretrained DBN | no pretraining | fine-tuning epochs | wall (pretrained) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("digits", "fashion", "raster"):
        r = results.get(name)
        if not r:
            continue
        pre, scratch = r["pretrained"], r["no pretraining"]
        met = ("met" if pre["test_acc"] >= r["target"] else "missed") if r["target"] else "no target"
        lines.append(
            f"| {name} | {r['target'] or '-'} | **{pre['test_acc']:.4f}** ({met}) | {scratch['test_acc']:.4f} "
            f"| {r.get('epochs', '')} | {pre['wall_s']} s |"
        )
    if results.get("raster"):
        recall = results["raster"]["pretrained"]["per_class_recall"]
        lines += [
            "",
            "Synthetic raster, per-class recall (pretrained DBN): "
            + ", ".join(f"{c} {v:.3f}" for c, v in recall.items()),
        ]
    lines += ["", f"Run {results['run']}; model arguments and per-class recall in dbn.json."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "dbn.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
