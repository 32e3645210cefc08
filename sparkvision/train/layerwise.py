"""Greedy layer-wise CD-k pretraining of a :class:`~sparkvision.models.dbn.DBN`, data-parallel on
the engine's ranks, before the supervised epochs fine-tune the whole stack by backprop.

Hinton & Salakhutdinov 2006 (https://doi.org/10.1126/science.1127647): train the first RBM on the
data, then each next RBM on the hidden probabilities of the ones below, frozen. Here every rank
walks its own shard of the training rows, ``pretrain_epochs`` passes per layer, in the batch plan
the engine's epochs use (:func:`~sparkvision.train.data.epoch_indices`: equal steps on every rank,
the global batch split evenly), on the normalised inputs without augmentation. Each step computes
the CD-k gradient of the layer's RBM on the local batch (:meth:`RBM.cd_gradients`) and averages it
over the ranks with one all-reduce before the optimizer steps, so every rank takes the same step on
the same weights: what one process would do with the global batch.

SGD with momentum 0.5 for the first epoch of each layer and 0.9 after, and an L2 weight cost on
the weights only (Hinton 2010, "A Practical Guide to Training RBMs", sections 9 and 10).

RC at the rank level (:mod:`sparkvision.spark.cache`, issue 20). RBM ``L``'s data (counting from
0) is the pixels pushed through the ``L`` trained RBMs below it, and without a cache every batch
of every epoch recomputes it. The DBN reads each layer's input ``pretrain_epochs`` times, from the
shard its rank holds rather than from a DataFrame (the ranks train from rank-held shards, faster
than a Spark pass over a table each epoch), so what it re-reads, and what is worth caching, are
these derived inputs, per rank. Before the first layer, each rank offers RC's rule
(:func:`~sparkvision.spark.cache.plan_cache`, the same one that caches DataFrames) the input of
every RBM above the first (the first's is the pixels, held as uint8 already): ``reuse`` is its
reads after the first (``pretrain_epochs - 1``, plus one when the next RBM's input is derived from
it: one layer's forward instead of ``L + 1``), its size the shard's rows x its units x 4 bytes
(float32, the weights' dtype), its cost one pass computing it from the pixels, estimated from a
timed chunk of rows (:func:`pass_costs`). Under the budget (:func:`held_budget`: ``AUTO_SHARE`` of
the memory available where the inputs are held, the share the ``auto`` shard cache allows itself)
the plan keeps the inputs that save most seconds per byte. A kept input is computed once over the
shard's rows when its layer starts (in its first epoch's time) and read by row index in the same
batch plan, so the steps, and the weights up to float rounding, are those without it; it is
released once its last read is done. Each decision is logged (logger
``sparkvision.train.layerwise``, INFO) and recorded in the layer's first log row (``cache``; every
row says where its ``input`` came from). The DBN's ``cache_layers`` model argument (``auto``,
``none``, ``all``) turns it off or holds every input whatever the budget.

Progress is logged per layer and epoch (rank 0, ``pretrain.jsonl`` in the run's ``OUT``): the
reconstruction error (mean squared difference between the data and the CD chain's last visible
mean, per unit) and the free-energy gap between held-out and training rows (the guide's section
6: a gap that grows means the RBM is overfitting).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sparkvision.models.dbn import DBN, RBM
from sparkvision.spark import distributed as D
from sparkvision.spark.cache import Candidate, nbytes, plan_cache
from sparkvision.spark.filestore import write_bytes
from sparkvision.train.data import AUTO_SHARE, Shard, available_memory_bytes, epoch_indices
from sparkvision.train.rank import RankTraining
from sparkvision.transforms.preprocess import normalize, to_unit

PRETRAIN_FILE = "pretrain.jsonl"
MOMENTUM_START, MOMENTUM = 0.5, 0.9  # Hinton 2010, section 9
WEIGHT_COST = 2e-4  # Hinton 2010, section 10 (0.01 to 0.00001; on the weights, not the biases)
FREE_ENERGY_ROWS = 512  # rows per rank and split the free-energy gap is taken over
EVAL_BATCH = 512

log = logging.getLogger(__name__)

# Yields a fixed few normalised input batches (the rows the free-energy gap is taken over).
Sample = Callable[[], Iterable[torch.Tensor]]


def average_over_ranks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor averaged over the ranks in one all-reduce (as they are, on one rank)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = D.all_reduce_sum(flat) / D.world_size()
    return [
        part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def rbm_optimizer(rbm: RBM, lr: float) -> torch.optim.SGD:
    """SGD with momentum; the weight cost on ``W`` only."""
    return torch.optim.SGD(
        [
            {"params": [rbm.W], "weight_decay": WEIGHT_COST},
            {"params": [rbm.v_bias, rbm.h_bias], "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=MOMENTUM_START,
    )


def cd_step(
    rbm: RBM, v0: torch.Tensor, k: int, generator: torch.Generator, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One data-parallel CD-k step on the local batch ``v0``; returns this rank's squared
    reconstruction error summed over the batch (for the epoch's log)."""
    g = rbm.cd_gradients(v0, k, generator)
    rbm.W.grad, rbm.v_bias.grad, rbm.h_bias.grad = average_over_ranks([g.W, g.v_bias, g.h_bias])
    optimizer.step()
    return (v0 - g.reconstruction).pow(2).sum().double().cpu()


