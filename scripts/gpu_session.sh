#!/usr/bin/env bash
# gpu_session.sh - every GPU check of issues #6 and #7 as ONE command for a device machine,
# built to fit the device lease (15 minutes in all, start-up included; 10 minutes a command):
# the whole run keeps to BUDGET_S seconds (default 450: with the machine's start, about 2
# minutes, that leaves the lease 4-5 minutes for a second call made at once, within the 30 s
# the machine stays warm), each step has its own time limit cut to what is left, a step that no
# longer fits is skipped and named, and the summary ends with the command that runs just the
# skipped steps (`rerun:`); a failed step is reported and the next one runs. After every step the table of results and
# the logs so far are written to $OUT/summary.txt and $OUT/gpu_session.tar.gz (the device tool
# brings back at most 8 files, and brings back what is under $OUT even when a command is
# killed at its limit).
#
# Prepare here (no GPU needed):   bash scripts/device_bundle.sh      # builds .devbundle/
# Run there (device tool):        bash scripts/gpu_session.sh [STEPS]   with carry [".devbundle"]
#                                 and timeout_s >= BUDGET_S + 30
# Second call (within 30 s):      BUDGET_S=<lease left - 40> bash scripts/gpu_session.sh <the
#                                 summary's rerun: list>
# STEPS, in the order given: groups (default "tests replay hf overhead sanitize", most needed
# first) or single steps of a group by the name the summary gives them (e.g. hf_gpu_check):
#   tests     the gpu-labelled tests from the bundle: capture device path, GPU column sums,
#             replay kernels, CUPTI timeline, replay --device cuda against the references
#   replay    the replay benchmark of issue #7 (bench/run_gpu.sh; T=32768, 16 layers); and,
#             only when named, replay_long: a Llama-3-8B-shaped layer with 4,096 decode steps
#             (bench/decode_probs.sh, --decode-probs all and group) with --device cuda, then
#             the same on the CPU (LONG_T [2048], LONG_G [4096])
#   hf        HF transformers capture: the binding's test against the real library, stories260K
#             as an HF Llama vs the C engine's trace, a random Qwen2-VL with an image; and
#             kvtrace.hf.e2e on the GPU against e2e-llama2c (hf_e2e_test)
#   overhead  Llama-3-8B-shaped prefill with and without capture (bench/capture_overhead.py)
#   sanitize  compute-sanitizer memcheck on the capture and replay kernels' tests, racecheck on
#             the column sums
# If the bundle's binaries cannot run there (other system libraries: ldd and the error are in
# bundle_check.log), `tests` falls back to scripts/gpu_check.sh, which builds the kernel test
# with nvcc alone, and the steps that need the bundle are reported NOT RUN.
# Environment: BUDGET_S [450]; BUNDLE [.devbundle]; PYTHON [python3]; KVT_ALLOW_STALE [0]: 1
# runs a bundle built from other sources than these, changed or added since (refused by
# default: it would measure old code; exit 3); bench/run_gpu.sh's variables (T, LAYERS, ...)
# pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/kvt_gpu_out}
OUT=$(mktemp -d /tmp/kvt_gpu_session.XXXXXX) # every step's logs and results; packed at the end
trap 'rm -rf "$OUT"' EXIT                     # (packed into $FINAL after every step)
mkdir -p "$FINAL"
STEPS=${*:-tests replay hf overhead sanitize}
BUNDLE=${BUNDLE:-$PWD/.devbundle}
BUDGET_S=${BUDGET_S:-450}
T_END=$((SECONDS + BUDGET_S))
PY=${PYTHON:-python3}
# the bundle finds its libraries through its RPATH; CUPTI (loaded at run time by soname,
# libcupti.so.13) is the pip package's that torch uses (first: the folder holds the CUDA
# libraries torch loads anyway, so nothing of torch's is shadowed by another version), or the
# toolkit's, through a folder holding a link to it alone (the toolkit's lib64 itself would come
# before torch's RUNPATH for every library in it; libcupti needs only libc's)
mkdir -p "$OUT/cupti"
for f in /usr/local/cuda*/extras/CUPTI/lib64/libcupti.so.13 /usr/local/cuda*/lib64/libcupti.so.13 \
    /usr/local/cuda*/lib/libcupti.so.13; do
    [ -e "$f" ] && ln -sf "$f" "$OUT/cupti/libcupti.so.13" && break
