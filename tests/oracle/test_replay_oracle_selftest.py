#!/usr/bin/python3
"""test_replay_oracle_selftest.py - checks the NumPy replay oracle itself on hand-worked cases
(exact kept indices and metric values worked out on paper from POLICIES.md), plus a plain-loop
re-implementation of §0.1 + SnapKV selection on random data.

Needs only NumPy; the last test (the CLI on a tiny trace) also needs libkvtrace.so and is
skipped without it. Exit 0 pass, 1 fail, 77 no NumPy.
"""
import json
import math
import os
import sys
import tempfile
import unittest

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import replay_oracle as O  # noqa: E402


def layer(K, V=None, Qw=None, **kw):
    K = np.asarray(K, dtype=np.float64)
    if K.ndim == 2:
        K = K[None]
    if V is None:
        V = np.ones_like(K)
    V = np.asarray(V, dtype=np.float64)
    if V.ndim == 2:
        V = V[None]
    Qw = np.asarray(Qw, dtype=np.float64)
    return O.LayerInputs(K, V, Qw, **kw)


def head_dicts(ctx, spec, B, layer_idx=0, n_layers=1, probes=256):
    """the per-head dicts (kept set and metrics) of one policy and budget"""
    res = O.replay_layer(None, None, None, policies=[spec], budgets=[B], ctx=ctx,
                         layer=layer_idx, n_layers=n_layers, coverage_probes=probes)
    (_, by_b), = res.items()
    return by_b[B]


def kept(ctx, spec, B, layer_idx=0, n_layers=1):
    """kept sets of every head for one policy and budget"""
    return [h["kept"] for h in head_dicts(ctx, spec, B, layer_idx, n_layers)]


# K[0,:,0] = [0,3,1,2,0,0,0,0], D = 1, all window queries q = 1 (scale 1): the prefix shares
# of every window query are proportional to exp(k) = [1, 20.09, 2.72, 7.39, 1, 1].
K8 = np.array([0, 3, 1, 2, 0, 0, 0, 0], dtype=np.float64).reshape(1, 8, 1)


def ctx8(Qw=None, Hq=1):
    if Qw is None:
        Qw = np.ones((Hq, 2, 1))
    return layer(K8, np.ones((1, 8, 1)), Qw)


class Primitives(unittest.TestCase):
    def test_avgpool_count_include_pad(self):
        np.testing.assert_allclose(O.pool1d([0, 0, 3, 0, 0, 0], 3), [0, 1, 1, 1, 0, 0])
        np.testing.assert_allclose(O.pool1d([3, 0, 0, 0], 3), [1, 1, 0, 0])  # edge damped
        np.testing.assert_allclose(O.pool1d([6, 3, 0], 5), [1.8, 1.8, 1.8])   # divisor k
        np.testing.assert_allclose(O.pool1d([2, 7], 1), [2, 7])

    def test_maxpool_ignores_padding(self):
        np.testing.assert_allclose(O.pool1d([1, 5, 2, 0, 3], 3, "max"), [5, 5, 5, 3, 3])
        np.testing.assert_allclose(O.pool1d([-1, -2, -3], 3, "max"), [-1, -1, -2])

    def test_window_probs_mask_inside_window_only(self):
        ctx = layer(np.zeros((1, 4, 1)), None, np.ones((1, 2, 1)))
        # query 0 sits at position 2 (sees 0..2), query 1 at position 3 (sees all)
        np.testing.assert_allclose(ctx.Pw[0, 0], [1 / 3, 1 / 3, 1 / 3, 0])
        np.testing.assert_allclose(ctx.Pw[0, 1], [1 / 4] * 4)
        # window mean over the last W queries, prefix only, no renormalisation
        np.testing.assert_allclose(O.window_scores(ctx.Pw, 2)[0], [7 / 24, 7 / 24])
        np.testing.assert_allclose(O.window_scores(ctx.Pw, 1)[0], [1 / 4] * 3)

    def test_gqa_reduce_before_pool(self):
        a = np.array([[3.0, 0, 0], [0, 0, 3.0]])
        s = O.reduce_heads(a, 1, "mean")
        np.testing.assert_allclose(s, [[1.5, 0, 1.5]])
        np.testing.assert_allclose(O.pool1d(s, 3), [[0.5, 1.0, 0.5]])
        np.testing.assert_allclose(O.reduce_heads(a, 1, "max"), [[3, 0, 3]])
        # repeat_kv layout: query heads 0,1 -> kv 0; 2,3 -> kv 1
        self.assertEqual(list(O.group_of(4, 2)), [0, 0, 1, 1])

    def test_redundancy(self):
        self.assertAlmostEqual(O.head_redundancy(np.eye(2)), 0.0)
        self.assertAlmostEqual(O.head_redundancy(np.array([[1.0, 0], [2.0, 0]])), 1.0)
        self.assertAlmostEqual(O.head_redundancy(np.array([[1.0, 0], [-1.0, 0]])), -1.0)
        # e1, e2, e1: m = (2 e1 + e2)/3, |m|^2 = 5/9, r = (3*5/9 - 1)/2 = 1/3
        self.assertAlmostEqual(O.head_redundancy(np.array([[1.0, 0], [0, 3.0], [2.0, 0]])),
                               1 / 3)
        self.assertIsNone(O.head_redundancy(np.array([[1.0, 0]])))

    def test_budget_parsing(self):
        self.assertEqual(O.resolve_budget("10%", 448), 45)
        self.assertEqual(O.resolve_budget("0.1%", 100), 1)
        self.assertEqual(O.resolve_budget(64, 10), 64)
        self.assertEqual(O.split_policy_list("snapkv:kernel=7,pool=max,adakv,h2o:window=8"),
                         ["snapkv:kernel=7,pool=max", "adakv", "h2o:window=8"])
        lbl, name, o = O.parse_policy("adakv:alpha=0.5,normalize=0")
        self.assertEqual((name, o["alpha"], o["normalize"], o["window"]), ("adakv", 0.5, 0, 32))
        with self.assertRaises(ValueError):
            O.parse_policy("snapkv:bogus=1")


