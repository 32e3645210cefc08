"""``plan``: its fits and solver without Spark (synthetic monotone surfaces with a known optimum),
and the operation end to end on a tiny table (local[2])."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkvision.plan import (
    EXTRAPOLATION_LIMIT,
    AccuracyModel,
    Config,
    CostModel,
    Measurement,
    candidates,
    design,
    fit_learning_curve,
    fit_monotone,
    solve,
    validate_learning_curve,
)

WORKERS = [1, 2, 4, 8, 16]
THREADS = [1, 2]
BATCHES = [32, 64, 128, 256, 512]
EPOCHS = 20


def true_epoch_time(c: Config) -> float:
    """Compute shared over cores (threads at 80% efficiency), plus a per-step all-reduce that
    grows with the workers: time falls with workers, then rises; core-seconds only rise."""
    steps = 60_000 / c.batch
    compute = 60_000 * 1e-3 / (c.workers * c.threads**0.8)
    return compute + steps * 0.03 * np.log2(2 * c.workers)


def true_accuracy(batch: int, epochs: int) -> float:
    """Larger batches converge slower per epoch and to a lower asymptote."""
    a = 0.93 - 0.006 * np.log2(batch / 32)
    return float(a - 0.1 * (batch / 32) ** 0.15 * epochs**-0.6)


def exhaustive(target: float, deadline: float | None) -> tuple[Config, int, float]:
    best = None
    for c in candidates(WORKERS, THREADS, BATCHES):
        for e in range(1, EPOCHS + 1):
            t = e * true_epoch_time(c)
            if true_accuracy(c.batch, e) >= target and (deadline is None or t <= deadline):
                cost = c.workers * c.threads * t
                if best is None or cost < best[2]:
                    best = (c, e, cost)
                break
    assert best is not None
    return best


def test_fit_monotone_is_monotone_and_reads_the_direction_from_the_data() -> None:
    rng = np.random.default_rng(0)
    x = np.log2(np.array(BATCHES * 3, dtype=float))
    y_down = 0.9 - 0.02 * x + rng.normal(0, 0.01, x.size)
    fit = fit_monotone(x, y_down)
    grid = np.linspace(x.min() - 1, x.max() + 1, 50)
    assert not fit.increasing and np.all(np.diff(fit(grid)) <= 1e-12)
    fit_up = fit_monotone(x, -y_down)
    assert fit_up.increasing and np.all(np.diff(fit_up(grid)) >= -1e-12)
    forced = fit_monotone(x, y_down, increasing=True)  # forced the wrong way: it can only flatten
    assert np.ptp(forced(grid)) < np.ptp(fit(grid))


def test_learning_curve_recovers_a_power_law() -> None:
    rng = np.random.default_rng(1)
    e = np.arange(1, 9)
    acc = 0.91 - 0.25 * e**-0.7 + rng.normal(0, 0.001, e.size)
    c = fit_learning_curve(e, acc)
    assert abs(c.a - 0.91) < 0.02 and abs(c.alpha - 0.7) < 0.25
    assert abs(float(c(20)) - (0.91 - 0.25 * 20**-0.7)) < 0.005
    err = validate_learning_curve(e, acc, holdout=2)
    assert err is not None and err < 0.005
    assert validate_learning_curve(e[:2], acc[:2]) is None  # too short to hold anything out


def test_cost_model_is_monotone_in_workers_where_time_is_not() -> None:
    runs = [
        Measurement(w, 1, b, true_epoch_time(Config(w, 1, b)))
        for b in (32, 128, 512)
        for w in (1, 2, 4, 8, 16)
        if b % w == 0
    ] + [Measurement(1, 2, 128, true_epoch_time(Config(1, 2, 128)))]
    model = CostModel(runs)
    for b in BATCHES:
        core = [model.core_seconds(w, 1, b) for w in WORKERS]
        assert np.all(np.diff(core) >= -1e-9), (b, core)
    truth = [true_epoch_time(Config(w, 1, 128)) for w in WORKERS]
    assert np.argmin(truth) not in (0, len(truth) - 1)  # the surface really is non-monotone in time
    for w in WORKERS:  # exact at the profiled points, interpolated between
        assert model.epoch_time(w, 1, 128) == pytest.approx(true_epoch_time(Config(w, 1, 128)), rel=1e-6)
    assert model.epoch_time(1, 2, 128) == pytest.approx(true_epoch_time(Config(1, 2, 128)), rel=1e-6)


def test_accuracy_model_extrapolates_and_is_monotone() -> None:
    runs = [
        Measurement(1, 1, b, 1.0, tuple(true_accuracy(b, e) for e in range(1, 5))) for b in (32, 128, 512)
    ]
    model = AccuracyModel(runs, EPOCHS)
    assert not model.increasing  # read from the data: larger batches reach less
    for b in BATCHES:
        curve = model.curve(b)
        assert np.all(np.diff(curve) >= 0)
    finals = [model.accuracy(b, EPOCHS) for b in BATCHES]
    assert np.all(np.diff(finals) <= 0)
    for b in (32, 128, 512):
        assert model.accuracy(b, EPOCHS) == pytest.approx(true_accuracy(b, EPOCHS), abs=0.005)


def test_extrapolation_is_measured_against_the_shorter_neighbouring_curve() -> None:
    # batch 32: 4 passes of a quarter epoch (1 epoch of curve); batch 512: 4 full epochs
    runs = [
        Measurement(1, 1, 32, 1.0, (0.6, 0.7, 0.75, 0.78), pass_fraction=0.25),
        Measurement(1, 1, 512, 1.0, (0.5, 0.6, 0.65, 0.68)),
        Measurement(1, 1, 512, 1.0, (0.7,), annealed=True),  # an annealed run sets no horizon
    ]
    model = AccuracyModel(runs, 20)
    assert model.horizons == {32: 1.0, 512: 4.0}
    assert model.extrapolation(512, 6) == pytest.approx(1.5)
    assert model.extrapolation(32, 6) == pytest.approx(6.0)
    assert model.extrapolation(128, 3) == pytest.approx(3.0)  # between them: the shorter curve
    assert model.extrapolation(2048, 8) == pytest.approx(2.0)  # beyond them: the nearest
    assert model.extrapolation(512, 8) <= EXTRAPOLATION_LIMIT < model.extrapolation(32, 3)


def test_solver_finds_the_optimum_of_known_surfaces() -> None:
    configs = candidates(WORKERS, THREADS, BATCHES)
    for target, deadline in [(0.90, None), (0.88, 600.0), (0.87, 300.0), (0.86, 150.0), (0.80, 40.0)]:
        plan = solve(configs, true_epoch_time, true_accuracy, target, EPOCHS, deadline, top=len(configs))
        cfg, epochs, cost = exhaustive(target, deadline)
        assert plan.choice is not None, (target, deadline, plan.message)
        assert (plan.choice.config, plan.choice.epochs) == (cfg, epochs)
        assert plan.choice.cost == pytest.approx(cost)
        assert plan.choice.accuracy >= target
        assert all(r.cost >= plan.choice.cost for r in plan.runners_up)
        assert len(plan.runners_up) + 1 + len(plan.ruled_out) == len(configs)  # each one accounted for


def test_deadline_rules_configs_out_with_the_reason() -> None:
    configs = candidates(WORKERS, THREADS, BATCHES)
    free = solve(configs, true_epoch_time, true_accuracy, 0.87, EPOCHS)
    assert free.choice is not None and free.choice.time_s > 300.0
    plan = solve(configs, true_epoch_time, true_accuracy, 0.87, EPOCHS, deadline_s=300.0)
    late = dict(plan.ruled_out)
    assert free.choice.config in late and "over the deadline of 300 s" in late[free.choice.config]
    assert plan.choice is not None and plan.choice.time_s <= 300.0
    assert plan.choice.cost > free.choice.cost
    assert plan.choice.config.workers * plan.choice.config.threads > 1  # buys speed with cores


def test_infeasible_target_names_the_best_reachable_accuracy() -> None:
    configs = candidates(WORKERS, THREADS, BATCHES)
    plan = solve(configs, true_epoch_time, true_accuracy, 0.99, EPOCHS)
    assert plan.choice is None
    best = true_accuracy(32, EPOCHS)
    assert "not reachable" in plan.message and f"{best:.4f}" in plan.message
    assert all("below the target" in why for _, why in plan.ruled_out)
    late = solve(configs, true_epoch_time, true_accuracy, 0.90, EPOCHS, deadline_s=1.0)
    assert late.choice is None and "deadline" in late.message


def test_design_stays_in_budget_and_covers_the_ranges() -> None:
    runs = design(16, [1, 2], BATCHES, budget=10)
    assert len(runs) <= 10
    assert {r.batch for r in runs if r.epochs > 1} >= {32, 512}  # both ends get a learning curve
    assert all(r.batch % r.workers == 0 for r in runs)
    assert max(r.workers for r in runs) == 16 and {r.threads for r in runs} == {1, 2}
    with pytest.raises(ValueError, match="budget"):
        design(16, [1], BATCHES, budget=1)


def test_an_annealed_run_lifts_the_constant_rate_curves_by_its_gain() -> None:
    """The planned run anneals; a short run of that recipe measures how far above the
    constant-rate curve it ends, and every prediction carries that gain."""
    curve = tuple(0.9 - 0.2 * e**-0.5 for e in range(1, 5))
    plain = AccuracyModel([Measurement(1, 1, 64, 10.0, curve), Measurement(1, 1, 256, 8.0, curve)], 8)
    annealed = Measurement(1, 1, 128, 9.0, curve[:-1] + (curve[-1] + 0.02,), annealed=True)
    lifted = AccuracyModel(
        [Measurement(1, 1, 64, 10.0, curve), Measurement(1, 1, 256, 8.0, curve), annealed], 8
    )
    assert plain.anneal_bonus == 0.0 and lifted.anneal_bonus == pytest.approx(0.02, abs=1e-3)
    for e in (1, 4, 8):
        assert lifted.accuracy(128, e) == pytest.approx(plain.accuracy(128, e) + 0.02, abs=1e-3)
    runs = design(2, [1], [32, 64, 128, 256], budget=6, curve_epochs=3)
    assert sum(r.annealed for r in runs) == 1 and len(runs) <= 6
    assert not any(r.annealed for r in design(2, [1], [32, 64], budget=3, curve_epochs=3))


def test_max_cores_bounds_candidates_and_profile_runs() -> None:
    """On a 2-core machine, 2 workers x 2 threads only contend: neither planned nor profiled."""
    configs = candidates([1, 2], [1, 2], [32, 64, 128], max_cores=2)
    assert {(c.workers, c.threads) for c in configs} == {(1, 1), (1, 2), (2, 1)}
    runs = design(2, [1, 2], [32, 64, 128, 256], budget=8, max_cores=2)
    assert runs and all(r.workers * r.threads <= 2 for r in runs)
    assert {(r.workers, r.threads) for r in runs} == {(1, 1), (1, 2), (2, 1)}
    with pytest.raises(ValueError, match="max_cores"):
        design(2, [4], [32, 64], budget=4, max_cores=2)


def test_plan_from_profiled_design_matches_the_oracle() -> None:
    """End to end on the synthetic surfaces: profile the design's points only, fit, solve."""
    runs = [
        Measurement(
            r.workers,
            r.threads,
            r.batch,
            true_epoch_time(Config(r.workers, r.threads, r.batch)),
            tuple(true_accuracy(r.batch, e) for e in range(1, r.epochs + 1)) if r.epochs > 1 else (),
        )
        for r in design(max(WORKERS), THREADS, BATCHES, budget=12, curve_epochs=4)
    ]
    cost, acc = CostModel(runs), AccuracyModel(runs, EPOCHS)
    plan = solve(
        candidates(WORKERS, THREADS, BATCHES),
        lambda c: cost.epoch_time(c.workers, c.threads, c.batch),
        acc.accuracy,
        0.87,
        EPOCHS,
        deadline_s=300.0,
    )
    _, _, best = exhaustive(0.87, 300.0)
    assert plan.choice is not None
    c = plan.choice.config
    true_cost = c.workers * c.threads * plan.choice.epochs * true_epoch_time(c)
    assert true_accuracy(c.batch, plan.choice.epochs) >= 0.87 - 0.002
    assert true_cost <= 1.05 * best


