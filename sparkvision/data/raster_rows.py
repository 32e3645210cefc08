"""One window of a raster as image-table rows: features, skipped pixels, splits and encoding.

Pure numpy and pyarrow, no Spark: :mod:`sparkvision.data.raster_ingest` calls
:func:`window_rows` in each task on the rows it read, and the tests call it on arrays.

A row's ``image`` is its feature vector as a single-channel float32 TIFF (PIL mode ``F``), so the
values stay real numbers (the table's ``pixel_dtype`` is "float32"; see docs/raster.md):

* a pixel: height 1, width F (the F features in :attr:`FeatureSpec.names` order);
* a K x K patch around a pixel (``patch=K``, odd): height K, width K * F, the features of each
  pixel side by side, ``image[i, j * F + f]`` = feature f of patch pixel (i, j); the per-pixel
  layout is the case K = 1. ``patch_array`` reshapes it to ``(K, K, F)``.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from sparkvision.data.raster import C2_OFFSET, C2_SCALE
from sparkvision.errors import ParamError
from sparkvision.transforms.spectral import SEED_004_INDICES, bands_needed, spectral_indices

FeatureSet = Literal["bands", "indices", "both"]
FEATURE_SETS: tuple[str, ...] = get_args(FeatureSet)
# Why a pixel is not a row, in the order the reasons are tested (a pixel counts under the first).
SKIP_REASONS = (
    "nodata",  # a band equals the nodata value, or is not finite
    "unlabelled",  # label 0 (or negative, or the label raster's own nodata value)
    "incomplete_patch",  # its K x K patch reaches outside the raster or over a nodata pixel
    "unreadable",  # its window could not be read (the whole window; ``detail`` says why)
)
F32_MAX = float(np.finfo(np.float32).max)

# What each task returns: image-table rows (``skip`` null, ``n`` 1) and one row per skip reason
# and window (``skip`` set, ``n`` pixels); the ingest splits them apart.
WINDOW_SCHEMA = pa.schema(
    [
        ("content_id", pa.string()),
        ("path", pa.string()),
        ("image", pa.binary()),
        ("format", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("label", pa.int32()),
        ("split", pa.string()),
        ("skip", pa.string()),
        ("n", pa.int64()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class FeatureSpec:
    """What becomes of a window: the raster's band names (file order), the features, the skips
    and the split. Defaults: seed 004's four indices on Landsat Collection 2 reflectance."""

    bands: tuple[str, ...]
    features: FeatureSet = "indices"
    indices: tuple[str, ...] = SEED_004_INDICES
    scale: float = C2_SCALE  # reflectance = stored value * scale + offset
    offset: float = C2_OFFSET
    nodata: float | None = None  # a band's fill value
    label_nodata: float | None = None  # the label raster's own nodata value (also unlabelled)
    patch: int = 1
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    split_block: int = 1  # pixels of a block x block square share a split
    seed: int = 0

    @property
    def names(self) -> list[str]:
        """The features of a pixel, in the order they are stored."""
        out = list(self.bands) if self.features in ("bands", "both") else []
        return out + (list(self.indices) if self.features in ("indices", "both") else [])

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.patch, self.patch * len(self.names)

    def check(self) -> None:
        """Raise :class:`ParamError` naming the setting that does not fit: the feature set, an
        index, a band the indices need, the patch size or the split fractions."""
        if self.features not in FEATURE_SETS:
            raise ParamError("features", f"{self.features!r} is not one of {', '.join(FEATURE_SETS)}")
        if self.features != "bands":
            try:
                needed = bands_needed(self.indices)
            except ValueError as e:
                raise ParamError("indices", str(e)) from None
            missing = [b for b in needed if b not in self.bands]
            if missing:
                raise ParamError(
                    "bands",
                    f"the indices {', '.join(self.indices)} need the bands {', '.join(missing)}; the raster's "
                    f"bands are named {', '.join(self.bands)}",
                )
        if not self.names:
            raise ParamError("indices", "no features: give at least one index or use features 'bands'")
        if self.patch < 1 or self.patch % 2 == 0:
            raise ParamError("patch", f"{self.patch} must be odd (a centre pixel) and at least 1")
        if not (
            0 <= self.test_fraction and 0 <= self.val_fraction and self.test_fraction + self.val_fraction < 1
        ):
            raise ParamError("test_fraction", "test_fraction + val_fraction must be below 1, each at least 0")


