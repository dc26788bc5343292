"""Vision transformers: registry, token maps, bad input, parity with torchvision (stored fixture,
no torch) and, where torch is installed, with torchvision, timm and pytorch-grad-cam directly."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import cams
from tame_jax.backbones import build_backbone, get_spec, init_backbone, perturb_name, vit
from tame_jax.model import Model
from tame_jax.tools.make_parity_fixture import (
    PARITY_CASES,
    parity_inputs,
    parity_state_dict,
    summarise,
)
from tame_jax.weights import load_backbone_weights

FIXTURES = Path(__file__).parent / "fixtures"
BLOCK = "encoder.layers.encoder_layer_{}"
# A small ViT for the direct comparisons: 32 px, patch 8 (4x4 grid), 3 blocks, width 32.
SMALL = {"patch_size": 8, "num_layers": 3, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def _rel_err(got, want) -> float:
    """Returns max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _small(layers, arch="vit_b_16", num_classes=10, **kw):
    """Returns (module, random variables at 32 px) of the small ViT with a random head."""
    module = build_backbone(arch, num_classes=num_classes, layers=layers, **{**SMALL, **kw})
    variables = init_backbone(module, jax.random.key(0), 32)
    head = variables["params"]["heads"]["head"]
    head["kernel"] = jax.random.normal(jax.random.key(1), head["kernel"].shape) * 0.3
    return module, variables


# ----------------------------------------------------------------------------- torch-free


def test_registry_layers_and_normalisation():
    spec = get_spec("vit_b_16")
    assert spec.default_layers == tuple(f"{BLOCK.format(i)}.ln_1" for i in (9, 10, 11))
    assert spec.cam_layer == f"{BLOCK.format(11)}.ln_1"
    assert spec.layer_names[:5] == ("conv_proj", f"{BLOCK.format(0)}.ln_1",
                                    f"{BLOCK.format(0)}.ln", f"{BLOCK.format(0)}.ln_2",
                                    BLOCK.format(0))
    assert spec.layer_names[-1] == "encoder.ln" and len(spec.layer_names) == 2 + 12 * 4
    assert get_spec("vit_l_16").default_layers[-1] == f"{BLOCK.format(23)}.ln_1"
    assert get_spec("vit_h_14").cam_layer == f"{BLOCK.format(31)}.ln_1"
    for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"):
        assert get_spec(name).mean == (0.485, 0.456, 0.406)  # torchvision: ImageNet statistics
    for name in vit.TIMM_ARCHS:
        assert get_spec(name).mean == get_spec(name).std == (0.5, 0.5, 0.5)
    # ViT-L/16 at 224: shapes only (304M parameters), computed abstractly.
    module = build_backbone("vit_l_16", layers=get_spec("vit_l_16").default_layers)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    logits, feats = jax.eval_shape(module.apply, variables, x)
    chex.assert_shape(logits, (1, 1000))
    chex.assert_shape(list(feats.values()), [(1, 14, 14, 1024)] * 3)
    assert variables["params"]["encoder"]["pos_embedding"].shape == (1, 197, 1024)


def test_parity_with_torchvision_fixture_and_timm_naming(tmp_path):
    """ViT-B/16 (random weights, 64 px) equals torchvision's logits and token maps to 1e-4;
    the same tensors under timm's names load into the timm-named backbone."""
    size, layers = PARITY_CASES["vit_b_16"]
    fixture = np.load(FIXTURES / "parity_vit_b_16.npz")
    assert int(fixture["size"]) == size and tuple(fixture["layers"]) == layers
    state = parity_state_dict("vit_b_16")
    np.savez(tmp_path / "vit.npz", **state)
    module = build_backbone("vit_b_16", num_classes=10, layers=layers)
    template = jax.eval_shape(lambda: init_backbone(module, jax.random.key(0), size))
    variables = load_backbone_weights("vit_b_16", tmp_path / "vit.npz", template)
    logits, feats = jax.jit(module.apply)(variables, parity_inputs(size))
    assert _rel_err(logits, fixture["logits"]) < 1e-4
    assert float(np.abs(fixture["logits"]).mean()) > 0.1
    for name in layers:
        chex.assert_shape(feats[name], (2, 4, 4, 768))
        for stat, value in summarise(np.asarray(feats[name])).items():
            assert _rel_err(value, fixture[f"{name}/{stat}"]) < 1e-4, (name, stat)

    timm_state = _to_timm(state)
    del state
    timm_module = build_backbone("vit_base_patch16_224", num_classes=10, layers=layers[-1:])
    timm_vars = get_spec("vit_base_patch16_224").convert(timm_state, template)
    chex.assert_trees_all_equal(timm_vars, variables)
    with pytest.warns(UserWarning, match="mean = std = 0.5"):
        get_spec("vit_b_16").convert(timm_state, template)
    assert timm_module.apply(timm_vars, parity_inputs(size))[0].shape == (2, 10)


