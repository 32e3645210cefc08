"""Which short runs to profile: a small design over (workers, threads per rank, global batch).

The fits of :mod:`sparkvision.plan.fit` need one learning curve for each of a few batch sizes
spread over the allowed range (log scale, ends included); epoch cost at a few worker counts
spread the same way, each at two batch sizes (the largest, and the smallest that divides over
those workers), since at fixed resources epoch cost is a line in 1/batch; and the other thread
counts at one worker (smallest and largest batch) and at the largest worker count, as threads
speed up compute but not the all-reduce. Only the learning-curve runs need several epochs, and
they use one worker, the cheapest place to measure a curve whose shape does not depend on the
worker count at a fixed global batch; the other runs time a single (or a fraction of an) epoch.
``budget`` is the number of runs.
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
    annealed: bool = False  # the final recipe's schedule over the run (the anneal gain), not constant


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
    max_cores: int | None = None,
) -> list[ProfileRun]:
    """At most ``budget`` profile runs: a quarter (at least two) learning curves at one worker and,
    with a budget of 4 or more, one run of the final recipe beside them (the anneal gain), then
    the other thread counts, then worker counts (largest first, so the far end of the range is
    measured) at two batch sizes each; none with workers x threads over ``max_cores``."""
    if budget < 2:
        raise ValueError(f"budget {budget} is below 2 (two batch sizes are needed for a direction)")
    cores = max_cores if max_cores is not None else max_workers * max(threads)
    threads = sorted(t for t in set(threads) if t <= cores)
    if not threads:
        raise ValueError(f"every thread count is over max_cores {max_cores}")
    max_workers = min(max_workers, cores // threads[0])
    t0, extra_threads = threads[0], threads[1:]
    allowed = sorted(set(batches))
    n_batches = min(len(allowed), max(2, budget // 4))
    chosen = spread(allowed, n_batches)
    runs = [ProfileRun(1, t0, b, curve_epochs) for b in chosen]
    if budget >= 4 and curve_epochs > 1:  # the anneal gain, at the middle learning-curve batch
        runs.append(ProfileRun(1, t0, chosen[len(chosen) // 2], curve_epochs, annealed=True))
    hi = chosen[-1]
    levels = [w for w in worker_levels(max_workers) if w > 1 and any(b % w == 0 for b in allowed)]

    def low(w: int) -> int | None:  # the smallest other batch size that divides over w workers
        return next((b for b in allowed if b % w == 0 and b != hi), None)

    top = next((w for w in reversed(levels) if hi % w == 0), None)
    spots = [(1, chosen[0]), (1, hi)] + ([(top, hi)] if top is not None else [])
    thread_runs = [ProfileRun(w, t, b, 1) for t in extra_threads for w, b in spots if w * t <= cores]
    thread_runs = thread_runs[: max(budget - len(runs) - 2, 0)]
    room = budget - len(runs) - len(thread_runs)
    # Worker counts spread in log scale, each at two batch sizes (the line in 1/batch).
    timing: list[ProfileRun] = []
    for w in spread(levels, max(room // 2, 1)) if levels and room > 0 else []:
        timing += [ProfileRun(w, t0, b, 1) for b in (hi, low(w)) if b is not None and b % w == 0]
    timing.sort(key=lambda r: (-r.workers, r.batch))
    thread_runs = [r for r in thread_runs if r.workers == 1 or any(q.workers == r.workers for q in timing)]
    return (runs + timing[:room] + thread_runs)[:budget]
