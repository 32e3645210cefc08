"""Near-duplicate descriptors, computed on the executors: one mirror-invariant unit vector per image.

Mirror invariance is built in because a horizontal flip is the most common edit that a feature
extractor does not undo:

* ``pixels`` (no model needed): the grayscale image at 32x32, centred on its intensity centroid and
  scaled to a fixed content size,
  box-blurred, zero mean and unit norm (:func:`pixel_descriptor`), averaged with its mirror image;
* a model directory: the L2-normalised backbone features of the image plus those of its mirror,
  through the shared inference runtime (:mod:`sparkvision.inference.runtime`).

With verification the same pass also stores a small grayscale thumbnail of each image, which
:mod:`sparkvision.retrieval.scoring` aligns and compares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import ndimage

from sparkvision.data.images import RejectError
from sparkvision.inference.runtime import rebatch, run_model, vectors_column, worker_model
from sparkvision.retrieval.verify import content_frames
from sparkvision.transforms.preprocess import decode_image, preprocess_batch

PIXEL_SIZE = 32
# The content radius (radius of gyration) the pixel descriptor scales every image to, as a share of
# the side: the median of Fashion-MNIST train originals (9.8 px of 32), so those barely move. The
# zoom stays within ZOOM_RANGE: 2.2 undoes a downscale to 45% of the side.
CONTENT_RADIUS = 0.3
ZOOM_RANGE = (0.8, 2.2)
DESCRIPTOR_SCHEMA = (
    "content_id string, path string, height int, width int, descriptor array<float>, thumb binary, "
    "error string"
)


def pixel_descriptor(arr: np.ndarray, blur: int = 5, rescale: bool = False) -> np.ndarray:
    """``(H, W[, 1])`` grayscale -> unit vector, invariant to brightness, contrast, mirroring and
    shifts, and with ``rescale`` to padding as well.

    The image is resampled (bilinear, sub-pixel) so its intensity centroid sits at the centre, which
    undoes translations and most of what a small crop does. With ``rescale`` it is also zoomed so
    its content (:func:`~sparkvision.retrieval.verify.content_frames`) has radius
    :data:`CONTENT_RADIUS` of the side, within :data:`ZOOM_RANGE`: that undoes a downscale-then-pad
    or a letterbox, but makes a whole-frame picture a little less stable under crops (content cut
    at the border shrinks its radius), so it is for proposing candidates that verification then
    checks (``dedup`` uses it with verification only). A ``blur`` x ``blur`` box filter then absorbs
    small rotations, rescaling and noise; the mean is removed and the result is averaged with its
    mirror image and L2-normalised.
    """
    x = np.asarray(arr, np.float32).reshape(arr.shape[0], arr.shape[1])
    w = x - x.min()
    total = w.sum()
    if total > 1e-6:
        ys, xs = np.indices(w.shape)
        cy, cx = (w * ys).sum() / total, (w * xs).sum() / total
        radius = float(content_frames(x[None])[0, 0]) if rescale else 0.0
        zoom = float(np.clip(CONTENT_RADIUS * max(w.shape) / radius, *ZOOM_RANGE)) if radius > 0 else 1.0
        centre = (np.array(w.shape, np.float64) - 1) / 2
        # output pixel o samples the input at (o - centre) / zoom + centroid
        w = ndimage.affine_transform(
            w, np.eye(2) / zoom, offset=np.array([cy, cx]) - centre / zoom, order=1, mode="constant"
        )
    if blur > 1:
        w = ndimage.uniform_filter(w, size=blur, mode="constant")
    w = w + w[:, ::-1]  # mirror-symmetric
    w = w - w.mean()
    norm = np.linalg.norm(w)
    return (w / norm).ravel().astype(np.float32) if norm > 1e-6 else np.zeros(w.size, np.float32)


def gray_thumbnail(data: bytes | None, size: int) -> np.ndarray:
    """Encoded image -> grayscale uint8 ``(size, size)``; raises :class:`RejectError`."""
    return decode_image(data or b"", 1, (size, size))[0]


def descriptor_batches(
    blob_bc: Any, batch_size: int, thumb_size: int | None = None, threads: int = 1, rescale: bool = False
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: (content_id, path, image, height, width) -> DESCRIPTOR_SCHEMA.

    ``blob_bc`` is a broadcast :class:`sparkvision.inference.runtime.ModelBlob`, or None for the
    pixel descriptor. With ``thumb_size`` also the grayscale image at ``thumb_size`` x
    ``thumb_size`` (raw uint8 bytes) for verification. ``threads``: the model's torch threads.
    ``rescale``: the pixel descriptor normalises content size (:func:`pixel_descriptor`).
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fn = pre = None
        if blob_bc is not None:
            fn, pre = worker_model(blob_bc.value, "features", threads)
        for batch in rebatch(batches, batch_size):
            images = batch.column("image").to_pylist()
            errors: list[str | None] = [None] * len(images)
            thumbs: list[bytes | None] = [None] * len(images)
            if fn is None:
                feats = np.zeros((len(images), PIXEL_SIZE * PIXEL_SIZE), np.float32)
                for i, data in enumerate(images):
                    try:
                        arr = gray_thumbnail(data, PIXEL_SIZE)
                        feats[i] = pixel_descriptor(arr, rescale=rescale)
                        if thumb_size == PIXEL_SIZE:
                            thumbs[i] = arr.tobytes()
                    except RejectError as e:
                        errors[i] = str(e)
            else:
                assert pre is not None  # worker_model gives both
                x, errors = preprocess_batch(images, pre)
                f = run_model(fn, x) + run_model(fn, x.flip(-1).contiguous())  # (B, D) + mirror
                f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                feats = f.float().numpy()
            if thumb_size is not None and (fn is not None or thumb_size != PIXEL_SIZE):
                for i, data in enumerate(images):
                    if errors[i] is None:
                        try:
                            thumbs[i] = gray_thumbnail(data, thumb_size).tobytes()
                        except RejectError as e:
                            errors[i] = str(e)
            yield pa.RecordBatch.from_pydict(
                {
                    "content_id": batch.column("content_id"),
                    "path": batch.column("path"),
                    "height": batch.column("height"),
                    "width": batch.column("width"),
                    "descriptor": vectors_column(feats, errors),
                    "thumb": pa.array(thumbs, pa.binary()),
                    "error": pa.array(errors, pa.string()),
                }
            )

    return run
