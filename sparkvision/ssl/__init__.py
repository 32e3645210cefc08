"""Self-supervised pretraining (improved SimCLR, SimSiam, SimCLR) and few-label fine-tuning.

Names load on first use (see :mod:`sparkvision.train`): the command line needs only the
configuration modules, not the training code behind them.
"""

from typing import TYPE_CHECKING

from sparkvision.lazy import lazy_exports

_EXPORTS = {
    "BottleneckPredictor": "heads",
    "ImprovedPredictor": "heads",
    "ProjectionMLP": "heads",
    "SimCLRProjectionHead": "heads",
    "DistillationLoss": "losses",
    "NegativeCosineSimilarity": "losses",
    "NTXentLoss": "losses",
    "METHODS": "methods",
    "build_method": "methods",
    "PRESETS": "presets",
    "PretrainConfig": "presets",
    "resolve": "presets",
    "sample_label_fraction": "sampling",
    "stratified_sample": "sampling",
    "RandomView": "views",
    "TwoViews": "views",
    "ViewConfig": "views",
}

if TYPE_CHECKING:
    from sparkvision.ssl.heads import (
        BottleneckPredictor,
        ImprovedPredictor,
        ProjectionMLP,
        SimCLRProjectionHead,
    )
    from sparkvision.ssl.losses import DistillationLoss, NegativeCosineSimilarity, NTXentLoss
    from sparkvision.ssl.methods import METHODS, build_method
    from sparkvision.ssl.presets import PRESETS, PretrainConfig, resolve
    from sparkvision.ssl.sampling import sample_label_fraction, stratified_sample
    from sparkvision.ssl.views import RandomView, TwoViews, ViewConfig

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "METHODS",
    "PRESETS",
    "BottleneckPredictor",
    "DistillationLoss",
    "ImprovedPredictor",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "PretrainConfig",
    "ProjectionMLP",
    "RandomView",
    "SimCLRProjectionHead",
    "TwoViews",
    "ViewConfig",
    "build_method",
    "resolve",
    "sample_label_fraction",
    "stratified_sample",
]
