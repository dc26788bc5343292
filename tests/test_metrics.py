"""Tests for tame_jax.metrics against hand computations and independent references (scipy)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import metrics

scipy_sparse = pytest.importorskip("scipy.sparse")
scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
scipy_ndimage = pytest.importorskip("scipy.ndimage")


# ---------------------------------------------------------------------------------------------
# Thresholding


def test_top_fraction_mask_constant_map_keeps_exact_count_lowest_indices():
    maps = jnp.ones((2, 10, 10))
    for fraction, k in [(0.15, 15), (0.5, 50), (0.7, 70), (0.123, 13), (1.0, 100), (0.0, 0)]:
        mask = np.asarray(metrics.top_fraction_mask(maps, fraction))
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask.reshape(2, -1).sum(1), [k, k])
        # Ties go to the lowest flat indices.
        np.testing.assert_array_equal(mask.reshape(2, -1)[:, :k], True)


def test_top_fraction_mask_tie_at_cut_and_distinct_values():
    # 2x4 map; top ceil(0.25 * 8) = 2: the 9 and the lowest-index 5 of the three tied 5s.
    m = jnp.asarray([[[1.0, 5.0, 0.0, 5.0], [9.0, 5.0, 2.0, 3.0]]])
    mask = np.asarray(metrics.top_fraction_mask(m, 0.25))[0]
    expected = np.zeros((2, 4), bool)
    expected[1, 0] = expected[0, 1] = True
    np.testing.assert_array_equal(mask, expected)
    # Three kept (ceil(0.3 * 8) = 3): the 9 and the two lowest-index 5s.
    mask3 = np.asarray(metrics.top_fraction_mask(m, 0.3))[0]
    expected[0, 3] = True
    np.testing.assert_array_equal(mask3, expected)
    # Distinct random values: the mask is exactly value >= k-th largest value.
    r = np.random.default_rng(0).random((3, 7, 9)).astype(np.float32)
    k = math.ceil(0.4 * 63)
    kth = np.sort(r.reshape(3, -1), axis=1)[:, -k]
    np.testing.assert_array_equal(
        np.asarray(metrics.top_fraction_mask(jnp.asarray(r), 0.4)), r >= kth[:, None, None]
    )


def test_threshold_maps_keeps_soft_values():
    m = jnp.asarray([[[0.2, 0.9], [0.5, 0.1]]])
    out = np.asarray(metrics.threshold_maps(m, 0.5))
    np.testing.assert_allclose(out, [[[0.0, 0.9], [0.5, 0.0]]])
    np.testing.assert_allclose(np.asarray(metrics.threshold_maps(m, 1.0)), np.asarray(m))
    with pytest.raises(ValueError, match="fraction"):
        metrics.threshold_maps(m, 1.5)


# ---------------------------------------------------------------------------------------------
# AD / IC


def test_ad_ic_terms_hand_values():
    y = jnp.asarray([0.5, 0.2, 0.8, 0.4])
    o = jnp.asarray([0.25, 0.3, 0.8, 0.1])
    drop, inc = metrics.ad_ic_terms(y, o)
    np.testing.assert_allclose(np.asarray(drop), [0.5, 0.0, 0.0, 0.75], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(inc), [0.0, 1.0, 0.0, 0.0])


def _linear_classify(x: jax.Array) -> jax.Array:
    """Three-class toy model: logits are fixed linear functions of the channel means."""
    m = x.mean(axis=(1, 2))  # (B, 3)
    w = jnp.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
    return m @ w.T  # (B, 3)


def test_ad_ic_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.random((3, 4, 5, 3)).astype(np.float32)
    maps = rng.random((3, 4, 5)).astype(np.float32)
    classes = np.asarray([0, 1, 2])
    out = metrics.ad_ic(_linear_classify, jnp.asarray(x), jnp.asarray(maps), jnp.asarray(classes))
    assert set(out) == {"ad_100", "ic_100", "ad_50", "ic_50", "ad_15", "ic_15"}

    def probs(img: np.ndarray) -> np.ndarray:
        w = np.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
        z = img.mean(axis=(1, 2)) @ w.T
        e = np.exp(z - z.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[np.arange(3), classes]

    y = probs(x)
    for frac, key in [(1.0, "100"), (0.5, "50"), (0.15, "15")]:
        k = math.ceil(frac * 20)  # 20, 10, 3 pixels
        e = np.zeros_like(maps)
        for b in range(3):
            keep = np.argsort(-maps[b].ravel(), kind="stable")[:k]
            e[b].ravel()[keep] = maps[b].ravel()[keep]
        o = probs(x * e[..., None])
        np.testing.assert_allclose(np.asarray(out[f"ad_{key}"]), np.maximum(y - o, 0) / y,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out[f"ic_{key}"]), (o > y).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# ROAD imputation against a direct sparse solve

_NB = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
       (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]  # fmt: skip


def _spsolve_impute(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Direct float64 solve: each removed pixel = weighted mean of its existing neighbours."""
    h, w, c = img.shape
    unknown = np.flatnonzero(removed.ravel())
    index = -np.ones(h * w, int)
    index[unknown] = np.arange(len(unknown))
    a = scipy_sparse.lil_matrix((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), c))
    for e, p in enumerate(unknown):
        i, j = divmod(int(p), w)
        total = 0.0
        for dy, dx, wt in _NB:
            y, x = i + dy, j + dx
            if 0 <= y < h and 0 <= x < w:
                total += wt
                if removed[y, x]:
                    a[e, index[y * w + x]] -= wt
                else:
                    rhs[e] += wt * img[y, x]
        a[e, e] = total
    sol = scipy_linalg.spsolve(a.tocsc(), rhs).reshape(len(unknown), c)
    out = img.astype(np.float64).reshape(-1, c).copy()
    out[unknown] = sol
    return out.reshape(h, w, c)


