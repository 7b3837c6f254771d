#!/usr/bin/python3
"""test_kvzip.py - `capture-llama2c --kvzip` and the replay policy `kvzip` against NumPy written
from KVzip (arXiv 2505.23416) as NVIDIA kvpress's KVzipPress implements it.

Scores (the kvzip_score record, [Hkv, T, 1] f32 per layer), recomputed here with the float64
forward of llama2c_oracle.py: the prompt x (T tokens) is cut into chunks c_i = x[iC, (i+1)C);
chunk i's repeat input is the instruction (--kvzip-prompt-ids, none by default), the last
min(8, |c_(i-1)|) tokens of the previous chunk (not for the first) and c_i, run after the whole
prompt (positions T, T+1, ...). Per layer and KV head, each repeat query of the head's group
attends (softmax of q.k / sqrt(D), float64) to the keys [0, min(4, start_i)), the chunk's own
[start_i, end_i) and the repeat keys up to its own; token j of the chunk scores the largest
probability it gets over the group's query heads and the repeat rows. C is --kvzip-chunk, by
default the largest C <= min(T, 2048) whose longest repeat input fits the S - T positions after
the prompt (S = seq_len): m + T for one chunk, else m + max(C, min(8, C) + min(C, T - C)), m the
instruction's length. Compared within rtol 1e-4 / atol 1e-6.
The pass changes nothing else: K, V, the queries, the decode steps and the token tables of a
capture with --kvzip equal a capture without it, bit for bit.

Selection (--export-selection) of `kvzip[:sinks=N,layerwise=0|1]` at a budget B < T (fraction
f = B/T, or the written fraction of a percentage; B >= T keeps everything), as KVzipPress's
compress_post: s = the scores with tokens j < sinks set to 1.0; ratio = 1 - f; with layerwise
every layer prunes int(Hkv T ratio) entries, else n = max(int(L Hkv T ratio) - 1, 0) of all the
scores sorted ascending is the threshold and layer l prunes its entries <= it; a layer keeps its
Hkv T - n_l largest entries over (head, token), ties to the smaller flat index h T + j. A head's
kept set (possibly empty: kept []) is its tokens among those. Checked on a one-chunk capture
(T = 150) with sinks 4, 0, 10, layerwise and uniform (each head its B best: the released
KVzip's pair-uniform level), a capture with 40-token chunks and an instruction,
and a T = 300 capture with an instruction, whose default chunk leaves two chunks. A replay of
kvzip on a trace without kvzip_score is refused with a line naming it.

Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT. Exit 77 without NumPy, the CLI, the library or
the model.
"""
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, finish, need_library, run  # noqa: E402 - exit 77 if absent
import numpy as np  # noqa: E402
import llama2c_oracle  # noqa: E402

kvtrace = need_library()
MODEL = os.path.join(ROOT, "models", "stories260K.bin")
if not os.path.exists(MODEL):
    print("SKIP: no stories260K model")
    sys.exit(77)

N_SINK, TAIL, MAX_CHUNK = 4, 8, 2048  # the capture's sinks, overlap and largest chunk
RTOL, ATOL = 1e-4, 1e-6


def repeat_rows(T, m, C):
    """The longest repeat input of chunk size C: the instruction, the previous chunk's last
    min(8, C) tokens (every chunk but the first), the chunk."""
    if C >= T:
        return m + T
    return m + max(C, min(TAIL, C) + min(C, T - C))


def default_chunk(T, m, seq_len):
    """The chunk size without --kvzip-chunk: the largest C <= min(T, 2048) whose longest
    repeat input fits after the prompt."""
    C = min(T, MAX_CHUNK)
    while C >= 1 and repeat_rows(T, m, C) > seq_len - T:
        C -= 1
    return C


