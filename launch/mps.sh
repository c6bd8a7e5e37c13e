#!/usr/bin/env bash
# Start, stop or inspect a job-private CUDA MPS daemon by hand, with the same directory
# convention as colocate/mps.py and colocate/mps_daemon.py:
#   ${TMPDIR:-/tmp}/colocate-mps-<token>/{pipe,log}
#
#   launch/mps.sh start     # daemon up, control pipe present, a client probe succeeded
#   launch/mps.sh status    # pid, servers, clients, log tails
#   launch/mps.sh env       # export lines for a shell that should be a client
#   launch/mps.sh stop      # quit, wait for the daemon to exit, remove the dirs
#
# To run colocate against a daemon started here, pass its pipe dir:
#   torchrun ... -m colocate train --config run.yaml mps.pipe_dir=$(launch/mps.sh pipe)
# colocate then reuses that daemon and never stops it (it did not start it).
# A colocate run that crashed (SIGKILL: no atexit) leaves its daemon behind; stop it with
#   COLOCATE_MPS_PIPE_DIR=/tmp/colocate-mps-<token>/pipe launch/mps.sh stop
#
# Knobs (environment, defaults in brackets):
#   COLOCATE_MPS_TOKEN     [$(id -u)-manual]  names the dirs; one per job and node
#   COLOCATE_MPS_PIPE_DIR  [<root>/pipe]      explicit pipe dir (like mps.pipe_dir)
#   MPS_TIMEOUT_S          [60]               bound on every wait below
#   MPS_KEEP_LOGS          [0]                1: keep the log dir after stop
#   MPS_PROBE_CMD          [python3 -m colocate.mps_daemon probe 30]  the client readiness check
#
# Debugging MPS:
#   * Logs: $LOG_DIR/control.log (daemon: clients connecting, servers spawned) and
#     $LOG_DIR/server.log (the server: context creation, client errors, OOM kills).
#   * CUDA error 805 (MPS_CONNECTION_FAILED) in a client: it connected before the daemon
#     was ready, or to a pipe dir no daemon serves; check that every process of the job
#     sees the same CUDA_MPS_PIPE_DIRECTORY (`launch/mps.sh env`).
#   * "all CUDA-capable devices are busy": GPUs in EXCLUSIVE_PROCESS mode without a
#     daemon, or a daemon from another user; `nvidia-smi -q -d COMPUTE` shows the mode.
#   * Do not set CUDA_VISIBLE_DEVICES for the daemon: it remaps the devices every client
#     sees, so a client keeping "5,6" would name devices that do not exist. This script
#     unsets it for the daemon only.
#   * Per-client knobs (set in the client, never the daemon): CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
#     (SM share), CUDA_MPS_PINNED_DEVICE_MEM_LIMIT ("0=20G"), CUDA_MPS_CLIENT_PRIORITY.
#   * Compare against time-slicing: run colocate with mps.mode=off.
#   * Interactive daemon shell: CUDA_MPS_PIPE_DIRECTORY=$PIPE_DIR nvidia-cuda-mps-control
#     then get_server_list, get_client_list <server pid>, get_device_client_list, quit.
set -euo pipefail

TOKEN="${COLOCATE_MPS_TOKEN:-$(id -u)-manual}"
ROOT="${TMPDIR:-/tmp}"
ROOT="${ROOT%/}/colocate-mps-${TOKEN}"
PIPE_DIR="${COLOCATE_MPS_PIPE_DIR:-$ROOT/pipe}"
LOG_DIR="$ROOT/log"
TIMEOUT_S="${MPS_TIMEOUT_S:-60}"
PROBE_CMD="${MPS_PROBE_CMD:-python3 -m colocate.mps_daemon probe 30}"
CONTROL="$PIPE_DIR/control"
PID_FILE="$PIPE_DIR/nvidia-cuda-mps-control.pid"
export CUDA_MPS_PIPE_DIRECTORY="$PIPE_DIR" CUDA_MPS_LOG_DIRECTORY="$LOG_DIR"