def test_plan_op_profiles_a_tiny_table_and_chooses(spark, tiny_table, tmp_path):
    """Two short learning-curve runs on local[2], a fit, a choice, its curves and its reasons."""
    from sparkvision.api import plan
    from sparkvision.errors import ParamError

    params = dict(
        table=tiny_table,
        max_workers=1,
        batch_sizes=[8, 16],
        threads_per_rank=[1],
        budget=2,
        curve_epochs=2,
        epochs=3,
        fraction=1.0,
    )
    s = plan(spark, out=str(tmp_path / "plan"), target_accuracy=0.3, run=True, **params)
    assert s["choice"] is not None and s["choice"]["batch_size"] in (8, 16)
    assert s["choice"]["accuracy"] >= 0.3 and s["profile_runs"] == 2
    # curves of 2 full passes: a choice of at most 3 epochs reaches 1.5x their horizon, no warning
    assert s["extrapolation"] == pytest.approx(s["choice"]["epochs"] / 2, abs=0.05) and "warning" not in s
    # --run trains the choice on all the rows and sets measured beside predicted
    m = s["measured"]
    assert m["predicted"] == s["choice"] and m["time_s"] >= 0 and 0 <= m["accuracy"] <= 1  # 0.1 s rounding
    assert m["target_met"] == (m["accuracy"] >= 0.3)
    assert m["cost"] == pytest.approx(m["time_s"], abs=0.06)  # 1 worker x 1 thread: core-s = s (rounded)
    trained = json.loads((tmp_path / "plan" / "model" / "train_config.json").read_text())
    assert (trained["batch_size"], trained["epochs"]) == (s["choice"]["batch_size"], s["choice"]["epochs"])
    assert (tmp_path / "plan" / "curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["choice"] == s["choice"]
    reused = [str(tmp_path / "plan" / "runs" / f"w1-t1-b{b}") for b in (8, 16)]
    with pytest.raises(ParamError, match="not reachable: the best predicted is"):
        plan(spark, out=str(tmp_path / "again"), target_accuracy=1.0, reuse=reused, **params)
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["profile_runs"] == 0  # all reused
