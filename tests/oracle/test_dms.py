#!/usr/bin/python3
"""test_dms.py - dms=THRESHOLD (kvpress's DMSPress, dms_press.py @36385e2, at prefill: the
tokens before the last sliding_window_size whose press score is below the threshold are
evicted, per KV head) over knorm, keydiff, qfilter, expected-attention, external, snapkv,
lagkv, cur, leverage, noncausal-attention, tova and observed-attention, against NumPy written
from DMSPress over KnormPress (-||k||), KeyDiffPress (-cos(k, the mean unit key)), QFilterPress
(-<f, k>), ExpectedAttentionPress (test_expected_attention_synth's scores, the sinks kept),
given scores, SnapKVPress (the window queries' mean attention, avg-pooled, GQA mean),
LagKVPress and CURPress (test_lagkv's and test_cur's scores), LeverageScorePress (exact,
z-scored), NonCausalAttnPress (test_noncausal_attention's z-scores), TOVAPress (the last
query's attention, the mean over every query head; its own token kept) and
ObservedAttentionPress (test_adaptive's column sums over the queries that see each key).

At a budget of the whole prompt (100%) the kept set must be DMSPress's: the last
max(dms_window, window) tokens and every earlier token scoring >= the threshold. Below, kvtrace
caps each head at the budget: the first min(B, that count) of the ranking window (newest
first), the DMS window's other tokens (oldest first), then the scores descending, ties to the
earlier token. Thresholds sit halfway between two neighbouring scores, so rounding cannot move
a token across. Then the refusals, and results.json listing dms= only when given.
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, check_sets, finish, need_library, refused,  # noqa: E402
                      replay_export, run, score_traces)  # (77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_chunk_length import shares_by_tokens  # noqa: E402
from test_chunk_scores import Layer, avg_pool  # noqa: E402
from test_compactor import leverage, pre_rope_keys, znorm  # noqa: E402
from test_adaptive import observed  # noqa: E402
from test_cur import cur_scores  # noqa: E402
from test_expected_attention_synth import scores as ea_scores  # noqa: E402
from test_lagkv import lag_scores  # noqa: E402
from test_noncausal_attention import scores as nca_scores  # noqa: E402

kvtrace = need_library()


def kv_scores(t, kind, filters=None):
    """{layer: [Hkv, T]} kvpress's KnormPress, KeyDiffPress or QFilterPress scores."""
    out = {}
    for layer in t.layers():
        K = t.read("K", layer, dtype="float32").astype(np.float64)
        if kind == "knorm":
            out[layer] = -np.linalg.norm(K, axis=-1)
        elif kind == "keydiff":
            ku = K / np.maximum(np.linalg.norm(K, axis=-1, keepdims=True), 1e-12)
            m = ku.mean(axis=1)
            out[layer] = -np.einsum("gtd,gd->gt", ku, m) / np.linalg.norm(m, axis=-1)[:, None]
        else:
            out[layer] = -np.einsum("gtd,gd->gt", K, filters[layer])
    return out


