"""Vision transformers (ViT) in Flax Linen, torchvision's layout: the T-TAME backbones.

Parameters follow torchvision's `VisionTransformer` (`conv_proj`, `class_token`,
`encoder.pos_embedding`, `encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp}`,
`encoder.ln`, `heads.head`). The forward pass returns `(logits, {layer: NHWC map})` like the
CNNs: a token layer's map is its patch tokens (the class token dropped) reshaped to
(B, g, g, C), g = image size / patch size. The map is tapped (`common.tap`) and put back into
the token sequence, so the CAM baselines' gradients and channel ablations act on exactly that
map, and the attention module, the train step and the CAMs see an NHWC map as for a CNN.

Layer names are torchvision module names: `conv_proj` (the patch embedding, already a map), and
per block i `encoder.layers.encoder_layer_i.ln_1`, `...ln_2` and `encoder.layers.encoder_layer_i`
(the block output), and `encoder.ln` (the final norm). T-TAME names its taps by torchvision FX
node names, where node `...encoder_layer_i.ln` is module `ln_1` and node `...ln_1` is module
`ln_2`: the node name `...ln` is accepted as an alias of `ln_1`; `...ln_1` always means the module
`ln_1` (module names win where the two schemes collide).

Resolution: position embeddings are made for the image size the variables were created at
(`init_backbone(module, rng, size)`); weight files made at another size are interpolated when
loaded into such a template (bicubic, align_corners=True, as torchvision's
`interpolate_embeddings`). Images must be square with a side divisible by the patch size.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tame_jax import weights
from tame_jax.backbones.common import (
    BackboneSpec,
    check_layers,
    random_init,
    register_backbone,
    tap,
)

LN_EPS = 1e-6  # torchvision and timm ViTs: LayerNorm(eps=1e-6)
TIMM_MEAN = TIMM_STD = (0.5, 0.5, 0.5)  # timm's augreg ViT weights


@dataclasses.dataclass(frozen=True)
class ViTArch:
    """A ViT's shape: patch size, blocks, heads, width (hidden_dim) and MLP width."""

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int


# torchvision's builders (vit_b_16 ...) and timm's names of the same architectures.
TORCHVISION_ARCHS = {
    "vit_b_16": ViTArch(16, 12, 12, 768, 3072),
    "vit_b_32": ViTArch(32, 12, 12, 768, 3072),
    "vit_l_16": ViTArch(16, 24, 16, 1024, 4096),
    "vit_l_32": ViTArch(32, 24, 16, 1024, 4096),
    "vit_h_14": ViTArch(14, 32, 16, 1280, 5120),
}
TIMM_ARCHS = {
    "vit_tiny_patch16_224": ViTArch(16, 12, 3, 192, 768),
    "vit_small_patch16_224": ViTArch(16, 12, 6, 384, 1536),
    "vit_base_patch16_224": ViTArch(16, 12, 12, 768, 3072),
    "vit_base_patch32_224": ViTArch(32, 12, 12, 768, 3072),
    "vit_large_patch16_224": ViTArch(16, 24, 16, 1024, 4096),
}
# The demo's small ViT (patch 16, width 64, 4 blocks, 4 heads; 8x8 maps at 128 px): not a
# standard model. Patch 8 (16x16 maps) trained ~11x slower on the 2-core CPU the asset is made on.
DEMO_ARCHS = {"vit_mini_16": ViTArch(16, 4, 4, 64, 256)}
ARCHS = {**TORCHVISION_ARCHS, **TIMM_ARCHS, **DEMO_ARCHS}


def block_name(i: int) -> str:
    """Returns torchvision's module name of encoder block i."""
    return f"encoder.layers.encoder_layer_{i}"