def pixel_features(raw: np.ndarray, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """Stored band values ``(B, R, W)`` -> features ``(R, W, F)`` float64 and a valid mask
    ``(R, W)``: False where a band is the nodata value or not finite (its features are then 0)."""
    refl = raw.astype(np.float64) * spec.scale + spec.offset
    valid = np.asarray(np.isfinite(refl).all(axis=0))
    if spec.nodata is not None:
        valid &= ~(raw == spec.nodata).any(axis=0)
    refl = np.where(valid, refl, 0.0)
    parts = []
    if spec.features in ("bands", "both"):
        parts.append(refl.transpose(1, 2, 0))
    if spec.features in ("indices", "both"):
        named = {name: refl[spec.bands.index(name)] for name in bands_needed(spec.indices)}
        parts.append(spectral_indices(named, spec.indices))
    return np.concatenate(parts, axis=-1), valid


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def splits_of(rows: np.ndarray, cols: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Each pixel's split from a hash of (seed, its block's row, column): the same on any cluster,
    window size or order; about ``test_fraction`` test, ``val_fraction`` val, the rest train."""
    b = np.uint64(spec.split_block)
    key = (rows.astype(np.uint64) // b) << np.uint64(32) | (cols.astype(np.uint64) // b)
    with np.errstate(over="ignore"):
        h = _mix64(_mix64(key) ^ np.uint64(spec.seed * 0x9E3779B97F4A7C15 % 2**64))
    u = (h >> np.uint64(11)).astype(np.float64) / float(2**53)
    out = np.full(len(rows), "train", dtype=object)
    out[u < spec.test_fraction + spec.val_fraction] = "val"
    out[u < spec.test_fraction] = "test"
    return out


def encode_tiff(values: np.ndarray) -> bytes:
    """A 2-D float32 array as an uncompressed mode-F TIFF (PIL)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values, dtype=np.float32)).save(buf, format="TIFF")
    return buf.getvalue()


@functools.lru_cache(maxsize=16)
def tiff_template(height: int, width: int) -> tuple[bytes, bytes] | None:
    """The bytes PIL writes before and after the pixels of any ``height x width`` mode-F TIFF, or
    None if they are not the same for two different images (then every row goes through PIL).

    PIL takes ~300 us a row for these tiny images; splicing the pixels between the two parts
    writes the very same bytes for a million rows in a second.
    """
    probe = (np.arange(height * width, dtype=np.float32).reshape(height, width) + 0.5).astype("<f4")
    enc = encode_tiff(probe)
    at = enc.find(probe.tobytes())
    if at < 0:
        return None
    prefix, suffix = enc[:at], enc[at + probe.nbytes :]
    other = (-3 * probe).astype("<f4")
    return (prefix, suffix) if encode_tiff(other) == prefix + other.tobytes() + suffix else None


def tiff_rows(values: np.ndarray) -> tuple[pa.Array, list[str]]:
    """``(N, H, W)`` float32 -> the N rows' TIFF bytes (an Arrow binary array) and content ids."""
    n, h, w = values.shape
    template = tiff_template(h, w)
    if template is None:  # another PIL: encode each row
        encoded = [encode_tiff(v) for v in values]
        return pa.array(encoded, pa.binary()), [hashlib.sha256(e).hexdigest() for e in encoded]
    prefix, suffix = template
    size = h * w * 4
    width = len(prefix) + size + len(suffix)
    if n * width >= 2**31:
        raise ValueError(f"{n} rows of {width} bytes overflow an Arrow batch: use smaller windows")
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    buf[:, len(prefix) : len(prefix) + size] = values.astype("<f4").reshape(n, h * w).view(np.uint8)
    buf[:, len(prefix) + size :] = np.frombuffer(suffix, np.uint8)
    offsets = np.arange(n + 1, dtype=np.int32) * width
    images = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(buf)])
    return images, [hashlib.sha256(row).hexdigest() for row in buf]


