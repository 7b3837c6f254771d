#!/usr/bin/env bash
# gpu_check.sh - the GPU checks of issues #6 and #7 as one short command for a device machine
# (see ../.library/device: the machine is bare, cannot install packages, has nvcc 13, CMake and
# compute-sanitizer), the fallback of scripts/gpu_session.sh where the bundle's binaries do not
# run. It builds the replay kernels' test there straight from the sources with nvcc and the C
# compiler (it needs nothing but the CUDA runtime), runs it, then runs compute-sanitizer
# memcheck and racecheck on it. (The capture tests need the whole library: zstd, cJSON.) Everything it prints also goes
# to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out).
#
# usage (on the device machine, from the repository root):  bash scripts/gpu_check.sh
# environment: OUT, ARCH [90] (sm_ARCH), CC [cc], NVCC [nvcc], SANITIZE [1]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
ARCH=${ARCH:-90}
CC=${CC:-cc}
NVCC=${NVCC:-nvcc}
mkdir -p "$OUT"
B=$(mktemp -d)
trap 'rm -rf "$B"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
rc=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$NVCC" --version | tail -1

step "build ($B)"
CUDA_INC=$(dirname "$(command -v "$NVCC")")/../include
CFLAGS="-std=c11 -O2 -g -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -DKVT_VERSION_STRING=\"gpu-check\""
INC="-Icommon -Ikernels -Ikernels/cuda -Itraces -Icapture -Itests -I$CUDA_INC"
[ -d "$CUDA_INC/../extras/CUPTI/include" ] && INC="$INC -I$CUDA_INC/../extras/CUPTI/include"
objs=()
for f in common/status.c common/alloc.c common/dtype.c common/misc.c common/version.c \
         kernels/ref/*.c; do
    o=$B/$(echo "$f" | tr / _).o
    $CC $CFLAGS $INC -c "$f" -o "$o" || { echo "FAILED: cc $f"; exit 1; }
    objs+=("$o")
done
for f in kernels/cuda/*.cu; do
    "$NVCC" -O2 -g -std=c++17 -arch=sm_$ARCH -lineinfo --fmad=false $INC -c "$f" \
        -o "$B/$(basename "$f").o" || { echo "FAILED: nvcc $f"; exit 1; }
done
$CC $CFLAGS $INC -c tests/unit/test_kernels_cuda.c -o "$B/tkc.o" &&
    "$NVCC" -arch=sm_$ARCH "$B/tkc.o" "$B"/*.cu.o "${objs[@]}" -o "$B/test_kernels_cuda" -lm \
    || { echo "FAILED: link test_kernels_cuda"; exit 1; }

for t in test_kernels_cuda; do
    step "$t"
    "$B/$t"
    r=$?
    case $r in
    0) echo "$t: PASS" ;;
    77) echo "$t: NOT RUN (see its line above)" ;;
    *) echo "$t: FAIL (exit $r)"; rc=1 ;;
    esac
done

if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        step "compute-sanitizer --tool $tool test_kernels_cuda"
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$B/test_kernels_cuda" \
            > "$OUT/sanitizer_$tool.log" 2>&1
        r=$?
        tail -5 "$OUT/sanitizer_$tool.log"
        echo "compute-sanitizer $tool: exit $r"
        [ "$r" = 0 ] || rc=1
    done
fi
step "result: $([ $rc = 0 ] && echo PASS || echo FAIL)"
exit $rc