def _masks(h: int, w: int, rng: np.random.Generator) -> list[np.ndarray]:
    rand = rng.random((h, w)) < 0.5
    border = np.zeros((h, w), bool)
    border[0, :] = border[:, -1] = True
    border[h // 2, 0] = border[-1, -1] = True
    hole = np.zeros((h, w), bool)
    hole[1:-2, 2:] = True  # big hole touching three borders
    yy, xx = np.mgrid[:h, :w]
    ninety = np.asarray(metrics.top_fraction_mask(jnp.asarray((-xx - 0.01 * yy)[None]), 0.9))[0]
    return [rand, border, hole, ninety]


@pytest.mark.parametrize("shape", [(12, 12), (16, 20), (7, 13)])  # odd: padded levels
def test_road_impute_matches_direct_sparse_solve(shape):
    h, w = shape
    rng = np.random.default_rng(h * w)
    removed = np.stack(_masks(h, w, rng))  # (4, H, W)
    x = rng.random((4, h, w, 3)).astype(np.float32)
    out = np.asarray(metrics.road_impute(jnp.asarray(x), jnp.asarray(removed),
                                         jax.random.PRNGKey(0), noise_std=0.0))
    for b in range(4):
        np.testing.assert_allclose(out[b], _spsolve_impute(x[b], removed[b]), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out[~removed], x[~removed])  # kept pixels untouched


def test_road_impute_converges_on_32x32_with_90_percent_removed():
    rng = np.random.default_rng(3)
    x = rng.random((2, 32, 32, 3)).astype(np.float32)
    yy, xx = np.mgrid[:32, :32]
    maps = np.stack([-xx - 0.01 * yy, -((yy - 16.0) ** 2 + (xx - 16.0) ** 2)])
    removed = np.asarray(metrics.top_fraction_mask(jnp.asarray(maps), 0.9))
    out = np.asarray(metrics.road_impute(jnp.asarray(x), jnp.asarray(removed),
                                         jax.random.PRNGKey(0), noise_std=0.0))
    for b in range(2):
        err = np.abs(out[b] - _spsolve_impute(x[b], removed[b])).max()
        assert err < 1e-5, err


def test_road_impute_smooth_image_large_holes_matches_direct_solve():
    # Smooth content leaves low-frequency error, the hard case for the solver (the multigrid
    # levels carry it); the holes are MoRF 90% of a blob and LeRF 50% of another blob.
    h = w = 64
    yy, xx = np.mgrid[:h, :w] / h
    img = np.stack([np.sin(3 * xx + 2 * yy), np.cos(4 * yy) * xx, 0.5 + 0.3 * xx * yy], -1)
    x = np.stack([img, img[::-1]]).astype(np.float32)
    blob = np.exp(-((yy - 0.4) ** 2 + (xx - 0.6) ** 2) / 0.05)
    removed = np.concatenate([
        np.asarray(metrics.top_fraction_mask(jnp.asarray(blob[None]), 0.9)),
        np.asarray(metrics.top_fraction_mask(jnp.asarray(-blob.T[None]), 0.5)),
    ])  # fmt: skip
    out = np.asarray(metrics.road_impute(jnp.asarray(x), jnp.asarray(removed),
                                         jax.random.PRNGKey(0), noise_std=0.0))
    for b in range(2):
        np.testing.assert_allclose(out[b], _spsolve_impute(x[b], removed[b]), atol=1e-4, rtol=0)


def test_road_impute_noise_only_on_imputed_pixels():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((2, 32, 32, 3)).astype(np.float32))
    removed = jnp.asarray(rng.random((2, 32, 32)) < 0.6)
    key = jax.random.PRNGKey(7)
    clean = np.asarray(metrics.road_impute(x, removed, key, noise_std=0.0))
    noisy = np.asarray(metrics.road_impute(x, removed, key, noise_std=0.05))
    diff = noisy - clean
    r = np.asarray(removed)
    np.testing.assert_array_equal(diff[~r], 0.0)
    assert abs(diff[r].std() - 0.05) < 0.003  # ~3700 samples
    assert abs(diff[r].mean()) < 0.003


