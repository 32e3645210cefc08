"""Order-preserving models of a training job's cost and accuracy, fitted to a few profile runs.

The method is seed 000's co-configuration of resources and batch size: profile a few short
runs, fit *order-preserving* (isotonic) regressions of epoch cost and of final accuracy as
functions of resources and batch size, then solve for the cheapest configuration that meets the
accuracy target in time (:mod:`sparkvision.plan.solve`). Isotonic regression (scikit-learn's
``IsotonicRegression``) assumes only the direction of a relation, never its shape, so a handful of
noisy points cannot bend it into a curve that promises more than the measurements do. Pollux
(Qiao et al., OSDI '21) co-adapts the same two knobs online inside a scheduler with parametric
throughput and efficiency models; here the fit is offline, non-parametric and per job.

Three choices, each for a stated reason:

* **Cost is fitted as core-seconds per epoch** (workers x threads x epoch time), non-decreasing
  in workers and in threads. Epoch time is *not* monotone once communication grows with the
  number of workers (it falls, then rises again), so an isotonic fit of time against workers
  would pool exactly the points that matter; parallel efficiency only ever falls, so
  core-seconds stay monotone at every scale. Epoch time is recovered as core-seconds / cores.
* **The direction of accuracy against batch size is read from the data**: both directions are
  fitted and the one with the smaller squared error kept. Larger batches usually reach less in a
  fixed number of epochs, but with a learning rate tuned for large batches the opposite happens.
* **Accuracy after E epochs is extrapolated from short runs** with the inverse power law
  ``acc(e) = a - c * e**(-alpha)`` (learning curves of SGD-trained networks follow a power law
  in the amount of training; Hestness et al. 2017, "Deep Learning Scaling is Predictable,
  Empirically"; Domhan et al. 2015 use it among their curve models). ``a`` is the asymptote,
  bounded by 1; :func:`validate_learning_curve` measures the fit on held-out later epochs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit
from sklearn.isotonic import IsotonicRegression

DEFAULT_ALPHA = 0.5  # the power-law exponent used when two points cannot determine it
# How far past its profiled learning curves a prediction may reach before ``plan`` warns. Measured
# on Fashion-MNIST (README, the plan section): extrapolated 5.3x (0.75 epoch of curve, 4 epochs
# chosen) the accuracy was 1.05 points too high and the target missed; at 1.5x it was 0.6 points
# low. The power law is fitted to the curve's start, and a curve that is still steep there can
# be carried to an asymptote it never reaches.
EXTRAPOLATION_LIMIT = 2.0


@dataclass(frozen=True)
class MonotoneCurve:
    """An isotonic fit of ``y`` against ``x``, linear between its fitted points and flat beyond
    them (a fit must not extrapolate a trend it has not seen)."""

    x: np.ndarray  # the fitted breakpoints, ascending
    y: np.ndarray
    increasing: bool

    def __call__(self, x: float | np.ndarray) -> np.ndarray:
        return np.interp(x, self.x, self.y)


def fit_monotone(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    increasing: bool | None = None,
) -> MonotoneCurve:
    """Isotonic regression of ``y`` on ``x``; ``increasing=None`` fits both directions and keeps
    the one that explains the data better (ties go to non-decreasing)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.size == 0:
        raise ValueError("no points to fit")
    if increasing is None:
        up, down = fit_monotone(xa, ya, True), fit_monotone(xa, ya, False)
        sse_up = float(np.sum((up(xa) - ya) ** 2))
        sse_down = float(np.sum((down(xa) - ya) ** 2))
        return up if sse_up <= sse_down else down
    iso = IsotonicRegression(increasing=increasing, out_of_bounds="clip").fit(xa, ya)
    return MonotoneCurve(np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_), increasing)


def power_law(e: np.ndarray, a: float, c: float, alpha: float) -> np.ndarray:
    """The learning-curve model: accuracy after ``e`` epochs."""
    return a - c * np.power(e, -alpha)


