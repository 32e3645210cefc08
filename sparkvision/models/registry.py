"""Models by name, timm-style: ``@register_model`` and ``create_model(name, **kw)``.

Every registered model is an :class:`ImageModel`: ``forward_features`` gives a flat ``(B, D)``
feature vector and ``forward_head`` maps it to class logits, so classifying, embedding and
self-supervised pretraining share one backbone path.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., ImageModel]] = {}
# Families too large to register one by one (timm's ~1,200 models): prefix -> (the factory of a
# name after the prefix, or None when there is no such model; the family's names).
_FAMILIES: dict[str, tuple[Callable[[str], Callable[..., ImageModel] | None], Callable[[], list[str]]]] = {}


class ImageModel(nn.Module):
    """Base class: a backbone (``forward_features``) and a linear-or-MLP head (``forward_head``)."""

    num_features: int
    num_classes: int
    in_channels: int
    head: nn.Module  # a Linear classifier; nn.Identity while an SSL method pretrains the encoder
    arch: dict[str, Any] = {}  # constructor arguments that fix the architecture (saved with the weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        return self.head(features)

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier (fine-tuning on a new label set)."""
        self.num_classes = num_classes
        d = self.arch["neck"][-1] if "neck" in self._modules else self.num_features
        self.head = nn.Linear(d, num_classes)

    def attach_neck(self, dims: list[int]) -> None:
        """Put FC + BN + ReLU layers of widths ``dims`` between the features and a new head.

        Why: SimCLRv2 (Chen et al. 2020, https://arxiv.org/abs/2006.10029, sec. 2) fine-tunes from
        a middle layer of the pretraining projector, i.e. keeps its first layer(s) as part of the
        classifier; this is that layer, built exactly like the projector's (``ssl.heads``), so
        its pretrained weights load into it. Recorded in ``arch`` so the model dir rebuilds it.
        """
        layers: list[nn.Module] = []
        d = self.num_features
        for width in dims:
            layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            d = width
        self.neck = nn.Sequential(*layers)
        self.head = nn.Linear(d, self.num_classes)
        self.arch = {**self.arch, "neck": list(dims)}

    def backbone_parts(self) -> list[nn.Module]:
        """Everything but the head and the neck: what ``--freeze backbone`` stops."""
        return [m for name, m in self.named_children() if name not in ("head", "neck")]

    def stages(self) -> list[nn.Module]:
        """The backbone's stages in input order (``--freeze N`` freezes the first N): here its
        top-level parts with parameters."""
        return [m for m in self.backbone_parts() if any(True for _ in m.parameters())]

    def freeze(self, spec: str | int | None) -> int:
        """Stop training the backbone (``"backbone"``: all but the head and the neck) or its first
        ``N`` :meth:`stages`. Frozen layers stay in eval mode too (normalisation statistics
        fixed), as a frozen pretrained network should. Returns the frozen parameter count."""
        if spec in (None, "none", 0, "0"):
            return 0
        stages = self.backbone_parts() if spec == "backbone" else self.stages()
        if spec != "backbone":
            n = int(spec)
            if n > len(stages):
                raise ValueError(f"freeze {n} is over the {len(stages)} stages of {type(self).__name__}")
            stages = stages[:n]
        for m in stages:
            m.requires_grad_(False)
        self._frozen = stages
        self.train(self.training)
        return sum(p.numel() for m in stages for p in m.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen", ()):
            m.eval()
        return self

    def file_keys(self, key: str) -> list[str]:
        """Where a tensor of a weights file (``--init-weights``) may go in this model, best first:
        its own key, or the same under ``backbone.`` (a library network wrapped as the backbone)."""
        return [key, "backbone." + key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        neck = self._modules.get("neck")  # optional MLP between the features and the head (attach_neck)
        return self.forward_head(f if neck is None else neck(f))


def register_model(name: str | Callable | None = None):
    """Decorator registering a factory ``fn(num_classes, in_channels, **kw) -> ImageModel``."""

    def wrap(fn: Callable[..., ImageModel], key: str) -> Callable[..., ImageModel]:
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    if callable(name):
        return wrap(name, name.__name__)
    return lambda fn: wrap(fn, name or fn.__name__)


def unregister_model(name: str) -> None:
    _REGISTRY.pop(name, None)


def register_family(
    prefix: str,
    factory_of: Callable[[str], Callable[..., ImageModel] | None],
    names: Callable[[], list[str]],
) -> None:
    """Models named ``prefix + NAME``, resolved on use (``factory_of(NAME)``; None: no such model)."""
    _FAMILIES[prefix] = (factory_of, names)


def list_models(families: bool = False) -> list[str]:
    """The registered names; with ``families``, every name of the prefix families too."""
    _load_builtin()
    extra = [n for _, names in _FAMILIES.values() for n in names()] if families else []
    return sorted(_REGISTRY) + extra


def model_families() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def factory_of(name: str) -> Callable[..., ImageModel]:
    """The factory of a registered name or of a family's name; an unknown name is a ValueError
    that lists the registered models and the families."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, (resolve, _) in _FAMILIES.items():
        if name.startswith(prefix):
            found = resolve(name.removeprefix(prefix))
            if found is not None:
                return found
    own = sorted(
        n for n, f in _REGISTRY.items() if "/" not in n and f is not _REGISTRY.get("torchvision/" + n)
    )
    near = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    families = "".join(f", {p}NAME" for p in sorted(_FAMILIES))
    raise ValueError(
        f"unknown model {name!r}; "
        + (f"did you mean {', '.join(near)}? " if near else "")
        + f"registered: {', '.join(own)}, every torchvision classifier (see `sparkvision models`){families}"
    )


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int | None = None, **kwargs: Any
) -> ImageModel:
    """Build a registered model; ``image_size`` is passed to factories that declare it."""
    factory = factory_of(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if image_size is not None and _takes_image_size(factory):
        kwargs["image_size"] = image_size
    neck = kwargs.pop("neck", None)  # any model: see ImageModel.attach_neck
    if neck is not None and (
        not isinstance(neck, (list, tuple)) or not all(isinstance(d, int) and d > 0 for d in neck)
    ):
        raise ValueError(f"neck must be a list of positive layer widths, got {neck!r}")
    model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if not isinstance(model, ImageModel):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not an ImageModel")
    if neck:
        model.attach_neck(list(neck))
    return model


def model_arguments(name: str) -> list[str] | None:
    """The keyword arguments ``name``'s factory takes (``neck`` for any model), or None when it
    takes any (``**kwargs``): so a misspelt model argument is refused before a job starts."""
    factory = factory_of(name)
    names: set[str] = set()
    for fn in (factory, typing.get_type_hints(factory).get("return")):  # a factory may pass **kw to its class
        if fn is None:
            return None
        params = inspect.signature(fn).parameters
        names |= {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    else:
        return None
    return sorted((names | {"neck"}) - {"self", "num_classes", "in_channels"})


def model_kwargs_for(name: str, kwargs: dict[str, Any], image_size: int) -> dict[str, Any]:
    """``kwargs`` plus ``image_size`` when ``name``'s factory declares it: what a training run
    records in its model directory, so the model is rebuilt for the size it was trained at."""
    kw = dict(kwargs)
    if _takes_image_size(factory_of(name)):
        kw.setdefault("image_size", image_size)
    return kw


def _takes_image_size(factory: Callable[..., ImageModel]) -> bool:
    return "image_size" in inspect.signature(factory).parameters


def _load_builtin() -> None:
    # Here, not at the top: cnn and resnet import this module to register themselves (a cycle).
    from sparkvision.models import cnn, dbn, resnet, zoo  # noqa: F401 - importing registers them


def wrap_module(backbone: nn.Module, num_features: int, num_classes: int, in_channels: int) -> ImageModel:
    """Adapt any ``nn.Module`` that maps images to ``(B, D)`` features into an :class:`ImageModel`."""
    return _Wrapped(backbone, num_features, num_classes, in_channels)


class _Wrapped(ImageModel):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features, self.num_classes, self.in_channels = num_features, num_classes, in_channels
        self.head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone(x), 1)
