"""The train state and the sharded TAME train step.

The step is `jax.jit` of a `jax.shard_map` whose per-device body sees its slice of the global
batch and talks to the other devices explicitly: labels are all-gathered, the attention
BatchNorm (and, in backbone_mode "train", the backbone's) takes `pmean` statistics, and the
loss terms are `psum`-reduced, so the step is the same function of the global batch on 1, 8 or
512 devices. (With `jax.pmap` one wrote the same
body and the same collectives; `shard_map` is its successor, composes with `jit`, and spans
hosts.) The model is an argument, replicated, so its weights are never compiled in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tame_jax import losses
from tame_jax.model import BACKBONE_MODES, TRAIN_LABELS, Model
from tame_jax.sharding import BATCH_AXIS, replicate


@flax.struct.dataclass
class TrainState:
    """What training updates: the attention parameters, its BatchNorm statistics, the optimiser."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @classmethod
    def create(cls, variables: Mapping[str, Any], tx: optax.GradientTransformation) -> TrainState:
        """Returns the state at step 0 for the attention variables."""
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

    @property
    def attention_vars(self) -> dict[str, Any]:
        """Returns the attention variables {'params', 'batch_stats'} of this state."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_state(model: Model, tx: optax.GradientTransformation, rng: jax.Array,
               mesh: Mesh | None = None) -> TrainState:
    """Returns a fresh train state for the model's attention module (replicated on mesh)."""
    state = TrainState.create(model.init_attention(rng), tx)
    return state if mesh is None else replicate(state, mesh)


def distinct_classes(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Returns (classes (N,), column (B,)): the distinct labels, N = min(B, K), and labels[j]'s
    position in them, so classes[column] == labels.

    The size is static: fewer distinct labels are padded with labels[0] (a valid class whose
    extra columns are computed and never read), so a global batch above K never fuses more
    than K columns.
    """
    n = min(labels.shape[0], num_classes)
    classes, column = jnp.unique(labels, size=n, fill_value=labels[0], return_inverse=True)
    return classes, column.reshape(labels.shape)


def make_per_device_step(tx: optax.GradientTransformation, *, backbone_mode: str = "frozen",
                         selective_fusion: bool = True, train_labels: str = "model",
                         loss: losses.LossConfig = losses.PAPER,
                         mask_space: str = "pixels") -> Callable:
    """Returns the per-device step body (state, model, images, key, labels) -> (state, terms).

    Labels (the model truth) never come from a stochastic pass. backbone_mode "frozen": from
    the argmax of the pass that gives the features. "train" (the reference's training-mode
    backbone, BatchNorm on global-batch statistics, dropout on): from an extra frozen
    (eval-mode) pass. train_labels "data": the `labels` argument instead (the data's labels; the
    reference read its model truth from list files); otherwise `labels` is ignored.
    mask_space: 'pixels' masks the [0, 1] image (TAME), 'normalized' the normalised input
    (T-TAME: a masked pixel becomes the model's mean colour).
    """
    if backbone_mode not in BACKBONE_MODES:
        raise ValueError(f"backbone_mode={backbone_mode!r}; choose one of {BACKBONE_MODES}")
    if train_labels not in TRAIN_LABELS:
        raise ValueError(f"train_labels={train_labels!r}; choose one of {TRAIN_LABELS}")
    if mask_space not in losses.MASK_SPACES:
        raise ValueError(f"loss.mask_space={mask_space!r}; choose one of {losses.MASK_SPACES}")
    train_mode = backbone_mode == "train"
    axis = BATCH_AXIS if train_mode else None  # backbone BatchNorm over the global batch

    def per_device(state: TrainState, model: Model, images: jax.Array, key: jax.Array,
                   data_labels: jax.Array | None):
        b = images.shape[0]  # local batch
        index = jax.lax.axis_index(BATCH_AXIS)
        key_feat, key_mask = jax.random.split(jax.random.fold_in(key, index))
        logits, feats = model.features(images, mode=backbone_mode, rng=key_feat, axis_name=axis)
        if train_labels == "data":
            if data_labels is None:
                raise ValueError("train_labels='data' takes the labels from the data: pass the "
                                 "batch's labels to the step")
            local_labels = data_labels.astype(jnp.int32)
        elif train_mode:  # model truth from a deterministic pass, never the stochastic one
            local_labels = jnp.argmax(model.classify(images), -1)
        else:
            local_labels = jnp.argmax(logits, -1)
        # L is the global label list, in batch order.
        labels = jax.lax.all_gather(local_labels, BATCH_AXIS, tiled=True)  # (B,)
        feats = [jax.lax.stop_gradient(f) for f in feats]

        def classify(masked: jax.Array) -> jax.Array:
            return model.classify(masked, mode=backbone_mode, rng=key_mask, axis_name=axis)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if selective_fusion:  # each distinct class once, then a column per label
                classes, column = distinct_classes(labels, model.attention.num_classes)
                c, batch_stats = model.class_logits_train(variables, feats, classes, BATCH_AXIS)
                c = jnp.take(c, column, axis=-1)
            else:  # full K-channel fusion, then the same columns: for benchmarks
                c, batch_stats = model.class_logits_train(variables, feats, None, BATCH_AXIS)
                c = jnp.take(c, labels, axis=-1)
            maps = jax.nn.sigmoid(c)  # (b, S, S, B)
            fill = model.mean if mask_space == "normalized" else None
            total, terms = losses.tame_objective(images, maps, labels, index * b, classify,
                                                 axis_name=BATCH_AXIS, coefs=loss,
                                                 mask_fill=fill)
            return total, (terms, batch_stats)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (terms, batch_stats)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=batch_stats, opt_state=opt_state)
        return new_state, terms

    return per_device


def jit_step(per_device: Callable, mesh: Mesh) -> Callable:
    """Returns the jitted, sharded step(state, model, images, key, labels=None).

    State and model replicated, images (and labels) split on `batch`; the state argument is
    donated: its buffers are reused for the new state. labels (B,) int are the data's labels,
    needed (only) with train_labels="data".
    """
    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(), P(), P(BATCH_AXIS), P(), P(BATCH_AXIS)),
        out_specs=(P(), P()),
    )

    def step(state: TrainState, model: Model, images: jax.Array, key: jax.Array,
             labels: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        return sharded(state, model, images, key, labels)

    return jax.jit(step, donate_argnums=(0,))


def make_train_step(mesh: Mesh, tx: optax.GradientTransformation, **kwargs: Any) -> Callable:
    """Returns step(state, model, images, key, labels=None) -> (state, {term: value}), jitted
    and sharded.

    kwargs: backbone_mode, selective_fusion, train_labels, loss, mask_space (see
    `make_per_device_step`).
    """
    return jit_step(make_per_device_step(tx, **kwargs), mesh)
