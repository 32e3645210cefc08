"""Views as detect -> crop shows an item: the object's mask and box, the box as the crop window,
clutter outside the object, and the numpy scene generator's mask agreeing with the batched one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkvision.detect.scenes import item_mask
from sparkvision.ssl.paste import box_windows, mask_boxes, object_masks
from sparkvision.ssl.presets import resolve
from sparkvision.ssl.views import RandomView, ViewConfig

STILL = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, grayscale=0.0)


def item(h: int = 16, w: int = 16, box=(3, 5, 9, 13)) -> torch.Tensor:
    """A black image with a white object at ``box`` (x1, y1, x2, y2, far edges exclusive) and a
    dark pinhole inside it, ``(1, 1, H, W)``."""
    x = torch.zeros(1, 1, h, w)
    x1, y1, x2, y2 = box
    x[..., y1:y2, x1:x2] = 1.0
    x[..., (y1 + y2) // 2, (x1 + x2) // 2] = 0.0
    return x


def test_mask_and_box_of_the_object():
    x = item()
    m = object_masks(x)
    assert m.shape == (1, 1, 16, 16)
    assert m[0, 0, 9, 6]  # the pinhole is closed, as the scene generator pastes it
    assert int(m.sum()) == 6 * 8
    assert mask_boxes(m).tolist() == [[3.0, 5.0, 9.0, 13.0]]


def test_batched_mask_matches_the_scene_generator():
    rng = np.random.default_rng(0)
    arr = np.zeros((20, 20, 3), np.uint8)
    arr[4:15, 6:12] = rng.integers(60, 255, (11, 6, 3))
    arr[8, 8] = 0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    assert np.array_equal(object_masks(x)[0, 0].numpy(), item_mask(arr))


def test_an_image_without_a_plain_border_is_all_object():
    x = torch.rand(2, 3, 12, 12)
    assert object_masks(x).all()
    assert mask_boxes(object_masks(x)).tolist() == [[0.0, 0.0, 12.0, 12.0]] * 2


def test_window_of_a_box_with_and_without_margin():
    boxes = torch.tensor([[4.0, 0.0, 12.0, 8.0]])
    cx, cy, sw, sh = box_windows(boxes, (16, 16), (0.0, 0.0), torch.zeros(1, 4))
    assert [float(cx), float(cy), float(sw), float(sh)] == [0.0, -0.5, 0.5, 0.5]
    cx, cy, sw, sh = box_windows(boxes, (16, 16), (0.5, 0.5), torch.zeros(1, 4))
    assert float(sw) == pytest.approx(1.0) and float(sh) == pytest.approx(1.0)
    assert float(cy) == pytest.approx(-0.5)  # grown past the top edge: the window leaves the image


def test_object_crop_fills_the_view_with_the_object():
    x = item()
    cfg = ViewConfig(**STILL, object_crop=1.0, object_margin=(0.0, 0.0))
    v = RandomView(cfg)(x, torch.Generator().manual_seed(0))
    assert v.shape == x.shape
    inner = v[0, 0, 2:-2, 2:-2]  # away from the bilinear edge
    assert float(inner.mean()) > 0.9  # white object everywhere (the pinhole aside)
    plain = RandomView(ViewConfig(**STILL))(x, torch.Generator().manual_seed(0))
    assert float(plain.mean()) < 0.25  # without it, mostly black background


def test_clutter_replaces_the_background_and_keeps_the_object():
    x = item()
    cfg = ViewConfig(**STILL, clutter=1.0)
    v = RandomView(cfg)(x.repeat(4, 1, 1, 1), torch.Generator().manual_seed(1))
    obj = object_masks(x)[0, 0]
    assert (v[:, 0][:, obj] > 0.9).float().mean() > 0.95  # the object survives, up to sensor noise
    bg = v[:, 0][:, ~obj]
    assert float(bg.std()) > 0.05 and float(bg.mean()) > 0.05  # no longer a black background
    assert not torch.allclose(v[0], v[1])  # every sample its own clutter


def test_pasted_views_reproducible_and_rgb():
    x = item().repeat(3, 3, 1, 1)
    cfg = ViewConfig(object_crop=0.5, clutter=0.5)
    a = RandomView(cfg)(x, torch.Generator().manual_seed(5))
    b = RandomView(cfg)(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_item_views_recipe_round_trips_and_checks_margin():
    cfg = resolve("cpu-items", epochs=1)
    assert cfg.views.object_crop > 0 and cfg.views.clutter > 0
    again = ViewConfig.from_json(cfg.views.to_json())
    assert again == cfg.views
    with pytest.raises(ValueError, match="object_margin"):
        ViewConfig(object_margin=(0.3, 0.1)).validate()
    with pytest.raises(ValueError, match="clutter"):
        ViewConfig(clutter=1.5).validate()


def test_views_from_the_command_line_json():
    from sparkvision import api

    p = api.pretrain.params(
        table="t", out="o", preset="cpu-items", views='{"clutter": 0.25, "object_crop": 1}'
    )
    assert p.views.clutter == 0.25 and p.views.object_crop == 1.0
    assert p.views.hflip == ViewConfig().hflip  # a field left out: ViewConfig's default
    with pytest.raises(Exception, match="object_crops"):
        api.pretrain.params(table="t", out="o", views='{"object_crops": 1}')


def test_two_views_share_the_masks_and_draw_as_two_single_views():
    from sparkvision.ssl.views import TwoViews

    cfg = ViewConfig(object_crop=0.5, clutter=0.5)
    x = item().repeat(4, 3, 1, 1)
    a1, a2 = TwoViews(cfg)(x, torch.Generator().manual_seed(7))
    view, g = RandomView(cfg), torch.Generator().manual_seed(7)
    b1, b2 = view(x, g), view(x, g)  # each computing the masks itself
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
