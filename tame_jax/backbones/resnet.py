"""ResNet-18/34/50/101/152 in Flax Linen, torchvision layout (v1.5: stride on the 3x3 conv).

Also holds the small helpers shared by all backbones (feature taps, layer-name checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
PERTURBATIONS = "perturbations"


def perturb_name(layer: str) -> str:
    """Returns the name of the variable in the 'perturbations' collection for a feature layer.

    It is the torchvision name with '.' -> '_' plus '_out' ("layer4" -> "layer4_out",
    "features.30" -> "features_30_out"); the suffix keeps it apart from the submodule of the
    same name (a Flax scope cannot hold a child and a variable both called "conv1").
    """
    return layer.replace(".", "_") + "_out"


def tap(module: nn.Module, layer: str, x: jnp.ndarray) -> jnp.ndarray:
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
            f"Unknown layer name(s) {bad} for backbone {arch!r}. Valid names (torchvision "
            f"module names): {', '.join(valid)}"
        )
    return tuple(dict.fromkeys(layers))


class _Features:
    """Collects the requested feature maps while the forward pass runs."""

    def __init__(self, module: nn.Module, wanted: Sequence[str]):
        self.module, self.wanted, self.maps = module, set(wanted), {}

    def __call__(self, layer: str, x: jnp.ndarray) -> jnp.ndarray:
        """Returns x, perturbed and recorded when `layer` is requested."""
        if layer in self.wanted:
            x = tap(self.module, layer, x)
            self.maps[layer] = x
        return x


def _conv(dtype: Any):
    return partial(nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=CONV_INIT)


def _bn(train: bool, dtype: Any, axis_name: str | None):
    # PyTorch BatchNorm2d: eps 1e-5, momentum 0.1 (= flax momentum 0.9).
    return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name)


PAD1 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
    """torchvision BasicBlock: two 3x3 convs (stride on the first) plus identity."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Returns the block output (B, H/stride, W/stride, planes)."""
        conv, bn = _conv(self.dtype), _bn(train, self.dtype, self.bn_axis_name)
        out = conv(self.planes, (3, 3), self.stride, padding=PAD1, name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out))
        out = conv(self.planes, (3, 3), 1, padding=PAD1, name="conv2")(out)
        out = bn(name="bn2")(out)
        if self.downsample:
            x = conv(self.planes, (1, 1), self.stride, padding="VALID", name="downsample_0")(x)
            x = bn(name="downsample_1")(x)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1, 3x3 (with the stride), 1x1 x4 channels."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Returns the block output (B, H/stride, W/stride, 4 * planes)."""
        conv, bn = _conv(self.dtype), _bn(train, self.dtype, self.bn_axis_name)
        out = conv(self.planes, (1, 1), 1, padding="VALID", name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out))
        out = conv(self.planes, (3, 3), self.stride, padding=PAD1, name="conv2")(out)
        out = nn.relu(bn(name="bn2")(out))
        out = conv(self.planes * 4, (1, 1), 1, padding="VALID", name="conv3")(out)
        out = bn(name="bn3")(out)
        if self.downsample:
            x = conv(self.planes * 4, (1, 1), self.stride, padding="VALID",
                     name="downsample_0")(x)
            x = bn(name="downsample_1")(x)
        return nn.relu(out + x)


RESNET_CONFIGS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def resnet_layer_names(stage_sizes: Sequence[int]) -> tuple[str, ...]:
    """Returns every requestable layer name of a ResNet, in forward order."""
    names = ["conv1", "bn1", "relu", "maxpool"]
    for k, n in enumerate(stage_sizes, start=1):
        names += [f"layer{k}.{m}" for m in range(n)] + [f"layer{k}"]
    return tuple(names + ["avgpool"])


class ResNet(nn.Module):
    """torchvision ResNet; `__call__` returns (logits (B, K) float32, {layer: (B, h, w, C)}).

    `width` is the stem/base width (torchvision: 64); stages have width * (1, 2, 4, 8) planes.
    """

    arch: str = "resnet50"
    num_classes: int = 1000
    layers: tuple[str, ...] = ("layer2", "layer3", "layer4")
    width: int = 64
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False
    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Returns logits (B, K) float32 and the requested feature maps for x (B, H, W, 3)."""
        block, stage_sizes = RESNET_CONFIGS[self.arch]
        layers = check_layers(self.arch, self.layers, resnet_layer_names(stage_sizes))
        feats = _Features(self, layers)
        conv, bn = _conv(self.dtype), _bn(train, self.dtype, self.bn_axis_name)

        x = jnp.asarray(x, self.dtype)
        x = feats("conv1", conv(self.width, (7, 7), 2, padding=((3, 3), (3, 3)),
                                name="conv1")(x))  # (B, H/2, W/2, width)
        x = feats("bn1", bn(name="bn1")(x))
        x = feats("relu", nn.relu(x))
        x = feats("maxpool", nn.max_pool(x, (3, 3), (2, 2), padding=PAD1))  # (B, H/4, W/4, .)
        in_ch = self.width
        for k, n_blocks in enumerate(stage_sizes, start=1):
            planes = self.width * 2 ** (k - 1)
            for m in range(n_blocks):
                stride = 2 if (k > 1 and m == 0) else 1
                downsample = m == 0 and (stride != 1 or in_ch != planes * block.expansion)
                x = block(planes, stride, downsample, self.dtype, self.bn_axis_name,
                          name=f"layer{k}_{m}")(x, train)
                x = feats(f"layer{k}.{m}", x)
                in_ch = planes * block.expansion
            x = feats(f"layer{k}", x)  # (B, H/2^(k+1), W/2^(k+1), in_ch)
        x = feats("avgpool", jnp.mean(x, axis=(1, 2), keepdims=True))  # (B, 1, 1, C)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                          name="fc")(x.reshape(x.shape[0], -1))
        return logits.astype(jnp.float32), {name: feats.maps[name] for name in layers}
