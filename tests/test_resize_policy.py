"""The resize policy saved with the model directory: "stretch" or "crop" (shorter side, centre crop).

Pure parts first (the one decoder every model path uses, preprocess.json, the training decode and
the random resized crop), then one small Spark run: train with ``resize="crop"`` on mixed-size,
non-square RGB photos and predict through the saved policy.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sparkvision.models.modeldir import Preprocess, read_preprocess
from sparkvision.ops import OPERATIONS, ParamError
from sparkvision.train.augment import RESIZED_CROP_RATIO, RESIZED_CROP_SCALE, AugmentConfig, BatchAugment
from sparkvision.train.config import TrainConfig
from sparkvision.train.data import load_shard
from sparkvision.transforms.preprocess import decode_image, preprocess_batch

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def wide() -> bytes:
    """40 wide x 20 tall: a red left half and a blue right half, with a green band 10 px wide at
    the seam (columns 15-24). The centre 20x20 is columns 10-29: green with 5 px of each half."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20], a[:, 20:], a[:, 15:25] = RED, BLUE, GREEN
    return png(a)


def test_crop_keeps_the_middle_and_stretch_keeps_both_halves():
    crop = decode_image(wide(), 3, (16, 16), resize="crop").astype(int)
    stretch = decode_image(wide(), 3, (16, 16), resize="stretch").astype(int)
    # crop: the middle 20 columns at 16/20 scale: 4 red, 8 green, 4 blue; no column of the outer
    # halves' first 10 px survives
    assert crop.shape == stretch.shape == (3, 16, 16)
    assert (crop[0, :, :3] > 200).all() and (crop[1, :, 5:11] > 200).all() and (crop[2, :, 13:] > 200).all()
    # stretch: the whole width squeezed to 16: 6 red columns, 4 green, 6 blue
    assert (stretch[0, :, :5] > 200).all() and (stretch[2, :, 11:] > 200).all()
    assert (stretch[1, :, 7:9] > 200).all() and (stretch[1, :, :5] < 60).all()
    assert decode_image(wide(), 3, (16, 16)).tolist() == stretch.tolist()  # stretch: the default
    # a non-square target: the image is scaled to cover it (H/W ratio handled), then cut
    tall = decode_image(wide(), 3, (20, 10), resize="crop").astype(int)
    assert tall.shape == (3, 20, 10) and (tall[1] > 200).all()  # 10 of 40 columns: all green
    # a square image: both policies give the very same pixels
    sq = png(np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3))
    assert (decode_image(sq, 3, (16, 16), resize="crop") == decode_image(sq, 3, (16, 16))).all()


def test_preprocess_batch_uses_the_model_directorys_policy():
    pre = Preprocess(channels=3, size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3, resize="crop")
    x, errors = preprocess_batch([wide(), None], pre)
    assert errors[0] is None and errors[1] is not None
    want = torch.tensor(decode_image(wide(), 3, (16, 16), resize="crop"), dtype=torch.float32)
    assert torch.allclose(x[0] * 255, want)


def test_the_policy_round_trips_and_an_old_preprocess_json_is_stretch(tmp_path):
    pre = Preprocess(channels=3, size=(32, 24), mean=(0.5,) * 3, std=(0.25,) * 3, resize="crop")
    (tmp_path / "preprocess.json").write_text(json.dumps(pre.to_json()))
    assert json.loads((tmp_path / "preprocess.json").read_text())["resize"] == "crop"
    assert read_preprocess(str(tmp_path)) == pre
    old = {"channels": 1, "size": [28, 28], "mean": [0.5], "std": [0.5]}  # written before the policy
    (tmp_path / "preprocess.json").write_text(json.dumps(old))
    assert read_preprocess(str(tmp_path)).resize == "stretch"
    (tmp_path / "preprocess.json").write_text(json.dumps({**old, "resize": "squash"}))
    with pytest.raises(ParamError, match="squash"):
        read_preprocess(str(tmp_path))


