#!/usr/bin/python3
"""test_chunk_scores.py - chunk_length=N with chunk_scores=own|kvpress (replay/chunk_length.c)
against NumPy written from kvpress's ChunkPress (chunk_press.py @17161eb): the prompt cut into
chunks [i, i + N) from token 0, each scored by the press as a prompt of its own
(press.score on the chunk's hidden states, keys and values), each keeping the top
max(1, int(len * (1 - r))) of its scores. The presses' scores, written from their sources:

- SnapKVPress (snapkv_press.py @00dd63a): the chunk's last W queries, their attention over
  the chunk's keys (causal inside the window, softmax over every key they see), the window's
  columns dropped, the mean over the W queries, avg_pool1d (zero padding, divisor k), the mean
  over the GQA group (kvtrace's heads=query: none); the window padded with the chunk's maximum.
  kvpress computes those queries from the chunk's hidden states and rotates them with the last
  W positions of the whole prompt (`cos[:, -window_size:]` of the layer's position
  embeddings): chunk_scores=kvpress. The check takes the trace's post-RoPE queries back to
  pre-RoPE with the header's RoPE (absolute angles) and rotates them again at tokens T - W ...;
  chunk_scores=own leaves them at their own positions.
- TOVAPress (tova_press.py @08a43bf): the same with one query, the mean over every query
  head, one set for all heads; the last token padded with the maximum.
- KeyDiffPress (keydiff_press.py @08a43bf): -cos(k, mean of the chunk's unit keys).
- KnormPress: -||k||, the same as a ranking of the whole prompt (with window=W kvtrace also
  keeps each chunk's last W tokens first).
- StreamingLLMPress (streaming_llm_press.py @08a43bf): each chunk's first n_sink tokens and its
  most recent ones.
- ExpectedAttentionPress (expected_attention_press.py @08a43bf): the mean and covariance of the
  chunk's pre-RoPE queries past its sinks, turned by the mean rotation over the future
  positions q_len, q_len + 1, ... with q_len the chunk's length (chunk_scores=kvpress; own:
  the positions after the chunk), the softmax of the expected logits over the chunk's keys
  past its sinks, the GQA mean, times ||v||.
- LeverageScorePress (leverage_press.py @b82e7b2): each pre-RoPE key's leverage among its
  chunk's keys (test_compactor's check on the chunk's rows; the sketch's draws are kvtrace's).
- LagKVPress (lagkv_press.py @08a43bf): each chunk's own sinks, partitions and tail
  (test_lagkv's check on the chunk's rows).
- CURPress (cur_press.py @a0b8d34): each chunk's own norm blocks, sum and sinks (test_cur's
  check on the chunk's rows).

The share 1 - r is the budget's written share, or B/T. Ties break toward the earlier token, the
window first (newest first), as kvtrace documents. Every exported kept set must equal the
check's; the check computes in float64. The rotation must matter: on each trace the check's own
and kvpress sets differ somewhere. Then the refusals.

Traces: a llama2.c capture (T = 150, 8 query heads on 4 KV heads, D = 8, window 8), a
llama3-8b-shaped synthetic one (T = 300, GQA 4, D = 128) and a tiny-vl one (M-RoPE, an image),
all with Q_all. Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or
the library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (ROOT, check, check_sets, finish, need_library,  # noqa: E402
                      refused, replay_export, run, score_traces)  # (77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_chunk_length import chunk_keep, shares_by_tokens  # noqa: E402
from test_compactor import leverage, pre_rope_keys, znorm  # noqa: E402
from test_cur import cur_scores  # noqa: E402
from test_expected_attention_synth import rope_matrices, trace_rope  # noqa: E402
from test_lagkv import lag_scores  # noqa: E402
from test_noncausal_attention import scores as nca_scores  # noqa: E402

kvtrace = need_library()


def chunks(T, C):
    return [(a, min(C, T - a)) for a in range(0, T, C)]


def rank(s, n, W):
    """A chunk's ranking (local indices): its last W newest first, then s [n - W] descending,
    ties to the earlier token."""
    return list(range(n - 1, n - W - 1, -1)) + sorted(range(n - W), key=lambda j: (-s[j], j))


def avg_pool(s, k):
    """avg_pool1d(kernel k, stride 1, padding k // 2): zeros outside, divided by k."""
    pad = np.concatenate([np.zeros(k // 2), s, np.zeros(k // 2)])
    return np.array([pad[j:j + k].sum() / k for j in range(len(s))])


class Layer:
    def __init__(self, t, layer, turn):
        m = t.header["model"]
        self.T = t.header["n_tokens"]
        self.K = t.read("K", layer, dtype="float32").astype(np.float64)
        self.Q = t.read("Q_all", layer, dtype="float32").astype(np.float64)
        self.Hq, self.Hkv, self.D = m["n_q_heads"], m["n_kv_heads"], m["head_dim"]
        self.G = self.Hq // self.Hkv
        self.scale = m.get("attn_scale") or 1 / math.sqrt(self.D)
        self.rope = trace_rope(t) if turn else None
        self.t, self.layer = t, layer

    def turned(self, t0, m, to):
        """[Hq, m, D]: the queries of tokens t0 .. t0 + m - 1; kvpress (self.rope): at the
        positions of tokens to .. to + m - 1."""
        q = self.Q[:, t0:t0 + m]
        if self.rope is None or to == t0:
            return q
        freq, pairs, sc, row_of, rows, _ = self.rope
        src = rope_matrices(rows[t0:t0 + m], self.D, freq, pairs, sc, row_of)
        dst = rope_matrices(rows[to:to + m], self.D, freq, pairs, sc, row_of)
        raw = np.linalg.solve(src[None], q[..., None])[..., 0]  # pre-RoPE
        return np.einsum("wde,hwe->hwd", dst, raw)

    def queries(self, a, n, W):
        """[Hq, W, D]: the chunk's last W queries; kvpress: at the prompt's last W positions."""
        return self.turned(a + n - W, W, self.T - W)

    def window_attn(self, a, n, W):
        """[Hq, n - W]: the mean over the chunk's last W queries of their attention to the
        chunk's first n - W tokens."""
        q = self.queries(a, n, W)
        k = self.K[np.arange(self.Hq) // self.G, a:a + n]
        z = np.einsum("hwd,hnd->hwn", q, k) * self.scale
        z[:, np.arange(n)[None, :] > (n - W + np.arange(W))[:, None]] = -np.inf
        p = np.exp(z - z.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        return p[:, :, :n - W].mean(axis=1)


def snapkv_orders(L, C, W, kernel, per_query):
    """{chunk: [H' rankings]}"""
    out = {}
    for a, n in chunks(L.T, C):
        s = np.array([avg_pool(x, kernel) for x in L.window_attn(a, n, W)])
        if not per_query:
            s = s.reshape(L.Hkv, L.G, n - W).mean(axis=1)
        out[a] = [rank(x, n, W) for x in s]
    return out


def tova_orders(L, C, heads):
    out = {}
    for a, n in chunks(L.T, C):
        s = L.window_attn(a, n, 1).mean(axis=0)
        out[a] = [rank(s, n, 1)] * heads
    return out


def keydiff_orders(L, C, per_query, W=0):
    out = {}
    for a, n in chunks(L.T, C):
        w = min(W, n)
        hs = []
        for g in range(L.Hkv):
            k = L.K[g, a:a + n]
            ku = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
            m = ku.mean(axis=0)
            hs.append(rank(-(ku @ m) / np.linalg.norm(m), n, w))
        out[a] = [hs[h // L.G] for h in range(L.Hq)] if per_query else hs
    return out


def knorm_orders(L, C, per_query, W):
    out = {}
    for a, n in chunks(L.T, C):
        w = min(W, n)
        hs = [rank(-np.linalg.norm(L.K[g, a:a + n], axis=1), n, w) for g in range(L.Hkv)]
        out[a] = [hs[h // L.G] for h in range(L.Hq)] if per_query else hs
    return out


def streaming_kept(T, C, S, f):
    """ChunkPress(StreamingLLMPress(n_sink=S)) at share f, as kvpress computes it: each chunk's
    scores are 1 but for [S, S + n_pruned), n_pruned = n - int(n * f), and it keeps its top
    max(1, int(n * f)) (tied ones: the earlier)."""
    s = set()
    for a, n in chunks(T, C):
        pruned = n - int(n * f) if f < 1 else 0
        ones = [j for j in range(n) if not S <= j < S + pruned]
        s |= set(a + j for j in ones[:chunk_keep(n, f)])
    return s


def ea_orders(L, C, kvpress, per_query, sinks=4, future=512, cov=True, W=0):
    """ChunkPress(ExpectedAttentionPress): each chunk's pre-RoPE queries past its sinks (the
    trace's Q_all un-rotated), their mean and covariance turned by the mean RoPE rotation over
    the future positions (kvpress: arange(q_len, q_len + n_future) of the chunk, q_len its
    length; own: the positions after the chunk), over the chunk's keys past its sinks, softmax,
    the GQA mean, times ||v||; the sinks first."""
    freq, pairs, sc, row_of, rows, _ = trace_rope(L.t)
    mrope = L.t.header["model"]["rope"]["type"] == "mrope"
    V = L.t.read("V", L.layer, dtype="float32").astype(np.float64)
    Rt = rope_matrices(rows, L.D, freq, pairs, sc, row_of)
    out = {}
    for a, n in chunks(L.T, C):
        S = min(sinks, n)
        p0 = n if kvpress else (rows[a:a + n].max() + 1 if mrope else a + n)
        fut = np.repeat((p0 + np.arange(future, dtype=np.float64))[:, None], 3, axis=1)
        Rbar = rope_matrices(fut, L.D, freq, pairs, sc, row_of).mean(axis=0)
        acc = np.zeros((L.Hq if per_query else L.Hkv, n))
        for hq in range(L.Hq):
            g = hq // L.G
            pre = np.linalg.solve(Rt[a + S:a + n], L.Q[hq, a + S:a + n][:, :, None])[:, :, 0]
            mu = pre.mean(0)
            Sig = (pre - mu).T @ (pre - mu) / pre.shape[0]
            k = L.K[g, a + S:a + n]
            z = L.scale * k @ (Rbar @ mu)
            if cov:
                z = z + 0.5 * L.scale ** 2 * np.einsum("ni,ij,nj->n", k, Rbar @ Sig @ Rbar.T, k)
            p = np.exp(z - z.max())
            p /= p.sum()
            acc[hq if per_query else g, S:] += p if per_query else p / L.G
        hs = []
        for h in range(acc.shape[0]):
            s = acc[h] * np.linalg.norm(V[h // L.G if per_query else h, a:a + n], axis=-1)
            s[:S] = np.inf
            hs.append(rank(s[:n - min(W, n)], n, min(W, n)))
        out[a] = hs
    return out


def leverage_orders(L, C, per_query, sketch, seed, W=0):
    """ChunkPress(LeverageScorePress): each pre-RoPE key's leverage among its chunk's keys (the
    check of test_compactor on the chunk's rows; kvtrace draws each chunk's sketch from the
    same seed)."""
    pre = pre_rope_keys(L.t, L.K)
    out = {}
    for a, n in chunks(L.T, C):
        lev = leverage(pre[:, a:a + n], L.layer, sketch, seed)
        w = min(W, n)
        hs = [rank(x[:n - w], n, w) for x in lev]
        out[a] = [hs[h // L.G] for h in range(L.Hq)] if per_query else hs
    return out


def lagkv_orders(L, C, per_query, sinks=4, lag=128, cross=False):
    """ChunkPress(LagKVPress): each chunk's own sinks, partitions and tail (test_lagkv's check
    on the chunk's rows)."""
    V = L.t.read("V", L.layer, dtype="float32").astype(np.float64)
    out = {}
    for a, n in chunks(L.T, C):
        hs = [rank(lag_scores(L.K[g, a:a + n], V[g, a:a + n], sinks, lag, cross), n, 0)
              for g in range(L.Hkv)]
        out[a] = [hs[h // L.G] for h in range(L.Hq)] if per_query else hs
    return out


def cur_orders(L, C, per_query, sinks=4, lev="kv_product", local=16):
    """ChunkPress(CURPress): each chunk's own norm blocks, sum and sinks (test_cur's check on
    the chunk's rows; a NaN score ranks first, as torch.topk's)."""
    V = L.t.read("V", L.layer, dtype="float32").astype(np.float64)
    out = {}
    for a, n in chunks(L.T, C):
        hs = []
        for g in range(L.Hkv):
            s = cur_scores(L.K[g, a:a + n], V[g, a:a + n], sinks, lev, local)
            hs.append(rank(np.where(np.isnan(s), np.inf, s), n, 0))
        out[a] = [hs[h // L.G] for h in range(L.Hq)] if per_query else hs
    return out


def compactor_orders(L, C, per_query, sinks=8, recent=4, chunk=256, sketch=48, seed=0,
                     blend=None):
    """ChunkPress(CompactorPress): each chunk its own first `sinks` and last `recent` tokens
    protected, and between them blend * z(leverage) + z(non-causal attention) of that middle
    (test_compactor's check on its rows; kvpress, L.rope: the middle's queries at the positions
    of tokens T - n + sinks ..., the slice of the whole prompt's position embeddings that
    CompactorPress passes on). blend is 1 - f at share f: a function of f."""
    pre = pre_rope_keys(L.t, L.K)
    V = L.t.read("V", L.layer, dtype="float32").astype(np.float64)
    parts = {}
    for a, n in chunks(L.T, C):
        left = min(sinks, n)
        right = min(recent, n - left)
        s0, s1 = a + left, a + n - right
        lev = znorm(leverage(pre[:, s0:s1], L.layer, sketch, seed))
        q = L.turned(s0, s1 - s0, L.T - n + left)
        att = nca_scores(q, L.K[:, s0:s1], V[:, s0:s1], chunk, per_query)
        parts[a] = (n, left, right, lev, att)

    def at(f):
        bl = 1.0 - f if blend is None else blend
        out = {}
        for a, (n, left, right, lev, att) in parts.items():
            hs = []
            for h in range(att.shape[0]):
                s = np.full(n, np.inf)
                s[left:n - right] = bl * lev[h // L.G if per_query else h] + att[h]
                hs.append(sorted(range(n), key=lambda j: (-s[j], j)))
            out[a] = hs
        return out
    return at


def kept(orders, T, C, head, f):
    s = set()
    for a, n in chunks(T, C):
        s |= set(a + j for j in orders[a][head][:chunk_keep(n, f)])
    return s


def compare(name, path, spec, budgets, C, orders_of, work, turn):
    """Every exported kept set of SPEC against the check; the check's sets by layer."""
    exp = replay_export(path, spec, budgets, work)
    pairs, sets = [], {}
    with kvtrace.open(path) as t:
        T = t.header["n_tokens"]
        frac = shares_by_tokens(budgets, T)
        cache = {}
        for r in exp["records"]:
            layer = r["layer"]
            if layer not in cache:
                cache.clear()
                cache[layer] = orders_of(Layer(t, layer, turn))
            f = frac[r["budget_tokens"]]
            o = cache[layer]  # (a function of the share for a ranking per budget)
            want = kept(o(f) if callable(o) else o, T, C, r["head"], f)
            sets[(layer, r["head"], r["budget_tokens"])] = want
            pairs.append((r, want))
    check_sets(name, spec, pairs, budgets)
    return sets


def main():
    work = tempfile.mkdtemp(prefix="kvt_chunk_scores_")
    a, s = score_traces(work, q_all=True)
    vl = os.path.join(work, "vl.kvt")
    run("synth", "--shape", "tiny-vl", "--tokens", "120", "--q-all", "-o", vl)
    for path, name, budgets, cases in (
            (a, "llama2c", "10%,25%,37%,50%,40", [
                ("snapkv:window=8,kernel=5,chunk_length=40", 40,
                 lambda L: snapkv_orders(L, 40, 8, 5, False)),
                ("snapkv:window=5,kernel=3,heads=query,chunk_length=32", 32,
                 lambda L: snapkv_orders(L, 32, 5, 3, True)),
                # a window longer than the 8 stored window queries: Q_all has them
                ("snapkv:window=12,kernel=5,chunk_length=50", 50,
                 lambda L: snapkv_orders(L, 50, 12, 5, False)),
                ("tova:chunk_length=32", 32, lambda L: tova_orders(L, 32, L.Hkv)),
                ("tova:chunk_length=64,heads=query", 64, lambda L: tova_orders(L, 64, L.Hq))]),
            (s, "llama3-8b", "10%,30%,64,50%", [
                ("snapkv:window=32,kernel=5,chunk_length=128", 128,
                 lambda L: snapkv_orders(L, 128, 32, 5, False)),
                ("tova:chunk_length=100", 100, lambda L: tova_orders(L, 100, L.Hkv))]),
            (vl, "tiny-vl", "10%,30%,24", [
                ("snapkv:window=8,kernel=3,chunk_length=50", 50,
                 lambda L: snapkv_orders(L, 50, 8, 3, False))])):
        for spec, C, fn in cases:
            own = compare(name, path, spec + ",chunk_scores=own", budgets, C, fn, work, False)
            kvp = compare(name, path, spec + ",chunk_scores=kvpress", budgets, C, fn, work, True)
            differ = sum(own[k] != kvp[k] for k in own)
            print("  %s %s: the rotation changes %d of %d sets" % (name, spec, differ, len(own)))
            check(differ > 0, "%s %s: own and kvpress keep the same sets" % (name, spec))

    # scores from the keys alone: the two modes are the same
    for path, name, budgets in ((a, "llama2c", "10%,25%,37%,50%,40"), (s, "llama3-8b", "10%,64")):
        for spec, C, fn in (
                ("keydiff:chunk_length=32", 32, lambda L: keydiff_orders(L, 32, False)),
                ("keydiff:chunk_length=50,heads=query", 50, lambda L: keydiff_orders(L, 50, True)),
                ("keydiff:chunk_length=40,window=3", 40,
                 lambda L: keydiff_orders(L, 40, False, 3)),
                ("knorm:chunk_length=32,window=4", 32, lambda L: knorm_orders(L, 32, False, 4))):
            for mode in ("own", "kvpress"):
                compare(name, path, "%s,chunk_scores=%s" % (spec, mode), budgets, C, fn, work,
                        False)
    # expected-attention: each chunk's queries' statistics at the positions after it (own) or
    # at n, n + 1, ... (kvpress)
    for path, name, budgets, cases in (
            (a, "llama2c", "10%,25%,50%,40", [
                ("expected-attention:chunk_length=40", 40, {}),
                ("expected-attention:chunk_length=64,heads=query,future=3,sinks=2", 64,
                 {"per_query": True, "future": 3, "sinks": 2}),
                ("expected-attention:chunk_length=50,cov=0,window=3", 50,
                 {"cov": False, "W": 3})]),
            (s, "llama3-8b", "10%,64", [("expected-attention:chunk_length=128", 128, {})]),
            (vl, "tiny-vl", "10%,30%", [("expected-attention:chunk_length=50", 50, {})])):
        for spec, C, kw in cases:
            per_query = kw.pop("per_query", False)
            for mode in ("own", "kvpress"):
                compare(name, path, "%s,chunk_scores=%s" % (spec, mode), budgets, C,
                        lambda L, m=mode, pq=per_query, kw=kw: ea_orders(
                            L, C, m == "kvpress", pq, **kw), work, False)
    # leverage: each key's leverage among its chunk's pre-RoPE keys
    for path, name, budgets in ((a, "llama2c", "10%,25%,40"), (s, "llama3-8b", "10%,64")):
        for spec, C, kw in (
                ("leverage:sketch=0,chunk_length=40", 40, {"sketch": 0, "seed": 0}),
                ("leverage:sketch=3,seed=5,chunk_length=64,heads=query", 64,
                 {"sketch": 3, "seed": 5, "per_query": True}),
                ("leverage:sketch=0,chunk_length=50,window=2", 50,
                 {"sketch": 0, "seed": 0, "W": 2})):
            pq = kw.pop("per_query", False)
            compare(name, path, spec + ",chunk_scores=own", budgets, C,
                    lambda L, pq=pq, kw=kw, C=C: leverage_orders(L, C, pq, **kw), work, False)
    # compactor: each chunk its own protected tokens, leverage and non-causal attention, one
    # ranking per budget (blend = the compression ratio); kvpress turns the middle's queries
    for path, name, budgets, cases in (
            (a, "llama2c", "10%,25%,37%,40", [
                ("compactor:chunk_length=40", 40, {}),
                ("compactor:chunk_length=64,heads=query,sketch=0,chunk=16", 64,
                 {"per_query": True, "sketch": 0, "chunk": 16})]),
            (s, "llama3-8b", "10%,30%,64", [
                ("compactor:chunk_length=100,blend=0.5,sinks=2,recent=8,seed=3,sketch=8", 100,
                 {"blend": 0.5, "sinks": 2, "recent": 8, "seed": 3, "sketch": 8})]),
            (vl, "tiny-vl", "10%,30%,24", [("compactor:chunk_length=50", 50, {})])):
        for spec, C, kw in cases:
            pq = kw.pop("per_query", False)
            sets = [compare(name, path, "%s,chunk_scores=%s" % (spec, mode), budgets, C,
                            lambda L, pq=pq, kw=kw, C=C: compactor_orders(L, C, pq, **kw), work,
                            mode == "kvpress") for mode in ("own", "kvpress")]
            differ = sum(sets[0][k] != sets[1][k] for k in sets[0])
            print("  %s %s: the rotation changes %d of %d sets" % (name, spec, differ,
                                                                    len(sets[0])))
            check(differ > 0,
                  "%s %s: own and kvpress keep the same sets" % (name, spec))
    # lagkv: each chunk its own sinks, partitions and tail (a chunk of 20 under sinks + 2 lag:
    # its sinks, then its most recent)
    for path, name, budgets in ((a, "llama2c", "10%,25%,40"), (s, "llama3-8b", "10%,64")):
        for spec, C, kw in (
                ("lagkv:lag=8,chunk_length=40", 40, {"lag": 8}),
                ("lagkv:lag=4,sinks=2,cross=1,heads=query,chunk_length=64", 64,
                 {"lag": 4, "sinks": 2, "cross": True, "per_query": True}),
                ("lagkv:lag=16,chunk_length=50", 50, {"lag": 16})):
            pq = kw.pop("per_query", False)
            compare(name, path, spec + ",chunk_scores=own", budgets, C,
                    lambda L, pq=pq, kw=kw, C=C: lagkv_orders(L, C, pq, **kw), work, False)
    # cur: each chunk its own blocks of `local` tokens (from the chunk's start), sum and sinks
    for path, name, budgets in ((a, "llama2c", "10%,25%,40"), (s, "llama3-8b", "10%,64")):
        for spec, C, kw in (
                ("cur:chunk_length=40", 40, {}),
                ("cur:leverage=kv_avg,local=6,sinks=2,heads=query,chunk_length=64", 64,
                 {"lev": "kv_avg", "local": 6, "sinks": 2, "per_query": True}),
                ("cur:leverage=key,local=0,chunk_length=50", 50, {"lev": "key", "local": 0})):
            pq = kw.pop("per_query", False)
            compare(name, path, spec + ",chunk_scores=own", budgets, C,
                    lambda L, pq=pq, kw=kw, C=C: cur_orders(L, C, pq, **kw), work, False)
    # streamingllm: each chunk its own sinks and most recent tokens
    for spec, C, S in (("streamingllm:chunk_length=40", 40, 4),
                       ("streamingllm:chunk_length=32,sinks=2,heads=query", 32, 2)):
        budgets = "10%,25%,37%,50%,40"
        frac = shares_by_tokens(budgets, 150)
        exp = replay_export(a, spec + ",chunk_scores=own", budgets, work)
        check_sets("llama2c", spec + ",chunk_scores=own", [
            (r, streaming_kept(150, C, S, frac[r["budget_tokens"]])) for r in exp["records"]],
            budgets)
    # knorm without a window: chunk_scores=own is the whole prompt's ranking
    one = replay_export(a, "knorm:chunk_length=32", "10%,40", work)["records"]
    two = replay_export(a, "knorm:chunk_length=32,chunk_scores=own", "10%,40", work)["records"]
    check([r["kept"] for r in one] == [r["kept"] for r in two],
          "knorm: chunk_scores=own differs from the prompt's ranking")

    R = ["replay", a, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    refused(R + ["snapkv:chunk_scores=own"],
            "snapkv: chunk_scores= is an option of chunk_length=, which is off (give "
            "chunk_length=N)")
    refused(R + ["h2o:chunk_length=32,chunk_scores=own"],
            "h2o: chunk_scores=own: each chunk scored as a prompt of its own is replayed for "
            "snapkv, tova, keydiff, expected-attention, leverage, compactor, lagkv, cur, "
            "streamingllm, knorm and vnorm; give chunk_scores=prompt")
    refused(R + ["snapkv:chunk_length=32,chunk_scores=chunk"],
            "snapkv: chunk_scores=chunk: expected prompt, own or kvpress")
    refused(R + ["snapkv:window=8,chunk_length=8,chunk_scores=own"],
            "chunk_scores=own: chunk_length=8: scoring each chunk on its own needs chunks longer "
            "than window=8 (kvpress fails on such chunks too)")
    refused(R + ["snapkv:window=8,chunk_length=49,chunk_scores=kvpress"],
            "chunk_scores=kvpress: chunk_length=49 leaves a last chunk of 3 tokens, and scoring it "
            "on its own needs more than window=8 (kvpress fails on such a chunk too): choose a "
            "chunk_length that leaves more, or a smaller window")
    refused(R + ["tova:chunk_length=149,chunk_scores=own"],
            "chunk_scores=own: chunk_length=149 leaves a last chunk of 1 token, and scoring it on "
            "its own needs more than window=1")
    refused(R + ["streamingllm:chunk_length=32,sinks=22,chunk_scores=own"],
            "chunk_length=32 leaves a last chunk of 22 tokens, and scoring it on its own needs "
            "more than sinks=22 (kvpress fails on such a chunk too): choose a chunk_length that "
            "leaves more, or a smaller sinks")
    refused(R + ["compactor:chunk_length=12,chunk_scores=kvpress"],
            "chunk_scores=kvpress: chunk_length=12: scoring each chunk on its own needs chunks "
            "longer than sinks+recent=12 (kvpress fails on such chunks too)")
    refused(R + ["compactor:chunk_length=46,sinks=6,recent=6,chunk_scores=own"],
            "chunk_length=46 leaves a last chunk of 12 tokens, and scoring it on its own needs "
            "more than sinks+recent=12")
    crit = os.path.join(work, "crit.npy")
    np.save(crit, np.ones((5, 4, 150), dtype=np.float32))
    refused(R + ["keydiff:chunk_length=32,chunk_scores=own,critical=" + crit],
            "keydiff: chunk_scores= scores each chunk on its own, and critical= weighs the "
            "scores of the whole prompt (give one of them)")
    b = os.path.join(work, "b.kvt")  # no Q_all
    run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--tokens", "100", "--decode", "0", "--window", "8", "-o", b)
    refused(["replay", b, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
             "--policies", "snapkv:window=8,chunk_length=30,chunk_scores=own"],
            "policy snapkv:window=8,chunk_length=30,chunk_scores=own needs every prompt query "
            "(Q_all)")
    finish("test_chunk_scores", work)


if __name__ == "__main__":
    main()
