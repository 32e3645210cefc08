"""The DBN against its equations (free energy, conditionals, CD-k), against scikit-learn's
BernoulliRBM, and as a registered model trained, resumed and used on Spark."""

from __future__ import annotations

import itertools
import json
import logging
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.neural_network import BernoulliRBM

from sparkvision import api
from sparkvision.errors import ParamError
from sparkvision.models import create_model
from sparkvision.models.dbn import DBN, RBM
from sparkvision.train.data import epoch_indices
from sparkvision.train.layerwise import (
    MOMENTUM,
    PRETRAIN_FILE,
    Rows,
    cd_step,
    plan_layer_inputs,
    pretrain_dbn,
    rbm_optimizer,
)

# A tiny RBM with fixed parameters: 3 visible, 2 hidden units.
W = [[0.5, -1.0, 0.25], [1.5, 0.3, -0.7]]
B = [0.1, -0.2, 0.3]
C = [-0.4, 0.2]


def tiny_rbm(visible: str = "bernoulli") -> RBM:
    rbm = RBM(3, 2, visible).double()  # type: ignore[arg-type]
    with torch.no_grad():
        rbm.W.copy_(torch.tensor(W, dtype=torch.float64))
        rbm.v_bias.copy_(torch.tensor(B, dtype=torch.float64))
        rbm.h_bias.copy_(torch.tensor(C, dtype=torch.float64))
    return rbm


def energy(v: list[float], h: tuple[int, ...], visible: str) -> float:
    """E(v, h), written out term by term."""
    vis = -sum(b * x for b, x in zip(B, v, strict=True))
    if visible == "gaussian":
        vis = sum((x - b) ** 2 for b, x in zip(B, v, strict=True)) / 2
    hid = -sum(c * hj for c, hj in zip(C, h, strict=True))
    inter = -sum(h[j] * W[j][i] * v[i] for j in range(2) for i in range(3))
    return vis + hid + inter


def brute_free_energy(v: list[float], visible: str) -> float:
    """-log of the sum over all 4 hidden states of exp(-E(v, h))."""
    return -math.log(sum(math.exp(-energy(v, h, visible)) for h in itertools.product((0, 1), repeat=2)))


def closed_free_energy(v: list[float], visible: str) -> float:
    """F(v) = -b.v - sum_j log(1 + exp(c_j + W_j.v)) (Gaussian: |v - b|^2 / 2 instead of -b.v)."""
    softplus = sum(math.log1p(math.exp(C[j] + sum(W[j][i] * v[i] for i in range(3)))) for j in range(2))
    if visible == "gaussian":
        return sum((x - b) ** 2 for b, x in zip(B, v, strict=True)) / 2 - softplus
    return -sum(b * x for b, x in zip(B, v, strict=True)) - softplus


BINARY_V = [list(map(float, v)) for v in itertools.product((0, 1), repeat=3)]
REAL_V = [[0.3, -1.2, 2.0], [-0.5, 0.0, 0.7], [1.9, 0.4, -1.1]]


@pytest.mark.parametrize("visible,vs", [("bernoulli", BINARY_V), ("gaussian", REAL_V)])
def test_free_energy_is_its_closed_form_and_the_marginal_over_hidden_states(visible, vs):
    rbm = tiny_rbm(visible)
    got = rbm.free_energy(torch.tensor(vs, dtype=torch.float64)).tolist()
    assert got == pytest.approx([closed_free_energy(v, visible) for v in vs], abs=1e-12)
    assert got == pytest.approx([brute_free_energy(v, visible) for v in vs], abs=1e-12)
    # exp(-F) ratios are the ratios of the unnormalised marginals p(v) (every pair).
    hs = list(itertools.product((0, 1), repeat=2))
    for (i, a), (j, b) in itertools.combinations(enumerate(vs), 2):
        ratio = sum(math.exp(-energy(a, h, visible)) for h in hs) / sum(
            math.exp(-energy(b, h, visible)) for h in hs
        )
        assert math.exp(got[j] - got[i]) == pytest.approx(ratio, rel=1e-12)


