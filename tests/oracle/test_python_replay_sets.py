#!/usr/bin/python3
"""test_python_replay_sets.py - kvtrace.replay_sets: a replay's kept sets in this process,
merged keys and values included (kvt_replay_sets).

A synthetic vision-language trace (tiny-vl, GQA 4/2, decode steps) is replayed by the CLI with
--export-selection and by kvtrace.replay_sets with the same policies, budgets and seed: a
KV-head policy, a query-head one, a per-step one (quest), a merged one per KV head
(snapkv:merge=pivot), a merged one per query head (merge=weighted) and lightkv-like (merged
vision tokens). Checked:
  * every set of the export is replay_sets' (same keys, indices, steps), and nothing more;
  * query_head is the export's granularity; changed, k and v are None for plain policies;
  * a merged set's keys and values are KVCache-Factory's merge_kv written here in NumPy:
    every dropped token goes into the kept entry of the most similar key (cosine, ties to the
    lower index), pivot: x'_r = (x_r + sum_j (x_j + x_r) / 2) / (1 + n_r), weighted:
    x'_r = (x_r + sum_j w_j x_j) / (1 + sum_j w_j), w_j = max((cos_j + 1) / 2, 1e-6); changed
    marks exactly the entries that received a token;
  * a bad spec, a bad budget list and a missing trace raise TraceError with the library's
    message.
Environment (tests/cmake/python.cmake): KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT. Exit 77 without
NumPy or the CLI."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import check, finish, raises, run  # noqa: E402 - exits 77 without NumPy/CLI
import numpy as np  # noqa: E402
import kvtrace  # noqa: E402

SPECS = ["snapkv:window=8", "snapkv:window=8,heads=query,label=snapq", "quest:page=4",
         "snapkv:window=8,merge=pivot,label=pivot",
         "snapkv:window=8,merge=weighted,heads=query,label=wq", "lightkv-like:window=8"]
BUDGETS = "12,40,50%"


def merge_kv(K, V, kept, mode):
    """KVCache-Factory's merge_kv of one head's kept set: (changed [n], K' , V' [n, D])."""
    u = K / np.maximum(np.linalg.norm(K, axis=1, keepdims=True), 1e-6)
    n = len(kept)
    dropped = np.setdiff1d(np.arange(K.shape[0]), kept)
    ak, av, ws = np.zeros((n, K.shape[1])), np.zeros((n, V.shape[1])), np.zeros(n)
    for j in dropped:
        cos = u[kept] @ u[j]
        r = int(np.argmax(cos))  # the first of equals: the lower token index
        w = 1.0 if mode == "pivot" else max((cos[r] + 1) / 2, 1e-6)
        if mode == "pivot":
            ak[r] += (K[j] + K[kept[r]]) / 2
            av[r] += (V[j] + V[kept[r]]) / 2
        else:
            ak[r] += w * K[j]
            av[r] += w * V[j]
        ws[r] += w
    Kn = (K[kept] + ak) / (1 + ws)[:, None]
    Vn = (V[kept] + av) / (1 + ws)[:, None]
    return ws > 0, Kn, Vn


with tempfile.TemporaryDirectory() as tmp:
    tr = os.path.join(tmp, "vl.kvt")
    run("synth", "--shape", "tiny-vl", "--tokens", "96", "--window", "8", "--decode", "4",
        "--dtype", "f32", "--seed", "4", "-o", tr)
    res, sel_path = os.path.join(tmp, "r.json"), os.path.join(tmp, "sel.bin")
    run("replay", tr, "--policies", ",".join(SPECS), "--budgets", BUDGETS, "--seed", "3",
        "-o", res, "--export-selection", sel_path)
    sets = kvtrace.replay_sets(tr, ",".join(SPECS), BUDGETS, seed=3)
    with kvtrace.read_selection(sel_path) as sel:
        recs = list(sel.records())
        gran = [p["query_heads"] for p in sel.policies]
        merged = [p["merged"] for p in sel.policies]
    keys = {(r["policy"], r["budget"], r["layer"], r["head"], r["step"]) for r in recs}
    bad = [r for r in recs if not np.array_equal(
        sets[(r["policy"], r["budget"], r["layer"], r["head"], r["step"])].idx, r["kept"])] \
        if keys <= set(sets) else recs
    check(set(sets) == keys and not bad and len(keys) > 100,
          "every set of the export (%d) is replay_sets' (%d), index for index; %d differ"
          % (len(keys), len(sets), len(bad)))
    check(any(k[4] >= 0 for k in sets if k[0] == 2), "quest: sets per decode step")
    check(all(ks.query_head == gran[k[0]] for k, ks in sets.items()),
          "query_head is the export's granularity")
    check(all((ks.changed is None) == (not merged[k[0]]) and
              ((ks.k is None) == (ks.changed is None)) for k, ks in sets.items()),
          "changed, k and v only for the merged policies")

    with kvtrace.open(tr) as t:
        L, Hq, Hkv = (t.header["model"][k] for k in ("n_layers", "n_q_heads", "n_kv_heads"))
        KV = [(t.read("K", layer=l, dtype="float32").astype(np.float64),
               t.read("V", layer=l, dtype="float32").astype(np.float64)) for l in range(L)]
    worst, n_sets, n_chg = 0.0, 0, 0
    for (p, b, layer, head, step), ks in sets.items():
        if SPECS[p].split(":")[1].find("merge=") < 0:
            continue
        g = head // (Hq // Hkv) if ks.query_head else head
        K, V = KV[layer][0][g], KV[layer][1][g]
        chg, Kn, Vn = merge_kv(K, V, ks.idx, "pivot" if "pivot" in SPECS[p] else "weighted")
        ok = np.array_equal(chg, ks.changed)
        if ok and chg.any():
            worst = max(worst, float(np.abs(Kn[chg] - ks.k).max()),
                        float(np.abs(Vn[chg] - ks.v).max()))
        else:
            worst = max(worst, 0.0 if ok else np.inf)
        n_sets += 1
        n_chg += int(chg.sum())
    check(n_sets == 3 * L * (Hkv + Hq), "%d merged sets checked (3 budgets x %d layers x "
          "(%d KV heads + %d query heads))" % (n_sets, L, Hkv, Hq))
    check(worst < 1e-5 and n_chg > 0,
          "merged keys and values are merge_kv's (pivot per KV head, weighted per query "
          "head): %d changed entries, largest difference %.3g" % (n_chg, worst))
    lk = [ks for k, ks in sets.items() if k[0] == 5]
    check(lk and all(ks.changed is not None for ks in lk) and any(ks.changed.any() for ks in lk),
          "lightkv-like: merged vision tokens handed over")

    raises(kvtrace.TraceError, lambda: kvtrace.replay_sets(tr, "nope", "8"),
           "unknown policy 'nope'", "an unknown policy")
    raises(kvtrace.TraceError, lambda: kvtrace.replay_sets(tr, "snapkv", "0"), "budget",
           "a bad budget list")
    raises(kvtrace.TraceError, lambda: kvtrace.replay_sets(os.path.join(tmp, "no.kvt"),
                                                           "snapkv", "8"),
           "no.kvt", "a missing trace")
finish("test_python_replay_sets")
