"""Orbax checkpoints of the train state, with a description that guards against mix-ups.

Each checkpoint holds two items: `state` (the TrainState pytree) and `meta` (JSON: the step,
and what the state was trained for: backbone, layers, variant, classes). Orbax writes a step
to a temporary folder (`<step>.orbax-checkpoint-tmp*`) and renames it when complete, so a
half-written checkpoint (a killed run) is never listed and resume picks the last complete one.
A step folder that lacks orbax's commit marker (e.g. copied in part by hand) is ignored too.
"""

from __future__ import annotations

import logging as pylogging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tame_jax import workdirs

# The fields of `meta` that must agree between a checkpoint and the run that restores it.
IDENTITY_KEYS = ("backbone", "layers", "variant", "num_classes", "image_size")
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step folder as its last act


class _HideOrbaxInfo(pylogging.Filter):
    """Drops orbax's INFO/DEBUG records (a dozen lines per save); keeps its warnings."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
    """Hides orbax's per-save INFO lines from the absl log of a command-line run."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _HideOrbaxInfo) for f in handler.filters):
        handler.addFilter(_HideOrbaxInfo())


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained for another model than the one asked for."""


def describe(config: Any) -> dict[str, Any]:
    """Returns the identity of a run (what its checkpoints can be restored into)."""
    return {
        "backbone": config.model.backbone,
        "layers": list(config.model.layers),
        "variant": config.model.variant,
        "num_classes": int(config.model.num_classes),
        "image_size": int(config.data.image_size),
    }


def check_identity(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raises CheckpointMismatchError naming every field where the two identities differ."""
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, config asks for {expected.get(k)!r}"
             for k in IDENTITY_KEYS if k in expected and found.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint in {where} was trained for a different model:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --workdir for this config, or the config the checkpoint was made with."
        )


def set_aside_incomplete(directory: str) -> list[str]:
    """Returns the step folders renamed to `<step>.incomplete-<time>` for lacking a commit marker.

    Orbax lists every renamed step folder as complete; a folder without COMMIT_MARKER (where
    the others have one, so this orbax writes it) was not written by a finished save: moving
    it aside keeps it for inspection, and resume and later saves of that step ignore it.
    """
    if workdirs.is_url(directory) or not os.path.isdir(directory):
        return []  # on gs:// orbax's own commit markers and renames are relied on
    steps = [e.name for e in os.scandir(directory) if e.is_dir() and e.name.isdigit()]
    marked = {n for n in steps if os.path.exists(os.path.join(directory, n, COMMIT_MARKER))}
    if not marked:
        return []  # an orbax that writes no markers: trust its rename
    moved = []
    for name in sorted(set(steps) - marked, key=int):
        target = f"{name}.incomplete-{int(time.time())}"
        try:
            os.rename(os.path.join(directory, name), os.path.join(directory, target))
        except OSError as e:  # e.g. a read-only workdir: leave it, orbax may then list it
            logging.warning("could not move the incomplete checkpoint %s/%s aside: %s",
                            directory, name, e)
            continue
        logging.warning("checkpoint folder %s/%s has no %s (an unfinished save): moved it to %s "
                        "and ignored it", directory, name, COMMIT_MARKER, target)
        moved.append(target)
    return moved


def _committed(directory: str, steps: list[int]) -> list[int]:
    """Returns the steps whose folder has orbax's commit marker (all, if none has one)."""
    marked = [s for s in steps
              if workdirs.exists(workdirs.join(directory, str(s), COMMIT_MARKER))]
    return marked if marked else steps


class Checkpointer:
    """Saves every `every` steps (and on request), keeps the last `keep`, restores the latest.

    read_only=True (evaluate, explain): nothing in the workdir is created, renamed or deleted,
    so it is safe while a trainer writes there; unfinished step folders are skipped.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, every: int = 1000,
                 identity: Mapping[str, Any] | None = None, read_only: bool = False):
        self.directory = workdirs.join(workdirs.absolute(workdir), "checkpoints")
        self.every = max(1, int(every))
        self.identity = dict(identity or {})
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            if jax.process_index() == 0:
                set_aside_incomplete(self.directory)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("tame_jax checkpoints listed")
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Returns the step of the newest complete checkpoint, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Returns the steps of all complete checkpoints, oldest first."""
        steps = sorted(self.manager.all_steps())
        return _committed(self.directory, steps) if self.read_only else steps

    def save(self, step: int, state: Any, *, force: bool = False, extra: Mapping | None = None
             ) -> bool:
        """Returns whether a checkpoint of `state` at `step` was written (on schedule or forced)."""
        if not force and step % self.every:
            return False
        if step in self.all_steps():
            return False
        meta = {"step": int(step), **self.identity, **(extra or {})}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        return True

    def meta(self, step: int) -> dict[str, Any]:
        """Returns the JSON description saved with the checkpoint of `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"]

    def restore(self, target: Any, step: int | None = None, *, partial: bool = False
                ) -> tuple[Any, int]:
        """Returns (state, step) restored from `step` (default latest) into the target's structure.

        `target` is a state with the right structure (abstract or concrete); its shardings are
        used for the restored arrays. partial=True: `target` names a part of the saved state
        (e.g. only params and batch_stats), and only that part is read. Raises
        CheckpointMismatchError if the checkpoint was made for another backbone, variant, layer
        list or class count.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        check_identity(self.meta(step), self.identity, self.directory)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        if partial:
            args = ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=jax.tree_util.tree_map(
                    lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding) if s.sharding is not None
                    else ocp.RestoreArgs(restore_type=np.ndarray), abstract))
        else:
            args = ocp.args.StandardRestore(abstract)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"], step

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        if not self.read_only:
            self.manager.wait_until_finished()
        self.manager.close()


def restore_attention(config: Any, workdir: str | os.PathLike, model: Any,
                      step: int | None = None) -> tuple[dict[str, Any], int]:
    """Returns (attention variables, step) from a training workdir (default: latest step).

    Reads only the attention parameters and BatchNorm statistics: no optimiser state is built
    or read, and the workdir is opened read-only.
    """
    template = jax.eval_shape(model.init_attention, jax.random.key(0))
    target = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    ckpt = Checkpointer(workdir, identity=describe(config), read_only=True)
    try:
        if step is not None and step not in ckpt.all_steps():
            raise FileNotFoundError(f"no complete checkpoint of step {step} in {ckpt.directory}; "
                                    f"available steps: {ckpt.all_steps()}")
        variables, step = ckpt.restore(target, step, partial=True)
    finally:
        ckpt.close()
    return dict(variables), step
