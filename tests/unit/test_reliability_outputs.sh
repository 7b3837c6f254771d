#!/usr/bin/env bash
# test_reliability_outputs.sh - output files under a full disk and against overwriting:
# - `kvtrace replay -o results.json --export-selection FILE --force` under `ulimit -f` at 7
#   sizes (1..32 KiB, so the selection export or results.json or both hit the limit) and with
#   a JSON export: exit 1 with one stderr line giving the reason, the old results.json and
#   the old export byte-identical, no temporary left in the directory; without old files,
#   nothing is created;
# - existing-output protection for every command that writes: replay -o and
#   --export-selection, report -o, synth -o, capture-llama2c -o, merge -o: an existing output
#   needs --force, and an output that is one of the inputs is refused even with --force;
# - what is not a regular file: a FIFO as any input is refused at once (it would block open()
#   for good), a FIFO or a directory as an existing output is never replaced, even with
#   --force; an output directory that is missing, or one that takes no new file (/proc, even
#   to root), is refused before the work;
# - synth --force over an existing trace that dies mid-write (ulimit -f) keeps the old trace;
# - synth --force, replay --export-selection and report interrupted (SIGTERM, SIGHUP) remove their
#   temporaries and end by the signal;
# - a 250-character output name works (the temporary name must fit NAME_MAX too);
# - -o X with --export-selection ./X is refused;
# - a report removes the staging directory a killed report of this machine left.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
S=$ROOT/traces/samples/stories260K.kvt
MODEL=$ROOT/models/stories260K.bin
[ -f "$S" ] && [ -f "$MODEL" ] || { echo "SKIP: no sample trace or model"; exit 77; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0; pass=0
check() { if eval "$2"; then pass=$((pass+1)); else echo "FAILED: $1"; fail=$((fail+1)); fi; }
lines() { wc -l <"$1"; }
no_temps() { ! ls -a "$TMP" | grep -q '\.tmp\.\|^\.kvt-.*\.tmp$'; }
R="$BIN replay $S --policies snapkv,h2o --budgets 8,16 --threads 1"

# ---- replacing an output (--force) keeps its permissions, and a symbolic link's target is
# replaced (the link stays), as for traces ----
$R -o "$TMP/p.json" --export-selection "$TMP/p.sel" >/dev/null 2>&1 || { echo "FAILED: setup"; exit 1; }
chmod 600 "$TMP/p.json" "$TMP/p.sel"
mkdir -p "$TMP/links" && ln -s ../p.json "$TMP/links/l.json" && ln -s ../p.sel "$TMP/links/l.sel"
$R -o "$TMP/links/l.json" --export-selection "$TMP/links/l.sel" --force >/dev/null 2>&1
check "replay --force over links: the links stay, their targets replaced with mode 600" \
    "[ -L $TMP/links/l.json ] && [ -L $TMP/links/l.sel ] && [ \$(stat -c %a $TMP/p.json) = 600 ] && [ \$(stat -c %a $TMP/p.sel) = 600 ] && [ $TMP/p.json -nt $TMP/links ] && ! ls -a $TMP/links | grep -q tmp"
ln -s nowhere.json "$TMP/links/dang.json"
$R -o "$TMP/links/dang.json" >/dev/null 2>"$TMP/err"
check "replay -o a link to a missing file: refused before the work, one line" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'symbolic link to a missing file' $TMP/err && ! grep -q 'writing the results' $TMP/err"
rm -rf "$TMP/links" "$TMP/p.json" "$TMP/p.sel"

# ---- write failures: full disk during replay output ----
$R -o "$TMP/r.json" --export-selection "$TMP/s.bin" >/dev/null 2>&1 || { echo "FAILED: setup"; exit 1; }
$R -o "$TMP/rj.json" --export-selection "$TMP/s.json" >/dev/null 2>&1 || { echo "FAILED: setup"; exit 1; }
cp "$TMP/r.json" "$TMP/r.old"; cp "$TMP/s.bin" "$TMP/s.old"; cp "$TMP/s.json" "$TMP/sj.old"
echo "sizes: results.json $(stat -c %s "$TMP/r.json"), selection $(stat -c %s "$TMP/s.bin") (binary) $(stat -c %s "$TMP/s.json") (JSON) bytes"
n_limits=0
for lim in 1 2 4 8 12 16 32; do   # KiB (ulimit -f blocks of 1024 bytes)
    n_limits=$((n_limits+1))
    (ulimit -f $lim; exec $R -o "$TMP/r.json" --export-selection "$TMP/s.bin" --force) \
        >/dev/null 2>"$TMP/err"
    rc=$?
    check "limit ${lim}K: exit 1 (got $rc)" "[ $rc -eq 1 ]"
    check "limit ${lim}K: one stderr line" "[ \$(lines $TMP/err) -eq 1 ]"
    check "limit ${lim}K: says why" "grep -q 'File too large' $TMP/err"
    check "limit ${lim}K: old results.json untouched" "cmp -s $TMP/r.json $TMP/r.old"
    check "limit ${lim}K: old selection untouched" "cmp -s $TMP/s.bin $TMP/s.old"
    check "limit ${lim}K: no temporary left" "no_temps"
done
(ulimit -f 8; exec $R -o "$TMP/rj.json" --export-selection "$TMP/s.json" --force) \
    >/dev/null 2>"$TMP/err"
check "JSON export, limit 8K: exit 1, one line" "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ]"
check "JSON export: old export untouched" "cmp -s $TMP/s.json $TMP/sj.old"
(ulimit -f 16; exec $R -o "$TMP/new.json" --export-selection "$TMP/new.bin") >/dev/null 2>&1
check "no old files: exit 1 and nothing created" \
    "[ \$? -eq 1 ] && [ ! -e $TMP/new.json ] && [ ! -e $TMP/new.bin ] && no_temps"
(ulimit -f 4; exec $R -o "$TMP/r.json" --force) >/dev/null 2>"$TMP/err"
check "results only, limit 4K: exit 1, old file untouched" \
    "[ \$? -eq 1 ] && cmp -s $TMP/r.json $TMP/r.old && no_temps"
check "without a limit the same command replaces both" \
    "$R -o $TMP/r.json --export-selection $TMP/s.bin --force >/dev/null 2>&1 && cmp -s $TMP/r.json $TMP/r.old && cmp -s $TMP/s.bin $TMP/s.old"
echo "replay output: $n_limits size limits plus 3 cases"

# merge writes through the same atomic writer; kvtrace ignores SIGXFSZ, so a file size
# limit is a clean error (EFBIG), not a kill that leaves a temporary behind.
$BIN replay $S --policies snapkv --budgets 8 --threads 1 --shard 0/2 -o "$TMP/p0.json" >/dev/null 2>&1
$BIN replay $S --policies snapkv --budgets 8 --threads 1 --shard 1/2 -o "$TMP/p1.json" >/dev/null 2>&1
cp "$TMP/r.json" "$TMP/m.json"
(ulimit -f 2; exec $BIN merge "$TMP/p0.json" "$TMP/p1.json" -o "$TMP/m.json" --force) >/dev/null 2>"$TMP/err"
rc=$?
check "merge under a 2K limit: old output untouched" "cmp -s $TMP/m.json $TMP/r.old"
check "merge under a 2K limit: exit 1 with one line (got $rc)" \
    "[ $rc -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && no_temps"
rm -f "$TMP"/*.tmp.*

# ---- existing outputs and inputs ----
echo old > "$TMP/exists.json"
$R -o "$TMP/exists.json" >/dev/null 2>"$TMP/err"
check "replay -o existing: exit 1, one line, untouched" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q exists $TMP/err && [ \"\$(cat $TMP/exists.json)\" = old ]"
$R -o "$TMP/x1.json" --export-selection "$TMP/exists.json" >/dev/null 2>"$TMP/err"
check "replay --export-selection existing: exit 1, nothing written" \
    "[ \$? -eq 1 ] && grep -q exists $TMP/err && [ ! -e $TMP/x1.json ] && [ \"\$(cat $TMP/exists.json)\" = old ]"
cp "$S" "$TMP/in.kvt"
$BIN replay "$TMP/in.kvt" --policies snapkv --budgets 8 -o "$TMP/x2.json" \
    --export-selection "$TMP/in.kvt" --force >/dev/null 2>"$TMP/err"
check "replay --export-selection = input, --force: refused, input intact" \
    "[ \$? -eq 1 ] && grep -q 'also an input' $TMP/err && cmp -s $TMP/in.kvt $S"
$BIN replay "$TMP/in.kvt" --policies snapkv --budgets 8 -o "$TMP/in.kvt" --force >/dev/null 2>"$TMP/err"
check "replay -o = input, --force: refused, input intact" \
    "[ \$? -eq 1 ] && grep -q 'also an input' $TMP/err && cmp -s $TMP/in.kvt $S"
$BIN replay "$TMP/in.kvt" --policies snapkv --budgets 8 -o "$TMP/same" \
    --export-selection "$TMP/same" >/dev/null 2>"$TMP/err"
check "replay --export-selection = -o: refused (usage, exit 2)" "[ \$? -eq 2 ] && [ \$(lines $TMP/err) -eq 1 ] && [ ! -e $TMP/same ]"

$BIN report "$TMP/r.json" -o "$TMP/r.json" >/dev/null 2>"$TMP/err"
check "report -o = the results file: exit 1, one line, input intact" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && cmp -s $TMP/r.json $TMP/r.old"
mkdir -p "$TMP/rd" && cp "$TMP/r.json" "$TMP/rd/index.html"
$BIN report "$TMP/rd/index.html" -o "$TMP/rd" >/dev/null 2>&1
check "report RESULTS=DIR/index.html -o DIR: refused, input intact" "cmp -s $TMP/rd/index.html $TMP/r.old"
$BIN report "$TMP/rd/index.html" -o "$TMP/rd" --force >/dev/null 2>&1
check "... even with --force" "cmp -s $TMP/rd/index.html $TMP/r.old"
$BIN report "$TMP/r.json" -o "$TMP/rep1" >/dev/null 2>&1
$BIN report "$TMP/r.json" -o "$TMP/rep1" >/dev/null 2>"$TMP/err"
check "report into an existing report without --force: exit 1, one line" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q -- --force $TMP/err"
check "report into an existing report with --force: replaced" \
    "$BIN report $TMP/r.json -o $TMP/rep1 --force >/dev/null 2>&1"
# a folder of the user's own files, one named like a figure, and no report in it: nothing of
# the user's is overwritten, with or without --force (which replaces a report, not the user's
# files)
mkdir -p "$TMP/figs" && echo mine >"$TMP/figs/redundancy.png"
for f in "" --force; do
    $BIN report "$TMP/r.json" -o "$TMP/figs" $f >/dev/null 2>"$TMP/err"
    check "report ${f:-(no --force)} into a folder with the user's redundancy.png: exit 1, one line, kept" \
        "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'redundancy.png exists and .*holds no report' $TMP/err && [ \"\$(cat $TMP/figs/redundancy.png)\" = mine ] && [ ! -e $TMP/figs/index.html ] && ! ls -a $TMP/figs | grep -q kvt-report"
done
# a report whose page is gone (deleted, or a commit cut short: the file list is moved first)
# is still a report: replaced with --force, refused without
$BIN report "$TMP/r.json" -o "$TMP/nopage" >/dev/null 2>&1 && rm "$TMP/nopage/index.html"
$BIN report "$TMP/r.json" -o "$TMP/nopage" >/dev/null 2>"$TMP/err"
check "report into a report without its page, no --force: exit 1, one line naming its file list" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'holds the files of a report' $TMP/err"
check "report into a report without its page, --force: replaced" \
    "$BIN report $TMP/r.json -o $TMP/nopage --force >/dev/null 2>&1 && [ -f $TMP/nopage/index.html ]"
rm -rf "$TMP/nopage"
# a report that fails half-way (a full disk) leaves the previous one whole: at 8K no figure
# fits, at 64K every figure fits but not index.html (which inlines them), so moving the
# figures into place as they were drawn would have mixed new figures with the old page
$BIN replay $S --policies snapkv,tova --budgets 8,16 --threads 1 -o "$TMP/r2.json" >/dev/null 2>&1
cp -r "$TMP/rep1" "$TMP/rep1.old"
for lim in 8 64; do
    (ulimit -f $lim; exec $BIN report "$TMP/r2.json" -o "$TMP/rep1" --force) >/dev/null 2>"$TMP/err"
    rc=$?
    want=index.html  # the case the limit is for: a figure at 8K, the page at 64K
    [ $lim = 8 ] && want=.png
    check "report --force under a ${lim}K limit: exit 1 (got $rc), one line, on $want" \
        "[ $rc -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'File too large' $TMP/err && grep -qF '$want: File' $TMP/err"
    check "report under a ${lim}K limit: the previous report unchanged, no staging left" \
        "diff -r $TMP/rep1 $TMP/rep1.old >/dev/null && ! ls -a $TMP/rep1 | grep -q kvt-report"
done
rm "$TMP/rep1.old/coverage.png" && mkfifo "$TMP/rep1.old/coverage.png"
$BIN report "$TMP/r2.json" -o "$TMP/rep1.old" --force >/dev/null 2>"$TMP/err"
check "report over a FIFO named like a figure: exit 1, one line naming it, nothing replaced" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'coverage.png exists and is not a regular file' $TMP/err && [ -p $TMP/rep1.old/coverage.png ] && cmp -s $TMP/rep1.old/index.html $TMP/rep1/index.html && ! ls -a $TMP/rep1.old | grep -q kvt-report"
check "report without a limit: the new report replaces it" \
    "$BIN report $TMP/r2.json -o $TMP/rep1 --force >/dev/null 2>&1 && [ -f $TMP/rep1/heat_err_decode_01_tova.png ] && ! ls -a $TMP/rep1 | grep -q kvt-report"
# a report replacing one with more policies removes the old figures the new one lacks (listed
# in the old report's .kvtrace-report-files), and leaves the user's own files alone
$BIN replay $S --policies snapkv --budgets 8,16 --threads 1 -o "$TMP/r3.json" >/dev/null 2>&1
echo mine >"$TMP/rep1/notes.txt" && echo mine >"$TMP/rep1/my_plot.png"
check "report --force with fewer policies: tova's figures gone, the user's files kept" \
    "$BIN report $TMP/r3.json -o $TMP/rep1 --force >/dev/null 2>&1 && [ -f $TMP/rep1/heat_err_decode_00_snapkv.png ] && ! ls $TMP/rep1 | grep -q tova && [ -f $TMP/rep1/notes.txt ] && [ -f $TMP/rep1/my_plot.png ] && [ \$(ls $TMP/rep1 | grep -v my_plot | grep -c '\.png\$') -eq \$(grep -c '\.png\$' $TMP/rep1/.kvtrace-report-files) ]"

# a killed report leaves its staging directory (.kvt-report-HOST-PID-XXXXXX); the next report
# into that directory removes it once PID is gone, and leaves a running report's (this
# shell's PID) and another machine's alone
host=$(hostname | tr -c 'A-Za-z0-9.\n' '_')
sleep 0 & dead=$!
wait $dead
for st in "$host-$dead-aB3dE9" "$host-$$-aB3dE9" "other_host-$dead-aB3dE9"; do
    mkdir "$TMP/rep1/.kvt-report-$st" && echo x >"$TMP/rep1/.kvt-report-$st/coverage.png"
done
check "a report removes the staging directory of a killed report (PID $dead), keeps the others" \
    "$BIN report $TMP/r2.json -o $TMP/rep1 --force >/dev/null 2>&1 && [ ! -e $TMP/rep1/.kvt-report-$host-$dead-aB3dE9 ] && [ -f $TMP/rep1/.kvt-report-$host-$$-aB3dE9/coverage.png ] && [ -f $TMP/rep1/.kvt-report-other_host-$dead-aB3dE9/coverage.png ] && [ \$(ls -a $TMP/rep1 | grep -c kvt-report) -eq 2 ]"
rm -rf "$TMP"/rep1/.kvt-report-*

$BIN synth --shape tiny --tokens 64 -o "$TMP/syn.kvt" >/dev/null 2>&1
cp "$TMP/syn.kvt" "$TMP/syn.old"
$BIN synth --shape tiny --tokens 64 --seed 2 -o "$TMP/syn.kvt" >/dev/null 2>"$TMP/err"
check "synth -o existing: exit 1, one line, untouched" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && cmp -s $TMP/syn.kvt $TMP/syn.old"
check "synth -o existing --force: replaced" \
    "$BIN synth --shape tiny --tokens 64 --seed 2 -o $TMP/syn.kvt --force >/dev/null 2>&1 && ! cmp -s $TMP/syn.kvt $TMP/syn.old"

C="$BIN capture-llama2c --tokens 16 --decode 2 --window 4"
cp "$MODEL" "$TMP/m.bin"
$C --model "$TMP/m.bin" -o "$TMP/m.bin" --force >/dev/null 2>"$TMP/err"
check "capture -o = model, --force: refused, model intact" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'also an input' $TMP/err && cmp -s $TMP/m.bin $MODEL"
printf '1 20 30 40 50\n' > "$TMP/ids.txt"; cp "$TMP/ids.txt" "$TMP/ids.old"
$BIN capture-llama2c --model "$MODEL" --prompt-ids "$TMP/ids.txt" --decode 2 --window 4 \
    -o "$TMP/ids.txt" --force >/dev/null 2>"$TMP/err"
check "capture -o = prompt ids, --force: refused, intact" \
    "[ \$? -eq 1 ] && grep -q 'also an input' $TMP/err && cmp -s $TMP/ids.txt $TMP/ids.old"
cp "$TMP/syn.kvt" "$TMP/syn2.old"
$C --model "$MODEL" -o "$TMP/syn.kvt" >/dev/null 2>"$TMP/err"
check "capture -o existing: exit 1, one line, untouched" \
    "[ \$? -eq 1 ] && [ \$(lines $TMP/err) -eq 1 ] && grep -q 'already exists' $TMP/err && cmp -s $TMP/syn.kvt $TMP/syn2.old"

$BIN merge "$TMP/p0.json" "$TMP/p1.json" -o "$TMP/p0.json" --force >/dev/null 2>"$TMP/err"
check "merge -o = a part, --force: refused" "[ \$? -eq 1 ] && grep -q 'also an input' $TMP/err"
$BIN merge "$TMP/p0.json" "$TMP/p1.json" -o "$TMP/exists.json" >/dev/null 2>"$TMP/err"
check "merge -o existing: exit 1, untouched" \
    "[ \$? -eq 1 ] && grep -q exists $TMP/err && [ \"\$(cat $TMP/exists.json)\" = old ]"

# ---- not regular files, missing directories, long names ----
mkfifo "$TMP/fifo"
$R -o "$TMP/rr.json" >/dev/null 2>&1
for c in "info $TMP/fifo" "verify $TMP/fifo" "replay $TMP/fifo -o $TMP/x.json" \
    "recommend $TMP/fifo" "report $TMP/fifo -o $TMP/xr" "merge $TMP/fifo $TMP/fifo -o $TMP/x.json" \
    "replay $S --policies mixkv-snapkv:rtable=$TMP/fifo -o $TMP/x.json" \
    "capture-llama2c --model $TMP/fifo --tokens 8 --decode 0 --window 4 -o $TMP/x.kvt" \
    "capture-llama2c --model $MODEL --prompt-ids $TMP/fifo --decode 0 --window 4 -o $TMP/x.kvt"; do
    # shellcheck disable=SC2086
    timeout 20 $BIN $c >/dev/null 2>"$TMP/err"
    rc=$?
    # exit 1 (verify: 2, "not a readable trace")
    check "FIFO input ($c): refused at once, not a hang (got $rc)" \
        "[ $rc -eq 1 ] || [ $rc -eq 2 ] && grep -q 'not a regular file' $TMP/err && [ \$(lines $TMP/err) -eq 1 ]"
done
mkdir "$TMP/adir"
for o in "$TMP/fifo" "$TMP/adir"; do
    for c in "$R -o $o --force" "$BIN synth --shape tiny --tokens 64 -o $o --force" \
        "$BIN merge $TMP/p0.json $TMP/p1.json -o $o --force" \
        "$R -o $TMP/rx.json --export-selection $o --force"; do
        $c >/dev/null 2>"$TMP/err"
        rc=$?
        check "output ${o##*/} ($c): refused, left as it was" \
            "[ $rc -eq 1 ] && grep -q 'not a regular file' $TMP/err && { [ -p $TMP/fifo ] && [ -d $TMP/adir ]; }"
    done
