#!/bin/bash
# test_report_html_cli.sh - `kvtrace report` on a real replay of the bundled sample trace:
# exit 0, index.html with every figure inlined, Chart.js inlined with an interactive chart, no
# network reference and a Content-Security-Policy, one PNG per figure (PNG signature), the
# per-head heatmap PNGs, the text-only note; without Chart.js ($KVT_CHARTJS missing) still
# exit 0 with a note; --max-error / --min-recall / --metric set the page's target (the same
# recommendation as kvtrace recommend); usage errors exit 2, an unreadable results file exits 1.
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
for m in redundancy err_decode recall_decode err_window recall_window coverage coverage_dropped \
    head_overlap; do
    [ "$(head -c 8 "$TMP/rep/$m.png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] \
        || fail "$m.png is not a PNG"
    grep -q "id=\"fig-$m\"" "$TMP/rep/index.html" || fail "figure $m missing from index.html"
done
# Chart.js's licence banner names its web site: check attributes, not all text
grep -Eqi "(src|href|action)=[\"']?(https?|ftp|javascript):|url\([\"']?(https?:|//)" \
    "$TMP/rep/index.html" && fail "index.html references the network"
grep -q "Content-Security-Policy\" content=\"default-src 'none'" "$TMP/rep/index.html" \
    || fail "no Content-Security-Policy"
if grep -q 'id="no-chartjs"' "$TMP/rep/index.html"; then
    echo "note: no Chart.js at the build-time KVT_CHARTJS_PATH; chart checks skipped"
else
    grep -q '<canvas id="chart-err_decode">' "$TMP/rep/index.html" || fail "no interactive chart"
    grep -q "Chart.js v3" "$TMP/rep/index.html" || fail "Chart.js not inlined"
fi
grep -q 'id="modality-text-only"' "$TMP/rep/index.html" || fail "no text-only modality note"
for p in heat_err_decode_01_tova heat_recall_decode_02_snapkv; do
    [ -f "$TMP/rep/$p.png" ] || fail "no $p.png"
