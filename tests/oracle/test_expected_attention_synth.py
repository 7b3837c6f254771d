#!/usr/bin/python3
"""test_expected_attention_synth.py - expected-attention on synthetic traces against a NumPy
check written from analysis/RESULTS.md's definition, for what test_expected_attention.py (a
real model, 1-D RoPE) does not reach: M-RoPE (tiny-vl, qwen2-vl-7b-shaped: sections, three
position rows, the future positions from the largest prompt position + 1) and synth's
rotate_half pairing, with GQA groups of 2 and 7.

The check does not share the policy's arithmetic: each token's RoPE is a full D x D matrix
(attention_scaling times cos I + sin P per pair, in the header's pairing, each pair at the
position row of its M-RoPE section), undone with np.linalg.solve; the mean rotation is the
mean of those matrices over the future positions; then mu' = R mu, S' = R S R^T (1/N),
z = s mu'.k + s^2/2 k^T S' k over the keys past the sinks, softmax, GQA mean or per query
head, (p + epsilon) |v|, sinks first, ties to the earlier token. Every kept set of
`kvtrace replay --export-selection` must equal the check's top-B, except where the check's
scores at the cut are within 1e-6 (relative): counted, at most 2 per run.

A mutation of the pairing, the section-to-row map or the first future position fails it
(the reviewer's sensitivity run, 2026-12-03). Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT;
exit 77 without NumPy, the CLI or the library.
"""
import json
import os
import sys
import tempfile

# many small batched solves: OpenBLAS's threads only contend (3 s on one, minutes on two
# busy cores)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (check, copy_trace, finish, need_library,  # noqa: E402
                      replay_export, run)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()

NEAR = 1e-6
MAX_NEAR = 2


def rope_matrices(rows, D, freq, pairs, a, row_of):
    """[n, D, D]: a * (cos I + sin P) per token, rows [n, 3] its position rows."""
    half = D // 2
    i = np.arange(half)
    lo, hi = (2 * i, 2 * i + 1) if pairs == "interleaved" else (i, i + half)
    ang = rows[:, np.asarray(row_of)] * freq[None, :]  # [n, half]
    c, s = a * np.cos(ang), a * np.sin(ang)
    R = np.zeros((rows.shape[0], D, D))
    R[:, lo, lo], R[:, lo, hi], R[:, hi, lo], R[:, hi, hi] = c, -s, s, c
    return R


def trace_rope(t):
    """The header's RoPE of an open trace: (freq [D/2], pairs, attention_scaling, the position
    row of each pair, each token's position rows [T, 3], the largest position)."""
    m, T = t.header["model"], t.header["n_tokens"]
    ro, D = m["rope"], m["head_dim"]
    half = D // 2
    a = ro.get("attention_scaling", 1.0)
    freq = (np.array(ro["inv_freq"]) if "inv_freq" in ro
            else ro["theta"] ** (-2.0 * np.arange(half) / D))
    pos = np.asarray(t.tokens["positions"], dtype=np.float64).reshape(-1, T)
    if ro["type"] == "mrope":
        sec = ro["mrope_section"]
        row_of = [0] * sec[0] + [1] * sec[1] + [2] * sec[2]
    else:
        row_of = [0] * half
    rows = pos.T if pos.shape[0] == 3 else np.repeat(pos.T, 3, axis=1)  # [T, 3]
    return freq, ro["pairs"], a, row_of, rows, pos.max()


def scores(path, sinks=4, future=512, cov=True, vnorm=True, epsilon=0.0, per_query=False):
    """{layer: [H, T]} the check's scores (inf for the sinks)."""
    with kvtrace.open(path) as t:
        h = t.header
        m, T = h["model"], h["n_tokens"]
        Hq, Hkv, D = m["n_q_heads"], m["n_kv_heads"], m["head_dim"]
        Gs = Hq // Hkv
        s = m.get("attn_scale", 1 / np.sqrt(D))
        freq, pairs, a, row_of, rows, pmax = trace_rope(t)
        p0 = pmax + 1 if m["rope"]["type"] == "mrope" else T
        fut = np.repeat((p0 + np.arange(future, dtype=np.float64))[:, None], 3, axis=1)
        Rbar = rope_matrices(fut, D, freq, pairs, a, row_of).mean(axis=0)
        Rt = rope_matrices(rows, D, freq, pairs, a, row_of)
        S = min(sinks, T)
        out = {}
        for layer in t.layers():
            Q = t.read("Q_all", layer, dtype="float32").astype(np.float64)
            K = t.read("K", layer, dtype="float32").astype(np.float64)
            V = t.read("V", layer, dtype="float32").astype(np.float64)
            H = Hq if per_query else Hkv
            acc = np.zeros((H, T))
            for hq in range(Hq):
                g = hq // Gs
                pre = np.linalg.solve(Rt[S:], Q[hq, S:][:, :, None])[:, :, 0]
                mu = pre.mean(0)
                Sig = (pre - mu).T @ (pre - mu) / pre.shape[0]
                mu2, Sig2 = Rbar @ mu, Rbar @ Sig @ Rbar.T
                k = K[g, S:]
                z = s * k @ mu2
                if cov:
                    z = z + 0.5 * s * s * np.einsum("ni,ij,nj->n", k, Sig2, k)
                p = np.exp(z - z.max())
                p /= p.sum()
                if per_query:
                    acc[hq, S:] = p
                else:
                    acc[g, S:] += p / Gs
            sc = np.zeros((H, T))
            for hh in range(H):
                g = hh // Gs if per_query else hh
                vn = np.linalg.norm(V[g], axis=-1)
                sc[hh] = (acc[hh] + epsilon) * vn if vnorm else acc[hh]
                sc[hh, :S] = np.inf
            out[layer] = sc
        return out, T


