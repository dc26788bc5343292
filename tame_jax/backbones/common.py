"""What every backbone family shares: feature taps, layer-name checks, conv/BatchNorm layers,
and the registry's random initialisation.

A backbone's `apply(variables, x_normalised, train=False)` returns
`(logits (B, K) float32, {layer: feature map (B, h, w, C)})`; every returned map goes through
`tap`, so the CAM baselines get gradients w.r.t. a feature map (and ablate channels) through the
'perturbations' collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PERTURBATIONS = "perturbations"
# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
PAD1 = ((1, 1), (1, 1))


def perturb_name(layer: str) -> str:
    """Returns the name of the variable in the 'perturbations' collection for a feature layer.

    It is the torchvision name with '.' -> '_' plus '_out' ("layer4" -> "layer4_out",
    "features.30" -> "features_30_out"); the suffix keeps it apart from the submodule of the
    same name (a Flax scope cannot hold a child and a variable both called "conv1").
    """
    return layer.replace(".", "_") + "_out"


def tap(module: nn.Module, layer: str, x: jax.Array) -> jax.Array:
    """Returns x plus the layer's perturbation when one is passed (else x, unchanged).

    Same contract as `nn.Module.perturb`: `init` creates zero perturbations; `apply` adds them
    when a 'perturbations' collection is given, so `jax.grad` w.r.t. them is the gradient w.r.t.
    the feature map. Layers missing from a given collection are left unperturbed.
    """
    name = perturb_name(layer)
    if module.is_mutable_collection(PERTURBATIONS) or module.has_variable(PERTURBATIONS, name):
        x = x + module.variable(PERTURBATIONS, name, jnp.zeros_like, x).value
    return x


def check_layers(arch: str, layers: Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    """Returns the requested layer names (duplicates dropped); raises ValueError on bad ones."""
    if isinstance(layers, str):
        layers = (layers,)
    bad = [name for name in layers if name not in valid]
    if bad:
        raise ValueError(
            f"Unknown layer name(s) {bad} for backbone {arch!r}. Valid names (the module "
            f"names of its PyTorch state dict): {', '.join(valid)}"
        )
    return tuple(dict.fromkeys(layers))


class FeatureTaps:
    """Collects the requested feature maps (through `tap`) while a forward pass runs."""

    def __init__(self, module: nn.Module, wanted: Sequence[str]):
        self.module, self.wanted, self.maps = module, set(wanted), {}

    def __call__(self, layer: str, x: jax.Array) -> jax.Array:
        """Returns x, perturbed and recorded when `layer` is requested."""
        if layer in self.wanted:
            x = tap(self.module, layer, x)
            self.maps[layer] = x
        return x


def conv(dtype: Any, **kwargs: Any) -> Callable[..., nn.Conv]:
    """Returns an nn.Conv factory: no bias, float32 params, torchvision's init."""
    return partial(nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=CONV_INIT, **kwargs)


def batch_norm(train: bool, dtype: Any, axis_name: str | None, epsilon: float = 1e-5
               ) -> Callable[..., nn.BatchNorm]:
    """Returns an nn.BatchNorm factory with PyTorch's defaults (momentum 0.1 = flax 0.9)."""
    return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=epsilon,
                   dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name)


InitStd = Callable[[tuple[str, ...], tuple[int, ...]], float]


def kaiming_fan_out_std(path: tuple[str, ...], shape: tuple[int, ...]) -> float:
    """Returns torchvision's conv init std, sqrt(2 / fan_out), for HWIO kernels (0 otherwise)."""
    if path[-1] != "kernel" or len(shape) != 4:
        return 0.0
    return float(np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])))


def random_init(module: nn.Module, rng: jax.Array, image_size: int, init_std: InitStd
                ) -> dict[str, Any]:
    """Returns {'params', 'batch_stats'} with kernels ~ N(0, init_std(path, shape)²).

    Leaves whose std is 0 are constants: BatchNorm/LayerNorm scales and running variances 1,
    biases and means 0. All random numbers come from one `jax.random.normal` call, which
    compiles in seconds where `module.init` compiles one generator per parameter (minutes for
    ResNet-50 on a small CPU).
    """
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    shapes = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    flat = traverse_util.flatten_dict(shapes)
    stds = {path: init_std(path, tuple(s.shape)) for path, s in flat.items()}
    total = sum(int(np.prod(flat[p].shape)) for p in flat if stds[p] > 0)

    @jax.jit
    def fill(key: jax.Array) -> dict:
        noise, offset, out = jax.random.normal(key, (total,), jnp.float32), 0, {}
        for path, spec in flat.items():
            if stds[path] > 0:
                size = int(np.prod(spec.shape))
                out[path] = (noise[offset:offset + size].reshape(spec.shape)
                             * stds[path]).astype(spec.dtype)
                offset += size
            else:
                one = path[-1] in ("scale", "var")
                out[path] = jnp.full(spec.shape, 1.0 if one else 0.0, spec.dtype)
        return out

    variables = traverse_util.unflatten_dict(fill(rng))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


# ----------------------------------------------------------------------------- the registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What the package needs to know of a backbone: register one with `register_backbone`.

    build(num_classes=, layers=, dtype=, **family kwargs) returns the Flax module; its
    `apply(variables, x_normalised, train=False)` returns (logits (B, K) float32, {layer: NHWC
    map}) for the requested `layers`, each map passed through `tap(module, layer, map)`, and
    the module has a field `arch` equal to `name`. `train=True` means BatchNorm on batch
    statistics (axis `bn_axis_name` when given) and dropout on (rng 'dropout').
    """

    name: str
    build: Callable[..., nn.Module]
    default_layers: tuple[str, ...]  # TAME's layers, largest map first
    layer_names: tuple[str, ...]  # every name that can be requested, in forward order
    cam_layer: str  # the baselines' default layer (Grad-CAM & co.)
    init: Callable[[nn.Module, jax.Array, int], dict[str, Any]]  # (module, rng, image size)
    convert: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]  # (state, tmpl)
    mean: tuple[float, ...] = IMAGENET_MEAN  # input normalisation: (x - mean) / std, x in [0, 1]
    std: tuple[float, ...] = IMAGENET_STD
    # variables -> state dict in the naming `convert` reads; None: torchvision's generic naming
    export: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # () -> path of weights an installed package ships (no network); used when
    # config.model.backbone_weights is "" or "packaged". Raises ImportError naming the pip
    # command when that package is missing.
    default_weights: Callable[[], str] | None = None
    image_size: int = 224  # the input size its weights were trained at


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds a backbone to the registry (replacing one of the same name); returns the spec."""
    missing = [layer for layer in (*spec.default_layers, spec.cam_layer)
               if layer not in spec.layer_names]
    if missing:
        raise ValueError(f"backbone {spec.name!r}: layers {missing} are not in its layer_names")
    BACKBONES[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    """Returns the registered spec of backbone `name`; ValueError listing valid names if none."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}. Valid backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]
