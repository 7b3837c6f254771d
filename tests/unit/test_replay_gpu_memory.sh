#!/usr/bin/env bash
# test_replay_gpu_memory.sh - replay --device cuda on a GPU with little memory (cuemu's
# CUEMU_MEM_BYTES: cudaMalloc past it fails, cudaMemGetInfo reports it):
#   1. the worker threads take turns on the GPU: with room for one layer's context (the
#      estimate per worker less its fixed spare: the run fails if the estimate misses what a
#      context takes) and --threads 2, the profile says 1 of the 2 threads at a time and the
#      results equal those of an unlimited GPU (a second context at once would not fit);
#   2. with room for less than one layer: one clear line naming GPU memory, exit 1, no results.
# Needs KVT_BIN (kvtrace_cuemu, the CUDA code on the CPU stand-in).
set -uo pipefail
BIN=${KVT_BIN:?KVT_BIN: the kvtrace_cuemu binary}
HOST_BIN=${KVT_HOST_BIN:-$(dirname "$BIN")/../bin/kvtrace}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvt_gpumem.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

# a trace whose contexts are well above the estimate's fixed 16 MiB spare: llama3-8b heads
"$BIN" synth --shape llama3-8b --tokens 2048 --layers 2 --decode 8 --colsum off \
    -o "$TMP/t.kvt" >/dev/null 2>&1 || fail "synth"
ARGS=(replay "$TMP/t.kvt" --device cuda --policies snapkv,knorm,adakv --budgets 64,10%
    --threads 2 --profile --force)

"$BIN" "${ARGS[@]}" -o "$TMP/free.json" >/dev/null 2>"$TMP/free.err" ||
    { cat "$TMP/free.err"; fail "unlimited run"; }
line=$(grep '^profile: gpu memory: ' "$TMP/free.err") || { cat "$TMP/free.err"; fail "no memory line"; }
echo "unlimited: $line"
echo "$line" | grep -q ": 2 of the 2 worker threads on the GPU at a time$" || fail "$line"
# the estimate, in MiB as printed (one decimal)
est=$(echo "$line" | sed -n 's/.*about \([0-9.]*\) MiB per worker.*/\1/p')
[ -n "$est" ] || fail "no estimate in MiB: $line"
# room for one context, not two, and tight: the estimate less its fixed 16 MiB spare (plus 1),
# so that an estimate missing one of the larger arrays fails here
mib=$(awk -v e="$est" 'BEGIN { printf "%d", e - 15 }')
[ "$mib" -gt 30 ] || fail "estimate $est MiB: the trace is too small for this test"

# 1. room for one context, not two
room=$((mib * 1048576))
CUEMU_MEM_BYTES=$room "$BIN" "${ARGS[@]}" -o "$TMP/one.json" >/dev/null 2>"$TMP/one.err" ||
    { cat "$TMP/one.err"; fail "one context at a time (CUEMU_MEM_BYTES=$room)"; }
line=$(grep '^profile: gpu memory: ' "$TMP/one.err")
echo "room for one: $line"
echo "$line" | grep -q ": 1 of the 2 worker threads on the GPU at a time$" || fail "$line"
cmp -s "$TMP/free.json" "$TMP/one.json" || fail "results differ with one context at a time"
echo "ok: one context at a time, the same results"

# 2. room for less than one context: a clear error
small=$((room / 3))
CUEMU_MEM_BYTES=$small "$BIN" "${ARGS[@]}" -o "$TMP/small.json" >/dev/null 2>"$TMP/small.err"
rc=$?
[ "$rc" = 1 ] || { cat "$TMP/small.err"; fail "exit $rc with too little GPU memory"; }
grep -v '^cuemu: ' "$TMP/small.err" >"$TMP/small.msg" # the stand-in's own notes aside
[ "$(wc -l <"$TMP/small.msg")" = 1 ] || { cat "$TMP/small.err"; fail "not one line"; }
grep -q "replay --device cuda: out of GPU memory (.* MiB more for a layer; .* MiB free of .* MiB): fewer --threads, or --device cpu" \
    "$TMP/small.msg" || { cat "$TMP/small.err"; fail "message"; }
[ ! -e "$TMP/small.json" ] || fail "results written despite the error"
echo "ok: $(cat "$TMP/small.msg")"
