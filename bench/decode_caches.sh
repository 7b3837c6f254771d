#!/usr/bin/env bash
# decode_caches.sh - the cost of the decode-time caches (decoding=, h2o-greedy's decode=1)
# against the same policies at prefill only, on one synthetic trace:
# each pair replayed in one run of this script (best of REPS), the ratio printed, so that the
# figures in analysis/RESULTS.md can be measured again on any machine.
#
# usage: bench/decode_caches.sh      (from the repository root; builds nothing)
# environment (defaults in brackets):
#   BUILD [build]  the build folder holding bin/kvtrace (KVT: the CLI itself, else that one)
#   WORK [/tmp/kvt_decode_caches]  the trace and the results
#   SHAPE [qwen2-vl-7b]  T [8192]  G [128]  LAYERS [2]  the synthetic trace (with Q_all when
#             h2o-greedy is among the pairs)
#   BUDGETS [1%,5%,10%,20%,30%,50%]  THREADS [1]  REPS [1]
#   PAIRS  space-separated "PREFILL|DECODE" spec pairs (default: knorm and tova with
#          decoding=1,prefill=1 and decoding=8, streamingllm with decoding=1,prefill=1,
#          qfilter with decoding=8)
#   Q_ALL [0]  1: also h2o-greedy against h2o-greedy:decode=1 (needs Q_all: O(T^2 D) per
#          query head, slow at long T)
#   EA [0]  1: also expected-attention against expected-attention:decoding=8 and
#          decoding=8,prefill=1 (the prefill press needs Q_all, which the trace then holds)
#   EXPORT [0]  1: also each decode-time spec's selection export (one more replay, untimed):
#          its size against every set written whole (kvtrace info --json: file_bytes,
#          whole_bytes), the saving of its delta records; then the reader's peak memory
#          (maximum resident set) opening it (kvtrace info) and walking every set through
#          kvtrace.read_selection's records() with its time (PY [/usr/bin/python3], which needs
#          NumPy, else "-"; the package from KVT_PY [python], the library KVT_LIB
#          [$BUILD/libkvtrace.so])
# Prints one line per pair: both times in seconds and the ratio decode / prefill (with
# EXPORT=1 then "export: SPEC FILE MiB, whole WHOLE MiB, xRATIO" and "read: SPEC open N MiB
# peak, walk S s N MiB peak"); writes $WORK/summary.txt.
# Exit 0, or 1 when a replay fails.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
WORK=${WORK:-/tmp/kvt_decode_caches}
SHAPE=${SHAPE:-qwen2-vl-7b}
T=${T:-8192}
G=${G:-128}
LAYERS=${LAYERS:-2}
BUDGETS=${BUDGETS:-1%,5%,10%,20%,30%,50%}
THREADS=${THREADS:-1}
REPS=${REPS:-1}
Q_ALL=${Q_ALL:-0}
EA=${EA:-0}
EXPORT=${EXPORT:-0}
PAIRS=${PAIRS:-"knorm|knorm:decoding=1,prefill=1 knorm|knorm:decoding=8 \
tova|tova:decoding=1,prefill=1 tova|tova:decoding=8 \
streamingllm|streamingllm:decoding=1,prefill=1 qfilter|qfilter:decoding=8"}
if [ "$Q_ALL" = 1 ]; then PAIRS="$PAIRS h2o-greedy|h2o-greedy:decode=1"; fi
if [ "$EA" = 1 ]; then
    PAIRS="$PAIRS expected-attention|expected-attention:decoding=8"
    PAIRS="$PAIRS expected-attention|expected-attention:decoding=8,prefill=1"
fi
KVT=${KVT:-$BUILD/bin/kvtrace}
PY=${PY:-/usr/bin/python3}
KVT_PY=${KVT_PY:-python}
KVT_LIB=${KVT_LIB:-$BUILD/libkvtrace.so}
[ -x "$KVT" ] || { echo "decode_caches: $KVT is missing; build first" >&2; exit 1; }
mkdir -p "$WORK"

extra=() qtag=""
if [ "$Q_ALL" = 1 ] || [ "$EA" = 1 ]; then
    extra=(--q-all) qtag=_qall
