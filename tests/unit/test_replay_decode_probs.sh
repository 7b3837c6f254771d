#!/bin/bash
# test_replay_decode_probs.sh - replay --decode-probs group: a worker holds the decode queries'
# probabilities over the prompt one KV group at a time and computes a group's again whenever a
# reader asks for another. Checks:
#   1. results.json, stdout and the selection export are the bytes --decode-probs all writes,
#      with every reader of those probabilities in the set: the oracle (per KV and per query
#      head), h2o-greedy:decode=1, the recall/error sweeps (shared rankings, per-budget sets,
#      per-step sets, merged sets) and the decode-time caches' metrics (decoding=, rkv); on a
#      GQA shape, an MHA-like tiny one and one with image tokens; with the fast kernels and
#      with KVT_KERNELS=ref;
#   2. --profile counts the layers held by group and the groups computed again (none with
#      all);
#   3. auto (the default) holds them whole when the threads fit, and by group when a worker
#      holding them whole passes --memory-limit, with a note, and the same results;
#   4. usage errors: one line, exit 2, no output;
#   5. bench/decode_probs.sh on a small trace;
#   6. the decode-time caches' metrics are computed for every cache of a granularity at once
#      (each step's full output and decode-key probabilities shared): each cache alone gets
#      the same numbers, bit for bit, as in the set.
# With the argument `cuda` (KVT_BIN: a build with CUDA, kvtrace_cuemu in CI) only this instead:
#   7. replay --device cuda, where the device holds every decode row and group has the host
#      copy one KV group's rows from it when a host reader needs them: the bytes of all, on
#      two traces, and the copies counted by --profile (nothing computed again).
set -u
MODE=${1:-cpu}
BIN=${KVT_BIN:?}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }

"$BIN" synth --shape llama3-8b --tokens 384 --decode 40 --layers 1 --q-all --threads 2 \
    -o "$TMP/l3.kvt" >/dev/null 2>&1 || fail "synth llama3-8b"
"$BIN" synth --shape tiny --tokens 200 --decode 24 --q-all --threads 2 -o "$TMP/tiny.kvt" \
    >/dev/null 2>&1 || fail "synth tiny"
"$BIN" synth --shape tiny-vl --tokens 256 --decode 30 --q-all --threads 2 -o "$TMP/vl.kvt" \
    >/dev/null 2>&1 || fail "synth tiny-vl"

POL="full,snapkv,adakv,pyramidkv,streamingllm,oracle,oracle:heads=query"
POL+=",h2o-greedy:decode=1,window=8,h2o-greedy:decode=1,heads=query,h2o-greedy"
POL+=",knorm:decoding=2,tova:decoding=1,prefill=1,keydiff:decoding=1,prefill=1,heads=query"
POL+=",rkv:interval=3,rkv:interval=2,heads=query,expected-attention:decoding=3,sinks=2,prefill=1"
POL+=",quest,snapkv:merge=weighted,lookm,cam,snapkv:think=0.4,think_window=8"

if [ "$MODE" = cuda ]; then # 7. the GPU's decode rows, one group at a time on the host
    for t in tiny vl; do
        for mode in all group; do
            "$BIN" replay "$TMP/$t.kvt" --device cuda --policies "$POL" --budgets 12,32,50% \
                --threads 2 --decode-probs $mode --profile --force -o "$TMP/$t.$mode.json" \
                --export-selection "$TMP/$t.$mode.sel" >"$TMP/$t.$mode.out" \
                2>"$TMP/$t.$mode.err" && continue
            grep -q "no usable CUDA device\|built without CUDA" "$TMP/$t.$mode.err" &&
                { echo "SKIP: $(cat "$TMP/$t.$mode.err")"; exit 77; }
            cat "$TMP/$t.$mode.err"
            fail "cuda $t $mode"
        done
        for f in json sel out; do
            cmp "$TMP/$t.all.$f" "$TMP/$t.group.$f" || fail "cuda $t: group changed the .$f"
        done
        grep -q "^profile: decode probabilities held one KV group at a time in 2 layers: 0 groups computed again" \
            "$TMP/$t.group.err" || { grep "decode prob" "$TMP/$t.group.err"; fail "cuda $t: layers"; }
        line=$(grep "^profile: decode probabilities held one KV group at a time: [0-9]* groups copied from the GPU for host readers" \
            "$TMP/$t.group.err") || fail "cuda $t: no copies line"
        set -- $line
        [ "${11}" -ge 8 ] || fail "cuda $t: $line" # 2 layers x 2 groups x two readers at least
        grep -q "copied from the GPU" "$TMP/$t.all.err" && fail "cuda $t: copies with all"
        echo "ok: cuda $t: --decode-probs group the bytes of all; ${11} groups copied"
    done
    # bench/decode_probs.sh with the GPU: the group line counts the copies
    KVT="$BIN" DEVICE=cuda WORK="$TMP/bench" T=256 G=24 POLICIES=oracle,knorm:decoding=2 \
        bash "${KVT_SOURCE_ROOT:-$(dirname "$0")/../..}/bench/decode_probs.sh" \
        >"$TMP/bench.out" 2>&1 || { cat "$TMP/bench.out"; fail "bench/decode_probs.sh cuda"; }
    grep -Eq '^group: .* a worker; 0 groups computed again in [0-9.]+ s; [1-9][0-9]* copied from the GPU in [0-9.]+ s$' \
        "$TMP/bench.out" || { cat "$TMP/bench.out"; fail "bench/decode_probs.sh cuda output"; }
    echo "ok: bench/decode_probs.sh with the GPU"
    exit 0
