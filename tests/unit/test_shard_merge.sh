#!/bin/bash
# test_shard_merge.sh - scale-out (issue #8): `kvtrace replay --shard i/4` on two traces, then
# `kvtrace merge` of the four parts (in shuffled order) must give exactly the unsharded
# results.json: the files are compared byte for byte (numbers are written to read back
# bit-exact, and every aggregate is recomputed from the per-head data). Also: merge refuses
# missing, duplicated, complete or mismatched parts with a clear message.
. "$(dirname "$0")/two_traces_env.sh" # BIN, MODEL, SAMPLE, TMP, fail, TR (sample + b.kvt)
SET=(--policies full,random,snapkv,pyramidkv,adakv,mixkv-snapkv,oracle
     --budgets 16,40,25% --threads 2 --seed 7)
$BIN replay "${TR[@]}" "${SET[@]}" -o "$TMP/full.json" >/dev/null 2>"$TMP/err" \
    || { cat "$TMP/err"; fail "unsharded replay"; }
for i in 0 1 2 3; do
    $BIN replay "${TR[@]}" "${SET[@]}" --shard $i/4 -o "$TMP/part$i.json" >"$TMP/out" \
        2>"$TMP/err" || { cat "$TMP/err"; fail "replay --shard $i/4"; }
    grep -q "shard $i/4" "$TMP/err" || fail "shard $i message"
    grep -q '"shard"' "$TMP/part$i.json" || fail "part $i lacks the shard object"
done
grep -q '"shard"' "$TMP/full.json" && fail "unsharded result has a shard object"
$BIN merge "$TMP/part2.json" "$TMP/part0.json" "$TMP/part3.json" "$TMP/part1.json" \
    -o "$TMP/merged.json" 2>"$TMP/err" || { cat "$TMP/err"; fail "merge"; }
cmp "$TMP/full.json" "$TMP/merged.json" || fail "merged != unsharded (byte comparison)"
# also as JSON documents, when a Python is at hand (same check, independent of formatting)
PY=${KVT_PYTHON:-}
if [ -n "$PY" ] && [ -x "$PY" ]; then
    "$PY" -c 'import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:]); sys.exit(a!=b)' \
        "$TMP/full.json" "$TMP/merged.json" || fail "merged != unsharded (JSON documents)"
fi
# one shard per unit and more shards than units: still exact
n=12
for i in $(seq 0 $((n - 1))); do
    $BIN replay "${TR[@]}" "${SET[@]}" --shard $i/$n -o "$TMP/s$i.json" >/dev/null 2>&1 \
        || fail "replay --shard $i/$n"
done
$BIN merge "$TMP"/s*.json -o "$TMP/merged12.json" 2>/dev/null || fail "merge of $n"
cmp "$TMP/full.json" "$TMP/merged12.json" || fail "12-way merge != unsharded"
# a text-and-image trace: its metrics and head redundancy by modality merge exactly too
$BIN synth --shape tiny-vl --tokens 64 --layers 2 -o "$TMP/vl.kvt" >/dev/null 2>&1 ||
    fail "synth tiny-vl"
VSET=(--policies snapkv,mixkv-snapkv,lightkv-like --budgets 24,40 --threads 2)
$BIN replay "$TMP/vl.kvt" "${VSET[@]}" -o "$TMP/vfull.json" >/dev/null 2>&1 || fail "vl replay"
grep -q '"r_all_by_modality":[[:space:]]*{' "$TMP/vfull.json" || fail "no r_all_by_modality"
PY=${KVT_PYTHON:-}
if [ -n "$PY" ] && [ -x "$PY" ]; then
    "$PY" -c 'import json,sys; t=json.load(open(sys.argv[1]))["traces"][0]
r=t["r_all_by_modality"]
k=[x for run in t["runs"] for row in run["by_modality"]["r_kept"]["image"] for x in row]
sys.exit(not (all(x is not None for m in ("text", "image") for row in r[m] for x in row) and
              any(x is not None for x in k)))' "$TMP/vfull.json" || fail "vl: r by modality missing"
fi
for i in 0 1; do
    $BIN replay "$TMP/vl.kvt" "${VSET[@]}" --shard $i/2 -o "$TMP/v$i.json" >/dev/null 2>&1 ||
        fail "vl replay --shard $i/2"
