"""Per-core rates for the billion-image plan (issue 24, docs/scale.md): ingest and embed of photos.

The plan in docs/scale.md multiplies per-core rates by a cluster's cores. The Fashion-MNIST
benchmarks give rates for 28x28 grayscale PNGs, which a catalogue of photos is not. This script
measures the two stages that touch pixels, on what the plan assumes: 224x224 RGB JPEGs of about
20 KB (synthetic: smooth gradients, shapes and sensor noise, so JPEG sizes and decode costs are a
photo's, not a flat image's), through the real operations on ``local[2]``:

* ``ingest`` of the folder (list, read, validate and decode each file, write the image table);
* ``embed`` with ``cnn`` (28x28 gray input: the JPEG decodes at reduced scale with PIL's draft)
  and with torchvision's ``resnet50`` at 224x224 (random weights: the speed does not depend on
  them; 4.1 GFLOPs per image).

Each rate is images/s on the 2 cores; per core = that / 2 (local[2] runs two task slots). Rounds
alternate the stages. The figures go to ``benchmarks/results/scale_rates.json`` and ``.md``.

    setsid nohup .venv/bin/python benchmarks/bench_scale_rates.py [--images 2000] [--rounds 2] &
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparkvision import api  # noqa: E402
from sparkvision.models import create_model  # noqa: E402
from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(rng: np.random.Generator, size: int = 224) -> Image.Image:
    """A photo-like RGB image: a colour gradient, a few filled shapes, mild sensor noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-120, 120, (2, 3))
    img = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.integers(0, size - 20, 2)
        w, h = rng.integers(10, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_folder(root: str, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    total = 0
    for i in range(n):
        path = os.path.join(root, f"img-{i:06d}.jpg")
        photo(rng).save(path, quality=90)
        total += os.path.getsize(path)
    return total


def model_dirs(tmp: str) -> dict[str, str]:
    dirs = {"cnn": os.path.join(tmp, "cnn"), "resnet50": os.path.join(tmp, "resnet50")}
    save_model_dir(
        dirs["cnn"],
        create_model("cnn", 10, 1),
        ModelSpec("cnn", 10, 1, {"image_size": 28}),
        [str(i) for i in range(10)],
        Preprocess(channels=1, size=(28, 28), mean=(0.5,), std=(0.5,)),
    )
    save_model_dir(
        dirs["resnet50"],
        create_model("resnet50", 10, 3),
        ModelSpec("resnet50", 10, 3, {}),
        [str(i) for i in range(10)],
        Preprocess(channels=3, size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD),
    )
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--resnet-images", type=int, default=600, help="resnet50 embeds this many (slow)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    folder, small = os.path.join(tmp, "photos"), os.path.join(tmp, "photos-small")
    nbytes = write_folder(folder, args.images)
    write_folder(small, args.resnet_images, seed=1)
    dirs = model_dirs(tmp)
    spark = api.get_spark(args.master)
    cores = int(spark.conf.get("spark.default.parallelism", "0") or 0) or os.cpu_count() or 1
    rounds = []
    for _ in range(args.rounds):
        row: dict[str, float] = {"load_before": os.getloadavg()[0]}
        table, table_small = os.path.join(tmp, "table"), os.path.join(tmp, "table-small")
        t0 = time.perf_counter()
        s = api.ingest(spark, source=folder, table=table, labeled=False, overwrite=True)
        row["ingest_images_per_s"] = args.images / (time.perf_counter() - t0)
        assert s["rows_written"] == args.images, s
        api.ingest(spark, source=small, table=table_small, labeled=False, overwrite=True)
        t0 = time.perf_counter()
        api.embed(spark, model_dir=dirs["cnn"], table=table, out=os.path.join(tmp, "e-cnn"), overwrite=True)
        row["embed_cnn_images_per_s"] = args.images / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        api.embed(
            spark,
            model_dir=dirs["resnet50"],
            table=table_small,
            out=os.path.join(tmp, "e-r50"),
            overwrite=True,
            batch_size=64,
        )
        row["embed_resnet50_images_per_s"] = args.resnet_images / (time.perf_counter() - t0)
        row["load_after"] = os.getloadavg()[0]
        rounds.append({k: round(v, 2) for k, v in row.items()})
        print(rounds[-1], flush=True)
    keys = ("ingest_images_per_s", "embed_cnn_images_per_s", "embed_resnet50_images_per_s")
    med = {k: round(float(np.median([r[k] for r in rounds])), 1) for k in keys}
    per_core = {k.replace("_images_per_s", ""): round(v / cores, 1) for k, v in med.items()}
    res = {
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "master": args.master,
        "slots": cores,
        "images": args.images,
        "resnet_images": args.resnet_images,
        "mean_jpeg_bytes": round(nbytes / args.images),
        "rounds": rounds,
        "median_images_per_s": med,
        "per_core_images_per_s": per_core,
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "scale_rates.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [
        f"# Per-core rates on 224x224 RGB JPEGs ({res['mean_jpeg_bytes']:,} B mean), {args.master}",
        "",
        f"Run {res['created']}; {args.images:,} images for ingest and cnn, {args.resnet_images:,} for "
        f"resnet50; median of {args.rounds} rounds; per core = images/s / {cores} slots.",
        "",
        "| stage | images/s | per core | rounds (load before-after) |",
        "|---|---:|---:|---|",
    ]
    for k in keys:
        spread = ", ".join(f"{r[k]:.1f} ({r['load_before']:.1f}-{r['load_after']:.1f})" for r in rounds)
        lines.append(
            f"| {k.replace('_images_per_s', '')} | {med[k]:,.1f} | {med[k] / cores:,.1f} | {spread} |"
        )
    with open(os.path.join(args.results, "scale_rates.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    spark.stop()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
