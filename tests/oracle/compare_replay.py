#!/usr/bin/python3
"""compare_replay.py - checks `kvtrace replay` against the independent NumPy oracle
(tests/oracle/replay_oracle.py) on several traces.

Traces (written into a temporary folder):
  * gqa-f16:   L=3, Hq=8, Hkv=2, D=16, T=200, Wt=32, 12 decode steps with decode K/V, column
               sums, f16 storage, softmax scale 0.4 (not 1/sqrt(D) = 0.25: both sides take
               the header's model.attn_scale); written through kvtrace.CaptureSession (K/V
               submitted as strided [T, H, D] views, queries ubatched);
  * mqa-f32:   L=4, Hq=4, Hkv=1, D=32, T=300, Wt=32, Q_decode only (no decode K/V), column sums
               from NumPy; written through kvtrace.TraceWriter;
  * mha-bf16:  L=2, Hq=4, Hkv=4, D=8, T=96, Wt=16 (policies get window=16), no decode, no
               column sums, bf16 storage (CaptureSession);
  * the bundled real trace traces/samples/stories260K.kvt (llama2.c, GQA 8/4);
  * `kvtrace synth` traces when that command exists: `tiny` (GQA 4/2, bf16, decode, column
    sums), `tiny-vl` (M-RoPE, 60% image, f16, window 16, Q_all), a short f32 `tiny` (no
    decode).

For every (trace, policy, budget, layer, head) it checks that kvtrace keeps the same token
indices as the oracle (read from --export-selection) and that n_keep, recall_window,
err_window, recall_decode, err_decode, coverage, coverage_radius, coverage_dropped, r_kept,
r_all, oracle_overlap (kv-head runs), head_overlap, by_modality (n_keep, recall_window,
coverage, r_kept) and r_all_by_modality agree to 1e-5 (relative to max(1, |value|)); null must match null, and null
against a number is a mismatch. A metric field missing from results.json is one failure per
run. A differing set is accepted as a documented tie only when the oracle's score gap at
the selection boundary (or at AdaKV's global top-k boundary) is below 1e-6 relative; its
metrics are then not compared. head_overlap depends on every head's set of the (policy,
budget, layer), so when ANY head of that group has a set that differs from the oracle's (an
accepted tie, or a failure already reported), head_overlap is compared for NO head of the
group. Ties must stay rare.

Environment (set by ctest): KVT_BIN (the kvtrace CLI), KVT_LIB (libkvtrace.so),
KVT_SOURCE_ROOT (the repository). Exit 0 pass, 1 fail, 77 not run (no NumPy, no CLI, or no
`replay` command yet). Output definitions: analysis/RESULTS.md.
usage: compare_replay.py [--keep DIR] [--verbose] [--only NAME]
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

import replay_oracle as oracle  # noqa: E402

TOL = 1e-5
TIE = 1e-6
METRICS = [("recall_window", "recall"), ("err_window", "err_window"),
           ("recall_decode", "recall_decode"), ("err_decode", "err_decode"),
           ("coverage", "coverage"), ("coverage_radius", "coverage_radius"),
           ("coverage_dropped", "coverage_dropped"), ("r_kept", "r_kept")]


def policy_specs(W, has_decode, has_colsum, scores=None, visual=False, has_qall=False):
    """Policy specs for a trace whose stored window is W (policies use window=W unless it is
    32, the default). Every option the oracle knows is exercised at least once. scores: a
    head-score table (JSON) for sparsemm, headkv and mixkv-sparsemm; visual: the trace has
    image or video tokens (fastv, vl-cache); has_qall: it stores every prompt query (vl-cache
    over more post-vision queries than the window holds)."""
    w = "" if W == 32 else "window=%d" % W

    def s(name, *opts):
        o = [x for x in (w,) + opts if x]
        return name + (":" + ",".join(o) if o else "")

    specs = ["full", "streamingllm", "streamingllm:sinks=2", "tova",
             s("snapkv"), s("snapkv", "kernel=7", "pool=max"), s("snapkv", "kernel=1"),
             s("snapkv", "reduce=max", "pool=max", "kernel=3"), s("snapkv", "heads=query"),
             s("chunkkv"), s("chunkkv", "chunk=7", "kernel=1"),
             s("chunkkv", "chunk=4", "heads=query", "reduce=max", "pool=max"),
             s("chunkkv", "align=kvpress"), s("chunkkv", "align=kvpress", "chunk=7", "kernel=1"),
             s("pyramidkv"), s("pyramidkv", "fallback=1"), s("pyramidkv", "beta=5"),
             s("adakv"), s("adakv", "normalize=0"), s("adakv", "alpha=0.5", "pool=max"),
             s("adakv", "heads=query"),
             s("mixkv-snapkv"), s("mixkv-pyramidkv"), s("mixkv-adakv"),
             s("mixkv-snapkv", "heads=query"), s("mixkv-adakv", "kernel=7"),
             s("mixkv-snapkv", "method=attn"), s("mixkv-snapkv", "method=keydiff"),
             s("mixkv-pyramidkv", "method=vnorm"), s("mixkv-adakv", "method=knorm"),
             s("mixkv-snapkv", "method=mixkv", "heads=query"),
             "knorm", "vnorm", "keydiff", "keydiff:window=8",
             s("cake"), s("cake", "heads=query", "tau1=1.6", "tau2=0.4", "gamma=50")]
    if has_colsum:
        specs += [s("h2o"), s("h2o", "heads=query"), "lookm:merge=none",
                  "lookm:merge=none,recent_share=0.25,heads=query",
                  "lookm:merge=none,recent_share=0,reduce=max"]
    if has_decode:
        specs += ["oracle"]
    if visual:  # pruned from layer 1 (ranked by layer 0), and the default K = 2
        specs += ["fastv", "fastv:last=1,dense_layers=1", "fastv:last=5,heads=query,dense_layers=1"]
        if has_colsum:
            specs += ["fastv:dense_layers=1"]
        # the last W post-vision queries from the window; a few from it, heads=query, a
        # higher threshold and a protected window; no threshold: every layer alike
        specs += ["vl-cache:last=%d" % W, "vl-cache:last=5,heads=query,threshold=0.05,window=4",
                  "vl-cache:last=3,reduce=max,threshold=0"]
        if has_qall:  # every post-vision query, from Q_all
            specs += ["vl-cache", "vl-cache:heads=query,threshold=0.002"]
    if scores:
        f = "scores=" + scores
        specs += [s("sparsemm", f), s("sparsemm", "ratio=0.25", "heads=query", f),
                  s("headkv", f), s("headkv", "heads=kv", "beta=2", "kernel=5", f),
                  s("mixkv-sparsemm", f),
                  s("mixkv-sparsemm", "ratio=0.25", "heads=query", "kernel=7", f)]
    return specs


def write_head_scores(path, L, Hq, seed):
    """A head-score table [L][Hq] with a spread of values (a few heads score high)."""
    rng = np.random.default_rng(seed)
    tab = rng.gamma(0.6, 1.0, size=(L, Hq)) + 1e-3
    with open(path, "w") as f:
        json.dump([[round(float(x), 6) for x in row] for row in tab], f)


# --------------------------------------------------------------------------------------------
# Synthetic traces with structure: per-head shared key direction (redundancy from ~0 to high),
# a sink token, heavy hitters the queries like, value norms spread over a decade.
# --------------------------------------------------------------------------------------------
def synth_layer(rng, Hq, Hkv, D, T, G, layer=0):
    K = np.empty((Hkv, T + G, D))
    V = np.empty((Hkv, T + G, D))
    Q = np.empty((Hq, T + G, D))
    grp = Hq // Hkv
    for g in range(Hkv):
        mu = rng.standard_normal(D)
        mu /= np.linalg.norm(mu)
        u = rng.standard_normal(D)
        u /= np.linalg.norm(u)
        shared = rng.uniform(0.0, 2.5)  # key redundancy of this head
        k = rng.standard_normal((T + G, D)) + shared * mu
        if (layer + g) % 3 != 2:
            heavy = rng.random(T + G) < 0.08
            k[heavy] += 2.0 * u
            k[0] += 4.0 * u  # attention sink
        else:  # a plain Gaussian head: r about 0, often negative (exercises the clamp)
            k -= shared * mu
        K[g] = k
        V[g] = rng.standard_normal((T + G, D)) * np.exp(rng.uniform(-1.2, 1.2, (T + G, 1)))
        for h in range(g * grp, (g + 1) * grp):
            Q[h] = rng.standard_normal((T + G, D)) * 0.7 + rng.uniform(0.5, 2.0) * u
    return K.astype(np.float32), V.astype(np.float32), Q.astype(np.float32)


def colsum_np(Q, K, Hq, Hkv, T):
    """H2O column sums [Hq, T]: Σ_{i≥j} causal softmax p(i, j) over prompt queries."""
    D = Q.shape[2]
    gi = np.arange(Hq) // (Hq // Hkv)
    out = np.zeros((Hq, T))
    for h in range(Hq):
        z = Q[h, :T].astype(np.float64) @ K[gi[h], :T].astype(np.float64).T / math.sqrt(D)
        z[np.triu(np.ones((T, T), bool), 1)] = -np.inf
        out[h] = oracle.softmax_masked(z).sum(axis=0)
    return out.astype(np.float32)


def make_capture_trace(kvtrace, path, seed, L, Hq, Hkv, D, T, W, G, dtype, colsum,
                       attn_scale=0.0):
    rng = np.random.default_rng(seed)
    mod = np.zeros(T, np.uint8)
    mod[T // 5: T // 2] = 1  # an "image" span
    with kvtrace.CaptureSession(path, n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv, head_dim=D,
                                n_tokens=T, window=W, kv_dtype=dtype, name="synthetic",
                                n_decode=G, with_colsum=colsum, force=True,
                                attn_scale=attn_scale,
                                capture={"source": "compare_replay.py", "seed": seed}) as s:
        s.set_tokens(token_ids=np.arange(T) % 251, modality=mod)
        layers = [synth_layer(rng, Hq, Hkv, D, T, G, l) for l in range(L)]
        for l, (K, V, Q) in enumerate(layers):
            # engine-style [T, H, D] buffers passed as strided [H, T, D] views
            kb = np.ascontiguousarray(K[:, :T].transpose(1, 0, 2))
            vb = np.ascontiguousarray(V[:, :T].transpose(1, 0, 2))
            half = T // 2
            s.submit_kv(l, 0, kb[:half].transpose(1, 0, 2), vb[:half].transpose(1, 0, 2))
            s.submit_kv(l, half, kb[half:].transpose(1, 0, 2), vb[half:].transpose(1, 0, 2))
            if colsum:
                s.submit_queries(l, 0, Q[:, :T])
            else:
                s.submit_queries(l, T - W, Q[:, T - W:T])
        for step in range(G):
            for l, (K, V, Q) in enumerate(layers):
                sl = slice(T + step, T + step + 1)
                s.submit_decode(l, step, Q[:, sl], K[:, sl], V[:, sl])
            s.submit_decode_token(step, step + 7)


def make_writer_trace(kvtrace, path, seed, L, Hq, Hkv, D, T, W, G):
    """f32 trace written record by record: Q_decode without K/V_decode, column sums from
    NumPy, no token tables at all."""
    rng = np.random.default_rng(seed)
    hdr = {"format": "kvtrace", "created_by": "compare_replay.py", "endianness": "little",
           "model": {"name": "synthetic-writer", "arch": "llama", "n_layers": L,
                     "n_q_heads": Hq, "n_kv_heads": Hkv, "head_dim": D,
                     "rope": {"type": "none"}},
           "kv_dtype": "f32", "n_tokens": T, "window": W, "n_decode": G,
           "engine": {"name": "numpy", "version": np.__version__}, "gpu": None,
           "capture": {}, "synthetic": {"seed": seed}}
    with kvtrace.TraceWriter(path, hdr, force=True) as w:
        for l in range(L):
            K, V, Q = synth_layer(rng, Hq, Hkv, D, T, G, l)
            w.append("K", K[:, :T], layer=l)
            w.append("V", V[:, :T], layer=l)
            w.append("Q_window", Q[:, T - W:T], layer=l)
            w.append("Q_decode", Q[:, T:T + G], layer=l)
            w.append("attn_colsum", colsum_np(Q, K, Hq, Hkv, T)[:, :, None], layer=l)


# --------------------------------------------------------------------------------------------
def run_c(kvt_bin, trace, specs, budgets, outdir, tag):
    res = os.path.join(outdir, tag + ".results.json")
    sel = os.path.join(outdir, tag + ".sel.json")
    cmd = [kvt_bin, "replay", trace, "--budgets", ",".join(budgets), "-o", res,
           "--export-selection", sel, "--threads", "1", "--force"]
    for sp in specs:
        cmd += ["--policy", sp]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if p.returncode != 0:
        raise RuntimeError("kvtrace replay failed (%d): %s\n%s" % (p.returncode,
                                                                     " ".join(cmd), p.stderr))
    with open(res) as f:
        results = json.load(f)
    with open(sel) as f:
        selection = json.load(f)
    return results, selection


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and math.isnan(a):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return abs(a - b) <= TOL * max(1.0, abs(b))


def compare(tag, trace, specs, budgets, kvt_bin, outdir, verbose):
    results, selection = run_c(kvt_bin, trace, specs, budgets, outdir, tag)
    orc = oracle.replay_trace(trace, specs, budgets, coverage_probes=256, debug=True)
    tr = results["traces"][0]
    labels = [p["label"] for p in results["settings"]["policies"]]
    if labels != specs:
        return ["%s: policy labels differ: %r" % (tag, labels)], 0, 0
    kept_c = {}
    for r in selection["records"]:
        if r["step"] == -1 and r["trace"] == 0:
            kept_c[(r["policy"], r["budget"], r["layer"], r["head"])] = r["kept"]
    fails, ties, n_cmp = [], 0, 0
    # oracle_overlap: |S ∩ O| / |O| with O the oracle policy's set (default options) at the
    # same budget, for kv-head runs (the only granularity the default oracle spec has)
    orc_sets = orc["policies"].get("oracle", {}).get("budgets")
    for run in tr["runs"]:
        pi, bi = run["policy"], run["budget"]
        label = labels[pi]
        op = orc["policies"][label]
        if "skipped" in op:
            fails.append("%s %s: oracle skipped the policy (%s)" % (tag, label, op["skipped"]))
            continue
        B = oracle.resolve_budget(budgets[bi], tr["n_tokens"])
        if run["budget_tokens"] != B:
            fails.append("%s %s B=%s: budget_tokens %d, oracle %d"
                         % (tag, label, budgets[bi], run["budget_tokens"], B))
            continue
        if run["short_prompt"] != (tr["n_tokens"] < B):
            fails.append("%s %s B=%d: short_prompt %r" % (tag, label, B, run["short_prompt"]))
        layers = op["budgets"][str(B)]["layers"]
        m = run["metrics"]
        absent = [c for c in [c for c, _ in METRICS] + ["n_keep", "oracle_overlap",
                                                         "head_overlap"] if c not in m]
        if absent:
            fails.append("%s %s B=%d: results.json run has no metrics %s"
                         % (tag, label, B, ", ".join(absent)))
        for l, lay in enumerate(layers):
            # head_overlap of the whole (policy, budget, layer) group is only comparable when
            # every head kept the oracle's set (a tied head changes the others' overlap)
            group_same = all(kept_c.get((pi, bi, l, h2)) == oh2["kept"]
                             for h2, oh2 in enumerate(lay["heads"]))
            if verbose and not group_same:
                print("head_overlap not compared: %s %s B=%d layer %d (a head's set differs)"
                      % (tag, label, B, l))
            for h, oh in enumerate(lay["heads"]):
                n_cmp += 1
                where = "%s %s B=%d layer %d head %d" % (tag, label, B, l, h)
                kc = kept_c.get((pi, bi, l, h))
                if kc is None:
                    fails.append(where + ": no selection record")
                    continue
                if kc != oh["kept"]:
                    # a near-tie (0 < gap < 1e-6) at the head's selection boundary, or a
                    # cross-head near-tie (gap < 1e-6) at AdaKV's global boundary; exact ties
                    # inside a head (maxpool plateaus) must follow the documented rule
                    tm, am = oh.get("tie_margin"), oh.get("alloc_margin")
                    margins = [x for x in (tm, am) if x is not None]
                    if (tm is not None and 0 < tm < TIE) or (am is not None and am < TIE):
                        ties += 1
                        if verbose:
                            print("tie: %s (margin %.3g)" % (where, min(margins)))
                        continue
                    so, sc = set(oh["kept"]), set(kc)
                    fails.append("%s: kept sets differ: n %d vs oracle %d; only kvtrace %s; "
                                 "only oracle %s; margins %s" % (
                                     where, len(kc), len(oh["kept"]), sorted(sc - so)[:10],
                                     sorted(so - sc)[:10], margins))
                    continue
                if "n_keep" in m and m["n_keep"][l][h] != oh["n_keep"]:
                    fails.append("%s: n_keep %r vs oracle %d" % (where, m["n_keep"][l][h],
                                                                 oh["n_keep"]))
                cmp_metrics = METRICS + ([("head_overlap", "head_overlap")] if group_same
                                         else [])
                for cname, oname in cmp_metrics:
                    if cname not in m:
                        continue  # reported once for the run above
                    cv = m[cname][l][h]
                    if not close(cv, oh[oname]):
                        fails.append("%s: %s kvtrace %r oracle %r" % (where, cname, cv,
                                                                       oh[oname]))
                ov = m["oracle_overlap"][l][h] if "oracle_overlap" in m else None
                if "oracle_overlap" not in m:
                    pass  # reported once for the run above
                elif orc_sets and run["granularity"] == "kv_head":
                    O = set(orc_sets[str(B)]["layers"][l]["heads"][h]["kept"])
                    want = len(O & set(kc)) / len(O)
                    if not close(ov, want):
                        fails.append("%s: oracle_overlap kvtrace %r oracle %r" % (where, ov,
                                                                                 want))
                elif not orc_sets and ov is not None:
                    fails.append("%s: oracle_overlap %r without decode queries" % (where, ov))
                bm = run.get("by_modality")
                if ("by_modality" in oh) != (bm is not None):
                    fails.append("%s: by_modality present in one side only" % where)
                elif bm is not None:
                    om = oh["by_modality"]
                    for cname, oname in (("n_keep", "n_keep"), ("recall_window", "recall"),
                                         ("coverage", "coverage"), ("r_kept", "r_kept")):
                        for mname, ov2 in om[oname].items():
                            cv = bm[cname][mname][l][h]
                            if not close(cv, ov2):
                                fails.append("%s: by_modality.%s.%s kvtrace %r oracle %r"
                                             % (where, cname, mname, cv, ov2))
                hk = h if run["granularity"] == "kv_head" else h // (
                    tr["n_q_heads"] // tr["n_kv_heads"])
                if bm is not None:
                    for mname, ov2 in oh["by_modality"]["r_all"].items():
                        cv = tr["r_all_by_modality"][mname][l][hk]
                        if not close(cv, ov2):
                            fails.append("%s: r_all_by_modality.%s kvtrace %r oracle %r"
                                         % (where, mname, cv, ov2))
                if not close(tr["r_all"][l][hk], oh["r_all"]):
                    fails.append("%s: r_all kvtrace %r oracle %r" % (where, tr["r_all"][l][hk],
                                                                      oh["r_all"]))
    return fails, ties, n_cmp


def has_command(kvt_bin, name):
    p = subprocess.run([kvt_bin, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    return any(line.split()[:1] == [name] for line in p.stdout.splitlines())


def synth_traces(kvt_bin, outdir):
    """Traces from `kvtrace synth` (traces/SYNTH.md): the GQA shape `tiny` (Hq 4, Hkv 2) in
    bf16 with decode steps and column sums, `tiny-vl` (M-RoPE, image tokens) in f16 with a
    16-query window and every prompt query (Q_all), and a short f32 `tiny` without decode or
    column sums."""
    if not has_command(kvt_bin, "synth"):
        return []
    runs = [("synth-tiny", ["--shape", "tiny", "--tokens", "256", "--seed", "11"]),
            ("synth-tiny-vl", ["--shape", "tiny-vl", "--tokens", "300", "--window", "16",
                               "--dtype", "f16", "--seed", "12", "--q-all"]),
            ("synth-tiny-f32", ["--shape", "tiny", "--tokens", "90", "--decode", "0",
                                "--dtype", "f32", "--colsum", "off", "--seed", "13"])]
    out = []
    for tag, args in runs:
        path = os.path.join(outdir, tag + ".kvt")
        cmd = [kvt_bin, "synth"] + args + ["--threads", "1", "--force", "-o", path]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if p.returncode != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(cmd), p.stderr))
        out.append((tag, path))
    return out


def main():
    ap = argparse.ArgumentParser(description="kvtrace replay vs the NumPy oracle")
    ap.add_argument("--keep", help="write traces and results here and keep them")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--only", help="run only the trace with this tag")
    a = ap.parse_args()
    kvt_bin = os.environ.get("KVT_BIN")
    if not kvt_bin or not os.path.exists(kvt_bin):
        print("SKIP: KVT_BIN is not set to the kvtrace CLI")
        return 77
    if not has_command(kvt_bin, "replay"):
        print("SKIP: this kvtrace has no replay command yet")
        return 77
    kvtrace = oracle._import_kvtrace()
    outdir = a.keep or tempfile.mkdtemp(prefix="kvt_compare_")
    os.makedirs(outdir, exist_ok=True)
    try:
        traces = []
        p = os.path.join(outdir, "gqa-f16.kvt")
        make_capture_trace(kvtrace, p, 1, L=3, Hq=8, Hkv=2, D=16, T=200, W=32, G=12,
                           dtype="f16", colsum=True, attn_scale=0.4)
        traces.append(("gqa-f16", p, 32, True, True))
        p = os.path.join(outdir, "mqa-f32.kvt")
        make_writer_trace(kvtrace, p, 2, L=4, Hq=4, Hkv=1, D=32, T=300, W=32, G=9)
        traces.append(("mqa-f32", p, 32, True, True))
        p = os.path.join(outdir, "mha-bf16.kvt")
        make_capture_trace(kvtrace, p, 3, L=2, Hq=4, Hkv=4, D=8, T=96, W=16, G=0,
                           dtype="bf16", colsum=False)
        traces.append(("mha-bf16", p, 16, False, False))
        sample = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
        if os.path.exists(sample):
            traces.append(("stories260K", sample, 32, True, True))
        for tag, path in synth_traces(kvt_bin, outdir):
            with kvtrace.open(path) as t:
                Wt = t.shape("Q_window", 0)[1]
                dec = t.has("Q_decode", 0)
                cs = t.has("attn_colsum", 0)
            traces.append((tag, path, min(Wt, 32), dec, cs))
        total_fail, total_ties, total_cmp = [], 0, 0
        for tag, path, W, dec, cs in traces:
            if a.only and tag != a.only:
                continue
            with kvtrace.open(path) as t:
                T = t.shape("K", 0)[1]
                m = t.header["model"]
                L, Hq = int(m["n_layers"]), int(m["n_q_heads"])
                mods = t.tokens["modality"]
                visual = mods is not None and bool(np.isin(mods, (1, 2)).any())
                qall = t.has("Q_all", 0)
            scores = os.path.join(outdir, tag + "_heads.json")
            write_head_scores(scores, L, Hq, len(tag) * 7 + L)
            specs = policy_specs(W, dec, cs, scores, visual, qall)
            # below the window, just above it, mid, two fractions (20%: where kvpress's float
            # chunk count rounds down, chunkkv align=kvpress), one where N < 2(B−W) (the
            # KVCache-Factory pyramid fallback differs), B = T (keeps everything, whatever the
            # allocation would do) and a short-prompt budget
            budgets = [str(max(1, W // 2)), str(W + 8), str(min(T - 1, W + 40)), "20%", "30%",
                       str(T - 10), str(T), str(T + 50)]
            fails, ties, n = compare(tag, path, specs, budgets, kvt_bin, outdir, a.verbose)
            print("%-15s %3d policies x %d budgets: %6d head sets compared, %d ties, %d failures"
                  % (tag, len(specs), len(budgets), n, ties, len(fails)))
            total_fail += fails
            total_ties += ties
            total_cmp += n
        for f in total_fail[:40]:
            print("FAIL " + f)
        if len(total_fail) > 40:
            print("... %d more failures" % (len(total_fail) - 40))
        if total_cmp and total_ties > max(3, total_cmp // 200):
            print("FAIL too many ties: %d of %d" % (total_ties, total_cmp))
            return 1
        return 1 if total_fail else 0
    finally:
        if not a.keep:
            shutil.rmtree(outdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
