"""Test set-up and the fixtures the test modules share.

8 fake CPU devices are set up before JAX starts, so that the sharded step can be tested.
Fixtures: `tiny_config(**overrides)` (a 4-step run of a narrow ResNet-18 on the tiny
synthetic_shapes set, built once per session), `image_folder(root, ...)` (random PNGs in a
`root/train/<class>/` tree), `checkpoint_steps(workdir)`, and `trainer`, which runs
`python -m tame_jax.train` in subprocesses on the config in `tests/_train_worker.py`.
"""

import os
import socket
import subprocess
import sys

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torchvision's C extensions crash the process (segfault in triton) when loaded after
# TensorFlow; where the optional torch stack is installed, load it first.
try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_train_worker.py")  # a config file, and a recording trainer


def set_fields(config, **overrides):
    """Returns config with dotted-key overrides applied ({'model.variant': 'noskip'})."""
    for k, v in overrides.items():
        target = config
        *path, leaf = k.split(".")
        for p in path:
            target = target[p]
        target[leaf] = v
    return config


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """Returns a data dir holding synthetic_shapes/tiny (built once per test process)."""
    from tame_jax import data

    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_synthetic_shapes(d, config_name="tiny")
    return d


@pytest.fixture(scope="session")
def tiny_config(tiny_data_dir):
    """Returns make(**overrides): a config for a 4-step run of a narrow random ResNet-18 on
    synthetic_shapes/tiny (64 px, 10 classes, batch 8, checkpoints every 2 steps)."""
    from tame_jax.config import default_config

    def make(**overrides):
        c = default_config()
        c.model.backbone = "resnet18"
        c.model.backbone_kwargs = {"width": 8}
        c.model.num_classes = 10
        c.model.backbone_weights = "random"
        c.data.source = "synthetic_shapes"
        c.data.data_dir = tiny_data_dir
        c.data.synthetic_config = "tiny"
        c.data.image_size = 64
        c.data.resize_size = 64
        c.data.eval_split = "test"
        c.batch_size = 8
        c.num_train_steps = 4
        c.log_every = 2
        c.checkpoint_every = 2
        c.learning_rate = 1e-2
        return set_fields(c, **overrides)

    return make


@pytest.fixture(scope="session")
def image_folder():
    """Returns make(root, per_class=8, classes=2, size=64, seed=0) -> paths of distinct random
    PNGs written as root/train/class<k>/<i>.png."""
    from PIL import Image

    def make(root: str, *, per_class: int = 8, classes: int = 2, size: int = 64,
             seed: int = 0) -> list[str]:
        rng = np.random.default_rng(seed)
        paths = []
        for k in range(classes):
            d = os.path.join(root, "train", f"class{k}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # (H, W, 3)
                path = os.path.join(d, f"{i:03d}.png")
                Image.fromarray(img).save(path)
                paths.append(path)
        return paths

    return make


@pytest.fixture(scope="session")
def checkpoint_steps():
    """Returns steps(workdir) -> the complete checkpoint steps in workdir, read-only."""
    from tame_jax import checkpoints

    def steps(workdir: str) -> list[int]:
        ckpt = checkpoints.Checkpointer(workdir, read_only=True)
        try:
            return ckpt.all_steps()
        finally:
            ckpt.close()

    return steps


class Trainer:
    """Runs the trainer in subprocesses on the worker config (an image-folder ResNet-18 run)."""

    config_file = WORKER
    repo = REPO

    @staticmethod
    def config(root: str = "", **overrides):
        """Returns the worker's config on data root `root`, with dotted-key overrides."""
        import runpy

        c = runpy.run_path(WORKER)["get_config"]()
        c.data.root = root
        return set_fields(c, **overrides)

    @staticmethod
    def env(devices: int, cache_dir: str | None = None) -> dict[str, str]:
        """Returns a subprocess environment: CPU, `devices` fake devices, no proxy variables."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        if cache_dir:  # the compiled step is reused by later runs of the same program
            env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        return env

    @staticmethod
    def command(workdir: str, root: str, *overrides: str, record: str | None = None
                ) -> list[str]:
        """Returns `python -m tame_jax.train ...` on the worker config (the recording worker
        script itself, writing into `record`, when given)."""
        head = ([sys.executable, WORKER, record] if record
                else [sys.executable, "-m", "tame_jax.train"])
        return [*head, f"--config={WORKER}", f"--workdir={workdir}",
                f"--config.data.root={root}", *overrides]

    @staticmethod
    def start(cmd: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        """Returns the started process, its stdout and stderr going to the file `log`."""
        with open(log, "wb") as f:
            return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)

    @staticmethod
    def finish(proc: subprocess.Popen, log: str, timeout: float) -> str:
        """Returns the log of the process after it ended (killed after `timeout` seconds)."""
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with open(log, errors="replace") as f:
            return f.read()

    @staticmethod
    def free_port() -> int:
        """Returns a TCP port on localhost that nothing listens on right now."""
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]


@pytest.fixture(scope="session")
def trainer() -> Trainer:
    """Returns the subprocess trainer helpers (see `Trainer`)."""
    return Trainer()
