#!/usr/bin/python3
"""test_qfilter.py - `kvtrace replay --policy qfilter` against NumPy, written from kvpress's
QFilterPress.score (kvpress/presses/qfilter_press.py @00a150c: score = -<f, k> per KV head) and
the calibration kvtrace documents (analysis/RESULTS.md): f = the top eigenvector of the sum of
q q^T over the window queries of the head's query heads (numpy.linalg.eigh), oriented so that
the queries' projections on it sum to at most zero. kvpress then keeps the top n_kept; the check
breaks ties toward the earlier token, as kvtrace documents, and computes in float64.

Traces: a llama2.c capture (T = 150, GQA 2, D = 8) and a llama3-8b-shaped synthetic one (bf16,
GQA 4, D = 128); filters given as a file ([L, Hkv, D], and [L, Hq, D] with heads=query) and
calibrated, with and without a window. A trace whose one head's queries are zero (f = 0: ties,
the earliest tokens) and the refusals (a file of another shape, NaN in it, an option qfilter
does not take) are checked too. kvtrace.qfilters (the Python calibration over one or more
traces, window queries or Q_all) must give the calibration's kept sets on one trace, and match
NumPy on the stacked queries of two traces and on Q_all. Environment: KVT_BIN, KVT_LIB,
KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# (cli_test exits 77 without NumPy or the CLI)
from cli_test import (ROOT, check, compare_scores, copy_trace, finish,  # noqa: E402
                      need_library, replay_export, run, score_traces)
import numpy as np  # noqa: E402

kvtrace = need_library()


def calibrated(Q):
    """The filter of the queries Q [n, D] (float64)."""
    w, vec = np.linalg.eigh(Q.T @ Q)
    if not np.any(Q):
        return np.zeros(Q.shape[1])
    f = vec[:, -1]
    s = (Q @ f).sum()
    big = int(np.argmax(np.abs(f)))
    if s > 0 or (s == 0 and f[big] > 0):
        f = -f
    return f


def compare(name, path, spec, budgets, work, filters=None, window=0):
    def layer_scores(t, layer, per_query):
        """per selection head: -K[g] @ f"""
        K = t.read("K", layer, dtype="float32").astype(np.float64)
        Qw = t.read("Q_window", layer, dtype="float32").astype(np.float64)
        Hkv = K.shape[0]
        G = Qw.shape[0] // Hkv
        out = []
        for h in range(Qw.shape[0] if per_query else Hkv):
            g = h // G if per_query else h
            if filters is not None:
                f = filters[layer, h if filters.shape[1] != Hkv else g]
            else:
                rows = Qw[h:h + 1] if per_query else Qw[g * G:(g + 1) * G]
                f = calibrated(rows.reshape(-1, rows.shape[-1]))
            out.append(-(K[g] @ f.astype(np.float64)))
        return out
    compare_scores(name, path, spec, budgets, work, layer_scores, window=window)


def refused(args, want, what):
    r = run(*args, ok=False)
    check(r.returncode != 0 and want in r.stderr,
          "%s: exit %d, stderr %r (want %r)" % (what, r.returncode, r.stderr, want))


def main():
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        with kvtrace.open(a) as t:
            m = t.header["model"]
            La, Hqa, Hkva, Da = m["n_layers"], m["n_q_heads"], m["n_kv_heads"], m["head_dim"]
        with kvtrace.open(s) as t:
            m = t.header["model"]
            Ls, Hqs, Hkvs, Ds = 2, m["n_q_heads"], m["n_kv_heads"], m["head_dim"]

        for spec, w in (("qfilter", 0), ("qfilter:window=4", 4), ("qfilter:heads=query", 0)):
            compare("llama2c", a, spec, "1,3,10,40,50%,200", work, window=w)
            compare("llama3-8b", s, spec, "8,60,50%", work, window=w)

        fa = rng.standard_normal((La, Hkva, Da)).astype(np.float32)
        pa = os.path.join(work, "fa.npy")
        np.save(pa, fa)
        compare("llama2c file", a, "qfilter:filters=" + pa, "1,3,10,40,50%", work, filters=fa)
        fs = rng.standard_normal((Ls, Hkvs, Ds)).astype(np.float32)
        ps = os.path.join(work, "fs.npy")
        np.save(ps, fs)
        compare("llama3-8b file", s, "qfilter:filters=" + ps, "8,60,50%", work, filters=fs)
        compare("llama3-8b file", s, "qfilter:heads=query,filters=" + ps, "8,60", work,
                filters=fs)
        fq = rng.standard_normal((Ls, Hqs, Ds))  # float64, per query head
        pq = os.path.join(work, "fq.npy")
        np.save(pq, fq)
        compare("llama3-8b query file", s, "qfilter:heads=query,filters=" + pq, "8,60,50%",
                work, filters=fq)

        # KV head 1's window queries all zero: f = 0, every score ties, the earliest are kept
        Ga = Hqa // Hkva

        def zero(kind, layer, x):
            if kind == "Q_window" and layer == 1:
                x[Ga:2 * Ga] = 0.0
        z = copy_trace(a, os.path.join(work, "z.kvt"), edit=zero)
        exp = replay_export(z, "qfilter", "5,10", work)
        got = [r["kept"] for r in exp["records"] if r["layer"] == 1 and r["head"] == 1]
        check(got == [list(range(5)), list(range(10))], "zero queries: kept %s" % got)
        compare("zero queries", z, "qfilter", "5,10,50%", work)

        # kvtrace.qfilters: one trace's window queries give the calibration's filters (the
        # same kept sets from the file as calibrated); several traces, a corpus, and Q_all
        def kept(path, spec, budgets):
            exp = replay_export(path, spec, budgets, work)
            return [(r["layer"], r["head"], r["budget_tokens"], sorted(r["kept"]))
                    for r in exp["records"]]
        for trace, Hq_, heads, bud in ((a, Hqa, "kv", "1,3,10,40,50%"),
                                       (s, Hqs, "kv", "8,60,50%"),
                                       (s, Hqs, "query", "8,60")):
            f = kvtrace.qfilters(trace, heads=heads)
            check(f.shape[1] == (Hq_ if heads == "query" else
                                 (Hkva if trace == a else Hkvs)), "qfilters shape %s" % (f.shape,))
            pf = os.path.join(work, "own.npy")
            np.save(pf, f)
            hq = ",heads=query" if heads == "query" else ""
            got, want = kept(trace, "qfilter:filters=" + pf + hq, bud), kept(trace, "qfilter" + hq,
                                                                              bud)
            check(got == want, "qfilters(%s, heads=%s): %d of %d sets differ from the calibrated"
                  % (os.path.basename(trace), heads, sum(x != y for x, y in zip(got, want)),
                     len(want)))
        b = os.path.join(work, "b.kvt")  # another prompt, with Q_all
        run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
            "--tokens", "120", "--seed", "9", "--decode", "2", "--window", "16", "--q-all",
            "-o", b)
        with kvtrace.open(a) as ta, kvtrace.open(b) as tb:
            G = Hqa // Hkva
            for queries, kind in (("window", "Q_window"), ("all", "Q_all")):
                paths = [a, b] if queries == "window" else [b]
                f = kvtrace.qfilters(paths, queries=queries)
                err = 0.0
                for layer in range(La):
                    qs = [t.read(kind, layer, dtype="float32").astype(np.float64)
                          for t in ((ta, tb) if queries == "window" else (tb,))]
                    for g in range(Hkva):
                        rows = np.concatenate([q[g * G:(g + 1) * G].reshape(-1, Da) for q in qs])
                        err = max(err, np.abs(f[layer, g] - calibrated(rows)).max())
                check(err < 1e-9, "qfilters(%s, queries=%s): %.3g from NumPy on the stacked "
                      "queries" % (len(paths), queries, err))
                pf = os.path.join(work, "corpus.npy")
                np.save(pf, f)
                compare("corpus filters", a, "qfilter:filters=" + pf, "1,3,10,40", work, filters=f)
        for bad, want in ((lambda: kvtrace.qfilters([a, s]), "the first trace has"),
                          (lambda: kvtrace.qfilters(a, queries="all"), "no Q_all for layer 0"),
                          (lambda: kvtrace.qfilters(a, heads="group"), "heads must be")):
            try:
                bad()
                check(False, "qfilters: no error (want %r)" % want)
            except ValueError as e:
                check(want in str(e), "qfilters: %s (want %r)" % (e, want))

        out = os.path.join(work, "x.json")
        base = ("replay", s, "--budgets", "8", "-o", out, "--force", "--policy")
        refused(base + ("qfilter:filters=" + pq,), "this trace has 2 layers and 8 KV heads",
                "query-head filters with heads=kv")
        np.save(os.path.join(work, "bad_d.npy"), np.zeros((Ls, Hkvs, Ds // 2)))
        refused(base + ("qfilter:filters=" + os.path.join(work, "bad_d.npy"),),
                "filters of 64 dimensions; this trace's heads have 128", "head dim")
        bad = fs.copy()
        bad[1, 3, 5] = np.nan
        np.save(os.path.join(work, "nan.npy"), bad)
        refused(base + ("qfilter:filters=" + os.path.join(work, "nan.npy"),),
                "nan at layer 1, head 3, dim 5", "NaN filter")
        np.save(os.path.join(work, "two.npy"), np.zeros((Ls, Hkvs)))
        refused(base + ("qfilter:filters=" + os.path.join(work, "two.npy"),),
                "has 2 dimensions; expected 3", "2-D filters")
        refused(base + ("qfilter:filters=" + os.path.join(work, "none.npy"),), "qfilter: ",
                "missing file")
        refused(base + ("qfilter:kernel=5",), "unknown option 'kernel'", "an option it lacks")
    finish("test_qfilter")


if __name__ == "__main__":
    main()
