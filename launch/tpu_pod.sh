#!/usr/bin/env bash
# Runs one opd-jax command on every worker of a Cloud TPU VM (single host or pod slice):
# create the TPU VM, install opd_jax on all workers, run the command with --worker=all, tear down.
#
#   launch/tpu_pod.sh [options] -- <opd-jax args...>
#   launch/tpu_pod.sh --name opd-8b --zone us-east5-a --accelerator-type v5p-128 \
#       --repo https://github.com/ORG/opd_jax.git -- \
#       train --config configs/opd.py:qwen3_8b --workdir gs://BUCKET/runs/opd_8b
#
# Options (defaults in brackets):
#   --name NAME               TPU VM name [opd-jax-$USER]
#   --zone ZONE               [us-east5-a]
#   --project PROJECT         gcloud project [gcloud's default]
#   --accelerator-type TYPE   e.g. v5p-128, v4-64, v5litepod-16 [v5p-128]
#   --version VERSION         TPU software version [v2-alpha-tpuv5]
#   --repo URL                git URL of opd_jax to clone on the workers [required unless --no-install]
#   --ref REF                 branch / tag / commit to check out [main]
#   --spot                    request spot capacity
#   --no-create               reuse an existing TPU VM of that name
#   --no-install              skip the clone + pip install step
#   --keep                    do not delete the TPU VM at the end
#   --dry-run                 print every gcloud command instead of running it
#   -h, --help
#
# Every worker runs the same command; opd-jax sees OPD_COORDINATOR=auto and calls
# jax.distributed.initialize() (Cloud TPU auto-detects coordinator, process count and id).
# The workdir must be reachable from all workers (a gs:// bucket): checkpoints are written
# collectively. The TPU VM is deleted on exit (also on failure or Ctrl-C) unless --keep.
set -euo pipefail

NAME="opd-jax-${USER:-user}"
ZONE="us-east5-a"
PROJECT=""
ACCEL="v5p-128"
VERSION="v2-alpha-tpuv5"
REPO=""
REF="main"
SPOT=0
CREATE=1
INSTALL=1
KEEP=0
DRY=0
JAX_VERSION="0.10.2"

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --accelerator-type) ACCEL="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --ref) REF="${2:?--ref needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --no-create) CREATE=0; shift ;;
    --no-install) INSTALL=0; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the opd-jax command goes after --; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "missing the opd-jax command after -- (e.g. -- train --config configs/opd.py:qwen3_8b --workdir gs://...)"
if ((INSTALL)) && [[ -z "$REPO" ]]; then die "--repo URL is required to install on the workers (or pass --no-install)"; fi

# Quote the user's opd-jax arguments for the remote shell.
OPD_ARGS=""
for a in "$@"; do OPD_ARGS+=" $(printf '%q' "$a")"; done

COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

run() {
  # Prints the command (shell-quoted, copy-pastable); runs it unless --dry-run.
  local line=""
  local q
  for a in "$@"; do
    q="$(printf '%q' "$a")"
    [[ "$q" == "$a" ]] || q="${a@Q}"
    line+="$q "
  done
  echo "+ ${line% }"
  if ((DRY == 0)); then "$@"; fi
}

teardown() {
  if ((KEEP == 0)); then
    run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet || true
  else
    echo "tpu_pod.sh: keeping TPU VM $NAME (delete it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE)" >&2
  fi
}

if ((CREATE)); then
  CREATE_ARGS=(--accelerator-type="$ACCEL" --version="$VERSION")
  ((SPOT)) && CREATE_ARGS+=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" "${CREATE_ARGS[@]}"
fi
trap teardown EXIT

if ((INSTALL)); then
  INSTALL_CMD="set -e; rm -rf opd_jax; git clone $(printf '%q' "$REPO") opd_jax; cd opd_jax; \
git checkout $(printf '%q' "$REF"); python3 -m venv .venv; . .venv/bin/activate; \
pip install -q -U pip; pip install -q -e .; pip install -q 'jax[tpu]==${JAX_VERSION}'"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command="$INSTALL_CMD"
fi

RUN_CMD="set -e; cd opd_jax; . .venv/bin/activate; OPD_COORDINATOR=auto opd-jax${OPD_ARGS}"
run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command="$RUN_CMD"
