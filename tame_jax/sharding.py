"""The device mesh, global batches and replication: data parallelism over one `batch` axis.

The mesh spans every device of every process. A global batch is assembled from each process's
local rows (`shard_batch`) and split along `batch`; models and train states are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "batch"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh with axis `batch` over the given devices (default: all, all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def check_global_batch(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Returns the per-device batch size; raises if the global batch doesn't divide evenly."""
    n = mesh.size
    if global_batch_size <= 0 or global_batch_size % n:
        lower = max(n, global_batch_size // n * n)
        raise ValueError(
            f"{what}={global_batch_size} does not divide by the {n} devices of the mesh; "
            f"set --config.{what} to a multiple of {n} (e.g. {lower} or {lower + n})"
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


def local_rows(v: jax.Array) -> np.ndarray:
    """Returns this process's rows of a batch-sharded (or replicated) per-image array, float64."""
    if v.is_fully_replicated:
        return np.asarray(v, np.float64).reshape(-1)
    shards = sorted(v.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:  # a shard may be held by several local devices: take it once
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            rows.append(np.asarray(s.data, np.float64).reshape(-1))
    return np.concatenate(rows)
