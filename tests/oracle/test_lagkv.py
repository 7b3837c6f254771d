#!/usr/bin/python3
"""test_lagkv.py - `kvtrace replay --policy lagkv` against NumPy, written from kvpress's
LagKVPress.score (kvpress/presses/lagkv_press.py @08a43bf): sinks; partitions of `lag` tokens
each scored against the next one (min-max scaled per dimension by the reference partition,
torch.std over the dimensions with the n - 1 divisor, softmax over the partition), keys and
values averaged; without cross_scoring the rank inside the partition over lag; the sinks and
the tail (last whole partition and the rest) 1; a prompt shorter than sinks + 2 lag ranked as
sinks, then the most recent. kvpress then keeps the top n_kept; the check breaks ties toward the
earlier token, as kvtrace documents (torch.topk leaves them unspecified), and computes in
float64.

Traces: a llama2.c capture (T = 150: lag 16 and 8 give 8 and 18 partitions; lag 80 is the
uncompressed case) and a llama3-8b-shaped synthetic one (bf16, GQA). Every exported kept set must
equal the check's. Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the
CLI or the library.
"""
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (compare_scores, copy_trace, finish, need_library,  # noqa: E402
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()


def states_score(x, lag):
    """x [n_part, lag, D]: the scores of partitions 0..n_part-2 against their next one."""
    ref, v = x[1:], x[:-1]
    lo = ref.min(axis=1, keepdims=True)
    hi = ref.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = ((v - lo) / (hi - lo)).std(axis=-1, ddof=1)  # [n_part-1, lag]
    e = np.exp(sd - sd.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def lag_scores(K, V, sinks, lag, cross):
    """[T] kvpress's LagKV score of one KV head (K, V [T, D] float64)."""
    T, D = K.shape
    if T < sinks + 2 * lag:
        s = np.ones(T)
        if T > sinks:
            s[sinks:] = np.arange(T - sinks) / (T - sinks)
        return s
    end = sinks + ((T - sinks) // lag) * lag
    ks = states_score(K[sinks:end].reshape(-1, lag, D), lag)
    vs = states_score(V[sinks:end].reshape(-1, lag, D), lag)
    sc = (ks + vs) / 2
    if not cross:
        # ascending rank inside each partition, NaN above numbers, ties to the earlier token
        key = np.where(np.isnan(sc), np.inf, sc)
        nan = np.isnan(sc).astype(int)
        rk = np.empty_like(sc)
        for i in range(sc.shape[0]):
            order = sorted(range(lag), key=lambda t: (nan[i, t], key[i, t], t))
            rk[i, order] = np.arange(lag)
        sc = rk / lag
    if cross:  # torch.topk puts a NaN score above every number
        sc = np.where(np.isnan(sc), np.inf, sc)
    return np.concatenate([np.ones(sinks), sc.reshape(-1), np.ones(T - end + lag)])


def compare(name, path, spec, sinks, lag, cross, budgets, work):
    def layer_scores(t, layer, per_query):
        K = t.read("K", layer, dtype="float32").astype(np.float64)
        V = t.read("V", layer, dtype="float32").astype(np.float64)
        return [lag_scores(K[g], V[g], sinks, lag, cross) for g in range(K.shape[0])]
    compare_scores(name, path, spec, budgets, work, layer_scores)


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        cases = [("lagkv:lag=16", 4, 16, False), ("lagkv:lag=8,sinks=2", 2, 8, False),
                 ("lagkv:lag=16,cross=1", 4, 16, True), ("lagkv:lag=80", 4, 80, False),
                 ("lagkv:lag=8,heads=query", 4, 8, False)]
        for spec, sinks, lag, cross in cases:
            compare("llama2c", a, spec, sinks, lag, cross, "3,10,40,50%,200", work)
        compare("llama3-8b", s, "lagkv", 4, 128, False, "8,60,50%", work)
        # a dimension constant over a reference partition: 0/0, NaN scores (both modes)
        def constant(kind, layer, x):
            if kind == "K" and layer == 0:
                x[1, 68:100, 3] = 0.5
        c = copy_trace(a, os.path.join(work, "c.kvt"), edit=constant)
        compare("constant dim", c, "lagkv:lag=32,cross=1", 4, 32, True, "1,3,40,60", work)
        compare("constant dim", c, "lagkv:lag=32", 4, 32, False, "1,3,40,60", work)
        compare("llama3-8b", s, "lagkv:lag=32,cross=1", 4, 32, True, "8,60,50%", work)
    finish("test_lagkv")


if __name__ == "__main__":
    main()
