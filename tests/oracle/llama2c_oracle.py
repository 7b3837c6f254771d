#!/usr/bin/python3
"""llama2c_oracle.py - an independent NumPy (float64) implementation of the llama2.c forward
pass, used to check the C engine (capture/llama2c.c) and what it captures.

It reads the checkpoint itself (models/README.md), runs the whole token sequence at once with
a causal mask (the C engine runs token by token with a KV cache), and writes little-endian
float64 arrays:
  logits.f64  [N, vocab]            logits at every position
  q.f64       [L, N, Hq, D]         post-RoPE queries
  k.f64       [L, N, Hkv, D]        post-RoPE keys
  v.f64       [L, N, Hkv, D]        values
  colsum.f64  [L, Hq, T]            sum over prompt queries i < T of softmax p(i, j), j < T
  shape.txt   "L Hq Hkv D vocab N T"

usage: llama2c_oracle.py --model FILE --ids FILE --prompt T --out DIR
Exit 77 (test "not run") when NumPy is missing.
"""
import argparse
import os
import sys

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)

THETA = 10000.0
EPS = 1e-5


def load(path):
    raw = open(path, "rb").read()
    if len(raw) < 28:
        raise ValueError("file shorter than the header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (
        int(x) for x in np.frombuffer(raw[:28], "<i4"))
    shared = vocab > 0
    vocab = abs(vocab)
    hs = dim // n_heads
    kv_dim = n_kv * hs
    w = np.frombuffer(raw[28:], "<f4").astype(np.float64)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = w[off:off + n].reshape(shape)
        off += n
        return a

    m = dict(dim=dim, hidden=hidden, L=n_layers, Hq=n_heads, Hkv=n_kv, vocab=vocab,
             seq_len=seq_len, D=hs)
    m["emb"] = take(vocab, dim)
    m["rms_att"] = take(n_layers, dim)
    m["wq"] = take(n_layers, dim, dim)
    m["wk"] = take(n_layers, kv_dim, dim)
    m["wv"] = take(n_layers, kv_dim, dim)
    m["wo"] = take(n_layers, dim, dim)
    m["rms_ffn"] = take(n_layers, dim)
    m["w1"] = take(n_layers, hidden, dim)
    m["w2"] = take(n_layers, dim, hidden)
    m["w3"] = take(n_layers, hidden, dim)
    m["rms_out"] = take(dim)
    take(seq_len * hs // 2)  # legacy freq_cis_real
    take(seq_len * hs // 2)  # legacy freq_cis_imag
    m["wcls"] = m["emb"] if shared else take(vocab, dim)
    if off != w.size:
        raise ValueError("checkpoint size does not match its header")
    return m


def rmsnorm(x, w):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS))