done
$R -o "$TMP/nodir/r.json" >/dev/null 2>"$TMP/err"
check "output in a missing directory: refused before the work" \
    "[ \$? -eq 1 ] && grep -q 'cannot write' $TMP/err && [ \$(lines $TMP/err) -eq 1 ]"
# /proc takes no new file, though access() says it is writable to root: refused before the
# work too (not at its end, 'writing the results: ...')
if [ -d /proc/self ]; then
    $R -o /proc/kvt_out.json >/dev/null 2>"$TMP/err"
    check "output under /proc: refused before the work" \
        "[ \$? -eq 1 ] && grep -q 'cannot create a file in /proc' $TMP/err && [ \$(lines $TMP/err) -eq 1 ]"
fi
check "the writability probe leaves no file" "! ls -a $TMP | grep -q kvtrace-probe"
$BIN synth --shape tiny --tokens 64 -o "$TMP/keep.kvt" >/dev/null 2>&1
cp "$TMP/keep.kvt" "$TMP/keep.old"
(ulimit -f 8; exec $BIN synth --shape tiny --tokens 2000 --colsum off --threads 1 \
    -o "$TMP/keep.kvt" --force) >/dev/null 2>&1
check "synth --force dying mid-write: the old trace is untouched" "cmp -s $TMP/keep.kvt $TMP/keep.old"
rm -f "$TMP"/keep.kvt.tmp.*
# a forced capture interrupted before the prompt is complete does not replace the old trace
# (the signal is sent once the new trace's temporary file exists: the capture has started
# and its handler is installed, however loaded the machine is)
$BIN capture-llama2c --model "$MODEL" --tokens 24 --decode 0 --window 4 -o "$TMP/cap.kvt" \
    >/dev/null 2>&1
