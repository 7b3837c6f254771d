#!/usr/bin/python3
"""test_rkv.py - `rkv` (R-KV, arXiv 2505.24133) against NumPy written from its HF code
(Zefan-Cai/R-KV: rkv/compression/r1_kv.py R1KV.update_kv, rkv/utils.py compute_attention_scores
and cal_similarity, rkv/modeling.py's attention and CausalLM forwards, run_math.py's defaults):

- update_kv on a cache of n >= B entries (else nothing): logits of the last W queries against
  every cached key divided by sqrt(d) (the trace's scale), the max (or mean) over the KV head's
  query heads; softmax over the first n - W keys; the mean over the W rows; max_pool1d(kernel,
  padding kernel // 2); cal_similarity: unit keys k / (|k| + 1e-8), the cosine matrix with its
  diagonal filled with 0, per row the largest column index whose cosine exceeds the threshold
  (0 when none: torch.max of where(mask, arange, 0)) scattered to 0, the mean over rows, the
  softmax over all n columns, its first n - W; score = lambda * attention - (1 - lambda) *
  similarity; the cache becomes topk(B - W) of the first n - W (score order) then the last W;
- the compression flag starts as None, so the prefill's forward compresses the prompt (its last
  W queries); then after each forward whose length (prompt plus tokens since) is a multiple of
  divide_length, the next forward compresses the cache holding its own token with the last W
  queries, and attends with the uncompressed keys (it compresses into the cache after its own
  attention inputs were taken).
The cache is kept in that order (pooling and the last similar column follow it); ties to the
earlier token. Checked: every exported prompt-time set and step set, and the decode metrics
(test_decoding.check_caches), on a stories260K capture, a llama3-8b-shaped bf16 trace and a
qwen2-vl-7b-shaped trace, at budgets below and above the prompt, with the defaults and other
options; decode=0; lambda=1 (the repository's SnapKV); and the refusals. Environment:
KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, check_sets, finish, need_library, refused, run  # noqa: E402
import numpy as np  # noqa: E402
from test_decoding import check_caches  # noqa: E402

kvtrace = need_library()
EVICTED = [0]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def r1kv_scores(keys, q, scale, o):
    """R1KV._compute_scores: keys [n, D] in cache order, q [nq, W, D] the last W queries."""
    n, W = len(keys), o["window"]
    z = np.einsum("xid,jd->xij", q, keys) * scale
    z = z.max(axis=0) if o["reduce"] == "max" else z.mean(axis=0)
    a = softmax(z[:, :n - W]).mean(axis=0)
    h = o["kernel"] // 2
    ap = np.array([a[max(0, j - h):j + h + 1].max() for j in range(n - W)])
    kn = keys / (np.linalg.norm(keys, axis=-1, keepdims=True) + 1e-8)
    C = kn @ kn.T
    np.fill_diagonal(C, 0.0)
    idx = np.where(C > o["threshold"], np.arange(n)[None, :], 0)
    C[np.arange(n), idx.max(axis=-1)] = 0.0
    sim = softmax(C.mean(axis=0))
    return o["lambda"] * ap - (1 - o["lambda"]) * sim[:n - W]


def rkv_caches(rd, B, h, g, scale, o, per_query):
    """(the prompt-time set, [G] the entries decode query s sees) of selection head h."""
    K, Kd = rd["K"][g], rd["K_decode"][g]
    T, G, W = len(K), len(Kd), o["window"]
    Hq, Hkv = rd["Q_decode"].shape[0], rd["K"].shape[0]
    heads = [h] if per_query else list(range(g * (Hq // Hkv), (g + 1) * (Hq // Hkv)))
    Qw, Qd = rd["Q_window"][heads], rd["Q_decode"][heads]
    allk = np.concatenate([K, Kd])

    def queries(s):  # the last W queries through decode step s (-1: the prompt's)
        return np.stack([Qd[:, t] if t >= 0 else Qw[:, Qw.shape[1] + t]
                         for t in range(s - W + 1, s + 1)], axis=1)

    def compress(cache, s):
        sc = r1kv_scores(allk[cache], queries(s), scale, o)
        order = sorted(range(len(cache) - W), key=lambda i: (-sc[i], cache[i]))
        EVICTED[0] += len(cache) - B
        return [cache[i] for i in order[:B - W]] + cache[len(cache) - W:]

    cache = list(range(T))
    if T >= B:
        cache = compress(cache, -1)
    prompt = sorted(cache)
    seen = []
    for s in range(G):
        cache.append(T + s)
        seen.append(sorted(cache))
        if o["decode"] and (T + s) % o["interval"] == 0 and len(cache) >= B:
            cache = compress(cache, s)
    return prompt, seen


def case(name, path, work, budgets, opts):
    o = dict(window=8, kernel=7, reduce="max", threshold=0.5, interval=128, decode=True,
             per_query=False)
    o["lambda"] = 0.1
    o.update(opts)
    dflt = dict(window=8, kernel=7, reduce="max", threshold=0.5, interval=128)
    parts = ["%s=%s" % (k, o[k]) for k in dflt if o[k] != dflt[k]]
    parts += ["lambda=%g" % o["lambda"]] if o["lambda"] != 0.1 else []
    parts += ["heads=query"] if o["per_query"] else []
    parts += ["decode=0"] if not o["decode"] else []
    spec = "rkv" + (":" + ",".join(parts) if parts else "")
    memo, before = {}, EVICTED[0]

    def both(rd, layer, B, h, g, scale):
        if (layer, B, h) not in memo:
            memo[(layer, B, h)] = rkv_caches(rd, B, h, g, scale, o, o["per_query"])
        return memo[(layer, B, h)]

    if o["decode"]:
        check_caches(name, path, work, spec, budgets, o["per_query"], lambda *a: both(*a)[1])
    else:
        run("replay", path, "--policy", spec, "--budgets", budgets, "--export-selection",
            os.path.join(work, "sel.json"), "-o", os.path.join(work, "r.json"), "--force")
    with open(os.path.join(work, "sel.json")) as fh:
        every = json.load(fh)["records"]
    recs = [r for r in every if r["step"] < 0]
    check(o["decode"] or len(recs) == len(every), "%s: decode=0 exported step sets" % spec)
    pairs = []
    with kvtrace.open(path) as t:
        m = t.header["model"]
        grp = m["n_q_heads"] // m["n_kv_heads"]
        scale = m.get("attn_scale") or 1 / np.sqrt(m["head_dim"])
        for layer in t.layers():
            rd = {k: t.read(k, layer, dtype="float32").astype(np.float64)
                  for k in ("K", "K_decode", "Q_decode", "Q_window")}
            for r in recs:
                if r["layer"] == layer:
                    h = r["head"]
                    g = h // grp if o["per_query"] else h
                    pairs.append((r, set(both(rd, layer, r["budget_tokens"], h, g, scale)[0])))
    check_sets(name, spec + " (prompt-time)", pairs, budgets)
    print("%s %s: %d entries evicted" % (name, spec, EVICTED[0] - before))
    check(EVICTED[0] > before, "%s %s: nothing evicted" % (name, spec))


def main():
    work = tempfile.mkdtemp(prefix="kvt_rkv_")
    a = os.path.join(work, "a.kvt")  # T = 150, Hq 8 on Hkv 4, D = 8, 40 decode steps
    run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
        "--tokens", "150", "--decode", "40", "--window", "8", "-o", a)
    b = os.path.join(work, "b.kvt")  # llama3-8b-shaped: GQA 4, D = 128, bf16
    run("synth", "--shape", "llama3-8b", "--tokens", "200", "--layers", "2", "--decode", "24",
        "-o", b)
    c = os.path.join(work, "c.kvt")  # qwen2-vl-7b-shaped: groups of 7, an image
    run("synth", "--shape", "qwen2-vl-7b", "--tokens", "160", "--layers", "1", "--decode", "20",
        "--image-frac", "0.5", "-o", c)
    # compressions at prefill (B <= T) and at decode steps 10 and 26 ((150 + s) % 16 == 0)
    case("llama2c", a, work, "20,64,150,160", dict(interval=16))
    case("llama2c", a, work, "30,100,170", dict(interval=8, per_query=True, reduce="mean"))
    case("llama2c", a, work, "24,90", dict(interval=4, window=4, kernel=3, threshold=0.2))
    case("llama2c", a, work, "40,100", dict(interval=10, kernel=1, threshold=0.9))
    case("llama2c", a, work, "40,100", dict(interval=5, decode=False))
    # lambda=1: the repository's SnapKV (its max-pooled scores tie in runs: earlier token first)
    case("llama2c", a, work, "40,100", {"interval": 12, "lambda": 1.0})
    case("llama3-8b", b, work, "40,150,210", dict(interval=8))
    case("llama3-8b", b, work, "64", dict(interval=5, threshold=0.1))
    case("qwen2-vl-7b", c, work, "30,120,170", dict(interval=10))
    check(EVICTED[0] > 10000, "only %d entries evicted over the cases" % EVICTED[0])

    R = ["replay", a, "-o", os.path.join(work, "x.json"), "--force", "--budgets"]
    refused(R + ["8", "--policies", "rkv"],
            "rkv: a budget of 8 tokens: R-KV keeps the last window=8 and needs a budget above it")
    refused(R + ["64", "--policies", "rkv:kernel=4"], "rkv: kernel=4 must be odd")
    refused(R + ["64", "--policies", "rkv:reduce=sum"], "rkv: reduce=sum")
    refused(R + ["64", "--policies", "rkv:window=16"],
            "policy rkv:window=16: window=16 needs 16 stored window queries; the trace has 8")
    finish("test_rkv", work)


if __name__ == "__main__":
    main()
