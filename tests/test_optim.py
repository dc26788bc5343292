"""The optimiser: one-cycle schedules and torch-style SGD-Nesterov with two parameter groups."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tame_jax import optim

TOTAL = 100
ETA = 1e-3


def test_schedule_endpoints_match_the_formulas():
    lr = optim.one_cycle_lr(TOTAL, ETA)
    mom = optim.one_cycle_momentum(TOTAL)
    peak = int(0.3 * TOTAL) - 1  # OneCycleLR puts the peak at pct_start * total - 1
    np.testing.assert_allclose(lr(0), ETA / 25, rtol=1e-5)
    np.testing.assert_allclose(lr(peak), ETA, rtol=1e-5)
    np.testing.assert_allclose(lr(TOTAL - 1), ETA / 25 / 1e4, rtol=1e-5)
    np.testing.assert_allclose(mom(0), 0.95, rtol=1e-5)
    np.testing.assert_allclose(mom(peak), 0.85, rtol=1e-5)
    np.testing.assert_allclose(mom(TOTAL - 1), 0.95, rtol=1e-5)


@pytest.mark.parametrize("step", [7, 15, 40, 77])
def test_schedule_interior_is_cosine(step):
    lr = optim.one_cycle_lr(TOTAL, ETA)
    mom = optim.one_cycle_momentum(TOTAL)
    lo, hi, end = ETA / 25, ETA, ETA / 25 / 1e4
    warm_end, last = 0.3 * TOTAL - 1, TOTAL - 1
    if step <= warm_end:
        pct = step / warm_end
        want_lr = hi + (lo - hi) / 2 * (math.cos(math.pi * pct) + 1)
        want_m = 0.85 + (0.95 - 0.85) / 2 * (math.cos(math.pi * pct) + 1)
    else:
        pct = (step - warm_end) / (last - warm_end)
        want_lr = end + (hi - end) / 2 * (math.cos(math.pi * pct) + 1)
        want_m = 0.95 + (0.85 - 0.95) / 2 * (math.cos(math.pi * pct) + 1)
    np.testing.assert_allclose(lr(step), want_lr, rtol=1e-5)
    np.testing.assert_allclose(mom(step), want_m, rtol=1e-5)


@pytest.mark.parametrize("total", [TOTAL, 2, 3, 7])
def test_schedule_matches_torch_one_cycle(total):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=ETA, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ETA, total_steps=total)
    lr, mom = optim.one_cycle_lr(total, ETA), optim.one_cycle_momentum(total)
    for step in range(total):
        group = opt.param_groups[0]
        np.testing.assert_allclose(lr(step), group["lr"], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(mom(step), group["momentum"], rtol=1e-5)
        opt.step()
        sched.step()


def test_parameter_groups():
    params = {"conv": {"kernel": jnp.ones((1, 1, 2, 2)), "bias": jnp.ones(2)},
              "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    import jax

    groups = jax.tree_util.tree_map_with_path(optim.param_group, params)
    assert groups == {"conv": {"kernel": "decay", "bias": "bias"},
                      "bn": {"scale": "decay", "bias": "bias"}}
    with pytest.raises(ValueError, match="neither a kernel"):
        jax.tree_util.tree_map_with_path(optim.param_group, {"conv": {"weight": jnp.ones(1)}})


def test_two_steps_match_hand_computed_nesterov_sgd():
    """Two updates against the torch SGD arithmetic written out by hand."""
    total = 10
    tx = optim.make_optimizer(ETA, total)
    lr, mom = optim.one_cycle_lr(total, ETA), optim.one_cycle_momentum(total)
    params = {"kernel": jnp.array([0.5, -1.0]), "bias": jnp.array([0.25])}
    grads = [{"kernel": jnp.array([0.1, 0.2]), "bias": jnp.array([-0.3])},
             {"kernel": jnp.array([-0.05, 0.4]), "bias": jnp.array([0.7])}]
    state = tx.init(params)

    want = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in want.items()}
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        m = float(mom(step))
        for name, factor, wd in (("kernel", 1.0, 5e-4), ("bias", 2.0, 0.0)):
            d = np.asarray(g[name], np.float64) + wd * want[name]
            buf[name] = m * buf[name] + d
            want[name] = want[name] - factor * float(lr(step)) * (d + m * buf[name])
        chex.assert_trees_all_close(params, want, rtol=1e-6, atol=1e-9)


def test_a_single_step_run_is_rejected():
    with pytest.raises(ValueError, match="2 steps or more"):
        optim.one_cycle_lr(1, ETA)