cp "$TMP/cap.kvt" "$TMP/cap.old"
KVT_CAPTURE_STEP_DELAY_US=300000 $BIN capture-llama2c --model "$MODEL" \
    --tokens 200 --decode 0 --window 4 -o "$TMP/cap.kvt" --force >/dev/null 2>"$TMP/err" &
cap_pid=$!
for _ in $(seq 300); do ls "$TMP"/cap.kvt.tmp.* >/dev/null 2>&1 && break; sleep 0.1; done
kill -INT $cap_pid
wait $cap_pid
check "capture --force interrupted: the old trace is kept, the new one named" \
    "cmp -s $TMP/cap.kvt $TMP/cap.old && grep -q 'cap.kvt is unchanged' $TMP/err"
rm -f "$TMP"/cap.kvt.tmp.*
# an interrupted command removes the temporaries it was writing, and ends by the signal:
# synth --force (SIGTERM, its new trace), replay --export-selection (SIGHUP, the export's
# temporary, written from the first layer on; reference kernels keep the replay running)
# (both used to leave NAME.tmp.PID.N behind)
# signal_at_tmp SIG GLOB CMD...: run CMD in the background, send SIG once a file matches GLOB
# (the temporary exists), return CMD's exit status
signal_at_tmp() {
    local sig=$1 glob=$2 p f
    shift 2
    "$@" >/dev/null 2>&1 &
    p=$!
    for _ in $(seq 300); do
        for f in $glob; do [ -e "$f" ] && break 2; done
        sleep 0.1
    done
    kill -"$sig" $p
    wait $p
}
$BIN synth --shape tiny --tokens 64 -o "$TMP/sig.kvt" >/dev/null 2>&1
cp "$TMP/sig.kvt" "$TMP/sig.old"
signal_at_tmp TERM "$TMP/sig.kvt.tmp.*" $BIN synth --shape llama3-8b --tokens 2048 --layers 4 \
    --colsum on --threads 1 -o "$TMP/sig.kvt" --force