def vit_layer_names(num_layers: int, aliases: bool = True) -> tuple[str, ...]:
    """Returns every requestable layer name of a ViT with num_layers blocks, in forward order.

    With aliases, T-TAME's FX node name `...encoder_layer_i.ln` follows each block's `ln_1`.
    """
    names = ["conv_proj"]
    for i in range(num_layers):
        names.append(f"{block_name(i)}.ln_1")
        if aliases:
            names.append(f"{block_name(i)}.ln")
        names += [f"{block_name(i)}.ln_2", block_name(i)]
    return tuple(names + ["encoder.ln"])


def canonical_layer(name: str) -> str:
    """Returns the module name a requested layer name stands for (T-TAME's `...ln` -> `...ln_1`)."""
    return name + "_1" if re.fullmatch(r"encoder\.layers\.encoder_layer_\d+\.ln", name) else name


# ----------------------------------------------------------------------------- modules


class SelfAttention(nn.Module):
    """torchvision's nn.MultiheadAttention(batch_first=True) as self-attention, fused in_proj.

    Attention logits and the softmax are float32 whatever the compute dtype.
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the attention output (B, N, C) of tokens x (B, N, C)."""
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        qkv = dense(3 * c, name="in_proj")(x).reshape(b, n, 3, h, d)  # q, k, v; heads contiguous
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, h, d) each
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (1.0 / math.sqrt(d)), axis=-1)  # (B, h, N, N) float32
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, n, c)
        return dense(c, name="out_proj")(out)


class MLPBlock(nn.Module):
    """torchvision's MLPBlock: Linear, exact GELU, Linear (state-dict entries mlp.0 / mlp.3)."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the MLP output (B, N, C) of x (B, N, C)."""
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        y = jax.nn.gelu(dense(self.mlp_dim, name="linear_1")(x), approximate=False)
        return dense(x.shape[-1], name="linear_2")(y)


Taps = Callable[[str, jax.Array], jax.Array]


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)); taps ln_1 and ln_2."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, taps: Taps) -> jax.Array:
        """Returns the block output (B, N, C); `taps(layer, tokens)` may perturb ln_1 / ln_2."""
        prefix = f"encoder.layers.{self.name}"
        norm = partial(nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype, param_dtype=jnp.float32)
        y = taps(f"{prefix}.ln_1", norm(name="ln_1")(x))
        x = x + SelfAttention(self.num_heads, self.dtype, name="self_attention")(y)
        y = taps(f"{prefix}.ln_2", norm(name="ln_2")(x))
        return x + MLPBlock(self.mlp_dim, self.dtype, name="mlp")(y)


class EncoderLayers(nn.Module):
    """torchvision's `encoder.layers`: blocks encoder_layer_0 ... encoder_layer_{n-1}."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, taps: Taps) -> jax.Array:
        """Returns the tokens (B, N, C) after every block, each block output passed to taps."""
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype,
                             name=f"encoder_layer_{i}")(x, taps)
            x = taps(block_name(i), x)
        return x


class Encoder(nn.Module):
    """torchvision's `encoder`: + pos_embedding, the blocks, the final LayerNorm `ln`."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, taps: Taps) -> jax.Array:
        """Returns the normalised tokens (B, N, C) of the token sequence x (B, N, C)."""
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]),
                         jnp.float32)
        x = x + pos.astype(self.dtype)
        x = EncoderLayers(self.num_layers, self.num_heads, self.mlp_dim, self.dtype,
                          name="layers")(x, taps)
        return taps("encoder.ln", nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                               param_dtype=jnp.float32, name="ln")(x))


class Heads(nn.Module):
    """torchvision's `heads`: the classifier `head` on the class token."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits (B, K) of class tokens x (B, C)."""
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.zeros, name="head")(x)


