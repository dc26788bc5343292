"""Backbones: shapes, layer names, adaptive pooling, perturbations, train mode, and parity
with torchvision through stored fixtures (no torch needed) or directly (when torch is there)."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax.backbones import (
    BACKBONES,
    adaptive_avg_pool,
    build_backbone,
    get_spec,
    init_backbone,
    perturb_name,
)
from tame_jax.tools.make_parity_fixture import (
    PARITY_CASES,
    parity_inputs,
    parity_state_dict,
    summarise,
)
from tame_jax.weights import load_backbone_weights

FIXTURES = Path(__file__).parent / "fixtures"


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Returns max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_registry_default_layers_and_names():
    assert set(BACKBONES) == {f"resnet{d}" for d in (18, 34, 50, 101, 152)} | {
        f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")} | {
        "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "vit_mini_16",
        "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
        "vit_base_patch32_224", "vit_large_patch16_224"} | {
        f"efficientnet_lite{d}" for d in (0, 1, 2)}
    assert get_spec("resnet50").default_layers == ("layer2", "layer3", "layer4")
    assert get_spec("vgg16").default_layers == ("features.16", "features.23", "features.30")
    assert get_spec("vgg16_bn").default_layers == ("features.23", "features.33", "features.43")
    assert get_spec("vgg11").default_layers == ("features.10", "features.15", "features.20")
    assert get_spec("vgg19").layer_names[-2] == "features.36"  # torchvision: 37 modules
    assert get_spec("vgg19_bn").layer_names[-2] == "features.52"
    names = get_spec("resnet101").layer_names
    assert names[:4] == ("conv1", "bn1", "relu", "maxpool")
    assert "layer3.22" in names and "layer3.23" not in names


def test_wrong_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer5'\]") as e:
        build_backbone("resnet50", layers=["layer4", "layer5"])
    assert "layer4.2" in str(e.value) and "maxpool" in str(e.value)
    with pytest.raises(ValueError, match="features.30") as e:
        build_backbone("vgg16", layers=["features.31"])
    with pytest.raises(ValueError, match="resnet152.*vgg19_bn"):
        get_spec("resnet51")


def test_small_shapes_resnet18_width16_and_vgg11_10_classes():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 128, 128, 3)), jnp.float32)
    model = build_backbone("resnet18", num_classes=10, width=16,
                           layers=["layer4", "layer2", "layer3.1", "maxpool"])
    variables = init_backbone(model, jax.random.key(0), 128)
    assert set(variables) == {"params", "batch_stats"}
    logits, feats = jax.jit(model.apply)(variables, x)
    chex.assert_shape(logits, (2, 10))
    assert set(feats) == {"layer4", "layer2", "layer3.1", "maxpool"}  # jit sorts dict keys
    chex.assert_shape([feats["layer4"], feats["layer2"], feats["layer3.1"], feats["maxpool"]],
                      [(2, 4, 4, 128), (2, 16, 16, 32), (2, 8, 8, 64), (2, 32, 32, 16)])
    assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0
    # VGG-11 (132M parameters): shapes only, abstractly; the parity tests cover its numbers.
    model = build_backbone("vgg11", num_classes=10)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert "batch_stats" not in variables
    logits, feats = jax.eval_shape(model.apply, variables, x)
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32
    chex.assert_shape([feats[n] for n in ("features.10", "features.15", "features.20")],
                      [(2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 512)])
    assert variables["params"]["classifier_0"]["kernel"].shape == (512 * 7 * 7, 4096)


def _hand_adaptive_pool(x: np.ndarray, out: int) -> np.ndarray:
    """Returns torch's adaptive average pooling written as plain loops over the bins."""
    b, h, w, c = x.shape
    y = np.zeros((b, out, out, c))
    for i in range(out):
        for j in range(out):
            h0, h1 = int(np.floor(i * h / out)), int(np.ceil((i + 1) * h / out))
            w0, w1 = int(np.floor(j * w / out)), int(np.ceil((j + 1) * w / out))
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("h,w", [(7, 7), (14, 14), (10, 10), (3, 3), (2, 5), (9, 13), (1, 1)])
def test_adaptive_avg_pool_matches_loops(h, w):
    x = np.random.default_rng(h * 100 + w).standard_normal((2, h, w, 3))
    got = adaptive_avg_pool(jnp.asarray(x, jnp.float32), (7, 7))
    np.testing.assert_allclose(np.asarray(got), _hand_adaptive_pool(x, 7), rtol=1e-5, atol=1e-6)


