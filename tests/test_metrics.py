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


def _largest_fusion_operand_count(compiled_text: str) -> int:
    heads = [line for line in compiled_text.splitlines() if line.startswith("%fused_computation")]
    return max(head.count("param_") for head in heads)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU fusion property")
def test_road_v_cycle_keeps_each_level_in_its_own_fusions_on_cpu():
    # Without the fusion boundaries XLA's CPU fusion inlines the coarse levels into the finest
    # level's stencil (every level's couplings become operands of one fusion, recomputed per
    # tap: 12x slower at 224 px). With them a fusion reads one level: its 8 couplings and a few
    # vectors, whatever the image size.
    from tame_jax.metrics import imputation

    h = w = 64  # 7 levels: 64 ... 1
    unknown = jnp.asarray(np.random.default_rng(0).random((2, h, w, 1)) < 0.5, jnp.float32)
    s = imputation._neighbour_sum(jnp.ones((1, h, w, 1)))
    levels = imputation._multigrid(unknown, s)
    r = jnp.ones((2, h, w, 3)) * unknown
    text = jax.jit(lambda r, levels: imputation._v_cycle(levels, r)).lower(r, levels).compile()
    assert _largest_fusion_operand_count(text.as_text()) < 24


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


def _road_test_maps(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Returns float32 maps (4, H, W): distinct values, coarse ties, a CAM-like map with a flat
    zero region (min-max normalised, as evaluate hands them over), and a tiny-valued map."""
    distinct = rng.random((h, w))
    ties = np.round(rng.random((h, w)) * 5) / 5
    yy, xx = np.mgrid[:h, :w]
    cam = np.maximum(np.cos(yy / 3.0) * np.sin(xx / 4.0), 0.0)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    tiny = rng.random((h, w)) * 1e-6
    return np.stack([distinct, ties, cam, tiny]).astype(np.float32)


def test_road_levels_select_the_pixels_pytorch_grad_cam_selects():
    torch = pytest.importorskip("torch")
    road_ref = pytest.importorskip("pytorch_grad_cam.metrics.perturbation_confidence")
    rng = np.random.default_rng(11)
    for h, w in ((8, 8), (9, 14), (16, 16)):
        maps = _road_test_maps(h, w, rng)
        for fraction in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9):
            percentile = round(100 * (1 - fraction))
            for order, remover in (("morf", road_ref.RemoveMostRelevantFirst),
                                   ("lerf", road_ref.RemoveLeastRelevantFirst)):
                ours = np.asarray(metrics.road_removal_mask(jnp.asarray(maps), fraction, order))
                for b in range(len(maps)):
                    kept = remover(percentile, lambda img, mask: mask)(
                        torch.zeros(3, h, w), torch.from_numpy(maps[b])).numpy()
                    np.testing.assert_array_equal(ours[b], kept == 0,
                                                  err_msg=f"{order} {fraction} map {b} {h}x{w}")
    # With distinct values the level removes N - ceil((N - 1)(1 - f)) pixels: 64 px at 30%, 19.
    m = jnp.asarray(rng.random((1, 8, 8)).astype(np.float32))
    assert int(metrics.road_removal_mask(m, 0.3).sum()) == 19
    assert int(metrics.road_removal_mask(m, 0.3, selection="ceil").sum()) == 20  # the old rule
    with pytest.raises(ValueError, match="selection"):
        metrics.road_removal_mask(m, 0.3, selection="floor")


@pytest.mark.parametrize("shape", [(10, 10), (9, 14)])
def test_road_impute_equals_pytorch_grad_cam_noisy_linear_imputer(shape):
    torch = pytest.importorskip("torch")
    road_ref = pytest.importorskip("pytorch_grad_cam.metrics.road")
    h, w = shape
    rng = np.random.default_rng(h * w + 1)
    x = rng.normal(size=(4, h, w, 3)).astype(np.float32)  # a normalised input (NHWC)
    maps = _road_test_maps(h, w, rng)
    imputer = road_ref.NoisyLinearImputer(noise=0.0)
    for fraction, order in ((0.1, "morf"), (0.5, "lerf"), (0.9, "morf")):
        removed = np.asarray(metrics.road_removal_mask(jnp.asarray(maps), fraction, order))
        ours = np.asarray(metrics.road_impute(jnp.asarray(x), jnp.asarray(removed),
                                              jax.random.PRNGKey(0), noise_std=0.0))
        for b in range(4):
            ref = imputer(torch.from_numpy(x[b]).permute(2, 0, 1).contiguous(),
                          torch.from_numpy((~removed[b]).astype(np.float32)))
            np.testing.assert_allclose(ours[b], ref.permute(1, 2, 0).numpy(), atol=1e-4, rtol=0)


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


def test_rise_kernel_is_risess_gkern_and_rise_blur_pads_with_zeros():
    # RISE's gkern(11, 5): gaussian_filter of an 11x11 delta (scipy defaults: reflect, 4 sigma).
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    gkern = scipy_ndimage.gaussian_filter(delta, 5)
    k = metrics.rise_kernel()
    np.testing.assert_allclose(np.outer(k, k), gkern, atol=1e-7)
    assert abs(gkern.sum() - 1) < 1e-9 and gkern[5, 0] > 0.5 * gkern[5, 5]  # a flat kernel
    # conv2d(x, gkern, padding=5) per channel, by a direct 2-D convolution with zero padding.
    x = np.random.default_rng(8).normal(size=(2, 13, 17, 3)).astype(np.float32)
    ref = np.stack([np.stack([scipy_ndimage.convolve(x[b, :, :, c], gkern, mode="constant")
                              for c in range(3)], -1) for b in range(2)])
    np.testing.assert_allclose(np.asarray(metrics.rise_blur(jnp.asarray(x))), ref, atol=1e-5)


def test_deletion_auc_closed_form():
    # 4x4 image, pixel values k/16 for k = 1..16 in a shuffled layout, map = image:
    # deletion removes the brightest first, one pixel per step (step = 1, 16 steps).
    perm = np.random.default_rng(6).permutation(16) + 1
    img = (perm / 16.0).reshape(1, 4, 4, 1).repeat(3, axis=3).astype(np.float32)
    maps = jnp.asarray(img[..., 0])
    # After removing the t brightest, the sum left is Σ_{k<=16-t} k/16 = (16-t)(17-t)/32.
    q = np.asarray([(16 - t) * (17 - t) / 32 / 16 for t in range(17)])
    expected = (q.sum() - q[0] / 2 - q[-1] / 2) / 16
    for chunk in (8, 5):
        out = metrics.insertion_deletion(_mean_prob_classify, jnp.asarray(img), maps,
                                         jnp.asarray([1]), step=1, substrate="gaussian",
                                         blur_sigma=1.0, chunk=chunk)
        np.testing.assert_allclose(np.asarray(out["deletion"]), [expected], rtol=1e-5)
    # The reverse order (least relevant first) gives a larger deletion AUC.
    rev = metrics.insertion_deletion(_mean_prob_classify, jnp.asarray(img), -maps,
                                     jnp.asarray([1]), step=1, substrate="gaussian",
                                     blur_sigma=1.0)
    assert float(rev["deletion"][0]) > expected + 0.1


def _rise_causal_metric(classify_np, img, sal, c, step, mode):
    """NumPy transcription of RISE's CausalMetric.single_run (evaluation.py) for one image.

    img (H, W, 3) is the normalised tensor; 'del' goes to zeros, 'ins' starts from
    conv2d(img, gkern(11, 5), padding=5); returns its score curve and RISE's auc.
    """
    h, w, _ = img.shape
    hw = h * w
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    kern = scipy_ndimage.gaussian_filter(delta, 5)
    blur = np.stack([scipy_ndimage.convolve(img[..., ch], kern, mode="constant")
                     for ch in range(3)], -1)
    n_steps = (hw + step - 1) // step
    start, finish = (img.copy(), np.zeros_like(img)) if mode == "del" else (blur, img.copy())
    start, finish = start.reshape(hw, 3), finish.reshape(hw, 3)
    order = np.argsort(-sal.reshape(hw), kind="stable")  # decreasing saliency
    scores = np.empty(n_steps + 1)
    for i in range(n_steps + 1):
        scores[i] = classify_np(start.reshape(h, w, 3))[c]
        if i < n_steps:
            coords = order[step * i : step * (i + 1)]
            start[coords] = finish[coords]
    return scores, (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)


def test_insertion_deletion_match_a_numpy_transcription_of_rise_under_jit():
    # 10x12 = 120 pixels, 7 per step: 18 steps, the last one of 1 pixel; 19 points.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 10, 12, 3)).astype(np.float32)  # a normalised input
    maps = rng.random((2, 10, 12)).astype(np.float32)
    wts = np.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])

    def classify_np(im):  # softmax of fixed linear functions of the channel means
        z = im.mean(axis=(0, 1)) @ wts.T
        e = np.exp(z - z.max())
        return e / e.sum()

    fn = jax.jit(lambda a, m, c: metrics.insertion_deletion(
        _linear_classify, a, m, c, step=7, chunk=4))
    classes = np.asarray([0, 2])
    out = fn(jnp.asarray(x), jnp.asarray(maps), jnp.asarray(classes))
    for b in range(2):
        for name, mode in (("insertion", "ins"), ("deletion", "del")):
            scores, auc = _rise_causal_metric(classify_np, x[b], maps[b], classes[b], 7, mode)
            assert scores.shape == (19,)
            np.testing.assert_allclose(float(out[name][b]), auc, rtol=1e-5, atol=1e-6)
    # 224 pixels per step at 224 x 224 is RISE's setting: 224 steps, 225 points.
    with pytest.raises(ValueError, match="step"):
        metrics.insertion_deletion(_linear_classify, jnp.asarray(x), jnp.asarray(maps),
                                   jnp.asarray(classes), step=0)


# ---------------------------------------------------------------------------------------------
# Localisation


def _point_maps(points, size=64):
    maps = np.zeros((len(points), size, size), np.float32)
    for i, (y, x) in enumerate(points):
        maps[i, y, x] = 1.0
    return jnp.asarray(maps)


def test_pointing_game_is_a_euclidean_disk_around_the_box():
    # synthetic_shapes stores exclusive max edges: box (10, 20, 30, 40) covers rows 10..29 and
    # columns 20..39; its bottom-right pixel is (29, 39).
    box = [10, 20, 30, 40]
    cases = {  # point: hit with the 15 px tolerance?
        (29 + 15, 30): True, (29 + 16, 30): False,  # straight down: 15 px in, 16 px out
        (15, 20 - 15): True, (15, 20 - 16): False,  # left
        (29 + 9, 39 + 12): True,  # diagonal from the corner, distance 15
        (29 + 10, 39 + 12): False,  # distance 15.6: in the square, outside the disk
        (29 + 15, 39 + 15): False,  # 21.2 px diagonally from the corner
        (10 - 15, 39): True, (10 - 11, 39 + 11): False,  # 15.6 px up-right
    }
    points = [p for p in cases if 0 <= p[0] < 64 and 0 <= p[1] < 64]
    hits = metrics.pointing_game(_point_maps(points), jnp.asarray([box] * len(points)))
    np.testing.assert_array_equal(np.asarray(hits), [cases[p] for p in points])


def test_pointing_game_box_edges_without_tolerance():
    box = [10, 20, 30, 40]  # rows 10..29, columns 20..39 (exclusive max edges)
    inside = [(10, 25), (29, 25), (15, 20), (15, 39), (10, 20), (29, 39)]  # on each edge
    outside = [(30, 25), (15, 40), (9, 25), (15, 19), (30, 40)]  # the next row/column out
    maps = _point_maps(inside + outside)
    boxes = jnp.asarray([box] * len(inside + outside))
    hits = metrics.pointing_game(maps, boxes, tolerance=0)
    np.testing.assert_array_equal(np.asarray(hits), [True] * 6 + [False] * 5)
    # Boxes given as inclusive pixel indices: row 30 and column 40 are inside.
    inclusive = metrics.pointing_game(maps, boxes, tolerance=0, max_edge="inclusive")
    np.testing.assert_array_equal(np.asarray(inclusive), [True] * 6 + [True, True] + [False] * 2
                                  + [True])
    with pytest.raises(ValueError, match="max_edge"):
        metrics.pointing_game(maps, boxes, max_edge="open")
    # The box masks agree: the exclusive box has 20 x 20 pixels.
    np.testing.assert_array_equal(np.asarray(metrics.box_masks(boxes[:1], 64, 64)).sum(), 400)


def test_pointing_game_several_boxes_and_padding():
    maps = _point_maps([(40, 10), (40, 10)])
    multi = jnp.asarray([[[0, 26, 20, 50], [40, 10, 41, 11]],  # the second box holds the point
                         [[0, 26, 20, 50], [1, 1, 0, 0]]])  # far box, and an empty padding box
    np.testing.assert_array_equal(np.asarray(metrics.pointing_game(maps, multi)), [True, False])


def test_energy_in_box_hand_case():
    m = jnp.asarray([[[1.0, 2.0, 0.0],
                      [3.0, -5.0, 4.0],
                      [0.0, 0.0, 10.0]],
                     [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # fmt: skip
    boxes = jnp.asarray([[0, 0, 2, 2], [0, 0, 3, 3]])  # exclusive max edges: top-left 2x2
    e = np.asarray(metrics.energy_in_box(m, boxes))
    # Positive mass 20; inside the box 1 + 2 + 3 (the -5 is clipped) = 6.
    np.testing.assert_allclose(e, [0.3, 0.0], rtol=1e-6)