def kvzip_scores(model, x, instr, C, n_sink=N_SINK):
    """[L, Hkv, T] KVzip scores of prompt x with instruction ids instr and chunk size C."""
    x = [int(v) for v in x]
    T = len(x)
    L, Hq, Hkv, D = model["L"], model["Hq"], model["Hkv"], model["D"]
    G = Hq // Hkv
    out = np.full((L, Hkv, T), np.nan)
    for start in range(0, T, C):
        end = min(start + C, T)
        tail = x[start - min(TAIL, C):start] if start > 0 else []
        r = list(instr) + tail + x[start:end]
        q = len(r)
        _, qs, ks, _, _ = llama2c_oracle.forward(model, np.array(x + r), T)
        sink, n = min(n_sink, start), end - start
        keys = np.r_[0:sink, start:end, T:T + q]
        future = np.triu(np.ones((q, q), dtype=bool), 1)  # repeat row a sees repeat keys <= a
        for layer in range(L):
            for g in range(Hkv):
                Q = qs[layer, T:T + q, g * G:(g + 1) * G]  # [q, G, D]
                K = ks[layer, keys, g]  # [sink + n + q, D]
                z = np.einsum("ahd,kd->hak", Q, K) / math.sqrt(D)
                z[:, :, sink + n:][:, future] = -np.inf
                p = np.exp(z - z.max(axis=-1, keepdims=True))
                p /= p.sum(axis=-1, keepdims=True)
                out[layer, g, start:end] = p[:, :, sink:sink + n].max(axis=(0, 1))
    assert not np.isnan(out).any()
    return out


