#!/usr/bin/env bash
# test_replay_gpu_memory.sh - replay --device cuda on a GPU with little memory (cuemu's
# CUEMU_MEM_BYTES: cudaMalloc past it fails, cudaMemGetInfo reports it):
#   1. the worker threads take turns on the GPU: with room for one layer's context (the
#      estimate per worker less its fixed spare: the run fails if the estimate misses what a
#      context takes) and --threads 2, the profile says 1 of the 2 threads at a time and the
#      results equal those of an unlimited GPU (a second context at once would not fit);
#   2. with room for less than one layer: one clear line naming GPU memory, exit 1, no results,
#      and only one layer tried (the worker waiting for the GPU stops at the error);
#   3. the host memory estimate per worker (kvt_replay_worker_bytes with the GPU, which plans
#      --threads) against the host's peak (peak RSS less cuemu's device memory, which is host
#      memory here): at least the peak less 8 MiB (the estimate's fixed spare covers about what
#      the process holds besides its worker, to a few MiB), at most 1.6x the peak, with K and V
#      read ahead while the driver starts, and with the policies that read the context on the
#      host (leaving their arrays out of the estimate, or counting K and V in f32, fails it);
#   4. a layer whose attention kernels need a large workspace (below);
#   5. a long generation (2048 decode steps with their keys): the decode keys' probabilities,
#      4 x query heads x steps^2 bytes (64 MiB here), stay on the GPU, which sums their part
#      of each decode query's output; the host estimate, which no longer counts them, still
#      covers the host's peak, and the GPU's estimate covers the layer. Above 256 MiB of them
#      (here: KVT_TEST_GPU_DEC_BYTES=3000000, blocks of 366 of a KV group's 4096 rows) the GPU
#      takes a KV group's decode rows in blocks: the same results byte for byte, at least
#      32 MiB less device memory at its peak, and a GPU too small for them whole suffices.
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
grep -q "replay --device cuda: out of GPU memory (.* MiB more for a layer; .* MiB free of .* MiB on device 0): fewer --threads, or --device cpu" \
    "$TMP/small.msg" || { cat "$TMP/small.err"; fail "message"; }
[ ! -e "$TMP/small.json" ] || fail "results written despite the error"
# the second worker, waiting for the GPU, stops at the first's error instead of running its
# own layer into the same wall (cuemu notes every failed allocation)
n_oom=$(grep -c '^cuemu: cudaMalloc: out of memory' "$TMP/small.err")
[ "$n_oom" = 1 ] || { cat "$TMP/small.err"; fail "$n_oom layers ran out of GPU memory, not 1"; }
echo "ok: $(cat "$TMP/small.msg")"

# 3. the host memory estimate: one worker, so the estimate printed is the worker's
host_check() { # NAME POLICIES [ENV...]   (HC_TRACE: the trace, HC_SLACK: MiB added to 1.6x)
    local name=$1 pols=$2
    shift 2
    env CUEMU_STATS=1 "$@" "$BIN" replay "${HC_TRACE:-$TMP/t.kvt}" --device cuda --policies "$pols" \
        --budgets 64,10% --threads 1 --profile --force -o "$TMP/$name.json" >/dev/null \
        2>"$TMP/$name.err" || { cat "$TMP/$name.err"; fail "host memory run $name"; }
    local line dev
    line=$(grep "^profile: memory: peak RSS .* MiB; estimated .* MiB = 1 worker thread x .* per worker (host memory; the CUDA runtime's own is not in it)$" \
        "$TMP/$name.err") || { cat "$TMP/$name.err"; fail "$name: no memory line in MiB"; }
    dev=$(sed -n 's/^cuemu: device memory peak \([0-9]*\) bytes.*/\1/p' "$TMP/$name.err")
    [ -n "$dev" ] || fail "$name: cuemu printed no device peak"
    set -- $line # profile: memory: peak RSS 140.2 MiB; estimated 50.2 MiB = 1 worker thread ...
    awk -v n="$name" -v r="$5" -v e="$8" -v d="$dev" -v s="${HC_SLACK:-0}" 'BEGIN {
        h = r - d / 1048576
        printf "%s: host peak %.1f MiB (RSS %.1f less the device %.1f), estimated %.1f MiB\n",
            n, h, r, d / 1048576, e
        exit !(h <= e + 8 && e <= 1.6 * h + s) }' || fail "$name: the estimate is off"
}
# K and V read ahead into host memory (as stored) while the driver starts
host_check ahead snapkv,knorm,adakv CUEMU_INIT_MS=3000
grep -q "profile: gpu: K and V as stored: [1-9][0-9.]* MiB read ahead" "$TMP/ahead.err" ||
    { grep "as stored" "$TMP/ahead.err"; fail "nothing read ahead"; }
