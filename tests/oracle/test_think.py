#!/usr/bin/python3
"""test_think.py - think=R (ThinK's key channel pruning, replay/think.c) against NumPy written
from KVCache-Factory's key_pruner_query_driven and kvpress's ThinKPress: per selection head and
budget, q_c = mean of q_c^2 over the head's query heads and the last think_window window
queries, k_c = mean of k_c^2 over the kept entries; the floor(D*R) channels of smallest q_c*k_c
are zeroed in the keys of the kept entries before the last think_recent tokens.

For each spec: the kept sets equal the same policy's without think= (selection export); through
kvtrace.replay_sets, every entry's changed flag is idx < T - think_recent and its key is the
NumPy-pruned key bit for bit (channels whose scores lie within 1e-9 of the cut are counted as
ties and not judged), its value the token's own; n_keep counts a pruned entry as 1 - p/(2D)
(the memory it takes); and every head's err_window / err_decode equal
the output errors over those entries (test_merge.merged_errors). Then the refusals.

Traces (cli_test.score_traces): a llama2.c capture (T = 150, 8 query heads on 4 KV heads, D = 8,
window 8, 2 decode steps) and a llama3-8b-shaped synthetic one (T = 300, GQA 4, D = 128).
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, refused,  # noqa: E402
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_merge import ErrTally, merged_errors, read_layers, replay_kept  # noqa: E402

kvtrace = need_library()
from kvtrace import _replay_sets  # noqa: E402


def opts_of(spec):
    _, _, o = spec.partition(":")
    return dict(x.split("=", 1) for x in o.split(",") if x)


def base_of(spec):
    """The spec without its think options (and label): the plain policy."""
    name, _, o = spec.partition(":")
    rest = [x for x in o.split(",") if x and not x.startswith(("think", "label="))]
    return name + (":" + ",".join(rest) if rest else "")


def think_keys(x, g, qh, idx, ratio, window, recent):
    """The pruned keys of KV head g's kept entries idx (ascending): (keys [n, D] in float32,
    changed [n], the number of channels whose score ties the cut within 1e-9)."""
    K = x["K"][g]  # float64 of the stored keys
    T, D = K.shape
    Qw = x["Q_window"][list(qh), -window:]  # [nq, window, D]
    qn = (Qw ** 2).mean(axis=(0, 1))
    kn = (K[idx] ** 2).mean(axis=0) if len(idx) else np.zeros(D)
    s = qn * kn
    n = int(math.floor(D * ratio))
    order = np.lexsort((np.arange(D), s))  # ascending score, then channel
    ties = 0
    if 0 < n < D:
        cut = (s[order[n - 1]] + s[order[n]]) / 2
        ties = int((np.abs(s - cut) <= 1e-9 * max(abs(cut), 1e-300)).sum())
    keys = K[idx].astype(np.float32)
    changed = idx < T - recent if n > 0 else np.zeros(len(idx), bool)
    keys[np.ix_(changed, order[:n])] = 0.0
    return keys, changed, ties


def check_trace(name, path, specs, budgets, work):
    bases = sorted({base_of(s) for s in specs} - set(specs))
    labels, kept, r = replay_kept(path, specs + bases, budgets, work)
    tr = r["traces"][0]
    with kvtrace.open(path) as t:
        m = t.header["model"]
        Hq, Hkv, L, T = m["n_q_heads"], m["n_kv_heads"], m["n_layers"], t.header["n_tokens"]
        scale = m.get("attn_scale") or 1 / math.sqrt(m["head_dim"])
        layers = read_layers(t)
    G = Hq // Hkv
    for spec in specs:
        o = opts_of(spec)
        ratio, window = float(o["think"]), int(o.get("think_window", 32))
        recent = int(o.get("think_recent", 32))
        pi = labels.index(spec)
        got = _replay_sets.replay_sets(path, spec, budgets)
        runs = [x for x in tr["runs"] if x["policy"] == pi]
        check(r["settings"]["policies"][pi]["merged"], "%s %s: merged in results.json"
              % (name, spec))
        bad_sets = bad_keys = n_sets = ties = not_null = bad_nkeep = 0
        tally = ErrTally(name, spec)
        for b, run_ in enumerate(runs):
            B = run_["budget_tokens"]
            per_q = run_["granularity"] == "query_head"
            for l in range(L):
                x = layers[l]
                for h in range(run_["n_heads"]):
                    n_sets += 1
                    ks = kept[(spec, l, h, B)]
                    if ks != kept[(base_of(spec), l, h, B)]:
                        bad_sets += 1
                    g = h // G if per_q else h
                    qh = [h] if per_q else range(g * G, (g + 1) * G)
                    idx = np.array(ks, dtype=int)
                    keys, changed, tie = think_keys(x, g, qh, idx, ratio, window, recent)
                    ties += tie
                    mine = got[(0, b, l, h, -1)]
                    ok = (np.array_equal(mine.idx, idx) and np.array_equal(mine.changed, changed)
                          and np.array_equal(mine.v, x["V"][g][idx[changed]].astype(np.float32)))
                    if ok and not tie:
                        ok = np.array_equal(mine.k, keys[changed])
                    if not ok:
                        bad_keys += 1
                        if bad_keys <= 3:
                            print("  %s %s B %d layer %d head %d: the replay's entries differ"
                                  % (name, spec, B, l, h))
                    mk = x["K"][g][idx].copy()
                    mk[changed] = mine.k  # the replay's keys (judged above, ties aside)
                    tally.add(run_, l, h, merged_errors(x, g, qh, idx, mk, x["V"][g][idx],
                                                        scale))
                    if run_["metrics"]["recall_window"][l][h] is not None:
                        not_null += 1
                    # the memory kept: a pruned entry counts 1 - p/(2D)
                    D = keys.shape[1]
                    share = int(math.floor(D * ratio)) / (2.0 * D)
                    if run_["metrics"]["n_keep"][l][h] != len(idx) - int(changed.sum()) * share:
                        bad_nkeep += 1
        print("%s %s: %d sets, %d differ from %s's, %d with other entries; %d tied channels; "
              "%s; %d recalls not null; %d n_keep not the memory kept" % (
                  name, spec, n_sets, bad_sets, base_of(spec), bad_keys, ties, tally.summary(),
                  not_null, bad_nkeep))
        check(n_sets > 0 and bad_sets == 0 and bad_keys == 0 and tally.n > 0 and tally.bad == 0
              and not_null == 0 and bad_nkeep == 0, "%s %s" % (name, spec))
    return T


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True)
        check_trace("llama2c", a, [
            "snapkv:window=8,think=0.4,think_window=8",
            "snapkv:window=8,think=0.5,think_window=4,think_recent=0",
            "snapkv:window=8,heads=query,think=0.25,think_window=8,think_recent=3",
            "pyramidkv:window=8,think=0.4,think_window=8",
            "h2o:window=8,think=0.6,think_window=8",
            "full:think=0.5,think_window=8,think_recent=0",
            "knorm:think=0.4,think_window=8"], "3,20,64,50%,150", work)
        check_trace("llama3-8b", s, [
            "snapkv:think=0.4", "snapkv:think=0.4,think_recent=0",
            "adakv:think=0.3,heads=query", "streamingllm:think=0.5",
            "snapkv:think=0.1,think_window=16"], "16,40,100,200", work)
        refused(["replay", a, "--policies", "snapkv:think=0.4,merge=pivot", "--budgets", "20",
                 "-o", os.path.join(work, "x.json")],
                "think= prunes the key channels of a set of prompt tokens, and merge=pivot")
        refused(["replay", a, "--policies", "lookm:think=0.4", "--budgets", "20", "-o",
                 os.path.join(work, "x.json")], "merge=pivot merges entries")
        refused(["replay", a, "--policies", "snapkv:window=8,think_recent=4", "--budgets", "20",
                 "-o", os.path.join(work, "x.json")],
                "think_recent= is an option of think=, which is off")
        refused(["replay", a, "--policies", "quest:think=0.4", "--budgets", "20", "-o",
                 os.path.join(work, "x.json")], "quest: unknown option 'think'")
        refused(["replay", a, "--policies", "lightkv-like:think=0.4", "--budgets", "20", "-o",
                 os.path.join(work, "x.json")], "lightkv-like: unknown option 'think'")
        refused(["replay", a, "--policies", "snapkv:window=8,think=1.5", "--budgets", "20",
                 "-o", os.path.join(work, "x.json")], "think=1.5")
        refused(["replay", a, "--policies", "snapkv:window=8,think=0.4", "--budgets", "20",
                 "-o", os.path.join(work, "x.json")],
                "think_window=32 needs 32 stored window queries; the trace has 8")
    finish("test_think")


if __name__ == "__main__":
    main()
