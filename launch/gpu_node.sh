#!/usr/bin/env bash
# Train on one machine with one or more GPUs: one process drives all of them (data parallel).
#
#   bash launch/gpu_node.sh --config configs/resnet50.py --workdir runs/r50 \
#       [--gpus 0,1,2,3] [--dry-run] [-- --config.batch_size=256]
#
# It runs, from the repo root:
#   CUDA_VISIBLE_DEVICES=GPUS XLA_PYTHON_CLIENT_MEM_FRACTION=F PYTHON -m tame_jax.train \
#     --config=CONFIG --workdir=WORKDIR --config.distributed.num_processes=1 \
#     --config.loss.variation_reference_batch=32 [OVERRIDES]
# config.batch_size is global: it must divide by the number of GPUs. Rerunning the same line
# resumes from the last checkpoint; SIGTERM (e.g. `kill PID`) saves one before exiting.
#
# Environment:
#   PYTHON                          the python with `pip install -e '.[cuda12]'` (default: python)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX takes (default: 0.9)
#   CUDA_VISIBLE_DEVICES            used when --gpus is not given (default: all GPUs)
set -euo pipefail

# The variation term of the loss sums over the B x B maps of the global batch over 2B, so it
# grows with the batch; scaled to the paper's batch of 32 it keeps the paper's per-image balance
# at the large batches these launches use (README, "Running at scale"). Override after `--`,
# e.g. `-- --config.loss.variation_reference_batch=0` for the formula as printed.
KNOB=--config.loss.variation_reference_batch=32

# Prints the arguments as one shell line that can be pasted back (quoted where needed).
print_command() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

CONFIG="" WORKDIR="" GPUS="${CUDA_VISIBLE_DEVICES:-}" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:-}"; shift 2 || usage ;;
    --workdir) WORKDIR="${2:-}"; shift 2 || usage ;;
    --gpus) GPUS="${2:-}"; shift 2 || usage ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "gpu_node.sh: unknown argument '$1' (trainer flags go after --)" >&2; usage ;;
  esac
done
missing=()
[[ -n "$CONFIG" ]] || missing+=(--config)
[[ -n "$WORKDIR" ]] || missing+=(--workdir)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "gpu_node.sh: missing required ${missing[*]}" >&2
  usage
fi

cmd=(env)
[[ -n "$GPUS" ]] && cmd+=("CUDA_VISIBLE_DEVICES=$GPUS")
cmd+=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
      "${PYTHON:-python}" -m tame_jax.train "--config=$CONFIG" "--workdir=$WORKDIR"
      --config.distributed.num_processes=1 "$KNOB" "$@")

if [[ $DRY_RUN == 1 ]]; then
  print_command "${cmd[@]}"
  exit 0
fi
cd "$(dirname "$0")/.."
exec "${cmd[@]}"
