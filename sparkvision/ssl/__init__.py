"""Self-supervised pretraining (improved SimCLR, SimSiam, SimCLR) and few-label fine-tuning."""

from .heads import BottleneckPredictor, ImprovedPredictor, ProjectionMLP, SimCLRProjectionHead
from .losses import DistillationLoss, NegativeCosineSimilarity, NTXentLoss
from .methods import METHODS, build_method
from .presets import PRESETS, PretrainConfig, resolve
from .sampling import sample_label_fraction, stratified_sample
from .views import RandomView, TwoViews, ViewConfig

__all__ = [
    "METHODS", "PRESETS", "BottleneckPredictor", "DistillationLoss", "ImprovedPredictor", "NTXentLoss", "NegativeCosineSimilarity",
    "PretrainConfig", "ProjectionMLP", "RandomView", "SimCLRProjectionHead", "TwoViews", "ViewConfig",
    "build_method", "resolve", "sample_label_fraction", "stratified_sample",
]
