"""cli_test.py - what the Python tests of the kvtrace command share: the environment (KVT_BIN,
KVT_SOURCE_ROOT; the python/kvtrace package put on sys.path; exit 77, "not run", without NumPy
or the CLI), check() that records a failure and goes on, run() of the CLI, raises() and the
final exit; for the policy oracles, need_library() (the binding, or exit 77), replay_export()
(a replay's kept sets) and copy_trace() (a trace with another header or edited tensors).
Import it first:

    from cli_test import BIN, ROOT, check, run, raises, finish
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

if importlib.util.find_spec("numpy") is None:  # every user of this module needs it
    print("SKIP: no NumPy")
    sys.exit(77)

BIN = os.environ.get("KVT_BIN")
ROOT = os.environ.get("KVT_SOURCE_ROOT",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
if not BIN or not os.access(BIN, os.X_OK):
    print("SKIP: KVT_BIN does not name the kvtrace CLI")
    sys.exit(77)
sys.path.insert(0, os.path.join(ROOT, "python"))

failures = []


def check(ok, what):
    """Record a failure (and print it) unless ok; returns ok."""
    if not ok:
        failures.append(what)
        print("FAILED: " + what)
    return ok


def run(*args, ok=True):
    """kvtrace ARGS..., output captured; with ok, a non-zero exit ends the test."""
    r = subprocess.run([BIN] + [str(a) for a in args], capture_output=True, text=True)
    if ok and r.returncode != 0:
        raise SystemExit("FAILED: kvtrace %s: %s" % (" ".join(map(str, args)), r.stderr))
    return r


def refused(args, want, rc=None):
    """kvtrace ARGS... must fail (exit rc, or any non-zero exit) with one line on stderr that
    holds `want`."""
    r = run(*args, ok=False)
    lines = r.stderr.strip().splitlines()
    check((r.returncode != 0 if rc is None else r.returncode == rc) and len(lines) == 1 and
          want in r.stderr, "refused with %r: exit %d, %r" % (want, r.returncode, r.stderr))


def raises(exc, fn, want, what):
    """fn() must raise exc with `want` in its message; returns the exception."""
    try:
        fn()
    except exc as e:
        good = want in str(e)
        check(good, "%s: %s %r lacks %r" % (what, type(e).__name__, str(e), want))
        if good:
            print("ok: %s: %s" % (what, e))
        return e
    check(False, "%s: no %s" % (what, exc.__name__))


def finish(name, work=None):
    """Exit 1 with the count of failures, else print NAME: ok. work: the test's own temporary
    directory, removed when nothing failed (kept, and named, when something did)."""
    if failures:
        print("%d failure(s)%s" % (len(failures), "; its files are in %s" % work if work else ""))
        sys.exit(1)
    if work:
        shutil.rmtree(work, ignore_errors=True)
    print("%s: ok" % name)


def need_library():
    """The kvtrace package over the library KVT_LIB names; exit 77 ("not run") without it."""
    lib = os.environ.get("KVT_LIB")
    if not lib or not os.path.exists(lib):
        print("SKIP: KVT_LIB does not name libkvtrace.so")
        sys.exit(77)
    import kvtrace
    return kvtrace


def replay_export(path, spec, budgets, work):
    """kvtrace replay PATH --policy SPEC --budgets BUDGETS --export-selection (JSON) in WORK: the
    export as a dict (policies[0].granularity; records of layer, head, budget_tokens, kept)."""
    sel = os.path.join(work, "sel.json")
    run("replay", path, "--policy", spec, "--budgets", budgets, "--export-selection", sel,
        "-o", os.path.join(work, "r.json"), "--force")
    with open(sel) as f:
        return json.load(f)


def check_sets(name, spec, pairs, budgets=None):
    """Each (export record, the check's kept set) pair must agree: prints the first 3 that
    differ and checks that none does (and that there is one)."""
    bad = 0
    for r, want in pairs:
        if want != set(r["kept"]):
            bad += 1
            if bad <= 3:
                print("  %s %s layer %d head %d B %d: check %s, replay %s" % (
                    name, spec, r["layer"], r["head"], r["budget_tokens"],
                    sorted(want - set(r["kept"])), sorted(set(r["kept"]) - want)))
    print("%s %s%s: %d sets, %d differ" % (name, spec, " at " + budgets if budgets else "",
                                          len(pairs), bad))
    check(len(pairs) > 0 and bad == 0,
          "%s %s: %d of %d kept sets differ" % (name, spec, bad, len(pairs)))


def compare_kept(name, spec, recs, order_of):
    """Each export record's kept set against the first budget_tokens of order_of(r), a ranking
    of the trace's tokens (check_sets)."""
    check_sets(name, spec, [(r, set(order_of(r)[:r["budget_tokens"]])) for r in recs])


def score_traces(work, q_all=False, layers=2):
    """The two traces of the score policies' oracles, written in WORK: a llama2.c capture of
    stories260K (T = 150, 8 query heads on 4 KV heads, D = 8, window 8, 2 decode steps) and a
    llama3-8b-shaped synthetic trace (`layers` layers, T = 300, bf16, GQA 4, D = 128), both with
    every prompt query (Q_all) when q_all. Their paths."""
    qa = ["--q-all"] if q_all else []
    a = os.path.join(work, "a.kvt")
    run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--tokens", "150", "--decode", "2", "--window", "8", *qa, "-o", a)
    s = os.path.join(work, "s.kvt")
    run("synth", "--shape", "llama3-8b", "--tokens", "300", "--layers", str(layers), *qa,
        "-o", s)
    return a, s


def compare_scores(name, path, spec, budgets, work, layer_scores, window=0, nan_first=False):
    """The kept sets of a replay of SPEC against a ranking of NumPy scores: layer_scores(t,
    layer, per_query) gives the layer's [T] scores per KV head, or per selection head (per query
    head with heads=query); each head's ranking is its last `window` tokens (the most recent
    first), then the rest by score descending, ties to the earlier token, NaN last (first with
    nan_first, as torch.topk)."""
    exp = replay_export(path, spec, budgets, work)
    recs = exp["records"]
    per_query = exp["policies"][0]["granularity"] == "query_head"
    with need_library().open(path) as t:
        T = t.header["n_tokens"]
        m = t.header["model"]
        G = m["n_q_heads"] // m["n_kv_heads"] if per_query else 1
        P = T - min(window, T)
        cache = {}

        def order_of(r):
            layer = r["layer"]
            if layer not in cache:
                cache.clear()
                cache[layer] = layer_scores(t, layer, per_query)
            heads = cache[layer]
            s = heads[r["head"] if len(heads) == m["n_q_heads"] and per_query else
                      r["head"] // G]
            nan = -1 if nan_first else 1
            return list(range(T - 1, P - 1, -1)) + sorted(
                range(P), key=lambda j: (nan if s[j] != s[j] else 0, -s[j] if s[j] == s[j] else 0,
                                         j))
        compare_kept(name, spec, recs, order_of)


def copy_trace(src, dst, header=None, edit=None, kinds=("K", "V", "Q_window", "Q_all")):
    """A copy of the trace at src written to dst: its token tables, and each layer's `kinds` it
    holds as f32 (edit(kind, layer, array) may change them in place), under `header` (default:
    src's). Returns dst."""
    kvtrace = need_library()
    with kvtrace.open(src) as t:
        with kvtrace.TraceWriter(dst, t.header if header is None else header) as w:
            for kind in ("positions", "modality", "token_ids"):
                if t.has(kind):
                    w.append(kind, t.read(kind))
            for layer in t.layers():
                for kind in kinds:
                    if t.has(kind, layer):
                        x = t.read(kind, layer, dtype="float32")
                        if edit is not None:
                            edit(kind, layer, x)
                        w.append(kind, x, layer=layer)
    return dst
