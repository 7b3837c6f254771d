#!/usr/bin/env bash
# test_replay_multi_gpu.sh - replay --device cuda on several GPUs (cuemu's CUEMU_DEVICES=N, whose
# devices keep CUDA's rules: test_cuemu_devices):
#   1. --device cuda spreads the layers over every device: each device runs kernels (cuemu's
#      count per device: a layer context left on the thread's first device fails it), the
#      profile names the devices and the layers each ran, and results.json is byte-identical to
#      one device's, also with deferred streams;
#   2. --device cuda:1 uses device 1 only (device 0: no kernel, no memory), the same results;
#   3. a device whose free memory holds no layer is left out (all layers on the other);
#   4. a device that is not there, and a malformed list: one clear line, no results;
#   5. an MPI launch of 2 processes on the machine (when the binary has MPI): each process takes
#      its own device (process 0 device 0, process 1 device 1), the same results.
# Needs KVT_BIN (kvtrace_cuemu, the CUDA code on the CPU stand-in).
set -uo pipefail
BIN=${KVT_BIN:?KVT_BIN: the kvtrace_cuemu binary}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvt_multigpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

"$BIN" synth --shape llama3-8b --tokens 256 --layers 4 --decode 8 --colsum off \
    -o "$TMP/t.kvt" >/dev/null 2>&1 || fail "synth"
ARGS=(replay "$TMP/t.kvt" --policies snapkv,tova --budgets 32,10% --threads 3
    --coverage-probes 32 --force --profile)

# kernels device $2 launched in the run whose stderr is $1 (0 when cuemu printed no line for it)
launches() {
    sed -n "s/^cuemu: device $2: memory peak [0-9]* bytes, \([0-9]*\) kernel launches$/\1/p" "$1" |
        grep . || echo 0
}
peak() {
    sed -n "s/^cuemu: device $2: memory peak \([0-9]*\) bytes.*/\1/p" "$1" | grep . || echo 0
}

"$BIN" "${ARGS[@]}" --device cuda -o "$TMP/one.json" >/dev/null 2>"$TMP/one.err" ||
    { cat "$TMP/one.err"; fail "one device"; }
grep -q '^profile: gpu memory: .* on device 0: ' "$TMP/one.err" ||
    { cat "$TMP/one.err"; fail "one device: the profile does not name device 0"; }

# 1. every device, with and without deferred streams
for defer in 0 1; do
    CUEMU_DEVICES=2 CUEMU_STATS=1 CUEMU_DEFER=$defer "$BIN" "${ARGS[@]}" --device cuda \
        -o "$TMP/two.json" >/dev/null 2>"$TMP/two.err" ||
        { cat "$TMP/two.err"; fail "two devices (CUEMU_DEFER=$defer)"; }
    cmp -s "$TMP/one.json" "$TMP/two.json" || fail "two devices: results differ (defer $defer)"
    grep -q '^profile: gpu memory: .* on devices 0,1: 3 of the 3 worker threads on the GPUs at a time$' \
        "$TMP/two.err" || { cat "$TMP/two.err"; fail "two devices: the profile's memory line"; }
    lay=$(sed -n 's/^profile: gpu layers by device: //p' "$TMP/two.err")
    echo "two devices (defer $defer): layers $lay; kernels $(launches "$TMP/two.err" 0) and" \
        "$(launches "$TMP/two.err" 1)"
    n0=$(echo "$lay" | sed -n 's/.*\([0-9]\) on 0.*/\1/p')
    n1=$(echo "$lay" | sed -n 's/.*\([0-9]\) on 1.*/\1/p')
    [ -n "$n0" ] && [ -n "$n1" ] && [ $((n0 + n1)) -eq 4 ] || fail "layers by device: '$lay'"
    [ "$(launches "$TMP/two.err" 0)" -gt 0 ] && [ "$(launches "$TMP/two.err" 1)" -gt 0 ] ||
        { cat "$TMP/two.err"; fail "two devices: a device ran no kernel"; }
done
echo "ok: the layers spread over both devices, the same results"

# 2. one chosen device
CUEMU_DEVICES=2 CUEMU_STATS=1 "$BIN" "${ARGS[@]}" --device cuda:1 -o "$TMP/d1.json" \
    >/dev/null 2>"$TMP/d1.err" || { cat "$TMP/d1.err"; fail "--device cuda:1"; }
