"""The fitted monotone curves over the measured points, as one PNG: what a user checks before
trusting a plan (a fit far from its points, or a direction that looks wrong, shows at a glance)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparkvision.plan.fit import AccuracyModel, CostModel, Measurement
from sparkvision.plan.solve import Option


def plot_plan(
    path: str,
    runs: Sequence[Measurement],
    cost: CostModel,
    accuracy: AccuracyModel,
    max_workers: int,
    target: float,
    choice: Option | None,
) -> None:
    """Three panels: epoch core-seconds against workers (one line per profiled batch size, base
    threads), accuracy after the epoch budget against batch size, and the learning curves.

    Matplotlib's object API (a bare ``Figure``) needs no backend or pyplot state; imported here so
    importing the planner does not pay for it.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), dpi=100)
    ax_w, ax_b, ax_e = fig.subplots(1, 3)
    ws = np.unique(np.round(np.geomspace(1, max(max_workers, 1), 60)).astype(int))
    base = [r for r in runs if r.threads == cost.base_threads]
    for i, b in enumerate(cost.batches):
        color = f"C{i % 10}"
        ax_w.plot(
            ws, [cost.core_seconds(int(w), cost.base_threads, b) for w in ws], color=color, label=f"batch {b}"
        )
        pts = [r for r in base if r.batch == b]
        ax_w.scatter([r.workers for r in pts], [r.core_seconds for r in pts], color=color, zorder=3)
    ax_w.set(xscale="log", yscale="log", xlabel="workers", ylabel="core-seconds per epoch")
    ax_w.set_title(f"epoch cost (isotonic, {cost.base_threads} thread(s) per rank)", fontsize=10)
    ax_w.legend(fontsize=7)

    bs = np.unique(np.round(np.geomspace(min(accuracy.batches), max(accuracy.batches), 60)).astype(int))
    e_max = accuracy.max_epochs
    ax_b.plot(bs, [accuracy.accuracy(int(b), e_max) for b in bs], label=f"fit after {e_max} epochs")
    ax_b.scatter(accuracy.batches, [float(accuracy.curves[b](e_max)) for b in accuracy.batches], zorder=3)
    ax_b.axhline(target, color="gray", linestyle="--", label=f"target {target:.4f}")
    if choice is not None:
        ax_b.scatter(
            [choice.config.batch], [choice.accuracy], marker="*", s=160, color="C3", label="choice", zorder=4
        )
    direction = "rising" if accuracy.increasing else "falling"
    ax_b.set(xscale="log", xlabel="global batch size", ylabel="test accuracy")
    ax_b.set_title(f"accuracy vs batch (isotonic, {direction}, read from the data)", fontsize=10)
    ax_b.legend(fontsize=7)

    es = np.arange(1, e_max + 1)
    for i, b in enumerate(accuracy.batches):
        color = f"C{i % 10}"
        ax_e.plot(es, accuracy.curves[b](es), color=color, label=f"batch {b}")
        for r in (r for r in runs if r.batch == b and r.curve):
            ax_e.scatter(np.arange(1, len(r.curve) + 1) * r.pass_fraction, r.curve, color=color, zorder=3)
    ax_e.axhline(target, color="gray", linestyle="--")
    ax_e.set(xlabel="epochs", ylabel="test accuracy")
    ax_e.set_title("learning curves: a - c * e^-alpha", fontsize=10)
    ax_e.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
