#!/bin/bash
# test_report_browser.sh - open `kvtrace report` pages in headless Chromium and check them from
# the inside (test_report_browser.py, DevTools protocol over a pipe): no uncaught exception or
# console error, no dialog, no request other than file:/data: (the network is also made
# unreachable), every chart drawn and not blank, every heatmap painted, a value tooltip on
# hover, every inlined PNG decodes, a screenshot with colours. Pages: a real replay of the
# bundled sample with the demo's policies and budgets (text only: the page must say so), the
# same results with hostile model, path and policy label (shown as text, nothing injected), a
# synthetic vision-language trace (modality figures), and that one without Chart.js (PNGs and a
# note). Exit 77 without /usr/bin/chromium (or $KVT_CHROMIUM) or /usr/bin/python3.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
CHROMIUM=${KVT_CHROMIUM:-/usr/bin/chromium}
PY=/usr/bin/python3
CHECK=$ROOT/tests/unit/test_report_browser.py
SAMPLE=$ROOT/traces/samples/stories260K.kvt
[ -x "$CHROMIUM" ] || { echo "SKIP: no $CHROMIUM"; exit 77; }
[ -x "$PY" ] || { echo "SKIP: no $PY"; exit 77; }
[ -f "$SAMPLE" ] || { echo "SKIP: no sample trace"; exit 77; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
export HOME=$TMP # chromium writes its crash and font caches under HOME

# 1. the demo's sweep on the real sample trace (text only)
$BIN replay "$SAMPLE" --policies all,h2o,oracle --budgets 40,48,64,96,128,192,256 \
    --threads 2 -o "$TMP/r.json" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "replay"; }
$BIN report "$TMP/r.json" -o "$TMP/rep" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "report"; }
grep -q 'id="modality-text-only"' "$TMP/rep/index.html" || fail "no text-only modality note"
for p in pyramidkv adakv mixkv-adakv; do
    ls "$TMP/rep"/alloc_*_"$p".png >/dev/null 2>&1 || fail "no layer allocation figure of $p"
done
$PY "$CHECK" "$CHROMIUM" "$TMP/rep/index.html" --screenshot "$TMP/rep.png" || fail "sample page"

# 2. hostile strings in the model name, the trace path and a policy label
H1='<script>alert(1)</script>'
H2='</script><img src=x onerror=alert(1)>'
HOSTILE="$H1$H2 <!-- & \"'"
KVT_HOSTILE=$HOSTILE $PY - "$TMP/r.json" "$TMP/h.json" <<'EOF' || fail "cannot write hostile results"
import json, os, sys
r = json.load(open(sys.argv[1]))
h = os.environ["KVT_HOSTILE"]
r["traces"][0]["model"]["name"] = h
r["traces"][0]["path"] = h + ".kvt"
lab = h + "snapkv"
for p in r["settings"]["policies"]:
    if p["label"] == "snapkv":
        p["label"] = lab
for run in r["traces"][0]["runs"] + r["aggregate"]:
    if run["label"] == "snapkv":
        run["label"] = lab
json.dump(r, open(sys.argv[2], "w"))
EOF
$BIN report "$TMP/h.json" -o "$TMP/hrep" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "hostile report"; }
grep -qF "$H1" "$TMP/hrep/index.html" && fail "raw $H1 in the page"
grep -qF "$H2" "$TMP/hrep/index.html" && fail "raw $H2 in the page"
grep -q '\\u003cscript\\u003ealert(1)\\u003c/script\\u003e' "$TMP/hrep/index.html" \
    || fail "hostile name not \\u003c-escaped in the JSON blob"
$PY "$CHECK" "$CHROMIUM" "$TMP/hrep/index.html" --hostile "$HOSTILE" || fail "hostile page"

# 3. image and text tokens (synthetic vision-language shape): modality figures
$BIN synth --shape tiny-vl --tokens 256 --decode 8 -o "$TMP/vl.kvt" >/dev/null 2>"$TMP/err" \
    || { cat "$TMP/err"; fail "synth"; }
$BIN replay "$TMP/vl.kvt" --policies full,snapkv,pyramidkv,adakv,mixkv-adakv,oracle \
    --budgets 32,64,128 --threads 2 -o "$TMP/vl.json" >/dev/null 2>"$TMP/err" \
    || { cat "$TMP/err"; fail "replay vl"; }
$BIN report "$TMP/vl.json" -o "$TMP/vlrep" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "report vl"; }
for m in text image; do
    [ -f "$TMP/vlrep/modality_$m.png" ] || fail "no modality_$m.png"
    grep -q "id=\"chart-mod-$m\"" "$TMP/vlrep/index.html" || fail "no chart-mod-$m"
done
$PY "$CHECK" "$CHROMIUM" "$TMP/vlrep/index.html" || fail "vision-language page"

# 4. without Chart.js: still a page, with the PNGs and a visible note
KVT_CHARTJS=$TMP/missing/chart.min.js $BIN report "$TMP/vl.json" -o "$TMP/nrep" >/dev/null \
    2>"$TMP/err" || { cat "$TMP/err"; fail "report without Chart.js"; }
$PY "$CHECK" "$CHROMIUM" "$TMP/nrep/index.html" --no-chartjs || fail "page without Chart.js"
echo "test_report_browser: ok"
