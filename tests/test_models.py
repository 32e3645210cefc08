"""Model registry: built-ins, user models, one interface (features then head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparkvision.models import (
    ImageModel,
    create_model,
    list_models,
    register_model,
    unregister_model,
    wrap_module,
)


@pytest.mark.parametrize("name, dim", [("cnn", 512), ("resnet18", 512)])
@pytest.mark.parametrize("channels", [1, 3])
def test_builtin_models_share_one_interface(name, dim, channels):
    m = create_model(name, num_classes=7, in_channels=channels, image_size=28).eval()
    x = torch.randn(2, channels, 28, 28)
    f = m.forward_features(x)
    assert f.shape == (2, dim) and m.num_features == dim
    assert m.forward_head(f).shape == (2, 7)
    assert torch.allclose(m(x), m.forward_head(f))


def test_cnn_is_the_papers_two_conv_network():
    m = create_model("cnn")
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    pools = [mod for mod in m.modules() if isinstance(mod, nn.MaxPool2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5)]
    assert len(pools) == 2 and all(p.stride == 2 for p in pools)


def test_resnet18_has_a_small_image_stem():
    m = create_model("resnet18", in_channels=1)
    assert m.backbone.conv1.kernel_size == (3, 3) and m.backbone.conv1.stride == (1, 1)
    assert isinstance(m.backbone.maxpool, nn.Identity)


def test_users_register_their_own_module():
    @register_model("tiny-mlp")
    def tiny_mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> ImageModel:
        body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 16), nn.ReLU())
        return wrap_module(body, 16, num_classes, in_channels)

    try:
        assert "tiny-mlp" in list_models()
        m = create_model("tiny-mlp", num_classes=3, in_channels=1, image_size=16)
        assert m(torch.randn(4, 1, 16, 16)).shape == (4, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny-mlp")(tiny_mlp)
    finally:
        unregister_model("tiny-mlp")


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*cnn.*resnet18"):
        create_model("vgg")


def test_saved_spec_pins_the_architecture(tmp_path):
    """A model directory must still load after the registry's defaults change."""
    from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir

    m = create_model("cnn", 3, 1, hidden=64, widths=(8, 16))
    save_model_dir(str(tmp_path), m, ModelSpec("cnn", 3, 1, dict(m.arch)), ["a", "b", "c"], Preprocess())
    loaded = load_model_dir(str(tmp_path))
    assert loaded.model.num_features == 64


def test_model_dir_pins_the_architecture_even_when_the_spec_omits_it(tmp_path):
    """Pretraining and fine-tuning save specs with only the kwargs the user gave; the model's own
    ``arch`` must still be recorded, or a later change of defaults breaks loading."""
    from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir

    m = create_model("cnn", 3, 1, hidden=48)
    save_model_dir(
        str(tmp_path), m, ModelSpec("cnn", 3, 1, {"image_size": 28}), ["a", "b", "c"], Preprocess()
    )
    assert load_model_dir(str(tmp_path)).model.num_features == 48


def test_model_kwargs_for_adds_the_size_only_where_the_factory_takes_it():
    from sparkvision.models import model_kwargs_for

    assert model_kwargs_for("cnn", {"hidden": 32}, 32) == {"hidden": 32, "image_size": 32}
    assert model_kwargs_for("cnn", {"image_size": 28}, 32) == {"image_size": 28}  # the user's value wins

    @register_model("no-size")
    def no_size(num_classes: int = 10, in_channels: int = 1) -> ImageModel:
        return wrap_module(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), in_channels, num_classes, in_channels
        )

    try:
        assert model_kwargs_for("no-size", {}, 28) == {}
    finally:
        unregister_model("no-size")


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_neck_sits_between_features_and_head_and_survives_the_model_dir(name, tmp_path):
    from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir

    m = create_model(name, num_classes=4, in_channels=1, image_size=16, neck=[24]).eval()
    x = torch.rand(3, 1, 16, 16)
    f = m.forward_features(x)
    assert torch.allclose(m(x), m.forward_head(m.neck(f)))  # features -> FC+BN+ReLU -> head
    assert (
        m.head.in_features == 24 and isinstance(m.neck[0], nn.Linear) and m.neck[0].in_features == f.shape[1]
    )
    m.reset_head(2)
    assert m(x).shape == (3, 2)
    save_model_dir(
        str(tmp_path / "m"),
        m,
        ModelSpec(name, 2, 1, {"image_size": 16} if name == "cnn" else {}),
        ["a", "b"],
        Preprocess(channels=1, size=(16, 16), mean=(0.5,), std=(0.5,)),
        {},
    )
    back = load_model_dir(str(tmp_path / "m")).model.eval()
    assert torch.allclose(back(x), m(x), atol=1e-6)
    with pytest.raises(ValueError, match="neck"):
        create_model(name, neck=[0])
