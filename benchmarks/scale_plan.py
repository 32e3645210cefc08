"""The billion-image projection of docs/scale.md, computed from the measured results files.

Reads ``results/scale_rates.json`` (ingest, embed), ``results/shards.json`` and
``results/shards_assign.json`` (index build, batch search at 10M vectors) and prints the
projection table for N images on a cluster at parallel efficiency e, so the arithmetic in the doc
is this script's, re-run whenever a rate is re-measured:

    .venv/bin/python benchmarks/scale_plan.py [--images 1e9] [--hours 24] [--efficiency 0.8]

How each 10M rate is carried to N (the work per vector or query that grows with the index):

* fill: a vector's cost is its coarse assignment, ``nlist x d`` multiply-adds against the flat
  quantizer (at 10M the fill ran at the measured effective rate ``G`` multiply-adds per
  core-second); at N the index uses ``nlist(N)`` lists and, past 32 GB of raw vectors, PQ codes
  (:func:`sparkvision.retrieval.index.choose_index`), whose encoding is small beside it.
* search: once per query the quantizer (``nlist x d``), then ``nprobe x N / nlist`` codes scanned
  (PQ32 code scans at ``PQ_CODES_PER_CORE_S``: an assumption, not measured here).
* training: k-means over ``39 x nlist`` sample rows, ``25`` iterations, ``nlist x d`` per row and
  iteration, in one task (the one serial step).
"""

from __future__ import annotations

import argparse
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PQ_CODES_PER_CORE_S = 3e8  # ASSUMED: FAISS IVFPQ ADC scan of 32-byte codes, one core (not measured)
KMEANS_ITERS = 25  # FAISS's default
D = 128
K_DEDUP = 16
NPROBE = 16  # at 1B: recall at nprobe 16 was 0.9995 at 10M with 16,384 lists; lists grow 4x to 65,536


def nlist_for(n: float) -> int:
    """sparkvision.retrieval.index._nlist_for, for n beyond an int's reach in the doc's units."""
    return int(max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), 65536, n // 39)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=float, default=1e9)
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--efficiency", type=float, default=0.8)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    n, e = a.images, a.efficiency
    sr = json.load(open(os.path.join(a.results, "scale_rates.json")))
    # the best (warm) round: the first round of a process pays the JVM's and workers' warm-up,
    # which a billion-image job pays once; both rounds still carry each job's fixed overhead
    rates = {
        key: max(r[f"{key}_images_per_s"] for r in sr["rounds"]) / sr["slots"]
        for key in ("ingest", "embed_cnn", "embed_resnet50")
    }
    shards = json.load(open(os.path.join(a.results, "shards.json")))
    assign = json.load(open(os.path.join(a.results, "shards_assign.json")))
    dd = json.load(open(os.path.join(a.results, "dedup.json")))["dedup_summary"]
    verify_s = 649.1  # dedup.md: the verification stage's seconds of the 12,000-image test run
    pairs_per_image = dd["candidate_pairs"] / dd["rows"]  # Fashion-MNIST: many look-alike items
    verify = 1 / (pairs_per_image * verify_s * 2 / dd["candidate_pairs"])  # images per core-second
    meta = shards["index"]
    n10, nlist10 = meta["rows"], 16384
    train_s = 208.5  # index.json of the 10M run: the train task's seconds
    fill_core_s = (meta["build_s"] - train_s) * 2  # two task slots
    g = n10 * nlist10 * D / fill_core_s  # effective multiply-adds per core-second in the fill
    q_per_core = assign["queries_per_s"]["preassign"] / 2
    nl = nlist_for(n)
    fill = g / (nl * D)  # vectors per core-second at N
    scan = NPROBE * n / nl / PQ_CODES_PER_CORE_S  # core-seconds per query
    search = 1 / (nl * D / g + scan)  # queries per core-second at N (each image one query)
    train_core_s = 39 * nl * nl * D * KMEANS_ITERS / g
    stages = [
        ("ingest (224x224 JPEG)", rates["ingest"], "scale_rates.json"),
        ("embed, cnn", rates["embed_cnn"], "scale_rates.json"),
        ("embed, resnet50 224", rates["embed_resnet50"], "scale_rates.json"),
        ("index fill (IVF-PQ32)", fill, f"shards.json: {g / 1e9:.1f} G multiply-adds/core-s"),
        (f"dedup search (k {K_DEDUP}, nprobe {NPROBE})", search, "shards_assign.json + assumed PQ scan"),
        (f"dedup verification ({pairs_per_image:.1f} candidate pairs per image)", verify, "dedup.json"),
    ]
    print(f"N = {n:,.0f}, e = {e}, H = {a.hours} h, nlist(N) = {nl:,}; at 10M: {q_per_core:.0f} q/core-s")
    print()
    print("| stage | rate per core (/s) | core-hours | cores alone for H hours |")
    print("|---|---:|---:|---:|")
    total = {"cnn": 0.0, "resnet50": 0.0}
    for name, r, _src in stages:
        core_h = n / r / 3600 / e
        print(f"| {name} | {r:,.1f} | {core_h:,.0f} | {core_h / a.hours:,.0f} |")
        for key in total:
            if "embed" not in name or key in name:
                total[key] += core_h
    print(
        f"| index training (one task, k-means {nl:,} lists) | - | {train_core_s / 3600:,.1f} "
        f"| serial: {train_core_s / 3600 / 16:,.1f} h on a 16-core task |"
    )
    for key, core_h in total.items():
        print(f"| **pipeline with {key}** | | **{core_h:,.0f}** | **{core_h / a.hours:,.0f}** |")


if __name__ == "__main__":
    main()
