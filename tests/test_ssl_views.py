"""Two-view augmentation: the views differ, keep shape and range, and are reproducible."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sparkvision.ssl.views import RandomView, TwoViews, ViewConfig
from sparkvision.train.augment import adjust_hue, hsv_to_rgb, rgb_to_hsv


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_differ(channels):
    torch.manual_seed(0)
    x = torch.rand(8, channels, 16, 16)
    v1, v2 = TwoViews()(x, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == x.shape
    assert 0 <= float(v1.min()) and float(v1.max()) <= 1
    diff = (v1 - v2).abs().flatten(1).mean(1)
    assert (diff > 1e-3).all(), diff  # every sample's two views differ
    assert not torch.allclose(v1, x)


def test_views_reproducible_with_a_generator():
    x = torch.rand(4, 3, 12, 12)
    a = TwoViews()(x, torch.Generator().manual_seed(3))
    b = TwoViews()(x, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_identity_recipe_keeps_the_image():
    cfg = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, grayscale=0.0)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(RandomView(cfg)(x), x, atol=1e-5)


def test_flip_only_flips():
    cfg = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, jitter_p=0.0, grayscale=0.0)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(RandomView(cfg)(x), x.flip(-1), atol=1e-5)


def test_bad_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="crop_scale"):
        ViewConfig(crop_scale=(0.5, 1.5)).validate()
    with pytest.raises(ValueError, match="hflip"):
        ViewConfig(hflip=2.0).validate()


def test_per_sample_hue_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 7, 9, generator=g)
    x[0, :, 0, 0] = 0.5  # a gray pixel (undefined hue) and pure colours
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    shifts = torch.tensor([0.0, 0.1, -0.1, 0.5, -0.37])
    out = adjust_hue(x, shifts)
    for i in range(len(x)):
        assert torch.allclose(out[i], TF.adjust_hue(x[i], float(shifts[i])), atol=1e-5), i
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_hue_jitter_changes_colour_not_gray():
    cfg = ViewConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip=0.0,
        jitter_p=1.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.5,
        grayscale=0.0,
    )
    g = torch.Generator().manual_seed(1)
    colour = torch.rand(6, 3, 8, 8, generator=g)
    assert (RandomView(cfg)(colour, torch.Generator().manual_seed(2)) - colour).abs().amax() > 0.1
    gray = torch.rand(6, 1, 8, 8, generator=g).expand(6, 3, 8, 8).contiguous()
    assert torch.allclose(RandomView(cfg)(gray, torch.Generator().manual_seed(2)), gray, atol=1e-5)
    with pytest.raises(ValueError, match="hue"):
        ViewConfig(hue=0.7).validate()
