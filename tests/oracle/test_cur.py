#!/usr/bin/python3
"""test_cur.py - `kvtrace replay --policy cur` against NumPy, written from kvpress's
CURPress.score (kvpress/presses/cur_press.py @a0b8d34, without use_random_leverage): squared
key and value norms, each divided by its sum over blocks of local_window_size tokens (zero
padding), combined as key / value / kv_avg / kv_product, divided by the sum over the prompt, the
first num_sinks tokens set to 1. kvpress then keeps the top n_kept; the check breaks ties toward
the earlier token, as kvtrace documents (torch.topk leaves them unspecified), puts NaN above
every number (torch.topk's order) and computes in float64.

Traces: a llama2.c capture (T = 150: blocks of 16 leave a short last one) and a llama3-8b-shaped
synthetic one (bf16, GQA); every option; and a copy whose keys are zero over one block (0/0:
NaN scores). Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or
the library.
"""
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, compare_scores, copy_trace, finish, need_library,  # noqa: E402
                      replay_export, run, score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()


def cur_scores(K, V, sinks, leverage, local):
    """[T] CURPress's score of one KV head (K, V [T, D] float64)."""
    k2 = (K ** 2).sum(-1)
    v2 = (V ** 2).sum(-1)
    n = k2.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        if local:
            pad = (local - n % local) % local
            k2 = np.pad(k2, (0, pad)).reshape(-1, local)
            k2 = (k2 / k2.sum(-1, keepdims=True)).reshape(-1)[:n]
            v2 = np.pad(v2, (0, pad)).reshape(-1, local)
            v2 = (v2 / v2.sum(-1, keepdims=True)).reshape(-1)[:n]
        s = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[leverage]
        s = s / s.sum()
    s[:sinks] = 1.0
    return s


def compare(name, path, spec, budgets, work, sinks=4, leverage="kv_product", local=16):
    def layer_scores(t, layer, per_query):
        K = t.read("K", layer, dtype="float32").astype(np.float64)
        V = t.read("V", layer, dtype="float32").astype(np.float64)
        return [cur_scores(K[g], V[g], sinks, leverage, local) for g in range(K.shape[0])]
    compare_scores(name, path, spec, budgets, work, layer_scores, nan_first=True)


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        cases = [("cur", {}), ("cur:leverage=key", {"leverage": "key"}),
                 ("cur:leverage=value,sinks=0", {"leverage": "value", "sinks": 0}),
                 ("cur:leverage=kv_avg,local=7", {"leverage": "kv_avg", "local": 7}),
                 ("cur:local=0", {"local": 0}), ("cur:local=1", {"local": 1}),
                 ("cur:sinks=200", {"sinks": 200}), ("cur:heads=query,local=32", {"local": 32})]
        for spec, kw in cases:
            compare("llama2c", a, spec, "1,3,10,40,50%,200", work, **kw)
        compare("llama3-8b", s, "cur", "8,60,50%", work)
        compare("llama3-8b", s, "cur:leverage=kv_avg,local=10,heads=query", "8,60", work,
                leverage="kv_avg", local=10)

        # KV head 1's keys zero over tokens 32..47 of layer 0: 0/0 in that block, NaN
        # everywhere after the normalisation (key, kv_*); leverage=value is untouched
        def zero(kind, layer, x):
            if kind == "K" and layer == 0:
                x[1, 32:48] = 0.0
        z = copy_trace(a, os.path.join(work, "z.kvt"), edit=zero)
        for spec, kw in (("cur", {}), ("cur:leverage=value", {"leverage": "value"}),
                         ("cur:local=0,leverage=key", {"local": 0, "leverage": "key"})):
            compare("zero block", z, spec, "3,10,50%", work, **kw)
        # every score but the sinks' (1) NaN, above every number: the earliest after the sinks
        exp = replay_export(z, "cur", "6", work)
        got = [r["kept"] for r in exp["records"] if r["layer"] == 0 and r["head"] == 1]
        check(got == [list(range(4, 10))], "zero block, NaN scores: kept %s" % got)
        r = run("replay", a, "--policy", "cur:leverage=both", "--budgets", "8", "-o",
                os.path.join(work, "x.json"), "--force", ok=False)
        check(r.returncode == 2 and "expected key, value, kv_avg or kv_product" in r.stderr,
              "leverage=both: %d %r" % (r.returncode, r.stderr))
    finish("test_cur")


if __name__ == "__main__":
    main()
