#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker (host) of the slice.
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE --config configs/resnet50.py \
#       --workdir /mnt/shared/run1 [--project PROJECT] [--dry-run] [-- --config.batch_size=1024]
#
# It runs, from this machine:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE [--project=P] --worker=all --command=\
#     'cd REPO_DIR && PYTHON -m tame_jax.train --config=CONFIG --workdir=WORKDIR
#      --config.loss.variation_reference_batch=32 [OVERRIDES]'
# On every worker, jax.distributed.initialize() finds the other hosts from the TPU metadata
# (config.distributed.num_processes=-1, the default); each host reads its own shard of the data.
# Rerunning the same line resumes from the last checkpoint (also after a preemption).
#
# Needs: the repo and its environment (pip install -e '.[tpu]') at REPO_DIR on every worker,
# the data on every worker (or a tfds data_dir on GCS), and WORKDIR on a file system shared by
# all workers at the same path (NFS/Filestore or a gcsfuse mount): they write one checkpoint.
#
# Environment:
#   REPO_DIR  where the repo is on the workers, as shell text (default: ~/tame_jax)
#   PYTHON    the python on the workers (default: python3)
#   GCLOUD    the gcloud binary (default: gcloud)
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

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="${2:-}"; shift 2 || usage ;;
    --zone) ZONE="${2:-}"; shift 2 || usage ;;
    --project) PROJECT="${2:-}"; shift 2 || usage ;;
    --config) CONFIG="${2:-}"; shift 2 || usage ;;
    --workdir) WORKDIR="${2:-}"; shift 2 || usage ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (trainer flags go after --)" >&2; usage ;;
  esac
done
missing=()
for name in TPU ZONE CONFIG WORKDIR; do
  [[ -n "${!name}" ]] || missing+=("--${name,,}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tpu_pod.sh: missing required ${missing[*]}" >&2
  usage
fi

REPO_DIR=${REPO_DIR:-'~/tame_jax'}
PYTHON=${PYTHON:-python3}
remote="cd $REPO_DIR && $(print_command "$PYTHON" -m tame_jax.train "--config=$CONFIG" \
  "--workdir=$WORKDIR" "$KNOB" "$@")"
cmd=("${GCLOUD:-gcloud}" compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE")
[[ -n "$PROJECT" ]] && cmd+=("--project=$PROJECT")
cmd+=(--worker=all "--command=$remote")

if [[ $DRY_RUN == 1 ]]; then
  print_command "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
