"""Joining a multi-process run (jax.distributed) and stopping cleanly on preemption.

`setup_distributed(config)` must run before anything starts a JAX backend; every command-line
entry point (train, evaluate, explain, lr_finder) calls it through `tame_jax.cli`.
"""

from __future__ import annotations

import glob
import os
import signal
from typing import Any

import jax
from absl import logging


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
