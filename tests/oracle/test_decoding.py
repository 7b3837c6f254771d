#!/usr/bin/python3
"""test_decoding.py - decoding=N (kvpress's DecodingPress, presses/generation/decoding_press.py
@173dd74, over KnormPress, KeyDiffPress and QFilterPress) and prefill=1 (PrefillDecodingPress
with the same press at prefill), against NumPy written from the press:

- the cache starts as the whole prompt (prefill=1: the press's top B prompt tokens);
- decode step s's token joins it and step s's query attends to it;
- after every N-th step (the forward hook runs after the attention) a cache of more than B
  entries keeps the B the press scores highest over the whole cache, prompt and decode keys
  alike (-||k||; -cos(k, the mean of the cache's unit keys); -<f, k>), ties to the earlier
  token; a cache of at most B entries stays (DecodingPress's ratio 0).

Checked: every exported per-step set (the cache step s's query sees: prompt tokens j < T and
decode tokens T + s'), and recall_decode, err_decode and n_keep (the mean over the steps of the
prompt tokens in that cache) of every layer and head against the full softmax in double (the
trace's decode queries over the prompt keys and decode keys 0..s). A cache that never
compresses within the trace's steps (decoding=1000) with prefill=1 must measure what the plain
policy measures, and a budget above T + G the full cache. Then the refusals, and results.json
listing decoding= and prefill= only when given.

decoding=N over TOVAPress (tova): TOVAPress reads the last buffered hidden state, step s's
token at its own position, so after step s's attention each cache entry scores its softmax
probability under step s's query over the cache (prompt and decode keys alike), the mean over
every query head of the layer; the newest token is kept first (kvpress pads it with the
maximum); one cache per layer (all KV heads gather the same indices). prefill=1 starts from
TOVAPress's prompt set: the last prompt query's attention over the prompt. With N = 1 and
prefill=1 this is TOVA's own eviction (arXiv 2401.06104): one token leaves per step.

dms_decoding=1 (kvpress's DMSPress with decoding=True, dms_press.py @36385e2, over KnormPress
and QFilterPress): the prefill set is dms='s (capped at the budget); after each decode step s
the token at T + s - dms_window leaves the sliding window and is evicted if it is still cached
and its key's own score is below the threshold. The same checks, and a hand-worked cache.
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (ROOT, check, check_sets, copy_trace, finish, need_library,  # noqa: E402
                      refused, run)  # (77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_dms import dms_kept, threshold  # noqa: E402

kvtrace = need_library()


def cache_scores(kind, keys, f=None, ent=None):
    """The press's scores [n] of the cache's keys [n, D] (double), entries ent [n]."""
    if kind == "streamingllm":  # the sinks (4), then the most recent
        return np.array([np.inf if e < 4 else e for e in ent], dtype=float)
    if kind == "knorm":
        return -np.linalg.norm(keys, axis=-1)
    if kind == "keydiff":
        ku = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
        m = ku.mean(axis=0)
        nm = np.linalg.norm(m)
        return -(ku @ m) / nm if nm > 1e-9 else np.zeros(len(keys))
    return -(keys @ f)


def top(scores, ent, B):
    """The B entries of ent scoring highest, ties to the earlier entry, ascending."""
    order = sorted(range(len(ent)), key=lambda i: (-scores[i], ent[i]))
    return sorted(ent[i] for i in order[:B])


def decode_steps(cache, T, G, B, N, score):
    """DecodingPress from the prompt-time set `cache`: [G] the entries (ascending) decode query
    s sees; after every N-th step a cache of more than B keeps the B that score(cache, s)
    ranks highest."""
    seen, since = [], 0
    for s in range(G):
        cache = cache + [T + s]
        seen.append(sorted(cache))
        since += 1
        if since < N:
            continue
        since = 0
        if len(cache) > B:
            cache = top(score(cache, s), cache, B)
    return seen


def caches(kind, K, Kd, B, N, prefill, f=None):
    """[G] the entries (ascending) decode query s sees, for one head's keys K [T, D] and decode
    keys Kd [G, D]."""
    T, G = len(K), len(Kd)
    allk = np.concatenate([K, Kd])
    cache = (top(cache_scores(kind, K, f, range(T)), list(range(T)), B) if prefill
             else list(range(T)))
    return decode_steps(cache, T, G, B, N,
                        lambda c, s: cache_scores(kind, allk[c], f, c))


def measures(Qd, K, V, Kd, Vd, scale, seen):
    """recall, err, kept prompt tokens of one query head's decode steps on the caches seen."""
    T, G = len(K), len(Qd)
    rec = err = kept = 0.0
    for s in range(G):
        keys = np.concatenate([K, Kd[:s + 1]])
        vals = np.concatenate([V, Vd[:s + 1]])
        z = keys @ Qd[s] * scale
        p = np.exp(z - z.max())
        p /= p.sum()
        o = p @ vals
        S = np.array(seen[s])
        mass = p[S].sum()
        rec += mass
        err += np.linalg.norm(p[S] @ vals[S] / mass - o) / np.linalg.norm(o) if mass > 0 else 1.0
        kept += np.sum(S < T)
    return rec / G, err / G, kept / G


