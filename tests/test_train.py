"""The trainer end to end on tiny data: checkpoints, restore, resume, errors; the LR finder."""

from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from tame_jax import checkpoints, lr_finder, train
from tame_jax.model import build_model


def test_train_writes_checkpoints_that_restore(tiny_config, tmp_path):
    config = tiny_config()
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 4
    ckpt = checkpoints.Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["backbone"] == "resnet18"
    # TensorBoard scalars were written.
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))

    model = build_model(config)
    restored, step = checkpoints.restore_attention(config, workdir, model)
    assert step == 4
    chex.assert_trees_all_close(restored["params"], jax.device_get(state.params))
    chex.assert_trees_all_close(restored["batch_stats"], jax.device_get(state.batch_stats))
    init = model.init_attention(jax.random.key(0))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                   restored["params"], init["params"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # training changed the parameters

    # Rerunning the finished command resumes at the end and does nothing more.
    again = train.train_and_evaluate(config, workdir)
    chex.assert_trees_all_close(jax.device_get(again.params), jax.device_get(state.params))


def test_checkpoint_of_another_model_is_refused(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(num_train_steps=2), workdir)
    other = tiny_config(**{"model.variant": "noskip", "num_train_steps": 2})
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"variant: checkpoint has 'tame', config asks for 'noskip'"):
        train.train_and_evaluate(other, workdir)


def test_resume_with_changed_run_settings_is_refused_unless_allowed(tiny_config, tmp_path,
                                                                   checkpoint_steps):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(num_train_steps=2), workdir)
    changed = tiny_config(num_train_steps=4, learning_rate=3e-2)
    with pytest.raises(checkpoints.CheckpointMismatchError) as e:
        train.train_and_evaluate(changed, workdir)
    message = str(e.value)
    assert "trained for a different run" in message
    assert "learning_rate: checkpoint has 0.01, config asks for 0.03" in message
    assert "total_steps: checkpoint has 2, config asks for 4" in message
    assert "num_train_steps: checkpoint has 2, config asks for 4" in message
    assert "--config.resume_allow_changes=" in message
    assert checkpoint_steps(workdir) == [2]  # nothing written
    with pytest.raises(ValueError, match=r"resume_allow_changes: unknown fields \['lr'\]"):
        train.train_and_evaluate(tiny_config(resume_allow_changes=("lr",)), workdir)
    allowed = tiny_config(num_train_steps=4, learning_rate=3e-2, resume_allow_changes=(
        "learning_rate", "total_steps", "num_train_steps"))
    state = train.train_and_evaluate(allowed, workdir)  # a deliberate change: resumes
    assert int(state.step) == 4 and checkpoint_steps(workdir) == [2, 4]


def test_missing_backbone_weights_say_how_to_get_them(tiny_config, tmp_path):
    config = tiny_config(**{"model.backbone_weights": str(tmp_path / "nope.pth")})
    with pytest.raises(FileNotFoundError, match=r"(?s)nope\.pth.*section 'Backbone weights'"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_lr_finder_writes_csv_and_png(tiny_config, tmp_path):
    config = tiny_config()
    out = str(tmp_path / "lr")
    result = lr_finder.run(config, out, min_lr=1e-5, max_lr=1e-1, num_steps=5)
    np.testing.assert_allclose(result["lr"][0], 1e-5, rtol=1e-5)
    assert np.all(np.diff(np.log(result["lr"])) > 0)  # exponential sweep, increasing
    if len(result["lr"]) == 5:
        np.testing.assert_allclose(result["lr"][-1], 1e-1, rtol=1e-4)
    rows = open(os.path.join(out, "lr_finder.csv")).read().splitlines()
    assert rows[0] == "step,learning_rate,loss,smoothed_loss"
    assert len(rows) == len(result["lr"]) + 1
    assert os.path.getsize(os.path.join(out, "lr_finder.png")) > 1000


def _events(workdir: str) -> list[tuple[str, int, object]]:
    """Returns (tag, step, value proto) of every TensorBoard event file in workdir."""
    import tensorflow as tf

    out = []
    for name in sorted(os.listdir(workdir)):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                out += [(v.tag, int(event.step), v) for v in event.summary.value]
    return out


def _event_tags(workdir: str) -> dict[str, list[int]]:
    """Returns {tag: [steps]} of every TensorBoard event file in workdir."""
    tags: dict[str, list[int]] = {}
    for tag, step, _ in _events(workdir):
        tags.setdefault(tag, []).append(step)
    return tags


def _event_values(workdir: str) -> dict[str, list[float]]:
    """Returns {tag: [scalar values]} of the scalar summaries in workdir."""
    import tensorflow as tf

    values: dict[str, list[float]] = {}
    for tag, _, v in _events(workdir):
        if v.HasField("tensor") and not v.tensor.string_val:
            values.setdefault(tag, []).append(float(tf.make_ndarray(v.tensor)))
    return values


def test_tensorboard_shows_explanations_and_progress(tiny_config, tmp_path):
    config = tiny_config(image_every=2, image_grid=3, image_eval_examples=10,
                         **{"eval.batch_size": 8})
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    tags = _event_tags(workdir)
    assert tags["explanations"] == [2, 4]  # the grid image, every image_every steps
    assert tags["heldout/ad_100"] == [2, 4] and tags["heldout/ic_100"] == [2, 4]
    assert "steps_per_sec" in tags  # clu's ReportProgress
    assert tags["loss"] == [2, 4]


def test_explanation_monitor_compiles_once_and_computes_ad_ic(tiny_config, tmp_path):
    from tame_jax import data, metrics

    config = tiny_config(image_grid=3, image_eval_examples=10, **{"eval.batch_size": 8})
    model = build_model(config)
    av = model.init_attention(jax.random.key(0))

    class Writer:
        def __init__(self):
            self.images, self.scalars = {}, {}

        def write_images(self, step, images):
            self.images[step] = images

        def write_scalars(self, step, scalars):
            self.scalars[step] = scalars

    monitor = train.ExplanationMonitor(config, model)
    writer = Writer()
    sizes = []
    for step in (1, 2, 3):
        monitor(writer, step, av)
        sizes.append((monitor._explain._cache_size(), monitor._ad_ic._cache_size()))
    assert sizes[0] == sizes[1] == sizes[2]  # compiled at the first call only
    grid = writer.images[2]["explanations"]
    assert grid.shape == (1, 2 * 64, 3 * 64, 3) and grid.dtype == np.uint8
    # AD/IC(100%) over exactly the first 10 held-out images, computed directly
    batch = next(data.eval_iterator(config, global_batch_size=16, process_index=0,
                                    process_count=1))
    x = batch["image"][batch["valid"]][:10]
    maps, classes, _ = model.explain(av, x)
    terms = metrics.ad_ic(model.classify, x, maps, classes, (1.0,))
    np.testing.assert_allclose(writer.scalars[2]["heldout/ad_100"],
                               100 * float(np.mean(terms["ad_100"])), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(writer.scalars[2]["heldout/ic_100"],
                               100 * float(np.mean(terms["ic_100"])), atol=1e-6)
    np.testing.assert_array_equal(grid[0, :64, :64], np.round(x[0] * 255).astype(np.uint8))
