#!/bin/bash
# test_replay_cli.sh - `kvtrace replay` end to end on a llama2.c trace: results.json and the
# selection export are written, --help works, bad input fails with one clear line.
set -u
BIN=${KVT_BIN:?}
MODEL=${KVT_SOURCE_ROOT:?}/../shared/models/stories260K.bin
[ -f "$MODEL" ] || MODEL=/work/shared/models/stories260K.bin
if ! $BIN capture-llama2c --help >/dev/null 2>&1 || [ ! -f "$MODEL" ]; then
    echo "SKIP: no capture-llama2c command or model"; exit 77
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
$BIN capture-llama2c --model "$MODEL" --tokens 120 --decode 4 --window 32 --colsum \
    -o "$TMP/t.kvt" >/dev/null 2>&1 || fail "capture"
$BIN replay --help | grep -q -- "--budgets" || fail "--help"
$BIN replay --list-policies | grep -q "mixkv-adakv" || fail "--list-policies"
$BIN replay --list-policies | grep -A1 "^mixkv-sparsemm " | grep -q "ratio=0.1,scores=none,rtable" ||
    fail "--list-policies: mixkv-sparsemm and its options"
$BIN replay "$TMP/t.kvt" --policies all,h2o,oracle,quest,hybridkv-like \
    --budgets 24,48,25% --threads 2 --export-selection "$TMP/sel.bin" -o "$TMP/r.json" \
    >"$TMP/out" 2>"$TMP/err" || { cat "$TMP/err"; fail "replay"; }
grep -Eq '"results_version":[[:space:]]*1,' "$TMP/r.json" || fail "results_version"
grep -q "mixkv-snapkv" "$TMP/out" || fail "summary table"
[ "$(head -c 6 "$TMP/sel.bin")" = "KVTSEL" ] || fail "selection magic"
# info of the export: layout, version (3: quest's per-step sets), its size against every set
# written whole, and per policy its sets, shape and mean kept per budget (T = 120: 24, 48, 30)
$BIN info "$TMP/sel.bin" >"$TMP/out" 2>"$TMP/err" || { cat "$TMP/err"; fail "info of an export"; }
grep -q "^selection  $TMP/sel.bin (binary, version 3, .*; every set whole: .*x)$" "$TMP/out" ||
    { cat "$TMP/out"; fail "info: the export's line"; }
grep -q "^budgets    24, 48, 25%$" "$TMP/out" && grep -q "^records    1380$" "$TMP/out" ||
    fail "info: budgets, records"
grep -Eq "^quest +KV heads, per step +5 +4 +4 +240$" "$TMP/out" || fail "info: quest's row"
grep -A1 "^snapkv " "$TMP/out" | grep -q "^  mean kept: 24 24.0, 48 48.0, 25% 30.0$" ||
    fail "info: snapkv's mean kept"
$BIN info "$TMP/sel.bin" --json >"$TMP/si.json" || fail "info --json of an export"
grep -Eq '"kind":[[:space:]]*"selection_export"' "$TMP/si.json" &&
    grep -Eq '"mean_kept":[[:space:]]*\[24, 48, 30\]' "$TMP/si.json" || fail "info --json fields"
# without a per-step policy the export is version 2, every set whole: its size is the sum
$BIN replay "$TMP/t.kvt" --policies snapkv,adakv --budgets 24 --export-selection "$TMP/s2.bin" \
    -o "$TMP/r2.json" >/dev/null 2>&1 || fail "replay for a version-2 export"
$BIN info "$TMP/s2.bin" --json >"$TMP/s2.json" || fail "info --json, version 2"
grep -Eq '"selection_version":[[:space:]]*2,' "$TMP/s2.json" &&
    grep -Eq "\"file_bytes\":[[:space:]]*$(stat -c %s "$TMP/s2.bin")," "$TMP/s2.json" &&
    grep -Eq "\"whole_bytes\":[[:space:]]*$(stat -c %s "$TMP/s2.bin")," "$TMP/s2.json" ||
    { cat "$TMP/s2.json"; fail "info: a version-2 export's bytes"; }
