#!/usr/bin/python3
"""test_decoding_ea.py - expected-attention:decoding=N, kvpress's DecodingPress over
ExpectedAttentionPress (presses/generation/decoding_press.py @173dd74,
expected_attention_press.py, scorer_press.py), and with prefill=1 PrefillDecodingPress with
ExpectedAttentionPress at prefill too, against NumPy written from those files:

- DecodingPress buffers each decode step's hidden state; after every N-th step (its forward
  hook, after the attention) it hands the press the N buffered states and the whole cache at
  the ratio that keeps exactly B (nothing when the cache holds at most B), then empties the
  buffer;
- the press leaves out the first n_sink of the N states: the statistics are the mean and the
  covariance (over m = N - n_sink) of the pre-RoPE queries of the last m steps, here the
  trace's decode queries with RoPE undone by each step's full rotation matrix (solved), at
  position T + s (M-RoPE: the largest prompt position + 1 + s on all rows);
- they are turned by the mean rotation over positions q_len .. q_len + n_future - 1 with q_len
  the states' length, N;
- the cache's first n_sink entries are padded with the largest score + 1, the others score
  softmax(s mu'.k + s^2/2 k^T S' k) over them, the mean over the KV head's query heads, times
  ||v||; ScorerPress keeps the top B *in score order* (torch.topk), so the cache after a
  compression is in that order and the next decode tokens follow: the sinks stay the first
  entries (with B < n_sink, decode tokens become sinks);
- prefill=1: the prompt's EA set first (its own statistics from Q_all, future positions after
  the prompt), in score order; without it the prompt whole, in order.
Ties go to the earlier token (torch leaves them unspecified). With stats=FILE
(ExpectedAttentionStatsPress under DecodingPress) the file's statistics, turned the same way.

Checked on three traces (a stories260K capture with interleaved pairs, a llama3-8b-shaped
bf16 trace, a qwen2-vl-7b-shaped M-RoPE trace with an image): every exported step set and the
decode metrics (test_decoding.check_caches), and that the caches really evict. Then the
refusals: N <= sinks without stats=, prefill=1 without Q_all; and that decoding= alone needs no
Q_all. Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the
library.
"""
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, finish, need_library, refused, run  # noqa: E402
import numpy as np  # noqa: E402
from test_decoding import check_caches  # noqa: E402
from test_ea_stats import random_stats, write_safetensors  # noqa: E402
from test_expected_attention_synth import rope_matrices, trace_rope  # noqa: E402
from test_expected_attention_synth import scores as prompt_scores  # noqa: E402
import test_ea_stats  # noqa: E402

kvtrace = need_library()
EVICTED = [0]


class Layer:
    """One layer's pre-RoPE decode queries [Hq, G, D] and the rotation helpers of a trace."""

    def __init__(self, path, layer):
        with kvtrace.open(path) as t:
            m, T = t.header["model"], t.header["n_tokens"]
            self.freq, self.pairs, self.a, self.row_of, _, pmax = trace_rope(t)
            self.mrope = m["rope"]["type"] == "mrope"
            Qd = t.read("Q_decode", layer, dtype="float32").astype(np.float64)
        self.D, self.T = m["head_dim"], T
        G = Qd.shape[1]
        base = pmax + 1 if self.mrope else T
        rows = np.repeat((base + np.arange(G, dtype=np.float64))[:, None], 3, axis=1)
        Rd = rope_matrices(rows, self.D, self.freq, self.pairs, self.a, self.row_of)
        self.pre = np.stack([np.linalg.solve(Rd, Qd[u][:, :, None])[:, :, 0]
                             for u in range(len(Qd))])

    def rbar(self, p0, future):
        fut = np.repeat((p0 + np.arange(future, dtype=np.float64))[:, None], 3, axis=1)
        return rope_matrices(fut, self.D, self.freq, self.pairs, self.a, self.row_of).mean(0)


