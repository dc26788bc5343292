"""Mixed precision: model.dtype="bfloat16" computes in bf16, keeps params, loss and maps in f32."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import optim
from tame_jax.config import default_config
from tame_jax.model import Model, build_model
from tame_jax.sharding import make_mesh, replicate, shard_batch
from tame_jax.train_step import TrainState, make_train_step

IMAGE = 64


@pytest.fixture(scope="module", params=["resnet18", "vit"])
def models(request):
    """Returns (bf16 model from the config, the same model and weights computing in f32):
    a ResNet-18 at width 16, or a small ViT (8x8 token maps, T-TAME's ln_1 taps)."""
    config = default_config()
    if request.param == "vit":
        config.model.backbone = "vit_mini_16"
        config.model.backbone_kwargs = {"patch_size": 8}
        config.model.layers = tuple(f"encoder.layers.encoder_layer_{i}.ln_1" for i in (1, 2, 3))
    else:
        config.model.backbone = "resnet18"
        config.model.backbone_kwargs.width = 16
    config.model.num_classes = 20
    config.model.backbone_weights = "random"
    config.model.dtype = "bfloat16"
    config.data.image_size = IMAGE
    bf16 = build_model(config)
    if request.param == "vit":  # torchvision inits the head to 0: give the classes a say
        head = bf16.backbone_vars["params"]["heads"]["head"]
        head["kernel"] = jax.random.normal(jax.random.key(7), head["kernel"].shape)
    f32 = bf16.replace(backbone=bf16.backbone.clone(dtype=jnp.float32),
                       attention=bf16.attention.clone(dtype=jnp.float32))
    return bf16, f32


def _f32_leaves(tree) -> bool:
    """Returns whether every floating-point leaf of tree is float32 (int counters are ignored)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(leaves) and all(x.dtype == jnp.float32 for x in leaves)


def test_config_dtype_reaches_backbone_and_attention(models):
    bf16, _ = models
    assert bf16.backbone.dtype == jnp.bfloat16 and bf16.attention.dtype == jnp.bfloat16
    assert _f32_leaves(bf16.backbone_vars)  # parameters and BN statistics stay f32
    images = jnp.full((1, IMAGE, IMAGE, 3), 0.5)
    logits, feats = bf16.features(images)
    assert logits.dtype == jnp.float32  # logits (hence softmax and CE) in f32
    assert all(f.dtype == jnp.bfloat16 for f in feats)  # the convolutions ran in bf16


def test_bf16_maps_correlate_with_f32_maps(models):
    bf16, f32 = models
    avars = f32.init_attention(jax.random.key(1))
    assert _f32_leaves(avars)
    images = jax.random.uniform(jax.random.key(2), (4, IMAGE, IMAGE, 3))
    explain = jax.jit(Model.explain)
    maps32, classes, _ = explain(f32, avars, images)
    maps16, _, logits16 = explain(bf16, avars, images, classes)  # same classes
    assert maps16.dtype == jnp.float32 and logits16.dtype == jnp.float32
    chex.assert_shape(maps16, (4, IMAGE, IMAGE))
    a = np.asarray(maps32).reshape(4, -1)
    b = np.asarray(maps16).reshape(4, -1)
    assert a.std(axis=1).min() > 1e-3  # the maps are not flat (the correlation means something)
    corr = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]
    assert min(corr) >= 0.99, corr
    assert np.abs(a - b).max() > 0  # and bf16 really changed the arithmetic


def test_bf16_train_step_keeps_f32_state_and_follows_f32_gradient(models):
    bf16, f32 = models
    mesh = make_mesh(jax.devices()[:1])
    tx = optim.make_optimizer(1e-2, 10)
    avars = f32.init_attention(jax.random.key(1))
    images = np.random.default_rng(0).uniform(size=(4, IMAGE, IMAGE, 3)).astype(np.float32)
    images = shard_batch({"image": images}, mesh)["image"]
    out = {}
    for name, model in (("bf16", bf16), ("f32", f32)):
        step = make_train_step(mesh, tx)
        state = replicate(TrainState.create(jax.tree.map(jnp.copy, avars), tx), mesh)
        out[name] = step(state, replicate(model, mesh), images, jax.random.key(3))
    state16, metrics16 = out["bf16"]
    state32, metrics32 = out["f32"]
    assert _f32_leaves(state16.params) and _f32_leaves(state16.opt_state)
    assert _f32_leaves(state16.batch_stats)
    assert metrics16["loss"].dtype == jnp.float32 and np.isfinite(metrics16["loss"])
    np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=2e-2)
    # The bf16 update points the same way as the f32 one (cosine similarity of the updates).
    flat = lambda s: np.concatenate([np.ravel(u - p) for u, p in zip(
        jax.tree_util.tree_leaves(s.params), jax.tree_util.tree_leaves(avars["params"]),
        strict=True)])
    d16, d32 = flat(state16), flat(state32)
    assert np.linalg.norm(d32) > 0
    assert d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)) > 0.95
