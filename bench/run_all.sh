#!/usr/bin/env bash
# run_all.sh - every benchmark of bench/ on one synthetic llama3-8b-shaped trace (issue #8):
# bench_trace (writer/reader throughput), bench_replay (all policies, 8 budgets vs 1),
# bench_floor (zstd + SGEMM rates, the floor of the sweep), the NumPy peer
# (bench/peer_numpy.py) and `kvtrace replay` on the same trace, then the ratios
# kvtrace/peer and kvtrace/floor and the peer-vs-kvtrace recall agreement.
# Re-runnable: traces are generated once and kept in $WORK (FORCE=1 regenerates); every run
# rewrites the logs and $WORK/summary.txt. Figures go to bench/RESULTS.md by hand.
#
# usage: bench/run_all.sh            (from the repository root; builds nothing)
# environment (defaults in brackets):
#   BUILD [build-bench]  build folder with bin/kvtrace, bench/bench_*, libkvtrace.so
#   WORK [/tmp/kvt_run_all]  traces, logs, results
#   T [8192]  LAYERS [4]  the peer trace: the first LAYERS layers of a T-token llama3-8b synth
#   COLSUM [on]  attention column sums in the synth (h2o needs them; at T=8192 they cost
#                ~13 CPU-s per layer, once: 7 CPU-min for the 32 layers; off: ~15 s)
#   THREADS [nproc]  POLICIES [streamingllm,h2o,snapkv,pyramidkv,adakv,knorm,random,oracle]
#   BUDGETS [64,128,256,512,1024,2048,5%,10%]  PROBES [256]
#   BENCH_REPLAY_LAYERS [2]  (0 skips bench_replay)  BENCH_TRACE [1]  (0 skips bench_trace)
#   SCALING_T ["2048 4096 8192 16384"]  bench_replay (2 layers, every policy) at each T, to
#             show how time grows with T (0 skips it)
#   REPS [1]  runs of kvtrace and of the peer (alternating); the best time of each counts
#   PYTHON [/usr/bin/python3]
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build-bench}
WORK=${WORK:-/tmp/kvt_run_all}
T=${T:-8192}
LAYERS=${LAYERS:-4}
COLSUM=${COLSUM:-on}
THREADS=${THREADS:-$(nproc)}
POLICIES=${POLICIES:-streamingllm,h2o,snapkv,pyramidkv,adakv,knorm,random,oracle}
BUDGETS=${BUDGETS:-64,128,256,512,1024,2048,5%,10%}
PROBES=${PROBES:-256}
BENCH_REPLAY_LAYERS=${BENCH_REPLAY_LAYERS:-2}
BENCH_TRACE=${BENCH_TRACE:-1}
REPS=${REPS:-1}
PYTHON=${PYTHON:-/usr/bin/python3}
KVT=$BUILD/bin/kvtrace
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export KVT_LIB=${KVT_LIB:-$PWD/$BUILD/libkvtrace.so}

for f in "$KVT" "$BUILD/bench/bench_trace" "$BUILD/bench/bench_replay" \
         "$BUILD/bench/bench_floor" "$KVT_LIB"; do
    [ -e "$f" ] || { echo "run_all: $f is missing; build first:" \
        "cmake -S . -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVT_CUDA=OFF &&" \
        "cmake --build $BUILD" >&2; exit 1; }
done
mkdir -p "$WORK"
BLAS_LINE=$("$KVT" --version | sed -n 's/^CPU dense products: //p') # before the export below
# the same OpenBLAS kernels for the NumPy peer as for kvtrace: where OpenBLAS does not know the
# CPU and falls back to its generic kernels, kvtrace picks better ones (`kvtrace --version`);
# the peer's NumPy (Debian's, on the same OpenBLAS) gets them too
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
    core=$("$KVT" --version | sed -n 's/^CPU dense products: .*, \([A-Za-z0-9]*\) kernels (chosen by kvtrace.*/\1/p')
    [ -n "$core" ] && export OPENBLAS_CORETYPE=$core
fi
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

