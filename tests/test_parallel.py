"""The sharded train step: the same function of the global batch on 1 and on 8 devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import backbones, optim
from tame_jax.attention import TAMEAttention
from tame_jax.model import Model
from tame_jax.sharding import check_global_batch, make_mesh, replicate, shard_batch
from tame_jax.train_step import init_state, jit_step, make_per_device_step

IMAGE = 32
NUM_CLASSES = 10
LAYERS = ("layer2", "layer3", "layer4")
# A small ViT (patch 8: 4x4 token maps, 3 blocks of width 32) with T-TAME's taps and recipe.
VIT_LAYERS = tuple(f"encoder.layers.encoder_layer_{i}.ln_1" for i in range(3))
VIT = {"patch_size": 8, "num_layers": 3, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def _setup(variant="tame", vit=False):
    if vit:
        backbone = backbones.build_backbone("vit_b_16", num_classes=NUM_CLASSES,
                                            layers=VIT_LAYERS, **VIT)
        variables = backbones.init_backbone(backbone, jax.random.key(0), IMAGE)
        head = variables["params"]["heads"]["head"]  # torchvision inits it to 0: give it classes
        head["kernel"] = jax.random.normal(jax.random.key(2), head["kernel"].shape)
    else:
        backbone = backbones.build_backbone("resnet18", num_classes=NUM_CLASSES, layers=LAYERS,
                                            width=8)
        variables = backbones.init_backbone(backbone, jax.random.key(0), IMAGE)
    model = Model(backbone_vars=variables, backbone=backbone,
                  layers=VIT_LAYERS if vit else LAYERS, image_size=IMAGE,
                  attention=TAMEAttention(num_classes=NUM_CLASSES, variant=variant))
    tx = optim.make_optimizer(1e-2, 20, bias_lr_factor=1.0 if vit else 2.0)
    return model, init_state(model, tx, jax.random.key(1)), tx


def _run(devices, steps, variant="tame", selective=True, vit=False):
    model, state, tx = _setup(variant, vit)
    mesh = make_mesh(devices)
    per_device = make_per_device_step(tx, selective_fusion=selective,
                                      mask_space="normalized" if vit else "pixels")
    step = jit_step(chex.assert_max_traces(per_device, n=1), mesh)
    state, model = replicate(state, mesh), replicate(model, mesh)
    rng = np.random.default_rng(0)
    history = []
    for i in range(steps):
        images = rng.uniform(size=(16, IMAGE, IMAGE, 3)).astype(np.float32)
        batch = shard_batch({"image": images}, mesh)
        state, metrics = step(state, model, batch["image"], jax.random.key(i))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.mark.parametrize("variant,vit", [("tame", False), ("noskip", False), ("tame", True)])
def test_eight_devices_equal_one_device(variant, vit):
    """ResNet and ViT (T-TAME: 4x4 token maps, masks on the normalised input)."""
    assert jax.device_count() >= 8, "conftest.py should fake 8 CPU devices"
    chex.clear_trace_counter()
    one, hist1 = _run(jax.devices()[:1], 2, variant, vit=vit)
    chex.clear_trace_counter()
    eight, hist8 = _run(jax.devices()[:8], 2, variant, vit=vit)
    for m1, m8 in zip(hist1, hist8, strict=True):
        chex.assert_trees_all_close(m1, m8, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.params, eight.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.batch_stats, eight.batch_stats, rtol=1e-5, atol=1e-6)
    # The step actually moved the parameters (the comparison is not between two no-ops).
    _, init, _ = _setup(variant, vit)
    delta = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), one.params,
                                   init.params)
    assert max(jax.tree_util.tree_leaves(delta)) > 1e-6


@pytest.mark.parametrize("vit", [False, True])
def test_selective_fusion_step_equals_full_fusion_step(vit):
    chex.clear_trace_counter()
    sel, h_sel = _run(jax.devices()[:2], 1, selective=True, vit=vit)
    chex.clear_trace_counter()
    full, h_full = _run(jax.devices()[:2], 1, selective=False, vit=vit)
    chex.assert_trees_all_close(h_sel, h_full, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(sel.params, full.params, rtol=1e-5, atol=1e-6)


def test_batch_that_does_not_divide_gives_the_fix():
    mesh = make_mesh(jax.devices()[:8])
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide by the 8 devices.*"
                                         r"multiple of 8 \(e\.g\. 8 or 16\)"):
        check_global_batch(12, mesh)
    assert check_global_batch(32, mesh) == 4
