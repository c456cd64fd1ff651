#!/usr/bin/env bash
# One prepared run for a GPU host, under 8 minutes: installs the tensorrt extra, runs the
# GPU tests and the TensorRT benchmark, then the pipeline's scaling with 1, 4 and all
# worker processes on TensorRT, and writes the figures into BENCHMARKS.md (each section
# names the GPU through bench.report.machine_line). Run from the repository root:
#
#     bash bench/gpu_host.sh [results-dir]
#
# Each step has its own time limit so one stuck step still leaves the others' figures;
# the script's exit status is the first failure's. Logs go to results-dir (default
# $OUT when set, else ./gpu-results), with BENCHMARKS.md copied there at the end.
set -uo pipefail
results="${1:-${OUT:-gpu-results}}"
mkdir -p "$results"
status=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    local started=$SECONDS
    timeout "$seconds" "$@" >"$results/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - started))s; tail of $results/$name.log:"
    tail -n 15 "$results/$name.log" | sed 's/^/   /'
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$results/gpu.txt" 2>&1
cat "$results/gpu.txt"
step install 150 make .venv/.gpu-installed
step test-gpu 120 make test-gpu
step bench-gpu 240 make bench-gpu
cp BENCHMARKS.md "$results/BENCHMARKS.md"
exit "$status"