def _to_timm(state: dict) -> dict:
    """Returns a torchvision ViT state dict under timm's names (written from timm's layout)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key == "class_token":
            key = "cls_token"
        elif key == "encoder.pos_embedding":
            key = "pos_embed"
        elif parts[0] == "conv_proj":
            key = "patch_embed.proj." + parts[-1]
        elif parts[:2] == ["encoder", "ln"]:
            key = "norm." + parts[-1]
        elif parts[0] == "heads":
            key = "head." + parts[-1]
        else:  # encoder.layers.encoder_layer_N.<module>...
            n = parts[2].rsplit("_", 1)[1]
            rest = ".".join(parts[3:])
            rest = {"ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
                    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
                    "self_attention.in_proj_weight": "attn.qkv.weight",
                    "self_attention.in_proj_bias": "attn.qkv.bias",
                    "self_attention.out_proj.weight": "attn.proj.weight",
                    "self_attention.out_proj.bias": "attn.proj.bias",
                    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
                    "mlp.3.weight": "mlp.fc2.weight", "mlp.3.bias": "mlp.fc2.bias"}[rest]
            key = f"blocks.{n}.{rest}"
        out[key] = value
    return out


def test_token_maps_drop_the_class_token_and_aliases_share_the_map():
    ln1, alias = f"{BLOCK.format(2)}.ln_1", f"{BLOCK.format(2)}.ln"
    layers = ("conv_proj", ln1, alias, BLOCK.format(2), "encoder.ln")
    module, variables = _small(layers)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    apply = jax.jit(lambda p: module.apply({**variables, "perturbations": p}, x))
    logits, feats = jax.jit(module.apply)(variables, x)
    assert {k: v.shape for k, v in feats.items()} == {k: (2, 4, 4, 32) for k in layers}
    np.testing.assert_array_equal(feats[ln1], feats[alias])
    # LayerNorm maps: every token has mean bias and (scale 1) unit variance
    np.testing.assert_allclose(np.asarray(feats[ln1]).mean(-1), 0.0, atol=1e-5)
    # The final norm's map is the patch tokens only: the head reads the class token alone,
    # so perturbing that map leaves the logits unchanged; perturbing the last block's ln_1 does not.
    zeros = {perturb_name(n): jnp.zeros_like(f) for n, f in feats.items()}
    bump = lambda n: {**zeros, perturb_name(n): jnp.ones_like(feats[n])}
    np.testing.assert_allclose(apply(bump("encoder.ln"))[0], logits, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(apply(bump(ln1))[0] - logits).max()) > 1e-3
    # The perturbed map is what is returned and what the next layer sees (a random bump: the
    # final LayerNorm would cancel a constant one)
    delta = jax.random.normal(jax.random.key(4), feats[BLOCK.format(2)].shape)
    out = apply({**zeros, perturb_name(BLOCK.format(2)): delta})[1]
    scale = float(jnp.abs(feats[BLOCK.format(2)]).max())  # float32: relative to the magnitudes
    np.testing.assert_allclose(out[BLOCK.format(2)], feats[BLOCK.format(2)] + delta, rtol=1e-5,
                               atol=1e-6 * scale)
    assert float(jnp.abs(out["encoder.ln"] - feats["encoder.ln"]).max()) > 1e-3


def test_bad_names_and_image_sizes_give_the_fix():
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer4'\]") as e:
        build_backbone("vit_b_16", layers=["layer4"])
    assert f"{BLOCK.format(11)}.ln_2" in str(e.value) and "encoder.ln" in str(e.value)
    with pytest.raises(ValueError, match="encoder_layer_12"):
        build_backbone("vit_b_16", layers=[f"{BLOCK.format(12)}.ln_1"])
    module, variables = _small((f"{BLOCK.format(1)}.ln_1",))
    with pytest.raises(ValueError, match=r"32x40.*square"):
        module.apply(variables, jnp.zeros((1, 32, 40, 3)))
    with pytest.raises(ValueError, match=r"36 is not a multiple of the patch size 8.*32 or 40"):
        module.apply(variables, jnp.zeros((1, 36, 36, 3)))
    with pytest.raises(ValueError, match=r"4x4 patch grid \(image size 32\).*6x6 \(image size "
                                         r"48\).*init_backbone\(module, rng, 48\)"):
        module.apply(variables, jnp.zeros((1, 48, 48, 3)))


def test_position_embeddings_resize_and_init_scales():
    pos = np.random.default_rng(0).standard_normal((1, 17, 5)).astype(np.float32)
    np.testing.assert_array_equal(vit.resize_pos_embedding(pos, 17), pos)
    out = vit.resize_pos_embedding(pos, 37)  # 4x4 -> 6x6
    assert out.shape == (1, 37, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # the class token's embedding kept
    grid = pos[0, 1:].reshape(4, 4, 5)
    np.testing.assert_allclose(out[0, 1:].reshape(6, 6, 5)[[0, -1]][:, [0, -1]],
                               grid[[0, -1]][:, [0, -1]], rtol=1e-6)  # aligned corners
    np.testing.assert_allclose(vit.bicubic_matrix(4, 6).sum(1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="square patch grid"):
        vit.resize_pos_embedding(pos, 20)

    module = build_backbone("vit_b_16", num_classes=7)
    variables = init_backbone(module, jax.random.key(0), 64)
    p = variables["params"]
    np.testing.assert_allclose(float(jnp.std(p["encoder"]["pos_embedding"])), 0.02, rtol=0.1)
    assert not np.any(p["heads"]["head"]["kernel"]) and not np.any(p["class_token"])
    block = p["encoder"]["layers"]["encoder_layer_3"]
    np.testing.assert_allclose(float(jnp.std(block["self_attention"]["in_proj"]["kernel"])),
                               np.sqrt(2 / (768 + 3 * 768)), rtol=0.02)
    np.testing.assert_array_equal(block["ln_1"]["scale"], 1.0)
    np.testing.assert_allclose(float(jnp.std(p["conv_proj"]["kernel"])),
                               np.sqrt(1 / (3 * 16 * 16)), rtol=0.02)


def test_bfloat16_keeps_attention_softmax_in_float32():
    layers = (f"{BLOCK.format(2)}.ln_1",)
    module, variables = _small(layers)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    bf16 = module.clone(dtype=jnp.bfloat16)
    logits16, feats16 = jax.jit(bf16.apply)(variables, x)
    logits32, _ = jax.jit(module.apply)(variables, x)
    assert logits16.dtype == jnp.float32 and feats16[layers[0]].dtype == jnp.bfloat16
    assert 0 < _rel_err(logits16, logits32) < 0.1
    attention = vit.SelfAttention(num_heads=2, dtype=jnp.bfloat16)
    tokens = jnp.ones((1, 17, 32), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda v, t: attention.apply(v, t))(
        attention.init(jax.random.key(0), tokens), tokens)
    exps = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32
                        and e.outvars[0].aval.shape == (1, 2, 17, 17) for e in exps)


# ----------------------------------------------------------------------------- torch side


def _torchvision_small(image_size=32, seed=0):
    """Returns a small torchvision VisionTransformer (eval) with non-trivial LayerNorms."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    net = VisionTransformer(image_size=image_size, num_classes=10, **SMALL)
    with torch.no_grad():
        for name, p in net.named_parameters():  # torchvision zeroes the head and biases
            if name.startswith("heads") or name.endswith("bias") or "ln" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("ln_1.weight") else 0))
        net.class_token.normal_(0, 0.5)
    return net.eval()


