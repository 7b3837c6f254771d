#!/usr/bin/python3
"""test_merge.py - merge=pivot|weighted against NumPy written from KVCache-Factory's merge_kv
(pyramidkv/pyramidkv_utils.py, the version with kv_head mode): the tokens a head drops are
matched to the kept entry with the largest cosine of keys (F.normalize, eps 1e-6; the first
maximum), then
    pivot:    scatter_reduce("mean", include_self) of (dropped + target) / 2 into the target
    weighted: (target + sum w_j dropped_j) / (1 + sum w_j), w_j = max((cos_j + 1) / 2, 1e-6)
for keys and values alike. The check takes each head's kept set from the replay's selection
export (which must equal the same policy's without merge=), merges in float64, and computes the
output error of every window query (causal: an entry is seen by the queries at or after its
token) and every decode query (which also sees the decode keys 0..s, unmerged), averaged per
head as analysis/RESULTS.md says; each must match the replay's err_window and err_decode grids.

lookm merges by default (merge=pivot, LOOK-M's); its kept sets must equal lookm:merge=none's.
elastic-cache:merge=weighted (its anchors merged by key instead of by position) likewise.

Traces: a llama2.c capture (T = 150, 8 query heads on 4 KV heads, D = 8, 2 decode steps with
their keys), a llama3-8b-shaped synthetic one (T = 300, GQA 4, D = 128) and, for lookm's text
prior, a tiny-vl one (T = 300, an image between text). Environment:
KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, run,  # noqa: E402
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()


def normalize(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-6)


def merge_kv(K, V, kept, mode):
    """KVCF's merge_kv for one head: K, V [T, D] float64, kept ascending token indices. The
    merged (keys, values) of the kept entries, in that order."""
    T = K.shape[0]
    drop = np.setdiff1d(np.arange(T), kept)
    rk, rv = K[kept].copy(), V[kept].copy()
    if len(drop) == 0 or len(kept) == 0:
        return rk, rv
    sim = normalize(K[drop]) @ normalize(K[kept]).T
    tgt = sim.argmax(axis=1)  # the first maximum
    best = sim[np.arange(len(drop)), tgt]
    if mode == "pivot":
        # scatter_reduce(mean, include_self): (self + sum of sources) / (1 + count), the sources
        # (dropped + target) / 2 taken against the targets before the update
        sk, sv = rk.copy(), rv.copy()
        cnt = np.ones(len(kept))
        for j, t in zip(drop, tgt):
            sk[t] += (K[j] + rk[t]) / 2
            sv[t] += (V[j] + rv[t]) / 2
            cnt[t] += 1
        return sk / cnt[:, None], sv / cnt[:, None]
    if mode != "weighted":
        raise ValueError("merge_kv: no merge %r here" % mode)
    w = np.maximum((best + 1.0) / 2.0, 1e-6)
    ak, av, ws = np.zeros_like(rk), np.zeros_like(rv), np.zeros(len(kept))
    for j, t, wj in zip(drop, tgt, w):
        ak[t] += wj * K[j]
        av[t] += wj * V[j]
        ws[t] += wj
    return (rk + ak) / (1 + ws)[:, None], (rv + av) / (1 + ws)[:, None]


def out_err(q, scale, keys, vals, ks, vs, xk=None, xv=None):
    """||o_S - o|| / ||o|| of one query: o over (keys, vals), o_S over (ks, vs); both also see
    the extra (decode) keys xk, xv."""
    if xk is not None and len(xk):
        keys, vals = np.vstack([keys, xk]), np.vstack([vals, xv])
        ks, vs = np.vstack([ks, xk]), np.vstack([vs, xv])
    z = keys @ q * scale
    p = np.exp(z - z.max())
    o = p @ vals / p.sum()
    if len(ks) == 0:
        return 1.0
    zs = ks @ q * scale
    ps = np.exp(zs - zs.max())
    os_ = ps @ vs / ps.sum()
    return float(np.linalg.norm(os_ - o) / np.linalg.norm(o))


# policies that merge unless told merge=none (elastic-cache's own merge: test_elastic_cache.py)
DEFAULT_MERGE = {"lookm": "pivot", "elastic-cache": "position"}


def merge_mode(spec):
    """The merge a spec replays: its merge= option, or its policy's default."""
    if "merge=" in spec:
        return spec.split("merge=")[1].split(",")[0]
    return DEFAULT_MERGE.get(spec.split(":")[0], "none")


