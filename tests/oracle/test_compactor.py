#!/usr/bin/python3
"""test_compactor.py - `leverage` and `compactor` against NumPy written from kvpress's
LeverageScorePress and CompactorPress (kvpress/presses/leverage_press.py, compactor_press.py;
Compactor, arXiv 2507.08143):
  * leverage: the pre-RoPE keys of a KV head (here: each token's RoPE as a full D x D matrix,
    undone with np.linalg.solve, as test_expected_attention_synth.py does), centred on their
    mean, times a Gaussian sketch Phi [D, k] / sqrt(k) (kvtrace's draws: kvt_rng's Box-Muller
    normals, seeded by seed ^ (layer+1)*0x9E3779B97F4A7C15 ^ (g+1)*0xC2B2AE3D27D4EB4F, row by
    row; k = 0: no sketch), then diag(X (X^T X + eps I)^-1 X^T) clamped at 0, eps = 1e-2 (the
    Cholesky's first jitter), z-normalised (ddof 1) over every head and token;
  * compactor: the first 8 and the last 4 tokens protected; on the tokens between, taken as a
    prompt of their own, blend * z(leverage) + z(noncausal attention) (test_noncausal_attention's
    scores on that slice), blend = the budget's compression ratio 1 - B/T unless given; each head
    keeps the protected tokens (the earlier first) and then the highest scores, ties to the
    earlier token.
Every kept set of `kvtrace replay --export-selection` must equal the check's.

Traces: a llama2.c capture with Q_all (T = 150, D = 8: the sketch has more columns than D) and a
llama3-8b-shaped synthetic one (T = 300, D = 128, GQA 4). Environment: KVT_BIN, KVT_LIB,
KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, compare_kept, finish, need_library,  # noqa: E402
                      replay_export, score_traces)  # (77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_cam import M64, Rng  # noqa: E402
from test_expected_attention_synth import rope_matrices, trace_rope  # noqa: E402
from test_noncausal_attention import scores as nca_scores  # noqa: E402

kvtrace = need_library()


def normal(rng):
    u1, u2 = rng.uniform(), rng.uniform()
    return math.sqrt(-2.0 * math.log(max(u1, 1e-300))) * math.cos(6.283185307179586 * u2)


def znorm(x):
    return (x - x.mean()) / max(x.std(ddof=1) if x.size > 1 else 0.0, 1e-6)


def pre_rope_keys(t, K):
    """[Hkv, T, D] the keys with each token's RoPE undone."""
    m = t.header["model"]
    if m["rope"]["type"] == "none":
        return K.copy()
    freq, pairs, a, row_of, rows, _ = trace_rope(t)
    R = rope_matrices(rows, m["head_dim"], freq, pairs, a, row_of)
    return np.stack([np.linalg.solve(R, K[g][:, :, None])[:, :, 0] for g in range(K.shape[0])])


def leverage(pre, layer, sketch, seed):
    """[Hkv, n] raw leverage scores of the rows of pre [Hkv, n, D]."""
    Hkv, n, D = pre.shape
    out = np.zeros((Hkv, n))
    for g in range(Hkv):
        X = pre[g] - pre[g].mean(axis=0)
        if sketch > 0:
            rng = Rng(seed ^ (((layer + 1) * 0x9E3779B97F4A7C15) & M64)
                      ^ (((g + 1) * 0xC2B2AE3D27D4EB4F) & M64))
            phi = np.array([normal(rng) for _ in range(D * sketch)]).reshape(D, sketch)
            X = X @ (phi / math.sqrt(sketch))
        G = X.T @ X
        G = 0.5 * (G + G.T) + 1e-2 * np.eye(G.shape[0])
        out[g] = np.maximum(np.einsum("nk,nk->n", X, np.linalg.solve(G, X.T).T), 0.0)
    return out


def check_leverage(name, path, spec, sketch, seed, per_query, budgets, work):
    recs = replay_export(path, spec, budgets, work)["records"]
    with kvtrace.open(path) as t:
        m = t.header["model"]
        T, G = t.header["n_tokens"], m["n_q_heads"] // m["n_kv_heads"]
        cache = {}

        def order_of(r):
            layer = r["layer"]
            if layer not in cache:
                K = t.read("K", layer, dtype="float32").astype(np.float64)
                cache[layer] = znorm(leverage(pre_rope_keys(t, K), layer, sketch, seed))
            s = cache[layer][r["head"] // G if per_query else r["head"]]
            return sorted(range(T), key=lambda j: (-s[j], j))
        compare_kept(name, spec, recs, order_of)


def check_compactor(name, path, spec, opts, budgets, work):
    recs = replay_export(path, spec, budgets, work)["records"]
    per_query, blend = opts.get("per_query", False), opts.get("blend")
    sketch, seed, chunk = opts.get("sketch", 48), opts.get("seed", 0), opts.get("chunk", 256)
    with kvtrace.open(path) as t:
        m = t.header["model"]
        T, G = t.header["n_tokens"], m["n_q_heads"] // m["n_kv_heads"]
        left = min(opts.get("sinks", 8), T)
        right = min(opts.get("recent", 4), max(0, T - left))
        s0, s1 = left, T - right
        cache = {}

        def order_of(r):
            layer = r["layer"]
            if layer not in cache:
                Q, K, V = [t.read(k, layer, dtype="float32").astype(np.float64)
                           for k in ("Q_all", "K", "V")]
                pre = pre_rope_keys(t, K)[:, s0:s1]
                lev = znorm(leverage(pre, layer, sketch, seed))
                att = nca_scores(Q[:, s0:s1], K[:, s0:s1], V[:, s0:s1], chunk, per_query)
                cache.clear()
                cache[layer] = (lev, att)
            lev, att = cache[layer]
            h = r["head"]
            bl = 1.0 - r["budget_tokens"] / T if blend is None else blend
            s = np.full(T, np.inf)
            s[s0:s1] = bl * lev[h // G if per_query else h] + att[h]
            return sorted(range(T), key=lambda j: (-s[j], j))
        compare_kept(name, spec, recs, order_of)


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True, layers=1)
        check_leverage("llama2c", a, "leverage", 48, 0, False, "3,20,75,149", work)
        check_leverage("llama2c", a, "leverage:sketch=0,heads=query", 0, 0, True, "5,60", work)
        check_leverage("llama3-8b", s, "leverage", 48, 0, False, "8,30,150,299", work)
        check_leverage("llama3-8b", s, "leverage:sketch=16,seed=7", 16, 7, False, "30,150",
                       work)
        check_leverage("llama3-8b", s, "leverage:sketch=0", 0, 0, False, "30,150", work)
        check_compactor("llama2c", a, "compactor", {}, "6,12,30,75,140", work)
        check_compactor("llama2c", a, "compactor:chunk=64,heads=query,sketch=0",
                        {"chunk": 64, "per_query": True, "sketch": 0}, "20,100", work)
        check_compactor("llama3-8b", s, "compactor", {}, "10,60,150,290", work)
        check_compactor("llama3-8b", s, "compactor:blend=2,sinks=0,recent=16,chunk=100,seed=3",
                        {"blend": 2.0, "sinks": 0, "recent": 16, "chunk": 100, "seed": 3},
                        "30,150", work)
    finish("test_compactor")


if __name__ == "__main__":
    main()
