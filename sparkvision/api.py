"""The Python API: each operation as a function of keyword parameters, validated by its one definition.

    from sparkvision import api
    spark = api.get_spark()
    api.train(spark, table="data/fashion-mnist", out="runs/cnn", epochs=1)

Each name is the :class:`~sparkvision.ops.base.Operation` itself: the same parameters model,
defaults and checks as ``sparkvision train --help`` and the web's ``train`` job kind; an unknown
keyword raises :class:`~sparkvision.ops.base.ParamError` naming it. ``api.train.params`` is the
typed model, for code that prefers building it.
"""

from sparkvision.ops import OPERATIONS
from sparkvision.spark.session import get_spark

ingest = OPERATIONS["ingest"]
fashion_mnist = OPERATIONS["fashion-mnist"]
train = OPERATIONS["train"]
evaluate = OPERATIONS["evaluate"]
predict = OPERATIONS["predict"]
pretrain = OPERATIONS["pretrain"]
finetune = OPERATIONS["finetune"]
distill = OPERATIONS["distill"]
embed = OPERATIONS["embed"]
index = OPERATIONS["index"]
search = OPERATIONS["search"]
dedup = OPERATIONS["dedup"]
scenes = OPERATIONS["scenes"]
train_detector = OPERATIONS["train-detector"]
detect = OPERATIONS["detect"]
crop = OPERATIONS["crop"]
features = OPERATIONS["features"]
plan = OPERATIONS["plan"]
ingest_raster = OPERATIONS["ingest-raster"]
synthetic_landsat = OPERATIONS["synthetic-landsat"]

__all__ = [
    "crop",
    "dedup",
    "detect",
    "distill",
    "embed",
    "evaluate",
    "fashion_mnist",
    "features",
    "finetune",
    "get_spark",
    "index",
    "ingest",
    "ingest_raster",
    "plan",
    "predict",
    "pretrain",
    "scenes",
    "search",
    "synthetic_landsat",
    "train",
    "train_detector",
]
