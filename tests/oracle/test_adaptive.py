#!/usr/bin/python3
"""test_adaptive.py - `adaptive=1` on the kvpress score policies (knorm, keydiff, qfilter, cur,
lagkv, expected-attention, observed-attention, noncausal-attention) against NumPy written from
kvpress's AdaKVPress.compress (kvpress/presses/adakv_press.py @002ac9d):

    n_kept = N (the budget), n_safe = int(n_kept * alpha_safeguard)
    each head's top n_safe scores are set to the dtype's maximum
    the H * (T - n_kept) lowest scores of the layer (all heads flattened) are pruned

so each head keeps its n_safe best tokens and the layer keeps the global top H * N. The scores
are the press's own, from the NumPy checks of each policy's oracle (test_cur, test_lagkv,
test_noncausal_attention, test_expected_attention_synth) or written here (knorm, keydiff,
qfilter with a filters file, observed-attention). Ties go to the lower head, then the earlier
token (the flattened index), as kvtrace documents; kvpress's torch.topk leaves them unspecified.
Sinks score +inf here, as in kvtrace (kvpress pads them with the layer's maximum, a tie).

Also checked: alloc=a (the AdaKV-repo rule, replay_oracle.adakv_caps) on cur's non-negative
scores, and its refusal of knorm's negative ones; skip; window (kvtrace's extension: the last W
tokens first, n_safe - W prefix tokens forced); heads=query; external's negative scores with
alloc=b; and that a replay whose every layer fails names layer 0 whatever its threads' timing.
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the
library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, replay_export,  # noqa: E402
                      refused as cli_refused, run,
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()
from replay_oracle import adakv_caps  # noqa: E402
from test_cur import cur_scores  # noqa: E402
from test_lagkv import lag_scores  # noqa: E402
import test_expected_attention_synth as ea_synth  # noqa: E402
import test_noncausal_attention as nca  # noqa: E402


def knorm(t, layer, filters):
    return -np.linalg.norm(t.read("K", layer, dtype="float32").astype(np.float64), axis=-1)


def keydiff(t, layer, filters):
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    n = np.linalg.norm(K, axis=-1, keepdims=True)
    ku = np.where(n > 0, K / np.where(n > 0, n, 1), 0)
    m = ku.mean(axis=1)  # [Hkv, D]
    return -np.einsum("htd,hd->ht", ku, m) / np.linalg.norm(m, axis=-1)[:, None]


def qfilter(t, layer, filters):
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    return -np.einsum("htd,hd->ht", K, filters[layer].astype(np.float64))


def cur(t, layer, filters, **kw):
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    V = t.read("V", layer, dtype="float32").astype(np.float64)
    o = dict(sinks=4, leverage="kv_product", local=16)
    o.update(kw)
    return np.stack([cur_scores(K[g], V[g], **o) for g in range(K.shape[0])])


def lagkv(t, layer, filters):
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    V = t.read("V", layer, dtype="float32").astype(np.float64)
    return np.stack([lag_scores(K[g], V[g], 4, 16, False) for g in range(K.shape[0])])


def observed(t, layer, filters):
    """Column sums of the causal softmax of every prompt query, / (T - j), GQA mean."""
    Q = t.read("Q_all", layer, dtype="float32").astype(np.float64)
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    Hq, T, D = Q.shape
    G = Hq // K.shape[0]
    scale = t.header["model"].get("attn_scale", 1 / math.sqrt(D))
    z = np.einsum("hid,hjd->hij", Q, np.repeat(K, G, axis=0)) * scale
    z = np.where(np.tril(np.ones((T, T), bool)), z, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    a = p.sum(axis=1) / (T - np.arange(T))
    return a.reshape(-1, G, T).mean(axis=1)


def noncausal(t, layer, filters):
    rd = [t.read(k, layer, dtype="float32").astype(np.float64) for k in ("Q_all", "K", "V")]
    return nca.scores(*rd, 64, False)


def adakv_keep(S, B, alpha, window=0):
    """AdaKVPress's kept sets [H] of one layer's scores S [H, T] at budget B."""
    H, T = S.shape
    if B >= T:
        return [set(range(T))] * H
    if B <= window:  # kvtrace: each head keeps its B most recent
        return [set(range(T - B, T))] * H
    S = S.copy()
    S[:, T - window:] = np.inf  # the window (kvtrace's extension) above every score
    n_safe = int(B * alpha)
    ids = np.arange(T)
    for h in range(H):
        S[h, np.lexsort((ids, -S[h]))[:n_safe]] = np.inf
    flat = S.reshape(-1)
    keep = np.lexsort((np.arange(flat.size), -flat))[:H * B]
    return [set(int(i) % T for i in keep if i // T == h) for h in range(H)]


def adakv_a_keep(S, B, alpha, layer, skip):
    """The AdaKV-repo rule (alloc=a, normalize=1, window 0): cap_g of the layer, then each
    head's top cap_g."""
    H, T = S.shape
    if B >= T:
        return [set(range(T))] * H
    caps = adakv_caps(S, B, alpha=alpha, normalize=True, layer=layer, skip=skip)
    ids = np.arange(T)
    return [set(int(j) for j in np.lexsort((ids, -S[h]))[:caps[h]]) for h in range(H)]


