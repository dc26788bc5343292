"""The embedded demo: TAME on a narrow ResNet-18 that classifies synthetic_shapes (10 classes).

Needs no download: the data set is generated locally (once, into data.data_dir) and the
backbone weights ship with the package (made by `python -m tame_jax.tools.train_backbone`).
"""

import os
from importlib import resources

from tame_jax.config import default_config

SHAPES = ("circle", "square", "triangle", "star", "cross",
          "ring", "rhombus", "crescent", "heart", "bowtie")


def get_config():
    """Returns the demo config."""
    c = default_config()
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {"width": 16}
    c.model.num_classes = 10
    c.model.class_names = SHAPES
    c.model.layers = ("layer2", "layer3", "layer4")  # 16x16, 8x8, 4x4 at 128 px
    c.model.backbone_weights = str(
        resources.files("tame_jax") / "assets" / "demo_resnet18_w16.safetensors")
    c.data.source = "synthetic_shapes"
    c.data.data_dir = os.path.expanduser("~/tensorflow_datasets")
    c.data.synthetic_config = "default"
    c.data.image_size = 128
    c.data.resize_size = 128
    c.data.eval_split = "test"
    c.batch_size = 32
    c.num_epochs = 2  # 624 steps; after 1 epoch TAME's maps were still noisy (IC(100%) 15.6)
    c.learning_rate = 1e-3
    c.log_every = 50
    c.checkpoint_every = 200
    # Sized to keep the whole demo under 10 minutes on 2 CPU cores (README, "The demo"):
    # TAME, Grad-CAM and Grad-CAM++ on the first 512 test images; Score-CAM, Ablation-CAM and
    # RISE, a forward pass per channel or mask, on the first 64 (their paired comparisons with
    # TAME use those 64). ROAD's imputation (one linear solve per level and image, ~40 ms of
    # CPU here) dominates the metrics' cost, so ROAD runs at its two most telling levels, MoRF
    # 10% and LeRF 90% (the full protocol has 7 per order). Insertion/deletion change 1024
    # pixels per step, 16 steps (RISE's step at this size, one row of 128, makes 128 steps).
    c.eval.batch_size = 64
    c.eval.num_examples = 512
    c.eval.num_examples_slow = 64
    c.eval.road_fractions = (0.1,)
    c.eval.road_lerf_fractions = (0.9,)
    c.eval.insertion_step = 1024
    c.eval.rise_masks = 500
    return c
