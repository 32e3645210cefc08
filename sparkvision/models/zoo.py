"""Every torchvision classification model by name, and timm's when timm is installed.

A zoo model is the library's network with its classifier cut off: the input of the last
``nn.Linear`` becomes :meth:`ImageModel.forward_features` (the pooled features that ``embed``
returns and self-supervised methods pretrain), and a new ``head`` sized to the table's classes
replaces the classifier. So train, evaluate, predict, embed and pretrain work with any of them
unchanged. Gray tables are fed to the 3-channel stem by repeating the channel, which keeps
ImageNet weights usable.

Names: the torchvision name (``resnet50``, ``mobilenet_v3_small``, ``vit_b_16``, ...), also as
``torchvision/NAME``; ``resnet18`` alone is the library's small-image ResNet-18
(:mod:`sparkvision.models.resnet`), torchvision's is ``torchvision/resnet18``. timm models are
``timm/NAME`` (``pip install 'sparkvision[timm]'``). Weights are never downloaded: a user's file
comes in through ``--init-weights`` (:meth:`ZooModel.file_keys` maps its keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from sparkvision.models.registry import ImageModel, register_family, register_model

TORCHVISION_PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"
# Builder arguments that drop auxiliary classifiers (only the main output is trained).
# (init_weights=False: PyTorch's default init, not their slow truncated-normal one.)
NO_AUX = {n: {"aux_logits": False, "init_weights": False} for n in ("googlenet", "inception_v3")}


class ZooModel(ImageModel):
    """A library classifier whose classifier layer is ``head``; ``classifier`` is that layer's
    path in the library's own state dict (``fc``, ``classifier.3``, ``heads.head``, ...), so a
    weights file's classifier tensors can be matched to ``head``."""

    def __init__(
        self, net: nn.Module, num_features: int, classifier: str, num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        self.net, self.classifier = net, classifier
        self.num_features, self.num_classes, self.in_channels = num_features, num_classes, in_channels
        self.head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)  # the 3-channel stem (and its ImageNet weights) on gray images
        return torch.flatten(self.net(x), 1)

    def stages(self) -> list[nn.Module]:
        """The blocks of a ``features`` sequence (MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet),
        else the network's top-level children that hold parameters (ResNet's stem parts and
        layer1..4, ViT's embedding and encoder)."""
        features = getattr(self.net, "features", None)
        parent = features if isinstance(features, nn.Sequential) else self.net
        return [m for m in parent.children() if any(True for _ in m.parameters())]

    def file_keys(self, key: str) -> list[str]:
        """A torchvision/timm state dict's key (or this model's own): the backbone under ``net.``,
        the classifier's tensors to ``head`` (used when their shape fits the table's classes;
        else the head starts fresh)."""
        if key.startswith(("net.", "head.", "neck.")):
            return [key]
        prefix = self.classifier + "."
        return ["head." + key.removeprefix(prefix)] if key.startswith(prefix) else ["net." + key]


def cut_classifier(net: nn.Module) -> tuple[int, str]:
    """Replace ``net``'s classifier (its last ``nn.Linear``; SqueezeNet's 1x1 convolution) so that
    ``net`` returns pooled features; ``(their width, the classifier's path)``."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    new: nn.Module
    if linears:
        path, layer = linears[-1]
        width, new = layer.in_features, nn.Identity()
    else:  # SqueezeNet: Dropout, Conv2d(512, classes, 1), ReLU, AdaptiveAvgPool2d
        path = "classifier"
        conv = next(m for m in net.get_submodule(path).modules() if isinstance(m, nn.Conv2d))
        width, new = conv.in_channels, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    parent, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, new)
    return width, path


def torchvision_model(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int | None = None, **kw: Any
) -> ZooModel:
    builder = torchvision.models.get_model_builder(name)
    args = {**NO_AUX.get(name, {}), **kw}
    if image_size is not None and name.startswith("vit_"):
        args["image_size"] = image_size  # the position embedding is sized to the input
    net = builder(weights=None, **args)
    width, path = cut_classifier(net)
    return ZooModel(net, width, path, num_classes, in_channels)


def timm_model(name: str, num_classes: int = 10, in_channels: int = 1, **kw: Any) -> ZooModel:
    import timm  # optional: only a timm/ name needs it

    net = timm.create_model(name, pretrained=False, num_classes=0, **kw)  # pooled features
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier", "head")
    return ZooModel(net, int(net.num_features), classifier, num_classes, in_channels)  # type: ignore[arg-type]


def timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return [TIMM_PREFIX + n for n in timm.list_models()]


def timm_factory(name: str) -> Callable[..., ImageModel] | None:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model {TIMM_PREFIX}{name} needs timm: pip install 'sparkvision[timm]'") from None
    if not timm.is_model(name):
        return None

    def factory(num_classes: int = 10, in_channels: int = 1, **kw: Any) -> ImageModel:
        return timm_model(name, num_classes, in_channels, **kw)

    return factory


def torchvision_factory(name: str) -> Callable[..., ImageModel]:
    """A registry factory for torchvision's ``name`` (a function, so its signature says that it
    takes ``image_size`` and any builder argument)."""

    def factory(
        num_classes: int = 10, in_channels: int = 1, image_size: int | None = None, **kw: Any
    ) -> ImageModel:
        return torchvision_model(name, num_classes, in_channels, image_size, **kw)

    return factory


def register_torchvision() -> None:
    """Every torchvision classification model under ``torchvision/NAME``, and under ``NAME`` where
    the library has no model of that name."""
    for name in torchvision.models.list_models(module=torchvision.models):
        factory = torchvision_factory(name)
        register_model(TORCHVISION_PREFIX + name)(factory)
        if name != "resnet18":  # the library's small-image ResNet-18 keeps the bare name
            register_model(name)(factory)


register_torchvision()
register_family(TIMM_PREFIX, timm_factory, timm_names)