def rope(t, pos, hs):
    """t: [N, H, D]; rotate pairs (2i, 2i+1) by pos * THETA^(-2i/D)."""
    i = np.arange(hs // 2, dtype=np.float64)
    ang = pos[:, None] * THETA ** (-2.0 * i / hs)  # [N, D/2]
    c = np.cos(ang)[:, None, :]
    s = np.sin(ang)[:, None, :]
    a, b = t[..., 0::2], t[..., 1::2]
    out = np.empty_like(t)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def forward(m, ids, n_prompt, keep=None, merged=None):
    """keep: a compressed cache (kvtrace e2e-llama2c): bool [S, L, Hq, n_prompt]; query row
    i >= n_prompt attends, among the prompt's keys, only to those keep[min(i - n_prompt, S - 1)]
    marks (S = 1: one set for every row; S = the decode steps: a set per step).
    merged: (flag bool [L, Hq, n_prompt], mk, mv [L, Hq, n_prompt, D]) a merged cache: the rows
    i >= n_prompt see, through query head h, those keys and values at its flagged entries."""
    N = len(ids)
    L, Hq, Hkv, D = m["L"], m["Hq"], m["Hkv"], m["D"]
    pos = np.arange(N, dtype=np.float64)
    x = m["emb"][ids].copy()  # [N, dim]
    qs = np.zeros((L, N, Hq, D))
    ks = np.zeros((L, N, Hkv, D))
    vs = np.zeros((L, N, Hkv, D))
    colsum = np.zeros((L, Hq, n_prompt))
    future = np.triu(np.ones((N, N), dtype=bool), 1)
    for l in range(L):
        xb = rmsnorm(x, m["rms_att"][l])
        q = rope((xb @ m["wq"][l].T).reshape(N, Hq, D), pos, D)
        k = rope((xb @ m["wk"][l].T).reshape(N, Hkv, D), pos, D)
        v = (xb @ m["wv"][l].T).reshape(N, Hkv, D)
        qs[l], ks[l], vs[l] = q, k, v
        kr = np.repeat(k, Hq // Hkv, axis=1)  # query head h uses KV head h // (Hq/Hkv)
        vr = np.repeat(v, Hq // Hkv, axis=1)
        sc = np.einsum("ihd,jhd->hij", q, kr) / np.sqrt(D)  # [Hq, N, N]
        vr2 = vr
        if merged is not None:  # the later rows' view of the prompt's entries, per query head
            kr2, vr2 = kr.copy(), vr.copy()
            fl = merged[0][l].T  # [n_prompt, Hq]
            kr2[:n_prompt][fl] = merged[1][l].transpose(1, 0, 2)[fl]
            vr2[:n_prompt][fl] = merged[2][l].transpose(1, 0, 2)[fl]
            sc[:, n_prompt:, :] = np.einsum("ihd,jhd->hij", q[n_prompt:], kr2) / np.sqrt(D)
        sc[:, future] = -np.inf
        if keep is not None:
            for i in range(n_prompt, N):
                drop = ~keep[min(i - n_prompt, keep.shape[0] - 1), l]  # [Hq, n_prompt]
                sc[:, i, :n_prompt][drop] = -np.inf
        sc -= sc.max(axis=-1, keepdims=True)
        p = np.exp(sc)
        p /= p.sum(axis=-1, keepdims=True)
        colsum[l] = p[:, :n_prompt, :n_prompt].sum(axis=1)
        att = np.einsum("hij,jhd->ihd", p, vr)
        if merged is not None:
            att[n_prompt:] = np.einsum("hij,jhd->ihd", p[:, n_prompt:], vr2)
        att = att.reshape(N, Hq * D)
        x = x + att @ m["wo"][l].T
        xb = rmsnorm(x, m["rms_ffn"][l])
        h1 = xb @ m["w1"][l].T
        h3 = xb @ m["w3"][l].T
        x = x + ((h1 / (1.0 + np.exp(-h1))) * h3) @ m["w2"][l].T
    x = rmsnorm(x, m["rms_out"])
    return x @ m["wcls"].T, qs, ks, vs, colsum


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="whitespace-separated token ids")
    ap.add_argument("--prompt", type=int, required=True, help="T: prompt length (colsum)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m = load(a.model)
    ids = np.array([int(t) for t in open(a.ids).read().split()], dtype=np.int64)
    if len(ids) == 0 or ids.min() < 0 or ids.max() >= m["vocab"] or len(ids) > m["seq_len"]:
        sys.exit("bad token ids")
    if not 1 <= a.prompt <= len(ids):
        sys.exit("bad --prompt")
    logits, q, k, v, colsum = forward(m, ids, a.prompt)
    os.makedirs(a.out, exist_ok=True)
    for name, arr in (("logits", logits), ("q", q), ("k", k), ("v", v), ("colsum", colsum)):
        np.ascontiguousarray(arr, dtype="<f8").tofile(os.path.join(a.out, name + ".f64"))
    with open(os.path.join(a.out, "shape.txt"), "w") as f:
        f.write("%d %d %d %d %d %d %d\n" % (m["L"], m["Hq"], m["Hkv"], m["D"], m["vocab"],
                                             len(ids), a.prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
