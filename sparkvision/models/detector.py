"""Object detectors by name, and their model directory (safetensors + JSON, no pickle).

Why a registry of their own beside :mod:`sparkvision.models.registry`: a registered classifier is
an :class:`~sparkvision.models.registry.ImageModel` (features, then a head over classes), which
``train``, ``embed`` and the SSL methods rely on; a detector maps images to lists of boxes and
fits none of that. So ``create_detector`` / ``list_detectors`` mirror ``create_model`` /
``list_models`` for detectors, and ``sparkvision train --model`` never offers one.

The default detector, ``fasterrcnn_mobilenet_v3``, is torchvision's
``fasterrcnn_mobilenet_v3_large_320_fpn``, chosen over ``ssdlite320_mobilenet_v3_large`` because:

* **Cost per image on small scenes.** SSDlite's input is fixed at 320x320 (torchvision refuses
  another ``size``), so a 128x128 scene is upsampled and pays 320x320 of convolutions, about 6x the
  pixels; Faster R-CNN takes ``min_size``/``max_size``, so a 128-pixel scene runs at 128.
* **High mAP from little data, from random weights.** SSDlite's recipe trains 600 epochs on COCO;
  a two-stage detector with an FPN (proposals first, then a classifier over few, well-placed
  regions) needs far fewer steps, which is what a detector trained on a few thousand scenes on
  CPUs, without a pretrained backbone, has.

``fasterrcnn_tiny`` is the same two-stage detector over a four-layer backbone, for training from
random weights on CPUs (see its docstring for what was measured).

Every detector is built with ``weights=None, weights_backbone=None`` (nothing is ever downloaded); a
weights file to start from is :func:`start_weights`. The model normalises nothing itself
(``image_mean`` 0, ``image_std`` 1): the table's pixel statistics live in ``preprocess.json`` as for
every model, and inference applies them with the shared transform. ``min_size = max_size`` = the
input side, so the detector does not resize what preprocessing already sized.

Directory (see :mod:`sparkvision.models.modeldir`)::

    model.safetensors   weights
    config.json         {"model", "num_classes" (with background), "in_channels": 3, "model_kwargs",
                         "task": "detection", "class_agnostic", "image_size": [H, W]}
    classes.json        the detector's class names (["product"] when class-agnostic)
    preprocess.json     channels, size, mean, std
    metrics.json        what training measured (mAP per epoch)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn
from torchvision.models.detection import FasterRCNN, fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation

from sparkvision.errors import ParamError
from sparkvision.models.modeldir import (
    Preprocess,
    check_files,
    one_line,
    read_classes,
    read_json,
    read_preprocess,
    read_weights,
)
from sparkvision.models.weights import read_state_file

TASK = "detection"
AGNOSTIC_CLASS = "product"

DetectorFactory = Callable[..., nn.Module]
_DETECTORS: dict[str, DetectorFactory] = {}

# FasterRCNN arguments a user may set through ``model_kwargs`` (sizes of the proposal and
# sampling stages, thresholds); the rest (backbone, normalisation, input size) are fixed here.
TUNABLE = (
    "rpn_pre_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image",
    "box_batch_size_per_image",
    "box_detections_per_img",
    "box_score_thresh",
    "box_nms_thresh",
    "rpn_score_thresh",
)


def register_detector(name: str) -> Callable[[DetectorFactory], DetectorFactory]:
    """Register ``fn(num_classes, image_size, **kw) -> nn.Module`` (torchvision's detection API:
    ``model(images, targets)`` gives losses in train mode, ``model(images)`` detections in eval)."""

    def wrap(fn: DetectorFactory) -> DetectorFactory:
        if name in _DETECTORS:
            raise ValueError(f"detector {name!r} is already registered")
        _DETECTORS[name] = fn
        return fn

    return wrap


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def create_detector(name: str, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """A registered detector for ``num_classes`` classes *including* the background (index 0)."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered detectors: {', '.join(list_detectors())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
    unknown = sorted(set(kwargs) - set(detector_arguments(name)))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} of detector {name!r}; "
            f"it takes {', '.join(detector_arguments(name))}"
        )
    return _DETECTORS[name](num_classes=num_classes, image_size=image_size, **kwargs)


def detector_arguments(name: str) -> list[str]:
    """The keyword arguments ``name``'s factory takes beyond ``num_classes`` and ``image_size``."""
    params = inspect.signature(_DETECTORS[name]).parameters
    named = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    tunable = TUNABLE if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else ()
    return sorted((named | set(tunable)) - {"num_classes", "image_size"})


@register_detector("fasterrcnn_mobilenet_v3")
def fasterrcnn_mobilenet_v3(num_classes: int, image_size: int, **kwargs: Any) -> FasterRCNN:
    """``fasterrcnn_mobilenet_v3_large_320_fpn`` from random weights at ``image_size`` pixels.

    Its anchors (32 to 512 pixels, made for a 320-pixel input) are scaled by ``image_size / 320``,
    so an object covering a given share of the image meets the same anchors at any input size
    (a 128-pixel scene's items, 29 to 99 pixels wide, would otherwise meet anchors of 32 and up
    only). The anchor generator has no weights: the swap changes no tensor of the model.
    Defaults sized for scenes of a few objects: 300 proposals scored in training (torchvision's
    2000 are for COCO's crowds) and 128 sampled regions per image, which halves a CPU step.
    """
    kw: dict[str, Any] = {
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 300,
        "box_batch_size_per_image": 128,
        **kwargs,
    }
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        **kw,
    )
    scale = image_size / 320
    sizes = tuple(tuple(a * scale for a in (32, 64, 128, 256, 512)) for _ in range(3))
    model.rpn.anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 3)
    return model


