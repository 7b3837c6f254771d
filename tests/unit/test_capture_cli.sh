#!/usr/bin/env bash
# test_capture_cli.sh - `kvtrace capture-llama2c`: --help, one-line errors and exit codes for
# bad usage and bad inputs, a capture from sampled and from file prompts that verifies, the
# same options giving the same bytes, and the bundled sample trace: it verifies and
# scripts/make_sample_trace.sh regenerates it byte for byte.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
MODEL=$ROOT/models/stories260K.bin
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0; pass=0
check() { if eval "$2"; then pass=$((pass+1)); else echo "FAILED: $1"; fail=$((fail+1)); fi; }
C="$BIN capture-llama2c"
one_line() { [ "$("$@" 2>&1 >/dev/null | wc -l)" -eq 1 ]; }

check "--help exits 0 and shows usage" "$C --help | grep -q 'usage: kvtrace capture-llama2c'"
check "listed in kvtrace --help" "$BIN --help | grep -q capture-llama2c"
check "no args: exit 2" "$C >/dev/null 2>&1; [ \$? -eq 2 ]"
check "no args: one error line" "one_line $C"
check "both --tokens and --prompt-ids: exit 2" \
    "$C --model $MODEL --tokens 8 --prompt-ids x --decode 1 --window 2 -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 2 ]"
check "missing --window: exit 2" \
    "$C --model $MODEL --tokens 8 --decode 1 -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 2 ]"
check "bad number: exit 2, one line" \
    "one_line $C --model $MODEL --tokens 8x --decode 1 --window 2 -o $TMP/a.kvt"
check "bad dtype: exit 2" \
    "$C --model $MODEL --tokens 8 --decode 1 --window 2 --dtype i32 -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 2 ]"
check "unknown option: exit 2" "$C --bogus 2>/dev/null; [ \$? -eq 2 ]"
check "missing model: exit 1, one line" \
    "one_line $C --model $TMP/none.bin --tokens 8 --decode 1 --window 2 -o $TMP/a.kvt && ! $C --model $TMP/none.bin --tokens 8 --decode 1 --window 2 -o $TMP/a.kvt 2>/dev/null"
head -c 1000 "$MODEL" > "$TMP/cut.bin"
check "truncated model: exit 1 names the size" \
    "$C --model $TMP/cut.bin --tokens 8 --decode 1 --window 2 -o $TMP/a.kvt 2>&1 | grep -q 'needs 1056540'"
check "too long for the context: exit 1" \
    "$C --model $MODEL --tokens 500 --decode 20 --window 2 -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 1 ]"
check "nothing left behind after a rejected run" "[ ! -e $TMP/a.kvt ]"

check "capture from BOS" \
    "$C --model $MODEL --tokens 64 --decode 8 --window 8 --colsum --q-all -o $TMP/a.kvt >$TMP/a.out"
check "prints a summary" "grep -q 'T=64 W=8 G=8' $TMP/a.out"
check "the trace verifies" "$BIN verify $TMP/a.kvt >/dev/null"
check "info shows the model" "$BIN info $TMP/a.kvt | grep -q stories260K"
check "info says why there is no GPU timeline" \
    "$BIN info $TMP/a.kvt | grep -q '^timeline   absent: CPU engine (llama2.c): no GPU activity to time'"
check "info --json has it in the metadata" \
    "$BIN info --json $TMP/a.kvt | grep -q '\"absent\":[[:space:]]*\"CPU engine'"
# a device capture's ring statistics (meta_json capture_stats.device) get their own line: a
# copy of the sample trace with that record added (a GPU capture writes it; none here). Written
# through the Python binding, which cannot load a sanitizer build's library into an unsanitized
# interpreter (the library then needs the ASan runtime): skipped there, and where the Python has
# no NumPy (the binding's prerequisite); any other failure to write it fails the test.
PY=${KVT_PYTHON:-/usr/bin/python3}
LIBF=${KVT_LIB:-$BIN}
[ -d "$LIBF" ] && LIBF=$LIBF/libkvtrace.so
if ldd "$LIBF" 2>/dev/null | grep -q libasan || grep -q __asan_ "$LIBF" 2>/dev/null; then
    echo "(info device line: not checked, the Python binding cannot load a sanitizer build's library)"
