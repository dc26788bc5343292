"""Two processes on localhost train as one job: same parameters, disjoint data, one checkpoint.

Each process has 2 fake CPU devices and joins through jax.distributed (explicit coordinator
flags, gloo collectives); the 4 devices form one mesh and each host feeds its own shard.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from _train_worker import finish, free_port, get_config, make_folder, start, subprocess_env
from _train_worker import train_command as command

from tame_jax import checkpoints
from tame_jax.model import build_model

TIMEOUT_S = 300


def _flat(tree) -> dict[str, np.ndarray]:
    """Returns {path: array} of a pytree, the naming the worker uses."""
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the 2-process job once; returns (data root, files, workdir, out dir, logs)."""
    tmp = tmp_path_factory.mktemp("multihost")
    root = str(tmp / "data")
    files = make_folder(root, per_class=8)  # 16 images: 8 per host, local batch 4, 2 steps
    workdir, out = str(tmp / "run"), str(tmp / "out")
    os.makedirs(out)
    port = free_port()
    env = subprocess_env(devices=2)
    procs, logs = [], []
    for pid in range(2):
        cmd = command(workdir, root, "--config.num_train_steps=2", "--config.checkpoint_every=2",
                      f"--config.distributed.coordinator_address=localhost:{port}",
                      "--config.distributed.num_processes=2",
                      f"--config.distributed.process_id={pid}", record=out)
        logs.append(str(tmp / f"log_{pid}.txt"))
        procs.append(start(cmd, env, logs[-1]))
    texts = [finish(p, log, TIMEOUT_S) for p, log in zip(procs, logs, strict=True)]
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == 0, text[-4000:]
    return root, files, workdir, out, texts


def test_hosts_form_one_mesh_and_read_disjoint_shards(job):
    _, files, _, out, texts = job
    reads = [json.load(open(os.path.join(out, f"read_{i}.json"))) for i in range(2)]
    for r in reads:
        assert (r["process_count"], r["local_devices"], r["devices"]) == (2, 2, 4)
    host0, host1 = (set(r["files"]) for r in reads)
    assert len(reads[0]["files"]) == len(host0) == 8 and len(host1) == 8
    assert not host0 & host1  # disjoint shards
    assert host0 | host1 == set(files)  # together: the whole data set, each image once
    assert "training 2 steps (2 per epoch) from step 0 on 4 devices, batch 8" in texts[0]


def test_hosts_hold_identical_parameters_that_restore_in_one_process(job):
    root, _, workdir, out, _ = job
    held = [dict(np.load(os.path.join(out, f"params_{i}.npz"))) for i in range(2)]
    assert held[0].keys() == held[1].keys() and len(held[0]) > 4
    for k in held[0]:
        np.testing.assert_array_equal(held[0][k], held[1][k], err_msg=k)

    config = get_config()
    config.data.root = root
    model = build_model(config)
    restored, step = checkpoints.restore_attention(config, workdir, model)  # this process only
    assert step == 2
    restored = _flat(restored["params"])
    assert restored.keys() == held[0].keys()
    for k, v in restored.items():
        np.testing.assert_array_equal(v, held[0][k], err_msg=k)
    init = _flat(model.init_attention(jax.random.fold_in(jax.random.key(config.seed), 1))["params"])
    moved = max(float(np.abs(restored[k] - init[k]).max()) for k in init)
    assert moved > 1e-6  # the two steps changed the parameters
