#!/usr/bin/python3
"""test_cam.py - `cam` against NumPy written from KVCache-Factory's CAMKVCluster.update_kv
(pyramidkv/pyramidkv_utils.py, the version with kv_head mode): the window queries' attention
(softmax over all keys, causal inside the window; GQA mean first in kv_head mode), its mean over
the window queries a, start = ceil(0.1 T), then for token_index = start + W .. T-1 and
t = token_index - W: p = a[t] / max(a[:start] U a[t : t+W]) (NaN -> 0, clamp to [0, 1]),
mask ~ Bernoulli(p), v[t+1 : t+W+1] += v[t] * mask / W; then the window and the prefix tokens
with the largest column sums, values merged. torch's draws cannot be reproduced: the check
draws from a Python copy of kvtrace's generator (xorshift64* seeded through splitmix64 with
seed ^ (layer+1)*0x9E3779B97F4A7C15 ^ (head+1)*0xC2B2AE3D27D4EB4F, one uniform per t), and
also checks expected=1, which merges by p itself. Each head's kept set must equal
snapkv:kernel=1's, and its err_window and err_decode (the merged values, the original keys)
the NumPy ones.

Traces: a llama2.c capture (T = 150, 8 query heads on 4 KV heads, 2 decode steps) and a
llama3-8b-shaped synthetic one (T = 300, GQA 4). Environment: KVT_BIN, KVT_LIB,
KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import check, finish, need_library, run, score_traces  # noqa: E402
import numpy as np  # noqa: E402
from replay_oracle import window_probs  # noqa: E402
from test_merge import ErrTally, merged_errors, read_layers  # noqa: E402

kvtrace = need_library()
M64 = (1 << 64) - 1


class Rng:
    """kvt_rng (common/misc.c): splitmix64 seeding, xorshift64* draws."""

    def __init__(self, seed):
        z = (seed + 0x9e3779b97f4a7c15) & M64
        z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
        z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
        z ^= z >> 31
        self.s = z or 0x2545f4914f6cdd1d

    def uniform(self):
        x = self.s
        x ^= x >> 12
        x ^= (x << 25) & M64
        x ^= x >> 27
        self.s = x
        return (((x * 0x2545f4914f6cdd1d) & M64) >> 11) * (1.0 / 9007199254740992.0)


def cam_values(a, V, W, layer, head, seed, expected, ratio=0.1):
    """CaM's merged values [T, D] of one head (a [T] its mean window attention)."""
    T = len(a)
    v = V.copy()
    start = math.ceil(ratio * T)
    rng = Rng(seed ^ (((layer + 1) * 0x9E3779B97F4A7C15) & M64)
              ^ (((head + 1) * 0xC2B2AE3D27D4EB4F) & M64))
    for token_index in range(start + W, T):
        t = token_index - W
        mean_attn = np.max(np.concatenate([a[:start], a[token_index - W:token_index]]))
        with np.errstate(divide="ignore", invalid="ignore"):
            p = a[t] / mean_attn
        p = 0.0 if np.isnan(p) else 1.0 if np.isinf(p) else min(max(p, 0.0), 1.0)
        mask = p if expected else float(rng.uniform() < p)
        v[t + 1:t + W + 1] += v[t] * mask / W
    return v


def check_trace(name, path, W, heads, seed, expected, budgets, work):
    spec = "cam:window=%d,heads=%s%s" % (W, heads, ",expected=1" if expected else "")
    base = "snapkv:window=%d,kernel=1,heads=%s" % (W, heads)
    sel = os.path.join(work, "sel.json")
    res = os.path.join(work, "r.json")
    run("replay", path, "--policies", spec + "," + base, "--budgets", budgets, "--seed", seed,
        "--export-selection", sel, "-o", res, "--force")
    exp = json.load(open(sel))
    r = json.load(open(res))
    kept = {(x["policy"], x["layer"], x["head"], x["budget_tokens"]): x["kept"]
            for x in exp["records"]}
    with kvtrace.open(path) as t:
        m = t.header["model"]
        T, Hq, Hkv = t.header["n_tokens"], m["n_q_heads"], m["n_kv_heads"]
        scale = m.get("attn_scale") or 1 / math.sqrt(m["head_dim"])
        layers = read_layers(t)
    G = Hq // Hkv
    tally = ErrTally(name, spec)
    bad_sets = 0
    for l, x in enumerate(layers):
        Pw = window_probs(x["K"], x["Q_window"], scale)[:, -W:, :]  # [Hq, W, T]
        for h in range(Hq if heads == "query" else Hkv):
            g = h // G if heads == "query" else h
            P = Pw[h] if heads == "query" else Pw[g * G:(g + 1) * G].mean(axis=0)
            vm = cam_values(P.mean(axis=0), x["V"][g], W, l, h, int(seed), expected)
            qh = [h] if heads == "query" else range(g * G, (g + 1) * G)
            for run_ in (r_ for r_ in r["traces"][0]["runs"] if r_["policy"] == 0):
                B = run_["budget_tokens"]
                ks = kept[(0, l, h, B)]
                bad_sets += ks != kept[(1, l, h, B)]
                idx = np.array(ks, dtype=int)
                mv = vm[idx] if B <= T else x["V"][g][idx]
                tally.add(run_, l, h, merged_errors(x, g, qh, idx, x["K"][g][idx], mv, scale))
    print("%s %s --seed %s: %s; %d kept sets differ from %s's" % (
        name, spec, seed, tally.summary(), bad_sets, base))
    check(tally.n > 0 and tally.bad == 0 and bad_sets == 0, "%s %s" % (name, spec))


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work)
        for path, name, W, budgets in ((a, "llama2c", 8, "3,20,64,50%,150,200"),
                                       (s, "llama3-8b", 32, "16,40,100,300")):
            for heads, seed, expected in (("kv", "0", False), ("kv", "5", True),
                                          ("query", "11", False)):
                check_trace(name, path, W, heads, seed, expected, budgets, work)
    finish("test_cam")


if __name__ == "__main__":
    main()