def check_image_size(arch: str, height: int, width: int, patch: int) -> int:
    """Returns the patch grid side g of an (height, width) input; ValueError if none fits."""
    if height != width:
        raise ValueError(
            f"{arch}: the image is {height}x{width}, but a ViT here needs a square image (its "
            "patch grid becomes a square g x g map). Use square crops (config.data.image_size).")
    if height % patch:
        lo, hi = height // patch * patch, (height // patch + 1) * patch
        raise ValueError(
            f"{arch}: image size {height} is not a multiple of the patch size {patch}, so the "
            f"{patch}x{patch} patches do not tile it. Use a multiple of {patch} (e.g. "
            f"{lo or hi} or {hi}).")
    return height // patch


class ViT(nn.Module):
    """torchvision's VisionTransformer; returns (logits (B, K) float32, {layer: (B, g, g, C)}).

    `arch` picks the shape (`ARCHS`); `patch_size`, `num_layers`, `num_heads`, `hidden_dim` and
    `mlp_dim` override it (tests build small ViTs so). No dropout and no BatchNorm: `train` only
    keeps the backbone contract.
    """

    arch: str = "vit_b_16"
    num_classes: int = 1000
    layers: tuple[str, ...] = ()
    dtype: Any = jnp.float32
    patch_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    hidden_dim: int | None = None
    mlp_dim: int | None = None

    def shape(self) -> ViTArch:
        """Returns the architecture: the registered one with this module's overrides."""
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(ViTArch)
                     if getattr(self, f.name) is not None}
        return dataclasses.replace(ARCHS[self.arch], **overrides)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns logits (B, K) float32 and the requested maps for x (B, H, W, 3) normalised."""
        del train  # torchvision's ViTs have dropout 0 and no BatchNorm
        a = self.shape()
        layers = check_layers(self.arch, self.layers, vit_layer_names(a.num_layers))
        wanted: dict[str, list[str]] = {}
        for name in layers:
            wanted.setdefault(canonical_layer(name), []).append(name)
        b, height, width, _ = x.shape
        g = check_image_size(self.arch, height, width, a.patch_size)
        self._check_positions(g)
        c = a.hidden_dim
        maps: dict[str, jax.Array] = {}

        def tap_map(layer: str, fmap: jax.Array) -> jax.Array:  # fmap (B, g, g, C)
            for name in wanted.get(layer, ()):
                fmap = tap(self, name, fmap)
                maps[name] = fmap
            return fmap

        def taps(layer: str, tokens: jax.Array) -> jax.Array:  # tokens (B, 1 + g*g, C)
            if layer not in wanted:
                return tokens
            fmap = tap_map(layer, tokens[:, 1:].reshape(b, g, g, c))  # class token dropped
            return jnp.concatenate([tokens[:, :1], fmap.reshape(b, g * g, c)], axis=1)

        x = nn.Conv(c, (a.patch_size, a.patch_size), strides=a.patch_size, padding="VALID",
                    dtype=self.dtype, param_dtype=jnp.float32, name="conv_proj")(
                        jnp.asarray(x, self.dtype))  # (B, g, g, C)
        x = tap_map("conv_proj", x)
        cls = self.param("class_token", nn.initializers.zeros, (1, 1, c), jnp.float32)
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c)),
                                  x.reshape(b, g * g, c)], axis=1)  # (B, 1 + g*g, C)
        tokens = Encoder(a.num_layers, a.num_heads, a.mlp_dim, self.dtype,
                         name="encoder")(tokens, taps)
        logits = Heads(self.num_classes, self.dtype, name="heads")(tokens[:, 0])
        return logits.astype(jnp.float32), {name: maps[name] for name in layers}

    def _check_positions(self, g: int) -> None:
        """Raises ValueError when the stored position embeddings are for another patch grid."""
        stored = self.variables.get("params", {}).get("encoder", {}).get("pos_embedding")
        if stored is None or stored.shape[1] == g * g + 1:
            return
        side = math.isqrt(stored.shape[1] - 1)
        p = self.shape().patch_size
        raise ValueError(
            f"{self.arch}: the variables' position embeddings are for a {side}x{side} patch grid "
            f"(image size {side * p}) but the input gives {g}x{g} (image size {g * p}). Make "
            f"the variables at the input's size: init_backbone(module, rng, {g * p}) as the "
            "template of load_backbone_weights interpolates a weight file's embeddings to it "
            "(config.data.image_size does this for the CLIs).")


# ----------------------------------------------------------------------------- init and weights


def _init_std(path: tuple[str, ...], shape: tuple[int, ...]) -> float:
    """Returns torchvision's ViT init std per leaf (uniform inits as their std; 0 = constant).

    conv_proj: trunc-normal std sqrt(1/fan_in); pos_embedding N(0, 0.02); class token and
    head 0; in_proj and MLP linears Xavier-uniform (std sqrt(2/(fan_in+fan_out))), MLP biases
    N(0, 1e-6); out_proj U(+-1/sqrt(fan_in)); LayerNorms 1 and 0.
    """
    leaf, module = path[-1], (path[-2] if len(path) > 1 else "")
    if leaf == "pos_embedding":
        return 0.02
    if leaf == "kernel" and len(shape) == 4:
        return float(np.sqrt(1.0 / (shape[0] * shape[1] * shape[2])))
    if leaf == "kernel" and module == "out_proj":
        return float(1.0 / np.sqrt(3.0 * shape[0]))
    if leaf == "kernel" and module in ("in_proj", "linear_1", "linear_2"):
        return float(np.sqrt(2.0 / (shape[0] + shape[1])))
    if leaf == "bias" and module in ("linear_1", "linear_2"):
        return 1e-6
    return 0.0  # class_token, head, LayerNorm, other biases


_MLP_INDEX = {"linear_1": "0", "linear_2": "3"}  # torchvision's MLPBlock is a Sequential


def vit_key(collection: str, path: tuple[str, ...]) -> str:
    """Returns the torchvision state-dict name of a ViT's Flax leaf, e.g.
    params/encoder/layers/encoder_layer_9/self_attention/in_proj/kernel ->
    encoder.layers.encoder_layer_9.self_attention.in_proj_weight."""
    *modules, leaf = path
    if leaf in ("class_token", "pos_embedding"):
        return ".".join([*modules, leaf])
    suffix = weights.LEAF_NAMES[(collection, leaf)]
    if modules[-1] == "in_proj":  # nn.MultiheadAttention's fused in_proj_weight / in_proj_bias
        return ".".join(modules[:-1]) + f".in_proj_{suffix}"
    modules = [_MLP_INDEX.get(m, m) if i and modules[i - 1] == "mlp" else m
               for i, m in enumerate(modules)]
    return ".".join([*modules, suffix])


def flax_to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the torchvision-layout state dict of ViT variables (inverse of `convert`)."""
    return weights.export_state_dict(variables, vit_key)


