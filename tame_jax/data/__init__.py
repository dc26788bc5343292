"""Input pipelines (tf.data + tfds). The only package of tame_jax that imports TensorFlow.

API: get_dataset_info, train_iterator, eval_iterator, steps_per_epoch, prepare_synthetic_shapes
(see pipeline.py); the synthetic demo data set lives in synthetic_shapes.py.
"""

import logging

import tensorflow as tf

# TensorFlow must never take (or pre-allocate) an accelerator: JAX owns them.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was initialised before us: say so if it already holds a GPU
    if tf.config.get_visible_devices("GPU"):
        logging.getLogger(__name__).warning(
            "TensorFlow was initialised with GPUs visible before tame_jax.data was imported; "
            "import tame_jax.data first (or set CUDA_VISIBLE_DEVICES for TF) so JAX keeps them."
        )

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