def test_conditionals_match_the_joint_distribution():
    rbm = tiny_rbm()
    for v in BINARY_V:
        joint = {h: math.exp(-energy(v, h, "bernoulli")) for h in itertools.product((0, 1), repeat=2)}
        z = sum(joint.values())
        p_h = [sum(p for h, p in joint.items() if h[j] == 1) / z for j in range(2)]
        assert rbm.hidden_probs(torch.tensor([v], dtype=torch.float64))[0].tolist() == pytest.approx(
            p_h, abs=1e-12
        )
    # p(v_i = 1 | h) from the joint over the 8 visible states, for each hidden state.
    for h in itertools.product((0, 1), repeat=2):
        joint_v = {tuple(v): math.exp(-energy(v, h, "bernoulli")) for v in BINARY_V}
        z = sum(joint_v.values())
        p_v = [sum(p for v, p in joint_v.items() if v[i] == 1) / z for i in range(3)]
        mean, _ = rbm.sample_v(torch.tensor([h], dtype=torch.float64))
        assert mean[0].tolist() == pytest.approx(p_v, abs=1e-12)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cd1_gradient_worked_out_by_hand():
    """CD-1 on two rows, with the hidden sample drawn from the same uniform draws by hand."""
    rbm = tiny_rbm()
    v0 = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    g = rbm.cd_gradients(torch.tensor(v0, dtype=torch.float64), 1, torch.Generator().manual_seed(3))
    u = torch.rand((2, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()
    dW = [[0.0] * 3 for _ in range(2)]
    db, dc = [0.0] * 3, [0.0] * 2
    for r, v in enumerate(v0):
        p0 = [sig(C[j] + sum(W[j][i] * v[i] for i in range(3))) for j in range(2)]
        h0 = [1.0 if u[r][j] < p0[j] else 0.0 for j in range(2)]
        v1 = [sig(B[i] + sum(h0[j] * W[j][i] for j in range(2))) for i in range(3)]
        p1 = [sig(C[j] + sum(W[j][i] * v1[i] for i in range(3))) for j in range(2)]
        for j in range(2):
            dc[j] -= (p0[j] - p1[j]) / 2
            for i in range(3):
                dW[j][i] -= (p0[j] * v[i] - p1[j] * v1[i]) / 2
        for i in range(3):
            db[i] -= (v[i] - v1[i]) / 2
        assert g.reconstruction[r].tolist() == pytest.approx(v1, abs=1e-12)
    assert g.W.tolist() == [pytest.approx(row, abs=1e-12) for row in dW]
    assert g.v_bias.tolist() == pytest.approx(db, abs=1e-12)
    assert g.h_bias.tolist() == pytest.approx(dc, abs=1e-12)


def test_cd1_gradient_expectation_over_hidden_samples():
    """The mean of many CD-1 estimates of one row is the expectation over the 4 hidden samples."""
    rbm = tiny_rbm()
    v = [1.0, 0.0, 1.0]
    n = 40_000
    g = rbm.cd_gradients(torch.tensor([v] * n, dtype=torch.float64), 1, torch.Generator().manual_seed(0))
    p0 = [sig(C[j] + sum(W[j][i] * v[i] for i in range(3))) for j in range(2)]
    neg_w = [[0.0] * 3 for _ in range(2)]
    for h in itertools.product((0, 1), repeat=2):
        prob = math.prod(p0[j] if h[j] else 1 - p0[j] for j in range(2))
        v1 = [sig(B[i] + sum(h[j] * W[j][i] for j in range(2))) for i in range(3)]
        p1 = [sig(C[j] + sum(W[j][i] * v1[i] for i in range(3))) for j in range(2)]
        for j, i in itertools.product(range(2), range(3)):
            neg_w[j][i] += prob * p1[j] * v1[i]
    expected = [[-(p0[j] * v[i] - neg_w[j][i]) for i in range(3)] for j in range(2)]
    assert g.W.tolist() == [pytest.approx(row, abs=0.01) for row in expected]


@pytest.mark.parametrize("visible,k", [("bernoulli", 1), ("bernoulli", 3), ("gaussian", 1), ("gaussian", 2)])
def test_cd_gradients_are_the_gradient_of_the_free_energy_difference(visible, k):
    """CD-k = d/dtheta [mean F(v0) - mean F(v_k)] with the chain's end held fixed."""
    torch.manual_seed(0)
    rbm = RBM(5, 4, visible).double()
    with torch.no_grad():
        rbm.W.normal_(0, 0.5), rbm.v_bias.normal_(0, 0.5), rbm.h_bias.normal_(0, 0.5)
    v0 = (
        (torch.rand(6, 5, dtype=torch.float64) < 0.5).double()
        if visible == "bernoulli"
        else torch.randn(6, 5).double()
    )
    g = rbm.cd_gradients(v0, k, torch.Generator().manual_seed(1))
    rbm.v_bias.requires_grad_(True)
    loss = rbm.free_energy(v0).mean() - rbm.free_energy(g.reconstruction).mean()
    gw, gb, gc = torch.autograd.grad(loss, [rbm.W, rbm.v_bias, rbm.h_bias])
    torch.testing.assert_close(g.W, gw)
    torch.testing.assert_close(g.v_bias, gb)
    torch.testing.assert_close(g.h_bias, gc)
    with pytest.raises(ValueError, match="cd_k must be >= 1"):
        rbm.cd_gradients(v0, 0)


def exact_pseudo_likelihood(rbm: RBM, x: torch.Tensor) -> float:
    """Mean over rows of sum_i log p(x_i | x_-i), every bit flipped in turn (sklearn flips one at random)."""
    f = rbm.free_energy(x)
    total = torch.zeros(len(x))
    for i in range(x.shape[1]):
        flipped = x.clone()
        flipped[:, i] = 1 - flipped[:, i]
        total += torch.nn.functional.logsigmoid(rbm.free_energy(flipped) - f)
    return float(total.mean())


@torch.no_grad()
def test_bernoulli_rbm_learns_as_well_as_scikit_learns():
    rng = np.random.default_rng(0)
    protos = rng.random((3, 16)) < 0.5
    x_np = (protos[rng.integers(0, 3, 300)] ^ (rng.random((300, 16)) < 0.05)).astype(np.float64)
    x = torch.tensor(x_np, dtype=torch.float32)
    sk = BernoulliRBM(n_components=8, learning_rate=0.05, batch_size=10, n_iter=30, random_state=0).fit(x_np)
    as_ours = RBM(16, 8)
    as_ours.W.copy_(torch.tensor(sk.components_)), as_ours.h_bias.copy_(torch.tensor(sk.intercept_hidden_))
    as_ours.v_bias.copy_(torch.tensor(sk.intercept_visible_))
    # The same conventions: our p(h | v) with sklearn's parameters is sklearn's transform.
    np.testing.assert_allclose(as_ours.hidden_probs(x).numpy(), sk.transform(x_np), atol=1e-6)

    torch.manual_seed(0)
    ours = RBM(16, 8)
    before = exact_pseudo_likelihood(ours, x)
    opt, g = rbm_optimizer(ours, 0.05), torch.Generator().manual_seed(0)
    for epoch in range(30):
        if epoch == 1:
            for group in opt.param_groups:
                group["momentum"] = MOMENTUM
        for b in torch.randperm(300, generator=g).view(-1, 10):
            cd_step(ours, x[b], 1, g, opt)
    pl_ours, pl_sk = exact_pseudo_likelihood(ours, x), exact_pseudo_likelihood(as_ours, x)
    assert pl_sk > before + 5 and pl_ours > before + 5, (before, pl_sk, pl_ours)  # both learnt the data
    assert pl_ours > pl_sk - 0.5, (pl_ours, pl_sk)  # ours at least about as well (CD-1 with momentum vs PCD)
    noise = (torch.rand(300, 16, generator=g) < 0.5).float()
    gaps = [float(m.free_energy(noise).mean() - m.free_energy(x).mean()) for m in (ours, as_ours)]
    assert gaps[0] > 5 and gaps[1] > 5 and 0.5 < gaps[0] / gaps[1] < 2, gaps  # data far likelier than noise


def test_layerwise_pretraining_reduces_each_layers_reconstruction_error():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 4, 4).repeat(64, 1, 1, 1) + 0.1 * torch.randn(256, 1, 4, 4)  # 4 prototypes
    dbn = DBN(2, 1, 4, hidden=[12, 6], pretrain_epochs=20, pretrain_lr=0.05)
    first_w = dbn.stack[0].W.detach().clone()
    seen: list[int] = []
    log = pretrain_dbn(
        dbn,
        Rows(
            256,
            lambda n: torch.randperm(256, generator=torch.Generator().manual_seed(n)).view(-1, 32),
            x.__getitem__,
        ),
        torch.Generator().manual_seed(0),
        lambda: [x[:128]],
        lambda: [x[128:]],
        lambda rows: seen.append(len(rows)),
    )
    assert [(r["layer"], r["epoch"]) for r in log] == [(layer, e) for layer in (1, 2) for e in range(1, 21)]
    assert seen == list(range(1, 41))  # the log so far, after every epoch
    for layer in (1, 2):
        errors = [r["recon_error"] for r in log if r["layer"] == layer]
        assert errors[-1] < 0.5 * errors[0], errors
    assert all(isinstance(r["free_energy_gap"], float) for r in log)
    assert not torch.equal(first_w, dbn.stack[0].W)


def rc_run(
    cache_layers: str, budget_bytes: int | None = None, epochs: int = 3
) -> tuple[DBN, list[dict], list[int]]:
    """A tiny 3-layer DBN pretrained on 150 rows (batches of 20 over 8 steps: an epoch reads some
    rows twice), with every call to ``rows.plan`` counted."""
    torch.manual_seed(0)
    x = torch.randn(5, 1, 4, 4).repeat(30, 1, 1, 1) + 0.2 * torch.randn(150, 1, 4, 4)
    dbn = DBN(
        2, 1, 4, hidden=[12, 10, 6], pretrain_epochs=epochs, pretrain_lr=0.05, cache_layers=cache_layers
    )
    planned: list[int] = []

    def order(n: int) -> torch.Tensor:
        return epoch_indices(150, 8, 20, 7, -1 - n, 0)

    rows = Rows(150, order, x.__getitem__, lambda idx: planned.append(len(idx)))
    log = pretrain_dbn(
        dbn,
        rows,
        torch.Generator().manual_seed(3),
        lambda: [x[:64]],
        lambda: [x[64:]],
        budget_bytes=budget_bytes,
    )
    return dbn, log, planned


def test_held_layer_inputs_give_the_same_weights_as_recomputing_them(caplog):
    with caplog.at_level(logging.INFO, logger="sparkvision.train.layerwise"):
        held, held_log, held_planned = rc_run("all")
    recomputed, log, planned = rc_run("none")
    for a, b in zip(held.state_dict().values(), recomputed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [r["input"] for r in held_log] == ["pixels"] * 3 + ["held"] * 6
    assert [r["input"] for r in log] == ["pixels"] * 3 + ["recomputed"] * 6
    for a, b in zip(held_log, log, strict=True):
        assert a["recon_error"] == pytest.approx(b["recon_error"], rel=1e-4, abs=1e-6)
    # The pixels are read along the batch plan only where no held input serves the epoch.
    assert held_planned == [8] * 3 and planned == [8] * 9
    # Layer 2's input is read 3 epochs + once to derive layer 3's: reuse 3; layer 3's: 2.
    assert [(r["layer"], r["cache"]["held"], r["cache"]["reuse"]) for r in held_log if "cache" in r] == [
        (2, True, 3),
        (3, True, 2),
    ]
    assert held_log[3]["cache"]["mib"] == pytest.approx(150 * 12 * 4 / 2**20, abs=1e-3)
    text = caplog.text
    assert "hold layer 2's input: weight 3 reuse" in text and "hold layer 3's input: weight 2 reuse" in text
    assert "released layer 2's input" in text and "released layer 3's input" in text


def test_layer_inputs_too_large_for_the_budget_are_recomputed_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="sparkvision.train.layerwise"):
        dbn, log, planned = rc_run("auto", budget_bytes=1000)  # layer inputs: 7,200 and 6,000 bytes
    assert [r["input"] for r in log] == ["pixels"] * 3 + ["recomputed"] * 6 and planned == [8] * 9
    assert all(
        not r["cache"]["held"] and "larger than the budget" in r["cache"]["why"] for r in log if "cache" in r
    )
    assert "recompute layer 2's input" in caplog.text and "holding" not in caplog.text
    for layer in (1, 2, 3):  # still trained
        errors = [r["recon_error"] for r in log if r["layer"] == layer]
        assert errors[-1] < errors[0], errors
    reference, _, _ = rc_run("none")
    for a, b in zip(dbn.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the very same computation


def test_auto_holds_what_fits_and_derives_the_next_input_from_a_held_one():
    _, log, planned = rc_run("auto", budget_bytes=10_000)  # room for one of 7,200 and 6,000 bytes
    cache = {r["layer"]: r["cache"] for r in log if "cache" in r}
    # One fits: layer 2's input alone saves 2 re-reads x its cost (the read and 1 layer's forward),
    # layer 3's alone 2 x its (the read and 2 layers): layer 3's saves more. (Layer 2's reuse says
    # what holding it would save beside the plan: 3, layer 3's input derived from it.)
    assert not cache[2]["held"] and cache[3]["held"], cache
    assert cache[2]["reuse"] == 3 and "saves more" in cache[2]["why"]
    assert [r["input"] for r in log] == ["pixels"] * 3 + ["recomputed"] * 3 + ["held"] * 3
    assert planned == [8] * 6
    _, log, _ = rc_run("auto", budget_bytes=None)  # no limit: both, layer 3's derived from layer 2's
    assert [r["input"] for r in log] == ["pixels"] * 3 + ["held"] * 6
    _, log, _ = rc_run("auto", budget_bytes=None, epochs=1)  # one epoch: no input is read twice
    assert [r["input"] for r in log] == ["pixels", "recomputed", "recomputed"]
    assert "saves nothing" in log[2]["cache"]["why"]


def test_layer_input_plan_follows_the_reuse_rule():
    dbn = DBN(2, 1, 4, hidden=[8, 8, 8, 8], pretrain_epochs=4)
    d = plan_layer_inputs(dbn, 1000, [0.0, 1.0, 2.0, 3.0], None)
    assert [(x.layer, x.held, x.reuse) for x in d.values()] == [(2, True, 4), (3, True, 4), (4, True, 3)]
    d = plan_layer_inputs(dbn, 1000, [0.0, 1.0, 2.0, 3.0], 0)
    assert not any(x.held for x in d.values()) and all(x.reuse == 3 for x in d.values())


def test_dbn_model_arguments_and_errors():
    m = create_model("dbn", num_classes=3, in_channels=1, image_size=8, hidden=[20, 10])
    assert isinstance(m, DBN) and m.arch == {"hidden": [20, 10], "visible": "gaussian", "image_size": 8}
    assert [r.visible for r in m.stack] == ["gaussian", "bernoulli"]
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 3) and m.forward_features(
        torch.randn(5, 1, 8, 8)
    ).shape == (5, 10)
    # DDP needs every parameter that requires grad in the forward: the visible biases do not.
    assert {n for n, p in m.named_parameters() if not p.requires_grad} == {"rbms.0.v_bias", "rbms.1.v_bias"}
    with pytest.raises(ValueError, match="built for 1x8x8 inputs"):
        m(torch.randn(2, 1, 9, 9))
    for bad, match in (
        ({"hidden": []}, "hidden must be"),
        ({"visible": "poisson"}, "visible must be one of"),
        ({"cd_k": 0}, "cd_k must be"),
        ({"pretrain_epochs": -1}, "pretrain_epochs must be"),
        ({"cache_layers": "some"}, "cache_layers must be one of"),
    ):
        with pytest.raises(ParamError, match=match) as e:
            api.train.check(
                api.train.validate({"table": "t", "out": "o", "model": "dbn", "model_kwargs": bad})
            )
        assert e.value.param == "model_kwargs"


DBN_KW = {"hidden": [64, 32], "pretrain_epochs": 3, "pretrain_lr": 0.01}
FAST = dict(
    batch_size=16, lr=3e-3, schedule="constant", augment="none", model="dbn", model_kwargs=DBN_KW, workers=2
)


def test_dbn_trains_on_spark_resumes_without_pretraining_then_evaluates_predicts_embeds(
    spark, tiny_table, tmp_path
):
    out = str(tmp_path / "dbn")
    first = api.train(spark, table=tiny_table, out=out, epochs=1, **FAST)
    assert first["workers"] == 2 and first["train_rows"] == 64
    assert [(r["layer"], r["epoch"]) for r in first["pretrain"]] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    # Layer 2's input (32 rows x 64 units a rank) held in rank memory, read 3 times, planned by RC.
    assert [r["input"] for r in first["pretrain"]] == ["pixels"] * 3 + ["held"] * 3
    assert first["pretrain"][3]["cache"]["held"] and first["pretrain"][3]["cache"]["reuse"] == 2
    log = (tmp_path / "dbn" / PRETRAIN_FILE).read_text()
    assert [json.loads(x) for x in log.splitlines()] == first["pretrain"]
    # Resumed: the checkpoint holds the pretrained weights, so no pretraining again.
    s = api.train(spark, table=tiny_table, out=out, epochs=3, resume=True, **FAST)
    assert s["resumed_from_epoch"] == 1 and s["pretrain"] == []
    assert (tmp_path / "dbn" / PRETRAIN_FILE).read_text() == log
    assert [h["epoch"] for h in s["history"]] == [1, 2, 3] and s["history"][0] == first["history"][0]
    assert s["test_acc"] >= 0.75, s["history"]  # chance is 0.25

    ev = api.evaluate(spark, model_dir=out, table=tiny_table, split="test")
    assert ev["accuracy"] == pytest.approx(s["test_acc"], abs=1e-5)
    pr = api.predict(spark, model_dir=out, table=tiny_table, out=str(tmp_path / "pred"), split="test")
    assert pr["rows"] == 32 and pr["errors"] == 0, pr
    em = api.embed(spark, model_dir=out, table=tiny_table, out=str(tmp_path / "emb"))
    assert em["rows"] == 96 and em["dim"] == 32, em
    assert pq.read_table(str(tmp_path / "emb"), columns=["embedding"]).num_rows == 96