# timm's ViT names (vit_base_patch16_224 ...) -> torchvision's, as regex substitutions.
_TIMM_RULES = (
    (r"^cls_token$", "class_token"),
    (r"^pos_embed$", "encoder.pos_embedding"),
    (r"^patch_embed\.proj\.", "conv_proj."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.encoder_layer_\1.ln_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.encoder_layer_\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$",
     r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.encoder_layer_\1.mlp.3."),
    (r"^norm\.", "encoder.ln."),
    (r"^head\.", "heads.head."),
)


def is_timm(state_dict: Mapping[str, Any]) -> bool:
    """Returns whether a ViT state dict uses timm's names (patch_embed, blocks.N, cls_token)."""
    return any(k.startswith(("patch_embed.", "blocks.")) or k == "cls_token" for k in state_dict)


def from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a timm ViT state dict renamed to torchvision's names (same tensors: timm's fused
    qkv is torchvision's in_proj, q | k | v with heads contiguous)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _TIMM_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Returns the 4 cubic-convolution weights (n, 4) of fractional offsets t (PyTorch's A)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Returns the (n_out, n_in) matrix of PyTorch's bicubic resize, align_corners=True
    (A = -0.75, border indices clamped), float64."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out) * scale
    i0 = np.floor(src).astype(int)
    w = _cubic_weights(src - i0)  # (n_out, 4)
    m = np.zeros((n_out, n_in))
    for k in range(4):
        np.add.at(m, (np.arange(n_out), np.clip(i0 - 1 + k, 0, n_in - 1)), w[:, k])
    return m


