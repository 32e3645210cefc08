"""The model zoo (every torchvision classifier, timm's by prefix) and transfer from a weights file.

Pure parts first (no Spark): the classifier is cut off and replaced, a torchvision state dict maps
onto the zoo model key by key, a file for another architecture is refused in one line, --freeze
stops the right parameters. Then three zoo models train and predict through Spark on small RGB
images of mixed sizes, one of them started from a weights file written here.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from conftest import make_image
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from sparkvision.errors import ParamError
from sparkvision.models import create_model, list_models
from sparkvision.models.zoo import ZooModel
from sparkvision.train.transfer import input_stats, start_weights, transfer_groups


def test_every_torchvision_classifier_is_registered_and_resnet18_stays_ours():
    names = set(list_models())
    tv = torchvision.models.list_models(module=torchvision.models)
    assert {"torchvision/" + n for n in tv} <= names
    assert set(tv) - {"resnet18"} <= names
    assert not isinstance(create_model("resnet18", 4, 1), ZooModel)  # the small-image one
    assert isinstance(create_model("torchvision/resnet18", 4, 1), ZooModel)
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        create_model("resnet5", 4, 3)


@pytest.mark.parametrize(
    ("name", "features", "classifier"),
    [
        ("resnet50", 2048, "fc"),
        ("mobilenet_v3_small", 1024, "classifier.3"),
        ("efficientnet_b0", 1280, "classifier.1"),
        ("squeezenet1_1", 512, "classifier"),
        ("vit_b_16", 768, "heads.head"),
    ],
)
def test_zoo_models_give_pooled_features_and_a_head_for_the_classes(name, features, classifier):
    size = 32
    m = create_model(name, 5, 3, image_size=size).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (2, features) and m.num_features == features
        assert m(x).shape == (2, 5) and m.classifier == classifier
        m.in_channels = 1  # a gray table's model: the channel repeated for the 3-channel stem
        assert torch.equal(m(x[:, :1]), m(x[:, :1].expand(-1, 3, -1, -1)))


def test_timm_models_by_prefix():
    pytest.importorskip("timm")
    m = create_model("timm/resnet10t", 3, 1).eval()
    assert m(torch.rand(2, 1, 32, 32)).shape == (2, 3) and m.classifier == "fc"
    with pytest.raises(ValueError, match="unknown model 'timm/nope'"):
        create_model("timm/nope", 3, 1)


def test_a_torchvision_state_dict_loads_key_by_key_and_the_head_is_fresh(tmp_path):
    net = torchvision.models.resnet50(weights=None)  # a 1000-class ImageNet-shaped file
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    model = create_model("resnet50", 5, 3)
    blob, summary = start_weights(model, str(path))
    assert summary["unexpected"] == [] and summary["missing"] == ["head.weight", "head.bias"]
    assert summary["mismatched"] == ["fc.weight (1000, 2048) vs (5, 2048)", "fc.bias (1000,) vs (5,)"]
    model.load_state_dict(st_load(blob), strict=False)
    assert torch.equal(model.net.layer4[2].conv3.weight, net.layer4[2].conv3.weight)
    # The same class count: the classifier's tensors fill the head too; safetensors reads the same.
    st = tmp_path / "resnet50-5.safetensors"
    net5 = torchvision.models.resnet50(weights=None, num_classes=5)
    save_file({k: v.contiguous() for k, v in net5.state_dict().items()}, str(st))
    _, summary = start_weights(create_model("resnet50", 5, 3), str(st))
    assert summary["missing"] == [] and summary["mismatched"] == []


def test_another_architectures_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(
        ParamError, match=r"init_weights: .* does not fit model ZooModel: .* unexpected keys"
    ) as e:
        start_weights(create_model("resnet50", 5, 3), str(path))
    assert "\n" not in str(e.value)
    code = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "f": print}, code)  # a pickled callable: never loaded
    with pytest.raises(ParamError, match="not a plain weights file"):
        start_weights(create_model("resnet50", 5, 3), str(code))


def test_freeze_and_backbone_learning_rate():
    m = create_model("mobilenet_v3_small", 4, 3)
    total = sum(p.numel() for p in m.parameters())
    frozen = m.freeze("backbone")
    assert frozen == total - sum(p.numel() for p in m.head.parameters())
    assert all(not p.requires_grad for p in m.net.parameters()) and m.head.weight.requires_grad
    m.train()
    assert not m.net.training and m.head.training  # frozen BatchNorm statistics stay fixed
    groups = transfer_groups(m, 0.01, 0.1)
    assert sum(len(g["params"]) for g in groups) == 2  # only the head's weight and bias
    part = create_model("mobilenet_v3_small", 4, 3)
    part.freeze(3)
    stages = part.stages()
    assert all(not p.requires_grad for s in stages[:3] for p in s.parameters())
    assert all(p.requires_grad for s in stages[3:] for p in s.parameters())
    scaled = transfer_groups(part, 0.01, 0.1)
    assert {g.get("lr_scale", 1.0) for g in scaled} == {1.0, 0.1}
    with pytest.raises(ValueError, match="over the"):
        create_model("cnn", 4, 1).freeze(99)


def test_imagenet_statistics_with_init_weights():
    assert input_stats("auto", None, 3) is None and input_stats("table", "w.pth", 3) is None
    mean, std = input_stats("auto", "w.pth", 3)
    assert mean.tolist() == pytest.approx([0.485, 0.456, 0.406]) and std.tolist() == pytest.approx(
        [0.229, 0.224, 0.225]
    )
    g_mean, _ = input_stats("imagenet", None, 1)
    assert g_mean.tolist() == pytest.approx([0.449])


@pytest.fixture(scope="module")
def rgb_table(spark, tmp_path_factory):
    """3 classes of RGB PNG/JPEG images at sizes 20..40 px, train 24 + test 12."""
    from sparkvision.data.ingest import ingest

    root = tmp_path_factory.mktemp("rgb")
    seed = 0
    for split, n in (("train", 8), ("test", 4)):
        for k, name in enumerate("abc"):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                size, fmt = 20 + 4 * ((i + k) % 6), ("PNG", "JPEG")[i % 2]
                (d / f"{i}.{fmt.lower()}").write_bytes(
                    make_image(k, size=size, mode="RGB", fmt=fmt, seed=seed)
                )
                seed += 1
    table = str(tmp_path_factory.mktemp("tables") / "rgb")
    ingest(spark, str(root), table)
    return table


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "torchvision/resnet18"])
def test_zoo_models_train_and_predict_on_mixed_rgb(spark, rgb_table, tmp_path, name):
    from sparkvision.api import predict, train

    kw: dict = {}
    if name == "torchvision/resnet18":  # from a weights file the test writes, head frozen out
        torch.manual_seed(0)
        path = tmp_path / "r18.pth"
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
        kw = {"init_weights": str(path), "freeze": "2"}
    out = tmp_path / "model"
    res = train(spark, table=rgb_table, out=str(out), model=name, epochs=1, batch_size=8, image_size=32, **kw)
    assert res["test_acc"] is not None
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["size"] == [32, 32] and pre["channels"] == 3
    if kw:
        assert pre["mean"] == pytest.approx(
            [0.485, 0.456, 0.406]
        )  # ImageNet's, saved for predict and the web
        assert res["init_weights"]["mismatched"] == [
            "fc.weight (1000, 512) vs (3, 512)",
            "fc.bias (1000,) vs (3,)",
        ]
        cfg = json.loads((out / "train_config.json").read_text())
        assert cfg["freeze"] == "2" and cfg["init_weights"] == str(path)
    preds = tmp_path / "preds"
    predict(spark, model_dir=str(out), table=rgb_table, out=str(preds))
    rows = pq.read_table(str(preds), columns=["pred_label", "error"]).to_pylist()
    assert len(rows) == 36 and all(r["error"] is None and 0 <= r["pred_label"] < 3 for r in rows)
