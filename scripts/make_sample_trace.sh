#!/usr/bin/env bash
# make_sample_trace.sh - regenerate the bundled real trace traces/samples/stories260K.kvt:
# stories260K (models/) on the CPU, 448 prompt tokens sampled from BOS with seed 1
# (temperature 1), 64 greedy decode steps, W=32, causal column sums, f32, zstd level 3,
# compressed in the calling thread. The output is byte-identical for the same kvtrace
# version and libzstd (the meta_json stall time is 0 without writer threads).
#
# usage: scripts/make_sample_trace.sh [BUILD_DIR] [OUTPUT]
#   BUILD_DIR  a configured and built tree (default: build); uses BUILD_DIR/bin/kvtrace
#   OUTPUT     default traces/samples/stories260K.kvt
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build}
OUT=${2:-$ROOT/traces/samples/stories260K.kvt}
BIN=$BUILD/bin/kvtrace
[ -x "$BIN" ] || { echo "make_sample_trace: $BIN not found (build first)" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
"$BIN" capture-llama2c --model "$ROOT/models/stories260K.bin" --tokens 448 --seed 1 \
    --temperature 1 --decode 64 --window 32 --colsum --dtype f32 --level 3 --threads 0 \
    -o "$OUT" --force
"$BIN" verify "$OUT"