fi
TRACE=$WORK/${SHAPE}_T${T}_G${G}_L${LAYERS}$qtag.kvt
if [ ! -s "$TRACE" ]; then
    "$KVT" synth --shape "$SHAPE" --tokens "$T" --layers "$LAYERS" --decode "$G" --seed 1 \
        "${extra[@]}" --force -o "$TRACE" >/dev/null
fi

now() { date +%s.%N; }
peak() { # run a command: "SECONDS PEAK_MIB" (its maximum resident set), or exit 1 if it fails
    python3 -c '
import os, subprocess, sys, time
t = time.time()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, st, ru = os.wait4(p.pid, 0)
print("%.3f %.1f" % (time.time() - t, ru.ru_maxrss / 1024.0))
sys.exit(os.waitstatus_to_exitcode(st))' "$@"
}
WALK='import sys, kvtrace
with kvtrace.read_selection(sys.argv[1]) as s:
    print(sum(r["kept"].size for r in s.records()))'
best() { # best wall time of REPS replays of one spec, in seconds
    local spec=$1 b="" t0 t
    for _ in $(seq "$REPS"); do
        t0=$(now)
        "$KVT" replay "$TRACE" --policy "$spec" --budgets "$BUDGETS" --threads "$THREADS" \
            --force -o "$WORK/r.json" >/dev/null 2>"$WORK/err" ||
            { echo "decode_caches: replay $spec failed: $(cat "$WORK/err")" >&2; exit 1; }
        t=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
        if [ -z "$b" ] || awk -v x="$t" -v y="$b" 'BEGIN { exit !(x < y) }'; then b=$t; fi
    done
    echo "$b"
}

{
    echo "decode-time caches: $SHAPE, T=$T, G=$G, $LAYERS layers, budgets $BUDGETS," \
         "$THREADS thread(s), best of $REPS; $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores," \
         "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    for pair in $PAIRS; do
        pre=${pair%%|*} dec=${pair#*|}
        a=$(best "$pre")
        b=$(best "$dec")
        awk -v p="$pre" -v d="$dec" -v a="$a" -v b="$b" \
            'BEGIN { printf "%-28s %7.2f s   %-44s %7.2f s   x%.2f\n", p, a, d, b, b / a }'
        if [ "$EXPORT" = 1 ]; then
            "$KVT" replay "$TRACE" --policy "$dec" --budgets "$BUDGETS" --threads "$THREADS" \
                --force -o "$WORK/r.json" --export-selection "$WORK/sel.bin" >/dev/null \
                2>"$WORK/err" ||
                { echo "decode_caches: replay $dec failed: $(cat "$WORK/err")" >&2; exit 1; }
            "$KVT" info "$WORK/sel.bin" --json >"$WORK/info.json" 2>"$WORK/err" ||
                { echo "decode_caches: info: $(cat "$WORK/err")" >&2; exit 1; }
            awk -v d="$dec" '/"file_bytes":/ { gsub(/[^0-9]/, "", $2); f = $2 }
                 /"whole_bytes":/ { gsub(/[^0-9]/, "", $2); w = $2 }
                 END { printf "export: %-44s %9.3f MiB, whole %9.3f MiB, x%.1f\n", d,
                       f / 1048576, w / 1048576, w / f }' "$WORK/info.json"
            open=$(peak "$KVT" info "$WORK/sel.bin" 2>"$WORK/err") ||
                { echo "decode_caches: info: $(cat "$WORK/err")" >&2; exit 1; }
            walk="-"
            if "$PY" -c 'import numpy' 2>/dev/null; then
                walk=$(PYTHONPATH="$KVT_PY" KVT_LIB="$KVT_LIB" peak "$PY" -c "$WALK" \
                    "$WORK/sel.bin" 2>"$WORK/err") ||
                    { echo "decode_caches: read_selection: $(cat "$WORK/err")" >&2; exit 1; }
                walk=$(echo "$walk" | awk '{ printf "%.2f s %.1f MiB peak", $1, $2 }')
            fi
            echo "$open" | awk -v d="$dec" -v w="$walk" \
                '{ printf "read: %-46s open %.1f MiB peak, walk %s\n", d, $2, w }'
        fi
    done
} | tee "$WORK/summary.txt"
