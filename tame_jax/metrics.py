"""Evaluation metrics for explanation maps: AD/IC, ROAD, insertion/deletion, localisation.

Everything is pure JAX, batched and jit-compilable: fractions and step counts are static Python
values, shapes are static. A classifier is passed as `classify(images) -> logits`, mapping
images (B, H, W, 3) in [0, 1] to logits (B, K) (it normalises inside). Maps are (B, H, W) at
image resolution, higher = more relevant; classes are (B,) ints.

Jit usage: close over the classifier, e.g.
`jax.jit(lambda x, m, c: ad_ic(classify, x, m, c))`, or pass it as a static argument.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Classifier = Callable[[jax.Array], jax.Array]

# 8-neighbourhood of the ROAD noisy linear imputation: (dy, dx, weight).
_NEIGHBOURS = (
    (-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
    (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Thresholding


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}; use 0.15 for 15%.")


def _num_kept(fraction: float, num_pixels: int) -> int:
    """Returns ceil(fraction * num_pixels), robust to float noise such as 0.7 * 100 = 70.0000001."""
    _check_fraction(fraction)
    return min(num_pixels, max(0, math.ceil(fraction * num_pixels - 1e-6)))


def _ranks(maps: jax.Array) -> jax.Array:
    """Returns (B, H*W) int ranks: 0 for the largest value, ties ordered by lower flat index."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1)  # (B, N)
    order = jnp.argsort(-flat, axis=1, stable=True)  # (B, N), descending, ties by index
    n = flat.shape[1]
    ranks = jnp.zeros_like(order)
    return jax.vmap(lambda r, o: r.at[o].set(jnp.arange(n, dtype=o.dtype)))(ranks, order)


@functools.partial(jax.jit, static_argnames=("fraction",))
def top_fraction_mask(maps: jax.Array, fraction: float) -> jax.Array:
    """Returns a bool (B, H, W) mask of the ceil(fraction*H*W) largest pixels of each map.

    Exactly that many pixels are True per image; ties are broken by flat index (lower first).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {maps.shape}; squeeze channels.")
    b, h, w = maps.shape
    k = _num_kept(fraction, h * w)
    return (_ranks(maps) < k).reshape(b, h, w)


def threshold_maps(maps: jax.Array, fraction: float) -> jax.Array:
    """Returns maps (B, H, W) kept on their top `fraction` of pixels and 0 elsewhere."""
    return jnp.where(top_fraction_mask(maps, fraction), maps, jnp.zeros_like(maps))


# ----------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence


def _class_probs(classify: Classifier, x: jax.Array, classes: jax.Array) -> jax.Array:
    """Returns the (B,) softmax probability of `classes` for images x (B, H, W, 3)."""
    logits = classify(x)  # (B, K)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probs, classes[:, None].astype(jnp.int32), axis=1)[:, 0]


def _percent_key(fraction: float) -> str:
    return f"{fraction * 100:g}"


def ad_ic_terms(base_probs: jax.Array, masked_probs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns per-image (drop, increase), (B,) each: max(0, Y-O)/Y and 1[O > Y] as floats."""
    y = base_probs.astype(jnp.float32)
    o = masked_probs.astype(jnp.float32)
    drop = jnp.maximum(y - o, 0.0) / jnp.maximum(y, jnp.finfo(jnp.float32).tiny)
    return drop, (o > y).astype(jnp.float32)


def ad_ic(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    fractions: Sequence[float] = (1.0, 0.5, 0.15),
) -> dict[str, jax.Array]:
    """Returns per-image AD/IC terms (B,) under keys "ad_100", "ic_100", "ad_50", ... .

    Y is the class probability on x, O on x * E where E keeps the map's values on its top
    fraction of pixels (soft values, zero elsewhere). Aggregate with `average_drop_increase`.
    """
    y = _class_probs(classify, x, classes)  # (B,)
    out = {}
    for fraction in fractions:
        e = threshold_maps(maps, fraction).astype(x.dtype)  # (B, H, W)
        o = _class_probs(classify, x * e[..., None], classes)  # (B,)
        drop, inc = ad_ic_terms(y, o)
        key = _percent_key(fraction)
        out[f"ad_{key}"] = drop
        out[f"ic_{key}"] = inc
    return out