done
$BIN merge "$TMP/v1.json" "$TMP/v0.json" -o "$TMP/vmerged.json" 2>/dev/null || fail "vl merge"
cmp "$TMP/vfull.json" "$TMP/vmerged.json" || fail "vl: merged != unsharded"
# refusals, one clear line each, and no output written
P=("$TMP/part0.json" "$TMP/part1.json" "$TMP/part2.json")
$BIN merge "${P[@]}" -o "$TMP/x.json" 2>"$TMP/err" && fail "merged 3 of 4 parts"
grep -q "every shard 0..3 is needed" "$TMP/err" || fail "missing shard message"
$BIN merge "${P[@]}" "$TMP/part0.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "duplicate"
grep -q "shard 0/4 given twice" "$TMP/err" || fail "duplicate message"
$BIN merge "${P[@]}" "$TMP/full.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "complete part"
grep -q "is not a partial result" "$TMP/err" || fail "complete part message"
$BIN replay "${TR[@]}" --policies full,random,snapkv,pyramidkv,adakv,mixkv-snapkv,oracle \
    --budgets 16,48,25% --threads 2 --seed 7 --shard 3/4 -o "$TMP/b3.json" 2>/dev/null \
    || fail "replay other budgets"
$BIN merge "${P[@]}" "$TMP/b3.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "other budgets"
grep -q "different budgets (budget 1: 40 vs 48)" "$TMP/err" || fail "budget message"
$BIN replay "$SAMPLE" "${SET[@]}" --shard 3/4 -o "$TMP/t3.json" 2>/dev/null || fail "replay 1 trace"
$BIN merge "${P[@]}" "$TMP/t3.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "other traces"
grep -q "different number of traces" "$TMP/err" || fail "trace set message"
$BIN replay "${TR[@]}" "${SET[@]}" --shard 1/2 -o "$TMP/h1.json" 2>/dev/null || fail "1/2"
$BIN merge "$TMP/part0.json" "$TMP/h1.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "counts"
grep -q "different shard counts" "$TMP/err" || fail "shard count message"
# a part that lost a unit, and a part that repeats another's (edited by Python, if present)
if [ -n "$PY" ] && [ -x "$PY" ]; then
    "$PY" - "$TMP" <<'PYEOF' || fail "editing parts"
import json, sys
d = sys.argv[1]
p3 = json.load(open(d + "/part3.json"))
p1 = json.load(open(d + "/part1.json"))
lost = dict(p3, shard=dict(p3["shard"], units=p3["shard"]["units"][1:]))
json.dump(lost, open(d + "/lost3.json", "w"))
dup = dict(p3, shard=dict(p3["shard"], units=p3["shard"]["units"] + [p1["shard"]["units"][0]]))
json.dump(dup, open(d + "/dup3.json", "w"))
half = dict(p3, shard=dict(p3["shard"], units=[[0, 1.5]] + p3["shard"]["units"][1:]))
json.dump(half, open(d + "/half3.json", "w"))
PYEOF
    $BIN merge "${P[@]}" "$TMP/lost3.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "lost unit"
    grep -q "is in no part" "$TMP/err" || fail "lost unit message"
    $BIN merge "${P[@]}" "$TMP/dup3.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "dup unit"
    grep -q "is in both" "$TMP/err" || fail "dup unit message"
    $BIN merge "${P[@]}" "$TMP/half3.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "unit 1.5"
    grep -q "shard.units\[0\] is not \[trace, layer\]" "$TMP/err" || fail "unit 1.5 message"
fi
# parts replayed on two different files that share a name and a header (prompts from id files,
# each replayed from its own directory): the fingerprint tells them apart
mkdir "$TMP/A" "$TMP/B"
seq 1 40 | tr '\n' ' ' >"$TMP/A/ids" && seq 41 80 | tr '\n' ' ' >"$TMP/B/ids"
for d in A B; do
    (cd "$TMP/$d" && $BIN capture-llama2c --model "$MODEL" --prompt-ids ids --decode 4 \
        --window 8 -o p.kvt >/dev/null 2>&1) || fail "capture in $d"
done
(cd "$TMP/A" && $BIN replay p.kvt --policies snapkv:window=8 --budgets 16 --threads 1 \
    --shard 0/2 -o ../pa0.json --export-selection ../pa0.sel >/dev/null 2>&1) || fail "replay A"