def more_scores(t, kind, W=8, kernel=5):
    """{layer: [Hkv, T]} kvpress's SnapKVPress (window W, the prefix's; the rest 0), LagKVPress
    (lag 8), CURPress, LeverageScorePress (exact), NonCausalAttnPress, TOVAPress or
    ObservedAttentionPress scores."""
    out = {}
    T = t.header["n_tokens"]
    for layer in t.layers():
        K = t.read("K", layer, dtype="float32").astype(np.float64)
        V = t.read("V", layer, dtype="float32").astype(np.float64)
        Hkv = K.shape[0]
        if kind == "snapkv":
            L = Layer(t, layer, False)
            pooled = np.array([avg_pool(x, kernel) for x in L.window_attn(0, T, W)])
            x = np.zeros((Hkv, T))
            x[:, :T - W] = pooled.reshape(Hkv, L.G, T - W).mean(axis=1)
        elif kind == "lagkv":
            x = np.array([lag_scores(K[g], V[g], 4, 8, False) for g in range(Hkv)])
        elif kind == "cur":
            x = np.array([cur_scores(K[g], V[g], 4, "kv_product", 16) for g in range(Hkv)])
            x = np.where(np.isnan(x), np.inf, x)
        elif kind == "leverage":
            x = znorm(leverage(pre_rope_keys(t, K), layer, 0, 0))
        elif kind == "tova":  # the last query's full softmax, every query head's mean
            Qw = t.read("Q_window", layer, dtype="float32").astype(np.float64)[:, -1]
            G = Qw.shape[0] // Hkv
            scale = t.header["model"].get("attn_scale") or 1 / np.sqrt(K.shape[-1])
            z = np.einsum("hd,htd->ht", Qw, np.repeat(K, G, axis=0)) * scale
            p = np.exp(z - z.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            x = np.repeat(p.mean(axis=0)[None], Hkv, axis=0)
        elif kind == "observed-attention":
            x = observed(t, layer, None)
        else:
            Q = t.read("Q_all", layer, dtype="float32").astype(np.float64)
            x = nca_scores(Q, K, V, 256, False)
        out[layer] = x
    return out


def threshold(sc, W, Wd):
    """A threshold halfway between the two neighbouring finite prefix scores nearest the
    median (of every layer and head)."""
    T = next(iter(sc.values())).shape[1]
    Pd = T - max(W, Wd)
    v = np.unique(np.concatenate([x[:, :Pd].ravel() for x in sc.values()]))
    v = v[np.isfinite(v)]
    i = len(v) // 2
    return (v[i - 1] + v[i]) / 2


def dms_kept(s, T, W, Wd, tau, B):
    """Head scores s [T] (the prefix's; the window's unused): the capped DMS set at B."""
    Pd = T - max(W, Wd)
    order = list(range(T - 1, T - W - 1, -1)) + list(range(Pd, T - W))
    order += sorted(range(Pd), key=lambda j: (-s[j], j))
    keep = (T - Pd) + int(np.sum(s[:Pd] >= tau))
    return set(order[:min(B, keep)]), keep


def compare(name, path, spec, budgets, work, sc, W, Wd, tau, per_query=False, G=1):
    exp = replay_export(path, spec, budgets, work)
    T = next(iter(sc.values())).shape[1]
    frac = shares_by_tokens(budgets, T)
    pairs, whole = [], 0
    for r in exp["records"]:
        B = min(T, int(round(frac[r["budget_tokens"]] * T)))
        s = sc[r["layer"]][r["head"] // G if per_query else r["head"]]
        want, keep = dms_kept(s, T, W, Wd, tau, B)
        if B == T:  # DMSPress itself: the window and every earlier score >= tau
            direct = set(range(T - max(W, Wd), T)) | set(
                j for j in range(T - max(W, Wd)) if s[j] >= tau)
            check(direct == want, "%s %s: the check's two DMS sets differ" % (name, spec))
            whole += 1
        pairs.append((r, want))
    check_sets(name, spec, pairs, budgets)
    check(whole > 0 or "100%" not in budgets, "%s %s: no set at 100%%" % (name, spec))
    return exp


def main():
    work = tempfile.mkdtemp(prefix="kvt_dms_")
    a, s = score_traces(work, q_all=True)
    rng = np.random.default_rng(3)
    for path, name in ((a, "llama2c"), (s, "llama3-8b")):
        with kvtrace.open(path) as t:
            m = t.header["model"]
            T, G = t.header["n_tokens"], m["n_q_heads"] // m["n_kv_heads"]
            L = len(list(t.layers()))
            budgets = "100%,64,25%"
            for kind in ("knorm", "keydiff"):
                sc = kv_scores(t, kind)
                for W, Wd, extra in ((0, 128, ""), (0, 16, ",dms_window=16"),
                                     (4, 0, ",window=4,dms_window=0")):
                    tau = threshold(sc, W, Wd)
                    compare(name, path, "%s:dms=%.17g%s" % (kind, tau, extra), budgets, work, sc,
                            W, Wd, tau)
                if kind == "knorm":
                    compare(name, path, "knorm:dms=%.17g,heads=query,dms_window=32" % tau,
                            budgets, work, sc, 0, 32, tau, per_query=True, G=G)
            filt = rng.normal(0, 1, (L, m["n_kv_heads"], m["head_dim"]))
            fpath = os.path.join(work, "f_%s.npy" % name)
            np.save(fpath, filt)
            sc = kv_scores(t, "qfilter", filt)
            tau = threshold(sc, 0, 64)
            compare(name, path, "qfilter:filters=%s,dms=%.17g,dms_window=64" % (fpath, tau),
                    budgets, work, sc, 0, 64, tau)
            ext = rng.normal(0, 1, (L, m["n_kv_heads"], T)).astype(np.float32)
            epath = os.path.join(work, "e_%s.npy" % name)
            np.save(epath, ext)
            sc = {layer: ext[layer].astype(np.float64) for layer in range(L)}
            tau = threshold(sc, 0, 100)
            compare(name, path, "external:scores=%s,dms=%.17g,dms_window=100" % (epath, tau),
                    budgets, work, sc, 0, 100, tau)
            for kind, spec, W in (("snapkv", "snapkv:window=8,kernel=5,dms_window=24", 8),
                                  ("lagkv", "lagkv:lag=8,dms_window=32", 0),
                                  ("cur", "cur", 0), ("leverage", "leverage:sketch=0", 0),
                                  ("noncausal-attention", "noncausal-attention", 0),
                                  ("tova", "tova:dms_window=16", 1),
                                  ("observed-attention", "observed-attention:dms_window=40", 0)):
                sc = more_scores(t, kind)
                Wd = {"snapkv": 24, "lagkv": 32, "tova": 16, "observed-attention": 40}.get(kind,
                                                                                      128)
                tau = threshold(sc, W, Wd)
                compare(name, path, "%s,dms=%.17g" % (spec, tau) if ":" in spec else
                        "%s:dms=%.17g" % (spec, tau), budgets, work, sc, W, Wd, tau)
        if name == "llama3-8b":  # expected-attention (1-D RoPE, half pairs, synth)
            sc, _ = ea_scores(path)
            tau = threshold(sc, 0, 64)
            compare(name, path, "expected-attention:dms=%.17g,dms_window=64" % tau, budgets,
                    work, sc, 0, 64, tau)

    # results.json lists dms= and dms_window= only when dms= is given
    r = os.path.join(work, "o.json")
    run("replay", a, "--policies", "knorm,knorm:dms=-1", "--budgets", "64", "-o", r, "--force")
    with open(r) as f:
        pol = json.load(f)["settings"]["policies"]
    check("dms" not in pol[0]["options"] and "dms_window" not in pol[0]["options"] and
          pol[1]["options"].get("dms") == -1 and pol[1]["options"].get("dms_window") == 128,
          "results.json options: %r" % [p["options"] for p in pol])

    R = ["replay", a, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    refused(R + ["knorm:dms_window=16"],
            "knorm: dms_window= is an option of dms=, which is off (give dms=THRESHOLD)")
    refused(R + ["knorm:dms=-1,adaptive=1"],
            "knorm: dms= keeps each head's tokens above a threshold, and adaptive= shares the "
            "budget its own way (give one of them)")
    refused(R + ["knorm:dms=-1,chunk_length=32"], "and chunk_length= shares the budget")
    refused(R + ["streamingllm:dms=0.1"], "streamingllm: unknown option 'dms'")
    refused(R + ["knorm:dms=nan"], "knorm: dms=nan: expected a number")
    finish("test_dms", work)


if __name__ == "__main__":
    main()