# the export's strings are printed without their control characters (a terminal escape in a
# label, a trace path, a budget)
printf '%s' '{"selection_version":2,"generator":"g\u0007","policies":[{"label":"x\u001b[2J","name":"snapkv","granularity":"kv_head","per_step":false,"merged":false}],"budgets":["4\u001b"],"traces":["t\u001b]0;"],"records":[]}' >"$TMP/esc.json"
$BIN info "$TMP/esc.json" >"$TMP/out" 2>"$TMP/err" || { cat "$TMP/err"; fail "info of an export with escapes"; }
grep -q "$(printf '\033')" "$TMP/out" && fail "info printed a terminal escape"
grep -q "^x?\[2J " "$TMP/out" && grep -q "^traces     t?\]0;$" "$TMP/out" || { cat "$TMP/out"; fail "info: escapes shown as ?"; }
# an export cut short: the reader's one line
head -c 3000 "$TMP/sel.bin" >"$TMP/cut.bin"
$BIN info "$TMP/cut.bin" >/dev/null 2>"$TMP/err" && fail "info of a cut export"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "cut.bin: record .* is truncated" "$TMP/err" ||
    { cat "$TMP/err"; fail "info: cut export message"; }
# verify of an export: read whole by the checked reader; damaged is exit 1 with the reader's
# line, newer than this kvtrace exit 2
$BIN verify "$TMP/sel.bin" >"$TMP/out" 2>&1 || fail "verify of an intact export"
grep -q "^$TMP/sel.bin: OK (selection export, 1380 records, every one read and checked)$" "$TMP/out" ||
    fail "verify: intact export line: $(cat "$TMP/out")"
$BIN verify "$TMP/sel.bin" -q >"$TMP/out" 2>&1 && [ ! -s "$TMP/out" ] || fail "verify -q of an export"
$BIN verify "$TMP/cut.bin" >"$TMP/out" 2>&1
[ $? = 1 ] && grep -q "^$TMP/cut.bin: DAMAGED selection export: .*cut.bin: record .* is truncated" "$TMP/out" ||
    fail "verify of a cut export: $(cat "$TMP/out")"
$BIN verify "$TMP/cut.bin" --json >"$TMP/out" 2>&1
[ $? = 1 ] && grep -Eq '"intact":[[:space:]]*false' "$TMP/out" &&
    grep -Eq '"kind":[[:space:]]*"selection_export"' "$TMP/out" &&
    grep -Eq '"problem":[[:space:]]*".*is truncated' "$TMP/out" || fail "verify --json of a cut export"
{ head -c 8 "$TMP/sel.bin"; printf '\011\000\000\000'; tail -c +13 "$TMP/sel.bin"; } >"$TMP/v9.bin"
$BIN verify "$TMP/v9.bin" >/dev/null 2>"$TMP/err"
[ $? = 2 ] && grep -q "version 9 is newer" "$TMP/err" || fail "verify of a newer export: $(cat "$TMP/err")"
$BIN verify "$TMP/r.json" >/dev/null 2>"$TMP/err"
[ $? = 2 ] && grep -q "is a results.json" "$TMP/err" || fail "verify of a results.json"
# a results.json is named, with the commands that read it
$BIN info "$TMP/r.json" >/dev/null 2>"$TMP/err" && fail "info of a results.json"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "is a results.json (kvtrace replay -o), not a trace" "$TMP/err" ||
    { cat "$TMP/err"; fail "info: results.json message"; }
# existing output without --force
$BIN replay "$TMP/t.kvt" --policies snapkv -o "$TMP/r.json" 2>"$TMP/err" && fail "overwrote"
grep -q "exists" "$TMP/err" || fail "exists message"
# a window larger than the trace stores: one clear line naming it
$BIN replay "$TMP/t.kvt" --policies snapkv:window=64 -o "$TMP/x.json" 2>"$TMP/err" && fail "w"
grep -q "window=64 needs 64 stored window queries; the trace has 32" "$TMP/err" || fail "w msg"
# ... in the second of two traces: refused before the first trace is replayed (no progress
# line for it: the error is the only line), naming the trace (a budget of 32 of its 60 tokens:
# above them all, the short-prompt rule keeps it whole without a window, below)
$BIN capture-llama2c --model "$MODEL" --tokens 60 --decode 0 --window 8 -o "$TMP/w8.kvt" >/dev/null 2>&1 ||
    fail "capture w8"
