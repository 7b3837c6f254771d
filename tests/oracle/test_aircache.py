#!/usr/bin/python3
"""test_aircache.py - aircache-like's kept sets against NumPy written from the method as
analysis/RESULTS.md states it (AirCache, arXiv 2503.23956; the inferred parts marked there):

  * the instruction: the prompt after its last image/video token (its last `last` tokens);
  * per query head, the elite window E: instruction tokens whose logit from the last prompt
    token is within log(threshold) of the largest over the instruction;
  * I[h]: the mean over E of each elite token's softmax over the visual keys and the elite keys
    up to it, on the visual keys; a selection head's I the group's (reduce=), the layer's the
    mean over all query heads; strength sum I, skewness the adjusted Fisher-Pearson one;
  * layer weights: each statistic over its mean across layers (skewness shifted up by a
    negative minimum), averaged; the visual counts clamp(lam w, 1, N_v) summing to
    (B - N_text) L (replay_oracle.vlcache_counts), every non-visual token kept first (the most
    recent first when B < N_text), then the visual ones by float32 I, ties to the lower index.

Every exported kept set must be the one this gives, except where two float32 scores across a
head's cut lie within 1e-6 (counted as ties). Then the refusals. Traces: tiny-vl synthetic
ones (T = 300: 180 image tokens between text) with and without Q_all.
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, refused,  # noqa: E402
                      replay_export, run)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402
import replay_oracle as ro  # noqa: E402

kvtrace = need_library()


def opts(spec):
    o = {"heads": "kv", "reduce": "mean", "threshold": "0.9", "last": "0"}
    _, _, rest = spec.partition(":")
    o.update(x.split("=", 1) for x in rest.split(",") if x)
    return o


def layer_stats(ctx, o):
    """(scores [H', N] of the visual tokens (0 elsewhere), strength, skewness) of one layer."""
    N, Hq = ctx.N, ctx.Hq
    vpos = np.where(np.isin(ctx.modality, (1, 2)))[0]
    n = N - 1 - int(vpos[-1])
    if int(o["last"]) > 0:
        n = min(n, int(o["last"]))
    Q = ctx.Qw if ctx.Wt >= n else ctx.Qall
    p0, thr = N - n, float(o["threshold"])
    I = np.zeros((Hq, N))
    for h in range(Hq):
        K = ctx.K[ctx.gi[h]]

        def qrow(t):
            return Q[h, Q.shape[1] - (N - t)]

        z = K[p0:] @ qrow(N - 1) * ctx.scale
        elite = [p0 + i for i in range(n) if thr == 0 or z[i] - z.max() >= math.log(thr)]
        for k, e in enumerate(elite):
            keys = np.concatenate([vpos, elite[:k + 1]])
            ze = K[keys] @ qrow(e) * ctx.scale
            p = np.exp(ze - ze.max())
            I[h, vpos] += (p / p.sum())[:len(vpos)]
        I[h] /= len(elite)
    red = I if o["heads"] == "query" else ro.reduce_heads(I, ctx.Hkv, o["reduce"])
    il = I.mean(axis=0)[vpos]
    nv, mu, sd = len(il), il.mean(), il.std()
    skew = (nv / ((nv - 1) * (nv - 2)) * (((il - mu) / sd) ** 3).sum()
            if nv >= 3 and sd > 0 else 0.0)
    return red, il.sum(), skew


def weights(strength, skew):
    s, k = np.asarray(strength, float), np.asarray(skew, float)
    k = k - min(0.0, k.min())
    w = ((s / s.mean() if s.mean() > 0 else np.ones_like(s)) +
         (k / k.mean() if k.mean() > 0 else np.ones_like(k))) / 2
    return np.where(w > 0, w / w.max(), 1e-12) if w.max() > 0 else np.ones_like(w)


def check_trace(name, path, spec, budgets, work):
    o = opts(spec)
    exp = replay_export(path, spec, budgets, work)
    with kvtrace.open(path) as t:
        L, N = t.header["model"]["n_layers"], t.header["n_tokens"]
        ctxs = [ro.load_layer(t, l) for l in range(L)]
    stats = [layer_stats(c, o) for c in ctxs]
    w = weights([s[1] for s in stats], [s[2] for s in stats])
    vis = np.isin(ctxs[0].modality, (1, 2))
    vpos, text = np.where(vis)[0], np.where(~vis)[0][::-1]  # the most recent text first
    nv, nt = len(vpos), N - len(vpos)
    n = bad = ties = 0
    for r in exp["records"]:
        B, l, h = r["budget_tokens"], r["layer"], r["head"]
        sc = stats[l][0][h][vpos].astype(np.float32)
        vord = vpos[np.lexsort((vpos, -sc))]
        if B >= N:
            keep = N
        elif B <= nt:
            keep = B
        else:
            keep = nt + ro.vlcache_counts(w, nv, B - nt)[l]
        order = np.concatenate([text, vord])
        want = sorted(order[:keep].tolist())
        n += 1
        cut = keep - nt
        if 0 < cut < nv:
            a, b = float(sc[vpos == vord[cut - 1]][0]), float(sc[vpos == vord[cut]][0])
            if abs(a - b) <= 1e-6 * max(abs(a), 1e-30):
                ties += 1
                continue
        if r["kept"] != want:
            bad += 1
            if bad <= 3:
                print("  %s %s B %d layer %d head %d: kept %d tokens, NumPy %d; first differing %s"
                      % (name, spec, B, l, h, len(r["kept"]), len(want),
                         sorted(set(r["kept"]) ^ set(want))[:5]))
    print("%s %s: %d sets, %d differ, %d at a tie; layer weights %s" % (
        name, spec, n, bad, ties, np.round(w, 4).tolist()))
    check(n > 0 and bad == 0, "%s %s" % (name, spec))


def main():
    with tempfile.TemporaryDirectory() as work:
        qa, nq = os.path.join(work, "qa.kvt"), os.path.join(work, "nq.kvt")
        run("synth", "--shape", "tiny-vl", "--tokens", "300", "--q-all",
            "-o", qa)
        run("synth", "--shape", "tiny-vl", "--tokens", "300", "--seed", "5", "-o", nq)
        budgets = "64,120,121,150,200,50%,300"
        for spec in ("aircache-like", "aircache-like:heads=query",
                     "aircache-like:reduce=max,threshold=0.5", "aircache-like:threshold=0,last=40"):
            check_trace("q_all", qa, spec, budgets, work)
        check_trace("window", nq, "aircache-like:last=32", budgets, work)
        out = os.path.join(work, "x.json")
        refused(["replay", nq, "--policies", "aircache-like", "--budgets", "64", "-o", out],
                "aircache-like: the 105 post-vision queries")
        s = os.path.join(work, "s.kvt")
        run("synth", "--shape", "llama3-8b", "--tokens", "200", "--layers", "2", "-o", s)
        refused(["replay", s, "--policies", "aircache-like", "--budgets", "64", "-o", out],
                "aircache-like: the trace has no image or video tokens")
    finish("test_aircache")


if __name__ == "__main__":
    main()
