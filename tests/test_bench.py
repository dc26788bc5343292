"""The benchmark's smoke mode runs in-process and reports every field, positive and finite."""

import json

import numpy as np

from tame_jax import bench


def test_quick_bench_reports_all_fields(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # JSON written
    assert result["peaks"]["float32"]["flops_per_s"] > 0
    (row,) = result["results"]
    assert (row["backbone"], row["batch"], row["image_size"]) == ("resnet18", 2, 64)
    for name in ("train_full", "train_selective", "explain_full", "explain_selective"):
        for field in ("seconds", "images_per_s", "gflops_per_image", "gflops_per_s",
                      "flop_utilisation", "flop_utilisation_cpu_time",
                      "flop_utilisation_vs_best", "memory_bytes"):
            value = row[name][field]
            assert np.isfinite(value) and value > 0, (name, field, value)
        np.testing.assert_allclose(row[name]["images_per_s"] * row[name]["seconds"], 2)
    # Selective fusion needs fewer FLOPs than full fusion (the fusion rows of 2 classes of 100).
    assert row["train_selective"]["gflops_per_image"] < row["train_full"]["gflops_per_image"]
    assert row["explain_selective"]["gflops_per_image"] < row["explain_full"]["gflops_per_image"]
    # Both explanation paths give the same maps and both train steps the same loss.
    assert row["explain_max_abs_diff"] < 1e-4
    np.testing.assert_allclose(row["train_full"]["loss"], row["train_selective"]["loss"],
                               rtol=1e-4)
    assert row["train_speedup_selective"] > 0 and row["explain_speedup_selective"] > 0
    assert "| resnet18 | float32 | 2 | train | selective |" in bench.format_table(result)


def test_vit_rows(tmp_path):
    """A ViT goes through the same rows (its maps are token layers); --width is ResNet-only."""
    result = bench.run_benchmark(backbones=("vit_mini_16",), batch=2, image_size=64, steps=1,
                                 width=16, num_classes=10, matmul_n=256, probe=False)
    (row,) = result["results"]
    assert row["backbone"] == "vit_mini_16"
    assert row["train_selective"]["gflops_per_image"] < row["train_full"]["gflops_per_image"]
    assert row["explain_max_abs_diff"] < 1e-4
    np.testing.assert_allclose(row["train_full"]["loss"], row["train_selective"]["loss"],
                               rtol=1e-4)
