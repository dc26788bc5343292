"""Same machine, same config, same seed: bitwise the same parameters and batches, whatever the
thread counts of XLA and tf.data (and the load of the machine)."""

from __future__ import annotations

import os

import numpy as np

from tame_jax import data

TIMEOUT_S = 300


def test_two_trainings_with_different_thread_settings_end_bitwise_equal(
        tmp_path, trainer, image_folder):
    root = str(tmp_path / "data")
    image_folder(root, per_class=8)
    runs = {  # name: (extra XLA flags, trainer overrides, CPU cores the process may use)
        "default": ("", (), None),
        "one_thread": ("--xla_cpu_multi_thread_eigen=false",
                       ("--config.data.threads=1", "--config.data.num_parallel_calls=1"), {0}),
    }
    procs = {}
    for name, (xla, overrides, cores) in runs.items():
        env = trainer.env(devices=1)  # no shared compilation cache: each compiles its own step
        env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {xla}".strip()
        out = tmp_path / name
        out.mkdir()
        cmd = trainer.command(str(tmp_path / f"work_{name}"), root, *overrides, record=str(out))
        if cores:  # XLA and TensorFlow size their thread pools from the usable cores
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cores))), *cmd]
        procs[name] = trainer.start(cmd, env, str(tmp_path / f"{name}.log"))
    logs = {name: trainer.finish(p, str(tmp_path / f"{name}.log"), TIMEOUT_S)
            for name, p in procs.items()}  # both at once: each runs under the other's load
    for name, p in procs.items():
        assert p.returncode == 0, logs[name][-3000:]
        assert "step 4/4" in logs[name]
    a, b = (np.load(tmp_path / name / "params_0.npz") for name in runs)
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_iterator_batches_do_not_depend_on_thread_counts(tiny_config):
    def batches(**overrides):
        config = tiny_config(**overrides)
        it = data.train_iterator(config, global_batch_size=8, seed=3, process_index=0,
                                 process_count=1)
        return [next(it) for _ in range(10)]  # more than an epoch (8 steps) of the tiny set

    default = batches()
    single = batches(**{"data.threads": 1, "data.num_parallel_calls": 1})
    wide = batches(**{"data.threads": 4, "data.num_parallel_calls": 4})
    assert (os.cpu_count() or 1) >= 1
    for d, s, w in zip(default, single, wide, strict=True):
        for k in d:
            np.testing.assert_array_equal(d[k], s[k], err_msg=k)
            np.testing.assert_array_equal(d[k], w[k], err_msg=k)
    assert not np.array_equal(default[0]["image"], default[1]["image"])
