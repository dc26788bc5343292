"""`synthetic_shapes`: a small, locally generated demo data set for TAME, as a tfds builder.

What an image holds and how it is drawn: `tame_jax/shapes.py` (no TensorFlow there). This
module stores the drawings as tfds splits ("default": 10,000 train / 1,000 test; "tiny": 64 /
40; "-seedN" variants): example `i` of a split is `shapes.draw(seed, split_id, i)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tame_jax.shapes import (  # noqa: F401 - re-exported: the data set's drawing and classes
    CLASS_NAMES,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    NUM_CLASSES,
    TEST_IMAGES,
    TEST_SPLIT,
    TRAIN_IMAGES,
    TRAIN_SPLIT,
    draw,
    render_example,
)


def _png(array: np.ndarray) -> bytes:
    """Returns the PNG encoding of a uint8 (H, W) or (H, W, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Size and seed of a synthetic_shapes variant."""

    num_train: int = 10_000
    num_test: int = 1_000
    seed: int = 0


def make_config(name: str) -> SyntheticShapesConfig:
    """Returns the builder config for "default", "tiny", or either with a "-seedN" suffix."""
    base, _, seed = name.partition("-seed")
    sizes = {"default": (TRAIN_IMAGES, TEST_IMAGES), "tiny": (64, 40)}
    if base not in sizes or (seed and not seed.isdigit()):
        raise ValueError(
            f"Unknown synthetic_shapes config {name!r}: use 'default' (10000 train / 1000 test) "
            "or 'tiny' (64 / 40), optionally with a '-seedN' suffix, e.g. 'default-seed3'."
        )
    n_train, n_test = sizes[base]
    return SyntheticShapesConfig(
        name=name,
        description=f"{n_train} train / {n_test} test images, seed {int(seed or 0)}",
        num_train=n_train,
        num_test=n_test,
        seed=int(seed or 0),
    )


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Shapes on clutter: 10 classes, 128x128 RGB, with object boxes and masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [make_config("default"), make_config("tiny")]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """Returns None: nothing is downloaded, so there is no checksums file to look up.

        (Also sidesteps tfds 4.9.10 importing `importlib_resources`, absent on Python >= 3.9.)
        """
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        """Returns the features: image, label, bbox (normalised), object mask."""
        s = IMAGE_SIZE
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "bbox": tfds.features.BBoxFeature(),
                    "object_mask": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/tame_jax",
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        """Returns the train and test generators."""
        cfg = self.builder_config
        return {
            "train": self._generate_examples(TRAIN_SPLIT, cfg.num_train),
            "test": self._generate_examples(TEST_SPLIT, cfg.num_test),
        }

    def _generate_examples(self, split_id: int, num: int):
        """Yields (key, example) for the examples of one split, rendered on all CPU cores."""
        seed = self.builder_config.seed
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for start in range(0, num, 512):  # bounded chunks keep memory small
                keys = range(start, min(num, start + 512))
                yield from pool.map(lambda i: (i, _encoded_example(seed, split_id, i)), keys)


def _encoded_example(seed: int, split_id: int, index: int) -> dict:
    """Returns the tfds example `index` of a split: PNG image and mask, label, bbox."""
    image, mask, bbox, label = draw(seed, split_id, index)
    return {
        "image": _png(image),
        "label": label,
        "bbox": tfds.features.BBox(*np.clip(bbox / IMAGE_SIZE, 0.0, 1.0).tolist()),
        "object_mask": _png(mask.astype(np.uint8)),  # (H, W) grey PNG, read as (H, W, 1)
    }


def synthetic_builder(data_dir: str, config_name: str = "default",
                      file_format: str | None = None) -> SyntheticShapes:
    """Returns the synthetic_shapes builder for config_name ("default", "tiny", "-seedN")."""
    known = {c.name for c in SyntheticShapes.BUILDER_CONFIGS}
    config = config_name if config_name in known else make_config(config_name)
    return SyntheticShapes(config=config, data_dir=data_dir, file_format=file_format)


def prepare_synthetic_shapes(data_dir: str, *, seed: int = 0, config_name: str = "default") -> None:
    """Builds the demo data set under data_dir once (a no-op when it is already there)."""
    from tame_jax.data.sources import prepared

    name = config_name if seed == 0 else f"{config_name}-seed{seed}"
    prepared(lambda **kw: synthetic_builder(data_dir, name, **kw),
             lambda b: b.download_and_prepare())
