#!/bin/bash
# test_bench_decode_caches.sh - bench/decode_caches.sh runs on a small trace: one line per
# prefill/decode-time pair (h2o-greedy's with Q_ALL=1, expected-attention's with EA=1), each
# with both times and their ratio, and summary.txt the same; with EXPORT=1 an export line after
# each pair, its size below the whole sets', and a read line (the reader's peak memory opening
# it and walking every set); a pair whose replay fails stops it with exit 1 and the error.
set -u
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
B="$KVT_SOURCE_ROOT/bench/decode_caches.sh"
KVT="$KVT_BIN" T=200 G=6 LAYERS=1 SHAPE=tiny Q_ALL=1 WORK="$TMP" bash "$B" >"$TMP/out" 2>&1 ||
    fail "decode_caches.sh: $(cat "$TMP/out")"
[ "$(wc -l <"$TMP/out")" = 8 ] || fail "8 lines: $(cat "$TMP/out")"
grep -q '^decode-time caches: tiny, T=200, G=6, 1 layers, ' "$TMP/out" || fail "header"
n=$(grep -cE '^[a-z0-9-]+ +[0-9.]+ s +[a-z0-9-]+:(decoding=[0-9]+(,prefill=1)?|decode=1) +[0-9.]+ s +x[0-9.]+$' "$TMP/out")
[ "$n" = 7 ] || fail "7 pair lines, $n: $(cat "$TMP/out")"
grep -q '^h2o-greedy .* h2o-greedy:decode=1 ' "$TMP/out" || fail "h2o-greedy pair"
cmp -s "$TMP/out" "$TMP/summary.txt" || fail "summary.txt differs from the output"
KVT="$KVT_BIN" T=200 G=12 LAYERS=1 SHAPE=tiny EA=1 WORK="$TMP/ea" PAIRS="knorm|knorm:decoding=4" \
    bash "$B" >"$TMP/out4" 2>&1 || fail "EA=1: $(cat "$TMP/out4")"
[ "$(grep -c ' x[0-9.]*$' "$TMP/out4")" = 3 ] || fail "EA=1: 3 pair lines: $(cat "$TMP/out4")"
grep -Eq '^expected-attention +[0-9.]+ s +expected-attention:decoding=8,prefill=1 ' "$TMP/out4" ||
    fail "EA=1: the prefill=1 pair: $(cat "$TMP/out4")"
KVT="$KVT_BIN" T=200 G=6 LAYERS=1 SHAPE=tiny EXPORT=1 WORK="$TMP" \
    PAIRS="tova|tova:decoding=1,prefill=1 knorm|knorm:decoding=4" bash "$B" >"$TMP/out3" 2>&1 ||
    fail "EXPORT=1: $(cat "$TMP/out3")"
[ "$(grep -c '^export: ' "$TMP/out3")" = 2 ] || fail "2 export lines: $(cat "$TMP/out3")"
grep -A1 '^tova ' "$TMP/out3" | grep -Eq '^export: tova:decoding=1,prefill=1 +[0-9.]+ MiB, whole +[0-9.]+ MiB, x[0-9.]+$' ||
    fail "tova's export line: $(cat "$TMP/out3")"
awk '/^export: tova/ { r = substr($NF, 2); exit !(r > 1.5) }' "$TMP/out3" ||
    fail "tova's delta records save less than 1.5x: $(cat "$TMP/out3")"
[ "$(grep -cE '^read: [a-z]+:decoding=[0-9,a-z=]+ +open [0-9.]+ MiB peak, walk [0-9.]+ s [0-9.]+ MiB peak$' "$TMP/out3")" = 2 ] ||
    fail "2 read lines: $(cat "$TMP/out3")"
KVT="$KVT_BIN" T=200 G=6 LAYERS=1 SHAPE=tiny WORK="$TMP" PAIRS="knorm|knorm:decoding=0" \
    bash "$B" >"$TMP/out2" 2>&1 && fail "a failing replay exits 0"
grep -q 'decode_caches: replay knorm:decoding=0 failed: .*decoding=0' "$TMP/out2" ||
    fail "the failing replay's error: $(cat "$TMP/out2")"
echo "bench/decode_caches.sh: ok"
