#!/usr/bin/env bash
# test_replay_gpu_faults.sh - replay --device cuda when a kernel faults on the GPU (cuemu's
# CUEMU_FAIL_LAUNCH=N: the N-th kernel launch faults and its device's context is broken from
# then on, every later call on it failing with "unspecified launch failure", as after an
# illegal access or a GPU's Xid error). At launches spread over a whole replay (the first, the
# attention's, the sweeps', the last), with several worker threads, with deferred streams, with
# --profile, and on one of two devices: exit 1, no hang, one line on stderr naming the layer,
# the device and CUDA's error, and no results.json or selection export left behind. One launch
# past the last: no fault, the clean run's results.
# Needs KVT_BIN (kvtrace_cuemu, the CUDA code on the CPU stand-in).
set -uo pipefail
BIN=${KVT_BIN:?KVT_BIN: the kvtrace_cuemu binary}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvt_gpufault.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

"$BIN" synth --shape llama3-8b --tokens 256 --layers 3 --decode 8 --colsum off \
    -o "$TMP/t.kvt" >/dev/null 2>&1 || fail "synth"
ARGS=(replay "$TMP/t.kvt" --device cuda --policies snapkv,tova --budgets 32,10% --threads 3
    --coverage-probes 32 --force)

CUEMU_STATS=1 "$BIN" "${ARGS[@]}" -o "$TMP/clean.json" >/dev/null 2>"$TMP/clean.err" ||
    { cat "$TMP/clean.err"; fail "clean run"; }
L=$(sed -n 's/^cuemu: kernel launches \([0-9]*\)$/\1/p' "$TMP/clean.err")
[ -n "$L" ] && [ "$L" -gt 50 ] || { cat "$TMP/clean.err"; fail "no launch count"; }
echo "clean run: $L kernel launches"

k=0
for n in 1 2 $((L / 9)) $((2 * L / 9)) $((L / 3)) $((4 * L / 9)) $((5 * L / 9)) $((2 * L / 3)) \
    $((7 * L / 9)) $((8 * L / 9)) $((L - 1)) "$L"; do
    env=(CUEMU_FAIL_LAUNCH=$n)
    extra=()
    case $((k % 4)) in
    1) env+=(CUEMU_DEFER=1) ;;
    2) extra=(--profile --export-selection "$TMP/sel.bin") ;;
    3) env+=(CUEMU_DEVICES=2) ;;
    esac
    k=$((k + 1))
    rm -f "$TMP/f.json" "$TMP/sel.bin"
    timeout 300 env "${env[@]}" "$BIN" "${ARGS[@]}" "${extra[@]}" -o "$TMP/f.json" \
        >/dev/null 2>"$TMP/f.err"
    rc=$?
    what="${env[*]} ${extra[*]}"
    [ $rc -eq 1 ] || { cat "$TMP/f.err"; fail "$what: exit $rc (1 expected; 124: a hang)"; }
    grep -v '^profile: ' "$TMP/f.err" >"$TMP/lines"
    [ "$(wc -l <"$TMP/lines")" -eq 1 ] || { cat "$TMP/f.err"; fail "$what: not one line"; }
    grep -Eq '^kvtrace replay: error: .*t\.kvt: layer [0-2]: CUDA device [01]: .*unspecified launch failure$' \
        "$TMP/lines" || { cat "$TMP/f.err"; fail "$what: the message"; }
    [ ! -e "$TMP/f.json" ] && [ ! -e "$TMP/sel.bin" ] || fail "$what: output left behind"
    echo "$what: $(cat "$TMP/lines")"
done

CUEMU_FAIL_LAUNCH=$((L + 1)) "$BIN" "${ARGS[@]}" -o "$TMP/f.json" >/dev/null 2>"$TMP/f.err" ||
    { cat "$TMP/f.err"; fail "no fault (launch $((L + 1)))"; }
cmp -s "$TMP/clean.json" "$TMP/f.json" || fail "results differ without a fault"
echo "ok: a GPU fault anywhere in a replay is one clear line, exit 1, nothing written"
