"""The frozen backbone's fast path: BatchNorm folded into the convolutions, and the kernels of
the input-gradient convolutions prepared once, when the model is built.

A frozen backbone (BatchNorm on its stored statistics, DESIGN §1 "Backbone mode") computes
conv -> BN as one affine map per channel, so each BN that follows a convolution is folded into
it: kernel' = kernel * s, bias' = (bias - mean) * s + beta, s = scale / sqrt(var + eps). The
gradient w.r.t. a convolution's input (the masked forward's backward, the CAMs' gradients) is
a convolution with the kernel flipped and its in/out channels swapped; XLA transposes every
kernel on every step for it, so the flipped kernels are stored beside the folded ones and a
custom VJP uses them.

Generic over module structure: `make_plan` traces the backbone once (shapes only) with a Flax
method interceptor and pairs every `nn.BatchNorm` whose input is the output of an `nn.Conv`
(ResNets, VGG-BN, any family built from `nn.Conv` and `nn.BatchNorm`); every `nn.Conv` gets
the prepared input-gradient kernel. A convolution whose output is a requested feature map
(e.g. ResNet's `conv1`, a VGG-BN `features.N` conv output) is left as it is, since folding
would change that map. The contract: a folded convolution's output feeds only its BatchNorm
(true of every registered family). Weights are frozen on this path: it differentiates w.r.t.
the input only (the weight cotangents are zero).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class ConvEntry:
    """One convolution of the fast path: where it is, its geometry, and its folded BatchNorm."""

    conv: tuple[str, ...]  # module path of the nn.Conv
    bn: tuple[str, ...] | None  # module path of the BatchNorm folded into it, if any
    taps: tuple[str, ...]  # layer names whose map is this conv's (unfolded) output
    strides: tuple[int, int]
    padding: str | tuple[tuple[int, int], ...]
    dilation: tuple[int, int]
    groups: int
    epsilon: float = 0.0  # the BatchNorm's

    @property
    def key(self) -> str:
        """Returns the entry's key in the folded variables ('layer1_0/conv1')."""
        return "/".join(self.conv)


@dataclasses.dataclass(frozen=True)
class FrozenPlan:
    """The static part of the fast path: which convolutions, and which BatchNorms are folded."""

    entries: tuple[ConvEntry, ...]

    def without_taps(self, layers: Sequence[str]) -> FrozenPlan:
        """Returns the plan minus the convolutions whose output is one of `layers`."""
        return FrozenPlan(tuple(e for e in self.entries if not set(e.taps) & set(layers)))

    @functools.cached_property
    def by_conv(self) -> dict[tuple[str, ...], ConvEntry]:
        """Returns {conv path: entry}."""
        return {e.conv: e for e in self.entries}

    @functools.cached_property
    def folded_bns(self) -> frozenset[tuple[str, ...]]:
        """Returns the paths of the folded BatchNorms (identities on this path)."""
        return frozenset(e.bn for e in self.entries if e.bn is not None)


def _pair(v: Any) -> tuple[int, int]:
    """Returns an int or a 2-sequence (None: 1) as a pair of ints."""
    if v is None:
        return (1, 1)
    if isinstance(v, int):
        return (v, v)
    return tuple(int(a) for a in v)  # type: ignore[return-value]


