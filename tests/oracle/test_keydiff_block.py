#!/usr/bin/python3
"""test_keydiff_block.py - `kvtrace replay --policy keydiff-block` against NumPy written from
kvpress's BlockPress.compress (kvpress/presses/block_press.py @0603dec) over KeyDiffPress.score
(keydiff_press.py @08a43bf):

    kept = tokens [0, N)
    for each block [i, i + block_size), i = N, N + block_size, ... < T:
        candidates = kept + block
        score = -cosine_similarity(k, mean of the candidates' L2-normalised keys)
        kept = the N candidates of highest score
    the last kept set is the cache

per KV head, in float64 over the trace's float32 keys; scores rounded to a multiple of 2^-30
and ties to the earlier token, as kvtrace documents (two candidates are always equally like
their mean: only the rounding would tell them apart; torch.topk leaves ties unspecified).
Budgets of T or more keep everything.

Then the metrics of the per-budget sets (a ranking per budget, measured budget by budget) are
checked against a second path: for each budget, `external` given a scores file that is 1 on
that budget's kept set and 0 elsewhere keeps the same sets, and every metric grid of its replay
(recall and output error for the window and decode queries, coverage, overlaps, r_kept) must
equal keydiff-block's at that budget. Also: the sets are not nested across budgets (or the
per-budget form would not be needed), and a block of 0 is refused.

Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, replay_export,  # noqa: E402
                      run, score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()


def keydiff(K):
    """-cos(k_j, mean normalised key) of the candidates K [n, D] (F.normalize: eps 1e-12;
    F.cosine_similarity: eps 1e-8)."""
    n = np.linalg.norm(K, axis=-1)
    a = (K / np.maximum(n, 1e-12)[:, None]).mean(axis=0)
    return -(K @ a) / np.maximum(n * np.linalg.norm(a), 1e-8)


def block_press(K, N, bs):
    """The kept set of one KV head (K [T, D]) at budget N."""
    T = K.shape[0]
    if N >= T:
        return set(range(T))
    kept = list(range(N))
    for i in range(N, T, bs):
        cand = kept + list(range(i, min(i + bs, T)))
        s = np.round(keydiff(K[cand]) * 2.0 ** 30) / 2.0 ** 30  # kvtrace's tie grid
        order = sorted(range(len(cand)), key=lambda t: (-s[t], cand[t]))
        kept = sorted(cand[t] for t in order[:N])
    return set(kept)


def compare(name, path, spec, budgets, work, bs=128, per_query=False):
    exp = replay_export(path, spec, budgets, work)
    recs = exp["records"]
    bad, cache = 0, {}
    with kvtrace.open(path) as t:
        m = t.header["model"]
        G = m["n_q_heads"] // m["n_kv_heads"] if per_query else 1
        for r in recs:
            key = (r["layer"], r["head"] // G, r["budget_tokens"])
            if key not in cache:
                K = t.read("K", r["layer"], dtype="float32").astype(np.float64)
                cache[key] = block_press(K[key[1]], key[2], bs)
            if cache[key] != set(r["kept"]):
                bad += 1
                if bad <= 3:
                    print("  %s %s layer %d head %d B %d: check %s, replay %s" % (
                        name, spec, r["layer"], r["head"], r["budget_tokens"],
                        sorted(cache[key] - set(r["kept"]))[:8],
                        sorted(set(r["kept"]) - cache[key])[:8]))
    print("%s %s: %d sets, %d differ" % (name, spec, len(recs), bad))
    check(recs and bad == 0, "%s %s: %d of %d kept sets differ" % (name, spec, bad, len(recs)))
    return recs


def not_nested(recs):
    """(layer, head) pairs whose set at a smaller budget is not inside the set at a larger one."""
    by = {}
    for r in recs:
        by.setdefault((r["layer"], r["head"]), []).append((r["budget_tokens"], set(r["kept"])))
    n = 0
    for sets in by.values():
        sets.sort(key=lambda x: x[0])
        n += any(not a[1] <= b[1] for a, b in zip(sets, sets[1:]))
    return n


def grids(res):
    """{budget_tokens: {metric: [L][H] grid}} of the one policy of a results.json."""
    return {r["budget_tokens"]: r["metrics"] for r in res["traces"][0]["runs"]}


def same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12 * max(1, abs(a))


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        budgets = "1,3,10,40,50%,149,200"
        recs = compare("llama2c", a, "keydiff-block", budgets, work)
        for bs in (1, 16, 37):
            recs += compare("llama2c", a, "keydiff-block:block=%d" % bs, budgets, work, bs=bs)
        compare("llama2c", a, "keydiff-block:block=16,heads=query", budgets, work, bs=16,
                per_query=True)
        compare("llama3-8b", s, "keydiff-block:block=64", "8,60,50%", work, bs=64)
        nn = not_nested(recs)
        print("(layer, head) pairs with sets not nested across budgets: %d" % nn)
        check(nn > 10, "only %d (layer, head) pairs with non-nested sets" % nn)

        # every metric of each budget's set, against external keeping exactly that set
        out = os.path.join(work, "kdb.json")
        run("replay", a, "--policy", "keydiff-block:block=16", "--budgets", "3,10,40", "-o", out,
            "--force")
        with open(out) as f:
            kdb = grids(json.load(f))
        sel = replay_export(a, "keydiff-block:block=16", "3,10,40", work)
        with kvtrace.open(a) as t:
            m = t.header["model"]
            L, H, T = m["n_layers"], m["n_kv_heads"], t.header["n_tokens"]
        n_same = 0
        for B in (3, 10, 40):
            sc = np.zeros((L, H, T), np.float32)
            for r in sel["records"]:
                if r["budget_tokens"] == B:
                    sc[r["layer"], r["head"], r["kept"]] = 1.0
            f = os.path.join(work, "ext%d.npy" % B)
            np.save(f, sc)
            eo = os.path.join(work, "ext%d.json" % B)
            run("replay", a, "--policy", "external:scores=" + f, "--budgets", str(B), "-o", eo,
                "--force")
            with open(eo) as fh:
                ext = grids(json.load(fh))[B]
            for k, g in kdb[B].items():
                ok = same(g, ext[k])
                n_same += ok
                check(ok, "budget %d: %s differs from external's on the same sets" % (B, k))
        print("metric grids equal to external's on the same sets: %d" % n_same)

        r = run("replay", a, "--policy", "keydiff-block:block=0", "--budgets", "8", "-o",
                os.path.join(work, "x.json"), "--force", ok=False)
        check(r.returncode == 2 and "block" in r.stderr and
              len(r.stderr.strip().splitlines()) == 1, "block=0: %d %r" % (r.returncode, r.stderr))
    finish("test_keydiff_block")


if __name__ == "__main__":
    main()
