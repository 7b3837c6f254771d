#!/usr/bin/python3
"""test_chunk_length.py - chunk_length=N (replay/chunk_length.c) against NumPy written from
kvpress: FinchPress with chunk_length (finch_press.py @0603dec: the whole prompt scored once,
then for each chunk [i, i + N) from token 0 the top max(1, int(len * (1 - r))) of its scores)
and ChunkPress over KnormPress (chunk_press.py @17161eb: each chunk scored on its own, which
for -||k|| is the same score). The share 1 - r is the budget's written share, or B/T. Ties
break toward the earlier token, the window (finch) first, as kvtrace documents.

For each spec and budget, every exported kept set must equal the check's; so must each
chunk's count of kept tokens. Then: with layer_weights=, each layer's chunks keep their share
of that layer's budget; a policy with a ranking per budget (keydiff-block) keeps its chunks'
counts at every budget; and the refusals.

Traces (cli_test.score_traces): a llama2.c capture (T = 150, 8 query heads on 4 KV heads,
D = 8, window 8) and a llama3-8b-shaped synthetic one (T = 300, GQA 4, D = 128).
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, check_sets, finish, need_library, refused,  # noqa: E402
                      replay_export, run, score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_finch import finch_scores  # noqa: E402

kvtrace = need_library()


def knorm_scores(t, layer, per_query, W, normalize):
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    return [-np.sqrt((k * k).sum(axis=1)) for k in K]


def share(budget, T):
    return float(budget[:-1]) / 100.0 if budget.endswith("%") else int(budget) / T


def shares_by_tokens(budgets, T):
    """{tokens: share}: each budget of the list as the export names it (by its tokens, a share
    rounded half up) and the share it was written as (B/T for tokens)."""
    return {(int(math.floor(share(b, T) * T + 0.5)) if b.endswith("%") else int(b)): share(b, T)
            for b in budgets.split(",")}


def chunk_keep(n, f):
    if f >= 1.0:
        return n
    x = n * f
    return min(n, int(x) if x >= 1.0 else 1)


def expected(scores, T, W, C, f):
    """Kept tokens: the ranking (the last W tokens first, newest first, then the scores
    descending, ties to the earlier token), each chunk its top chunk_keep."""
    rank = list(range(T - 1, T - W - 1, -1)) + sorted(range(T - W), key=lambda j: (-scores[j], j))
    kept = set()
    for c0 in range(0, T, C):
        n = chunk_keep(min(C, T - c0), f)
        kept |= set([j for j in rank if c0 <= j < c0 + C][:n])
    return kept


def compare(name, path, spec, budgets, C, W, fn, work, normalize=True):
    exp = replay_export(path, spec, budgets, work)
    per_query = exp["policies"][0]["granularity"] == "query_head"
    pairs = []
    with kvtrace.open(path) as t:
        T = t.header["n_tokens"]
        m = t.header["model"]
        G = m["n_q_heads"] // m["n_kv_heads"] if per_query else 1
        tok = shares_by_tokens(budgets, T)
        cache = {}
        for r in exp["records"]:
            layer = r["layer"]
            if layer not in cache:
                cache.clear()
                cache[layer] = fn(t, layer, per_query, W, normalize)
            heads = cache[layer]
            s = heads[r["head"] if len(heads) == m["n_q_heads"] and per_query else r["head"] // G]
            f = tok[r["budget_tokens"]]
            pairs.append((r, expected(s, T, min(W, T), C, f)))
    check_sets(name, spec, pairs, budgets)


def main():
    work = tempfile.mkdtemp(prefix="kvt_chunk_")
    a, s = score_traces(work)
    for path, name, budgets, cases in (
            (a, "llama2c", "10%,25%,37%,50%,40,100%",
             [("knorm:chunk_length=32", 32, 0, knorm_scores, True),
              ("knorm:chunk_length=7,heads=query", 7, 0, knorm_scores, True),
              ("knorm:chunk_length=150", 150, 0, knorm_scores, True),
              ("finch:window=8,chunk_length=64", 64, 8, finch_scores, True),
              ("finch:window=5,chunk_length=40,heads=query,normalize=0", 40, 5, finch_scores,
               False)]),
            (s, "llama3-8b", "10%,30%,64,50%",
             [("knorm:chunk_length=100", 100, 0, knorm_scores, True),
              ("finch:window=32,chunk_length=128", 128, 32, finch_scores, True)])):
        for spec, C, W, fn, norm in cases:
            compare(name, path, spec, budgets, C, W, fn, work, norm)

    # with layer_weights=: each layer's chunks share that layer's budget
    lw = os.path.join(work, "lw.txt")
    with open(lw, "w") as f:
        f.write("1 3 1 1 3\n")
    out = os.path.join(work, "lw.json")
    run("replay", a, "--policies", "knorm:chunk_length=32,layer_weights=" + lw, "--budgets",
        "20%,40", "-o", out, "--force")
    with open(out) as f:
        runs = json.load(f)["traces"][0]["runs"]
    for r in runs:
        f0 = share(r["budget_text"], 150)
        want = []
        for w in (1, 3, 1, 1, 3):
            fl = f0 * w * 5 / 9
            want.append(float(sum(chunk_keep(min(32, 150 - c0), fl) for c0 in range(0, 150, 32))))
        check(r["per_layer"]["n_keep"] == want, "layer_weights and chunk_length at %s: %r, not %r"
              % (r["budget_text"], r["per_layer"]["n_keep"], want))

    # a ranking per budget: every budget's chunks keep their counts
    exp = replay_export(a, "keydiff-block:block=32,chunk_length=50", "10%,30%,64", work)
    bad = 0
    for r in exp["records"]:
        f = {15: 0.1, 45: 0.3, 64: 64 / 150}[r["budget_tokens"]]
        per = [sum(1 for j in r["kept"] if c0 <= j < c0 + 50) for c0 in (0, 50, 100)]
        bad += per != [chunk_keep(50, f)] * 3
    check(exp["records"] and bad == 0, "keydiff-block with chunk_length: %d sets off" % bad)

    # a budget under a token per chunk keeps a token per chunk: the replay says so (19 chunks
    # of 8 tokens, 5 of 32; 2 of 75 keep 2 at B = 2 and 3 at 3, 75 at 50%)
    r = run("replay", a, "--policies", "knorm:chunk_length=8,snapkv:chunk_length=32,window=4,"
            "knorm:chunk_length=75", "--budgets", "2,3,50%", "-o", os.path.join(work, "n.json"),
            "--force")
    notes = [x for x in r.stderr.splitlines() if "keeps more than the budget" in x]
    want = ["knorm:chunk_length=8 keeps more than the budget at 2, 3 (19.0 entries per head at "
            "the first): each chunk of chunk_length= keeps at least one token",
            "snapkv:chunk_length=32,window=4 keeps more than the budget at 2, 3 (5.0 entries"]
    check(len(notes) == 2 and all(w in n for w, n in zip(want, notes)),
          "chunk floor notes: %r" % r.stderr)

    T = ["replay", a, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    refused(T + ["pyramidkv:chunk_length=16"], "unknown option 'chunk_length'")
    refused(T + ["elastic-cache:chunk_length=16"], "unknown option 'chunk_length'")
    refused(T + ["knorm:chunk_length=0"], "chunk_length=0: expected an integer")
    finish("test_chunk_length", work)


if __name__ == "__main__":
    main()
