"""Transfer learning from a weights file the user brings (nothing is downloaded).

The driver reads the file once (:func:`start_weights`, no pickle: safetensors or
``torch.load(weights_only=True)``), keeps the tensors that fit the model by key and shape
(:meth:`ImageModel.file_keys` maps a torchvision or timm state dict onto it) and refuses a file
for another architecture in one line; the ranks load those tensors, freeze what ``--freeze``
says and train the pretrained layers at ``--backbone-lr-scale`` times the learning rate
(:func:`transfer_groups`). Pretrained weights expect the inputs normalised as in pretraining, so
such a run normalises by ImageNet's statistics (:func:`input_stats`), which are then saved with
the model directory like any run's, and predict, embed and the web use the same.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from sparkvision.errors import ParamError
from sparkvision.models.registry import ImageModel
from sparkvision.models.weights import fit_state, read_state_file
from sparkvision.train.optim import param_groups

# torchvision's ImageNet normalisation (the ``transforms`` of every ``*_Weights.IMAGENET1K_*``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Below this share of the model's parameters found in the file, it is for another architecture.
MIN_FITTING_SHARE = 0.5
DEFAULT_BACKBONE_LR_SCALE = 0.1  # pretrained layers: a tenth of the head's rate (when --init-weights)


def start_weights(model: ImageModel, path: str, param: str = "init_weights") -> tuple[bytes, dict[str, Any]]:
    """The tensors of weights file ``path`` that fit ``model`` (as safetensors bytes) and what was
    loaded, missing, unexpected or of another shape. A file that fills under half of the model's
    parameters is another architecture's: one line naming ``param`` and a few of the keys."""
    fitted = fit_state(model, read_state_file(path, param), model.file_keys)
    total = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    loaded = sum(v.numel() for v in fitted.tensors.values())
    if loaded < MIN_FITTING_SHARE * total:
        s = fitted.summary(3)
        raise ParamError(
            param,
            f"{path} does not fit model {type(model).__name__}: {loaded:,} of its {total:,} parameters "
            f"found ({len(fitted.tensors)} tensors); unexpected keys {s['unexpected']}, other shapes "
            f"{s['mismatched']}, missing {s['missing']}",
        )
    return st_save(fitted.tensors), fitted.summary()


def input_stats(
    normalize: str, init_weights: str | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ImageNet's mean/std (float64, per channel) when the run normalises as ImageNet weights
    expect (``normalize`` "imagenet", or "auto" with ``--init-weights``); None: the table's own.
    A gray table is fed to a 3-channel stem by repeating its channel, so its one channel takes
    the mean of ImageNet's three."""
    if normalize == "table" or (normalize == "auto" and not init_weights):
        return None
    mean, std = (
        torch.tensor(IMAGENET_MEAN, dtype=torch.float64),
        torch.tensor(IMAGENET_STD, dtype=torch.float64),
    )
    return (mean, std) if channels == 3 else (mean.mean().view(1), std.mean().view(1))


def transfer_groups(model: ImageModel, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """Optimizer groups: the head and neck at the full rate, the rest at ``backbone_lr_scale``
    times it (``set_lr`` reads each group's ``lr_scale``); frozen parameters are in none."""
    heads = nn.ModuleList([m for name, m in model.named_children() if name in ("head", "neck")])
    if backbone_lr_scale == 1.0:
        return param_groups(model, weight_decay)
    head_ids = {id(p) for p in heads.parameters()}
    backbone = nn.ParameterList([p for p in model.parameters() if id(p) not in head_ids])
    low = [{**g, "lr_scale": backbone_lr_scale} for g in param_groups(backbone, weight_decay)]
    return param_groups(heads, weight_decay) + low


def backbone_scale(scale: float | None, init_weights: str | None) -> float:
    """``--backbone-lr-scale``, by default a tenth with ``--init-weights`` and 1 without."""
    if scale is not None:
        return scale
    return DEFAULT_BACKBONE_LR_SCALE if init_weights else 1.0
