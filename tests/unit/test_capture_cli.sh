#!/usr/bin/env bash
# test_capture_cli.sh - `kvtrace capture-llama2c`: --help, one-line errors and exit codes for
# bad usage and bad inputs, a capture from sampled and from file prompts that verifies, the
# same options giving the same bytes, `info` on decode steps written in chunks (layers, not
# records) and on a capture interrupted in the decode steps (the steps it holds), SIGINT and
# SIGTERM inside the prompt (one line, no trace kept, an existing one unchanged; two SIGTERMs
# back to back are one), and the
# bundled sample trace: it verifies and scripts/make_sample_trace.sh regenerates it byte for
# byte.
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
check "--seed with --prompt-ids (it would be ignored): exit 2, one line" \
    "$C --model $MODEL --prompt-ids x --seed 3 --decode 1 --window 2 -o $TMP/a.kvt 2>$TMP/err; [ \$? -eq 2 ] && [ \$(wc -l <$TMP/err) -eq 1 ] && grep -q -- '--seed samples a prompt' $TMP/err"
check "--temperature with --prompt-ids: exit 2" \
    "$C --model $MODEL --prompt-ids x --temperature 0 --decode 1 --window 2 -o $TMP/a.kvt 2>$TMP/err; [ \$? -eq 2 ] && grep -q -- '--temperature samples a prompt' $TMP/err"
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
# a window longer than --tokens is wrong whatever the inputs: a usage error, found before the
# model is read (a missing model file would otherwise give exit 1)
check "--window > --tokens: exit 2" \
    "$C --model $MODEL --tokens 10 --decode 5 --window 40 -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 2 ]"
check "--window > --tokens: one line naming both" \
    "one_line $C --model $MODEL --tokens 10 --decode 5 --window 40 -o $TMP/a.kvt && $C --model $MODEL --tokens 10 --decode 5 --window 40 -o $TMP/a.kvt 2>&1 | grep -q -- '--window 40 is more than the 10 prompt tokens'"
check "--window > --tokens: exit 2 before the model is read" \
    "$C --model $TMP/none.bin --tokens 10 --decode 5 --window 40 -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 2 ]"
check "--window = --tokens is fine" \
    "$C --model $MODEL --tokens 10 --decode 2 --window 10 -o $TMP/w.kvt >/dev/null && rm -f $TMP/w.kvt"
# KVzip's pass: its options without --kvzip are usage errors; a prompt that leaves no room for
# the repeat rows, a chunk that does not fit, or an instruction id outside the vocabulary is
# refused in one line before anything is written
check "--kvzip-chunk without --kvzip: exit 2, one line" \
    "one_line $C --model $MODEL --tokens 10 --decode 1 --window 2 --kvzip-chunk 4 -o $TMP/a.kvt && $C --model $MODEL --tokens 10 --decode 1 --window 2 --kvzip-chunk 4 -o $TMP/a.kvt 2>&1 | grep -q 'option of --kvzip'"
check "--kvzip with no room after the prompt: exit 1, one line" \
    "one_line $C --model $MODEL --tokens 511 --decode 0 --window 2 --kvzip -o $TMP/a.kvt && $C --model $MODEL --tokens 511 --decode 0 --window 2 --kvzip -o $TMP/a.kvt 2>&1 | grep -q 'a shorter prompt'"
check "--kvzip-chunk too large: exit 1 naming the largest that fits" \
    "$C --model $MODEL --tokens 448 --decode 0 --window 2 --kvzip --kvzip-chunk 57 -o $TMP/a.kvt 2>&1 | grep -q 'largest chunk that fits is 56'"
echo 5 600 > "$TMP/instr.txt"
check "--kvzip-prompt-ids outside the vocabulary: exit 1" \
    "$C --model $MODEL --tokens 10 --decode 0 --window 2 --kvzip --kvzip-prompt-ids $TMP/instr.txt -o $TMP/a.kvt 2>/dev/null; [ \$? -eq 1 ]"
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
    "pinned_bytes": 268435456, "ring_slots": 64, "peak_slots_in_flight": 7,
    "other_device_bytes": 3000000}}})
w.finish()
EOF2
then
    check "info shows a device capture's ring" \
        "$BIN info $TMP/dev.kvt | grep -q '^device     CUDA device 0: 1.05 MB copied through 64 ring slots (at most 7 in flight), 2.500 ms waiting for a slot; 272.6 MB device and 268.4 MB pinned memory'"
    check "info shows the bytes a split model's other GPUs sent through the host" \
        "$BIN info $TMP/dev.kvt | grep -q '^           3.00 MB from tensors on other GPUs, copied to the host and captured from there$'"
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

