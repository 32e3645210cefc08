"""The cheapest configuration that reaches an accuracy target in time, and why the others lose.

Cost is core-seconds (workers x threads x wall time), the resource a shared cluster charges for;
``price`` per worker-hour turns it into money. Given the fitted models
(:mod:`sparkvision.plan.fit`), every candidate (workers, threads, global batch) is scored at the
fewest epochs whose predicted accuracy reaches the target: accuracy is non-decreasing in epochs
and cost increasing, so fewer epochs are always cheaper, and if those miss the deadline more
epochs miss it too. The search is exhaustive over the candidates (a few thousand at most), so
the optimum under the models is found exactly; the models are where the error lies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Config:
    workers: int
    threads: int
    batch: int  # global batch size, split evenly over the workers

    def __str__(self) -> str:
        return f"workers={self.workers} threads={self.threads} batch={self.batch}"


@dataclass(frozen=True)
class Option:
    """A candidate scored by the models."""

    config: Config
    epochs: int
    time_s: float
    accuracy: float
    cost: float  # core-seconds, or money when a price is given


@dataclass
class Plan:
    choice: Option | None
    runners_up: list[Option] = field(default_factory=list)
    ruled_out: list[tuple[Config, str]] = field(default_factory=list)  # (config, why)
    best_reachable: Option | None = None  # the most accurate option, feasible or not
    message: str = ""


def cost_of(config: Config, time_s: float, price: float | None = None) -> float:
    """Core-seconds, or ``price`` per worker-hour times worker-hours when a price is given."""
    if price is not None:
        return price * config.workers * time_s / 3600.0
    return config.workers * config.threads * time_s


def candidates(
    workers: Iterable[int], threads: Iterable[int], batches: Iterable[int], max_cores: int | None = None
) -> list[Config]:
    """Every combination training can run: the global batch divides evenly over the workers, and
    workers x threads fit in ``max_cores`` (more threads than cores only contend for them)."""
    return [
        Config(w, t, b)
        for w in sorted(set(workers))
        for t in sorted(set(threads))
        for b in sorted(set(batches))
        if b >= w and b % w == 0 and (max_cores is None or w * t <= max_cores)
    ]


def solve(
    configs: Iterable[Config],
    epoch_time: Callable[[Config], float],
    accuracy: Callable[[int, int], float],
    target: float,
    max_epochs: int,
    deadline_s: float | None = None,
    price: float | None = None,
    top: int = 3,
) -> Plan:
    """The cheapest option with ``accuracy(batch, epochs) >= target`` and time within
    ``deadline_s``, the next ``top`` cheapest, and a reason for every config ruled out.

    ``epoch_time(config)`` is the predicted wall time of one epoch; ``accuracy(batch, epochs)``
    the predicted test accuracy after ``epochs`` epochs (1..max_epochs), non-decreasing in epochs.
    """
    feasible: list[Option] = []
    ruled_out: list[tuple[Config, str]] = []
    best: Option | None = None
    for cfg in configs:
        t_epoch = epoch_time(cfg)
        reached = next((e for e in range(1, max_epochs + 1) if accuracy(cfg.batch, e) >= target), None)
        top_acc = accuracy(cfg.batch, max_epochs)
        e_best = max_epochs if reached is None else reached
        opt = Option(cfg, e_best, e_best * t_epoch, top_acc, cost_of(cfg, e_best * t_epoch, price))
        if best is None or (opt.accuracy, -opt.cost) > (best.accuracy, -best.cost):
            best = opt
        if reached is None:
            ruled_out.append(
                (
                    cfg,
                    f"predicted accuracy {top_acc:.4f} after {max_epochs} epochs is below the target {target:.4f}",
                )
            )
            continue
        opt = Option(cfg, reached, reached * t_epoch, accuracy(cfg.batch, reached), opt.cost)
        if deadline_s is not None and opt.time_s > deadline_s:
            ruled_out.append(
                (
                    cfg,
                    f"reaches {opt.accuracy:.4f} after {reached} epochs but takes {opt.time_s:.0f} s, "
                    f"over the deadline of {deadline_s:.0f} s",
                )
            )
            continue
        feasible.append(opt)
    feasible.sort(key=lambda o: (o.cost, o.time_s, o.config))
    if not feasible:
        return Plan(None, [], ruled_out, best, infeasible_message(best, target, deadline_s, ruled_out))
    return Plan(feasible[0], feasible[1 : 1 + top], ruled_out, best, "")


def infeasible_message(
    best: Option | None, target: float, deadline_s: float | None, ruled_out: list[tuple[Config, str]]
) -> str:
    """One line saying why no configuration qualifies and what is reachable instead."""
    if best is None:
        return "no candidate configuration (check --max-workers, --batch-sizes and --threads-per-rank)"
    if best.accuracy < target:
        return (
            f"target accuracy {target:.4f} is not reachable: the best predicted is {best.accuracy:.4f} "
            f"({best.config}, {best.epochs} epochs); lower the target or allow more epochs"
        )
    late = sum("deadline" in why for _, why in ruled_out)
    return (
        f"target accuracy {target:.4f} is reachable (best predicted {best.accuracy:.4f}) but not within the "
        f"deadline of {deadline_s:.0f} s by any of the {late} configurations that reach it; "
        "allow more time or more workers"
    )
