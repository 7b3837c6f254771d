#!/usr/bin/python3
"""test_kvzip_hand.py - the `kvzip` policy's kept sets on scores worked by hand, and its
refusals.

The trace: a llama2.c capture of 6 tokens cut to 2 layers, 2 KV heads and 4 query heads, with
these kvzip_score records (layer, KV head: the scores of tokens 0..5):
    layer 0 head 0: .9  .1  .5  .3  .3  0      layer 1 head 0: .7  .7  0   .1  .2  .9
    layer 0 head 1: .2  .8  .05 .3  .6  .4     layer 1 head 1: .3  .25 .35 .15 .45 .05
N = 24 scores. Worked by hand from kvpress's KVzipPress.compress_post:
- sinks=0, B = 3 (r = .5): n = int(24 * .5) - 1 = 11, the 12th smallest is .3, so every .3
  goes: layer 0 prunes 7 (.1 .3 .3 0 .2 .05 .3) and keeps .9 .8 .6 .5 .4: head 0 {0, 2}, head 1
  {1, 4, 5}; layer 1 prunes 7 and keeps .9 .7 .7 .45 .35: head 0 {0, 1, 5}, head 1 {2, 4}.
  "50%" is the same budget.
- sinks=0, layerwise=1, B = 3: each layer prunes int(12 * .5) = 6; layer 0 keeps the five above
  and the first .3 (head 0 token 3, the lowest flat index of the tie): {0, 2, 3}, {1, 4, 5};
  layer 1 adds .3 (head 1 token 0): {0, 1, 5}, {0, 2, 4}.
- sinks=1 (the default is 4), B = 3: token 0 scores 1 in every head; the 12th smallest is .3;
  layer 0 keeps 1 1 .8 .6 .5 .4: {0, 2}, {0, 1, 4, 5}; layer 1 keeps 1 1 .9 .7 .45 .35:
  {0, 1, 5}, {0, 2, 4}.
- sinks=0, B = 1 (r = 5/6): n = int(24 * 5/6) - 1 = 19, the threshold .7 (the 20th smallest);
  layer 0 keeps .9 and .8: {0}, {1}; layer 1 keeps only .9: {5} and an empty head 1.
- sinks=0, uniform=1 (the released KVzip's pair-uniform level), B = 2: each head its 2 best:
  {0, 2}, {1, 4}, {0, 5} (.9 and the first .7), {2, 4}.
- B = 6 = T keeps everything.
Refused, each with one line naming the cause: a trace without kvzip_score, a kvzip_score that
is not a probability (NaN), kvzip with an option it does not take (window=), and uniform=1 with
layerwise=1.
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import check, finish, need_library, refused, run  # noqa: E402
import numpy as np  # noqa: E402

kvtrace = need_library()

SCORES = np.array([
    [[.9, .1, .5, .3, .3, 0], [.2, .8, .05, .3, .6, .4]],
    [[.7, .7, 0, .1, .2, .9], [.3, .25, .35, .15, .45, .05]],
], dtype=np.float32)

CASES = [  # spec, budget, {(layer, head): kept}
    ("kvzip:sinks=0", "3", {(0, 0): [0, 2], (0, 1): [1, 4, 5], (1, 0): [0, 1, 5], (1, 1): [2, 4]}),
    ("kvzip:sinks=0", "50%", {(0, 0): [0, 2], (0, 1): [1, 4, 5], (1, 0): [0, 1, 5],
                              (1, 1): [2, 4]}),
    ("kvzip:sinks=0,layerwise=1", "3", {(0, 0): [0, 2, 3], (0, 1): [1, 4, 5],
                                        (1, 0): [0, 1, 5], (1, 1): [0, 2, 4]}),
    ("kvzip:sinks=1", "3", {(0, 0): [0, 2], (0, 1): [0, 1, 4, 5], (1, 0): [0, 1, 5],
                            (1, 1): [0, 2, 4]}),
    ("kvzip:sinks=0", "1", {(0, 0): [0], (0, 1): [1], (1, 0): [5], (1, 1): []}),
    ("kvzip:sinks=0,uniform=1", "2", {(0, 0): [0, 2], (0, 1): [1, 4], (1, 0): [0, 5],
                                      (1, 1): [2, 4]}),
    ("kvzip", "6", {(l, h): list(range(6)) for l in range(2) for h in range(2)}),
]


def make_trace(src, dst, scores):
    """src's tokens, K/V of KV heads 0-1 and Q_window of query heads 0-3 in layers 0-1, with
    `scores` as kvzip_score (None: no such records)."""
    with kvtrace.open(src) as t:
        h = json.loads(json.dumps(t.header))
        h["model"].update(n_layers=2, n_kv_heads=2, n_q_heads=4)
        with kvtrace.TraceWriter(dst, h, force=True) as w:
            for kind in ("positions", "modality", "token_ids"):
                w.append(kind, t.read(kind))
            for l in range(2):
                w.append("K", t.read("K", l, dtype="float32")[:2].copy(), layer=l)
                w.append("V", t.read("V", l, dtype="float32")[:2].copy(), layer=l)
                w.append("Q_window", t.read("Q_window", l, dtype="float32")[:4].copy(),
                         layer=l)
                if scores is not None:
                    w.append("kvzip_score", scores[l][:, :, None].copy(), layer=l)
    return dst


def main():
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "src.kvt")
        run("capture-llama2c", "--model",
            os.path.join(os.environ["KVT_SOURCE_ROOT"], "models", "stories260K.bin"),
            "--tokens", "6", "--seed", "2", "--decode", "0", "--window", "2", "-o", src)
        tr = make_trace(src, os.path.join(work, "hand.kvt"), SCORES)
        sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
        for spec, budget, want in CASES:
            run("replay", tr, "--policies", spec, "--budgets", budget, "--export-selection", sel,
                "-o", res, "--force")
            got = {(r["layer"], r["head"]): r["kept"] for r in json.load(open(sel))["records"]}
            check(got == want, "%s at %s: kept %s, want %s" % (spec, budget, got, want))
        refused(["replay", src, "--policies", "kvzip", "--budgets", "3", "-o", res, "--force"],
                "no kvzip_score record")
        bad = SCORES.copy()
        bad[1, 0, 2] = np.nan
        tr_nan = make_trace(src, os.path.join(work, "nan.kvt"), bad)
        refused(["replay", tr_nan, "--policies", "kvzip", "--budgets", "3", "-o", res, "--force"],
                "layer 1, KV head 0, token 2: kvzip_score nan")
        refused(["replay", tr, "--policies", "kvzip:window=2", "--budgets", "3", "-o", res,
                 "--force"], "window")
        refused(["replay", tr, "--policies", "kvzip:uniform=1,layerwise=1", "--budgets", "3",
                 "-o", res, "--force"], "give one of them")
    finish("test_kvzip_hand")


if __name__ == "__main__":
    main()