die() { echo "mps.sh: $*" >&2; exit 1; }

tails() {
  for f in "$LOG_DIR/control.log" "$LOG_DIR/server.log"; do
    [[ -f "$f" ]] && { echo "--- tail of $f"; tail -n 15 "$f"; }
  done
  return 0
}

daemon_pid() { [[ -f "$PID_FILE" ]] && cat "$PID_FILE" || true; }

# Running, and not a zombie (kill -0 succeeds on zombies, which have exited).
alive() { kill -0 "$1" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

# wait_for <what> <test command...>: poll until the command succeeds, bounded.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT_S))
  until "$@"; do
    (( SECONDS < deadline )) || { tails >&2; die "timed out after ${TIMEOUT_S}s waiting for $what (pipe dir $PIPE_DIR, log dir $LOG_DIR)"; }
    sleep 0.2
  done
}

probe() { $PROBE_CMD; }  # word splitting intended: a command line

cmd_start() {
  command -v nvidia-cuda-mps-control >/dev/null || die "nvidia-cuda-mps-control not on PATH (MPS ships with the NVIDIA driver utilities)"
  if [[ -e "$CONTROL" ]] && probe >/dev/null 2>&1; then
    echo "mps.sh: a daemon already serves $PIPE_DIR (pid $(daemon_pid))"; return 0
  fi
  mkdir -p -m 700 "$PIPE_DIR" "$LOG_DIR"
  # The daemon must see every GPU; limits belong to clients (see the notes above).
  env -u CUDA_VISIBLE_DEVICES -u CUDA_MPS_ACTIVE_THREAD_PERCENTAGE \
      -u CUDA_MPS_PINNED_DEVICE_MEM_LIMIT nvidia-cuda-mps-control -d
  wait_for "the MPS control pipe $CONTROL" test -e "$CONTROL"
  # The pipe alone is not readiness: retry a real client until it gets a context.
  wait_for "a successful MPS client probe ($PROBE_CMD)" probe
  echo "mps.sh: daemon pid $(daemon_pid) serves $PIPE_DIR; logs in $LOG_DIR"
}

cmd_stop() {
  local pid; pid="$(daemon_pid)"
  if [[ ! -e "$CONTROL" && -z "$pid" ]]; then
    echo "mps.sh: no daemon serves $PIPE_DIR"
  else
    echo quit | nvidia-cuda-mps-control || true
    if [[ -n "$pid" ]]; then
      wait_for "daemon pid $pid to exit after quit" eval "! alive $pid"
    else
      wait_for "the control pipe $CONTROL to go away" bash -c "[[ ! -e '$CONTROL' ]]"
    fi
    echo "mps.sh: daemon stopped"
  fi
  if [[ "${MPS_KEEP_LOGS:-0}" == 1 ]]; then
    rm -rf "$PIPE_DIR"; echo "mps.sh: kept $LOG_DIR"
  elif [[ "$PIPE_DIR" == "$ROOT/pipe" ]]; then
    rm -rf "$ROOT"
  else
    rm -rf "$LOG_DIR"  # an explicit pipe dir is not ours to delete
  fi
}

cmd_status() {
  echo "pipe dir: $PIPE_DIR"
  echo "log dir:  $LOG_DIR"
  local pid; pid="$(daemon_pid)"
  if [[ -n "$pid" ]] && alive "$pid"; then echo "daemon:   pid $pid (running)"
  else echo "daemon:   not running"; fi
  if [[ -e "$CONTROL" ]]; then
    echo "servers:  $(echo get_server_list | nvidia-cuda-mps-control 2>&1 | tr '\n' ' ')"
    echo "clients:  $(echo get_device_client_list | nvidia-cuda-mps-control 2>&1 | tr '\n' ' ')"
  fi
  tails
}

cmd_env() {
  echo "export CUDA_MPS_PIPE_DIRECTORY=$PIPE_DIR"
  echo "export CUDA_MPS_LOG_DIRECTORY=$LOG_DIR"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  pipe) echo "$PIPE_DIR" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
