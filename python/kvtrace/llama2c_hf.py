"""llama2c_hf.py - a llama2.c checkpoint (models/stories260K.bin) as a HuggingFace
LlamaForCausalLM, so that the HF capture path can be checked against the built-in C engine
(capture/llama2c.c) on the same weights.

    from kvtrace import llama2c_hf
    ckpt = llama2c_hf.load_llama2c("models/stories260K.bin")   # NumPy only
    cfg, sd = llama2c_hf.to_hf(ckpt)                            # LlamaConfig kwargs, HF names
    model = llama2c_hf.to_torch_model(ckpt, "float32", "cuda")  # needs torch + transformers
    order = llama2c_hf.hf_channel_order(ckpt.head_dim)          # HF channel c = llama2.c order[c]

Importing this module needs NumPy only; torch and transformers are imported inside
to_torch_model.

RoPE pair ordering (why wq and wk are permuted)
-----------------------------------------------
llama2.c rotates *interleaved* pairs of each head: channels (2i, 2i+1), i < D/2, by the
angle p * theta^(-2i/D):
    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos
HF Llama rotates *halves* (rotate_half): channel c < D/2 is paired with c + D/2 and both use
inv_freq[c] = theta^(-2c/D) (cos/sin are duplicated across the two halves):
    out[c]       = x[c] cos - x[c + D/2] sin
    out[c + D/2] = x[c + D/2] cos + x[c] sin
The two agree if HF channel c holds llama2.c channel 2c and HF channel c + D/2 holds llama2.c
channel 2c + 1, i.e. HF channel c holds llama2.c channel
    order[c] = 2c              for c <  D/2
    order[c] = 2(c - D/2) + 1  for c >= D/2
(hf_channel_order). Permuting the output rows of wq and wk inside every head by `order`
makes the HF pre-RoPE q/k the llama2.c ones with their channels permuted; the pair
(order[c], order[c + D/2]) = (2c, 2c + 1) then gets exactly the llama2.c rotation, so the
post-RoPE HF q/k are the llama2.c post-RoPE q/k permuted the same way:
    k_hf[..., c] = k_llama2c[..., order[c]]        (likewise q)
A dot product q.k is invariant under one permutation applied to both, so the attention
scores, and everything after them, are unchanged. V and wo are not touched. This is the
same permutation as the view(H, D/2, 2, dim).transpose(1, 2) of HF's own Meta-checkpoint
converter, derived here from the two rotation formulas; tests/oracle/
test_llama2c_hf_convert.py checks it numerically (logits and K/Q of an independent NumPy
HF-convention forward against tests/oracle/llama2c_oracle.py and the bundled C-engine trace).
"""
import os

import numpy as np

from .hf import _rope_params

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                 "seq_len")
HEADER_BYTES = 4 * len(HEADER_FIELDS)
ROPE_THETA = 10000.0  # llama2.c's RoPE base (capture/llama2c.c KVT_LLAMA2C_ROPE_THETA)
RMS_EPS = 1e-5        # llama2.c's RMSNorm epsilon


class CheckpointError(ValueError):
    """A llama2.c checkpoint that cannot be read; the message says which check failed."""


