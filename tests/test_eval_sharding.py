"""Evaluation per device: every method's maps and every metric stay split on the batch axis.

On 8 fake CPU devices the maps and metrics are computed by each device for its own images:
the outputs are batch-sharded, the compiled programs hold no all-gather (of the image batch or
anything else) nor any other collective, and the per-image results equal those of 1 device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tame_jax import cams, evaluation
from tame_jax.model import build_model
from tame_jax.sharding import make_mesh, replicate, shard_batch

BATCH = 16
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(-start)?\(")


@pytest.fixture(scope="module")
def setup(tiny_config):
    config = tiny_config(**{
        "data.image_size": 32, "data.resize_size": 32, "eval.rise_masks": 16,
        "eval.cam_layer": "layer3",  # 4 x 4 at 32 px (layer4 is 1 x 1: constant maps)
        "eval.road_fractions": (0.2,), "eval.road_lerf_fractions": (0.7,),
        "eval.ad_ic_fractions": (0.5,), "eval.insertion_step": 256})
    model = build_model(config)
    attention_vars = model.init_attention(jax.random.key(1))
    rng = np.random.default_rng(0)
    ymin, xmin = rng.integers(0, 16, (2, BATCH))
    batch = {"image": rng.uniform(size=(BATCH, 32, 32, 3)).astype(np.float32),
             "bbox": np.stack([ymin, xmin, ymin + 12, xmin + 14], 1).astype(np.float32),
             "label": rng.integers(0, 10, BATCH).astype(np.int32),
             "index": np.arange(100, 100 + BATCH, dtype=np.int32)}  # indices in a split
    return config, model, attention_vars, batch


def _evaluate(config, model, attention_vars, batch, method, devices):
    """Returns (classes, maps, metrics, compiled programs' text) on a mesh of `devices`."""
    mesh = make_mesh(devices)
    arrays = shard_batch(batch, mesh)
    model, av = replicate(model, mesh), replicate(attention_vars, mesh)
    key = replicate(jax.random.key(3), mesh)
    predict = evaluation.predict_fn(mesh)
    maps_of = evaluation.map_fn(method, config, mesh)
    metrics_of = evaluation.batch_metrics(config, True, mesh)
    classes = predict(model, arrays["image"])
    maps = maps_of(model, av, arrays["image"], classes, key)
    label_maps = maps_of(model, av, arrays["image"], arrays["label"], key)
    args = (model, arrays["image"], maps, classes, key, arrays["bbox"], arrays["label"],
            label_maps, arrays["index"])
    out = metrics_of(*args)
    texts = [predict.lower(model, arrays["image"]).compile().as_text(),
             maps_of.lower(model, av, arrays["image"], classes, key).compile().as_text(),
             metrics_of.lower(*args).compile().as_text()]
    return classes, maps, out, texts


@pytest.mark.parametrize("method", ["tame", *cams.METHODS])
def test_eight_devices_compute_their_own_images_and_equal_one_device(setup, method):
    config, model, attention_vars, batch = setup
    assert jax.device_count() >= 8, "conftest.py should fake 8 CPU devices"
    one = _evaluate(config, model, attention_vars, batch, method, jax.devices()[:1])
    eight = _evaluate(config, model, attention_vars, batch, method, jax.devices()[:8])
    classes, maps, out, texts = eight
    for array in (classes, maps, *out.values()):
        assert array.sharding.spec == P("batch")
        assert {s.data.shape[0] for s in array.addressable_shards} == {2}  # 2 images each
    for text in texts:  # no device talks to another (plain jit: an all-gather for RISE, an
        # all-reduce for Score-CAM's (image, channel) indexing)
        assert not COLLECTIVE.search(text), COLLECTIVE.search(text).group(0)
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(classes))
    np.testing.assert_allclose(np.asarray(one[1]), np.asarray(maps), rtol=1e-4, atol=1e-5)
    assert set(one[2]) == set(out) and {"road_morf_20", "insertion", "pointing"} <= set(out)
    for column in out:
        np.testing.assert_allclose(np.asarray(one[2][column]), np.asarray(out[column]),
                                   rtol=1e-4, atol=1e-5, err_msg=column)
    assert np.asarray(maps).std() > 0  # the maps are not a constant both ways


def test_road_noise_follows_the_image_not_the_split():
    """Each image's noise comes from its own index: half the batch gets the same noise."""
    from tame_jax import metrics

    x = jnp.zeros((4, 8, 8, 3))
    removed = jnp.ones((4, 8, 8), bool).at[:, 0, 0].set(False)
    key = jax.random.key(0)
    whole = metrics.road_impute(x, removed, key, index=jnp.arange(4))
    half = metrics.road_impute(x[2:], removed[2:], key, index=jnp.arange(2, 4))
    np.testing.assert_array_equal(np.asarray(whole[2:]), np.asarray(half))
    assert np.abs(np.asarray(whole[0] - whole[2])).max() > 1e-4  # images differ


def test_eval_scaling_tool_reports_every_row():
    """The throughput tool runs on 1 and 2 devices and its maps agree (no timing asserted)."""
    from tame_jax.tools import eval_scaling

    rows = eval_scaling.run(methods=("rise",), devices=(1, 2), width=8, image_size=32,
                            batch=4, rise_masks=8, steps=1)
    assert [(r["method"], r["devices"]) for r in rows] == [("rise", 1), ("rise", 2)]
    for r in rows:
        assert np.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["max_abs_diff_vs_first"] < 1e-5
    assert rows[0]["speedup"] == 1.0
    assert "| rise | 2 | 4 |" in eval_scaling.format_table(rows)
