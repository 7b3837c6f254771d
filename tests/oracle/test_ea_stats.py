#!/usr/bin/python3
"""test_ea_stats.py - expected-attention's stats=FILE (kvpress's ExpectedAttentionStatsPress,
expected_attention_with_stats.py @00a150c) and the safetensors reader behind it and behind
qfilter's filters= (replay/safetensors.c), against NumPy.

The files are written here byte by byte as the safetensors format lays them out (an 8-byte
little-endian header length, a JSON header of dtype, shape and data_offsets, the data; bf16 by
rounding float32 to nearest even), the way ExpectedAttentionStats.save_pretrained leaves them on
the hub: query_mean [layers, query heads, D] and query_cov [layers, query heads, D, D] of the
pre-RoPE queries. The check: each query head's mu and S from the file, turned by the mean RoPE
rotation over the future positions (test_expected_attention_synth's rope matrices; T, T + 1, ...,
or the largest M-RoPE position + 1; with chunk_scores=kvpress each chunk's n, n + 1, ...),
z = s mu'.k + s^2/2 k^T S' k over the keys past the sinks, softmax, GQA mean (or per query
head), times ||v||, sinks first; kept sets must equal the check's top-B but for near-ties
(within 1e-6 of the cut, at most 2 per run).

Also: statistics written from the trace's own pre-RoPE queries (float64, 1/N) give the kept sets
of the plain policy; kvtrace.ea_stats (the package's calibration over traces' Q_all, its own
RoPE undo) equals this check's full-matrix undo over one and over two traces (1-D RoPE,
interleaved and half pairs, M-RoPE), and its save_safetensors file replays; a trace without Q_all replays with stats= (and is refused without it); a
hub checkpoint's folder is read through its model.safetensors; qfilter's q_filters from a
safetensors file keeps the sets of the same filters as .npy; and malformed files are refused in
one line. Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the
library.
"""
import json
import os
import struct
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, finish, need_library, refused, replay_export,  # noqa: E402
                      run)  # (77 without NumPy or the CLI)
import numpy as np  # noqa: E402
from test_expected_attention_synth import rope_matrices, trace_rope  # noqa: E402

kvtrace = need_library()

NEAR = 1e-6
MAX_NEAR = 2