done
cupti_dirs=$({
    timeout 20 "$PY" -c 'import glob, os, site
for p in site.getsitepackages():
    for f in glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcupti.so*")):
        print(os.path.dirname(f))' 2>/dev/null
    [ -e "$OUT/cupti/libcupti.so.13" ] && echo "$OUT/cupti"
} | awk '!seen[$0]++')
for d in $cupti_dirs; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export KVT_LIB="$BUNDLE/lib/libkvtrace.so" KVT_BIN="$BUNDLE/bin/kvtrace" KVT_SOURCE_ROOT=$PWD
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
summary=()
skipped=() # the steps the budget left out: the summary's rerun: command
# STEPS may name single steps: then their group runs only those (WHOLE: the groups asked for
# whole; ONLY: the single steps asked for; CUR_GROUP: the group running)
WHOLE=" " ONLY=" " groups=""
for a in $STEPS; do
    case $a in
    tests | replay | hf | overhead | sanitize) g=$a WHOLE="$WHOLE$a " ;;
    test_* | gpu_check_nvcc) g=tests ONLY="$ONLY$a " ;;
    replay_bench | replay_long) g=replay ONLY="$ONLY$a " ;;
    hf_*) g=hf ONLY="$ONLY$a " ;;
    capture_overhead) g=overhead ONLY="$ONLY$a " ;;
    memcheck_* | racecheck_*) g=sanitize ONLY="$ONLY$a " ;;
    *) g=$a ;;
    esac
    [[ " $groups " == *" $g "* ]] || groups="$groups $g"
done
STEPS=$groups
wanted() { [[ "$WHOLE" == *" $CUR_GROUP "* ]] || [[ "$ONLY" == *" $1 "* ]]; }
note() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }
# pack: the table so far and every log into $FINAL (cheap: logs only; traces stay in /tmp)
pack() {
    {
        echo "gpu: $(head -1 "$OUT/gpu.txt" 2>/dev/null || echo '?'); bundle" \
            "$(cat "$BUNDLE/REVISION" 2>/dev/null || echo missing); budget ${BUDGET_S} s," \
            "used $((SECONDS)) s"
        printf '%s\n' "${summary[@]}"
        [ ${#skipped[@]} = 0 ] ||
            echo "rerun: BUDGET_S=<lease left - 40> bash scripts/gpu_session.sh ${skipped[*]}"
    } >"$OUT/summary.txt"
    cp "$OUT/summary.txt" "$FINAL/summary.txt"
    tar -C "$OUT" -czf "$FINAL/gpu_session.tar.gz.part" . 2>/dev/null &&
        mv "$FINAL/gpu_session.tar.gz.part" "$FINAL/gpu_session.tar.gz"
}
# run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record PASS / NOT RUN / FAIL / TIMEOUT, or
# SKIPPED when less than 20 s of the budget would be left for it; LIMIT_S is cut to the budget.
# Exit 77 (the test found no usable GPU) is NOT RUN only where nvidia-smi lists no GPU; on a
# machine with one it is a FAIL: the test could not use it (e.g. a driver too old for the
# bundle's CUDA runtime)
run() {
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local left=$((T_END - SECONDS - 10))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (${left} s of the budget left)"
        note "$name" "SKIPPED (budget: see rerun: below)"
        skipped+=("$name")
        pack
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s)"
    local t0=$SECONDS
    KVT_DEADLINE=$(($(date +%s) + limit)) timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local r=$?
    tail -n 15 "$OUT/$name.log"
    local how="FAIL (exit $r)"
    [ $r = 0 ] && how=PASS
    if [ $r = 77 ]; then
        if [ "$HAVE_GPU" = 1 ]; then # the test's own reason, e.g. CUPTI refused to trace
            how="FAIL (exit 77 on a GPU machine: $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 |
                cut -c1-120))"
        else
            how="NOT RUN"
        fi
    fi
    [ $r = 124 ] || [ $r = 137 ] && how="TIMEOUT (${limit} s)"
    note "$name" "$how, $((SECONDS - t0)) s"
    pack
}

# san NAME LIMIT CMD...: run under compute-sanitizer. Where the sanitizer refuses the device
# (gVisor: "Device not supported", then error 999), say so once and skip the other runs rather
# than report each as a kernel failure.
SAN_REFUSED=0
san() {
    wanted "$1" || return 0
    if [ "$SAN_REFUSED" = 1 ]; then
        note "$1" "NOT RUN (compute-sanitizer refused this device)"
        return
    fi
    run "$@"
    if grep -qiE 'device not supported|not supported on this (device|platform)' "$OUT/$1.log" \
        2>/dev/null; then
        SAN_REFUSED=1
        unset 'summary[${#summary[@]}-1]'
        note "$1" "NOT RUN (compute-sanitizer refused this device: see $1.log)"
        pack
    fi
}