def average_drop_increase(
    drops: jax.Array | np.ndarray,
    increases: jax.Array | np.ndarray,
    valid: jax.Array | np.ndarray | None = None,
) -> tuple[float, float]:
    """Returns (AD, IC) in percent: 100/N Σ drop and 100/N Σ increase over valid images.

    A host-side aggregate (returns Python floats); `valid` (N,) bool excludes padding images.
    """
    drops = np.asarray(drops, dtype=np.float64).reshape(-1)
    increases = np.asarray(increases, dtype=np.float64).reshape(-1)
    if drops.shape != increases.shape:
        raise ValueError(f"drops {drops.shape} and increases {increases.shape} differ in shape.")
    mask = np.ones_like(drops) if valid is None else np.asarray(valid, np.float64).reshape(-1)
    if mask.shape != drops.shape:
        raise ValueError(f"valid has shape {mask.shape}, expected {drops.shape}.")
    n = mask.sum()
    if n == 0:
        raise ValueError("No valid images to average over (valid is all False or empty).")
    return float(100.0 * (drops * mask).sum() / n), float(100.0 * (increases * mask).sum() / n)


# ----------------------------------------------------------------------------------------------
# ROAD


def _shift(v: jax.Array, dy: int, dx: int) -> jax.Array:
    """Returns s with s[:, i, j] = v[:, i+dy, j+dx] and 0 outside; v is (B, H, W, C)."""
    _, h, w, _ = v.shape
    p = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w, :]


def _neighbour_sum(v: jax.Array) -> jax.Array:
    """Returns Σ_j w_ij v_j over the existing 8 neighbours of every pixel; v is (B, H, W, C)."""
    return sum(w * _shift(v, dy, dx) for dy, dx, w in _NEIGHBOURS)


