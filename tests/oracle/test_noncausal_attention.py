#!/usr/bin/python3
"""test_noncausal_attention.py - `kvtrace replay --policy noncausal-attention` against NumPy
written from kvpress's NonCausalAttnPress (kvpress/presses/non_causal_attention_press.py
@15a267d): chunks of `chunk` tokens from the first, the last one partial (kvpress pads it and
masks the padding); inside a chunk every query attends to every key, unscaled, no causal mask;
the attention each key receives summed over the chunk's queries, the mean over a KV head's
query heads (heads=query: each its own), times |v|, F.avg_pool1d(kernel 3, padding 1) (zeros
counted), then kvpress's z-norm over all heads and tokens (an increasing map: the order is the
same). kvpress keeps the top n_kept; the check breaks ties toward the earlier token, as kvtrace
documents, and computes in float64.

Traces: a llama2.c capture with Q_all (T = 150: chunk 64 leaves a partial chunk of 22, chunk 50
divides it, chunk 256 is one partial chunk) and a llama3-8b-shaped synthetic one (bf16, GQA 4).
Every exported kept set must equal the check's. Environment: KVT_BIN, KVT_LIB,
KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (ROOT, check, compare_kept, finish, need_library,  # noqa: E402
                      replay_export, run, score_traces)  # (77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()


def scores(Q, K, V, chunk, per_query):
    """[H, T]: kvpress's score (before its z-norm) for every head of one layer."""
    Hq, T, _ = Q.shape
    Hkv = K.shape[0]
    G = Hq // Hkv
    A = np.zeros((Hq, T))
    for h in range(Hq):
        for c0 in range(0, T, chunk):
            q, k = Q[h, c0:c0 + chunk], K[h // G, c0:c0 + chunk]
            z = q @ k.T  # unscaled
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            A[h, c0:c0 + chunk] = p.sum(axis=0)
    if not per_query:
        A = A.reshape(Hkv, G, T).mean(axis=1)
    vn = np.linalg.norm(V, axis=-1)
    s = A * (vn if not per_query else np.repeat(vn, G, axis=0))
    padded = np.pad(s, ((0, 0), (1, 1)))
    pooled = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3.0
    return (pooled - pooled.mean()) / max(pooled.std(ddof=1), 1e-6)  # kvpress's z-norm


def compare(name, path, spec, chunk, per_query, window, budgets, work):
    recs = replay_export(path, spec, budgets, work)["records"]
    with kvtrace.open(path) as t:
        T = t.header["n_tokens"]
        cache = {}

        def order_of(r):
            layer = r["layer"]
            if layer not in cache:
                rd = [t.read(k, layer, dtype="float32").astype(np.float64)
                      for k in ("Q_all", "K", "V")]
                cache.clear()
                cache[layer] = scores(*rd, chunk, per_query)
            s = cache[layer][r["head"]]
            # window tokens: the latest first; the others by score, ties to the earlier token
            return [T - 1 - i for i in range(window)] + sorted(
                range(T - window), key=lambda j: (-s[j], j))
        compare_kept(name, spec, recs, order_of)


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True, layers=1)
        for spec, chunk, pq, w in (("noncausal-attention:chunk=64", 64, False, 0),
                                   ("noncausal-attention:chunk=50", 50, False, 0),
                                   ("noncausal-attention", 256, False, 0),
                                   ("noncausal-attention:chunk=64,heads=query", 64, True, 0),
                                   ("noncausal-attention:chunk=64,window=6", 64, False, 6)):
            compare("llama2c", a, spec, chunk, pq, w, "3,10,40,50%,200", work)
        compare("llama3-8b", s, "noncausal-attention:chunk=128", 128, False, 0, "8,60,50%", work)
        # without Q_all: one clear line
        b = os.path.join(work, "b.kvt")
        run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
            "--tokens", "40", "--decode", "1", "--window", "8", "-o", b)
        r = run("replay", b, "--policies", "noncausal-attention", "-o",
                os.path.join(work, "x.json"), ok=False)
        check(r.returncode == 1 and "needs every prompt query (Q_all)" in r.stderr
              and len(r.stderr.strip().splitlines()) == 1,
              "without Q_all: exit %d, %r" % (r.returncode, r.stderr))
    finish("test_noncausal_attention")


if __name__ == "__main__":
    main()
