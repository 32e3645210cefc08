"""``plan`` on Fashion-MNIST with ``cnn`` against the exhaustive grid (issue 19).

1. **The oracle.** Every configuration this 2-core machine allows (workers x threads per rank <=
   2 cores: 1x1, 1x2, 2x1; global batch 32..1024) is trained with the default recipe (one-cycle
   over ``--epochs``) on a seeded row sample of Fashion-MNIST's train split (``--train-rows``),
   scored after every epoch on a sample of the test split. A configuration's cost is its
   core-seconds to the target: workers x threads x the summed epoch times up to the first epoch
   whose test accuracy reaches it (a user stops there). The oracle is the cheapest.
2. **The target** is fixed by a rule stated before the grid runs: the median of the grid's final
   accuracies, rounded down to half a point, so that some configurations miss it (``--target``
   overrides).
3. **plan** profiles its own short runs on the same table (it never sees the grid), fits, solves,
   and trains its choice (``--run``). Its choice is scored on the grid (the grid cost of that
   configuration) so that it is compared with the oracle under the same measurement; the
   ``--run`` figures are its predicted-against-measured check. Targets: cost ratio <= 1.05, and
   profiling <= 30% of the grid's total cost.
4. **Baselines**, from the same grid: configuring resources and batch size independently, as seed
   000 criticises (the most workers at the default batch size, then the cheapest batch size that
   meets the target at those workers), and the default configuration (1 worker, every core,
   batch 128).

    .venv/bin/python benchmarks/bench_plan.py [--table data/fashion-mnist] [--train-rows 10000]
        [--test-rows 2000] [--epochs 8] [--budget 12] [--curve-epochs 12] [--target auto]

The grid is saved after every configuration (``benchmarks/out/plan/grid.json``) and a rerun
skips the configurations already there. Results: benchmarks/results/plan.json and plan.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pyspark.sql import functions as F  # noqa: E402

from sparkvision.api import plan as plan_op  # noqa: E402
from sparkvision.data.table import read_meta, read_table, write_meta  # noqa: E402
from sparkvision.errors import ParamError  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.train.config import TrainConfig  # noqa: E402
from sparkvision.train.engine import train_df  # noqa: E402

RESULTS = HERE / "results"
OUT = HERE / "out" / "plan"
BATCHES = [32, 64, 128, 256, 512, 1024]
RESOURCES = [(1, 1), (1, 2), (2, 1)]  # (workers, threads per rank) within 2 cores
DEFAULT = (1, 2, 128)  # TrainConfig's defaults on local[2]: 1 worker, every core, batch 128


def subset_table(spark: Any, table: str, train_rows: int, test_rows: int) -> str:
    """A seeded row sample of the train and test splits, written once as an image table."""
    path = OUT / f"fmnist-{train_rows}-{test_rows}"
    if (path / "_SUCCESS").exists():
        return str(path)
    df = read_table(spark, table)
    n_train = df.where(F.col("split") == "train").count()
    n_test = df.where(F.col("split") == "test").count()
    part = df.where(F.col("split") == "train").sample(fraction=min(1.0, 1.05 * train_rows / n_train), seed=1)
    test = df.where(F.col("split") == "test").sample(fraction=min(1.0, 1.05 * test_rows / n_test), seed=2)
    part.limit(train_rows).unionByName(test.limit(test_rows)).repartition(4).write.mode("overwrite").parquet(
        str(path)
    )
    write_meta(spark, str(path), read_meta(spark, table))
    return str(path)


def to_target(history: list[dict[str, Any]], target: float) -> tuple[int | None, float]:
    """(the first epoch reaching ``target`` or None, the seconds of the epochs up to it or all)."""
    t = 0.0
    for i, h in enumerate(history):
        t += h["epoch_time_s"]
        if h["test_acc"] is not None and h["test_acc"] >= target:
            return i + 1, t
    return None, t


def run_grid(
    spark: Any, table: str, class_names: list[str], epochs: int, batches: list[int]
) -> list[dict[str, Any]]:
    grid_file = OUT / f"grid-{Path(table).name}-e{epochs}.json"
    grid = json.loads(grid_file.read_text()) if grid_file.exists() else []
    done = {(g["workers"], g["threads"], g["batch"]) for g in grid}
    df = read_table(spark, table)
    for w, t in RESOURCES:
        for b in batches:
            if (w, t, b) in done:
                continue
            cfg = TrainConfig(model="cnn", epochs=epochs, batch_size=b, workers=w, threads_per_rank=t)
            t0 = time.perf_counter()
            res = train_df(spark, df, class_names, str(OUT / "grid" / f"w{w}-t{t}-b{b}"), cfg)
            wall = time.perf_counter() - t0
            hist = [{"epoch_time_s": h["epoch_time_s"], "test_acc": h["test_acc"]} for h in res["history"]]
            grid.append({"workers": w, "threads": t, "batch": b, "wall_s": round(wall, 1), "history": hist})
            grid_file.write_text(json.dumps(grid, indent=1))
            print(f"grid w={w} t={t} b={b}: acc {hist[-1]['test_acc']}, {wall:.0f} s", flush=True)
    return grid


def run_plan(spark: Any, table: str, target: float, batches: list[int], args: Any) -> dict[str, Any]:
    return plan_op(
        spark,
        table=table,
        out=str(OUT / "plan"),
        overwrite=True,
        model="cnn",
        target_accuracy=target,
        epochs=args.epochs,
        max_workers=2,
        max_cores=2,
        threads_per_rank=[1, 2],
        batch_sizes=batches,
        budget=args.budget,
        curve_epochs=args.curve_epochs,
        fraction=args.fraction,
        run=True,
    )


def score(g: dict[str, Any], target: float) -> dict[str, Any]:
    """A configuration's cost to the target: cores x the median epoch time x the epochs to reach
    it (the median, not the sum of the measured epochs: this shared 2-core machine slows single
    epochs at random, and one slowed epoch must not decide which configuration is cheapest)."""
    e, _ = to_target(g["history"], target)
    cores = g["workers"] * g["threads"]
    epoch_s = statistics.median(h["epoch_time_s"] for h in g["history"])
    secs = epoch_s * (e or 0)
    return {
        "workers": g["workers"],
        "threads": g["threads"],
        "batch": g["batch"],
        "final_acc": g["history"][-1]["test_acc"],
        "epochs_to_target": e,
        "cost_to_target": round(cores * secs, 1) if e else None,
        "cost_all_epochs": round(cores * epoch_s * len(g["history"]), 1),
        "epoch_s_median": round(epoch_s, 2),
        "epoch_s_spread": round(
            max(h["epoch_time_s"] for h in g["history"]) / min(h["epoch_time_s"] for h in g["history"]), 2
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--train-rows", type=int, default=10_000)
    ap.add_argument("--test-rows", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--curve-epochs", type=int, default=12)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCHES)))
    ap.add_argument(
        "--rescore", action="store_true", help="score the saved grid and plan run again; train nothing"
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    spark = get_spark(master="local[2]")
    table = subset_table(spark, args.table, args.train_rows, args.test_rows)
    class_names = read_meta(spark, table).class_names
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.rescore:
        grid = json.loads((OUT / f"grid-{Path(table).name}-e{args.epochs}.json").read_text())
        grid_wall = sum(g["wall_s"] for g in grid)
    else:
        grid = run_grid(spark, table, class_names, args.epochs, batches)
        grid_wall = sum(g["wall_s"] for g in grid)  # configurations from an earlier run included
    finals = [g["history"][-1]["test_acc"] for g in grid]
    target = (
        math.floor(statistics.median(finals) * 200) / 200 if args.target == "auto" else float(args.target)
    )
    scored = [score(g, target) for g in grid]
    met = [s for s in scored if s["cost_to_target"] is not None]
    oracle = min(met, key=lambda s: s["cost_to_target"])
    grid_cost = sum(s["cost_all_epochs"] for s in scored)

    def on_grid(w: int, t: int, b: int) -> dict[str, Any]:
        return next(s for s in scored if (s["workers"], s["threads"], s["batch"]) == (w, t, b))

    most = max(w for w, _ in RESOURCES)
    fixed = [s for s in met if s["workers"] == most and s["threads"] == 1]
    independent = {
        "rule": f"most workers ({most}) at the default batch 128, then the cheapest batch meeting the target there",
        "choice": min(fixed, key=lambda s: s["cost_to_target"]) if fixed else None,
    }
    default = on_grid(*DEFAULT) if DEFAULT[2] in batches else None

    t1 = time.perf_counter()
    try:
        p = (
            json.loads((OUT / "plan" / "plan.json").read_text())
            if args.rescore
            else run_plan(spark, table, target, batches, args)
        )
    except ParamError as e:  # the target predicted unreachable: plan.json is written all the same
        print(f"plan: {e}", flush=True)
        p = json.loads((OUT / "plan" / "plan.json").read_text())
    plan_wall = time.perf_counter() - t1
    if args.rescore and (RESULTS / "plan.json").exists():  # the plan's wall time from its run
        plan_wall = json.loads((RESULTS / "plan.json").read_text())["plan"]["wall_s"]
    c = p["choice"]
    chosen = on_grid(c["workers"], c["threads_per_rank"], c["batch_size"]) if c else None
    ratio = (
        chosen["cost_to_target"] / oracle["cost_to_target"] if chosen and chosen["cost_to_target"] else None
    )

    def ratio_of(s: dict[str, Any] | None) -> float | None:
        return round(s["cost_to_target"] / oracle["cost_to_target"], 3) if s and s["cost_to_target"] else None

    result = {
        "run": time.strftime("%Y-%m-%d %H:%M"),
        "table": {"train_rows": args.train_rows, "test_rows": args.test_rows, "source": args.table},
        "epochs": args.epochs,
        "target": target,
        "target_rule": "median of the grid's final accuracies, rounded down to 0.005"
        if args.target == "auto"
        else "given",
        "grid": scored,
        "grid_configs_meeting_target": len(met),
        "grid_total_core_s": round(grid_cost, 1),
        "grid_wall_s": round(grid_wall, 1),
        "oracle": oracle,
        "plan": {
            "choice": c,
            "on_grid": chosen,
            "cost_ratio": round(ratio, 3) if ratio else None,
            "message": p.get("message"),
            "anneal_bonus": p.get("anneal_bonus"),
            "curve_epochs": args.curve_epochs,
            "fraction": args.fraction,
            "profile_core_s": p["profile_core_seconds"],
            "profile_share_of_grid": round(p["profile_core_seconds"] / grid_cost, 4),
            "profile_runs": p["profile_runs"],
            "measured": p.get("measured"),
            "learning_curve_holdout_error": p.get("learning_curve_holdout_error"),
            "accuracy_falls_with_batch": p.get("accuracy_falls_with_batch"),
            "runners_up": p["runners_up"],
            "wall_s": round(plan_wall, 1),
        },
        "independent": {**independent, "cost_ratio": ratio_of(independent["choice"])},
        "default": {"config": default, "cost_ratio": ratio_of(default)},
        "batch_sizes": batches,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "plan.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    pl, o = r["plan"], r["oracle"]
    meas = pl["measured"] or {}
    lines = [
        "# plan against the exhaustive grid (Fashion-MNIST sample, cnn, 2 cores)",
        "",
        f"Run {r['run']}. {r['table']['train_rows']:,} train / {r['table']['test_rows']:,} test rows, "
        f"up to {r['epochs']} epochs, target {r['target']:.3f} ({r['target_rule']}); "
        f"{r['grid_configs_meeting_target']}/{len(r['grid'])} configurations meet it.",
        "",
        "| | workers | threads | batch | epochs to target | core-s to target | cost / oracle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, s: dict[str, Any] | None, ratio: float | None) -> str:
        if s is None:
            return f"| {name} | - | - | - | - | misses | - |"
        cost = s["cost_to_target"] if s["cost_to_target"] is not None else "misses"
        return (
            f"| {name} | {s['workers']} | {s['threads']} | {s['batch']} | {s['epochs_to_target'] or '-'} "
            f"| {cost} | {ratio if ratio is not None else '-'} |"
        )

    lines += [
        row("oracle (grid)", o, 1.0),
        row("**plan**", pl["on_grid"], pl["cost_ratio"]),
        row("independent (workers, then batch)", r["independent"]["choice"], r["independent"]["cost_ratio"]),
        row("default", r["default"]["config"], r["default"]["cost_ratio"]),
        "",
        f"- plan's cost ratio: **{pl['cost_ratio']}** (target <= 1.05: "
        f"{'met' if pl['cost_ratio'] and pl['cost_ratio'] <= 1.05 else 'missed'}).",
        f"- plan's profiling: {pl['profile_runs']} runs, {pl['profile_core_s']} core-s = "
        f"**{100 * pl['profile_share_of_grid']:.1f}%** of the grid's {r['grid_total_core_s']} core-s "
        f"(target <= 30%: {'met' if pl['profile_share_of_grid'] <= 0.30 else 'missed'}); wall {pl['wall_s']} s "
        f"with the --run, the grid {r['grid_wall_s']} s.",
        (
            f"- plan predicted {pl['choice']['epochs']} epochs, {pl['choice']['time_s']} s, accuracy "
            f"{pl['choice']['accuracy']}, cost {pl['choice']['cost']}; --run measured {meas.get('time_s')} s, "
            f"accuracy {meas.get('accuracy')}, cost {meas.get('cost')} (target met: {meas.get('target_met')})."
            if pl["choice"]
            else f"- plan chose nothing: {pl['message']}."
        ),
        f"- profile: learning curves of {pl['curve_epochs']} passes over {pl['fraction']} of the train rows; "
        f"anneal gain {pl['anneal_bonus']}.",
        f"- learning-curve hold-out error {pl['learning_curve_holdout_error']}; accuracy falls with batch: "
        f"{pl['accuracy_falls_with_batch']}.",
        "",
        "## The grid",
        "",
        "| workers | threads | batch | final acc | epochs to target | core-s to target | core-s, all epochs |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(r["grid"], key=lambda s: (s["workers"], s["threads"], s["batch"])):
        lines.append(
            f"| {s['workers']} | {s['threads']} | {s['batch']} | {s['final_acc']:.4f} | "
            f"{s['epochs_to_target'] or '-'} | {s['cost_to_target'] or 'misses'} | {s['cost_all_epochs']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
