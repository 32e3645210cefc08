"""Server-side micro-batching: concurrent /api/classify requests share model calls.

Each request appends its preprocessed input to a list and awaits a future. One worker task
waits for the first item, then until it has ``max_batch`` items or the oldest has waited
``max_wait_ms``, runs the model once on the stacked batch in a thread (so the event loop keeps
accepting requests) and resolves every future with its own row. Under load the batch fills at
once and throughput grows with it; an idle server answers a lone request after at most
``max_wait_ms``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparkvision.inference.runtime import optimize_for_cpu_inference
from sparkvision.models.modeldir import load_model_dir
from sparkvision.transforms.preprocess import decode_image, normalize, to_unit


class Classifier:
    """A model directory loaded for serving: safetensors weights (no pickle), frozen for CPU.

    Its input transform is the one training and batch inference use
    (:mod:`sparkvision.transforms.preprocess`): each request decodes to uint8, and the batched
    model call normalises the stacked batch, so a served image gets the same probabilities as the
    same image in ``sparkvision predict``.
    """

    def __init__(self, model_dir: str) -> None:
        loaded = load_model_dir(model_dir)
        self.path = model_dir
        self.name = loaded.spec.model
        self.class_names = loaded.class_names or [str(i) for i in range(loaded.spec.num_classes)]
        self.pre = loaded.preprocess
        example = torch.zeros(8, self.pre.channels, *self.pre.size)
        self.fn = optimize_for_cpu_inference(loaded.model, example)
        self.metrics = loaded.metrics

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> uint8 ``(C, H, W)`` at the model's size and channels.

        Raises :class:`sparkvision.data.images.RejectError` for bytes that do not decode.
        """
        return decode_image(
            data, self.pre.channels, self.pre.size, pixel_dtype=self.pre.pixel_dtype, resize=self.pre.resize
        )

    def inputs(self, batch: list[np.ndarray]) -> torch.Tensor:
        """``B`` decoded images, uint8 ``(C, H, W)`` -> the model's normalised ``(B, C, H, W)`` input."""
        return normalize(to_unit(torch.from_numpy(np.stack(batch))), self.pre.mean, self.pre.std)

    def probabilities(self, batch: list[np.ndarray]) -> np.ndarray:
        """``B`` inputs of uint8 ``(C, H, W)`` -> ``(B, K)`` softmax probabilities."""
        with torch.inference_mode():
            return torch.softmax(self.fn(self.inputs(batch)).float(), dim=1).numpy()


@dataclass
class BatchStats:
    calls: int = 0
    items: int = 0
    max_batch_seen: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "model_calls": self.calls,
            "items": self.items,
            "max_batch_seen": self.max_batch_seen,
            "mean_batch": round(self.items / self.calls, 2) if self.calls else None,
        }


class MicroBatcher:
    """Gathers up to ``max_batch`` items or ``max_wait_ms`` ms, then calls ``fn`` once in a thread.

    The wait counts from the arrival of the oldest waiting item, so an item that already waited
    through the previous model call is not made to wait again. Requests go on a plain list and one
    future wakes the worker (when the first item arrives, when a batch fills, or on a timer at the
    deadline): no task or queue operation per request.
    """

    def __init__(self, fn: Callable[[list[Any]], Any], max_batch: int = 64, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._pending: list[tuple[Any, asyncio.Future, float]] = []
        self._wake: asyncio.Future | None = None
        self._wake_on_first = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkvision-model")

    async def submit(self, x: Any) -> Any:
        """One input -> its row of ``fn``'s output (``fn`` takes the list of gathered inputs)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop, self._pending, self._wake = loop, [], None
            self._worker = loop.create_task(self._run())
        fut = loop.create_future()
        self._pending.append((x, fut, loop.time()))
        wake = self._wake
        if (
            wake is not None
            and not wake.done()
            and (self._wake_on_first or len(self._pending) >= self.max_batch)
        ):
            wake.set_result(None)
        return await fut

    async def _sleep(self, loop: asyncio.AbstractEventLoop, on_first: bool, timeout: float | None) -> None:
        """Until an item arrives (``on_first``) or the batch fills, or ``timeout`` seconds pass."""
        self._wake = wake = loop.create_future()
        self._wake_on_first = on_first

        def wake_up() -> None:
            if not wake.done():
                wake.set_result(None)

        timer = loop.call_later(timeout, wake_up) if timeout else None
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                await self._sleep(loop, True, None)
            left = self._pending[0][2] + self.max_wait - loop.time()
            if len(self._pending) < self.max_batch and left > 0:
                await self._sleep(loop, False, left)
            items = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            live = [(x, f) for x, f, _ in items if not f.done()]  # done: the request went away
            if not live:
                continue
            try:
                out = await loop.run_in_executor(self._executor, self.fn, [x for x, _ in live])
                self.stats.calls += 1
                self.stats.items += len(live)
                self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(live))
                for i, (_, f) in enumerate(live):
                    if not f.done():
                        f.set_result(out[i])
            except Exception as e:  # noqa: BLE001 - hand the error to every waiting request
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._executor.shutdown(wait=False)
