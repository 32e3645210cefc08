"""Self-supervised pretraining (improved SimCLR, SimSiam, SimCLR) and few-label fine-tuning."""

from sparkvision.ssl.heads import BottleneckPredictor, ImprovedPredictor, ProjectionMLP, SimCLRProjectionHead
from sparkvision.ssl.losses import DistillationLoss, NegativeCosineSimilarity, NTXentLoss
from sparkvision.ssl.methods import METHODS, build_method
from sparkvision.ssl.presets import PRESETS, PretrainConfig, resolve
from sparkvision.ssl.sampling import sample_label_fraction, stratified_sample
from sparkvision.ssl.views import RandomView, TwoViews, ViewConfig

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
