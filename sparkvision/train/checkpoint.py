"""Checkpoints as safetensors + JSON: model, optimizer state, epoch, step and RNG state.

The optimizer's nested state dict is flattened into named tensors (``opt/<param>/<name>``) plus a
JSON side for the scalars, so nothing is ever unpickled on resume.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparkvision.models.modeldir import state_dict_for_save

_NAME = re.compile(r"epoch-(\d+)\.safetensors$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"opt/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{k}"] = v
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
) -> str:
    """Write ``epoch-N.safetensors`` and ``epoch-N.json`` atomically, keeping the last ``keep``."""
    os.makedirs(directory, exist_ok=True)
    model_sd = {f"model/{k}": v for k, v in state_dict_for_save(model).items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    base = os.path.join(directory, f"epoch-{epoch}")
    save_file({**model_sd, **opt_tensors}, base + ".safetensors.tmp")
    with open(base + ".json.tmp", "w") as f:
        json.dump({"epoch": epoch, "optimizer": opt_meta, **extra}, f)
    os.replace(base + ".json.tmp", base + ".json")
    os.replace(base + ".safetensors.tmp", base + ".safetensors")  # last: marks the checkpoint complete
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        for ext in (".safetensors", ".json"):
            try:
                os.remove(os.path.join(directory, f"epoch-{old}{ext}"))
            except FileNotFoundError:
                pass
    return base + ".safetensors"


def list_checkpoints(directory: str) -> list[int]:
    epochs = []
    for p in glob.glob(os.path.join(directory, "epoch-*.safetensors")):
        m = _NAME.search(p)
        if m and os.path.exists(p[: -len(".safetensors")] + ".json"):
            epochs.append(int(m.group(1)))
    return sorted(epochs)


def load_checkpoint(
    directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any] | None:
    """Restore the latest checkpoint into ``model``/``optimizer``; return its JSON side or None."""
    epochs = list_checkpoints(directory)
    if not epochs:
        return None
    base = os.path.join(directory, f"epoch-{epochs[-1]}")
    tensors = load_file(base + ".safetensors")
    with open(base + ".json") as f:
        meta = json.load(f)
    target: torch.nn.Module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    target.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    return meta
