"""The device mesh, global batches, and the sharded TAME train step.

Data parallelism: one mesh axis, `batch`, over every device of every process. The step is
`jax.jit` of a `jax.shard_map` whose per-device body sees its slice of the global batch and
talks to the other devices explicitly: labels are all-gathered, the attention BatchNorm takes
`pmean` statistics, and the loss terms are `psum`-reduced, so the step is the same function of
the global batch on 1, 8 or 512 devices. (With `jax.pmap` one wrote the same body and the same
collectives; `shard_map` is its successor, composes with `jit`, and spans hosts.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tame_jax import losses
from tame_jax.image_ops import normalize

BATCH_AXIS = "batch"
BACKBONE_MODES = ("frozen", "train")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh with axis `batch` over the given devices (default: all, all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def check_global_batch(global_batch_size: int, mesh: Mesh) -> int:
    """Returns the per-device batch size; raises if the global batch doesn't divide evenly."""
    n = mesh.size
    if global_batch_size <= 0 or global_batch_size % n:
        lower = max(n, global_batch_size // n * n)
        raise ValueError(
            f"batch_size={global_batch_size} does not divide by the {n} devices of the mesh; "
            f"set --config.batch_size to a multiple of {n} (e.g. {lower} or {lower + n})"
        )
    return global_batch_size // n


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Returns global arrays sharded along `batch` from this process's local batch."""
    sharding = NamedSharding(mesh, P(BATCH_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Returns the tree placed, fully replicated, on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


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


def backbone_forward(backbone: nn.Module, variables: Any, images: jax.Array, *,
                     mode: str = "frozen", rng: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (logits, features) of the backbone on images in [0, 1] (normalised here).

    mode "frozen": BatchNorm on stored statistics, no dropout (the model as deployed).
    mode "train": BatchNorm on batch statistics and dropout on, as the reference ran it.
    """
    x = normalize(images)
    if mode == "frozen":
        return backbone.apply(variables, x, train=False)
    if mode != "train":
        raise ValueError(f"backbone_mode={mode!r}; choose one of {BACKBONE_MODES}")
    out, _ = backbone.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": rng})
    return out


def make_per_device_step(
    *,
    backbone: nn.Module,
    attention: nn.Module,
    tx: optax.GradientTransformation,
    layers: Sequence[str],
    backbone_mode: str = "frozen",
    selective_fusion: bool = True,
) -> Callable:
    """Returns the per-device step body (state, backbone_vars, images, key) -> (state, metrics).

    `attention` must have `axis_name=BATCH_AXIS` so that its BatchNorm uses global statistics.
    """
    if backbone_mode not in BACKBONE_MODES:
        raise ValueError(f"backbone_mode={backbone_mode!r}; choose one of {BACKBONE_MODES}")
    layers = tuple(layers)

    def per_device(state: TrainState, backbone_vars: Any, images: jax.Array, key: jax.Array):
        b = images.shape[0]  # local batch
        index = jax.lax.axis_index(BATCH_AXIS)
        key_feat, key_mask = jax.random.split(jax.random.fold_in(key, index))
        logits, feats = backbone_forward(backbone, backbone_vars, images,
                                         mode=backbone_mode, rng=key_feat)
        # Model truth from the same pass that gives the features; L is the global label list.
        labels = jax.lax.all_gather(jnp.argmax(logits, -1), BATCH_AXIS, tiled=True)  # (B,)
        feats = [jax.lax.stop_gradient(feats[name]) for name in layers]

        def classify(masked: jax.Array) -> jax.Array:
            return backbone_forward(backbone, backbone_vars, masked,
                                    mode=backbone_mode, rng=key_mask)[0]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if selective_fusion:
                c, updates = attention.apply(variables, feats, labels, train=True,
                                             mutable=["batch_stats"])
            else:  # full K-channel fusion, then the same columns: for benchmarks
                c, updates = attention.apply(variables, feats, None, train=True,
                                             mutable=["batch_stats"])
                c = jnp.take(c, labels, axis=-1)
            maps = jax.nn.sigmoid(c)  # (b, S, S, B)
            loss, terms = losses.tame_objective(images, maps, labels, index * b, classify,
                                                axis_name=BATCH_AXIS)
            return loss, (terms, updates.get("batch_stats", {}))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (terms, batch_stats)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=batch_stats, opt_state=opt_state)
        return new_state, terms

    return per_device


def jit_step(per_device: Callable, mesh: Mesh) -> Callable:
    """Returns the jitted, sharded step: state and backbone replicated, images split on `batch`.

    The state argument is donated: its buffers are reused for the new state.
    """
    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(), P(), P(BATCH_AXIS), P()),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=(0,))


def make_train_step(mesh: Mesh, **kwargs: Any) -> Callable:
    """Returns the jitted sharded train step (see `make_per_device_step` for the arguments)."""
    return jit_step(make_per_device_step(**kwargs), mesh)