fi

# 1. the same bytes either way
n=0
for kernels in fast ref; do
    for t in l3 tiny vl; do
        for mode in all group; do
            env $([ $kernels = ref ] && echo KVT_KERNELS=ref) "$BIN" replay "$TMP/$t.kvt" \
                --policies "$POL" --budgets 12,32,50% --threads 2 --decode-probs $mode \
                --profile --force -o "$TMP/$t.$mode.json" --export-selection "$TMP/$t.$mode.sel" \
                >"$TMP/$t.$mode.out" 2>"$TMP/$t.$mode.err" ||
                { cat "$TMP/$t.$mode.err"; fail "$kernels $t --decode-probs $mode"; }
        done
        for f in json sel out; do
            cmp "$TMP/$t.all.$f" "$TMP/$t.group.$f" ||
                fail "$kernels $t: --decode-probs group changed the .$f"
        done
        # 2. the profile: every layer by group, each group computed again at least once per
        #    reader after the first (tiny has 2 KV heads, llama3-8b 8)
        layers=$(sed -n 's/^profile: wall [0-9.]* s, \([0-9]*\) layers.*/\1/p' "$TMP/$t.group.err")
        line=$(grep '^profile: decode probabilities held one KV group at a time' \
            "$TMP/$t.group.err") || fail "$t: no profile line with group"
        set -- $line
        [ "${12}" = "$layers" ] && [ "${14}" -ge $((layers * 4)) ] ||
            fail "$t: layers $layers: $line"
        grep -q 'one KV group' "$TMP/$t.all.err" && fail "$t: the group line with all"
        n=$((n + 1))
    done
done
echo "ok: --decode-probs group: the same results, export and table on $n replays"

# 6. each decode-time cache alone: its runs' numbers are those of the set above (l3, group,
#    the reference kernels: the last of the loop)
DEC="knorm:decoding=2 tova:decoding=1,prefill=1 keydiff:decoding=1,prefill=1,heads=query"
DEC+=" rkv:interval=3 rkv:interval=2,heads=query expected-attention:decoding=3,sinks=2,prefill=1"
for spec in $DEC; do
    KVT_KERNELS=ref "$BIN" replay "$TMP/l3.kvt" --policies "$spec" --budgets 12,32,50% \
        --threads 2 --force -o "$TMP/alone.json" >/dev/null 2>"$TMP/alone.err" ||
        { cat "$TMP/alone.err"; fail "$spec alone"; }
    "${KVT_PYTHON:-/usr/bin/python3}" - "$TMP/alone.json" "$TMP/l3.group.json" "$spec" <<'PYEOF' ||
import json, sys
alone, both, spec = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
a = [r for r in alone["traces"][0]["runs"] if r["label"] == spec]
b = [r for r in both["traces"][0]["runs"] if r["label"] == spec]
assert a and len(a) == len(b), (spec, len(a), len(b))
for x, y in zip(a, b):
    for k in ("metrics", "per_layer", "summary", "by_modality"):
        assert json.dumps(x[k], sort_keys=True) == json.dumps(y[k], sort_keys=True), (spec, k)
PYEOF
        fail "$spec: its numbers alone differ from those in the set"
done
echo "ok: each decode-time cache alone gets the numbers it gets in the set"

# 3. auto: whole when it fits, by group when one worker holding them whole does not
est() { sed -n 's/^profile: memory: .*= 1 worker thread x \([0-9.]*\) MiB per worker.*/\1/p' "$1"; }
"$BIN" replay "$TMP/l3.kvt" --policies oracle,knorm:decoding=2 --budgets 32 --threads 1 \
    --decode-probs all --profile -o "$TMP/a.json" >/dev/null 2>"$TMP/a.err" || fail "auto base"
