"""The Model pytree: weights are arguments of every compiled program, never constants; one
compiled program serves any weights; restoring for evaluation needs no optimiser."""

from __future__ import annotations

import glob
import os
import re
import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax import backbones, checkpoints, evaluation, optim, train, train_step
from tame_jax.attention import TAMEAttention
from tame_jax.config import FIELD_DOCS, default_config
from tame_jax.model import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abstract_model(name: str, image_size: int) -> Model:
    """Returns the Model of a registered backbone with abstract (shape-only) weights."""
    spec = backbones.get_spec(name)
    module = backbones.build_backbone(name, layers=spec.default_layers)
    bvars = jax.eval_shape(lambda: backbones.init_backbone(module, jax.random.key(0), image_size))
    return Model(bvars, module, TAMEAttention(1000), spec.default_layers, image_size)


def _largest_constant(text: str) -> int:
    """Returns the length of the longest `stablehlo.constant dense<...>` payload in the text."""
    return max((len(c) for c in re.findall(r"stablehlo\.constant dense<([^>]*)>", text)),
               default=0)


def test_compiled_programs_take_the_weights_as_arguments():
    # ResNet-50 at 224 px: 25.6M weights would be ~100 MB of program text as constants.
    model = _abstract_model("resnet50", 224)
    av = jax.eval_shape(Model.init_attention, model, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    maps = jax.ShapeDtypeStruct((2, 224, 224), jnp.float32)
    classes = jax.ShapeDtypeStruct((2,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    config = default_config()
    programs = {
        "explain": jax.jit(Model.explain).lower(model, av, x),
        "evaluate tame maps": evaluation.map_fn("tame", config).lower(model, av, x, classes,
                                                                      key),
        "evaluate gradcam maps": evaluation.map_fn("gradcam", config).lower(model, av, x,
                                                                            classes, key),
        "evaluate metrics": evaluation.batch_metrics(config, False).lower(
            model, x, maps, classes, key, None),
    }
    for name, lowered in programs.items():
        text = lowered.as_text()
        assert _largest_constant(text) < 4096, name
        # The metrics program is long (ROAD's solver, 7 levels x 2 orders, ins./del.) but small.
        assert len(text) < (2e6 if name == "evaluate metrics" else 1e6), (name, len(text))


def test_closing_over_weights_would_bake_them_in():
    """The check above can fail: a closure over concrete weights puts them in the program."""
    spec = backbones.get_spec("resnet18")
    module = backbones.build_backbone("resnet18", layers=spec.default_layers, width=16)
    model = Model(backbones.init_backbone(module, jax.random.key(0), 64), module,
                  TAMEAttention(10), spec.default_layers, 64)
    av = jax.eval_shape(Model.init_attention, model, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    closed = jax.jit(lambda a, images: model.explain(a, images)).lower(av, x).as_text()
    passed = jax.jit(Model.explain).lower(model, av, x).as_text()
    assert _largest_constant(closed) > 100_000 > _largest_constant(passed)


def test_one_compiled_program_serves_any_weights():
    spec = backbones.get_spec("resnet18")
    module = backbones.build_backbone("resnet18", num_classes=5, layers=spec.default_layers,
                                      width=8)
    model = Model(backbones.init_backbone(module, jax.random.key(0), 32), module,
                  TAMEAttention(5), spec.default_layers, 32)
    other = model.replace(backbone_vars=backbones.init_backbone(module, jax.random.key(1), 32))
    assert len(jax.tree_util.tree_leaves(model)) == len(jax.tree_util.tree_leaves(
        model.backbone_vars))  # the weights are the pytree's only leaves
    av = model.init_attention(jax.random.key(2))
    explain = jax.jit(chex.assert_max_traces(Model.explain, n=1))
    x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
    a, _, logits_a = explain(model, av, x)
    b, _, logits_b = explain(other, av, x)  # new weights, same program
    assert not np.allclose(logits_a, logits_b)
    np.testing.assert_allclose(a, model.explain(av, x)[0], atol=1e-6)
    np.testing.assert_allclose(b, other.explain(av, x)[0], atol=1e-6)


def test_restore_attention_needs_no_optimiser_and_writes_nothing(tiny_config, tmp_path,
                                                                 monkeypatch):
    config = tiny_config(num_train_steps=2)
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    os.makedirs(os.path.join(ckpt_dir, "3"))  # an unfinished save of a running trainer
    before = sorted(os.listdir(ckpt_dir))

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation must not build an optimiser or a train state")

    monkeypatch.setattr(optim, "make_optimizer", refuse)
    monkeypatch.setattr(train_step.TrainState, "create", refuse)
    from tame_jax.model import build_model

    variables, step = checkpoints.restore_attention(config, workdir, build_model(config))
    assert step == 2 and set(variables) == {"params", "batch_stats"}
    chex.assert_trees_all_close(variables["params"], jax.device_get(state.params))
    chex.assert_trees_all_close(variables["batch_stats"], jax.device_get(state.batch_stats))
    assert sorted(os.listdir(ckpt_dir)) == before  # read-only: nothing renamed or removed
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 3"):
        checkpoints.restore_attention(config, workdir, build_model(config), step=3)


def test_every_config_field_is_documented_and_configs_add_none():
    def leaves(c, prefix=""):
        out = set()
        for k, v in c.items():
            if hasattr(v, "items") and f"{prefix}{k}" not in FIELD_DOCS:
                out |= leaves(v, f"{prefix}{k}.")
            else:
                out.add(f"{prefix}{k}")
        return out

    assert leaves(default_config()) == set(FIELD_DOCS)
    assert all(len(doc) > 10 for doc in FIELD_DOCS.values())
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        assert leaves(runpy.run_path(path)["get_config"]()) == set(FIELD_DOCS), path
