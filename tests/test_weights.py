"""Backbone weight files and the torchvision/timm -> Flax conversion: values and error messages."""

from __future__ import annotations

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tame_jax.backbones import build_backbone
from tame_jax.tools.make_parity_fixture import parity_state_dict
from tame_jax.weights import load_backbone_weights, load_state_dict, torchvision_to_flax


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, np.ndarray]:
    return parity_state_dict("resnet18", seed=3)


def _template(arch: str, **kwargs) -> dict:
    model = build_backbone(arch, **kwargs)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_state_dict_files_round_trip(tmp_path):
    from safetensors.numpy import save_file

    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int64)}
    save_file(state, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **state)
    for name in ("w.safetensors", "w.npz"):
        got = load_state_dict(tmp_path / name)
        assert set(got) == set(state)
        np.testing.assert_array_equal(got["a.weight"], state["a.weight"])


def test_bad_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"(?s)not found: .*nope.safetensors.*state_dict"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"Unknown weights file extension '.bin'.*\.safetensors"):
        load_state_dict(tmp_path / "w.bin")
    for name in ("junk.safetensors", "junk.npz"):
        (tmp_path / name).write_bytes(b"not a weights file at all")
        with pytest.raises(ValueError, match=f"Could not read weights file .*{name}"):
            load_state_dict(tmp_path / name)
    (tmp_path / "w.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    with pytest.raises(ValueError, match=r'(?s)not a readable torch checkpoint.*'
                                         r'pip install -e "\.\[torch\]".*safetensors'):
        load_state_dict(tmp_path / "w.pth")


def test_pth_files_unwrap_and_reject_non_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    weight = torch.arange(4.0).reshape(2, 2)
    for i, wrapped in enumerate([{"w": weight}, {"state_dict": {"w": weight}},
                                 {"model": {"w": weight}, "epoch": 3}]):
        torch.save(wrapped, tmp_path / f"{i}.pth")
        got = load_state_dict(tmp_path / f"{i}.pth")
        assert list(got) == ["w"]
        np.testing.assert_array_equal(got["w"], weight.numpy())
    torch.save([weight], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict.*list"):
        load_state_dict(tmp_path / "list.pt")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not read weights file .*junk.pth"):
        load_state_dict(tmp_path / "junk.pth")


def test_conversion_layouts(resnet18_state, tmp_path):
    np.savez(tmp_path / "r18.npz", **resnet18_state)  # includes num_batches_tracked: ignored
    variables = load_backbone_weights("resnet18", tmp_path / "r18.npz", _template("resnet18"))
    params, stats = variables["params"], variables["batch_stats"]
    w = resnet18_state["conv1.weight"]  # (O, I, kh, kw) = (64, 3, 7, 7)
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert params["conv1"]["kernel"][2, 5, 1, 40] == w[40, 1, 2, 5]
    np.testing.assert_array_equal(params["fc"]["kernel"], resnet18_state["fc.weight"].T)
    down = params["layer3_0"]["downsample_0"]["kernel"]  # (1, 1, 128, 256)
    np.testing.assert_array_equal(down[0, 0], resnet18_state["layer3.0.downsample.0.weight"][
        :, :, 0, 0].T)
    np.testing.assert_array_equal(params["layer2_1"]["bn2"]["scale"],
                                  resnet18_state["layer2.1.bn2.weight"])
    np.testing.assert_array_equal(stats["layer4_0"]["downsample_1"]["var"],
                                  resnet18_state["layer4.0.downsample.1.running_var"])
    assert params["conv1"]["kernel"].dtype == np.float32


def test_missing_unexpected_and_mismatched_keys_are_named(resnet18_state):
    template = _template("resnet18")
    state = dict(resnet18_state)
    del state["layer3.1.bn2.running_var"]
    state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError) as e:
        torchvision_to_flax("resnet18", state, template)
    msg = str(e.value)
    assert "does not fit backbone 'resnet18'" in msg
    assert "missing keys (1): layer3.1.bn2.running_var (256,)" in msg
    assert "unexpected keys (1): layer5.0.conv1.weight" in msg
    mismatch = (r"shape mismatches: fc\.bias: file has \(1000,\), model expects \(10,\); "
                r"fc\.weight: file has \(1000, 512\), model expects \(10, 512\)")
    with pytest.raises(ValueError, match=mismatch):
        torchvision_to_flax("resnet18", resnet18_state, _template("resnet18", num_classes=10))
    missing = r"missing keys \(80\): layer1\.2\.bn1\.bias \(64,\).*layer1\.2\.conv1\.weight"
    with pytest.raises(ValueError, match=missing):
        torchvision_to_flax("resnet34", resnet18_state, _template("resnet34"))


def test_timm_vgg_head_is_reshaped_to_torchvision_layout():
    from tame_jax.backbones.vgg import from_timm as _from_timm

    rng = np.random.default_rng(0)
    fc1 = rng.standard_normal((4, 512, 7, 7)).astype(np.float32)  # timm conv (O, C, 7, 7)
    fc2 = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    out = _from_timm({"features.0.weight": np.ones((2, 3, 3, 3)), "pre_logits.fc1.weight": fc1,
                      "pre_logits.fc1.bias": np.ones(4), "pre_logits.fc2.weight": fc2,
                      "head.fc.weight": np.ones((5, 3)), "head.fc.bias": np.zeros(5)})
    assert sorted(out) == ["classifier.0.bias", "classifier.0.weight", "classifier.3.weight",
                           "classifier.6.bias", "classifier.6.weight", "features.0.weight"]
    # torchvision flattens (C, H, W): input index c * 49 + h * 7 + w.
    assert out["classifier.0.weight"].shape == (4, 25088)
    assert out["classifier.0.weight"][2, 300 * 49 + 3 * 7 + 6] == fc1[2, 300, 3, 6]
    np.testing.assert_array_equal(out["classifier.3.weight"], fc2[:, :, 0, 0])


def test_flax_to_torchvision_is_the_inverse_of_the_import():
    from tame_jax import backbones
    from tame_jax.weights import flax_to_torchvision, torchvision_to_flax

    net = backbones.build_backbone("resnet18", num_classes=10, width=8)
    variables = backbones.init_backbone(net, jax.random.key(3), 32)
    state_dict = flax_to_torchvision(variables)
    assert state_dict["conv1.weight"].shape == (8, 3, 7, 7)  # OIHW
    assert state_dict["fc.weight"].shape == (10, 64)  # (out, in)
    assert "layer2.0.downsample.1.running_var" in state_dict
    back = torchvision_to_flax("resnet18", state_dict, variables)
    chex.assert_trees_all_close(back, jax.device_get(variables))
