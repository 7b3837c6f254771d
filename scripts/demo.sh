#!/usr/bin/env bash
# demo.sh - the README's main command: install what is missing, build, and run the main job:
# capture a real trace from the bundled stories260K model (llama2.c checkpoint, CPU), verify
# it, and show what it holds. As replay and report land, this becomes
# capture -> replay -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
BIN=build/bin/kvtrace
mkdir -p out
echo "== capture: stories260K, 448 prompt tokens from BOS, window 32, 64 greedy decode steps" >&2
$BIN capture-llama2c --model models/stories260K.bin --tokens 448 --window 32 --decode 64 \
    --colsum --seed 1 --force -o out/stories260K.kvt
echo "== verify" >&2
$BIN verify out/stories260K.kvt
echo "== info" >&2
$BIN info out/stories260K.kvt
echo "demo: trace written to out/stories260K.kvt" >&2
