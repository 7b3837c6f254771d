#!/usr/bin/python3
"""test_elastic_cache.py - `elastic-cache` against NumPy written from Elastic Cache's released
code (liuzuyan/ElasticCache, kv_cache.py, ElasticCache.__call__ at prefill), with its anchors
chosen as the paper says (the most important tokens):
  * score_sum[j] = the attention every prompt query i >= j gives token j, averaged over the
    layer's query heads (attentions.mean(dim=1), summed over the query rows); here from the
    trace's attn_colsum when it has them, else computed from Q_all (causal softmax, float64);
  * kept = tokens 0 .. start_size-1, the last token, and the B - start_size - 1 tokens between
    with the largest score (stable sort: ties to the earlier token); one set for every head;
  * each other token is merged into the kept token between the sinks and the last that is
    nearest in position (torch.abs(selected - j).argmin(): the first, i.e. earlier, on a tie):
    scatter_reduce("mean") with the anchor itself, keys and values alike.
The replay's kept sets (--export-selection) must equal these, and its err_window and err_decode
the output errors over the merged keys and values (test_merge.merged_errors); with merge=none,
over the anchors' own (test_merge.py checks merge=weighted on the same kept sets).

Traces: a llama2.c capture (T = 150, 8 query heads on 4 KV heads, 2 decode steps, Q_all, no
column sums) and a llama3-8b-shaped synthetic one (T = 300, GQA 4, column sums). Environment:
KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import check, finish, need_library, run, score_traces  # noqa: E402
import numpy as np  # noqa: E402
from test_merge import ErrTally, merged_errors, read_layers  # noqa: E402

kvtrace = need_library()


def colsum_from_q_all(Q, K, scale, G):
    """[Hq, T] sum over the prompt queries i of softmax_{j <= i}(q_i k_j scale)[j]."""
    Hq, T, _ = Q.shape
    out = np.zeros((Hq, T))
    mask = np.tril(np.ones((T, T), dtype=bool))
    for h in range(Hq):
        z = Q[h] @ K[h // G].T * scale
        z = np.where(mask, z, -np.inf)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[h] = p.sum(axis=0)
    return out


def elastic(score, K, V, B, sinks):
    """Kept token indices (ascending) and their merged keys and values for budget B."""
    T = len(score)
    if B >= T:
        idx = np.arange(T)
        return idx, K[idx], V[idx]
    S = min(sinks, T - 1)
    cand = np.arange(S, T - 1)
    ranked = cand[np.argsort(-score[S:T - 1], kind="stable")]
    order = [T - 1] + list(range(S)) + list(ranked)
    idx = np.array(sorted(order[:B]), dtype=int)
    mk, mv = elastic_merge(K, V, idx, sinks)
    return idx, mk, mv


def elastic_merge(K, V, idx, sinks):
    """The keys and values of the kept tokens idx (ascending) after Elastic Cache's merge: each
    other token into the anchor (a kept token between the sinks and the last) nearest in
    position, the earlier on a tie, as the mean with the anchor."""
    T = K.shape[0]
    S = min(sinks, T - 1)
    anchors = np.array([j for j in idx if S <= j < T - 1], dtype=int)
    mk, mv = K[idx].copy(), V[idx].copy()
    if len(anchors) == 0:
        return mk, mv
    cnt = np.ones(len(idx))
    pos = {j: e for e, j in enumerate(idx)}
    for j in np.setdiff1d(np.arange(T), idx):
        a = anchors[np.abs(anchors - j).argmin()]
        mk[pos[a]] += K[j]
        mv[pos[a]] += V[j]
        cnt[pos[a]] += 1
    return mk / cnt[:, None], mv / cnt[:, None]


def check_trace(name, path, spec, sinks, budgets, work, merge=True):
    sel = os.path.join(work, "sel.json")
    res = os.path.join(work, "r.json")
    run("replay", path, "--policies", spec, "--budgets", budgets, "--export-selection", sel,
        "-o", res, "--force")
    exp = json.load(open(sel))
    r = json.load(open(res))
    kept = {(x["layer"], x["head"], x["budget_tokens"]): x["kept"] for x in exp["records"]}
    per_query = "heads=query" in spec
    with kvtrace.open(path) as t:
        m = t.header["model"]
        T, Hq, Hkv = t.header["n_tokens"], m["n_q_heads"], m["n_kv_heads"]
        scale = m.get("attn_scale") or 1 / math.sqrt(m["head_dim"])
        layers = read_layers(t)
        G = Hq // Hkv
        for l, x in enumerate(layers):
            if t.has("attn_colsum", l):
                x["cs"] = t.read("attn_colsum", layer=l, dtype="float32")[:, :, 0].astype(np.float64)
            else:
                q = t.read("Q_all", layer=l, dtype="float32").astype(np.float64)
                x["cs"] = colsum_from_q_all(q, x["K"], scale, G)
    tally = ErrTally(name, spec)
    bad_sets = n_sets = 0
    for l, x in enumerate(layers):
        score = x["cs"].mean(axis=0)
        for h in range(Hq if per_query else Hkv):
            g = h // G if per_query else h
            qh = [h] if per_query else range(g * G, (g + 1) * G)
            for run_ in r["traces"][0]["runs"]:
                B = run_["budget_tokens"]
                idx, mk, mv = elastic(score, x["K"][g], x["V"][g], B, sinks)
                if not merge:  # merge=none: the anchors as they are
                    mk, mv = x["K"][g][idx], x["V"][g][idx]
                n_sets += 1
                if kept[(l, h, B)] != [int(j) for j in idx]:
                    bad_sets += 1
                    if bad_sets <= 3:
                        print("  layer %d head %d B %d: kept %s, want %s" % (
                            l, h, B, kept[(l, h, B)][:12], list(idx[:12])))
                    continue
                tally.add(run_, l, h, merged_errors(x, g, qh, idx, mk, mv, scale))
    print("%s %s: %s; %d of %d kept sets differ" % (name, spec, tally.summary(), bad_sets,
                                                     n_sets))
    check(tally.n > 0 and tally.bad == 0 and bad_sets == 0, "%s %s" % (name, spec))


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True)
        check_trace("llama2c", a, "elastic-cache", 4, "3,6,20,64,50%,149,150,200", work)
        check_trace("llama2c", a, "elastic-cache:sinks=1,heads=query", 1, "2,9,75,140", work)
        check_trace("llama3-8b", s, "elastic-cache", 4, "5,16,40,100,299,300", work)
        check_trace("llama3-8b", s, "elastic-cache:sinks=0", 0, "1,2,33,150", work)
        check_trace("llama3-8b", s, "elastic-cache:merge=none,heads=query", 4, "16,100", work,
                    merge=False)
    finish("test_elastic_cache")


if __name__ == "__main__":
    main()
