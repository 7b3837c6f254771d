#!/bin/bash
# test_replay_fastv.sh - fastv on whole traces (its ranking comes from layer K-1, made before
# any layer is replayed): the column sums and Q_all give the same results; at FastV's R = 50%
# (B = text + image / 2) the pruned layers keep every text token and half the image tokens, the
# dense layers everything; a trace with neither column sums nor Q_all is refused in one line
# naming the way out (last=1), which then runs. Exact kept sets: test_replay_metrics (by hand)
# and test_replay_vs_oracle (NumPy).
set -u
BIN=${KVT_BIN:?}
PY=${KVT_PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
# tiny-vl: 2 layers, 300 tokens, 180 of them image tokens (60%)
for cs in on off; do
    $BIN synth --shape tiny-vl --tokens 300 --q-all --colsum $cs --seed 4 -o "$TMP/$cs.kvt" \
        >/dev/null 2>&1 || fail "synth colsum $cs"
    $BIN replay "$TMP/$cs.kvt" --policies fastv:dense_layers=1,fastv:dense_layers=1,last=3 \
        --budgets 120,210,250 -o "$TMP/$cs.json" >/dev/null 2>"$TMP/err" ||
        { cat "$TMP/err"; fail "replay (colsum $cs)"; }
done
"$PY" - "$TMP/on.json" "$TMP/off.json" <<'PYEOF' || fail "results"
import json, sys
a, b = (json.load(open(p))["traces"][0] for p in sys.argv[1:3])
assert a["runs"] == b["runs"], "the column sums and Q_all rank differently"
counts = a["modality_counts"]
assert (counts["text"], counts["image"]) == (120, 180), counts
for run in a["runs"]:
    if run["budget_tokens"] != 210:
        continue
    nk = run["by_modality"]["n_keep"]
    assert all(x == 300 for x in run["metrics"]["n_keep"][0]), run["label"]  # dense layer 0
    assert all(x == 120 for x in nk["text"][1]) and all(x == 90 for x in nk["image"][1]), \
        (run["label"], nk)
print("fastv: Q_all == column sums; R = 50%: layer 1 keeps 120 text + 90 image tokens")
PYEOF
# neither column sums nor Q_all: refused by name, with the way out
$BIN synth --shape tiny-vl --tokens 300 --colsum off -o "$TMP/nc.kvt" >/dev/null 2>&1 ||
    fail "synth without column sums"
$BIN replay "$TMP/nc.kvt" --policies fastv:dense_layers=1 --budgets 64 -o "$TMP/x.json" \
    >/dev/null 2>"$TMP/err" && fail "fastv ran without column sums or Q_all"
[ "$(wc -l <"$TMP/err")" -eq 1 ] &&
    grep -q "fastv: layer 0 has no attention column sums and no Q_all .*last=1" "$TMP/err" ||
    { cat "$TMP/err"; fail "the message"; }
[ -e "$TMP/x.json" ] && fail "a refused replay wrote results"
$BIN replay "$TMP/nc.kvt" --policies fastv:dense_layers=1,last=1 --budgets 64 -o "$TMP/x.json" \
    >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "last=1"; }
$BIN replay --list-policies | grep -q "^fastv " || fail "not listed"
echo "OK: fastv"