def ea_decode_caches(L, rd, B, h, g, scale, o, prompt_sc, stats):
    """[G] the entries (ascending) decode query s sees in selection head h's cache (KV head g),
    DecodingPress(ExpectedAttentionPress) as the docstring says. o: the options; prompt_sc:
    head h's prompt scores (prefill=1) or None; stats: (mu [Hq, D], cov [Hq, D, D]) or None."""
    T, G = rd["K"].shape[1], rd["K_decode"].shape[1]
    Hq, Hkv = rd["Q_decode"].shape[0], rd["K"].shape[0]
    grp = Hq // Hkv
    N, S0 = o["decoding"], o["sinks"]
    keys = np.concatenate([rd["K"][g], rd["K_decode"][g]])
    vn = np.linalg.norm(np.concatenate([rd["V"][g], rd["V_decode"][g]]), axis=-1)
    heads = [h] if o["per_query"] else list(range(g * grp, (g + 1) * grp))
    R = L.rbar(N, o["future"])
    if prompt_sc is not None:  # the prompt's top B in score order (topk), sinks first
        cache = sorted(range(T), key=lambda j: (-prompt_sc[j], j))[:B]
    else:
        cache = list(range(T))
    seen, buf = [], []
    for s in range(G):
        cache.append(T + s)
        seen.append(sorted(cache))
        buf.append(s)
        if len(buf) < N:
            continue
        steps, buf = buf, []
        if len(cache) <= B:
            continue
        S = min(S0, len(cache))
        k = keys[cache[S:]]
        acc = np.zeros(len(k))
        for u in heads:
            if stats is None:
                x = L.pre[u, steps[S0:]]  # the press drops the first n_sink states
                mu = x.mean(0)
                cov = (x - mu).T @ (x - mu) / len(x)
            else:
                mu, cov = stats[0][u], stats[1][u]
            mu2, cov2 = R @ mu, R @ cov @ R.T
            z = scale * k @ mu2
            if o["cov"]:
                z = z + 0.5 * scale * scale * np.einsum("ni,ij,nj->n", k, cov2, k)
            p = np.exp(z - z.max())
            acc += p / p.sum() / len(heads)
        sc = (acc + o["epsilon"]) * vn[cache[S:]] if o["vnorm"] else acc
        sc = np.concatenate([np.full(S, sc.max() + 1 if len(sc) else 1.0), sc])
        order = sorted(range(len(cache)), key=lambda i: (-sc[i], cache[i]))
        kept = [cache[i] for i in order[:B]]
        EVICTED[0] += len(cache) - B
        cache = kept
    return seen


def case(name, path, work, budgets, spec_opts, stats_file=None, stats=None):
    o = dict(decoding=8, prefill=False, per_query=False, sinks=4, future=512, cov=True,
             vnorm=True, epsilon=0.0)
    o.update(spec_opts)
    parts = ["decoding=%d" % o["decoding"]]
    parts += ["prefill=1"] if o["prefill"] else []
    parts += ["heads=query"] if o["per_query"] else []
    for key, dflt in (("sinks", 4), ("future", 512), ("epsilon", 0.0)):
        if o[key] != dflt:
            parts.append("%s=%g" % (key, o[key]))
    parts += ["cov=0"] if not o["cov"] else []
    parts += ["vnorm=0"] if not o["vnorm"] else []
    parts += ["stats=" + stats_file] if stats_file else []
    spec = "expected-attention:" + ",".join(parts)
    layers, psc = {}, {}
    if o["prefill"]:
        if stats is None:
            psc, _ = prompt_scores(path, sinks=o["sinks"], future=o["future"], cov=o["cov"],
                                   vnorm=o["vnorm"], epsilon=o["epsilon"],
                                   per_query=o["per_query"])
        else:
            with kvtrace.open(path) as t:
                psc = test_ea_stats.scores(t, stats[0], stats[1], sinks=o["sinks"],
                                           future=o["future"], use_cov=o["cov"],
                                           per_query=o["per_query"])
    before = EVICTED[0]

    def seen_of(rd, layer, B, h, g, scale):
        if layer not in layers:
            layers[layer] = Layer(path, layer)
        st = None if stats is None else (stats[0][layer], stats[1][layer])
        return ea_decode_caches(layers[layer], rd, B, h, g, scale, o,
                                psc[layer][h] if o["prefill"] else None, st)
    check_caches(name, path, work, spec, budgets, o["per_query"], seen_of)
    ev = EVICTED[0] - before
    print("%s %s: %d entries evicted while decoding" % (name, spec, ev))
    check(ev > 0, "%s %s: nothing evicted" % (name, spec))


