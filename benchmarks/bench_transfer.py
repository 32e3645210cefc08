"""Transfer learning from a weights file against training from scratch (issue 21).

On Fashion-MNIST: train ``--model`` (default ``torchvision/resnet18`` at 32 px) on classes 0-4
with every train row of those classes; its ``model.safetensors`` is the weights file. Then, on
classes 5-9 (their test rows for scoring), with k labelled train rows per class (k = 1, 5, 10,
100; the same seeded rows for both; 200 test rows per class scored), fine-tune from that file (``--init-weights``, ImageNet-style
lower backbone rate and the table's normalisation, as the source run used) and train the same
model from random weights, with the same epochs and recipe. Target: transfer beats scratch by
>= 5 points at 100 labels per class.

    .venv/bin/python benchmarks/bench_transfer.py [--table data/fashion-mnist]
        [--model torchvision/resnet18] [--image-size 32] [--source-epochs 2] [--epochs 20]

Results: benchmarks/results/transfer.json and transfer.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pyspark.sql import Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkvision.api import train  # noqa: E402
from sparkvision.data.table import TableMeta, read_meta, read_table, write_meta  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402

RESULTS = HERE / "results"
OUT = HERE / "out" / "transfer"
SHOTS = (1, 5, 10, 100)
TEST_PER_CLASS = (
    200  # 1,000 scored rows: every epoch is scored, and scoring 5,000 would cost more than training
)


def write_table(spark: Any, df: Any, path: Path, class_names: list[str]) -> str:
    if not (path / "_SUCCESS").exists():
        df.repartition(4).write.mode("overwrite").parquet(str(path))
        write_meta(spark, str(path), TableMeta(class_names=class_names))
    return str(path)


def tables(spark: Any, table: str) -> tuple[str, dict[int, str]]:
    """The source table (classes 0-4) and, per k, the target table (classes 5-9 relabelled 0-4:
    k seeded train rows per class, 200 seeded test rows per class)."""
    names = read_meta(spark, table).class_names
    df = read_table(spark, table)
    source = write_table(spark, df.where(F.col("label") < 5), OUT / "source", names[:5])
    target = df.where(F.col("label") >= 5).withColumn("label", F.col("label") - 5)
    rank = F.row_number().over(Window.partitionBy("label").orderBy(F.xxhash64("content_id", F.lit(7))))
    train_rows = target.where(F.col("split") == "train").withColumn("_r", rank)
    test_rows = (
        target.where(F.col("split") == "test").withColumn("_r", rank).where(F.col("_r") <= TEST_PER_CLASS)
    )
    out = {}
    for k in SHOTS:
        part = train_rows.where(F.col("_r") <= k).unionByName(test_rows).drop("_r")
        out[k] = write_table(spark, part, OUT / f"target-{k}", names[5:])
    return source, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--model", default="torchvision/resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--source-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    spark = get_spark(master="local[2]")
    source, targets = tables(spark, args.table)
    common = {"model": args.model, "image_size": args.image_size, "workers": 1, "overwrite": True}
    src_dir = OUT / "source-model"
    t0 = time.perf_counter()
    src = train(spark, table=source, out=str(src_dir), epochs=args.source_epochs, batch_size=128, **common)
    source_s = time.perf_counter() - t0
    print(f"source (classes 0-4): acc {src['test_acc']}, {source_s:.0f} s", flush=True)
    weights = str(src_dir / "model.safetensors")
    rows = []
    for k in SHOTS:
        batch = min(32, 5 * k)
        for how, extra in (("transfer", {"init_weights": weights, "normalize": "table"}), ("scratch", {})):
            t1 = time.perf_counter()
            res = train(
                spark,
                table=targets[k],
                out=str(OUT / f"{how}-{k}"),
                epochs=args.epochs,
                batch_size=batch,
                **common,
                **extra,
            )
            rows.append(
                {
                    "shots": k,
                    "how": how,
                    "test_acc": res["test_acc"],
                    "best_acc": max(h["test_acc"] for h in res["history"]),
                    "wall_s": round(time.perf_counter() - t1, 1),
                }
            )
            print(rows[-1], flush=True)
    acc = {(r["shots"], r["how"]): r["test_acc"] for r in rows}
    gain = {k: round(100 * (acc[k, "transfer"] - acc[k, "scratch"]), 2) for k in SHOTS}
    result = {
        "run": time.strftime("%Y-%m-%d %H:%M"),
        "model": args.model,
        "image_size": args.image_size,
        "source": {
            "classes": "0-4",
            "test_acc": src["test_acc"],
            "epochs": args.source_epochs,
            "wall_s": round(source_s, 1),
        },
        "epochs": args.epochs,
        "runs": rows,
        "gain_points": gain,
        "target_points": 5.0,
        "met": gain[100] >= 5.0,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transfer.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Transfer from a weights file vs scratch ({args.model}, {args.image_size} px, Fashion-MNIST)",
        "",
        f"Run {result['run']}. Source: classes 0-4, every train row, {args.source_epochs} epochs: test accuracy "
        f"{src['test_acc']:.4f} ({source_s:.0f} s). Target: classes 5-9, k labels per class, {args.epochs} epochs, "
        f"scored on {5 * TEST_PER_CLASS:,} of their test rows.",
        "",
        "| labels per class | transfer | scratch | gain (points) |",
        "|---:|---:|---:|---:|",
    ]
    for k in SHOTS:
        lines.append(f"| {k} | {acc[k, 'transfer']:.4f} | {acc[k, 'scratch']:.4f} | {gain[k]:+.1f} |")
    lines += [
        "",
        f"Target: transfer >= scratch + 5 points at 100 labels per class: **{'met' if result['met'] else 'missed'}** ({gain[100]:+.1f}).",
    ]
    (RESULTS / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
