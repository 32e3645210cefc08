"""The model directory: everything needed to use a trained model, with no pickle anywhere.

::

    MODEL_DIR/
      model.safetensors   weights (safetensors: loading cannot execute code)
      config.json         {"model": name, "model_kwargs": {...}, "num_classes": K, "in_channels": C}
      classes.json        ["T-shirt/top", ...]
      preprocess.json     {"channels": 1, "size": [28, 28], "mean": [...], "std": [...], "resize": "crop"}
      metrics.json        whatever training/evaluation measured

Preprocessing travels with the weights so that batch inference cannot use the wrong transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from sparkvision.data.images import PixelDtype, pixel_dtype
from sparkvision.errors import ParamError
from sparkvision.models import ImageModel, create_model

WEIGHTS = "model.safetensors"
REQUIRED_FILES = (WEIGHTS, "config.json", "preprocess.json")
MAX_REASON_CHARS = 400  # a load error is shown on one line: torch lists every mismatched tensor


# How an image of another shape becomes the model's (H, W) input
# (:func:`sparkvision.transforms.preprocess.fit_size`):
# "stretch": resized straight to (H, W), the aspect ratio changed (how every model was fed before
#            the policy existed, so a preprocess.json without it reads as this);
# "crop":    scaled so that it covers (H, W), then the centre cut out (torchvision's Resize of the
#            shorter side then CenterCrop, for any H/W ratio); training draws random resized
#            crops from that centre when augmenting (:class:`sparkvision.train.augment.BatchAugment`).
# An image already of the target's aspect ratio is treated alike by both.
Resize = Literal["stretch", "crop"]
RESIZES: tuple[str, ...] = get_args(Resize)


def resize_policy(value: str) -> Resize:
    """``value`` checked as a :data:`Resize` (it comes from preprocess.json)."""
    if value not in RESIZES:
        raise ValueError(f"resize {value!r} is not one of {', '.join(RESIZES)}")
    return cast(Resize, value)


@dataclass
class Preprocess:
    channels: int = 1
    size: tuple[int, int] = (28, 28)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    pixel_dtype: PixelDtype = "uint8"  # "float32": trained on a float table, whose rows decode as floats
    # "stretch" unless a training run chose otherwise (TrainConfig.resize): what old model
    # directories mean, and what detectors and self-supervised models (whose boxes and views
    # assume the whole image) keep.
    resize: Resize = "stretch"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        if self.pixel_dtype == "uint8":
            del d["pixel_dtype"]  # as every model directory written before float tables
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            channels=int(d["channels"]),
            size=(int(d["size"][0]), int(d["size"][1])),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            pixel_dtype=pixel_dtype(d.get("pixel_dtype", "uint8")),
            resize=resize_policy(d.get("resize", "stretch")),  # written before the policy: stretch
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
    save_file(state_dict_for_save(model), os.path.join(out, WEIGHTS))
    for name, obj in model_dir_json(model, spec, class_names, preprocess, metrics, extra).items():
        _write_json(os.path.join(out, name), obj)
    return out


def model_dir_json(
    model: torch.nn.Module,
    spec: ModelSpec,
    class_names: list[str],
    preprocess: Preprocess,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model directory's JSON files beside its weights, by file name (training writes them
    through its output store, wherever ``OUT`` is)."""
    # A model that reports its full architecture (``arch``) has it pinned in the spec, so a later
    # change of the factory's defaults cannot break loading this directory.
    spec = replace(spec, model_kwargs={**spec.model_kwargs, **getattr(model, "arch", {})})
    return {
        "config.json": {**asdict(spec), **(extra or {})},
        "classes.json": list(class_names),
        "preprocess.json": preprocess.to_json(),
        "metrics.json": metrics or {},
    }


