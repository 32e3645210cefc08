"""Binary codes for images: a learned DeepBit-style hashing head, with ITQ and LSH as baselines.

FAISS provides the linear algebra it has well: the PCA (``faiss.PCAMatrix``, shared by ITQ and
DeepBit's initialisation) and LSH's random directions (``faiss.RandomRotationMatrix``, the rotation
``faiss.IndexLSH`` uses). All three methods end as the same thing, a linear projection followed by a sign,
``bits = (x @ projection + bias) > 0``, so one :class:`Hasher` encodes, saves (safetensors +
JSON, no pickle) and ships to the executors whichever method produced it. Codes are packed
eight bits to a byte (``np.packbits``) because that is what FAISS's binary indexes and
Hamming distance expect.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

METHODS = ("deepbit", "itq", "lsh")
# ITQ by default: it scored above DeepBit in both our retrieval benchmarks (64 bits, mAP@100 on
# Fashion-MNIST CNN features 0.909 vs 0.894; crops of scenes, same-class mAP@all 0.556 vs 0.297).
DEFAULT_METHOD = "itq"
SUPPORTED_BITS = (32, 64, 128)
HASHER_WEIGHTS = "hasher.safetensors"
HASHER_CONFIG = "hasher.json"


# ---------------------------------------------------------------------------------------------
# The hasher: what every method produces
# ---------------------------------------------------------------------------------------------


@dataclass
class Hasher:
    """``bits = (x @ projection + bias) > 0`` with ``projection`` of shape ``(D, bits)``."""

    method: str
    projection: np.ndarray  # (D, bits) float32
    bias: np.ndarray  # (bits,) float32
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.projection.shape[1])

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    def encode_bits(self, x: np.ndarray) -> np.ndarray:
        """``(N, D)`` float features -> ``(N, bits)`` bool."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"features have shape {x.shape}; this {self.method} hasher expects (N, {self.dim})"
            )
        return (x @ self.projection + self.bias) > 0

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``(N, D)`` float features -> ``(N, bits // 8)`` uint8, ready for a FAISS binary index."""
        return pack_bits(self.encode_bits(x))

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        save_file(
            {
                "projection": np.ascontiguousarray(self.projection, np.float32),
                "bias": self.bias.astype(np.float32),
            },
            os.path.join(directory, HASHER_WEIGHTS),
        )
        with open(os.path.join(directory, HASHER_CONFIG), "w") as f:
            json.dump(
                {"method": self.method, "bits": self.bits, "dim": self.dim, "info": self.info}, f, indent=2
            )
        return directory

    @classmethod
    def load(cls, directory: str) -> Hasher:
        path = os.path.join(directory, HASHER_WEIGHTS)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no hasher in {directory} ({HASHER_WEIGHTS} is missing)")
        tensors = load_file(path)
        with open(os.path.join(directory, HASHER_CONFIG)) as f:
            cfg = json.load(f)
        return cls(cfg["method"], tensors["projection"], tensors["bias"], cfg.get("info", {}))


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """``(N, B)`` bool -> ``(N, B / 8)`` uint8; B must be a multiple of 8 (FAISS needs whole bytes)."""
    bits = np.asarray(bits, dtype=bool)
    if bits.shape[-1] % 8:
        raise ValueError(f"{bits.shape[-1]} bits is not a whole number of bytes; use 32, 64 or 128 bits")
    return np.packbits(bits, axis=-1)


def unpack_bits(codes: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`."""
    out = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=-1).astype(bool)
    return out if bits is None else out[..., :bits]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes ``a (N, n)`` and ``b (M, n)`` -> ``(N, M)``."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x, axis=-1).sum(-1)


def _check_bits(bits: int, dim: int | None = None) -> None:
    if bits % 8 or bits <= 0:
        raise ValueError(f"bits={bits}: use a positive multiple of 8 (32, 64 or 128)")
    if dim is not None and bits > dim:
        raise ValueError(f"bits={bits} is more than the feature dimension {dim}; use bits <= {dim}")


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def lsh(dim: int, bits: int = 64, mean: np.ndarray | None = None, seed: int = 0) -> Hasher:
    """Random-hyperplane LSH (Charikar 2002, "Similarity estimation techniques from rounding
    algorithms"): each bit is the side of a random hyperplane, so the Hamming distance estimates
    the angle. The hyperplanes are FAISS's random rotation (as in ``faiss.IndexLSH``), orthonormal
    when ``bits <= dim``, which estimates the angle with less variance than independent Gaussian
    ones (Ji et al., NIPS 2012, "Super-Bit LSH"; measured: precision@10 0.838 vs 0.803 at 32 bits on
    scikit-learn's digits). Centring on ``mean`` (when given) keeps bits from all agreeing on
    all-positive inputs such as pixels.
    """
    _check_bits(bits)
    rotation = faiss.RandomRotationMatrix(dim, bits)
    rotation.init(seed)
    w = faiss.vector_to_array(rotation.A).reshape(bits, dim).T  # (D, bits)
    m = np.zeros(dim, np.float32) if mean is None else np.asarray(mean, np.float32)
    return Hasher("lsh", w, -(m @ w), {"seed": seed, "centred": mean is not None})


def pca_basis(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and the first ``k`` principal directions ``(D, k)`` of ``x (N, D)`` (FAISS's PCA)."""
    x = np.ascontiguousarray(x, np.float32)
    pca = faiss.PCAMatrix(x.shape[1], k)
    pca.train(x)
    components = faiss.vector_to_array(pca.A).reshape(-1, x.shape[1])[:k]
    return faiss.vector_to_array(pca.mean), np.ascontiguousarray(components.T)


def itq(x: np.ndarray, bits: int = 64, iterations: int = 50, seed: int = 0) -> Hasher:
    """Iterative Quantization (Gong & Lazebnik, CVPR 2011, "Iterative Quantization: A Procrustean
    Approach to Learning Binary Codes"): PCA to ``bits`` dimensions, then the orthogonal rotation
    that minimises the quantisation error ``||B - V R||``, alternating B = sign(V R) and an
    orthogonal Procrustes step. The paper uses 50 iterations.

    The rotation stays hand-written: ``faiss.ITQMatrix`` (and ``faiss.ITQTransform``, which also
    L2-normalises before its PCA) does not decrease the quantisation error monotonically and gave
    lower precision@10 on scikit-learn's digits over 5 seeds (0.885 / 0.897 vs 0.927 at 32 bits,
    0.931 vs 0.949 at 64 bits).
    """
    x = np.asarray(x, np.float32)
    _check_bits(bits, x.shape[1])
    mean, pca = pca_basis(x, bits)
    v = (x - mean) @ pca  # (N, bits)
    rng = np.random.default_rng(seed)
    r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        b = np.sign(v @ r)
        b[b == 0] = 1
        u, _, wt = np.linalg.svd(b.T @ v)  # Procrustes: R = (U W^T)^T of B^T V
        r = (u @ wt).T
    proj = (pca @ r).astype(np.float32)
    return Hasher("itq", proj, -(mean @ proj), {"iterations": iterations, "seed": seed})


# ---------------------------------------------------------------------------------------------
# DeepBit: learned codes on top of a frozen encoder
# ---------------------------------------------------------------------------------------------
# Hand-written by necessity: a trained layer with DeepBit's own loss, which FAISS has no equivalent of.


class DeepBitHead(nn.Module):
    """Hashing head of DeepBit (Lin, Lu, Chen & Zhou, CVPR 2016, "Learning Compact Binary
    Descriptors with Unsupervised Deep Neural Networks", https://arxiv.org/abs/1605.06434).

    DeepBit puts a fully connected layer with ``bits`` outputs on a pretrained CNN and trains it
    without labels. Here the encoder is frozen, so only this layer learns; its output ``tanh(Wx+b)``
    is the relaxed code in [-1, 1] and the code is its sign. DeepBit binarises a sigmoid at 0.5,
    which is the same code after the change of variable ``2s - 1``.

    The head is initialised with PCA (the first ``bits`` principal directions, centred), the
    starting point ITQ also uses: with a frozen encoder nothing else ties random initial bits to
    the feature geometry.
    """

    def __init__(self, dim: int, bits: int = 64) -> None:
        super().__init__()
        _check_bits(bits, dim)
        self.bits = bits
        self.proj = nn.Linear(dim, bits)

    @torch.no_grad()
    def init_pca(self, x: torch.Tensor) -> None:
        mean, pca = pca_basis(x.cpu().numpy(), self.bits)
        v = (x.cpu().numpy() - mean) @ pca
        scale = 1.0 / (v.std(0) + 1e-6)  # unit-variance projections sit in tanh's useful range
        w = (pca * scale).T
        self.proj.weight.copy_(torch.from_numpy(w))
        self.proj.bias.copy_(torch.from_numpy(-(mean @ w.T)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, bits) in (-1, 1)
        return torch.tanh(self.proj(x))

    def to_hasher(self, info: dict[str, Any] | None = None) -> Hasher:
        w = self.proj.weight.detach().cpu().numpy().T.astype(np.float32)  # (D, bits)
        b = self.proj.bias.detach().cpu().numpy().astype(np.float32)
        return Hasher("deepbit", w, b, info or {})


class DeepBitLoss(nn.Module):
    """DeepBit's three unsupervised criteria plus one term of ours.

    * quantisation: ``mean((|z| - 1)^2)``, i.e. the relaxed code stays close to
      its binary code ``sign(z)``;
    * even distribution, i.e. bit balance: each bit is on for half of the data,
      ``mean_k (mean_i z_ik)^2``;
    * rotation / augmentation invariance (DeepBit fine-tunes on rotated copies, weighting by angle):
      ``mean ||z(x) - z(aug(x))||^2 / bits``;
    * similarity preservation (ours, weight ``delta``): the code inner products of a batch,
      divided by ``bits``, follow the cosine similarities of the frozen features. DeepBit keeps
      the geometry by fine-tuning the whole network from ImageNet weights; with a frozen encoder
      this term does that job, so the codes rank neighbours like the features they come from.

    ``alpha = 1`` follows DeepBit. ``beta = 20``, not DeepBit's equal weighting: with a frozen
    encoder and the preservation term, ``beta = 1`` let some bits drift to 8% / 94% on
    Fashion-MNIST CNN features, while ``beta = 20`` keeps every bit within 45-60% for a 0.005 mAP
    cost (docs/retrieval.md). ``gamma`` and ``delta`` were set by hand, not searched.
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 20.0, gamma: float = 0.5, delta: float = 4.0
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma, self.delta = alpha, beta, gamma, delta

    def forward(
        self, z: torch.Tensor, features: torch.Tensor, z_aug: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if z.ndim != 2 or features.ndim != 2 or z.shape[0] != features.shape[0]:
            raise ValueError(
                f"z {tuple(z.shape)} and features {tuple(features.shape)} must be (B, bits), (B, D)"
            )
        bits = z.shape[1]
        quant = ((z.abs() - 1) ** 2).mean()
        balance = (z.mean(0) ** 2).mean()
        f = nn.functional.normalize(features, dim=1)
        sim_f = f @ f.T  # (B, B) cosine of the frozen features
        sim_z = z @ z.T / bits  # (B, B) in [-1, 1]; equals 1 - 2 * hamming / bits on binary codes
        preserve = ((sim_z - sim_f) ** 2).mean()
        invariance = z.new_zeros(()) if z_aug is None else ((z - z_aug) ** 2).sum(1).mean() / bits
        total = self.alpha * quant + self.beta * balance + self.gamma * invariance + self.delta * preserve
        return {
            "loss": total,
            "quantisation": quant,
            "balance": balance,
            "invariance": invariance,
            "preserve": preserve,
        }


@dataclass
class DeepBitConfig:
    bits: int = 64
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    feature_noise: float = 0.05  # std of the feature-space view used when no augmented features exist
    seed: int = 0


def train_deepbit(
    features: np.ndarray,
    features_aug: np.ndarray | None = None,
    config: DeepBitConfig | None = None,
    loss: DeepBitLoss | None = None,
) -> tuple[Hasher, dict[str, float]]:
    """Train a :class:`DeepBitHead` on frozen ``features (N, D)`` without labels.

    ``features_aug`` are the encoder's features of an augmented view of the same images (DeepBit
    rotates by up to 10 degrees); row i must be a view of row i. Without them a feature-space
    view (Gaussian noise plus dropout) stands in, which still asks neighbouring points to share
    bits but is a weaker prior than a real image augmentation.
    """
    cfg = config or DeepBitConfig()
    crit = loss or DeepBitLoss()
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy
    xa = None if features_aug is None else torch.from_numpy(np.array(features_aug, dtype=np.float32))
    if xa is not None and xa.shape != x.shape:
        raise ValueError(f"features_aug {tuple(xa.shape)} must match features {tuple(x.shape)} row for row")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = DeepBitHead(x.shape[1], cfg.bits)
    head.init_pca(x[torch.randperm(len(x), generator=g)[:20_000]])
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    last: dict[str, float] = {}
    bs = min(cfg.batch_size, len(x))
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i : i + bs]
            xb = x[idx]
            if xa is not None:
                view = xa[idx]
            else:
                noise = torch.randn(xb.shape, generator=g) * cfg.feature_noise * xb.std()
                keep = (torch.rand(xb.shape, generator=g) > 0.1).float() / 0.9
                view = (xb + noise) * keep
            terms = crit(head(xb), xb, head(view))
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            last = {k: float(v.detach()) for k, v in terms.items()}
    head.eval()
    info = {"config": cfg.__dict__, "final_loss": last, "augmented_views": xa is not None}
    return head.to_hasher(info), last


def fit_hasher(
    method: str,
    features: np.ndarray,
    bits: int = 64,
    features_aug: np.ndarray | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Hasher:
    """One entry point for ``deepbit`` | ``itq`` | ``lsh`` (the CLI's ``--code-method``)."""
    features = np.asarray(features, np.float32)
    if method == "deepbit":
        hasher, _ = train_deepbit(features, features_aug, DeepBitConfig(bits=bits, seed=seed, **kwargs))
        return hasher
    if method == "itq":
        return itq(features, bits, seed=seed, **kwargs)
    if method == "lsh":
        return lsh(features.shape[1], bits, mean=features.mean(0), seed=seed)
    raise ValueError(f"code method {method!r} is not one of {', '.join(METHODS)}")


def bit_balance(codes_bits: np.ndarray) -> np.ndarray:
    """Fraction of rows with each bit on; 0.5 everywhere is a perfectly balanced code."""
    return np.asarray(codes_bits, dtype=bool).mean(0)