def compare(name, path, spec, opts, budgets, work):
    recs = replay_export(path, spec, budgets, work)["records"]
    sc, T = scores(path, **opts)
    bad = near = 0
    for r in recs:
        s = sc[r["layer"]][r["head"]]
        order = sorted(range(T), key=lambda j: (-s[j], j))
        B = min(r["budget_tokens"], T)
        want, got = set(order[:B]), set(r["kept"])
        if want == got:
            continue
        cut = s[order[B - 1]]
        gap = max(abs(s[j] - cut) for j in want ^ got) / abs(cut)
        if gap < NEAR:
            near += 1
        else:
            bad += 1
            if bad <= 3:
                print("  %s layer %d head %d B %d: check keeps %s, replay %s (gap %.2g)"
                      % (spec, r["layer"], r["head"], B, sorted(want - got), sorted(got - want),
                         gap))
    print("%s %s: %d sets, %d differ, %d near-ties" % (name, spec, len(recs), bad, near))
    check(len(recs) > 0 and bad == 0 and near <= MAX_NEAR,
          "%s %s: %d of %d kept sets differ from the check (%d near-ties)"
          % (name, spec, bad, len(recs), near))


def with_rope(src, dst, rope):
    """A copy of the trace at src whose header's model.rope is `rope` (the tensors as they are,
    in f32): the check and the replay read the queries through the same header, so a header
    unlike the one the tensors were rotated with still tests that both use every field."""
    with kvtrace.open(src) as t:
        h = json.loads(json.dumps(t.header))
    h["model"]["rope"] = rope
    return copy_trace(src, dst, header=h)


def main():
    with tempfile.TemporaryDirectory() as work:
        vl = os.path.join(work, "vl.kvt")
        run("synth", "--shape", "tiny-vl", "--tokens", "120", "--q-all", "-o", vl)
        q7 = os.path.join(work, "q7.kvt")
        run("synth", "--shape", "qwen2-vl-7b", "--tokens", "96", "--layers", "1", "--q-all",
            "-o", q7)
        l3 = os.path.join(work, "l3.kvt")
        run("synth", "--shape", "llama3-8b", "--tokens", "80", "--layers", "1", "--q-all",
            "-o", l3)
        with kvtrace.open(vl) as t:  # the M-RoPE trace really has images off the diagonal
            pos = np.asarray(t.tokens["positions"]).reshape(3, -1)
            check(t.header["model"]["rope"]["type"] == "mrope" and pos.max() + 1 < pos.shape[1]
                  and (pos[1] != pos[2]).any(), "tiny-vl: M-RoPE positions with an image")
        cases = [
            ("expected-attention", {}),
            ("expected-attention:sinks=7,future=3", {"sinks": 7, "future": 3}),
            ("expected-attention:cov=0,epsilon=0.01", {"cov": False, "epsilon": 0.01}),
            ("expected-attention:vnorm=0,sinks=0", {"vnorm": False, "sinks": 0}),
            ("expected-attention:heads=query", {"per_query": True}),
        ]
        # the header's own frequencies (a scaled RoPE), attention_scaling and llama2.c's pairs
        with kvtrace.open(l3) as t:
            ro = dict(t.header["model"]["rope"])
            D = t.header["model"]["head_dim"]
        ro.update(pairs="interleaved", attention_scaling=1.25,
                  inv_freq=[0.25 * ro["theta"] ** (-2.0 * i / D) for i in range(D // 2)])
        l3x = with_rope(l3, os.path.join(work, "l3x.kvt"), ro)
        with kvtrace.open(vl) as t:
            ro = dict(t.header["model"]["rope"])
            D = t.header["model"]["head_dim"]
        ro.update(attention_scaling=0.8,
                  inv_freq=[3.0 * ro["theta"] ** (-2.0 * i / D) for i in range(D // 2)])
        vlx = with_rope(vl, os.path.join(work, "vlx.kvt"), ro)
        for name, path in (("tiny-vl", vl), ("qwen2-vl-7b", q7), ("llama3-8b", l3),
                           ("llama3-8b inv_freq/interleaved", l3x),
                           ("tiny-vl inv_freq", vlx)):
            for spec, opts in cases[: 5 if name == "tiny-vl" else 2]:
                compare(name, path, spec, opts, "1,5,17,30%,60%", work)
    finish("test_expected_attention_synth")


if __name__ == "__main__":
    main()