rc=$?
check "synth --force interrupted: exit by SIGTERM (got $rc), no temporary left, old trace kept" \
    "[ $rc -eq 143 ] && ! ls $TMP/sig.kvt.tmp.* >/dev/null 2>&1 && cmp -s $TMP/sig.kvt $TMP/sig.old"
$BIN synth --shape llama3-8b --tokens 1024 --layers 2 -o "$TMP/big.kvt" >/dev/null 2>&1
signal_at_tmp HUP "$TMP/sig.bin.tmp.*" env KVT_KERNELS=ref $BIN replay "$TMP/big.kvt" \
    --policies all --budgets 64,128 --threads 1 -o "$TMP/sig.json" --export-selection "$TMP/sig.bin"
rc=$?
check "replay --export-selection interrupted: exit by SIGHUP (got $rc), no temporary left" \
    "[ $rc -eq 129 ] && ! ls -a $TMP | grep -q 'sig\.\(bin\|json\)' "
# report (SIGTERM, once its staging directory exists): the staging directory and its figures
# are removed, the previous report is unchanged
$BIN replay $S --policies all --budgets "$(seq -s, 8 8 400)" --threads 2 -o "$TMP/many.json" \
    >/dev/null 2>&1
$BIN report "$TMP/r.json" -o "$TMP/srep" >/dev/null 2>&1 && cp -r "$TMP/srep" "$TMP/srep.old"
# (held, complete, in its staging directory by KVT_TEST_REPORT_HOLD_S: the signal comes
# before the commit however slow the machine)
signal_at_tmp TERM "$TMP/srep/.kvt-report-*/.kvtrace-report-files" env KVT_TEST_REPORT_HOLD_S=60 \
    $BIN report "$TMP/many.json" -o "$TMP/srep" --force
