"""Online detection for ``POST /api/detect``: one uploaded image through a detector directory.

No detection logic of its own: the functions the batch ``detect`` operation runs on the executors
(:mod:`sparkvision.detect.inference`), composed for one image. The image goes through the shared
input transform with the directory's ``preprocess.json``
(:func:`~sparkvision.transforms.preprocess.preprocess_batch`), one detector call
(:func:`~sparkvision.detect.inference.run_detector`) and the same postprocessing
(:func:`~sparkvision.detect.inference.detections_of`: score filter, NMS, boxes back in pixels of
the uploaded image), so a served image gets the boxes ``sparkvision detect`` writes for the same
image in a table.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from sparkvision.data.images import open_image
from sparkvision.detect.inference import detections_of, run_detector
from sparkvision.models.detector import TASK, load_detector_dir
from sparkvision.transforms.preprocess import preprocess_batch
from sparkvision.web import browse

# What identifies one version of a detector directory: retrained in place (``overwrite``), its
# files change and the server loads it again instead of answering with the old weights.
STAMPED_FILES = ("model.safetensors", "config.json", "classes.json", "preprocess.json")


def is_detector_dir(path: str) -> bool:
    """A model directory whose ``config.json`` says it holds a detector (see
    :mod:`sparkvision.models.detector`); a classifier's has no ``task``."""
    config = browse.read_json(os.path.join(path, "config.json"), {})
    return browse.is_model_dir(path) and isinstance(config, dict) and config.get("task") == TASK


def directory_stamp(path: str) -> tuple[tuple[int, int], ...]:
    """(mtime_ns, size) of the files a detector is loaded from; missing files stamp as (0, 0)."""
    out = []
    for name in STAMPED_FILES:
        try:
            st = os.stat(os.path.join(path, name))
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0))
    return tuple(out)


@dataclass
class Found:
    """One image's answer: its size in pixels and its detections (or why it could not be read)."""

    width: int
    height: int
    detections: list[dict[str, Any]]
    error: str | None = None


class Detector:
    """A detector directory loaded for serving (safetensors and JSON, checked by
    :func:`~sparkvision.models.detector.load_detector_dir`, which raises ``ParamError`` /
    ``FileNotFoundError`` for one that cannot load).

    Calls are serialised: a detector call already uses the server's torch threads, and
    concurrent ones would only compete for them.
    """

    def __init__(self, model_dir: str) -> None:
        self.stamp = directory_stamp(model_dir)
        loaded = load_detector_dir(model_dir)
        self.path = model_dir
        self.model = loaded.model
        self.class_names = loaded.class_names
        self.preprocess = loaded.preprocess
        self.class_agnostic = loaded.spec.class_agnostic
        self.lock = threading.Lock()

    def detect(self, data: bytes, min_score: float, max_detections: int) -> Found:
        """Boxes in pixels of ``data`` (whose limits the caller has checked), best first.

        Raises :class:`~sparkvision.data.images.RejectError` when even the header is unreadable;
        a body that fails to decode is a :class:`Found` with its ``error``, as a table row is.
        """
        width, height = open_image(data).size
        x, errors = preprocess_batch([data], self.preprocess)
        if errors[0] is not None:
            return Found(width, height, [], errors[0])
        h, w = self.preprocess.size
        with self.lock:
            out = run_detector(self.model, x)[0]
        found = detections_of(
            out, (w, h), (width, height), self.class_names, min_score, max_detections, self.class_agnostic
        )
        return Found(width, height, found)
