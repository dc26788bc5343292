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
