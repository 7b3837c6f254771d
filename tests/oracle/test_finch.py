#!/usr/bin/python3
"""test_finch.py - `kvtrace replay --policy finch` against NumPy written from kvpress's
FinchPress.score (kvpress/presses/finch_press.py @0603dec): SnapKV's compute_window_attention
of the last window_size queries (softmax over all keys, causal inside the window, the window's
columns dropped), each query's row i multiplied by k_len - window_size + i (normalize_scores),
the mean over the window queries, the mean over the GQA group; no pooling. The window is kept
first (kvpress pads it with max + 1); the check breaks ties toward the earlier token, as
kvtrace documents, and computes in float64.

Traces: a llama2.c capture (T = 150, window queries 8: FINCH windows 8 and 5, heads=query,
normalize=0 against snapkv:kernel=1) and a llama3-8b-shaped synthetic one (GQA 4, window 32 and
17). Every exported kept set must equal the check's. Environment: KVT_BIN, KVT_LIB,
KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (compare_scores, finish, need_library,  # noqa: E402
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from replay_oracle import window_probs  # noqa: E402

kvtrace = need_library()


def finch_scores(t, layer, per_query, W, normalize):
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    Qw = t.read("Q_window", layer, dtype="float32").astype(np.float64)
    Hkv, T, D = K.shape
    Hq = Qw.shape[0]
    scale = t.header["model"].get("attn_scale") or 1 / math.sqrt(D)
    P = window_probs(K, Qw, scale)[:, -W:, :T - W]  # [Hq, W, T - W]
    if normalize:
        P = P * np.arange(T - W, T)[None, :, None]
    s = P.mean(axis=1)  # [Hq, T - W]
    if not per_query:
        s = s.reshape(Hkv, Hq // Hkv, T - W).mean(axis=1)
    return [np.concatenate([x, np.zeros(W)]) for x in s]  # (the window is ranked apart)


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        for path, name, cases, budgets in (
                (a, "llama2c", [(8, True, "kv"), (5, True, "kv"), (8, True, "query"),
                                (8, False, "kv")], "3,10,40,50%,150"),
                (s, "llama3-8b", [(32, True, "kv"), (17, True, "query")], "8,40,100,50%")):
            for W, norm, heads in cases:
                spec = "finch:window=%d,heads=%s%s" % (W, heads, "" if norm else ",normalize=0")
                compare_scores(name, path, spec, budgets, work,
                               lambda t, l, pq, W=W, norm=norm: finch_scores(t, l, pq, W, norm),
                               window=W)
    finish("test_finch")


if __name__ == "__main__":
    main()