def resize_pos_embedding(pos: np.ndarray, num_tokens: int) -> np.ndarray:
    """Returns position embeddings (1, N, C) resized to num_tokens = g*g + 1 tokens: the class
    token's kept, the patch grid resized bicubically as torchvision's interpolate_embeddings."""
    pos = np.asarray(pos)
    if pos.shape[1] == num_tokens:
        return pos
    side, new = math.isqrt(pos.shape[1] - 1), math.isqrt(num_tokens - 1)
    if side * side != pos.shape[1] - 1 or new * new != num_tokens - 1:
        raise ValueError(f"position embeddings of {pos.shape[1]} and {num_tokens} tokens are not "
                         "a class token plus a square patch grid; cannot resize them")
    grid = pos[0, 1:].reshape(side, side, -1).astype(np.float64)
    m = bicubic_matrix(side, new)
    grid = np.einsum("ij,jkc,lk->ilc", m, grid, m).reshape(1, new * new, -1)
    return np.concatenate([pos[:, :1], grid.astype(pos.dtype)], axis=1)


def convert(arch: str, state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
    """Returns ViT variables like `template` from a torchvision or timm (detected by its key
    names) state dict; position embeddings are resized to the template's patch grid."""
    state = dict(state_dict)
    if is_timm(state):
        if arch in TORCHVISION_ARCHS:
            warnings.warn(
                f"Loading timm-named ViT weights into {arch!r}, which normalises inputs with "
                "ImageNet's mean/std. timm's augreg ViTs expect mean = std = 0.5: for those use "
                f"the timm-named backbone ({', '.join(TIMM_ARCHS)}); DeiT weights do use "
                "ImageNet's statistics.", stacklevel=2)
        state = from_timm(state)
    # torchvision < 0.13 named the MLP linear_1 / linear_2 (its loader still accepts them)
    state = {re.sub(r"\.mlp\.linear_([12])\.",
                    lambda m: ".mlp." + _MLP_INDEX[f"linear_{m.group(1)}"] + ".", k): v
             for k, v in state.items()}
    want = template.get("params", {}).get("encoder", {}).get("pos_embedding")
    if want is not None and "encoder.pos_embedding" in state:
        state["encoder.pos_embedding"] = resize_pos_embedding(state["encoder.pos_embedding"],
                                                              want.shape[1])
    return weights.convert_state_dict(
        state, template, vit_key,
        title=f"The state dict does not fit backbone {arch!r}:",
        hint="Check the backbone name (e.g. vit_b_16 vs vit_b_32 vs vit_l_16; timm names such "
             "as vit_base_patch16_224) and num_classes against the file.")


def _register() -> None:
    """Registers every ViT of `ARCHS` (T-TAME's taps: ln_1 of the last three blocks)."""
    for name, a in ARCHS.items():
        last = a.num_layers - 1
        timm = name in TIMM_ARCHS
        register_backbone(BackboneSpec(
            name=name,
            build=partial(ViT, arch=name),
            default_layers=tuple(f"{block_name(i)}.ln_1" for i in (last - 2, last - 1, last)),
            layer_names=vit_layer_names(a.num_layers),
            cam_layer=f"{block_name(last)}.ln_1",  # pytorch-grad-cam's ViT target: blocks[-1].norm1
            init=partial(random_init, init_std=_init_std),
            convert=partial(convert, name),
            export=flax_to_torchvision,
            **({"mean": TIMM_MEAN, "std": TIMM_STD} if timm else {}),
        ))


_register()
