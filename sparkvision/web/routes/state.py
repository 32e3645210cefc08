"""What every route shares, built once by ``create_app`` and reached through a FastAPI dependency.

Routes take ``sv: StateDep`` (or call :func:`get_state` with the request, where FastAPI's
dependency solving is skipped on purpose, see :mod:`.classify`) instead of closing over
``create_app``'s locals, so each concern can live in its own module.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Header, Request

from sparkvision.retrieval.search import AnyIndex, open_index
from sparkvision.web.batching import Classifier, MicroBatcher
from sparkvision.web.detecting import Detector, directory_stamp
from sparkvision.web.jobs import JobStore
from sparkvision.web.runner import Runner
from sparkvision.web.security import ApiError, Settings, check_token

MAX_MODELS = 4  # classifiers kept loaded (the --model one plus ?model= ones)
MAX_DETECTORS = 2  # detectors kept loaded for /api/detect


class State:
    """Settings, the job store and runner, and the models, detectors and index loaded on demand."""

    def __init__(self, settings: Settings, store: JobStore, runner: Runner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.classifiers: dict[str, Classifier] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.index: AnyIndex | None = None
        self.index_lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.detectors: dict[str, Detector] = {}
        self.detector_lock = threading.Lock()

    def classifier(self, model_dir: str) -> tuple[Classifier, MicroBatcher]:
        """The loaded model and its micro-batcher, loading it the first time (blocking: call in a thread)."""
        with self.model_lock:
            if model_dir not in self.classifiers:
                clf = Classifier(model_dir)
                self.classifiers[model_dir] = clf
                self.batchers[model_dir] = MicroBatcher(
                    clf.probabilities, self.settings.batch_size, self.settings.batch_wait_ms
                )
            return self.classifiers[model_dir], self.batchers[model_dir]

    async def evict_models(self, keep: str | None) -> None:
        """Bound memory: at most MAX_MODELS loaded; the oldest other than ``keep`` goes first."""
        while len(self.classifiers) >= MAX_MODELS:
            victim = next((k for k in self.classifiers if k != keep), None)
            if victim is None:
                return
            with self.model_lock:
                self.classifiers.pop(victim, None)
                batcher = self.batchers.pop(victim, None)
            if batcher is not None:
                await batcher.close()

    def detector(self, model_dir: str) -> Detector:
        """The loaded detector, loading it the first time or when its files changed (blocking: call
        in a thread); at most MAX_DETECTORS stay loaded, the oldest goes first."""
        stamp = directory_stamp(model_dir)
        with self.detector_lock:
            found = self.detectors.get(model_dir)
            if found is not None and found.stamp == stamp:
                return found
            self.detectors.pop(model_dir, None)
            while len(self.detectors) >= MAX_DETECTORS:
                self.detectors.pop(next(iter(self.detectors)))
            found = Detector(model_dir)
            self.detectors[model_dir] = found
            return found

    def search_index(self) -> AnyIndex:
        """The ``--index`` index, opened on first use (blocking: call in a thread); 503 without one."""
        with self.index_lock:
            if self.index is None:
                if not self.settings.index_dir:
                    raise ApiError(503, "no index loaded: start the server with --index DIR", "no_index")
                self.index = open_index(self.settings.index_dir)  # sharded: mapped shards in a budget
            return self.index


def get_state(request: Request) -> State:
    return request.app.state.sv


StateDep = Annotated[State, Depends(get_state)]


def require_token(
    sv: StateDep, authorization: str | None = Header(None), x_api_token: str | None = Header(None)
) -> None:
    """The dependency of every mutating endpoint: 401 / 403 unless the API token is sent (when one is set)."""
    check_token(sv.settings, authorization, x_api_token)
