#!/usr/bin/env bash
# Starts N local opd-jax processes that form one JAX job (CPU collectives), waits for all of them,
# and fails (killing the others) as soon as one fails.
#
#   launch/local_multiprocess.sh N [opd-jax args...]
#   launch/local_multiprocess.sh 2 train --config configs/sft.py:smoke --workdir runs/mp
#
# Each process gets OPD_COORDINATOR (127.0.0.1:PORT), OPD_NUM_PROCESSES=N and OPD_PROCESS_ID=i;
# `opd-jax` calls jax.distributed.initialize from them. Environment knobs:
#   OPD_PORT     coordinator port (default: a free port)
#   OPD_LOG_DIR  where proc<i>.log files go (default: a temp dir; printed)
#   OPD_JAX      the command to run (default: `opd-jax`, else `python -m opd_jax.cli`)
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 2; fi
N="$1"; shift
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: N must be a positive integer, got '$N'" >&2; exit 2
fi

PY="${PYTHON:-python3}"
PORT="${OPD_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG_DIR="${OPD_LOG_DIR:-$(mktemp -d -t opd_jax_mp.XXXXXX)}"
mkdir -p "$LOG_DIR"
if [[ -n "${OPD_JAX:-}" ]]; then
  read -r -a CMD <<< "$OPD_JAX"
elif command -v opd-jax >/dev/null 2>&1; then
  CMD=(opd-jax)
else
  CMD=("$PY" -m opd_jax.cli)
fi

export OPD_COORDINATOR="127.0.0.1:${PORT}" OPD_NUM_PROCESSES="$N"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
echo "local_multiprocess: $N processes, coordinator $OPD_COORDINATOR, logs in $LOG_DIR" >&2

declare -A PID_TO_RANK=()
for ((i = 0; i < N; i++)); do
  # Own session per process, so a failure can stop each process with its children.
  OPD_PROCESS_ID="$i" setsid "${CMD[@]}" "$@" >"$LOG_DIR/proc$i.log" 2>&1 &
  PID_TO_RANK[$!]=$i
done

kill_rest() {
  for pid in "${!PID_TO_RANK[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
}
trap 'kill_rest; exit 130' INT TERM

status=0
while ((${#PID_TO_RANK[@]} > 0)); do
  rc=0
  wait -n -p done_pid "${!PID_TO_RANK[@]}" || rc=$?
  rank="${PID_TO_RANK[$done_pid]}"
  unset "PID_TO_RANK[$done_pid]"
  if ((rc != 0)); then
    echo "local_multiprocess: process $rank failed (exit $rc); last lines of $LOG_DIR/proc$rank.log:" >&2
    tail -n 20 "$LOG_DIR/proc$rank.log" >&2 || true
    kill_rest
    wait 2>/dev/null || true
    status=$rc
    break
  fi
done
if ((status == 0)); then
  echo "local_multiprocess: all $N processes finished; process 0 output:" >&2
  cat "$LOG_DIR/proc0.log"
fi
exit "$status"