KVT_PROGRESS=1 $BIN replay "$TMP/t.kvt" "$TMP/w8.kvt" --policies streamingllm,snapkv \
    --budgets 32,64 -o "$TMP/x.json" 2>"$TMP/err" && fail "w8"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "w8.kvt: policy snapkv: window=32 needs 32 stored window queries; the trace has 8" "$TMP/err" ||
    { cat "$TMP/err"; fail "w8 msg"; }
[ ! -e "$TMP/x.json" ] || fail "w8 wrote results"
# --device: a bad name is one clear line; cpu is recorded; auto runs (on the GPU if there is
# one, else on the CPU with a note); cuda without a usable GPU says why
$BIN replay "$TMP/t.kvt" --policies snapkv --device gpu -o "$TMP/x.json" 2>"$TMP/err" && fail "dev"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "expected cpu, cuda, cuda:LIST (cuda:0,2) or auto" "$TMP/err" || fail "dev msg"
grep -Eq '"device":[[:space:]]*"cpu"' "$TMP/r.json" || fail "device recorded"
$BIN replay "$TMP/t.kvt" --policies snapkv --device auto -o "$TMP/a.json" >/dev/null 2>"$TMP/err" ||
    fail "--device auto"
grep -Eq '"device":[[:space:]]*"(cpu|cuda)"' "$TMP/a.json" || fail "auto device recorded"
$BIN replay "$TMP/t.kvt" --policies snapkv --profile -o "$TMP/p.json" >/dev/null 2>"$TMP/err" ||
    fail "--profile"
grep -q "^profile: wall .* layers; summed over workers: read" "$TMP/err" || fail "profile line"
# a shard's profile too (its own layers), before the shard's line
$BIN replay "$TMP/t.kvt" --policies snapkv --profile --shard 0/2 -o "$TMP/ps.json" >/dev/null \
    2>"$TMP/err" || fail "--profile --shard"
grep -q "^profile: wall .* layers; summed over workers: read" "$TMP/err" ||
    fail "--profile --shard: no profile line"
