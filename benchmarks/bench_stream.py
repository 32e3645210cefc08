"""The stream shard cache (issue 17): a rank's memory against the table's size, and stream against
memory on Fashion-MNIST.

(a) One epoch of ``cnn`` with 2 ranks and ``cache="stream"`` on tables of 64x64 RGB JPEG rows at
    three sizes (made once with Spark from synthetic pixels, each row its own image). The peak RSS
    of each rank (the Spark Python worker running it) is sampled from /proc: the kernel's VmHWM
    plus the largest RssAnon seen every 0.2 s. Target: peak per rank flat across the sizes
    (growth under 10%) and under 1 GB.
(b) Fashion-MNIST, 2 ranks: ``--rounds`` alternating one-epoch runs of memory and stream (order
    flipped each round) for the per-epoch training images/s ratio (target >= 0.9), then one
    ``--epochs`` run of each for the test accuracy (target: within 0.2 points).

    .venv/bin/python benchmarks/bench_stream.py [--sizes 50000,150000,300000] [--epochs 20]
        [--rounds 3] [--table data/fashion-mnist] [--skip-sizes] [--skip-fmnist]

Results: benchmarks/results/stream.json and stream.md (``--results``). Python workers are not
reused (``spark.python.worker.reuse=false``), so each run's ranks are fresh processes whose
VmHWM is theirs alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkvision.data.schema import IMAGE_SCHEMA  # noqa: E402
from sparkvision.data.table import TableMeta, is_image_table, read_meta, read_table, write_meta  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.train import TrainConfig, train, train_df  # noqa: E402

MiB = 2**20


# ----------------------------------------------------------------------------- data
def synthetic_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Row ``id`` -> a 64x64 RGB JPEG of its own (smooth random colours, a class-dependent tint)."""
    for batch in batches:
        ids = batch.column("id").to_numpy()
        images, cids, labels = [], [], []
        for i in ids.tolist():
            rng = np.random.default_rng(i)
            label = i % 10
            small = rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)
            small[..., label % 3] += np.uint8(5 * label)
            buf = io.BytesIO()
            Image.fromarray(small).resize((64, 64), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            images.append(data)
            cids.append(hashlib.sha256(data).hexdigest())
            labels.append(label)
        n = len(images)
        yield pa.RecordBatch.from_pydict(
            {
                "content_id": cids,
                "path": [f"synthetic#{i}" for i in ids.tolist()],
                "image": images,
                "format": ["JPEG"] * n,
                "height": [64] * n,
                "width": [64] * n,
                "channels": [3] * n,
                "label": labels,
                "label_name": [f"c{k}" for k in labels],
                "split": ["train"] * n,
            },
            schema=pa.schema(
                [
                    ("content_id", pa.string()),
                    ("path", pa.string()),
                    ("image", pa.binary()),
                    ("format", pa.string()),
                    ("height", pa.int32()),
                    ("width", pa.int32()),
                    ("channels", pa.int32()),
                    ("label", pa.int32()),
                    ("label_name", pa.string()),
                    ("split", pa.string()),
                ]
            ),
        )


def make_table(spark: SparkSession, path: str, rows: int) -> float:
    """Write the synthetic image table ``path`` of ``rows`` rows (kept: later runs reuse it)."""
    if is_image_table(spark, path):
        return 0.0
    t0 = time.perf_counter()
    parts = max(2, rows // 20000)
    df = spark.range(rows, numPartitions=parts).mapInArrow(synthetic_rows, IMAGE_SCHEMA)
    df.write.mode("overwrite").parquet(path)
    write_meta(spark, path, TableMeta(class_names=[f"c{k}" for k in range(10)], sources=["synthetic"]))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- rank memory
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "RssAnon"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process we can read."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        procs[int(name)] = (ppid, cmd)
    return procs


def python_workers() -> list[int]:
    """This process's Spark Python workers: forks of a ``pyspark.daemon`` under our own JVM (other
    users' Spark jobs on the same machine are not counted)."""
    procs = _processes()
    mine, frontier = set(), [os.getpid()]
    while frontier:  # our descendants
        parent = frontier.pop()
        kids = [p for p, (pp, _) in procs.items() if pp == parent and p not in mine]
        mine.update(kids)
        frontier.extend(kids)
    daemon = {p for p in mine if b"pyspark.daemon" in procs[p][1]}
    return [p for p in daemon if procs[p][0] in daemon]


class RankMemory:
    """Samples the Python workers' memory every ``interval`` s while a run is on."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peaks = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in python_workers():
                s = _status(pid)
                if s:
                    p = self.peaks.setdefault(pid, {"VmHWM": 0, "RssAnon": 0})
                    p["VmHWM"] = max(p["VmHWM"], s.get("VmHWM", 0))
                    p["RssAnon"] = max(p["RssAnon"], s.get("RssAnon", 0))

    def __enter__(self) -> RankMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def ranks(self, n: int) -> list[dict[str, float]]:
        """The ``n`` workers with the highest peaks (the ranks: other tasks never import torch), MiB."""
        top = sorted(self.peaks.values(), key=lambda p: -p["VmHWM"])[:n]
        return [
            {"peak_rss_mib": round(p["VmHWM"] / MiB, 1), "peak_anon_mib": round(p["RssAnon"] / MiB, 1)}
            for p in top
        ]


def measured_train(spark: SparkSession, run) -> tuple[dict, list[dict[str, float]], float]:
    t0 = time.perf_counter()
    with RankMemory() as mem:
        summary = run()
    return summary, mem.ranks(2), round(time.perf_counter() - t0, 1)


# ----------------------------------------------------------------------------- plain PyTorch floor
FLOOR = r"""
import sys, torch
from sparkvision.models.cnn import cnn
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
B = int(sys.argv[1])
m = cnn(num_classes=10, in_channels=3, image_size=64).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=5e-4)
for _ in range(int(sys.argv[3])):
    x = torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8).float().div(255)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (B,))
    loss = torch.nn.functional.cross_entropy(m(x), y, label_smoothing=0.05)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "RssAnon")):
        print(line.split(":")[0], int(line.split()[1]) * 1024)