echo "== machine"
HAVE_GPU=0 # whether nvidia-smi lists a GPU: then a GPU test's exit 77 is a failure
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && HAVE_GPU=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 |
        tee "$OUT/gpu.txt"
else
    echo "none (no nvidia-smi)" | tee "$OUT/gpu.txt"
fi
command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
echo "bundle $(cat "$BUNDLE/REVISION" 2>/dev/null || echo missing), tree $(git rev-parse HEAD 2>/dev/null)"
# a bundle built from other sources than these tests and scripts would measure old code
if [ -f "$BUNDLE/SOURCES.sha1" ]; then
    # changed or removed files, and source files added since (in the folders it lists; no git
    # here: the device's copy of the tree may have no .git)
    listed=$(awk '{ print $2 }' "$BUNDLE/SOURCES.sha1" | sort)
    added=$(comm -13 <(echo "$listed") <(echo "$listed" | cut -d/ -f1 | sort -u |
        xargs -r -I{} find {} -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o \
        -name '*.cuh' -o -name '*.cpp' -o -name CMakeLists.txt -o -name '*.cmake' \) | sort))
    stale=$(sha1sum -c --quiet "$BUNDLE/SOURCES.sha1" 2>/dev/null | grep -c ': FAILED' || true)
    stale=$((stale + $(printf '%s' "$added" | grep -c . || true)))
    if [ "$stale" != 0 ] && [ "${KVT_ALLOW_STALE:-0}" != 1 ]; then
        echo "REFUSED: the bundle is STALE: $stale source files differ from those it was built" \
            "from; run scripts/device_bundle.sh again (or KVT_ALLOW_STALE=1 to run it anyway)"
        { sha1sum -c --quiet "$BUNDLE/SOURCES.sha1" 2>/dev/null; printf '%s' "$added" |
            sed 's/$/: ADDED since/'; } | head -20
        note bundle "STALE ($stale source files changed since scripts/device_bundle.sh): refused"
        pack
        exit 3
    elif [ "$stale" != 0 ]; then
        echo "WARNING: the bundle is STALE: $stale source files differ from those it was built from"
        note bundle "STALE: $stale source files changed since scripts/device_bundle.sh"
    else
        note bundle "built from these sources"
    fi
fi

