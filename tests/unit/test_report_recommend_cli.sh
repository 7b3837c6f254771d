#!/bin/bash
# test_report_recommend_cli.sh - `kvtrace recommend` on a real replay of the bundled sample
# trace: a reachable target gives exit 0 and a recommendation (text and JSON that parses and
# names a non-reference policy), an unreachable one the one-line "no setting meets the target"
# and exit 3, usage errors exit 2, unreadable input and --shard parts exit 1.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
SAMPLE=$ROOT/traces/samples/stories260K.kvt
[ -f "$SAMPLE" ] || { echo "SKIP: no sample trace"; exit 77; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
SET=(--policies full,tova,snapkv,oracle --budgets 40,64,128,256 --threads 2)
$BIN replay "$SAMPLE" "${SET[@]}" -o "$TMP/r.json" >/dev/null 2>"$TMP/err" \
    || { cat "$TMP/err"; fail "replay"; }

$BIN recommend "$TMP/r.json" --max-error 0.6 >"$TMP/out" 2>"$TMP/err" \
    || { cat "$TMP/out" "$TMP/err"; fail "reachable target: exit $?"; }
grep -q "^recommended: \(tova\|snapkv\) at budget" "$TMP/out" || { cat "$TMP/out"; fail "text"; }
grep -q "^per layer" "$TMP/out" || fail "no per-layer suggestion"
grep -q "^layer allocation" "$TMP/out" || fail "no layer allocation"

$BIN recommend "$TMP/r.json" --max-error 0.6 --json >"$TMP/out.json" 2>"$TMP/err" \
    || fail "--json exit"
PY=${KVT_PYTHON:-}
if [ -n "$PY" ] && [ -x "$PY" ]; then
    "$PY" - "$TMP/out.json" <<'PYEOF' || fail "JSON content"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["found"] is True and d["metric"] == "err_decode" and d["target"] == 0.6
rec = d["recommendation"]
assert rec["label"] in ("tova", "snapkv"), rec
assert rec["value"] <= 0.6 and len(rec["layer_budget_tokens"]) == 5
assert len(rec["layer_alloc_tokens"]) == 5
assert [p["label"] for p in d["policies"]] == ["full", "tova", "snapkv", "oracle"]
assert not d["policies"][0]["candidate"] and not d["policies"][3]["candidate"]
PYEOF
fi

$BIN recommend "$TMP/r.json" --min-recall 0.9999 >"$TMP/out" 2>"$TMP/err"
rc=$?
[ $rc -eq 3 ] || fail "unreachable target: exit $rc, want 3"
grep -q "no setting meets the target: recall_decode >= 0.9999" "$TMP/err" \
    || { cat "$TMP/err"; fail "unreachable message"; }
[ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "message is not one line"
$BIN recommend "$TMP/r.json" --min-recall 0.9999 --json >"$TMP/out" 2>/dev/null
[ $? -eq 3 ] || fail "--json unreachable exit"
grep -q '"found":	false' "$TMP/out" || fail "--json found false"

$BIN recommend "$TMP/r.json" --max-error 0.1 --min-recall 0.9 >/dev/null 2>&1
[ $? -eq 2 ] || fail "both targets: want exit 2"
$BIN recommend "$TMP/r.json" --metric nope >/dev/null 2>&1
[ $? -eq 2 ] || fail "bad metric: want exit 2"
$BIN recommend "$TMP/r.json" --max-error 0.1 --metric recall_window >/dev/null 2>"$TMP/err"
[ $? -eq 2 ] && grep -q "needs --min-recall" "$TMP/err" || fail "metric/target mismatch: want exit 2 (usage)"
$BIN recommend >/dev/null 2>&1
[ $? -eq 2 ] || fail "no file: want exit 2"
$BIN recommend "$TMP/missing.json" >/dev/null 2>&1
[ $? -eq 1 ] || fail "missing file: want exit 1"
$BIN recommend --help | grep -q "usage: kvtrace recommend" || fail "--help"

$BIN replay "$SAMPLE" "${SET[@]}" --shard 0/2 -o "$TMP/p.json" >/dev/null 2>&1 || fail "shard"
$BIN recommend "$TMP/p.json" >/dev/null 2>"$TMP/err"
[ $? -eq 1 ] || fail "partial result: want exit 1"
grep -q "merge" "$TMP/err" || fail "partial result message"
# targets no setting can have are usage errors
for bad in "--max-error -1" "--min-recall 2" "--min-recall -1.5" \
    "--max-error 0.5 --metric coverage_dropped" "--min-recall 0.5 --metric err_decode"; do
    # shellcheck disable=SC2086
    $BIN recommend "$TMP/p.json" $bad >/dev/null 2>"$TMP/err"
    [ $? -eq 2 ] || fail "$bad: want exit 2"
    [ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "$bad: one line"
done
echo "test_report_recommend_cli: ok"
