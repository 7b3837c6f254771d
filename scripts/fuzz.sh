#!/usr/bin/env bash
# fuzz.sh - run every libFuzzer target (tests/fuzz/fuzz_<name>.c) for a bounded time (default
# 60 s each) with ASan and UBSan, starting from its checked-in corpus tests/fuzz/corpus/<name>/
# and its dictionary tests/fuzz/<name>.dict if there is one. New crashes are saved under
# tests/fuzz/crashes/<name>/ (add them to the corpus once fixed: they become regression inputs
# of the ctest drivers). Exits 1 if any target crashed, leaked, timed out or ran out of memory,
# so CI fails (scripts/test.sh runs it). The corpus is never modified; to keep new coverage run
# with KVT_FUZZ_MERGE=1, which adds the inputs that reach new coverage (libFuzzer -merge=1)
# to tests/fuzz/corpus/<name>/.
# Usage: bash scripts/fuzz.sh [seconds-per-target [name...]]    (name: trace_read, budgets...)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
shift || true
command -v clang >/dev/null || {
    echo "fuzz: error: clang is not installed (apt-get install clang libclang-rt-14-dev)" >&2
    exit 1
}
if [ $# -gt 0 ]; then
    targets=$(printf 'fuzz_%s\n' "$@")
else
    targets=$(cd tests/fuzz && ls fuzz_*.c | sed 's/\.c$//' | grep -v '^fuzz_driver$')
fi
CC=clang cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVT_FUZZ=ON \
    -DKVT_SANITIZE=ON -DKVT_CUDA=OFF >/dev/null
# shellcheck disable=SC2086
cmake --build build-fuzz -j"$(nproc)" --target $targets >/dev/null
status=0
for t in $targets; do
    name=${t#fuzz_}
    # absolute paths: a target may change its working directory (LLVMFuzzerInitialize)
    corpus=$PWD/tests/fuzz/corpus/$name
    dict=$PWD/tests/fuzz/$name.dict
    crashes=$PWD/tests/fuzz/crashes/$name
    work=$(mktemp -d)
    cp -r "$corpus"/. "$work"/ 2>/dev/null || true
    mkdir -p "$crashes"
    echo "== $t for ${SECS}s" >&2
    args=(-max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=30
          -max_len=65536 -artifact_prefix="$crashes/" -print_final_stats=1)
    [ -f "$dict" ] && args+=(-dict="$dict")
    if ! ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
            "$PWD/build-fuzz/tests/$t" "$work" "${args[@]}" 2> "build-fuzz/$t.log"; then
        echo "fuzz: $t FAILED (crash, leak, timeout or out of memory): see build-fuzz/$t.log" \
             "and $crashes/" >&2
        grep -E '^(==[0-9]+==ERROR|SUMMARY|artifact_prefix|Test unit written)' \
            "build-fuzz/$t.log" >&2 || true
        status=1
    fi
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "build-fuzz/$t.log" >&2 || true
    if [ "${KVT_FUZZ_MERGE:-0}" = 1 ]; then
        # additive: keeps every checked-in input, adds only inputs with new coverage
        "$PWD/build-fuzz/tests/$t" -merge=1 -max_len=65536 "$corpus" "$work" 2>> "build-fuzz/$t.log" \
            || { echo "fuzz: $t: merge failed" >&2; status=1; }
        echo "fuzz: $corpus now holds $(ls "$corpus" | wc -l) inputs," \
             "$(du -sk "$corpus" | cut -f1) KiB" >&2
    fi
    rm -rf "$work"
    rmdir "$crashes" 2>/dev/null || true
done
exit $status