rc=$?
check "report interrupted: exit by SIGTERM (got $rc), no staging directory left, old report kept" \
    "[ $rc -eq 143 ] && ! ls -a $TMP/srep | grep -q kvt-report && diff -r $TMP/srep $TMP/srep.old >/dev/null"
rm -rf "$TMP/big.kvt" "$TMP/sig.kvt" "$TMP/sig.old" "$TMP/many.json" "$TMP/srep" "$TMP/srep.old"
# a temporary name a killed process left (same pid) is skipped, not an error
bash -c "touch '$TMP/keep.kvt.tmp.'\$\$'.0'; exec $BIN synth --shape tiny --tokens 64 --force -o '$TMP/keep.kvt'" \
    >/dev/null 2>"$TMP/err"
check "a leftover temporary of the same pid: skipped" "[ \$? -eq 0 ] && $BIN verify -q $TMP/keep.kvt"
rm -f "$TMP"/keep.kvt.tmp.*
# a symbolic link: its target is replaced, with the target's permissions; a dangling one is
# refused
chmod 600 "$TMP/keep.kvt"
ln -s keep.kvt "$TMP/link.kvt"
$BIN synth --shape tiny --tokens 96 --force -o "$TMP/link.kvt" >/dev/null 2>&1
check "--force through a symlink: the link stays, the target is the new trace, mode kept" \
    "[ -L $TMP/link.kvt ] && $BIN info $TMP/keep.kvt | grep -q 'T=96' && [ \$(stat -c %a $TMP/keep.kvt) = 600 ]"
