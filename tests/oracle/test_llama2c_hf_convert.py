#!/usr/bin/python3
"""test_llama2c_hf_convert.py - python/kvtrace/llama2c_hf.py: stories260K converted to the
HF LlamaForCausalLM layout computes the same model, and its post-RoPE K/Q are the llama2.c
ones with channels reordered by hf_channel_order.

  * load_llama2c reads exactly what tests/oracle/llama2c_oracle.py (an independent parser)
    reads, and rejects damaged files with a message naming the failed check;
  * hf_channel_order equals HF's own Meta-checkpoint permutation (view(H, D/2, 2, in)
    .transpose), written here independently;
  * an independent NumPy float64 forward in the HF convention (rotate_half RoPE with
    inv_freq = theta^(-2i/D), cos/sin duplicated across the halves, GQA by repeat, RMSNorm,
    SwiGLU) over the converted state dict, on the token ids of
    traces/samples/stories260K.kvt (prompt + decode), gives:
      - the logits of llama2c_oracle.forward (relative 1e-9),
      - post-RoPE K and Q equal to the oracle's after reordering (relative 1e-9), V as is;
  * the sample trace's K, V, Q_window, Q_decode, K_decode, V_decode (C engine, f32) equal the
    HF-convention tensors reordered back, within 1e-4 of max|x| (as
    test_python_capture_llama2c.py);
  * sensitivity: without the wq/wk permutation the logits are far off;
  * to_torch_model (CPU, f32) gives the NumPy forward's logits within f32 tolerance, and
    make_llama_config carries a non-default theta (500000) into the model's RoPE buffers: with
    the real transformers where it imports (the GPU machine), else (with torch) with the test
    stand-in tests/oracle/hf_standin in both its styles, transformers 4.x's config convention
    (rope_theta attribute; a rope_parameters keyword ignored) and 5.x's (rope_parameters);
  * KVzip's scores of the sample's prompt from kvtrace.hf.kvzip_scores on the converted model
    equal capture-llama2c --kvzip's (the C engine) within 1e-4 (chunks of 56).

Environment: KVT_SOURCE_ROOT, KVT_LIB, KVT_BIN. Exit 77 ("SKIP: ...") without NumPy or the library.
"""
import os
import sys
import tempfile

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))
import llama2c_oracle  # noqa: E402
from kvtrace import llama2c_hf  # noqa: E402  (NumPy only)

MODEL = os.path.join(ROOT, "models", "stories260K.bin")
SAMPLE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
TOL_EXACT = 1e-9   # float64 vs float64, different operation order
TOL_TRACE = 1e-4   # C engine f32 vs float64, relative to max |x|

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(bool(ok))
    print("%s: %s%s" % ("ok" if ok else "FAILED", name, (" (" + detail + ")") if detail else ""))


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


