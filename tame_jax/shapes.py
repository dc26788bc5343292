"""The drawing of `synthetic_shapes`, the demo data set (stored by data/synthetic_shapes.py).

Each 128x128 RGB image holds one object whose *shape* is the class (10 classes), drawn at a
random position, scale (24-56 px), rotation (+-20 degrees) and colour on a cluttered background
(smooth colour noise and a gradient) with distractors that carry no class information
(thin lines, small dots, small irregular blobs). The object is drawn last, so its mask is exactly
the set of pixels it covers, and its box is the tight box of that mask. Colour is drawn
independently of the class, so only the shape tells the classes apart: a classifier has to look
at the object, which makes the data set a quick check that explanation maps land on it.

Generation is deterministic: example `i` of a split comes from `np.random.default_rng((seed,
split_id, i))`, and its label is `i % 10`.

This module needs only NumPy and Pillow (no TensorFlow): `rendered_batches` streams newly drawn
images for training where the stored 10,000 are too few (the demo ViT), and `test_batches`
draws the stored test split exactly (PNG is lossless), so a model can be scored without tfds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import multiprocessing

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
CLASS_NAMES = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "rhombus", "crescent", "heart", "bowtie",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
MIN_SIZE, MAX_SIZE = 24, 56

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres


def _shape_membership(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Returns a bool map of the points (u, v) in [-1, 1]^2 (v points down) inside shape `label`."""
    r = np.sqrt(u * u + v * v)
    au, av = np.abs(u), np.abs(v)
    if label == 0:  # circle
        return r <= 1.0
    if label == 1:  # square
        return np.maximum(au, av) <= 0.8
    if label == 2:  # triangle, apex up: vertices (0, -0.9), (0.95, 0.75), (-0.95, 0.75)
        return (v <= 0.75) & (v >= -0.9 + 1.65 / 0.95 * au)
    if label == 3:  # five-pointed star (polar profile)
        phi = np.arctan2(u, -v)
        return r <= 0.4 + 0.6 * ((1.0 + np.cos(5.0 * phi)) / 2.0) ** 2
    if label == 4:  # plus-shaped cross
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if label == 5:  # ring
        return (r <= 1.0) & (r >= 0.55)
    if label == 6:  # rhombus, taller than wide
        return au / 0.6 + av <= 1.0
    if label == 7:  # crescent: disc minus an offset disc
        return (r <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)
    if label == 8:  # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 with y up, scaled to fit
        x, y = u * 1.25, -v * 1.25 + 0.2
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if label == 9:  # bowtie: two triangles meeting at their tips
        return (au <= 0.9) & (av <= 0.9) & (au >= av)
    raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Returns the (n_out, n_in) matrix of linear interpolation from n_in to n_out samples."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    w = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1.0 - w
    m[np.arange(n_out), lo + 1] = w
    return m


def _background(rng: np.random.Generator) -> np.ndarray:
    """Returns a cluttered smooth background, float32 (H, W, 3) in [0, 255]."""
    k = int(rng.integers(3, 8))
    low = rng.uniform(40.0, 215.0, size=(k, k, 3)).astype(np.float32)
    a = _interp_matrix(IMAGE_SIZE, k)
    img = (a @ low.transpose(2, 0, 1) @ a.T).transpose(1, 2, 0)  # (H, W, 3) smooth colour field
    wy, wx = (rng.normal(size=2) / IMAGE_SIZE).tolist()
    ramp = _YY * wy + _XX * wx
    img += ramp[..., None] * rng.uniform(-40.0, 40.0, size=3).astype(np.float32)
    return img


