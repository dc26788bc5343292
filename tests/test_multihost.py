"""Two processes on localhost train as one job: same parameters, disjoint data, one checkpoint.

Each process has 2 fake CPU devices and joins through jax.distributed (explicit coordinator
flags, gloo collectives); the 4 devices form one mesh and each host feeds its own shard.
Midway, process 1 alone gets SIGTERM: both agree on a step, save it together, and exit 143.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tame_jax import checkpoints
from tame_jax.model import build_model

TIMEOUT_S = 300
STEPS = 40  # long enough to preempt midway; 2 steps per epoch


def _flat(tree) -> dict[str, np.ndarray]:
    """Returns {path: array} of a pytree, the naming the worker uses."""
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def job(tmp_path_factory, trainer, image_folder):
    """Runs the 2-process job once; returns (data root, files, workdir, out dir, codes, logs)."""
    tmp = tmp_path_factory.mktemp("multihost")
    root = str(tmp / "data")
    files = image_folder(root, per_class=8)  # 16 images: 8 per host, local batch 4, 2 steps
    workdir, out = str(tmp / "run"), str(tmp / "out")
    os.makedirs(out)
    port = trainer.free_port()
    env = trainer.env(devices=2)
    procs, logs = [], []
    for pid in range(2):
        cmd = trainer.command(workdir, root, f"--config.num_train_steps={STEPS}",
                      "--config.checkpoint_every=1000",
                      f"--config.distributed.coordinator_address=localhost:{port}",
                      "--config.distributed.num_processes=2",
                      f"--config.distributed.process_id={pid}", record=out)
        logs.append(str(tmp / f"log_{pid}.txt"))
        procs.append(trainer.start(cmd, env, logs[-1]))
    end = time.time() + TIMEOUT_S  # preempt process 1 only, once it has trained 3 steps
    while time.time() < end and procs[1].poll() is None:
        if f"step 3/{STEPS}" in open(logs[1], errors="replace").read():
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    texts = [trainer.finish(p, log, TIMEOUT_S) for p, log in zip(procs, logs, strict=True)]
    codes = [p.returncode for p in procs]
    return root, files, workdir, out, codes, texts


def test_sigterm_to_one_host_stops_both_at_the_same_saved_step(job):
    _, _, workdir, _, codes, texts = job
    assert codes == [143, 143], "\n\n".join(t[-3000:] for t in texts)
    saved = [re.findall(r"preempted: saved step (\d+)", t) for t in texts]
    assert saved[0] == saved[1] and len(saved[0]) == 1
    step = int(saved[0][0])
    assert 3 <= step < STEPS
    ckpt = checkpoints.Checkpointer(workdir)
    assert ckpt.all_steps() == [step]
    ckpt.close()


def test_hosts_form_one_mesh_and_read_disjoint_shards(job):
    _, files, _, out, _, texts = job
    reads = [json.load(open(os.path.join(out, f"read_{i}.json"))) for i in range(2)]
    for r in reads:
        assert (r["process_count"], r["local_devices"], r["devices"]) == (2, 2, 4)
    host0, host1 = (set(r["files"]) for r in reads)
    assert len(host0) == len(host1) == 8  # the same 8 files every epoch, in a new order
    assert len(reads[0]["files"]) >= 16 and len(reads[0]["files"]) % 8 == 0  # epochs read
    assert not host0 & host1  # disjoint shards
    assert host0 | host1 == set(files)  # together: the whole data set, each image once
    assert f"training {STEPS} steps (2 per epoch) from step 0 on 4 devices, batch 8" in texts[0]


def test_hosts_hold_identical_parameters_that_restore_in_one_process(job, trainer):
    root, _, workdir, out, _, _ = job
    held = [dict(np.load(os.path.join(out, f"params_{i}.npz"))) for i in range(2)]
    assert held[0].keys() == held[1].keys() and len(held[0]) > 4
    for k in held[0]:
        np.testing.assert_array_equal(held[0][k], held[1][k], err_msg=k)

    config = trainer.config(root)
    model = build_model(config)
    restored, step = checkpoints.restore_attention(config, workdir, model)  # this process only
    assert step >= 3
    restored = _flat(restored["params"])
    assert restored.keys() == held[0].keys()
    for k, v in restored.items():
        np.testing.assert_array_equal(v, held[0][k], err_msg=k)
    init = _flat(model.init_attention(jax.random.fold_in(jax.random.key(config.seed), 1))["params"])
    moved = max(float(np.abs(restored[k] - init[k]).max()) for k in init)
    assert moved > 1e-6  # training changed the parameters


# --------------------------------------------------------------------------- how processes join


def _dist_config(**distributed):
    from tame_jax.config import default_config

    c = default_config()
    c.distributed.update(distributed)
    return c


SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "16",
              "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


def test_distributed_mode_follows_flags_then_slurm_then_tpu(monkeypatch):
    from tame_jax import distributed

    for k in (*SLURM_STEP, "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    assert distributed.distributed_mode(_dist_config()) == "single"
    assert distributed.distributed_mode(_dist_config(
        num_processes=2, process_id=1, coordinator_address="10.0.0.1:1234")) == "explicit"
    with pytest.raises(ValueError, match=r"num_processes=2 needs coordinator_address .* "
                                         r"process_id in 0\.\.1; got coordinator_address=''"):
        distributed.distributed_mode(_dist_config(num_processes=2, process_id=0))
    with pytest.raises(ValueError, match="process_id in 0..1"):
        distributed.distributed_mode(_dist_config(num_processes=2, process_id=2,
                                            coordinator_address="h:1"))

    # Inside `srun` with several tasks: jax.distributed reads the SLURM step itself.
    for k, v in SLURM_STEP.items():
        monkeypatch.setenv(k, v)
    assert distributed.distributed_mode(_dist_config()) == "auto"
    assert distributed.distributed_mode(_dist_config(num_processes=1)) == "single"  # opt out
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.distributed_mode(_dist_config()) == "single"  # a one-task step
    monkeypatch.delenv("SLURM_STEP_NODELIST")  # the sbatch script itself, outside srun
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.distributed_mode(_dist_config()) == "single"

    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)  # a TPU VM: ask its metadata
    assert distributed.distributed_mode(_dist_config()) == "auto"


# --------------------------------------------------------------------------- launch scripts

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_node.sh", "slurm_gpu.sbatch")


def _launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CUDA_VISIBLE_DEVICES", "PYTHON", "REPO_DIR", "SRUN", "GCLOUD")}
    full_env.update(env)
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_parses_and_explains_missing_arguments(script):
    r = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    tpu = ["--tpu", "t", "--zone", "z"] if script == "tpu_pod.sh" else []
    r = _launch(script, *tpu, "--config", "configs/resnet50.py", "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    assert f"{script}: missing required --workdir\n" in r.stderr
    assert "Environment:" in r.stderr  # the usage text follows
    r = _launch(script, *tpu, "--workdir", "w", "--config", "c", "--batch", "8", "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown argument '--batch' (trainer flags go after --)" in r.stderr
    r = _launch(script, "--workdir")  # a flag without its value
    assert r.returncode == 2 and r.stdout == ""
    if script == "tpu_pod.sh":
        r = _launch(script, "--config", "c", "--workdir", "w", "--dry-run")
        assert r.returncode == 2 and "missing required --tpu --zone\n" in r.stderr


def test_gpu_node_dry_run_prints_the_exact_command():
    r = _launch("gpu_node.sh", "--config", "configs/resnet50.py", "--workdir", "runs/my run",
                "--gpus", "0,1", "--dry-run", "--", "--config.batch_size=64")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [
        "env", "CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "python", "-m",
        "tame_jax.train", "--config=configs/resnet50.py", "--workdir=runs/my run",
        "--config.distributed.num_processes=1", "--config.loss.variation_reference_batch=32",
        "--config.batch_size=64"]
    r = _launch("gpu_node.sh", "--config", "c.py", "--workdir", "w", "--dry-run",
                CUDA_VISIBLE_DEVICES="3", PYTHON="/opt/py/bin/python")
    assert shlex.split(r.stdout)[:4] == ["env", "CUDA_VISIBLE_DEVICES=3",
                                         "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "/opt/py/bin/python"]


def test_slurm_dry_run_prints_the_exact_srun_command():
    r = _launch("slurm_gpu.sbatch", "--dry-run", "--config", "configs/resnet50.py", "--workdir",
                "/shared/r 1", "--", "--config.model.layers=('layer3','layer4')")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [
        "srun", "--kill-on-bad-exit=1", "python", "-m", "tame_jax.train",
        "--config=configs/resnet50.py", "--workdir=/shared/r 1",
        "--config.loss.variation_reference_batch=32", "--config.model.layers=('layer3','layer4')"]
    text = open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --signal=TERM@" in text


def test_tpu_pod_dry_run_runs_the_same_command_on_all_workers():
    r = _launch("tpu_pod.sh", "--tpu", "my-v4-32", "--zone", "us-central2-b", "--project", "p1",
                "--config", "configs/resnet50.py", "--workdir", "/mnt/nfs/it's", "--dry-run",
                "--", "--config.batch_size=1024")
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32",
                        "--zone=us-central2-b", "--project=p1", "--worker=all"]
    assert argv[9].startswith("--command=cd ~/tame_jax && ") and len(argv) == 10
    remote = shlex.split(argv[9][len("--command=cd ~/tame_jax && "):])
    assert remote == ["python3", "-m", "tame_jax.train", "--config=configs/resnet50.py",
                      "--workdir=/mnt/nfs/it's", "--config.loss.variation_reference_batch=32",
                      "--config.batch_size=1024"]
