#!/bin/bash
# test_replay_mpi.sh - the cluster path (DESIGN.md §6): `mpiexec -n N kvtrace replay ...` must
# write byte for byte the results.json, the stdout table and the selection export (binary and
# JSON) of one process, for N = 1, 4 and more processes than (trace, layer) units; rank 0
# alone writes and prints; a failure in any process (a damaged layer only rank 2 reads, an
# existing output only rank 0 checks, a full disk at rank 0's write) is one clear line, naming
# the rank when it is not rank 0, a non-zero exit, and no output (old outputs unchanged).
# --shard is refused under a launch.
# A kvtrace built without MPI (the ASan build) must refuse a launch of several processes
# instead of running the whole replay N times, and run normally as a launch of one.
. "$(dirname "$0")/two_traces_env.sh" # BIN, MODEL, SAMPLE, TMP, fail, TR (sample + b.kvt)
# exactly one error line, containing $1
one_line() {
    local n
    n=$(grep -c '^kvtrace' "$TMP/err")
    [ "$n" = 1 ] || { cat "$TMP/err"; fail "$2: $n error lines, expected 1"; }
    grep -q -F -- "$1" "$TMP/err" || { cat "$TMP/err"; fail "$2: no '$1'"; }
}
SET=(--policies full,random,snapkv,pyramidkv,adakv,mixkv-snapkv,oracle,quest,lightkv-like
     --budgets 16,40,25% --threads 1 --seed 7)
$BIN replay "${TR[@]}" "${SET[@]}" -o "$TMP/one.json" --export-selection "$TMP/one.sel" \
    >"$TMP/one.out" 2>"$TMP/err" || { cat "$TMP/err"; fail "replay in one process"; }
$BIN replay "${TR[@]}" "${SET[@]}" -o "$TMP/onej.json" --export-selection "$TMP/one.sel.json" \
    >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "replay in one process (JSON export)"; }

if $BIN --version | grep -q "built without MPI"; then
    # a launch of 4 (Open MPI's and MPICH's variables): rank 0 says why, the others are quiet
    for vars in "OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_RANK=0" "PMI_SIZE=4 PMI_RANK=0" \
        "PMIX_RANK=0 SLURM_STEP_NUM_TASKS=4"; do
        env $vars $BIN replay "${TR[@]}" "${SET[@]}" -o "$TMP/x.json" 2>"$TMP/err" \
            && fail "ran as one of 4 processes without MPI ($vars)"
        one_line "built without MPI" "launch without MPI ($vars)"
    done
    env OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_RANK=2 $BIN replay "${TR[@]}" "${SET[@]}" \
        -o "$TMP/x.json" 2>"$TMP/err" && fail "rank 2 ran without MPI"
    [ -s "$TMP/err" ] && { cat "$TMP/err"; fail "rank 2 printed"; }
    [ -e "$TMP/x.json" ] && fail "a refused launch wrote its output"
    env OMPI_COMM_WORLD_SIZE=1 OMPI_COMM_WORLD_RANK=0 $BIN replay "${TR[@]}" "${SET[@]}" \
        -o "$TMP/x.json" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "a launch of one"; }
    cmp "$TMP/one.json" "$TMP/x.json" || fail "a launch of one differs"
    echo "OK: built without MPI: a launch of 4 refused in one line, a launch of 1 runs"
    exit 0
fi

