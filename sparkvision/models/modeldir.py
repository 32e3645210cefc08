"""The model directory: everything needed to use a trained model, with no pickle anywhere.

::

    MODEL_DIR/
      model.safetensors   weights (safetensors: loading cannot execute code)
      config.json         {"model": name, "model_kwargs": {...}, "num_classes": K, "in_channels": C}
      classes.json        ["T-shirt/top", ...]
      preprocess.json     {"channels": 1, "size": [28, 28], "mean": [...], "std": [...]}
      metrics.json        whatever training/evaluation measured

Preprocessing travels with the weights so that batch inference cannot use the wrong transform.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparkvision.models import ImageModel, create_model

WEIGHTS = "model.safetensors"


@dataclass
class Preprocess:
    channels: int = 1
    size: tuple[int, int] = (28, 28)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            channels=int(d["channels"]),
            size=(int(d["size"][0]), int(d["size"][1])),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


@dataclass
class ModelSpec:
    model: str
    num_classes: int
    in_channels: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> ImageModel:
        return create_model(self.model, self.num_classes, self.in_channels, **self.model_kwargs)


@dataclass
class LoadedModel:
    model: ImageModel
    spec: ModelSpec
    class_names: list[str]
    preprocess: Preprocess
    metrics: dict[str, Any]
    path: str


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors without DDP's ``module.`` prefix, as safetensors requires."""
    sd = model.state_dict()
    return {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in sd.items()}


def save_model_dir(
    out: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    class_names: list[str],
    preprocess: Preprocess,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    os.makedirs(out, exist_ok=True)
    # A model that reports its full architecture (``arch``) has it pinned in the spec, so a later
    # change of the factory's defaults cannot break loading this directory.
    spec = replace(spec, model_kwargs={**spec.model_kwargs, **getattr(model, "arch", {})})
    save_file(state_dict_for_save(model), os.path.join(out, WEIGHTS))
    _write_json(os.path.join(out, "config.json"), {**asdict(spec), **(extra or {})})
    _write_json(os.path.join(out, "classes.json"), list(class_names))
    _write_json(os.path.join(out, "preprocess.json"), preprocess.to_json())
    _write_json(os.path.join(out, "metrics.json"), metrics or {})
    return out


def read_spec(path: str) -> tuple[ModelSpec, dict[str, Any]]:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    spec = ModelSpec(
        model=cfg["model"],
        num_classes=int(cfg["num_classes"]),
        in_channels=int(cfg["in_channels"]),
        model_kwargs=dict(cfg.get("model_kwargs", {})),
    )
    return spec, cfg


def load_model_dir(path: str, map_location: str = "cpu") -> LoadedModel:
    """Load a model directory; a clear error names what is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    for name in (WEIGHTS, "config.json", "preprocess.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} is not a sparkvision model directory: {name} is missing")
    spec, _ = read_spec(path)
    model = spec.build()
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS), device=map_location))
    model.eval()
    with open(os.path.join(path, "preprocess.json")) as f:
        pre = Preprocess.from_json(json.load(f))
    classes: list[str] = []
    if os.path.exists(os.path.join(path, "classes.json")):
        with open(os.path.join(path, "classes.json")) as f:
            classes = json.load(f)
    metrics: dict[str, Any] = {}
    if os.path.exists(os.path.join(path, "metrics.json")):
        with open(os.path.join(path, "metrics.json")) as f:
            metrics = json.load(f)
    return LoadedModel(model, spec, classes, pre, metrics, path)


def model_fingerprint(path: str) -> str:
    """Changes whenever the weights change: the cache key for per-worker model reuse."""
    st = os.stat(os.path.join(path, WEIGHTS))
    return hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