def patch_array(image: bytes, features: int) -> np.ndarray:
    """A row's ``image`` as ``(K, K, F)`` float32 (``(1, 1, F)`` for a pixel row)."""
    a = np.asarray(Image.open(io.BytesIO(image)), dtype=np.float32)
    return a.reshape(a.shape[0], a.shape[1] // features, features)


def window_rows(
    spec: FeatureSpec,
    uri: str,
    r0: int,
    r1: int,
    raw: np.ndarray,
    block_r0: int,
    labels: np.ndarray,
) -> pa.RecordBatch:
    """Image rows ``r0:r1`` of a raster as a :data:`WINDOW_SCHEMA` batch.

    ``raw``: stored band values ``(B, R, W)`` of rows ``block_r0 : block_r0 + R``, which cover
    ``r0 - patch // 2 : r1 + patch // 2`` inside the raster; ``labels``: ``(r1 - r0, W)`` class ids.
    A row's ``label`` is its class id - 1 (ids 1..N are the table's classes 0..N-1); a patch
    row's label is its centre pixel's.
    """
    k, half = spec.patch, spec.patch // 2
    feats, valid = pixel_features(raw, spec)
    centre = slice(r0 - block_r0, r1 - block_r0)
    ok = valid[centre]
    lab = labels.astype(np.int64)
    labelled = lab > 0
    if spec.label_nodata is not None:
        labelled &= lab != spec.label_nodata
    # Pad to rows r0-half .. r1+half and columns -half .. width+half: outside is invalid.
    top = block_r0 - (r0 - half)
    bottom = (r1 + half) - (block_r0 + raw.shape[1])
    pad = ((top, bottom), (half, half))
    complete = sliding_window_view(np.pad(valid, pad), (k, k)).all(axis=(2, 3))
    keep = ok & labelled & complete
    skipped = {
        "nodata": int((~ok).sum()),
        "unlabelled": int((ok & ~labelled).sum()),
        "incomplete_patch": int((ok & labelled & ~complete).sum()),
    }
    rows, cols = np.nonzero(keep)
    windows = sliding_window_view(np.pad(feats, (*pad, (0, 0))), (k, k), axis=(0, 1))  # (R, W, F, K, K)
    values = windows[rows, cols].transpose(0, 2, 3, 1).reshape(len(rows), k, k * feats.shape[-1])
    values = np.clip(values, -F32_MAX, F32_MAX).astype(np.float32)
    images, ids = tiff_rows(values)
    g_rows = rows + r0
    n = len(rows)
    skip_names = [r for r in SKIP_REASONS if skipped.get(r)]
    m = len(skip_names)
    h, w = spec.image_shape

    def col(values: list, typ: pa.DataType) -> pa.Array:
        return pa.array(values + [None] * m, typ)

    return pa.RecordBatch.from_arrays(
        [
            col(ids, pa.string()),
            col([f"{uri}#{r},{c}" for r, c in zip(g_rows.tolist(), cols.tolist(), strict=True)], pa.string()),
            pa.concat_arrays([images, pa.nulls(m, pa.binary())]),
            col(["TIFF"] * n, pa.string()),
            col([h] * n, pa.int32()),
            col([w] * n, pa.int32()),
            col([1] * n, pa.int32()),
            col((lab[rows, cols] - 1).tolist(), pa.int32()),
            col(splits_of(g_rows, cols, spec).tolist(), pa.string()),
            pa.array([None] * n + skip_names, pa.string()),
            pa.array([1] * n + [skipped[r] for r in skip_names], pa.int64()),
            pa.nulls(n + m, pa.string()),
        ],
        schema=WINDOW_SCHEMA,
    )


def unreadable_window(r0: int, r1: int, width: int, why: str) -> pa.RecordBatch:
    """The one row of a window that could not be read: its pixels, counted, and the reason."""
    cols: list[pa.Array] = [pa.nulls(1, f.type) for f in WINDOW_SCHEMA]
    cols[WINDOW_SCHEMA.get_field_index("skip")] = pa.array(["unreadable"])
    cols[WINDOW_SCHEMA.get_field_index("n")] = pa.array([(r1 - r0) * width], pa.int64())
    cols[WINDOW_SCHEMA.get_field_index("detail")] = pa.array([f"rows {r0}..{r1 - 1}: {why}"[:300]])
    return pa.RecordBatch.from_arrays(cols, schema=WINDOW_SCHEMA)