ln -s nowhere.kvt "$TMP/dangling.kvt"
$BIN synth --shape tiny --tokens 64 --force -o "$TMP/dangling.kvt" >/dev/null 2>"$TMP/err"
check "--force to a dangling symlink: refused" \
    "[ \$? -eq 1 ] && grep -q 'symbolic link to a missing file' $TMP/err"
rm -f "$TMP/link.kvt" "$TMP/dangling.kvt"
$R -o "" >/dev/null 2>"$TMP/err"
check "-o '': refused before the work" "[ \$? -ne 0 ] && grep -q 'an empty output path' $TMP/err"
long=$(printf 'a%.0s' $(seq 1 245))
$R -o "$TMP/$long.json" --export-selection "$TMP/$long.sel" >/dev/null 2>"$TMP/err"
check "250-character output names: written" \
    "[ \$? -eq 0 ] && [ -s $TMP/$long.json ] && [ -s $TMP/$long.sel ]"
$R -o "$TMP/same.json" --export-selection "$TMP/./same.json" >/dev/null 2>"$TMP/err"
check "-o X --export-selection ./X: refused" \
    "[ \$? -ne 0 ] && grep -q 'also the -o output' $TMP/err && [ ! -e $TMP/same.json ]"
check "no temporary files left" no_temps

echo "test_reliability_outputs: $pass passed, $fail failed"
[ $fail -eq 0 ]
