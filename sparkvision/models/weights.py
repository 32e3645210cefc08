"""Weights files a user brings: read without running code, and fitted onto a model by key.

Nothing is ever downloaded; the user brings a torchvision or timm state dict (ImageNet weights,
or their own). Safetensors files are read as tensors; anything else through
``torch.load(weights_only=True)``, whose unpickler accepts plain tensors and containers only, so a
hostile file cannot run code.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sparkvision.errors import ParamError
from sparkvision.models.modeldir import one_line


def read_state_file(path: str, param: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file read with ``weights_only=True`` (plain
    tensors only: such a file cannot run code); a dict holding ``state_dict``/``model`` is unwrapped.
    Errors are one line naming ``param``."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        with open(path, "rb") as f:
            obj = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError) as e:  # pickle errors too
        raise ParamError(param, f"{path} cannot be read as weights: {one_line(str(e))}") from None
    except Exception as e:  # noqa: BLE001 - weights_only's unpickler refuses code with its own types
        raise ParamError(param, f"{path} is not a plain weights file: {one_line(str(e))}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ParamError(param, f"{path} holds no state dict of tensors")
    return obj


@dataclass
class Fitted:
    """What of a weights file fits a model: the tensors under the model's own keys, the file's
    keys that fit nowhere (``unexpected``), the file's keys whose shape differs (``mismatched``,
    e.g. the 1000-class ImageNet head on a 10-class model) and the model's keys left at their
    random start (``missing``)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self, limit: int = 8) -> dict[str, object]:
        def few(keys: list[str]) -> list[str]:
            return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])

        return {
            "loaded": len(self.tensors),
            "missing": few(self.missing),
            "unexpected": few(self.unexpected),
            "mismatched": few(self.mismatched),
        }


def fit_state(
    model: nn.Module, state: dict[str, torch.Tensor], names: Callable[[str], Iterable[str]]
) -> Fitted:
    """Each tensor of ``state`` under the first of ``names(key)`` that the model has with the same
    shape (``names`` maps a file's key onto the model's candidates: its own key, a prefixed one,
    the head's)."""
    own = model.state_dict()
    fitted = Fitted()
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from behind DDP / DataParallel
        candidates = [n for n in names(key) if n in own]
        hit = next((n for n in candidates if own[n].shape == value.shape and n not in fitted.tensors), None)
        if hit is not None:
            fitted.tensors[hit] = value.contiguous()
        elif candidates:
            fitted.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[candidates[0]].shape)}")
        else:
            fitted.unexpected.append(key)
    fitted.missing = [k for k in own if k not in fitted.tensors and not k.endswith("num_batches_tracked")]
    return fitted
