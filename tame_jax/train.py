"""Train TAME: `python -m tame_jax.train --config=configs/resnet50.py --workdir=DIR`.

Rerunning the same command resumes from the newest complete checkpoint in DIR, at the same
position in the data. SIGTERM (a preemption notice) saves a checkpoint before exiting.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tame_jax import checkpoints, optim
from tame_jax.parallel import (
    TrainState,
    check_global_batch,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
)

SCALARS = ("loss", "ce", "area", "variation", "agreement")


class Preemption:
    """Tells the loop when to checkpoint and stop after a SIGTERM (a preemption notice).

    One process: a Python SIGTERM handler sets a flag, seen at the next step boundary.
    Several processes: JAX's preemption service (started by jax.distributed, with its own
    SIGTERM handler, which a Python handler would replace) tells every process the same step,
    so that all of them save together even if only one was signalled.
    """

    def __init__(self) -> None:
        self.requested = False
        self.multihost = jax.process_count() > 1
        self._previous = None
        if not self.multihost:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Returns whether to stop now; on several hosts all of them agree on the step."""
        if self.multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        """Puts back the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _slurm_tasks() -> int:
    """Returns the task count of the SLURM job step this process belongs to (1 outside srun)."""
    if "SLURM_STEP_NODELIST" not in os.environ or "SLURM_PROCID" not in os.environ:
        return 1  # not inside `srun` (an sbatch script itself is not a multi-process step)
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))


def _on_cloud_tpu_vm() -> bool:
    """Returns whether this machine has TPU chips, checked without starting a JAX backend."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_WORKER_HOSTNAMES"))


def distributed_mode(config: Any) -> str:
    """Returns how this process joins a multi-process run: "explicit", "auto" or "single".

    config.distributed.num_processes > 1: explicit coordinator address and process id;
    1: never initialise; -1 (default): "auto" under a multi-task SLURM step or on a TPU VM
    (jax.distributed finds the others itself), "single" otherwise.
    """
    d = config.get("distributed", None)
    n = -1 if d is None else int(d.num_processes)
    if n > 1:
        if not d.coordinator_address or not 0 <= d.process_id < n:
            raise ValueError(
                f"config.distributed.num_processes={n} needs coordinator_address (host:port of "
                f"process 0, reachable from all) and process_id in 0..{n - 1}; got "
                f"coordinator_address={d.coordinator_address!r}, process_id={d.process_id}"
            )
        return "explicit"
    if n == 1 or n == 0:
        return "single"
    if n != -1:
        raise ValueError(f"config.distributed.num_processes={n}: use -1 (detect), 1, or > 1")
    return "auto" if _slurm_tasks() > 1 or _on_cloud_tpu_vm() else "single"


def setup_distributed(config: Any) -> None:
    """Starts jax.distributed when running on several processes (explicit, SLURM or TPU pod).

    Must run before anything starts a JAX backend (jax.devices(), default_backend(), any
    computation): both jax.distributed and the CPU collectives are fixed when it starts.
    """
    mode = distributed_mode(config)
    if mode == "single" or jax.distributed.is_initialized():
        return
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives for CPU devices (a no-op for GPU/TPU devices).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "explicit":
        d = config.distributed
        jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                   num_processes=int(d.num_processes),
                                   process_id=int(d.process_id))
    elif _slurm_tasks() > 1:
        jax.distributed.initialize()  # coordinator, count and id from the SLURM step
    else:
        try:
            jax.distributed.initialize()  # Cloud TPU VM: the pod's hosts from its metadata
        except ValueError as e:  # no TPU cluster found after all: one process
            logging.warning("no TPU pod found (%s); running as a single process", e)
            return
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


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

    init_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    state = replicate(TrainState.create(model.init_attention(init_rng), tx), mesh)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                    every=config.checkpoint_every,
                                    identity=checkpoints.describe(config))
    start = 0
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(state)
        logging.info("resuming from the checkpoint of step %d in %s", start, ckpt.directory)
    write_config(config, workdir)
    if start >= num_steps:
        logging.info("training already finished (%d steps)", num_steps)
        ckpt.close()
        return state

    backbone_vars = replicate(model.backbone_vars, mesh)
    step_fn = make_train_step(
        mesh, backbone=model.backbone, attention=model.attention, tx=tx, layers=model.layers,
        backbone_mode=config.model.backbone_mode, selective_fusion=config.model.selective_fusion)
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
            state, metrics = step_fn(state, backbone_vars, images, jax.random.fold_in(key, step))
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
                scalars = {k: float(values[k]) for k in SCALARS}
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


def define_flags() -> None:
    """Defines the command-line flags --config (with --config.X=... overrides) and --workdir."""
    config_flags.DEFINE_config_file("config", None, "path to a config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go")
    flags.mark_flags_as_required(["config", "workdir"])


def _load_config_file(argv: list[str]) -> Any:
    """Returns the config that --config=FILE[:ARG] in argv names (None if there is none)."""
    import runpy

    spec = None
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if not spec:
        return None
    path, _, arg = spec.partition(":")
    get_config = runpy.run_path(path)["get_config"]
    return get_config(arg) if arg else get_config()


def _unknown_config_key(argv: list[str]) -> str | None:
    """Returns a message naming the first --config.X=... override whose key does not exist."""
    try:
        config = _load_config_file(argv)
    except Exception:  # the normal parse reports problems with the file itself
        return None
    if config is None:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[2:].split("=", 1)[0].split(".")[1:]
        node, where = config, "config"
        for key in path:
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {where}.{close[0]}?" if close else ""
                return (f"unknown config key {'.'.join(['config', *path])!r} in {arg!r}: {where} "
                        f"has no field {key!r}.{hint} Its fields: {', '.join(sorted(fields))}.")
            node, where = node[key], f"{where}.{key}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Returns the arguments left after parsing flags; exits with a clear message on a bad key."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):  # ml_collections' message names no flag
        message = _unknown_config_key(argv)
        if message is None:
            raise
        sys.exit(f"FATAL Flags parsing error: {message}")
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpfull for help on flags.")


def main(argv: list[str]) -> None:
    """Entry point for `python -m tame_jax.train`."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax_logs()
    config = flags.FLAGS.config
    logging.info("config:\n%s", json.dumps(json.loads(config.to_json_best_effort()), indent=1))
    train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