# the host readers: tova (probabilities), lightkv-like (everything, merged), quest (K and V)
host_check readers tova,lightkv-like,quest,snapkv
echo "ok: the host memory estimate with the GPU"

# 4. a layer whose attention kernels need a large workspace of their own (one KV head of
#    D=256 for 8 query heads, a 512-query window: the probabilities' stored logits 33 MiB, the
#    outputs' partial sums 16 MiB): the estimate covers it (room for the estimate less its
#    spare suffices), and when that workspace is what no longer fits, the same clear line
#    (from the kernel's allocation)
PY=${KVT_PYTHON:-/usr/bin/python3}
SRC=${KVT_SOURCE_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
if ! "$PY" -c 'import numpy' 2>/dev/null; then
    echo "skip 3: no numpy for $PY"
    exit 0
fi
PYTHONPATH="$SRC/python" "$PY" - "$TMP/mqa.kvt" <<'PYEOF' || fail "writing the MQA trace"
import sys
import numpy as np
import kvtrace
Hq, Hkv, D, T, W = 8, 1, 256, 1025, 512
rng = np.random.default_rng(7)
hdr = {"format": "kvtrace", "format_version": [1, 0], "created_by": "test_replay_gpu_memory",
       "endianness": "little",
       "model": {"name": "mqa", "arch": "llama", "n_layers": 1, "n_q_heads": Hq,
                 "n_kv_heads": Hkv, "head_dim": D, "attn_scale": 1 / np.sqrt(D),
                 "vocab_size": 32000, "rope": {"type": "default", "theta": 10000}},
       "kv_dtype": "f32", "n_tokens": T, "window": W, "n_decode": 0,
       "engine": {"name": "test", "version": "0"}, "gpu": None,
       "capture": {"api": "test", "with_colsum": False, "with_q_all": False}}
with kvtrace.TraceWriter(sys.argv[1], hdr, force=True) as w:
    w.append("K", rng.standard_normal((Hkv, T, D), dtype=np.float32), layer=0)
    w.append("V", rng.standard_normal((Hkv, T, D), dtype=np.float32), layer=0)
    w.append("Q_window", rng.standard_normal((Hq, W, D), dtype=np.float32), layer=0)
PYEOF
MARGS=(replay "$TMP/mqa.kvt" --device cuda --policies snapkv --budgets 64 --threads 1 --force)
"$BIN" "${MARGS[@]}" --profile -o "$TMP/mqa_free.json" >/dev/null 2>"$TMP/mqa_free.err" ||
    { cat "$TMP/mqa_free.err"; fail "MQA unlimited"; }
est=$(sed -n 's/^profile: gpu memory: about \([0-9.]*\) MiB per worker.*/\1/p' "$TMP/mqa_free.err")
[ -n "$est" ] || { cat "$TMP/mqa_free.err"; fail "MQA: no estimate"; }
room=$(awk -v e="$est" 'BEGIN { printf "%d", (e - 15) * 1048576 }')
CUEMU_MEM_BYTES=$room "$BIN" "${MARGS[@]}" -o "$TMP/mqa_room.json" >/dev/null 2>"$TMP/mqa_room.err" ||
    { cat "$TMP/mqa_room.err"; fail "MQA with room for the estimate less its spare ($est MiB)"; }
cmp -s "$TMP/mqa_free.json" "$TMP/mqa_room.json" || fail "MQA results differ"
echo "ok: MQA layer, estimate $est MiB covers the attention workspace"
CUEMU_MEM_BYTES=$((40 * 1048576)) "$BIN" "${MARGS[@]}" -o "$TMP/mqa_small.json" >/dev/null \
    2>"$TMP/mqa_small.err"
rc=$?
grep -v '^cuemu: ' "$TMP/mqa_small.err" >"$TMP/mqa_small.msg"
[ "$rc" = 1 ] && [ "$(wc -l <"$TMP/mqa_small.msg")" = 1 ] &&
    grep -q "replay --device cuda: attn_\(probs\|output\)_cuda: out of GPU memory for .* MiB of workspace (.* MiB free of .* MiB on device 0): fewer --threads, or --device cpu" \
        "$TMP/mqa_small.msg" || { cat "$TMP/mqa_small.err"; fail "MQA: exit $rc, message"; }
echo "ok: $(cat "$TMP/mqa_small.msg")"

# 5. a long generation: the host estimate (a tiny model's: its fixed 16 MiB spare and the
#    per-step policy's scratch counted for larger heads are most of it, hence the slack) and the
#    GPU's, with room for the latter less its spare
"$BIN" synth --shape tiny --tokens 256 --layers 1 --decode 2048 --seed 1 -o "$TMP/long.kvt" \
    >/dev/null 2>&1 || fail "synth long"
HC_TRACE=$TMP/long.kvt HC_SLACK=24 host_check long snapkv,knorm:decoding=8
grep -q "^profile: gpu: .*" "$TMP/long.err" || fail "long: no GPU lines"
est=$(sed -n 's/^profile: gpu memory: about \([0-9.]*\) MiB per worker.*/\1/p' "$TMP/long.err")
room=$(awk -v e="$est" 'BEGIN { printf "%d", (e - 15) * 1048576 }')
CUEMU_MEM_BYTES=$room "$BIN" replay "$TMP/long.kvt" --device cuda --policies snapkv,knorm:decoding=8 \
    --budgets 64,10% --threads 1 --force -o "$TMP/long_room.json" >/dev/null \
    2>"$TMP/long_room.err" || { cat "$TMP/long_room.err"; fail "long: room for $est MiB less 15"; }
cmp -s "$TMP/long.json" "$TMP/long_room.json" || fail "long: results differ with less room"
echo "ok: a long generation, GPU estimate $est MiB"
dev_peak() { sed -n 's/^cuemu: device memory peak \([0-9]*\) bytes.*/\1/p' "$1"; }
whole=$(dev_peak "$TMP/long.err")
KVT_TEST_GPU_DEC_BYTES=3000000 CUEMU_STATS=1 "$BIN" replay "$TMP/long.kvt" --device cuda \
    --policies snapkv,knorm:decoding=8 --budgets 64,10% --threads 1 --profile --force \
    -o "$TMP/long_blk.json" >/dev/null 2>"$TMP/long_blk.err" ||
    { cat "$TMP/long_blk.err"; fail "long: decode rows in blocks"; }
cmp -s "$TMP/long.json" "$TMP/long_blk.json" || fail "long: results differ in blocks"
blk=$(dev_peak "$TMP/long_blk.err")
est=$(sed -n 's/^profile: gpu memory: about \([0-9.]*\) MiB per worker.*/\1/p' "$TMP/long_blk.err")
room=$(awk -v e="$est" 'BEGIN { printf "%d", (e - 15) * 1048576 }')
echo "long: device peak $whole bytes whole, $blk in blocks (estimate $est MiB)"
[ -n "$whole" ] && [ -n "$blk" ] && [ "$blk" -lt $((whole - 32 * 1048576)) ] ||
    fail "long: blocks did not lower the device peak"
[ "$room" -lt "$whole" ] || fail "long: room $room is not below the whole run's peak $whole"
KVT_TEST_GPU_DEC_BYTES=3000000 CUEMU_MEM_BYTES=$room "$BIN" replay "$TMP/long.kvt" \
    --device cuda --policies snapkv,knorm:decoding=8 --budgets 64,10% --threads 1 --force \
    -o "$TMP/long_blk_room.json" >/dev/null 2>"$TMP/long_blk_room.err" ||
    { cat "$TMP/long_blk_room.err"; fail "long: blocks in room for $est MiB less 15"; }
cmp -s "$TMP/long.json" "$TMP/long_blk_room.json" || fail "long: results differ in little room"
echo "ok: decode rows in blocks: the same results in $((room / 1048576)) MiB of GPU"
