"""Co-configuration of resources and batch size: profile a few short runs, fit order-preserving
models of epoch cost and accuracy, solve for the cheapest configuration that reaches an accuracy
target in time (seed 000's method; see :mod:`sparkvision.plan.fit`)."""

from sparkvision.plan.design import ProfileRun, design
from sparkvision.plan.fit import (
    EXTRAPOLATION_LIMIT,
    AccuracyModel,
    CostModel,
    LearningCurve,
    Measurement,
    MonotoneCurve,
    fit_learning_curve,
    fit_monotone,
    validate_learning_curve,
)
from sparkvision.plan.solve import Config, Option, Plan, candidates, solve

__all__ = [
    "EXTRAPOLATION_LIMIT",
    "AccuracyModel",
    "Config",
    "CostModel",
    "LearningCurve",
    "Measurement",
    "MonotoneCurve",
    "Option",
    "Plan",
    "ProfileRun",
    "candidates",
    "design",
    "fit_learning_curve",
    "fit_monotone",
    "solve",
    "validate_learning_curve",
]