class Llama2cCheckpoint:
    """A llama2.c checkpoint in memory (float32 NumPy arrays, output dimension first).

    Config: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, head_dim,
    kv_dim, shared_classifier, path. Weights: token_embedding [vocab, dim],
    rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim],
    wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden],
    w3 [L, hidden, dim], rms_final [dim], wcls [vocab, dim] (the embedding itself when shared).
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __repr__(self):
        return ("<Llama2cCheckpoint %s dim=%d hidden=%d L=%d Hq=%d Hkv=%d D=%d vocab=%d "
                "seq_len=%d%s>" % (os.path.basename(str(self.path)), self.dim, self.hidden_dim,
                                   self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim,
                                   self.vocab_size, self.seq_len,
                                   " shared-classifier" if self.shared_classifier else ""))


def _check_header(h, path):
    def bad(msg):
        raise CheckpointError("%s: %s" % (path, msg))

    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "seq_len"):
        if h[name] <= 0:
            bad("header field %s is %d (must be positive)" % (name, h[name]))
    if h["vocab_size"] == 0:
        bad("header field vocab_size is 0")
    if h["dim"] % h["n_heads"]:
        bad("dim %d is not a multiple of n_heads %d" % (h["dim"], h["n_heads"]))
    if h["n_kv_heads"] > h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        bad("n_heads %d is not a multiple of n_kv_heads %d" % (h["n_heads"], h["n_kv_heads"]))
    if (h["dim"] // h["n_heads"]) % 2:
        bad("head dim %d is odd (RoPE needs pairs)" % (h["dim"] // h["n_heads"]))
    # keep sizes sane before multiplying them out (a garbage header is not a 1 TB model)
    if h["dim"] > 1 << 16 or h["hidden_dim"] > 1 << 18 or h["n_layers"] > 1 << 10 \
            or abs(h["vocab_size"]) > 1 << 22 or h["seq_len"] > 1 << 24:
        bad("header %s is implausibly large: not a llama2.c checkpoint?" % (h,))


def _n_floats(h, shared):
    dim, hid, L = h["dim"], h["hidden_dim"], h["n_layers"]
    hs = dim // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    V = abs(h["vocab_size"])
    n = V * dim + L * dim + L * dim * dim + 2 * L * kv * dim + L * dim * dim + L * dim
    n += 3 * L * hid * dim + dim + 2 * (h["seq_len"] * hs // 2)
    if not shared:
        n += V * dim
    return n


def load_llama2c(path):
    """Read a llama2.c ("legacy" format) checkpoint with NumPy; see models/README.md.

    Checks every header field, the exact file size (saying so when the size fits the other
    classifier layout) and that every weight is finite. Raises CheckpointError (a ValueError)
    naming the failed check, OSError when the file cannot be read."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER_BYTES:
        raise CheckpointError("%s: %d bytes, shorter than the %d-byte header"
                              % (path, len(raw), HEADER_BYTES))
    h = dict(zip(HEADER_FIELDS, (int(x) for x in np.frombuffer(raw[:HEADER_BYTES], "<i4"))))
    _check_header(h, path)
    shared = h["vocab_size"] > 0
    want = HEADER_BYTES + 4 * _n_floats(h, shared)
    if len(raw) != want:
        other = HEADER_BYTES + 4 * _n_floats(h, not shared)
        hint = ""
        if len(raw) == other:
            hint = (" (the size fits a %s classifier: the sign of vocab_size in the header is "
                    "wrong)" % ("shared" if not shared else "separate"))
        raise CheckpointError("%s: %d bytes, the header %s needs %d%s"
                              % (path, len(raw), h, want, hint))
    w = np.frombuffer(raw, "<f4", offset=HEADER_BYTES)
    dim, hid, L = h["dim"], h["hidden_dim"], h["n_layers"]
    hs = dim // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    V = abs(h["vocab_size"])
    off = 0

    def take(name, *shape):
        nonlocal off
        n = int(np.prod(shape))
        a = np.array(w[off:off + n], dtype=np.float32).reshape(shape)  # own, writable copy
        off += n
        if not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[0]
            raise CheckpointError("%s: weight %s has a non-finite value at %s"
                                  % (path, name, tuple(int(i) for i in bad)))
        return a

    ck = dict(path=path, dim=dim, hidden_dim=hid, n_layers=L, n_heads=h["n_heads"],
              n_kv_heads=h["n_kv_heads"], vocab_size=V, seq_len=h["seq_len"], head_dim=hs,
              kv_dim=kv, shared_classifier=shared)
    ck["token_embedding"] = take("token_embedding", V, dim)
    ck["rms_att"] = take("rms_att", L, dim)
    ck["wq"] = take("wq", L, dim, dim)
    ck["wk"] = take("wk", L, kv, dim)
    ck["wv"] = take("wv", L, kv, dim)
    ck["wo"] = take("wo", L, dim, dim)
    ck["rms_ffn"] = take("rms_ffn", L, dim)
    ck["w1"] = take("w1", L, hid, dim)
    ck["w2"] = take("w2", L, dim, hid)
    ck["w3"] = take("w3", L, hid, dim)
    ck["rms_final"] = take("rms_final", dim)
    off += 2 * (h["seq_len"] * hs // 2)  # legacy freq_cis_real / freq_cis_imag: unused
    ck["wcls"] = ck["token_embedding"] if shared else take("wcls", V, dim)
    assert off == w.size
    return Llama2cCheckpoint(**ck)


def hf_channel_order(D):
    """For every HF (rotate_half) channel c of a head of size D, the llama2.c (interleaved)
    channel it holds: 2c for c < D/2, 2(c - D/2) + 1 above. x_hf = x_llama2c[..., order]."""
    D = int(D)
    if D <= 0 or D % 2:
        raise ValueError("head dim must be positive and even, got %d" % D)
    half = D // 2
    c = np.arange(D)
    return np.where(c < half, 2 * c, 2 * (c - half) + 1).astype(np.int64)


def llama2c_to_hf_channels(x, D=None):
    """Reorder the last axis (one head, D channels) of a llama2.c post-RoPE q/k to HF order."""
    x = np.asarray(x)
    return x[..., hf_channel_order(D or x.shape[-1])]


def hf_to_llama2c_channels(x, D=None):
    """Inverse of llama2c_to_hf_channels: an HF post-RoPE q/k back to llama2.c order."""
    x = np.asarray(x)
    return x[..., np.argsort(hf_channel_order(D or x.shape[-1]))]


def _permute_rows(w, n_heads, D):
    """Rows of a [n_heads * D, in] projection reordered inside each head: HF row h*D + c is
    llama2.c row h*D + order[c]."""
    order = hf_channel_order(D)
    rows = (np.arange(n_heads)[:, None] * D + order[None, :]).reshape(-1)
    return np.ascontiguousarray(w[rows])


def hf_config(ckpt):
    """The LlamaConfig keyword arguments equivalent to the checkpoint (a plain dict)."""
    return {
        "hidden_size": ckpt.dim,
        "intermediate_size": ckpt.hidden_dim,
        "num_hidden_layers": ckpt.n_layers,
        "num_attention_heads": ckpt.n_heads,
        "num_key_value_heads": ckpt.n_kv_heads,
        "vocab_size": ckpt.vocab_size,
        "max_position_embeddings": ckpt.seq_len,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": bool(ckpt.shared_classifier),
        "head_dim": ckpt.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
    }


def to_hf(ckpt):
    """(config_dict, state_dict) for transformers.LlamaForCausalLM: the state dict maps HF
    parameter names to float32 NumPy arrays, wq/wk rows permuted per head (module docstring).
    lm_head.weight is always present (a copy of the embedding when the classifier is
    shared, as a tied model's state_dict() lists it too)."""
    if isinstance(ckpt, (str, bytes, os.PathLike)):
        ckpt = load_llama2c(ckpt)
    D = ckpt.head_dim
    sd = {"model.embed_tokens.weight": ckpt.token_embedding.copy()}
    for i in range(ckpt.n_layers):
        p = "model.layers.%d." % i
        sd[p + "self_attn.q_proj.weight"] = _permute_rows(ckpt.wq[i], ckpt.n_heads, D)
        sd[p + "self_attn.k_proj.weight"] = _permute_rows(ckpt.wk[i], ckpt.n_kv_heads, D)
        sd[p + "self_attn.v_proj.weight"] = ckpt.wv[i].copy()
        sd[p + "self_attn.o_proj.weight"] = ckpt.wo[i].copy()
        sd[p + "mlp.gate_proj.weight"] = ckpt.w1[i].copy()
        sd[p + "mlp.up_proj.weight"] = ckpt.w3[i].copy()
        sd[p + "mlp.down_proj.weight"] = ckpt.w2[i].copy()
        sd[p + "input_layernorm.weight"] = ckpt.rms_att[i].copy()
        sd[p + "post_attention_layernorm.weight"] = ckpt.rms_ffn[i].copy()
    sd["model.norm.weight"] = ckpt.rms_final.copy()
    sd["lm_head.weight"] = ckpt.wcls.copy()
    return hf_config(ckpt), sd


# ---- torch / transformers (imported lazily) ----

def _torch_dtype(torch, dtype):
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
    key = str(dtype).replace("torch.", "").lower()
    if key not in names:
        raise ValueError("unknown dtype %r (float32, bfloat16, float16)" % (dtype,))
    return names[key]


def make_llama_config(cfg, attn_implementation="sdpa"):
    """transformers.LlamaConfig from a hf_config() dict, across transformers versions:
    4.x keeps rope_theta as an attribute; 5.x keeps it in the rope_parameters dict (a
    rope_theta keyword is converted into it). The rope_theta variant is tried first: 4.x
    would store a rope_parameters keyword as an unused attribute. Checks that the config
    really carries the requested theta (where the model reads it) and head_dim."""
    from transformers import LlamaConfig
    kw = dict(cfg)
    theta = float(kw.pop("rope_theta", ROPE_THETA))
    errors = []
    variants = (dict(kw, rope_theta=theta),
                dict(kw, rope_parameters={"rope_type": "default", "rope_theta": theta}))
    for v in variants:
        for extra in ({"attn_implementation": attn_implementation}, {}):
            try:
                c = LlamaConfig(**v, **extra)
            except Exception as e:  # TypeError, or a strict config's validation error
                errors.append("%s: %s: %s" % (sorted(set(v) - set(kw)) + sorted(extra),
                                              type(e).__name__, e))
                continue
            # theta as kvtrace.capture reads it (the dict's first), and what a 4.x model reads
            eff, attr = _rope_params(c)[2], getattr(c, "rope_theta", None)
            if eff != theta or (attr is not None and float(attr) != theta):
                errors.append("%s: rope theta came out as %r (attribute %r)"
                              % (sorted(set(v) - set(kw)), eff, attr))
                continue
            hd = getattr(c, "head_dim", None)
            if hd is not None and int(hd) != int(kw["head_dim"]):
                errors.append("head_dim came out as %r" % hd)
                continue
            try:
                c._attn_implementation = attn_implementation
            except Exception:  # read-only in some versions: the constructor kwarg did it
                pass
            return c
    raise RuntimeError("cannot build a LlamaConfig for %s: %s" % (cfg, "; ".join(errors)))


def check_rope_buffers(model, theta, head_dim):
    """Every inv_freq buffer of the model equals theta^(-2i/D) (float32); returns how many
    were checked (0 means the model has none, e.g. a version computing RoPE on the fly)."""
    import torch
    want = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    n = 0
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            got = buf.detach().to("cpu", torch.float64).numpy()
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=0):
                raise RuntimeError("%s is %s, expected theta=%g: %s" % (name, got, theta, want))
            n += 1
    return n