@dataclass(frozen=True)
class LearningCurve:
    a: float  # the asymptote (accuracy with unlimited epochs)
    c: float
    alpha: float

    def __call__(self, epochs: float | np.ndarray) -> np.ndarray:
        return power_law(np.asarray(epochs, dtype=float), self.a, self.c, self.alpha)


def fit_learning_curve(
    epochs: Sequence[float] | np.ndarray, acc: Sequence[float] | np.ndarray
) -> LearningCurve:
    """The inverse power law through a run's per-epoch accuracies. Two points fix ``a`` and
    ``c`` with ``alpha`` at :data:`DEFAULT_ALPHA`; one point gives a flat curve (no trend is
    claimed from a single measurement)."""
    e, y = np.asarray(epochs, dtype=float), np.asarray(acc, dtype=float)
    if e.size == 0:
        raise ValueError("a learning curve needs at least one epoch")
    if e.size == 1 or np.ptp(e) == 0:
        return LearningCurve(float(y.mean()), 0.0, DEFAULT_ALPHA)
    if np.unique(e).size == 2:
        # y = a - c * e^-alpha is linear in (a, c) once alpha is fixed.
        design = np.stack([np.ones_like(e), -np.power(e, -DEFAULT_ALPHA)], axis=1)
        (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
        if c <= 0:  # no rise: no trend is claimed, the level is the mean
            return LearningCurve(float(y.mean()), 0.0, DEFAULT_ALPHA)
        if a > 1:  # the asymptote at its bound, c refitted under it
            x = np.power(e, -DEFAULT_ALPHA)
            return LearningCurve(1.0, float(np.sum((1 - y) * x) / np.sum(x * x)), DEFAULT_ALPHA)
        return LearningCurve(float(a), float(c), DEFAULT_ALPHA)
    top = float(y.max())
    start = (min(max(top + 0.02, 0.0), 1.0), min(max(top - float(y.min()), 1e-3) * 2, 2.0), DEFAULT_ALPHA)
    try:
        (a, c, alpha), _ = curve_fit(
            power_law, e, y, p0=start, bounds=([0.0, 0.0, 0.05], [1.0, 2.0, 3.0]), maxfev=5000
        )
    except RuntimeError:  # no convergence: the two-parameter fit is still a learning curve
        return fit_learning_curve(e[[0, -1]], y[[0, -1]])
    return LearningCurve(float(a), float(c), float(alpha))


def validate_learning_curve(
    epochs: Sequence[float] | np.ndarray, acc: Sequence[float] | np.ndarray, holdout: int = 1
) -> float | None:
    """Mean absolute error of the power law on a run's last ``holdout`` epochs, fitted on the
    ones before: how far an extrapolation from a short run can be trusted. ``None`` when the
    run is too short to hold anything out."""
    e, y = np.asarray(epochs, dtype=float), np.asarray(acc, dtype=float)
    if e.size < holdout + 2:
        return None
    curve = fit_learning_curve(e[:-holdout], y[:-holdout])
    return float(np.mean(np.abs(curve(e[-holdout:]) - y[-holdout:])))


@dataclass(frozen=True)
class Measurement:
    """One profile run (or a recorded run reused from a model directory)."""

    workers: int
    threads: int
    batch: int
    epoch_time_s: float  # a full epoch, measured or scaled from a fraction of one
    curve: tuple[float, ...] = ()  # test accuracy after each pass 1, 2, ... (may be empty)
    pass_fraction: float = 1.0  # the fraction of a full epoch each pass of ``curve`` trained on
    annealed: bool = False  # trained with the final recipe's annealing schedule over its passes

    @property
    def core_seconds(self) -> float:
        return self.workers * self.threads * self.epoch_time_s


class CostModel:
    """Core-seconds per epoch over (workers, threads, batch), a 2-D monotone fit built from 1-D
    isotonic ones. At each profiled worker count (base threads), an isotonic fit across batch
    sizes in 1/batch, direction read from the data; at a given batch, those values across worker
    counts get an isotonic non-decreasing fit in log workers, interpolated between profiled
    counts (log core-seconds, linear in log workers) and flat beyond them. Threads per rank are a
    factor, isotonic in threads, measured at a few (workers, batch) points and interpolated
    between them: threads speed up a rank's compute but not its all-reduce, so their gain shrinks
    with the batch per rank and with the workers.

    Between batch sizes the interpolation is linear in 1/batch because an epoch is per-sample
    work plus per-step costs (launch, data loading, the all-reduce) times N/batch steps: affine in
    1/batch at fixed resources, so two batch sizes at a worker count give the whole line (log
    batch overestimated the middle of the range by 10-25% in the simulation).
    """

    def __init__(self, runs: Iterable[Measurement]) -> None:
        runs = list(runs)
        if not runs:
            raise ValueError("no profile runs to fit the cost model")
        self.base_threads = min(r.threads for r in runs)
        base = [r for r in runs if r.threads == self.base_threads]
        self.batches = sorted({r.batch for r in base})
        self.levels = sorted({r.workers for r in base})
        self.by_workers: dict[int, MonotoneCurve] = {}
        for w in self.levels:
            pts = [r for r in base if r.workers == w]
            self.by_workers[w] = fit_monotone([1 / r.batch for r in pts], [r.core_seconds for r in pts])
        # Threads: log of the ratio to the base thread count where both were measured (same
        # workers and batch), an isotonic curve in log threads at each such point.
        ratios: dict[tuple[int, int], dict[int, list[float]]] = {}
        for r in runs:
            same = [q.core_seconds for q in base if q.workers == r.workers and q.batch == r.batch]
            if r.threads != self.base_threads and same:
                ratio = r.core_seconds / float(np.mean(same))
                at = ratios.setdefault((r.workers, r.batch), {self.base_threads: [1.0]})
                at.setdefault(r.threads, []).append(ratio)
        self.thread_factor = {
            key: fit_monotone(
                [np.log2(t) for t in sorted(ts)], [np.log(np.mean(ts[t])) for t in sorted(ts)], True
            )
            for key, ts in ratios.items()
        }
        self.across: dict[int, MonotoneCurve] = {}  # per batch, the fit across worker counts

    def core_seconds(self, workers: int, threads: int, batch: int) -> float:
        """Predicted core-seconds of one epoch."""
        if batch not in self.across:
            at = [float(np.log(self.by_workers[w](1 / batch))) for w in self.levels]
            self.across[batch] = fit_monotone(np.log2(self.levels), at, True)
        core = float(np.exp(self.across[batch](np.log2(workers))))
        return core * float(np.exp(self.log_thread_factor(workers, threads, batch)))

    def log_thread_factor(self, workers: int, threads: int, batch: int) -> float:
        """Log of core-seconds at ``threads`` over those at the base thread count: interpolated
        in 1/batch at each worker count where threads were profiled, then in log workers; 0
        where they were not."""
        if threads == self.base_threads or not self.thread_factor:
            return 0.0
        ws = sorted({w for w, _ in self.thread_factor})
        per_w = []
        for w in ws:
            bs = sorted((b for v, b in self.thread_factor if v == w), reverse=True)  # ascending 1/b
            f = [float(self.thread_factor[(w, b)](np.log2(threads))) for b in bs]
            per_w.append(float(np.interp(1 / batch, [1 / b for b in bs], f)))
        return float(np.interp(np.log2(workers), np.log2(ws), per_w))

    def epoch_time(self, workers: int, threads: int, batch: int) -> float:
        """Predicted wall-clock seconds of one epoch."""
        return self.core_seconds(workers, threads, batch) / (workers * threads)


class AccuracyModel:
    """Accuracy after ``e`` epochs at global batch ``b``: a power law per profiled batch size
    (runs at the same batch pooled, as synchronous data-parallel training at a fixed global batch
    follows the same trajectory whatever the workers), then, at each epoch count, an isotonic fit
    in log batch whose direction is read from the data at the epoch budget and then held for
    every epoch count. Non-decreasing in epochs by construction.

    A run on a fraction f of the training rows counts each of its passes as f epochs (the same
    number of optimizer steps), so short profile runs on a subset share one learning curve with
    full-data runs reused from model directories.

    The curves are measured at a constant learning rate, so that they continue; the planned run
    anneals its rate (one-cycle), which ends higher than the constant-rate curve at the same
    epoch. An ``annealed`` run (the final recipe over a short run) measures that gain, the
    ``anneal_bonus``: its last accuracy less the constant-rate curve's at the same epoch (mean
    over such runs). It is added to every prediction, so the model predicts annealed runs; with
    no annealed run it is 0 and the predictions err low. (Measured on Fashion-MNIST: without it,
    predictions of 8-epoch one-cycle runs fell 1.5-2 points short.)"""

    def __init__(self, runs: Iterable[Measurement], max_epochs: int) -> None:
        runs = list(runs)
        points: dict[int, list[tuple[float, float]]] = {}
        for r in runs:
            if r.annealed:
                continue
            for i, acc in enumerate(r.curve, start=1):
                points.setdefault(r.batch, []).append((i * r.pass_fraction, acc))
        if not points:
            raise ValueError("no profile run recorded a test accuracy; the accuracy model needs one")
        self.max_epochs = max_epochs
        self.batches = sorted(points)
        # the epochs each profiled batch's learning curve reaches (its measured horizon)
        self.horizons = {b: max(e for e, _ in pts) for b, pts in points.items()}
        self.curves: dict[int, LearningCurve] = {}
        for b in self.batches:
            e, y = zip(*sorted(points[b]), strict=True)
            self.curves[b] = fit_learning_curve(np.array(e), np.array(y))
        lb = np.log2(self.batches)
        final = [float(self.curves[b](max_epochs)) for b in self.batches]
        self.increasing = fit_monotone(lb, final).increasing if len(lb) > 1 else True
        epochs = np.arange(1, max_epochs + 1)
        # table[e-1, j]: accuracy after e epochs at profiled batch j, monotone in batch per row
        gains = [
            r.curve[-1]
            - float(
                np.interp(
                    np.log2(r.batch),
                    lb,
                    [self.curves[b](len(r.curve) * r.pass_fraction) for b in self.batches],
                )
            )
            for r in runs
            if r.annealed and r.curve
        ]
        self.anneal_bonus = float(np.mean(gains)) if gains else 0.0
        table = np.array([[float(self.curves[b](float(e))) for b in self.batches] for e in epochs])
        table += self.anneal_bonus
        for i in range(len(epochs)):
            table[i] = fit_monotone(lb, table[i], self.increasing)(lb)
        self.table = np.clip(np.maximum.accumulate(table, axis=0), 0.0, 1.0)

    def accuracy(self, batch: int, epochs: int) -> float:
        """Predicted test accuracy after ``epochs`` (1..max_epochs) at global batch ``batch``."""
        row = self.table[min(max(epochs, 1), self.max_epochs) - 1]
        return float(np.interp(np.log2(batch), np.log2(self.batches), row))

    def curve(self, batch: int) -> np.ndarray:
        """Predicted accuracy after each of 1..max_epochs epochs."""
        return np.array([self.accuracy(batch, e) for e in range(1, self.max_epochs + 1)])

    def extrapolation(self, batch: int, epochs: int) -> float:
        """How many times its measured horizon a prediction at ``batch`` after ``epochs`` reaches:
        ``epochs`` over the shorter horizon of the profiled batch sizes it is interpolated
        between (the nearest one outside their range). Above :data:`EXTRAPOLATION_LIMIT` the
        prediction rests on the power law more than on measurements."""
        if batch in self.horizons:
            near = [batch]
        else:
            near = [b for b in self.batches if b < batch][-1:] + [b for b in self.batches if b > batch][:1]
        return float(epochs / min(self.horizons[b] for b in near))
