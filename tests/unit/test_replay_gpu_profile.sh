#!/bin/bash
# test_replay_gpu_profile.sh - `replay --device cuda --profile` times the GPU's kernels and
# copies by CUDA events read once the stream has passed them (ctx_gpu.c's tm_begin, tm_end,
# tm_poll): the profile makes the host wait no more often than an unprofiled run does, so
# that a profiled benchmark times the run a user gets. On cuemu (tests/cuemu) with deferred
# streams (CUEMU_DEFER=1: work runs only when the host waits for it, and an event's time is
# read too early fails as on a GPU) and CUEMU_STATS=1 (cuemu counts the host's waits):
#   - the same results.json with and without --profile, deferred or not;
#   - the same number of host waits with and without --profile;
#   - the profile books time and bytes to the kernels and the copies, and says how often the
#     host waited (at most as often as cuemu counted);
#   - a trace in 512-byte records (two timings per record while a layer's K and V stream in;
#     test_replay_kv_stream.sh checks such traces' metrics) replays with its times booked, and a
#     ring of 2 timings (KVT_TEST_GPU_TIMERS=2: tm_begin waits for the oldest when it is full)
#     gives the same results.
set -u
BIN=${KVT_BIN:?}
PY=${KVT_PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
SYN=(synth --shape tiny --tokens 600 --colsum off --q-all --seed 5)
$BIN "${SYN[@]}" -o "$TMP/t.kvt" >/dev/null 2>&1 || fail "synth"
$BIN "${SYN[@]}" --record-bytes 512 -o "$TMP/split.kvt" >/dev/null 2>&1 || fail "synth split"
SET=(--device cuda --policies streamingllm,h2o,snapkv,pyramidkv,adakv,knorm,oracle,tova
    --budgets 16,64,10% --threads 1 --force)
run() { # name env... -- args...
    local name=$1
    shift
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    env "${envs[@]}" "$BIN" replay "$@" "${SET[@]}" -o "$TMP/$name.json" >/dev/null \
        2>"$TMP/$name.err" || { cat "$TMP/$name.err"; fail "replay ($name)"; }
}
run plain CUEMU_DEFER=1 CUEMU_STATS=1 -- "$TMP/t.kvt"
run prof CUEMU_DEFER=1 CUEMU_STATS=1 -- "$TMP/t.kvt" --profile
run prof_now CUEMU_DEFER=0 -- "$TMP/t.kvt" --profile
run split CUEMU_DEFER=1 -- "$TMP/split.kvt" --profile
run ring CUEMU_DEFER=1 KVT_TEST_GPU_TIMERS=2 -- "$TMP/t.kvt" --profile
cmp -s "$TMP/plain.json" "$TMP/prof.json" || fail "--profile changed the results"
cmp -s "$TMP/plain.json" "$TMP/prof_now.json" || fail "the results differ without deferral"
cmp -s "$TMP/plain.json" "$TMP/ring.json" || fail "the results differ with a ring of 2 timings"
w0=$(grep '^cuemu: host waits:' "$TMP/plain.err")
w1=$(grep '^cuemu: host waits:' "$TMP/prof.err")
[ -n "$w0" ] || fail "cuemu did not count the host's waits (CUEMU_STATS)"
[ "$w0" = "$w1" ] || fail "--profile added waits: without it '$w0', with it '$w1'"
"$PY" - "$TMP" <<'PYEOF' || fail "the profile"
import re, sys
d = sys.argv[1]
for name in ("prof", "prof_now", "split", "ring"):
    err = open(d + "/" + name + ".err").read()
    for what in ("upload (host to device)", "attention kernels", "norm kernels",
                 "sweep kernels", "column-sum kernels", "download (device to host)"):
        # seconds, GB, GB/s (printed to 3 decimals: a copy's time shows in its rate)
        m = re.search(r"^profile: gpu %s +([0-9.]+) s +[0-9.]+ GB +([0-9.]+) GB/s"
                      % re.escape(what), err, re.M)
        if not m or (float(m.group(1)) <= 0 and float(m.group(2)) <= 0):
            print("%s: no time booked to the %s" % (name, what))
            sys.exit(1)
    m = re.search(r"^profile: gpu: the host waited (\d+) times .* ([0-9.]+) s summed", err, re.M)
    if not m or int(m.group(1)) < 1:
        print("%s: the profile does not say how often the host waited" % name)
        sys.exit(1)
    c = re.search(r"^cuemu: host waits: (\d+) stream synchronizes, (\d+) event", err, re.M)
    if c and int(m.group(1)) > int(c.group(1)) + int(c.group(2)):
        print("%s: the profile counted %s waits, cuemu %s" % (name, m.group(1), c.group(0)))
        sys.exit(1)
print("profiled and unprofiled runs: the same results and host waits; the profile's times booked")
PYEOF
