#!/bin/bash
# test_replay_memory.sh - the replay plans its worker threads for the memory it has: each worker
# holds about one layer's arrays (kvt_replay_worker_bytes), so on a long prompt "all cores" can
# need more memory than the machine has and the system kills the run. Checks: the estimate
# against the measured peak on three model shapes and the heavy policies, and on the
# decode-time caches of rkv and expected-attention:decoding=, and on a long generation with its
# decode probabilities held whole and by KV group, and with decode-time caches only (no
# token-major copy of the decode probabilities then) (at least the peak less the ~10 MiB
# the process holds besides its worker, at most 1.6x the peak), the default --threads lowered
# to what --memory-limit holds with a note,
# and the same results as --threads 1; the selection export of the long generation raising the
# peak by about its own bytes only; a warning (still exit 0) when --threads N does not
# fit; --memory-limit usage errors. Labelled noasan (ASan's own memory would skew the peaks).
set -u
BIN=${KVT_BIN:?}
PY=${KVT_PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
mib() { awk -v v="$1" -v u="$2" 'BEGIN { m = u == "GiB" ? 1024 : u == "KiB" ? 1 / 1024 : 1;
                                          printf "%.1f", v * m }'; }

# 1. the estimate against the peak RSS of a one-worker replay (1 thread, 2 layers)
check_estimate() { # NAME SHAPE TOKENS POLICIES [DECODE_STEPS DECODE_PROBS]
    local name=$1 shape=$2 T=$3 pols=$4 G=${5:-16} dp=${6:-auto} tr
    tr=$TMP/$shape$([ "$G" = 16 ] || echo "_G$G").kvt
    [ -f "$tr" ] || "$BIN" synth --shape "$shape" --tokens "$T" --layers 2 --decode "$G" \
        --colsum off --threads 2 -o "$tr" >/dev/null 2>&1 || fail "synth $shape"
    "$BIN" replay "$tr" --policies "$pols" --budgets 64,256,10% --threads 1 \
        --decode-probs "$dp" --profile -o "$TMP/$name.json" >/dev/null 2>"$TMP/$name.err" ||
        { cat "$TMP/$name.err"; fail "replay $name"; }
    local line
    line=$(grep '^profile: memory: peak RSS' "$TMP/$name.err") || fail "$name: no memory line"
    # "profile: memory: peak RSS 355.7 MiB; estimated 424.2 MiB = 1 worker thread x 424.2 MiB
    # per worker" (one thread: the total is the worker's)
    set -- $line
    local peak est
    peak=$(mib "$5" "${6%;}")
    est=$(mib "$8" "$9")
    awk -v p="$peak" -v e="$est" 'BEGIN { exit !(p <= e + 24 && e <= 1.6 * p) }' ||
        fail "$name: estimated $est MiB per worker against a peak RSS of $peak MiB"
    echo "ok: $name: estimated $est MiB, peak RSS $peak MiB"
}
check_estimate llama3 llama3-8b 4096 all
check_estimate llama2 llama2-7b 4096 all,quest
check_estimate qwen2vl qwen2-vl-7b 4096 snapkv,lightkv-like,hybridkv-like,quest,adakv:heads=query
check_estimate qwen2vl_snapkv qwen2-vl-7b 4096 snapkv
check_estimate qwen2vl_decode qwen2-vl-7b 4096 rkv:interval=4,expected-attention:decoding=5
# a long generation (twice as many decode steps as prompt tokens), its decode probabilities
# held whole and by KV group
check_estimate llama3_long llama3-8b 768 snapkv,knorm:decoding=8 1536 all
check_estimate llama3_long_group llama3-8b 768 snapkv,knorm:decoding=8 1536 group
# decode-time caches only: no sweep over all decode queries, so no token-major copy of a KV
# group's decode probabilities (made on first use) in the peak or the estimate
check_estimate llama3_long_dec llama3-8b 768 knorm:decoding=8,tova:decoding=1,prefill=1 1536 all
# the same long generation with its selection export: the replay hands the export a layer's
# sets in calls of at most about KVT_SELECTION_CHUNK indices (65536 here), so the peak grows by
# about the export's own encoded bytes, not by every step's sets at once (+24 MiB before, when
# a layer's sets were gathered whole: 8 heads x 1536 steps x 3 budgets)
KVT_TEST_EXPORT_CHUNK=65536 "$BIN" replay "$TMP/llama3-8b_G1536.kvt" \
    --policies snapkv,knorm:decoding=8 --budgets 64,256,10% --threads 1 --decode-probs all \
    --profile -o "$TMP/llama3_long_export.json" --export-selection "$TMP/long.sel" >/dev/null \
    2>"$TMP/llama3_long_export.err" || { cat "$TMP/llama3_long_export.err"; fail "export"; }
peak_of() { set -- $(grep '^profile: memory: peak RSS' "$1"); mib "$5" "${6%;}"; }
p0=$(peak_of "$TMP/llama3_long.err")
p1=$(peak_of "$TMP/llama3_long_export.err")
sel=$(awk -v b="$(stat -c %s "$TMP/long.sel")" 'BEGIN { printf "%.1f", b / 1048576 }')
awk -v a="$p0" -v b="$p1" -v s="$sel" 'BEGIN { exit !(b <= a + s + 6) }' ||
    fail "the export raised the peak RSS from $p0 to $p1 MiB (export $sel MiB)"
echo "ok: export of a long generation: peak RSS $p0 -> $p1 MiB (export $sel MiB)"

# 2. the default --threads lowered to what --memory-limit holds, with a note; the same
#    results as --threads 1 (but for the recorded thread count)
T3=$TMP/llama3-8b.kvt
est=$(sed -n 's/^profile: memory: .*; estimated \([0-9.]*\) MiB = 1 worker thread x .*/\1/p' \
    "$TMP/llama3.err")
[ -n "$est" ] || fail "no estimate in: $(grep memory "$TMP/llama3.err")"
lim=$(awk -v e="$est" 'BEGIN { printf "%dM", e * 1.5 }')
if [ "$(nproc)" -ge 2 ]; then
    "$BIN" replay "$T3" --policies all --budgets 64,256,10% --memory-limit "$lim" \
        -o "$TMP/cap.json" >/dev/null 2>"$TMP/cap.err" || { cat "$TMP/cap.err"; fail "capped"; }
    grep -q "^kvtrace replay: 1 worker thread, not $(nproc): each holds about .* for a layer of these traces and .* is the limit" \
        "$TMP/cap.err" || { cat "$TMP/cap.err"; fail "no note on the lowered threads"; }
    grep -q "warning" "$TMP/cap.err" && fail "a warning although one worker fits: $(cat "$TMP/cap.err")"
    grep -Eq '"threads":[[:space:]]*1,' "$TMP/cap.json" || fail "threads recorded"
    sed 's/"threads":[[:space:]]*[0-9]*/T/' "$TMP/cap.json" >"$TMP/a"
    sed 's/"threads":[[:space:]]*[0-9]*/T/' "$TMP/llama3.json" >"$TMP/b"
    # the same replay as check_estimate's llama3 run (--threads 1) but for --profile
    cmp -s "$TMP/a" "$TMP/b" || fail "results differ from --threads 1"
    echo "ok: --memory-limit $lim: 1 thread, the same results"
fi
# enough memory: no note
"$BIN" replay "$T3" --policies snapkv --budgets 64 --memory-limit 64G -o "$TMP/big.json" \
    >/dev/null 2>"$TMP/big.err" || fail "64G"
grep -q "worker thread" "$TMP/big.err" && fail "a note with 64G: $(cat "$TMP/big.err")"
# --threads 2 that do not fit: a warning naming the sizes, and the replay still runs
"$BIN" replay "$T3" --policies snapkv --budgets 64 --threads 2 --memory-limit "${est%.*}M" \
    -o "$TMP/warn.json" >/dev/null 2>"$TMP/warn.err" || { cat "$TMP/warn.err"; fail "warn run"; }
grep -q "^kvtrace replay: warning: 2 worker threads hold about .* each for a layer of these traces), more than the .* --memory-limit: the system may kill the replay for lack of memory (fewer --threads)$" \
    "$TMP/warn.err" || { cat "$TMP/warn.err"; fail "no warning for --threads 2"; }
[ -s "$TMP/warn.json" ] || fail "no results with the warning"
# one worker that does not fit
"$BIN" replay "$T3" --policies snapkv --budgets 64 --threads 1 --memory-limit 10M \
    -o "$TMP/one.json" >/dev/null 2>"$TMP/one.err" || fail "one run"
grep -q "^kvtrace replay: warning: one worker thread holds about .* more than the 10.0 MiB --memory-limit" \
    "$TMP/one.err" || { cat "$TMP/one.err"; fail "no warning for one worker"; }
# a limit above what the machine has (a made-up machine with 1 MiB available): the threads
# planned for the limit may not fit the machine, a warning; without the limit, a note
mkdir -p "$TMP/root/proc/self"
printf 'MemTotal: 4096 kB\nMemAvailable: 1024 kB\n' >"$TMP/root/proc/meminfo"
: >"$TMP/root/proc/self/cgroup"
KVT_TEST_MEM_ROOT="$TMP/root" "$BIN" replay "$T3" --policies snapkv --budgets 64 --threads 1 \
    --memory-limit 64G -o "$TMP/over.json" >/dev/null 2>"$TMP/over.err" || fail "over run"
grep -q "^kvtrace replay: warning: 1 worker thread holds about .*, within the 64.0 GiB --memory-limit but more than the 1.0 MiB this machine has available: the system may kill the replay for lack of memory$" \
    "$TMP/over.err" || { cat "$TMP/over.err"; fail "no warning for a limit above the machine"; }
[ -s "$TMP/over.json" ] || fail "no results with the warning above the machine"
echo "ok: notes and warnings"

# 3. usage errors: one line, exit 2, no output
for bad in 0 abc 5X -1G 1.5Q "" 1e30T inf 0x1000000 1e9 " 5M" "5M " 1.G .5G 5MM 5BB 5iB 5Mi 0.5; do
    "$BIN" replay "$T3" --policies snapkv --memory-limit "$bad" -o "$TMP/bad.json" \
        >/dev/null 2>"$TMP/bad.err"
    rc=$?
    [ $rc -eq 2 ] && [ "$(wc -l <"$TMP/bad.err")" -eq 1 ] &&
        grep -q -- "--memory-limit" "$TMP/bad.err" || fail "--memory-limit '$bad': exit $rc: $(cat "$TMP/bad.err")"
    [ ! -e "$TMP/bad.json" ] || fail "--memory-limit '$bad' wrote results"
done
for good in 512M 1.5G 2GiB 1T 100000000 4KiB 4k 512m 3MB 40gb 4kib 4KIB 512B 512b 64G; do
    "$BIN" replay "$T3" --policies snapkv --budgets 64 --threads 1 --memory-limit "$good" \
        -o "$TMP/g.json" --force >/dev/null 2>&1 || fail "--memory-limit $good refused"
done
echo "ok: --memory-limit sizes"
