"""Tests of the TAME attention module against independent numpy / torch references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax.attention import VARIANTS, BatchNorm, TAMEAttention
from tame_jax.image_ops import resize_bilinear

SIZES = (8, 4, 2)
CHANNELS = (3, 5, 4)
K = 7


def np_resize_torch(x: np.ndarray, out: int) -> np.ndarray:
    """Returns x (B, h, w, C) resized to (B, out, out, C): torch bilinear, align_corners=False."""

    def axis_weights(n_in: int, n_out: int) -> np.ndarray:
        w = np.zeros((n_out, n_in))
        scale = n_in / n_out
        for o in range(n_out):
            src = max((o + 0.5) * scale - 0.5, 0.0)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            lam = src - i0
            w[o, i0] += 1.0 - lam
            w[o, i1] += lam
        return w

    wh = axis_weights(x.shape[1], out)
    ww = axis_weights(x.shape[2], out)
    res = np.zeros((x.shape[0], out, out, x.shape[3]))
    for b in range(x.shape[0]):
        for c in range(x.shape[3]):
            res[b, :, :, c] = wh @ x[b, :, :, c] @ ww.T
    return res


def make_features(key: jax.Array, batch: int = 2, sizes=SIZES, channels=CHANNELS) -> list:
    """Returns random non-negative feature maps (B, h, h, C), like post-ReLU backbone features."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    return [
        jnp.asarray(np.maximum(rng.normal(size=(batch, s, s, c)), 0), jnp.float32)
        for s, c in zip(sizes, channels, strict=True)
    ]