def check_files(path: str) -> None:
    """Raise :class:`FileNotFoundError` naming what is missing, unless ``path`` is a model directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    for name in REQUIRED_FILES:
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} is not a sparkvision model directory: {name} is missing")


# torch's wording of one mismatched tensor, shortened to "head.weight: [4, 512] in the weights, [5, 512] in the model"
SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
    r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)"
)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A library's (multi-line) error text as one line of at most ``limit`` characters."""
    text = SIZE_MISMATCH.sub(r"size mismatch for \1: \2 in the weights, \3 in the model", text)
    flat = "; ".join(part.strip().rstrip(".") for part in text.splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def read_json(path: str, name: str, param: str = "model_dir") -> Any:
    """A JSON file of the model directory; unreadable or invalid JSON is a :class:`ParamError`."""
    try:
        with open(os.path.join(path, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ParamError(param, f"{path}: {name} cannot be read: {one_line(str(e))}") from None


def read_spec(path: str, param: str = "model_dir") -> tuple[ModelSpec, dict[str, Any]]:
    cfg = read_json(path, "config.json", param)
    try:
        spec = ModelSpec(
            model=cfg["model"],
            num_classes=int(cfg["num_classes"]),
            in_channels=int(cfg["in_channels"]),
            model_kwargs=dict(cfg.get("model_kwargs", {})),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ParamError(param, f"{path}: config.json is not a model config: {e!r}") from None
    return spec, cfg


def read_preprocess(path: str, param: str = "model_dir") -> Preprocess:
    raw = read_json(path, "preprocess.json", param)
    try:
        return Preprocess.from_json(raw)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ParamError(param, f"{path}: preprocess.json is not a preprocessing config: {e!r}") from None


def read_classes(path: str, param: str = "model_dir") -> list[str]:
    if not os.path.exists(os.path.join(path, "classes.json")):
        return []
    classes = read_json(path, "classes.json", param)
    if not isinstance(classes, list):
        raise ParamError(param, f"{path}: classes.json is not a list of class names")
    return [str(c) for c in classes]


def read_weights(path: str, data: bytes | None = None, param: str = "model_dir") -> dict[str, torch.Tensor]:
    """The state dict in ``path``'s safetensors file (or in ``data``, its bytes already read)."""
    try:
        if data is None:
            with open(os.path.join(path, WEIGHTS), "rb") as f:
                data = f.read()
        return load_bytes(data)
    except (OSError, SafetensorError) as e:
        raise ParamError(param, f"{path}: {WEIGHTS} is corrupt: {one_line(str(e))}") from None


def checked_model(
    path: str, spec: ModelSpec, weights: dict[str, torch.Tensor], pre: Preprocess, param: str = "model_dir"
) -> ImageModel:
    """The spec's model with ``weights`` loaded strictly, after one forward pass on a blank input.

    Run once on the driver (or in the web server) so that a model that cannot load is one
    :class:`ParamError` naming the directory and the reason, not a traceback per executor task.
    """
    try:
        model = spec.build()
    except (KeyError, TypeError, ValueError) as e:
        raise ParamError(
            param, f"{path}: config.json describes no model that can be built: {one_line(str(e))}"
        ) from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # torch's size mismatch / missing / unexpected keys
        reason = one_line(str(e).split(":", 1)[1] if ":" in str(e) else str(e))
        raise ParamError(param, f"{path}: weights do not fit the architecture: {reason}") from None
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, pre.channels, *pre.size))
    except RuntimeError as e:
        raise ParamError(
            param,
            f"{path}: the model cannot take its preprocess.json input "
            f"({pre.channels}x{pre.size[0]}x{pre.size[1]}): {one_line(str(e))}",
        ) from None
    return model


def load_model_dir(path: str, map_location: str = "cpu", param: str = "model_dir") -> LoadedModel:
    """Load a model directory, checked (:func:`checked_model`); a missing file is a
    :class:`FileNotFoundError`, any other fault a :class:`ParamError` on ``param``."""
    check_files(path)
    spec, _ = read_spec(path, param)
    pre = read_preprocess(path, param)
    model = checked_model(path, spec, read_weights(path, param=param), pre, param).to(map_location)
    metrics: dict[str, Any] = {}
    if os.path.exists(os.path.join(path, "metrics.json")):
        metrics = read_json(path, "metrics.json", param)
    return LoadedModel(model, spec, read_classes(path, param), pre, metrics, path)


def model_fingerprint(path: str) -> str:
    """Changes whenever the weights change: the cache key for per-worker model reuse."""
    st = os.stat(os.path.join(path, WEIGHTS))
    return hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
