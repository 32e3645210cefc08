"""The edit families of the near-duplicate benchmark (``bench_dedup.py``): how each planted copy is made.

Sixteen families, each a function of a grayscale PIL image returning the copy's encoded bytes (PNG
unless the edit is the encoding itself). Kept apart from the benchmark so other checks can plant
the same copies.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def border_colour(im: Image.Image) -> int:
    a = np.asarray(im)
    return int(np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])))


def edits(rng: np.random.Generator) -> dict[str, Callable[[Image.Image], bytes]]:
    """Edit families: name -> grayscale image -> encoded copy (PNG unless the edit is the encoding).

    The first seven are the original benchmark's; the rest were added for the leave-one-edit-out
    evaluation (issue 18): compression (JPEG 40 and 25, WEBP), geometry dedup has no special case
    for (downscale-then-pad, crop-and-resize, mirror), a watermark, and tone/detail changes
    (brightness, sharpening).
    """

    def png(f: Callable[[Image.Image], Image.Image]) -> Callable[[Image.Image], bytes]:
        return lambda im: encode(f(im))

    def rotate(im):
        return im.rotate(float(rng.choice([-1, 1]) * rng.uniform(3, 5)), resample=Image.BILINEAR)

    def blur(im):
        return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 0.8))))

    def shift(im):
        dx, dy = [int(v) for v in rng.choice([-1, 1], 2)]
        return im.transform(im.size, Image.AFFINE, (1, 0, dx, 0, 1, dy))

    def contrast(im):
        return ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.7, 0.85)))

    def noise(im):
        a = np.asarray(im, np.float32) + rng.normal(0, 6, (im.height, im.width))
        return Image.fromarray(a.clip(0, 255).astype(np.uint8))

    def rescale(im):
        s = int(rng.integers(18, 23))
        return im.resize((s, s), Image.BILINEAR).resize(im.size, Image.BILINEAR)

    def gamma(im):
        g = float(rng.uniform(0.75, 0.9))
        return Image.fromarray((255 * (np.asarray(im, np.float32) / 255) ** g).astype(np.uint8))

    def downscale_pad(im):
        """Shrink to 50-80% and pad back to the original size with the border colour, anywhere."""
        w, h = im.size
        s = float(rng.uniform(0.5, 0.8))
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("L", im.size, border_colour(im))
        x0, y0 = int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))
        canvas.paste(im.resize((nw, nh), Image.BILINEAR), (x0, y0))
        return canvas

    def crop_resize(im):
        """Cut 2-8% off each side independently and resize back to the original size."""
        w, h = im.size
        c = rng.uniform(0.02, 0.08, 4)
        box = (round(c[0] * w), round(c[1] * h), w - round(c[2] * w), h - round(c[3] * h))
        return im.crop(box).resize(im.size, Image.BILINEAR)

    def watermark(im):
        """Two characters of half-transparent text in a random corner (small: ~1/4 of the width)."""
        w, h = im.size
        layer = Image.new("L", im.size, 0)
        draw = ImageDraw.Draw(layer)
        font = ImageFont.load_default(size=max(6, h // 4))
        text = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ0123456789"), 2))
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        x = 1 if rng.random() < 0.5 else w - (x1 - x0) - 1
        y = 1 if rng.random() < 0.5 else h - (y1 - y0) - 1
        draw.text((x - x0, y - y0), text, fill=255, font=font)
        alpha = np.asarray(layer, np.float32) / 255 * float(rng.uniform(0.35, 0.5))
        a = np.asarray(im, np.float32)
        return Image.fromarray((a * (1 - alpha) + 255 * alpha).round().astype(np.uint8))

    def brightness(im):
        return ImageEnhance.Brightness(im).enhance(float(rng.uniform(1.15, 1.35)))

    def sharpen(im):
        return im.filter(
            ImageFilter.UnsharpMask(
                radius=float(rng.uniform(1, 2)), percent=int(rng.integers(80, 160)), threshold=0
            )
        )

    def flip(im):
        return im.transpose(Image.FLIP_LEFT_RIGHT)

    return {
        "rotate": png(rotate),
        "blur": png(blur),
        "shift": png(shift),
        "contrast": png(contrast),
        "noise": png(noise),
        "rescale": png(rescale),
        "gamma": png(gamma),
        "jpeg40": lambda im: encode(im, "JPEG", quality=40),
        "jpeg25": lambda im: encode(im, "JPEG", quality=25),
        "webp": lambda im: encode(im, "WEBP", quality=int(rng.integers(40, 71))),
        "downscale_pad": png(downscale_pad),
        "crop_resize": png(crop_resize),
        "watermark": png(watermark),
        "brightness": png(brightness),
        "sharpen": png(sharpen),
        "flip": png(flip),
    }
