"""Peak memory and time of decoding a rank's training shard: ``decode_shard`` against the plain way.

The plain way decodes every image to an (H, W, C) array, ``np.stack``s them and permutes to
(N, C, H, W): three decoded copies at the peak. ``decode_shard`` keeps the encoded bytes, then
decodes each image straight into one preallocated tensor. Each variant runs in its own process
and reports the rise of its peak RSS (``ru_maxrss``) over the decoded size; both in one run, so
the ratio holds on a shared machine.

    .venv/bin/python benchmarks/bench_shard_memory.py [--images 20000] [--size 64]

Results: benchmarks/results/shard_memory.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _table(n: int, size: int):
    """JPEG photos-like images (smooth colour patterns, ~1.4 kB each at 64x64): what a lake holds."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    pool = []
    for k in range(50):
        rgb = np.stack(
            [
                (128 + 100 * np.sin(xx / (3 + k) + c) * np.cos(yy / (5 + c))).astype(np.uint8)
                for c in range(3)
            ],
            -1,
        )
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    return pa.table(
        {
            "image": [pool[i % 50] for i in range(n)],
            "label": [i % 10 for i in range(n)],
            "split": ["train"] * n,
        }
    )


def _plain(batches, channels: int, size: tuple[int, int]):
    import numpy as np
    import torch

    from sparkvision.transforms.preprocess import decode_image

    arrays = [
        decode_image(data, channels, size).transpose(1, 2, 0)  # HWC: the old stack-then-permute path
        for b in batches
        for data in b.column("image").to_pylist()
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _child(variant: str, n: int, size: int) -> None:
    import torch  # noqa: F401 - imported before the baseline so its own RSS is not counted

    from sparkvision.train.data import decode_shard

    batches = _table(n, size).to_batches(max_chunksize=1024)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "plain":
        images = _plain(batches, 3, (size, size))
    else:
        images = decode_shard(iter(batches), 3, (size, size))[0].images
    seconds = time.perf_counter() - t0
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(
        json.dumps(
            {
                "variant": variant,
                "decoded_bytes": images.numel(),
                "peak_rise_bytes": rise,
                "seconds": round(seconds, 2),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.images, args.size)
        return
    rows = {}
    for variant in ("plain", "decode_shard"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--images",
                str(args.images),
                "--size",
                str(args.size),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows[variant] = r = json.loads(out.strip().splitlines()[-1])
        r["peak_over_decoded"] = round(r["peak_rise_bytes"] / r["decoded_bytes"], 2)
        print(
            f"{variant:>13}: decoded {r['decoded_bytes'] / 2**20:.0f} MiB, peak rise "
            f"{r['peak_rise_bytes'] / 2**20:.0f} MiB ({r['peak_over_decoded']}x), {r['seconds']} s"
        )
    res = {
        "images": args.images,
        "size": [3, args.size, args.size],
        "rows": rows,
        "peak_ratio_decode_shard_vs_plain": round(
            rows["decode_shard"]["peak_rise_bytes"] / rows["plain"]["peak_rise_bytes"], 3
        ),
        "time_ratio_decode_shard_vs_plain": round(
            rows["decode_shard"]["seconds"] / rows["plain"]["seconds"], 3
        ),
        "machine": f"{os.cpu_count()} CPU cores (shared)",
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "shard_memory.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [
        "# Shard decoding: peak memory and time",
        "",
        f"{args.images:,} JPEG images decoded to 3x{args.size}x{args.size} uint8, one process per variant "
        "(`benchmarks/bench_shard_memory.py`).",
        "",
        "| variant | decoded | peak RSS rise | peak / decoded | time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['decoded_bytes'] / 2**20:.0f} MiB | {r['peak_rise_bytes'] / 2**20:.0f} MiB | "
            f"{r['peak_over_decoded']}x | {r['seconds']} s |"
        )
    lines += [
        "",
        f"decode_shard / plain: peak {res['peak_ratio_decode_shard_vs_plain']}, "
        f"time {res['time_ratio_decode_shard_vs_plain']}.",
    ]
    with open(os.path.join(HERE, "results", "shard_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1])


if __name__ == "__main__":
    main()
