#!/usr/bin/env bash
# gpu_session.sh - every GPU check of issues #6 and #7 as ONE command for a device machine,
# built to fit the device lease (15 minutes in all, start-up included): each step has its own
# time limit, a failed step is reported and the next one runs, and a table of results is
# printed last. Logs and results go to a work folder that is packed into
# $OUT/gpu_session.tar.gz at the end (the device tool brings back at most 8 files), next to
# $OUT/summary.txt.
#
# Prepare here (no GPU needed):   bash scripts/device_bundle.sh      # builds .devbundle/
# Run there (device tool):        bash scripts/gpu_session.sh [STEPS]   with carry [".devbundle"]
# STEPS (default "tests sanitize hf overhead replay"):
#   tests     the gpu-labelled tests from the bundle: capture device path, GPU column sums,
#             replay kernels, CUPTI timeline, replay --device cuda against the references
#   sanitize  compute-sanitizer memcheck on the capture tests, racecheck on the column sums
#   hf        HF transformers capture: the binding's test against the real library, stories260K
#             as an HF Llama vs the C engine's trace, a random Qwen2-VL with an image
#   overhead  Llama-3-8B-shaped prefill with and without capture (bench/capture_overhead.py)
#   replay    the replay benchmark of issue #7 (bench/run_gpu.sh)
# If the bundle's binaries cannot run there (other system libraries), `tests` falls back to
# scripts/gpu_check.sh, which builds the kernel tests with nvcc alone.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/kvt_gpu_out}
OUT=$(mktemp -d /tmp/kvt_gpu_session.XXXXXX) # every step's logs and results; packed at the end
mkdir -p "$FINAL"
STEPS=${*:-tests sanitize hf overhead replay}
BUNDLE=$PWD/.devbundle
# the bundle finds its libraries through its RPATH; CUPTI (loaded at run time) is the toolkit's
for d in /usr/local/cuda/extras/CUPTI/lib64 /usr/local/cuda/lib64; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export KVT_LIB="$BUNDLE/lib/libkvtrace.so" KVT_BIN="$BUNDLE/bin/kvtrace" KVT_SOURCE_ROOT=$PWD
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
PY=${PYTHON:-python3}
summary=()
note() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }
# run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record PASS / NOT RUN / FAIL
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local r=$?
    tail -n 15 "$OUT/$name.log"
    local how="FAIL (exit $r)"
    [ $r = 0 ] && how=PASS
    [ $r = 77 ] && how="NOT RUN"
    [ $r = 124 ] && how="TIMEOUT (${limit} s)"
    note "$name" "$how, $((SECONDS - t0)) s"
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "bundle $(cat "$BUNDLE/REVISION" 2>/dev/null || echo missing), tree $(git rev-parse HEAD 2>/dev/null)"

bundle_ok=0
if [ -x "$BUNDLE/bin/kvtrace" ] && "$BUNDLE/bin/kvtrace" --version >/dev/null 2>&1; then
    bundle_ok=1
else
    echo "the bundle's binaries do not run here (or .devbundle was not carried)"
fi

for step in $STEPS; do
    case $step in
    tests)
        if [ $bundle_ok = 1 ]; then
            for t in test_capture_device_gpu test_capture_colsum_gpu test_kernels_cuda \
                test_capture_timeline_gpu; do
                run "$t" 180 "$BUNDLE/bin/$t"
            done
            # replay --device cuda against the all-reference replay, every policy, two traces
            run test_replay_device_gpu 300 env KVT_PYTHON="$PY" \
                bash tests/unit/test_replay_fast_vs_ref.sh cuda
        else
            run gpu_check_nvcc 400 env OUT="$OUT/gpu_check" SANITIZE=0 bash scripts/gpu_check.sh
        fi
        ;;
    sanitize)
        if [ $bundle_ok = 1 ] && command -v compute-sanitizer >/dev/null; then
            run memcheck_capture_device 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$BUNDLE/bin/test_capture_device_gpu"
            run racecheck_colsum 240 env KVT_COLSUM_BENCH_T=0 compute-sanitizer --tool racecheck \
                --error-exitcode 9 "$BUNDLE/bin/test_capture_colsum_gpu"
            run memcheck_colsum 240 env KVT_COLSUM_BENCH_T=0 compute-sanitizer --tool memcheck \
                --error-exitcode 9 "$BUNDLE/bin/test_capture_colsum_gpu"
            run memcheck_kernels 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$BUNDLE/bin/test_kernels_cuda"
            run memcheck_replay_device 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
                "$BUNDLE/bin/kvtrace" replay traces/samples/stories260K.kvt --device cuda \
                --policies all --threads 2 --profile -o "$OUT/memcheck_replay.json" --force
        else
            note sanitize "NOT RUN (no bundle or no compute-sanitizer)"
        fi
        ;;
    hf)
        run hf_convert_test 120 "$PY" tests/oracle/test_llama2c_hf_convert.py
        run hf_binding_test 240 env KVT_REQUIRE_CUDA_CAPTURE=1 "$PY" \
            tests/oracle/test_python_hf_capture.py
        run hf_gpu_check 300 "$PY" scripts/gpu_hf_check.py
        ;;
    overhead)
        run capture_overhead 420 "$PY" bench/capture_overhead.py
        ;;
    replay)
        run replay_bench 420 bash bench/run_gpu.sh
        ;;
    *) note "$step" "unknown step" ;;
    esac
done

echo
echo "== summary ($(cat "$OUT/gpu.txt" 2>/dev/null | head -1))"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
cp "$OUT/summary.txt" "$FINAL/summary.txt"
tar -C "$OUT" -czf "$FINAL/gpu_session.tar.gz" . && echo "logs: \$OUT/gpu_session.tar.gz"
