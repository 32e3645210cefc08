"""Dedup: connected components, keep rule, linking and verification as pure functions; planted copies found
(with and without verification), no false groups."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance
from typer.testing import CliRunner

from sparkvision.cli import app
from sparkvision.data.images import content_id
from sparkvision.data.schema import IMAGE_SCHEMA
from sparkvision.data.table import TableMeta, write_meta
from sparkvision.errors import ParamError
from sparkvision.retrieval.dedup import DEFAULT_STRICT_THRESHOLD, DEFAULT_VERIFY_THRESHOLD, dedup_table
from sparkvision.retrieval.descriptors import pixel_descriptor
from sparkvision.retrieval.linking import candidate_pairs, keeper, link_pairs, pairs_above, union_find
from sparkvision.retrieval.verify import VerifyConfig, align, content_frames, frame_warp, verify_pairs
from sparkvision.transforms.preprocess import decode_image


def test_union_find_is_transitive():
    labels = union_find(7, [(0, 1), (1, 2), (5, 4), (2, 2)])
    assert labels.tolist() == [0, 0, 0, 3, 4, 4, 6]
    assert union_find(3, []).tolist() == [0, 1, 2]
    assert union_find(4, [(3, 2), (2, 1), (1, 0)]).tolist() == [0, 0, 0, 0]  # a chain joins end to end
    with pytest.raises(ValueError, match="out of range"):
        union_find(2, [(0, 5)])
    many = np.array([(0, 1)] * 300 + [(2, 3)])  # repeated links count once, arrays are accepted as is
    assert union_find(5, many).tolist() == [0, 0, 2, 2, 4]


def test_keep_rule():
    members = [
        {"path": "b.png", "height": 10, "width": 10},
        {"path": "a.png", "height": 8, "width": 8},
        {"path": "c.png", "height": 10, "width": 10},
    ]
    assert keeper(members, "largest") == 0  # most pixels, then earliest path
    assert keeper(members, "earliest") == 1
    with pytest.raises(ValueError, match="keep rule"):
        keeper(members, "newest")


def test_pairs_above_threshold():
    scores = np.array([[1.0, 0.97, 0.5], [1.0, 0.97, 0.2]], np.float32)
    rows = np.array([[10, 11, 3], [11, 10, -1]])
    assert pairs_above(scores, rows, 10, 0.95) == [
        (10, 11, pytest.approx(0.97)),
        (10, 11, pytest.approx(0.97)),
    ]


def test_candidate_pairs_are_unique_and_ordered():
    scores = np.array([[1.0, 0.97, 0.5], [1.0, 0.96, 0.92]], np.float32)
    rows = np.array([[10, 11, 3], [11, 10, -1]])
    a, b, s = candidate_pairs(scores, rows, 10, 0.9)
    assert a.tolist() == [10] and b.tolist() == [11] and s.tolist() == [pytest.approx(0.97)]
    a, b, s = candidate_pairs(scores, rows, 10, 0.4)
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(3, 10), (10, 11)]


def test_link_rules():
    # 0-1 are each other's best; 2 matches 1 a little less well (a look-alike); 3-4 are a
    # near-exact pair; 5-6 score below the threshold.
    a = np.array([0, 1, 3, 5])
    b = np.array([1, 2, 4, 6])
    s = np.array([0.998, 0.996, 0.9995, 0.9], np.float32)
    assert link_pairs(7, a, b, s, 0.995, "all").tolist() == [True, True, True, False]
    assert link_pairs(7, a, b, s, 0.995, "mutual", 0.999).tolist() == [True, False, True, False]
    # a strict threshold below the look-alike's score links it whatever the ranking
    assert link_pairs(7, a, b, s, 0.995, "mutual", 0.9955).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="link rule"):
        link_pairs(7, a, b, s, 0.995, "closest")


def test_pixel_descriptor_invariances():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, (16, 16)).astype(np.uint8)
    d = pixel_descriptor(a)
    assert abs(np.linalg.norm(d) - 1) < 1e-5
    assert np.allclose(d, pixel_descriptor(a[:, ::-1]), atol=1e-4)  # mirror
    assert np.allclose(d, pixel_descriptor(a * 0.5 + 40), atol=1e-4)  # brightness and contrast


def distinct_image(seed: int, size: int = 48) -> Image.Image:
    """A random scene: a gradient background and a few shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    bg = 60 + 80 * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "L")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 12, 2)
        w, h = rng.integers(8, 24, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        fill = int(rng.integers(0, 256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


COPIES = {
    "flipped": lambda im: encode(im.transpose(Image.FLIP_LEFT_RIGHT)),
    "cropped": lambda im: encode(im.crop((2, 2, im.width - 2, im.height - 2))),
    "jpeg": lambda im: encode(im, "JPEG", quality=60),
    "brightened": lambda im: encode(ImageEnhance.Brightness(im).enhance(1.3)),
}


def gray32(data: bytes) -> np.ndarray:
    return decode_image(data, 1, (32, 32))[0].astype(np.float32) / 255


def test_verification_scores_copies_high_and_distinct_scenes_low():
    originals = [distinct_image(s) for s in range(12)]
    orig = np.stack([gray32(encode(im)) for im in originals])
    edits = dict(COPIES)
    edits["rotated_shifted"] = lambda im: encode(
        im.rotate(6, resample=Image.BILINEAR, translate=(2, -1), fillcolor=int(np.asarray(im)[0, 0]))
    )
    edits["flipped_jpeg"] = lambda im: encode(im.transpose(Image.FLIP_LEFT_RIGHT), "JPEG", quality=70)
    copies = np.stack([gray32(edit(originals[i])) for i, edit in enumerate(edits.values())])
    scores = verify_pairs(orig[: len(copies)], copies)
    assert scores.min() >= DEFAULT_VERIFY_THRESHOLD, dict(zip(edits, scores.round(5).tolist(), strict=True))
    assert np.allclose(scores, verify_pairs(copies, orig[: len(copies)]), atol=2e-3)  # symmetric enough
    ii, jj = np.triu_indices(len(orig), 1)
    assert verify_pairs(orig[ii], orig[jj]).max() < 0.97  # distinct scenes are nowhere near
    assert verify_pairs(orig[:1], orig[:1])[0] > 0.9999
    blank = np.full((1, 32, 32), 0.5, np.float32)
    assert verify_pairs(blank, blank)[0] == 0.0  # no content, no evidence
    with pytest.raises(ValueError, match="expected two"):
        verify_pairs(orig[:2], orig[:3])


def test_alignment_recovers_a_known_warp():
    im = distinct_image(3)
    moved = im.rotate(5, resample=Image.BICUBIC, translate=(2, 1), fillcolor=int(np.asarray(im)[0, 0]))
    a = torch.from_numpy(gray32(encode(im))[None])
    b = torch.from_numpy(gray32(encode(moved))[None])
    p, r = align(a, b, VerifyConfig())
    scale_cos, sin = 1 + float(p[0, 0]), float(p[0, 1])
    assert abs(np.degrees(np.arctan2(sin, scale_cos)) + 5) < 1.0  # PIL rotates counter-clockwise
    assert abs(np.hypot(scale_cos, sin) - 1) < 0.03
    assert float(r[0]) > 0.99


def test_several_copies_of_one_image_form_one_group():
    """Mutual linking must not split a group of near-exact copies (the strict threshold)."""
    im = distinct_image(7)
    imgs = [
        gray32(encode(im)),
        gray32(COPIES["flipped"](im)),
        gray32(COPIES["jpeg"](im)),
        gray32(COPIES["cropped"](im)),
        gray32(encode(distinct_image(8))),
    ]
    ii, jj = np.triu_indices(len(imgs), 1)
    x = np.stack(imgs)
    s = verify_pairs(x[ii], x[jj])
    m = link_pairs(len(imgs), ii, jj, s, DEFAULT_VERIFY_THRESHOLD, "mutual", DEFAULT_STRICT_THRESHOLD)
    labels = union_find(len(imgs), zip(ii[m].tolist(), jj[m].tolist(), strict=True))
    assert labels.tolist() == [0, 0, 0, 0, 4]


def product_image(seed: int, size: int = 48) -> Image.Image:
    """A product shot: a few overlapping shapes of one object on a plain black background."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        cx, cy = rng.integers(size // 3, 2 * size // 3, 2)
        w, h = rng.integers(6, size // 3, 2)
        box = [int(cx - w), int(cy - h), int(cx + w), int(cy + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=int(rng.integers(60, 256)))
    return img


def downscale_pad(im: Image.Image, scale: float, at: tuple[int, int]) -> Image.Image:
    """Shrunk to ``scale`` and pasted at ``at`` on a canvas of the original size and background."""
    side = round(im.width * scale)
    canvas = Image.new("L", im.size, 0)
    canvas.paste(im.resize((side, side), Image.BILINEAR), at)
    return canvas


def test_content_frames_follow_the_object_not_the_padding():
    im = product_image(2)
    x = np.stack([gray32(encode(im)), gray32(encode(downscale_pad(im, 0.6, (3, 10))))])
    (ra, ya, xa), (rb, yb, xb) = content_frames(x)
    assert abs(rb / ra - 0.6) < 0.05  # the radius shrinks with the object
    assert xb < xa and yb > ya  # and the centre moves towards where it was pasted
    p = frame_warp(x[:1], x[1:])[0]
    assert abs(p[0] + 0.4) < 0.05 and p[1] == 0  # scale 0.6, no rotation
    blank = np.zeros((1, 32, 32), np.float32)
    assert content_frames(blank).tolist() == [[0.0, 0.0, 0.0]]
    assert frame_warp(blank, x[:1]).tolist() == [[0.0, 0.0, 0.0, 0.0]]  # no content: the identity


def test_pixel_descriptor_rescale_undoes_downscale_then_pad():
    originals = [product_image(s) for s in range(10)]
    a = gray32(encode(originals[2])) * 255
    b = gray32(encode(downscale_pad(originals[2], 0.6, (3, 10)))) * 255
    assert pixel_descriptor(a, rescale=True) @ pixel_descriptor(b, rescale=True) > 0.99
    assert pixel_descriptor(a) @ pixel_descriptor(b) < 0.9  # without it, too far to be a candidate
    d = np.stack([pixel_descriptor(gray32(encode(im)) * 255, rescale=True) for im in originals])
    sim = d @ d.T
    np.fill_diagonal(sim, 0)
    assert sim.max() < 0.99  # distinct products stay apart


def test_verification_handles_strong_compression_and_downscale_then_pad():
    originals = [product_image(s) for s in range(12)]
    orig = np.stack([gray32(encode(im)) for im in originals])
    edits = {
        "jpeg25": lambda im: encode(im, "JPEG", quality=25),
        "webp40": lambda im: encode(im, "WEBP", quality=40),
        "downscale_pad": lambda im: encode(downscale_pad(im, 0.6, (3, 10))),
        "downscale_pad_jpeg": lambda im: encode(downscale_pad(im, 0.7, (12, 2)), "JPEG", quality=50),
    }
    copies = np.stack([gray32(edit(originals[i])) for i, edit in enumerate(edits.values())])
    scores = verify_pairs(orig[: len(copies)], copies)
    assert scores.min() >= DEFAULT_VERIFY_THRESHOLD, dict(zip(edits, scores.round(5).tolist(), strict=True))
    # the second alignment, from the content-frame warp, is what finds the padded copies
    no_reframe = verify_pairs(orig[2:4], copies[2:], VerifyConfig(reframe=False))
    assert no_reframe.max() < DEFAULT_VERIFY_THRESHOLD
    # the blurred comparison only adds: copies gain, distinct products stay far below the threshold
    assert (scores >= verify_pairs(orig[: len(copies)], copies, VerifyConfig(blur=0)) - 1e-6).all()
    ii, jj = np.triu_indices(len(orig), 1)
    assert verify_pairs(orig[ii], orig[jj]).max() < 0.97


@pytest.fixture(scope="module")
def planted_table(spark, tmp_path_factory):
    """30 distinct images, copies of four of them (one per edit), and one exact duplicate row."""
    rows = []

    def add(data: bytes, path: str) -> None:
        im = Image.open(io.BytesIO(data))
        rows.append(
            (content_id(data), path, data, im.format, im.height, im.width, 1, None, None, "unlabeled")
        )

    originals = [distinct_image(s) for s in range(30)]
    for i, im in enumerate(originals):
        add(encode(im), f"/orig/{i:02d}.png")
    for i, (name, edit) in enumerate(COPIES.items()):
        add(edit(originals[i]), f"/copy/{name}_{i:02d}")
    add(encode(originals[10]), "/dup/10_again.png")  # same bytes as /orig/10.png
    table = str(tmp_path_factory.mktemp("dedup") / "planted")
    spark.createDataFrame(rows, IMAGE_SCHEMA).repartition(3).write.parquet(table)
    write_meta(spark, table, TableMeta())
    return table


def test_dedup_finds_planted_copies_and_no_false_groups(spark, planted_table, tmp_path):
    s = dedup_table(spark, planted_table, str(tmp_path / "out"), keep="largest")
    groups = pq.read_table(str(tmp_path / "out" / "groups.parquet")).to_pylist()
    by_group: dict[int, set[str]] = {}
    for g in groups:
        by_group.setdefault(g["group_id"], set()).add(g["path"])
    expected = [{f"/orig/{i:02d}.png", f"/copy/{name}_{i:02d}"} for i, name in enumerate(COPIES)]
    expected.append({"/orig/10.png", "/dup/10_again.png"})
    assert sorted(map(sorted, by_group.values())) == sorted(map(sorted, expected))
    assert s["exact_groups"] == 1 and s["near_groups"] == 4 and s["rows_to_remove"] == 5
    # one keeper per group; for the crop the full-size original wins under "largest"
    keepers = {g["path"] for g in groups if g["keep"]}
    assert len(keepers) == 5 and "/orig/01.png" in keepers
    exact = [g for g in groups if g["kind"] == "exact"]
    assert {g["path"] for g in exact} == {"/orig/10.png", "/dup/10_again.png"}
    with open(tmp_path / "out" / "_dedup.json") as f:
        summary = json.load(f)
    assert summary["rows"] == 35 and summary["verify"] and summary["link"] == "mutual"
    assert summary["candidate_pairs"] >= 5 and summary["links"] == 5  # 4 copies + the exact duplicate
    # every candidate pair is kept with its cosine and verification score; copies score high
    scored = pq.read_table(str(tmp_path / "out" / "_pairs")).to_pylist()
    assert len(scored) == summary["candidate_pairs"]

    def index_of(
        path: str,
    ) -> tuple[str, int]:  # "/orig/03.png" -> ("orig", 3); "/copy/jpeg_02" -> ("copy", 2)
        kind, name = path.strip("/").split("/")
        return kind, int(name.removesuffix(".png")[-2:])

    copy_scores = {}
    for r in scored:
        if r["path_a"].startswith("/dup/") or r["path_b"].startswith("/dup/"):
            continue
        (ka, ia), (kb, ib) = index_of(r["path_a"]), index_of(r["path_b"])
        if {ka, kb} == {"orig", "copy"} and ia == ib:
            copy_scores[ia] = r["score"]
    assert len(copy_scores) == 4 and min(copy_scores.values()) >= summary["threshold"]


def test_dedup_without_verification_is_the_cosine_rule(spark, planted_table, tmp_path):
    s = dedup_table(spark, planted_table, str(tmp_path / "nv"), verify=False)
    assert not s["verify"] and s["threshold"] == 0.97 and s["link"] == "all"
    assert s["exact_groups"] == 1 and s["near_groups"] == 4
    assert not os.path.exists(tmp_path / "nv" / "_pairs")
    groups = pq.read_table(str(tmp_path / "nv" / "groups.parquet")).to_pylist()
    assert len(groups) == 10


def test_dedup_exact_only_and_bad_options(spark, planted_table, tmp_path):
    s = dedup_table(spark, planted_table, str(tmp_path / "exact"), exact_only=True, keep="earliest")
    assert s["exact_groups"] == 1 and s["near_groups"] == 0 and s["rows_to_remove"] == 1
    # Each bad value is a ParamError naming the parameter, as every front-end spells it.
    bad = {
        "keep": "biggest",
        "threshold": 2.0,
        "link": "closest",
        "candidate_threshold": 3.0,
        "verify_size": 8,
        "k": 1,
    }
    for name, value in bad.items():
        with pytest.raises(ParamError) as e:
            dedup_table(spark, planted_table, str(tmp_path / "x"), **{name: value})
        assert e.value.param == name and "--" not in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "x" / "groups.parquet")


def test_cli_dedup(planted_table, spark, tmp_path):
    r = CliRunner().invoke(app, ["dedup", planted_table, str(tmp_path / "d"), "--exact-only", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert s["exact_groups"] == 1 and s["rows_to_remove"] == 1
    r = CliRunner().invoke(app, ["dedup", planted_table, str(tmp_path / "e"), "--keep", "newest", "--json"])
    assert r.exit_code == 2 and "keep" in r.output
    r = CliRunner().invoke(app, ["dedup", planted_table, str(tmp_path / "f"), "--link", "closest", "--json"])
    assert r.exit_code == 2 and "link" in r.output
    r = CliRunner().invoke(
        app,
        [
            "dedup",
            planted_table,
            str(tmp_path / "v"),
            "--link",
            "all",
            "--threshold",
            "0.996",
            "-k",
            "8",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert s["verify"] and s["link"] == "all" and s["threshold"] == 0.996 and s["strict_threshold"] is None
    assert s["near_groups"] == 4 and s["exact_groups"] == 1
    r = CliRunner().invoke(app, ["dedup", planted_table, str(tmp_path / "n"), "--no-verify", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert not s["verify"] and s["near_groups"] == 4