class SnapKV(unittest.TestCase):
    def test_kernel1(self):
        c = ctx8()
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 4), [[1, 3, 6, 7]])
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 3), [[1, 6, 7]])

    def test_avgpool3(self):
        # p = [7.03, 7.94, 10.07, 3.70, 3.13, 0.67] (x const): top-2 = {2, 1}
        self.assertEqual(kept(ctx8(), "snapkv:window=2,kernel=3", 4), [[1, 2, 6, 7]])

    def test_maxpool3_tie_lower_index(self):
        # p = [20.1, 20.1, 20.1, 7.4, 7.4, 1]: a three-way tie, the lower indices win
        self.assertEqual(kept(ctx8(), "snapkv:window=2,kernel=3,pool=max", 4), [[0, 1, 6, 7]])

    def test_equal_scores(self):
        c = layer(np.zeros((1, 8, 1)), None, np.ones((1, 2, 1)))
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 4), [[0, 1, 6, 7]])
        # avgpool damps the two edge tokens: [2/3, 1, 1, 1, 1, 2/3]
        self.assertEqual(kept(c, "snapkv:window=2,kernel=3", 4), [[1, 2, 6, 7]])

    def test_short_prompt_and_below_window(self):
        c = ctx8()
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 9), [list(range(8))])
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 8), [list(range(8))])
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 1), [[7]])
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 2), [[6, 7]])

    def test_gqa_mean_and_query_heads(self):
        # query head 0 likes large k (q=+1), head 1 small k (q=-1); one KV head.
        # group mean s = [.1143, .2945, .0759, .1203, .1143, .1143]
        Qw = np.stack([np.ones((2, 1)), -np.ones((2, 1))])
        c = ctx8(Qw)
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 4), [[1, 3, 6, 7]])
        # the 3rd pick is a three-way exact tie (k = 0 at 0, 4, 5): lower index
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 5), [[0, 1, 3, 6, 7]])
        # per query head: head 0 -> {1, 3}; head 1 -> k = 0 tie -> {0, 4}
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1,heads=query", 4),
                         [[1, 3, 6, 7], [0, 4, 6, 7]])

    def test_loop_reference(self):
        """A plain-loop implementation of §0.1 + top-b (written separately) agrees."""
        rng = np.random.default_rng(5)
        Hq, Hkv, N, D, Wt = 4, 2, 24, 4, 8
        K = rng.standard_normal((Hkv, N, D))
        Qw = rng.standard_normal((Hq, Wt, D)) * 1.5
        c = layer(K, None, Qw)
        for W in (4, 8):
            for k, pool in ((1, "avg"), (5, "avg"), (3, "max"), (5, "max")):
                nP = N - W
                a = [[0.0] * nP for _ in range(Hq)]
                for h in range(Hq):
                    g = h // (Hq // Hkv)
                    for i in range(Wt - W, Wt):
                        pos = N - Wt + i
                        z = [sum(Qw[h, i, d] * K[g, j, d] for d in range(D)) / math.sqrt(D)
                             if j <= pos else None for j in range(N)]
                        mx = max(x for x in z if x is not None)
                        e = [math.exp(x - mx) if x is not None else 0.0 for x in z]
                        tot = sum(e)
                        for j in range(nP):
                            a[h][j] += e[j] / tot / W
                for g in range(Hkv):
                    s = [sum(a[h][j] for h in range(2 * g, 2 * g + 2)) / 2 for j in range(nP)]
                    p = []
                    for j in range(nP):
                        win = [s[j + t] if 0 <= j + t < nP else None
                               for t in range(-(k // 2), k // 2 + 1)]
                        if pool == "avg":
                            p.append(sum(x for x in win if x is not None) / k)
                        else:
                            p.append(max(x for x in win if x is not None))
                    rank = sorted(range(nP), key=lambda j: (-p[j], j))
                    for B in (W, W + 1, W + 5, N - 1):
                        want = sorted(rank[:B - W] + list(range(N - W, N)))
                        got = kept(c, "snapkv:window=%d,kernel=%d,pool=%s" % (W, k, pool), B)[g]
                        self.assertEqual(got, want, (W, k, pool, B, g))


class Pyramid(unittest.TestCase):
    def test_schedule(self):
        self.assertEqual(O.pyramid_budgets(64, 8, 200, 4, 20), [110, 74, 38, 2])
        # max_num >= N - W: capped at N - W = 92, min = 2*56 - 92 = 20, steps 24
        self.assertEqual(O.pyramid_budgets(64, 8, 100, 4, 20), [92, 68, 44, 20])
        # KVCache-Factory: N < 2*base -> uniform base
        self.assertEqual(O.pyramid_budgets(64, 8, 100, 4, 20, fallback=True), [56] * 4)
        self.assertEqual(O.pyramid_budgets(64, 8, 200, 4, 20, fallback=True), [110, 74, 38, 2])
        self.assertEqual(O.pyramid_budgets(64, 8, 100, 1, 20), [56])

    def test_layer_counts(self):
        rng = np.random.default_rng(1)
        c = layer(rng.standard_normal((2, 100, 4)), None, rng.standard_normal((2, 8, 4)))
        # B = 24, W = 8, N = 100, L = 4, beta 20: base 16, min 0, max 32, steps 10
        self.assertEqual(O.pyramid_budgets(24, 8, 100, 4, 20), [32, 22, 12, 2])
        for l, b in enumerate([32, 22, 12, 2]):
            ks = kept(c, "pyramidkv:window=8", 24, layer_idx=l, n_layers=4)
            self.assertEqual([len(x) for x in ks], [8 + b] * 2)
            self.assertTrue(all(x[-8:] == list(range(92, 100)) for x in ks))


class AdaKV(unittest.TestCase):
    P2 = np.array([[.6, .5, .4, .3, .2, .1], [.45] * 6])

    def test_caps_plain(self):
        # global top-4: .6 .5 (head 0), .45 .45 (head 1) -> n = [2, 2]; round(1.6 + 0) = 2
        self.assertEqual(list(O.adakv_caps(self.P2, 2, 0.2, normalize=False)), [2, 2])

    def test_caps_normalize(self):
        # w0 = 1.1/2.1, w1 = 0.9/2.7: head 0 -> .314 .262 .210 .157 ..., head 1 -> .15 each:
        # n = [4, 0] -> caps [round(3.2), round(0)] = [3, 0]
        self.assertEqual(list(O.adakv_caps(self.P2, 2, 0.2, normalize=True)), [3, 0])

    def test_floor_term_and_clip(self):
        p = np.stack([np.linspace(1, .5, 12), np.linspace(.4, .1, 12)])
        # b = 10: 20 picks, all 12 of head 0 -> n = [12, 8]; floor(0.2*10) = 2:
        # round(9.6 + 2) = 12 (= |P|), round(6.4 + 2) = 8
        self.assertEqual(list(O.adakv_caps(p, 10, 0.2, normalize=False)), [12, 8])

    def test_round_half_even(self):
        p = np.array([[.9, .8, .7, .1, .1, .1], [.75, .05, .05, .05, .05, .05]])
        # alpha .5, b = 2: n = [3, 1]; 1.5 + 1 = 2.5 -> 2 and 0.5 + 1 = 1.5 -> 2 (torch.round)
        self.assertEqual(list(O.adakv_caps(p, 2, 0.5, normalize=False)), [2, 2])

    def test_no_compression_and_skip(self):
        self.assertIsNone(O.adakv_caps(self.P2, 7, 0.2))
        self.assertEqual(list(O.adakv_caps(self.P2, 2, 0.2, layer=0, skip=1)), [2, 2])

    def test_kept_sets(self):
        # two KV heads, one query head each, D = 1, N = 8, W = 2, kernel 1
        K = np.array([[0, 3, 1, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], float)[..., None]
        c = layer(K, None, np.ones((2, 2, 1)))
        # head 0: a = .0288 e^k = [.029, .579, .078, .213, .029, .029], w0 = .792/.957 = .828
        #   -> .479 .176 .065 .024 ...; head 1 flat: a = (1/7 + 1/8)/2 = .134, w1 = 1/3 -> .045.
        # global top 4 (b = 2, H*b = 4): .479 .176 .065 (head 0), .045 (head 1) -> n = [3, 1]
        # -> caps [round(2.4), round(0.8)] = [2, 1]; head 1's pick is a tie -> token 0
        ks = kept(c, "adakv:window=2,kernel=1", 4)
        self.assertEqual(ks, [[1, 3, 6, 7], [0, 6, 7]])
        # without normalize: head 1's .134 beats head 0's .078: n = [2, 2] -> caps [2, 2]
        ks = kept(c, "adakv:window=2,kernel=1,normalize=0", 4)
        self.assertEqual(ks, [[1, 3, 6, 7], [0, 1, 6, 7]])


class MixKV(unittest.TestCase):
    def test_identical_directions_rank_by_index(self):
        # all keys are positive multiples of e1: r = 1 exactly, delta constant -> d' = 0, so
        # the composite is 0 everywhere and the lower indices win, whatever the attention
        K = np.array([1, 3, 2, 5, 1, 4, 1, 1], float).reshape(1, 8, 1)
        c = layer(K, None, np.ones((1, 2, 1)))
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 4), [[3, 5, 6, 7]])
        self.assertEqual(kept(c, "mixkv-snapkv:window=2,kernel=1", 4), [[0, 1, 6, 7]])

    def test_vnorm_term(self):
        # keys +1/-1 alternate: m = 0, r = -1/7 -> clamped to 0, delta = 0: c = p + v'.
        # p ∝ e at even j, 1/e at odd j; V[3] = 10 is the only non-minimal norm:
        # v'[3] = 1 * mean(p)/(1/6) ≈ 9.26 (x const) -> picks 3, then 0 (even, lower index)
        K = np.array([1, -1, 1, -1, 1, -1, 1, -1], float).reshape(1, 8, 1)
        V = np.ones((1, 8, 1))
        V[0, 3, 0] = 10
        c = layer(K, V, np.ones((1, 2, 1)))
        self.assertEqual(kept(c, "snapkv:window=2,kernel=1", 4), [[0, 2, 6, 7]])
        self.assertEqual(kept(c, "mixkv-snapkv:window=2,kernel=1", 4), [[0, 3, 6, 7]])
        self.assertEqual(kept(c, "mixkv-snapkv:window=2,kernel=1,clamp_r=0", 4), [[0, 3, 6, 7]])
        _, r = O.mixkv_composite(np.ones(6), K[0], V[0], 2, clamp_r=False)
        self.assertAlmostEqual(r, -1 / 7)

    def test_composite_formula(self):
        rng = np.random.default_rng(3)
        N, W, D = 12, 3, 4
        K, V, p = rng.standard_normal((N, D)), rng.standard_normal((N, D)), rng.random(N - W)
        c, r = O.mixkv_composite(p, K, V, W, clamp_r=False)
        # the formula term by term, in plain Python
        nP = N - W
        u = [math.sqrt(sum(x * x for x in V[j])) for j in range(nP)]
        uh = [(x - min(u)) / (max(u) - min(u)) for x in u]
        mp = sum(p) / nP
        vp = [x * mp / (sum(uh) / nP + 1e-8) for x in uh]
        kh = [K[t] / math.sqrt(sum(x * x for x in K[t])) for t in range(N)]
        m = sum(kh) / N
        dl = [-float(np.dot(kh[j], m)) for j in range(nP)]
        dh = [(x - min(dl)) / (max(dl) - min(dl) + 1e-8) for x in dl]
        dp = [x * mp / (sum(dh) / nP + 1e-8) for x in dh]
        rr = (N * float(np.dot(m, m)) - 1) / (N - 1)
        want = [rr * dp[j] + (1 - rr) * (p[j] + vp[j]) for j in range(nP)]
        self.assertAlmostEqual(r, rr)
        np.testing.assert_allclose(c, want, rtol=1e-12)


class OtherPolicies(unittest.TestCase):
    def test_streamingllm(self):
        c = layer(np.zeros((1, 20, 1)), None, np.ones((1, 2, 1)))
        self.assertEqual(kept(c, "streamingllm", 8), [[0, 1, 2, 3, 16, 17, 18, 19]])
        self.assertEqual(kept(c, "streamingllm:sinks=2", 8), [[0, 1] + list(range(14, 20))])
        self.assertEqual(kept(c, "streamingllm", 3), [[0, 1, 2]])
        self.assertEqual(kept(c, "streamingllm", 30), [list(range(20))])

    def test_h2o(self):
        cs = np.array([[1, 5, 2, 0, 3, 0, 0, 0], [1, 1, 4, 0, 3, 0, 0, 0]], float)
        c = layer(np.zeros((1, 8, 1)), None, np.ones((2, 2, 1)), colsum=cs)
        # group mean [1, 3, 3, 0, 3 | ...]: a three-way tie at 3 -> 1, 2
        self.assertEqual(kept(c, "h2o:window=2", 4), [[1, 2, 6, 7]])
        self.assertEqual(kept(c, "h2o:window=2,heads=query", 4), [[1, 4, 6, 7], [2, 4, 6, 7]])
        self.assertEqual(kept(c, "h2o:window=2,reduce=max", 3), [[1, 6, 7]])

    def test_lookm(self):
        # test_replay_policies.c's case: group means 5, 1, 3, 3, 4.5, 4.5, 1, 1, tokens 2..5
        # image; the text prior ranks 0, 1, 6, 7, then 4, 5, 2, 3; floor(B/2) recent tokens
        cs = np.array([[5, 1, 3, 3, 0, 0, 2, 1], [5, 1, 3, 3, 9, 9, 0, 1]], float)
        mod = np.array([0, 0, 1, 1, 1, 1, 0, 0])
        c = layer(np.zeros((1, 8, 1)), None, np.ones((2, 1, 1)), colsum=cs, modality=mod)
        for B, want in ((2, [0, 7]), (4, [0, 1, 6, 7]), (5, [0, 1, 4, 6, 7]),
                        (7, [0, 1, 2, 4, 5, 6, 7]), (8, list(range(8)))):
            self.assertEqual(kept(c, "lookm:merge=none", B), [want])
        self.assertEqual(kept(c, "lookm:merge=none,recent_share=0", 2), [[0, 1]])
        self.assertEqual(kept(c, "lookm:merge=none,recent_share=1", 4), [[4, 5, 6, 7]])
        self.assertEqual(kept(c, "lookm:merge=none,recent_share=0,heads=query", 3),
                         [[0, 1, 6], [0, 1, 7]])
        c = layer(np.zeros((1, 8, 1)), None, np.ones((2, 1, 1)), colsum=cs)
        self.assertEqual(kept(c, "lookm:merge=none", 4), [[0, 4, 6, 7]])  # all text: H2O
        with self.assertRaises(ValueError):  # the oracle does not merge
            kept(c, "lookm", 4)

    def test_cake_counts(self):
        # test_replay_policies.c's hand-worked budgets: prefix 90, (60 - 10) x L to split
        self.assertEqual(O.cake_counts([1, 1, 1, 7], 50, 90), [37, 37, 36, 90])
        self.assertEqual(O.cake_counts([1, 2, 4], 50, 90), [22, 43, 85])
        self.assertEqual(O.cake_counts([0, 0, 0], 50, 90), [50, 50, 50])

    def test_vlcache_counts(self):
        # test_replay_policies.c's hand-worked layer budgets
        self.assertEqual(O.vlcache_counts([0.5, 0.25, 0.25], 100, 40), [60, 30, 30])
        self.assertEqual(O.vlcache_counts([0.9, 0.05, 0.05], 100, 60), [100, 40, 40])
        self.assertEqual(O.vlcache_counts([1, 1, 0.001], 100, 10), [15, 14, 1])
        self.assertEqual(O.vlcache_counts([9 / 21, 13 / 21], 8, 6), [5, 7])
        self.assertEqual(O.vlcache_counts([9 / 21, 13 / 21], 8, 8), [8, 8])
        self.assertEqual(O.vlcache_counts([9 / 21, 13 / 21], 8, 1), [1, 1])

    def test_vlcache_hand(self):
        # test_replay_metrics.c's trace: T = 8, image 2..4, post-vision queries 5, 6, 7 (1, 0)
        mod = [0, 0, 1, 1, 1, 0, 0, 0]
        ctxs = []
        for a in ([8, 0, 8, 0, 0, 8, 0, 0], [8, 8, 8, 8, 0, 0, 0, 8]):
            K = np.array([[[x, 0.0] for x in a]])
            ctxs.append(O.LayerInputs(K, np.ones((1, 8, 2)), np.tile([1.0, 0.0], (1, 3, 1)),
                                      modality=mod))
        o = O.parse_policy("vl-cache")[2]
        per = [O.vlcache_layer(c, o) for c in ctxs]
        self.assertAlmostEqual(per[0][0], 9 / 21, places=12)
        self.assertAlmostEqual(per[1][0], 13 / 21, places=12)
        self.assertEqual(list(O.stable_desc_order(per[0][1][0])), [0, 2, 5, 1, 3, 4, 6, 7])
        self.assertEqual(list(O.stable_desc_order(per[1][1][0])), [0, 1, 2, 3, 7, 4, 5, 6])
        self.assertEqual(O.vlcache_counts([per[0][0], per[1][0]], 8, 3), [2, 4])

    def test_full(self):
        c = ctx8()
        self.assertEqual(kept(c, "full", 3), [list(range(8))])


class Metrics(unittest.TestCase):
    def test_recall_and_error(self):
        # one window query at the last position, all logits 0: uniform 1/4; V = [1,1,3,3]
        c = layer(np.zeros((1, 4, 1)), np.array([1, 1, 3, 3], float).reshape(1, 4, 1),
                  np.zeros((1, 1, 1)))
        m = c.metrics([0], 0, np.array([0, 1]), 256)
        self.assertAlmostEqual(m["recall"], 0.5)
        self.assertAlmostEqual(m["err_window"], 0.5)  # o = 2, o_S = 1
        m = c.metrics([0], 0, np.array([0, 2]), 256)
        self.assertAlmostEqual(m["recall"], 0.5)
        self.assertAlmostEqual(m["err_window"], 0.0)  # o_S = (1+3)/2 = 2
        m = c.metrics([0], 0, np.arange(4), 256)
        self.assertEqual((m["recall"], m["err_window"]), (1.0, 0.0))
        self.assertIsNone(m["recall_decode"])

    def test_decode_with_decode_kv(self):
        # one decode query, logits 0 on 4 prompt keys and its own decode key: 1/5 each.
        # V = [1,1,3,3], v_dec = 5: o = 13/5; S = {0,1}: o_S = (2/5 + 1)/(3/5) = 7/3
        c = layer(np.zeros((1, 4, 1)), np.array([1, 1, 3, 3], float).reshape(1, 4, 1),
                  np.zeros((1, 1, 1)), Qd=np.zeros((1, 1, 1)), Kd=np.zeros((1, 1, 1)),
                  Vd=np.full((1, 1, 1), 5.0))
        m = c.metrics([0], 0, np.array([0, 1]), 256)
        self.assertAlmostEqual(m["recall_decode"], 3 / 5)
        self.assertAlmostEqual(m["err_decode"], 4 / 39)
        # without decode K/V: 1/4 each, o = 2, o_S = 1
        c = layer(np.zeros((1, 4, 1)), np.array([1, 1, 3, 3], float).reshape(1, 4, 1),
                  np.zeros((1, 1, 1)), Qd=np.zeros((1, 1, 1)))
        m = c.metrics([0], 0, np.array([0, 1]), 256)
        self.assertAlmostEqual(m["recall_decode"], 0.5)
        self.assertAlmostEqual(m["err_decode"], 0.5)

    def test_nothing_with_mass_kept(self):
        # the query at position 1 of 3 cannot see token 2: keeping only {2} gives error 1
        c = layer(np.zeros((1, 3, 1)), np.ones((1, 3, 1)), np.zeros((1, 2, 1)))
        m = c.metrics([0], 0, np.array([2]), 256)
        self.assertAlmostEqual(m["err_window"], (1.0 + 0.0) / 2)  # query 0: 1, query 1: 0
        self.assertAlmostEqual(m["recall"], (0 + 1 / 3) / 2)

    def test_coverage_and_redundancy(self):
        K = np.array([[1.0, 0], [0, 2.0], [3.0, 0]])
        c = layer(K, None, np.ones((1, 1, 2)))
        m = c.metrics([0], 0, np.array([0]), 256)
        self.assertAlmostEqual(m["coverage"], 2 / 3)  # cos = 1, 0, 1
        self.assertAlmostEqual(m["coverage_radius"], 1.0)
        self.assertAlmostEqual(m["r_all"], 1 / 3)
        self.assertIsNone(m["r_kept"])
        m = c.metrics([0], 0, np.array([0, 2]), 256)
        self.assertAlmostEqual(m["r_kept"], 1.0)
        # probes: n = min(2, 3) = 2 keys, j = floor(i*3/2) = 0, 1
        m = c.metrics([0], 0, np.array([0]), 2)
        self.assertAlmostEqual(m["coverage"], 0.5)

    def test_redundancy_by_modality(self):
        # text e1, 2e1, e1 + e2; image e2, -e2, 3e2: text all three sum to (2 + 1/sqrt2,
        # 1/sqrt2), ||.||^2 = 5 + 2 sqrt2, r = ((5 + 2 sqrt2)/3 - 1)/2; image e2 and -e2: -1
        K = np.array([[1.0, 0], [2.0, 0], [1, 1], [0, 1], [0, -1], [0, 3]])
        c = layer(K, None, np.ones((1, 1, 2)), modality=np.array([0, 0, 0, 1, 1, 1]))
        m = c.metrics([0], 0, np.array([0, 1, 2, 3, 4]), 256)["by_modality"]
        r_text = ((5 + 2 * np.sqrt(2)) / 3 - 1) / 2
        self.assertAlmostEqual(m["r_kept"]["text"], r_text)
        self.assertAlmostEqual(m["r_kept"]["image"], -1.0)
        self.assertIsNone(m["r_kept"]["video"])
        self.assertAlmostEqual(m["r_all"]["text"], r_text)
        self.assertAlmostEqual(m["r_all"]["image"], -1 / 3)  # e2, -e2, e2
        m = c.metrics([0], 0, np.array([0, 3]), 256)["by_modality"]  # one key of each
        self.assertIsNone(m["r_kept"]["text"])
        self.assertIsNone(m["r_kept"]["image"])

    def test_kv_head_metrics_average_the_group(self):
        rng = np.random.default_rng(9)
        c = layer(rng.standard_normal((1, 10, 3)), rng.standard_normal((1, 10, 3)),
                  rng.standard_normal((2, 4, 3)))
        S = np.array([1, 4, 8, 9])
        both = c.metrics([0, 1], 0, S, 256)
        each = [c.metrics([h], 0, S, 256) for h in (0, 1)]
        self.assertAlmostEqual(both["recall"], (each[0]["recall"] + each[1]["recall"]) / 2)
        self.assertAlmostEqual(both["err_window"],
                               (each[0]["err_window"] + each[1]["err_window"]) / 2)


class CoverageDropped(unittest.TestCase):
    K3 = np.array([[1.0, 0], [0, 2.0], [3.0, 0]])

    def test_hand_worked(self):
        c = layer(self.K3, None, np.ones((1, 1, 2)))
        # S = {0}: probes 0, 1, 2; dropped 1 (cos 0) and 2 (cos 1) -> 1/2
        m = c.metrics([0], 0, np.array([0]), 256)
        self.assertAlmostEqual(m["coverage_dropped"], 0.5)
        # S = {1}: dropped 0 and 2, both cos 0 -> 0
        self.assertAlmostEqual(c.metrics([0], 0, np.array([1]), 256)["coverage_dropped"], 0.0)
        # S = {0, 1}: only 2 is dropped, cos(k2, k0) = 1
        self.assertAlmostEqual(c.metrics([0], 0, np.array([0, 1]), 256)["coverage_dropped"],
                               1.0)
        # two probes (tokens 0, 1), S = {0}: only probe 1 is dropped -> 0
        self.assertAlmostEqual(c.metrics([0], 0, np.array([0]), 2)["coverage_dropped"], 0.0)
        # two probes, S = {0, 1}: token 2 is dropped but is no probe -> null
        self.assertIsNone(c.metrics([0], 0, np.array([0, 1]), 2)["coverage_dropped"])

    def test_null_when_nothing_dropped_or_nothing_kept(self):
        c = layer(self.K3, None, np.ones((1, 1, 2)))
        self.assertIsNone(c.metrics([0], 0, np.arange(3), 256)["coverage_dropped"])
        m = c.metrics([0], 0, np.array([], dtype=np.int64), 256)
        self.assertIsNone(m["coverage_dropped"])
        self.assertIsNone(m["coverage"])

    def test_full_budget_and_short_prompt(self):
        rng = np.random.default_rng(4)
        c = layer(rng.standard_normal((2, 12, 3)), None, rng.standard_normal((4, 4, 3)))
        for spec, B in (("full", 3), ("snapkv:window=4", 12), ("snapkv:window=4", 20),
                        ("streamingllm", 12)):
            for d in head_dicts(c, spec, B):
                self.assertEqual(d["n_keep"], 12)
                self.assertIsNone(d["coverage_dropped"], (spec, B))
        # a real budget drops some probes: a number in [-1, 1], at most coverage
        for d in head_dicts(c, "snapkv:window=4", 6):
            self.assertTrue(-1.0 <= d["coverage_dropped"] <= 1.0)
            self.assertLessEqual(d["coverage_dropped"], d["coverage"] + 1e-12)

    def test_identical_keys(self):
        # every key is the same direction: every cosine is 1 (to rounding)
        K = np.tile(np.array([0.3, -1.7, 2.2], np.float32), (2, 16, 1))
        rng = np.random.default_rng(6)
        c = layer(K, None, rng.standard_normal((2, 4, 3)))
        for spec in ("snapkv:window=4", "streamingllm", "knorm"):
            for d in head_dicts(c, spec, 6):
                self.assertAlmostEqual(d["coverage_dropped"], 1.0, places=6)
        # probes 0, 4, 8, 12 of 16; streamingllm B = 6 keeps 0..3, 14, 15: 3 dropped probes
        for d in head_dicts(c, "streamingllm", 6, probes=4):
            self.assertAlmostEqual(d["coverage_dropped"], 1.0, places=6)


class HeadOverlap(unittest.TestCase):
    def test_jaccard_helper(self):
        self.assertEqual(O.head_overlaps([[0, 1, 2, 3], [2, 3, 4, 5]]), [1 / 3, 1 / 3])
        # {0,1}, {0,1}, {2}: head 0 (1 + 0)/2, head 1 the same, head 2 (0 + 0)/2
        self.assertEqual(O.head_overlaps([[0, 1], [0, 1], [2]]), [0.5, 0.5, 0.0])
        # {0,1,2}, {1,2}, {2,3}: J01 = 2/3, J02 = 1/4, J12 = 1/3
        got = O.head_overlaps([[0, 1, 2], [1, 2], [2, 3]])
        np.testing.assert_allclose(got, [(2 / 3 + 1 / 4) / 2, (2 / 3 + 1 / 3) / 2,
                                         (1 / 4 + 1 / 3) / 2])
        self.assertEqual(O.head_overlaps([[], []]), [1.0, 1.0])
        self.assertEqual(O.head_overlaps([[0, 1]]), [None])

    def test_two_kv_heads_by_hand(self):
        # knorm (window 0) keeps the B smallest key norms: head 0 has small keys at 0..3,
        # head 1 at 2..5 -> {0,1,2,3} and {2,3,4,5}: Jaccard 2/6 for both heads
        K = np.array([[1, 1, 1, 1, 9, 9, 9, 9], [9, 9, 1, 1, 1, 1, 9, 9]], float)[..., None]
        c = layer(K, None, np.ones((2, 2, 1)))
        hs = head_dicts(c, "knorm", 4)
        self.assertEqual([d["kept"] for d in hs], [[0, 1, 2, 3], [2, 3, 4, 5]])
        self.assertEqual([d["head_overlap"] for d in hs], [1 / 3, 1 / 3])

    def test_query_heads_by_hand(self):
        # SnapKV.test_gqa_mean_and_query_heads: query heads keep {1,3,6,7} and {0,4,6,7}
        Qw = np.stack([np.ones((2, 1)), -np.ones((2, 1))])
        c = ctx8(Qw)
        hs = head_dicts(c, "snapkv:window=2,kernel=1,heads=query", 4)
        self.assertEqual([d["kept"] for d in hs], [[1, 3, 6, 7], [0, 4, 6, 7]])
        self.assertEqual([d["head_overlap"] for d in hs], [1 / 3, 1 / 3])
        # the same layer in kv granularity has one head (Hkv = 1): null
        self.assertEqual([d["head_overlap"] for d in head_dicts(c, "snapkv:window=2,kernel=1",
                                                                4)], [None])

    def test_same_set_for_every_head(self):
        rng = np.random.default_rng(8)
        c = layer(rng.standard_normal((2, 20, 3)), None, rng.standard_normal((4, 4, 3)))
        for spec in ("streamingllm", "streamingllm:heads=query", "tova", "full"):
            for B in (6, 30):
                hs = head_dicts(c, spec, B)
                self.assertEqual(len(hs), 4 if "query" in spec else 2)
                for d in hs:
                    self.assertEqual(d["head_overlap"], 1.0, (spec, B))

    def test_single_kv_head_is_null(self):
        rng = np.random.default_rng(10)
        c = layer(rng.standard_normal((1, 20, 3)), None, rng.standard_normal((4, 4, 3)))
        for spec in ("streamingllm", "snapkv:window=4", "knorm", "full"):
            self.assertEqual([d["head_overlap"] for d in head_dicts(c, spec, 8)], [None])
        # heads=query on the same layer: 4 heads, all numbers in [0, 1]
        hs = head_dicts(c, "snapkv:window=4,heads=query", 8)
        self.assertEqual(len(hs), 4)
        self.assertTrue(all(0.0 <= d["head_overlap"] <= 1.0 for d in hs))


class Cli(unittest.TestCase):
    def test_cli_on_a_tiny_trace(self):
        lib = os.environ.get("KVT_LIB")
        if not lib or not os.path.exists(lib):
            self.skipTest("KVT_LIB is not set: no libkvtrace.so to read traces with")
        kvtrace = O._import_kvtrace()
        rng = np.random.default_rng(2)
        L, Hq, Hkv, D, T, W = 2, 4, 2, 8, 40, 8
        hdr = {"format": "kvtrace", "model": {"name": "t", "arch": "llama", "n_layers": L,
               "n_q_heads": Hq, "n_kv_heads": Hkv, "head_dim": D}, "kv_dtype": "f32",
               "n_tokens": T, "window": W, "n_decode": 0}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "t.kvt")
            with kvtrace.TraceWriter(path, hdr) as w:
                for l in range(L):
                    w.append("K", rng.standard_normal((Hkv, T, D)).astype(np.float32), layer=l)
                    w.append("V", rng.standard_normal((Hkv, T, D)).astype(np.float32), layer=l)
                    w.append("Q_window", rng.standard_normal((Hq, W, D)).astype(np.float32),
                             layer=l)
            out = os.path.join(d, "o.json")
            self.assertEqual(O.main([path, "-o", out, "--policies",
                                     "snapkv:window=8,kernel=3,pool=max,streamingllm",
                                     "--budgets", "12,50%"]), 0)
            with open(out) as f:
                res = json.load(f)
            pol = res["policies"]
            self.assertEqual(sorted(pol), ["snapkv:window=8,kernel=3,pool=max", "streamingllm"])
            b = pol["streamingllm"]["budgets"]
            self.assertEqual(sorted(b), ["12", "20"])
            heads = b["12"]["layers"][1]["heads"]
            self.assertEqual(len(heads), Hkv)
            self.assertEqual(heads[0]["kept"], [0, 1, 2, 3] + list(range(32, 40)))
            for key in ("recall", "err_window", "err_decode", "coverage", "coverage_dropped",
                        "r_all", "r_kept", "head_overlap"):
                self.assertIn(key, heads[0])
            self.assertIsNone(heads[0]["err_decode"])
            self.assertEqual([h["head_overlap"] for h in heads], [1.0] * Hkv)
            self.assertIsNotNone(heads[0]["coverage_dropped"])
            half = b["20"]["layers"][0]["heads"]  # 50% of 40 = 20 < 40: some dropped
            self.assertIsNotNone(half[0]["coverage_dropped"])


if __name__ == "__main__":
    unittest.main(verbosity=1)
