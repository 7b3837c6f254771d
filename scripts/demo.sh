#!/usr/bin/env bash
# demo.sh - the README's main command: install what is missing, build, and run the main job
# on a trace. Until the replay and report land, the job writes a synthetic llama-shaped
# trace, verifies it and prints `kvtrace info` for it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
BIN=build/bin/kvtrace
mkdir -p out
echo "== kvtrace synth: a synthetic qwen2-vl-7b-shaped trace (T=512, W=32, 16 decode steps)" >&2
$BIN synth --shape qwen2-vl-7b --tokens 512 --window 32 --decode 16 --seed 1 --force \
    -o out/demo_synth.kvt
$BIN verify out/demo_synth.kvt
$BIN info out/demo_synth.kvt
echo "demo: trace written to out/demo_synth.kvt" >&2
