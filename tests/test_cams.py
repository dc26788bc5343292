"""Tests of the baseline explanation methods against closed-form maps and pytorch-grad-cam."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import cams
from tame_jax.backbones import check_layers, tap
from tame_jax.model import Model

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class Toy(nn.Module):
    """Backbone-contract toy: A = 1x1 linear map of avg-pooled norm(x); logits from mean(A^e)."""

    channels: int = 4
    num_classes: int = 3
    pool: int = 1
    square: bool = False
    layers: tuple[str, ...] = ("block.1", "block.2")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        """Returns (logits (B, K), {'block.1': A (B, h, w, C), 'block.2': (B, h, w, 2)})."""
        if self.pool > 1:
            x = nn.avg_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
        a = nn.Dense(self.channels, name="proj")(x)  # (B, h, w, C)
        a = tap(self, "block.1", a)
        # another returned layer, unused by the logits
        other = tap(self, "block.2", a[..., :2])
        z = a * a if self.square else a
        logits = nn.Dense(self.num_classes, name="head")(z.mean(axis=(1, 2)))
        feats = {"block.1": a, "block.2": other}
        return logits, {name: feats[name] for name in check_layers("toy", self.layers, feats)}


def _setup(pool=1, square=False, b=2, hw=8, seed=0):
    model = Toy(pool=pool, square=square)
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (b, hw, hw, 3))
    variables = model.init(kp, x)
    # random biases so that nothing is accidentally symmetric
    params = jax.tree.map(lambda v: v, variables["params"])
    params["proj"]["bias"] = jax.random.normal(jax.random.key(seed + 1), (model.channels,))
    params["head"]["bias"] = jax.random.normal(jax.random.key(seed + 2), (model.num_classes,))
    variables = {"params": params}
    classes = jnp.array([1, 2][:b] + [0] * max(0, b - 2), jnp.int32)
    return Model(variables, model), variables, x, classes


def _np_model_parts(variables, x, pool):
    """Returns numpy (xn, A, P, bp, W, bh) for the Toy model."""
    p = jax.tree.map(np.asarray, variables["params"])
    xn = (np.asarray(x) - MEAN) / STD
    return xn, _np_feat(xn, p, pool), p["head"]["kernel"], p["head"]["bias"], p


def _np_feat(xn, p, pool):
    """Returns the Toy feature map A (B, h, w, C) in numpy."""
    b, h, w, c = xn.shape
    pooled = xn.reshape(b, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4))
    return pooled @ p["proj"]["kernel"] + p["proj"]["bias"]


def _np_resize(m, size):
    """Returns m (B, h, w) resized to size with half-pixel-centre bilinear (PyTorch, no AA)."""

    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = src - i0
        mat = np.zeros((n_out, n_in))
        mat[np.arange(n_out), i0] += 1 - f
        mat[np.arange(n_out), i1] += f
        return mat

    rh, rw = axis_weights(m.shape[1], size[0]), axis_weights(m.shape[2], size[1])
    return np.einsum("Hh,bhw,Ww->bHW", rh, m, rw)


def _np_cam(a, weights, size):
    """Returns ReLU(sum_k w_k A_k) (B, h, w) upsampled to size."""
    return _np_resize(np.maximum(np.einsum("bhwc,bc->bhw", a, weights), 0), size)


# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("pool", [1, 2])
def test_gradcam_matches_closed_form_linear(pool):
    """Linear head on mean(A): dy^c/dA_ijk = W[k, c] / (h w) exactly, so w_k = W[k, c] / (h w)."""
    model, variables, x, classes = _setup(pool=pool)
    _, a, w, _, _ = _np_model_parts(variables, x, pool)
    h, wd = a.shape[1:3]
    weights = w[:, np.asarray(classes)].T / (h * wd)  # (B, C)
    expected = _np_cam(a, weights, x.shape[1:3])
    got = cams.gradcam(model, x, classes, layer="block.1")
    chex.assert_shape(got, x.shape[:3])
    assert expected.max() > 0 and (expected == 0).any()  # the ReLU matters
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", [1, 2])
def test_gradcam_and_gradcampp_closed_form_squared(pool):
    """y^c = sum_k W[k, c] mean(A_k^2): g = 2 W[k, c] A / (h w); Grad-CAM++ alpha varies."""
    model, variables, x, classes = _setup(pool=pool, square=True)
    _, a, w, _, _ = _np_model_parts(variables, x, pool)
    h, wd = a.shape[1:3]
    wc = w[:, np.asarray(classes)].T[:, None, None, :]  # (B, 1, 1, C)
    g = 2.0 * wc * a / (h * wd)  # (B, h, w, C)
    size = x.shape[1:3]

    exp_gc = _np_cam(a, g.mean(axis=(1, 2)), size)
    got_gc = cams.gradcam(model, x, classes, layer="block.1")
    np.testing.assert_allclose(got_gc, exp_gc, rtol=1e-5, atol=1e-6)

    sum_a = a.sum(axis=(1, 2), keepdims=True)
    alpha = g**2 / (2 * g**2 + sum_a * g**3 + 1e-6)
    alpha = np.where(g != 0, alpha, 0)
    assert np.ptp(alpha) > 0.1  # alpha really varies, unlike 1/(2 + ...) for a linear model
    exp_pp = _np_cam(a, (alpha * np.maximum(g, 0)).sum(axis=(1, 2)), size)
    got_pp = cams.gradcampp(model, x, classes, layer="block.1")
    np.testing.assert_allclose(got_pp, exp_pp, rtol=1e-4, atol=1e-6)
    assert not np.allclose(exp_pp / exp_pp.max(), exp_gc / exp_gc.max(), atol=1e-2)


def test_ablationcam_closed_form_linear():
    """Zeroing channel k lowers y^c by W[k, c] mean(A_k): w_k = W[k, c] mean(A_k) / y^c."""
    model, variables, x, classes = _setup(pool=2)
    _, a, w, bh, _ = _np_model_parts(variables, x, 2)
    cls = np.asarray(classes)
    contrib = a.mean(axis=(1, 2)) * w[:, cls].T  # (B, C)
    y = contrib.sum(axis=1) + bh[cls]
    expected = _np_cam(a, contrib / y[:, None], x.shape[1:3])
    for chunk in (3, 32):  # 3 does not divide B * C = 8, so padding is exercised
        got = cams.ablationcam(model, x, classes, layer="block.1", channel_chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_scorecam_matches_numpy_reimplementation():
    """Weights = softmax over channels of y^c(norm(x) * minmax(up(A_k))), computed in numpy."""
    model, variables, x, classes = _setup(pool=2)
    xn, a, w, bh, p = _np_model_parts(variables, x, 2)
    cls = np.asarray(classes)
    b, _, _, c = a.shape
    size = x.shape[1:3]
    scores = np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            up = _np_resize(a[i : i + 1, :, :, k], size)[0]
            m = (up - up.min()) / (up.max() - up.min() + 1e-8)
            a2 = _np_feat(xn[i : i + 1] * m[None, :, :, None], p, 2)
            scores[i, k] = a2.mean(axis=(1, 2))[0] @ w[:, cls[i]] + bh[cls[i]]
    weights = np.exp(scores - scores.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    expected = _np_cam(a, weights, size)
    for chunk in (3, 32):
        got = cams.scorecam(model, x, classes, layer="block.1", batch_chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_dispatch_and_jit_agree():
    """cam(method, ...) and the jitted make_cam_fn give the direct function's maps."""
    model, variables, x, classes = _setup(pool=2, square=True)
    for method in ("gradcam", "gradcampp", "ablationcam", "scorecam"):
        direct = getattr(cams, method)(model, x, classes, layer="block.1")
        via = cams.cam(method, model, x, classes, layer="block.1")
        jitted = cams.make_cam_fn(method, layer="block.1")(model, x, classes)
        np.testing.assert_allclose(via, direct, rtol=1e-6)
        np.testing.assert_allclose(jitted, direct, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown method"):
        cams.cam("nope", model, x, classes, layer="block.1")
    with pytest.raises(ValueError, match="block.1"):
        cams.gradcam(model, x, classes, layer="block.9")


# ----------------------------------------------------------------------------- RISE


class RegionToy(nn.Module):
    """P(class 0) = sigmoid(4 * mean of norm(x) over the top-left quarter); class 1 logit 0."""

    layers: tuple[str, ...] = ("f",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        """Returns (logits (B, 2), {'f': x})."""
        h, w = x.shape[1:3]
        s = 4.0 * x[:, : h // 4, : w // 4, :].mean(axis=(1, 2, 3))
        f = tap(self, "f", x)
        return jnp.stack([s, jnp.zeros_like(s)], axis=1), {"f": f}


def test_rise_chunking_invariant():
    """Chunked and unchunked RISE give the same saliency for the same key (padded tail too)."""
    model, variables, x, classes = _setup(pool=2)
    key = jax.random.key(3)
    run = functools.partial(cams.rise, model, x, classes, key=key, num_masks=50,
                            mask_cells=3)
    full = run(chunk=50)
    chex.assert_shape(full, x.shape[:3])
    jitted = cams.make_cam_fn("rise", layer="block.1", num_masks=50, mask_cells=3,
                              chunk=7)(model, x, classes, key=key)
    np.testing.assert_allclose(jitted, full, rtol=1e-5, atol=1e-6)


def test_rise_masks_shape_range_and_keep_rate():
    """Masks lie in [0, 1], vary within a mask, and keep about p of the image on average."""
    masks = jax.jit(cams.rise_masks, static_argnums=(2, 3, 4))
    m = masks(jax.random.key(0), jnp.arange(400), (16, 16), 4, 0.3)
    chex.assert_shape(m, (400, 16, 16))
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert abs(float(m.mean()) - 0.3) < 0.03
    assert float(m.std(axis=(1, 2)).mean()) > 0.1


def test_rise_highlights_the_region_the_model_uses():
    """Saliency inside the region that drives the class probability beats every far pixel."""
    model = RegionToy()
    x = jnp.full((1, 16, 16, 3), 0.9)
    variables = model.init(jax.random.key(0), x)
    sal = np.asarray(cams.rise(Model(variables, model), x, jnp.array([0]), key=jax.random.key(1),
                               num_masks=400, mask_cells=4, chunk=64))[0]
    inside, far = sal[:4, :4], sal[8:, 8:]
    assert inside.min() > far.max()
    assert inside.mean() > far.mean() + 0.05


# ----------------------------------------------------------------------------- pytorch-grad-cam


def _torch_pair(stride: int):
    """Returns (torch model, its target layer, Flax module, variables) with the same weights."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    torch.manual_seed(0)

    class TNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = tnn.Conv2d(3, 6, 3, padding=1)
            self.r1 = tnn.ReLU()
            self.c2 = tnn.Conv2d(6, 8, 3, stride=stride, padding=1)
            self.r2 = tnn.ReLU()
            self.fc = tnn.Linear(8, 5)

        def forward(self, x):
            a = self.r2(self.c2(self.r1(self.c1(x))))
            return self.fc(a.mean(dim=(2, 3)))

    class FNet(nn.Module):
        layers: tuple[str, ...] = ("r2",)

        @nn.compact
        def __call__(self, x, train=False):
            pad = ((1, 1), (1, 1))
            a = nn.relu(nn.Conv(6, (3, 3), padding=pad, name="c1")(x))
            a = nn.relu(nn.Conv(8, (3, 3), strides=stride, padding=pad, name="c2")(a))
            a = tap(self, "r2", a)
            return nn.Dense(5, name="fc")(a.mean(axis=(1, 2))), {"r2": a}

    tnet = TNet().eval()
    sd = {k: v.detach().numpy() for k, v in tnet.state_dict().items()}
    params = {
        "c1": {"kernel": sd["c1.weight"].transpose(2, 3, 1, 0), "bias": sd["c1.bias"]},
        "c2": {"kernel": sd["c2.weight"].transpose(2, 3, 1, 0), "bias": sd["c2.bias"]},
        "fc": {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]},
    }
    return tnet, tnet.r2, FNet(), {"params": jax.tree.map(jnp.asarray, params)}


def _torch_maps(cls_name, tnet, target, x, classes, **kw):
    """Returns pytorch-grad-cam maps (B, H, W) for x (B, H, W, 3) in [0, 1]."""
    torch = pytest.importorskip("torch")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    xn = (np.asarray(x) - MEAN) / STD
    inp = torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 3, 1, 2)))
    method = getattr(pgc, cls_name)(model=tnet, target_layers=[target], **kw)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    return method(input_tensor=inp, targets=targets)


def _minmax(m):
    m = np.asarray(m, np.float64)
    lo = m.min(axis=(1, 2), keepdims=True)
    return (m - lo) / (m.max(axis=(1, 2), keepdims=True) - lo)


@pytest.mark.parametrize(
    "method,cls_name,stride,kw",
    [
        ("gradcam", "GradCAM", 2, {}),
        ("gradcampp", "GradCAMPlusPlus", 2, {}),
        ("gradcam", "GradCAM", 1, {}),
        ("gradcampp", "GradCAMPlusPlus", 1, {}),
        # stride 1: feature maps at image size, so Score-CAM's align_corners=True upsampling
        # in the package and our half-pixel one agree (both are the identity)
        ("scorecam", "ScoreCAM", 1, {}),
        ("ablationcam", "AblationCAM", 1, {}),
    ],
)
def test_matches_pytorch_grad_cam(method, cls_name, stride, kw):
    """Min-max normalised maps equal those of the `grad-cam` package on the same weights."""
    tnet, target, fnet, variables = _torch_pair(stride)
    x = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3))
    classes = np.array([1, 3])
    ref = _torch_maps(cls_name, tnet, target, x, classes, **kw)
    got = cams.cam(method, Model(variables, fnet), x, jnp.asarray(classes), layer="r2")
    chex.assert_shape(got, ref.shape)
    assert np.ptp(ref) > 0
    np.testing.assert_allclose(_minmax(got), _minmax(ref), atol=2e-4)


@pytest.mark.parametrize("method,cls_name", [("gradcam", "GradCAM"),
                                             ("gradcampp", "GradCAMPlusPlus")])
def test_resnet18_matches_pytorch_grad_cam(method, cls_name):
    """On torchvision resnet18 (random weights, random BN statistics) converted to Flax, the
    layer4 maps equal those of the `grad-cam` package after min-max normalisation."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_grad_cam")
    from tame_jax import backbones, weights

    if not hasattr(weights, "torchvision_to_flax"):
        pytest.skip("tame_jax.weights.torchvision_to_flax not available yet")
    torch.manual_seed(0)
    tnet = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for mod in tnet.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    tnet.eval()
    module = backbones.build_backbone("resnet18", num_classes=10, layers=("layer4",))
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    template = {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
    sd = {k: v.detach().numpy() for k, v in tnet.state_dict().items()}
    variables = weights.torchvision_to_flax("resnet18", sd, template)

    x = jax.random.uniform(jax.random.key(7), (2, 64, 64, 3))
    classes = np.array([2, 7])
    ref = _torch_maps(cls_name, tnet, tnet.layer4, x, classes)
    got = cams.make_cam_fn(method, layer="layer4")(Model(variables, module), x,
                                                   jnp.asarray(classes))
    chex.assert_shape(got, ref.shape)
    assert np.ptp(ref) > 0
    np.testing.assert_allclose(_minmax(got), _minmax(ref), atol=1e-3)