# device_bundle.sh gzips its large libraries (the device tool's 64 MiB): unpacked in place
for z in "$BUNDLE"/lib/*.gz; do
    [ -e "$z" ] || continue
    if command -v gzip >/dev/null; then
        gzip -d -f "$z"
    else
        "$PY" -c 'import gzip, shutil, sys, os
with gzip.open(sys.argv[1]) as i, open(sys.argv[1][:-3], "wb") as o:
    shutil.copyfileobj(i, o)
os.remove(sys.argv[1])' "$z"
    fi || echo "could not unpack $z"
done
bundle_ok=0
{ ldd "$BUNDLE/bin/kvtrace" "$BUNDLE/lib/libkvtrace.so"; "$BUNDLE/bin/kvtrace" --version; } \
    >"$OUT/bundle_check.log" 2>&1
if [ -x "$BUNDLE/bin/kvtrace" ] && "$BUNDLE/bin/kvtrace" --version >/dev/null 2>&1; then
    bundle_ok=1
else
    echo "the bundle's binaries do not run here (or .devbundle was not carried):"
    grep -E 'not found|GLIBC|error' "$OUT/bundle_check.log" | sort -u | head -5
    note bundle "DOES NOT RUN here (bundle_check.log): the steps that need it are NOT RUN"
fi
# a step that needs the bundle's kvtrace or libkvtrace.so, where it does not run
no_bundle() { wanted "$1" && note "$1" "NOT RUN (the bundle does not run here)"; }

for step in $STEPS; do
    CUR_GROUP=$step
    case $step in
    tests)
        # the bundle's tests and the nvcc fallback stand for each other: a rerun list made on
        # one kind of machine may name the other's steps
        if [ $bundle_ok = 1 ] && wanted gpu_check_nvcc; then
            WHOLE="$WHOLE""tests "
        elif [ $bundle_ok = 0 ]; then
            for t in test_capture_device_gpu test_capture_colsum_gpu test_kernels_cuda \
                test_capture_timeline_gpu test_replay_device_gpu; do
                wanted "$t" && ONLY="$ONLY""gpu_check_nvcc "
            done
        fi
        if [ $bundle_ok = 1 ]; then
            for t in test_capture_device_gpu test_capture_colsum_gpu test_kernels_cuda \
                test_capture_timeline_gpu; do
                wanted "$t" || continue
                if [ -x "$BUNDLE/bin/$t" ]; then
                    run "$t" 90 "$BUNDLE/bin/$t"
                else
                    note "$t" "MISSING from the bundle (built without CUDA?)"
                fi
            done
            # replay --device cuda against the all-reference replay: every policy on the
            # sample and a synthetic vision-language trace, h2o's sums from Q_all on a third
            run test_replay_device_gpu 120 env KVT_PYTHON="$PY" \
                bash tests/unit/test_replay_fast_vs_ref.sh cuda
        else
            run gpu_check_nvcc 400 env OUT="$OUT/gpu_check" SANITIZE=0 bash scripts/gpu_check.sh
        fi
        ;;
    sanitize)
        if [ $bundle_ok = 1 ] && command -v compute-sanitizer >/dev/null; then
            san memcheck_capture_device 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$BUNDLE/bin/test_capture_device_gpu"
            # racecheck runs about 1000x slower: the prompts of at most 37 tokens (one tile of
            # keys, every head layout; 12 s of the 120 the whole test took on an H200 alone)
            san racecheck_colsum 120 env KVT_COLSUM_BENCH_T=0 KVT_COLSUM_MAX_T=100 \
                compute-sanitizer --tool racecheck \
                --error-exitcode 9 "$BUNDLE/bin/test_capture_colsum_gpu"
            san memcheck_colsum 120 env KVT_COLSUM_BENCH_T=0 compute-sanitizer --tool memcheck \
                --error-exitcode 9 "$BUNDLE/bin/test_capture_colsum_gpu"
            # the cases up to 1100 tokens: every block layout, partial tile and second key block
            # (the whole test took 96 s under racecheck, most of it in the 2600-5000-token cases)
            san racecheck_kernels 120 env KVT_KERNELS_MAX_T=1100 compute-sanitizer --tool racecheck \
                --error-exitcode 9 "$BUNDLE/bin/test_kernels_cuda"
            san memcheck_kernels 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$BUNDLE/bin/test_kernels_cuda"
            san memcheck_replay_device 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$BUNDLE/bin/kvtrace" replay traces/samples/stories260K.kvt --device cuda \
                --policies all --threads 2 --profile -o "$OUT/memcheck_replay.json" --force
        else
            note sanitize "NOT RUN (no bundle or no compute-sanitizer)"
        fi
        ;;
    hf)
        run hf_convert_test 60 "$PY" tests/oracle/test_llama2c_hf_convert.py
        if [ $bundle_ok = 1 ]; then
            run hf_binding_test 90 env KVT_REQUIRE_CUDA_CAPTURE=1 "$PY" \
                tests/oracle/test_python_hf_capture.py
            run hf_gpu_check 150 "$PY" scripts/gpu_hf_check.py
            run hf_e2e_test 120 env KVT_TEST_DEVICE=cuda "$PY" tests/oracle/test_python_hf_e2e.py
        else
            no_bundle hf_binding_test
            no_bundle hf_e2e_test
            no_bundle hf_gpu_check
        fi
        ;;
    overhead)
        if [ $bundle_ok = 1 ]; then
            run capture_overhead 200 "$PY" bench/capture_overhead.py
        else
            no_bundle capture_overhead
        fi
        ;;
    replay)
        if [ $bundle_ok = 1 ]; then
            wanted replay_bench && run replay_bench 270 bash bench/run_gpu.sh
            [[ "$ONLY" == *" replay_long "* ]] && # named only: not part of the group
                run replay_long 300 sh -c 'for d in cuda cpu; do KVT="$KVT_BIN" DEVICE=$d \
                    WORK=/tmp/kvt_long_$d T=${LONG_T:-2048} G=${LONG_G:-4096} \
                    bash bench/decode_probs.sh || exit 1; done'
        else
            wanted replay_bench && no_bundle replay_bench
            [[ "$ONLY" == *" replay_long "* ]] && no_bundle replay_long
        fi
        ;;
    *) note "$step" "unknown step" ;;
    esac
done

echo
echo "== summary ($(head -1 "$OUT/gpu.txt" 2>/dev/null))"
pack
cat "$OUT/summary.txt"
echo "logs: \$OUT/gpu_session.tar.gz"
