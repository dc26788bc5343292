"""Preemption and resume of `python -m tame_jax.train`, run in subprocesses.

One uninterrupted reference run; then one interrupted chain on another workdir: SIGTERM
mid-run (a checkpoint at the current step, exit 143), rerun and `kill -9` after a checkpoint,
plant half-written checkpoints, rerun to the end. Each rerun is the same command, and the
final parameters must equal the reference's exactly (same data order, same random numbers).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import numpy as np
import pytest

from tame_jax import checkpoints
from tame_jax.model import build_model

STEPS = 16  # 2 steps per epoch: resuming crosses epoch boundaries
FLAGS = (f"--config.num_train_steps={STEPS}", "--config.checkpoint_every=3")
TIMEOUT_S = 240


def _wait_for(proc, predicate, timeout: float = TIMEOUT_S) -> bool:
    """Returns True once predicate() holds, False if the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def _params(trainer, root: str, workdir: str, step: int | None = None) -> tuple[dict, int]:
    """Returns ({path: array} of the attention params in the checkpoint, its step)."""
    import jax

    config = trainer.config(root)
    variables, step = checkpoints.restore_attention(config, workdir, build_model(config), step)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(variables["params"])}
    return flat, step


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, trainer, image_folder):
    """Returns (tmp dir, data root, env, reference final params) after the reference run."""
    tmp = tmp_path_factory.mktemp("resume")
    root = str(tmp / "data")
    image_folder(root, per_class=8)
    env = trainer.env(devices=1, cache_dir=str(tmp_path_factory.getbasetemp() / "jax_cache"))
    ref = str(tmp / "reference")
    log = str(tmp / "reference.txt")
    p = trainer.start(trainer.command(ref, root, *FLAGS), env, log)
    text = trainer.finish(p, log, TIMEOUT_S)
    assert p.returncode == 0, text[-4000:]
    params, step = _params(trainer, root, ref)
    assert step == STEPS
    return tmp, root, env, params


@pytest.fixture(scope="module")
def chain(setup, trainer, checkpoint_steps):
    """Runs the interrupted chain; returns what each stage saw, for the tests below."""
    tmp, root, env, _ = setup
    workdir = str(tmp / "interrupted")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    cmd = trainer.command(workdir, root, *FLAGS)
    out = {}

    # 1. SIGTERM once step 4 is logged: saves at the step it is on, exits 143.
    log = str(tmp / "sigterm.txt")
    p = trainer.start(cmd, env, log)
    assert _wait_for(p, lambda: f"step 4/{STEPS}" in open(log, errors="replace").read())
    p.send_signal(signal.SIGTERM)
    text = trainer.finish(p, log, TIMEOUT_S)
    saved = re.search(r"preempted: saved step (\d+)", text)
    out["sigterm"] = (p.returncode, int(saved.group(1)) if saved else None, text)
    out["sigterm_steps"] = checkpoint_steps(workdir)

    # 2. Rerun, kill -9 as soon as a new periodic checkpoint is complete.
    log = str(tmp / "kill.txt")
    first = out["sigterm"][1]
    target = (first // 3 + 1) * 3
    p = trainer.start(cmd, env, log)
    assert _wait_for(p, lambda: os.path.isdir(os.path.join(ckpt_dir, str(target))))
    p.kill()
    text = trainer.finish(p, log, TIMEOUT_S)
    out["kill"] = (p.returncode, text)
    last = checkpoint_steps(workdir)[-1]
    out["kill_steps"] = checkpoint_steps(workdir)

    # 3. Half-written checkpoints after the last complete one: an unrenamed temporary folder,
    # and a step folder without its commit marker (a copy of the last one, so resuming from
    # it would skip steps and change the result).
    os.makedirs(os.path.join(ckpt_dir, f"{last + 1}.orbax-checkpoint-tmp-1700000000", "state"))
    os.makedirs(os.path.join(ckpt_dir, f"{last + 2}.orbax-checkpoint-tmp", "state"))
    bogus = os.path.join(ckpt_dir, str(last + 3))
    shutil.rmtree(bogus, ignore_errors=True)
    shutil.copytree(os.path.join(ckpt_dir, str(last)), bogus)
    os.remove(os.path.join(bogus, checkpoints.COMMIT_MARKER))
    out["last_complete"] = last

    # 4. Rerun to the end.
    log = str(tmp / "final.txt")
    p = trainer.start(cmd, env, log)
    text = trainer.finish(p, log, TIMEOUT_S)
    out["final"] = (p.returncode, text)
    out["workdir"] = workdir
    return out


def test_sigterm_saves_the_current_step_and_exits_143(chain):
    code, saved, text = chain["sigterm"]
    assert code == 143, text[-3000:]
    assert saved is not None and 4 <= saved < STEPS
    assert chain["sigterm_steps"][-1] == saved  # a checkpoint at the step it stopped on
    assert f"step {saved + 1}/{STEPS}" not in text  # and it stopped there
    assert "rerun the same command to resume" in text


def test_kill_9_then_rerun_resumes_from_the_last_complete_checkpoint(chain):
    code, text = chain["kill"]
    assert code == -signal.SIGKILL
    assert f"resuming from the checkpoint of step {chain['sigterm'][1]}" in text
    assert chain["kill_steps"][-1] < STEPS  # it was killed before the end

    code, text = chain["final"]
    assert code == 0, text[-3000:]
    last = chain["last_complete"]
    assert f"resuming from the checkpoint of step {last} " in text  # not the planted ones
    assert f"has no {checkpoints.COMMIT_MARKER}" in text  # the bogus folder was set aside
    assert os.path.isdir(os.path.join(chain["workdir"], "checkpoints", str(STEPS)))


def test_interrupted_run_ends_with_the_reference_parameters(setup, chain, trainer):
    _, root, _, reference = setup
    assert chain["final"][0] == 0
    params, step = _params(trainer, root, chain["workdir"])
    assert step == STEPS
    _assert_same(params, reference)