elif ! "$PY" -c 'import numpy' >/dev/null 2>&1; then
    echo "(info device line: not checked, $PY has no NumPy for the Python binding)"
elif PYTHONPATH=$ROOT/python "$PY" - "$ROOT/traces/samples/stories260K.kvt" "$TMP/dev.kvt" \
    >"$TMP/py.out" 2>&1 <<'EOF2'
import sys
import kvtrace
src = kvtrace.open(sys.argv[1])
w = kvtrace.TraceWriter(sys.argv[2], src.header)
w.append_json({"capture_stats": {"complete": True, "device": {
    "cuda_device": 0, "d2h_bytes": 1048576, "stall_ns": 2500000, "device_bytes": 272629760,
    "pinned_bytes": 268435456, "ring_slots": 64, "peak_slots_in_flight": 7}}})
w.finish()
EOF2
then
    check "info shows a device capture's ring" \
        "$BIN info $TMP/dev.kvt | grep -q '^device     CUDA device 0: 1.05 MB copied through 64 ring slots (at most 7 in flight), 2.500 ms waiting for a slot; 272.6 MB device and 268.4 MB pinned memory'"
else
    cat "$TMP/py.out"
    echo "FAILED: a copy of the sample with a device capture's statistics, written through" \
        "the Python binding"
    fail=$((fail+1))
fi
check "existing output without --force: exit 1" \
    "$C --model $MODEL --tokens 64 --decode 8 --window 8 -o $TMP/a.kvt 2>$TMP/e; [ \$? -eq 1 ] && grep -q 'already exists' $TMP/e"
check "same options, same bytes (with writer threads)" \
    "$C --model $MODEL --tokens 64 --decode 8 --window 8 --colsum --q-all --threads 2 -o $TMP/b.kvt >/dev/null && cmp -s $TMP/a.kvt $TMP/b.kvt"
check "another seed, another prompt" \
    "$C --model $MODEL --tokens 64 --decode 8 --window 8 --colsum --q-all --seed 2 -o $TMP/c.kvt >/dev/null && ! cmp -s $TMP/a.kvt $TMP/c.kvt"
printf '1 20 30\n 40 50 60 70 80 90\n' > "$TMP/ids.txt"
check "capture from a prompt file, bf16" \
    "$C --model $MODEL --prompt-ids $TMP/ids.txt --decode 4 --window 3 --dtype bf16 -o $TMP/d.kvt >/dev/null && $BIN verify $TMP/d.kvt >/dev/null"
check "bf16 is recorded" "$BIN info $TMP/d.kvt | grep -q bf16"
printf '1 20 999\n' > "$TMP/bad.txt"
check "prompt id out of range: exit 1 with the token" \
    "$C --model $MODEL --prompt-ids $TMP/bad.txt --decode 4 --window 2 -o $TMP/e.kvt 2>&1 | grep -q 'token 3 is 999'"

SAMPLE=$ROOT/traces/samples/stories260K.kvt
if [ -f "$SAMPLE" ]; then
    check "bundled sample verifies" "$BIN verify $SAMPLE >/dev/null"
    check "bundled sample is under 5 MB" "[ \$(stat -c %s $SAMPLE) -lt 5000000 ]"
    mkdir -p "$TMP/bin" && ln -s "$BIN" "$TMP/bin/kvtrace"
    check "make_sample_trace.sh regenerates it byte for byte" \
        "bash $ROOT/scripts/make_sample_trace.sh $TMP $TMP/sample.kvt >/dev/null && cmp $SAMPLE $TMP/sample.kvt"
else
    echo "FAILED: $SAMPLE is missing"; fail=$((fail+1))
fi

echo "test_capture_cli: $pass passed, $fail failed"
[ $fail -eq 0 ]
