"""T-TAME's recipe options: masking the normalised input, biases at the kernels' learning rate,
and the shipped ViT-B/16 config."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tame_jax import losses, optim
from tame_jax.config import FIELD_DOCS
from tame_jax.image_ops import normalize, resize_bilinear
from tame_jax.train_step import make_per_device_step

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIGS = Path(__file__).parent.parent / "configs"


def test_normalized_mask_space_masks_the_normalised_input():
    """norm(masked) = norm(x) * up(map): a masked pixel becomes the mean colour (T-TAME)."""
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    maps = jax.random.uniform(jax.random.key(1), (2, 4, 4))
    up = resize_bilinear(maps[..., None], (16, 16))  # (2, 16, 16, 1)
    masked = losses.mask_images(x, maps, fill=MEAN)
    np.testing.assert_allclose(normalize(masked, MEAN, STD), normalize(x, MEAN, STD) * up,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.mask_images(x, jnp.zeros((2, 4, 4)), fill=MEAN),
                               jnp.broadcast_to(jnp.asarray(MEAN), x.shape), rtol=1e-6)
    np.testing.assert_array_equal(losses.mask_images(x, maps), x * up)  # TAME: [0, 1] pixels

    seen = {}

    def classify(images):
        seen["images"] = images
        return jnp.zeros((images.shape[0], 3))

    am = jnp.broadcast_to(maps[..., None], (2, 4, 4, 2))  # every image's map for both labels
    losses.tame_objective(x, am, jnp.array([0, 1]), 0, classify, mask_fill=MEAN)
    np.testing.assert_allclose(seen["images"], masked, rtol=1e-6)
    with pytest.raises(ValueError, match=r"loss.mask_space='input'.*pixels.*normalized"):
        make_per_device_step(optax.sgd(1.0), mask_space="input")


def test_bias_lr_factor():
    """First Nesterov step from zero momentum: update = lr (1 + m) g; biases get factor x lr."""
    params = {"conv": {"kernel": jnp.zeros((3,)), "bias": jnp.zeros((3,))}}
    grads = {"conv": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}}
    for factor in (1.0, 2.0):
        tx = optim.make_optimizer(lambda _: 0.1, momentum=0.9, bias_lr_factor=factor)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 1.9, rtol=1e-6)
        np.testing.assert_allclose(updates["conv"]["bias"], -0.1 * 1.9 * factor, rtol=1e-6)


def test_vit_b_16_config_is_ttames_recipe():
    c = runpy.run_path(str(CONFIGS / "vit_b_16.py"))["get_config"]()
    assert c.model.backbone == "vit_b_16"
    assert c.model.layers == tuple(f"encoder.layers.encoder_layer_{i}.ln_1" for i in (9, 10, 11))
    assert (c.learning_rate, c.num_epochs, c.batch_size) == (1e-3, 8, 32)
    assert c.loss.mask_space == "normalized" and c.bias_lr_factor == 1.0
    assert "T-TAME" in FIELD_DOCS["loss.mask_space"] and "T-TAME" in FIELD_DOCS["bias_lr_factor"]


def test_demo_vit_config_is_the_demo_on_a_vit():
    from tame_jax.backbones import get_spec

    c = runpy.run_path(str(CONFIGS / "demo_vit.py"))["get_config"]()
    demo = runpy.run_path(str(CONFIGS / "demo.py"))["get_config"]()
    spec = get_spec(c.model.backbone)
    assert c.model.backbone == "vit_mini_16" and set(c.model.layers) <= set(spec.layer_names)
    assert c.eval.cam_layer == spec.cam_layer and c.model.layers == spec.default_layers
    assert (c.loss.mask_space, c.bias_lr_factor) == ("normalized", 1.0)
    assert c.model.backbone_weights.endswith("demo_vit_mini_16.safetensors")
    assert (c.data.image_size, c.eval.num_examples) == (demo.data.image_size,
                                                        demo.eval.num_examples)


def test_shipped_demo_vit_classifies_the_test_split_as_recorded():
    """Trained on a GPU (its JSON names it), re-scored here on the 1000 stored test images."""
    from tame_jax import shapes
    from tame_jax.model import build_model

    c = runpy.run_path(str(CONFIGS / "demo_vit.py"))["get_config"]()
    record = json.loads(Path(c.model.backbone_weights).with_suffix(".json").read_text())
    assert record["backbone"] == c.model.backbone and record["test_images"] == 1000
    assert record["command"].startswith("python -m tame_jax.tools.train_backbone")
    model = build_model(c)
    classify = jax.jit(lambda m, x: jnp.argmax(m.classify(x), -1))
    correct = sum(int((np.asarray(classify(model, b["image"])) == b["label"]).sum())
                  for b in shapes.test_batches(200))
    # Other hardware may flip a prediction or two on the decision boundary, no more.
    assert abs(correct / 1000 - record["test_accuracy"]) <= 0.005
    assert record["test_accuracy"] >= 0.85
