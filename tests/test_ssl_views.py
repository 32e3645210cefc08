"""Two-view augmentation: the views differ, keep shape and range, and are reproducible."""

from __future__ import annotations

import pytest
import torch

from sparkvision.ssl.views import RandomView, TwoViews, ViewConfig


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
