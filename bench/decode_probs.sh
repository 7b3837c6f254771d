#!/usr/bin/env bash
# decode_probs.sh - replay --decode-probs all against group on one synthetic trace with many
# decode steps: each replay's wall time, peak resident memory, the planner's estimate per
# worker, and (group) the KV groups' decode probabilities computed again and their time, all
# from one run of this script, with the ratios group / all. The two results.json must be the
# same bytes (the script fails otherwise), so the figures in bench/RESULTS.md can be measured
# again on any machine.
#
# usage: bench/decode_probs.sh      (from the repository root; builds nothing)
# environment (defaults in brackets):
#   BUILD [build]  the build folder holding bin/kvtrace (KVT: the CLI itself, else that one)
#   WORK [/tmp/kvt_decode_probs]  the trace and the results
#   SHAPE [llama3-8b]  T [2048]  G [4096]  LAYERS [1]  the synthetic trace (Q_all when a
#             policy needs it: h2o-greedy)
#   POLICIES [snapkv,oracle,knorm:decoding=8,tova:decoding=1,prefill=1]
#   BUDGETS [64,256,10%]  THREADS [1]
#   DEVICE [cpu]  replay --device: with cuda the GPU holds every decode row and group copies one
#             KV group's to the host for a host reader (the group line then counts the copies)
# Prints one line per mode ("all: ..." and "group: ...") and one "group/all:" line of ratios;
# writes $WORK/summary.txt. Exit 0, or 1 when a replay fails or the results differ.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
WORK=${WORK:-/tmp/kvt_decode_probs}
SHAPE=${SHAPE:-llama3-8b}
T=${T:-2048}
G=${G:-4096}
LAYERS=${LAYERS:-1}
POLICIES=${POLICIES:-snapkv,oracle,knorm:decoding=8,tova:decoding=1,prefill=1}
BUDGETS=${BUDGETS:-64,256,10%}
THREADS=${THREADS:-1}
DEVICE=${DEVICE:-cpu}
KVT=${KVT:-$BUILD/bin/kvtrace}
[ -x "$KVT" ] || { echo "decode_probs: $KVT is missing; build first" >&2; exit 1; }
mkdir -p "$WORK"

extra=() qtag=""
case "$POLICIES" in *h2o-greedy*) extra=(--q-all) qtag=_qall ;; esac
TRACE=$WORK/${SHAPE}_T${T}_G${G}_L${LAYERS}$qtag.kvt
if [ ! -s "$TRACE" ]; then
    "$KVT" synth --shape "$SHAPE" --tokens "$T" --layers "$LAYERS" --decode "$G" --seed 1 \
        "${extra[@]}" --force -o "$TRACE" >/dev/null
fi

run() { # MODE: "WALL_S PEAK_MIB ESTIMATE_MIB AGAIN AGAIN_S COPIED COPIED_S"
    local mode=$1
    "$KVT" replay "$TRACE" --policies "$POLICIES" --budgets "$BUDGETS" --threads "$THREADS" \
        --device "$DEVICE" --decode-probs "$mode" --profile --force -o "$WORK/$mode.json" \
        >/dev/null 2>"$WORK/$mode.err" ||
        { echo "decode_probs: replay --decode-probs $mode failed: $(cat "$WORK/$mode.err")" >&2
          exit 1; }
    awk 'function mib(v, u) { return u ~ /^GiB/ ? v * 1024 : u ~ /^KiB/ ? v / 1024 : v }
         /^profile: wall / { w = $3 }
         /^profile: memory: peak RSS/ {
             p = mib($5, $6)
             for (i = 7; i < NF; i++) if ($i == "estimated") e = mib($(i + 1), $(i + 2)) }
         /^profile: decode probabilities held one KV group at a time in / {
             a = $(NF - 7); s = $(NF - 3) }
         /^profile: decode probabilities held one KV group at a time: .* copied from the GPU/ {
             c = $11; cs = $(NF - 3) }
         END { printf "%s %.1f %.1f %d %s %d %s\n", w, p, e, a, s == "" ? "0" : s, c,
                      cs == "" ? "0" : cs }' \
        "$WORK/$mode.err"
}

{
    echo "decode probabilities: $SHAPE, T=$T, G=$G, $LAYERS layer(s), $POLICIES," \
         "--device $DEVICE, budgets $BUDGETS, $THREADS thread(s); $(date -u '+%Y-%m-%d %H:%M UTC')," \
         "$(nproc) cores, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    read -r wa pa ea _ _ _ _ <<<"$(run all)"
    read -r wg pg eg ag sg cg csg <<<"$(run group)"
    cmp -s "$WORK/all.json" "$WORK/group.json" ||
        { echo "decode_probs: the results differ between all and group" >&2; exit 1; }
    printf 'all:   %8.2f s, peak RSS %8.1f MiB, estimated %8.1f MiB a worker\n' "$wa" "$pa" "$ea"
    printf 'group: %8.2f s, peak RSS %8.1f MiB, estimated %8.1f MiB a worker; %d groups computed again in %.2f s%s\n' \
        "$wg" "$pg" "$eg" "$ag" "$sg" \
        "$([ "$DEVICE" = cpu ] || printf '; %d copied from the GPU in %.2f s' "$cg" "$csg")"
    awk -v wa="$wa" -v wg="$wg" -v pa="$pa" -v pg="$pg" \
        'BEGIN { printf "group/all: time x%.2f, peak memory x%.2f; the same results\n",
                 wg / wa, pg / pa }'
} | tee "$WORK/summary.txt"
