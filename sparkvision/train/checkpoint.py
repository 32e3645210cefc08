"""Checkpoints as safetensors + JSON on any store: model, optimizer, where the run is, RNG states.

A checkpoint is two files in the checkpoint store (``OUT/checkpoints``, reached through
:mod:`sparkvision.spark.filestore`): ``NAME.safetensors`` (the tensors) and then ``NAME.json``.
``NAME`` is ``epoch-E`` after E whole epochs, or ``epoch-E-step-S`` after E epochs and S steps of
the next one (``checkpoint_every``); names order by ``(E, S)``.

Atomic by construction: each file replaces its name whole (temporary sibling and rename, or an
object store's single upload), and the JSON, written last, records the tensors' size and sha256.
A checkpoint without its JSON is ignored; one whose tensors do not match their JSON (a crash
mid-upload, a truncated or half-replaced file) is skipped on load with a warning and the one
before it is loaded instead. So a checkpoint that loads is exactly the one that was written.

The optimizer's nested state dict is flattened into named tensors (``opt/<param>/<name>``) plus a
JSON side for the scalars, so nothing is ever unpickled on resume. Per-rank state (RNG states,
partial epoch sums) is stored as ``rank/<r>/<name>`` tensors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparkvision.models.modeldir import state_dict_for_save
from sparkvision.spark.filestore import (
    TMP_MARK,
    LocalStore,
    Store,
    download,
    read_bytes,
    scratch_dir,
    upload,
    write_bytes,
)

log = logging.getLogger(__name__)

_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?")
TENSORS, META = ".safetensors", ".json"


class CorruptCheckpoint(ValueError):
    """A checkpoint's files do not make a whole checkpoint; the message says what is wrong."""


@dataclass
class Restored:
    """What :func:`load_checkpoint` restored: the JSON side and each rank's saved state."""

    name: str
    meta: dict[str, Any]
    ranks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "name: why" of newer checkpoints passed over

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def epoch_step(self) -> int:
        return int(self.meta.get("epoch_step", 0))


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """``epoch-E`` at an epoch's end, ``epoch-E-step-S`` S steps into epoch E+1."""
    return f"epoch-{epoch}" if step == 0 else f"epoch-{epoch}-step-{step}"


def checkpoint_key(name: str) -> tuple[int, int] | None:
    """``(epochs done, steps done of the next)`` of a checkpoint's base name, None for other names."""
    m = _NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


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


def _store(where: str | Store) -> Store:
    return LocalStore(where) if isinstance(where, str) else where


def save_checkpoint(
    where: str | Store,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
    step: int = 0,
    ranks: dict[int, dict[str, torch.Tensor]] | None = None,
) -> str:
    """Write checkpoint ``(epoch, step)`` (tensors, then the JSON naming their digest), keep the
    last ``keep`` and remove what crashed writes left behind; returns its name."""
    store = _store(where)
    name = checkpoint_name(epoch, step)
    tensors = {f"model/{k}": v for k, v in state_dict_for_save(model).items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    for r, state in (ranks or {}).items():
        tensors.update({f"rank/{r}/{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    with tempfile.TemporaryDirectory(prefix="sparkvision-ckpt-", dir=scratch_dir()) as tmp:
        path = os.path.join(tmp, name + TENSORS)
        save_file(tensors, path)  # on local disk first: the upload streams it in chunks
        size, sha256 = upload(store, name + TENSORS, path)
    meta = {
        "epoch": epoch,
        "epoch_step": step,
        "optimizer": opt_meta,
        **extra,
        "tensors": {"file": name + TENSORS, "bytes": size, "sha256": sha256},
    }
    write_bytes(store, name + META, json.dumps(meta).encode())  # last: the checkpoint is complete
    prune(store, keep)
    return name


def prune(store: Store, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones, incomplete ones and
    temporary files (only rank 0 writes here, one file at a time: any other is a crash's)."""
    complete = list_checkpoints(store)
    kept = set(complete[-keep:] if keep > 0 else complete)
    for fname in store.list():
        base = fname.split(".", 1)[0]
        if TMP_MARK in fname or (checkpoint_key(base) is not None and base not in kept):
            store.delete(fname)


def list_checkpoints(where: str | Store) -> list[str]:
    """Names of the complete-looking checkpoints (both files present), oldest first."""
    names = _store(where).list()
    have = set(names)
    found = [
        n[: -len(META)]
        for n in names
        if n.endswith(META)
        and checkpoint_key(n[: -len(META)]) is not None
        and n[: -len(META)] + TENSORS in have
    ]
    return sorted(found, key=lambda n: checkpoint_key(n) or (0, 0))


def read_checkpoint(where: str | Store, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(JSON side, tensors)`` of checkpoint ``name``, checked against the digest in its JSON;
    :class:`CorruptCheckpoint` when they do not make a whole checkpoint."""
    store = _store(where)
    try:
        meta = json.loads(read_bytes(store, name + META))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{name + META} is missing") from None
    except (ValueError, UnicodeDecodeError):
        raise CorruptCheckpoint(f"{name + META} is not JSON") from None
    if not isinstance(meta, dict) or "epoch" not in meta:
        raise CorruptCheckpoint(f"{name + META} is not a checkpoint's JSON")
    want = meta.get("tensors")  # absent in checkpoints written before digests were recorded
    with tempfile.TemporaryDirectory(prefix="sparkvision-ckpt-", dir=scratch_dir()) as tmp:
        path = os.path.join(tmp, name + TENSORS)
        try:
            size, sha256 = download(store, name + TENSORS, path)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{name + TENSORS} is missing") from None
        if isinstance(want, dict) and (size != want.get("bytes") or sha256 != want.get("sha256")):
            raise CorruptCheckpoint(
                f"{name + TENSORS} has {size} bytes (sha256 {sha256[:12]}), its JSON says "
                f"{want.get('bytes')} (sha256 {str(want.get('sha256'))[:12]})"
            )
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise CorruptCheckpoint(f"{name + TENSORS} cannot be read: {e}") from None
    return meta, tensors


def load_checkpoint(
    where: str | Store, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Restored | None:
    """Restore the latest whole checkpoint into ``model``/``optimizer`` (skipping, with a warning,
    newer ones that fail their digest); None when there is none."""
    skipped: list[str] = []
    for name in reversed(list_checkpoints(where)):
        try:
            meta, tensors = read_checkpoint(where, name)
        except CorruptCheckpoint as e:
            log.warning("checkpoint %s skipped: %s", name, e)
            skipped.append(f"{name}: {e}")
            continue
        target: torch.nn.Module = getattr(model, "module", model)  # unwrap DistributedDataParallel
        target.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
        if optimizer is not None:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        ranks: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("rank/"):
                _, r, k = key.split("/", 2)
                ranks.setdefault(int(r), {})[k] = v
        return Restored(name, meta, ranks, skipped)
    return None
