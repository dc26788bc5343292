"""Orbax checkpoints of the train state, with a description that guards against mix-ups.

Each checkpoint holds two items: `state` (the TrainState pytree) and `meta` (JSON: the step,
and what the state was trained for: backbone, layers, variant, classes). Orbax writes a step
to a temporary folder (`<step>.orbax-checkpoint-tmp*`) and renames it when complete, so a
half-written checkpoint (a killed run) is never listed and resume picks the last complete one.
A step folder that lacks orbax's commit marker (e.g. copied in part by hand) is ignored too.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tame_jax import workdirs

# What a checkpoint's attention module was built for: evaluation and explanation need these.
MODEL_KEYS = ("backbone", "layers", "variant", "num_classes", "image_size")
# What else makes the trained function: resuming with any of these changed would join two
# different runs (e.g. two one-cycle schedules), so a resume checks them too.
RUN_KEYS = ("learning_rate", "total_steps", "num_epochs", "num_train_steps", "batch_size",
            "bias_lr_factor", "loss", "data_source", "backbone_mode", "train_labels",
            "selective_fusion", "seed")
IDENTITY_KEYS = MODEL_KEYS + RUN_KEYS
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


def check_allowed(allowed: Sequence[str]) -> None:
    """Raises ValueError if `allowed` (config.resume_allow_changes) names an unknown field."""
    unknown = sorted(set(allowed) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"config.resume_allow_changes: unknown fields {unknown}; they can be "
                         f"{', '.join(RUN_KEYS)} (the model's own fields cannot change)")


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained for another model than the one asked for."""


def describe(config: Any, total_steps: int | None = None) -> dict[str, Any]:
    """Returns the identity of a run: the model it trains (MODEL_KEYS) and, with total_steps
    (the run's length), what else makes the trained function (RUN_KEYS)."""
    out: dict[str, Any] = {
        "backbone": config.model.backbone,
        "layers": list(config.model.layers),
        "variant": config.model.variant,
        "num_classes": int(config.model.num_classes),
        "image_size": int(config.data.image_size),
    }
    if total_steps is None:
        return out
    data = config.data
    source = {"source": data.source, "root": data.get("root", ""),
              "list_file": data.get("list_file", ""), "train_split": data.get("train_split")}
    if data.source == "synthetic_shapes":
        source["synthetic_config"] = data.get("synthetic_config")
    loss = config.get("loss", None)
    out.update(
        learning_rate=float(config.learning_rate), total_steps=int(total_steps),
        num_epochs=float(config.num_epochs), num_train_steps=int(config.num_train_steps),
        batch_size=int(config.batch_size),
        bias_lr_factor=float(config.get("bias_lr_factor", 2.0)),
        train_labels=config.model.get("train_labels", "model"),
        loss=json.loads(loss.to_json_best_effort()) if loss is not None else {},
        data_source=source, backbone_mode=config.model.backbone_mode,
        selective_fusion=bool(config.model.selective_fusion), seed=int(config.seed))
    return out


def check_identity(found: Mapping[str, Any], expected: Mapping[str, Any], where: str,
                   allowed: Sequence[str] = ()) -> None:
    """Raises CheckpointMismatchError naming every field where the two identities differ.

    Fields in `allowed` may differ (a deliberate change, logged); fields the checkpoint does
    not record (made by an older version) are logged and not checked.
    """
    check_allowed(allowed)
    diffs, changed, unrecorded = [], [], []
    for k in IDENTITY_KEYS:
        if k not in expected:
            continue
        if k not in found:
            unrecorded.append(k)
        elif found[k] != expected[k]:
            line = f"{k}: checkpoint has {found[k]!r}, config asks for {expected[k]!r}"
            (changed if k in allowed else diffs).append(line)
    if unrecorded:
        logging.warning("the checkpoint in %s does not record %s (an older tame_jax): not "
                        "checked", where, ", ".join(unrecorded))
    for line in changed:
        logging.warning("resuming with a deliberate change (config.resume_allow_changes): %s",
                        line)
    if diffs:
        model = any(d.split(":")[0] in MODEL_KEYS for d in diffs)
        fix = ("Use another --workdir for this config, or the config the checkpoint was made "
               "with." if model else
               "Use another --workdir, the settings the run was started with, or, to change "
               "them deliberately, --config.resume_allow_changes=<field>,...")
        raise CheckpointMismatchError(
            f"the checkpoint in {where} was trained for a different "
            f"{'model' if model else 'run'}:\n  " + "\n  ".join(diffs) + "\n" + fix)


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
                 identity: Mapping[str, Any] | None = None, read_only: bool = False,
                 allowed_changes: Sequence[str] = ()):
        self.directory = workdirs.join(workdirs.absolute(workdir), "checkpoints")
        self.every = max(1, int(every))
        self.identity = dict(identity or {})
        self.allowed_changes = tuple(allowed_changes)
        check_allowed(self.allowed_changes)
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
        check_identity(self.meta(step), self.identity, self.directory, self.allowed_changes)
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
