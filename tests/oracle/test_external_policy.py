#!/usr/bin/python3
"""test_external_policy.py - `external:scores=FILE.npy`: a user's own per-token scores replayed
as a policy, checked against NumPy.

The workflow the README shows: read a trace with the Python binding, compute a score per
(layer, head, token) in NumPy, np.save it, replay it with kvtrace at every budget. Checked:

  * the kept sets (--export-selection JSON) equal NumPy's: the last `window` tokens, then each
    head's highest scores, ties to the earlier token (scores rounded so that ties occur), at
    budgets below, at and above the window and above the prompt; heads=kv [L, Hkv, T] and
    heads=query [L, Hq, T]; float16, float32 and float64 files, .npy format 1.0 and 2.0;
  * adaptive=1: the per-head budgets and kept sets equal the NumPy oracle's AdaKV allocation
    (tests/oracle/replay_oracle.py) on the same scores; negative scores refused;
  * scores = minus each key's L2 norm (computed here from the trace's K) give exactly the
    metrics of the built-in knorm policy, which ranks by the same thing;
  * the README's example (Python block and command) runs as written on the bundled trace;
  * bad files are one clear line and a non-zero exit: wrong shape (naming both shapes), a NaN
    (naming layer, head and token; in the window too), not .npy, cut short, a shape whose
    size overflows, an integer dtype, big-endian, Fortran order, a directory, a missing file,
    2 dimensions, scores= missing; two traces with one file; a .npy given to sparsemm;
  * scores=DIR, one NAME.npy per trace NAME.kvt: two traces of different lengths each keep by
    their own file; a missing or misshapen file is refused before the first trace runs, and
    so are two traces of one name (they would share a file).

Environment (tests/cmake/oracle.cmake): KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT. Exit 77 without
NumPy or the CLI.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, finish  # noqa: E402 - exits 77 without NumPy/CLI
from cli_test import run as run_cli  # noqa: E402
import numpy as np  # noqa: E402
import kvtrace  # noqa: E402


def run(*args):
    return run_cli(*args, ok=False)


def replay(trace, spec, budgets, out, extra=()):
    r = run("replay", trace, "--policy", spec, "--budgets", budgets, "--threads", "2",
            "--export-selection", out + ".sel.json", "-o", out, "--force", *extra)
    if r.returncode != 0:
        raise SystemExit("FAILED: replay %s: %s" % (spec, r.stderr))
    return json.load(open(out + ".sel.json")), json.load(open(out))


def expected_kept(s, T, W, B):
    """NumPy's kept set of one head with scores s [T]: the last W tokens (a budget below the
    window keeps its most recent B), then the highest scores, ties to the earlier token"""
    W = min(W, T)
    if B >= T:
        return list(range(T))
    if B <= W:
        return list(range(T - B, T))
    P = T - W
    order = np.lexsort((np.arange(P), -s[:P].astype(np.float64)))  # score desc, index asc
    return sorted(order[:B - W].tolist()) + list(range(P, T))


def check_kept(sel, scores, W, budgets_tok, heads, T, what):
    n = 0
    for rec in sel["records"]:
        if rec["step"] != -1:
            continue
        b = budgets_tok[rec["budget"]]
        want = expected_kept(scores[rec["layer"], rec["head"]], T, W, b)
        got = sorted(rec["kept"])
        if got != want:
            check(False, "%s: layer %d head %d budget %d: kept %s, NumPy %s" %
                  (what, rec["layer"], rec["head"], b, got, want))
            return
        n += 1
    check(n == scores.shape[0] * heads * len(budgets_tok),
          "%s: %d records, want %d" % (what, n, scores.shape[0] * heads * len(budgets_tok)))
    print("ok: %s: %d kept sets equal NumPy's" % (what, n))


with tempfile.TemporaryDirectory() as tmp:
    tr = os.path.join(tmp, "t.kvt")
    r = run("synth", "--shape", "tiny", "--tokens", "48", "--window", "8", "--decode", "4",
            "-o", tr)
    assert r.returncode == 0, r.stderr
    tr2 = os.path.join(tmp, "t2.kvt")
    r = run("synth", "--shape", "tiny", "--tokens", "40", "--window", "8", "-o", tr2)
    assert r.returncode == 0, r.stderr
    with kvtrace.open(tr) as t:
        L = len(t.layers())
        Hkv, T, D = t.shape("K", 0)
        Hq = t.shape("Q_window", 0)[0]
        K = [np.asarray(t.read("K", l, dtype="float32"), dtype=np.float64) for l in range(L)]
    rng = np.random.default_rng(7)
    budgets = "3,8,13,20,48,60"
    btok = [3, 8, 13, 20, 48, 60]

    # kept sets: KV heads, float32, window 0 and 8; ties (scores on a 0.5 grid)
    s = np.round(rng.standard_normal((L, Hkv, T)) * 2) / 2
    f32 = os.path.join(tmp, "s32.npy")
    np.save(f32, s.astype(np.float32))
    for W in (0, 8):
        spec = "external:scores=%s%s" % (f32, ",window=%d" % W if W else "")
        sel, res = replay(tr, spec, budgets, os.path.join(tmp, "r%d.json" % W))
        check_kept(sel, s, W, btok, Hkv, T, "kv heads, float32, window %d" % W)
    # query heads, float64, .npy 2.0
    sq = rng.standard_normal((L, Hq, T))
    f64 = os.path.join(tmp, "s64.npy")
    with open(f64, "wb") as f:
        np.lib.format.write_array(f, sq, version=(2, 0))
    sel, res = replay(tr, "external:scores=%s,heads=query,window=4" % f64, budgets,
                      os.path.join(tmp, "rq.json"))
    check_kept(sel, sq, 4, btok, Hq, T, "query heads, float64, npy 2.0, window 4")
    # float16
    f16 = os.path.join(tmp, "s16.npy")
    np.save(f16, s.astype(np.float16))
    sel, res = replay(tr, "external:scores=%s" % f16, budgets, os.path.join(tmp, "r16.json"))
    check_kept(sel, s.astype(np.float16).astype(np.float64), 0, btok, Hkv, T, "float16")

    # adaptive=1: AdaKV's head budgets from the file's scores, against the NumPy oracle's
    # AdaKV allocation (tests/oracle/replay_oracle.py, written from POLICIES.md) on the same
    # scores; heads of very different score scales so that the budgets differ between heads
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import replay_oracle  # noqa: E402
    scale = np.array([1.0, 6.0])[None, :, None] * (1 + np.arange(L))[:, None, None]
    sa = rng.exponential(size=(L, Hkv, T)) ** 3 * scale
    fa = os.path.join(tmp, "sa.npy")
    np.save(fa, sa)
    Wa = 4
    sel, res = replay(tr, "external:scores=%s,window=%d,adaptive=1" % (fa, Wa), budgets,
                      os.path.join(tmp, "ra.json"))
    n_ok, uneven = 0, False
    for rec in sel["records"]:
        l, h, b = rec["layer"], rec["head"], btok[rec["budget"]]
        P = T - Wa
        if b >= T:  # a budget of the prompt or above keeps it (RESULTS.md "Short prompts")
            want = list(range(T))
        elif b <= Wa:
            want = list(range(T - b, T))
        else:
            caps = replay_oracle.adakv_caps(sa[l, :, :P], b - Wa, alpha=0.2, normalize=True)
            order = np.lexsort((np.arange(P), -sa[l, h, :P]))
            want = sorted(order[:caps[h]].tolist()) + list(range(P, T))
            uneven |= len(set(caps.tolist())) > 1
        if sorted(rec["kept"]) != want:
            check(False, "adaptive: layer %d head %d budget %d: kept %d %s, oracle %d %s" %
                  (l, h, b, len(rec["kept"]), sorted(rec["kept"]), len(want), want))
            break
        n_ok += 1
    check(uneven, "adaptive: the test scores gave every head the same budget")
    if n_ok == len(sel["records"]):
        print("ok: adaptive=1: %d kept sets equal the oracle's AdaKV allocation" % n_ok)

    # minus the key norms: the knorm policy, metric for metric
    norms = np.stack([-np.linalg.norm(K[l], axis=-1) for l in range(L)])  # [L, Hkv, T]
    fn = os.path.join(tmp, "knorm.npy")
    np.save(fn, norms)
    _, a = replay(tr, "external:scores=%s" % fn, budgets, os.path.join(tmp, "ext.json"))
    _, b = replay(tr, "knorm", budgets, os.path.join(tmp, "knorm.json"))
    ma, mb = a["traces"][0]["runs"][0]["metrics"], b["traces"][0]["runs"][0]["metrics"]
    check(ma == mb, "external with minus the key norms differs from knorm: %s vs %s" %
          (json.dumps(ma)[:300], json.dumps(mb)[:300]))
    if ma == mb:
        print("ok: external(-|k|) = knorm on every metric (%d values)" %
              sum(len(v) * len(v[0]) for v in ma.values() if isinstance(v, list)))

    # bad files: one line, non-zero exit, no results
    def bad(name, make, want, spec_extra=""):
        path = os.path.join(tmp, name)
        if make:
            make(path)
        out = os.path.join(tmp, "bad.json")
        r = run("replay", tr, "--policy", "external:scores=%s%s" % (path, spec_extra),
                "-o", out)
        lines = r.stderr.strip().splitlines()
        ok = r.returncode != 0 and len(lines) == 1 and want in r.stderr and \
            not os.path.exists(out) and "Traceback" not in r.stderr
        check(ok, "%s: exit %d, stderr %r (want %r)" % (name, r.returncode, r.stderr, want))
        if ok:
            print("ok: %s: %s" % (name, lines[0]))

    bad("shape.npy", lambda p: np.save(p, s[:, :, :40].astype(np.float32)),
        "has shape (%d, %d, 40); this trace needs (%d, %d, %d)" % (L, Hkv, L, Hkv, T))
    bad("query_shape.npy", lambda p: np.save(p, s.astype(np.float32)),
        "this trace needs (%d, %d, %d)" % (L, Hq, T), ",heads=query")
    nan = s.astype(np.float32).copy()
    nan[1, 1, 5] = np.nan
    bad("nan.npy", lambda p: np.save(p, nan), "NaN score at layer 1, head 1, token 5")
    nanw = s.astype(np.float32).copy()
    nanw[0, 1, T - 1] = np.nan  # inside the window: still the user's error
    bad("nan_window.npy", lambda p: np.save(p, nanw),
        "NaN score at layer 0, head 1, token %d" % (T - 1), ",window=8")

    def huge(p):  # a header whose shape overflows 64 bits, and no data
        hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824, 1073741824, 1073741824), }"
        hdr += " " * (117 - len(hdr)) + "\n"
        open(p, "wb").write(b"\x93NUMPY\x01\x00" + bytes([len(hdr) % 256, len(hdr) // 256]) +
                            hdr.encode())
    bad("huge.npy", huge, "is too large")
    bad("text.npy", lambda p: open(p, "w").write("1 2 3\n"), "is not a NumPy .npy file")
    bad("negative_adaptive.npy", lambda p: np.save(p, s.astype(np.float32)),
        "adaptive=1 with alloc=a shares the budget by the scores' mass, so they must be finite "
        "and >= 0",
        ",adaptive=1")
    # ... but the window's tokens are kept whatever their score: any sign there is fine
    negw = np.abs(s).astype(np.float32)
    negw[:, :, T - 8:] = -1
    fw = os.path.join(tmp, "negw.npy")
    np.save(fw, negw)
    r = run("replay", tr, "--policy", "external:scores=%s,window=8,adaptive=1" % fw, "-o",
            os.path.join(tmp, "negw.json"))
    check(r.returncode == 0, "negative window scores with adaptive=1: %r" % r.stderr)

    def cut(p):
        np.save(p, s.astype(np.float32))
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 7)
    bad("cut.npy", cut, "cut short")
    bad("int.npy", lambda p: np.save(p, np.zeros((L, Hkv, T), np.int32)),
        "is not a float16, float32 or float64")
    bad("big.npy", lambda p: np.save(p, s.astype(">f4")), "big-endian")
    bad("fortran.npy", lambda p: np.save(p, np.asfortranarray(s.astype(np.float32))),
        "Fortran-ordered")
    bad("2d.npy", lambda p: np.save(p, s[0].astype(np.float32)), "has 2 dimensions")
    os.mkdir(os.path.join(tmp, "dir.npy"))  # a directory of per-trace files, without t.npy
    bad("dir.npy", None, "dir.npy/t.npy")
    bad("missing.npy", None, "missing.npy")
    # one scores file describes one trace: several traces are refused before any work
    r = run("replay", tr, tr2, "--policy", "external:scores=%s" % f32, "-o",
            os.path.join(tmp, "x.json"))
    check(r.returncode == 2 and "file describes one trace, and 2 are given" in r.stderr
          and "scores=DIR" in r.stderr and len(r.stderr.strip().splitlines()) == 1,
          "two traces: %d %r" % (r.returncode, r.stderr))

    # several traces: scores=DIR holds NAME.npy for each trace NAME.kvt; each trace keeps by
    # its own file (T differs: 48 and 40 tokens), and the results aggregate both
    sd = os.path.join(tmp, "scores")
    os.mkdir(sd)
    T2 = 40
    s2 = np.round(rng.standard_normal((L, Hkv, T2)) * 2) / 2
    np.save(os.path.join(sd, "t.npy"), s.astype(np.float32))
    np.save(os.path.join(sd, "t2.npy"), s2.astype(np.float32))
    for d in (sd, sd + "/"):
        out = os.path.join(tmp, "rd.json")
        r = run("replay", tr, tr2, "--policy", "external:scores=%s,window=8" % d, "--budgets",
                budgets, "--export-selection", out + ".sel.json", "-o", out, "--force")
        check(r.returncode == 0, "scores=DIR, two traces: %r" % r.stderr)
        if r.returncode:
            continue
        sel, res = json.load(open(out + ".sel.json")), json.load(open(out))
        check([(t["path"], t["n_tokens"]) for t in res["traces"]] == [(tr, T), (tr2, T2)] and
              len(res["aggregate"]) == len(btok) and
              all(a["n_traces"] == 2 for a in res["aggregate"]),
              "scores=DIR: results %s" % [(t["path"], t["n_tokens"]) for t in res["traces"]])
        for i, (sc, Ti) in enumerate(((s, T), (s2, T2))):
            part = dict(sel, records=[x for x in sel["records"] if x["trace"] == i])
            check_kept(part, sc, 8, btok, Hkv, Ti, "scores=DIR, trace %d (T=%d)" % (i, Ti))
    # two traces of one name in two directories (or t and t.kvt) would share a file: refused
    os.mkdir(os.path.join(tmp, "d2"))
    twin = os.path.join(tmp, "d2", "t.kvt")
    r = run("synth", "--shape", "tiny", "--tokens", "48", "--window", "8", "--seed", "9",
            "-o", twin)
    r = run("replay", tr, twin, "--policy", "external:scores=%s" % sd, "-o",
            os.path.join(tmp, "tw.json"))
    check(r.returncode == 2 and "would both read %s" % os.path.join(sd, "t.npy") in r.stderr
          and len(r.stderr.strip().splitlines()) == 1 and
          not os.path.exists(os.path.join(tmp, "tw.json")),
          "same-named traces: %d %r" % (r.returncode, r.stderr))
    # a trace without its file is refused before the first trace runs, naming the file
    os.remove(os.path.join(sd, "t2.npy"))
    out = os.path.join(tmp, "rd2.json")
    r = run("replay", tr, tr2, "--policy", "external:scores=%s" % sd, "-o", out)
    lines = r.stderr.strip().splitlines()
    check(r.returncode != 0 and len(lines) == 1 and os.path.join(sd, "t2.npy") in r.stderr and
          "one NAME.npy per trace NAME.kvt" in r.stderr and not os.path.exists(out),
          "scores=DIR, a file missing: %d %r" % (r.returncode, r.stderr))
    # ... and one of the wrong shape (t2's tokens given t's file) too, naming both shapes
    np.save(os.path.join(sd, "t2.npy"), s.astype(np.float32))
    r = run("replay", tr, tr2, "--policy", "external:scores=%s" % sd, "-o", out)
    check(r.returncode != 0 and "t2.npy has shape (%d, %d, %d); this trace needs (%d, %d, %d)"
          % (L, Hkv, T, L, Hkv, T2) in r.stderr and r.stderr.startswith("kvtrace replay: error: " + tr2)
          and not os.path.exists(out), "scores=DIR, wrong shape: %d %r" % (r.returncode, r.stderr))
    # a .npy given to sparsemm (which takes a JSON head table) says where it belongs
    r = run("replay", tr, "--policy", "sparsemm:scores=%s" % f32, "-o",
            os.path.join(tmp, "x.json"))
    check(r.returncode != 0 and "per-token scores in a .npy file are for the external policy"
          in r.stderr, "sparsemm with a .npy: %d %r" % (r.returncode, r.stderr))
    r = run("replay", tr, "--policy", "external", "-o", os.path.join(tmp, "x.json"))
    check(r.returncode == 2 and "external needs scores=FILE.npy" in r.stderr and
          len(r.stderr.strip().splitlines()) == 1, "no scores=: %d %r" % (r.returncode, r.stderr))
    # a path with a comma is cut there (options are comma-separated): say so, not "No such file"
    r = run("replay", tr, "--policies", "external:scores=%s,b.npy,snapkv" % f32, "-o",
            os.path.join(tmp, "x.json"))
    check(r.returncode == 2 and "'b.npy' after 'external:scores=%s' is not a policy: a scores= "
          "path may not contain a comma" % f32 in r.stderr and
          len(r.stderr.strip().splitlines()) == 1, "comma: %d %r" % (r.returncode, r.stderr))

# the README's example ("Your own policy"), run as written on the bundled trace
readme = open(os.path.join(ROOT, "README.md")).read()
sec = readme[readme.index("### Your own policy"):]
code = sec[sec.index("```python\n") + 10:]
code = code[:code.index("```")]
cmd = sec[sec.index("```sh\n") + 6:]
cmd = cmd[:cmd.index("```")].replace("\\\n", " ").split()
sample = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
with tempfile.TemporaryDirectory() as tmp:
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        exec(compile(code.replace('"trace.kvt"', repr(sample)), "README.md", "exec"), {})
        check(cmd[:2] == ["kvtrace", "replay"], "README example command: %s" % cmd)
        r = run(*[sample if a == "trace.kvt" else a for a in cmd[1:]])
        res = json.load(open("results.json")) if r.returncode == 0 else None
        check(r.returncode == 0 and res and
              [p["name"] for p in res["settings"]["policies"]] == ["snapkv", "external"],
              "README example: exit %d %s" % (r.returncode, r.stderr))
        if r.returncode == 0:
            print("ok: the README example runs as written")
    finally:
        os.chdir(cwd)

finish("test_external_policy")
