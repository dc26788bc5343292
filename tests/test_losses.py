"""Tests of the TAME objective against a hand computation with plain numpy loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax.config import default_config
from tame_jax.losses import PAPER, LossConfig, area_sum, mask_images, tame_objective, variation_sum

B, S, H, K = 2, 4, 8, 3
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def hand_upsample(m: np.ndarray, out: int) -> np.ndarray:
    """Returns the (S, S) map m upsampled to (out, out), PyTorch bilinear align_corners=False."""
    n = m.shape[0]
    res = np.zeros((out, out))
    for oy in range(out):
        sy = max((oy + 0.5) * n / out - 0.5, 0.0)
        y0 = int(sy)
        y1 = min(y0 + 1, n - 1)
        ly = sy - y0
        for ox in range(out):
            sx = max((ox + 0.5) * n / out - 0.5, 0.0)
            x0 = int(sx)
            x1 = min(x0 + 1, n - 1)
            lx = sx - x0
            res[oy, ox] = (
                (1 - ly) * ((1 - lx) * m[y0, x0] + lx * m[y0, x1])
                + ly * ((1 - lx) * m[y1, x0] + lx * m[y1, x1])
            )
    return res


def toy_classify_np(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Returns logits (K,) of one [0, 1] image (H, W, 3): ImageNet-normalise, then linear."""
    logits = np.zeros(K)
    for k in range(K):
        total = 0.0
        for y in range(H):
            for x in range(H):
                for c in range(3):
                    total += (img[y, x, c] - MEAN[c]) / STD[c] * w[y, x, c, k]
        logits[k] = total
    return logits


