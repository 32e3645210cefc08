"""A synthetic Landsat-8-like scene with known land cover: a multiband GeoTIFF and its label raster.

For tests and benchmarks of the raster ingest and of models on spectral features, where a real
scene with ground truth cannot be shipped. What makes it Landsat-like:

* seven bands, OLI 1..7 (coastal, blue, green, red, NIR, SWIR1, SWIR2), stored as 16-bit
  Collection 2 Level-2 values: DN = (reflectance + 0.2) / 0.0000275, 0 reserved for fill;
* a scene footprint tilted by 12 degrees (WRS-2 paths run at an angle), outside which every band
  is fill (0, the GDAL_NODATA tag) and the label is 0;
* 30 m pixels in UTM zone 33N (EPSG:32633), written as GeoTIFF tags.

Land cover: regions (Voronoi cells of random seeds, their borders warped by smooth noise), each of
one class, with the class's reflectance signature perturbed per region (no two fields alike),
smooth within-region texture and per-pixel sensor noise. A share of the regions is unlabelled
(label 0, valid data), as ground truth covers only part of a scene. The signatures are typical
surface reflectances of each cover type (after USGS spectral library curves), not measurements.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tifffile

from sparkvision.data.raster import C2_OFFSET, C2_SCALE, GDAL_NODATA_TAG, LANDSAT8_BANDS

BANDS = LANDSAT8_BANDS[:7]
# Surface reflectance per class over BANDS (coastal, blue, green, red, nir, swir1, swir2).
SIGNATURES: dict[str, tuple[float, ...]] = {
    "water": (0.060, 0.055, 0.045, 0.030, 0.015, 0.008, 0.005),
    "forest": (0.020, 0.025, 0.050, 0.030, 0.330, 0.160, 0.070),
    "cropland": (0.040, 0.050, 0.090, 0.080, 0.280, 0.240, 0.140),
    "bare_soil": (0.090, 0.110, 0.160, 0.210, 0.290, 0.360, 0.300),
    "urban": (0.080, 0.090, 0.100, 0.110, 0.150, 0.170, 0.160),
}
CLASS_NAMES: tuple[str, ...] = tuple(SIGNATURES)  # label raster ids 1..5, in this order
SHARES = (0.15, 0.25, 0.25, 0.15, 0.20)  # how often each class is drawn for a region
MIN_REFLECTANCE = 0.001
TILT_DEG = 12.0
PIXEL_M = 30.0
EPSG = 32633


@dataclass
class SceneSummary:
    raster: str
    labels: str
    height: int
    width: int
    bands: list[str] = field(default_factory=lambda: list(BANDS))
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    pixels_by_class: dict[str, int] = field(default_factory=dict)
    unlabelled: int = 0  # valid data, label 0
    fill: int = 0  # outside the footprint: bands 0 (nodata), label 0
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def footprint(height: int, width: int, tilt_deg: float = TILT_DEG) -> np.ndarray:
    """A rectangle tilted by ``tilt_deg``, as large as fits the image: True inside (data)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    t = np.deg2rad(tilt_deg)
    u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    # the largest half-sides a, b with a rotated a x b rectangle inside the image (same aspect)
    c, s = np.cos(t), np.sin(t)
    k = min((width / 2) / (c * width / 2 + s * height / 2), (height / 2) / (s * width / 2 + c * height / 2))
    return (np.abs(u) <= k * width / 2) & (np.abs(v) <= k * height / 2)