def _brightness_classify(x: jax.Array) -> jax.Array:
    """Class 1 iff the image mean exceeds 0.25 (sharp logits)."""
    m = x.mean(axis=(1, 2, 3))
    return jnp.stack([0.25 - m, m - 0.25], axis=1) * 100.0


def test_road_morf_lerf_on_analytic_case():
    # Left half white, right half black; the map ranks columns left to right.
    h, w = 8, 16
    x = np.zeros((1, h, w, 3), np.float32)
    x[:, :, : w // 2] = 1.0
    maps = jnp.asarray(np.broadcast_to(-np.arange(w, dtype=np.float32), (1, h, w)))
    classes = jnp.asarray([1])  # mean 0.5 > 0.25
    key = jax.random.PRNGKey(0)
    fractions = (0.125, 0.5)
    # MoRF 12.5% removes two white columns: filled from white (1) -> still class 1.
    # MoRF 50% removes the whole white half: filled from black (0) -> class 0.
    morf = metrics.road(_brightness_classify, jnp.asarray(x), maps, classes, key, fractions,
                        order="morf", noise_std=0.0)
    np.testing.assert_array_equal(np.asarray(morf), [[True, False]])
    # LeRF 50% removes the black half: filled from white -> mean 1, class 1 at both levels.
    lerf_fn = jax.jit(lambda xx, mm, cc, kk: metrics.road(
        _brightness_classify, xx, mm, cc, kk, fractions, order="lerf"))
    lerf = lerf_fn(jnp.asarray(x), maps, classes, key)
    chex.assert_shape(lerf, (1, 2))
    np.testing.assert_array_equal(np.asarray(lerf), [[True, True]])
    with pytest.raises(ValueError, match="order"):
        metrics.road(_brightness_classify, jnp.asarray(x), maps, classes, key, order="up")


# ---------------------------------------------------------------------------------------------
# Insertion / deletion


def _mean_prob_classify(x: jax.Array) -> jax.Array:
    """Two classes, softmax probability of class 1 exactly equal to the image mean q."""
    q = jnp.clip(x.mean(axis=(1, 2, 3)), 1e-7, 1 - 1e-7)
    return jnp.stack([jnp.log1p(-q), jnp.log(q)], axis=1)


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(5).random((2, 20, 23, 3)).astype(np.float32)
    out = np.asarray(metrics.gaussian_blur(jnp.asarray(x), 2.0))
    ref = scipy_ndimage.gaussian_filter(x, sigma=(0, 2.0, 2.0, 0), mode="reflect", truncate=3.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_deletion_auc_closed_form():
    # 4x4 image, pixel values k/16 for k = 1..16 in a shuffled layout, map = image:
    # deletion removes the brightest first, one pixel per step (num_steps = 16).
    perm = np.random.default_rng(6).permutation(16) + 1
    img = (perm / 16.0).reshape(1, 4, 4, 1).repeat(3, axis=3).astype(np.float32)
    maps = jnp.asarray(img[..., 0])
    # After removing the t brightest, the sum left is Σ_{k<=16-t} k/16 = (16-t)(17-t)/32.
    q = np.asarray([(16 - t) * (17 - t) / 32 / 16 for t in range(17)])
    expected = np.sum(0.5 * (q[1:] + q[:-1])) / 16
    for chunk in (8, 5):
        out = metrics.insertion_deletion(_mean_prob_classify, jnp.asarray(img), maps,
                                         jnp.asarray([1]), num_steps=16, blur_sigma=1.0,
                                         chunk=chunk)
        np.testing.assert_allclose(np.asarray(out["deletion"]), [expected], rtol=1e-5)
    # The reverse order (least relevant first) gives a larger deletion AUC.
    rev = metrics.insertion_deletion(_mean_prob_classify, jnp.asarray(img), -maps,
                                     jnp.asarray([1]), num_steps=16, blur_sigma=1.0)
    assert float(rev["deletion"][0]) > expected + 0.1


def test_insertion_deletion_match_numpy_reference_under_jit():
    # 6x10 = 60 pixels, 7 steps: uneven step sizes floor(t*60/7), chunk 3 (padded last chunk).
    rng = np.random.default_rng(7)
    x = rng.random((2, 6, 10, 3)).astype(np.float32)
    maps = rng.random((2, 6, 10)).astype(np.float32)
    maps[1, :, :5] = 0.5  # ties resolved by flat index
    fn = jax.jit(lambda a, m, c: metrics.insertion_deletion(
        _mean_prob_classify, a, m, c, num_steps=7, blur_sigma=1.5, chunk=3))
    out = fn(jnp.asarray(x), jnp.asarray(maps), jnp.asarray([1, 1]))
    blurred = scipy_ndimage.gaussian_filter(x, sigma=(0, 1.5, 1.5, 0), mode="reflect",
                                            truncate=3.0)
    for b in range(2):
        order = np.argsort(-maps[b].ravel(), kind="stable")
        counts = [t * 60 // 7 for t in range(8)]
        frac = np.asarray(counts) / 60
        ins, dele = [], []
        for n in counts:
            first = np.zeros(60, bool)
            first[order[:n]] = True
            first = first.reshape(6, 10, 1)
            dele.append(np.where(first, 0.0, x[b]).mean())
            ins.append(np.where(first, x[b], blurred[b]).mean())
        for name, p in [("insertion", ins), ("deletion", dele)]:
            p = np.asarray(p)
            auc = np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(frac))
            np.testing.assert_allclose(float(out[name][b]), auc, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Localisation


def test_pointing_game_tolerance_boundary():
    maps = np.zeros((5, 64, 64), np.float32)
    maps[:, 40, 10] = 1.0  # argmax at row 40, column 10
    boxes = jnp.asarray([
        [0, 25, 25, 50],   # rows up to 25+15 = 40, columns from 25-15 = 10: exactly on the edge
        [0, 25, 24, 50],   # rows up to 39: miss
        [0, 26, 25, 50],   # columns from 11: miss
        [55, 0, 63, 20],   # rows from 40: hit
        [30, 5, 45, 15],   # contains the point
    ])  # fmt: skip
    hits = metrics.pointing_game(jnp.asarray(maps), boxes, tolerance=15)
    np.testing.assert_array_equal(np.asarray(hits), [True, False, False, True, True])
    strict = metrics.pointing_game(jnp.asarray(maps), boxes, tolerance=0)
    np.testing.assert_array_equal(np.asarray(strict), [False, False, False, False, True])
    # Several boxes per image: any hit counts; an empty (padding) box never hits.
    multi = jnp.asarray([[[0, 25, 24, 50], [40, 10, 40, 10]], [[0, 25, 24, 50], [1, 1, 0, 0]]])
    np.testing.assert_array_equal(
        np.asarray(metrics.pointing_game(jnp.asarray(maps[:2]), multi, tolerance=15)),
        [True, False])


def test_energy_in_box_hand_case():
    m = jnp.asarray([[[1.0, 2.0, 0.0],
                      [3.0, -5.0, 4.0],
                      [0.0, 0.0, 10.0]],
                     [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # fmt: skip
    boxes = jnp.asarray([[0, 0, 1, 1], [0, 0, 2, 2]])  # inclusive: top-left 2x2
    e = np.asarray(metrics.energy_in_box(m, boxes))
    # Positive mass 20; inside the box 1 + 2 + 3 (the -5 is clipped) = 6.
    np.testing.assert_allclose(e, [0.3, 0.0], rtol=1e-6)
