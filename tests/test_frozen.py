"""The frozen backbone's fast path (BatchNorm folded, prepared input-gradient kernels) computes
the same maps, logits and input gradients as the plain forward, for every backbone family."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tame_jax import backbones
from tame_jax.backbones import frozen
from tame_jax.config import default_config
from tame_jax.model import Model, build_model


@pytest.mark.parametrize("strides,padding,dilation,groups,k", [
    ((1, 1), "SAME", (1, 1), 1, 3),
    ((2, 2), ((1, 1), (1, 1)), (1, 1), 1, 3),  # ResNet's strided 3x3
    ((2, 2), "VALID", (1, 1), 1, 3),  # on an odd size: the last row is left out
    ((1, 2), ((2, 0), (1, 3)), (2, 1), 2, 3),
    ((2, 2), "SAME", (1, 1), 6, 3),  # depthwise (EfficientNet)
    ((1, 1), "VALID", (1, 1), 1, 1),  # 1x1: the matmul path
    ((2, 2), "VALID", (1, 1), 1, 1),  # ResNet's downsample, on odd and even sizes
    ((2, 1), ((0, 0), (0, 0)), (1, 1), 1, 1),
    ((1, 1), "SAME", (1, 1), 2, 1),  # grouped 1x1: the conv path
])
def test_frozen_conv_vjp_equals_autodiff(strides, padding, dilation, groups, k):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 9, 8, 6))
    w = jax.random.normal(kw, (k, k, 6 // groups, 12))
    pads = padding if isinstance(padding, str) else tuple(padding)
    plain = lambda x: jax.lax.conv_general_dilated(
        x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=frozen.DIMENSION_NUMBERS,
        feature_group_count=groups)
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for d in dilation]
        pads = tuple(jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding))
    geometry = frozen._Geometry(strides, tuple(pads), dilation, groups, (9, 8), None)
    fast = lambda x: frozen.frozen_conv(x, w, frozen.input_grad_kernel(w, groups), geometry)
    y, vjp_plain = jax.vjp(plain, x)
    y_fast, vjp_fast = jax.vjp(fast, x)
    np.testing.assert_allclose(y_fast, y, rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(kg, y.shape)
    np.testing.assert_allclose(vjp_fast(ct)[0], vjp_plain(ct)[0], rtol=1e-5, atol=1e-4)


def random_batchnorm(variables, key):
    """Returns variables with random BN statistics and affine params (so the fold matters),
    the same in every process."""

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        # crc32, not hash(): str hashes change per process (PYTHONHASHSEED)
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % 2**31)
        if name == "var":
            return jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0)
        if name in ("mean", "bias"):
            return 0.1 * jax.random.normal(k, leaf.shape)
        if name == "scale":
            return jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


def small_model(backbone, width=None, size=32, **fields):
    c = default_config()
    c.model.backbone, c.model.backbone_weights, c.model.num_classes = backbone, "random", 10
    c.model.layers = backbones.get_spec(backbone).default_layers
    c.model.backbone_kwargs = {} if width is None else {"width": width}
    c.data.image_size = size
    for k, v in fields.items():
        c.model[k] = v
    model = build_model(c)
    return model.replace(backbone_vars=random_batchnorm(model.backbone_vars, jax.random.key(3)))


def plain(model):
    return model.replace(frozen_plan=None, frozen_vars=None)


@pytest.mark.parametrize("backbone,width", [("resnet18", 8), ("resnet50", 8), ("vgg11_bn", None)])
def test_fast_path_equals_plain_forward_and_input_gradient(backbone, width):
    model = small_model(backbone, width)
    n_bn = len(traverse_util.flatten_dict(model.backbone_vars["batch_stats"])) // 2
    assert len(model.frozen_plan.folded_bns) == n_bn > 0  # every BatchNorm folded
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    features = jax.jit(Model.features)
    (logits, feats), (logits0, feats0) = features(model, x), features(plain(model), x)
    scale = float(jnp.abs(logits0).max())
    np.testing.assert_allclose(logits, logits0, rtol=0, atol=1e-5 * scale)
    for f, f0 in zip(feats, feats0, strict=True):
        np.testing.assert_allclose(f, f0, rtol=0, atol=1e-5 * float(jnp.abs(f0).max()))
    # The masked forward's backward: the gradient w.r.t. the input image.
    grad = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(m.classify(x)))))
    g, g0 = grad(x, model), grad(x, plain(model))
    np.testing.assert_allclose(g, g0, rtol=0, atol=1e-4 * float(jnp.abs(g0).max()))


def test_tapping_a_conv_output_keeps_that_conv_unfolded():
    model = small_model("resnet18", 8)
    assert ("conv1",) in model.frozen_plan.by_conv
    tapped = model.with_taps(["conv1", "layer4"])
    assert ("conv1",) not in tapped.frozen_plan.by_conv  # its map would change
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    got = tapped.features(x)[1][0]
    want = plain(model).with_taps(["conv1", "layer4"]).features(x)[1][0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_new_weights_are_refolded():
    model = small_model("resnet18", 8)
    other = random_batchnorm(model.backbone_vars, jax.random.key(9))
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    got = model.replace(backbone_vars=other).classify(x)
    want = plain(model).replace(backbone_vars=other).classify(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    assert float(jnp.abs(got - model.classify(x)).max()) > 1e-3  # the weights did change


def test_no_fast_path_in_train_mode_or_when_off():
    assert small_model("resnet18", 8, backbone_mode="train").frozen_plan is None
    assert small_model("resnet18", 8, fast_path=False).frozen_plan is None


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_registered_backbone_folds_every_batchnorm(name):
    """Shapes only (a trace, no compilation): the fold finds each BN behind its conv."""
    spec = backbones.get_spec(name)
    module = backbones.build_backbone(name, num_classes=10)
    patch = module.shape().patch_size if hasattr(module, "shape") else 1  # ViT: whole patches
    size = -(-32 // patch) * patch
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    plan = frozen.make_plan(module, variables, size, spec.layer_names)
    bns = {path[:-1] for path in traverse_util.flatten_dict(
        dict(variables.get("batch_stats", {})))}
    assert set(plan.folded_bns) == bns
    kernels = {path[:-1] for path, v in traverse_util.flatten_dict(
        dict(variables["params"])).items() if path[-1] == "kernel" and v.ndim == 4}
    assert set(plan.by_conv) == kernels  # every convolution gets the prepared gradient kernel


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_equals_flax_and_its_gradient(window, stride, padding):
    """Values bitwise, gradients to float precision, ties included (the first maximum)."""
    from tame_jax.backbones.common import max_pool

    x = jax.random.normal(jax.random.key(0), (2, 11, 10, 4))
    pads = ((padding, padding), (padding, padding))
    ref = lambda x: nn.max_pool(x, (window, window), (stride, stride), padding=pads)
    ours = lambda x: max_pool(x, window, stride, padding)
    np.testing.assert_array_equal(ours(x), ref(x))
    ct = jax.random.normal(jax.random.key(1), ref(x).shape)
    # Many equal values in a window; the gradient passes straight through the rounding.
    ties = lambda x: x + jax.lax.stop_gradient(jnp.round(4 * x) / 4 - x)
    for f in (lambda x: x, jax.nn.relu, ties):
        grad = lambda pool, f=f: jax.grad(lambda x: jnp.sum(pool(f(x)) * ct))(x)
        np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-6, atol=1e-6)
