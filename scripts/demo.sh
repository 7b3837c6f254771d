#!/usr/bin/env bash
# demo.sh - the README's main command: install what is missing, build, and run the main job:
# capture a real trace from the bundled stories260K model (llama2.c checkpoint, CPU, with
# KVzip's reconstruction scores), verify it, show what it holds, replay every policy at a range
# of budgets (results.json), print the recommended settings, check the proxies end to end
# (e2e.json), recommend from the measured KL too, and write the HTML/PNG report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
BIN=build/bin/kvtrace
mkdir -p out
echo "== capture: stories260K, 448 prompt tokens from BOS, window 32, 64 greedy decode steps" >&2
$BIN capture-llama2c --model models/stories260K.bin --tokens 448 --window 32 --decode 64 \
    --colsum --q-all --kvzip --seed 1 --force -o out/stories260K.kvt
echo "== verify" >&2
$BIN verify out/stories260K.kvt
echo "== info" >&2
$BIN info out/stories260K.kvt
echo "== replay: every policy at budgets 40..256 tokens per KV head (window 32 included)" >&2
$BIN replay out/stories260K.kvt --policies all,h2o,expected-attention,kvzip,oracle \
    --budgets 40,48,64,96,128,192,256 \
    --force -o out/results.json
echo "== recommend: cheapest setting with decode-query output error <= 0.5" >&2
$BIN recommend out/results.json --max-error 0.5 || true   # exit 3 = no setting meets it
echo "== end to end: the 64 decode steps rerun with each setting's kept sets (KL vs the proxies)" >&2
$BIN e2e-llama2c out/stories260K.kvt --model models/stories260K.bin \
    --policies all,h2o,expected-attention,kvzip \
    --budgets 48,96,192 --force -o out/e2e.json
echo "== recommend by the model's own output: cheapest setting with mean next-token KL <= 1" >&2
$BIN recommend --e2e out/e2e.json --max-kl 1 || true
echo "== report" >&2
rm -rf out/report
$BIN report out/results.json --max-error 0.5 --e2e out/e2e.json --max-kl 1 --force -o out/report
echo "demo: trace out/stories260K.kvt, results out/results.json, report $(pwd)/out/report/index.html" >&2
