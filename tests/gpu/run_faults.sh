#!/usr/bin/env bash
# Issue 13's GPU check: SIGTERM / SIGKILL of a training run under MPS on one GPU
# (tests/gpu/faults_mps.py), then what is left on the GPU. Repo root, GPU host:
#   OUT=/tmp/out bash tests/gpu/run_faults.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-faults}; mkdir -p "$OUT"
python examples/tiny/build.py --out examples/tiny > "$OUT/build.log" 2>&1
# Logs off $OUT (a device call returns only a few files), then back as one tarball.
LOGS=/tmp/colocate-faults-logs; rm -rf "$LOGS"
timeout ${FAULTS_TIMEOUT:-520} python tests/gpu/faults_mps.py --out "$LOGS" 2>&1 | tee "$OUT/faults.txt"
cp "$LOGS/doctor.txt" "$OUT/" 2>/dev/null; tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
echo "=== after: MPS processes"; ps -eo pid,user,args | grep nvidia-cuda-mps | grep -v grep || echo none
echo "=== after: nvidia-smi"; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
ls /tmp/colocate-mps-* -d 2>/dev/null || echo "no /tmp/colocate-mps-* directories"
