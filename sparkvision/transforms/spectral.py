"""Spectral vegetation indices from named reflectance bands: vectorised numpy, never inf or nan.

Seed 004 classifies Landsat-8 land cover from four indices, in this order:

* NDVI = (NIR - Red) / (NIR + Red)  (Rouse et al. 1974)
* DVI  = NIR - Red
* RVI  = NIR / Red  (Jordan 1969; the "simple ratio")
* EVI  = 2.5 (NIR - Red) / (NIR + 6 Red - 7.5 Blue + 1)  (Huete et al. 2002, MODIS constants
  G = 2.5, C1 = 6, C2 = 7.5, L = 1)

The bands must be surface *reflectance* (0..1), not raw digital numbers: EVI's ``+ 1`` (the
canopy background term L) and its coefficients assume that scale, and DVI is in its units.

Division guard: where a denominator's magnitude is below :data:`ZERO_DENOMINATOR` (zero in
practice: Landsat Collection 2 reflectance comes in steps of 2.75e-5) the index is
:data:`FILL_VALUE` (0.0) instead of inf or nan. Non-finite band values give :data:`FILL_VALUE`
too, so finite numbers are all an index ever returns. Callers that must not keep such pixels at
all (the raster ingest) skip them before, as nodata.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

FILL_VALUE = 0.0  # an index's value where its denominator is zero
ZERO_DENOMINATOR = 1e-10  # |denominator| below this counts as zero

# EVI's constants (MODIS; Huete et al. 2002, https://doi.org/10.1016/S0034-4257(02)00096-2).
EVI_G, EVI_C1, EVI_C2, EVI_L = 2.5, 6.0, 7.5, 1.0

Bands = Mapping[str, np.ndarray]
# Arithmetic on non-finite bands (inf - inf) gives nan quietly; the guards then replace it. A
# division by zero never happens (``safe_divide`` divides only where the denominator is not 0).
quiet = np.errstate(invalid="ignore", over="ignore")


@quiet
def safe_divide(num: np.ndarray, den: np.ndarray, fill: float = FILL_VALUE) -> np.ndarray:
    """``num / den`` in float64, ``fill`` where ``|den| < ZERO_DENOMINATOR`` or either is not
    finite: the one division every index goes through."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    num, den = np.broadcast_arrays(num, den)
    ok = np.isfinite(num) & np.isfinite(den) & (np.abs(den) >= ZERO_DENOMINATOR)
    out = np.full(num.shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=ok)
    return out


@quiet
def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, FILL_VALUE)


@quiet
def ndvi(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """Normalised difference vegetation index, in [-1, 1] for non-negative reflectance."""
    nir, red = np.asarray(nir, dtype=np.float64), np.asarray(red, dtype=np.float64)
    return safe_divide(nir - red, nir + red)


@quiet
def dvi(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """Difference vegetation index (no denominator: only non-finite input is guarded)."""
    return _finite(np.asarray(nir, dtype=np.float64) - np.asarray(red, dtype=np.float64))


@quiet
def rvi(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """Ratio vegetation index NIR / Red (about 1 over bare ground, 10 or more over dense canopy)."""
    return safe_divide(nir, red)


@quiet
def evi(nir: np.ndarray, red: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """Enhanced vegetation index; its denominator can reach zero for odd reflectances (bright blue
    over dark red and NIR), which the guard covers."""
    nir, red, blue = (np.asarray(b, dtype=np.float64) for b in (nir, red, blue))
    return safe_divide(EVI_G * (nir - red), nir + EVI_C1 * red - EVI_C2 * blue + EVI_L)


# Each index: the bands it reads (by name) and its function of them, in that order.
INDICES: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "ndvi": (("nir", "red"), ndvi),
    "dvi": (("nir", "red"), dvi),
    "rvi": (("nir", "red"), rvi),
    "evi": (("nir", "red", "blue"), evi),
}
SEED_004_INDICES: tuple[str, ...] = ("ndvi", "dvi", "rvi", "evi")


def bands_needed(names: Sequence[str]) -> list[str]:
    """The band names the indices ``names`` read, each once, in first-use order."""
    out: list[str] = []
    for name in names:
        for band in index_bands(name):
            if band not in out:
                out.append(band)
    return out


def index_bands(name: str) -> tuple[str, ...]:
    if name not in INDICES:
        raise ValueError(f"unknown spectral index {name!r}; known: {', '.join(INDICES)}")
    return INDICES[name][0]


def spectral_indices(bands: Bands, names: Sequence[str] = SEED_004_INDICES) -> np.ndarray:
    """The indices ``names`` of reflectance ``bands`` (same-shaped arrays by band name), stacked
    on a new last axis: shape ``bands' shape + (len(names),)``, float64, all finite."""
    missing = [b for b in bands_needed(names) if b not in bands]
    if missing:
        raise ValueError(
            f"the indices {', '.join(names)} need the bands {', '.join(missing)}, which are not among "
            f"{', '.join(bands) or 'no bands'}"
        )
    return np.stack([INDICES[n][1](*(bands[b] for b in INDICES[n][0])) for n in names], axis=-1)
