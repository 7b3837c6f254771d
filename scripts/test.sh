#!/usr/bin/env bash
# test.sh - the whole test suite, as CI runs it: install what is missing, check formatting,
# build with warnings as errors and run every test (GPU tests report "not run" without a
# GPU), then rebuild with AddressSanitizer + UndefinedBehaviorSanitizer and run the CPU
# tests again, run the threaded tests under ThreadSanitizer, and run every fuzz target for a
# short bounded time. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc)

bash scripts/setup.sh build

echo "== clang-format check" >&2
git ls-files '*.c' '*.h' '*.cu' '*.cuh' | xargs -r clang-format --dry-run -Werror

echo "== tests (build/)" >&2
ctest --test-dir build --output-on-failure -j"$JOBS"

echo "== tests under ASan + UBSan (build-asan/)" >&2
# without MPI: Open MPI's own allocations would read as leaks, and this build is the one that
# tests a kvtrace without MPI refusing an mpirun launch
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKVT_WERROR=ON -DKVT_SANITIZE=ON \
      -DKVT_CUDA=OFF -DKVT_MPI=OFF >/dev/null
cmake --build build-asan -j"$JOBS"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$JOBS" -L cpu -LE "slow|noasan"

echo "== threaded tests under ThreadSanitizer (build-tsan/)" >&2
# the capture's writer and compression threads, the async device pipeline (on the CUDA
# emulator), the replay's workers and the selection sink: the tests labelled "threads". ASLR
# off (setarch -R): GCC 12's TSan fails to map its shadow memory with vm.mmap_rnd_bits = 32.
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVT_WERROR=ON -DKVT_TSAN=ON \
      -DKVT_CUDA=OFF -DKVT_MPI=OFF >/dev/null
cmake --build build-tsan -j"$JOBS"
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 setarch "$(uname -m)" -R \
    ctest --test-dir build-tsan --output-on-failure -j"$JOBS" -L threads

echo "== fuzz smoke: every libFuzzer target for ${KVT_FUZZ_SECS:-15} s (build-fuzz/, clang)" >&2
# Bounded (about 2 minutes with the clang build); fails if any target finds a crash, a leak,
# a timeout or an out-of-memory. Longer runs: bash scripts/fuzz.sh 300 (tests/RELIABILITY.md).
bash scripts/fuzz.sh "${KVT_FUZZ_SECS:-15}"