def _torch_forward(net, x_nhwc, layers):
    """Returns torchvision's (logits, {layer: NHWC map}) for modules named in layers."""
    import torch

    from tame_jax.tools.make_parity_fixture import tokens_to_nhwc

    captured = {}
    modules = dict(net.named_modules())
    hooks = [modules[n].register_forward_hook(
        lambda _m, _i, o, n=n: captured.__setitem__(n, o.detach().clone())) for n in layers]
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    for h in hooks:
        h.remove()
    return logits.numpy(), {n: tokens_to_nhwc(captured[n].numpy()) for n in layers}


def test_direct_torchvision_default_init_and_resized_positions(tmp_path):
    """Logits and maps equal torchvision's (.pth loaded); weights made at 32 px loaded at 48 px
    equal torchvision's interpolate_embeddings model at 48 px."""
    torch = pytest.importorskip("torch")
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

    net = _torchvision_small()
    torch.save({"model": net.state_dict()}, tmp_path / "w.pth")
    layers = ("conv_proj", f"{BLOCK.format(0)}.ln_2", BLOCK.format(1), f"{BLOCK.format(2)}.ln_1",
              "encoder.ln")
    module = build_backbone("vit_b_16", num_classes=10, layers=layers, **SMALL)
    for size in (32, 48):
        if size == 32:
            ref = net
        else:
            state = interpolate_embeddings(size, 8, net.state_dict())
            ref = VisionTransformer(image_size=size, num_classes=10, **SMALL).eval()
            ref.load_state_dict(state)
        x = parity_inputs(size, seed=3)
        want_logits, want = _torch_forward(ref, x, layers)
        template = jax.eval_shape(lambda s=size: init_backbone(module, jax.random.key(0), s))
        variables = load_backbone_weights("vit_b_16", tmp_path / "w.pth", template)
        logits, feats = jax.jit(module.apply)(variables, x)
        assert _rel_err(logits, want_logits) < 1e-4, size
        for name in layers:
            assert _rel_err(feats[name], want[name]) < 1e-4, (size, name)


