"""Per-example preprocessing: decode, resize the shorter side, crop (random + flip for training,
centre for evaluation), scale to [0, 1]; boxes and masks follow the eval crop."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def decode_rgb(raw: tf.Tensor) -> tf.Tensor:
    """Returns the decoded uint8 (h, w, 3) image; JPEGs with accurate DCT like PIL."""
    return tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(raw, channels=3, expand_animations=False),
    )


def _shorter_side_size(h: tf.Tensor, w: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (new_h, new_w) with the shorter side = size, like torchvision's Resize(size)."""
    h64, w64 = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    new_h = tf.where(h <= w, size, tf.cast(size * h64 / w64, tf.int32))
    new_w = tf.where(h <= w, tf.cast(size * w64 / h64, tf.int32), size)
    return new_h, new_w


def _resize(img: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor, method: str) -> tf.Tensor:
    """Returns img resized to (new_h, new_w) (float32 for bilinear); identity if same size."""
    shape = tf.shape(img)
    same = tf.logical_and(shape[0] == new_h, shape[1] == new_w)
    if method == "nearest":
        return tf.cond(same, lambda: img, lambda: tf.image.resize(img, [new_h, new_w], "nearest"))
    return tf.cond(
        same,
        lambda: tf.cast(img, tf.float32),
        lambda: tf.image.resize(img, [new_h, new_w], method="bilinear", antialias=True),
    )


def make_preprocess(
    config, *, train: bool, seed: int = 0, pi: int = 0, epoch: int = 0, extras: bool = False
) -> Callable[[dict], dict]:
    """Returns the per-example map: decode, resize shorter side, crop (+ flip), scale to [0,1]."""
    size = int(config.data.image_size)
    resize = int(config.data.get("resize_size") or size)
    if resize < size:
        raise ValueError(f"config.data.resize_size={resize} < image_size={size}: raise it.")
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, pi], tf.int64), epoch)

    def preprocess(ex: dict) -> dict:
        raw = tf.io.read_file(ex["path"]) if "path" in ex else ex["raw"]
        img = decode_rgb(raw)  # (h, w, 3) uint8
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        new_h, new_w = _shorter_side_size(h, w, resize)
        img = _resize(img, new_h, new_w, "bilinear")  # (new_h, new_w, 3) float32 in [0, 255]
        out = {"label": ex["label"], "pos": ex["pos"]}
        if train:
            key = tf.random.experimental.stateless_fold_in(base, ex["pos"])
            crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
            img = tf.image.stateless_random_crop(img, [size, size, 3], seed=crop_key)
            img = tf.image.stateless_random_flip_left_right(img, seed=flip_key)
        else:  # centre crop, offsets rounded like torchvision's CenterCrop (half to even)
            top = tf.cast(tf.math.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
            left = tf.cast(tf.math.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
            img = img[top : top + size, left : left + size]
            if extras:
                mask = tf.io.decode_png(ex["mask_raw"], channels=1)  # (h, w, 1) uint8 {0, 1}
                mask = _resize(mask, new_h, new_w, "nearest")[top : top + size, left : left + size]
                out["object_mask"] = tf.reshape(mask > 0, [size, size])
                scale = tf.cast(tf.stack([new_h, new_w, new_h, new_w]), tf.float32)
                shift = tf.cast(tf.stack([top, left, top, left]), tf.float32)
                out["bbox"] = tf.clip_by_value(ex["bbox"] * scale - shift, 0.0, float(size))
        out["image"] = tf.reshape(img, [size, size, 3]) / 255.0
        return out

    return preprocess