def _entry_of(conv: nn.Conv, bn: nn.BatchNorm | None, taps: tuple[str, ...]) -> ConvEntry | None:
    """Returns the entry of a 2-D NHWC nn.Conv (folding bn), None where the path can't take it."""
    if len(conv.kernel_size) != 2 or conv.mask is not None or _pair(conv.input_dilation) != (1, 1):
        return None
    padding = canonicalize_padding(conv.padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return None
    else:
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if bn is not None and (bn.axis not in (-1, 3) or bn.use_running_average is False):
        bn = None
    return ConvEntry(conv=tuple(conv.path), bn=None if bn is None else tuple(bn.path),
                     taps=taps, strides=_pair(conv.strides), padding=padding,
                     dilation=_pair(conv.kernel_dilation), groups=int(conv.feature_group_count),
                     epsilon=0.0 if bn is None else float(bn.epsilon))


def make_plan(module: nn.Module, variables: Mapping[str, Any], image_size: int,
              layer_names: Sequence[str]) -> FrozenPlan:
    """Returns the fast-path plan of a backbone module (traced once, shapes only).

    layer_names: every layer the module can tap (the spec's); the trace requests them all, so
    that each entry knows which layer names would see its convolution's output.
    """
    probe = module.clone(layers=tuple(layer_names))
    found: list[ConvEntry] = []

    def trace(variables: Any) -> None:
        convs: list[tuple[nn.Conv, Any]] = []  # (module, output) in call order
        bns: list[tuple[nn.BatchNorm, Any]] = []  # (module, input)

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                if isinstance(context.module, nn.Conv):
                    convs.append((context.module, out))
                elif isinstance(context.module, nn.BatchNorm) and not kwargs and len(args) == 1:
                    bns.append((context.module, args[0]))
            return out

        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        with nn.intercept_methods(record):
            _, maps = probe.apply(variables, x, train=False)
        for conv, out in convs:
            readers = [m for m, inp in bns if inp is out]
            bn = readers[0] if len(readers) == 1 else None  # two BNs on one conv: fold none
            taps = tuple(name for name, m in maps.items() if m is out)
            entry = _entry_of(conv, bn, taps)
            if entry is not None:
                found.append(entry)

    jax.eval_shape(trace, {k: v for k, v in variables.items() if k in ("params", "batch_stats")})
    return FrozenPlan(tuple(found))


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    for name in path:
        tree = tree[name]
    return tree


def input_grad_kernel(kernel: jax.Array, groups: int) -> jax.Array:
    """Returns the kernel of the convolution that gives a convolution's input gradient.

    kernel (kh, kw, C_in/G, C_out) -> flipped spatially, in/out swapped within each of the G
    groups: (kh, kw, C_out/G, C_in).
    """
    kh, kw, i_g, c_out = kernel.shape
    w = kernel[::-1, ::-1].reshape(kh, kw, i_g, groups, c_out // groups)
    return jnp.transpose(w, (0, 1, 4, 3, 2)).reshape(kh, kw, c_out // groups, groups * i_g)


def fold(plan: FrozenPlan, variables: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """Returns {entry key: {'kernel', 'kernel_t', ['bias']}}: the folded kernels and biases
    and the input-gradient kernels of the plan's convolutions (float32, computed with jnp, so
    it also works on traced weights)."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    out = {}
    for e in plan.entries:
        conv = _get(params, e.conv)
        w = jnp.asarray(conv["kernel"], jnp.float32)
        b = jnp.asarray(conv["bias"], jnp.float32) if "bias" in conv else None
        if e.bn is not None:
            bn, st = _get(params, e.bn), _get(stats, e.bn)
            s = jax.lax.rsqrt(jnp.asarray(st["var"], jnp.float32) + e.epsilon)
            if "scale" in bn:
                s = s * bn["scale"]
            b = (0.0 if b is None else b) - st["mean"]
            b = b * s + (bn["bias"] if "bias" in bn else 0.0)
            w = w * s
        out[e.key] = {"kernel": w, "kernel_t": input_grad_kernel(w, e.groups)}
        if b is not None:
            out[e.key]["bias"] = b
    return out


@dataclasses.dataclass(frozen=True)
class _Geometry:
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], ...]  # explicit (lo, hi) per spatial dim
    dilation: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    precision: Any


def _is_pointwise(w: jax.Array, g: _Geometry) -> bool:
    """Returns whether the conv is a 1x1, unpadded, ungrouped one: a matmul over channels."""
    return (w.shape[:2] == (1, 1) and g.groups == 1
            and all(p == (0, 0) for p in g.padding))


def _conv(x: jax.Array, w: jax.Array, g: _Geometry) -> jax.Array:
    if _is_pointwise(w, g):  # XLA's CPU library runs a dot ~15% faster than the same 1x1 conv
        x = x[:, ::g.strides[0], ::g.strides[1]]
        return jnp.einsum("bhwc,cd->bhwd", x, w[0, 0], precision=g.precision)
    return jax.lax.conv_general_dilated(x, w, g.strides, g.padding, rhs_dilation=g.dilation,
                                        dimension_numbers=DIMENSION_NUMBERS,
                                        feature_group_count=g.groups, precision=g.precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def frozen_conv(x: jax.Array, w: jax.Array, w_t: jax.Array, g: _Geometry) -> jax.Array:
    """Returns conv(x, w); its VJP gives x's gradient through w_t = input_grad_kernel(w)."""
    return _conv(x, w, g)


def _frozen_conv_fwd(x, w, w_t, g):
    return _conv(x, w, g), (w, w_t)


def _frozen_conv_bwd(g: _Geometry, res, ct):
    w, w_t = res
    if _is_pointwise(w, g):  # a matmul, then back onto every stride-th pixel
        dx = jnp.einsum("bhwd,dc->bhwc", ct, w_t[0, 0].astype(ct.dtype), precision=g.precision)
        zero = jnp.zeros((), dx.dtype)
        pads = [(0, 0, 0)] + [(0, n - ((m - 1) * s + 1), s - 1) for n, m, s in
                              zip(g.in_hw, ct.shape[1:3], g.strides, strict=True)] + [(0, 0, 0)]
        return jax.lax.pad(dx, zero, pads), jnp.zeros_like(w), jnp.zeros_like(w_t)
    kh, kw = w.shape[:2]
    pads = []
    for n, k, s, d, (lo, _), m in zip(g.in_hw, (kh, kw), g.strides, g.dilation, g.padding,
                                      ct.shape[1:3], strict=True):
        k_eff = (k - 1) * d + 1
        before = k_eff - 1 - lo
        pads.append((before, n + k_eff - 1 - ((m - 1) * s + 1) - before))
    dx = jax.lax.conv_general_dilated(ct, w_t.astype(ct.dtype), (1, 1), pads,
                                      lhs_dilation=g.strides, rhs_dilation=g.dilation,
                                      dimension_numbers=DIMENSION_NUMBERS,
                                      feature_group_count=g.groups, precision=g.precision)
    return dx, jnp.zeros_like(w), jnp.zeros_like(w_t)  # frozen weights: dead code in XLA


frozen_conv.defvjp(_frozen_conv_fwd, _frozen_conv_bwd)


def _apply_conv(module: nn.Conv, entry: ConvEntry, folded: Mapping[str, jax.Array],
                x: jax.Array) -> jax.Array:
    """Returns what `module(x)` returns, from the folded kernel (and its BN's folded bias)."""
    w, w_t, b = folded["kernel"], folded["kernel_t"], folded.get("bias")
    dtype = module.dtype or jnp.result_type(x, w)
    x, w, w_t = x.astype(dtype), w.astype(dtype), w_t.astype(dtype)
    padding = entry.padding
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(w.shape[:2], entry.dilation, strict=True)]
        padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], window, entry.strides, padding))
    g = _Geometry(entry.strides, tuple(tuple(p) for p in padding), entry.dilation, entry.groups,
                  tuple(x.shape[1:3]), module.precision)
    y = frozen_conv(x, w, w_t, g)
    return y if b is None else y + b.astype(dtype)


def apply(module: nn.Module, variables: Mapping[str, Any], plan: FrozenPlan,
          folded: Mapping[str, Mapping[str, jax.Array]], *args: Any, **kwargs: Any) -> Any:
    """Returns module.apply(variables, *args, **kwargs) with the plan's convolutions computed
    from `folded` (see `fold`) and their BatchNorms skipped (frozen mode only)."""

    def intercept(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__" and len(call_args) == 1 and not call_kwargs:
            path = tuple(context.module.path)
            if isinstance(context.module, nn.BatchNorm) and path in plan.folded_bns:
                return call_args[0]
            entry = plan.by_conv.get(path) if isinstance(context.module, nn.Conv) else None
            if entry is not None:
                return _apply_conv(context.module, entry, folded[entry.key], call_args[0])
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(intercept):
        return module.apply(variables, *args, **kwargs)