@torch.no_grad()
def free_energy_sum(dbn: DBN, layer: int, batches: Iterable[torch.Tensor]) -> tuple[float, float]:
    """``(sum of F, rows)`` of RBM ``layer`` over the input ``batches``, summed over the ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    for x in batches:
        v = dbn.up(x, layer)
        total += torch.tensor(
            [float(dbn.stack[layer].free_energy(v).double().sum()), len(v)], dtype=torch.float64
        )
    total = D.all_reduce_sum(total)
    return float(total[0]), float(total[1])


def _no_plan(idx: torch.Tensor) -> None:
    return None


@dataclass(frozen=True)
class Rows:
    """A rank's training rows as pretraining reads them.

    ``count`` rows; ``order(number)`` the ``(steps, local_batch)`` row positions of the epoch
    ``number`` names (the batch plan: the same with and without held layer inputs);
    ``read(key)`` the normalised inputs ``(B, C, H, W)``, on the device, of the positions in an
    index tensor or a slice; ``plan(idx)`` is told an epoch's positions before its pixels are read
    along them (a stream cache decodes ahead), and not told when a held input serves the epoch.
    """

    count: int
    order: Callable[[int], torch.Tensor]
    read: Callable[[torch.Tensor | slice], torch.Tensor]
    plan: Callable[[torch.Tensor], None] = _no_plan


@dataclass(frozen=True)
class InputDecision:
    """What RC decided for one layer's input on this rank (also the ``cache`` of the layer's
    first log row)."""

    layer: int  # 1-based, as in the log rows: the input of RBM ``layer``
    held: bool
    reuse: int
    size_bytes: int
    cost_s: float
    why: str

    @property
    def weight(self) -> float:
        return Candidate("", self.reuse, self.size_bytes, self.cost_s).weight

    def record(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "reuse": self.reuse,
            "mib": round(self.size_bytes / 2**20, 3),
            "cost_s": round(self.cost_s, 4),
            "weight_s_per_mib": round(self.weight * 2**20, 5),
            "why": self.why,
        }


@dataclass
class LayerInputs:
    """The layer inputs this rank holds during pretraining, as planned (:func:`plan_layer_inputs`).
    ``inputs[L]`` is RBM ``L``'s data for every row of the shard while held; ``reads_left``
    counts its reads down and it is released after the last (``CachePlanner.used``'s rule)."""

    decisions: dict[int, InputDecision]  # by 0-based layer, for layers >= 1
    budget_bytes: int | None
    label: str = "dbn pretraining"
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    reads_left: dict[int, int] = field(default_factory=dict)

    def held(self, layer: int) -> bool:
        d = self.decisions.get(layer)
        return d is not None and d.held

    def hold(self, layer: int, x: torch.Tensor, reads: int) -> None:
        self.inputs[layer], self.reads_left[layer] = x, reads
        log.info(
            "%s: holding layer %d's input (%s), %d reads; %s held of %s",
            self.label,
            layer + 1,
            nbytes(x.numel() * x.element_size()),
            reads,
            nbytes(self.held_bytes()),
            "no limit" if self.budget_bytes is None else nbytes(self.budget_bytes),
        )

    def used(self, layer: int) -> None:
        """One read of ``layer``'s held input is done; after its last, the input is released."""
        if layer not in self.inputs:
            return
        self.reads_left[layer] -= 1
        if self.reads_left[layer] <= 0:
            self.release(layer, "its reads are done")

    def release(self, layer: int, why: str) -> None:
        x = self.inputs.pop(layer, None)
        self.reads_left.pop(layer, None)
        if x is not None:
            log.info(
                "%s: released layer %d's input (%s): %s",
                self.label,
                layer + 1,
                nbytes(x.numel() * x.element_size()),
                why,
            )

    def close(self) -> None:
        for layer in list(self.inputs):
            self.release(layer, "pretraining is done")

    def held_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.inputs.values())


