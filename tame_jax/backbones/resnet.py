"""ResNet-18/34/50/101/152 in Flax Linen, torchvision layout (v1.5: stride on the 3x3 conv)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tame_jax import weights
from tame_jax.backbones.common import (
    PAD1,
    BackboneSpec,
    FeatureTaps,
    batch_norm,
    check_layers,
    conv,
    kaiming_fan_out_std,
    max_pool,
    random_init,
    register_backbone,
)


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
        conv_, bn = conv(self.dtype), batch_norm(train, self.dtype, self.bn_axis_name)
        out = conv_(self.planes, (3, 3), self.stride, padding=PAD1, name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out))
        out = conv_(self.planes, (3, 3), 1, padding=PAD1, name="conv2")(out)
        out = bn(name="bn2")(out)
        if self.downsample:
            x = conv_(self.planes, (1, 1), self.stride, padding="VALID", name="downsample_0")(x)
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
        conv_, bn = conv(self.dtype), batch_norm(train, self.dtype, self.bn_axis_name)
        out = conv_(self.planes, (1, 1), 1, padding="VALID", name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out))
        out = conv_(self.planes, (3, 3), self.stride, padding=PAD1, name="conv2")(out)
        out = nn.relu(bn(name="bn2")(out))
        out = conv_(self.planes * 4, (1, 1), 1, padding="VALID", name="conv3")(out)
        out = bn(name="bn3")(out)
        if self.downsample:
            x = conv_(self.planes * 4, (1, 1), self.stride, padding="VALID",
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
        feats = FeatureTaps(self, layers)
        conv_, bn = conv(self.dtype), batch_norm(train, self.dtype, self.bn_axis_name)

        x = jnp.asarray(x, self.dtype)
        x = feats("conv1", conv_(self.width, (7, 7), 2, padding=((3, 3), (3, 3)),
                                name="conv1")(x))  # (B, H/2, W/2, width)
        x = feats("bn1", bn(name="bn1")(x))
        x = feats("relu", nn.relu(x))
        x = feats("maxpool", max_pool(x, 3, 2, 1))  # (B, H/4, W/4, .)
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


def _init_std(path: tuple[str, ...], shape: tuple[int, ...]) -> float:
    """Returns torchvision's ResNet init std: kaiming fan-out convs; fc ~ U(+-1/sqrt(in))."""
    if path[-1] == "kernel" and len(shape) == 2:
        return float(1.0 / np.sqrt(3.0 * shape[0]))  # the std of that uniform
    return kaiming_fan_out_std(path, shape)



for _name, (_, _stages) in RESNET_CONFIGS.items():
    register_backbone(BackboneSpec(
        name=_name,
        build=partial(ResNet, arch=_name),
        default_layers=("layer2", "layer3", "layer4"),
        layer_names=resnet_layer_names(_stages),
        cam_layer="layer4",
        init=partial(random_init, init_std=_init_std),
        convert=partial(weights.torchvision_to_flax, _name),
    ))
