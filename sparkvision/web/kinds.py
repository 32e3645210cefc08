"""The web's job kinds: the operations of :mod:`sparkvision.ops` that the web may run.

A kind is the :class:`~sparkvision.ops.base.Operation` itself: its parameters model is the job
schema (and the form), its declared ``inputs``/``optional_inputs``/``outputs`` are the params the
API confines to the data roots before a job is queued, and ``resumable``/``reports_epochs`` tell
the runner how to resume and follow it. Nothing about a kind is written here.
"""

from __future__ import annotations

from sparkvision.ops import OPERATIONS
from sparkvision.ops.base import Operation

Kind = Operation
KINDS: dict[str, Operation] = {name: op for name, op in OPERATIONS.items() if op.web}

__all__ = ["KINDS", "Kind"]
