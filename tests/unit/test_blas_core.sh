#!/bin/bash
# test_blas_core.sh - the CPU's dense products never run on OpenBLAS's generic kernels on a CPU
# that has better ones: OpenBLAS picks its kernels by CPU model number and falls back to the
# generic Prescott ones on a model it does not know (Debian 12's 0.3.21 on Emerald Rapids, the
# replay ~2x slower); kvtrace then re-executes itself with OPENBLAS_CORETYPE set. A user's own
# OPENBLAS_CORETYPE is kept, --version and replay --profile say which kernels run, and the
# results agree with the generic kernels' up to summation order. On a CPU that OpenBLAS knows
# the re-execution never happens and only the reporting and the results are checked.
set -u
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
S=$ROOT/traces/samples/stories260K.kvt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
unset OPENBLAS_CORETYPE KVT_BLAS_REEXEC

line=$("$BIN" --version | grep '^CPU dense products: ') || fail "--version has no dense-products line"
echo "$line"
if [[ "$line" != *"without OpenBLAS"* ]]; then
    [[ "$line" =~ ^CPU\ dense\ products:\ OpenBLAS\ [0-9.]+,\ [A-Za-z0-9]+\ kernels ]] ||
        fail "unexpected line: $line"
    flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
    if [[ " $flags " == *" avx2 "* && " $flags " == *" fma "* ]]; then
        [[ "$line" != *"Prescott kernels"* ]] ||
            fail "OpenBLAS's generic kernels on a CPU with AVX2 and FMA: $line"
    fi
    # the user's choice is kept, and said
    forced=$(OPENBLAS_CORETYPE=Prescott "$BIN" --version | grep '^CPU dense products: ')
    [[ "$forced" == *", Prescott kernels (set by OPENBLAS_CORETYPE)" ]] ||
        fail "OPENBLAS_CORETYPE=Prescott: $forced"
    # a name OpenBLAS does not know is not reported as the user's choice
    bogus=$(OPENBLAS_CORETYPE=nosuchcore "$BIN" --version | grep '^CPU dense products: ')
    [[ "$bogus" == *"(OPENBLAS_CORETYPE=nosuchcore is not a kernel set OpenBLAS knows)" ]] ||
        fail "OPENBLAS_CORETYPE=nosuchcore: $bogus"
    # a stale marker variable alone does not stop kvtrace choosing
    stale=$(KVT_BLAS_REEXEC=x "$BIN" --version | grep '^CPU dense products: ')
    [ "$stale" = "$line" ] || fail "KVT_BLAS_REEXEC=x: $stale (without it: $line)"
fi
# started through the dynamic loader (/proc/self/exe is then ld.so): no re-execution, and the
# command still works
LDSO=$(sed -n 's/^ *\[Requesting program interpreter: \(.*\)\]$/\1/p' <(readelf -l "$BIN" 2>/dev/null))
if [ -n "$LDSO" ] && [ -x "$LDSO" ]; then
    "$LDSO" "$BIN" replay "$S" --policies snapkv --budgets 16 -o "$TMP/ld.json" >/dev/null \
        2>"$TMP/err" || { cat "$TMP/err"; fail "replay through $LDSO"; }
    [ -s "$TMP/ld.json" ] || fail "no results through $LDSO"
    "$LDSO" "$BIN" --version | grep -q '^kvtrace ' || fail "--version through $LDSO"
fi

# KVT_KERNELS=ref runs the plain references: no library's kernels to name
KVT_KERNELS=ref "$BIN" --version | grep -q '^CPU dense products: the plain reference loops (KVT_KERNELS=ref)$' ||
    fail "KVT_KERNELS=ref: $(KVT_KERNELS=ref "$BIN" --version | tail -1)"
# replay: the (possibly re-executed) process writes the results, exits 0, and --profile names
# the kernels; usage errors still exit 2 with their one line
"$BIN" replay "$S" --policies snapkv,adakv,pyramidkv,h2o --budgets 16,64,25% --threads 2 \
    --profile -o "$TMP/a.json" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "replay"; }
grep -q "^profile: CPU dense products: ${line#CPU dense products: }\$" "$TMP/err" ||
    { cat "$TMP/err"; fail "--profile does not name the kernels --version names"; }
"$BIN" replay "$S" --budgets 16 --bogus -o "$TMP/x.json" 2>"$TMP/err"
[ $? -eq 2 ] && [ "$(wc -l <"$TMP/err")" -ge 1 ] && grep -q -- "--bogus" "$TMP/err" ||
    fail "usage error: $(cat "$TMP/err")"
[ ! -e "$TMP/x.json" ] || fail "usage error wrote results"
OPENBLAS_CORETYPE=Prescott "$BIN" replay "$S" --policies snapkv,adakv,pyramidkv,h2o \
    --budgets 16,64,25% --threads 2 -o "$TMP/b.json" >/dev/null 2>"$TMP/err" ||
    { cat "$TMP/err"; fail "replay with Prescott kernels"; }
PY=${KVT_PYTHON:-/usr/bin/python3}
"$PY" - "$TMP/a.json" "$TMP/b.json" <<'PYEOF' || fail "results differ between kernel sets"
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
worst, n = 0.0, 0
def walk(x, y, path):
    global worst, n
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), path
        for k in x:
            if k not in ("created", "wall_s", "host", "elapsed_s"):
                walk(x[k], y[k], path + "/" + k)
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), path
        for u, v in zip(x, y):
            walk(u, v, path)
    elif isinstance(x, float) and isinstance(y, (int, float)):
        n += 1
        if not (math.isnan(x) and math.isnan(y)):
            d = abs(x - y) / max(1.0, abs(x))
            if d > 1e-6:
                sys.exit("%s: %r vs %r" % (path, x, y))
            worst = max(worst, d)
    else:
        assert x == y or isinstance(x, str), (path, x, y)
walk(a, b, "")
assert n > 1000, n
print("results agree: %d numbers, largest relative difference %.2g" % (n, worst))
PYEOF
echo "ok"