# a window longer than a prompt file: the file is an input, so the capture finds it (exit 1)
printf '1 20 30\n' > "$TMP/ids3.txt"
check "--window > the prompt file's tokens: exit 1, one line" \
    "one_line $C --model $MODEL --prompt-ids $TMP/ids3.txt --decode 2 --window 4 -o $TMP/e.kvt && ! $C --model $MODEL --prompt-ids $TMP/ids3.txt --decode 2 --window 4 -o $TMP/e.kvt 2>/dev/null && [ ! -e $TMP/e.kvt ]"

# info counts layers, not records: decode steps in chunks of 3 give 4 records per layer
$C --model $MODEL --tokens 32 --decode 10 --decode-chunk 3 --window 8 -o $TMP/ch.kvt >/dev/null
$BIN info $TMP/ch.kvt >$TMP/ch.info
check "info: Q_decode in 5 layers, 20 records" "grep -Eq '^Q_decode +5 +20 +\\[8,10,8\\]' $TMP/ch.info"
check "info: K_decode and V_decode in 5 layers" \
    "grep -Eq '^K_decode +5 +20 ' $TMP/ch.info && grep -Eq '^V_decode +5 +20 ' $TMP/ch.info"
check "info: the token tables belong to no layer" "grep -Eq '^token_ids +- +1 ' $TMP/ch.info"
check "info: all 10 decode steps, nothing more said" \
    "grep -q ' G=10  kv dtype' $TMP/ch.info"
$BIN info --json $TMP/ch.kvt >$TMP/ch.json
check "info --json: layers 5, records 20" \
    "tr -d ' \t\n' <$TMP/ch.json | grep -q '\"Q_decode\":{\"records\":20,\"layers\":5,'"
check "info --json: 10 of 10 decode steps" \
    "tr -d ' \t\n' <$TMP/ch.json | grep -q '\"decode_steps\":{\"planned\":10,\"captured\":10,\"captured_from\":\"capture_stats\",\"stopped_early\":false}'"

# SIGINT in the decode steps: a finished trace holding the steps run, and info says how many
# of those planned (the signal is sent once the file grew past its header: the prompt's
# records are written only after the whole prompt ran, so the decode steps have begun)
KVT_CAPTURE_STEP_DELAY_US=20000 $C --model $MODEL --tokens 8 --decode 400 --decode-chunk 1 \
    --window 4 -o $TMP/int.kvt >/dev/null 2>$TMP/int.err &
pid=$!
for _ in $(seq 300); do [ -s $TMP/int.kvt ] && break; sleep 0.1; done
hdr=$(stat -c %s $TMP/int.kvt 2>/dev/null || echo 0)
for _ in $(seq 300); do [ "$(stat -c %s $TMP/int.kvt)" -gt "$hdr" ] && break; sleep 0.1; done
sleep 0.3
kill -INT $pid
wait $pid
rc=$?
g=$(sed -n 's/.*after \([0-9]*\) of 400 decode steps.*/\1/p' $TMP/int.err)
check "SIGINT in the decode steps: exit 130, one line" \
    "[ $rc -eq 130 ] && [ \$(wc -l <$TMP/int.err) -eq 1 ] && [ -n '$g' ] && [ '$g' -lt 400 ]"
check "SIGINT in the decode steps: the trace verifies" "$BIN verify $TMP/int.kvt >/dev/null"
check "info: G=$g (400 planned; capture stopped early)" \
    "$BIN info $TMP/int.kvt | grep -q ' G=$g (400 planned; capture stopped early)  kv dtype'"
check "info: the Q_decode rows cover the $g steps in 5 layers" \
    "$BIN info $TMP/int.kvt | grep -Eq '^Q_decode +5 +$((g * 5)) +\\[8,$g,8\\]'"
check "info --json: $g of 400 decode steps, stopped early" \
    "$BIN info --json $TMP/int.kvt | tr -d ' \t\n' | grep -q '\"decode_steps\":{\"planned\":400,\"captured\":$g,\"captured_from\":\"capture_stats\",\"stopped_early\":true}'"

