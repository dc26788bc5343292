"""The sharded train step: the same function of the global batch on 1 and on 8 devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tame_jax import backbones, optim
from tame_jax.attention import TAMEAttention
from tame_jax.model import Model
from tame_jax.sharding import check_global_batch, make_mesh, replicate, shard_batch
from tame_jax.train_step import distinct_classes, init_state, jit_step, make_per_device_step

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


def _images(i):
    return np.random.default_rng(i).uniform(size=(16, IMAGE, IMAGE, 3)).astype(np.float32)


def _run(devices, steps, variant="tame", selective=True, backbone_mode="frozen",
         labels_of=None, vit=False):
    """Returns (final state, per-step metrics); labels_of(images) gives data labels if set."""
    model, state, tx = _setup(variant, vit)
    mesh = make_mesh(devices)
    per_device = make_per_device_step(tx, selective_fusion=selective, backbone_mode=backbone_mode,
                                      train_labels="data" if labels_of else "model",
                                      mask_space="normalized" if vit else "pixels")
    step = jit_step(chex.assert_max_traces(per_device, n=1), mesh)
    state, model = replicate(state, mesh), replicate(model, mesh)
    history = []
    for i in range(steps):
        images = _images(i)
        batch = {"image": images}
        if labels_of:
            batch["label"] = labels_of(model, images)
        batch = shard_batch(batch, mesh)
        state, metrics = step(state, model, batch["image"], jax.random.key(i), batch.get("label"))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.mark.parametrize("variant,backbone_mode,vit", [
    ("tame", "frozen", False), ("noskip", "frozen", False), ("tame", "train", False),
    ("tame", "frozen", True)])
def test_eight_devices_equal_one_device(variant, backbone_mode, vit):
    """ResNet and ViT (T-TAME: 4x4 token maps, masks on the normalised input).

    backbone_mode "train": the ResNet's BatchNorm takes global-batch statistics, so 8 devices
    of 2 images normalise as one device of 16 (per-device statistics would not: see below).
    """
    assert jax.device_count() >= 8, "conftest.py should fake 8 CPU devices"
    chex.clear_trace_counter()
    one, hist1 = _run(jax.devices()[:1], 2, variant, backbone_mode=backbone_mode, vit=vit)
    chex.clear_trace_counter()
    eight, hist8 = _run(jax.devices()[:8], 2, variant, backbone_mode=backbone_mode, vit=vit)
    for m1, m8 in zip(hist1, hist8, strict=True):
        chex.assert_trees_all_close(m1, m8, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.params, eight.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.batch_stats, eight.batch_stats, rtol=1e-5, atol=1e-6)
    # The step actually moved the parameters (the comparison is not between two no-ops).
    _, init, _ = _setup(variant, vit)
    delta = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), one.params,
                                   init.params)
    assert max(jax.tree_util.tree_leaves(delta)) > 1e-6
    if backbone_mode == "train":
        _check_train_mode(one)


def _check_train_mode(default_state):
    """Batch statistics are global, and the step's labels are the frozen pass's argmax."""
    model, _, _ = _setup()
    x = jnp.asarray(_images(0))
    frozen = np.asarray(model.classify(x))
    train = np.asarray(model.classify(x, mode="train"))
    assert np.abs(train - frozen).max() > 1e-2  # batch statistics change the logits
    mesh = make_mesh(jax.devices()[:8])
    local = jax.jit(jax.shard_map(lambda m, xs: m.classify(xs, mode="train"), mesh=mesh,
                                  in_specs=(P(), P("batch")), out_specs=P("batch")))(
        replicate(model, mesh), x)
    assert np.abs(np.asarray(local) - train).max() > 1e-3  # per-device statistics differ
    # Labels from the training-mode pass would differ from the frozen ones on this batch, so a
    # step that took them would not equal the step given the frozen labels as data labels.
    assert (frozen.argmax(-1) != train.argmax(-1)).any()
    chex.clear_trace_counter()
    same, _ = _run(jax.devices()[:1], 2, backbone_mode="train",
                   labels_of=lambda m, im: np.asarray(m.classify(jnp.asarray(im))).argmax(-1))
    chex.assert_trees_all_close(default_state.params, same.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("vit", [False, True])
def test_selective_fusion_step_equals_full_fusion_step(vit):
    chex.clear_trace_counter()
    sel, h_sel = _run(jax.devices()[:2], 1, selective=True, vit=vit)
    chex.clear_trace_counter()
    full, h_full = _run(jax.devices()[:2], 1, selective=False, vit=vit)
    chex.assert_trees_all_close(h_sel, h_full, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(sel.params, full.params, rtol=1e-5, atol=1e-6)


def test_selective_fusion_fuses_each_distinct_class_once(monkeypatch):
    """Global batch 16 > K = 10 classes: the fusion computes min(B, K) = 10 columns, not 16."""
    widths = []
    original = Model.class_logits_train

    def recording(self, variables, feats, classes, axis_name):
        widths.append(None if classes is None else classes.shape)
        return original(self, variables, feats, classes, axis_name)

    monkeypatch.setattr(Model, "class_logits_train", recording)
    chex.clear_trace_counter()
    _run(jax.devices()[:2], 1, selective=True)
    assert widths == [(NUM_CLASSES,)]  # traced once, K columns for a batch of 16


@pytest.mark.parametrize("labels,num_classes", [
    ([3, 1, 3, 3, 0, 1, 7, 2, 2, 9, 4, 4, 5, 8, 6, 6], 10),  # B = 16 > K, every class present
    ([5, 5, 2, 5, 2, 5], 10),  # B = 6 <= K, two distinct: padded with labels[0]
    ([2, 2, 2, 2, 2, 2, 2, 2], 3)])  # B > K, one distinct
def test_distinct_classes(labels, num_classes):
    labels = jnp.asarray(labels, jnp.int32)
    classes, column = jax.jit(distinct_classes, static_argnums=1)(labels, num_classes)
    assert classes.shape == (min(labels.shape[0], num_classes),)
    np.testing.assert_array_equal(np.asarray(classes)[np.asarray(column)], np.asarray(labels))
    assert set(np.asarray(classes).tolist()) == set(np.asarray(labels).tolist())
    assert ((0 <= np.asarray(classes)) & (np.asarray(classes) < num_classes)).all()


def test_batch_that_does_not_divide_gives_the_fix():
    mesh = make_mesh(jax.devices()[:8])
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide by the 8 devices.*"
                                         r"multiple of 8 \(e\.g\. 8 or 16\)"):
        check_global_batch(12, mesh)
    assert check_global_batch(32, mesh) == 4
