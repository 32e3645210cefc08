"""Batch classification benchmark (issue 3): Parquet in, Parquet out, `cnn` on Fashion-MNIST.

sparkvision's `predict_table` end to end (read the image table, decode, classify, write the
prediction table) against a plain single-process PyTorch loop over the same Parquet data (pyarrow
read, PIL decode, eager model with all cores, pyarrow write), alternating rounds in one run.
Also reported: the same plain loop using our frozen TorchScript model, to separate "faster
inference" from "less overhead". Targets: >= 2,000 images/s on 2 cores and ratio >= 0.9.

    .venv/bin/python benchmarks/bench_predict.py [--table data/fashion-mnist] [--model runs/bench-cnn]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparkvision.inference.predict import predict_table  # noqa: E402
from sparkvision.inference.runtime import optimize_for_cpu_inference  # noqa: E402
from sparkvision.models import create_model  # noqa: E402
from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.transforms.preprocess import preprocess_batch  # noqa: E402


def plain_loop(table: str, model_dir: str, out: str, frozen: bool, batch: int = 512) -> tuple[float, int]:
    """What a user would write without sparkvision: read Parquet, decode, classify, write Parquet."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    lm = load_model_dir(model_dir)
    model = lm.model.eval()
    fn = (
        optimize_for_cpu_inference(model, torch.zeros(8, lm.preprocess.channels, *lm.preprocess.size))
        if frozen
        else model
    )
    files = sorted(glob.glob(os.path.join(table.replace("file://", ""), "*.parquet")))
    writer = None
    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for rb in pf.iter_batches(batch_size=batch, columns=["content_id", "path", "image"]):
            x, _ = preprocess_batch(rb.column("image").to_pylist(), lm.preprocess)
            if not frozen:
                x = x.contiguous()
            with torch.inference_mode():
                p = torch.softmax(fn(x), 1)
            conf, idx = p.topk(3, 1)
            t = pa.table(
                {
                    "content_id": rb.column("content_id"),
                    "path": rb.column("path"),
                    "pred_label": pa.array(idx[:, 0].numpy().astype("int32")),
                    "topk_probs": pa.array(conf.numpy().tolist(), pa.list_(pa.float32())),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(out, t.schema, compression="zstd")
            writer.write_table(t)
            n += rb.num_rows
    if writer is not None:
        writer.close()
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--model", default="runs/bench-cnn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", default=os.path.join(HERE, "results", "predict.json"))
    args = ap.parse_args()
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    spark = get_spark("local[2]")
    if not os.path.exists(args.table):
        from sparkvision.data.datasets import ingest_fashion_mnist

        ingest_fashion_mnist(spark, args.table)
    tmp = tempfile.mkdtemp(prefix="bench-predict-")
    model_dir = args.model
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        model_dir = os.path.join(tmp, "untrained-cnn")  # speed does not depend on the weights
        save_model_dir(
            model_dir,
            create_model("cnn", 10, 1),
            ModelSpec("cnn", 10, 1, {"image_size": 28}),
            [str(i) for i in range(10)],
            Preprocess(1, (28, 28), (0.286,), (0.353,)),
        )
    rounds = []
    for r in range(args.rounds):
        out = os.path.join(tmp, f"sv-{r}")
        s = predict_table(spark, model_dir, args.table, out)
        plain, n = plain_loop(args.table, model_dir, os.path.join(tmp, f"plain-{r}.parquet"), frozen=False)
        plain_frozen, _ = plain_loop(
            args.table, model_dir, os.path.join(tmp, f"plainf-{r}.parquet"), frozen=True
        )
        assert n == s["rows"], (n, s["rows"])
        rounds.append(
            {
                "rows": n,
                "sparkvision_images_per_s": s["images_per_s"],
                "plain_eager_images_per_s": round(plain, 1),
                "plain_frozen_images_per_s": round(plain_frozen, 1),
                "ratio_vs_plain_eager": round(s["images_per_s"] / plain, 3),
                "ratio_vs_plain_frozen": round(s["images_per_s"] / plain_frozen, 3),
            }
        )
        print(rounds[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    med = {k: round(float(np.median([r[k] for r in rounds])), 3) for k in rounds[0] if k != "rows"}
    res = {
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "model_dir": model_dir,
        "rounds": rounds,
        "median": med,
        "targets": {"images_per_s": 2000, "ratio": 0.9},
        "met": {
            "images_per_s": med["sparkvision_images_per_s"] >= 2000,
            "ratio": med["ratio_vs_plain_eager"] >= 0.9,
        },
    }
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(res, f, indent=2)
    lines = [
        "# Batch classification benchmark (Fashion-MNIST, 70,000 images, cnn, CPU)",
        "",
        f"Run {res['created']} on {res['cores']} cores, Spark local[{res['cores']}], median of {args.rounds} "
        "alternating rounds. Parquet in, Parquet out, end to end.",
        "",
        "| round | sparkvision img/s | plain eager img/s | plain frozen img/s | ratio vs eager | ratio vs frozen |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {i + 1} | {r['sparkvision_images_per_s']} | {r['plain_eager_images_per_s']} | "
        f"{r['plain_frozen_images_per_s']} | {r['ratio_vs_plain_eager']} | {r['ratio_vs_plain_frozen']} |"
        for i, r in enumerate(rounds)
    ]
    lines += [
        "",
        f"Median: **{med['sparkvision_images_per_s']:.0f} images/s** (target 2,000: "
        f"{'met' if res['met']['images_per_s'] else 'MISSED'}), ratio vs plain eager PyTorch "
        f"**{med['ratio_vs_plain_eager']}** (target 0.9: {'met' if res['met']['ratio'] else 'MISSED'}), "
        f"ratio vs a plain loop using the same frozen model {med['ratio_vs_plain_frozen']}.",
    ]
    with open(args.results.replace(".json", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
