#!/usr/bin/python3
"""test_duo_simlayer.py - `duo-attention` and `simlayerkv` against NumPy written from kvpress.

DuoAttentionPress (kvpress/presses/duo_attention_press.py @00a150c), with its head scores from a
file as load_attention_pattern reads them (np.loadtxt of full_attention_heads.tsv, clipped to
[0, 1]): n_pruned = round(N * head_compression_ratio) of the N = layers x KV heads heads, the
first n_pruned of np.argsort(scores, axis=None), stream: the attention masks their keys
[sink_size : -recent_size], the rest keep every key. The check takes kvpress's ratio r and
replays kvtrace at the budget B = T - floor(n * (T - sinks - recent) / N), n = round(N r), which
analysis/KVPRESS.md gives for it: kvtrace must stream exactly kvpress's heads (ties: argsort
with kind="stable", kvtrace's lower (layer, head) first; numpy's default leaves them
unspecified). Budgets in tokens are checked too, against n = ceil(N (T - B) / (T - sinks -
recent)).

SimLayerKVPress (kvpress/presses/simlayerkv_press.py @adca7bb): SnapKV's compute_window_attention
of the last n_last queries (softmax over all T keys, causal inside the window, the last n_last
key columns dropped), averaged over the query heads and those queries; lazy when the sum of the
first n_initial columns and the last n_recent is above lazy_threshold; a lazy layer keeps keys
[:n_initial] and [-n_recent + n_last:]; no compression if T <= n_initial + n_recent + n_last or
lazy_threshold == 1. kvtrace's budget B is the lazy cache, n_initial + n_recent - n_last. The
thresholds are picked between the layers' own scores so that lazy and busy layers both occur.

Traces: a llama2.c capture (T = 150, 5 layers, 8 query heads on 4 KV heads) and a
llama3-8b-shaped synthetic one (T = 300, 2 layers, GQA 4). Every exported kept set must equal
the check's. Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or
the library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, replay_export,  # noqa: E402
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from replay_oracle import window_probs  # noqa: E402

kvtrace = need_library()


def shape_of(path):
    with kvtrace.open(path) as t:
        m = t.header["model"]
        return (t.header["n_tokens"], m["n_layers"], m["n_q_heads"], m["n_kv_heads"],
                m["head_dim"], m.get("attn_scale"))


def compare_sets(name, spec, recs, want_of):
    """Each export record's kept set against want_of(record) (a set of token indices)."""
    bad = 0
    for r in recs:
        want = want_of(r)
        if want != set(r["kept"]):
            bad += 1
            if bad <= 3:
                print("  %s %s layer %d head %d B %d: check %d tokens, replay %d; missing %s, "
                      "extra %s" % (name, spec, r["layer"], r["head"], r["budget_tokens"],
                                    len(want), len(r["kept"]), sorted(want - set(r["kept"]))[:8],
                                    sorted(set(r["kept"]) - want)[:8]))
    print("%s %s: %d sets, %d differ" % (name, spec, len(recs), bad))
    check(recs and bad == 0, "%s %s: %d of %d kept sets differ" % (name, spec, bad, len(recs)))


# ---- DuoAttention ----

def duo_mask(scores, n_pruned):
    """kvpress's streaming_mask [L, Hkv] (stable argsort: ties to the lower (layer, head))."""
    hs = np.clip(scores, 0, 1)
    mask = np.zeros(hs.shape, dtype=bool)
    if n_pruned > 0:
        idx = np.argsort(hs, axis=None, kind="stable")[:n_pruned]
        mask[np.unravel_index(idx, hs.shape)] = True
    return mask


def duo_keep(T, sink, recent, streams):
    """The keys a head keeps: a streaming head loses [sink : -recent] (kvpress's slice)."""
    keep = np.ones(T, dtype=bool)
    if streams:
        keep[sink:T - recent] = False  # (recent >= 1 here: -recent is T - recent)
    return set(np.flatnonzero(keep).tolist())