. "$(dirname "$0")/mpi_env.sh" # MPIEXEC, Open MPI's settings for root and oversubscription
[ -n "$MPIEXEC" ] || { echo "SKIP: no mpiexec"; exit 77; }
no_temps() { ! compgen -G "$TMP/*.tmp.*" >/dev/null || fail "$1: a temporary file was left"; }
run() { # run N ARGS...: mpiexec -n N kvtrace replay ARGS (stdout, stderr to files)
    local n=$1
    shift
    timeout 120 "$MPIEXEC" -n "$n" "$BIN" replay "$@" >"$TMP/out" 2>"$TMP/err"
}
units=$(($($BIN info "$SAMPLE" --json | grep -o '"n_layers":[[:space:]]*[0-9]*' | head -1 | grep -o '[0-9]*$') * 2))
[ "$units" -gt 0 ] || fail "layer count"
for n in 1 4 $((units + 3)); do
    run $n "${TR[@]}" "${SET[@]}" -o "$TMP/m$n.json" --export-selection "$TMP/m$n.sel" \
        || { cat "$TMP/err"; fail "mpiexec -n $n"; }
    cmp "$TMP/one.json" "$TMP/m$n.json" || fail "-n $n: results.json differs from one process"
    cmp "$TMP/one.sel" "$TMP/m$n.sel" || fail "-n $n: the selection export differs"
    cmp "$TMP/one.out" "$TMP/out" || fail "-n $n: the table differs (or printed by every rank)"
    [ $n = 1 ] || grep -q "$n MPI processes" "$TMP/err" || { cat "$TMP/err"; fail "-n $n line"; }
done
run 3 "${TR[@]}" "${SET[@]}" -o "$TMP/mj.json" --export-selection "$TMP/m.sel.json" \
    || { cat "$TMP/err"; fail "mpiexec -n 3 with a JSON export"; }
cmp "$TMP/one.sel.json" "$TMP/m.sel.json" || fail "-n 3: the JSON selection export differs"
no_temps "mpiexec runs"
# refusals under a launch: usage errors, one line for all ranks, nothing written
run 3 "${TR[@]}" "${SET[@]}" --shard 0/2 -o "$TMP/x.json" && fail "--shard under mpiexec"
one_line "--shard cannot be combined with an MPI launch" "--shard"
grep -q "(rank" "$TMP/err" && fail "every process's failure names ranks"
run 3 "${TR[@]}" "${SET[@]}" --export-selection "$TMP/x.json" -o "$TMP/x.json" \
    && fail "the export is the output"
one_line "is also the -o output" "export = output"
run 3 "${TR[@]}" "${SET[@]}" --budgets 0 -o "$TMP/x.json" && fail "budget 0"
one_line "--budgets" "budget 0"
grep -q "(rank" "$TMP/err" && fail "every process's failure names ranks (budget 0)"
# an existing output is checked by rank 0 before any work
run 3 "${TR[@]}" "${SET[@]}" -o "$TMP/m4.json" && fail "overwrote without --force"
one_line "exists" "existing output"
grep -q "(rank" "$TMP/err" && fail "rank 0's own failure names a rank"
cmp "$TMP/one.json" "$TMP/m4.json" || fail "the existing output changed"
run 3 "${TR[@]}" "${SET[@]}" -o "$TMP/x.json" --export-selection "$TMP/m4.sel" \
    && fail "overwrote an export without --force"
one_line "m4.sel exists" "existing export"
# a damaged layer: the process that reads it fails, every process exits, nothing is written
cp "$TMP/b.kvt" "$TMP/c.kvt"
"$BIN" verify "$TMP/c.kvt" >/dev/null || fail "verify before damage"
size=$(stat -c %s "$TMP/c.kvt")
printf '\xff' | dd of="$TMP/c.kvt" bs=1 seek=$((size * 6 / 10)) conv=notrunc 2>/dev/null
rec=$("$BIN" verify "$TMP/c.kvt" | grep -o 'record [0-9]* (layer [0-9]* [A-Za-z_]*)')
layer=$(echo "$rec" | grep -o 'layer [0-9]*' | grep -o '[0-9]*')
[ -n "$layer" ] || fail "the damage hit no record"
run 3 "$SAMPLE" "$TMP/c.kvt" "${SET[@]}" -o "$TMP/x.json" && fail "a damaged layer replayed"
owner=$(((units / 2 + layer) % 3))
if [ $owner = 0 ]; then
    one_line "$rec: payload checksum mismatch" "damaged layer (rank 0)"
    grep -q "(rank" "$TMP/err" && fail "rank 0's own failure names a rank"