grep -q "shard 0/2" "$TMP/err" || fail "--profile --shard: no shard line"
if ! $BIN replay "$TMP/t.kvt" --policies snapkv --device cuda -o "$TMP/c.json" >/dev/null \
    2>"$TMP/err"; then
    [ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "no usable CUDA device" "$TMP/err" ||
        fail "cuda message"
    # a build with CUDA on a machine without the driver says so (the runtime's own words are
    # "CUDA driver version is insufficient for CUDA runtime version")
    if ! grep -q "built without CUDA" "$TMP/err" && ! /sbin/ldconfig -p | grep -q 'libcuda\.so\.1 '; then
        grep -q "no NVIDIA driver: libcuda.so.1 is not installed" "$TMP/err" ||
            fail "cuda message without a driver: $(cat "$TMP/err")"
    fi
fi
# bad policy, bad budget, missing decode-dependent input
$BIN replay "$TMP/t.kvt" --policies nosuch -o "$TMP/x.json" 2>"$TMP/err" && fail "bad policy"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "unknown policy" "$TMP/err" || fail "policy message"
$BIN replay "$TMP/t.kvt" --budgets 0 -o "$TMP/x.json" 2>"$TMP/err" && fail "bad budget"
grep -q "bad budget" "$TMP/err" || fail "budget message"
$BIN capture-llama2c --model "$MODEL" --tokens 60 --decode 0 --window 32 -o "$TMP/nd.kvt" \
    >/dev/null 2>&1 || fail "capture 2"
$BIN replay "$TMP/nd.kvt" --policies oracle -o "$TMP/x.json" 2>"$TMP/err" && fail "oracle"
grep -q "Q_decode" "$TMP/err" || fail "oracle message"
# an output that is one of the inputs is refused, even with --force, and the input survives
cp "$TMP/nd.kvt" "$TMP/nd_copy.kvt"
$BIN replay "$TMP/nd.kvt" -o "$TMP/nd.kvt" --force 2>"$TMP/err" && fail "output = input"
grep -q "also an input" "$TMP/err" || fail "output = input message"
cmp -s "$TMP/nd.kvt" "$TMP/nd_copy.kvt" || fail "input was modified"
# the traces of one replay are prompts of one model, each given once: refused before any work
$BIN synth --shape tiny --tokens 64 -o "$TMP/tiny.kvt" >/dev/null 2>&1 || fail "synth"
$BIN replay "$TMP/nd.kvt" "$TMP/tiny.kvt" -o "$TMP/mix.json" 2>"$TMP/err" && fail "two models"
[ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "another model (L=2 Hq=4 Hkv=2 D=16)" "$TMP/err" ||
    fail "two models message: $(cat "$TMP/err")"
$BIN replay "$TMP/nd.kvt" "$TMP/./nd.kvt" -o "$TMP/mix.json" 2>"$TMP/err" && fail "twice"
grep -q "is given twice" "$TMP/err" || fail "twice message"
[ -e "$TMP/mix.json" ] && fail "wrote a result"
$BIN replay "$TMP/nd.kvt" "$TMP/t.kvt" --policies snapkv --budgets 16 -o "$TMP/two.json" \
    >/dev/null 2>"$TMP/err" || fail "two prompts of one model"
grep -q "warning" "$TMP/err" && fail "two prompts of one model: $(cat "$TMP/err")"
# one shape, another model name or RoPE: replayed, with a warning naming both
$BIN synth --shape tiny-vl --tokens 64 -o "$TMP/tinyvl.kvt" >/dev/null 2>&1 || fail "synth vl"
$BIN replay "$TMP/tiny.kvt" "$TMP/tinyvl.kvt" --policies snapkv --budgets 16 -o "$TMP/mix.json" \
    >/dev/null 2>"$TMP/err" || fail "two models of one shape: $(cat "$TMP/err")"
grep -q "warning: .*tinyvl.kvt's model .*synthetic-tiny-vl.*mrope.* differs from .*tiny.kvt's" \
    "$TMP/err" || fail "model warning: $(cat "$TMP/err")"
rm -f "$TMP/mix.json"
# budgets a reader of the table would misread: two of the same tokens (16 and 25% of 64),
# budgets below the window policies' window (they tie), every budget keeping the whole prompt
$BIN replay "$TMP/tiny.kvt" --policies snapkv,adakv,knorm --budgets 4,16,25% \
    -o "$TMP/bn1.json" >/dev/null 2>"$TMP/err" || fail "budget notes run"
grep -q "warning: .*tiny.kvt: budgets 16 and 25% are both 16 tokens: their rows repeat" \
    "$TMP/err" && grep -q "at budgets 4, 16, 25%, up to 2 policies have an observation window above the budget (up to 32 tokens)" \
    "$TMP/err" || fail "budget notes: $(cat "$TMP/err")"
$BIN replay "$TMP/tiny.kvt" --policies snapkv --budgets 64,100% -o "$TMP/bn2.json" >/dev/null \
    2>"$TMP/err" || fail "whole-prompt budgets run"
grep -q "every budget keeps the whole prompt (T=64): nothing is compressed" "$TMP/err" ||
    fail "whole-prompt note: $(cat "$TMP/err")"
# a prompt shorter than the window policies' window of 32 (T=20, 20 window queries stored):
# budgets above T keep it whole with every default policy, the window unused (the short-prompt
# rule); a budget inside the prompt needs the window, and says so in one line
$BIN synth --shape tiny --tokens 20 -o "$TMP/t20.kvt" >/dev/null 2>&1 || fail "synth T=20"
$BIN replay "$TMP/t20.kvt" --budgets 32,64 -o "$TMP/t20.json" >"$TMP/out" 2>"$TMP/err" ||
    fail "short prompt: $(cat "$TMP/err")"
awk '$2 == 32 || $2 == 64 { n++; if ($3 != "100.0%" || $4 != "1.0000") bad++ }
     END { exit !(n >= 20 && !bad) }' "$TMP/out" || fail "short prompt not kept whole: $(cat "$TMP/out")"
$BIN replay "$TMP/t20.kvt" --policies snapkv --budgets 8,64 -o "$TMP/t20b.json" >/dev/null \
    2>"$TMP/err" && fail "a budget inside a prompt shorter than the window was replayed"
[ "$(wc -l <"$TMP/err")" = 1 ] && [ ! -e "$TMP/t20b.json" ] &&
    grep -q "policy snapkv: window=32 needs 32 stored window queries; the trace has 20" "$TMP/err" ||
    fail "short prompt, budget inside it: $(cat "$TMP/err")"
# a trace path that is not UTF-8 cannot be named in results.json (JSON is UTF-8: a raw 0xFF
# byte makes the file unreadable to other parsers): refused before any work, one line; a
# UTF-8 name works
bad=$TMP/$(printf 'bad\xffname').kvt
cp "$TMP/tiny.kvt" "$bad" && cp "$TMP/tiny.kvt" "$TMP/café.kvt"
$BIN replay "$bad" --policies snapkv --budgets 40 -o "$TMP/u.json" >/dev/null 2>"$TMP/err" &&
    fail "a non-UTF-8 path was accepted"
[ "$(wc -l <"$TMP/err")" = 1 ] && grep -q "is not valid UTF-8 (byte " "$TMP/err" &&
    [ ! -e "$TMP/u.json" ] || fail "non-UTF-8 path: $(cat "$TMP/err")"
$BIN info --json "$bad" >/dev/null 2>&1 && fail "info --json accepted a non-UTF-8 path"
$BIN e2e-llama2c "$bad" --model "$MODEL" --policies snapkv --budgets 40 -o "$TMP/u.json" \
    >/dev/null 2>"$TMP/err" && fail "e2e-llama2c accepted a non-UTF-8 path"
grep -q "is not valid UTF-8" "$TMP/err" || fail "e2e non-UTF-8 path: $(cat "$TMP/err")"
cp "$MODEL" "$bad.bin"
$BIN e2e-llama2c "$TMP/tiny.kvt" --model "$bad.bin" --policies snapkv --budgets 40 \
    -o "$TMP/u.json" >/dev/null 2>"$TMP/err" && fail "e2e-llama2c accepted a non-UTF-8 model path"
LC_ALL=C grep -q "the path .* is not valid UTF-8" "$TMP/err" || fail "e2e model path: $(cat "$TMP/err")"
$BIN replay "$TMP/tiny.kvt" --policies "snapkv:label=$(printf 'a\xff')" --budgets 40 \
    -o "$TMP/u.json" >/dev/null 2>"$TMP/err" && fail "a non-UTF-8 policy label was accepted"
LC_ALL=C grep -q "^kvtrace replay: error: --policies .* is not valid UTF-8" "$TMP/err" ||
    fail "non-UTF-8 label: $(cat "$TMP/err")"
rm -f "$bad.bin"
$BIN replay "$TMP/café.kvt" --policies snapkv --budgets 40 -o "$TMP/u.json" >/dev/null 2>&1 &&
    grep -q 'café.kvt' "$TMP/u.json" || fail "a UTF-8 path"
rm -f "$bad" "$TMP/café.kvt" "$TMP/u.json"
# a window covering the whole prompt (recency at every budget), two budgets above the prompt
# (their rows repeat)
$BIN replay "$TMP/tiny.kvt" --policies snapkv,knorm:window=64 --budgets 40,100,200 \
    -o "$TMP/bn3.json" >/dev/null 2>"$TMP/err" || fail "budget notes run 3"
grep -q "knorm:window=64's observation window (64 tokens) covers the whole prompt (T=64): it keeps the last B tokens at every budget" "$TMP/err" &&
    grep -q "budgets 100 and 200 both keep the whole prompt (T=64): their rows repeat" "$TMP/err" &&
    [ "$(grep -c warning "$TMP/err")" = 2 ] || fail "budget notes 3: $(cat "$TMP/err")"
# a trace cut short in its decode records (layers 0-2 of 5 hold them): replayed with warnings
# that it is incomplete and has no decode metrics; a policy that needs decode queries says
# which layer lacks them and why (it said the trace had none)
SAMPLE=$KVT_SOURCE_ROOT/traces/samples/stories260K.kvt
$BIN replay "$SAMPLE" --policies snapkv --budgets 24 -o "$TMP/d.json" >/dev/null \
    2>"$TMP/err" || fail "replay the sample"
grep -q "warning" "$TMP/err" && fail "whole trace: $(cat "$TMP/err")"
head -c 700000 "$SAMPLE" >"$TMP/cut.kvt" # (of 758 KiB: the decode records of layers 0-2 stay)
$BIN info "$TMP/cut.kvt" | grep -q "^Q_decode  *3 " || fail "cut: $($BIN info "$TMP/cut.kvt")"
$BIN replay "$TMP/cut.kvt" --policies snapkv --budgets 24 -o "$TMP/cut.json" >/dev/null \
    2>"$TMP/err" || fail "replay cut: $(cat "$TMP/err")"
grep -q "warning: .*cut.kvt is incomplete (.*recovered by scanning)" "$TMP/err" &&
    grep -q "warning: .*cut.kvt: no decode metrics: not every layer holds decode steps (some hold 64)" \
        "$TMP/err" || fail "cut trace warnings: $(cat "$TMP/err")"
$BIN replay "$TMP/cut.kvt" --policies oracle --budgets 24 -o "$TMP/cut2.json" 2>"$TMP/err" &&
    fail "oracle on a cut trace"
grep -q "in every layer, and layer 3 has none (the trace is incomplete" "$TMP/err" ||
    fail "oracle on a cut trace: $(cat "$TMP/err")"
# an option right after a bare name opens its list; an option given twice is refused
$BIN replay "$TMP/nd.kvt" --policies adakv,alpha=0.5,snapkv --budgets 16 -o "$TMP/o.json" \
    >"$TMP/out" 2>&1 || fail "adakv,alpha=0.5: $(cat "$TMP/out")"
grep -q "^adakv:alpha=0.5 " "$TMP/out" || fail "adakv,alpha=0.5 label"
$BIN replay "$TMP/nd.kvt" --policies snapkv:window=32,window=8 -o "$TMP/o2.json" 2>"$TMP/err" &&
    fail "window twice"
grep -q "option 'window' given twice" "$TMP/err" || fail "window twice message"
$BIN replay --list-policies | grep -q "alpha=0.2," || fail "--list-policies shows 0.2 as 0.2"
# usage errors exit 2 with one line: an empty policy list (was "out of memory", exit 1),
# options on 'all', window=0 for a policy that ranks by window queries (was a per-layer error,
# exit 1), no -o
usage() { # usage WANT ARGS...: exit 2, one line containing WANT
    local want=$1
    shift
    $BIN replay "$@" 2>"$TMP/err" >/dev/null
    local rc=$?
    [ $rc -eq 2 ] && [ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -qF -- "$want" "$TMP/err" ||
        fail "replay $*: exit $rc, $(cat "$TMP/err")"
}
usage "an empty policy list" "$TMP/nd.kvt" --policies "" -o "$TMP/u.json"
usage "an empty policy list" "$TMP/nd.kvt" --policies "," -o "$TMP/u.json"
usage "'all' takes no options" "$TMP/nd.kvt" --policies all:window=16 -o "$TMP/u.json"
usage "window=0: it ranks by the window queries" "$TMP/nd.kvt" --policies snapkv:window=0 \
    -o "$TMP/u.json"
usage "no output file" "$TMP/nd.kvt" --policies snapkv
usage "--window 0" "$TMP/nd.kvt" --window 0 -o "$TMP/u.json"
$BIN replay "$TMP/nd.kvt" --policies knorm:window=0 --budgets 16 -o "$TMP/u.json" >/dev/null \
    2>&1 || fail "knorm:window=0 (it keeps no window: fine)"
# --budgets twice adds up, as --policies does (it kept only the last list)
$BIN replay "$TMP/nd.kvt" --policies snapkv --budgets 16 --budgets 24 -o "$TMP/b2.json" \
    >"$TMP/out" 2>&1 || fail "--budgets twice"
[ "$(grep -c '^snapkv ' "$TMP/out")" -eq 2 ] || fail "--budgets twice: $(cat "$TMP/out")"
# --window W: every window policy without its own window=; a trace with W = 16 replays
$BIN capture-llama2c --model "$MODEL" --tokens 60 --decode 2 --window 16 -o "$TMP/w16.kvt" \
    >/dev/null 2>&1 || fail "capture W=16"
$BIN replay "$TMP/w16.kvt" --policies snapkv --budgets 24 -o "$TMP/w.json" 2>"$TMP/err" &&
    fail "W=16 with the default window 32"
grep -q -- "--window" "$TMP/err" || fail "the message does not point at --window"
$BIN replay "$TMP/w16.kvt" --window 16 --policies snapkv,adakv,snapkv:window=8,knorm \
    --budgets 24 -o "$TMP/w.json" >/dev/null 2>&1 || fail "--window 16"
tr -d ' \t\n' <"$TMP/w.json" | grep -o '"label":"[^"]*","name":"[a-z]*","options":{[^}]*}' \
    >"$TMP/opts"
grep -q '"label":"snapkv",.*"window":16' "$TMP/opts" &&
    grep -q '"label":"adakv",.*"window":16' "$TMP/opts" &&
    grep -q '"label":"snapkv:window=8",.*"window":8' "$TMP/opts" &&
    ! grep -q '"label":"knorm",.*"window":16' "$TMP/opts" || fail "--window 16: $(cat "$TMP/opts")"
# labels longer than the table's column are printed whole, so two specs never look alike
$BIN replay "$TMP/nd.kvt" --budgets 16 -o "$TMP/l.json" \
    --policies "snapkv:window=32,kernel=7,pool=max,snapkv:window=32,kernel=7,pool=avg" \
    >"$TMP/out" 2>&1 || fail "long labels"
grep -q "^snapkv:window=32,kernel=7,pool=max " "$TMP/out" &&
    grep -q "^snapkv:window=32,kernel=7,pool=avg " "$TMP/out" || fail "labels cut: $(cat "$TMP/out")"
# expected-attention needs Q_all: one clear line without it; with it (llama2.c's interleaved
# RoPE, and synth's rotate_half) it runs, keeping the 4 sinks first at every budget
$BIN replay "$TMP/t.kvt" --policies expected-attention --budgets 24 -o "$TMP/ea.json" \
    2>"$TMP/err" && fail "expected-attention without Q_all"
grep -q "t.kvt: policy expected-attention needs every prompt query (Q_all), which the trace does not have: capture with --q-all" \
    "$TMP/err" && [ "$(wc -l <"$TMP/err")" = 1 ] || fail "no Q_all message: $(cat "$TMP/err")"
$BIN capture-llama2c --model "$MODEL" --tokens 60 --decode 2 --window 8 --q-all \
    -o "$TMP/qa.kvt" >/dev/null 2>&1 || fail "capture --q-all"
$BIN synth --shape tiny --tokens 80 --q-all -o "$TMP/sqa.kvt" >/dev/null 2>&1 || fail "synth"
for tr in qa sqa; do
    $BIN replay "$TMP/$tr.kvt" --policies expected-attention,expected-attention:heads=query \
        --budgets 4,9,30% --export-selection "$TMP/ea_$tr.json" -o "$TMP/ea_$tr.r.json" \
        >/dev/null 2>"$TMP/err" || fail "expected-attention on $tr: $(cat "$TMP/err")"
    n4=$(grep -c '"budget_tokens":4,' "$TMP/ea_$tr.json")
    n4s=$(grep -c '"budget_tokens":4,.*"kept":\[0,1,2,3\]}' "$TMP/ea_$tr.json")
    [ "$n4" -gt 0 ] && [ "$n4" = "$n4s" ] || fail "$tr: budget 4 keeps other than the sinks"
done
# a budget of exactly T keeps the whole prompt for every policy, head-adaptive ones included
# (adakv kept 99.8%, hybridkv-like 96-98%, sparsemm 86% there: their allocations still shared
# it); the summary table prints each policy's kept share
printf '[[1,2,3,4,5,6,7,8],[8,7,6,5,4,3,2,1],[1,1,1,1,2,2,2,2],[2,1,2,1,2,1,2,1],[3,3,1,1,3,3,1,1]]' \
    >"$TMP/hs.json"
$BIN replay "$TMP/t.kvt" --policies adakv,mixkv-adakv,hybridkv-like,hybridkv-like:window=8,sparsemm:scores="$TMP/hs.json",headkv:scores="$TMP/hs.json",chunkkv,pyramidkv,mixkv-sparsemm:scores="$TMP/hs.json" \
    --budgets 120,100% --threads 1 -o "$TMP/bt.json" >"$TMP/out" 2>"$TMP/err" ||
    { cat "$TMP/err"; fail "replay B = T"; }
n=$(grep -cE ' (120|100%) +(100|200)\.0% ' "$TMP/out") # headkv: per query head, 2 per KV head
[ "$n" -eq 18 ] || { cat "$TMP/out"; fail "B = T: $n of 18 settings keep the whole prompt"; }
# a trace cut inside the prompt, with a policy that needs decode queries: the message says the
# trace is incomplete (it said to capture decode steps, though the capture had them)
sz=$(wc -c <"$TMP/t.kvt")
head -c $((sz / 2)) "$TMP/t.kvt" >"$TMP/cut.kvt"
$BIN replay "$TMP/cut.kvt" --policies quest --budgets 16 -o "$TMP/cutq.json" >/dev/null 2>"$TMP/err" &&
    fail "cut trace: accepted"
grep -q "needs decode queries (Q_decode), and .*cut.kvt holds none: the trace is incomplete (recovered by scanning), cut short inside the prompt" \
    "$TMP/err" && [ "$(wc -l <"$TMP/err")" -eq 1 ] || { cat "$TMP/err"; fail "cut trace: message"; }
# ... but a trace whose capture planned no decode steps, cut short, is told it has none
$BIN synth --shape tiny --tokens 64 --decode 0 -o "$TMP/nd0.kvt" >/dev/null 2>&1 || fail "synth nd0"
sz=$(wc -c <"$TMP/nd0.kvt")
head -c $((sz - 200)) "$TMP/nd0.kvt" >"$TMP/nd0cut.kvt"
$BIN replay "$TMP/nd0cut.kvt" --policies quest --budgets 16 -o "$TMP/nd0q.json" >/dev/null \
    2>"$TMP/err" && fail "nd0 cut: accepted"
grep -q "needs decode queries (Q_decode), which .*nd0cut.kvt does not have; capture decode steps" \
    "$TMP/err" || { cat "$TMP/err"; fail "nd0 cut: message"; }
# empty paths: one line saying so (it printed "error: : : No such file or directory", or blamed
# a missing -o when --export-selection was empty)
for args in "info ''" "verify ''" "replay '' --policies snapkv -o $TMP/e1.json" \
    "replay $TMP/t.kvt --policies snapkv -o ''" \
    "replay $TMP/t.kvt --policies snapkv --export-selection '' -o $TMP/e2.json" \
    "recommend ''" "report $TMP/r.json -o ''"; do
    eval "$BIN $args" >/dev/null 2>"$TMP/err" && fail "$args: accepted"
    grep -Eq "error: an empty (output )?(path|directory)" "$TMP/err" &&
        [ "$(wc -l <"$TMP/err")" -eq 1 ] || { cat "$TMP/err"; fail "$args: message"; }
done
# a byte-identical copy of a trace: replayed, with a warning that the prompt counts twice
cp "$TMP/t.kvt" "$TMP/copy.kvt"
$BIN replay "$TMP/t.kvt" "$TMP/copy.kvt" --policies snapkv --budgets 32 -o "$TMP/cp.json" \
    >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "copy: replay"; }
grep -q "warning: .*copy.kvt holds the same capture as .*t.kvt (fingerprint [0-9a-f]*): that prompt counts twice" \
    "$TMP/err" || { cat "$TMP/err"; fail "copy: no warning"; }
echo "test_replay_cli: ok"
