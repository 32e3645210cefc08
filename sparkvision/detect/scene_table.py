"""A detection table of synthetic scenes made from an image table, on the executors.

How rows become scenes, repeatably on any cluster: each source row gets one key per pass
(``xxhash64(content_id, seed, pass)``); rows are hash-partitioned on that key into a number of
partitions fixed by the row count, then sorted by ``(split, pass, key)`` inside each partition.
Which rows share a partition and their order thus depend on the data and the seed only, not on
how the source files were split or how many executors there are. Each partition's run of rows of
one split and pass is then cut into consecutive groups of ``min_items..max_items`` rows
(:func:`scene_groups`), each group becoming one scene (:func:`~sparkvision.detect.scenes.compose_scene`)
with a generator seeded from the seed, the pass and the group's content ids. A scene's items
therefore all come from one split, which the scene keeps: held-out scenes hold test items only.

Nothing is collected: the driver counts rows (to size the partitions) and reads back a few
aggregates for the summary.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.decode import arrow_schema
from sparkvision.data.detection import DETECTION_SCHEMA, box_arrow_type, box_record
from sparkvision.data.images import content_id, open_image
from sparkvision.data.schema import IMAGE_SCHEMA
from sparkvision.data.table import TableMeta, read_meta, read_table, write_meta
from sparkvision.detect.scenes import Paste, SceneConfig, SceneItem, compose_scene
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress

ROWS_PER_TASK = 2048  # source rows (times passes) per partition of the scene job
T = TypeVar("T")


def scene_groups(
    rows: Iterable[T],
    run_of: Callable[[T], Hashable],
    rng_of: Callable[[T], np.random.Generator],
    min_items: int,
    max_items: int,
) -> Iterator[list[T]]:
    """Consecutive rows cut into groups of ``min_items..max_items``, never across runs.

    A run is a stretch of rows with the same ``run_of`` (split and pass); its sizes are drawn
    from ``rng_of(first row of the run)``. Rows are streamed: only the current group and the
    run's first ``min_items - 1`` rows are held. A run's tail shorter than ``min_items`` is topped
    up with the run's first rows (so no row is dropped); a run shorter than ``min_items`` in all
    gives one group of what it has.
    """
    if not 1 <= min_items <= max_items:
        raise ValueError(f"min_items {min_items} and max_items {max_items} need 1 <= min <= max")
    run: Hashable = object()
    head: list[T] = []
    group: list[T] = []
    want = 0
    rng: np.random.Generator | None = None

    def tail() -> Iterator[list[T]]:
        if not group:
            return
        extra = [r for r in head if r not in group][: max(0, min_items - len(group))]
        yield group + extra

    for row in rows:
        key = run_of(row)
        if key != run or rng is None:
            yield from tail()
            run, head, group, rng = key, [], [], rng_of(row)
            want = int(rng.integers(min_items, max_items + 1))
        if len(head) < min_items - 1:
            head.append(row)
        group.append(row)
        if len(group) == want:
            yield group
            group = []
            want = int(rng.integers(min_items, max_items + 1))
    yield from tail()


def cid_int(cid: str) -> int:
    """A content id's first 64 bits, as seed material."""
    return int(cid[:16], 16)


