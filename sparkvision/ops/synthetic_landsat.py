"""``datasets synthetic-landsat``: a synthetic Landsat-8-like scene and its label raster (GeoTIFFs)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sparkvision.data.landsat import CLASS_NAMES
from sparkvision.ops.base import Operation, ParamError, Progress, params_model, register
from sparkvision.ops.fields import overwrite, positional
from sparkvision.ops.paths import local_path

SyntheticLandsatParams = params_model(
    "SyntheticLandsatParams",
    "A synthetic Landsat-8-like scene with known land cover: OUT/scene.tif (bands 1-7 as 16-bit Collection 2 "
    f"surface reflectance, fill 0 outside a tilted footprint) and OUT/labels.tif (class ids 1-{len(CLASS_NAMES)}: "
    f"{', '.join(CLASS_NAMES)}; 0 unlabelled), for `ingest-raster` (docs/raster.md).",
    out=positional("Output directory (a local path).", "OUT"),
    height=(int, Field(512, ge=16, le=16384, description="Rows of pixels.")),
    width=(int, Field(512, ge=16, le=16384, description="Columns of pixels.")),
    seed=(int, Field(0, ge=0, description="Same seed, same scene.")),
    noise=(float, Field(0.01, ge=0, le=0.2, description="Per-pixel reflectance noise (sd).")),
    region_px=(int, Field(1600, ge=16, description="Mean area of a land-cover region, in pixels.")),
    region_spread=(
        float,
        Field(
            0.2,
            ge=0,
            le=1,
            description="Relative sd of a region's reflectances around its class's signature.",
        ),
    ),
    unlabelled=(float, Field(0.1, ge=0, le=1, description="Share of regions left unlabelled (label 0).")),
    overwrite=overwrite(),
)


def check(p: Any) -> None:
    if local_path(p.out) is None:
        raise ParamError("out", f"{p.out} is not a local path: the scene is written with tifffile, here")


def run(spark: Any, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.data.landsat import write_scene

    return write_scene(
        local_path(p.out) or p.out,
        p.height,
        p.width,
        p.seed,
        noise=p.noise,
        region_px=p.region_px,
        region_spread=p.region_spread,
        unlabelled=p.unlabelled,
    ).to_json()


# Not a web job kind: like fashion-mnist, a data set for tests, benchmarks and the README's flow.
OPERATION = register(
    Operation(
        "synthetic-landsat",
        SyntheticLandsatParams,
        run,
        "A synthetic Landsat-8-like scene and label raster (GeoTIFFs) with known land cover.",
        outputs=("out",),
        result_key="out",
        module="sparkvision.data.landsat",
        needs_spark=False,
        web=False,
        check=check,
    )
)