def check_duo(name, path, scores, sink, recent, ratios, budgets, work, fmt, heads="kv"):
    T, L, Hq, Hkv, D, _ = shape_of(path)
    N = L * Hkv
    span = T - sink - recent
    f = os.path.join(work, "duo." + fmt)
    if fmt == "npy":
        np.save(f, scores.astype(np.float32))
        scores = scores.astype(np.float32).astype(np.float64)
    else:  # DuoAttention's own format (np.savetxt, tab-separated)
        np.savetxt(f, scores, delimiter="\t")
    spec = "duo-attention:sinks=%d,recent=%d,scores=%s%s" % (
        sink, recent, f, ",heads=query" if heads == "query" else "")
    # kvpress's ratios, as the budgets KVPRESS.md gives for them; then plain token budgets
    want_n = {}
    for r in ratios:
        n = round(N * r)
        B = T - (n * span) // N if span > 0 else T
        want_n.setdefault(B, n)
        check(want_n[B] == n or span <= 0, "%s: ratios %s give budget %d twice" % (name, ratios, B))
    for B in budgets:
        want_n.setdefault(B, 0 if span <= 0 or B >= T else min(N, -(-N * (T - B) // span)))
    blist = sorted(want_n)
    exp = replay_export(path, spec, ",".join(map(str, blist)), work)
    G = Hq // Hkv if exp["policies"][0]["granularity"] == "query_head" else 1
    masks = {B: duo_mask(scores, want_n[B]) for B in blist}

    def want_of(rec):
        streams = masks[rec["budget_tokens"]][rec["layer"], rec["head"] // G]
        return duo_keep(T, sink, recent, streams and span > 0)
    compare_sets(name, spec, exp["records"], want_of)
    n_stream = {B: int(masks[B].sum()) for B in blist}
    return n_stream


# ---- SimLayerKV ----

def lazy_score(t, layer, scale, last, sinks, B):
    """kvpress's is_lazy score at n_initial = sinks, n_recent = B - sinks + last."""
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    Qw = t.read("Q_window", layer, dtype="float32").astype(np.float64)
    T = K.shape[1]
    Pr = window_probs(K, Qw, scale)[:, -last:, :T - last]  # the last n_last queries, keys[:-n_last]
    a = Pr.mean(axis=(0, 1))
    n_recent = B - sinks + last
    return a[:sinks].sum() + a[-n_recent:].sum()


def simlayer_keep(T, B, sinks, last, thr, score):
    n_recent = B - sinks + last
    if thr == 1.0 or T <= sinks + n_recent + last:
        return set(range(T))
    if score > thr:
        return set(range(sinks)) | set(range(T - n_recent + last, T))
    return set(range(T))


def check_simlayer(name, path, sinks, last, budgets, work, heads="kv"):
    T, L, Hq, Hkv, D, scale = shape_of(path)
    scale = scale or 1 / math.sqrt(D)
    with kvtrace.open(path) as t:
        sc = {(l, B): lazy_score(t, l, scale, last, sinks, B) for l in range(L) for B in budgets
              if B + 2 * last < T}
    vals = sorted(set(sc.values()))
    # thresholds: between the middle scores (some layers lazy, some not); 1e-6 below a score at
    # each quartile (kvtrace sums float32 probabilities: within 1e-6 of NumPy's, while one
    # column more or less moves a score by far more); below all; kvpress's "off"
    mid = len(vals) // 2
    thrs = [(vals[mid - 1] + vals[mid]) / 2 if len(vals) > 1 else 0.5]
    for q in (1, 2, 3):
        i = q * len(vals) // 4
        if 0 < i < len(vals) and vals[i] - vals[i - 1] > 3e-6:
            thrs.append(vals[i] - 1e-6)
    thrs += [0.0, 1.0]
    for thr in thrs:
        spec = "simlayerkv:sinks=%d,last=%d,threshold=%r%s" % (
            sinks, last, thr, ",heads=query" if heads == "query" else "")
        exp = replay_export(path, spec, ",".join(map(str, budgets)), work)

        def want_of(rec):
            B = rec["budget_tokens"]
            return simlayer_keep(T, B, sinks, last, thr, sc.get((rec["layer"], B), 0.0))
        compare_sets(name, spec, exp["records"], want_of)
        if thr == thrs[0]:
            lazy = sum(1 for v in sc.values() if v > thr)
            check(0 < lazy < len(sc), "%s %s: %d of %d (layer, budget) pairs lazy: the check "
                  "needs both kinds" % (name, spec, lazy, len(sc)))


def main():
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        # DuoAttention: gate scores with ties after clipping (negatives and values above 1)
        for path, name, sink, recent, fmt, heads in (
                (a, "llama2c", 4, 16, "tsv", "kv"), (a, "llama2c", 8, 40, "npy", "query"),
                (s, "llama3-8b", 16, 64, "tsv", "kv"), (s, "llama3-8b", 128, 256, "tsv", "kv")):
            T, L, Hq, Hkv, D, _ = shape_of(path)
            g = rng.uniform(-0.2, 1.2, size=(L, Hkv))
            g[0, 0] = -1e-4  # clipped to 0, tied with the next one
            g[-1, -1] = 0.0
            n_stream = check_duo(name, path, g, sink, recent, [0.0, 0.25, 0.5, 0.75, 1.0],
                                 [1, 37, T // 2, T - 1, T, T + 5], work, fmt, heads)
            if sink + recent < T:
                check(len(set(n_stream.values())) > 3, "%s duo: streaming counts %s" % (
                    name, n_stream))
        # SimLayerKV: kvpress's defaults on the short prompts, and other n_last / n_initial
        for path, name, sinks, last, heads in ((a, "llama2c", 4, 1, "kv"),
                                               (a, "llama2c", 2, 3, "query"),
                                               (s, "llama3-8b", 4, 1, "kv"),
                                               (s, "llama3-8b", 8, 4, "kv")):
            T = shape_of(path)[0]
            check_simlayer(name, path, sinks, last, [sinks + 1, 16, 40, T // 2, T - 2, T],
                           work, heads)
    finish("test_duo_simlayer")


if __name__ == "__main__":
    main()