def new_llama_model(config, dtype="float32", device=None):
    """transformers.LlamaForCausalLM(config) with its parameters created in `dtype`, as
    from_pretrained(dtype=...) (torch_dtype= in 4.x) builds it: torch's default dtype is
    switched while the model is constructed, and the parameters of a version that ignores it
    are cast afterwards, while the RoPE inv_freq buffers, which transformers computes
    explicitly in float32, stay float32. device: where the parameters are created, under
    `with torch.device(device)` (torch >= 2.0); None, or an older torch: on the CPU (the
    caller moves the model)."""
    import torch
    from transformers import LlamaForCausalLM

    tdt = _torch_dtype(torch, dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(tdt)
    try:
        if device is not None and hasattr(torch.device(device), "__enter__"):
            with torch.device(device):  # parameters born on the device: no CPU init
                model = LlamaForCausalLM(config)
        else:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():  # where a version ignores the default dtype: params only
        if p.dtype != tdt:
            p.data = p.data.to(tdt)
    return model


def to_torch_model(ckpt, dtype="float32", device="cpu", attn_implementation="sdpa"):
    """transformers.LlamaForCausalLM(LlamaConfig(**cfg)) with the converted weights loaded
    strictly (every parameter present, nothing unexpected; the non-persistent RoPE
    inv_freq buffers are exempt), in eval mode, on `device` in `dtype`.

    Built as from_pretrained(dtype=...) (torch_dtype= in 4.x) builds (new_llama_model): the
    parameters are created in `dtype` and the float32 weights are rounded into them by
    load_state_dict, while the RoPE inv_freq buffers, which transformers computes explicitly
    in float32, stay float32. A model.to(bfloat16) would round inv_freq to bf16 as well
    (theta 10000 would act as about 9990 on some channels), which is not how a bf16
    checkpoint runs."""
    import torch

    if isinstance(ckpt, (str, bytes, os.PathLike)):
        ckpt = load_llama2c(ckpt)
    cfg, sd = to_hf(ckpt)
    tdt = _torch_dtype(torch, dtype)
    config = make_llama_config(cfg, attn_implementation)
    model = new_llama_model(config, tdt)  # tiny: built on the CPU, then moved
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    res = model.load_state_dict(tsd, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("inv_freq")]
    unexpected = list(res.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError("state dict does not match LlamaForCausalLM: missing %s, "
                           "unexpected %s" % (missing, unexpected))
    if cfg["tie_word_embeddings"]:
        try:
            model.tie_weights()
        except Exception:
            pass
    model = model.to(device=device).eval()
    # every parameter is the checkpoint's weight rounded to dtype (bit for bit in f32)
    got = model.state_dict()
    for k, v in sd.items():
        # a version that leaves a tied weight out of state_dict(): the parameter itself
        t = got[k] if k in got else model.get_parameter(k)
        if t.dtype != tdt or not torch.equal(t.detach().cpu(), torch.from_numpy(v).to(tdt)):
            raise RuntimeError("parameter %s did not load (%s)" % (k, t.dtype))
    check_rope_buffers(model, cfg["rope_theta"], cfg["head_dim"])
    return model


__all__ = ["CheckpointError", "Llama2cCheckpoint", "load_llama2c", "hf_channel_order",
           "llama2c_to_hf_channels", "hf_to_llama2c_channels", "hf_config", "to_hf",
           "make_llama_config", "new_llama_model", "check_rope_buffers", "to_torch_model"]