# SIGINT / SIGTERM inside the prompt: nothing replayable was captured, so nothing is kept,
# and one line says so; over an existing trace (--force) the old one is unchanged and no
# temporary file is left (the signal is sent once the new file exists: OUT, or with --force
# its temporary)
interrupt_prompt() { # "SIG..." OUT [--force]  (signals 0.1 s apart, in a 0.4 s wind-down)
    KVT_CAPTURE_STEP_DELAY_US=20000 KVT_CAPTURE_STOP_DELAY_US=400000 \
        $C --model $MODEL --tokens 200 --decode 4 --window 4 \
        -o "$2" ${3:-} >/dev/null 2>$TMP/p.err &
    local p=$! f
    for _ in $(seq 300); do
        if [ -n "${3:-}" ]; then
            for f in "$2".tmp.*; do [ -s "$f" ] && break 2; done
        elif [ -s "$2" ]; then
            break
        fi
        sleep 0.1
    done
    local sig
    for sig in $1; do
        kill -"$sig" $p
        sleep 0.1
    done
    wait $p
}
interrupt_prompt INT $TMP/p.kvt
rc=$?
check "SIGINT inside the prompt: exit 130, one line" \
    "[ $rc -eq 130 ] && [ \$(wc -l <$TMP/p.err) -eq 1 ] && grep -q 'interrupted (SIGINT) at prompt token [0-9]* of 200: nothing captured; no trace written' $TMP/p.err"
check "SIGINT inside the prompt: no file left" "! ls $TMP/p.kvt* >/dev/null 2>&1"
cp $TMP/ch.kvt $TMP/old.kvt
interrupt_prompt TERM $TMP/old.kvt --force
rc=$?
check "SIGTERM inside the prompt, --force: exit 143, one line" \
    "[ $rc -eq 143 ] && [ \$(wc -l <$TMP/p.err) -eq 1 ] && grep -q 'interrupted (SIGTERM) at prompt token [0-9]* of 200: nothing captured; $TMP/old.kvt is unchanged' $TMP/p.err"
check "SIGTERM inside the prompt, --force: the old trace unchanged, no temporary left" \
    "cmp -s $TMP/old.kvt $TMP/ch.kvt && ! ls $TMP/old.kvt.tmp.* >/dev/null 2>&1"
# two SIGTERMs back to back (GNU timeout sends one to the process and one to its group): the
# same clean stop, not a kill that leaves the file
interrupt_prompt "TERM TERM" $TMP/p2.kvt
rc=$?
check "two SIGTERMs inside the prompt: exit 143, one line, no file left" \
    "[ $rc -eq 143 ] && [ \$(wc -l <$TMP/p.err) -eq 1 ] && ! ls $TMP/p2.kvt* >/dev/null 2>&1"
# two SIGINTs 0.1 s apart (timeout -s INT does the same): one request too (the second killed
# the capture and left a damaged file, until 2026-12-03)
interrupt_prompt "INT INT" $TMP/p3.kvt
rc=$?
check "two SIGINTs inside the prompt: exit 130, one line, no file left" \
    "[ $rc -eq 130 ] && [ \$(wc -l <$TMP/p.err) -eq 1 ] && grep -q 'interrupted (SIGINT)' $TMP/p.err && ! ls $TMP/p3.kvt* >/dev/null 2>&1"

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

# a checkpoint named in Latin-1 (not UTF-8): the trace's JSON header, info --json and a
# replay's results.json stay UTF-8, the name's stray byte read as '?' (before: raw bytes in the
# header, which Python's json and kvtrace.open refused)
L1="$TMP/caf"$'\xe9'".bin"
cp "$MODEL" "$L1"
check "a Latin-1 checkpoint name: capture" \
    "$C --model '$L1' --tokens 16 --decode 2 --window 4 -o $TMP/l1.kvt >/dev/null 2>&1"
check "a Latin-1 checkpoint name: info --json (the header) is UTF-8 and names caf?" \
    "$BIN info --json $TMP/l1.kvt >$TMP/l1.json && iconv -f UTF-8 -t UTF-8 $TMP/l1.json >/dev/null && grep -q '\"name\":[[:space:]]*\"caf?\"' $TMP/l1.json"
check "a Latin-1 checkpoint name: replay's results.json is UTF-8" \
    "$BIN replay $TMP/l1.kvt --policies snapkv:window=4 --budgets 8 -o $TMP/l1r.json >/dev/null 2>&1 && iconv -f UTF-8 -t UTF-8 $TMP/l1r.json >/dev/null && grep -q 'caf?' $TMP/l1r.json"

echo "test_capture_cli: $pass passed, $fail failed"
[ $fail -eq 0 ]