def read_layers(t):
    """Every layer's K, V, Q_window (and Q_decode, K_decode, V_decode or None) in float64."""
    layers = []
    for l in range(t.header["model"]["n_layers"]):
        rd = {k: t.read(k, l, dtype="float32").astype(np.float64) for k in ("K", "V", "Q_window")}
        for k in ("Q_decode", "K_decode", "V_decode"):
            try:
                rd[k] = t.read(k, l, dtype="float32").astype(np.float64)
            except Exception:
                rd[k] = None
        layers.append(rd)
    return layers


def merged_errors(x, g, qh, idx, mk, mv, scale):
    """The mean output errors of query heads qh over KV head g's merged entries (token indices
    idx, keys mk, values mv): every window query, seeing the entries up to its position, and
    every decode query, seeing them all and the decode keys 0..s (None without decode queries).
    x: a layer of read_layers."""
    T = x["K"].shape[1]
    Wt = x["Q_window"].shape[1]
    ew = [out_err(x["Q_window"][hq, i], scale, x["K"][g, :T - Wt + i + 1],
                  x["V"][g, :T - Wt + i + 1], mk[idx <= T - Wt + i], mv[idx <= T - Wt + i])
          for hq in qh for i in range(Wt)]
    if x["Q_decode"] is None:
        return np.mean(ew), None
    dk = [None if x["K_decode"] is None else x["K_decode"][g, :s + 1]
          for s in range(x["Q_decode"].shape[1])]
    dv = [None if x["V_decode"] is None else x["V_decode"][g, :s + 1]
          for s in range(x["Q_decode"].shape[1])]
    ed = [out_err(x["Q_decode"][hq, s], scale, x["K"][g], x["V"][g], mk, mv, dk[s], dv[s])
          for hq in qh for s in range(x["Q_decode"].shape[1])]
    return np.mean(ew), np.mean(ed)


class ErrTally:
    """The replay's err_window / err_decode against the check's, within 2e-5 (relative above
    1); counts, the worst difference, and the first three that differ printed."""

    def __init__(self, name, spec):
        self.name, self.spec = name, spec
        self.n = self.bad = 0
        self.worst = 0.0

    def add(self, run_, l, h, errs):
        for key, want in zip(("err_window", "err_decode"), errs):
            if want is None:
                continue
            got = run_["metrics"][key][l][h]
            d = abs(got - want)
            self.n += 1
            self.worst = max(self.worst, d)
            if not d <= 2e-5 * max(1.0, abs(want)):
                self.bad += 1
                if self.bad <= 3:
                    print("  %s %s B %d layer %d head %d %s: replay %.8f, check %.8f" % (
                        self.name, self.spec, run_["budget_tokens"], l, h, key, got, want))

    def summary(self):
        return "%d errors compared (worst |diff| %.2e), %d differ" % (self.n, self.worst,
                                                                      self.bad)


def replay_kept(path, specs, budgets, work):
    """Replay SPECS on the trace with a JSON selection export: (the policies' labels, {(label,
    layer, head, budget_tokens): kept list}, results.json as a dict)."""
    sel = os.path.join(work, "sel.json")
    res = os.path.join(work, "r.json")
    run("replay", path, "--policies", ",".join(specs), "--budgets", budgets,
        "--export-selection", sel, "-o", res, "--force")
    with open(sel) as f:
        exp = json.load(f)
    with open(res) as f:
        r = json.load(f)
    labels = [p["label"] for p in exp["policies"]]
    kept = {}
    for rec in exp["records"]:
        kept[(labels[rec["policy"]], rec["layer"], rec["head"], rec["budget_tokens"])] = rec["kept"]
    return labels, kept, r


