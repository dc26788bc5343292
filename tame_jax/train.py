"""Train TAME: `python -m tame_jax.train --config=configs/resnet50.py --workdir=DIR`.

Rerunning the same command resumes from the newest complete checkpoint in DIR, at the same
position in the data. SIGTERM (a preemption notice) saves a checkpoint before exiting.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tame_jax import checkpoints, cli, optim
from tame_jax.distributed import Preemption, setup_distributed
from tame_jax.sharding import check_global_batch, make_mesh, replicate, shard_batch
from tame_jax.train_step import TrainState, init_state, make_train_step


def total_steps(config: Any, steps_per_epoch: int) -> int:
    """Returns the run length: num_train_steps if set, else num_epochs x steps_per_epoch."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs * steps_per_epoch)


def write_config(config: Any, workdir: str) -> None:
    """Writes workdir/config.json (process 0), which evaluate and explain read back."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def check_finite(metrics: dict[str, np.ndarray], step: int, ckpt: checkpoints.Checkpointer
                 ) -> None:
    """Raises FloatingPointError naming the step if the loss is NaN or infinite."""
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        _raise_not_finite(f"loss became {loss} at step {step}", ckpt)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Returns a scalar bool: whether every entry of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def check_state_finite(state: TrainState, step: int, ckpt: checkpoints.Checkpointer) -> None:
    """Raises FloatingPointError naming the step if a parameter or statistic is NaN or inf."""
    if not bool(_all_finite((state.params, state.batch_stats))):
        _raise_not_finite(f"the parameters became NaN or infinite at step {step}", ckpt)


def _raise_not_finite(what: str, ckpt: checkpoints.Checkpointer) -> None:
    """Raises FloatingPointError saying what went wrong and which checkpoint is still good."""
    ckpt.wait()
    last = ckpt.latest_step()
    raise FloatingPointError(
        f"{what}; stopping without saving it. The last good checkpoint is "
        f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}. "
        "Lower config.learning_rate (try tame_jax.lr_finder) or check the input data."
    )


def train_and_evaluate(config: Any, workdir: str) -> TrainState:
    """Returns the final train state after training TAME as the config says (resuming)."""
    from clu import metric_writers  # imports TensorFlow: keep it out of module import

    from tame_jax import data
    from tame_jax.model import build_model

    setup_distributed(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    check_global_batch(config.batch_size, mesh)
    model = build_model(config)
    steps_per_epoch = data.steps_per_epoch(config, config.batch_size)
    num_steps = total_steps(config, steps_per_epoch)
    tx = optim.make_optimizer(config.learning_rate, num_steps)
    lr_schedule = optim.one_cycle_lr(num_steps, config.learning_rate)

    state = init_state(model, tx, jax.random.fold_in(jax.random.key(config.seed), 1), mesh)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                    every=config.checkpoint_every,
                                    identity=checkpoints.describe(config, num_steps),
                                    allowed_changes=tuple(config.resume_allow_changes))
    start = 0
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(state)
        logging.info("resuming from the checkpoint of step %d in %s", start, ckpt.directory)
    write_config(config, workdir)
    if start >= num_steps:
        logging.info("training already finished (%d steps)", num_steps)
        ckpt.close()
        return state

    model = replicate(model, mesh)
    step_fn = make_train_step(mesh, tx, backbone_mode=config.model.backbone_mode,
                              selective_fusion=config.model.selective_fusion)
    batches = data.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed,
                                  start_step=start)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    preemption = Preemption()
    logging.info("training %d steps (%d per epoch) from step %d on %d devices, batch %d",
                 num_steps, steps_per_epoch, start, mesh.size, config.batch_size)

    pending = None  # (step, metrics) of the previous step: checked one step late, no stall
    t0, t_start, n0 = time.perf_counter(), time.perf_counter(), start
    try:
        for step in range(start, num_steps):
            images = shard_batch({"image": next(batches)["image"]}, mesh)["image"]
            state, metrics = step_fn(state, model, images, jax.random.fold_in(key, step))
            if pending is not None:
                check_finite(jax.device_get(pending[1]), pending[0], ckpt)
            pending = (step + 1, metrics)
            done = step + 1
            if done % config.log_every == 0 or done == num_steps:
                values = jax.device_get(metrics)
                check_finite(values, done, ckpt)
                now = time.perf_counter()
                ips = (done - n0) * config.batch_size / (now - t0)
                eta = (num_steps - done) * (now - t_start) / max(done - start, 1)
                scalars = {k: float(v) for k, v in values.items()}  # whatever the loss returns
                scalars.update(learning_rate=float(lr_schedule(step)), images_per_sec=ips)
                writer.write_scalars(done, scalars)
                logging.info("step %d/%d  loss %.4f  agreement %.3f  %.1f img/s  ETA %s",
                             done, num_steps, scalars["loss"], scalars["agreement"], ips,
                             time.strftime("%H:%M:%S", time.gmtime(eta)))
                t0, n0 = now, done
            stop = preemption.reached(done)
            if done % ckpt.every == 0 or stop:
                check_finite(jax.device_get(metrics), done, ckpt)
                check_state_finite(state, done, ckpt)
                ckpt.save(done, state, force=True)
            if stop:
                ckpt.wait()
                logging.warning("preempted: saved step %d; rerun the same command to resume", done)
                raise SystemExit(143)
        check_finite(jax.device_get(metrics), num_steps, ckpt)
        check_state_finite(state, num_steps, ckpt)
        ckpt.save(num_steps, state, force=True)
    finally:
        preemption.restore()
        writer.flush()
        ckpt.close()
    return state


def main(config: Any, workdir: str) -> None:
    """Entry point for `python -m tame_jax.train`."""
    logging.info("config:\n%s", json.dumps(json.loads(config.to_json_best_effort()), indent=1))
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    cli.define_flags()
    cli.run(main)