def test_timm_vit_matches_and_normalisation_is_timms():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    for name in vit.TIMM_ARCHS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert tuple(cfg.mean) == get_spec(name).mean and tuple(cfg.std) == get_spec(name).std
    torch.manual_seed(1)
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                            mlp_ratio=2.0, num_classes=10)
    with torch.no_grad():
        for pname, p in net.named_parameters():
            if pname.endswith("bias") or "norm" in pname or pname.startswith("head"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if pname.endswith("norm1.weight") else 0))
    net.eval()
    x = parity_inputs(32, seed=4)
    with torch.no_grad():
        want = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    layers = (f"{BLOCK.format(2)}.ln_1",)
    module = build_backbone("vit_base_patch16_224", num_classes=10, layers=layers, **SMALL)
    template = jax.eval_shape(lambda: init_backbone(module, jax.random.key(0), 32))
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    variables = get_spec("vit_base_patch16_224").convert(state, template)
    logits, _ = jax.jit(module.apply)(variables, x)
    assert _rel_err(logits, want) < 1e-4


class _ZeroPatchChannel:
    """pytorch-grad-cam ablation layer zeroing channel k of the patch tokens (class token kept),
    the paper's ablation, where the package's AblationLayerVit writes min - 1e7 into every token."""

    def __new__(cls):
        from pytorch_grad_cam.ablation_layer import AblationLayerVit

        class Layer(AblationLayerVit):
            def __call__(self, x):
                out = self.activations.clone()  # (n, 1 + g*g, C), one copy per ablated channel
                for i in range(out.size(0)):
                    out[i, 1:, self.indices[i]] = 0
                return out

        return Layer()


@pytest.mark.parametrize("method,cls_name,kw", [
    ("gradcam", "GradCAM", {}),
    ("gradcampp", "GradCAMPlusPlus", {}),
    ("scorecam", "ScoreCAM", {"align_corners": True}),
    ("ablationcam", "AblationCAM", {}),
])
def test_cams_match_pytorch_grad_cam_on_vit(method, cls_name, kw):
    """On a small torchvision ViT, maps at the last block's ln_1 through pytorch-grad-cam's
    reshape_transform (class token dropped) equal ours after min-max normalisation."""
    torch = pytest.importorskip("torch")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = _torchvision_small(seed=2)
    layer = f"{BLOCK.format(2)}.ln_1"
    x = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
    spec = get_spec("vit_b_16")
    xn = (np.asarray(x) - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)

    def reshape_transform(t):  # (B, 1 + 16, C) -> (B, C, 4, 4)
        return t[:, 1:, :].reshape(t.size(0), 4, 4, t.size(2)).permute(0, 3, 1, 2)

    extra = {"ablation_layer": _ZeroPatchChannel()} if method == "ablationcam" else {}
    ref_cam = getattr(pgc, cls_name)(model=net, target_layers=[net.encoder.layers[-1].ln_1],
                                     reshape_transform=reshape_transform, **extra)
    classes = np.array([3, 7])
    ref = ref_cam(input_tensor=torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 3, 1, 2))),
                  targets=[ClassifierOutputTarget(int(c)) for c in classes])

    module = build_backbone("vit_b_16", num_classes=10, layers=(layer,), **SMALL)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    template = jax.eval_shape(lambda: init_backbone(module, jax.random.key(0), 32))
    model = Model(spec.convert(state, template), module, layers=(layer,), image_size=32)
    got = cams.make_cam_fn(method, layer=layer, **kw)(model, x, jnp.asarray(classes))
    chex.assert_shape(got, ref.shape)
    got = np.asarray(got, np.float64)
    # A map can be all zero (ReLU of a negative sum: Score-CAM on a LayerNorm output, whose
    # channels average to 0, often is): then ours must be too; the others must match.
    live = np.ptp(ref, axis=(1, 2)) > 0
    assert live.any()
    np.testing.assert_array_equal(got[~live], 0.0)
    ref, got = ref[live], got[live]
    minmax = lambda m: (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2),
                                                                        keepdims=True)
    np.testing.assert_allclose(minmax(got), minmax(ref), atol=1e-4)
    # RISE is black-box: it runs on the ViT unchanged
    rise = cams.cam("rise", model, x, jnp.asarray(classes), layer=layer, key=jax.random.key(0),
                    num_masks=8, chunk=4)
    assert rise.shape == (2, 32, 32) and float(jnp.ptp(rise)) > 0