(cd "$TMP/B" && $BIN replay p.kvt --policies snapkv:window=8 --budgets 16 --threads 1 \
    --shard 1/2 -o ../pb1.json --export-selection ../pb1.sel >/dev/null 2>&1) || fail "replay B"
$BIN merge "$TMP/pa0.sel" "$TMP/pb1.sel" -o "$TMP/x.sel" 2>"$TMP/err" && fail "exports of other files"
grep -q "different settings (seed, policy options, shard count or trace contents)" "$TMP/err" ||
    { cat "$TMP/err"; fail "export fingerprint message"; }
(cd "$TMP/A" && $BIN replay p.kvt --policies snapkv:window=8 --budgets 16 --threads 1 --seed 3 \
    --shard 1/2 -o ../pa1.json --export-selection ../pa1.sel >/dev/null 2>&1) || fail "replay A1"
$BIN merge "$TMP/pa0.sel" "$TMP/pa1.sel" -o "$TMP/x.sel" 2>"$TMP/err" && fail "exports of other seeds"
grep -q "different settings" "$TMP/err" || { cat "$TMP/err"; fail "export seed message"; }
[ -e "$TMP/x.sel" ] && fail "a refused export merge wrote its output"
$BIN merge "$TMP/pa0.json" "$TMP/pb1.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "other files"
grep -q "were run on different files named p.kvt" "$TMP/err" || { cat "$TMP/err"; fail "fingerprint message"; }
grep -q '"fingerprint":[[:space:]]*"[0-9a-f]\{16\}"' "$TMP/full.json" || fail "no fingerprint in results.json"
# two files of one name and different headers: the message says how they differ (it printed
# the same name twice: "(trace 0: q.kvt vs q.kvt)")
$BIN synth --shape tiny --tokens 64 -o "$TMP/A/q.kvt" >/dev/null 2>&1 || fail "synth qa"
$BIN synth --shape tiny --tokens 80 -o "$TMP/B/q.kvt" >/dev/null 2>&1 || fail "synth qb"
(cd "$TMP/A" && $BIN replay q.kvt --policies snapkv --budgets 16 --shard 0/2 -o ../qa.json \
    >/dev/null 2>&1) || fail "replay qa"
(cd "$TMP/B" && $BIN replay q.kvt --policies snapkv --budgets 16 --shard 1/2 -o ../qb.json \
    >/dev/null 2>&1) || fail "replay qb"
$BIN merge "$TMP/qa.json" "$TMP/qb.json" -o "$TMP/x.json" 2>"$TMP/err" && fail "other headers"
grep -q "were run on different files named q.kvt (trace 0: L=2 Hq=4 Hkv=2 T=64 vs L=2 Hq=4 Hkv=2 T=80)" \
    "$TMP/err" || { cat "$TMP/err"; fail "other headers message"; }
[ -e "$TMP/x.json" ] && fail "a refused merge wrote its output"
# bad --shard values
for bad in 4/4 -1/4 1 a/b 0/0; do
    $BIN replay "$SAMPLE" --shard "$bad" -o "$TMP/y.json" 2>"$TMP/err" && fail "--shard $bad"
    grep -q -- "--shard" "$TMP/err" || fail "--shard $bad message"
done
# --export-selection with --shard: each shard exports its layers; merge of the 4 parts (any
# order) is the unsharded export byte for byte, binary and JSON (with quest's per-step and
# lightkv-like's merged sets, and TOVA's decode-time cache: delta records in the binary)
SEL=(--policies snapkv,adakv,quest,lightkv-like --policy tova:decoding=1,prefill=1
     --budgets 16,40 --threads 2)
$BIN replay "${TR[@]}" "${SEL[@]}" -o "$TMP/sf.json" --export-selection "$TMP/sf.bin" \
    >/dev/null 2>&1 || fail "unsharded replay with an export"
$BIN replay "${TR[@]}" "${SEL[@]}" -o "$TMP/sfj.json" --export-selection "$TMP/sf.sel.json" \
    >/dev/null 2>&1 || fail "unsharded replay with a JSON export"
for i in 0 1 2 3; do
    $BIN replay "${TR[@]}" "${SEL[@]}" --shard $i/4 -o "$TMP/sp$i.json" \
        --export-selection "$TMP/sp$i.bin" >/dev/null 2>&1 || fail "shard $i with an export"
    $BIN replay "${TR[@]}" "${SEL[@]}" --shard $i/4 -o "$TMP/spj$i.json" \
        --export-selection "$TMP/sp$i.sel.json" >/dev/null 2>&1 || fail "shard $i, JSON export"