def dms_caches(sc, T, G, W, Wd, tau, B):
    """DMSPress(decoding=True): [G] the entries decode query s sees, for one head's scores sc
    [T + G] of each key alone: the prefill set (dms=, capped at B), then after each step s
    the token T + s - Wd leaves the window, evicted if still cached and scoring below tau."""
    start, _ = dms_kept(sc[:T], T, W, Wd, tau, B)
    last = {e: G - 1 for e in start}
    last.update({T + d: G - 1 for d in range(G)})
    seen = []
    for s in range(G):
        seen.append([e for e in range(T + s + 1) if last.get(e, -1) >= s])
        e = T + s - Wd
        if e >= 0 and last.get(e, -1) >= s and sc[e] < tau:
            last[e] = s
            EVICTED[0] += 1
    return seen


EVICTED = [0]  # tokens dms_caches evicted while decoding


def softmax_rows(z):
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def tova_caches(Qw, Qd, K, Kd, scale, B, N, prefill):
    """DecodingPress(TOVAPress): [G] the entries (ascending) decode query s sees in the layer's
    cache, from the window queries Qw [Hq, W, D], decode queries Qd [Hq, G, D] and the KV heads'
    keys K [Hkv, T, D] and decode keys Kd [Hkv, G, D] (double)."""
    Hq, Hkv, T, G = len(Qd), len(K), K.shape[1], Kd.shape[1]
    grp = Hq // Hkv
    allk = np.concatenate([K, Kd], axis=1)
    if prefill:  # TOVAPress at prefill: the last prompt query over the prompt, head mean
        p = np.mean([softmax_rows(K[u // grp] @ Qw[u, -1] * scale) for u in range(Hq)], axis=0)
        p[T - 1] = np.inf
        cache = top(p, list(range(T)), B)
    else:
        cache = list(range(T))

    def score(c, s):  # step s's query over the cache, the head mean; its own token first
        sc = np.mean([softmax_rows(allk[u // grp][c] @ Qd[u, s] * scale) for u in range(Hq)],
                     axis=0)
        sc[c.index(T + s)] = np.inf
        return sc
    return decode_steps(cache, T, G, B, N, score)


def rolling(name, path, work, budgets):
    """streamingllm:decoding=1,prefill=1 against StreamingLLM's StartRecentKVCache in closed
    form: step s's query sees the 4 sinks and tokens T + s - (B - 4) .. T + s (the cache
    trimmed to the sinks and the last B - 4 after each step's forward, plus step s's token)."""
    sel = os.path.join(work, "sel.json")
    run("replay", path, "--policy", "streamingllm:decoding=1,prefill=1", "--budgets", budgets,
        "--export-selection", sel, "-o", os.path.join(work, "r.json"), "--force")
    with open(sel) as fh:
        recs = json.load(fh)["records"]
    with kvtrace.open(path) as t:
        T = t.header["n_tokens"]
    n = 0
    for r in recs:
        B, s = r["budget_tokens"], r["step"]
        if s < 0:
            want = sorted(set(range(min(4, B))) | set(range(max(T - (B - 4), 0), T)))
        else:
            want = sorted(set(range(4)) | set(range(max(T + s - (B - 4), 0), T + s + 1)))
        check(r["kept"] == want, "%s rolling cache B %d step %d: %s, want %s"
              % (name, B, s, r["kept"][:8], want[:8]))
        n += 1
    print("%s streamingllm:decoding=1,prefill=1: %d sets are StartRecentKVCache's" % (name, n))


def compare_tova(name, path, work, N, prefill, budgets, per_query=False):
    """tova:decoding=N (prefill=1): every exported step set (each head the layer's cache) and
    the decode metrics; returns the tokens the caches evicted while decoding."""
    spec = "tova:decoding=%d%s%s" % (N, ",prefill=1" if prefill else "",
                                     ",heads=query" if per_query else "")
    memo, evicted = {}, [0]

    def seen_of(rd, layer, B, h, g, scale):
        if (layer, B) not in memo:
            seen = tova_caches(rd["Q_window"], rd["Q_decode"], rd["K"], rd["K_decode"],
                               scale, B, N, prefill)
            evicted[0] += sum(len(seen[s]) + 1 - len(seen[s + 1]) for s in range(len(seen) - 1))
            check(all(len(x) <= max(B, rd["K"].shape[1]) + N for x in seen), "tova cache sizes")
            memo[(layer, B)] = seen
        return memo[(layer, B)]
    check_caches(name, path, work, spec, budgets, per_query, seen_of)
    print("%s %s: %d tokens evicted while decoding" % (name, spec, evicted[0]))
    return evicted[0]



def check_caches(name, path, work, spec, budgets, per_query, seen_of):
    """Replay spec with --export-selection; every exported step set against seen_of(rd, layer,
    B, h, g, scale)[step] (rd: the layer's tensors in double, B the budget's tokens, h the
    selection head on KV head g, scale the softmax's), and recall_decode, err_decode and n_keep of every layer and head
    against measures() over those caches. Returns results.json's runs."""
    sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
    run("replay", path, "--policy", spec, "--budgets", budgets, "--export-selection", sel,
        "-o", res, "--force")
    with open(sel) as fh:
        recs = json.load(fh)["records"]
    with open(res) as fh:
        runs = json.load(fh)["traces"][0]["runs"]
    pairs, worst = [], 0.0
    with kvtrace.open(path) as t:
        m = t.header["model"]
        Hq, Hkv = m["n_q_heads"], m["n_kv_heads"]
        grp = Hq // Hkv
        scale = m.get("attn_scale") or 1 / np.sqrt(m["head_dim"])
        for layer in t.layers():
            rd = {k: t.read(k, layer, dtype="float32").astype(np.float64)
                  for k in ("K", "V", "K_decode", "V_decode", "Q_decode", "Q_window")}
            for run_ in runs:
                B = run_["budget_tokens"]
                for h in range(Hq if per_query else Hkv):
                    g = h // grp if per_query else h
                    seen = seen_of(rd, layer, B, h, g, scale)
                    for r in recs:
                        if (r["layer"], r["head"], r["budget"]) == (layer, h, run_["budget"]) \
                                and r["step"] >= 0:
                            pairs.append((r, set(seen[r["step"]])))
                    us = [h] if per_query else range(g * grp, (g + 1) * grp)
                    got = [measures(rd["Q_decode"][u], rd["K"][g], rd["V"][g],
                                    rd["K_decode"][g], rd["V_decode"][g], scale, seen)
                           for u in us]
                    want = np.mean(got, axis=0)
                    mm = run_["metrics"]
                    have = (mm["recall_decode"][layer][h], mm["err_decode"][layer][h],
                            mm["n_keep"][layer][h])
                    worst = max(worst, *(abs(a - b) for a, b in zip(have[:2], want[:2])))
                    check(abs(have[2] - want[2]) < 1e-9,
                          "%s %s layer %d head %d B %d: n_keep %r, check %r"
                          % (name, spec, layer, h, B, have[2], want[2]))
    check_sets(name, spec, pairs, budgets)
    print("%s %s: %d step sets; recall/err_decode within %.2e of the check"
          % (name, spec, len(pairs), worst))
    check(worst < 2e-5, "%s %s: decode metrics %.3g from the check" % (name, spec, worst))
    return runs


def compare(name, path, work, kind, N, prefill, budgets, per_query=False, filters=None,
            dms=None):
    """decoding=N (prefill=1), or with dms=(tau, Wd) dms=tau,dms_decoding=1,dms_window=Wd."""
    spec = "%s:%s%s%s%s" % (kind, "decoding=%d" % N if dms is None else
                            "dms=%.17g,dms_decoding=1,dms_window=%d" % dms,
                            ",prefill=1" if prefill else "", ",heads=query" if per_query else "",
                            ",filters=" + filters if filters else "")
    filt = np.load(filters).astype(np.float64) if filters else None

    def seen_of(rd, layer, B, h, g, scale):
        f = None
        if filt is not None:
            f = filt[layer, h if filt.shape[1] == rd["Q_decode"].shape[0] else g]
        if dms is None:
            return caches(kind, rd["K"][g], rd["K_decode"][g], B, N, prefill, f)
        allk = np.concatenate([rd["K"][g], rd["K_decode"][g]])
        T, G = len(rd["K"][g]), len(rd["K_decode"][g])
        return dms_caches(cache_scores(kind, allk, f), T, G, 0, dms[1], dms[0], min(B, T))
    return check_caches(name, path, work, spec, budgets, per_query, seen_of)


# by hand: T = 6 prompt keys and 4 decode keys of norms PN and DN (one KV head), knorm
PN, DN = [3, 1, 2, 1, 5, 4], [1, 6, 2, 1]
HAND = [  # (spec, budget, {step: kept}); compressions after steps 1 and 3 (decoding=2)
    # at step 1 norms 1 (tokens 1, 3, 6) tie for B = 2: the earlier two stay; at step 3 again
    ("knorm:decoding=2", "2", {-1: list(range(6)), 0: list(range(7)), 1: list(range(8)),
                               2: [1, 3, 8], 3: [1, 3, 8, 9]}),
    # prefill=1: the prompt's 3 smallest norms, then at step 3 four norms of 1 tie for 3
    ("knorm:decoding=2,prefill=1", "3", {-1: [1, 2, 3], 0: [1, 2, 3, 6], 1: [1, 2, 3, 6, 7],
                                         2: [1, 3, 6, 8], 3: [1, 3, 6, 8, 9]}),
    # decoding=4: one compression, after the last step; B = 7 leaves step 3's cache whole
    ("knorm:decoding=4", "7", {-1: list(range(6)), 0: list(range(7)), 1: list(range(8)),
                               2: list(range(9)), 3: list(range(10))}),
    # DMS, threshold -2.5 (norms <= 2.5 stay), window 2: token 0 evicted at prefill; after
    # steps 0, 1, 2, 3 tokens 4 (norm 5), 5 (4), 6 (decode, 1: stays), 7 (6) leave the window
    ("knorm:dms=-2.5,dms_decoding=1,dms_window=2", "100%",
     {-1: [1, 2, 3, 4, 5], 0: [1, 2, 3, 4, 5, 6], 1: [1, 2, 3, 5, 6, 7], 2: [1, 2, 3, 6, 7, 8],
      3: [1, 2, 3, 6, 7, 8, 9]}),
]


# tova by hand: every query [1, 0], so each probability is monotone in the key's first
# component (PN, DN) in both heads, the newest token first
HAND_TOVA = [
    # step 1 (8 entries): 7 first, then 4 (5), 5 (4), 0 (3), 2 (2), and of 1, 3, 6 (all 1) the
    # earliest
    ("tova:decoding=2", "6", {-1: list(range(6)), 0: list(range(7)), 1: list(range(8)),
                              2: [0, 1, 2, 4, 5, 7, 8], 3: [0, 1, 2, 4, 5, 7, 8, 9]}),
    # prefill=1: TOVAPress's prompt set, 5 (last) then 4, 0; then one token leaves per step:
    # 0 (3) after step 0, 6 (1) after step 1, 5 (4) after step 2
    ("tova:decoding=1,prefill=1", "3", {-1: [0, 4, 5], 0: [0, 4, 5, 6], 1: [4, 5, 6, 7],
                                        2: [4, 5, 7, 8], 3: [4, 7, 8, 9]}),
]


def hand_trace(work, fixed_q=False):
    """A stories260K capture's tables (T = 6, 4 decode steps) with one layer of one KV head
    and two query heads, D = 2: keys [norm, 0] of norms PN and DN, other tensors random (with
    fixed_q every query [1, 0])."""
    src = os.path.join(work, "hsrc.kvt")
    run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--tokens", "6", "--decode", "4", "--window", "2", "-o", src, "--force")
    rng = np.random.default_rng(1)
    f32 = np.float32
    k = np.zeros((1, 6, 2), f32)
    k[0, :, 0] = PN
    kd = np.zeros((1, 4, 2), f32)
    kd[0, :, 0] = DN
    dst = os.path.join(work, "hand%s.kvt" % ("q" if fixed_q else ""))
    with kvtrace.open(src) as t:
        h = json.loads(json.dumps(t.header))
        h["model"].update(n_layers=1, n_kv_heads=1, n_q_heads=2, head_dim=2)
        h["model"].pop("attn_scale", None)
        with kvtrace.TraceWriter(dst, h, force=True) as w:
            for kind in ("positions", "modality", "token_ids", "decode_token_ids"):
                if t.has(kind):
                    w.append(kind, t.read(kind))
            w.append("K", k, layer=0)
            w.append("V", rng.normal(size=(1, 6, 2)).astype(f32), layer=0)
            qw, qd = rng.normal(size=(2, 2, 2)), rng.normal(size=(2, 4, 2))
            if fixed_q:
                qw, qd = np.tile([1.0, 0.0], (2, 2, 1)), np.tile([1.0, 0.0], (2, 4, 1))
            w.append("Q_window", qw.astype(f32), layer=0)
            w.append("Q_decode", qd.astype(f32), layer=0)
            w.append("K_decode", kd, layer=0)
            w.append("V_decode", rng.normal(size=(1, 4, 2)).astype(f32), layer=0)
    return dst


def kvtrace_k(path, layer):
    with kvtrace.open(path) as t:
        return t.read("K", layer, dtype="float32").astype(np.float64)


def main():
    work = tempfile.mkdtemp(prefix="kvt_decoding_")
    hand = hand_trace(work)
    sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
    handq = hand_trace(work, fixed_q=True)
    for spec, budget, want in HAND + HAND_TOVA:
        run("replay", handq if spec.startswith("tova") else hand, "--policies", spec, "--budgets", budget, "--export-selection", sel,
            "-o", res, "--force")
        with open(sel) as fh:
            got = {r["step"]: r["kept"] for r in json.load(fh)["records"]}
        check(got == want, "by hand: %s at %s: kept %s, want %s" % (spec, budget, got, want))
    a = os.path.join(work, "a.kvt")  # stories260K: T = 150, Hq 8 on Hkv 4, D = 8
    run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--tokens", "150", "--decode", "40", "--window", "8", "-o", a)
    s = os.path.join(work, "s.kvt")  # llama3-8b-shaped: GQA 4, D = 128, bf16
    run("synth", "--shape", "llama3-8b", "--tokens", "200", "--layers", "2", "--decode", "24",
        "-o", s)
    rng = np.random.default_rng(5)
    for path, name, budgets in ((a, "llama2c", "48,100,160"), (s, "llama3-8b", "40,150")):
        with kvtrace.open(path) as t:
            m = t.header["model"]
            L = len(list(t.layers()))
        compare(name, path, work, "knorm", 8, False, budgets)
        compare(name, path, work, "knorm", 5, True, budgets, per_query=True)
        compare(name, path, work, "keydiff", 6, False, budgets)
        compare(name, path, work, "keydiff", 1, True, budgets)
        fpath = os.path.join(work, "f_%s.npy" % name)
        np.save(fpath, rng.normal(0, 1, (L, m["n_kv_heads"], m["head_dim"])))
        compare(name, path, work, "qfilter", 4, False, budgets, filters=fpath)
        # dms_decoding=1: DMSPress(decoding=True), thresholds between two prompt scores
        with kvtrace.open(path) as t:
            kn = {layer: -np.linalg.norm(t.read("K", layer, dtype="float32").astype(np.float64),
                                         axis=-1) for layer in t.layers()}
        for Wd, pq in ((128, False), (8, True), (0, False)):
            tau = threshold(kn, 0, Wd)
            compare(name, path, work, "knorm", 0, False, "100%,20," + budgets, per_query=pq,
                    dms=(tau, Wd))
        filt = np.load(fpath)
        qs = {layer: -np.einsum("gtd,gd->gt", t_k, filt[layer]) for layer, t_k in
              ((layer, kvtrace_k(path, layer)) for layer in range(L))}
        compare(name, path, work, "qfilter", 0, False, "100%," + budgets, filters=fpath,
                dms=(threshold(qs, 0, 16), 16))
        # streamingllm: StreamingLLM's rolling cache (trimmed every N steps)
        compare(name, path, work, "streamingllm", 1, True, budgets)
        compare(name, path, work, "streamingllm", 5, False, budgets, per_query=True)
        rolling(name, path, work, budgets)
        # tova: DecodingPress(TOVAPress), TOVA's own eviction with N = 1 and prefill=1
        ev = compare_tova(name, path, work, 1, True, budgets)
        ev += compare_tova(name, path, work, 4, False, budgets)
        ev += compare_tova(name, path, work, 3, True, budgets, per_query=True)
        check(ev > 500, "%s tova: %d tokens evicted while decoding" % (name, ev))
    check(EVICTED[0] > 1000, "dms_decoding: %d tokens evicted while decoding" % EVICTED[0])
    print("dms_decoding: %d tokens evicted while decoding over the checks" % EVICTED[0])

    # never compressing within the steps: the plain policy's decode metrics; above T + G: all
    r = os.path.join(work, "o.json")
    run("replay", a, "--policies", "keydiff,keydiff:decoding=1000,prefill=1,keydiff:decoding=3",
        "--budgets", "48,100,191", "-o", r, "--force")
    with open(r) as fh:
        doc = json.load(fh)
    runs = doc["traces"][0]["runs"]
    pol = doc["settings"]["policies"]
    nb = 3
    for b in range(nb):
        p0, p1, p2 = runs[b], runs[nb + b], runs[2 * nb + b]
        for k in ("recall_decode", "err_decode", "n_keep", "recall_window", "coverage"):
            x, y = np.array(p0["metrics"][k]), np.array(p1["metrics"][k])
            check(np.allclose(x, y, rtol=0, atol=1e-6),
                  "decoding=1000,prefill=1 B %d: %s %s, plain %s" % (p0["budget_tokens"], k,
                                                                     y.ravel()[:3], x.ravel()[:3]))
        # without prefill=1 the prompt-time set is the whole prompt: the window metrics' own
        check(np.allclose(p2["metrics"]["err_window"], 0, atol=1e-9) and
              np.allclose(p2["metrics"]["recall_window"], 1, atol=1e-6),
              "decoding=3 B %d: window metrics %r %r" % (p2["budget_tokens"],
                                                         p2["metrics"]["err_window"][0],
                                                         p2["metrics"]["recall_window"][0]))
    last = runs[2 * nb + 2]["metrics"]  # B = 191 = T + G + 1: nothing is ever evicted
    check(np.allclose(last["recall_decode"], 1, atol=1e-6) and
          np.allclose(last["err_decode"], 0, atol=1e-6) and np.allclose(last["n_keep"], 150),
          "decoding=3 at B = 191: %r %r" % (last["recall_decode"][0], last["err_decode"][0]))
    check("decoding" not in pol[0]["options"] and "prefill" not in pol[0]["options"] and
          pol[1]["options"].get("decoding") == 1000 and pol[1]["options"].get("prefill") is True
          and pol[2]["options"].get("prefill") is False and pol[2]["per_step"] and
          not pol[0]["per_step"], "results.json options: %r" % [p["options"] for p in pol])

    # end to end (e2e-llama2c): the model's decode attends to each step's cache
    e = os.path.join(work, "e.json")
    run("e2e-llama2c", a, "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--policies", "knorm,knorm:decoding=1000,prefill=1,knorm:decoding=8", "--budgets",
        "48,191", "-o", e, "--force")
    with open(e) as fh:
        er = {(x["policy"], x["budget"]): x for x in json.load(fh)["runs"]}
    kl = {k: x["per_trace"][0]["kl_steps"] for k, x in er.items()}
    check(kl[("knorm:decoding=1000,prefill=1", "48")] == kl[("knorm", "48")] and
          max(kl[("knorm", "48")]) > 0,
          "e2e: decoding=1000,prefill=1 at 48: KL %r, knorm's %r"
          % (kl[("knorm:decoding=1000,prefill=1", "48")][:3], kl[("knorm", "48")][:3]))
    k8 = kl[("knorm:decoding=8", "48")]  # steps 0..7 see every token; 8 on the compressed
    check(max(k8[:8]) == 0 and min(k8[8:]) > 0 and max(kl[("knorm:decoding=8", "191")]) == 0,
          "e2e: knorm:decoding=8: KL per step %r (at 191: %r)"
          % (k8[:10], max(kl[("knorm:decoding=8", "191")])))

    R = ["replay", a, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    refused(R + ["knorm:prefill=1"],
            "knorm: prefill= is an option of decoding=, which is off (give decoding=N)")
    for opt in ("adaptive=1", "dms=-1", "window=4", "chunk_length=32"):
        refused(R + ["knorm:decoding=4," + opt],
                "knorm: decoding= scores every cache entry alike and keeps the same budget in "
                "every layer and head, as kvpress's DecodingPress; %s= is not replayed with it"
                % opt.split("=")[0])
    refused(R + ["snapkv:decoding=4"], "snapkv: unknown option 'decoding'")
    refused(R + ["tova:decoding=4,dms=0"], "tova: decoding= scores every cache entry alike")
    refused(R + ["tova:dms=0,dms_decoding=1"], "tova: unknown option 'dms_decoding'")
    refused(R + ["streamingllm:decoding=2,merge=pivot"],
            "streamingllm: merge= merges dropped tokens into the prompt-time set, and decoding= "
            "keeps caches of whole entries through the decode steps (give one of them)")
    for spec, opt in (("knorm:decoding=2", "decoding="), ("tova:decoding=1,prefill=1", "decoding="),
                      ("qfilter:dms=0,dms_decoding=1", "dms_decoding=1")):
        refused(R + [spec + ",think=0.5"],
                "%s: think= prunes the key channels of the prompt-time set, and %s keeps caches "
                "of whole keys through the decode steps (give one of them)"
                % (spec.split(":")[0], opt))
    refused(R + ["knorm:dms_decoding=1"],
            "knorm: dms_decoding= is an option of dms=, which is off (give dms=THRESHOLD)")
    refused(R + ["keydiff:dms=-1,dms_decoding=1"], "keydiff: unknown option 'dms_decoding'")
    refused(R + ["knorm:dms=-1,dms_decoding=1,decoding=4"], "dms= is not replayed with it")
    refused(R + ["knorm:decoding=0"], "knorm: decoding=0")
    nod = copy_trace(a, os.path.join(work, "nod.kvt"), kinds=("K", "V", "Q_window", "Q_decode"))
    refused(["replay", nod, "--budgets", "20", "-o", os.path.join(work, "y.json"), "--force",
             "--policies", "knorm:decoding=4"],
            "policy knorm:decoding=4 evicts decode tokens too (decoding=), so it needs their "
            "keys and values (K_decode, V_decode) in every layer")
    refused(["replay", nod, "--budgets", "20", "-o", os.path.join(work, "y.json"), "--force",
             "--policies", "qfilter:dms=0,dms_decoding=1"],
            "evicts decode tokens too (dms_decoding=1), so it needs their keys and values")
    b = os.path.join(work, "b.kvt")
    run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--tokens", "60", "--decode", "0", "--window", "8", "-o", b)
    refused(["replay", b, "--budgets", "20", "-o", os.path.join(work, "z.json"), "--force",
             "--policies", "knorm:decoding=4"],
            "policy knorm:decoding=4 needs decode queries (Q_decode)")
    finish("test_decoding", work)


if __name__ == "__main__":
    main()
