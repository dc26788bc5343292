"""Train TAME: `python -m tame_jax.train --config=configs/resnet50.py --workdir=DIR`.

Rerunning the same command resumes from the newest complete checkpoint in DIR, at the same
position in the data. SIGTERM (a preemption notice) saves a checkpoint before exiting.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tame_jax import checkpoints, cli, losses, metrics, optim, viz, workdirs
from tame_jax.distributed import Preemption, setup_distributed
from tame_jax.model import Model
from tame_jax.sharding import check_global_batch, make_mesh, replicate, shard_batch
from tame_jax.train_step import TrainState, init_state, make_train_step


def total_steps(config: Any, steps_per_epoch: int) -> int:
    """Returns the run length: num_train_steps if set, else num_epochs x steps_per_epoch."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs * steps_per_epoch)


def write_config(config: Any, workdir: str) -> None:
    """Writes workdir/config.json (process 0), which evaluate and explain read back; the
    backbone weights are recorded by absolute path, path relative to the workdir and SHA-256."""
    if jax.process_index() == 0:
        workdirs.write_config(config, workdir)


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


def _local(tree: Any) -> Any:
    """Returns this process's copy of replicated arrays, as arrays on its first device."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)


class ExplanationMonitor:
    """What the maps look like during training, in TensorBoard: every `image_every` steps a grid
    of the same held-out images (top row) with their maps (bottom row), and AD/IC(100%) on
    `image_eval_examples` held-out images.

    Runs on process 0 with its local copy of the model: fixed shapes, so the two programs are
    compiled at the first call only; the step waits for it only at those steps.
    """

    def __init__(self, config: Any, model: Model):
        self.config, self.model = config, model
        self.batch = int(config.eval.batch_size)
        self._explain = jax.jit(Model.explain)
        self._ad_ic = jax.jit(lambda model, x, maps, classes: metrics.ad_ic(
            model.classify, x, maps, classes, (1.0,)))
        self._images: np.ndarray | None = None
        self._count = 0

    def _held_out(self) -> np.ndarray:
        """Returns the held-out images, padded to whole batches (the first of the eval split)."""
        from tame_jax import data

        want = max(int(self.config.image_grid), int(self.config.image_eval_examples), 1)
        rows = []
        for batch in data.eval_iterator(self.config, global_batch_size=self.batch,
                                        process_index=0, process_count=1):
            rows.append(batch["image"][batch["valid"]])
            if sum(len(r) for r in rows) >= want:
                break
        images = np.concatenate(rows)[:want]
        self._count = len(images)
        pad = -len(images) % self.batch
        return np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]) if pad else images

    def __call__(self, writer: Any, step: int, attention_vars: Any) -> dict[str, float]:
        """Writes the grid and AD/IC(100%) at step; returns the scalars."""
        if self._images is None:
            self._images = self._held_out()
        av = _local(attention_vars)
        maps, sums = [], np.zeros(2)
        for i in range(0, len(self._images), self.batch):
            x = jnp.asarray(self._images[i:i + self.batch])
            m, classes, _ = self._explain(self.model, av, x)
            terms = self._ad_ic(self.model, x, m, classes)
            valid = (np.arange(i, i + self.batch) < self._count).astype(np.float64)
            sums += [float((np.asarray(terms["ad_100"]) * valid).sum()),
                     float((np.asarray(terms["ic_100"]) * valid).sum())]
            maps.append(np.asarray(m))
        n = min(int(self.config.image_grid), self._count)
        if n > 0:
            images, heat = self._images[:n], np.concatenate(maps)[:n]
            top = np.concatenate(list((images * 255).round().astype(np.uint8)), axis=1)
            bottom = np.concatenate([viz.overlay(im, h) for im, h in zip(images, heat,
                                                                       strict=True)], axis=1)
            writer.write_images(step, {"explanations": np.concatenate([top, bottom])[None]})
        scalars = {"heldout/ad_100": 100 * sums[0] / self._count,
                   "heldout/ic_100": 100 * sums[1] / self._count}
        writer.write_scalars(step, scalars)
        return scalars


def check_train_labels(config: Any) -> None:
    """Raises ValueError, before anything is written, if the labels training needs are missing.

    model.train_labels="data" takes the labels from the data: every training example must have
    one (a list file of `relative/path label` lines, a folder, or a labelled tfds set).
    """
    from tame_jax.model import TRAIN_LABELS

    mode = config.model.get("train_labels", "model")
    if mode not in TRAIN_LABELS:
        raise ValueError(f"config.model.train_labels={mode!r}; choose one of {TRAIN_LABELS}")
    if mode != "data" or config.data.source != "list":
        return
    from tame_jax.data.sources import read_list_file

    split = config.data.get("train_split", "train")
    _, labels = read_list_file(config, split)
    missing = sum(label < 0 for label in labels)
    if missing:
        raise ValueError(
            f"config.model.train_labels='data' needs a label for every training image, but "
            f"{missing} of the {len(labels)} lines of the list file have none: write "
            "`relative/path label` lines (e.g. the frozen model's predictions, as the reference "
            "did), or set config.model.train_labels='model' to take the model truth from a "
            "frozen pass")


def train_and_evaluate(config: Any, workdir: str) -> TrainState:
    """Returns the final train state after training TAME as the config says (resuming)."""
    from clu import metric_writers, periodic_actions  # import TensorFlow: not at module import

    from tame_jax import data
    from tame_jax.model import build_model

    setup_distributed(config)
    check_train_labels(config)
    losses.LossConfig.from_config(config.get("loss"))  # a bad coefficient fails before any write
    workdir = workdirs.absolute(workdir)
    workdirs.makedirs(workdir)
    mesh = make_mesh()
    check_global_batch(config.batch_size, mesh)
    model = build_model(config)
    steps_per_epoch = data.steps_per_epoch(config, config.batch_size)
    num_steps = total_steps(config, steps_per_epoch)
    tx = optim.make_optimizer(config.learning_rate, num_steps,
                              bias_lr_factor=config.bias_lr_factor)
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

    local_model, model = model, replicate(model, mesh)
    step_fn = make_train_step(mesh, tx, backbone_mode=config.model.backbone_mode,
                              selective_fusion=config.model.selective_fusion,
                              train_labels=config.model.train_labels,
                              loss=losses.LossConfig.from_config(config.get("loss")),
                              mask_space=config.loss.mask_space)
    data_labels = config.model.train_labels == "data"
    batches = data.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed,
                                  start_step=start)
    chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not chief)
    hooks = []
    if chief:  # steps/s and ETA in the log and TensorBoard; a profiler trace on request
        hooks.append(periodic_actions.ReportProgress(
            num_train_steps=num_steps, writer=writer, every_steps=config.log_every))
        if config.profile_steps > 0:
            hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                                  first_profile=10, logdir=workdir))
    monitor = ExplanationMonitor(config, local_model) if chief and config.image_every > 0 \
        else None
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    preemption = Preemption()
    logging.info("training %d steps (%d per epoch) from step %d on %d devices, batch %d",
                 num_steps, steps_per_epoch, start, mesh.size, config.batch_size)

    pending = None  # (step, metrics) of the previous step: checked one step late, no stall
    try:
        for step in range(start, num_steps):
            batch = next(batches)
            arrays = shard_batch({k: batch[k] for k in (("image", "label") if data_labels
                                                         else ("image",))}, mesh)
            state, metrics = step_fn(state, model, arrays["image"], jax.random.fold_in(key, step),
                                     arrays.get("label"))
            if pending is not None:
                check_finite(jax.device_get(pending[1]), pending[0], ckpt)
            pending = (step + 1, metrics)
            done = step + 1
            for hook in hooks:
                hook(done)
            if done % config.log_every == 0 or done == num_steps:
                values = jax.device_get(metrics)
                check_finite(values, done, ckpt)
                scalars = {k: float(v) for k, v in values.items()}  # whatever the loss returns
                scalars.update(learning_rate=float(lr_schedule(step)))
                writer.write_scalars(done, scalars)
                logging.info("step %d/%d  loss %.4f  agreement %.3f", done, num_steps,
                             scalars["loss"], scalars["agreement"])
            if monitor is not None and done % config.image_every == 0:
                with _timed(hooks, "explanations"):
                    monitor(writer, done, state.attention_vars)
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


def _timed(hooks: list, name: str) -> Any:
    """Returns a context that ReportProgress counts as time spent on `name` (else a no-op)."""
    import contextlib

    for hook in hooks:
        if hasattr(hook, "timed"):
            return hook.timed(name, wait_jax_async_dispatch=False)
    return contextlib.nullcontext()


def main(config: Any, workdir: str) -> None:
    """Entry point for `python -m tame_jax.train`."""
    logging.info("config:\n%s", json.dumps(json.loads(config.to_json_best_effort()), indent=1))
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    cli.define_flags()
    cli.run(main)