echo "== machine"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores online"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "OpenBLAS kernels: $BLAS_LINE (the NumPy peer: ${OPENBLAS_CORETYPE:-its own choice})"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
         "$(git diff --quiet 2>/dev/null || echo '(working tree modified)')"
} | tee "$WORK/machine.txt"

# ---- traces -----------------------------------------------------------------------------
FULL=$WORK/llama3-8b_T${T}_colsum-${COLSUM}.kvt
CUT=$WORK/llama3-8b_T${T}_colsum-${COLSUM}_L${LAYERS}.kvt
if [ ! -s "$FULL" ] || [ "${FORCE:-0}" = 1 ]; then
    echo "== synth $FULL"
    t0=$(now)
    "$KVT" synth --shape llama3-8b --tokens "$T" --colsum "$COLSUM" --seed 1 \
        --threads "$THREADS" --force -o "$FULL"
    echo "synth: $(secs "$t0" "$(now)") s"
fi
if [ ! -s "$CUT" ] || [ "$CUT" -ot "$FULL" ]; then
    echo "== cut the first $LAYERS layers"
    "$PYTHON" bench/peer_numpy.py --cut "$LAYERS" "$FULL" "$CUT"
fi
"$KVT" info "$CUT" | tee "$WORK/trace_info.txt" | sed -n 1,4p

# h2o needs column sums; drop it (everywhere) when the trace has none
if ! grep -q '^attn_colsum' "$WORK/trace_info.txt"; then
    POLICIES=$(echo "$POLICIES" | tr ',' '\n' | grep -vx h2o | paste -sd, -)
    echo "no attn_colsum in the trace: h2o left out"