# ---- an independent NumPy forward in the HF (rotate_half) convention ----
def hf_forward(cfg, sd, ids):
    """float64 forward of a LlamaForCausalLM state dict. Returns logits [N, V] and the
    post-RoPE q [L, N, Hq, D], k, v [L, N, Hkv, D]."""
    f = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    L, Hq, Hkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, eps, theta = cfg["head_dim"], cfg["rms_norm_eps"], cfg["rope_theta"]
    N = len(ids)
    pos = np.arange(N, dtype=np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)   # [D/2]
    freqs = pos[:, None] * inv_freq[None, :]                                # [N, D/2]
    emb = np.concatenate([freqs, freqs], axis=-1)                           # [N, D]
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

    def rotate_half(x):
        return np.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)

    def rope(x):
        return x * cos + rotate_half(x) * sin

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    x = f["model.embed_tokens.weight"][ids]
    qs = np.zeros((L, N, Hq, D))
    ks = np.zeros((L, N, Hkv, D))
    vs = np.zeros((L, N, Hkv, D))
    causal = np.tril(np.ones((N, N), dtype=bool))
    for l in range(L):
        p = "model.layers.%d." % l
        h = rms(x, f[p + "input_layernorm.weight"])
        q = rope((h @ f[p + "self_attn.q_proj.weight"].T).reshape(N, Hq, D))
        k = rope((h @ f[p + "self_attn.k_proj.weight"].T).reshape(N, Hkv, D))
        v = (h @ f[p + "self_attn.v_proj.weight"].T).reshape(N, Hkv, D)
        qs[l], ks[l], vs[l] = q, k, v
        o = np.empty((N, Hq, D))
        for hq in range(Hq):
            kv = hq // (Hq // Hkv)  # HF repeat_kv: query head hq reads KV head hq // groups
            s = (q[:, hq, :] @ k[:, kv, :].T) / np.sqrt(D)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            o[:, hq, :] = s @ v[:, kv, :]
        x = x + o.reshape(N, Hq * D) @ f[p + "self_attn.o_proj.weight"].T
        h = rms(x, f[p + "post_attention_layernorm.weight"])
        g = h @ f[p + "mlp.gate_proj.weight"].T
        u = h @ f[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ f[p + "mlp.down_proj.weight"].T
    x = rms(x, f["model.norm.weight"])
    return x @ f["lm_head.weight"].T, qs, ks, vs


def meta_permutation_rows(n_heads, D):
    """HF convert_llama_weights_to_hf's permute, as a row index: a [n_heads * D, in]
    weight viewed as [n_heads, D/2, 2, in], axes 1 and 2 swapped, flattened back."""
    idx = np.arange(n_heads * D).reshape(n_heads, D // 2, 2).transpose(0, 2, 1)
    return idx.reshape(-1)


def test_loader(ck):
    m = llama2c_oracle.load(MODEL)
    pairs = (("token_embedding", "emb"), ("rms_att", "rms_att"), ("wq", "wq"), ("wk", "wk"),
             ("wv", "wv"), ("wo", "wo"), ("rms_ffn", "rms_ffn"), ("w1", "w1"), ("w2", "w2"),
             ("w3", "w3"), ("rms_final", "rms_out"), ("wcls", "wcls"))
    same = all(np.array_equal(getattr(ck, a).astype(np.float64), m[b]) for a, b in pairs)
    check("load_llama2c reads what llama2c_oracle.load reads", same)
    check("config", (ck.dim, ck.hidden_dim, ck.n_layers, ck.n_heads, ck.n_kv_heads,
                     ck.head_dim, ck.vocab_size, ck.seq_len, ck.shared_classifier)
          == (64, 172, 5, 8, 4, 8, 512, 512, True), repr(ck))

    raw = open(MODEL, "rb").read()
    cases = {
        "short": (raw[:20], "shorter than"),
        "truncated": (raw[:-4], "needs"),
        "odd head dim": (np.array([64, 172, 5, 64, 4, 512, 512], "<i4").tobytes() + raw[28:],
                         "odd"),
        "n_heads not a multiple of n_kv_heads":
            (np.array([64, 172, 5, 8, 3, 512, 512], "<i4").tobytes() + raw[28:], "multiple"),
        "negative dim": (np.array([-64, 172, 5, 8, 4, 512, 512], "<i4").tobytes() + raw[28:],
                         "positive"),
        "wrong classifier sign":
            (np.array([64, 172, 5, 8, 4, -512, 512], "<i4").tobytes() + raw[28:], "shared"),
    }
    nan = bytearray(raw)
    nan[28 + 4 * 100:28 + 4 * 101] = np.array([np.nan], "<f4").tobytes()
    cases["NaN weight"] = (bytes(nan), "non-finite")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, want) in cases.items():
            p = os.path.join(tmp, "bad.bin")
            with open(p, "wb") as fh:
                fh.write(data)
            try:
                llama2c_hf.load_llama2c(p)
                check("rejects %s" % name, False, "no error")
            except llama2c_hf.CheckpointError as e:
                check("rejects %s" % name, want in str(e), str(e)[:160])


def test_order():
    ok = True
    for D in (2, 4, 8, 64, 128):
        order = llama2c_hf.hf_channel_order(D)
        for H in (1, 3):
            rows = (np.arange(H)[:, None] * D + order[None, :]).reshape(-1)
            ok &= np.array_equal(rows, meta_permutation_rows(H, D))
        x = np.random.default_rng(D).standard_normal((3, D))
        ok &= np.array_equal(llama2c_hf.hf_to_llama2c_channels(
            llama2c_hf.llama2c_to_hf_channels(x)), x)
    check("hf_channel_order equals HF's Meta-checkpoint permutation", ok,
          "order(8) = %s" % llama2c_hf.hf_channel_order(8).tolist())


def check_torch_model(torch, transformers, ck, cfg, ids, logits_h):
    """to_torch_model against the NumPy forward, and make_llama_config's theta, under the
    transformers (or stand-in style) imported."""
    tag = "transformers %s%s" % (transformers.__version__,
                                 " (test stand-in)" if getattr(transformers, "STANDIN", False)
                                 else "")
    model = llama2c_hf.to_torch_model(ck, "float32", "cpu")
    with torch.no_grad():
        out = model(torch.as_tensor(ids[None, :]), use_cache=False)
    e = rel_err(out.logits[0].double().numpy(), logits_h)
    check("%s: LlamaForCausalLM (CPU f32) logits == NumPy HF forward" % tag, e <= 1e-4,
          "rel %.3g" % e)
    # a theta that is not the default must reach the RoPE buffers (4.x would keep a
    # rope_parameters keyword as an unused attribute; 5.x converts a rope_theta keyword)
    c = llama2c_hf.make_llama_config(dict(cfg, rope_theta=500000.0))
    m = transformers.LlamaForCausalLM(c)
    try:
        n = llama2c_hf.check_rope_buffers(m, 500000.0, cfg["head_dim"])
        ok, detail = n > 0, "%d inv_freq buffer(s)" % n
    except RuntimeError as ex:
        ok, detail = False, str(ex)[:200]
    check("%s: make_llama_config(rope_theta=500000) reaches the RoPE buffers (config "
          "attn %s)" % (tag, getattr(c, "_attn_implementation", None)), ok, detail)


def check_kvzip(ck, prompt, T):
    """KVzip's scores two ways: capture-llama2c --kvzip (the C engine, llama.c's channel order)
    and kvtrace.hf.kvzip_scores on the converted model (HF's order, the attention registry),
    over the sample's prompt in chunks of 56 with the previous chunk's last 8 tokens and no
    instruction: the same within f32 rounding (attention is invariant to the channel order)."""
    import subprocess
    import torch
    from kvtrace import hf
    import kvtrace
    bin_ = os.environ.get("KVT_BIN")
    if not bin_:
        print("note: KVT_BIN not set: KVzip's scores not compared across engines")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tr = os.path.join(tmp, "kz.kvt")
        ids_path = os.path.join(tmp, "ids.txt")
        with open(ids_path, "w") as f:
            f.write(" ".join(str(int(t)) for t in prompt))
        subprocess.run([bin_, "capture-llama2c", "--model", MODEL, "--prompt-ids", ids_path,
                        "--decode", "0", "--window", "8", "--kvzip", "--kvzip-chunk", "56",
                        "-o", tr], check=True, capture_output=True)
        with kvtrace.open(tr) as t:
            c = np.stack([t.read("kvzip_score", l)[:, :, 0] for l in range(ck.n_layers)])
    model = llama2c_hf.to_torch_model(ck, "float32", "cpu")
    s = hf.kvzip_scores(model, torch.as_tensor(prompt[None, :]), chunk=56)
    e = float(np.abs(s - c).max())
    check("KVzip scores: kvtrace.hf.kvzip_scores on the converted model == capture-llama2c "
          "--kvzip (%d scores, T = %d, 8 chunks)" % (c.size, T), s.shape == c.shape and e <= 1e-4,
          "largest difference %.3g" % e)


def main():
    lib = os.environ.get("KVT_LIB")
    if not lib or not os.path.exists(lib):  # library not built / not named: not run
        print("SKIP: KVT_LIB does not name libkvtrace.so")
        return 77
    import kvtrace  # any other failure to load it or to open the sample is a failure
    ref = kvtrace.open(SAMPLE)

    ck = llama2c_hf.load_llama2c(MODEL)
    test_loader(ck)
    test_order()

    cfg, sd = llama2c_hf.to_hf(ck)
    want_keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(ck.n_layers):
        for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                  "post_attention_layernorm"):
            want_keys.add("model.layers.%d.%s.weight" % (i, s))
    check("state dict names", set(sd) == want_keys, str(sorted(set(sd) ^ want_keys)))
    check("config", cfg["tie_word_embeddings"] and cfg["head_dim"] == 8
          and cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
          and cfg["num_key_value_heads"] == 4 and cfg["hidden_act"] == "silu", str(cfg))

    h = ref.header
    T, W, G = h["n_tokens"], h["window"], h["n_decode"]
    L, D = h["model"]["n_layers"], h["model"]["head_dim"]
    prompt = np.asarray(ref.tokens["token_ids"], dtype=np.int64)
    decode = (np.asarray(ref.tokens["decode_token_ids"], dtype=np.int64)
              if G else np.zeros(0, np.int64))
    ids = np.concatenate([prompt, decode])
    print("sample trace: T=%d W=%d G=%d, %d tokens" % (T, W, G, len(ids)))

    logits_o, q_o, k_o, v_o, _ = llama2c_oracle.forward(llama2c_oracle.load(MODEL), ids, T)
    logits_h, q_h, k_h, v_h = hf_forward(cfg, sd, ids)
    order = llama2c_hf.hf_channel_order(D)

    e = rel_err(logits_h, logits_o)
    check("HF-convention logits == llama2.c logits", e <= TOL_EXACT, "rel %.3g" % e)
    e = max(rel_err(k_h, k_o[..., order]), rel_err(q_h, q_o[..., order]))
    check("HF K/Q == llama2.c K/Q reordered by hf_channel_order", e <= TOL_EXACT, "rel %.3g" % e)
    e = max(rel_err(llama2c_hf.hf_to_llama2c_channels(k_h), k_o),
            rel_err(llama2c_hf.hf_to_llama2c_channels(q_h), q_o))
    check("hf_to_llama2c_channels(HF K/Q) == llama2.c K/Q", e <= TOL_EXACT, "rel %.3g" % e)
    e = rel_err(v_h, v_o)
    check("V is not permuted", e <= TOL_EXACT, "rel %.3g" % e)
    greedy = np.argmax(logits_h[T - 1:T - 1 + G], axis=-1)
    check("greedy decode of the HF forward reproduces the trace's decode ids",
          np.array_equal(greedy, decode), "%d steps" % G)

    # the trace written by the C engine, against the HF-convention tensors
    def hTd(a, lo, hi):  # [N, H, D] rows lo..hi -> [H, n, D]
        return a[lo:hi].transpose(1, 0, 2)

    worst = 0.0
    bad = []
    for l in range(L):
        kinds = {"K": (k_h[l], 0, T, True), "V": (v_h[l], 0, T, False),
                 "Q_window": (q_h[l], T - W, T, True)}
        if G:
            kinds.update({"Q_decode": (q_h[l], T, T + G, True),
                          "K_decode": (k_h[l], T, T + G, True),
                          "V_decode": (v_h[l], T, T + G, False)})
        for kind, (a, lo, hi, permuted) in kinds.items():
            tr = ref.read(kind, layer=l, dtype="float32")
            if permuted:
                tr = tr[..., order]  # C engine (llama2.c order) -> HF order
            e = rel_err(hTd(a, lo, hi), tr)
            worst = max(worst, e)
            if e > TOL_TRACE:
                bad.append("layer %d %s %.3g" % (l, kind, e))
    check("C-engine trace K/V/Q == HF-convention tensors reordered", not bad,
          "worst rel %.3g, tolerance %g%s" % (worst, TOL_TRACE,
                                              "; " + ", ".join(bad[:5]) if bad else ""))
    ref.close()

    # sensitivity: the same conversion without the permutation is a different model
    sd_np = dict(sd)
    for i in range(ck.n_layers):
        p = "model.layers.%d.self_attn." % i
        sd_np[p + "q_proj.weight"] = ck.wq[i]
        sd_np[p + "k_proj.weight"] = ck.wk[i]
    logits_np, _, _, _ = hf_forward(cfg, sd_np, ids[:64])
    e = rel_err(logits_np, logits_o[:64])
    check("without the permutation the logits differ (the check can fail)", e > 1e-2,
          "rel %.3g" % e)

    # the real thing where transformers is installed (the GPU machine), else the stand-in
    try:
        import torch
    except Exception as ex:
        torch = None
        print("note: torch not importable (%s): to_torch_model not checked here"
              % type(ex).__name__)
    if torch is not None:
        try:
            import transformers
            styles = [None]
        except ImportError:
            sys.path.insert(0, os.path.join(ROOT, "tests", "oracle", "hf_standin"))
            import transformers
            styles = [5, 4]
        for style in styles:
            if style is not None:
                transformers.set_standin_style(style)
            check_torch_model(torch, transformers, ck, cfg, ids, logits_h)
        check_kvzip(ck, prompt, T)

    n_fail = RESULTS.count(False)
    print("%d passed, %d failed" % (RESULTS.count(True), n_fail))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