@register_detector("fasterrcnn_tiny")
def fasterrcnn_tiny(num_classes: int, image_size: int, width: int = 32, **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN over a four-convolution backbone (stride 8, ``2 * width`` channels, one feature
    map): for learning from random weights on CPUs, where MobileNetV3's 5M parameters are not.

    Measured on 64-pixel scenes of one planted square (plain PyTorch, 2 threads, AdamW 3e-3,
    batch 8): this model found 16 of 16 held-out squares (IoU > 0.5) after 80 steps (34 s), while
    ``fasterrcnn_mobilenet_v3`` found 0 of 16 after 150 steps (137 s). The anchors are those of
    ``fasterrcnn_mobilenet_v3`` (32 to 256 pixels at a 320-pixel input) scaled to ``image_size``.
    """
    body = nn.Sequential(
        Conv2dNormActivation(3, width, 3, stride=2),
        Conv2dNormActivation(width, width, 3, stride=2),
        Conv2dNormActivation(width, 2 * width, 3, stride=2),
        Conv2dNormActivation(2 * width, 2 * width, 3),
    )
    body.out_channels = 2 * width  # type: ignore[assignment]  # what FasterRCNN reads of a backbone
    scale = image_size / 320
    kw: dict[str, Any] = {
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 300,
        "box_batch_size_per_image": 64,
        "rpn_batch_size_per_image": 64,
        **kwargs,
    }
    return FasterRCNN(
        body,
        num_classes=num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=AnchorGenerator(
            (tuple(a * scale for a in (32, 64, 128, 256)),), ((0.5, 1.0, 2.0),)
        ),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        **kw,
    )


@dataclass
class DetectorSpec:
    model: str
    num_classes: int  # with the background
    image_size: tuple[int, int]  # (H, W) the detector sees
    class_agnostic: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return create_detector(self.model, self.num_classes, max(self.image_size), **self.model_kwargs)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_classes": self.num_classes,
            "in_channels": 3,
            "model_kwargs": self.model_kwargs,
            "task": TASK,
            "class_agnostic": self.class_agnostic,
            "image_size": list(self.image_size),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DetectorSpec:
        if d.get("task") != TASK:
            raise ValueError('config.json is not a detector\'s (no "task": "detection")')
        h, w = (int(v) for v in d["image_size"])
        return cls(
            str(d["model"]), int(d["num_classes"]), (h, w), bool(d["class_agnostic"]), dict(d["model_kwargs"])
        )


def detector_json(
    spec: DetectorSpec, class_names: list[str], preprocess: Preprocess, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The directory's JSON files beside ``model.safetensors``, by file name."""
    return {
        "config.json": spec.to_json(),
        "classes.json": list(class_names),
        "preprocess.json": preprocess.to_json(),
        "metrics.json": metrics,
    }


@dataclass
class LoadedDetector:
    model: nn.Module
    spec: DetectorSpec
    class_names: list[str]
    preprocess: Preprocess
    weights: bytes  # the safetensors file as read: what a broadcast ships


def load_detector_dir(path: str, param: str = "model_dir") -> LoadedDetector:
    """Read and check a detector's directory (weights loaded strictly, one forward pass on a blank
    input); every fault is one :class:`ParamError` line on ``param``, a missing file a
    :class:`FileNotFoundError`."""
    check_files(path)
    try:
        spec = DetectorSpec.from_json(read_json(path, "config.json", param))
    except (KeyError, TypeError, ValueError) as e:
        raise ParamError(param, f"{path}: not a detector's model directory: {one_line(str(e))}") from None
    pre = read_preprocess(path, param)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        data = f.read()
    try:
        model = spec.build()
        model.load_state_dict(read_weights(path, data, param))
    except (RuntimeError, ValueError) as e:
        raise ParamError(param, f"{path}: weights do not fit the detector: {one_line(str(e))}") from None
    model.eval()
    with torch.inference_mode():
        model([torch.zeros(3, *pre.size)])
    return LoadedDetector(model, spec, read_classes(path, param), pre, data)


def start_weights(model: nn.Module, path: str) -> tuple[bytes, int]:
    """The tensors of weights file ``path`` that fit ``model``, as safetensors bytes, and how many.

    Keys are taken as the detector's own, or as a MobileNetV3's (``features.N...``, e.g. an
    ImageNet backbone) mapped onto the detector's ``backbone.body.N...``; a tensor whose shape
    differs (the class head of another label set) is left at its random start. None fitting is
    one line: a file for another architecture must not train silently from scratch.
    """
    own = model.state_dict()
    fitting: dict[str, torch.Tensor] = {}
    for key, value in read_state_file(path).items():
        key = key.removeprefix("module.")
        for name in (key, "backbone.body." + key.removeprefix("features.")):
            if name in own and own[name].shape == value.shape:
                fitting[name] = value.contiguous()
                break
    if not fitting:
        raise ParamError(
            "weights", f"no tensor of {path} fits the detector (neither its keys nor a backbone's)"
        )
    return st_save(fitting), len(fitting)
