"""Two processes on localhost evaluate as one job, from an empty data dir, and write the tables
of a one-process run exactly.

Both processes run `python -m tame_jax.evaluate` (RISE on synthetic_shapes/tiny, every
metric, eval batch 8) with explicit jax.distributed flags, 2 fake CPU devices each; the data dir
starts empty, so process 0 prepares the data set while process 1 waits at the barrier. Each
host reads its own half of the eval split, the per-image rows are gathered, and process 0 alone
writes the tables. A one-process run on 2 devices with eval batch 4 (2 images per device, as in
the job, but other batches: an image's values depend neither on its batch nor on its host)
then writes the same tables, byte for byte. (A process of 4 devices compiles its per-device
programs slightly differently: its AD values differ in float32 rounding.)
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

TIMEOUT_S = 600
FLAGS = ("--method=rise", "--config.eval.rise_masks=16", "--config.data.source=synthetic_shapes",
         "--config.data.synthetic_config=tiny", "--config.data.eval_split=test",
         "--config.eval.batch_size=8", "--config.eval.road_fractions=(0.2,)",
         "--config.eval.road_lerf_fractions=(0.7,)", "--config.eval.ad_ic_fractions=(0.5,)",
         "--config.eval.insertion_step=1024", "--config.eval.cam_layer=layer3")


def _command(trainer, data_dir: str, workdir: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tame_jax.evaluate", f"--config={trainer.config_file}",
            f"--workdir={workdir}", f"--out={out}", f"--config.data.data_dir={data_dir}",
            *FLAGS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trainer):
    """Runs the 2-process job on an empty data dir, then 1 process; returns their outputs."""
    tmp = tmp_path_factory.mktemp("multihost_eval")
    data_dir = str(tmp / "tfds")
    os.makedirs(data_dir)  # empty: the job prepares the data
    port = trainer.free_port()
    procs, logs = [], []
    for pid in range(2):
        cmd = _command(trainer, data_dir, str(tmp / "run2"), str(tmp / "out2"),
                       f"--config.distributed.coordinator_address=localhost:{port}",
                       "--config.distributed.num_processes=2",
                       f"--config.distributed.process_id={pid}")
        logs.append(str(tmp / f"log_{pid}.txt"))
        procs.append(trainer.start(cmd, trainer.env(devices=2), logs[-1]))
    texts = [trainer.finish(p, log, TIMEOUT_S) for p, log in zip(procs, logs, strict=True)]
    codes = [p.returncode for p in procs]
    one = subprocess.run(_command(trainer, data_dir, str(tmp / "run1"), str(tmp / "out1"),
                                  "--config.distributed.num_processes=1",
                                  "--config.eval.batch_size=4"),
                         env=trainer.env(devices=2), cwd=trainer.repo, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    return tmp, data_dir, codes, texts, one


def test_two_processes_write_the_tables_of_one_process_exactly(runs):
    tmp, _, codes, texts, one = runs
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    assert one.returncode == 0, one.stderr[-3000:]
    names = sorted(os.listdir(tmp / "out1"))
    assert {"rise.csv", "rise.json", "rise.md", "rise.per_image.csv"} <= set(names)
    assert sorted(os.listdir(tmp / "out2")) == names
    for name in names:
        two_text = (tmp / "out2" / name).read_bytes()
        assert two_text == (tmp / "out1" / name).read_bytes(), name
    per_image = (tmp / "out1" / "rise.per_image.csv").read_text().splitlines()
    assert len(per_image) == 1 + 40  # every image of the split once
    assert "road_morf_20" in per_image[0] and "pointing" in per_image[0]
    # Process 0 alone printed the table (it alone writes).
    assert "| rise |" in texts[0] and "| rise |" not in texts[1]


def test_process_zero_alone_prepared_the_empty_data_dir(runs):
    _, data_dir, codes, texts, _ = runs
    assert codes == [0, 0]
    assert "Downloading and preparing dataset" in texts[0]
    assert "Downloading and preparing dataset" not in texts[1]  # it waited, then read
    prepared = glob.glob(os.path.join(data_dir, "synthetic_shapes", "tiny", "*"))
    assert [os.path.basename(p) for p in prepared] == ["1.0.0"]  # one copy, nothing left over
    assert glob.glob(os.path.join(prepared[0], "*test.array_record*"))


def test_lr_finder_joins_the_job_and_process_zero_writes(runs, trainer):
    """lr_finder on 2 processes (the data prepared above): one mesh of 4 devices, one CSV."""
    tmp, data_dir, _, _, _ = runs
    workdir = str(tmp / "lr")
    port = trainer.free_port()
    procs, logs = [], []
    for pid in range(2):
        cmd = [sys.executable, "-m", "tame_jax.lr_finder", f"--config={trainer.config_file}",
               f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *FLAGS[2:5],
               "--num_steps=3", f"--config.distributed.coordinator_address=localhost:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        logs.append(str(tmp / f"lr_log_{pid}.txt"))
        procs.append(trainer.start(cmd, trainer.env(devices=2), logs[-1]))
    texts = [trainer.finish(p, log, TIMEOUT_S) for p, log in zip(procs, logs, strict=True)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    for text in texts:
        assert "LR range test on 4 devices of 2 processes, batch 8" in text
    rows = open(os.path.join(workdir, "lr_finder.csv")).read().splitlines()
    assert rows[0] == "step,learning_rate,loss,smoothed_loss" and len(rows) == 4


def _explain_config(path: str, worker: str, data_dir: str, **distributed) -> str:
    """Writes a config file (the worker's, on the synthetic data, with distributed fields)."""
    with open(path, "w") as f:
        f.write("import runpy\n\n\ndef get_config():\n"
                f"    c = runpy.run_path({worker!r})['get_config']()\n"
                "    c.data.source = 'synthetic_shapes'\n"
                "    c.data.synthetic_config = 'tiny'\n"
                f"    c.data.data_dir = {data_dir!r}\n"
                "    c.eval.cam_layer = 'layer3'\n"
                + "".join(f"    c.distributed.{k} = {v!r}\n" for k, v in distributed.items())
                + "    return c\n")
    return path


def test_explain_split_on_two_processes_writes_the_files_of_one(runs, trainer):
    """explain --split: each host explains its shard; together every image once, the same
    files (byte for byte) as one process."""
    tmp, data_dir, _, _, _ = runs
    port = trainer.free_port()
    procs, logs = [], []
    for pid in range(2):
        cfg = _explain_config(str(tmp / f"explain_{pid}.py"), trainer.config_file, data_dir,
                              coordinator_address=f"localhost:{port}", num_processes=2,
                              process_id=pid)
        cmd = [sys.executable, "-m", "tame_jax.explain", f"--config={cfg}", "--method=gradcam",
               "--split=test", f"--out={tmp / 'explain2'}", "--batch_size=4"]
        logs.append(str(tmp / f"explain_log_{pid}.txt"))
        procs.append(trainer.start(cmd, trainer.env(devices=2), logs[-1]))
    texts = [trainer.finish(p, log, TIMEOUT_S) for p, log in zip(procs, logs, strict=True)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    assert "explained 20 images of split 'test' with gradcam" in texts[0]
    assert "(process 1 of 2)" in texts[1] and "explained 20 images" in texts[1]
    cfg = _explain_config(str(tmp / "explain_1p.py"), trainer.config_file, data_dir,
                          num_processes=1)
    one = subprocess.run([sys.executable, "-m", "tame_jax.explain", f"--config={cfg}",
                          "--method=gradcam", "--split=test", f"--out={tmp / 'explain1'}",
                          "--batch_size=4"], env=trainer.env(devices=2), cwd=trainer.repo,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    names = sorted(os.listdir(tmp / "explain1" / "test"))
    assert names == [f"{i:06d}.gradcam.png" for i in range(40)]
    assert sorted(os.listdir(tmp / "explain2" / "test")) == names
    for name in names:
        assert ((tmp / "explain2" / "test" / name).read_bytes()
                == (tmp / "explain1" / "test" / name).read_bytes()), name