cmp -s "$TMP/one.json" "$TMP/d1.json" || fail "--device cuda:1: results differ"
grep -q '^profile: gpu memory: .* on device 1: ' "$TMP/d1.err" || fail "cuda:1: the profile"
[ "$(launches "$TMP/d1.err" 0)" -eq 0 ] && [ "$(peak "$TMP/d1.err" 0)" -eq 0 ] &&
    [ "$(launches "$TMP/d1.err" 1)" -gt 0 ] ||
    { cat "$TMP/d1.err"; fail "--device cuda:1 used device 0"; }
echo "ok: --device cuda:1 runs on device 1 only"

# 3. a device too full for a layer is left out: device 0 has 1 MiB (0: not enforced, 80 GiB)
CUEMU_DEVICES=2 CUEMU_STATS=1 CUEMU_MEM_BYTES=1048576,0 "$BIN" "${ARGS[@]}" --device cuda \
    -o "$TMP/full.json" >/dev/null 2>"$TMP/full.err" || { cat "$TMP/full.err"; fail "full device 0"; }
cmp -s "$TMP/one.json" "$TMP/full.json" || fail "device 0 full: results differ"
grep -q '^profile: gpu memory: .* on device 1: ' "$TMP/full.err" &&
    [ "$(launches "$TMP/full.err" 0)" -eq 0 ] || { cat "$TMP/full.err"; fail "device 0 full: used"; }
echo "ok: a device without room for a layer is left out"

# 4. clear errors
CUEMU_DEVICES=2 "$BIN" "${ARGS[@]}" --device cuda:0,2 -o "$TMP/bad.json" >"$TMP/bad.out" \
    2>"$TMP/bad.err"
rc=$?
[ $rc -eq 1 ] || fail "cuda:0,2 with 2 devices: exit $rc"
[ ! -e "$TMP/bad.json" ] || fail "cuda:0,2: results written"
grep -q 'CUDA device 2: not there (2 visible: 0-1)' "$TMP/bad.err" || { cat "$TMP/bad.err"; fail "cuda:0,2: the message"; }
[ "$(grep -c . "$TMP/bad.err")" -eq 1 ] || { cat "$TMP/bad.err"; fail "cuda:0,2: not one line"; }
for bad in cuda: cuda:x cuda:1, cuda:2-1 cuda:64 cuda:-1; do
    "$BIN" "${ARGS[@]}" --device "$bad" -o "$TMP/bad.json" >/dev/null 2>"$TMP/bad.err"
    rc=$?
    [ $rc -eq 2 ] && grep -q "^kvtrace replay: error: --device $bad: expected cpu, cuda, cuda:LIST" \
        "$TMP/bad.err" || { cat "$TMP/bad.err"; fail "--device $bad: exit $rc"; }
done
echo "ok: a missing device and malformed lists are one clear line each"

# 5. an MPI launch: the processes on a machine share its GPUs, one device each here
if "$BIN" --version | grep -q "built without MPI"; then
    echo "SKIP (5): this kvtrace_cuemu was built without MPI"
    exit 0
fi
. "$(dirname "$0")/mpi_env.sh" # MPIEXEC, Open MPI's settings for root and oversubscription
[ -n "$MPIEXEC" ] || { echo "SKIP (5): no mpiexec"; exit 0; }
CUEMU_DEVICES=2 CUEMU_STATS=1 timeout 300 "$MPIEXEC" -n 2 -x CUEMU_DEVICES -x CUEMU_STATS \
    "$BIN" "${ARGS[@]}" --device cuda -o "$TMP/mpi.json" >/dev/null 2>"$TMP/mpi.err" ||
    { cat "$TMP/mpi.err"; fail "mpiexec -n 2"; }
cmp -s "$TMP/one.json" "$TMP/mpi.json" || fail "mpiexec -n 2: results differ"
# each process prints its own per-device lines: one used device 0 only, the other device 1
for d in 0 1; do
    busy=$(grep -c "^cuemu: device $d: memory peak [0-9]* bytes, [1-9][0-9]* kernel launches$" "$TMP/mpi.err")
    idle=$(grep -c "^cuemu: device $d: memory peak 0 bytes, 0 kernel launches$" "$TMP/mpi.err")
    [ "$busy" -eq 1 ] && [ "$idle" -eq 1 ] ||
        { cat "$TMP/mpi.err"; fail "mpiexec -n 2: device $d used by $busy processes"; }
done
echo "ok: an MPI launch's 2 processes take one device each"