def kvzip_kept(S, f, sinks=4, layerwise=False, B=None):
    """Per layer, per KV head, the kept token indices (ascending) of scores S [L, Hkv, T] at
    budget fraction f < 1 (KVzipPress.compress_post with compression_ratio 1 - f); with
    layerwise "uniform" (the released KVzip's pair-uniform level) each head's B best."""
    L, H, T = S.shape
    s = S.astype(np.float64)  # f32 values, exactly
    s[:, :, :sinks] = 1.0
    if layerwise == "uniform":
        return [[sorted(int(j) for j in np.lexsort((np.arange(T), -s[l, g]))[:B])
                 for g in range(H)] for l in range(L)]
    ratio = 1.0 - f
    if layerwise:
        pruned = [int(H * T * ratio)] * L
    else:
        srt = np.sort(s.ravel())
        thres = srt[max(int(s.size * ratio) - 1, 0)]
        pruned = (s.reshape(L, -1) <= thres).sum(axis=1)
    kept = []
    for layer in range(L):
        flat = s[layer].ravel()
        keep = np.lexsort((np.arange(H * T), -flat))[:H * T - int(pruned[layer])]
        kept.append([sorted(int(i) % T for i in keep if i // T == g) for g in range(H)])
    return kept


def selftest():
    """Hand-worked cases of kvzip_kept and default_chunk (run by hand: test_kvzip.py selftest)."""
    S = np.array([[[0.1, 0.5, 0.3], [0.2, 0.5, 0.0]],      # layer 0: heads 0, 1
                  [[0.9, 0.4, 0.4], [0.05, 0.6, 0.7]]], np.float32)  # layer 1
    # layerwise, f = 1/3: each layer prunes int(6 * 2/3) = 4, keeps 2 of 6
    # layer 0: 0.5 (h0 j1, flat 1) and 0.5 (h1 j1, flat 4); layer 1: 0.9 and 0.7
    assert kvzip_kept(S, 1 / 3, sinks=0, layerwise=True) == [[[1], [1]], [[0], [2]]]
    # global, f = 0.5: 12 scores, n = int(12 * 0.5) - 1 = 5; sorted .0 .05 .1 .2 .3 .4 .4 ...:
    # thres = 0.4; layer 0 prunes 4 (.1 .3 .2 .0), layer 1 prunes 3 (.4 .4 .05)
    assert kvzip_kept(S, 0.5, sinks=0) == [[[1], [1]], [[0], [1, 2]]]
    # sinks=1: token 0 scores 1.0 everywhere; layerwise f = 1/3 keeps the two sinks
    assert kvzip_kept(S, 1 / 3, sinks=1, layerwise=True) == [[[0], [0]], [[0], [0]]]
    # layerwise f = 0.5: layer 1 keeps 3 of 6 (0.9, 0.7, then 0.6)
    assert kvzip_kept(S, 0.5, sinks=0, layerwise=True)[1] == [[0], [1, 2]]
    # tie at the cut: keep 1 of [0.4 (flat 1), 0.4 (flat 2)] by index
    T2 = np.array([[[0.4, 0.4]]], np.float32)
    assert kvzip_kept(T2, 0.5, sinks=0, layerwise=True) == [[[0]]]
    # empty heads: layerwise f = 0.01 keeps 6 - int(5.94) = 1 entry (0.5 of head 0, the tie
    # to the smaller index); globally n = int(11.88) - 1 = 10, thres 0.7 prunes all of layer 0
    assert kvzip_kept(S, 0.01, sinks=0, layerwise=True)[0] == [[1], []]
    assert kvzip_kept(S, 0.01, sinks=0) == [[[], []], [[0], []]]
    assert default_chunk(150, 0, 512) == 150 and default_chunk(300, 0, 512) == 212
    assert default_chunk(256, 0, 512) == 256 and default_chunk(257, 0, 512) == 255
    assert default_chunk(448, 0, 512) == 56 and default_chunk(500, 0, 512) == 6
    # scores: a one-chunk prompt scores every token in (0, 1]; the first chunk has no sinks
    model = llama2c_oracle.load(MODEL)
    x = [1, 5, 9, 12, 40, 41, 300]
    s1 = kvzip_scores(model, x, [], 7)
    assert s1.shape == (model["L"], model["Hkv"], 7) and (s1 > 0).all() and (s1 <= 1).all()
    s2 = kvzip_scores(model, x, [7, 8], 3)  # chunks [0,3) [3,6) [6,7)
    assert (s2 > 0).all() and (s2 <= 1).all()
    print("selftest: ok")


def capture(path, T, seed, *extra):
    """capture-llama2c of T sampled tokens (seed), 4 decode steps, window 8; its stdout."""
    return run("capture-llama2c", "--model", MODEL, "--tokens", T, "--seed", seed, "--decode", 4,
               "--window", 8, *extra, "-o", path, "--force").stdout


def check_scores(name, path, instr, chunk, model):
    """The trace's kvzip_score records against kvzip_scores(); returns them [L, Hkv, T] f32."""
    with kvtrace.open(path) as t:
        T = t.header["n_tokens"]
        x = np.array(t.tokens["token_ids"]).astype(int)
        mh = t.header["model"]
        L, Hkv = mh["n_layers"], mh["n_kv_heads"]
        got = []
        for layer in range(L):
            if not check(t.has("kvzip_score", layer), "%s: no kvzip_score for layer %d"
                         % (name, layer)):
                return None
            check(t.shape("kvzip_score", layer) == (Hkv, T, 1) and
                  t.stored_dtype("kvzip_score", layer) == "f32",
                  "%s: layer %d kvzip_score %s %s, not [%d, %d, 1] f32" % (
                      name, layer, t.shape("kvzip_score", layer),
                      t.stored_dtype("kvzip_score", layer), Hkv, T))
            got.append(t.read("kvzip_score", layer=layer, dtype="float32")[:, :, 0])
    got = np.array(got)
    C = chunk or default_chunk(T, len(instr), model["seq_len"])
    want = kvzip_scores(model, x, instr, C)
    d = np.abs(got - want)
    rel = d / np.maximum(np.abs(want), 1e-30)
    bad = d > ATOL + RTOL * np.abs(want)
    print("%s: T %d, chunk %d (%d chunks), instruction %s: %d scores, max abs diff %.3g, max rel "
          "diff %.3g, %d outside rtol %g / atol %g" % (
              name, T, C, -(-T // C), list(instr), got.size, d.max(), rel.max(), bad.sum(),
              RTOL, ATOL))
    for layer, g, j in list(zip(*np.nonzero(bad)))[:5]:
        print("  layer %d head %d token %d: trace %.9g, NumPy %.9g" % (
            layer, g, j, got[layer, g, j], want[layer, g, j]))
    check(not bad.any() and np.isfinite(got).all(), "%s: %d scores differ" % (name, bad.sum()))
    return got


def check_unchanged(name, a, b):
    """Every record but kvzip_score (and meta_json) of traces a and b equal, bit for bit."""
    kinds = ("K", "V", "Q_window", "Q_decode", "K_decode", "V_decode", "attn_colsum", "Q_all")
    n = 0
    with kvtrace.open(a) as ta, kvtrace.open(b) as tb:
        check(ta.header["n_tokens"] == tb.header["n_tokens"], "%s: n_tokens differ" % name)
        check(not tb.has("kvzip_score", 0), "%s: the plain capture has kvzip_score" % name)
        for kind in ("token_ids", "modality", "positions", "decode_token_ids"):
            if check(ta.has(kind) == tb.has(kind), "%s: %s in one trace only" % (name, kind)) \
                    and ta.has(kind):
                n += 1
                check(np.array_equal(ta.read(kind), tb.read(kind)), "%s: %s differ" % (name, kind))
        for layer in tb.layers():
            for kind in kinds:
                if not check(ta.has(kind, layer) == tb.has(kind, layer),
                             "%s: %s layer %d in one trace only" % (name, kind, layer)):
                    continue
                if ta.has(kind, layer):
                    n += 1
                    x, y = ta.read(kind, layer), tb.read(kind, layer)
                    check(x.shape == y.shape and x.tobytes() == y.tobytes(),
                          "%s: %s layer %d differs with --kvzip" % (name, kind, layer))
        dec = list(ta.tokens["decode_token_ids"])
    print("%s: %d tensors and tables equal with and without --kvzip (decode tokens %s)"
          % (name, n, dec))


def check_selection(name, path, spec, sinks, layerwise, budgets, scores, work):
    """The replay's kept sets of SPEC against kvzip_kept on the trace's own scores."""
    sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
    run("replay", path, "--policies", spec, "--budgets", budgets, "--export-selection", sel,
        "-o", res, "--force")
    exp = json.load(open(sel))
    runs = json.load(open(res))["traces"][0]["runs"]
    L, H, T = scores.shape
    texts = exp["budgets"]
    check([r["budget_text"] for r in runs] == texts == budgets.split(","),
          "%s %s: budgets %s / %s" % (name, spec, [r["budget_text"] for r in runs], texts))
    kept = {(r["budget"], r["layer"], r["head"]): r for r in exp["records"]}
    bad = n_sets = n_empty = n_all = 0
    for bi, run_ in enumerate(runs):
        B, text = run_["budget_tokens"], run_["budget_text"]
        if B >= T:
            want = [[list(range(T))] * H] * L
        else:
            f = float(text[:-1]) / 100 if text.endswith("%") else B / T
            want = kvzip_kept(scores, f, sinks, layerwise, B)
        for layer in range(L):
            for g in range(H):
                n_sets += 1
                w = want[layer][g]
                n_empty += not w
                n_all += len(w) == T
                r = kept.get((bi, layer, g))
                got = None if r is None else r["kept"]
                if got != w or (r is not None and r["budget_tokens"] != B):
                    bad += 1
                    if bad <= 4:
                        print("  %s %s budget %s (B %d) layer %d head %d: %s" % (
                            name, spec, text, B, layer, g,
                            "no record" if got is None else "replay keeps %d, NumPy %d; only "
                            "replay %s, only NumPy %s" % (
                                len(got), len(w), sorted(set(got) - set(w))[:10],
                                sorted(set(w) - set(got))[:10])))
    extra = len(exp["records"]) - n_sets
    print("%s %s: %d kept sets (%d empty, %d whole), %d differ%s" % (
        name, spec, n_sets, n_empty, n_all, bad,
        ", %d records more than expected" % extra if extra else ""))
    check(bad == 0 and extra == 0, "%s %s: %d of %d kept sets differ" % (name, spec, bad, n_sets))


def check_refusal(path, work):
    r = run("replay", path, "--policies", "kvzip", "--budgets", "8", "-o",
            os.path.join(work, "x.json"), "--force", ok=False)
    err = r.stderr.strip()
    check(r.returncode != 0 and any("kvzip_score" in ln for ln in err.splitlines()),
          "kvzip on a trace without kvzip_score: exit %d, stderr %r" % (r.returncode, err))
    print("no kvzip_score: exit %d: %s" % (r.returncode, err))


def main():
    model = llama2c_oracle.load(MODEL)
    with tempfile.TemporaryDirectory() as work:
        a, a0 = os.path.join(work, "a.kvt"), os.path.join(work, "a0.kvt")
        out_a = capture(a, 150, 3, "--kvzip")
        out_a0 = capture(a0, 150, 3)
        dec = [ln for ln in out_a.splitlines() if ln.startswith("decode tokens")]
        check(dec and dec == [ln for ln in out_a0.splitlines() if ln.startswith("decode tokens")],
              "printed decode tokens differ: %r / %r" % (out_a, out_a0))
        check_unchanged("T150", a, a0)
        sa = check_scores("T150", a, [], None, model)

        instr = [5, 9, 12]
        ids = os.path.join(work, "instr.txt")
        with open(ids, "w") as f:
            f.write(" ".join(map(str, instr)) + "\n")
        b, b0 = os.path.join(work, "b.kvt"), os.path.join(work, "b0.kvt")
        capture(b, 150, 5, "--kvzip", "--kvzip-chunk", 40, "--kvzip-prompt-ids", ids)
        capture(b0, 150, 5)
        check_unchanged("T150-chunk40", b, b0)
        sb = check_scores("T150-chunk40", b, instr, 40, model)

        c = os.path.join(work, "c.kvt")  # default chunk 209 (3 + 209, then 3 + 8 + 91): two
        capture(c, 300, 7, "--kvzip", "--kvzip-prompt-ids", ids)
        sc = check_scores("T300", c, instr, None, model)

        budgets = "1,8,20,37,50%,149,150,200"
        if sa is not None:
            check_selection("T150", a, "kvzip", 4, False, budgets, sa, work)
            check_selection("T150", a, "kvzip:layerwise=1", 4, True, budgets, sa, work)
            check_selection("T150", a, "kvzip:sinks=0", 0, False, budgets, sa, work)
            check_selection("T150", a, "kvzip:sinks=10", 10, False, budgets, sa, work)
            check_selection("T150", a, "kvzip:sinks=10,layerwise=1", 10, True, budgets, sa, work)
            check_selection("T150", a, "kvzip:uniform=1", 4, "uniform", budgets, sa, work)
        if sb is not None:
            check_selection("T150-chunk40", b, "kvzip", 4, False, budgets, sb, work)
            check_selection("T150-chunk40", b, "kvzip:layerwise=1", 4, True, "3,12.5%,40,90", sb,
                            work)
        if sc is not None:  # 299 of 300: L Hkv T (1 - 299/300) is 19.99999999999979 in double
            check_selection("T300", c, "kvzip", 4, False, "2,25%,64,150,299,300", sc, work)
            check_selection("T300", c, "kvzip:layerwise=1", 4, True, "2,25%,64,150,299", sc,
                            work)
        check_refusal(a0, work)
    finish("test_kvzip")


if __name__ == "__main__":
    if sys.argv[1:] == ["selftest"]:
        selftest()
    else:
        main()
