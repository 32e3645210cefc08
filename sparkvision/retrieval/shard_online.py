"""Online search (the web app, ``sparkvision search INDEX IMAGE``) over a sharded index.

Each shard is memory-mapped where FAISS allows it (:func:`~sparkvision.retrieval.shards.read_shard`)
and searched in turn; the per-shard top-k are merged in this process
(:func:`~sparkvision.retrieval.shards.merge_topk`). The server keeps open only the shards that fit
its memory budget (a shard costs its file size plus its id mapping, counted whole although mapped
pages are only read as lists are probed): shards beyond it are opened for a search and closed
after it, least recently used first, so a server smaller than the index still answers, slower.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparkvision.retrieval.shard_search import read_meta
from sparkvision.retrieval.shards import (
    ROW_BITS,
    ROW_MASK,
    Neighbours,
    ids_file,
    local_file,
    merge_topk,
    read_shard,
    shard_file,
    tune,
)
from sparkvision.spark import storage

DEFAULT_ONLINE_MEMORY_MB = 4096
ENV_MEMORY = "SPARKVISION_INDEX_MEMORY_MB"  # the web server's budget for open shards


class ShardedSearchIndex:
    """A sharded index opened for search in this process, with :class:`SearchIndex`'s calls."""

    binary = False

    def __init__(self, directory: str, nprobe: int | None = None, memory_mb: int | None = None) -> None:
        self.directory = storage.qualify(directory)
        self.meta: dict[str, Any] = read_meta(None, self.directory)
        if not self.meta.get("sharded"):
            raise ValueError(f"{directory} is not a sharded index")
        self.kind = self.meta["choice"]["kind"]
        self.params = {
            k: v for k, v in self.meta["choice"].get("params", {}).items() if k in ("nprobe", "efSearch")
        }
        if nprobe is not None:
            self.params["nprobe"] = nprobe
        if memory_mb is None:
            memory_mb = int(os.environ.get(ENV_MEMORY, DEFAULT_ONLINE_MEMORY_MB))
        self.budget = memory_mb << 20
        self.shards = [int(s["shard"]) for s in self.meta["shards"]]
        self.open: OrderedDict[int, tuple[Any, pa.Table, int]] = OrderedDict()
        self.mapped: dict[int, bool] = {}

    @property
    def ntotal(self) -> int:
        return int(self.meta["rows"])

    @property
    def model_dir(self) -> str | None:
        return self.meta.get("model_dir")

    @property
    def held_bytes(self) -> int:
        return sum(cost for _, _, cost in self.open.values())

    def shard(self, s: int) -> tuple[Any, pa.Table]:
        """Shard ``s`` and its id mapping, opening it (and closing the least recently used ones
        beyond the budget) when it is not open."""
        if s in self.open:
            self.open.move_to_end(s)
            index, ids, _ = self.open[s]
            return index, ids
        build = self.meta.get("build_id", "")
        path = local_file(self.directory, shard_file(s), build)
        index, self.mapped[s] = read_shard(path, self.kind)
        tune(index, self.params)
        ids = pq.read_table(local_file(self.directory, ids_file(s), build))
        cost = os.path.getsize(path) + ids.nbytes
        while self.open and self.held_bytes + cost > self.budget:
            self.open.popitem(last=False)
        if cost <= self.budget:
            self.open[s] = (index, ids, cost)
        return index, ids

    def search(self, queries: np.ndarray, k: int = 10) -> Neighbours:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.meta["dim"]:
            raise ValueError(f"queries have shape {q.shape}; the index expects (Q, {self.meta['dim']})")
        scores, ids = [], []
        for s in self.shards:
            index, _ = self.shard(s)
            d, i = index.search(q, k)
            scores.append(d)
            ids.append(i)
        return Neighbours(*merge_topk(scores, ids, k))

    def describe(self, row: int) -> dict[str, Any]:
        shard, local = int(row) >> ROW_BITS, int(row) & ROW_MASK
        _, ids = self.shard(shard)
        rec = ids.slice(local, 1).to_pylist()[0]
        return {
            "row": int(row),
            "content_id": rec.get("content_id"),
            "path": rec.get("path"),
            "label_name": rec.get("label_name"),
        }

    def results(self, nb: Neighbours) -> list[list[dict[str, Any]]]:
        """Neighbours as plain dicts (rank, score, content_id, path, label_name) per query."""
        out = []
        for srow, rrow in zip(nb.scores, nb.rows, strict=True):
            hits = []
            for rank, (s, r) in enumerate(zip(srow, rrow, strict=True)):
                if r >= 0:
                    hits.append({"rank": rank + 1, "score": round(float(s), 5), **self.describe(int(r))})
            out.append(hits)
        return out
