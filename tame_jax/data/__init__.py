"""Input pipelines (tf.data + tfds). The only package of tame_jax that imports TensorFlow."""

import tensorflow as tf

# TensorFlow must never take (or pre-allocate) an accelerator: JAX owns them.
tf.config.set_visible_devices([], "GPU")

from tame_jax.data.pipeline import (  # noqa: E402
    BAD_IMAGES,
    BadImageError,
    BadImageLog,
    DataIterator,
    DatasetInfo,
    eval_iterator,
    get_dataset_info,
    prepare_synthetic_shapes,
    steps_per_epoch,
    train_iterator,
)

__all__ = [
    "BAD_IMAGES",
    "BadImageError",
    "BadImageLog",
    "DataIterator",
    "DatasetInfo",
    "eval_iterator",
    "get_dataset_info",
    "prepare_synthetic_shapes",
    "steps_per_epoch",
    "train_iterator",
]
