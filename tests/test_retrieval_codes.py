"""Binary codes: packing, the DeepBit loss against its equations, balance and stability of codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkvision.retrieval.codes import (
    DeepBitConfig,
    DeepBitHead,
    DeepBitLoss,
    Hasher,
    bit_balance,
    fit_hasher,
    hamming,
    itq,
    lsh,
    pack_bits,
    train_deepbit,
    unpack_bits,
)


def clustered(n: int = 2000, d: int = 96, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 3
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_pack_roundtrip_and_hamming():
    rng = np.random.default_rng(0)
    bits = rng.random((5, 64)) > 0.5
    packed = pack_bits(bits)
    assert packed.shape == (5, 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_bits(packed, 64), bits)
    assert np.array_equal(hamming(packed, packed).diagonal(), np.zeros(5))
    assert hamming(packed[:1], packed[1:2])[0, 0] == (bits[0] != bits[1]).sum()
    with pytest.raises(ValueError, match="whole number of bytes"):
        pack_bits(np.zeros((2, 12), bool))


def test_deepbit_loss_matches_its_equations():
    torch.manual_seed(0)
    z = torch.tanh(torch.randn(8, 16))
    za = torch.tanh(torch.randn(8, 16))
    f = torch.randn(8, 32)
    loss = DeepBitLoss(alpha=1.0, beta=2.0, gamma=0.5, delta=3.0)
    terms = loss(z, f, za)
    quant = ((z.abs() - 1) ** 2).mean()
    balance = (z.mean(0) ** 2).mean()
    inv = ((z - za) ** 2).sum(1).mean() / 16
    fn = f / f.norm(dim=1, keepdim=True)
    preserve = ((z @ z.T / 16 - fn @ fn.T) ** 2).mean()
    for name, ref in (
        ("quantisation", quant),
        ("balance", balance),
        ("invariance", inv),
        ("preserve", preserve),
    ):
        assert torch.allclose(terms[name], ref, atol=1e-6), name
    assert torch.allclose(terms["loss"], quant + 2 * balance + 0.5 * inv + 3 * preserve, atol=1e-6)
    # binary, balanced, identical views: only the preservation term is left
    b = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    t = DeepBitLoss()(b, torch.randn(2, 4), b)
    assert t["quantisation"] == 0 and t["balance"] == 0 and t["invariance"] == 0
    with pytest.raises(ValueError, match="must be"):
        loss(z, f[:4])


def test_head_output_range_and_shape():
    head = DeepBitHead(64, 32)
    out = head(torch.randn(5, 64))  # (B, D) -> (B, bits)
    assert out.shape == (5, 32) and out.abs().max() < 1
    with pytest.raises(ValueError, match="bits"):
        DeepBitHead(16, 64)


@pytest.mark.parametrize("method", ["deepbit", "itq", "lsh"])
@pytest.mark.parametrize("bits", [32, 64])
def test_codes_balanced_and_stable(method, bits):
    x, _ = clustered()
    kw = {"epochs": 4} if method == "deepbit" else {}
    h = fit_hasher(method, x, bits, **kw)
    c1, c2 = h.encode(x), h.encode(x.copy())
    assert c1.shape == (len(x), bits // 8)
    assert np.array_equal(c1, c2)  # same input, same code
    bal = bit_balance(unpack_bits(c1, bits))
    # LSH is balanced only in expectation; the learned and ITQ codes should be close to 50%
    lo, hi = (0.2, 0.8) if method == "lsh" else (0.35, 0.65)
    assert lo < bal.min() and bal.max() < hi, bal


def test_learned_codes_keep_neighbours():
    x, labels = clustered(n=1500, d=48, k=8)
    h, terms = train_deepbit(x, config=DeepBitConfig(bits=32, epochs=6))
    codes = h.encode(x)
    d = hamming(codes[:200], codes).astype(float)
    d[np.arange(200), np.arange(200)] = 1e9
    nn = d.argmin(1)
    assert (labels[nn] == labels[:200]).mean() > 0.9
    assert terms["quantisation"] < 0.5


def test_augmented_views_must_match_rows():
    x, _ = clustered(n=300)
    with pytest.raises(ValueError, match="row for row"):
        train_deepbit(x, x[:10], DeepBitConfig(bits=32, epochs=1))


def test_hasher_save_load(tmp_path):
    x, _ = clustered(n=500)
    h = itq(x, 32)
    h.save(str(tmp_path / "h"))
    assert (tmp_path / "h" / "hasher.safetensors").exists()
    h2 = Hasher.load(str(tmp_path / "h"))
    assert h2.method == "itq" and np.array_equal(h.encode(x), h2.encode(x))
    with pytest.raises(ValueError, match="expects"):
        h2.encode(x[:, :10])


def test_itq_rotation_is_orthogonal_and_lsh_seeded():
    x, _ = clustered(n=800)
    h = itq(x, 32)
    assert h.projection.shape == (96, 32)
    a, b = lsh(96, 64, seed=3), lsh(96, 64, seed=3)
    assert np.array_equal(a.projection, b.projection)
    with pytest.raises(ValueError, match="code method"):
        fit_hasher("nope", x, 32)
