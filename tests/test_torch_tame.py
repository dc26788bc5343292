"""The benchmark's PyTorch TAME does the same work as ours: on identical weights and images it
computes the same loss, the same SGD update and the same explanation maps."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import optim, torch_tame, weights
from tame_jax.config import default_config
from tame_jax.model import Model, build_model
from tame_jax.sharding import make_mesh, shard_batch
from tame_jax.train_step import init_state, make_train_step
from tests.test_frozen import random_batchnorm

LR, MOMENTUM, SIZE, BATCH, K = 0.05, 0.9, 64, 4, 10


@pytest.fixture(scope="module")
def pair():
    """Returns (our Model, attention variables, make() -> a TorchTAME with the same weights)."""
    pytest.importorskip("torchvision")
    c = default_config()
    c.model.backbone, c.model.num_classes, c.model.backbone_weights = "resnet18", K, "random"
    c.data.image_size = SIZE
    model = build_model(c)
    model = model.replace(backbone_vars=random_batchnorm(model.backbone_vars,
                                                            jax.random.key(5)))
    attention_vars = model.init_attention(jax.random.key(1))
    backbone_state = weights.flax_to_torchvision(model.backbone_vars)
    attention_state = weights.tame_state_dict_from_variables(attention_vars)
    make = lambda **kw: torch_tame.TorchTAME(
        "resnet18", model.layers, num_classes=K, image_size=SIZE, backbone_state=backbone_state,
        attention_state=attention_state, learning_rate=LR, momentum=MOMENTUM, **kw)
    return model, attention_vars, make


def images():
    return np.random.default_rng(0).uniform(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("selective", [False, True])
def test_same_loss_and_update_as_our_step(pair, selective):
    model, _, make = pair
    ref = make(selective=selective)
    x = images()
    mesh = make_mesh(jax.devices()[:1])
    tx = optim.make_optimizer(lambda step: LR, momentum=MOMENTUM)
    state = init_state(model, tx, jax.random.key(1), mesh)
    before = jax.device_get(state.params)
    state, terms = make_train_step(mesh, tx)(state, model, shard_batch({"image": x}, mesh)["image"],
                                             jax.random.key(0))
    ref_before = ref.attention_state()
    ref_terms = ref.train_step(ref.images(x))
    for name in ("loss", "ce", "area", "variation"):
        np.testing.assert_allclose(float(terms[name]), ref_terms[name], rtol=2e-5, err_msg=name)
    # The SGD update of every attention parameter (torch layout), to float32 noise.
    ours = weights.tame_state_dict_from_variables({"params": jax.device_get(state.params)})
    ours0 = weights.tame_state_dict_from_variables({"params": before})
    theirs = ref.attention_state()
    keys = [k for k in ours if not k.endswith("num_batches_tracked")]
    deltas = {k: (ours[k] - ours0[k], theirs[k] - ref_before[k]) for k in keys}
    overall = max(np.abs(d).max() for _, d in deltas.values())
    for key, (d_ours, d_theirs) in deltas.items():
        # The branch convs' biases get only rounding noise (train-mode BN removes them).
        scale = max(np.abs(d_theirs).max(), 1e-4 * overall)
        # 1 % of the tensor's largest update: the gradients reach the branch convs through
        # train-mode BatchNorm, whose backward subtracts means (cancellation: float32 noise of
        # the two libraries shows at ~0.3 % there). An update is also a difference of two float32
        # parameters, known to a few ulps of the parameter (BN weights ~1: ~1e-7 each).
        ulps = 16 * np.finfo(np.float32).eps * np.abs(ours0[key]).max()
        np.testing.assert_allclose(d_ours, d_theirs, rtol=0, atol=1e-2 * scale + ulps,
                                   err_msg=key)
    assert np.abs(deltas["fuser.weight"][1]).max() > 1e-3 * LR  # the step did update


@pytest.mark.parametrize("selective", [False, True])
def test_same_explanation_maps(pair, selective):
    model, attention_vars, make = pair
    ref, x = make(selective=selective), images()
    ours = np.asarray(jax.jit(Model.explain)(model, attention_vars, jnp.asarray(x))[0])
    np.testing.assert_allclose(ours, ref.explain(ref.images(x)).numpy(), atol=1e-4)


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[torch\]\""):
        torch_tame.import_torch()
    from tame_jax import bench

    with pytest.raises(SystemExit, match=r"\.\[torch\]"):
        bench.main(["--vs-torch", "--quick", "--out="])


def test_road_comparison_removes_the_same_pixels_as_gradcam():
    """The --eval ROAD comparison does equal work: pytorch-grad-cam's ROAD on the same images,
    maps and classifier keeps the same top-1 classes as ours, level by level (up to the
    imputation noise), so its percentiles name the same removed fractions."""
    pytest.importorskip("pytorch_grad_cam")
    from tame_jax import bench_compare

    r = bench_compare.road_speed(num_images=4, rounds=1, batch=4, backbone="resnet18",
                                 image_size=32)
    ours, theirs = np.asarray(r["kept_ours"]), np.asarray(r["kept_gradcam"])
    assert ours.shape == theirs.shape == (2, len(bench_compare.ROAD_FRACTIONS))
    assert np.abs(ours - theirs).mean() <= 0.1  # at most a few of the 56 (image, level) pairs
    assert r["speedup"]["median"] > 0 and r["ours_images_per_s"] > 0
    # Each side's classifier passes are timed too (no timing inequality here: at this size
    # they are most of ROAD and a loaded machine reorders them; the benchmark compares).
    assert r["ours_forward_seconds"][0] > 0 and r["gradcam_forward_seconds"][0] > 0
    assert r["ceiling"]["median"] > 0
    table = bench_compare.format_eval({"machine": {}, "demo": {"backbone": "resnet18",
                                       "image_size": 32, "batch": 4, "metrics": [],
                                       "methods": {}}, "road": r})
    assert "classifier passes" in table and "ceiling" in table


def test_torch_in_its_own_process_times_the_same_jobs_with_glibc_defaults():
    """--torch_process=own: the PyTorch TAME runs in a child process started with glibc's
    malloc defaults (a plain PyTorch script), whatever this process runs with; it counts the
    same FLOPs as the in-process one and answers every job of every round."""
    pytest.importorskip("torchvision")
    from tame_jax import bench_compare, host_memory

    kw = dict(batch=2, image_size=64, rounds=2, steps=1, num_classes=100)
    own = bench_compare.vs_torch(("resnet18",), torch_process="own", **kw)
    assert own["torch_malloc"].startswith("system default")
    same = bench_compare.vs_torch(("resnet18",), torch_process="ours", **kw)
    assert same["torch_malloc"] == host_memory.describe()  # this process's settings
    jobs_own, jobs_same = own["results"][0]["jobs"], same["results"][0]["jobs"]
    assert set(jobs_own) == {"train_full", "explain_full", "train_selective",
                             "explain_selective"}
    for name, j in jobs_own.items():
        assert len(j["torch_seconds"]) == len(j["ours_seconds"]) == 2
        assert all(t > 0 for t in j["torch_seconds"])
        assert j["torch_gflops_per_image"] == jobs_same[name]["torch_gflops_per_image"] > 0
