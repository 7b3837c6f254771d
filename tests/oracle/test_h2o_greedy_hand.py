#!/usr/bin/python3
"""test_h2o_greedy_hand.py - the `h2o-greedy` policy's kept sets worked by hand, and its
refusals.

The trace: one layer, one KV head, two query heads, T = 7 tokens, D = 8. Token j's key is
50 e_j (e_7 for none: the keys are 50 e_0 .. 50 e_6) and the query of head h at row i is
50 e_a for the one token a = A[h][i] it attends to, so its logits are 2500 / sqrt(8) = 884 for a
and 0 for every other key it sees: the softmax is exactly 1 at a and exactly 0 elsewhere
(exp(-884) underflows to 0 in double), and every score below is a small integer or a half.
    A[0] (query head 0): rows 0..6 attend 0 0 0 3 2 4 2
    A[1] (query head 1): rows 0..6 attend 0 0 2 1 0 4 5
After step t a token's score in head h is the number of rows i <= t that attend it; a KV head's
is the mean of its two query heads' (reduce=mean, the default) or the larger (reduce=max).
Worked by hand, B = 3 and window=1 (the cache holds 3; only tokens at least one step old leave):
- mean: t = 3: the cache {0,1,2,3} is over 3; among 0, 1, 2 the scores are 2.5, .5, .5: the
  tie goes to the later token, 2 leaves. t = 4: 0, 1, 3 score 3, .5, .5: 3 leaves. t = 5
  (rows 5 attend 4 in both heads): 0, 1, 4 score 3, .5, 1: 1 leaves. t = 6: 0, 4, 5 score
  3, 1, .5: 5 leaves. Kept {0, 4, 6}.
- max: the same until t = 5, where 0, 1, 4 score 3, 1, 1: the tie sends 4 away; t = 6: 0, 1, 5
  score 3, 1, 1: 5 leaves. Kept {0, 1, 6}.
- heads=query, query head 0: t = 3: 0, 1, 2 score 3, 0, 0: 2 leaves; t = 4: 0, 1, 3 score
  3, 0, 1: 1 leaves; t = 5: 0, 3, 4 score 3, 1, 1: 4 leaves; t = 6: 0, 3, 5 score 3, 1, 0: 5
  leaves. Kept {0, 3, 6}. Query head 1: t = 3: 2 leaves (2, 1, 1); t = 4: 3 leaves (3, 1, 0);
  t = 5: 4 leaves (3, 1, 1, the tie); t = 6: 5 leaves (3, 1, 1). Kept {0, 1, 6}.
- h2o (one shot, for contrast) keeps the top 2 of the final sums' means 3, .5, 1.5, .5, 1, .5
  over tokens 0..5: {0, 2, 6}. Token 2 is attended only after the greedy cache dropped it.
- B = 2, window=1, mean: t = 2: 0 and 1 score 2.5 and 0: 1 leaves; t = 3: 0, 2 score 2.5, .5:
  2 leaves; then 3, 4 and 5 leave in turn (.5, 1, .5 against token 0's 3). Kept {0, 6}.
- B = 2, window=0 (nothing protected, the newest token may leave at once), mean: t = 2: 1 leaves
  (2.5, 0, .5); t = 3: 2 and 3 tie at .5: 3 leaves; t = 4: 4 leaves (3, 1, 0); t = 5: 5 (3, 1,
  0); t = 6: 6 (3, 1.5, 0). Kept {0, 2}.
- B <= window keeps the last B (B = 2, window=2: {5, 6}); B >= T keeps all 7.
Refused, each with one line naming the cause: a trace without Q_all, a Q_all with a NaN, and an
option h2o-greedy does not take.
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

T, D, M = 7, 8, 50.0
ATTEND = [[0, 0, 0, 3, 2, 4, 2], [0, 0, 2, 1, 0, 4, 5]]

CASES = [  # spec, budget, {head: kept}
    ("h2o-greedy:window=1", "3", {0: [0, 4, 6]}),
    ("h2o-greedy:window=1,reduce=max", "3", {0: [0, 1, 6]}),
    ("h2o-greedy:window=1,heads=query", "3", {0: [0, 3, 6], 1: [0, 1, 6]}),
    ("h2o:window=1", "3", {0: [0, 2, 6]}),
    ("h2o-greedy:window=1", "2", {0: [0, 6]}),
    ("h2o-greedy:window=0", "2", {0: [0, 2]}),
    ("h2o-greedy:window=2", "2", {0: [5, 6]}),
    ("h2o-greedy", "7", {0: list(range(7))}),
]


def tensors():
    k = np.zeros((1, T, D), np.float32)
    for j in range(T):
        k[0, j, j] = M
    q = np.zeros((2, T, D), np.float32)
    for h in range(2):
        for i, a in enumerate(ATTEND[h]):
            q[h, i, a] = M
    return k, q


def make_trace(src, dst, q_all=True, nan=False):
    """src's tokens and header cut to one layer, one KV head and two query heads, with the keys
    and queries above (V: src's; Q_window: the last two rows of Q_all)."""
    k, q = tensors()
    if nan:
        q[1, 4, 2] = np.nan
    with kvtrace.open(src) as t:
        h = json.loads(json.dumps(t.header))
        h["model"].update(n_layers=1, n_kv_heads=1, n_q_heads=2, head_dim=D)
        h["model"].pop("attn_scale", None)
        with kvtrace.TraceWriter(dst, h, force=True) as w:
            for kind in ("positions", "modality", "token_ids"):
                w.append(kind, t.read(kind))
            w.append("K", k, layer=0)
            w.append("V", t.read("V", 0, dtype="float32")[:1].copy(), layer=0)
            w.append("Q_window", q[:, T - 2:].copy(), layer=0)
            if q_all:
                w.append("Q_all", q, layer=0)
    return dst


def main():
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "src.kvt")
        run("capture-llama2c", "--model",
            os.path.join(os.environ["KVT_SOURCE_ROOT"], "models", "stories260K.bin"),
            "--tokens", str(T), "--seed", "2", "--decode", "0", "--window", "2", "-o", src)
        tr = make_trace(src, os.path.join(work, "hand.kvt"))
        sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
        for spec, budget, want in CASES:
            run("replay", tr, "--policies", spec, "--budgets", budget, "--export-selection", sel,
                "-o", res, "--force")
            got = {r["head"]: r["kept"] for r in json.load(open(sel))["records"]}
            check(got == want, "%s at %s: kept %s, want %s" % (spec, budget, got, want))
        no_q = make_trace(src, os.path.join(work, "noq.kvt"), q_all=False)
        refused(["replay", no_q, "--policies", "h2o-greedy", "--budgets", "3", "-o", res,
                 "--force"], "Q_all")
        bad = make_trace(src, os.path.join(work, "nan.kvt"), nan=True)
        refused(["replay", bad, "--policies", "h2o-greedy:window=1", "--budgets", "3", "-o",
                 res, "--force"], "Q_all of query head 1, token 4, is not finite")
        refused(["replay", tr, "--policies", "h2o-greedy:kernel=3", "--budgets", "3", "-o", res,
                 "--force"], "kernel")
    finish("test_h2o_greedy_hand")


if __name__ == "__main__":
    main()