def synthetic_scene(
    height: int = 256,
    width: int = 256,
    seed: int = 0,
    region_px: int = 1600,
    noise: float = 0.01,
    region_spread: float = 0.2,
    unlabelled: float = 0.1,
    fill_corners: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(bands, labels)``: uint16 ``(7, H, W)`` Collection 2 values and uint8 ``(H, W)`` class
    ids (1..5 as :data:`CLASS_NAMES`, 0 unlabelled or fill).

    ``region_px``: mean region area in pixels; ``noise``: per-pixel reflectance noise (sd);
    ``region_spread``: relative sd of a region's signature around its class's; ``unlabelled``:
    share of regions without a label.
    """
    # scipy only here: reading rasters (and every command's start) does without it.
    from scipy.ndimage import gaussian_filter
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    n = max(len(CLASS_NAMES), round(height * width / region_px))
    seeds = rng.uniform((0, 0), (height, width), size=(n, 2))
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    amp, sigma = np.sqrt(region_px) / 2, max(height, width) / 12
    warp = [gaussian_filter(rng.normal(size=(height, width)), sigma, mode="wrap") for _ in range(2)]
    warp = [w / (w.std() + 1e-12) * amp for w in warp]
    _, region = cKDTree(seeds).query(np.stack([y + warp[0], x + warp[1]], axis=-1).reshape(-1, 2))
    region = region.reshape(height, width)
    cls = rng.choice(len(CLASS_NAMES), size=n, p=SHARES)
    sig = np.array([SIGNATURES[c] for c in CLASS_NAMES])[cls]  # (regions, bands)
    sig = sig * (1 + region_spread * rng.normal(size=sig.shape))
    refl = sig[region].transpose(2, 0, 1)  # (bands, H, W)
    texture = gaussian_filter(rng.normal(size=(height, width)), 2.0)
    refl = refl * (1 + 0.5 * region_spread * texture / (texture.std() + 1e-12))
    refl = refl + noise * rng.normal(size=refl.shape)
    refl = np.clip(refl, MIN_REFLECTANCE, 1.0)  # Collection 2's valid range starts at 0
    dn = np.rint((refl - C2_OFFSET) / C2_SCALE).astype(np.uint16)
    labels = (cls[region] + 1).astype(np.uint8)
    labels[rng.random(n)[region] < unlabelled] = 0
    if fill_corners:
        outside = ~footprint(height, width)
        dn[:, outside] = 0
        labels[outside] = 0
    return dn, labels


def geotiff_tags(nodata: int | None = None, band_names: tuple[str, ...] = ()) -> list[tuple]:
    """tifffile ``extratags``: pixel scale, tie point, UTM 33N keys, GDAL nodata, band names."""
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, EPSG]  # projected, PixelIsArea, EPSG
    tags: list[tuple] = [
        (33550, "d", 3, (PIXEL_M, PIXEL_M, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4500000.0, 0.0), True),
        (34735, "H", len(keys), tuple(keys), True),
    ]
    if nodata is not None:
        tags.append((GDAL_NODATA_TAG, "s", 0, str(nodata), True))
    if band_names:
        items = "".join(
            f'<Item name="DESCRIPTION" sample="{i}" role="description">{b}</Item>'
            for i, b in enumerate(band_names)
        )
        tags.append((42112, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>", True))
    return tags


def write_scene(out: str, height: int = 256, width: int = 256, seed: int = 0, **kw: Any) -> SceneSummary:
    """``OUT/scene.tif`` (7 bands, band-sequential strips, zlib) and ``OUT/labels.tif``."""
    dn, labels = synthetic_scene(height, width, seed, **kw)
    os.makedirs(out, exist_ok=True)
    raster, label_path = os.path.join(out, "scene.tif"), os.path.join(out, "labels.tif")
    tifffile.imwrite(
        raster,
        dn,
        planarconfig="separate",
        photometric="minisblack",
        compression="zlib",
        rowsperstrip=16,
        extratags=geotiff_tags(nodata=0, band_names=BANDS),
    )
    tifffile.imwrite(
        label_path,
        labels,
        photometric="minisblack",
        compression="zlib",
        rowsperstrip=16,
        extratags=geotiff_tags(),
    )
    fill = int((dn == 0).all(axis=0).sum())
    ids = np.bincount(labels.ravel(), minlength=len(CLASS_NAMES) + 1)
    return SceneSummary(
        raster=raster,
        labels=label_path,
        height=height,
        width=width,
        pixels_by_class={c: int(ids[i + 1]) for i, c in enumerate(CLASS_NAMES)},
        unlabelled=int(ids[0]) - fill,
        fill=fill,
        seed=seed,
    )
