"""Which short runs to profile: a small design over (workers, threads per rank, global batch).

The fits of :mod:`sparkvision.plan.fit` need, for a few batch sizes spread over the allowed range
(in log scale, ends included), epoch cost at a few worker counts spread the same way (the
isotonic curve in workers), and one learning curve per batch size (the accuracy model). Thread
counts other than the smallest are measured at one worker, at the smallest and largest batch
sizes when the budget allows (their gain depends on the batch), else at the middle one, as the
cost model treats their effect as a factor per batch size. Only the learning-curve runs need several
epochs, and they use one worker, the cheapest place to measure a curve whose shape does not
depend on the worker count at a fixed global batch; the other runs time a single (or a fraction
of an) epoch. ``budget`` is the number of runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProfileRun:
    workers: int
    threads: int
    batch: int
    epochs: int  # > 1 only for the runs that record a learning curve


def spread(values: Sequence[int], n: int) -> list[int]:
    """``n`` of the sorted ``values`` evenly spaced in log scale, both ends included."""
    vs = sorted(set(values))
    if n >= len(vs):
        return vs
    if n <= 1:
        return [vs[0]]
    idx = np.unique(np.round(np.linspace(0, len(vs) - 1, n)).astype(int))
    return [vs[i] for i in idx]


def worker_levels(max_workers: int) -> list[int]:
    """Powers of two up to ``max_workers``, and ``max_workers`` itself."""
    levels = [1 << k for k in range(max_workers.bit_length()) if (1 << k) <= max_workers]
    return sorted({*levels, max_workers})


def design(
    max_workers: int,
    threads: Sequence[int],
    batches: Sequence[int],
    budget: int,
    curve_epochs: int = 3,
) -> list[ProfileRun]:
    """At most ``budget`` profile runs. Every batch size profiled gets a learning-curve run at one
    worker; the rest of the budget goes to worker counts (largest first, so the far end of the
    range is measured), then to the other thread counts at the anchor."""
    if budget < 2:
        raise ValueError(f"budget {budget} is below 2 (two batch sizes are needed for a direction)")
    threads = sorted(set(threads))
    t0, extra_threads = threads[0], threads[1:]
    n_batches = min(len(set(batches)), max(2, (budget - 2 * len(extra_threads)) // 3))
    chosen = spread(batches, n_batches)
    anchor = chosen[len(chosen) // 2]
    runs = [ProfileRun(1, t0, b, curve_epochs) for b in chosen]
    ends = [chosen[0], chosen[-1]] if budget - len(runs) >= 2 * len(extra_threads) + len(chosen) else [anchor]
    thread_runs = [ProfileRun(1, t, b, 1) for t in extra_threads for b in ends][: max(budget - len(runs), 0)]
    room = budget - len(runs) - len(thread_runs)
    levels = [w for w in worker_levels(max_workers) if w > 1]
    # Worker counts per batch size; the largest batch sizes (which divide over the most workers)
    # take what does not split evenly.
    shares = [room // len(chosen) + (i < room % len(chosen)) for i in range(len(chosen))][::-1]
    for b, n in zip(chosen, shares, strict=True):
        fits = [w for w in levels if b % w == 0]
        picked = fits if n >= len(fits) else fits[-1:] if n == 1 else spread(fits, n)
        runs.extend(ProfileRun(w, t0, b, 1) for w in picked[: max(n, 0)])
    return (runs + thread_runs)[:budget]
