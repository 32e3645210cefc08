"""The task clock a profile turns on: one line per task, its stages adding up to its wall time."""

from __future__ import annotations

import json

import pytest

from sparkvision.spark.taskclock import NO_CLOCK, TaskClock, task_clock


def test_task_clock_writes_one_line_per_task_and_nothing_when_off(tmp_path):
    assert task_clock(None, "x") is NO_CLOCK
    items = [1, 2]
    assert NO_CLOCK.inputs(items) is items
    path = tmp_path / "clock.jsonl"
    t = task_clock(str(path), "predict")
    assert isinstance(t, TaskClock)
    for _ in t.inputs(items):
        t.lap("model")
        t.rows(10)
    t.close()
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["body"] == "predict" and line["rows"] == 20 and line["batches"] == 2
    assert set(line["stages"]) == {"input", "model", "output"}
    assert sum(line["stages"].values()) == pytest.approx(line["wall_s"], abs=1e-3)
    assert set(line["cpu_stages"]) == set(line["stages"])
    assert sum(line["cpu_stages"].values()) == pytest.approx(line["cpu_s"], abs=1e-3)