def test_the_train_option_is_declared_once_and_auto_means_crop_with_weights():
    params = OPERATIONS["train"].params
    assert params.model_fields["resize"].default == "auto"
    with pytest.raises(ParamError, match="resize"):
        OPERATIONS["train"].validate({"table": "t", "out": "o", "resize": "squash"})
    assert TrainConfig().resize_policy() == "stretch"
    assert TrainConfig(init_weights="w.pth").resize_policy() == "crop"
    assert TrainConfig(resize="stretch", init_weights="w.pth").resize_policy() == "stretch"
    assert TrainConfig(resize="crop").resize_policy() == "crop"


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_training_rows_are_decoded_as_their_centre_crop(cache):
    batch = pa.RecordBatch.from_pydict(
        {"image": [wide()], "label": pa.array([0], pa.int32()), "split": ["train"]}
    )
    shard, _ = load_shard(iter([batch]), 3, (16, 16), cache, available_bytes=None, resize="crop")
    try:
        got = shard.images[torch.arange(1)][0].numpy()
        assert (got == decode_image(wide(), 3, (16, 16), resize="crop")).all()
    finally:
        if shard.store is not None:
            shard.store.close()


def test_random_resized_crop_per_sample():
    b, h, w = 64, 24, 24
    ramp = torch.linspace(0, 1, w).expand(b, 3, h, w).contiguous()  # the value is the column
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    out = BatchAugment._resized_crop(ramp, rand)
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # the share of the width each crop kept
    lo = (RESIZED_CROP_SCALE[0] * RESIZED_CROP_RATIO[0]) ** 0.5  # narrowest crop of a square image
    assert out.shape == ramp.shape and (span > lo - 0.1).all() and (span <= 1).all()
    assert span.std() > 0.05  # every sample its own box
    assert (out[:, :, :, 1:] >= out[:, :, :, :-1] - 1e-6).all()  # not flipped or scrambled: a crop
    # only when augmenting: 'augment none' leaves the centre crop as decoded
    assert BatchAugment(AugmentConfig(), resized_crop=True).resized_crop
    assert not BatchAugment(AugmentConfig.none(), resized_crop=True).resized_crop
    assert not BatchAugment(AugmentConfig(), resized_crop=False).resized_crop


@pytest.fixture(scope="module")
def photo_table(spark, tmp_path_factory):
    """2 classes of RGB PNG/JPEG photos of mixed, non-square sizes: train 16 + test 8. Class a
    has a red centre, class b a blue one, on grey."""
    from sparkvision.data.ingest import ingest

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for k, name in enumerate("ab"):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                hgt, wid = int(rng.integers(16, 40)), int(rng.integers(16, 40))
                a = rng.normal(128, 10, (hgt, wid, 3)).clip(0, 255).astype(np.uint8)
                a[hgt // 4 : 3 * hgt // 4, wid // 4 : 3 * wid // 4] = (RED, BLUE)[k]
                buf = io.BytesIO()
                fmt = ("PNG", "JPEG")[i % 2]
                Image.fromarray(a).save(buf, format=fmt)
                (d / f"{i}.{fmt.lower()}").write_bytes(buf.getvalue())
    table = str(tmp_path_factory.mktemp("tables") / "photos")
    ingest(spark, str(root), table)
    return table


def test_train_with_crop_then_predict(spark, photo_table, tmp_path):
    from sparkvision.api import predict, train

    out = tmp_path / "model"
    res = train(
        spark,
        table=photo_table,
        out=str(out),
        epochs=1,
        batch_size=8,
        image_size=16,
        resize="crop",
        workers=1,
    )
    assert res["test_acc"] is not None
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["resize"] == "crop" and pre["size"] == [16, 16] and pre["channels"] == 3
    assert json.loads((out / "train_config.json").read_text())["resize"] == "crop"
    preds = tmp_path / "preds"
    predict(spark, model_dir=str(out), table=photo_table, out=str(preds))
    rows = pq.read_table(str(preds), columns=["pred_label", "error"]).to_pylist()
    assert len(rows) == 24 and all(r["error"] is None and 0 <= r["pred_label"] < 2 for r in rows)
