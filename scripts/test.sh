#!/usr/bin/env bash
# test.sh - the whole test suite, as CI runs it: install what is missing, check formatting,
# build with warnings as errors and run every test (GPU tests report "not run" without a
# GPU), then rebuild with AddressSanitizer + UndefinedBehaviorSanitizer and run the CPU
# tests again. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc)

bash scripts/setup.sh build

echo "== clang-format check" >&2
git ls-files '*.c' '*.h' '*.cu' '*.cuh' | xargs -r clang-format --dry-run -Werror

echo "== tests (build/)" >&2
ctest --test-dir build --output-on-failure -j"$JOBS"

echo "== tests under ASan + UBSan (build-asan/)" >&2
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKVT_WERROR=ON -DKVT_SANITIZE=ON \
      -DKVT_CUDA=OFF >/dev/null
cmake --build build-asan -j"$JOBS"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$JOBS" -L cpu -LE "slow|noasan"