def randomise(variables: dict, key: jax.Array) -> dict:
    """Returns variables with every leaf replaced by random values (variances positive)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))

    def draw(path, leaf):
        v = rng.normal(size=leaf.shape) * 0.5
        if "var" in jax.tree_util.keystr(path):
            v = np.abs(v) + 0.5
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("variant", VARIANTS)
def test_selective_fusion_equals_full_then_gather(variant):
    feats = make_features(jax.random.key(0))
    model = TAMEAttention(num_classes=K, variant=variant)
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(2))
    classes = jnp.array([3, 0, 3, 6, 6])  # duplicates kept
    full = model.apply(variables, feats)
    sel = model.apply(variables, feats, classes)
    s = 2 if variant == "lcam_img" else 8
    chex.assert_shape(full, (2, s, s, K))
    chex.assert_shape(sel, (2, s, s, 5))
    np.testing.assert_allclose(sel, full[..., classes], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_image_fusion_equals_the_diagonal_of_full_fusion(variant):
    feats = make_features(jax.random.key(0))
    model = TAMEAttention(num_classes=K, variant=variant)
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(2))
    classes = jnp.array([5, 1])  # one class per image
    full = model.apply(variables, feats)
    own = model.apply(variables, feats, classes, per_image=True)
    chex.assert_shape(own, full.shape[:3])
    want = np.stack([full[b, :, :, int(c)] for b, c in enumerate(classes)])
    np.testing.assert_allclose(own, want, atol=1e-6, rtol=0)


def test_output_shapes_and_cap():
    feats = make_features(jax.random.key(0))
    out = TAMEAttention(num_classes=K).init_with_output(jax.random.key(1), feats)[0]
    chex.assert_shape(out, (2, 8, 8, K))
    chex.assert_type(out, jnp.float32)
    # first map 8 > max_size 4: the largest branch is downsampled, the smallest upsampled
    capped = TAMEAttention(num_classes=K, max_size=4)
    out, variables = capped.init_with_output(jax.random.key(1), feats, jnp.array([1, 2]))
    chex.assert_shape(out, (2, 4, 4, 2))
    params = variables["params"]
    chex.assert_shape(params["fuser"]["kernel"], (1, 1, sum(CHANNELS), K))
    chex.assert_shape(params["fuser"]["bias"], (K,))
    chex.assert_shape(params["convs_1"]["kernel"], (1, 1, 5, 5))
    assert set(variables["batch_stats"]) == {"bns_0", "bns_1", "bns_2"}


def test_variant_param_shapes():
    feats = make_features(jax.random.key(0))
    p = TAMEAttention(K, "noskip").init(jax.random.key(1), feats)["params"]
    chex.assert_shape(p["convs_0"]["kernel"], (1, 1, 3, K))
    chex.assert_shape(p["fuser"]["kernel"], (1, 1, 3 * K, K))
    v = TAMEAttention(K, "noskip_nobn").init(jax.random.key(1), feats)
    assert "batch_stats" not in v and set(v["params"]) == {"convs_0", "convs_1", "convs_2", "fuser"}
    v = TAMEAttention(K, "lcam_img").init(jax.random.key(1), feats)
    assert set(v["params"]) == {"fuser"}
    chex.assert_shape(v["params"]["fuser"]["kernel"], (1, 1, 4, K))


def test_unknown_variant_lists_choices():
    with pytest.raises(ValueError, match="noskip_nobn"):
        TAMEAttention(K, "tame2").init(jax.random.key(0), make_features(jax.random.key(0)))


def np_branch_forward(feats, variables, variant, size, train=False):
    """Returns the numpy TAME forward (B, S, S, K) and batch means/vars of the BN inputs."""
    p = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
    branches, batch_moments = [], []
    for i, f in enumerate(feats):
        f = np.asarray(f, np.float64)
        bsz, h, w, c = f.shape
        y = f.reshape(-1, c) @ p[f"convs_{i}"]["kernel"][0, 0] + p[f"convs_{i}"]["bias"]
        if variant != "noskip_nobn":
            if train:
                mean, var = y.mean(0), y.var(0)
                batch_moments.append((mean, var))
            else:
                mean, var = stats[f"bns_{i}"]["mean"], stats[f"bns_{i}"]["var"]
            bn = p[f"bns_{i}"]
            y = (y - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
        y = y.reshape(bsz, h, w, -1)
        if variant in ("tame", "sigmoid_branch"):
            y = y + f
        y = 1 / (1 + np.exp(-y)) if variant == "sigmoid_branch" else np.maximum(y, 0)
        branches.append(np_resize_torch(y, size))
    z = np.concatenate(branches, -1)
    out = z @ p["fuser"]["kernel"][0, 0] + p["fuser"]["bias"]
    return out, batch_moments


@pytest.mark.parametrize("variant", ["tame", "sigmoid_branch", "noskip", "noskip_nobn"])
def test_forward_matches_numpy_by_hand(variant):
    feats = make_features(jax.random.key(3))
    model = TAMEAttention(num_classes=K, variant=variant, max_size=6)  # 8 -> 6, 4 -> 6, 2 -> 6
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(4))
    want, _ = np_branch_forward(feats, variables, variant, 6)
    got = model.apply(variables, feats)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_lcam_img_matches_numpy():
    feats = make_features(jax.random.key(3))
    model = TAMEAttention(num_classes=K, variant="lcam_img")
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(4))
    p = variables["params"]["fuser"]
    want = np.asarray(feats[-1]) @ np.asarray(p["kernel"][0, 0]) + np.asarray(p["bias"])
    np.testing.assert_allclose(model.apply(variables, feats), want, atol=1e-5, rtol=1e-5)


def test_train_mode_batchnorm_uses_batch_stats_and_torch_momentum():
    feats = make_features(jax.random.key(5), batch=3)
    model = TAMEAttention(num_classes=K)
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(6))
    got, upd = model.apply(variables, feats, train=True, mutable=["batch_stats"])
    want, moments = np_branch_forward(feats, variables, "tame", 8, train=True)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    old = variables["batch_stats"]["bns_1"]
    new = upd["batch_stats"]["bns_1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * moments[1][0], atol=1e-5)
    n = 3 * 4 * 4  # batch x H x W of branch 1: the running variance takes the unbiased one
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * moments[1][1] * n / (n - 1),
                               rtol=1e-5)


def test_batchnorm_running_variance_by_hand():
    # One channel, four values 1, 2, 3, 6: mean 3, biased variance 14/4, unbiased 14/3.
    x = jnp.asarray([1.0, 2.0, 3.0, 6.0]).reshape(1, 2, 2, 1)
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    assert float(variables["batch_stats"]["var"][0]) == 1.0  # init: mean 0, var 1
    y, upd = bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(upd["batch_stats"]["mean"], [0.9 * 0 + 0.1 * 3.0], rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], [0.9 * 1 + 0.1 * 14 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y).ravel(), (np.asarray([1, 2, 3, 6]) - 3)
                               / np.sqrt(3.5 + 1e-5), rtol=1e-6)
    # Eval mode normalises with the running statistics.
    ev = BatchNorm(use_running_average=True).apply(upd | {"params": variables["params"]}, x)
    np.testing.assert_allclose(np.asarray(ev).ravel(), (np.asarray([1, 2, 3, 6]) - 0.3)
                               / np.sqrt(0.9 + 0.1 * 14 / 3 + 1e-5), rtol=1e-6)


def test_batchnorm_matches_torch_batchnorm2d_in_train_and_eval_mode():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4, 6)).astype(np.float32) * 2 + 1  # (B, H, W, C)
    scale, bias = rng.normal(size=6), rng.normal(size=6)
    mean0, var0 = rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)
    ref = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(scale))
        ref.bias.copy_(torch.tensor(bias))
        ref.running_mean.copy_(torch.tensor(mean0))
        ref.running_var.copy_(torch.tensor(var0))
    variables = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                            "bias": jnp.asarray(bias, jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(mean0, jnp.float32),
                                 "var": jnp.asarray(var0, jnp.float32)}}
    xt = torch.tensor(x).permute(0, 3, 1, 2)  # NCHW
    for _ in range(2):  # two training steps: the running statistics compound
        want = ref.train()(xt).permute(0, 2, 3, 1).detach().numpy()
        got, upd = BatchNorm(use_running_average=False).apply(variables, jnp.asarray(x),
                                                              mutable=["batch_stats"])
        variables = {"params": variables["params"], **upd}
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(upd["batch_stats"]["mean"], ref.running_mean.numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["var"], ref.running_var.numpy(),
                                   rtol=1e-5, atol=1e-6)
    want = ref.eval()(xt).permute(0, 2, 3, 1).detach().numpy()
    got = BatchNorm(use_running_average=True).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_batchnorm_axis_name_gives_global_batch_statistics():
    feats = make_features(jax.random.key(5), batch=4)
    model = TAMEAttention(num_classes=K)
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(6))
    want = model.apply(variables, feats, jnp.array([2, 5]), train=True, mutable=["batch_stats"])
    sharded = TAMEAttention(num_classes=K, axis_name="d")
    split = [f.reshape(2, 2, *f.shape[1:]) for f in feats]  # two "devices" of 2 images
    got = jax.vmap(
        lambda fs: sharded.apply(variables, fs, jnp.array([2, 5]), train=True,
                                 mutable=["batch_stats"]),
        axis_name="d",
    )(split)
    np.testing.assert_allclose(got[0].reshape(want[0].shape), want[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], got[1]), want[1], atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_output():
    feats = make_features(jax.random.key(0))
    model = TAMEAttention(num_classes=K, dtype=jnp.bfloat16)
    out, variables = model.init_with_output(jax.random.key(1), feats)
    chex.assert_type(out, jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    ref = TAMEAttention(num_classes=K).apply(variables, feats)
    np.testing.assert_allclose(out, ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("src,dst", [(8, 5), (8, 3), (2, 7), (3, 8), (7, 28), (28, 7)])
def test_resize_bilinear_matches_numpy_torch_rule(src, dst):
    x = np.random.default_rng(src * 100 + dst).normal(size=(2, src, src, 3))
    got = resize_bilinear(jnp.asarray(x, jnp.float32), (dst, dst))
    np.testing.assert_allclose(got, np_resize_torch(x, dst), atol=1e-5)


def test_resize_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(0)
    for src, dst in [(8, 5), (2, 7), (7, 28), (28, 7), (14, 56)]:
        x = rng.normal(size=(2, 3, src, src)).astype(np.float32)  # NCHW
        want = f.interpolate(torch.from_numpy(x), size=(dst, dst), mode="bilinear",
                             align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (dst, dst))
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np_resize_torch(x.transpose(0, 2, 3, 1), dst), want,
                                   atol=1e-5)


# --- import of the reference release's attention checkpoints ---


def reference_state_dict(variables: dict) -> dict:
    """Returns the reference key layout of TAME variables, written out by hand (OIHW kernels)."""
    p, st = variables["params"], variables["batch_stats"]
    sd = {}
    for i in range(3):
        sd[f"convs.{i}.weight"] = np.asarray(p[f"convs_{i}"]["kernel"])[0, 0].T[:, :, None, None]
        sd[f"convs.{i}.bias"] = np.asarray(p[f"convs_{i}"]["bias"])
        sd[f"bns.{i}.weight"] = np.asarray(p[f"bns_{i}"]["scale"])
        sd[f"bns.{i}.bias"] = np.asarray(p[f"bns_{i}"]["bias"])
        sd[f"bns.{i}.running_mean"] = np.asarray(st[f"bns_{i}"]["mean"])
        sd[f"bns.{i}.running_var"] = np.asarray(st[f"bns_{i}"]["var"])
        sd[f"bns.{i}.num_batches_tracked"] = np.array(17, np.int64)
    sd["fuser.weight"] = np.asarray(p["fuser"]["kernel"])[0, 0].T[:, :, None, None]
    sd["fuser.bias"] = np.asarray(p["fuser"]["bias"])
    return sd


def tame_setup():
    """Returns (model, features, random variables, template shapes) for the import tests."""
    feats = make_features(jax.random.key(7))
    model = TAMEAttention(num_classes=K)
    template = jax.eval_shape(model.init, jax.random.key(0), feats)
    variables = randomise(model.init(jax.random.key(1), feats), jax.random.key(8))
    return model, feats, variables, template


def test_import_npz_checkpoint(tmp_path):
    from tame_jax.weights import load_tame_checkpoint, tame_state_dict_from_variables

    model, feats, variables, template = tame_setup()
    path = tmp_path / "tame.npz"
    np.savez(path, **reference_state_dict(variables))
    loaded = load_tame_checkpoint(path, template)
    chex.assert_trees_all_close(loaded, jax.tree.map(np.asarray, variables), atol=0, rtol=0)
    np.testing.assert_array_equal(model.apply(loaded, feats), model.apply(variables, feats))
    # export is the inverse of import
    exported = tame_state_dict_from_variables(variables)
    assert set(exported) == set(reference_state_dict(variables))
    for k, v in reference_state_dict(variables).items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[k], v)


def test_import_strips_a_module_prefix_and_ignores_other_modules():
    from tame_jax.weights import tame_variables_from_state_dict

    _, _, variables, template = tame_setup()
    sd = {f"attn_mech.{k}": v for k, v in reference_state_dict(variables).items()}
    sd["body.conv1.weight"] = np.zeros((4, 3, 7, 7))
    loaded = tame_variables_from_state_dict(sd, template)
    np.testing.assert_array_equal(loaded["params"]["fuser"]["bias"],
                                  variables["params"]["fuser"]["bias"])


def test_import_errors_name_the_keys():
    from tame_jax.weights import tame_variables_from_state_dict

    _, _, variables, template = tame_setup()
    sd = reference_state_dict(variables)
    del sd["bns.1.running_var"]
    sd["convs.3.weight"] = np.zeros((1, 1, 1, 1))
    sd["fuser.weight"] = np.zeros((K + 1, 12, 1, 1))
    with pytest.raises(ValueError) as err:
        tame_variables_from_state_dict(sd, template)
    msg = str(err.value)
    assert "missing keys (1): bns.1.running_var (5,)" in msg
    assert "unexpected keys (1): convs.3.weight" in msg
    assert f"fuser.weight: file has ({K + 1}, 12, 1, 1), model expects ({K}, 12, 1, 1)" in msg


def test_import_torch_checkpoint_matches_plain_torch_forward(tmp_path):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    from tame_jax.weights import load_tame_checkpoint

    torch.manual_seed(0)

    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList([torch.nn.Conv2d(c, c, 1) for c in CHANNELS])
            self.bns = torch.nn.ModuleList([torch.nn.BatchNorm2d(c) for c in CHANNELS])
            self.fuser = torch.nn.Conv2d(sum(CHANNELS), K, 1)

    ref = Ref()
    with torch.no_grad():
        for bn in ref.bns:
            bn.weight.normal_()
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tame.pt"
    torch.save(ref.state_dict(), path)

    model, _, _, _ = tame_setup()
    feats_t = [torch.relu(torch.randn(2, c, s, s)) for c, s in zip(CHANNELS, SIZES, strict=True)]
    feats = [jnp.asarray(t.numpy().transpose(0, 2, 3, 1)) for t in feats_t]
    template = jax.eval_shape(model.init, jax.random.key(0), feats)
    variables = load_tame_checkpoint(path, template)

    with torch.no_grad():  # the TAME forward in plain torch ops, BN in eval mode
        branches = []
        for i, x in enumerate(feats_t):
            w, b = ref.convs[i].weight, ref.convs[i].bias
            y = f.conv2d(x, w, b)
            bn = ref.bns[i]
            y = (y - bn.running_mean[:, None, None]) / torch.sqrt(
                bn.running_var[:, None, None] + 1e-5) * bn.weight[:, None, None] \
                + bn.bias[:, None, None]
            y = torch.relu(y + x)
            branches.append(f.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False))
        want = f.conv2d(torch.cat(branches, 1), ref.fuser.weight, ref.fuser.bias)
    want = want.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(model.apply(variables, feats), want, atol=1e-5, rtol=1e-5)
    sel = model.apply(variables, feats, jnp.array([6, 1]))
    np.testing.assert_allclose(sel, want[..., [6, 1]], atol=1e-5, rtol=1e-5)
