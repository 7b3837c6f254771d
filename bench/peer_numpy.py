#!/usr/bin/python3
"""peer_numpy.py - the replay sweep "as a researcher would write it" in NumPy (issue #8).

The peer kvtrace's replay speed is compared with: for each layer it reads K, V, Q_window,
Q_decode, K_decode, V_decode (and ATTN_COLSUM if present) through the Python binding, computes
the window and decode attention with np.matmul (OpenBLAS), the SnapKV scores (POLICIES.md
§0.1: mean over the last W window queries, GQA mean, avgpool k=5 with zero padding), and then,
for every policy and EVERY budget, re-selects each KV head's kept set with np.argpartition and
measures attention recall and relative output error (window and decode queries, analysis/
RESULTS.md definitions) and key coverage on probe keys with matmuls over the kept set. Nothing
is shared between budgets: that is the point of the comparison. float32 throughout (softmax
in float32, sums in float64), so it does not match kvtrace bit for bit.

Policies: streamingllm, h2o (only if the trace has attn_colsum), snapkv, pyramidkv, adakv (3a,
normalize, alpha 0.2), knorm, random (window kept, own RNG: its numbers are not kvtrace's),
oracle (decode attention). Ties are broken by argpartition, not by lower index.

usage:
  peer_numpy.py TRACE [--policies LIST] [--budgets LIST] [--probes P] [--layers 0,1]
                      [-o peer.json] [--compare kvtrace_results.json] [--tol 1e-3]
  peer_numpy.py --cut N SRC DST      copy the first N layers of SRC into DST (header n_layers
                                     = N), so that a quick replay of a few layers is a whole
                                     trace for every tool
Run with /usr/bin/python3, PYTHONPATH=python and KVT_LIB=<build>/libkvtrace.so.
"""
import argparse
import json
import fractions
import math
import os
import sys
import time

import numpy as np

try:
    import kvtrace
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "python"))
    import kvtrace

ALL_POLICIES = ["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "knorm", "random",
                "oracle"]
WINDOW, KERNEL, SINKS, BETA, ALPHA = 32, 5, 4, 20, 0.2
# the metrics of one (policy, budget), in this order (shared with bench/peer_torch.py)
KEYS = ["n_keep", "recall_window", "err_window", "recall_decode", "err_decode", "coverage"]


# ------------------------------------------------------------------------------------------
# Trace cutting
# ------------------------------------------------------------------------------------------
def cut(src, n_layers, dst):
    """Copy the token tables and layers 0..n_layers-1 of src into dst, bytes of the tensors
    unchanged (bf16 stays bf16)."""
    with kvtrace.open(src) as t:
        hdr = json.loads(json.dumps(t.header))
        L = int(hdr["model"]["n_layers"])
        n_layers = min(n_layers, L)
        hdr["model"]["n_layers"] = n_layers
        syn = hdr.get("synthetic")
        if isinstance(syn, dict) and isinstance(syn.get("layers"), list):
            syn["layers"] = syn["layers"][:n_layers]
        hdr["cut_from"] = {"path": os.path.abspath(src), "n_layers": L}
        seen = []
        for r in t.records:
            key = (r["layer"], r["kind"])
            if key not in seen and r["layer"] < n_layers:
                seen.append(key)
        cap = hdr.get("capture", {})
        with kvtrace.TraceWriter(dst, hdr, level=int(cap.get("zstd_level", 3) or 3),
                                 n_threads=2, force=True) as w:
            for layer, kind in seen:
                lay = None if layer < 0 else layer
                a = t.read(kind, layer=lay)
                dt = "bf16" if t.stored_dtype(kind, lay) == "bf16" else None
                w.append(kind, a, layer=lay, dtype=dt)
    print("peer_numpy: cut %d of %d layers of %s into %s" % (n_layers, L, src, dst))


# ------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------
def budget_tokens(text, T):
    """As kvtrace: max(1, floor(P/100 * T + 1/2)) in exact decimal arithmetic."""
    text = text.strip()
    if text.endswith("%"):
        f = fractions.Fraction(text[:-1]) / 100
        return max(1, int(math.floor(f * T + fractions.Fraction(1, 2))))
    return int(text)


