"""The README stays true: its config reference is the generated one, and every Python snippet
in it runs as written, in a folder holding tiny stand-ins for the files the snippets name
(`weights/resnet50.safetensors`: random weights; `runs/demo`: a small saved workdir;
`photos/`: random images)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tame_jax.config import reference_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)


def test_config_reference_is_the_generated_table():
    text = _readme()
    section = text[text.index("## Config reference"):]
    section = section[:section.index("\n## ", 1)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == reference_table(), (
        "README's Config reference is stale: replace its table with the output of "
        "python -c \"from tame_jax.config import reference_table; print(reference_table())\"")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Returns a folder with the files the README's snippets use."""
    import shutil

    from safetensors.numpy import save_file

    from tame_jax import backbones, weights
    from tests.test_explain import make_workdir

    root = tmp_path_factory.mktemp("readme")
    net = backbones.build_backbone("resnet50")
    variables = backbones.init_backbone(net, jax.random.key(0), 224)
    (root / "weights").mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in
               weights.flax_to_torchvision(jax.device_get(variables)).items()},
              str(root / "weights" / "resnet50.safetensors"))
    workdir, _ = make_workdir(str(root / "made"))
    (root / "runs").mkdir()
    shutil.move(workdir, root / "runs" / "demo")  # the weights stay at the recorded path
    (root / "photos" / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).save(root / "photos" / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), np.uint8)).save(
        root / "photos" / "sub" / "b.jpg")
    return root


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_python_snippet_runs_as_written(index, stand_ins):
    code = _snippets()[index]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-c", code], cwd=stand_ins, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"snippet {index} failed:\n{code}\n{r.stderr[-3000:]}"