"$BIN" replay "$TMP/l3.kvt" --policies oracle,knorm:decoding=2 --budgets 32 --threads 1 \
    --decode-probs group --profile -o "$TMP/g.json" >/dev/null 2>"$TMP/g.err" || fail "group"
ea=$(est "$TMP/a.err") eg=$(est "$TMP/g.err")
[ -n "$ea" ] && [ -n "$eg" ] || fail "no estimates: $(grep memory "$TMP/a.err" "$TMP/g.err")"
awk -v a="$ea" -v g="$eg" 'BEGIN { exit !(g < a) }' ||
    fail "the estimate by group ($eg MiB) is not below the whole one ($ea MiB)"
lim=$(awk -v a="$ea" -v g="$eg" 'BEGIN { printf "%dK", (a + g) / 2 * 1024 }')
"$BIN" replay "$TMP/l3.kvt" --policies oracle,knorm:decoding=2 --budgets 32 --threads 1 \
    --memory-limit "$lim" --profile -o "$TMP/auto.json" >/dev/null 2>"$TMP/auto.err" ||
    { cat "$TMP/auto.err"; fail "auto under $lim"; }
grep -q "^kvtrace replay: each worker holds the decode queries' attention of one KV group at a time (about .* a worker, not .*; --memory-limit is .*): computed again for each policy that reads it, slower, the same results (--decode-probs all to hold it whole)$" \
    "$TMP/auto.err" || { cat "$TMP/auto.err"; fail "no note under $lim"; }
grep -q '^profile: decode probabilities held one KV group at a time in 1 layers' \
    "$TMP/auto.err" || fail "auto under $lim did not hold them by group"
grep -q "warning" "$TMP/auto.err" && fail "a warning although one worker fits by group"
cmp "$TMP/auto.json" "$TMP/a.json" || fail "auto under $lim: other results"
"$BIN" replay "$TMP/l3.kvt" --policies oracle,knorm:decoding=2 --budgets 32 --threads 1 \
    --memory-limit 64G --profile -o "$TMP/roomy.json" >/dev/null 2>"$TMP/roomy.err" ||
    fail "auto 64G"
grep -q 'one KV group' "$TMP/roomy.err" && fail "by group with 64G: $(cat "$TMP/roomy.err")"
cmp "$TMP/roomy.json" "$TMP/a.json" || fail "auto 64G: other results"
echo "ok: auto: whole with 64G, by group under $lim (estimates $ea / $eg MiB), the same results"

# 4. usage errors
for bad in "" none All group1 1; do
    "$BIN" replay "$TMP/tiny.kvt" --policies snapkv --decode-probs "$bad" -o "$TMP/bad.json" \
        >/dev/null 2>"$TMP/bad.err"
    rc=$?
    [ $rc -eq 2 ] && [ "$(wc -l <"$TMP/bad.err")" -eq 1 ] &&
        grep -q -- "--decode-probs" "$TMP/bad.err" ||
        fail "--decode-probs '$bad': exit $rc: $(cat "$TMP/bad.err")"
    [ ! -e "$TMP/bad.json" ] || fail "--decode-probs '$bad' wrote results"
done
echo "ok: --decode-probs usage errors"

# 5. bench/decode_probs.sh on a small trace: its three lines, the same results
ROOT=${KVT_SOURCE_ROOT:-$(dirname "$0")/../..}
KVT="$BIN" WORK="$TMP/bench" T=256 G=24 POLICIES=oracle,knorm:decoding=2 \
    bash "$ROOT/bench/decode_probs.sh" >"$TMP/bench.out" 2>&1 ||
    { cat "$TMP/bench.out"; fail "bench/decode_probs.sh"; }
grep -Eq '^all: +[0-9.]+ s, peak RSS +[0-9.]+ MiB, estimated +[0-9.]+ MiB a worker$' \
    "$TMP/bench.out" &&
    grep -Eq '^group: +[0-9.]+ s, peak RSS +[0-9.]+ MiB, estimated +[0-9.]+ MiB a worker; [1-9][0-9]* groups computed again in [0-9.]+ s$' \
        "$TMP/bench.out" &&
    grep -Eq '^group/all: time x[0-9.]+, peak memory x[0-9.]+; the same results$' \
        "$TMP/bench.out" || { cat "$TMP/bench.out"; fail "bench/decode_probs.sh output"; }
echo "ok: bench/decode_probs.sh"