done
$BIN merge "$TMP/sp3.bin" "$TMP/sp1.bin" "$TMP/sp0.bin" "$TMP/sp2.bin" -o "$TMP/sm.bin" \
    2>"$TMP/err" || { cat "$TMP/err"; fail "merge of export parts"; }
cmp "$TMP/sf.bin" "$TMP/sm.bin" || fail "merged export != unsharded export"
$BIN merge "$TMP"/sp?.sel.json -o "$TMP/sm.sel.json" 2>"$TMP/err" || fail "merge of JSON parts"
cmp "$TMP/sf.sel.json" "$TMP/sm.sel.json" || fail "merged JSON export != unsharded"
$BIN merge "$TMP/sp0.bin" "$TMP/sp1.bin" "$TMP/sp2.bin" -o "$TMP/z.bin" 2>"$TMP/err" &&
    fail "3 of 4 export parts"
grep -q "every shard 0..3 is needed once" "$TMP/err" || fail "missing export part message"
$BIN merge "$TMP/sp0.bin" "$TMP/sp1.bin" "$TMP/sp2.bin" "$TMP/sf.bin" -o "$TMP/z.bin" \
    2>"$TMP/err" && fail "a whole export as a part"
grep -q "is a whole selection export" "$TMP/err" || fail "whole export message"
$BIN replay "${TR[@]}" --policies snapkv,adakv,quest,lightkv-like \
    --policy tova:decoding=1,prefill=1 --budgets 16,48 --threads 2 --shard 3/4 -o "$TMP/sq.json" --export-selection "$TMP/sq.bin" >/dev/null 2>&1 || fail "sq"
$BIN merge "$TMP/sp0.bin" "$TMP/sp1.bin" "$TMP/sp2.bin" "$TMP/sq.bin" -o "$TMP/z.bin" \
    2>"$TMP/err" && fail "export parts of other budgets"
grep -q "different budgets (budget 1: 40 vs 48)" "$TMP/err" || fail "export budgets message"
[ -e "$TMP/z.bin" ] && fail "a refused export merge wrote its output"
# a part whose records of one layer are split in two runs (its first record moved last) is
# refused only after every trace was merged: the output must still be left as it was (before:
# the error was printed and the bad export renamed over it)
awk '/^\{"trace"/ { sub(/,$/, ""); r[n++] = $0; next }
     n == 0 { print; next }
     END { for (i = 1; i < n; i++) print r[i] ","; print r[0] "]}" }' \
    "$TMP/sp0.sel.json" >"$TMP/sp0.split.sel.json"
grep -c '^{"trace"' "$TMP/sp0.split.sel.json" | grep -qx "$(grep -c '^{"trace"' "$TMP/sp0.sel.json")" ||
    fail "the reordered part lost records"
echo keep >"$TMP/zz.sel.json"
$BIN merge "$TMP/sp0.split.sel.json" "$TMP"/sp[123].sel.json -o "$TMP/zz.sel.json" --force \
    2>"$TMP/err" && fail "a part with a layer's records out of order"
grep -q "shard 0/4 holds records out of (trace, layer) order" "$TMP/err" ||
    { cat "$TMP/err"; fail "out of order message"; }
[ "$(cat "$TMP/zz.sel.json")" = keep ] || fail "a refused export merge replaced the output"
$BIN merge --help | grep -q "replay --shard" || fail "merge --help"
# no -o is a usage error (exit 2); a report of one part is refused (its summaries cover one
# shard's layers), as recommend refuses it
$BIN merge "$TMP/part0.json" "$TMP/part1.json" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q "no output file" "$TMP/err" || fail "merge without -o: $(cat "$TMP/err")"
$BIN report "$TMP/part0.json" -o "$TMP/rep0" 2>"$TMP/err" && fail "report of a part"
grep -q "error: $TMP/part0.json: a partial result of replay --shard 0/4" "$TMP/err" ||
    fail "report of a part message (names the input, not -o): $(cat "$TMP/err")"
[ -e "$TMP/rep0/index.html" ] && fail "report of a part wrote a page"
[ -n "$PY" ] && [ -x "$PY" ] && echo "(JSON comparison and unit checks ran with $PY)"
echo "OK: 4-way and 12-way shard + merge equal the unsharded results.json (and export)"
