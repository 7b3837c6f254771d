#!/usr/bin/env bash
# fuzz.sh - run every libFuzzer target for a bounded time (default 60 s each) with ASan and
# UBSan, starting from the checked-in corpus. New crashes are saved under
# tests/fuzz/crashes/<target>/ (add them to the corpus once fixed: they become regression
# inputs of the ctest drivers). Usage: bash scripts/fuzz.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
command -v clang >/dev/null || { echo "fuzz: error: clang is not installed (apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }
CC=clang cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVT_FUZZ=ON \
    -DKVT_SANITIZE=ON -DKVT_CUDA=OFF >/dev/null
targets=$(cd tests/fuzz && ls fuzz_*.c | sed 's/\.c$//' | grep -v fuzz_driver)
cmake --build build-fuzz -j"$(nproc)" --target $targets >/dev/null
status=0
for t in $targets; do
    name=${t#fuzz_}
    corpus=tests/fuzz/corpus/$name
    work=$(mktemp -d)
    cp -r "$corpus"/. "$work"/ 2>/dev/null || true
    mkdir -p "tests/fuzz/crashes/$name"
    echo "== $t for ${SECS}s" >&2
    if ! ASAN_OPTIONS=detect_leaks=1 ./build-fuzz/tests/$t "$work" -max_total_time="$SECS" \
            -rss_limit_mb=2048 -max_len=65536 -artifact_prefix="tests/fuzz/crashes/$name/" \
            -print_final_stats=1 2> "build-fuzz/$t.log"; then
        echo "fuzz: $t found a crash: see build-fuzz/$t.log and tests/fuzz/crashes/$name/" >&2
        status=1
    fi
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "build-fuzz/$t.log" >&2 || true
    rm -rf "$work"
done
exit $status