def test_perturbations_are_additive_and_give_feature_gradients():
    model = build_backbone("resnet18", num_classes=5, width=8, layers=["layer4", "layer2"])
    variables = init_backbone(model, jax.random.key(1), 64)
    assert "perturbations" not in variables
    assert perturb_name("layer4") != perturb_name("layer2") and perturb_name("features.30")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
    # Only layer4 perturbed (layer2 absent from the collection is left alone): the head after
    # layer4 is avgpool + fc, so the change of the logits is linear in the perturbation.
    delta = jnp.asarray(np.random.default_rng(2).standard_normal((2, 2, 2, 64)), jnp.float32)
    apply = jax.jit(lambda p: model.apply({**variables, "perturbations": p}, x))
    logits0, feats0 = jax.jit(model.apply)(variables, x)
    logits1, feats1 = apply({perturb_name("layer4"): delta})
    w_fc = variables["params"]["fc"]["kernel"]  # (64, 5)
    np.testing.assert_allclose(logits1 - logits0, delta.mean(axis=(1, 2)) @ w_fc,
                               rtol=1e-4, atol=1e-5)
    # float32: relative to the magnitudes involved (layer4 values reach ~15 here)
    np.testing.assert_allclose(feats1["layer4"], feats0["layer4"] + delta, rtol=1e-5,
                               atol=1e-6 * float(np.abs(feats0["layer4"]).max()))
    np.testing.assert_allclose(feats1["layer2"], feats0["layer2"], rtol=1e-4, atol=1e-4)
    # Gradient of a class logit w.r.t. the layer4 map is fc's column / (h * w) everywhere.
    zeros = {perturb_name(n): jnp.zeros_like(f) for n, f in feats0.items()}
    grads = jax.jit(jax.grad(lambda p: apply(p)[0][:, 3].sum()))(zeros)
    want = jnp.broadcast_to(w_fc[:, 3] / 4.0, (2, 2, 2, 64))
    np.testing.assert_allclose(grads[perturb_name("layer4")], want, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grads[perturb_name("layer2")]).max()) > 0


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = build_backbone("resnet18", num_classes=3, width=8, dtype=jnp.bfloat16)
    variables = init_backbone(model, jax.random.key(0), 32)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, feats = jax.jit(model.apply)(variables, jnp.ones((2, 32, 32, 3)))
    assert logits.dtype == jnp.float32 and feats["layer4"].dtype == jnp.bfloat16
    model32 = build_backbone("resnet18", num_classes=3, width=8)
    logits32, _ = jax.jit(model32.apply)(variables, jnp.ones((2, 32, 32, 3)))
    assert _rel_err(logits, logits32) < 0.1  # same network, bf16 rounding only


def test_init_scales_follow_torchvision():
    model = build_backbone("resnet18", num_classes=3, width=16)
    variables = init_backbone(model, jax.random.key(4), 32)
    kernel = variables["params"]["layer4_1"]["conv2"]["kernel"]  # (3, 3, 128, 128)
    np.testing.assert_allclose(float(jnp.std(kernel)), np.sqrt(2 / (9 * 128)), rtol=0.03)
    assert float(jnp.abs(variables["params"]["layer4_1"]["conv1"]["kernel"] - kernel).max()) > 0
    bn = variables["batch_stats"]["bn1"]
    np.testing.assert_array_equal(bn["var"], 1.0)
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], 1.0)


def test_train_mode_uses_batch_statistics_and_dropout():
    model = build_backbone("resnet18", num_classes=3, width=8, layers=["conv1", "bn1"])
    variables = init_backbone(model, jax.random.key(2), 32)
    variables["params"]["bn1"]["bias"] = jnp.linspace(-1, 1, 8)
    variables["params"]["bn1"]["scale"] = jnp.linspace(0.5, 2, 8)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 32, 3)) * 3 + 1,
                    jnp.float32)
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    (_, feats), updates = train_apply(variables, x)
    # Batch statistics: after bn1 each channel has batch mean = bias and batch std = scale.
    bn1 = variables["params"]["bn1"]
    np.testing.assert_allclose(feats["bn1"].mean(axis=(0, 1, 2)), bn1["bias"], atol=1e-4)
    np.testing.assert_allclose(feats["bn1"].std(axis=(0, 1, 2)), bn1["scale"], rtol=1e-3)
    # PyTorch momentum 0.1: the running mean (0 at init) moves 10% towards the batch mean.
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"],
                               0.1 * feats["conv1"].mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    _, feats_eval = jax.jit(model.apply)(variables, x)  # stored statistics (mean 0, var 1)
    np.testing.assert_allclose(feats_eval["bn1"], feats_eval["conv1"] / np.sqrt(1 + 1e-5)
                               * bn1["scale"] + bn1["bias"], rtol=1e-5, atol=1e-5)

    # VGG dropout (p=0.5) only in train mode; constant weights keep this cheap to set up.
    vgg = build_backbone("vgg11", num_classes=4, layers=["features.0"])
    shapes = jax.eval_shape(lambda: vgg.init(jax.random.key(0), x[:2], train=False))
    v = jax.tree.map(lambda s: np.full(s.shape, 1e-2, np.float32), shapes)
    apply = jax.jit(lambda v, key, train: vgg.apply(v, x[:2], train=train,
                                                     rngs={"dropout": key}), static_argnums=2)
    np.testing.assert_array_equal(apply(v, jax.random.key(0), False)[0],
                                  apply(v, jax.random.key(1), False)[0])
    assert not np.allclose(apply(v, jax.random.key(0), True)[0],
                           apply(v, jax.random.key(1), True)[0])


