# two_traces_env.sh - sourced by the scale-out tests (test_shard_merge.sh, test_replay_mpi.sh):
# BIN, ROOT, MODEL, SAMPLE (the bundled real trace), a temporary directory TMP removed on exit
# (with a tmpfs at $TMP/small unmounted first), fail(), and a second real trace $TMP/b.kvt of
# the same model, so that TR=(SAMPLE b.kvt) spans two traces. Exit 77 without the capture
# command, the model or the sample trace.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
MODEL=$ROOT/models/stories260K.bin
[ -f "$MODEL" ] || MODEL=/work/shared/models/stories260K.bin
SAMPLE=$ROOT/traces/samples/stories260K.kvt
if ! $BIN capture-llama2c --help >/dev/null 2>&1 || [ ! -f "$MODEL" ] || [ ! -f "$SAMPLE" ]; then
    echo "SKIP: no capture-llama2c command, model or sample trace"; exit 77
fi
TMP=$(mktemp -d)
trap 'umount "$TMP/small" 2>/dev/null; rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
$BIN capture-llama2c --model "$MODEL" --tokens 150 --decode 8 --window 32 --colsum --seed 5 \
    -o "$TMP/b.kvt" >/dev/null 2>&1 || fail "capture"
TR=("$SAMPLE" "$TMP/b.kvt")