def _draw_distractors(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Returns img (H, W, 3) uint8 with thin lines, dots and small irregular blobs drawn on it."""
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)

    def colour() -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(0, 256, size=3))

    for _ in range(int(rng.integers(2, 7))):  # thin lines
        draw.line(rng.uniform(0, IMAGE_SIZE, size=4).tolist(), fill=colour(),
                  width=int(rng.integers(1, 3)))  # fmt: skip
    for _ in range(int(rng.integers(5, 20))):  # small dots
        y, x, r = *rng.uniform(0, IMAGE_SIZE, size=2).tolist(), float(rng.uniform(1.0, 3.0))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())
    for _ in range(int(rng.integers(1, 4))):  # irregular blobs, smaller than any object
        y, x = rng.uniform(0, IMAGE_SIZE, size=2).tolist()
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = rng.uniform(2.0, 8.0, size=n)
        draw.polygon(list(zip(x + radii * np.cos(angles), y + radii * np.sin(angles),
                              strict=True)), fill=colour())  # fmt: skip
    return np.asarray(pil)


def render_example(
    rng: np.random.Generator, label: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (image uint8 (H, W, 3), object mask bool (H, W), bbox float32 (4,)) for `label`.

    The bbox is (ymin, xmin, ymax, xmax) in pixel-edge coordinates: the object covers rows
    ymin .. ymax - 1 and columns xmin .. xmax - 1, i.e. it is the tight box of the mask.
    """
    background = np.clip(np.rint(_background(rng)), 0, 255).astype(np.uint8)
    img = _draw_distractors(rng, background).copy()  # (H, W, 3) uint8
    half = float(rng.uniform(MIN_SIZE, MAX_SIZE)) / 2.0
    cy, cx = rng.uniform(half, IMAGE_SIZE - half, size=2).tolist()
    theta = float(np.deg2rad(rng.uniform(-20.0, 20.0)))
    # Shapes lie within radius sqrt(2) * half of the centre: work on that window only.
    reach = int(np.ceil(1.42 * half))
    y0, y1 = max(0, int(cy) - reach), min(IMAGE_SIZE, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(IMAGE_SIZE, int(cx) + reach + 1)
    dy, dx = (_YY[y0:y1, x0:x1] - cy) / half, (_XX[y0:y1, x0:x1] - cx) / half
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    inside = _shape_membership(int(label), u, v)  # (h, w) window of the mask
    window = img[y0:y1, x0:x1]
    # Object colour: random, but far enough from the background under the object to be visible.
    under = window[inside].mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - under).max() >= 80.0:
            break
    shade = 1.0 + 0.15 * (u + v)[..., None]  # a soft gradient across the object
    obj = np.clip(np.rint(colour.astype(np.float32) * shade), 0, 255).astype(np.uint8)
    window[inside] = obj[inside]
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    mask[y0:y1, x0:x1] = inside
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    bbox = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float32)
    return img, mask, bbox




# Split ids of the example seeds (seed, split_id, index): the stored splits and the endless
# stream of newly drawn training images, which never repeats a stored image.
TRAIN_SPLIT, TEST_SPLIT, FRESH_SPLIT = 0, 1, 2
TRAIN_IMAGES, TEST_IMAGES = 10_000, 1_000  # the default config's splits


def draw(seed: int, split_id: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Returns (image, mask, bbox, label) of example `index` of a split (label = index % 10)."""
    label = index % NUM_CLASSES
    image, mask, bbox = render_example(np.random.default_rng((seed, split_id, index)), label)
    return image, mask, bbox, label


def draw_batch(seed: int, split_id: int, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (size, H, W, 3), labels int32) of examples start.. of a split."""
    examples = [draw(seed, split_id, i) for i in range(start, start + size)]
    return (np.stack([e[0] for e in examples]),
            np.array([e[3] for e in examples], np.int32))


def _as_batch(drawn: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    images, labels = drawn
    return {"image": images.astype(np.float32) / 255.0, "label": labels}


def rendered_batches(batch_size: int, *, seed: int = 0, workers: int = 1):
    """Yields endless batches {"image": float32 [0, 1], "label"} of newly drawn training images.

    Batch k holds examples k * batch_size ... of the FRESH_SPLIT stream, drawn by `workers`
    processes a few batches ahead (0: in this process). Spawned, not forked, so that a process
    holding an accelerator is never copied.
    """
    if workers <= 0:
        for k in itertools.count():
            yield _as_batch(draw_batch(seed, FRESH_SPLIT, k * batch_size, batch_size))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        ahead = collections.deque()
        for k in itertools.count():
            while len(ahead) < 2 * workers + 2:
                start = (k + len(ahead)) * batch_size
                ahead.append(pool.submit(draw_batch, seed, FRESH_SPLIT, start, batch_size))
            yield _as_batch(ahead.popleft().result())


def test_batches(batch_size: int, *, seed: int = 0, num: int = TEST_IMAGES):
    """Yields the stored test split of synthetic_shapes (config seed `seed`), drawn again."""
    for start in range(0, num, batch_size):
        yield _as_batch(draw_batch(seed, TEST_SPLIT, start, min(batch_size, num - start)))
