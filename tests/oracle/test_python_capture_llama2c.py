#!/usr/bin/env python3
"""A NumPy forward of stories260K drives the Python capture binding; the trace it writes
equals the one the C engine wrote for the same tokens (traces/samples/stories260K.kvt)
within f32 tolerance. Tensors are passed as strided NumPy views ([T,H,D] memory seen as
[H,T,D]), so the binding's stride handling is exercised too. Run with /usr/bin/python3."""
import os
import sys
import tempfile

import numpy as np

ROOT = os.environ.get("KVT_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))
import kvtrace  # noqa: E402
import llama2c_oracle  # noqa: E402

TOL = 1e-4  # relative to the tensor's max |value|; engine vs oracle differ by ~1e-5


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    sample = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
    model = llama2c_oracle.load(os.path.join(ROOT, "models", "stories260K.bin"))
    ref = kvtrace.open(sample)
    h = ref.header
    T, W, G = h["n_tokens"], h["window"], h["n_decode"]
    L, Hq, Hkv, D = (h["model"][k] for k in ("n_layers", "n_q_heads", "n_kv_heads", "head_dim"))
    prompt = np.asarray(ref.tokens["token_ids"], dtype=np.int64)
    decode = np.asarray(ref.read("decode_token_ids", layer=-1), dtype=np.int64).reshape(-1)
    assert len(prompt) == T and len(decode) == G, (len(prompt), len(decode))
    ids = np.concatenate([prompt, decode])

    _, qs, ks, vs, _ = llama2c_oracle.forward(model, ids, T)  # [L, N, H, D] float64
    qs, ks, vs = (a.astype(np.float32) for a in (qs, ks, vs))

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "py.kvt")
        with kvtrace.CaptureSession(out, n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv,
                                    head_dim=D, n_tokens=T, window=W, n_decode=G,
                                    with_colsum=True, kv_dtype="f32", name="stories260K",
                                    rope_theta=10000.0, engine_name="numpy-oracle") as s:
            s.set_tokens(token_ids=prompt.astype(np.int32))
            for l in range(L):
                # [T, H, D] memory seen as [H, T, D]: strided views, no copy
                s.submit_kv(l, 0, ks[l, :T].transpose(1, 0, 2), vs[l, :T].transpose(1, 0, 2))
                s.submit_queries(l, 0, qs[l, :T].transpose(1, 0, 2))
            for l in range(L):
                s.submit_decode(l, 0, qs[l, T:].transpose(1, 0, 2),
                                ks[l, T:].transpose(1, 0, 2), vs[l, T:].transpose(1, 0, 2))
            for g in range(G):
                s.submit_decode_token(g, int(decode[g]))
        got = kvtrace.open(out)
        assert got.verify()["ok"]
        worst = 0.0
        for kind in ("K", "V", "Q_window", "Q_decode", "K_decode", "V_decode", "attn_colsum"):
            for l in range(L):
                a = got.read(kind, layer=l, dtype="float32")
                b = ref.read(kind, layer=l, dtype="float32")
                e = rel_err(a, b) if a.shape == b.shape else float("inf")
                worst = max(worst, e)
                if e > TOL:
                    failures += 1
                    print("FAILED: layer %d %s: shape %s vs %s, rel err %.3g"
                          % (l, kind, a.shape, b.shape, e))
        if not np.array_equal(got.tokens["token_ids"], ref.tokens["token_ids"]):
            failures += 1
            print("FAILED: token ids differ")
        got.close()
    ref.close()
    print("python capture vs C engine: worst relative error %.3g (tolerance %g)" % (worst, TOL))
    print("%d passed, %d failed" % (1 if failures == 0 else 0, 1 if failures else 0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