fi
N_POL=$(echo "$POLICIES" | tr ',' '\n' | grep -c .)
N_BUD=$(echo "$BUDGETS" | tr ',' '\n' | grep -c .)
BMAX=$(echo "$BUDGETS" | tr ',' '\n' | awk -v T="$T" '
    /%$/ { sub(/%/, ""); v = int($0 / 100 * T + 0.5); if (v < 1) v = 1; if (v > m) m = v; next }
    { if ($0 + 0 > m) m = $0 + 0 } END { print m }')

# ---- bench_trace, bench_replay -----------------------------------------------------------
if [ "$BENCH_TRACE" != 0 ]; then
    echo "== bench_trace $CUT $THREADS"
    "$BUILD/bench/bench_trace" "$CUT" "$THREADS" | tee "$WORK/bench_trace.md"
fi
if [ "$BENCH_REPLAY_LAYERS" != 0 ]; then
    echo "== bench_replay --layers $BENCH_REPLAY_LAYERS --tokens $T --threads $THREADS"
    "$BUILD/bench/bench_replay" --layers "$BENCH_REPLAY_LAYERS" --tokens "$T" \
        --threads "$THREADS" | tee "$WORK/bench_replay.md"
fi

# ---- floor --------------------------------------------------------------------------------
echo "== bench_floor ($N_POL policies, $N_BUD budgets, Bmax $BMAX, $PROBES probes)"
"$BUILD/bench/bench_floor" "$CUT" --threads "$THREADS" --policies "$N_POL" \
    --budgets "$N_BUD" --bmax "$BMAX" --probes "$PROBES" | tee "$WORK/bench_floor.md"
FLOOR=$(sed -n 's/^floor_s //p' "$WORK/bench_floor.md")
FLOOR1=$(sed -n 's/^floor_s_1thread //p' "$WORK/bench_floor.md")
FLOORN=$(sed -n "s/^floor_s_${THREADS}threads //p" "$WORK/bench_floor.md")
FLOORCPU=$(sed -n 's/^floor_cpu_s //p' "$WORK/bench_floor.md")

# ---- kvtrace and the peer on the same trace ------------------------------------------------
# REPS alternating runs of each; the best wall time and the best CPU time (user + sys, all
# threads) of each are reported: on a shared machine the CPU time is the steadier figure
KVT_S="" KVT_CPU="" PEER_S="" PEER_CPU="" PEER_RC=0
TIMEFORMAT='%R %U %S'
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b + 0 < a + 0) ? b : a }'; }
for rep in $(seq 1 "$REPS"); do
    echo "== kvtrace replay --policies $POLICIES --threads $THREADS (run $rep/$REPS)"
    { time "$KVT" replay "$CUT" --policies "$POLICIES" --budgets "$BUDGETS" \
        --threads "$THREADS" --coverage-probes "$PROBES" --force \
        -o "$WORK/kvtrace_results.json" > "$WORK/kvtrace_replay.log" 2>&1; } 2> "$WORK/time.txt"
    read -r w u sy < "$WORK/time.txt"
    c=$(awk -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f", u + s }')
    echo "kvtrace replay: $w s wall, $c s CPU"
    KVT_S=$(best "$KVT_S" "$w")
    KVT_CPU=$(best "$KVT_CPU" "$c")

    echo "== peer_numpy.py (OPENBLAS_NUM_THREADS=$THREADS) (run $rep/$REPS)"
    set +e
    { time OPENBLAS_NUM_THREADS=$THREADS "$PYTHON" bench/peer_numpy.py "$CUT" \
        --policies "$POLICIES" --budgets "$BUDGETS" --probes "$PROBES" \
        --compare "$WORK/kvtrace_results.json" -o "$WORK/peer.json" \
        > "$WORK/peer.md" 2> "$WORK/peer.log"; } 2> "$WORK/time.txt"
    PEER_RC=$?
    set -e
    read -r w u sy < "$WORK/time.txt"
    c=$(awk -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f", u + s }')
    cat "$WORK/peer.log"
    grep -E '^peer_total_s' "$WORK/peer.md"
    echo "peer: $w s wall (process), $c s CPU"
    s=$(sed -n 's/^peer_total_s \([0-9.]*\).*/\1/p' "$WORK/peer.md")
    PEER_S=$(best "$PEER_S" "$s")
    PEER_CPU=$(best "$PEER_CPU" "$c")
done
grep -E '^agreement' "$WORK/peer.md"

# ---- how time grows with T (fixed budgets), 2 layers, every policy --------------------------
if [ "${SCALING_T:-2048 4096 8192 16384}" != 0 ]; then
    echo "== bench_replay --layers 2 --threads $THREADS at T = ${SCALING_T:-2048 4096 8192 16384}"
    for t in ${SCALING_T:-2048 4096 8192 16384}; do
        "$BUILD/bench/bench_replay" --layers 2 --tokens "$t" --threads "$THREADS" \
            --keep "$WORK/scaling_T$t.kvt" | tail -n 1
        rm -f "$WORK/scaling_T$t.kvt"
    done | tee "$WORK/scaling_T.md"
fi

# ---- summary -------------------------------------------------------------------------------
{
    echo "trace: $CUT (T=$T, $LAYERS layers, colsum $COLSUM); policies $POLICIES;" \
         "budgets $BUDGETS; probes $PROBES; threads $THREADS"
    echo "kvtrace_s $KVT_S (best of $REPS; CPU $KVT_CPU s)"
    echo "peer_s $PEER_S (best of $REPS, sweep only; CPU $PEER_CPU s, whole process)"
    echo "floor_s $FLOOR (= floor_cpu_s $FLOORCPU / $THREADS; wall-clock floor with 1 thread:" \
         "$FLOOR1, with $THREADS threads: $FLOORN)"
    awk -v k="$KVT_S" -v p="$PEER_S" -v f="$FLOOR" 'BEGIN {
        printf "kvtrace/peer %.2f\nkvtrace/floor %.1f\npeer/floor %.1f\n", k / p, k / f, p / f }'
    awk -v k="$KVT_CPU" -v p="$PEER_CPU" -v f="$FLOORCPU" 'BEGIN {
        printf "CPU-s: kvtrace/peer %.2f, kvtrace/floor %.1f, peer/floor %.1f\n", k / p, k / f,
               p / f }'
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    [ "$PEER_RC" = 0 ] && echo "agreement: ok (snapkv, streamingllm within tolerance)" \
                       || echo "agreement: FAILED (see $WORK/peer.md)"
} | tee "$WORK/summary.txt"
exit "$PEER_RC"
