"""``ingest --coco``: a folder plus a COCO JSON file becomes a detection table whose boxes are the
file's, in the stored images' pixels (issue 18)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pyspark.sql.types import StructType

from sparkvision.data.coco import schema_problem
from sparkvision.data.detection import read_detection_table
from sparkvision.data.schema import REJECT_REASONS
from sparkvision.errors import ParamError
from sparkvision.ops.ingest import OPERATION as INGEST


def png(width: int, height: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]  # classes by id: cat, dog
IMAGES = [
    {"id": 1, "file_name": "a.png", "width": 20, "height": 16},
    {"id": 2, "file_name": "b.png", "width": 16, "height": 16},  # sub/b.png: the only b.png
    {"id": 3, "file_name": "missing.png", "width": 16, "height": 16},
    {"id": 4, "file_name": "d.png", "width": 32, "height": 32},  # the file is 16x16
]
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "bbox": [1, 2, 5.5, 4], "category_id": 2, "iscrowd": 0},
    {"id": 2, "image_id": 1, "bbox": [10, 3, 6.25, 8], "category_id": 7},
    {"id": 3, "image_id": 1, "bbox": [0, 0, 20, 16], "category_id": 7, "iscrowd": 1},
    {"id": 4, "image_id": 2, "bbox": [12, 1, 10, 5], "category_id": 7},  # right edge 22 > 16: clipped
    {"id": 5, "image_id": 2, "bbox": [3, 3, 0, 5], "category_id": 2},  # no area
    {"id": 6, "image_id": 2, "bbox": [3, 3, 2, 2], "category_id": 99},  # unknown category
    {"id": 7, "image_id": 3, "bbox": [1, 1, 2, 2], "category_id": 2},
    {"id": 8, "image_id": 4, "bbox": [1, 1, 2, 2], "category_id": 2},
]


@pytest.fixture(scope="module")
def coco_ingest(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    root = tmp / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png(20, 16, 0))
    (root / "sub" / "b.png").write_bytes(png(16, 16, 1))
    (root / "c.png").write_bytes(png(16, 16, 2))  # not in the COCO file
    (root / "d.png").write_bytes(png(16, 16, 3))
    coco = tmp / "instances.json"
    coco.write_text(json.dumps({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}))
    table = str(tmp / "table")
    summary = INGEST(spark, source=str(root), table=table, coco=str(coco))
    rows = {r.path.rsplit("/photos/", 1)[1]: r for r in read_detection_table(spark, table).collect()}
    return summary, rows, table, tmp


def boxes_of(row) -> list[tuple]:
    return sorted((b.x1, b.y1, b.x2, b.y2, b.label, b.label_name) for b in row.boxes)


def test_boxes_round_trip_as_xyxy_with_labels_by_category_id(coco_ingest):
    summary, rows, _, _ = coco_ingest
    assert summary["class_names"] == ["cat", "dog"]
    assert boxes_of(rows["a.png"]) == [(1.0, 2.0, 6.5, 6.0, 0, "cat"), (10.0, 3.0, 16.25, 11.0, 1, "dog")]
    a = rows["a.png"]
    assert (a.width, a.height, a.split) == (20, 16, "train")
    assert (a.label, a.label_name) == (1, "dog")  # the largest box
    assert all(b.item_content_id is None for b in a.boxes)


def test_basename_match_and_boxes_clipped_to_the_image(coco_ingest):
    _, rows, _, _ = coco_ingest
    assert boxes_of(rows["sub/b.png"]) == [(12.0, 1.0, 16.0, 6.0, 1, "dog")]


def test_image_without_annotations_has_no_boxes(coco_ingest):
    _, rows, _, _ = coco_ingest
    c = rows["c.png"]
    assert c.boxes == [] and c.label is None and c.split == "train"


def test_summary_counts_what_did_not_become_a_box(coco_ingest):
    summary, rows, _, _ = coco_ingest
    assert summary["coco"] == {
        "file": summary["coco"]["file"],
        "images": 4,
        "images_matched": 3,
        "images_unmatched": 1,
        "unmatched_examples": ["missing.png"],
        "images_size_mismatch": 1,
        "annotations": 8,
        "boxes": 3,
        "annotations_unmatched": 1,
        "annotations_crowd": 1,
        "annotations_invalid": 2,
        "annotations_on_rejected_images": 1,
    }
    assert summary["rows_written"] == 3 and set(rows) == {"a.png", "sub/b.png", "c.png"}


def test_size_mismatch_is_a_reject_with_both_sizes(spark, coco_ingest):
    summary, _, table, _ = coco_ingest
    assert summary["rejects_by_reason"] == {"coco_size_mismatch": 1}
    assert "coco_size_mismatch" in REJECT_REASONS
    (r,) = spark.read.parquet(table + "_rejects").collect()
    assert r.path.endswith("/d.png") and r.reason == "coco_size_mismatch"
    assert "32x32" in r.detail and "16x16" in r.detail


def test_plain_images_are_not_appended_to_a_detection_table(spark, coco_ingest):
    _, _, table, tmp = coco_ingest
    with pytest.raises(ParamError) as e:
        INGEST(spark, source=str(tmp / "photos"), table=table)
    assert e.value.param == "table"


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"images": [', "not valid JSON"),
        ('{"images": [], "annotations": []}', "'categories'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "'file_name'"),
        (
            '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "x"}]}',
            "twice",
        ),
    ],
)
def test_bad_coco_file_is_one_param_error(spark, tmp_path, text, words):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(png(8, 8, 0))
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ParamError) as e:
        INGEST(
            spark, source=str(tmp_path / "src"), table=str(tmp_path / "t"), coco=str(tmp_path / "bad.json")
        )
    assert e.value.param == "coco" and words in e.value.message
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_coco_goes_with_a_folder_only():
    with pytest.raises(ParamError) as e:
        INGEST.validate({"source": "x", "table": "t", "kind": "idx", "coco": "c.json"})
    assert e.value.param == "coco"
    with pytest.raises(ParamError) as e:
        INGEST.validate({"source": "x", "table": "t", "coco": "c.json", "class_names": "a,b"})
    assert e.value.param == "class_names"


def test_schema_problem_allows_empty_lists():
    empty = StructType.fromJson(
        {
            "type": "struct",
            "fields": [
                {
                    "name": k,
                    "type": {"type": "array", "elementType": "string", "containsNull": True},
                    "nullable": True,
                    "metadata": {},
                }
                for k in ("images", "annotations", "categories")
            ],
        }
    )
    assert schema_problem(empty) is None