def held_budget(device: torch.device) -> int | None:
    """Bytes this rank may hold layer inputs in: ``AUTO_SHARE`` (the share of the available
    memory the ``auto`` shard cache takes, :mod:`sparkvision.train.data`) of the memory available
    now where they are held: the GPU's free memory on CUDA, else the process's available memory
    (:func:`~sparkvision.train.data.available_memory_bytes`, read after the shard is loaded, so
    the shard is not counted twice). None where that cannot be read (no limit, as the shard
    cache's check is then skipped too)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(AUTO_SHARE * free)
    available = available_memory_bytes()
    return None if available is None else int(AUTO_SHARE * available)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def pass_costs(dbn: DBN, rows: Rows, chunk: int = EVAL_BATCH) -> list[float]:
    """Seconds of one pass over the shard's rows computing layer ``L``'s input from the pixels,
    for ``L = 0 .. layers - 1``: reading and normalising the rows plus the ``L`` RBMs' forward.

    Estimated, not measured over a whole pass: the plan must be made before the first layer's
    epochs (a held input replaces the first epoch's computation), and the forward takes the same
    time whatever the weights, so one chunk of the shard's first rows is read and pushed through
    every layer (once to warm up, then timed; the shortest of four timings) and scaled to the
    shard's rows. A stream cache decodes its batches ahead in threads during an epoch, so for it
    the read's share is an upper bound."""
    k = min(rows.count, chunk)
    device = dbn.stack[0].W.device
    best = [float("inf")] * (len(dbn.stack) + 1)  # the read, then each layer
    for attempt in range(5):  # the first warms up (allocations, kernels)
        _sync(device)
        t = time.perf_counter()
        x = torch.flatten(rows.read(slice(0, k)), 1)
        _sync(device)
        times = [time.perf_counter() - t]
        for rbm in dbn.stack:
            t = time.perf_counter()
            x = rbm.hidden_probs(x)
            _sync(device)
            times.append(time.perf_counter() - t)
        if attempt:
            best = [min(b, t) for b, t in zip(best, times, strict=True)]
    scale = rows.count / max(k, 1)
    costs, total = [], best[0]
    for layer in range(len(dbn.stack)):
        costs.append(total * scale)
        total += best[layer + 1]
    return costs


def plan_layer_inputs(
    dbn: DBN, count: int, costs: Sequence[float], budget_bytes: int | None, element_bytes: int = 4
) -> dict[int, InputDecision]:
    """RC's decision for the input of every layer ``L >= 1`` (0-based), by ``dbn.cache_layers``:
    ``none`` holds none, ``all`` every one, ``auto`` what :func:`plan_cache` keeps under
    ``budget_bytes`` (None: no limit).

    ``reuse`` = reads after the first = ``pretrain_epochs - 1``, plus 1 when layer ``L + 1``'s
    input is held and so derived from this one (one layer's forward instead of ``L + 1``). That
    extra read depends on the plan itself: the plan starts from every next input held and is made
    again with the reuses it implies until a plan repeats; the plan seen that saves most wins.
    With one epoch a layer only that extra read is left, and the last input (read once) never
    saves anything alone, so nothing is held. The planner adds up the sizes of all inputs it
    keeps, as if all were held at once, though at most two (an input and the one derived from it)
    are: under a tight budget it may keep fewer than it could, never more.
    ``costs[L]`` is one pass computing input ``L`` from the pixels (:func:`pass_costs`)."""
    layers = range(1, len(dbn.stack))
    epochs = dbn.pretrain_epochs
    size = {L: count * dbn.stack[L].n_visible * element_bytes for L in layers}
    budget = sys.maxsize if budget_bytes is None else budget_bytes
    mode = dbn.cache_layers
    keep: set[int] = set(layers) if mode != "none" else set()

    def reuse(L: int, keep: set[int]) -> int:
        return max(epochs - 1 + (1 if L + 1 in keep else 0), 0)

    if mode == "auto":
        # Each round plans with the reuses the last round's plan implies; of the plans seen, the
        # one that saves most with its own reuses wins (rounds can cycle: holding L+1 makes L
        # worth more, which can crowd L+1 out), the smaller one on a tie.
        seen: list[set[int]] = []
        for _ in range(len(layers) + 1):
            cands = [Candidate(str(L), reuse(L, keep), size[L], costs[L]) for L in layers]
            keep = {int(n) for n in plan_cache(cands, budget).keep}
            if keep in seen:
                break
            seen.append(keep)
        keep = max(
            seen,
            key=lambda k: (sum(reuse(L, k) * costs[L] for L in k), -sum(size[L] for L in k)),
        )
    decisions: dict[int, InputDecision] = {}
    kept_bytes = sum(size[L] for L in keep)
    room = "no limit" if budget_bytes is None else nbytes(budget_bytes)
    for L in layers:
        r = reuse(L, keep)
        if mode == "none":
            why = "cache_layers is none: recomputed every batch"
        elif mode == "all":
            why = "cache_layers is all: held whatever the budget"
        elif L in keep:
            why = f"kept by the plan: {nbytes(kept_bytes)} kept of {room}"
        elif r == 0:
            why = "saves nothing: read once (one epoch, and the next input is not derived from it)"
        elif size[L] > budget:
            why = f"larger than the budget of {room}"
        else:
            why = f"left out: the plan keeping {nbytes(kept_bytes)} of {room} saves more"
        decisions[L] = InputDecision(L + 1, L in keep, r, size[L], float(costs[L]), why)
    return decisions


def log_decisions(inputs: LayerInputs) -> None:
    for d in inputs.decisions.values():
        log.info(
            "%s: %s layer %d's input: weight %d reuse x %.3g s / %s = %.3g s/MiB; %s",
            inputs.label,
            "hold" if d.held else "recompute",
            d.layer,
            d.reuse,
            d.cost_s,
            nbytes(d.size_bytes),
            d.weight * 2**20,
            d.why,
        )


@torch.no_grad()
def layer_input(
    dbn: DBN, rows: Rows, layer: int, below: torch.Tensor | None = None, chunk: int = EVAL_BATCH
) -> torch.Tensor:
    """RBM ``layer``'s data for every row, in order, ``chunk`` rows at a time: from the held input
    of the layer below when given (one layer's forward), else from the pixels."""
    out: torch.Tensor | None = None
    for i in range(0, rows.count, chunk):
        if below is not None:
            v = dbn.stack[layer - 1].hidden_probs(below[i : i + chunk])
        else:
            v = dbn.up(rows.read(slice(i, min(i + chunk, rows.count))), layer)
        if out is None:
            out = torch.empty((rows.count, v.shape[1]), dtype=v.dtype, device=v.device)
        out[i : i + len(v)] = v
    assert out is not None  # rows.count >= 1
    return out


def pretrain_dbn(
    dbn: DBN,
    rows: Rows,
    generator: torch.Generator,
    train_sample: Sample = list,
    held_out: Sample = list,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    budget_bytes: int | None = -1,
) -> list[dict[str, Any]]:
    """Pretrain ``dbn``'s RBMs bottom-up, ``dbn.pretrain_epochs`` passes each over ``rows`` in
    their batch plan; return one log row per layer and epoch (also handed to ``on_epoch`` as they
    come).

    Each RBM's data is its input pushed through the trained layers below it (mean-field hidden
    probabilities): held for the whole shard where RC's plan keeps it (``dbn.cache_layers``,
    within ``budget_bytes``: -1 is :func:`held_budget` of the DBN's device, None no limit), else
    recomputed per batch. ``train_sample`` and ``held_out`` give a few input batches of training
    and held-out rows for the free-energy gap (``None`` when either has no row on any rank).
    Every rank must call this, with the same number of steps per epoch; each plans its own held
    inputs (no collective depends on the plan).
    """
    epochs = dbn.pretrain_epochs
    device = dbn.stack[0].W.device
    label = f"dbn pretraining, rank {D.rank()}"
    budget = held_budget(device) if budget_bytes == -1 else budget_bytes
    decisions: dict[int, InputDecision] = {}
    if epochs > 0 and len(dbn.stack) > 1:
        element = dbn.stack[0].W.element_size()  # the inputs' dtype: the weights' (float32)
        decisions = plan_layer_inputs(dbn, rows.count, pass_costs(dbn, rows), budget, element)
    cache = LayerInputs(decisions, budget, label)
    log_decisions(cache)
    out: list[dict[str, Any]] = []
    try:
        for layer, rbm in enumerate(dbn.stack):
            optimizer = rbm_optimizer(rbm, dbn.pretrain_lr)
            for epoch in range(epochs):
                if epoch == 1:
                    for group in optimizer.param_groups:
                        group["momentum"] = MOMENTUM
                t0 = time.perf_counter()
                if epoch == 0 and cache.held(layer):  # derived once, in this epoch's time
                    below = cache.inputs.get(layer - 1)
                    x = layer_input(dbn, rows, layer, below)
                    cache.hold(layer, x, epochs + (1 if cache.held(layer + 1) else 0))
                    cache.used(layer - 1)
                idx = rows.order(layer * epochs + epoch)
                held = cache.inputs.get(layer)
                if held is None:
                    rows.plan(idx)
                sums = torch.zeros(2, dtype=torch.float64)  # squared error, values
                for b in idx:
                    if held is not None:
                        v0 = held[b.to(held.device)]
                    else:
                        with torch.no_grad():
                            v0 = dbn.up(rows.read(b), layer)  # (B, this RBM's visible units)
                    sums[0] += cd_step(rbm, v0, dbn.cd_k, generator, optimizer)
                    sums[1] += v0.numel()
                cache.used(layer)
                sums = D.all_reduce_sum(sums)
                train_f, n_train = free_energy_sum(dbn, layer, train_sample())
                held_f, n_held = free_energy_sum(dbn, layer, held_out())
                gap = held_f / n_held - train_f / n_train if n_train and n_held else None
                row: dict[str, Any] = {
                    "layer": layer + 1,
                    "epoch": epoch + 1,
                    "recon_error": round(float(sums[0] / sums[1].clamp_min(1)), 6),
                    "free_energy_gap": None if gap is None else round(gap, 5),
                    "seconds": round(time.perf_counter() - t0, 3),
                    "input": "pixels" if layer == 0 else "held" if held is not None else "recomputed",
                }
                if epoch == 0 and layer in cache.decisions:
                    row["cache"] = cache.decisions[layer].record()
                out.append(row)
                if on_epoch is not None:
                    on_epoch(out)
    finally:
        cache.close()
    return out


def first_rows(shard: Shard, n: int, batch: int = EVAL_BATCH) -> list[torch.Tensor]:
    """Up to ``n`` of ``shard``'s first rows as uint8 batches (a fixed sample, the same each epoch)."""
    rows = shard.head(min(n, len(shard)))
    return [rows.images[i : i + batch] for i in range(0, len(rows), batch)]


def pretrain_rank(rank: RankTraining, held_out: Shard | None) -> list[dict[str, Any]]:
    """The engine's glue: pretrain ``rank.module`` (a DBN) on ``rank.rows`` with the skeleton's
    batch plan, device and normalisation; rank 0 rewrites ``pretrain.jsonl`` after every epoch.

    The generator is seeded by the run's seed and the rank, so each rank draws its own samples and
    a rerun draws the same ones."""
    dbn = rank.module
    if not isinstance(dbn, DBN):
        raise TypeError(f"layer-wise pretraining needs a DBN, got {type(dbn).__name__}")
    cfg, ctx, device = rank.cfg, rank.ctx, rank.device
    local_batch = cfg.batch_size // ctx.world_size

    def prepared(images: torch.Tensor) -> torch.Tensor:
        return normalize(
            to_unit(images.to(device, non_blocking=True)), rank.mean, rank.std, rank.channels_last
        )

    def read(key: torch.Tensor | slice) -> torch.Tensor:
        return prepared(rank.rows.images[key])

    def order(number: int) -> torch.Tensor:
        # Negative epoch numbers: orders of their own, apart from the supervised epochs' (0, 1, ...).
        return epoch_indices(len(rank.rows), rank.steps, local_batch, cfg.seed, -1 - number, ctx.rank)

    def write_log(rows: list[dict[str, Any]]) -> None:
        if ctx.is_main:
            write_bytes(rank.store, PRETRAIN_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())

    generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + 7_919 + ctx.rank)
    sample = first_rows(rank.rows, FREE_ENERGY_ROWS)  # uint8, normalised as they are used
    held = first_rows(held_out, FREE_ENERGY_ROWS) if held_out is not None else []
    return pretrain_dbn(
        dbn,
        Rows(len(rank.rows), order, read, rank.rows.plan),
        generator,
        lambda: map(prepared, sample),
        lambda: map(prepared, held),
        write_log,
    )