done
n=0
for f in "$TMP"/rep/*.png; do
    [ "$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "$f is not a PNG"
    n=$((n + 1))
done
# 7 metrics, redundancy, 2 per-head metrics x 4 policies (no policy allocates, text only)
[ "$n" -eq 16 ] || fail "$n PNGs, want 16"
KVT_CHARTJS=$TMP/none.js $BIN report "$TMP/r.json" -o "$TMP/rep2" >/dev/null 2>"$TMP/err" \
    || fail "report without Chart.js must still succeed"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "warning: report: no Chart.js at $TMP/none.js" "$TMP/err" \
    || fail "no warning on stderr without Chart.js: $(cat "$TMP/err")"
grep -q 'id="no-chartjs"' "$TMP/rep2/index.html" || fail "no note without Chart.js"
grep -q "^recommended: " "$TMP/rep/index.html" || fail "no recommendation in the page"
ls -A "$TMP/rep" | grep -q '\.tmp\.\|^\.kvt-' && fail "a temporary file left in the report directory"
# the page answers the caller's target, with the recommendation kvtrace recommend prints
$BIN report "$TMP/r.json" -o "$TMP/rep3" --max-error 0.5 >/dev/null 2>"$TMP/err" \
    || { cat "$TMP/err"; fail "report --max-error"; }
grep -q 'Recommended settings (err_decode &le; 0.5)' "$TMP/rep3/index.html" \
    || fail "--max-error 0.5 not the page's target"
$BIN recommend "$TMP/r.json" --max-error 0.5 >"$TMP/rec" 2>/dev/null
line=$(grep '^recommended: ' "$TMP/rec") || fail "recommend printed no recommendation"
grep -qF "$line" "$TMP/rep3/index.html" || fail "page and recommend disagree: $line"
grep -q 'id="rec-targets"' "$TMP/rep3/index.html" || fail "no table of targets"
$BIN report "$TMP/r.json" -o "$TMP/rep4" --min-recall 0.5 --metric coverage >/dev/null 2>&1 \
    || fail "report --min-recall --metric"
grep -q 'Recommended settings (coverage &ge; 0.5)' "$TMP/rep4/index.html" \
    || fail "--min-recall 0.5 --metric coverage not the page's target"
for bad in "--max-error 0.1 --min-recall 0.9" "--metric bogus" "--max-error abc" \
    "--metric coverage" "--max-error" "--min-recall 0.5 --metric head_overlap"; do
    # shellcheck disable=SC2086
    $BIN report "$TMP/r.json" -o "$TMP/rep5" $bad >/dev/null 2>"$TMP/err"
    [ $? -eq 2 ] || fail "report $bad: want exit 2"
    [ "$(wc -l <"$TMP/err")" -eq 1 ] || fail "report $bad: want one line on stderr"
    [ -e "$TMP/rep5" ] && fail "report $bad: wrote $TMP/rep5"
done
$BIN report "$TMP/r.json" >/dev/null 2>&1
[ $? -eq 2 ] || fail "no -o: want exit 2"
$BIN report "$TMP/missing.json" -o "$TMP/x" >/dev/null 2>&1
[ $? -eq 1 ] || fail "missing results: want exit 1"
# every budget keeps the whole prompt: the page says so, as recommend does (not "no measured
# setting meets")
$BIN replay "$SAMPLE" --policies snapkv --budgets 448,1000 --threads 1 -o "$TMP/whole.json" \
    >/dev/null 2>&1 || fail "replay at whole-prompt budgets"
$BIN report "$TMP/whole.json" -o "$TMP/wrep" --max-error 0.5 >/dev/null 2>&1 || fail "report whole"
grep -q "No setting below the full cache meets err_decode &le; 0.5</strong> (every measured budget keeps the whole prompt)" \
    "$TMP/wrep/index.html" || fail "the page on whole-prompt budgets"
# budgets given out of size order (tokens and percentages mixed: 10% of 448 is 45, 25% is
# 112): tables, menus and the page's data list them smallest first; the best-policy table
# says what each keeps; with no setting meeting the target the heatmaps open at the middle
# budget by size (25%, the third of four), not the middle of the command line (64)
$BIN replay "$SAMPLE" --policies snapkv,h2o --budgets 128,10%,64,25% --threads 1 \
    -o "$TMP/ord.json" >/dev/null 2>&1 || fail "replay out of order"
$BIN report "$TMP/ord.json" -o "$TMP/orep" --max-error 0.0001 >/dev/null 2>&1 || fail "report ord"
sed -n '/Best policy per budget/,/<\/table>/p' "$TMP/orep/index.html" |
    grep -o '<tr><td>[^<]*</td>' | sed 's/<[^>]*>//g' | tr '\n' ' ' >"$TMP/rows"
[ "$(cat "$TMP/rows")" = "10% 64 25% 128 " ] || fail "best-per-budget rows: $(cat "$TMP/rows")"
grep -q '<th>KV kept</th>' "$TMP/orep/index.html" || fail "best-per-budget: no KV kept column"
grep -o '<select id="heat-budget">.*</select>' "$TMP/orep/index.html" |
    grep -o '>[^<]*</option>' | tr -d '<>/option' | tr '\n' ' ' >"$TMP/menu"
[ "$(cat "$TMP/menu")" = "10% 64 25% 128 " ] || fail "heatmap menu order: $(cat "$TMP/menu")"
grep -q '<option value="3" selected>25%</option>' "$TMP/orep/index.html" ||
    fail "heatmaps do not open at the middle budget by size"
grep -q '"order":\[1,2,3,0\]' "$TMP/orep/index.html" || fail "the page's data has no budget order"
# a policy whose recall is not defined (lightkv-like keeps merged entries) has no line in the
# recall charts: the caption says so rather than leave it looking not run
$BIN replay "$SAMPLE" --policies snapkv,lightkv-like --budgets 64,128 --threads 1 \
    -o "$TMP/lk.json" >/dev/null 2>&1 || fail "replay lightkv-like"
$BIN report "$TMP/lk.json" -o "$TMP/lkrep" >/dev/null 2>&1 || fail "report lightkv-like"
[ "$(grep -o 'Not measured, so not drawn: lightkv-like' "$TMP/lkrep/index.html" | wc -l)" -ge 2 ] ||
    fail "no note for lightkv-like's missing recall lines"
grep -o 'Not measured, so not drawn: [^.]*' "$TMP/lkrep/index.html" | grep -q snapkv &&
    fail "snapkv named as not measured"
# on an image-heavy trace lightkv-like keeps every text token, far more than the budget: the
# best-per-budget table ranks the settings within their budget and names it beside, with what
# it keeps, rather than crowning it at every budget
$BIN synth --shape tiny-vl --tokens 256 --q-all -o "$TMP/vl.kvt" >/dev/null 2>&1 || fail "synth vl"
$BIN replay "$TMP/vl.kvt" --policies snapkv,lightkv-like,streamingllm --budgets 16,64 \
    --threads 1 -o "$TMP/vl.json" >/dev/null 2>&1 || fail "replay vl"
$BIN report "$TMP/vl.json" -o "$TMP/vlrep" >/dev/null 2>&1 || fail "report vl"
sed -n '/Best policy per budget/,/<\/table>/p' "$TMP/vlrep/index.html" | grep '^<tr><td>' |
    sed 's/<\/td><td>/|/g; s/<[^>]*>//g' >"$TMP/vlrows"
grep -q '^16|streamingllm|[0-9.]*|6.2%|lightkv-like: [0-9.]*, keeping 40.2%$' "$TMP/vlrows" ||
    fail "best-per-budget at 16 on a VL trace: $(cat "$TMP/vlrows")"
grep -q '^64|snapkv|[0-9.]*|25.0%|-$' "$TMP/vlrows" ||
    fail "best-per-budget at 64 on a VL trace: $(cat "$TMP/vlrows")"
# the Policies table: each policy's effective options, and what its flags mean for the figures
printf '1 3\n' >"$TMP/lw2.txt"
# expected-attention:stats=: a safetensors file of the tiny-vl shape (2 layers, 4 query heads,
# D 16): zero means, identity covariances
"${KVT_PYTHON:-/usr/bin/python3}" - "$TMP/st.safetensors" <<'PYEOF' || fail "stats file"
import json, struct, sys
L, H, D = 2, 4, 16
mean = [0.0] * (L * H * D)
cov = [1.0 if i == j else 0.0 for _ in range(L * H) for i in range(D) for j in range(D)]
m, c = struct.pack("<%df" % len(mean), *mean), struct.pack("<%df" % len(cov), *cov)
hdr = json.dumps({"query_mean": {"dtype": "F32", "shape": [L, H, D],
                                 "data_offsets": [0, len(m)]},
                  "query_cov": {"dtype": "F32", "shape": [L, H, D, D],
                                "data_offsets": [len(m), len(m) + len(c)]}}).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(hdr)) + hdr + m + c)
PYEOF
$BIN replay "$TMP/vl.kvt" \
    --policies "snapkv:think=0.25,aircache-like:last=16,quest,lookm,knorm:chunk_length=64,layer_weights=$TMP/lw2.txt,keydiff:chunk_length=64,chunk_scores=own,expected-attention:stats=$TMP/st.safetensors,knorm:decoding=4,prefill=1,knorm:dms=-4,dms_decoding=1,dms_window=8,h2o-greedy:decode=1,rkv:interval=2" \
    --budgets 120,200 --threads 1 -o "$TMP/pol.json" >/dev/null 2>"$TMP/err" ||
    { cat "$TMP/err"; fail "replay policies"; }
$BIN report "$TMP/pol.json" -o "$TMP/polrep" >/dev/null 2>&1 || fail "report policies"
sed -n '/id="policies"/,/<\/table>/p' "$TMP/polrep/index.html" | grep '^<tr><td>' |
    sed 's/<\/td><td>/|/g; s/<[^>]*>//g' >"$TMP/polrows"
[ "$(wc -l <"$TMP/polrows")" = 11 ] || fail "Policies table: $(cat "$TMP/polrows")"
grep -q '^snapkv:think=0.25|snapkv|window=32, .*, think=0.25, think_window=32, think_recent=32|merged or pruned entries' \
    "$TMP/polrows" || fail "Policies row of snapkv:think: $(cat "$TMP/polrows")"
grep -q '^aircache-like:last=16|aircache-like|reduce=mean, heads=kv, threshold=0.9, last=16|inferred: ' \
    "$TMP/polrows" || fail "Policies row of aircache-like: $(cat "$TMP/polrows")"
grep -q '^quest|quest|.*|selects again at every decode step$' "$TMP/polrows" ||
    fail "Policies row of quest: $(cat "$TMP/polrows")"
grep -q '^lookm|lookm|.*merge=pivot|merged or pruned entries .*; kept sets not nested across budgets$' \
    "$TMP/polrows" || fail "Policies row of lookm: $(cat "$TMP/polrows")"
grep -q '^knorm:chunk_length=64,layer_weights=.*|knorm|.*layer_weights=.*lw2.txt, chunk_length=64, chunk_scores=prompt|each layer its own budget (layer_weights=): .*; the budget shared over chunks of 64 prompt tokens (chunk_length=)$' \
    "$TMP/polrows" || fail "Policies row of knorm with layer_weights and chunk_length: $(cat "$TMP/polrows")"
grep -q '^keydiff:chunk_length=64,chunk_scores=own|keydiff|.*, chunk_length=64, chunk_scores=own|the budget shared over chunks of 64 prompt tokens (chunk_length=), each chunk scored as a prompt of its own (chunk_scores=)$' \
    "$TMP/polrows" || fail "Policies row of keydiff with chunk_scores: $(cat "$TMP/polrows")"
grep -q '^expected-attention:stats=.*|expected-attention|.*, stats=.*st.safetensors, .*|the queries.* statistics from a calibration set (stats=), not the prompt.*s$' \
    "$TMP/polrows" || fail "Policies row of expected-attention with stats: $(cat "$TMP/polrows")"
grep -q '^knorm:decoding=4,prefill=1|knorm|.*, decoding=4, prefill=1, .*|the cache, decode tokens too, compressed back to the budget every 4 decode steps (decoding=), and the prompt to the budget at prefill; the decode metrics and kept entries follow it$' \
    "$TMP/polrows" || fail "Policies row of knorm with decoding: $(cat "$TMP/polrows")"
grep -q '^knorm:dms=-4,dms_decoding=1,dms_window=8|knorm|.*, dms=-4, dms_window=8, dms_decoding=1, .*|decode tokens too evicted by the threshold as they leave the last dms_window tokens (dms_decoding=1); the decode metrics and kept entries follow the cache$' \
    "$TMP/polrows" || fail "Policies row of knorm with dms_decoding: $(cat "$TMP/polrows")"
grep -q '^h2o-greedy:decode=1|h2o-greedy|window=32, reduce=mean, heads=kv, decode=1|kept sets not nested across budgets; the eviction going on through the decode steps, decode tokens too (decode=1); the decode metrics and kept entries follow the cache$' \
    "$TMP/polrows" || fail "Policies row of h2o-greedy with decode: $(cat "$TMP/polrows")"
grep -q '^rkv:interval=2|rkv|window=8, kernel=7, reduce=max, heads=kv, threshold=0.5, decode=1, lambda=0.1, interval=2|the cache, decode tokens too, compressed back to the budget whenever the sequence reaches a multiple of 2 tokens (interval=), and the prompt at prefill once it holds the budget; the decode metrics and kept entries follow it$' \
    "$TMP/polrows" || fail "Policies row of rkv: $(cat "$TMP/polrows")"
# the quality charts' cost axis is the KV cache kept: a heads=query policy keeps its budget per
# query head, so G (query heads per KV head) times the entries of the same budget per KV head
$BIN synth --shape tiny --tokens 96 --window 8 --decode 4 -o "$TMP/gqa.kvt" >/dev/null 2>&1 ||
    fail "synth gqa"
$BIN replay "$TMP/gqa.kvt" --policies snapkv:window=8,snapkv:window=8,heads=query,label=per-q \
    --budgets 16,32 -o "$TMP/gqa.json" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "gqa"; }
$BIN report "$TMP/gqa.json" -o "$TMP/gqarep" >/dev/null 2>&1 || fail "gqa report"
"${KVT_PYTHON:-/usr/bin/python3}" - "$TMP/gqarep/index.html" <<'PYEOF' || fail "cost axis"
import json, re, sys
html = open(sys.argv[1]).read()
d = json.loads(re.search(r'<script type="application/json" id="kvt-data">(.*?)</script>', html,
                         re.S).group(1))
nk = d["curves"][0]["n_keep"]  # [policy][budget]
assert nk[0] == [16, 32] and nk[1] == [32, 64], nk  # tiny: 4 query heads over 2 KV heads
assert "kept entries per KV head and layer" in html
PYEOF
# recommend names the heads a heads=query policy's budget and per-head table count
$BIN replay "$TMP/gqa.kvt" --policies snapkv:window=8,heads=query,label=per-q --budgets 16,32 \
    -o "$TMP/gqaq.json" >/dev/null 2>&1 || fail "gqa per-q"
$BIN recommend "$TMP/gqaq.json" --max-error 100 >"$TMP/rq.txt" || fail "recommend per-q"
grep -q "^recommended: per-q at budget 16 (16 tokens per query head per layer)" "$TMP/rq.txt" &&
    grep -q "^per head (rows = layers, columns = query heads):" "$TMP/rq.txt" ||
    { cat "$TMP/rq.txt"; fail "recommend does not say query heads"; }
# a review's findings (2026-12-06), each failed before its fix:
# - the modality share of a heads=query policy was its G copies over the KV heads' cache (above
#   1, drawn as 1): it is the share of the modality's tokens a head keeps, at most 1
$BIN synth --shape tiny-vl --tokens 300 --window 8 --decode 4 -o "$TMP/vlq.kvt" >/dev/null 2>&1 ||
    fail "synth vlq"
$BIN replay "$TMP/vlq.kvt" --policies full,snapkv:window=8,snapkv:window=8,heads=query \
    --budgets 240,64,160 -o "$TMP/vlq.json" >/dev/null 2>&1 || fail "replay vlq"
$BIN report "$TMP/vlq.json" -o "$TMP/vlqrep" >/dev/null 2>&1 || fail "vlq report"
"${KVT_PYTHON:-/usr/bin/python3}" - "$TMP/vlqrep/index.html" <<'PYEOF' || fail "modality share"
import json, re, sys
html = open(sys.argv[1]).read()
d = json.loads(re.search(r'<script type="application/json" id="kvt-data">(.*?)</script>', html,
                         re.S).group(1))
share = d["modality"]["share"]  # [modality][policy][budget]
for m in share:
    for row in m:
        assert all(x is None or 0 <= x <= 1 for x in row), share
# the budgets of the redundancy-by-modality table smallest first (were in --budgets order)
rows = re.findall(r"<tr><td>snapkv:window=8</td><td>([0-9]+)</td>", html)
assert rows == ["64", "160", "240"], rows
PYEOF
# - with 43 policies the PNG legends were cut after 31 entries: the figure grows to hold them
#   (40 policies here: 40 legend rows of 16 px below the 40 px title band, 540 px before)
pols=full
for k in 1 3 5 7 9 11 13; do pols=$pols,snapkv:window=8,kernel=$k; done
for s in 1 2 3 4 5 6 7 8 9 10 11 12; do pols=$pols,random:seed=$s; done
for s in 1 2 3 4 5 6 7 8; do pols=$pols,streamingllm:sinks=$s; done
pols=$pols,knorm,vnorm,keydiff,tova,adakv:window=8,pyramidkv:window=8,chunkkv:window=8
pols=$pols,mixkv-snapkv:window=8,cake:window=8,lagkv,cur,leverage,label=a-very-very-long-label-for-leverage-to-cut
$BIN replay "$TMP/gqa.kvt" --policies "$pols" --budgets 16,32 -o "$TMP/many.json" >/dev/null \
    2>"$TMP/err" || { cat "$TMP/err"; fail "replay 43"; }
$BIN report "$TMP/many.json" -o "$TMP/manyrep" >/dev/null 2>&1 || fail "report 43"
h=$(od -An -tu1 -j 20 -N 4 "$TMP/manyrep/err_window.png" | awk '{print $1*16777216+$2*65536+$3*256+$4}')
[ "$h" -ge $((40 + 20 + 16 * 40)) ] || fail "err_window.png is $h px high: its legend is cut"
# - a results file of `full` alone: the empty quality section says why
$BIN replay "$TMP/gqa.kvt" --policies full --budgets 16 -o "$TMP/full.json" >/dev/null 2>&1 ||
    fail "replay full"
$BIN report "$TMP/full.json" -o "$TMP/fullrep" >/dev/null 2>&1 || fail "report full"
grep -q 'id="curves-none"' "$TMP/fullrep/index.html" || fail "no note for nothing to plot"
# - a budget of an unknown kind was taken silently; an input problem was named by the output
"${KVT_PYTHON:-/usr/bin/python3}" -c '
import json, sys
d = json.load(open(sys.argv[1])); d["settings"]["budgets"][0]["kind"] = "bogus"
json.dump(d, open(sys.argv[2], "w"))' "$TMP/full.json" "$TMP/bogus.json" || fail "bogus"
$BIN report "$TMP/bogus.json" -o "$TMP/bogusrep" 2>"$TMP/err" >/dev/null && fail "bogus kind"
grep -q "bogus.json: settings.budgets\[0\] (16): \"kind\" must be" "$TMP/err" ||
    fail "bogus kind: $(cat "$TMP/err")"
echo "test_report_html_cli: ok"
