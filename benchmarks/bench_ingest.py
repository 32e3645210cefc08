"""Ingest throughput: sparkvision (Spark, decode and validate on the executors) next to a plain
single-process PIL loop doing the same decode-and-validate work on the same inputs, in one run.

    .venv/bin/python benchmarks/bench_ingest.py [--files 10000] [--master local[*]]

Two workloads:
  idx     Fashion-MNIST IDX (70,000 records) -> image table. Plain loop: gunzip, parse, PNG-encode
          each record, sha256.
  folder  a generated folder of JPEG (64x64 RGB) and PNG (28x28 gray) files -> image table. Plain
          loop: read the file's bytes, sha256, sparkvision.data.images.inspect_image.

The Spark figures include everything an ingest does (listing, decode, dedup, writing the table and
the rejects) but not the JVM start, which is paid once per session. Results go to
benchmarks/results/ingest.json and ingest.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sparkvision.data.datasets import FASHION_MNIST_FILES, fashion_mnist_dir
from sparkvision.data.idx import pair_idx_files, parse_idx
from sparkvision.data.images import encode_png, inspect_image
from sparkvision.data.ingest import ingest
from sparkvision.spark.session import get_spark

RESULTS = Path(__file__).parent / "results"


def generate_folder(root: Path, n: int, seed: int = 0) -> int:
    """``n`` files in 10 class folders: even ones 64x64 RGB JPEG, odd ones 28x28 grayscale PNG."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        d = root / f"class_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if i % 2 == 0:
            arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth-ish content, JPEG-sized
            Image.fromarray(arr).resize((64, 64), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            name = f"{i}.jpg"
        else:
            arr = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(arr).save(buf, format="PNG")
            name = f"{i}.png"
        (d / name).write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def plain_folder(root: Path) -> int:
    n = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hashlib.sha256(data).hexdigest()
            inspect_image(data)
            n += 1
    return n


def plain_idx(src: str) -> int:
    n = 0
    for _split, images_name, _labels in pair_idx_files(list(FASHION_MNIST_FILES)):
        images = parse_idx(Path(src, images_name).read_bytes(), images_name)  # gunzip + parse
        for record in images:
            hashlib.sha256(encode_png(record)).hexdigest()
            n += 1
    return n


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(files: int, master: str) -> dict:
    spark = get_spark(master)
    spark.range(1000).selectExpr("sum(id)").collect()  # JVM warm-up, not part of any figure
    work = Path(tempfile.mkdtemp(prefix="sv-bench-"))
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "master": master,
            "spark": spark.version,
        },
        "workloads": {},
    }
    try:
        # ---------------------------------------------------------------- Fashion-MNIST IDX
        src = fashion_mnist_dir()
        summary, spark_s = timed(lambda: ingest(spark, src, str(work / "fm"), kind="idx", mode="overwrite"))
        n_plain, plain_s = timed(lambda: plain_idx(src))
        assert n_plain == summary.rows_written + summary.duplicates_in_source, (n_plain, summary)
        results["workloads"]["fashion_mnist_idx"] = _entry(n_plain, spark_s, plain_s, summary.rows_written)

        # ---------------------------------------------------------------- generated folder
        root = work / "folder"
        size, gen_s = timed(lambda: generate_folder(root, files))
        summary, spark_s = timed(
            lambda: ingest(spark, str(root), str(work / "folder_table"), mode="overwrite")
        )
        n_plain, plain_s = timed(lambda: plain_folder(root))
        assert n_plain == files
        entry = _entry(files, spark_s, plain_s, summary.rows_written)
        entry["bytes"] = size[0] if isinstance(size, tuple) else size
        entry["generate_s"] = round(gen_s, 2)
        results["workloads"]["folder_jpeg_png"] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _entry(n: int, spark_s: float, plain_s: float, rows: int) -> dict:
    return {
        "images": n,
        "rows_written": rows,
        "sparkvision_s": round(spark_s, 2),
        "plain_s": round(plain_s, 2),
        "sparkvision_images_per_s": round(n / spark_s, 1),
        "plain_images_per_s": round(n / plain_s, 1),
        "ratio_sparkvision_over_plain": round(plain_s / spark_s, 3),
    }


def write_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Ingest benchmark",
        "",
        f"`benchmarks/bench_ingest.py` on {m['cpus']} CPUs, Spark {m['spark']} `{m['master']}`, Python {m['python']}.",
        "Ratio = sparkvision images/s divided by a plain single-process PIL loop doing the same",
        "decode-and-validate work on the same inputs, measured in the same run.",
        "",
        "| workload | images | sparkvision (images/s) | plain PIL loop (images/s) | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, w in results["workloads"].items():
        lines.append(
            f"| {name} | {w['images']:,} | {w['sparkvision_images_per_s']:,.0f} | "
            f"{w['plain_images_per_s']:,.0f} | {w['ratio_sparkvision_over_plain']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000, help="generated folder size (default 10,000)")
    p.add_argument("--master", default=None, help="Spark master (default $SPARKVISION_MASTER or local[*])")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    from sparkvision.spark.session import resolve_master

    results = run(args.files, resolve_master(args.master))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "ingest.md").write_text(write_markdown(results))
    for name, w in results["workloads"].items():
        print(
            f"{name}: sparkvision {w['sparkvision_images_per_s']:,.0f} images/s, "
            f"plain {w['plain_images_per_s']:,.0f} images/s, ratio {w['ratio_sparkvision_over_plain']:.2f}"
        )
    print(f"wrote {args.out / 'ingest.json'} and {args.out / 'ingest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