else
    one_line "$rec: payload checksum mismatch (rank $owner)" "damaged layer (rank $owner)"
fi
[ -e "$TMP/x.json" ] && fail "a failed launch wrote its output"
no_temps "a damaged layer"
# two different failures (a damaged layer of each trace, read by two ranks): one line each,
# each naming its rank, rank 0's too
if [ $owner != 0 ]; then
    cp "$SAMPLE" "$TMP/s.kvt"
    ssize=$(stat -c %s "$TMP/s.kvt")
    for pct in 20 25 30 35 40 45 50 55 60 65 70 75 80; do # a layer the other rank reads
        cp "$SAMPLE" "$TMP/s.kvt"
        printf '\xff' | dd of="$TMP/s.kvt" bs=1 seek=$((ssize * pct / 100)) conv=notrunc 2>/dev/null
        srec=$("$BIN" verify "$TMP/s.kvt" | grep -o 'record [0-9]* (layer [0-9]* [A-Za-z_]*)')
        sl=$(echo "$srec" | grep -o 'layer [0-9]*' | grep -o '[0-9]*')
        [ -n "$sl" ] && [ $((sl % 3)) != $owner ] && break
        sl=
    done
    [ -n "$sl" ] || fail "no damage found in a layer of another rank"
    run 3 "$TMP/s.kvt" "$TMP/c.kvt" "${SET[@]}" -o "$TMP/x.json" && fail "two damaged layers"
    [ "$(grep -c '^kvtrace' "$TMP/err")" = 2 ] || { cat "$TMP/err"; fail "two failures, not 2 lines"; }
    grep -qF "$srec: payload checksum mismatch (rank $((sl % 3)))" "$TMP/err" &&
        grep -qF "$rec: payload checksum mismatch (rank $owner)" "$TMP/err" ||
        { cat "$TMP/err"; fail "two failures: each line names its rank"; }
fi
# rank 0's write fails (a full disk, when a small tmpfs can be mounted): one line, exit 1,
# the old outputs unchanged; with an export, the other processes' layers are still received
mkdir "$TMP/small"
if mount -t tmpfs -o size=32k tmpfs "$TMP/small" 2>/dev/null; then
    run 3 "${TR[@]}" "${SET[@]}" -o "$TMP/small/x.json"
    rc=$?
    [ $rc = 0 ] && { umount "$TMP/small"; fail "a full disk went unnoticed"; }
    one_line "No space left on device" "full disk"
    echo old >"$TMP/small/x.json" && echo old >"$TMP/small/x.sel"
    run 3 "${TR[@]}" "${SET[@]}" -o "$TMP/small/x.json" --export-selection "$TMP/small/x.sel" \
        --force
    rc=$?
    kept=$(cat "$TMP/small/x.json" "$TMP/small/x.sel" | tr -d '\n')
    left=$(ls -A "$TMP/small" | wc -l)
    umount "$TMP/small"
    [ $rc = 0 ] && fail "a full disk under the export went unnoticed"
    one_line "selection export: cannot write" "full disk (export)"
    [ "$kept" = oldold ] && [ "$left" = 2 ] || fail "the old outputs changed or a temporary was left"
else
    echo "note: cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): full-disk cases not run"
fi
# --help once
timeout 60 "$MPIEXEC" -n 3 "$BIN" replay --help >"$TMP/out" 2>&1 || fail "--help under mpiexec"
[ "$(grep -c '^usage: kvtrace replay' "$TMP/out")" = 1 ] || fail "--help printed by every rank"
grep -q "MPI launcher" "$TMP/out" || fail "--help lacks the MPI paragraph"
echo "OK: mpiexec -n 1, 4 and $((units + 3)) equal one process byte for byte; failures in one line"