def make_case(seed: int = 0):
    """Returns x (B, H, H, 3), maps (B, S, S, B), labels (B,), classifier weights (H, H, 3, K)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(B, H, H, 3))
    maps = rng.uniform(size=(B, S, S, B))
    labels = np.array([2, 0])
    w = rng.normal(size=(H, H, 3, K)) * 0.1
    return x, maps, labels, w


def hand_terms(x, maps, labels, w, corners_twice=True, mask_after_norm=False, var_norm=None,
               coefs=(1.5, 2.0, 0.01, 0.3, 0.0005, 0.3)):
    """Returns the objective's terms computed by loops; the flags build deliberately wrong ones.

    coefs: (ce, area, variation, area power, area eps, border) weights.
    """
    c_ce, c_area, c_var, power, eps, c_border = coefs
    # M[b, j] = map of image b for class labels[j]
    ce_total, agree = 0.0, 0
    for b in range(B):
        up = hand_upsample(maps[b, :, :, b], H)
        if mask_after_norm:  # wrong: mask the normalised image, then classify without normalising
            masked_norm = np.zeros((H, H, 3))
            for y in range(H):
                for xx in range(H):
                    for c in range(3):
                        masked_norm[y, xx, c] = (x[b, y, xx, c] - MEAN[c]) / STD[c] * up[y, xx]
            logits = np.array([np.sum(masked_norm * w[..., k]) for k in range(K)])
        else:
            masked = np.zeros((H, H, 3))
            for y in range(H):
                for xx in range(H):
                    for c in range(3):
                        masked[y, xx, c] = x[b, y, xx, c] * up[y, xx]
            logits = toy_classify_np(masked, w)
        lse = math.log(sum(math.exp(v) for v in logits))
        ce_total += lse - logits[labels[b]]
        agree += int(np.argmax(logits) == labels[b])
    ce = ce_total / B

    area_total, var_total = 0.0, 0.0
    for b in range(B):
        for j in range(B):
            m = maps[b, :, :, j]
            for i in range(S):
                for k in range(S):
                    area_total += (m[i, k] + eps) ** power
                    if i + 1 < S:
                        var_total += (m[i + 1, k] - m[i, k]) ** 2
                    if k + 1 < S:
                        var_total += (m[i, k + 1] - m[i, k]) ** 2
            border = 0.0
            for t in range(S):
                border += m[0, t] ** 2 + m[S - 1, t] ** 2  # top and bottom lines
                border += m[t, 0] ** 2 + m[t, S - 1] ** 2  # left and right lines
            if not corners_twice:
                for i, k in [(0, 0), (0, S - 1), (S - 1, 0), (S - 1, S - 1)]:
                    border -= m[i, k] ** 2
            var_total += c_border * border
    area = area_total / (B * B * S * S)
    var = var_total / (var_norm if var_norm is not None else 2 * B)
    loss = c_ce * ce + c_area * area + c_var * var
    return {"loss": loss, "ce": ce, "area": area, "variation": var, "agreement": agree / B}


def jax_classify(w):
    """Returns the toy classifier (b, H, W, 3) in [0, 1] -> (b, K) in jax."""
    wj = jnp.asarray(w, jnp.float32)

    def classify(xm):
        xn = (xm - jnp.asarray(MEAN)) / jnp.asarray(STD)
        return jnp.einsum("bhwc,hwck->bk", xn, wj)

    return classify


def run_objective(x, maps, labels, w, coefs=PAPER):
    loss, terms = tame_objective(
        jnp.asarray(x, jnp.float32), jnp.asarray(maps, jnp.float32), jnp.asarray(labels), 0,
        jax_classify(w), coefs=coefs)
    return loss, {k: float(v) for k, v in terms.items()}


def test_objective_matches_hand_computation():
    x, maps, labels, w = make_case()
    loss, got = run_objective(x, maps, labels, w)
    want = hand_terms(x, maps, labels, w)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert float(loss) == pytest.approx(want["loss"], rel=1e-5)


def test_objective_rejects_wrong_variants_of_the_formula():
    x, maps, labels, w = make_case(1)
    _, got = run_objective(x, maps, labels, w)
    once = hand_terms(x, maps, labels, w, corners_twice=False)
    by_b = hand_terms(x, maps, labels, w, var_norm=B)
    norm_first = hand_terms(x, maps, labels, w, mask_after_norm=True)
    right = hand_terms(x, maps, labels, w)
    # the wrong formulas differ from the right one by far more than the tolerance...
    assert abs(once["variation"] - right["variation"]) > 1e-2
    assert abs(by_b["variation"] - right["variation"]) > 1e-2
    assert abs(norm_first["ce"] - right["ce"]) > 1e-2
    # ...and the module matches the right one only
    assert got["variation"] == pytest.approx(right["variation"], rel=1e-5)
    assert got["variation"] != pytest.approx(once["variation"], rel=1e-3)
    assert got["variation"] != pytest.approx(by_b["variation"], rel=1e-3)
    assert got["ce"] != pytest.approx(norm_first["ce"], rel=1e-3)
    # coefficients: replacing any coefficient by another value changes the total
    for coefs in [(1.0, 2.0, 0.01), (1.5, 1.0, 0.01), (1.5, 2.0, 0.1)]:
        wrong = coefs[0] * right["ce"] + coefs[1] * right["area"] + coefs[2] * right["variation"]
        assert got["loss"] != pytest.approx(wrong, rel=1e-3)


def test_sharded_psum_path_equals_single_device():
    """Two 'devices' of one image each (vmap with an axis name, traced offset) = one device."""
    x, maps, labels, w = make_case(2)
    loss, want = run_objective(x, maps, labels, w)
    classify = jax_classify(w)
    xs = jnp.asarray(x, jnp.float32).reshape(2, 1, H, H, 3)
    ms = jnp.asarray(maps, jnp.float32).reshape(2, 1, S, S, B)

    def per_device(xl, ml, dev):
        return tame_objective(xl, ml, jnp.asarray(labels), dev, classify, axis_name="d")

    losses, terms = jax.vmap(per_device, axis_name="d")(xs, ms, jnp.arange(2))
    for k in want:
        np.testing.assert_allclose(terms[k], [want[k]] * 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses, [float(loss)] * 2, rtol=1e-6)


def test_term_helpers_by_hand():
    rng = np.random.default_rng(3)
    m = rng.uniform(size=(3, S, S))
    x = rng.uniform(size=(3, H, H, 3))
    masked = mask_images(jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32))
    for b in range(3):
        np.testing.assert_allclose(masked[b], x[b] * hand_upsample(m[b], H)[..., None],
                                   atol=1e-6)
    assert float(area_sum(jnp.asarray(m))) == pytest.approx(
        sum(v ** 0.3 for v in (m + 0.0005).ravel()), rel=1e-5)
    one = np.arange(9.0).reshape(3, 3)
    # diffs: 6 vertical of 3 -> 54, 6 horizontal of 1 -> 6; border lines incl. corners twice
    border = (0 + 1 + 4) + (36 + 49 + 64) + (0 + 9 + 36) + (4 + 25 + 64)
    assert float(variation_sum(jnp.asarray(one))) == pytest.approx(60 + 0.3 * border)


def test_objective_shape_errors():
    x, maps, labels, w = make_case()
    with pytest.raises(ValueError, match="labels"):
        tame_objective(jnp.asarray(x), jnp.asarray(maps[..., :1]), jnp.asarray(labels), 0,
                       jax_classify(w))
    with pytest.raises(ValueError, match="axis_name"):
        tame_objective(jnp.asarray(x[:1]), jnp.asarray(maps[:1]), jnp.asarray(labels), 0,
                       jax_classify(w))


def test_config_loss_holds_the_papers_coefficients_and_others_follow_them():
    assert LossConfig.from_config(default_config().loss) == PAPER
    assert PAPER == LossConfig(1.5, 2.0, 0.01, 0.3, 0.0005, 0.3, 0)
    x, maps, labels, w = make_case(4)
    other = LossConfig(ce=1.0, area=3.0, variation=0.1, area_power=0.5, area_eps=0.01,
                       border=0.7)
    _, got = run_objective(x, maps, labels, w, other)
    want = hand_terms(x, maps, labels, w, coefs=(1.0, 3.0, 0.1, 0.5, 0.01, 0.7))
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert LossConfig.from_config({"area": 3, "other_option": "x"}) == LossConfig(area=3.0)
    with pytest.raises(ValueError, match="variation_reference_batch=-1"):
        LossConfig.from_config({"variation_reference_batch": -1})


def test_variation_reference_batch_keeps_per_term_values_at_any_batch():
    """Batch 64 made of the batch-8 images 8 times: with the knob every term equals batch 8's."""
    rng = np.random.default_rng(5)
    b8, s = 8, 5
    x8 = rng.uniform(size=(b8, H, H, 3)).astype(np.float32)
    labels8 = rng.integers(0, K, size=b8)
    maps8 = rng.uniform(size=(b8, s, s, b8)).astype(np.float32)  # [i, :, :, j]: image i, L[j]
    reps = 8
    idx = np.arange(b8 * reps) % b8
    x64, labels64 = x8[idx], labels8[idx]
    maps64 = maps8[idx][..., idx]  # image i % 8 for label j % 8
    w = rng.normal(size=(H, H, 3, K)) * 0.1

    def terms(x, maps, labels, coefs):
        return run_objective(x, maps, labels, w, coefs)[1]

    knob = LossConfig(variation_reference_batch=32)
    t8, t64 = terms(x8, maps8, labels8, knob), terms(x64, maps64, labels64, knob)
    for k in ("loss", "ce", "area", "variation", "agreement"):
        assert t64[k] == pytest.approx(t8[k], rel=1e-5), k
    # The paper's formula as it is: the variation term grows with the batch (8x here).
    p8, p64 = terms(x8, maps8, labels8, PAPER), terms(x64, maps64, labels64, PAPER)
    assert p64["variation"] == pytest.approx(8 * p8["variation"], rel=1e-5)
    assert p64["ce"] == pytest.approx(p8["ce"], rel=1e-5)
    # At the reference batch the knob is the paper's formula.
    assert terms(x8, maps8, labels8, LossConfig(variation_reference_batch=8))["variation"] \
        == pytest.approx(p8["variation"], rel=1e-6)