def check_trace(name, path, specs, budgets, work):
    labels, kept, r = replay_kept(path, specs, budgets, work)
    tr = r["traces"][0]
    with kvtrace.open(path) as t:
        m = t.header["model"]
        Hq, Hkv, L = m["n_q_heads"], m["n_kv_heads"], m["n_layers"]
        scale = m.get("attn_scale") or 1 / math.sqrt(m["head_dim"])
        layers = read_layers(t)
    for spec in specs:
        mode = merge_mode(spec)
        if mode == "none":
            continue
        pname, _, opts = spec.partition(":")
        rest = [o for o in opts.split(",") if o and not o.startswith("merge=")]
        if pname in DEFAULT_MERGE:  # a policy that merges by default: its base says merge=none
            rest.append("merge=none")
        base = pname + (":" + ",".join(rest) if rest else "")
        pi = labels.index(spec)
        runs = [x for x in tr["runs"] if x["policy"] == pi]
        bad_sets = n_sets = bad_recall = 0
        tally = ErrTally(name, spec)
        for run_ in runs:
            B = run_["budget_tokens"]
            per_q = run_["granularity"] == "query_head"
            G = Hq // Hkv
            for l in range(L):
                x = layers[l]
                for h in range(run_["n_heads"]):
                    ks = kept[(spec, l, h, B)]
                    n_sets += 1
                    if ks != kept[(base, l, h, B)]:
                        bad_sets += 1
                    g = h // G if per_q else h
                    idx = np.array(ks, dtype=int)
                    mk, mv = merge_kv(x["K"][g], x["V"][g], idx, mode)
                    qh = [h] if per_q else range(g * G, (g + 1) * G)
                    tally.add(run_, l, h, merged_errors(x, g, qh, idx, mk, mv, scale))
                    if run_["metrics"]["recall_window"][l][h] is not None:
                        bad_recall += 1  # recall is not defined for merged entries
        print("%s %s: %s; %d recalls not null; %d of %d kept sets differ from %s's" % (
            name, spec, tally.summary(), bad_recall, bad_sets, n_sets, base))
        check(tally.n > 0 and tally.bad == 0 and bad_recall == 0 and bad_sets == 0,
              "%s %s" % (name, spec))


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True)
        check_trace("llama2c", a, ["snapkv:window=8", "snapkv:window=8,merge=pivot",
                                   "snapkv:window=8,merge=weighted",
                                   "snapkv:window=8,heads=query",
                                   "snapkv:window=8,heads=query,merge=pivot",
                                   "pyramidkv:window=8", "pyramidkv:window=8,merge=weighted",
                                   "streamingllm",
                                   "streamingllm:merge=pivot", "h2o:window=8",
                                   "h2o:window=8,merge=weighted", "lookm", "lookm:merge=none",
                                   "lookm:recent_share=0.25,heads=query,merge=weighted",
                                   "lookm:recent_share=0.25,heads=query,merge=none",
                                   "elastic-cache:merge=none", "elastic-cache:merge=weighted"],
                    "3,20,64,50%,150", work)
        check_trace("llama3-8b", s, ["snapkv", "snapkv:merge=weighted", "snapkv:merge=pivot", "h2o",
                                     "h2o:merge=pivot"], "16,40,100,200", work)
        # LOOK-M's own setting: an image between text, its text prior and pivot merge
        vl = os.path.join(work, "vl.kvt")
        run("synth", "--shape", "tiny-vl", "--tokens", "300", "--colsum", "on", "-o", vl)
        check_trace("tiny-vl", vl, ["lookm", "lookm:merge=none"], "16,60,20%,150", work)
    finish("test_merge")


if __name__ == "__main__":
    main()
