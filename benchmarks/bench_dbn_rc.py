"""RC on the DBN's ranks (issue 20): layer-wise pretraining with the layer inputs recomputed every
batch (``cache_layers: "none"``, as before RC) against held as RC's plan chooses (``"auto"``).

One process, one rank: :func:`~sparkvision.train.layerwise.pretrain_dbn` called directly on a
uint8 shard in memory, normalised by its own pixel statistics, in the batch plan a one-worker
training run uses (``epoch_indices``, a global batch of 128). What a rank does is the same with
more ranks except for one all-reduce per step, which RC does not touch; Spark is not started.
Rows: the first ``--rows`` of Fashion-MNIST's training IDX file (``/usr/share/datasets``; seeded
random bars when absent), 512 rows of its test file for the free-energy gap. The two modes run
alternately (``--rounds`` rounds, the order swapped every round, after an untimed warm-up run),
each from the same seed: their weights must agree up to float rounding (the largest difference
is reported). Per run: seconds per layer (the log rows' sum, a held input's computation
included), the total, the load average before and after, and the plan's decisions. Run it
alone: the two modes differ by the layers' forward passes, a share that load on the machine
blurs.

    .venv/bin/python benchmarks/bench_dbn_rc.py [--rows 6000] [--epochs 4] [--hidden 500,500,500]
        [--rounds 2] [--name dbn_rc]

Results: benchmarks/results/NAME.json and NAME.md (dbn_rc.*; ``--smoke``: dbn_rc_smoke.*).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sparkvision.data.idx import parse_idx  # noqa: E402
from sparkvision.models.dbn import DBN  # noqa: E402
from sparkvision.train.data import epoch_indices, steps_per_epoch  # noqa: E402
from sparkvision.train.layerwise import Rows, pretrain_dbn  # noqa: E402
from sparkvision.transforms.preprocess import normalize, to_unit  # noqa: E402

RESULTS = HERE / "results"
FASHION = "/usr/share/datasets/fashion-mnist"
SEED = 0


def images(name: str, rows: int) -> torch.Tensor:
    """``rows`` uint8 ``(N, 1, 28, 28)`` images of a Fashion-MNIST IDX file (seeded bars if absent)."""
    path = os.path.join(FASHION, name)
    if os.path.exists(path):
        with open(path, "rb") as f:
            x = parse_idx(f.read(), name)[:rows]
    else:
        rng = np.random.default_rng(len(name))
        x = (rng.random((rows, 28, 28)) < 0.3).astype(np.uint8) * 255
    return torch.from_numpy(np.array(x, dtype=np.uint8)).view(-1, 1, 28, 28)  # a writable copy


def run(mode: str, train: torch.Tensor, held: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    x = to_unit(train)
    mean, std = x.mean().view(1, 1, 1, 1), x.std().view(1, 1, 1, 1)
    n = len(train)
    steps = steps_per_epoch(n, args.batch)

    def read(key: torch.Tensor | slice) -> torch.Tensor:
        return normalize(to_unit(train[key]), mean, std, False)

    def order(number: int) -> torch.Tensor:
        return epoch_indices(n, steps, args.batch, SEED, -1 - number, 0)

    torch.manual_seed(SEED)
    hidden = [int(h) for h in args.hidden.split(",")]
    dbn = DBN(10, 1, 28, hidden=hidden, pretrain_epochs=args.epochs, cache_layers=mode)
    sample = [read(slice(0, 512))]
    held_out = [normalize(to_unit(held), mean, std, False)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    log = pretrain_dbn(
        dbn, Rows(n, order, read), torch.Generator().manual_seed(SEED), lambda: sample, lambda: held_out
    )
    total = time.perf_counter() - t0
    layers = sorted({r["layer"] for r in log})
    return {
        "mode": mode,
        "total_s": round(total, 3),
        "layer_s": [round(sum(r["seconds"] for r in log if r["layer"] == layer), 3) for layer in layers],
        "inputs": [r["input"] for r in log if r["epoch"] == 1],
        "cache": {r["layer"]: r["cache"] for r in log if "cache" in r},
        "recon_error_last": [[r["recon_error"] for r in log if r["layer"] == layer][-1] for layer in layers],
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "state": {k: v.clone() for k, v in dbn.state_dict().items()},
    }


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# RC on the DBN's ranks: held layer inputs against recomputing them",
        "",
        f"`benchmarks/bench_dbn_rc.py`, {result['date']}: one process (one rank), "
        f"{cfg['rows']:,} Fashion-MNIST rows, DBN 784-{'-'.join(map(str, cfg['hidden']))}, "
        f"{cfg['epochs']} pretraining epochs a layer, batch {cfg['batch']}, CD-1, "
        f"{cfg['threads']} torch threads, {cfg['rounds']} alternating rounds.",
        "",
        "| round | mode | total s | seconds per layer | layer inputs (epoch 1) | load before | load after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['round']} | {r['mode']} | {r['total_s']:.2f} | {', '.join(f'{s:.2f}' for s in r['layer_s'])} "
            f"| {', '.join(r['inputs'])} | {r['loadavg_before'][0]:.2f} | {r['loadavg_after'][0]:.2f} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Median total: none {s['none_median_s']:.2f} s, auto {s['auto_median_s']:.2f} s: "
        f"**{s['saved_pct']:.1f}% less time** with the held inputs. Per layer (medians): none "
        f"{', '.join(f'{v:.2f}' for v in s['none_layer_median_s'])}, auto "
        f"{', '.join(f'{v:.2f}' for v in s['auto_layer_median_s'])} s.",
        f"Largest weight difference between the runs: {s['max_weight_diff']:.2e} (0: the same "
        "weights to the bit; the held inputs are computed in chunks of 512 rows, the recomputed "
        "ones per batch, which may round differently).",
        "",
        "The plan (`auto`, last run): "
        + "; ".join(
            f"layer {layer}: {'held' if c['held'] else 'recomputed'}, reuse {c['reuse']}, {c['mib']} MiB, "
            f"cost {c['cost_s']} s, {c['weight_s_per_mib']} s/MiB ({c['why']})"
            for layer, c in s["auto_plan"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--hidden", default="500,500,500")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="1,000 rows, 2 epochs, one round: dbn_rc_smoke.*")
    ap.add_argument("--name", default="dbn_rc", help="the results' file names: NAME.json and NAME.md")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.epochs, args.rounds = 1000, 2, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train = images("train-images-idx3-ubyte.gz", args.rows)
    held = images("t10k-images-idx3-ubyte.gz", 512)
    run("auto", train[:512], held, argparse.Namespace(**{**vars(args), "epochs": 1}))  # warm-up, not kept
    runs = []
    for rnd in range(args.rounds):
        for mode in ("none", "auto") if rnd % 2 == 0 else ("auto", "none"):
            r = run(mode, train, held, args)
            r["round"] = rnd + 1
            runs.append(r)
            print(f"round {rnd + 1} {mode}: {r['total_s']:.2f} s, layers {r['layer_s']}", flush=True)
    states = [r.pop("state") for r in runs]
    diff = max(float((a[k] - b[k]).abs().max()) for a in states for b in states for k in a)

    def medians(mode: str) -> tuple[float, list[float]]:
        mine = [r for r in runs if r["mode"] == mode]
        layer = [statistics.median(r["layer_s"][i] for r in mine) for i in range(len(mine[0]["layer_s"]))]
        return statistics.median(r["total_s"] for r in mine), layer

    (none_s, none_layers), (auto_s, auto_layers) = medians("none"), medians("auto")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {
            "rows": len(train),
            "hidden": [int(h) for h in args.hidden.split(",")],
            "epochs": args.epochs,
            "batch": args.batch,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "one_rank": True,
        },
        "runs": runs,
        "summary": {
            "none_median_s": none_s,
            "auto_median_s": auto_s,
            "saved_pct": round(100 * (none_s - auto_s) / none_s, 1),
            "none_layer_median_s": none_layers,
            "auto_layer_median_s": auto_layers,
            "max_weight_diff": diff,
            "auto_plan": [r for r in runs if r["mode"] == "auto"][-1]["cache"],
        },
    }
    name = "dbn_rc_smoke" if args.smoke else args.name
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
