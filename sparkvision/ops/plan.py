"""``plan``: choose workers, threads per rank and global batch size together, for the least
core-seconds that reach an accuracy target within a deadline (seed 000's co-configuration by
order-preserving regression; the fits and the solver are :mod:`sparkvision.plan`).

Profiling is real training through the library (:func:`sparkvision.train.engine.train_df`) on a
row sample of the train split (``fraction``; training has no step limit, so a short run is a
pass over fewer rows), scored each pass on the whole eval split. A pass over a fraction f counts
as f epochs of the learning curve, and its time is scaled by 1/f to a full epoch (epoch work is
proportional to the rows; the fixed start-up of a rank is excluded, as Spark reports it apart).
Profile runs use the ``constant`` schedule: a short one-cycle run anneals early and its curve
would not continue; a constant-rate curve under-states the annealed run's accuracy, so the
prediction errs on the safe side. Runs recorded in ``reuse`` model directories (their
``metrics.json`` history of ``epoch_time_s`` and ``test_acc``) join the profile, and a design
point they cover is not run again.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, Field
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import read_meta, read_table
from sparkvision.fields import BatchSize, CommaList, Epochs, Workers
from sparkvision.ops.base import Cli, Operation, ParamError, Progress, params_model, register
from sparkvision.ops.fields import overwrite, table_in
from sparkvision.ops.train import check_model, check_splits
from sparkvision.spark.cache import CachePlanner
from sparkvision.train.config import TrainConfig

if TYPE_CHECKING:
    from sparkvision.plan import Measurement, Option, ProfileRun


def numbers(v: Any) -> Any:
    """``32,64,128`` on the command line; a list elsewhere."""
    return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


PlanParams = params_model(
    "PlanParams",
    "Choose workers, threads per rank and batch size together: profile a few short runs, fit "
    "order-preserving models of epoch cost and accuracy, and pick the least core-seconds that "
    "reach the target accuracy within the deadline.",
    table=table_in("Image table to plan for (its train and test splits)."),
    out=(
        Annotated[str, Cli(flags=("--out",))],
        Field(description="Directory to write plan.json, curves.png and the profile runs."),
    ),
    overwrite=overwrite(),
    model=(str, Field(default="cnn", description="Registered model name (see `sparkvision models`).")),
    target_accuracy=(
        Annotated[float, Field(gt=0, le=1)] | None,
        Field(default=None, description="Test accuracy to reach (0-1); required."),
    ),
    deadline=(
        float | None,
        Field(default=None, gt=0, description="Wall-clock limit of the planned run (s)."),
    ),
    max_workers=(Workers, Field(default=2, description="Most DDP ranks to consider.")),
    batch_sizes=(
        Annotated[list[BatchSize], BeforeValidator(numbers)],
        Field(default=[32, 64, 128, 256, 512, 1024], min_length=2, description="Global batch sizes."),
    ),
    threads_per_rank=(
        Annotated[list[Annotated[int, Field(ge=1, le=1024)]], BeforeValidator(numbers)],
        Field(default=[1], min_length=1, description="Torch threads per rank to consider."),
    ),
    max_cores=(
        Annotated[int, Field(ge=1, le=1_000_000)] | None,
        Field(default=None, description="Most cores (workers x threads) a configuration may use."),
    ),
    epochs=(Epochs, Field(default=20, description="The most epochs the planned run may take.")),
    budget=(Annotated[int, Field(ge=2, le=100)], Field(default=6, description="Profile runs at most.")),
    curve_epochs=(
        Annotated[int, Field(ge=1, le=100)],
        Field(default=3, description="Passes of each learning-curve profile run."),
    ),
    fraction=(
        Annotated[float, Field(gt=0, le=1)],
        Field(default=0.25, description="Share of the train split each profile pass reads."),
    ),
    price=(float | None, Field(default=None, gt=0, description="Price per worker-hour (cost in money).")),
    reuse=(CommaList, Field(default=None, description="Model directories of earlier runs to reuse (a,b,c).")),
    run=(bool, Field(default=False, description="Train with the choice, then report predicted vs measured.")),
)


def check(p: Any) -> None:
    if p.target_accuracy is None:  # None in the model so a missing target is this one line, with an example
        raise ParamError("target_accuracy", "give the test accuracy to reach, e.g. --target-accuracy 0.9")
    check_model(p.model)
    if p.max_cores is not None and min(p.threads_per_rank) > p.max_cores:
        raise ParamError("max_cores", f"{p.max_cores} is below every thread count {p.threads_per_rank}")
    if not any(b % w == 0 for b in p.batch_sizes for w in range(1, p.max_workers + 1)):
        raise ParamError("batch_sizes", "no batch size divides evenly over any worker count")


def recorded(model_dir: str, model: str, train_rows: int) -> Measurement:
    """A finished training run as a profile measurement: its median epoch time and its curve,
    scaled by the share of the ``train_rows`` it trained on (a profile run's subset, or all)."""
    from sparkvision.plan import Measurement

    d = Path(model_dir)
    try:
        cfg = json.loads((d / "train_config.json").read_text())
        metrics = json.loads((d / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise ParamError("reuse", f"{model_dir} is not a finished training run: {e}") from None
    if cfg.get("model") != model:
        raise ParamError("reuse", f"{model_dir} trained {cfg.get('model')!r}, not {model!r}")
    hist = metrics.get("history") or []
    times = [h["epoch_time_s"] for h in hist if "epoch_time_s" in h]
    if not times:
        raise ParamError("reuse", f"{model_dir} records no epoch times")
    share = min(1.0, metrics.get("train_rows", train_rows) / max(train_rows, 1))
    curve = tuple(h["test_acc"] for h in hist if h.get("test_acc") is not None)
    return Measurement(
        int(metrics["workers"]),
        int(metrics["threads_per_rank"]),
        int(cfg["batch_size"]),
        statistics.median(times) / share,
        curve,
        share,
    )


def covered(r: ProfileRun, have: list[Measurement]) -> bool:
    return any(
        (m.workers, m.threads, m.batch) == (r.workers, r.threads, r.batch)
        and (r.epochs == 1 or len(m.curve) >= r.epochs)
        and r.annealed == m.annealed
        for m in have
    )


def option_json(o: Option) -> dict[str, Any]:
    return {
        "workers": o.config.workers,
        "threads_per_rank": o.config.threads,
        "batch_size": o.config.batch,
        "epochs": o.epochs,
        "time_s": round(o.time_s, 1),
        "accuracy": round(o.accuracy, 4),
        "cost": round(o.cost, 2),
    }


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.plan import (
        EXTRAPOLATION_LIMIT,
        AccuracyModel,
        Config,
        CostModel,
        Measurement,
        candidates,
        design,
        solve,
        validate_learning_curve,
    )
    from sparkvision.plan.plot import plot_plan
    from sparkvision.train.engine import train_df

    check_splits(spark, p.table, train_split="train", eval_split="test")
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    class_names = read_meta(spark, p.table).class_names
    df = read_table(spark, p.table)
    sample = df.where(F.col("split") == "train").sample(fraction=p.fraction, seed=0)
    subset = sample.unionByName(df.where(F.col("split") == "test"))
    train_rows = df.where(F.col("split") == "train").count() if p.reuse else 0
    runs = [recorded(d, p.model, train_rows) for d in p.reuse or []]
    todo = [
        r
        for r in design(
            p.max_workers, p.threads_per_rank, p.batch_sizes, p.budget, p.curve_epochs, p.max_cores
        )
    ]
    todo = [r for r in todo if not covered(r, runs)]
    profile_core_s = 0.0
    with CachePlanner(spark, label="plan") as cache:  # RC: every profile run reads the same sample
        subset = cache.offer("profile sample", subset, reuse=max(len(todo) - 1, 0))
        for i, r in enumerate(todo):
            progress.check_cancelled()
            progress.update(
                100.0 * i / (len(todo) + p.run),
                f"profile {i + 1}/{len(todo)}: {Config(r.workers, r.threads, r.batch)}",
            )
            cfg = TrainConfig(
                model=p.model,
                epochs=r.epochs,
                batch_size=r.batch,
                workers=r.workers,
                threads_per_rank=r.threads,
                schedule="onecycle" if r.annealed else "constant",
                keep_checkpoints=1,
            )
            res = train_df(
                spark,
                subset,
                class_names,
                str(
                    out / "runs" / f"w{r.workers}-t{r.threads}-b{r.batch}{'-annealed' if r.annealed else ''}"
                ),
                cfg,
            )
            hist = res["history"]
            pass_s = statistics.median(h["epoch_time_s"] for h in hist)
            profile_core_s += r.workers * r.threads * sum(h["epoch_time_s"] for h in hist)
            curve = tuple(h["test_acc"] for h in hist) if r.epochs > 1 else ()
            runs.append(
                Measurement(r.workers, r.threads, r.batch, pass_s / p.fraction, curve, p.fraction, r.annealed)
            )
    cost, acc = CostModel(runs), AccuracyModel(runs, p.epochs)
    plan = solve(
        candidates(range(1, p.max_workers + 1), p.threads_per_rank, p.batch_sizes, p.max_cores),
        lambda c: cost.epoch_time(c.workers, c.threads, c.batch),
        acc.accuracy,
        p.target_accuracy,
        p.epochs,
        p.deadline,
        p.price,
    )
    errors = [
        e
        for m in runs
        if not m.annealed
        and (e := validate_learning_curve([(i + 1) * m.pass_fraction for i in range(len(m.curve))], m.curve))
        is not None
    ]
    plot_plan(str(out / "curves.png"), runs, cost, acc, p.max_workers, p.target_accuracy, plan.choice)
    summary: dict[str, Any] = {
        "choice": option_json(plan.choice) if plan.choice else None,
        "runners_up": [option_json(o) for o in plan.runners_up],
        "ruled_out": [f"{c}: {why}" for c, why in plan.ruled_out],
        "message": plan.message,
        "cost_unit": "money" if p.price is not None else "core-seconds",
        "accuracy_falls_with_batch": not acc.increasing,
        "anneal_bonus": round(acc.anneal_bonus, 4),
        "learning_curve_holdout_error": round(statistics.mean(errors), 4) if errors else None,
        "extrapolation": None,
        "profile_runs": len(todo),
        "reused_runs": len(p.reuse or []),
        "profile_core_seconds": round(profile_core_s, 1),
        "curves_png": str(out / "curves.png"),
        "plan_json": str(out / "plan.json"),
    }
    if plan.choice is not None:
        c = plan.choice
        reach = acc.extrapolation(c.config.batch, c.epochs)
        summary["extrapolation"] = round(reach, 1)
        if reach > EXTRAPOLATION_LIMIT:
            summary["warning"] = (
                f"the choice's accuracy is extrapolated {reach:.1f}x beyond the profiled learning "
                f"curves (limit {EXTRAPOLATION_LIMIT:g}x): confirm it with --run, or profile longer "
                "curves with a larger --curve-epochs"
            )
    (out / "plan.json").write_text(json.dumps(summary, indent=1))
    if plan.choice is None:
        raise ParamError("target_accuracy", f"{plan.message} (see {out / 'curves.png'})")
    if p.run:
        progress.update(100.0 * len(todo) / (len(todo) + 1), f"training {plan.choice.config}")
        summary["measured"] = measure(spark, df, class_names, str(out / "model"), p, plan.choice)
        (out / "plan.json").write_text(json.dumps(summary, indent=1))
    return summary


def measure(
    spark: SparkSession, df: Any, class_names: list[str], out: str, p: Any, choice: Option
) -> dict[str, Any]:
    """Train the choice on the full data with the default recipe; the measured time, accuracy
    and cost beside the predicted ones."""
    from sparkvision.train.engine import train_df

    c = choice.config
    cfg = TrainConfig(
        model=p.model, epochs=choice.epochs, batch_size=c.batch, workers=c.workers, threads_per_rank=c.threads
    )
    res = train_df(spark, df.where(F.col("split").isin("train", "test")), class_names, out, cfg)
    time_s = sum(h["epoch_time_s"] for h in res["history"])
    cost_core = c.workers * c.threads * time_s
    return {
        "model_dir": out,
        "time_s": round(time_s, 1),
        "accuracy": res["test_acc"],
        "cost": round(cost_core if p.price is None else p.price * c.workers * time_s / 3600, 2),
        "predicted": option_json(choice),
        "target_met": res["test_acc"] is not None and res["test_acc"] >= p.target_accuracy,
    }


OPERATION = register(
    Operation(
        "plan",
        PlanParams,
        run,
        "Choose workers, threads and batch size together for the least cost that reaches an accuracy target.",
        inputs=("table",),
        outputs=("out",),
        result_key="out",
        module="sparkvision.plan",
        check=check,
        summary_keys=("profile_runs", "profile_core_seconds"),
    )
)
