#!/bin/bash
# test_report_html_cli.sh - `kvtrace report` on a real replay of the bundled sample trace:
# exit 0, index.html with every figure inlined and no network reference, one PNG per figure
# (PNG signature); usage errors exit 2, an unreadable results file exits 1.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
SAMPLE=$ROOT/traces/samples/stories260K.kvt
[ -f "$SAMPLE" ] || { echo "SKIP: no sample trace"; exit 77; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
$BIN replay "$SAMPLE" --policies full,tova,snapkv,oracle --budgets 40,64,128,256 --threads 2 \
    -o "$TMP/r.json" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "replay"; }
$BIN report "$TMP/r.json" -o "$TMP/rep" >"$TMP/out" 2>"$TMP/err" \
    || { cat "$TMP/err"; fail "report exit"; }
grep -q "$TMP/rep/index.html" "$TMP/out" || fail "does not print where the report is"
for m in redundancy err_decode recall_decode err_window recall_window coverage; do
    [ "$(head -c 8 "$TMP/rep/$m.png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] \
        || fail "$m.png is not a PNG"
    grep -q "id=\"fig-$m\"" "$TMP/rep/index.html" || fail "figure $m missing from index.html"
done
grep -q "https\?://" "$TMP/rep/index.html" && fail "index.html references the network"
grep -q "^recommended: " "$TMP/rep/index.html" || fail "no recommendation in the page"
$BIN report "$TMP/r.json" >/dev/null 2>&1
[ $? -eq 2 ] || fail "no -o: want exit 2"
$BIN report "$TMP/missing.json" -o "$TMP/x" >/dev/null 2>&1
[ $? -eq 1 ] || fail "missing results: want exit 1"
echo "test_report_html_cli: ok"