def main():
    work = tempfile.mkdtemp(prefix="kvt_decoding_ea_")
    model = os.path.join(ROOT, "models", "stories260K.bin")
    a = os.path.join(work, "a.kvt")  # T = 150, Hq 8 on Hkv 4, D = 8, interleaved pairs
    run("capture-llama2c", "--model", model, "--tokens", "150", "--decode", "40", "--window",
        "8", "--q-all", "-o", a)
    b = os.path.join(work, "b.kvt")  # llama3-8b-shaped: GQA 4, D = 128, bf16, half pairs
    run("synth", "--shape", "llama3-8b", "--tokens", "200", "--layers", "2", "--decode", "24",
        "--q-all", "-o", b)
    c = os.path.join(work, "c.kvt")  # qwen2-vl-7b-shaped: M-RoPE, an image, groups of 7
    run("synth", "--shape", "qwen2-vl-7b", "--tokens", "160", "--layers", "1", "--decode", "20",
        "--q-all", "--image-frac", "0.5", "-o", c)
    case("llama2c", a, work, "2,40,100", {})
    case("llama2c", a, work, "40,100", dict(decoding=6, prefill=True))
    case("llama2c", a, work, "40,100", dict(decoding=5, per_query=True, cov=False))
    case("llama2c", a, work, "3,60", dict(decoding=7, sinks=2, future=16, epsilon=0.01))
    case("llama2c", a, work, "60", dict(decoding=9, prefill=True, vnorm=False, per_query=True))
    case("llama3-8b", b, work, "40,150", {})
    case("llama3-8b", b, work, "40,150", dict(decoding=6, prefill=True, per_query=True))
    case("qwen2-vl-7b", c, work, "30,120", dict(decoding=5))
    case("qwen2-vl-7b", c, work, "30,120", dict(decoding=6, prefill=True, future=64))
    # stats=: ExpectedAttentionStatsPress's statistics at every compression, N <= sinks too
    rng = np.random.default_rng(3)
    with kvtrace.open(b) as t:
        m = t.header["model"]
        L = len(list(t.layers()))
    mu, cov = random_stats(rng, L, m["n_q_heads"], m["head_dim"])
    f = os.path.join(work, "stats.safetensors")
    got = write_safetensors(f, [("query_mean", "F32", mu), ("query_cov", "F32", cov)])
    st = (got["query_mean"], got["query_cov"])
    case("llama3-8b", b, work, "40,150", dict(decoding=3), stats_file=f, stats=st)
    case("llama3-8b", b, work, "40,150", dict(decoding=5, prefill=True, per_query=True),
         stats_file=f, stats=st)
    check(EVICTED[0] > 20000, "only %d entries evicted over the cases" % EVICTED[0])

    # refusals; decoding= alone reads no prompt query
    R = ["replay", a, "--budgets", "20", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    refused(R + ["expected-attention:decoding=4"],
            "expected-attention: decoding=4: the statistics are of the queries of the last N "
            "decode steps but their first sinks=4 (kvpress's DecodingPress and "
            "ExpectedAttentionPress), so N must exceed sinks")
    refused(R + ["expected-attention:decoding=2,sinks=2"], "so N must exceed sinks")
    refused(R + ["expected-attention:decoding=8,window=4"],
            "expected-attention: decoding= scores every cache entry alike and keeps the same "
            "budget in every layer and head, as kvpress's DecodingPress; window= is not "
            "replayed with it")
    sample = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")  # no Q_all
    run("replay", sample, "--policies", "expected-attention:decoding=8,sinks=2", "--budgets",
        "64", "-o", os.path.join(work, "y.json"), "--force")
    refused(["replay", sample, "--budgets", "64", "-o", os.path.join(work, "y.json"), "--force",
             "--policies", "expected-attention:decoding=8,prefill=1"],
            "policy expected-attention:decoding=8,prefill=1 needs every prompt query (Q_all)")
    finish("test_decoding_ea", work)


if __name__ == "__main__":
    main()
