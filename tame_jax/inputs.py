"""Images from users (paths, PIL images, arrays) made into model inputs the way evaluation makes
them, and explanation maps taken back onto the original images. NumPy and PIL only.

The eval pipeline (`tame_jax.data.preprocess`, tf.data) resizes the shorter side to
`resize_size` with TensorFlow's antialiased bilinear filter, then takes the centre
`image_size` crop. `preprocess` computes the same filter weights (TensorFlow's
ScaleAndTranslate with a triangle kernel, scaled when downsampling) and the same crop offsets,
so an image gives the same pixels here as in evaluation (to float32 rounding), without
TensorFlow; only the rows and columns of the crop are computed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UnreadableImageError(ValueError):
    """A file that does not exist or does not decode as an image."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a model input (size x size) was cut from an original image (height x width).

    The original was resized to (resized_height, resized_width) and the crop starts at
    (top, left) of the resized image.
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Returns the crop as (ymin, xmin, ymax, xmax) in the original's pixels."""
        sy, sx = self.height / self.resized_height, self.width / self.resized_width
        return (self.top * sy, self.left * sx, (self.top + self.size) * sy,
                (self.left + self.size) * sx)


def eval_geometry(height: int, width: int, size: int, resize: int) -> Geometry:
    """Returns the geometry of the eval transform: shorter side -> resize, centre size crop."""
    if resize < size:
        raise ValueError(f"resize_size={resize} < image_size={size}: raise resize_size")
    if height <= width:  # as tf: the longer side truncated from float64
        new_h, new_w = resize, int(resize * float(width) / float(height))
    else:
        new_h, new_w = int(resize * float(height) / float(width)), resize
    # the centre offsets rounded half to even, like torchvision's CenterCrop and the pipeline
    return Geometry(height, width, new_h, new_w, round((new_h - size) / 2),
                    round((new_w - size) / 2), size)


def _triangle_spans(in_size: int, out_size: int, first: int, count: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (indices, weights), both (count, span): TensorFlow's antialiased bilinear
    resampling weights of output rows first..first+count-1 from in_size input rows."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0) / scale
    kernel_scale = max(inv_scale, np.float32(1.0))  # widen the kernel when downsampling
    span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
    sample = (np.arange(first, first + count, dtype=np.float32) + np.float32(0.5)) * inv_scale
    start = np.clip(np.ceil(sample - kernel_scale - np.float32(0.5)).astype(np.int64), 0,
                    in_size - 1)
    end = np.clip(np.floor(sample + kernel_scale - np.float32(0.5)).astype(np.int64), 0,
                  in_size - 1) + 1
    idx = start[:, None] + np.arange(span)[None, :]  # (count, span)
    valid = idx < end[:, None]
    pos = idx.astype(np.float32) + np.float32(0.5) - sample[:, None]
    w = np.maximum(np.float32(0.0), np.float32(1.0) - np.abs(pos / kernel_scale)) * valid
    total = w.sum(axis=1, keepdims=True, dtype=np.float32)
    w = np.where(total > 0, w / np.where(total > 0, total, 1), 0).astype(np.float32)
    return np.minimum(idx, in_size - 1), w


def _resample(x: np.ndarray, axis: int, out_size: int, first: int, count: int) -> np.ndarray:
    """Returns output rows first..first+count-1 of x (float32) resized along axis to out_size."""
    idx, w = _triangle_spans(x.shape[axis], out_size, first, count)
    taken = np.take(x, idx, axis=axis)  # axis becomes (count, span)
    shape = [1] * taken.ndim
    shape[axis], shape[axis + 1] = w.shape
    return (taken * w.reshape(shape)).sum(axis=axis + 1, dtype=np.float32)


def preprocess(image: np.ndarray, size: int, resize: int) -> tuple[np.ndarray, Geometry]:
    """Returns (the eval crop (size, size, 3) float32 in [0, 1], its Geometry) of an image
    (h, w, 3) uint8 in [0, 255] or float in [0, 1]."""
    h, w = image.shape[:2]
    g = eval_geometry(h, w, size, resize)
    x = image.astype(np.float32)  # in [0, 255], as the pipeline resizes it
    if image.dtype != np.uint8:
        x = x * np.float32(255.0)
    if (g.resized_height, g.resized_width) == (h, w):  # the pipeline skips an identity resize
        crop = x[g.top:g.top + size, g.left:g.left + size]
    else:
        crop = _resample(x, 0, g.resized_height, g.top, size)
        crop = _resample(crop, 1, g.resized_width, g.left, size)
    return np.ascontiguousarray(crop / np.float32(255.0)), g


def identity_geometry(size: int) -> Geometry:
    """Returns the geometry of an image that already is a model input (size x size)."""
    return Geometry(size, size, size, size, 0, 0, size)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Returns the image file as (h, w, 3) uint8 (as the eval pipeline decodes it: no EXIF
    rotation, alpha dropped); UnreadableImageError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from tame_jax import workdirs

    try:
        if workdirs.is_url(path):
            with workdirs.open_file(path, "rb") as f, Image.open(f) as im:
                return np.asarray(im.convert("RGB"))
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise UnreadableImageError(f"{path}: no such file") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"{path}: not a readable image ({e})") from e


def to_rgb_array(item: Any, what: str = "image") -> np.ndarray:
    """Returns an image as (h, w, 3) uint8, or float32 in [0, 1].

    item: a path, a PIL image, or an array (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) (alpha
    dropped), uint8 in [0, 255] or float in [0, 1]; ValueError for floats outside [0, 1].
    """
    if isinstance(item, str | os.PathLike):
        return read_image(item)
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        return np.asarray(item.convert("RGB"))
    a = np.asarray(item)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} has shape {a.shape}; expected (H, W, 3) (or (H, W), "
                         "(H, W, 1), (H, W, 4)), a PIL image or a path")
    a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what} has dtype {a.dtype}; pass uint8 in [0, 255] or floats in "
                         "[0, 1]")
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi > 1.0 + 1e-6 or lo < -1e-6:
        raise ValueError(
            f"{what} is a float array with values in [{lo:g}, {hi:g}]: float images must be in "
            "[0, 1]. For 0-255 values pass `x.astype(np.uint8)` or `x / 255`.")
    return np.clip(a, 0.0, 1.0)


def map_to_original(maps: np.ndarray, g: Geometry) -> np.ndarray:
    """Returns maps (..., size, size) taken back onto the original image: (..., height, width),
    bilinear, NaN where the original lies outside the crop (the model never saw it)."""
    def coords(n_out: int, n_resized: int, offset: int) -> tuple[np.ndarray, ...]:
        c = (np.arange(n_out) + 0.5) * (n_resized / n_out) - 0.5 - offset  # in crop pixels
        inside = (c >= -0.5) & (c <= g.size - 0.5)
        c = np.clip(c, 0, g.size - 1)
        lo = np.minimum(np.floor(c).astype(np.int64), g.size - 1)
        hi = np.minimum(lo + 1, g.size - 1)
        return lo, hi, (c - lo).astype(np.float32), inside

    y0, y1, fy, iy = coords(g.height, g.resized_height, g.top)
    x0, x1, fx, ix = coords(g.width, g.resized_width, g.left)
    m = np.asarray(maps, np.float32)
    rows = m[..., y0, :] * (1 - fy)[:, None] + m[..., y1, :] * fy[:, None]  # (..., H, size)
    out = rows[..., x0] * (1 - fx) + rows[..., x1] * fx  # (..., H, W)
    return np.where(iy[:, None] & ix[None, :], out, np.nan).astype(np.float32)
