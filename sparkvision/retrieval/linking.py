"""From scored image pairs to duplicate groups: pure functions on arrays, no Spark.

Candidate pairs come from a kNN search (:func:`candidate_pairs`), links from their scores
(:func:`link_pairs`), groups are the connected components of the links (:func:`union_find`) and
one member of each group is kept (:func:`keeper`). ``dedup_table`` chains them; the benchmark and
the tests re-apply them to saved pairs without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

KEEP_RULES = ("largest", "earliest")
LINK_RULES = ("mutual", "all")


def union_find(n: int, pairs: Iterable[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by ``pairs`` (an ``(m, 2)`` array or any iterable
    of pairs); each node's label is the smallest node of its component (so labels are stable and
    need no renumbering). The components are scipy's ``csgraph.connected_components``."""
    ab = np.asarray(pairs if isinstance(pairs, np.ndarray) else list(pairs), dtype=np.int64).reshape(-1, 2)
    bad = (ab < 0) | (ab >= n)
    if bad.any():
        a, b = ab[np.flatnonzero(bad.any(axis=1))[0]]
        raise ValueError(f"pair ({a}, {b}) is out of range for {n} nodes")
    graph = coo_matrix((np.ones(len(ab)), (ab[:, 0], ab[:, 1])), shape=(n, n))
    k, labels = connected_components(graph, directed=False)
    smallest = np.full(k, n, np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return smallest[labels]


def keeper(members: Sequence[dict[str, Any]], rule: str = "largest") -> int:
    """Index of the member to keep: ``largest`` (most pixels, then earliest path) or ``earliest``
    (smallest path, i.e. first in sorted order, then most pixels)."""
    if not members:
        raise ValueError("a group has at least one member")

    def pixels(m: dict[str, Any]) -> int:
        return int(m.get("height") or 0) * int(m.get("width") or 0)

    if rule == "largest":
        return min(range(len(members)), key=lambda i: (-pixels(members[i]), str(members[i]["path"])))
    if rule == "earliest":
        return min(range(len(members)), key=lambda i: (str(members[i]["path"]), -pixels(members[i])))
    raise ValueError(f"keep rule {rule!r} is not one of {', '.join(KEEP_RULES)}")


def pairs_above(
    scores: np.ndarray, rows: np.ndarray, offset: int, threshold: float
) -> list[tuple[int, int, float]]:
    """kNN results of queries ``offset..offset+Q`` -> (i, j, score) pairs, i < j, score >= threshold."""
    out = []
    q_idx, k_idx = np.nonzero((scores >= threshold) & (rows >= 0))
    for qi, ki in zip(q_idx, k_idx, strict=False):
        i, j = offset + int(qi), int(rows[qi, ki])
        if i != j:
            out.append((min(i, j), max(i, j), float(scores[qi, ki])))
    return out


def candidate_pairs(
    scores: np.ndarray, rows: np.ndarray, offset: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`pairs_above`, as arrays ``(a, b, cosine)`` with ``a < b``, each pair once."""
    q_idx, k_idx = np.nonzero((scores >= threshold) & (rows >= 0))
    a = offset + q_idx.astype(np.int64)
    b = rows[q_idx, k_idx].astype(np.int64)
    s = scores[q_idx, k_idx].astype(np.float32)
    keep = a != b
    a, b, s = np.minimum(a, b)[keep], np.maximum(a, b)[keep], s[keep]
    return dedupe_pairs(a, b, s)


def dedupe_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per ``(a, b)`` (the highest score), sorted by ``(a, b)``."""
    if len(a) == 0:
        return a.astype(np.int64), b.astype(np.int64), s.astype(np.float32)
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first]


def link_pairs(
    n: int,
    a: np.ndarray,
    b: np.ndarray,
    score: np.ndarray,
    threshold: float,
    rule: str = "mutual",
    strict_threshold: float | None = None,
) -> np.ndarray:
    """Which scored candidate pairs ``(a[i], b[i])`` of ``n`` rows become links (a bool mask).

    ``all``: ``score >= threshold``. ``mutual``: ``score >= strict_threshold``, or ``score >=
    threshold`` and the pair is the best-scoring candidate of both of its rows (ties count for
    both) -- mutual nearest neighbours, the standard guard against one-sided matches in image
    matching (Lowe, IJCV 2004, uses the ratio to the second match for the same purpose). It stops a
    look-alike from joining an image that already has a closer copy, while near-exact copies
    (``>= strict_threshold``) still group however many there are.
    """
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    score = np.asarray(score, np.float32)
    above = score >= threshold
    if rule == "all":
        return above
    if rule != "mutual":
        raise ValueError(f"link rule {rule!r} is not one of {', '.join(LINK_RULES)}")
    best = np.full(n, -np.inf, np.float32)
    np.maximum.at(best, a, score)
    np.maximum.at(best, b, score)
    mutual = (score >= best[a]) & (score >= best[b])
    strict = score >= (np.inf if strict_threshold is None else strict_threshold)
    return strict | (above & mutual)