def cov_window(pol, W):
    """The window whose prefix [0, T-W) coverage is over (analysis/RESULTS.md): the policy's
    own; streamingllm, knorm and oracle have none."""
    return 0 if pol in ("streamingllm", "knorm", "oracle") else W


def softmax_rows(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def avgpool(s, k):
    """Stride 1, zero padding k//2, divisor always k (count_include_pad)."""
    return np.convolve(s, np.ones(k, dtype=np.float32) / k, mode="same")


def top(score, n):
    """Indices of the n largest scores (unordered)."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if n >= score.size:
        return np.arange(score.size)
    return np.argpartition(-score, n - 1)[:n]


def pyramid_b(B, W, T, L, layer):
    base = B - W
    if L <= 1:
        return base
    mn = base // BETA
    mx = 2 * base - mn
    if mx >= T - W:
        mx = T - W
        mn = 2 * base - mx
    return mx - layer * ((mx - mn) // (L - 1))


def adakv_caps(pooled, b):
    """POLICIES §3a with normalize=True, alpha=0.2: per-head counts of the global top H*b."""
    H, nP = pooled.shape
    s = -np.sort(-pooled, axis=1)
    w = s[:, :b].sum(axis=1, keepdims=True) / s.sum(axis=1, keepdims=True)
    s = s * w
    picks = np.argpartition(-s.ravel(), H * b - 1)[:H * b]
    n = np.bincount(picks // nP, minlength=H)
    return np.clip(np.rint(n * (1 - ALPHA) + math.floor(ALPHA * b)), 0, nP).astype(int)


class Head:
    """One KV head's attention: probabilities, full outputs, unit keys, probes."""

    def __init__(self, K, V, Qw, Qd, Kd, Vd, n_probes):
        T, D = K.shape
        scale = np.float32(1.0 / math.sqrt(D))
        nq, Wt = Qw.shape[0], Qw.shape[1]
        # window queries: causal mask inside the window only
        z = (Qw.reshape(-1, D) @ K.T) * scale                     # [G*Wt, T]
        pos = T - Wt + np.arange(Wt)
        mask = np.arange(T)[None, :] > pos[:, None]               # [Wt, T]
        z[np.tile(mask, (nq, 1))] = -np.inf
        self.Pw = softmax_rows(z)
        self.ow = self.Pw @ V
        # decode queries: all T prompt keys plus decode keys 0..s (never evicted)
        self.Pd = None
        if Qd is not None:
            Gd = Qd.shape[1]
            q = Qd.reshape(-1, D)
            zd = (q @ K.T) * scale                                # [G*Gd, T]
            if Kd is not None:
                zx = (q @ Kd.T) * scale                           # [G*Gd, Gd]
                zx[np.tile(np.arange(Gd)[None, :] > np.arange(Gd)[:, None], (nq, 1))] = -np.inf
            else:
                zx = np.full((q.shape[0], 1), -np.inf, dtype=np.float32)
            m = np.maximum(zd.max(axis=1), zx.max(axis=1))[:, None]
            e, ex = np.exp(zd - m), np.exp(zx - m)
            Z = e.sum(axis=1, dtype=np.float64) + ex.sum(axis=1, dtype=np.float64)
            self.Pd = (e / Z[:, None]).astype(np.float32)
            self.px = ex.sum(axis=1, dtype=np.float64) / Z
            self.ox = (ex @ Vd) / Z[:, None] if Kd is not None else np.zeros((q.shape[0], D))
            self.od = self.Pd @ V + self.ox
        self.V = V
        self.Kh = K / np.maximum(np.linalg.norm(K, axis=1, keepdims=True), 1e-12)
        n = min(n_probes, T)
        self.pidx = (np.arange(n) * T) // n
        self.Kp = self.Kh[self.pidx] if n > 0 else None

    @staticmethod
    def _rec_err(P, o, V, S, px=None, ox=None):
        PS = P[:, S]
        mass = PS.sum(axis=1, dtype=np.float64)
        num = PS @ V[S]
        if px is not None:
            mass = mass + px
            num = num + ox
        Z = P.sum(axis=1, dtype=np.float64) + (px if px is not None else 0.0)
        ok = mass > 0
        err = np.ones(P.shape[0])
        oS = num[ok] / mass[ok][:, None]
        err[ok] = np.linalg.norm(oS - o[ok], axis=1) / np.linalg.norm(o[ok], axis=1)
        return float((mass / Z).mean()), float(err.mean())

    def metrics(self, S, W=0):
        """Metrics of kept set S; coverage over the probes of the prefix [0, T-W)."""
        rw, ew = self._rec_err(self.Pw, self.ow, self.V, S)
        rd = ed = float("nan")
        if self.Pd is not None:
            rd, ed = self._rec_err(self.Pd, self.od, self.V, S, self.px, self.ox)
        cov = float("nan")
        inP = self.pidx < len(self.Kh) - W
        if self.Kp is not None and len(S) and inP.any():
            cov = float((self.Kp[inP] @ self.Kh[S].T).max(axis=1).mean())
        return {"n_keep": len(S), "recall_window": rw, "err_window": ew,
                "recall_decode": rd, "err_decode": ed, "coverage": cov}


def kept_set(pol, B, T, W, score=None, n_sel=None):
    """Kept indices for a policy at budget B: the window (last W) + the top n_sel of `score`
    over the prefix [0, T-W) (window policies), or the top B of score over all T."""
    if T <= B:  # B = T keeps everything too, for every policy (RESULTS.md)
        return np.arange(T)
    if pol == "streamingllm":
        s = min(SINKS, B)
        return np.concatenate([np.arange(s), np.arange(T - (B - s), T)])
    if pol in ("knorm", "oracle"):
        return top(score, B)
    if B < W:
        return np.arange(T - B, T)
    return np.concatenate([top(score, min(n_sel, T - W)), np.arange(T - W, T)])


class Sweep:
    """What a sweep of an open trace works from (shared with bench/peer_torch.py): L
    (n_layers), layer_ids, Hkv, T, D, Hq, Wt (window queries stored), G (= Hq / Hkv), W (the
    policies' window, WINDOW), has_dec / has_dkv / has_cs (Q_decode, K_decode + V_decode,
    attn_colsum present), pols (the policies that can run), skipped (the others), Bs (budgets
    in tokens) and acc ({(policy, budget text): []}, for the per-layer results)."""

    def __init__(self, t, policies, budgets, layers=None):
        self.L = int(t.header["model"]["n_layers"])
        self.layer_ids = list(range(self.L)) if layers is None else layers
        self.Hkv, self.T, self.D = t.shape("K", 0)
        self.Hq, self.Wt, _ = t.shape("Q_window", 0)
        self.G = self.Hq // self.Hkv
        self.W = WINDOW
        self.has_dec = t.has("Q_decode", 0)
        self.has_dkv = t.has("K_decode", 0) and t.has("V_decode", 0)
        self.has_cs = t.has("attn_colsum", 0)
        self.pols = [p for p in policies
                     if (p != "h2o" or self.has_cs) and (p != "oracle" or self.has_dec)]
        self.skipped = [p for p in policies if p not in self.pols]
        self.Bs = [budget_tokens(b, self.T) for b in budgets]
        self.acc = {(p, b): [] for p in self.pols for b in budgets}


def replay(path, policies, budgets, probes, layers=None, seed=0):
    t_start = time.perf_counter()
    tim = {"read": 0.0, "attention": 0.0, "policies": 0.0}
    with kvtrace.open(path) as t:
        sw = Sweep(t, policies, budgets, layers)
        L, layer_ids, Hkv, T, Wt, G, W = sw.L, sw.layer_ids, sw.Hkv, sw.T, sw.Wt, sw.G, sw.W
        has_dec, has_dkv, has_cs = sw.has_dec, sw.has_dkv, sw.has_cs
        pols, skipped, Bs, acc = sw.pols, sw.skipped, sw.Bs, sw.acc
        for layer in layer_ids:
            t0 = time.perf_counter()
            rd = lambda k: t.read(k, layer=layer, dtype="float32")  # noqa: E731
            K, V, Qw = rd("K"), rd("V"), rd("Q_window")
            Qd = rd("Q_decode") if has_dec else None
            Kd, Vd = (rd("K_decode"), rd("V_decode")) if has_dkv else (None, None)
            cs = rd("attn_colsum")[:, :, 0] if has_cs else None
            t1 = time.perf_counter()
            heads, snap = [], []
            for g in range(Hkv):
                qs = slice(g * G, (g + 1) * G)
                h = Head(K[g], V[g], Qw[qs], Qd[qs] if Qd is not None else None,
                         Kd[g] if Kd is not None else None, Vd[g] if Vd is not None else None,
                         probes)
                a = h.Pw.reshape(G, Wt, T)[:, Wt - W:, :T - W].mean(axis=(0, 1))
                snap.append(avgpool(a, KERNEL))
                heads.append(h)
            snap = np.stack(snap)                                 # [Hkv, T-W]
            t2 = time.perf_counter()
            rng = np.random.default_rng(seed + 1000003 * layer)
            for pol in pols:
                for btext, B in zip(budgets, Bs):
                    caps = None
                    if pol == "adakv" and W <= B <= T and B - W <= T - W:
                        caps = adakv_caps(snap, B - W) if B > W else np.zeros(Hkv, int)
                    for g in range(Hkv):
                        h = heads[g]
                        score, n_sel = None, B - W
                        if pol in ("snapkv", "pyramidkv", "adakv"):
                            score = snap[g]
                            if pol == "pyramidkv":
                                n_sel = max(0, pyramid_b(B, W, T, L, layer))
                            elif pol == "adakv" and caps is not None:
                                n_sel = int(caps[g])
                        elif pol == "h2o":
                            score = cs[g * G:(g + 1) * G, :T - W].mean(axis=0)
                        elif pol == "knorm":
                            score = -np.linalg.norm(K[g], axis=1)
                        elif pol == "oracle":
                            score = h.Pd.mean(axis=0)
                        elif pol == "random":
                            score = rng.random(T - W)
                        S = np.sort(kept_set(pol, B, T, W, score, n_sel))
                        acc[(pol, btext)].append(h.metrics(S, cov_window(pol, W)))
            t3 = time.perf_counter()
            tim["read"] += t1 - t0
            tim["attention"] += t2 - t1
            tim["policies"] += t3 - t2
            print("peer_numpy: layer %d: read %.2f s, attention %.2f s, %d policies x %d "
                  "budgets %.2f s" % (layer, t1 - t0, t2 - t1, len(pols), len(Bs), t3 - t2),
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - t_start
    res = {}
    for (p, b), rows in acc.items():
        res.setdefault(p, {})[b] = {k: float(np.nanmean([r[k] for r in rows])) for k in KEYS}
    return {"trace": path, "layers": layer_ids, "n_layers": L, "T": T, "policies": pols,
            "skipped": skipped, "budgets": budgets, "probes": probes, "total_s": total,
            "time": tim, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "results": res}


def kvtrace_means(results_path, layers):
    """{label: {budget_text: {metric: mean over the given layers and heads}}} of a
    kvtrace results.json (first trace)."""
    with open(results_path) as f:
        r = json.load(f)
    out = {}
    for run in r["traces"][0]["runs"]:
        m = {}
        for k in KEYS:
            g = run["metrics"].get(k)
            if g is None:
                continue
            a = np.array([[np.nan if x is None else x for x in g[l]] for l in layers], float)
            m[k] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        out.setdefault(run["label"], {})[run["budget_text"]] = m
    return out


def arg_parser(description=None):
    """The command line of the peer (shared with bench/peer_torch.py)."""
    ap = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    ap.add_argument("trace", nargs="?")
    ap.add_argument("--cut", nargs=3, metavar=("N", "SRC", "DST"))
    ap.add_argument("--policies", default=",".join(ALL_POLICIES))
    ap.add_argument("--budgets", default="64,128,256,512,1024,2048,5%,10%")
    ap.add_argument("--probes", type=int, default=256)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--compare", default=None, help="kvtrace results.json of the same sweep")
    ap.add_argument("--tol", type=float, default=1e-3)
    return ap


def sweep_args(ap, a):
    """(policies, budgets, layers) of parsed arguments; ap.error() on bad ones."""
    if not a.trace:
        ap.error("TRACE is required")
    pols = [p.strip() for p in a.policies.split(",") if p.strip()]
    for p in pols:
        if p not in ALL_POLICIES:
            ap.error("unknown policy %s (known: %s)" % (p, ", ".join(ALL_POLICIES)))
    budgets = [b.strip() for b in a.budgets.split(",") if b.strip()]
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    return pols, budgets, layers


def report(out, a, time_line):
    """Print the sweep's table, time_line and the agreement with a.compare (added to out);
    write out to a.output. Returns the exit code (1 if snapkv or streamingllm differ)."""
    budgets = out["budgets"]
    print("| policy | budget | n_keep | recall_window | err_window | recall_decode | err_decode "
          "| coverage |\n|---|---|---|---|---|---|---|---|")
    for p in out["policies"]:
        for b in budgets:
            m = out["results"][p][b]
            print("| %s | %s | %.1f | %.4f | %.4f | %.4f | %.4f | %.4f |" % (
                p, b, m["n_keep"], m["recall_window"], m["err_window"], m["recall_decode"],
                m["err_decode"], m["coverage"]))
    if out["skipped"]:
        print("skipped (missing input): %s" % ", ".join(out["skipped"]))
    print(time_line)
    rc = 0
    if a.compare:
        kv = kvtrace_means(a.compare, out["layers"])
        out["agreement"] = {}
        print("\nagreement with %s (mean over layers %s and heads):" % (a.compare, out["layers"]))
        print("| policy | budget | peer recall | kvtrace recall | abs diff | peer err_w | "
              "kvtrace err_w | peer coverage | kvtrace coverage |\n|---|---|---|---|---|---|---|"
              "---|---|")
        for p in out["policies"]:
            if p not in kv:
                continue
            worst, worst_e, worst_c = 0.0, 0.0, 0.0
            for b in budgets:
                pm, km = out["results"][p][b], kv[p].get(b)
                if km is None:
                    continue
                d = abs(pm["recall_window"] - km["recall_window"])
                worst = max(worst, d)
                worst_e = max(worst_e, abs(pm["err_window"] - km["err_window"]))
                worst_c = max(worst_c, abs(pm["coverage"] - km["coverage"]))
                print("| %s | %s | %.6f | %.6f | %.1e | %.5f | %.5f | %.5f | %.5f |" % (
                    p, b, pm["recall_window"], km["recall_window"], d, pm["err_window"],
                    km["err_window"], pm["coverage"], km["coverage"]))
            out["agreement"][p] = {"recall_window": worst, "err_window": worst_e,
                                   "coverage": worst_c}
        for p, ag in out["agreement"].items():
            worst = max(ag["recall_window"], ag["coverage"])
            verdict = "ok" if worst <= a.tol else ("n/a (own RNG)" if p == "random" else "DIFFERS")
            print("agreement %s max |recall diff| %.2e, max |coverage diff| %.2e (tol %.0e): %s; "
                  "max |err_window diff| %.2e" % (p, ag["recall_window"], ag["coverage"], a.tol,
                                                  verdict, ag["err_window"]))
            if p != "random" and worst > a.tol:  # every policy but random (its own RNG)
                rc = 1
    if a.output:
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)
    return rc


def main(argv=None):
    ap = arg_parser()
    a = ap.parse_args(argv)
    if a.cut:
        cut(a.cut[1], int(a.cut[0]), a.cut[2])
        return 0
    pols, budgets, layers = sweep_args(ap, a)
    out = replay(a.trace, pols, budgets, a.probes, layers, a.seed)
    t = out["time"]
    return report(out, a, "peer_total_s %.3f  (read %.2f, attention %.2f, policies x budgets "
                  "%.2f; OPENBLAS_NUM_THREADS=%s)" % (out["total_s"], t["read"], t["attention"],
                                                     t["policies"], out["blas_threads"]))


if __name__ == "__main__":
    sys.exit(main())
