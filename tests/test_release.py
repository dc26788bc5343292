"""The T-TAME release's PyTorch Lightning checkpoints (.ckpt) and their .npz form: a small
Lightning-shaped fixture made here with torch (state_dict with the attention under
`generic.attn_mech.`, the backbone under `generic.body.` and `generic.arrangement.body.`, and
Lightning's other entries) loads into the same explainer as the variables it was made from."""

from __future__ import annotations

import argparse
import collections

import jax
import numpy as np
import pytest

from tame_jax import explain, weights
from tame_jax.model import build_model

torch = pytest.importorskip("torch")

from tests.test_explain import _config, _random_images  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Returns (config, model, attention variables, tmp dir): random attention variables whose
    BatchNorm statistics are not the initial ones."""
    config = _config()
    config.model.backbone_kwargs = {}  # torchvision's ResNet-18 width, as a release has
    config.data.resize_size = 36  # what from_reference_release takes for 32 px (256 / 224)
    model = build_model(config)
    av = model.init_attention(jax.random.key(3))
    av["batch_stats"] = jax.tree_util.tree_map(lambda x: x + 0.5, av["batch_stats"])
    return config, model, jax.device_get(av), tmp_path_factory.mktemp("release")


def _lightning_state_dict(model, av, attention_prefix="generic.attn_mech."):
    sd = collections.OrderedDict()
    for k, v in weights.tame_state_dict_from_variables(av).items():
        sd[attention_prefix + k] = torch.from_numpy(np.array(v))
    backbone = weights.flax_to_torchvision(jax.device_get(model.backbone_vars))
    for prefix in weights.LIGHTNING_BACKBONE_PREFIXES:
        for k, v in backbone.items():
            sd[prefix + k] = torch.from_numpy(np.array(v))
    return sd


def _lightning_checkpoint(state_dict, model_name="resnet18", **extra):
    """Returns a dict shaped like the .ckpt files Lightning 2 writes."""
    return {
        "epoch": 7, "global_step": 8000, "pytorch-lightning_version": "2.1.2",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 8}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-3, "momentum": 0.9, "params": [0]}]}],
        "lr_schedulers": [{"total_steps": 8000, "last_epoch": 8000, "_step_count": 8001}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"model_name": model_name, "layers": ["layer2", "layer3", "layer4"],
                             "epochs": 8, "attention_version": "TAME", "num_classes": 10,
                             "img_size": 32, **extra},
    }


def _expected(reference, images):
    config, model, av, _ = reference
    return explain.Explainer(config, model, av).explain(images, top_k=2)


def test_lightning_ckpt_loads_attention_and_backbone(reference):
    config, model, av, tmp = reference
    path = tmp / "resnet18_TTAME.ckpt"
    torch.save(_lightning_checkpoint(_lightning_state_dict(model, av)), path)
    ex = explain.Explainer.from_reference_release(str(path), image_size=32)
    assert ex.config.model.backbone == "resnet18" and ex.config.model.num_classes == 10
    images = _random_images([(40, 52), (32, 32)], seed=4)
    got, want = ex.explain(images, top_k=2), _expected(reference, images)
    np.testing.assert_allclose(got.maps, want.maps, atol=1e-5)
    np.testing.assert_array_equal(got.classes, want.classes)

    # the ViT form: the attention is the second part of a Sequential (generic.attn_mech.1.)
    vit = tmp / "vit_form.ckpt"
    torch.save(_lightning_checkpoint(_lightning_state_dict(model, av, "generic.attn_mech.1.")),
               vit)
    attention, backbone, hyper = weights.load_reference_release(vit)
    assert "fuser.weight" in attention and "layer1.0.conv1.weight" in backbone
    assert hyper["model_name"] == "resnet18"
    np.testing.assert_allclose(
        explain.Explainer.from_reference_release(str(vit), image_size=32)(images),
        want.maps[:, 0], atol=1e-5)


def test_npz_form_loads_without_torch_and_names_are_checked(reference):
    config, model, av, tmp = reference
    path = tmp / "release.npz"
    np.savez(path, **{k: v.numpy() for k, v in _lightning_state_dict(model, av).items()})
    images = _random_images([(40, 52)], seed=6)
    ex = explain.Explainer.from_reference_release(str(path), backbone="resnet18",
                                                  num_classes=10, image_size=32)
    np.testing.assert_allclose(ex(images), _expected(reference, images).maps[:, 0], atol=1e-5)

    ckpt = tmp / "vgg_named.ckpt"
    torch.save(_lightning_checkpoint(_lightning_state_dict(model, av), model_name="vgg16"), ckpt)
    with pytest.raises(ValueError, match="trained on backbone 'vgg16'.*--backbone=vgg16"):
        explain.Explainer.from_reference_release(str(ckpt), backbone="resnet18")


def test_a_ckpt_that_weights_only_refuses_gets_a_clear_message(reference):
    config, model, av, tmp = reference
    path = tmp / "pickled.ckpt"
    ckpt = _lightning_checkpoint(_lightning_state_dict(model, av))
    ckpt["hyper_parameters"]["args"] = argparse.Namespace(a=1)  # not in the allow-list
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"(?s)torch.load\(weights_only=True\) refused .*"
                                         r"argparse.Namespace.*Only if you trust its source"):
        explain.Explainer.from_reference_release(str(path), image_size=32)
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        torch.save({"epoch": 1}, tmp / "empty.ckpt")
        weights.read_lightning_checkpoint(tmp / "empty.ckpt")


def test_explain_cli_takes_a_ckpt(reference, tmp_path):
    from PIL import Image

    config, model, av, tmp = reference
    path = tmp / "cli.ckpt"
    torch.save(_lightning_checkpoint(_lightning_state_dict(model, av)), path)
    image = _random_images([(40, 52)], seed=8)[0]
    Image.fromarray(image).save(tmp_path / "x.png")
    # The release's image size is the model's 224 by default; 32 px here through a config-less
    # call of the API is checked above, so the CLI runs at 224 (ResNet-18 takes any size).
    out = tmp_path / "out"
    assert explain.main(["--attention", str(path), str(tmp_path / "x.png"), "--out", str(out),
                         "--save", "image", "--overlay", "none"]) == 0
    with np.load(out / "x.png.tame.npz") as z:
        assert z["maps"].shape == (1, 224, 224)
