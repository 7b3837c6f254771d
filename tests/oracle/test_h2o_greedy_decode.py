#!/usr/bin/python3
"""test_h2o_greedy_decode.py - h2o-greedy:decode=1 (H2O's greedy eviction going on through the
decode steps, as H2O evicts while generating) against NumPy written from its specification.

The prompt and the decode steps are one stream of T + G tokens: row i < T is prompt query i
(Q_all), row T + d decode step d's query (Q_decode); key T + d is K_decode[d]. Each row's
probabilities are the causal softmax over keys 0..i of (q . k) * scale in float64, rounded to
float32 (test_h2o_greedy.layer_probs). A token's score after row t is its column sum over rows
0..t, reduced over a KV head's query heads (reduce=mean|max|sum) or per query head. With the
window W = min(window, T) and the budget B: token t joins the cache; once the cache holds more
than B, the cached token at least W steps old (j <= t - W) with the lowest score leaves, ties to
the later token, or, when no cached token is that old (B <= W), the oldest. At the end of the
prompt this is h2o-greedy's prompt-time set (B >= T: all, B <= W: the last B). Decode step d's
query sees the cache after row T + d - 1's eviction plus token T + d.

Checked, for every layer, head, spec and budget: each exported step set (the cache step d's
query sees, decode tokens as T + d) equals the simulation's, or differs only where some eviction
on the simulation's path had a relative margin below 1e-6 (the C's float32 probabilities are
summed in another order: counted as near-ties); n_keep (prompt tokens in each step's cache,
averaged over the steps) matches where no near-tie occurred; the results list decode=1 only when
given; without K_decode the replay is refused, and decode=1 with chunk_length=.
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (ROOT, check, copy_trace, finish, need_library,  # noqa: E402
                      refused, run)
import numpy as np  # noqa: E402
from test_h2o_greedy import NEAR, head_scores, layer_probs, parse_spec  # noqa: E402

MODEL = os.path.join(ROOT, "models", "stories260K.bin")


def simulate(S, T, B, W):
    """One selection head's scores S [N, N] (row t: every token's score after row t): each
    token's last visible decode step (-1: gone before decoding; G - 1: kept to the end) and the
    smallest relative margin of its score-decided evictions."""
    N = S.shape[0]
    G = N - T
    cached = np.zeros(N, dtype=bool)
    last = np.full(N, G - 1)
    margin = np.inf
    for t in range(N):
        cached[t] = True
        if cached.sum() <= B:
            continue
        cand = np.flatnonzero(cached[:t - W + 1]) if t - W + 1 > 0 else np.array([], int)
        if cand.size == 0:
            u = np.flatnonzero(cached)[0]  # none W steps old: the oldest
        else:
            vals = S[t, cand]
            lo = vals.min()
            u = cand[np.flatnonzero(vals == lo)[-1]]  # ties to the later token
            rest = vals[cand != u]
            if rest.size:
                nxt = rest.min()
                rel = (nxt - lo) / nxt if nxt > 0 else np.inf
                margin = min(margin, rel)
        cached[u] = False
        last[u] = t - T if t >= T else -1
    return last, margin


def visible(last, T, d):
    return [e for e in range(T + d + 1) if last[e] >= d]


def check_trace(name, path, specs, budgets, work, kvtrace):
    sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
    run("replay", path, "--policies", ",".join(specs), "--budgets", budgets,
        "--export-selection", sel, "-o", res, "--force")
    with open(sel) as f:
        recs = json.load(f)["records"]
    with open(res) as f:
        doc = json.load(f)
    runs = doc["traces"][0]["runs"]
    for pi, p in enumerate(doc["settings"]["policies"]):
        check(p["options"].get("decode") is ("decode=1" in specs[pi]) or
              ("decode" not in p["options"] and "decode=1" not in specs[pi]),
              "%s: options %r" % (specs[pi], p["options"]))
    by = {}
    for r in recs:
        by.setdefault((r["policy"], r["budget"], r["layer"], r["head"]), {})[r["step"]] = r["kept"]
    cnt = {"sets": 0, "equal": 0, "near": 0, "fail": 0, "evict": 0}
    with kvtrace.open(path) as t:
        m = t.header["model"]
        T, L = t.header["n_tokens"], m["n_layers"]
        Hkv, D = m["n_kv_heads"], m["head_dim"]
        scale = m.get("attn_scale") or 1 / math.sqrt(D)
        for layer in range(L):
            rd = {k: t.read(k, layer=layer, dtype="float32").astype(np.float64)
                  for k in ("Q_all", "Q_decode", "K", "K_decode")}
            G = rd["K_decode"].shape[1]
            # the stream's rows [Hq, T + G, T + G]: each causal softmax (float64, rounded to
            # float32), then the cumulative column sums
            P = layer_probs(np.concatenate([rd["Q_all"], rd["Q_decode"]], axis=1),
                            np.concatenate([rd["K"], rd["K_decode"]], axis=1), scale)
            A = np.cumsum(P.astype(np.float64), axis=1)
            for pi, spec in enumerate(specs):
                if "decode=1" not in spec:
                    continue
                heads, reduce, window = parse_spec(spec)
                W = min(window, T)
                S = head_scores(A, Hkv, heads, reduce)
                for run_ in runs:
                    if run_["policy"] != pi:
                        continue
                    B = run_["budget_tokens"]
                    for h in range(S.shape[0]):
                        last, margin = simulate(S[h], T, B, W)
                        steps = by[(pi, run_["budget"], layer, h)]
                        check(sorted(steps) == list(range(-1, G)),
                              "%s %s: steps %s" % (name, spec, sorted(steps)[:4]))
                        cnt["evict"] += int(np.sum(last[:T + G - 1] < G - 1)) - int(
                            np.sum(last[:T] < 0))
                        bad = [d for d in range(G) if steps[d] != visible(last, T, d)]
                        cnt["sets"] += G
                        cnt["equal"] += G - len(bad)
                        if not bad:
                            nk = np.mean([sum(1 for e in visible(last, T, d) if e < T)
                                          for d in range(G)])
                            have = run_["metrics"]["n_keep"][layer][h]
                            check(abs(have - nk) < 1e-9, "%s %s B %d layer %d head %d: n_keep "
                                  "%r, check %r" % (name, spec, B, layer, h, have, nk))
                            continue
                        tie = margin < NEAR
                        cnt["near" if tie else "fail"] += len(bad)
                        if not tie and cnt["fail"] <= 4 * G:
                            d = bad[0]
                            g, w = set(steps[d]), set(visible(last, T, d))
                            print("  %s %s B %d layer %d head %d step %d: DIFFERS; only replay "
                                  "%s, only NumPy %s (margin %.3g)" % (
                                      name, spec, B, layer, h, d, sorted(g - w)[:8],
                                      sorted(w - g)[:8], margin))
    print("%s (T %d): %d step sets, %d equal, %d near-tie differences, %d differ; %d decode-time "
          "evictions" % (name, T, cnt["sets"], cnt["equal"], cnt["near"], cnt["fail"],
                         cnt["evict"]))
    check(cnt["fail"] == 0 and cnt["sets"] > 0, "%s: %d step sets differ" % (name, cnt["fail"]))
    check(cnt["near"] <= cnt["sets"] // 20, "%s: %d near-tie differences" % (name, cnt["near"]))
    return cnt


def main():
    kvtrace = need_library()
    work = tempfile.mkdtemp(prefix="kvt_h2o_decode_")
    a = os.path.join(work, "a.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", "150", "--decode", "40", "--window",
        "8", "--q-all", "-o", a)
    specs = ["h2o-greedy:window=8,decode=1", "h2o-greedy:decode=1,heads=query,reduce=max",
             "h2o-greedy:window=4,decode=1,reduce=sum", "h2o-greedy:window=8"]
    c = check_trace("stories260K", a, specs, "4,8,9,48,100,149,150,185,200,50%", work, kvtrace)
    check(c["evict"] > 2000, "%d decode-time evictions" % c["evict"])
    s = os.path.join(work, "s.kvt")  # llama3-8b-shaped, bf16, GQA 4
    run("synth", "--shape", "llama3-8b", "--tokens", "120", "--layers", "2", "--decode", "24",
        "--q-all", "-o", s)
    check_trace("llama3-8b", s, specs[:2], "16,33,60,119", work, kvtrace)

    # the prompt-time set is h2o-greedy's: decode=1's step -1 records equal the plain spec's
    sel = os.path.join(work, "p.json")
    run("replay", a, "--policies", "h2o-greedy:window=8,h2o-greedy:window=8,decode=1",
        "--budgets", "9,48,149", "--export-selection", sel, "-o",
        os.path.join(work, "p_r.json"), "--force")
    with open(sel) as f:
        recs = json.load(f)["records"]
    plain = {(r["budget"], r["layer"], r["head"]): r["kept"] for r in recs if r["policy"] == 0}
    dec = {(r["budget"], r["layer"], r["head"]): r["kept"] for r in recs
           if r["policy"] == 1 and r["step"] == -1}
    check(plain == dec and len(plain) == 3 * 5 * 4, "decode=1's prompt-time sets are plain's")

    R = ["replay", a, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    refused(R + ["h2o-greedy:decode=1,chunk_length=32"],
            "h2o-greedy: decode=1 goes on evicting from the whole prompt's cache, and "
            "chunk_length= shares the budget over chunks (give one of them)")
    refused(R + ["h2o:decode=1"], "h2o: unknown option 'decode'")
    refused(R + ["h2o-greedy:decode=1,think=0.5"],
            "h2o-greedy: think= prunes the key channels of the prompt-time set, and decode=1 "
            "keeps caches of whole keys through the decode steps (give one of them)")
    nod = copy_trace(a, os.path.join(work, "nod.kvt"),
                     kinds=("K", "V", "Q_window", "Q_decode", "Q_all"))
    refused(["replay", nod, "--budgets", "20", "-o", os.path.join(work, "y.json"), "--force",
             "--policies", "h2o-greedy:decode=1"],
            "policy h2o-greedy:decode=1 evicts decode tokens too (decode=1), so it needs their "
            "keys and values (K_decode, V_decode) in every layer")
    finish("test_h2o_greedy_decode", work)


if __name__ == "__main__":
    main()