"""


def plain_torch_floor(local_batch: int, threads: int = 1, steps: int = 30) -> dict[str, float]:
    """Peak RSS of a plain PyTorch process running the ranks' model and steps on random tensors
    (no Spark, no data): what a rank cannot go below, whatever the input path."""
    import subprocess

    res = subprocess.run(
        [sys.executable, "-c", FLOOR, str(local_batch), str(threads), str(steps)],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(HERE),
    )
    got = dict(line.split() for line in res.stdout.splitlines())
    return {
        "local_batch": local_batch,
        "peak_rss_mib": round(int(got["VmHWM"]) / MiB, 1),
        "anon_at_end_mib": round(int(got["RssAnon"]) / MiB, 1),
    }


# ----------------------------------------------------------------------------- (a) sizes
def bench_sizes(spark: SparkSession, sizes: list[int], root: str, out: str, batch: int) -> dict:
    """One epoch per size with the stream cache, then the memory cache on the smallest table: the
    same run with the shard decoded in memory, for what the rank holds besides its shard."""
    runs = []
    for n, cache in [*((n, "stream") for n in sizes), (sizes[0], "memory")]:
        path = os.path.join(root, f"rgb64-{n}")
        made = make_table(spark, path, n)
        cfg = TrainConfig(epochs=1, workers=2, cache=cache, eval_split=None, batch_size=batch)
        summary, ranks, wall = measured_train(spark, lambda cfg=cfg, path=path: train(spark, path, out, cfg))
        runs.append(
            {
                "rows": n,
                "decoded_gib": round(n * 3 * 64 * 64 / 2**30, 2),
                "table_made_s": round(made, 1),
                "cache": summary["cache"],
                "ranks": ranks,
                "images_per_s": summary["images_per_s"],
                "end_to_end_images_per_s": round(n / wall, 1),
                "data_load_s": summary["data_load_s"],
                "wall_s": wall,
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    reference = runs.pop()
    peaks = [max(r["peak_rss_mib"] for r in run["ranks"]) for run in runs]
    growth = (max(peaks) - peaks[0]) / peaks[0]
    floor = plain_torch_floor(batch // 2)
    print("plain PyTorch floor", json.dumps(floor), flush=True)
    return {
        "runs": runs,
        "memory_cache_on_smallest": reference,
        "plain_torch_floor": floor,
        "peak_rss_growth": round(growth, 3),
        "max_peak_rss_mib": max(peaks),
        "flat_met": growth < 0.10,
        "under_1gb_met": max(peaks) < 1024,
    }


# ----------------------------------------------------------------------------- (b) Fashion-MNIST
def bench_fmnist(
    spark: SparkSession, table: str, out: str, epochs: int, rounds: int, keep_every: int
) -> dict:
    names = read_meta(spark, table).class_names
    df = read_table(spark, table).where(F.col("split").isin("train", "test"))
    if keep_every > 1:  # a deterministic subset, for a quick run
        df = df.where(F.abs(F.xxhash64("content_id")) % keep_every == 0)

    def run(cache: str, n_epochs: int):
        cfg = TrainConfig(epochs=n_epochs, workers=2, cache=cache)
        return measured_train(spark, lambda: train_df(spark, df, names, os.path.join(out, cache), cfg))

    throughput = []
    for r in range(rounds):
        order = ("memory", "stream") if r % 2 == 0 else ("stream", "memory")
        got = {cache: run(cache, 1) for cache in order}
        ips = {c: got[c][0]["images_per_s"] for c in order}
        throughput.append(
            {
                "memory_images_per_s": ips["memory"],
                "stream_images_per_s": ips["stream"],
                "ratio": round(ips["stream"] / ips["memory"], 3),
                "memory_ranks": got["memory"][1],
                "stream_ranks": got["stream"][1],
            }
        )
        print(json.dumps(throughput[-1]), flush=True)
    accuracy = {}
    for cache in ("memory", "stream"):
        summary, ranks, wall = run(cache, epochs)
        accuracy[cache] = {
            "cache": summary["cache"],
            "test_acc": summary["test_acc"],
            "per_epoch": [
                {k: h[k] for k in ("epoch", "test_acc", "train_loss", "images_per_s")}
                for h in summary["history"]
            ],
            "ranks": ranks,
            "wall_s": wall,
        }
        print(cache, json.dumps({k: v for k, v in accuracy[cache].items() if k != "per_epoch"}), flush=True)
    ratio = float(np.median([t["ratio"] for t in throughput])) if throughput else None
    diff = abs(accuracy["stream"]["test_acc"] - accuracy["memory"]["test_acc"])
    paired = [
        s["images_per_s"] / m["images_per_s"]
        for m, s in zip(accuracy["memory"]["per_epoch"], accuracy["stream"]["per_epoch"], strict=True)
    ]
    return {
        "rows_kept": f"1 in {keep_every}" if keep_every > 1 else "all",
        "epochs": epochs,
        "throughput_rounds": throughput,
        "throughput_ratio": None if ratio is None else round(ratio, 3),
        "throughput_met": ratio is not None and ratio >= 0.9,
        "paired_epoch_ratio_median": round(float(np.median(paired)), 3),
        "accuracy": accuracy,
        "accuracy_diff_points": round(100 * diff, 2),
        "accuracy_met": diff <= 0.002,
    }


# ----------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    lines = [
        "# Streaming shard cache (issue 17)",
        "",
        f"Run {res['created']}, {res['cores']} cores, master {res['master']}, 2 ranks "
        "(`benchmarks/bench_stream.py`). Peak RSS: VmHWM of each rank's Python worker; anon: the "
        "largest RssAnon sampled every 0.2 s (the rest of the RSS is shared library pages).",
    ]
    a = res.get("sizes")
    if a:
        lines += [
            "",
            f"## (a) One epoch of cnn, `--cache stream`, 64x64 RGB JPEG rows (batch {res['batch_size']})",
            "",
            "| rows | cache | decoded | peak RSS per rank (MiB) | peak anon (MiB) | train img/s | "
            "end-to-end img/s | load s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in [*a["runs"], a["memory_cache_on_smallest"]]:
            lines.append(
                f"| {r['rows']:,} | {r['cache']} | {r['decoded_gib']} GiB | {' / '.join(str(k['peak_rss_mib']) for k in r['ranks'])} | "
                f"{' / '.join(str(k['peak_anon_mib']) for k in r['ranks'])} | {r['images_per_s']} | "
                f"{r['end_to_end_images_per_s']} | {r['data_load_s']} |"
            )
        lines += [
            "",
            f"- Peak RSS growth from the smallest to the largest table: **{a['peak_rss_growth']:.1%}** "
            f"(target < 10%: {'met' if a['flat_met'] else 'MISSED'}); largest peak "
            f"**{a['max_peak_rss_mib']} MiB** (target < 1 GiB: {'met' if a['under_1gb_met'] else 'MISSED'}).",
            f"- The memory cache on the smallest table (its shard decoded: "
            f"{a['memory_cache_on_smallest']['decoded_gib']} GiB over both ranks) peaks at "
            f"{max(k['peak_rss_mib'] for k in a['memory_cache_on_smallest']['ranks'])} MiB: what a rank "
            "holds besides its shard (torch, the model, the step's activations, the batches).",
        ]
        f = a.get("plain_torch_floor")
        if f:
            lines.append(
                f"- Floor: a plain PyTorch process (no Spark, no data: random tensors) running the same "
                f"model, optimizer and local batch ({f['local_batch']}) with the CUDA build of torch peaks at "
                f"**{f['peak_rss_mib']} MiB**. The ranks' peak above it "
                f"({round(a['max_peak_rss_mib'] - f['peak_rss_mib'], 1)} MiB) is all that Spark's worker, DDP "
                "and the input path add."
            )
    b = res.get("fmnist")
    if b:
        lines += [
            "",
            f"## (b) Fashion-MNIST, stream against memory ({b['rows_kept']} rows)",
            "",
            "| round | memory img/s | stream img/s | ratio |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {i + 1} | {t['memory_images_per_s']} | {t['stream_images_per_s']} | {t['ratio']} |"
            for i, t in enumerate(b["throughput_rounds"])
        ]
        acc = b["accuracy"]
        lines += [
            "",
            f"- Per-epoch training images/s, stream / memory (median of alternating rounds): "
            f"**{b['throughput_ratio']}** (target >= 0.9: {'met' if b['throughput_met'] else 'MISSED'}); "
            f"epoch by epoch over the two {b['epochs']}-epoch runs: {b['paired_epoch_ratio_median']}.",
            f"- Test accuracy after {b['epochs']} epochs: memory {acc['memory']['test_acc']:.4f}, stream "
            f"{acc['stream']['test_acc']:.4f}: {b['accuracy_diff_points']} points apart (target <= 0.2: "
            f"{'met' if b['accuracy_met'] else 'MISSED'}).",
            f"- Peak RSS per rank over the {b['epochs']}-epoch runs: memory "
            f"{' / '.join(str(k['peak_rss_mib']) for k in acc['memory']['ranks'])} MiB, stream "
            f"{' / '.join(str(k['peak_rss_mib']) for k in acc['stream']['ranks'])} MiB.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50000,150000,300000", help="rows of the (a) tables")
    ap.add_argument("--tables", default="runs/bench-stream", help="where the (a) tables are made (kept)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=20, help="(b) accuracy runs' epochs")
    ap.add_argument("--rounds", type=int, default=3, help="(b) alternating one-epoch throughput rounds")
    ap.add_argument("--keep-every", type=int, default=1, help="(b) train on 1 row in N (a quick run)")
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--skip-fmnist", action="store_true")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "stream.json"))
    args = ap.parse_args()
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    spark = get_spark(args.master, {"spark.python.worker.reuse": "false", "spark.driver.memory": "2g"})
    res: dict = {
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "master": args.master,
        "batch_size": args.batch_size,
    }
    out = os.path.join(args.tables, "model")
    if not args.skip_sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
        res["sizes"] = bench_sizes(spark, sizes, args.tables, out, args.batch_size)
    if not args.skip_fmnist:
        res["fmnist"] = bench_fmnist(spark, args.table, out, args.epochs, args.rounds, args.keep_every)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(res, f, indent=2)
    text = markdown(res)
    with open(args.results.removesuffix(".json") + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