def _pad_even(v: jax.Array) -> jax.Array:
    _, h, w, _ = v.shape
    return jnp.pad(v, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def _block_sum(v: jax.Array) -> jax.Array:
    """Returns the sums of v (B, H, W, C) over 2x2 blocks (zero-padded to even size)."""
    v = _pad_even(v)
    b, h, w, c = v.shape
    return v.reshape(b, h // 2, 2, w // 2, 2, c).sum((2, 4))


def _upsample2(v: jax.Array, h: int, w: int) -> jax.Array:
    """Returns v (B, h', w', C) repeated 2x2 (nearest) and cropped to (B, h, w, C)."""
    return jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2)[:, :h, :w]


def _pull_push(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Returns a smooth fill of values (B, H, W, C) known where weights (B, H, W, 1) are 1.

    Pull: sum values and weights over 2x2 blocks up to a 1x1 pyramid top. Push: from the top
    down, each level keeps its own weighted mean where it has weight and takes the coarser
    level's (nearest-upsampled) estimate elsewhere. Used as the conjugate-gradient start, it
    removes the low-frequency error that CG would otherwise need O(hole diameter) steps for.
    """
    levels = []
    v, w = values, weights
    while v.shape[1] > 1 or v.shape[2] > 1:
        levels.append((v, w))
        v, w = _block_sum(v), _block_sum(w)
    est = v / jnp.maximum(w, 1e-12)
    for v, w in reversed(levels):
        est = jnp.where(w > 0, v / jnp.maximum(w, 1e-12), _upsample2(est, *v.shape[1:3]))
    return est


# A level of the multigrid hierarchy: (active (B, H, W, 1) in {0, 1}, diagonal (B, H, W, 1),
# off-diagonal couplings: a (B, H, W, 1) array per _NEIGHBOURS direction). The operator is
# (A v)_i = diag_i v_i - sum_d off_d[i] v_{i+d}; inactive cells are identity rows.
_Level = tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]
_SMOOTHING_WEIGHT = 0.8  # damped Jacobi; < 1 keeps the V-cycle positive definite here
# Piecewise-constant (2x2 aggregate) interpolation makes coarse operators too stiff, so coarse
# corrections come out too small; scaling them up halves the CG iterations (measured: 16 -> 8
# per refinement round on 128 px images with 90% removed) and stays convergent below 2.
_COARSE_OVERCORRECTION = 1.6


def _apply_level(level: _Level, v: jax.Array) -> jax.Array:
    _, diag, off = level
    return diag * v - sum(o * _shift(v, dy, dx)
                          for (dy, dx, _), o in zip(_NEIGHBOURS, off, strict=True))


def _coarsen(level: _Level) -> _Level:
    """Returns the Galerkin operator P^T A P for P = copy each 2x2 block's value to its cells."""
    active, diag, off = level
    active, diag, off = _pad_even(active), _pad_even(diag), [_pad_even(o) for o in off]
    dirs = [(dy, dx) for dy, dx, _ in _NEIGHBOURS]
    b, h, w, _ = active.shape
    active_c = active.reshape(b, h // 2, 2, w // 2, 2, 1).max((2, 4))
    diag_c = _block_sum(active * diag)
    off_c = [jnp.zeros_like(diag_c) for _ in dirs]
    for a in (0, 1):  # the fine cell's place in its block
        for c in (0, 1):
            for k, (dy, dx) in enumerate(dirs):
                coupling = off[k][:, a::2, c::2]
                block = ((a + dy) // 2, (c + dx) // 2)  # the neighbour's block, relative
                if block == (0, 0):  # inside the block: moves onto the diagonal
                    diag_c = diag_c - coupling
                else:
                    j = dirs.index(block)
                    off_c[j] = off_c[j] + coupling
    return active_c, jnp.where(active_c > 0, diag_c, 1.0), tuple(off_c)


def _v_cycle(levels: list[_Level], r: jax.Array, i: int = 0) -> jax.Array:
    """Returns an approximate solution of levels[i] x = r: a symmetric multigrid V-cycle."""
    active, diag, _ = levels[i]
    if i == len(levels) - 1:  # 1x1: exact
        return active * r / diag
    x = _SMOOTHING_WEIGHT * r / diag
    coarse = _v_cycle(levels, _block_sum(active * (r - _apply_level(levels[i], x))), i + 1)
    x = x + _COARSE_OVERCORRECTION * active * _upsample2(coarse, *r.shape[1:3])
    x = x + _SMOOTHING_WEIGHT * (r - _apply_level(levels[i], x)) / diag
    return active * x


def _multigrid(unknown: jax.Array, s: jax.Array) -> list[_Level]:
    """Returns the levels, fine to 1x1, of the imputation operator on the `unknown` cells."""
    off = tuple(wt * unknown * _shift(unknown, dy, dx) for dy, dx, wt in _NEIGHBOURS)
    levels = [(unknown, jnp.where(unknown > 0, s, 1.0), off)]
    while levels[-1][0].shape[1] > 1 or levels[-1][0].shape[2] > 1:
        levels.append(_coarsen(levels[-1]))
    return levels


@functools.partial(
    jax.jit, static_argnames=("noise_std", "num_iters", "refinements", "tol", "accuracy"))
def road_impute(
    x: jax.Array,
    removed: jax.Array,
    key: jax.Array,
    noise_std: float = 0.01,
    num_iters: int = 100,
    refinements: int = 3,
    tol: float = 1e-3,
    accuracy: float = 1e-5,
) -> jax.Array:
    """Returns x (B, H, W, C) with the `removed` (B, H, W) pixels filled by noisy linear imputation.

    Each removed pixel equals the weighted mean of its existing 8 neighbours (weights 1/6 direct,
    1/12 diagonal, renormalised over the neighbours inside the image); removed neighbours are
    unknowns of the same system; kept pixels keep their values. The system, one per image and
    channel, is written in its symmetric positive definite Laplacian form
    Σ_j w_ij (x_i - x_j) = 0 over the unknowns and solved matrix-free on the device.

    Solver: start from a multiscale (pull-push) fill of the kept pixels, then `refinements`
    rounds of iterative refinement; each round computes the true residual in the difference
    form above (so float32 rounding scales with local differences, not with pixel values) and
    solves for the correction by conjugate gradients preconditioned with a multigrid V-cycle
    (Galerkin coarse operators on 2x2 aggregates down to 1x1, one damped Jacobi sweep before
    and after each coarse correction), freezing each system once its residual is below `tol`
    times that round's starting residual or `accuracy` times the residual of a plain mean fill
    (whichever is larger), for at most `num_iters` iterations per round. It takes ~8
    iterations per round whatever the hole size (Jacobi-preconditioned CG needed O(H + W)),
    and matches a float64 direct solve to 1e-4.
    Gaussian noise of std `noise_std` is then added to the imputed pixels only (no clipping, as
    in ROAD). If nothing is kept in an image, its removed pixels become 0 (+ noise).
    """
    if x.ndim != 4 or removed.shape != x.shape[:3]:
        raise ValueError(f"x must be (B, H, W, C) and removed (B, H, W); got {x.shape}, "
                         f"{removed.shape}.")
    _, h, w, _ = x.shape
    xf = x.astype(jnp.float32)
    u = removed.astype(jnp.float32)[..., None]  # (B, H, W, 1), 1 = unknown
    known = 1.0 - u
    ones = jnp.ones((1, h, w, 1), jnp.float32)
    exists = [_shift(ones, dy, dx) for dy, dx, _ in _NEIGHBOURS]  # (1, H, W, 1) each
    s = _neighbour_sum(ones)  # (1, H, W, 1) weight sum of the existing neighbours
    levels = _multigrid(u, s)

    def residual(full: jax.Array) -> jax.Array:  # Σ_j w_ij (x_j - x_i) on the unknowns
        terms = (wt * e * (_shift(full, dy, dx) - full)
                 for (dy, dx, wt), e in zip(_NEIGHBOURS, exists, strict=True))  # fmt: skip
        return u * sum(terms)

    def matvec(v: jax.Array) -> jax.Array:  # v (B, H, W, C) supported on the unknowns
        return u * (s * v - _neighbour_sum(u * v))

    def dot(a: jax.Array, b: jax.Array) -> jax.Array:  # per (image, channel): (B, 1, 1, C)
        return jnp.sum(a * b, axis=(1, 2), keepdims=True)

    def safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)

    def solve(r0: jax.Array, floor: jax.Array) -> jax.Array:  # PCG for A d = r0 from d = 0
        limit = jnp.maximum((tol**2) * dot(r0, r0), floor)

        def cond(state):
            it, _, r, _, _ = state
            return jnp.logical_and(it < num_iters, jnp.any(dot(r, r) > limit))

        def body(state):  # one V-cycle per iteration, and one copy of it in the program
            it, d, r, p, rz = state
            active = dot(r, r) > limit  # converged systems stay frozen
            z = _v_cycle(levels, r)
            rz_new = dot(r, z)
            p = z + safe_div(rz_new, rz) * p  # rz = 0 before the first step: p = z
            ap = matvec(p)
            alpha = jnp.where(active, safe_div(rz_new, dot(p, ap)), 0.0)
            return it + 1, d + alpha * p, r - alpha * ap, p, jnp.where(active, rz_new, rz)

        zero = jnp.zeros_like(r0)
        return jax.lax.while_loop(cond, body, (0, zero, r0, zero, dot(zero, zero)))[1]

    n_known = jnp.sum(known, axis=(1, 2), keepdims=True)  # (B, 1, 1, 1)
    # Accuracy floor: the residual of the plain mean fill, times `accuracy`. Rounds stop once
    # below it, so a good start (the pull-push fill) saves iterations.
    mean_known = jnp.sum(known * xf, axis=(1, 2), keepdims=True) / jnp.maximum(n_known, 1.0)
    r_mean = residual(known * xf + u * mean_known)
    floor = (accuracy**2) * dot(r_mean, r_mean)
    full = known * xf + u * _pull_push(known * xf, known)  # (B, H, W, C)
    full = jax.lax.fori_loop(0, refinements,
                             lambda _, full: full + u * solve(residual(full), floor), full)
    # An image with no kept pixel has a singular system: fill it with zeros.
    full = jnp.where(n_known > 0, full, known * xf)
    noise = noise_std * jax.random.normal(key, xf.shape, jnp.float32)
    return (full + u * noise).astype(x.dtype)


def road(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    key: jax.Array,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
    order: str = "morf",
    noise_std: float = 0.01,
    num_iters: int = 100,
) -> jax.Array:
    """Returns (B, len(fractions)) bool: is the top-1 class still `classes` after ROAD removal?

    MoRF removes the most relevant fraction of pixels (top of the map), LeRF the least relevant
    (top of -map); removed pixels are filled by `road_impute`. The mean over images is the
    fraction of unchanged predictions that ROAD reports per removal level.
    """
    return road_orders(classify, x, maps, classes, key, fractions, (order,), noise_std,
                       num_iters)[0]


def road_orders(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    key: jax.Array,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
    orders: Sequence[str] = ("morf", "lerf"),
    noise_std: float = 0.01,
    num_iters: int = 100,
) -> jax.Array:
    """Returns (len(orders), B, len(fractions)) bool: `road` for each order in one pass.

    The (order, fraction) levels run one after another in a `lax.map`: one copy of the solver
    and the classifier in the compiled program (compiling is slower than solving on a CPU), the
    memory of one level at a time, and each level stops iterating as soon as it has converged.
    Level i uses noise key fold_in(key, i).
    """
    for order in orders:
        if order not in ("morf", "lerf"):
            raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}.")
    removed = jnp.stack([top_fraction_mask(maps if order == "morf" else -maps, fr)
                         for order in orders for fr in fractions])  # (O*F, B, H, W)

    def level(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        i, removed_i = args
        imputed = road_impute(x, removed_i, jax.random.fold_in(key, i), noise_std=noise_std,
                              num_iters=num_iters)
        return jnp.argmax(classify(imputed), axis=-1) == classes  # (B,)

    kept = jax.lax.map(level, (jnp.arange(removed.shape[0]), removed))  # (O*F, B)
    return jnp.moveaxis(kept.reshape(len(orders), len(fractions), -1), 2, 1)


# ----------------------------------------------------------------------------------------------
# Insertion / deletion


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("sigma",))
def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Returns x (B, H, W, C) blurred by a separable Gaussian (std sigma, cut at 3 sigma).

    Borders use half-sample symmetric padding (scipy.ndimage `mode="reflect"`), so a constant
    image stays constant.
    """
    k = jnp.asarray(_gaussian_kernel(sigma))
    r = (k.shape[0] - 1) // 2
    _, h, w, _ = x.shape
    if r >= h or r >= w:
        raise ValueError(f"blur radius {r} (3 sigma) must be smaller than the image {h}x{w}.")
    xf = x.astype(jnp.float32)
    p = jnp.pad(xf, ((0, 0), (r, r), (0, 0), (0, 0)), mode="symmetric")
    xf = sum(k[i] * p[:, i : i + h] for i in range(k.shape[0]))
    p = jnp.pad(xf, ((0, 0), (0, 0), (r, r), (0, 0)), mode="symmetric")
    xf = sum(k[i] * p[:, :, i : i + w] for i in range(k.shape[0]))
    return xf.astype(x.dtype)


def insertion_deletion(
    classify: Classifier,
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    num_steps: int = 32,
    blur_sigma: float = 5.0,
    chunk: int = 8,
) -> dict[str, jax.Array]:
    """Returns per-image AUCs {"insertion": (B,), "deletion": (B,)} (Petsiuk et al., RISE).

    Pixels are ordered by decreasing map value (ties by lower flat index). At step t of
    0..num_steps the first floor(t*H*W/num_steps) pixels are set to 0 (deletion) or copied from
    x into a blurred copy of x (insertion, `gaussian_blur` with std `blur_sigma`). The score is
    the softmax probability of the class; the AUC is the trapezoid rule over the removed
    fraction in [0, 1]. The num_steps + 1 points are classified `chunk` at a time, B * chunk
    images per call, to bound memory.
    """
    if num_steps < 1 or chunk < 1:
        raise ValueError(f"num_steps and chunk must be >= 1, got {num_steps}, {chunk}.")
    b, h, w, _ = x.shape
    n = h * w
    ranks = _ranks(maps).reshape(b, 1, h, w, 1)  # (B, 1, H, W, 1)
    blurred = gaussian_blur(x, blur_sigma)
    num_chunks = -(-(num_steps + 1) // chunk)

    def probs_for_chunk(ci: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = jnp.minimum(ci * chunk + jnp.arange(chunk), num_steps)  # (chunk,)
        count = (t * n) // num_steps  # pixels removed / inserted at each step
        first = ranks < count.reshape(1, chunk, 1, 1, 1)  # (B, chunk, H, W, 1)
        xs = x[:, None]  # (B, 1, H, W, C)
        deleted = jnp.where(first, jnp.zeros_like(xs), xs)
        inserted = jnp.where(first, xs, blurred[:, None])
        cls = jnp.repeat(classes, chunk)
        p_del = _class_probs(classify, deleted.reshape(b * chunk, *x.shape[1:]), cls)
        p_ins = _class_probs(classify, inserted.reshape(b * chunk, *x.shape[1:]), cls)
        return p_ins.reshape(b, chunk), p_del.reshape(b, chunk)

    p_ins, p_del = jax.lax.map(probs_for_chunk, jnp.arange(num_chunks))  # (chunks, B, chunk)
    steps = np.arange(num_steps + 1)
    frac = jnp.asarray((steps * n) // num_steps / n, jnp.float32)  # (num_steps + 1,)

    def auc(p: jax.Array) -> jax.Array:
        p = jnp.moveaxis(p, 0, 1).reshape(b, -1)[:, : num_steps + 1]  # (B, num_steps + 1)
        return jnp.sum(0.5 * (p[:, 1:] + p[:, :-1]) * jnp.diff(frac), axis=1)

    return {"insertion": auc(p_ins), "deletion": auc(p_del)}


# ----------------------------------------------------------------------------------------------
# Localisation


def _box_masks(boxes: jax.Array, h: int, w: int, tolerance: float = 0) -> jax.Array:
    """Returns (B, N, H, W) bool masks of boxes (B, N, 4) inclusive, enlarged by `tolerance`."""
    ymin, xmin, ymax, xmax = (boxes[..., i, None, None] for i in range(4))  # (B, N, 1, 1)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    valid = (ymax >= ymin) & (xmax >= xmin)
    inside = ((rows >= ymin - tolerance) & (rows <= ymax + tolerance)
              & (cols >= xmin - tolerance) & (cols <= xmax + tolerance))  # fmt: skip
    return inside & valid


def _as_box_sets(boxes: jax.Array) -> jax.Array:
    boxes = jnp.asarray(boxes)
    if boxes.ndim == 2 and boxes.shape[-1] == 4:
        return boxes[:, None, :]
    if boxes.ndim == 3 and boxes.shape[-1] == 4:
        return boxes
    raise ValueError(f"boxes must be (B, 4) or (B, N, 4) as (ymin, xmin, ymax, xmax); "
                     f"got {boxes.shape}.")


def pointing_game(maps: jax.Array, boxes: jax.Array, tolerance: int = 15) -> jax.Array:
    """Returns (B,) bool: does the map's maximum lie within `tolerance` pixels of a box?

    Boxes are (B, 4) or (B, N, 4) pixel indices (ymin, xmin, ymax, xmax), inclusive; a box is
    enlarged by `tolerance` on every side (Zhang et al.). With N boxes any hit counts; boxes
    with ymax < ymin or xmax < xmin are padding and never hit. Ties in the maximum go to the
    lowest flat index.
    """
    b, h, w = maps.shape
    hits = _box_masks(_as_box_sets(boxes), h, w, tolerance).any(axis=1)  # (B, H, W)
    idx = jnp.argmax(maps.reshape(b, -1), axis=1)  # (B,)
    return jnp.take_along_axis(hits.reshape(b, -1), idx[:, None], axis=1)[:, 0]


def energy_in_box(maps: jax.Array, boxes: jax.Array) -> jax.Array:
    """Returns (B,) the share of the map's positive mass inside the box(es); 0 for an empty map.

    Negative map values are clipped to 0. Boxes as in `pointing_game` (union of N boxes).
    """
    b, h, w = maps.shape
    inside = _box_masks(_as_box_sets(boxes), h, w).any(axis=1)  # (B, H, W)
    pos = jnp.maximum(maps.astype(jnp.float32), 0.0)
    total = pos.sum(axis=(1, 2))
    return jnp.where(total > 0, (pos * inside).sum(axis=(1, 2)) / jnp.where(total > 0, total, 1),
                     0.0)