def bf16_bits(a):
    """float32 -> bfloat16 bits, rounded to nearest even (as torch's .to(torch.bfloat16))."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def encode(dtype, a):
    """(bytes, the values as stored, float64)"""
    if dtype == "BF16":
        u = bf16_bits(a)
        return u.tobytes(), (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    np_t = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I32": "<i4"}[dtype]
    x = np.ascontiguousarray(a, dtype=np_t)
    return x.tobytes(), x.astype(np.float64)


def write_safetensors(path, tensors, meta=None, cut=0):
    """tensors: [(name, dtype, array)]; returns {name: the values as stored}. cut: bytes left
    off the end."""
    header, blobs, stored, off = {}, [], {}, 0
    for name, dtype, a in tensors:
        b, v = encode(dtype, a)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        stored[name] = v
        off += len(b)
    if meta is not None:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    data = struct.pack("<Q", len(h)) + h + b"".join(blobs)
    with open(path, "wb") as f:
        f.write(data[:len(data) - cut] if cut else data)
    return stored


def random_stats(rng, L, Hq, D):
    mu = rng.normal(0, 1.0, (L, Hq, D))
    A = rng.normal(0, 1.0 / np.sqrt(D), (L, Hq, D, D))
    return mu, np.einsum("lhij,lhkj->lhik", A, A)  # symmetric, positive semi-definite


def pre_queries(t, sinks=4):
    """[layer][Hq, N, D]: the trace's pre-RoPE queries past the sinks (each token's full RoPE
    matrix solved)."""
    m = t.header["model"]
    freq, pairs, a, row_of, rows, _ = trace_rope(t)
    Rt = rope_matrices(rows, m["head_dim"], freq, pairs, a, row_of)
    out = []
    for layer in t.layers():
        Q = t.read("Q_all", layer, dtype="float32").astype(np.float64)
        out.append(np.linalg.solve(Rt[sinks:][None], Q[:, sinks:, :, None])[..., 0])
    return out


def own_stats(t, sinks=4, ddof=0, more=()):
    """Mean and covariance (over N - ddof) per layer and query head of the pre-RoPE queries
    past the sinks of t and of the open traces `more`, together."""
    parts = [pre_queries(x, sinks) for x in (t,) + tuple(more)]
    mus, covs = [], []
    for layer in range(len(parts[0])):
        pre = np.concatenate([p[layer] for p in parts], axis=1)  # [Hq, N, D]
        mu = pre.mean(axis=1)
        x = pre - mu[:, None]
        mus.append(mu)
        covs.append(np.einsum("hni,hnj->hij", x, x) / (pre.shape[1] - ddof))
    return np.stack(mus), np.stack(covs)


def close(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def scores(t, mu, cov, sinks=4, future=512, use_cov=True, per_query=False, C=None,
           kvpress=False):
    """{layer: [H, T]} from the given statistics; C: each chunk of C tokens scored on its own
    (kvpress: its future positions n, n + 1, ...; else those after it)."""
    m, T = t.header["model"], t.header["n_tokens"]
    Hq, Hkv, D = m["n_q_heads"], m["n_kv_heads"], m["head_dim"]
    G = Hq // Hkv
    s = m.get("attn_scale") or 1 / np.sqrt(D)
    freq, pairs, a, row_of, rows, _ = trace_rope(t)
    mrope = m["rope"]["type"] == "mrope"
    out = {}
    for layer in t.layers():
        K = t.read("K", layer, dtype="float32").astype(np.float64)
        V = t.read("V", layer, dtype="float32").astype(np.float64)
        H = Hq if per_query else Hkv
        sc = np.zeros((H, T))
        for a0 in range(0, T, C or T):
            n = min(C or T, T - a0)
            S = min(sinks, n)
            p0 = n if kvpress else (rows[a0:a0 + n].max() + 1 if mrope else a0 + n)
            fut = np.repeat((p0 + np.arange(future, dtype=np.float64))[:, None], 3, axis=1)
            Rbar = rope_matrices(fut, D, freq, pairs, a, row_of).mean(axis=0)
            acc = np.zeros((H, n))
            for hq in range(Hq):
                g = hq // G
                mu2, Sig2 = Rbar @ mu[layer, hq], Rbar @ cov[layer, hq] @ Rbar.T
                k = K[g, a0 + S:a0 + n]
                z = s * k @ mu2
                if use_cov:
                    z = z + 0.5 * s * s * np.einsum("ni,ij,nj->n", k, Sig2, k)
                p = np.exp(z - z.max())
                p /= p.sum()
                acc[hq if per_query else g, S:] += p if per_query else p / G
            for h in range(H):
                vn = np.linalg.norm(V[h // G if per_query else h, a0:a0 + n], axis=-1)
                sc[h, a0:a0 + n] = acc[h] * vn
                sc[h, a0:a0 + S] = np.inf
        out[layer] = sc
    return out


def compare(name, path, spec, budgets, work, sc, C=None):
    """Every kept set of SPEC against the check's top-B (C: each chunk's top max(1, int(n f)),
    f the budget's share B/T)."""
    recs = replay_export(path, spec, budgets, work)["records"]
    bad = near = 0
    for r in recs:
        s = sc[r["layer"]][r["head"]]
        T = len(s)
        B = min(r["budget_tokens"], T)
        parts = []  # (chunk order, its keep)
        for a0 in range(0, T, C or T):
            n = min(C or T, T - a0)
            keep = n if B >= T else (max(1, int(n * B / T)) if C else B)
            parts.append((sorted(range(a0, a0 + n), key=lambda j: (-s[j], j)), keep))
        want = set(j for o, k in parts for j in o[:k])
        got = set(r["kept"])
        if want == got:
            continue
        cuts = [s[o[k - 1]] for o, k in parts if 0 < k]
        gap = min(max(abs(s[j] - c) for j in want ^ got) / abs(c) for c in cuts)
        if gap < NEAR:
            near += 1
        else:
            bad += 1
            if bad <= 3:
                print("  %s layer %d head %d B %d: check keeps %s, replay %s (gap %.2g)" % (
                    spec, r["layer"], r["head"], B, sorted(want - got), sorted(got - want), gap))
    print("%s %s at %s: %d sets, %d differ, %d near-ties" % (name, spec, budgets, len(recs), bad,
                                                               near))
    check(len(recs) > 0 and bad == 0 and near <= MAX_NEAR,
          "%s %s: %d of %d kept sets differ from the check (%d near-ties)"
          % (name, spec, bad, len(recs), near))
    return recs


