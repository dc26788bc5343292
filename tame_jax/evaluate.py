"""Evaluate explanations on the eval set and write tables.

    python -m tame_jax.evaluate --workdir=DIR [--step=N|all|latest] [--config=FILE]
        [--method=tame|gradcam|gradcampp|scorecam|ablationcam|rise] [--eval_list=FILE] [--out=DIR]
        [--backbone_weights=FILE]

--config defaults to DIR/config.json (the run's own config; `--config.X=...` overrides apply to
it). The backbone weights are found where the workdir recorded them, or relative to where it
is now; --backbone_weights overrides them (a file other than the one trained with warns).

TAME (or L-CAM-Img, the `lcam_img` variant) is restored from the checkpoints in DIR, one table
row per checkpoint; a baseline needs no checkpoint and gives one row. Every method's maps are
min-max normalised per image to [0, 1] and go through the same metrics, each as its authors
defined it (README, "Metrics and baselines"): AD and IC at 100/50/15%, ROAD MoRF and LeRF,
insertion and deletion AUC, top-1 agreement of the masked image with the explained class, and,
where the data has object boxes, the pointing game (on the ground-truth class's map) and the
share of map energy inside the box. Results go to OUT/<method>.{csv,json,md} (means with 95%
bootstrap intervals) and OUT/<method>.per_image.csv (every image's values); `tame_jax.compare`
sets methods side by side. Methods and metrics come from the registries in
`tame_jax.evaluation`.
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags

from tame_jax import cli, evaluation, workdirs


def main(config: Any, workdir: str) -> None:
    """Entry point for `python -m tame_jax.evaluate`."""
    f = flags.FLAGS
    with config.unlocked():
        if not config.model.get("backbone_weights_sha256") and workdirs.is_file(
                workdirs.join(workdir, workdirs.CONFIG_FILE)):  # a config file: check the run's
            saved = workdirs.load_config(workdir, check=False)
            config.model.backbone_weights_sha256 = saved.model.backbone_weights_sha256
        workdirs.resolve_backbone_weights(config, workdir, f.backbone_weights or None)
    if f.eval_list:
        if not os.path.isfile(f.eval_list):
            raise FileNotFoundError(f"--eval_list={f.eval_list} does not exist")
        with config.unlocked():
            config.data.source = "list"
            config.data.list_file = f.eval_list
    evaluation.run(config, workdir, method=f.method, steps=f.step, out_dir=f.out)


if __name__ == "__main__":
    cli.define_flags(workdir_help="the training workdir (checkpoints)", config_from_workdir=True)
    flags.DEFINE_string("backbone_weights", "", "backbone weights file (overrides the config's)")
    flags.DEFINE_string("method", "tame", f"one of {tuple(evaluation.METHODS)}")
    flags.DEFINE_string("step", "latest", "checkpoint step(s): N, N1,N2, latest or all")
    flags.DEFINE_string("eval_list", None, "a `relative/path label` list file of eval images")
    flags.DEFINE_string("out", None, "where the tables go (default WORKDIR/eval)")
    cli.run(main)
