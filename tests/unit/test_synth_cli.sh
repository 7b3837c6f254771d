#!/usr/bin/env bash
# test_synth_cli.sh - `kvtrace synth`: --help, one clear error line and a non-zero exit on bad
# input, byte-identical output for the same seed whatever --threads, a different file for
# another seed, and a result that `kvtrace verify` accepts.
set -u
BIN=${KVT_BIN:?}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0; pass=0
check() { if eval "$2"; then pass=$((pass+1)); else echo "FAILED: $1"; fail=$((fail+1)); fi; }
# one_error "description" args...: exit non-zero with exactly one line on stderr
one_error() {
    local what=$1; shift
    "$BIN" synth "$@" >/dev/null 2>"$TMP/err"; local rc=$?
    check "$what: non-zero exit" "[ $rc -ne 0 ]"
    check "$what: one error line" "[ \$(wc -l < $TMP/err) -eq 1 ] && grep -q 'error' $TMP/err"
}

check "synth --help exits 0" "$BIN synth --help | grep -q 'usage: kvtrace synth'"
check "--help lists the shapes" "$BIN synth --help | grep -q qwen2-vl-7b"
check "kvtrace --help lists synth" "$BIN --help | grep -q synth"
check "kvtrace help synth = synth --help" "[ \"\$($BIN help synth)\" = \"\$($BIN synth --help)\" ]"
one_error "unknown shape" --shape nosuch --tokens 10 -o "$TMP/x.kvt"
check "unknown shape lists the valid ones" "grep -q 'llama3-8b' $TMP/err"
one_error "W > T" --shape tiny --tokens 10 --window 11 -o "$TMP/x.kvt"
check "W > T names both" "grep -q 'W=11' $TMP/err"
one_error "T = 0" --shape tiny --tokens 0 -o "$TMP/x.kvt"
one_error "no tokens" --shape tiny -o "$TMP/x.kvt"
one_error "no shape" --tokens 10 -o "$TMP/x.kvt"
one_error "no output" --shape tiny --tokens 10
one_error "bad dtype" --shape tiny --tokens 10 --dtype i32 -o "$TMP/x.kvt"
one_error "bad image fraction" --shape tiny --tokens 10 --image-frac 1.5 -o "$TMP/x.kvt"
one_error "bad colsum" --shape tiny --tokens 10 --colsum maybe -o "$TMP/x.kvt"
one_error "too many layers" --shape tiny --tokens 10 --layers 3 -o "$TMP/x.kvt"
check "too many layers names the shape's count" "grep -q 'has 2' $TMP/err"
one_error "zero layers" --shape tiny --tokens 10 --layers 0 -o "$TMP/x.kvt"
one_error "unknown option" --shape tiny --tokens 10 --frobnicate -o "$TMP/x.kvt"
one_error "missing value" --shape tiny --tokens
check "nothing written on bad input" "[ ! -e $TMP/x.kvt ]"

check "synth writes a trace" \
    "$BIN synth --shape tiny-vl --tokens 500 --threads 1 -o $TMP/a.kvt >$TMP/out && grep -q synthetic-tiny-vl $TMP/out"
check "same seed, other thread count: identical bytes" \
    "$BIN synth --shape tiny-vl --tokens 500 --threads 2 -o $TMP/b.kvt >/dev/null && cmp -s $TMP/a.kvt $TMP/b.kvt"
check "another seed: different bytes" \
    "$BIN synth --shape tiny-vl --tokens 500 --seed 7 -o $TMP/c.kvt >/dev/null && ! cmp -s $TMP/a.kvt $TMP/c.kvt"
one_error "existing file without --force" --shape tiny --tokens 10 -o "$TMP/a.kvt"
check "--force overwrites" "$BIN synth --shape tiny --tokens 64 --force -o $TMP/a.kvt >/dev/null"
check "verify accepts a synthetic trace" "$BIN verify $TMP/c.kvt >/dev/null"
check "info shows the synthetic model" "$BIN info $TMP/c.kvt | grep -q synthetic-tiny-vl"
check "f32, q-all, no decode" \
    "$BIN synth --shape tiny --tokens 40 --dtype f32 --q-all --decode 0 --colsum off -o $TMP/d.kvt >/dev/null && $BIN info $TMP/d.kvt | grep -q Q_all"
check "--layers 1 writes one layer" \
    "$BIN synth --shape llama3-8b --tokens 64 --layers 1 --decode 0 -o $TMP/e.kvt | grep -q 'L=1 ' && $BIN info $TMP/e.kvt | grep -q 'L=1 Hq=32'"
check "an image share that does not fit before the window: cut, with a warning, and recorded" \
    "$BIN synth --shape tiny-vl --tokens 64 --image-frac 0.9 -o $TMP/i9.kvt 2>$TMP/err >/dev/null && grep -q 'image share of 0.9 is 17 of 64 tokens here, not 58' $TMP/err && $BIN info $TMP/i9.kvt --json | grep -q '\"image_tokens\":[[:space:]]*17'"
check "--record-bytes splits the tensors into small records, readable as one" \
    "$BIN synth --shape tiny-vl --tokens 700 --seed 3 --record-bytes 2k -o $TMP/r2k.kvt >/dev/null && $BIN synth --shape tiny-vl --tokens 700 --seed 3 -o $TMP/r4m.kvt >/dev/null && $BIN info $TMP/r2k.kvt | grep -Eq '^K +2 +44 ' && $BIN info $TMP/r4m.kvt | grep -Eq '^K +2 +2 ' && $BIN verify $TMP/r2k.kvt >/dev/null"
one_error "--record-bytes below 64" --shape tiny --tokens 10 --record-bytes 12 -o "$TMP/rb.kvt"
check "an image share that fits: no warning" \
    "$BIN synth --shape tiny-vl --tokens 384 -o $TMP/i6.kvt 2>$TMP/err >/dev/null && ! grep -q warning $TMP/err"
# a full disk (a 64 KiB file size limit): one error line, no partial trace left (a synthetic
# one can be made again; a part of it would only fill the disk), an existing trace it was to
# replace (--force) unchanged
cp "$TMP/c.kvt" "$TMP/full.kvt"
trap '' XFSZ
for f in --force ""; do
    out=$TMP/full.kvt
    [ -z "$f" ] && out=$TMP/new_full.kvt
    (ulimit -f 64; exec "$BIN" synth --shape tiny --tokens 4096 $f -o "$out") >/dev/null 2>"$TMP/err"
    rc=$?
    check "synth ${f:-(new file)} on a full disk: exit 1 (got $rc), one line" \
        "[ $rc -eq 1 ] && [ \$(wc -l < $TMP/err) -eq 1 ] && grep -q 'File too large' $TMP/err"
    check "synth ${f:-(new file)} on a full disk: no partial trace left" \
        "! ls $TMP | grep -q 'full.kvt.tmp' && [ ! -e $TMP/new_full.kvt ]"
done
check "synth --force on a full disk: the old trace unchanged" "cmp -s $TMP/c.kvt $TMP/full.kvt"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