def main():
    work = tempfile.mkdtemp(prefix="kvt_ea_stats_")
    rng = np.random.default_rng(11)
    s = os.path.join(work, "s.kvt")
    run("synth", "--shape", "llama3-8b", "--tokens", "300", "--layers", "2", "--q-all", "-o", s)
    nq = os.path.join(work, "nq.kvt")  # without Q_all
    run("synth", "--shape", "llama3-8b", "--tokens", "300", "--layers", "2", "-o", nq)
    vl = os.path.join(work, "vl.kvt")
    run("synth", "--shape", "tiny-vl", "--tokens", "120", "--q-all", "-o", vl)

    with kvtrace.open(s) as t:
        L, Hq, D = 2, t.header["model"]["n_q_heads"], t.header["model"]["head_dim"]
        mu, cov = random_stats(rng, L, Hq, D)
        for dtype in ("F32", "BF16"):
            f = os.path.join(work, "stats_%s.safetensors" % dtype)
            v = write_safetensors(f, [("query_mean", dtype, mu), ("query_cov", dtype, cov)],
                                  meta={"format": "pt"})
            m2, c2 = v["query_mean"], v["query_cov"]
            compare("llama3-8b", s, "expected-attention:stats=" + f, "10%,64,150", work,
                    scores(t, m2, c2))
            if dtype == "F32":
                compare("llama3-8b", s, "expected-attention:stats=%s,heads=query,cov=0" % f,
                        "10%,64", work, scores(t, m2, c2, use_cov=False, per_query=True))
                compare("llama3-8b", s, "expected-attention:stats=%s,sinks=2,future=16" % f,
                        "30%", work, scores(t, m2, c2, sinks=2, future=16))
                for mode in ("own", "kvpress"):
                    compare("llama3-8b", s, "expected-attention:stats=%s,chunk_length=100,"
                            "chunk_scores=%s" % (f, mode), "10%,30%", work,
                            scores(t, m2, c2, C=100, kvpress=mode == "kvpress"), C=100)
        # the same statistics on a trace without Q_all: the same kept sets
        f32 = os.path.join(work, "stats_F32.safetensors")
        one = replay_export(s, "expected-attention:stats=" + f32, "10%,64", work)["records"]
        two = replay_export(nq, "expected-attention:stats=" + f32, "10%,64", work)["records"]
        check([r["kept"] for r in one] == [r["kept"] for r in two],
              "stats=: the trace without Q_all keeps other sets")
        print("llama3-8b without Q_all, stats=: %d sets as with it" % len(two))
        refused(["replay", nq, "--policies", "expected-attention", "--budgets", "64", "-o",
                 os.path.join(work, "x.json"), "--force"], "needs every prompt query (Q_all)")
        # a hub checkpoint's folder
        hub = os.path.join(work, "exp_att_stats_hub")
        os.mkdir(hub)
        os.rename(os.path.join(work, "stats_BF16.safetensors"),
                  os.path.join(hub, "model.safetensors"))
        with open(os.path.join(hub, "config.json"), "w") as cf:
            json.dump({"num_layers": L, "num_heads": Hq, "head_dim": D}, cf)
        a = replay_export(s, "expected-attention:stats=" + hub, "64", work)["records"]
        check(len(a) > 0, "stats=FOLDER: no sets")
        # the trace's own statistics (float64, 1/N): the plain policy's sets
        mo, co = own_stats(t)
        own = os.path.join(work, "own.safetensors")
        write_safetensors(own, [("query_cov", "F64", co), ("query_mean", "F64", mo)])
        x = replay_export(s, "expected-attention", "10%,64,150", work)["records"]
        y = replay_export(s, "expected-attention:stats=" + own, "10%,64,150", work)["records"]
        same = sum(p["kept"] == q["kept"] for p, q in zip(x, y))
        print("llama3-8b: the trace's own statistics from a file: %d of %d sets as the plain "
              "policy's" % (same, len(x)))
        check(len(x) == len(y) and same == len(x),
              "stats= of the trace's own queries differs from the plain policy")

    with kvtrace.open(vl) as t:  # M-RoPE, f16 statistics
        m = t.header["model"]
        mu, cov = random_stats(rng, len(list(t.layers())), m["n_q_heads"], m["head_dim"])
        f = os.path.join(work, "vl.safetensors")
        v = write_safetensors(f, [("query_mean", "F16", mu), ("query_cov", "F16", cov)])
        compare("tiny-vl", vl, "expected-attention:stats=" + f, "10%,30%,24", work,
                scores(t, v["query_mean"], v["query_cov"]))

    # kvtrace.ea_stats against the check's own undo: one trace, two traces, M-RoPE, interleaved
    s2 = os.path.join(work, "s2.kvt")
    run("synth", "--shape", "llama3-8b", "--tokens", "200", "--layers", "2", "--q-all",
        "--seed", "5", "-o", s2)
    a = os.path.join(work, "a.kvt")  # llama2.c: interleaved pairs
    run("capture-llama2c", "--model", os.path.join(os.environ["KVT_SOURCE_ROOT"], "models",
                                                   "stories260K.bin"),
        "--tokens", "60", "--decode", "0", "--window", "8", "--q-all", "-o", a)
    for name, paths, sinks in (("llama3-8b", [s], 4), ("llama3-8b x2", [s, s2], 4),
                               ("tiny-vl", [vl], 4), ("llama2c", [a], 0)):
        mu, cov = kvtrace.ea_stats(paths, sinks=sinks)
        ts = [kvtrace.open(p) for p in paths]
        try:
            wm, wc = own_stats(ts[0], sinks, ddof=1, more=tuple(ts[1:]))
        finally:
            for x in ts:
                x.close()
        em, ec = close(mu, wm), close(cov, wc)
        print("kvtrace.ea_stats %s: mean within %.1e, covariance within %.1e" % (name, em, ec))
        check(mu.shape == wm.shape and cov.shape == wc.shape and em < 1e-10 and ec < 1e-10,
              "kvtrace.ea_stats %s differs from the check (%.2g, %.2g)" % (name, em, ec))
    mu, cov = kvtrace.ea_stats([s, s2])
    cal = os.path.join(work, "cal.safetensors")
    kvtrace.save_safetensors(cal, {"query_mean": mu, "query_cov": cov},
                             metadata={"producer": "kvtrace.ea_stats", "sinks": 4})
    with kvtrace.open(s) as t:
        v = {k: x.astype(np.float32).astype(np.float64) for k, x in (("m", mu), ("c", cov))}
        compare("llama3-8b", s, "expected-attention:stats=" + cal, "10%,64", work,
                scores(t, v["m"], v["c"]))
    for bad_args, want in ((([nq],), "no Q_all for layer 0"), (([s, vl],), "the first trace has"),
                           (([s],), "sinks must be an integer >= 0")):
        try:
            kvtrace.ea_stats(*bad_args, **({"sinks": -1} if "sinks" in want else {}))
            check(False, "kvtrace.ea_stats did not refuse: " + want)
        except ValueError as e:
            check(want in str(e), "kvtrace.ea_stats: %r lacks %r" % (str(e), want))

    # qfilter: q_filters from a safetensors file keeps the .npy filters' sets
    filt = rng.normal(0, 1, (2, 8, 128)).astype(np.float32)
    fn, fs = os.path.join(work, "qf.npy"), os.path.join(work, "qf.safetensors")
    np.save(fn, filt)
    write_safetensors(fs, [("q_filters", "F32", filt)])
    a = replay_export(s, "qfilter:filters=" + fn, "10%,64", work)["records"]
    b = replay_export(s, "qfilter:filters=" + fs, "10%,64", work)["records"]
    check(len(a) > 0 and [r["kept"] for r in a] == [r["kept"] for r in b],
          "qfilter: q_filters from safetensors keeps other sets than the .npy")
    print("qfilter: q_filters from safetensors: %d sets as from .npy" % len(b))

    # refusals, one line each
    R = ["replay", s, "--budgets", "64", "-o", os.path.join(work, "x.json"), "--force",
         "--policies"]
    mu, cov = random_stats(rng, 2, 32, 128)

    def bad(name, tensors, want, **kw):
        p = os.path.join(work, name)
        write_safetensors(p, tensors, **kw)
        refused(R + ["expected-attention:stats=" + p], want)
    refused(R + ["expected-attention:stats=" + os.path.join(work, "none.safetensors")],
            "is not a safetensors file, nor a folder holding model.safetensors")
    refused(R + ["expected-attention:stats=" + fn],
            "qf.npy is not a safetensors file, nor a folder holding model.safetensors")
    bad("nocov.st", [("query_mean", "F32", mu)],
        "nocov.st holds no tensor named query_cov (it holds: query_mean)")
    bad("short.st", [("query_mean", "F32", mu), ("query_cov", "F32", cov)],
        "query_cov's data_offsets do not hold its shape's F32 bytes within the file (cut "
        "short?)", cut=100)
    bad("layers.st", [("query_mean", "F32", mu[:1]), ("query_cov", "F32", cov[:1])],
        "has 1 layers and 32 query heads; this trace has 2 and 32 (statistics of another "
        "model?)")
    bad("dim.st", [("query_mean", "F32", mu[..., :64]), ("query_cov", "F32", cov[..., :64, :64])],
        "has statistics of 64 dimensions; this trace's heads have 128")
    bad("shape.st", [("query_mean", "F32", mu), ("query_cov", "F32", cov[..., :64])],
        "query_mean has shape (2, 32, 128) and query_cov (2, 32, 128, 64)")
    bad("int.st", [("query_mean", "I32", mu), ("query_cov", "F32", cov)],
        "tensor query_mean has dtype I32; expected F64, F32, F16 or BF16")
    nan = mu.copy()
    nan[1, 3, 5] = np.nan
    bad("nan.st", [("query_mean", "F32", nan), ("query_cov", "F32", cov)],
        "query_mean element %d (layer 1) is nan" % (1 * 32 * 128 + 3 * 128 + 5))
    hdr = os.path.join(work, "hdr.st")
    with open(hdr, "wb") as f:
        f.write(struct.pack("<Q", 12) + b'{"a": [1, 2]')
    refused(R + ["expected-attention:stats=" + hdr], "the safetensors header is not a JSON object")
    finish("test_ea_stats", work)


if __name__ == "__main__":
    main()