def _load_parity_variables(arch: str, tmp_path: Path, fmt: str, layers) -> tuple:
    """Returns (module, variables) with the parity weights loaded through the public loader."""
    state = parity_state_dict(arch)
    path = tmp_path / f"{arch}.{fmt}"
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        if arch.startswith("vgg") and not arch.endswith("_bn"):  # timm naming (vgg16.tv_in1k)
            state = _to_timm_vgg(state)
        save_file(state, str(path))
    else:
        np.savez(path, **state)
    del state
    model = build_backbone(arch, layers=layers)
    template = jax.eval_shape(lambda: init_backbone(model, jax.random.key(0), 32))
    return model, load_backbone_weights(arch, path, template)


def _to_timm_vgg(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns a torchvision VGG state dict renamed to timm's layout (written from timm's docs)."""
    out = {}
    for key, value in state.items():
        if key.startswith("classifier.0."):
            key = "pre_logits.fc1." + key.split(".")[-1]
            value = value.reshape(4096, 512, 7, 7) if value.ndim == 2 else value
        elif key.startswith("classifier.3."):
            key = "pre_logits.fc2." + key.split(".")[-1]
            value = value.reshape(4096, 4096, 1, 1) if value.ndim == 2 else value
        elif key.startswith("classifier.6."):
            key = "head.fc." + key.split(".")[-1]
        out[key] = value
    return out


# resnet50 / vgg16: safetensors (vgg16 in timm naming); resnet18 / vgg16_bn: npz.
@pytest.mark.parametrize("arch,fmt", [("resnet50", "safetensors"), ("resnet18", "npz"),
                                      ("vgg16", "safetensors"), ("vgg16_bn", "npz")])
def test_parity_with_torchvision_fixture(arch, fmt, tmp_path):
    size, layers = PARITY_CASES[arch]
    fixture = np.load(FIXTURES / f"parity_{arch}.npz")
    assert int(fixture["size"]) == size and tuple(fixture["layers"]) == layers
    model, variables = _load_parity_variables(arch, tmp_path, fmt, layers)
    logits, feats = jax.jit(model.apply)(variables, parity_inputs(size))
    assert _rel_err(logits, fixture["logits"]) < 1e-4
    assert float(np.abs(fixture["logits"]).mean()) > 0.1  # a real signal, not ~0
    for name in layers:
        for stat, value in summarise(np.asarray(feats[name])).items():
            assert _rel_err(value, fixture[f"{name}/{stat}"]) < 1e-4, (name, stat)


@pytest.mark.parametrize("arch,size", [("resnet34", 64)])
def test_parity_direct_with_torchvision_default_init(arch, size, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from tame_jax.tools.make_parity_fixture import torchvision_forward

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pth")
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    layers = get_spec(arch).default_layers + ("relu" if arch.startswith("resnet")
                                              else "features.2",)
    x = parity_inputs(size, seed=5)
    want_logits, want_feats = torchvision_forward(arch, state, x, layers)
    model = build_backbone(arch, num_classes=10, layers=layers)
    template = jax.eval_shape(lambda: init_backbone(model, jax.random.key(0), 32))
    variables = load_backbone_weights(arch, tmp_path / "w.pth", template)
    logits, feats = jax.jit(model.apply)(variables, x)
    assert _rel_err(logits, want_logits) < 1e-4
    for name in layers:
        assert _rel_err(feats[name], want_feats[name]) < 1e-4, name
