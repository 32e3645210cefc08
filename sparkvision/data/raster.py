"""Multiband GeoTIFF rasters: their headers, band names and row windows, read with tifffile.

A window of rows is read from the strips or tiles that cover it, never the whole raster: each
Spark task of the raster ingest (:mod:`sparkvision.data.raster_ingest`) opens the file itself
(``pyarrow.fs``: local disks, ``s3://``, ``gs://``, ``hdfs://``) and reads only its window, so a
scene larger than any one machine's memory goes in. Pure functions of a file; no Spark here.

Supported: one image (the first page) of 1..N samples per pixel, pixel-interleaved (GDAL's
default) or band-sequential, in strips or tiles, with any compression tifffile decodes (zlib,
deflate and packbits built in; LZW, JPEG and others with ``imagecodecs``). The GeoTIFF keys are
not interpreted: the label raster must be on the same pixel grid (same height and width).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
import tifffile

from sparkvision.spark import storage

# Band names of Landsat 8/9 OLI/TIRS, bands 1..11 (USGS numbering): the default naming of a
# raster's bands in file order, as a Collection 2 stack of bands 1..7 is usually written.
LANDSAT8_BANDS: tuple[str, ...] = (
    "coastal",
    "blue",
    "green",
    "red",
    "nir",
    "swir1",
    "swir2",
    "pan",
    "cirrus",
    "tirs1",
    "tirs2",
)
# Landsat Collection 2 Level-2 surface reflectance: reflectance = DN * 0.0000275 - 0.2 (USGS).
C2_SCALE, C2_OFFSET = 0.0000275, -0.2
GDAL_NODATA_TAG = 42113  # GDAL's nodata value, as ASCII


class RasterError(ValueError):
    """A raster that cannot be read as asked, said in one line."""


@dataclass(frozen=True)
class RasterInfo:
    uri: str
    height: int
    width: int
    bands: int
    dtype: str  # numpy's name of the sample type, e.g. uint16
    nodata: float | None  # GDAL_NODATA, when the file has one
    layout: str  # "strips" or "tiles", then "/contig" or "/separate"

    @property
    def is_integer(self) -> bool:
        return np.dtype(self.dtype).kind in "iu"


@contextmanager
def open_tiff(uri: str) -> Iterator[tifffile.TiffFile]:
    """The TIFF at ``uri`` (a path or any URI ``pyarrow.fs`` opens), header read, pixels not."""
    try:
        fs, path = storage.arrow_fs(uri)
        fh = fs.open_input_file(path)
    except (OSError, ValueError) as e:
        raise RasterError(f"{uri} cannot be opened: {e}") from None
    with fh:
        try:
            tif = tifffile.TiffFile(fh)
        except Exception as e:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError... on non-TIFFs
            raise RasterError(f"{uri} is not a TIFF file: {type(e).__name__}: {e}"[:300]) from None
        with tif:
            yield tif


def page_info(uri: str, tif: tifffile.TiffFile) -> RasterInfo:
    page = cast(tifffile.TiffPage, tif.pages[0])
    planes, depth, height, width, samples = page.shaped
    if depth != 1:
        raise RasterError(f"{uri} is a volume (depth {depth}); a raster has one plane of rows")
    tag = page.tags.get(GDAL_NODATA_TAG)
    nodata = None
    if tag is not None:
        try:
            nodata = float(str(tag.value).strip("\x00 "))
        except ValueError:
            nodata = None  # GDAL writes "nan" or a number; anything else is ignored
    tiled = "tiles" if page.is_tiled else "strips"
    return RasterInfo(
        uri=uri,
        height=int(height),
        width=int(width),
        bands=int(planes * samples),
        dtype=np.dtype(page.dtype).name,
        nodata=nodata,
        layout=f"{tiled}/{'separate' if planes > 1 else 'contig'}",
    )


def raster_info(uri: str) -> RasterInfo:
    """Size, band count, sample type and nodata of the raster at ``uri`` (its header only)."""
    with open_tiff(uri) as tif:
        return page_info(uri, tif)


def segment_rows(page: tifffile.TiffPage) -> tuple[np.ndarray, np.ndarray]:
    """First and last+1 image row of each strip or tile of ``page`` (TIFF's segment order:
    plane by plane, then rows of tiles, then tiles across)."""
    planes, _, height, width, _ = page.shaped
    n = len(page.dataoffsets)
    i = np.arange(n)
    if page.is_tiled:
        tl, tw = page.tilelength, page.tilewidth
        across = math.ceil(width / tw)
        per_plane = math.ceil(height / tl) * across
        start = ((i % per_plane) // across) * tl
        return start, np.minimum(start + tl, height)
    rps = min(page.rowsperstrip or height, height)
    per_plane = math.ceil(height / rps)
    start = (i % per_plane) * rps
    return start, np.minimum(start + rps, height)


def read_rows(tif: tifffile.TiffFile, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of every band, ``(bands, r1 - r0, width)`` in the file's sample type, read
    and decoded from only the strips or tiles that hold them."""
    page = cast(tifffile.TiffPage, tif.pages[0])
    planes, _, height, width, samples = page.shaped
    r0, r1 = max(0, r0), min(height, r1)
    out = np.zeros((planes, max(0, r1 - r0), width, samples), dtype=page.dtype)
    if r1 <= r0:
        return out.transpose(0, 3, 1, 2).reshape(planes * samples, 0, width)
    start, stop = segment_rows(page)
    wanted = np.flatnonzero((start < r1) & (stop > r0))
    decode = page.decode
    fh = tif.filehandle
    for index in wanted.tolist():
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            continue  # an empty segment (sparse file): zeros, as GDAL reads it
        fh.seek(offset)
        seg, (plane, _, row, col, _), _ = decode(fh.read(count), index)
        if seg is None:
            continue
        seg = seg[0]  # (length, width, samples) of this strip or tile; edge tiles are padded
        a, b = max(r0, row), min(r1, row + seg.shape[0], height)
        c1 = min(width, col + seg.shape[1])
        out[plane, a - r0 : b - r0, col:c1] = seg[a - row : b - row, : c1 - col]
    # (planes, rows, width, samples) -> (bands, rows, width): band = plane * samples + sample
    return out.transpose(0, 3, 1, 2).reshape(planes * samples, r1 - r0, width)


def band_names(count: int, names: Sequence[str] | None) -> list[str]:
    """The names of a raster's ``count`` bands in file order: ``names`` as given (one per band),
    else Landsat-8 numbering (band 1 coastal, 2 blue, 3 green, 4 red, 5 nir, ...)."""
    if names:
        names = [n.strip().lower() for n in names]
        if len(names) != count:
            raise RasterError(f"{len(names)} names given ({', '.join(names)}); the raster has {count} bands")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RasterError(f"{', '.join(dup)} named more than once")
        return list(names)
    if count > len(LANDSAT8_BANDS):
        raise RasterError(
            f"the raster has {count} bands, more than Landsat-8's {len(LANDSAT8_BANDS)}: name them"
        )
    return list(LANDSAT8_BANDS[:count])


def reflectance_scaling(info: RasterInfo, scale: float | None, offset: float | None) -> tuple[float, float]:
    """``(scale, offset)`` turning stored values into reflectance: those given, else Landsat
    Collection 2's for integer samples and none (1, 0) for float samples."""
    default = (C2_SCALE, C2_OFFSET) if info.is_integer else (1.0, 0.0)
    return (default[0] if scale is None else scale, default[1] if offset is None else offset)