def encode_scene(img: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def scene_batches(
    cfg: SceneConfig, seed: int, min_items: int, max_items: int, fmt: str, chunk: int = 256
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: sorted (content_id, image, label, label_name, split, _pass) rows ->
    DETECTION_SCHEMA rows, one per scene."""
    schema = pa.schema([*arrow_schema(IMAGE_SCHEMA), pa.field("boxes", box_arrow_type())])

    def rows(batches: Iterator[pa.RecordBatch]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            yield from batch.to_pylist()

    def run_rng(row: dict[str, Any]) -> np.random.Generator:
        return np.random.default_rng([seed, row["_pass"], cid_int(row["content_id"])])

    def scene_row(group: list[dict[str, Any]]) -> dict[str, Any]:
        items = [
            SceneItem(open_image(r["image"]), r["label"], r["label_name"], r["content_id"]) for r in group
        ]
        pass_ = group[0]["_pass"]
        rng = np.random.default_rng([seed, pass_, *(cid_int(r["content_id"]) for r in group)])
        img, boxes = compose_scene(items, rng, cfg)
        data = encode_scene(img, fmt)
        main = max(boxes, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1))
        return {
            "content_id": content_id(data),
            "path": f"scene:{pass_}:" + "+".join(r["content_id"][:12] for r in group),
            "image": data,
            "format": fmt,
            "height": img.height,
            "width": img.width,
            "channels": 3,
            "label": main.label,
            "label_name": main.label_name,
            "split": group[0]["split"],
            "boxes": [box_record(b.xyxy, b.label, b.label_name, b.content_id) for b in boxes],
        }

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        out: list[dict[str, Any]] = []
        groups = scene_groups(
            rows(batches), lambda r: (r["split"], r["_pass"]), run_rng, min_items, max_items
        )
        for group in groups:
            out.append(scene_row(group))
            if len(out) == chunk:
                yield pa.RecordBatch.from_pylist(out, schema=schema)
                out = []
        if out:
            yield pa.RecordBatch.from_pylist(out, schema=schema)

    return run


def make_scenes(
    spark: SparkSession,
    source: str,
    out: str,
    *,
    scenes_per_item: int = 1,
    min_items: int = 1,
    max_items: int = 3,
    size: int = 128,
    seed: int = 0,
    split: str | None = None,
    paste: Paste = "mask",
    fmt: str = "PNG",
) -> dict[str, Any]:
    """Write the detection table ``out`` of scenes made from the image table ``source``."""
    timer = Timer()
    meta = read_meta(spark, source)
    df = read_table(spark, source, split)
    n = df.count()
    if n == 0:
        raise ValueError(f"{source} has no rows" + (f" in split {split!r}" if split else ""))
    cfg = SceneConfig(size=(size, size), paste=paste)
    passes = spark.range(scenes_per_item).withColumnRenamed("id", "_pass")
    keyed = (
        df.select("content_id", "image", "label", "label_name", "split")
        .crossJoin(passes)
        .withColumn("_key", F.xxhash64("content_id", F.lit(seed), "_pass"))
    )
    parts = max(1, math.ceil(n * scenes_per_item / ROWS_PER_TASK))
    arranged = keyed.repartition(parts, "_key").sortWithinPartitions("split", "_pass", "_key", "content_id")
    scenes = arranged.mapInArrow(scene_batches(cfg, seed, min_items, max_items, fmt), DETECTION_SCHEMA)
    out_q = storage.qualify(out)
    with spark_progress(spark, "scenes"):
        scenes.write.mode("overwrite").parquet(out_q)
    write_meta(spark, out, TableMeta(class_names=meta.class_names, sources=[storage.qualify(source)]))

    written = spark.read.parquet(out_q)
    by_split = {r["split"]: r["n"] for r in written.groupBy("split").agg(F.count("*").alias("n")).collect()}
    by_items = {
        str(r["k"]): r["n"]
        for r in written.groupBy(F.size("boxes").alias("k")).agg(F.count("*").alias("n")).collect()
    }
    used = written.select(F.explode("boxes.item_content_id").alias("c")).agg(F.countDistinct("c")).first()
    scenes_n = sum(by_split.values())
    return {
        "table": out,
        "source": source,
        "source_rows": n,
        "scenes": scenes_n,
        "rows_by_split": dict(sorted(by_split.items())),
        "scenes_by_items": dict(sorted(by_items.items())),
        "items_used": int(used[0]) if used else 0,
        "class_names": meta.class_names,
        "elapsed_s": round(timer.elapsed, 3),
        "scenes_per_s": round(scenes_n / max(timer.elapsed, 1e-9), 1),
    }
