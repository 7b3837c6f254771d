#!/bin/bash
# test_export_chunks.sh - the replay hands a layer's kept sets to the selection export in
# calls of about KVT_SELECTION_CHUNK indices (tests: KVT_TEST_EXPORT_CHUNK), so a layer with
# many decode-time caches is never held whole. Whatever the calls, the export is the same
# bytes: every kind of record (fixed sets, per-step heads, decode-time caches, h2o-greedy's
# decode=1, merged sets with their values, think=, query heads) in both layouts, with one
# index a call, 37 and the default, on 1 and 2 threads; the results the same; the parts of
# --shard 2 (one index a call) merge to the same export. kvtrace e2e-llama2c's export (its
# masks read the same calls) is the same with one index a call.
set -u
BIN=${KVT_BIN:?}
SRC=${KVT_SOURCE_ROOT:?}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }

TR=$TMP/t.kvt
"$BIN" synth --shape tiny --tokens 96 --layers 2 --decode 24 --q-all --seed 3 -o "$TR" \
    >/dev/null 2>&1 || fail "synth"
POL="snapkv,quest,tova:decoding=1,prefill=1,knorm:decoding=2,h2o-greedy:decode=1,window=8"
POL="$POL,lookm,snapkv:merge=pivot,snapkv:think=0.4,think_window=8,adakv:heads=query,rkv:window=4"
SET=(--policies "$POL" --budgets 8,16,50% --seed 5)

run() { # NAME CHUNK THREADS [ARGS...]: results NAME.json, exports NAME.sel and NAME.sel.json
    local name=$1 chunk=$2 threads=$3
    shift 3
    for ext in sel sel.json; do
        KVT_TEST_EXPORT_CHUNK=$chunk "$BIN" replay "$TR" "${SET[@]}" --threads "$threads" "$@" \
            --force -o "$TMP/$name.json" --export-selection "$TMP/$name.$ext" >/dev/null \
            2>"$TMP/$name.err" || { cat "$TMP/$name.err"; fail "replay $name ($ext)"; }
    done
}
run whole 0 1
[ -s "$TMP/whole.sel" ] && [ -s "$TMP/whole.sel.json" ] || fail "no export"
for c in "1 1" "1 2" "37 2" "0 2"; do
    set -- $c
    run "c$1_t$2" "$1" "$2"
    for ext in sel sel.json; do
        cmp -s "$TMP/whole.$ext" "$TMP/c$1_t$2.$ext" ||
            fail "$ext with $1 index(es) a call on $2 thread(s) differs"
    done
    # the results (which record the thread count)
    cmp -s <(grep -v '"threads":' "$TMP/whole.json") <(grep -v '"threads":' "$TMP/c$1_t$2.json") ||
        fail "results.json with $1 index(es) a call on $2 thread(s) differs"
    echo "ok: $1 index(es) a call (0: the default), $2 thread(s): the same bytes"
done
# kvtrace info reads the export; every kind of record is there: step and budget delta
# records, merged and query-head sets
"$BIN" info "$TMP/whole.sel" --json >"$TMP/info.json" 2>&1 || fail "info: $(cat "$TMP/info.json")"
if [ -x /usr/bin/python3 ]; then
    /usr/bin/python3 - "$TMP/whole.sel" <<'EOF' || fail "the export lacks a kind of record"
import sys
raw = open(sys.argv[1], "rb").read()
off = 16 + int.from_bytes(raw[12:16], "little")
flags = 0
seen = set()
while off < len(raw) - 16:
    f = int.from_bytes(raw[off + 10:off + 12], "little")
    seen.add(f & 0x1E)
    flags |= f
    n = int.from_bytes(raw[off + 28:off + 32], "little")
    off += 36 + 4 * n
assert off == len(raw) - 16
for bit in (1, 2, 4, 8, 16):
    assert flags & bit, "no record with flag %d" % bit
print("ok: records with flags", sorted(seen))
EOF
fi

# the parts of --shard 2, one index a call, merge to the whole export
for i in 0 1; do
    KVT_TEST_EXPORT_CHUNK=1 "$BIN" replay "$TR" "${SET[@]}" --threads 2 --shard $i/2 \
        -o "$TMP/p$i.json" --export-selection "$TMP/p$i.sel" >/dev/null 2>"$TMP/p.err" ||
        { cat "$TMP/p.err"; fail "shard $i"; }
done
"$BIN" merge "$TMP/p1.sel" "$TMP/p0.sel" -o "$TMP/merged.sel" 2>"$TMP/m.err" ||
    fail "merge: $(cat "$TMP/m.err")"
cmp -s "$TMP/whole.sel" "$TMP/merged.sel" || fail "merged parts differ from the whole export"
echo "ok: --shard 2 parts (one index a call) merge to the same export"

# kvtrace e2e-llama2c: its masks are built from the same calls; the export it writes and its
# results are the same with one index a call
MODEL=$SRC/models/stories260K.bin
SAMPLE=$SRC/traces/samples/stories260K.kvt
if [ -f "$MODEL" ] && [ -f "$SAMPLE" ] && "$BIN" e2e-llama2c --help >/dev/null 2>&1; then
    E2E=(e2e-llama2c "$SAMPLE" --model "$MODEL" --budgets 16,64
         --policies "snapkv,tova:decoding=1,prefill=1,lookm,quest")
    for c in 0 1; do
        KVT_TEST_EXPORT_CHUNK=$c "$BIN" "${E2E[@]}" -o "$TMP/e$c.json" \
            --export-selection "$TMP/e$c.sel" >/dev/null 2>"$TMP/e.err" ||
            { cat "$TMP/e.err"; fail "e2e-llama2c (chunk $c)"; }
    done
    cmp -s "$TMP/e0.sel" "$TMP/e1.sel" || fail "e2e-llama2c's export differs with one index a call"
    cmp -s "$TMP/e0.json" "$TMP/e1.json" || fail "e2e-llama2c's results differ with one index a call"
    echo "ok: e2e-llama2c: the same export and results with one index a call"
else
    echo "note: no e2e-llama2c, model or sample trace; e2e-llama2c not checked"
fi
echo "test_export_chunks: ok"