def compare(name, path, spec, budgets, work, score, per_query=False, alpha=0.2, window=0,
            filters=None, alloc="b", skip=0):
    recs = replay_export(path, spec, budgets, work)["records"]
    bad, sizes, layers = 0, {}, {}
    with kvtrace.open(path) as t:
        m = t.header["model"]
        G = m["n_q_heads"] // m["n_kv_heads"]
        for r in recs:
            layer, B = r["layer"], r["budget_tokens"]
            if layer not in layers:
                S = score(t, layer, filters)
                layers[layer] = np.repeat(S, G, axis=0) if per_query else S
            S = layers[layer]
            key = (layer, B)
            if key not in sizes:
                sizes[key] = (adakv_a_keep(S, B, alpha, layer, skip) if alloc == "a"
                              else adakv_keep(S, B, alpha, window))
            want = sizes[key][r["head"]]
            if want != set(r["kept"]):
                bad += 1
                if bad <= 3:
                    print("  %s %s layer %d head %d B %d: check %d %s, replay %d %s" % (
                        name, spec, layer, r["head"], B, len(want),
                        sorted(want - set(r["kept"]))[:8], len(r["kept"]),
                        sorted(set(r["kept"]) - want)[:8]))
    uneven = sum(len({len(s) for s in v}) > 1 for v in sizes.values())
    print("%s %s: %d sets, %d differ; %d of %d (layer, budget) pairs with unequal head budgets"
          % (name, spec, len(recs), bad, uneven, len(sizes)))
    check(recs and bad == 0, "%s %s: %d of %d kept sets differ" % (name, spec, bad, len(recs)))
    return uneven


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True)
        rng = np.random.default_rng(5)
        with kvtrace.open(a) as t:
            m = t.header["model"]
            fa = rng.standard_normal((m["n_layers"], m["n_kv_heads"], m["head_dim"]))
        fpath = os.path.join(work, "f.npy")
        np.save(fpath, fa.astype(np.float32))

        budgets = "1,3,10,40,50%,149,200"
        uneven = 0
        for spec, score, kw in (
                ("knorm:adaptive=1", knorm, {}),
                ("keydiff:adaptive=1", keydiff, {}),
                ("qfilter:adaptive=1,filters=" + fpath, qfilter, dict(filters=fa)),
                ("cur:adaptive=1", cur, {}),
                ("lagkv:adaptive=1,lag=16", lagkv, {}),
                ("observed-attention:adaptive=1", observed, {}),
                ("noncausal-attention:adaptive=1,chunk=64", noncausal, {}),
                ("knorm:adaptive=1,alpha=0.5", knorm, dict(alpha=0.5)),
                ("cur:adaptive=1,alpha=0", cur, dict(alpha=0.0)),
                ("keydiff:adaptive=1,heads=query", keydiff, dict(per_query=True)),
                ("knorm:adaptive=1,window=8", knorm, dict(window=8))):
            uneven += compare("llama2c", a, spec, budgets, work, score, **kw)
        # alloc=a: AdaKV-repo allocation on non-negative scores; skip=2 keeps layers 0, 1 uniform
        uneven += compare("llama2c", a, "cur:adaptive=1,alloc=a,sinks=0,skip=2", budgets, work,
                          lambda t, l, f: cur(t, l, f, sinks=0), alloc="a", skip=2)

        # the llama3-8b-shaped trace (bf16, GQA 4, D = 128)
        ea, _ = ea_synth.scores(s)
        for spec, score, kw in (
                ("knorm:adaptive=1", knorm, {}),
                ("expected-attention:adaptive=1", lambda t, l, f: ea[l], {}),
                ("cur:adaptive=1,leverage=key", lambda t, l, f: cur(t, l, f, leverage="key"),
                 {})):
            uneven += compare("llama3-8b", s, spec, "8,60,50%", work, score, **kw)
        check(uneven > 20, "only %d (layer, budget) pairs gave heads unequal budgets" % uneven)

        # refusals: one line, non-zero exit
        def refused(spec, want):
            cli_refused(["replay", a, "--policy", spec, "--budgets", "10", "-o",
                         os.path.join(work, "x.json"), "--force"], want)
        refused("knorm:adaptive=1,alloc=a",
                "adaptive=1 with alloc=a shares the budget by the scores' mass")
        # every layer fails, late (after its context): 4 threads race, and the error must name
        # layer 0 every time, as one thread would (before the fix: 2 runs in 8)
        s4 = os.path.join(work, "s4.kvt")
        run("synth", "--shape", "llama3-8b", "--tokens", "300", "--layers", "4", "--q-all",
            "-o", s4)
        for _ in range(6):
            r = run("replay", s4, "--policy", "expected-attention:adaptive=1,alloc=a",
                    "--budgets", "10", "--threads", "4", "-o", os.path.join(work, "x.json"),
                    "--force", ok=False)
            check(r.returncode == 1 and "layer 0: policy" in r.stderr and
                  "score inf at layer 0, head 0, token 0" in r.stderr,
                  "every layer refused, 4 threads: %r" % r.stderr)
        refused("tova:adaptive=1", "adaptive")

        # external: negative scores with alloc=b are kvpress's AdaKVPress over them
        with kvtrace.open(a) as t:
            neg = np.stack([knorm(t, layer, None) for layer in t.layers()])
        npath = os.path.join(work, "neg.npy")
        np.save(npath, neg)
        compare("llama2c", a, "external:adaptive=1,alloc=b,scores=" + npath, "3,10,40", work,
                lambda t, l, f: neg[l])
    finish("test_adaptive")


if __name__ == "__main__":
    main()
