#!/usr/bin/env bash
# Runs the whole benchmark on one GPU (or TPU) and prints the tables.
#
#   bash launch/bench_accelerator.sh              # install into ./.venv-bench, then run
#   TAME_NO_INSTALL=1 bash launch/bench_accelerator.sh   # use the python already on PATH
#
# Defaults: ResNet-50 and VGG-16 at 224, bf16 compute and f32 for comparison, batch 128,
# 10 timed steps; override with BACKBONES, BATCH, DTYPES, STEPS, OUT, PYTHON. Each (dtype,
# backbone) runs in its own process and writes its own JSON (OUT with _<dtype>_<backbone>) and
# table as soon as it is done, so a run cut short keeps what it finished. The table compares
# full-map and class-selective fusion in the same run and gives FLOP utilisation against a
# bf16 (resp. f32) 8192^3 matmul timed on the same chip; target: train step >= 40% in bf16.
# Set JAX_EXTRA=tpu on a TPU VM (default cuda12).
# Seen on an H100 with jax 0.11.2 (2026-11): XLA aborted compiling a train step in
# triton_tiling_propagation.cc ("Check failed: subdim_size_accumulator == dim_size");
# XLA_FLAGS=--xla_gpu_enable_triton_gemm=false avoids that code (cuBLAS for the matmuls).
set -euo pipefail

cd "$(dirname "$0")/.."
BACKBONES=${BACKBONES:-resnet50,vgg16}
BATCH=${BATCH:-128}
DTYPES=${DTYPES:-bfloat16,float32}
STEPS=${STEPS:-10}
OUT=${OUT:-bench_accelerator.json}
JAX_EXTRA=${JAX_EXTRA:-cuda12}
PYTHON=${PYTHON:-python}

if [[ "${TAME_NO_INSTALL:-0}" != "1" ]]; then
  python3 -m venv .venv-bench
  # shellcheck disable=SC1091
  source .venv-bench/bin/activate
  PYTHON=python
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[${JAX_EXTRA}]"
fi

# One process owns the chip: let XLA take what it needs, and keep TF (if installed) off it.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # per-chip numbers: one device

"$PYTHON" - <<'EOF'
import jax
d = jax.devices()[0]
print(f"jax {jax.__version__}: {jax.device_count()} device(s), {d.platform} {d.device_kind}")
if d.platform == "cpu":
    raise SystemExit("No accelerator visible to JAX: install jax[cuda12] (or jax[tpu]).")
EOF

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
fi

for dtype in ${DTYPES//,/ }; do
  for backbone in ${BACKBONES//,/ }; do
    out="${OUT%.json}_${dtype}_${backbone}.json"
    SECONDS=0
    "$PYTHON" -m tame_jax.bench --backbones="$backbone" --batch="$BATCH" --dtype="$dtype" \
      --steps="$STEPS" --image_size=224 --out="$out" \
      && echo "JSON: $out ($SECONDS s with compilation)" \
      || echo "FAILED: $backbone $dtype after $SECONDS s (the other rows go on)"
  done
done

# Evaluation throughput of the slow baselines on 1 device and on all of them (per-device maps:
# the speed-up should follow the device count). EVAL_SCALING=0 skips it.
if [[ "${EVAL_SCALING:-1}" == "1" ]]; then
  NDEV=$("$PYTHON" -c "import jax; print(jax.device_count())")
  "$PYTHON" -m tame_jax.tools.eval_scaling --methods=scorecam,rise --devices="1,$NDEV" \
    --backbone=resnet50 --width=0 --image_size=224 --batch="$((8 * NDEV))" \
    --rise_masks=1000 --steps=3 --out=eval_scaling.json
fi
