#!/usr/bin/python3
"""test_h2o_greedy.py - the replay policy `h2o-greedy` (H2O's greedy heavy-hitter eviction,
simulated over the prompt one token per step) against NumPy written from its specification.

Per layer and query head h (KV head g = h // G, G = Hq / Hkv): P_h[i, j] = softmax over j <= i
of (q_h,i . k_g,j) * scale, in float64 and then rounded to float32 (scale = model.attn_scale,
else 1/sqrt(D); Q_all and K as the trace holds them). The accumulated score of token j after
step t is the partial column sum acc_h(t)[j] = sum_{i=j..t} P_h[i, j] (float64, row order: a
cumulative sum over the rows). A selection head's score is acc_h(t) per query head
(heads=query), or per KV head the group's reduce: mean (sum / G, the default), max or sum.
With the window W = min(window, T) (default 32) and the budget B (entries per head, the window
included; a percentage as results.json resolves it): B >= T keeps all T, B <= W the last B;
otherwise the cache starts empty and step t = 0 .. T-1 adds token t, then, once the cache holds
more than B, evicts the cached token u <= t - W with the lowest score(t)[u], ties to the later
token. The kept set is the cache after step T-1.

Checked, for every layer, head, policy variant and budget of the replay's --export-selection:
  * the kept set equals the simulation's. The C's logits are summed in another order, so a
    probability may differ by a float32 ulp: a set that differs is accepted (and counted as a
    near-tie) only when some eviction on the simulation's path had the evicted token's score
    within a relative 1e-6 of the next-lowest candidate's (two candidates scoring exactly 0 do
    not count: zeros are zero in any order); otherwise it fails;
  * every kept set has min(B, T) entries and holds the last min(W, B) tokens;
  * the export has one record per (policy, budget, layer, head), of the right granularity.
Budgets cover B >= T, B <= W, B = W + 1, several in between and a percentage.
Traces: llama2.c captures of stories260K with Q_all (T = 150 and T = 300; 8 query heads on 4
KV heads, D = 8, 5 layers), and a copy of the T = 150 one whose even layers are edited so that
every query is e_0 and each KV head's key is 200 e_0 for "hot" tokens (token 0 and every fifth)
and -200 e_0 for the rest: the others' probabilities round to exactly 0, so their scores tie at
0 and the tie rule (evict the later token) decides which of them stay.
A replay of h2o-greedy on a trace without Q_all (plain, and with --colsum) is refused: non-zero
exit and one line on stderr that names Q_all.

Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT. Exit 77 without NumPy, the CLI, the library or
the model. `test_h2o_greedy.py selftest` runs hand-worked cases of the simulation only.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, copy_trace, finish, need_library, run  # noqa: E402
import numpy as np  # noqa: E402

NEAR = 1e-6  # relative margin below which an eviction may go either way in the C
DEFAULT_WINDOW = 32
MODEL = os.path.join(ROOT, "models", "stories260K.bin")


def layer_probs(Q, K, scale):
    """[Hq, T, T] float32 causal softmax of (q . k) * scale, computed in float64; Q [Hq, T, D]
    and K [Hkv, T, D] as float64."""
    Hq, T, _ = Q.shape
    G = Hq // K.shape[0]
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    P = np.empty((Hq, T, T), np.float32)
    for h in range(Hq):
        z = (Q[h] @ K[h // G].T) * scale
        z[future] = -np.inf
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        P[h] = p.astype(np.float32)
    return P


def partial_sums(P):
    """[Hq, T, T] float64: A[h, t, j] = sum_{i=j..t} P[h, i, j] (rows added in order; the
    rows i < j add exact zeros)."""
    return np.cumsum(P.astype(np.float64), axis=1)


def head_scores(A, Hkv, heads="kv", reduce="mean"):
    """[H, T, T] score(t)[j] per selection head: per query head (heads=query), else per KV head
    the mean / max / sum over its G query heads (added in head order)."""
    if heads == "query":
        return A
    Hq = A.shape[0]
    G = Hq // Hkv
    out = np.empty((Hkv,) + A.shape[1:])
    for g in range(Hkv):
        grp = A[g * G:(g + 1) * G]
        if reduce == "max":
            out[g] = grp.max(axis=0)
        else:
            s = grp[0].copy()
            for k in range(1, G):
                s += grp[k]
            out[g] = s / G if reduce == "mean" else s
    return out


def simulate(S, budgets, W):
    """The greedy eviction of every selection head of S [H, T, T] at each budget B (W < B < T):
    kept [nB, H, T] bool, the smallest relative margin of each head's evictions [nB, H] (the
    next-lowest candidate's score over the evicted one's, minus one; inf for a tie of two exact
    zeros) and the number of its evictions with a margin below NEAR [nB, H]."""
    H, T, _ = S.shape
    nB = len(budgets)
    R = nB * H
    head = np.tile(np.arange(H), nB)
    Bv = np.repeat(np.asarray(budgets, dtype=int), H)
    assert ((Bv > W) & (Bv < T)).all()
    cached = np.zeros((R, T), dtype=bool)
    margin = np.full(R, np.inf)
    near = np.zeros(R, dtype=int)
    for t in range(T):
        cached[:, t] = True  # token t joins; its score (like all others) includes row t
        rows = np.flatnonzero(t >= Bv)  # caches now holding B + 1 tokens
        if rows.size == 0:
            continue
        n = t - W + 1  # the candidates: tokens 0 .. t - W (the last W are protected)
        vals = np.where(cached[rows, :n], S[head[rows], t, :n], np.inf)
        u = n - 1 - np.argmin(vals[:, ::-1], axis=1)  # the lowest; ties to the later token
        ar = np.arange(rows.size)
        low = vals[ar, u]
        vals[ar, u] = np.inf
        nxt = vals.min(axis=1)
        assert np.isfinite(low).all() and np.isfinite(nxt).all()  # >= 2 candidates
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(nxt > 0, (nxt - low) / np.where(nxt > 0, nxt, 1.0), np.inf)
        margin[rows] = np.minimum(margin[rows], rel)
        near[rows] += rel < NEAR
        cached[rows, u] = False
    assert (cached.sum(axis=1) == Bv).all()
    return cached.reshape(nB, H, T), margin.reshape(nB, H), near.reshape(nB, H)


def oracle_sets(S, budgets, W):
    """{B: ([H] kept index lists, [H] smallest margins, [H] near-tie evictions)} for every
    budget B."""
    H, T, _ = S.shape
    W = min(W, T)
    out = {}
    for B in budgets:
        if B >= T:
            out[B] = ([list(range(T))] * H, [np.inf] * H, [0] * H)
        elif B <= W:
            out[B] = ([list(range(T - B, T))] * H, [np.inf] * H, [0] * H)
    mid = sorted(set(B for B in budgets if W < B < T))
    if mid:
        kept, margin, near = simulate(S, mid, W)
        for b, B in enumerate(mid):
            out[B] = ([np.flatnonzero(kept[b, h]).tolist() for h in range(H)],
                      margin[b].tolist(), near[b].tolist())
    return out


def selftest():
    """Hand-worked cases of simulate() and layer_probs() (test_h2o_greedy.py selftest)."""
    def acc(rows):
        T = len(rows)
        P = np.zeros((1, T, T))
        for i, r in enumerate(rows):
            P[0, i, :len(r)] = r
        return partial_sums(P)

    # W = 1, B = 2. t = 2: candidates {0, 1}, acc 1.7 / 0.7: evict 1. t = 3: {0, 2}, 1.8 / 0.7:
    # evict 2. t = 4: {0, 3}, 2.05 / 0.2: evict 3. Kept {0, 4}.
    S = acc([[1], [.5, .5], [.2, .2, .6], [.1, .6, .1, .2], [.25, .25, .25, 0, .25]])
    kept, margin, near = simulate(S, [2], 1)
    assert np.flatnonzero(kept[0, 0]).tolist() == [0, 4]
    assert abs(margin[0, 0] - (1.7 - 0.7) / 1.7) < 1e-12 and near[0, 0] == 0
    # B = 3, W = 1: t = 3 {0, 1, 2}: 1.8, 1.3, 0.7: evict 2; t = 4 {0, 1, 3}: 2.05, 1.55, 0.2
    kept, _, _ = simulate(S, [3], 1)
    assert np.flatnonzero(kept[0, 0]).tolist() == [0, 1, 4]
    # W = 2, B = 3: t = 3 candidates {0, 1} (2 and 3 recent): 1.8 / 1.3: evict 1; t = 4
    # candidates {0, 2}: 2.05 / 0.95: evict 2. Kept {0, 3, 4}.
    kept, _, _ = simulate(S, [3], 2)
    assert np.flatnonzero(kept[0, 0]).tolist() == [0, 3, 4]
    # a tie (acc 1 and 1 at t = 2) evicts the later token: kept {0, 2}, margin 0, one near-tie
    kept, margin, near = simulate(acc([[1], [0, 1], [0, 0, 1]]), [2], 1)
    assert np.flatnonzero(kept[0, 0]).tolist() == [0, 2] and margin[0, 0] == 0
    assert near[0, 0] == 1
    # two exact zeros tie (token 0 takes everything): the later goes, and it is no near-tie
    kept, margin, near = simulate(acc([[1], [1, 0], [1, 0, 0], [1, 0, 0, 0]]), [3], 1)
    assert np.flatnonzero(kept[0, 0]).tolist() == [0, 1, 3]
    assert margin[0, 0] == np.inf and near[0, 0] == 0
    # greedy, not one-shot: token 1 is evicted at t = 2 (1.0 < 1.75) though its final sum 2.0
    # is the largest; the one-shot ranking would keep {1, 3}
    S = acc([[1], [.25, .75], [.5, .25, .25], [0, 1, 0, 0]])
    kept, _, _ = simulate(S, [2], 1)
    assert np.flatnonzero(kept[0, 0]).tolist() == [0, 3]
    # the closed forms, and a KV head's mean / max of two query heads
    sets = oracle_sets(np.repeat(S, 2, axis=0), [1, 2, 4, 9], 1)
    assert sets[1][0] == [[3], [3]] and sets[4][0] == sets[9][0] == [[0, 1, 2, 3]] * 2
    assert sets[2][0] == [[0, 3]] * 2
    A = np.stack([S[0], 3 * S[0]])
    assert np.allclose(head_scores(A, 1)[0], 2 * S[0])
    assert np.allclose(head_scores(A, 1, reduce="max")[0], 3 * S[0])
    assert np.allclose(head_scores(A, 1, reduce="sum")[0], 4 * S[0])
    assert head_scores(A, 1, heads="query") is A
    # probabilities: causal, rows of one, float32
    rng = np.random.default_rng(0)
    P = layer_probs(rng.standard_normal((4, 6, 3)), rng.standard_normal((2, 6, 3)), 0.5)
    assert P.dtype == np.float32 and (np.triu(P[0], 1) == 0).all() and P[0, 0, 0] == 1
    assert np.allclose(P.sum(axis=2), 1, atol=1e-6)
    print("selftest: ok")


def parse_spec(spec):
    """(heads, reduce, window) of an h2o-greedy spec."""
    opts = dict(kv.split("=", 1) for kv in spec.partition(":")[2].split(",") if kv)
    return (opts.get("heads", "kv"), opts.get("reduce", "mean"),
            int(opts.get("window", DEFAULT_WINDOW)))


def capture(path, T, seed, *extra):
    """capture-llama2c of T sampled tokens (seed), 2 decode steps, window 8."""
    run("capture-llama2c", "--model", MODEL, "--tokens", T, "--seed", seed, "--decode", 2,
        "--window", 8, *extra, "-o", path, "--force")


def check_trace(name, path, specs, budgets, work, kvtrace):
    """The replay's kept sets of every spec and budget against oracle_sets(); returns the
    counts (sets, equal, near-tie differences, failures)."""
    sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
    run("replay", path, "--policies", ",".join(specs), "--budgets", budgets,
        "--export-selection", sel, "-o", res, "--force")
    with open(sel) as f:
        exp = json.load(f)
    with open(res) as f:
        runs = json.load(f)["traces"][0]["runs"]
    texts = budgets.split(",")
    check(exp["budgets"] == texts, "%s: export budgets %s" % (name, exp["budgets"]))
    check([p["label"] for p in exp["policies"]] == specs and
          all(p["name"] == "h2o-greedy" for p in exp["policies"]),
          "%s: export policies %s" % (name, exp["policies"]))
    Btok = {(r["policy"], r["budget"]): r["budget_tokens"] for r in runs}
    check(len(Btok) == len(specs) * len(texts), "%s: %d runs in results.json" % (name, len(runs)))
    recs = {}
    for r in exp["records"]:
        key = (r["policy"], r["budget"], r["layer"], r["head"])
        check(key not in recs and r["step"] == -1, "%s: record %s twice or step %d"
              % (name, key, r["step"]))
        recs[key] = r
    with kvtrace.open(path) as t:
        m = t.header["model"]
        T, L = t.header["n_tokens"], m["n_layers"]
        Hkv, D = m["n_kv_heads"], m["head_dim"]
        scale = m.get("attn_scale") or 1 / math.sqrt(D)
        cnt = {"sets": 0, "equal": 0, "near": 0, "fail": 0, "form": 0, "near_ev": 0}
        per_spec = {s: dict(cnt) for s in specs}
        for layer in range(L):
            Q = t.read("Q_all", layer=layer, dtype="float32").astype(np.float64)
            K = t.read("K", layer=layer, dtype="float32").astype(np.float64)
            A = partial_sums(layer_probs(Q, K, scale))
            for pi, spec in enumerate(specs):
                heads, reduce, window = parse_spec(spec)
                W = min(window, T)
                S = head_scores(A, Hkv, heads, reduce)
                H = S.shape[0]
                gran = exp["policies"][pi]["granularity"]
                check(gran == ("query_head" if heads == "query" else "kv_head"),
                      "%s %s: granularity %s" % (name, spec, gran))
                Bs = [Btok.get((pi, bi), 0) for bi in range(len(texts))]
                want = oracle_sets(S, sorted(set(Bs)), W)
                c = per_spec[spec]
                for bi, B in enumerate(Bs):
                    sets, margins, nears = want[B]
                    for h in range(H):
                        c["sets"] += 1
                        c["near_ev"] += nears[h]
                        r = recs.pop((pi, bi, layer, h), None)
                        got = None if r is None else r["kept"]
                        n = min(B, T)
                        if got is None or len(got) != n or got[-min(W, B):] != list(
                                range(T - min(W, B), T)) or r["budget_tokens"] != B:
                            c["form"] += 1
                            if c["form"] <= 3:
                                print("  %s %s %s (B %d) layer %d head %d: %s" % (
                                    name, spec, texts[bi], B, layer, h,
                                    "no record" if got is None else
                                    "%d kept (want %d), budget_tokens %d, last %s" % (
                                        len(got), n, r["budget_tokens"], got[-3:])))
                        if got == sets[h]:
                            c["equal"] += 1
                            continue
                        tie = margins[h] < NEAR
                        c["near" if tie else "fail"] += 1
                        if (c["near"] if tie else c["fail"]) <= 4:
                            g = set(got or [])
                            print("  %s %s %s (B %d) layer %d head %d: %s; only replay %s, "
                                  "only NumPy %s (smallest margin %.3g)" % (
                                      name, spec, texts[bi], B, layer, h,
                                      "near-tie" if tie else "DIFFERS",
                                      sorted(g - set(sets[h]))[:8],
                                      sorted(set(sets[h]) - g)[:8], margins[h]))
    check(not recs, "%s: %d records of no (policy, budget, layer, head) expected: %s" % (
        name, len(recs), sorted(recs)[:3]))
    tot = {k: sum(c[k] for c in per_spec.values()) for k in cnt}
    for spec, c in per_spec.items():
        print("%s %s (T %d): %d kept sets, %d equal, %d near-tie differences, %d differ, "
              "%d malformed; %d evictions of the simulation within %g" % (
                  name, spec, T, c["sets"], c["equal"], c["near"], c["fail"], c["form"],
                  c["near_ev"], NEAR))
        check(c["fail"] == 0, "%s %s: %d of %d kept sets differ" % (name, spec, c["fail"],
                                                                     c["sets"]))
        check(c["form"] == 0, "%s %s: %d kept sets without min(B, T) entries and the last "
              "min(W, B) tokens" % (name, spec, c["form"]))
    return tot


def tie_trace(src, dst):
    """A copy of src whose even layers have every query e_0 and each KV head g's key 200 e_0
    for token 0 and the tokens j with (j + g) % 5 == 0, -200 e_0 for the rest."""
    def edit(kind, layer, x):
        if layer % 2:
            return
        if kind == "Q_all":
            x[:] = 0
            x[:, :, 0] = 1
        elif kind == "K":
            x[:] = 0
            Hkv, T, _ = x.shape
            for g in range(Hkv):
                hot = (np.arange(T) + g) % 5 == 0
                hot[0] = True
                x[g, :, 0] = np.where(hot, 200.0, -200.0)
    return copy_trace(src, dst, edit=edit)


def check_refusal(path, what, work):
    r = run("replay", path, "--policies", "h2o-greedy", "--budgets", "64", "-o",
            os.path.join(work, "x.json"), "--force", ok=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    check(r.returncode != 0 and len(lines) == 1 and "Q_all" in lines[0],
          "h2o-greedy on a trace %s: exit %d, stderr %r" % (what, r.returncode, r.stderr))
    print("trace %s: exit %d: %s" % (what, r.returncode, r.stderr.strip()))


def main():
    kvtrace = need_library()
    if not os.path.exists(MODEL):
        print("SKIP: no stories260K model")
        sys.exit(77)
    specs = ["h2o-greedy", "h2o-greedy:window=8", "h2o-greedy:heads=query",
             "h2o-greedy:reduce=max"]
    total = {}
    with tempfile.TemporaryDirectory() as work:
        a, b = os.path.join(work, "a.kvt"), os.path.join(work, "b.kvt")
        capture(a, 150, 3, "--q-all")
        capture(b, 300, 7, "--q-all")
        # W = 32 (8): 1, 8 (= W), 32 (= W) keep the last B; 9 and 33 are W + 1; 150, 200 >= T
        res = [check_trace("T150", a, specs, "1,8,9,20,32,33,40,30%,64,100,149,150,200", work,
                           kvtrace),
               check_trace("T300", b, specs + ["h2o-greedy:reduce=sum,window=16"],
                           "5,8,9,16,17,32,33,50,30%,100,150,250,299,300,400", work, kvtrace),
               check_trace("T150-ties", tie_trace(a, os.path.join(work, "t.kvt")), specs,
                           "8,20,33,40,45,60,100,140", work, kvtrace)]
        for k in res[0]:
            total[k] = sum(r[k] for r in res)
        print("all: %d kept sets compared, %d equal, %d near-tie differences, %d differ, "
              "%d malformed" % (total["sets"], total["equal"], total["near"], total["fail"],
                                total["form"]))
        p, c = os.path.join(work, "p.kvt"), os.path.join(work, "c.kvt")
        capture(p, 60, 3)
        capture(c, 60, 3, "--colsum")
        check_refusal(p, "without Q_all", work)
        check_refusal(c, "with attn_colsum but no Q_all", work)
    finish("test_h2o_greedy")


if __name__ == "__main__":
    if sys.argv[1:] == ["selftest"]:
        selftest()
    else:
        main()
