#!/usr/bin/env bash
# device_bundle.sh - build kvtrace on this machine for a device session and gather what the GPU
# session needs into .devbundle/ (ignored by git; name it in the device tool's `carry`):
#   .devbundle/lib  libkvtrace.so and every shared library it and the binaries need that a bare
#                   CUDA image may lack (zstd, cJSON, cairo/png, ...; glibc and libstdc++ stay)
#   .devbundle/bin  the kvtrace CLI, the GPU tests (label gpu), bench_gpu_peak and
#                   bench_gpu_kernels
# The build is Release-with-debug-info, CUDA on (sm_90 machine code, compute_90 PTX), with
# OpenBLAS (the replay benchmark times kvtrace's CPU path as a peer, and without BLAS that path
# is several times slower; BLAS=0 leaves it out). The device tool carries at most 64 MiB with
# the working tree: the libraries over 1 MiB (OpenBLAS 37 MB) travel gzipped, and
# gpu_session.sh unpacks them before anything runs.
# scripts/gpu_session.sh runs them there. usage: bash scripts/device_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --packages # a new machine lacks zstd, cJSON, cairo, OpenBLAS...
B=${BUILD:-build-dev}
BLAS_OPT=ON
[ "${BLAS:-1}" = 0 ] && BLAS_OPT=OFF
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVT_CUDA=ON -DKVT_BLAS=$BLAS_OPT -DKVT_MPI=OFF \
    -DCMAKE_CUDA_ARCHITECTURES="90-real;90-virtual" >/dev/null
cmake --build "$B" -j"$(nproc)" >/dev/null
rm -rf .devbundle
mkdir -p .devbundle/bin .devbundle/lib
cp -L "$B/libkvtrace.so" .devbundle/lib/libkvtrace.so
ln -s libkvtrace.so .devbundle/lib/libkvtrace.so.0 # a link inside the bundle travels with it
cp "$B/bin/kvtrace" .devbundle/bin/
for t in test_capture_device_gpu test_capture_colsum_gpu test_kernels_cuda \
    test_capture_timeline_gpu; do
    if [ -x "$B/tests/$t" ]; then cp "$B/tests/$t" .devbundle/bin/; fi
done
cp "$B/bench/bench_gpu_peak" .devbundle/bin/    # bench/run_gpu.sh's scalar f64 ceiling
cp "$B/bench/bench_gpu_kernels" .devbundle/bin/ # and each replay kernel alone
for f in .devbundle/lib/libkvtrace.so .devbundle/bin/*; do ldd "$f"; done |
    awk '/=> \//{print $3}' | sort -u |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|libkvtrace)\.so' |
    while read -r l; do cp -L "$l" .devbundle/lib/; done
# find them through DT_RPATH (searched for the dependencies of dependencies too), not through
# LD_LIBRARY_PATH, which would also hand these older libraries to the machine's own Python
command -v patchelf >/dev/null || apt-get install -y -qq patchelf >/dev/null
for f in .devbundle/lib/*.so*; do
    [ -L "$f" ] || patchelf --force-rpath --set-rpath '$ORIGIN' "$f"
done
for f in .devbundle/bin/*; do patchelf --force-rpath --set-rpath '$ORIGIN/../lib' "$f"; done
# debug info out, symbols kept (compute-sanitizer's host backtraces still name functions)
strip --strip-debug .devbundle/lib/libkvtrace.so .devbundle/bin/*
# the shared libraries over 1 MiB travel gzipped (OpenBLAS 37 -> 11 MB; the device tool
# carries 64 MiB with the working tree) and gpu_session.sh unpacks them there
find .devbundle/lib -name '*.so*' -type f -size +1M ! -name libkvtrace.so -exec gzip -9 {} +
git rev-parse HEAD >.devbundle/REVISION
# the sources it was built from, so that gpu_session.sh can tell a stale bundle there
git ls-files -z '*.c' '*.h' '*.cu' '*.cuh' '*.cpp' '*CMakeLists.txt' '*.cmake' |
    xargs -0 sha1sum >.devbundle/SOURCES.sha1
# the device tool carries at most 64 MiB: the working tree (tracked and untracked files git
# does not ignore) and the bundle together
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null |
    awk '$2 == "total" { s += $1 } END { print s + 0 }')
bundle=$(du -sb .devbundle | cut -f1)
total=$((tree + bundle))
echo "device_bundle: .devbundle $((bundle >> 20)) MiB + working tree $((tree >> 20)) MiB =" \
    "$((total >> 20)) MiB of the 64 MiB the device tool carries"
if [ "$total" -gt $((63 << 20)) ]; then
    echo "device_bundle: too large for the device tool (rebuild with BLAS=0 to leave OpenBLAS out)"
    exit 1
fi
