#!/usr/bin/env python3
"""test_python_hf_capture.py - kvtrace.capture(model, path) on a HuggingFace transformers
Llama (python/kvtrace/hf.py).

Uses the real transformers when it imports, else the test stand-in in
tests/oracle/hf_standin (NOT transformers' code; see its README), once in each of its styles:
transformers 5.x conventions (RoPE settings in config.rope_parameters, no rope_theta attribute,
position_ids from generate) and 4.x ones (config.rope_theta, cache_position). A random-init
Llama (3 layers, hidden 64, 8 query heads, 2 KV heads, head dim 8, RoPE theta 500000 - not the
default, so a theta lost on the way shows - vocab 97, f32, fixed seed) on
the CPU (and again on CUDA when torch sees a GPU) generates greedily inside
`with kvtrace.capture(model, path, window=4, decode=5)`, while a recorder registered in the
attention registry keeps the q/k/v tensors the model itself hands to attention. Checks:
  * the trace's K, V [Hkv, T, D] and Q_window [Hq, W, D] equal the model's post-RoPE tensors
    bit for bit (f32), and within bf16 rounding with kv_dtype="bf16" (plus Q_all);
    layer 0's K and Q also equal an independent recomputation from the weights (RoPE by hand);
  * decode Q/K/V for exactly 5 steps (8 new tokens = 7 decode calls: capture stops at
    `decode`, generation goes on), decode token ids, prompt token ids, positions, modality;
  * header: model shape, n_tokens, window, kv_dtype, engine, capture JSON (versions, attn
    implementation, model class); model.rope pairs "half", inv_freq and attention_scaling
    equal to the rotary embedding module's (also a scaled one); verify() ok; stats;
  * logits and generated tokens with and without capture are bit-identical;
  * the registry entry and the model's forward/hooks are restored after the block, also when
    the block raises (the original exception propagates, the trace holds the prompt);
  * clear errors: eager attention, batch 2, unsupported model type, old transformers, a
    second prompt in one block, nothing captured, existing file;
  * robustness (check_robustness): kv_dtype (torch dtypes accepted, bad ones refused by
    capture() itself), a float64 model, a missing output directory, window/decode/config
    errors naming the argument, all before the model runs; force=True with an exception in
    the prompt (old trace kept, partial_path and a RuntimeWarning name the new one);
    overlapping captures ending out of order (registry restored, later generates run); a
    capture left under another library's wrapper frees the model; a second generate with a 1-token prompt (a message saying so, no token id recorded for
    the uncaptured step); a generate loop without a KV cache (use_cache=False given or the
    config's default: the message says so);
  * the plain functions: token_modality (image_token_id / video_token_id / LLaVA
    image_token_index), mrope_positions ([3,B,T], [4,B,T], [B,T], None), rope_positions,
    version and model-type checks, vision-tower exclusion.

Environment: KVT_SOURCE_ROOT (repository), KVT_LIB (libkvtrace.so),
KVT_REQUIRE_CUDA_CAPTURE=1 (with a GPU: fail, instead of noting it, when the library refuses
CUDA views with KVT_ERR_NO_CUDA or KVT_ERR_UNSUPPORTED). Exit 0 pass, 1 fail, 77 not run (no NumPy or torch for
this interpreter)."""
import os
import subprocess
import sys
import tempfile
import types
import warnings

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)
try:
    import torch
except ImportError:
    print("SKIP: torch is not installed for " + sys.executable)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "python"))
try:
    import transformers
    STANDIN = False
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "tests", "oracle", "hf_standin"))
    import transformers
    STANDIN = True
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvtrace  # noqa: E402
from kvtrace import hf  # noqa: E402

L, HQ, HKV, D, VOCAB, T, W, G, NEW = 3, 8, 2, 8, 97, 11, 4, 5, 8
THETA = 500000.0  # not the default (10000): a theta dropped by a config convention shows
FAILS = []


def check(cond, what):
    if cond:
        print("ok:   " + what)
    else:
        print("FAIL: " + what)
        FAILS.append(what)
    return cond


def expect_error(fn, substrings, what, exc=kvtrace.TraceError):
    try:
        fn()
    except exc as e:
        msg = str(e)
        missing = [s for s in substrings if s not in msg]
        return check(not missing, "%s: %s raised: %s%s" % (
            what, type(e).__name__, msg, (" (missing %r)" % missing) if missing else ""))
    except Exception as e:  # noqa: BLE001
        return check(False, "%s: raised %s: %s (want %s)" % (what, type(e).__name__, e,
                                                              exc.__name__))
    return check(False, "%s: no error raised" % what)


# ---- the attention registry, through transformers' public surface ----
def registry():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS


def set_registry(impl, fn):
    r = registry()
    if isinstance(r, dict):  # transformers 4.48 - 4.50
        r[impl] = fn
    else:
        type(r).register(impl, fn)


class Recorder(object):
    """Registered as "sdpa": keeps (layer, q, k, v) of every attention call, then calls the
    original function."""

    def __init__(self):
        self.calls = []
        self.orig = registry()["sdpa"]
        orig, calls = self.orig, self.calls

        def record_attention(module, query, key, value, attention_mask, *a, **kw):
            if getattr(module, "layer_idx", None) is not None:
                calls.append((int(module.layer_idx), query.detach().clone(),
                              key.detach().clone(), value.detach().clone()))
            return orig(module, query, key, value, attention_mask, *a, **kw)

        self.fn = record_attention

    def __enter__(self):
        set_registry("sdpa", self.fn)
        return self

    def __exit__(self, *exc):
        set_registry("sdpa", self.orig)
        return False

    def split(self):
        """{layer: prefill (q, k, v)}, {layer: [decode (q, k, v), ...]} as float32 NumPy."""
        pre, dec = {}, {}
        for layer, q, k, v in self.calls:
            qkv = tuple(x.float().cpu().numpy() for x in (q, k, v))
            if q.shape[-2] > 1:
                pre.setdefault(layer, qkv)
            else:
                dec.setdefault(layer, []).append(qkv)
        return pre, dec


def build(attn="sdpa", device="cpu"):
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HQ * D, intermediate_size=128,
                      num_hidden_layers=L, num_attention_heads=HQ, num_key_value_heads=HKV,
                      max_position_embeddings=256, rope_theta=THETA, rms_norm_eps=1e-6,
                      initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False, attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32).eval()


def prompt(device="cpu"):
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (1, T), generator=g).to(device)


def generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, [x.detach().cpu() for x in out.logits]


def hook_state(model):
    """What a capture installs and must remove: instance forwards and forward pre-hooks of the
    model and its text model."""
    return [(m.__dict__.get("forward"), list(m._forward_pre_hooks.values()))
            for m in (model, model.model)]


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def recompute_layer0(model, ids):
    """Post-RoPE q, k of layer 0 from the weights, RoPE written out here: [H, T, D] f32."""
    with torch.no_grad():
        lay = model.model.layers[0]
        x = lay.input_layernorm(model.model.embed_tokens(ids))
        q = lay.self_attn.q_proj(x).view(1, T, HQ, D).transpose(1, 2).double()
        k = lay.self_attn.k_proj(x).view(1, T, HKV, D).transpose(1, 2).double()
        inv = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        full = torch.cat([ang, ang], dim=-1).to(q.device)
        cos, sin = full.cos(), full.sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    return q[0].float().cpu().numpy(), k[0].float().cpu().numpy()


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def within_bf16(got_bits, ref_f32):
    """bf16 values (uint16 bits) are ref rounded to bf16: within half an ulp (2^-8 relative)."""
    got = kvtrace.bf16_to_f32(got_bits).astype(np.float64)
    ref = np.asarray(ref_f32, dtype=np.float64)
    return bool(np.all(np.abs(got - ref) <= np.abs(ref) * 2.0 ** -8 + 1e-30))


def same_freqs(header_list, buf):
    """The header's inv_freq is the buffer's values, as doubles, exactly (the capture prints
    them with 17 significant digits)."""
    want = buf.detach().double().cpu().numpy()
    got = np.asarray(header_list if header_list is not None else [], np.float64)
    return got.shape == want.shape and bool(np.all(got == want))


# ------------------------------------------------------------------------------------------
def check_config_convention(style):
    """The stand-in really follows the style's config convention (so the capture checks after
    it exercise hf.py on that convention)."""
    cfg = build().config
    if style >= 5:
        ok = (getattr(cfg, "rope_theta", None) is None and
              cfg.rope_parameters.get("rope_theta") == THETA and cfg.rope_scaling is
              cfg.rope_parameters)
    else:
        ok = cfg.rope_theta == THETA and not hasattr(cfg, "rope_parameters")
    check(ok, "stand-in %d.x config: theta where transformers %d.x keeps it" % (style, style))


def check_capture(device, tmp, label=None):
    tag = "[%s] " % (label or device)
    model = build(device=device)
    ids = prompt(device)
    before = registry()["sdpa"]
    hooks_before = hook_state(model)

    with Recorder():
        seq_ref, logits_ref = generate(model, ids)
    path = os.path.join(tmp, "llama-%s.kvt" % (label or device).replace(" ", "-"))
    with Recorder() as rec:
        try:
            with kvtrace.capture(model, path, window=W, decode=G) as cap:
                from kvtrace import _lib
                reserved_in_block = _lib.lib().kvt_capture_device_reserved_bytes()
                seq, logits = generate(model, ids)
        except kvtrace.TraceError as e:
            if device != "cpu" and e.status_name in ("KVT_ERR_UNSUPPORTED", "KVT_ERR_NO_CUDA") and \
                    not os.environ.get("KVT_REQUIRE_CUDA_CAPTURE"):
                print("note: %sCUDA capture not checked, the library refuses device views: %s"
                      % (tag, e))
                return
            raise
    check(registry()["sdpa"] is before, tag + "registry entry restored after the block")
    check(hook_state(model) == hooks_before, tag + "model forward and pre-hooks restored")
    check(torch.equal(seq, seq_ref) and seq.shape[1] == T + NEW,
          tag + "generated tokens identical with and without capture (%d new)"
          % (seq.shape[1] - T))
    check(len(logits) == len(logits_ref) and all(torch.equal(a, b)
                                                 for a, b in zip(logits, logits_ref)),
          tag + "logits bit-identical with and without capture (%d steps)" % len(logits))
    pre, dec = rec.split()
    check(sorted(pre) == list(range(L)) and all(len(dec[l]) == NEW - 1 for l in range(L)),
          tag + "recorder saw one prompt call and %d decode calls per layer" % (NEW - 1))
    check(cap.n_tokens == T and cap.window == W and cap.n_decode_steps == NEW - 1,
          tag + "Capture: n_tokens %s, window %s, decode calls seen %s"
          % (cap.n_tokens, cap.window, cap.n_decode_steps))
    check(cap.stats is not None and cap.stats["n_decode"] == G,
          tag + "stats n_decode == %d (got %s)" % (G, cap.stats and cap.stats["n_decode"]))

    with kvtrace.open(path) as t:
        h = t.header
        m = h["model"]
        check((m["n_layers"], m["n_q_heads"], m["n_kv_heads"], m["head_dim"]) == (L, HQ, HKV, D),
              tag + "header model shape %s" % ((m["n_layers"], m["n_q_heads"], m["n_kv_heads"],
                                                 m["head_dim"]),))
        check(h["n_tokens"] == T and h["window"] == W and h["n_decode"] == G and
              h["kv_dtype"] == "f32", tag + "header n_tokens %s window %s n_decode %s kv_dtype %s"
              % (h["n_tokens"], h["window"], h["n_decode"], h["kv_dtype"]))
        check(m["arch"] == "llama" and m["rope"]["type"] == "default" and
              abs(m["rope"]["theta"] - THETA) < 1e-9 and abs(m["attn_scale"] - D ** -0.5) < 1e-7,
              tag + "header arch/rope/attn_scale %s %s %s" % (m["arch"], m["rope"],
                                                              m["attn_scale"]))
        c = h["capture"]
        check(h["engine"]["name"] == "transformers" and
              c.get("transformers_version") == transformers.__version__ and
              c.get("torch_version") == torch.__version__ and
              c.get("attn_implementation") == "sdpa" and
              c.get("model_class") == "LlamaForCausalLM" and
              "rope_scaling" not in c,  # plain RoPE: model.rope says it all
              tag + "header engine and capture JSON (%s, %s)" % (h["engine"], {
                  k: c.get(k) for k in ("transformers_version", "torch_version",
                                        "attn_implementation", "model_class")}))
        check(c.get("zstd_level") == 1, tag + "default zstd level 1 (got %r)"
              % c.get("zstd_level"))
        rot = model.model.rotary_emb
        check(m["rope"].get("pairs") == "half" and
              same_freqs(m["rope"].get("inv_freq"), rot.inv_freq) and
              m["rope"].get("attention_scaling") == float(rot.attention_scaling) and
              "mrope_section" not in m["rope"],
              tag + "header model.rope: pairs half, inv_freq == the rotary embedding's buffer, "
              "its attention_scaling (%s)" % m["rope"])
        if device != "cpu":
            check(h.get("gpu") not in (None, ""), tag + "header gpu %r" % h.get("gpu"))
            # the ring reserved on entering the block was taken by the session (none left)
            from kvtrace import _lib
            check(reserved_in_block > 0 and _lib.lib().kvt_capture_device_reserved_bytes() == 0,
                  tag + "a device ring reserved on entering the block (%d bytes), none left "
                  "after it" % reserved_in_block)
        check(t.verify()["ok"], tag + "verify ok")
        bad = []
        for l in range(L):
            q, k, v = pre[l]
            for kind, want in (("K", k[0]), ("V", v[0]), ("Q_window", q[0, :, T - W:])):
                got = t.read(kind, layer=l)
                if got.shape != want.shape or not np.array_equal(got, want):
                    bad.append("%s L%d" % (kind, l))
            dq = np.stack([dec[l][g][0][0, :, 0, :] for g in range(G)], axis=1)
            dk = np.stack([dec[l][g][1][0, :, -1, :] for g in range(G)], axis=1)
            dv = np.stack([dec[l][g][2][0, :, -1, :] for g in range(G)], axis=1)
            for kind, want in (("Q_decode", dq), ("K_decode", dk), ("V_decode", dv)):
                got = t.read(kind, layer=l)
                if got.shape != want.shape or not np.array_equal(got, want):
                    bad.append("%s L%d %s vs %s" % (kind, l, got.shape, want.shape))
        check(not bad, tag + "K, V, Q_window, Q/K/V_decode (%d steps) equal the model's tensors "
              "bit for bit%s" % (G, (": " + ", ".join(bad)) if bad else ""))
        q0, k0 = recompute_layer0(model, ids)
        e = max(rel_err(t.read("K", layer=0), k0), rel_err(t.read("Q_window", layer=0),
                                                              q0[:, T - W:]))
        check(e < 1e-5, tag + "layer 0 K and Q_window equal a recomputation with RoPE written "
              "out (rel err %.2g)" % e)
        tok = t.tokens
        ids_np = ids[0].cpu().numpy()
        check(tok["token_ids"] is not None and np.array_equal(tok["token_ids"], ids_np),
              tag + "prompt token ids")
        check(tok["decode_token_ids"] is not None and
              np.array_equal(tok["decode_token_ids"], seq[0, T:T + G].cpu().numpy()),
              tag + "decode token ids = the first %d generated tokens (%s)"
              % (G, tok["decode_token_ids"]))
        check(tok["positions"] is not None and tok["positions"].shape == (1, T) and
              np.array_equal(tok["positions"][0], np.arange(T)), tag + "positions 0..T-1")
        check(tok["modality"] is not None and not tok["modality"].any(),
              tag + "modality all text")
        meta = t.meta[-1] if t.meta else {}
        check(not meta.get("defaulted_tables"), tag + "no defaulted tables (%s)"
              % meta.get("defaulted_tables"))

    # bf16 storage of the same f32 model, with every prompt query
    path16 = os.path.join(tmp, "llama-%s-bf16.kvt" % (label or device).replace(" ", "-"))
    with Recorder() as rec16:
        with kvtrace.capture(model, path16, window=W, decode=2, kv_dtype="bf16",
                             with_q_all=True):
            seq16, logits16 = generate(model, ids)
    check(torch.equal(seq16, seq_ref) and all(torch.equal(a, b)
                                              for a, b in zip(logits16, logits_ref)),
          tag + "bf16 capture: tokens and logits unchanged")
    pre16, dec16 = rec16.split()
    bad = []
    exact = total = 0
    with kvtrace.open(path16) as t:
        check(t.header["kv_dtype"] == "bf16" and t.header["n_decode"] == 2,
              tag + "bf16 header")
        for l in range(L):
            q, k, v = pre16[l]
            pairs = [("K", k[0]), ("V", v[0]), ("Q_window", q[0, :, T - W:]), ("Q_all", q[0]),
                     ("Q_decode", np.stack([dec16[l][g][0][0, :, 0, :] for g in range(2)], 1))]
            for kind, want in pairs:
                got = t.read(kind, layer=l)
                if got.dtype != np.uint16 or got.shape != want.shape or not within_bf16(got, want):
                    bad.append("%s L%d" % (kind, l))
                else:
                    exact += int(np.sum(got == kvtrace.f32_to_bf16(want)))
                    total += got.size
    check(not bad, tag + "bf16 K, V, Q_window, Q_all, Q_decode within bf16 rounding of the "
          "model's f32 tensors%s (%d/%d equal to round-to-nearest-even)"
          % ((": " + ", ".join(bad)) if bad else "", exact, total))


def check_rope_details(tmp):
    """model.rope records the rotary embedding module's own inv_freq and attention_scaling (as
    scaled RoPE types set them), read when the prompt runs; the trace's K still equals the
    model's tensors."""
    model = build()
    rot = model.model.rotary_emb
    with torch.no_grad():
        rot.inv_freq.mul_(0.25)  # as a linear scaling with factor 4 would
    rot.attention_scaling = 1.1
    path = os.path.join(tmp, "llama-scaled-rope.kvt")
    with Recorder() as rec:
        with kvtrace.capture(model, path, window=W, decode=1):
            generate(model, prompt())
    pre, _ = rec.split()
    with kvtrace.open(path) as t:
        r = t.header["model"]["rope"]
        k_ok = np.array_equal(t.read("K", layer=1), pre[1][1][0])
    check(r.get("pairs") == "half" and same_freqs(r.get("inv_freq"), rot.inv_freq) and
          r.get("attention_scaling") == 1.1 and k_ok,
          "scaled rotary embedding: header inv_freq and attention_scaling are the module's "
          "(%s), K unchanged" % r)


def check_errors_and_restore(tmp):
    model = build()
    ids = prompt()
    before = registry()["sdpa"]
    hooks_before = hook_state(model)

    def cap(name, **kw):
        return kvtrace.capture(model, os.path.join(tmp, name), **kw)

    # eager attention
    eager = build(attn="eager")
    expect_error(lambda: kvtrace.capture(eager, os.path.join(tmp, "e.kvt")),
                 ["eager", 'attn_implementation="sdpa"'], "eager model")

    # batch 2 (the error comes from inside the forward call)
    def batch2():
        with cap("b2.kvt"):
            model(input_ids=torch.cat([ids, ids], 0))
    expect_error(batch2, ["batch size 2", "num_beams=1"], "batch 2")
    check(not os.path.exists(os.path.join(tmp, "b2.kvt")), "batch 2: no trace written")
    check(registry()["sdpa"] is before, "batch 2: registry restored")

    # unsupported model type
    dummy = torch.nn.Linear(2, 2)
    dummy.config = types.SimpleNamespace(model_type="gpt2")
    expect_error(lambda: kvtrace.capture(dummy, os.path.join(tmp, "g.kvt")),
                 ["'gpt2' is not supported", "llama", "qwen2_5_vl", "llava"],
                 "unsupported model type")

    # old transformers
    saved = hf._transformers_version
    hf._transformers_version = lambda mod: "4.47.1"
    try:
        expect_error(lambda: kvtrace.capture(model, os.path.join(tmp, "o.kvt")),
                     ["4.47.1", ">= 4.48"], "transformers 4.47")
    finally:
        hf._transformers_version = saved
    check(hf._transformers_version(transformers) == str(transformers.__version__),
          "the version read is transformers.__version__ (%s)" % transformers.__version__)

    # nothing captured
    def nothing():
        with cap("n.kvt"):
            pass
    expect_error(nothing, ["nothing was captured"], "empty block")

    # existing file
    open(os.path.join(tmp, "x.kvt"), "wb").close()
    expect_error(lambda: cap("x.kvt").__enter__(), ["exists", "force=True"], "existing file")
    # a directory is never replaced, with force=True too, and refused at the block's start
    # (it was refused only at the first forward call, with the model running)
    os.mkdir(os.path.join(tmp, "d.kvt"))
    for force in (False, True):
        expect_error(lambda: cap("d.kvt", force=force).__enter__(), ["not a regular file"],
                     "a directory as the output, force=%s" % force)

    # the block raises after the prompt: original exception, registry and hooks restored,
    # the trace holds the prompt
    class Boom(Exception):
        pass

    def boom():
        with cap("r.kvt", window=W, decode=3):
            with torch.no_grad():
                model(input_ids=ids)
            raise Boom("boom")
    expect_error(boom, ["boom"], "exception in the block propagates", exc=Boom)
    check(registry()["sdpa"] is before, "after the exception: registry restored")
    check(hook_state(model) == hooks_before, "after the exception: forward and pre-hooks restored")
    with kvtrace.open(os.path.join(tmp, "r.kvt")) as t:
        check(t.verify()["ok"] and t.layers("K") == list(range(L)) and
              t.shape("K", 0) == (HKV, T, D) and t.shape("Q_window", 2) == (HQ, W, D),
              "after the exception: the trace holds the prompt and verifies")

    # a second prompt inside one block
    def second():
        with cap("s.kvt", window=W, decode=3):
            with torch.no_grad():
                model(input_ids=ids)
                model(input_ids=ids)
    expect_error(second, ["11-token forward call after the prompt", "not supported",
                          "use_cache=False"], "second prompt in one block")
    check(registry()["sdpa"] is before, "after a capture error: registry restored")

    # attention classes that do not use the registry: refused up front when the forward
    # visibly does not refer to it, else found out when the block ends
    old_style = build()
    base = type(old_style.model.layers[0].self_attn)

    def old_forward(self, hidden_states, *args, **kwargs):
        raise NotImplementedError("never called")

    OldStyle = type("OldStyleAttention", (base,), {"forward": old_forward})
    for layer in old_style.model.layers:
        layer.self_attn.__class__ = OldStyle
    expect_error(lambda: kvtrace.capture(old_style, os.path.join(tmp, "os.kvt")),
                 ["OldStyleAttention.forward", "does not dispatch"], "attention without registry")

    def zero_forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None

    def hidden(f):  # a decorator that hides the function it wraps (no __wrapped__)
        def forward(self, *args, **kwargs):
            return f(self, *args, **kwargs)
        forward.__module__ = "some_decorator_module"
        return forward

    Hidden = type("HiddenAttention", (base,), {"forward": hidden(zero_forward)})
    for layer in old_style.model.layers:
        layer.self_attn.__class__ = Hidden

    def hidden_run():
        with kvtrace.capture(old_style, os.path.join(tmp, "h.kvt")):
            with torch.no_grad():
                old_style(input_ids=ids)
    expect_error(hidden_run, ["never called the registry entry 'sdpa'"],
                 "attention that bypasses the registry (found at the end of the block)")

    # the model still works normally afterwards (no wrapper left anywhere)
    with Recorder() as r:
        with torch.no_grad():
            model(input_ids=ids)
    check(len(r.calls) == L, "after the captures: attention runs through the registry as before")



def check_robustness(tmp):
    """The review's findings on hf.py."""
    model = build()
    ids = prompt()
    before = registry()["sdpa"]

    def p(name):
        return os.path.join(tmp, "rb-" + name)

    def section(fn):  # one section's crash is a failed check, not the end of the others
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            check(False, "robustness section %s raised %s: %s" % (fn.__name__,
                                                                   type(e).__name__, e))
            set_registry("sdpa", before)

    def kv_dtype_torch():
        # kv_dtype: torch dtypes accepted (before: a NumPy TypeError in the first forward)
        with kvtrace.capture(model, p("tbf16.kvt"), window=W, decode=2,
                             kv_dtype=torch.bfloat16):
            generate(model, ids)
        with kvtrace.open(p("tbf16.kvt")) as t:
            check(t.header["kv_dtype"] == "bf16" and t.stored_dtype("K", 0) == "bf16" and
                  t.verify()["ok"], "kv_dtype=torch.bfloat16 -> a bf16 trace")
    section(kv_dtype_torch)

    def arguments():
        # bad values refused by capture() itself (before: deep inside the first forward call)
        for kd in ("fp8", "i32", torch.float64, torch.int8):
            expect_error(lambda: kvtrace.capture(model, p("kd.kvt"), kv_dtype=kd),
                         ["kv_dtype", '"bf16"'], "kv_dtype=%r refused by capture()" % (kd,))
        check(not os.path.exists(p("kd.kvt")), "bad kv_dtype: no file")
        # a float64 model: refused up front (before: told to pass kv_dtype="f32", which then
        # failed mid-forward with an incomplete trace)
        m64 = build().to(torch.float64)
        for kd in (None, "f32"):
            expect_error(lambda: kvtrace.capture(m64, p("m64.kvt"), kv_dtype=kd),
                         ["float64", "float32, float16 or bfloat16"],
                         "float64 model, kv_dtype=%r: refused by capture()" % (kd,))
        check(not os.path.exists(p("m64.kvt")), "float64 model: no file")
        # the output directory, window, decode, config: errors name the argument, up front
        expect_error(lambda: kvtrace.capture(model, os.path.join(tmp, "nope", "a.kvt")),
                     ["nope", "does not exist"],
                     "missing output directory refused by capture()")
        for kw, words in ((dict(window=None), ["window must be an integer", "None"]),
                          (dict(window=0), ["window = 0"]),
                          (dict(decode=2 ** 32), ["decode = 4294967296", "1073741824"]),
                          (dict(decode=-1), ["decode = -1"]),
                          (dict(decode=4.5), ["decode must be an integer"]),
                          (dict(level="x"), ["level must be an integer"])):
            expect_error(lambda: kvtrace.capture(model, p("kw.kvt"), **kw), words,
                         "capture(%s) refused" % kw)
        nocfg = build()
        # the config seen through a view without the field (transformers 5's configs keep
        # class defaults that a deleted instance attribute would fall back on)
        class NoHeads:
            def __init__(self, cfg):
                self._cfg = cfg

            def __getattr__(self, name):
                if name == "num_attention_heads":
                    raise AttributeError(name)
                return getattr(self._cfg, name)

            def get_text_config(self, *args, **kwargs):
                return self

        nocfg.config = NoHeads(nocfg.config)
        expect_error(lambda: kvtrace.capture(nocfg, p("nc.kvt")),
                     ["no num_attention_heads"], "config without num_attention_heads")
        check(registry()["sdpa"] is before, "after the refusals: registry untouched")
    section(arguments)

    def force():
        # force=True over a good trace, an exception in the middle of the prompt: the old
        # trace stays, the new one is named (partial_path and a RuntimeWarning; before: only
        # a line on the C library's stderr)
        good = p("force.kvt")
        with kvtrace.capture(model, good, window=W, decode=2):
            generate(model, ids)
        with open(good, "rb") as f:
            old = f.read()
        mlp = model.model.layers[1].mlp

        def oom(*a, **k):
            raise RuntimeError("out of memory (simulated)")
        mlp.forward = oom
        cap = kvtrace.capture(model, good, window=W, decode=2, force=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with cap:
                        generate(model, ids)
                    raised = None
                except RuntimeError as e:
                    raised = str(e)
        finally:
            del mlp.forward
        check(raised == "out of memory (simulated)", "force: the block's exception propagates")
        with open(good, "rb") as f:
            check(f.read() == old, "force + exception mid-prompt: the old trace is unchanged")
        pp = cap.partial_path
        check(pp is not None and os.path.exists(pp) and
              os.path.basename(pp).startswith("rb-force.kvt.tmp.%d." % os.getpid()),
              "force + exception mid-prompt: partial_path names the new trace (%s)" % pp)
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        check(pp is not None and any(pp in m and "unchanged" in m for m in msgs),
              "force + exception mid-prompt: a RuntimeWarning names it (%s)" % msgs)
        if pp is not None and os.path.exists(pp):
            with kvtrace.open(pp) as t:
                check(t.layers("K") == [0, 1], "the partial trace holds the layers captured before "
                      "the exception (%s)" % t.layers("K"))
            os.remove(pp)
        with kvtrace.capture(model, good, window=W, decode=2, force=True) as cap2:
            generate(model, ids)
        check(cap2.partial_path is None and not [n for n in os.listdir(tmp) if ".tmp." in n],
              "force, complete: replaced, no partial_path, no temporary file")
    section(force)

    def overlapping():
        # overlapping captures ending out of order (before: c1's wrapper stayed in the
        # registry hooking its closed session, and every later generate raised)
        m2 = build()
        c1 = kvtrace.capture(model, p("o1.kvt"), window=W, decode=2)
        c2 = kvtrace.capture(m2, p("o2.kvt"), window=W, decode=2)
        c1.__enter__()
        c2.__enter__()
        seq1, _ = generate(model, ids)
        seq2, _ = generate(m2, ids)
        c1.__exit__(None, None, None)
        c2.__exit__(None, None, None)
        check(registry()["sdpa"] is before, "out-of-order exits: the registry is restored")
        try:
            again = [generate(m, ids)[0] for m in (model, m2, model)]
            ok = all(torch.equal(a, seq1) for a in again)
            err = ""
        except Exception as e:  # noqa: BLE001
            ok, err = False, "%s: %s" % (type(e).__name__, e)
        check(ok, "out-of-order exits: later generates run normally %s" % err)
        for path, c in ((p("o1.kvt"), c1), (p("o2.kvt"), c2)):
            with kvtrace.open(path) as t:
                check(t.verify()["ok"] and c.stats["n_decode"] == 2 and
                      np.array_equal(t.tokens["token_ids"], ids[0].numpy()),
                      "out-of-order exits: %s complete" % os.path.basename(path))
    section(overlapping)

    def wrapped_over():
        # another library's wrapper put over the capture's during the block: the capture's
        # wrapper stays in the chain, passing calls on, but must not keep the model alive
        import gc
        import weakref
        m3 = build()
        with kvtrace.capture(m3, p("w3.kvt"), window=W, decode=2):
            rec = Recorder()
            set_registry("sdpa", rec.fn)
            generate(m3, ids)
        alive = weakref.ref(m3)
        alive_attn = weakref.ref(m3.model.layers[0].self_attn)
        del m3
        gc.collect()
        check(alive() is None and alive_attn() is None,
              "a capture left inside another wrapper frees the model and its modules")
        set_registry("sdpa", before)  # undo the foreign wrapper (and ours under it)
    section(wrapped_over)

    def second_generate():
        # a second generate with a 1-token prompt (before: blamed "a static or offloaded
        # cache", and recorded the token id of a decode step whose Q/K/V were never captured)
        def second_one_token():
            with kvtrace.capture(model, p("g2.kvt"), window=W, decode=5):
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False)
                    one = ids[:, :1]
                    model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=3,
                                   do_sample=False)
        try:
            second_one_token()
            msg = "no error raised"
        except kvtrace.TraceError as e:
            msg = str(e)
        ok = check("second generate" in msg and "1-token forward call" in msg and
                   "static" not in msg, "second generate with a 1-token prompt: the message says "
                   "so, without blaming a static cache: %s" % msg)
        with kvtrace.open(p("g2.kvt")) as t:
            dt = t.tokens["decode_token_ids"]
            check(ok and t.shape("Q_decode", 0)[1] == 2 and dt is not None and len(dt) == 2,
                  "second generate: 2 decode steps captured, 2 decode token ids (%s)" % dt)
        os.remove(p("g2.kvt"))
    section(second_generate)

    def no_cache():
        # a generate loop without a KV cache (before: blamed chunked prefill, assisted
        # decoding or a second generate call): use_cache=False given, or the config's default
        def loop(**kw):
            with kvtrace.capture(model, p("nc.kvt"), window=W, decode=2, force=True):
                seq = ids
                with torch.no_grad():
                    for _ in range(3):
                        out = model(input_ids=seq, **kw)
                        seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
        words = ["12-token forward call", "without a KV cache", "use_cache=False",
                 "use_cache=True"]
        expect_error(lambda: loop(use_cache=False), words,
                     "a loop with use_cache=False: the message says so")
        saved = model.config.use_cache
        model.config.use_cache = False
        try:
            expect_error(loop, words, "config.use_cache=False: the message says so")
        finally:
            model.config.use_cache = saved
        with kvtrace.open(p("nc.kvt")) as t:  # the prompt was captured before the refusal
            check(t.verify()["ok"] and t.shape("K", 0) == (HKV, T, D),
                  "use_cache=False: the trace holds the prompt")
        os.remove(p("nc.kvt"))
    section(no_cache)

    def second_generate_more():
        # a Python QA pass: a sliding-window model (Mistral-7B-v0.1's config) skipped the
        # check, so a second generate's tokens became more decode steps of the first sequence;
        # and once the decode steps were used up, a second generate ran on unrefused
        def run(decode, sliding):
            for layer in model.model.layers:
                layer.self_attn.sliding_window = sliding
            try:
                with kvtrace.capture(model, p("g3.kvt"), window=W, decode=decode, force=True):
                    with torch.no_grad():
                        model.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=3, do_sample=False)
                        one = ids[:, :1]
                        model.generate(one, attention_mask=torch.ones_like(one),
                                       max_new_tokens=4, do_sample=False)
                return "no error raised"
            except kvtrace.TraceError as e:
                return str(e)
            finally:
                for layer in model.model.layers:
                    del layer.self_attn.sliding_window
        for decode, sliding in ((6, 4096), (6, T + 4), (2, None), (0, None)):
            msg = run(decode, sliding)
            check("second generate" in msg and "1-token forward call" in msg,
                  "second generate (decode=%d, sliding_window=%s): refused: %s"
                  % (decode, sliding, msg))
            with kvtrace.open(p("g3.kvt")) as t:
                g = min(decode, 2)
                dt = t.tokens["decode_token_ids"]
                check(t.shape("Q_decode", 0)[1] == g if g else True,
                      "second generate (decode=%d, sliding_window=%s): the first sequence's "
                      "%d steps only (decode ids %s)" % (decode, sliding, g, dt))
        os.remove(p("g3.kvt"))
    section(second_generate_more)

    def sliding_window():
        # a layer attending through a sliding window shorter than the prompt (Mistral-7B-v0.1
        # past 4096 tokens) was captured as if it saw the whole prompt, and replayed with full
        # causal attention: refused now, naming the layer; decode steps stop where the window
        # starts to hide keys, with a warning
        import warnings
        layer = model.model.layers[1].self_attn

        def run(sliding, decode, name):
            layer.sliding_window = sliding
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with kvtrace.capture(model, p(name), window=W, decode=decode, force=True):
                        with torch.no_grad():
                            model.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=decode + 1, do_sample=False)
                return [str(w.message) for w in caught]
            finally:
                del layer.sliding_window
        expect_error(lambda: run(T - 1, 2, "sw1.kvt"),
                     ["layer 1", "sliding window of %d tokens" % (T - 1),
                      "%d-token prompt" % T, "at most %d tokens" % (T - 1)],
                     "a sliding window shorter than the prompt: refused")
        msgs = run(T + 2, 5, "sw2.kvt")
        check(any("layer 1" in m and "2 of the 5 decode steps" in m for m in msgs),
              "a sliding window 2 past the prompt: warns that 2 of 5 steps are captured (%s)"
              % msgs)
        with kvtrace.open(p("sw2.kvt")) as t:
            check(t.verify()["ok"] and t.shape("Q_decode", 0)[1] == 2 and
                  t.shape("Q_decode", 1)[1] == 2 and len(t.tokens["decode_token_ids"]) == 2,
                  "a sliding window 2 past the prompt: every layer holds 2 decode steps")
        msgs = run(T + 10, 5, "sw3.kvt")
        check(not any("sliding" in m for m in msgs),
              "a sliding window past prompt and decode steps: no warning (%s)" % msgs)
        with kvtrace.open(p("sw3.kvt")) as t:
            check(t.shape("Q_decode", 0)[1] == 5, "a wide sliding window: 5 decode steps")
        for name in ("sw1.kvt", "sw2.kvt", "sw3.kvt"):
            if os.path.exists(p(name)):
                os.remove(p(name))
    section(sliding_window)

    def warnings_as_errors():
        # with warnings turned into errors (pytest -W error), the warning that another library
        # replaced the registry entry was raised before the session was closed: the trace
        # stayed unfinished and stats None
        c = kvtrace.capture(model, p("wae.kvt"), window=W, decode=2, force=True)
        raised = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                with c:
                    generate(model, ids)
                    set_registry("sdpa", lambda *a, **k: before(*a, **k))
            except UserWarning as e:
                raised = e
        set_registry("sdpa", before)
        check(raised is not None and "replaced during the capture" in str(raised),
              "warnings as errors: the registry warning is raised (%r)" % (raised,))
        check(c.session is not None and c.session.closed and c.stats is not None,
              "warnings as errors: the session is closed all the same (stats %s)"
              % (c.stats is not None))
        with kvtrace.open(p("wae.kvt")) as t:
            check(t.verify()["ok"] and not t.recovered, "warnings as errors: the trace is finished")
    section(warnings_as_errors)

    def stale_forward():
        # torch < 2.0 shadows model.forward; a capture ending while another capture (or a
        # library) had wrapped it over ours left its wrapper in the chain, which still refused
        # uncaptured batches of 2 after both captures ended
        a = kvtrace.capture(model, p("sf1.kvt"), window=W, decode=2, force=True)
        b = kvtrace.capture(model, p("sf2.kvt"), window=W, decode=2, force=True)
        a.__enter__()
        b.__enter__()
        for x in (a, b):  # a ends first, under b's wrapper; neither saw a forward call
            try:
                x.__exit__(None, None, None)
            except kvtrace.TraceError:
                pass  # "nothing was captured"
        try:
            with torch.no_grad():
                model(torch.cat([ids, ids]))
            ok = True, ""
        except kvtrace.TraceError as e:
            ok = False, str(e)
        check(ok[0], "after two captures ended out of order, an uncaptured batch of 2 runs "
              "(%s)" % ok[1])
        model.__dict__.pop("forward", None)  # a's wrapper, which only passes calls on
    section(stale_forward)

    def paths_and_names():
        # refused by capture() itself, not after the model ran (before: "" and a folder path
        # passed, and the error came from the first forward call)
        expect_error(lambda: kvtrace.capture(model, ""), ["an empty path"], "path ''")
        expect_error(lambda: kvtrace.capture(model, os.path.join(tmp, "newdir") + os.sep),
                     ["names a directory"], "a path ending in /")
        # a name that is not text (os.fsdecode of a Latin-1 byte): refused up front; the
        # default name from such a folder is repaired
        expect_error(lambda: kvtrace.capture(model, p("nm.kvt"), name="caf\udce9"),
                     ["not valid Unicode"], "name with a lone surrogate", exc=kvtrace.TraceError)
        saved = getattr(model.config, "_name_or_path", None)
        for raw, want in (("/models/caf\udce9", "/models/caf\ufffd"),
                          ("/models/\ud800x", "/models/?x")):  # not os.fsdecode's: '?'
            model.config._name_or_path = raw
            try:
                with kvtrace.capture(model, p("nm.kvt"), window=W, decode=2, force=True):
                    generate(model, ids)
            finally:
                model.config._name_or_path = saved
            with kvtrace.open(p("nm.kvt")) as t:
                check(t.header["model"]["name"] == want, "a default name %r: %r (%r)"
                      % (raw, want, t.header["model"]["name"]))
        os.remove(p("nm.kvt"))
    section(paths_and_names)

    check(registry()["sdpa"] is before, "after the robustness checks: registry restored")

def check_plain_functions():
    ids = [1, 151652, 151655, 151655, 151653, 151656, 151656, 7]
    qwen = types.SimpleNamespace(image_token_id=151655, video_token_id=151656)
    check(list(hf.token_modality(ids, qwen)) == [0, 0, 1, 1, 0, 2, 2, 0],
          "token_modality: Qwen2-VL image/video token ids")
    check(list(hf.token_modality(torch.tensor([ids]), qwen)) == [0, 0, 1, 1, 0, 2, 2, 0],
          "token_modality: [1, T] tensor input")
    llava = types.SimpleNamespace(image_token_index=32000)
    check(list(hf.token_modality([1, 32000, 32000, 32000, 5], llava)) == [0, 1, 1, 1, 0],
          "token_modality: LLaVA image_token_index")
    inner = types.SimpleNamespace(image_token_id=9)
    outer = types.SimpleNamespace(get_text_config=lambda: inner)
    check(list(hf.token_modality([9, 8, 9], outer)) == [1, 0, 1],
          "token_modality: token id on the text config")
    check(not hf.token_modality([1, 2, 3], types.SimpleNamespace()).any(),
          "token_modality: no image/video ids -> all text")
    check(hf.token_modality([1, 2], qwen).dtype == np.uint8, "token_modality: uint8")

    n = 6
    p3 = torch.stack([torch.tensor([0, 1, 1, 1, 4, 5]), torch.tensor([0, 1, 1, 2, 4, 5]),
                      torch.tensor([0, 1, 2, 1, 4, 5])])[:, None, :]  # [3, 1, T]
    got = hf.mrope_positions(p3, n)
    check(got.shape == (3, n) and got.dtype == np.int32 and
          np.array_equal(got, p3[:, 0].numpy()), "mrope_positions: [3, B, T]")
    p4 = torch.cat([torch.arange(n)[None, None, :] + 100, p3], 0)  # row 0 = text positions
    check(np.array_equal(hf.mrope_positions(p4, n), p3[:, 0].numpy()),
          "mrope_positions: [4, B, T] -> the last three rows")
    check(np.array_equal(hf.mrope_positions(None, n), np.tile(np.arange(n), (3, 1))),
          "mrope_positions: None -> 0..T-1 on three rows")
    check(np.array_equal(hf.mrope_positions(torch.arange(n)[None] + 3, n),
                         np.tile(np.arange(n) + 3, (3, 1))),
          "mrope_positions: [B, T] -> the row three times")
    expect_error(lambda: hf.mrope_positions(p3, n + 1), ["cover 6 tokens", "has 7"],
                 "mrope_positions: wrong T")
    expect_error(lambda: hf.mrope_positions(torch.zeros(2, 1, n), n), ["[3, B, T]"],
                 "mrope_positions: 2 rows")
    mod = np.array([0, 1, 1, 1, 0, 0], np.uint8)
    flat = np.tile(np.arange(n, dtype=np.int32), (3, 1))
    note = hf.mrope_flat_note(flat, mod)
    check(note is not None and "3 image/video tokens" in note and "mm_token_type_ids" in note,
          "mrope_flat_note: vision tokens with flat positions: %r" % note)
    check(hf.mrope_flat_note(p3[:, 0].numpy(), mod) is None and
          hf.mrope_flat_note(flat, np.zeros(n, np.uint8)) is None and
          hf.mrope_flat_note(flat, None) is None,
          "mrope_flat_note: 3-D rows, text only or no table: no note")
    check(np.array_equal(hf.rope_positions(None, 4), np.arange(4)) and
          np.array_equal(hf.rope_positions(torch.tensor([[5, 6, 7]]), 3), [5, 6, 7]),
          "rope_positions: None and [B, T]")

    for v, ok in (("4.47.1", False), ("4.48.0", True), ("4.56.0-standin", True),
                  ("5.0.0.dev0", True), ("3.9", False), ("garbage", False)):
        try:
            hf.check_transformers_version(v)
            res = True
        except kvtrace.TraceError:
            res = False
        check(res == ok, "check_transformers_version(%r) %s" % (v, "accepted" if ok
                                                                  else "refused"))
    # Qwen2-VL / Qwen2.5-VL attention went through the registry from 4.53 on
    for v, mt, ok in (("4.52.4", "qwen2_vl", False), ("4.52.4", "qwen2_5_vl", False),
                      ("4.53.0", "qwen2_vl", True), ("5.0.0", "qwen2_5_vl", True),
                      ("4.52.4", "llama", True), ("4.48.0", "llava", True)):
        try:
            hf.check_transformers_version(v, mt)
            res, msg = True, ""
        except kvtrace.TraceError as e:
            res, msg = False, str(e)
        check(res == ok and (ok or ("4.53" in msg and mt in msg)),
              "check_transformers_version(%r, %r) %s: %s"
              % (v, mt, "accepted" if ok else "refused naming 4.53", msg))

    # RoPE scaling recorded beside model.rope: 4.x rope_scaling, 5.x rope_parameters
    ns = types.SimpleNamespace
    l31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    check(hf.rope_scaling_info(ns(rope_scaling=dict(l31), rope_theta=5e5)) == l31,
          "rope_scaling_info: 4.x llama3 rope_scaling")
    check(hf.rope_scaling_info(ns(rope_parameters=dict(l31, rope_theta=5e5))) == l31,
          "rope_scaling_info: 5.x rope_parameters without rope_theta")
    check(hf.rope_scaling_info(ns(rope_scaling={"type": "linear", "factor": 2.0})) ==
          {"rope_type": "linear", "factor": 2.0}, "rope_scaling_info: old 'type' key")
    check(all(hf.rope_scaling_info(c) is None for c in (
        ns(rope_scaling=None, rope_theta=1e4), ns(),
        ns(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        ns(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}))),
        "rope_scaling_info: plain RoPE and M-RoPE give None")

    def cfg(mt, text=None):
        tc = types.SimpleNamespace(model_type=text) if text else None
        c = types.SimpleNamespace(model_type=mt)
        if tc is not None:
            c.get_text_config = lambda: tc
        return c
    check(hf.check_model_type(cfg("qwen2_5_vl", "qwen2_5_vl_text")) ==
          ("qwen2_5_vl", "qwen2_5_vl_text"), "check_model_type: qwen2_5_vl")
    check(hf.check_model_type(cfg("llava", "mistral")) == ("llava", "mistral"),
          "check_model_type: llava + mistral")
    expect_error(lambda: hf.check_model_type(cfg("llava", "gemma")), ["gemma", "llama"],
                 "check_model_type: llava + gemma")
    expect_error(lambda: hf.check_model_type(cfg("gemma3")), ["'gemma3' is not supported"],
                 "check_model_type: gemma3")

    # vision towers are excluded
    class Attn(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            self.layer_idx = i
            self.q_proj = torch.nn.Linear(2, 2)

    class Block(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            self.self_attn = Attn(i)

    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.visual = torch.nn.ModuleList([Block(0), Block(1)])
    root.model.language_model = torch.nn.Module()
    root.model.language_model.layers = torch.nn.ModuleList([Block(0), Block(1), Block(2)])
    root.vision_tower = Block(0)
    found = hf.find_text_attention(root)
    check([n for n, _ in found] == ["model.language_model.layers.%d.self_attn" % i
                                    for i in range(3)],
          "find_text_attention: only the text layers (%s)" % [n for n, _ in found])


def check_rope_frequencies():
    """hf.find_rotary_emb and hf.rope_frequencies on stand-in modules."""
    D = 8
    rot = torch.nn.Module()
    rot.register_buffer("inv_freq", torch.tensor([1.0, 0.5, 0.25, 0.125]), persistent=False)
    rot.attention_scaling = 0.9
    text = types.SimpleNamespace(rotary_emb=rot)
    attn_rot = torch.nn.Module()
    attn_rot.register_buffer("inv_freq", torch.ones(4), persistent=False)
    attn = [("layers.0.self_attn", types.SimpleNamespace(rotary_emb=attn_rot))]
    check(hf.find_rotary_emb(text, attn) is rot and
          hf.find_rotary_emb(types.SimpleNamespace(), attn) is attn_rot and
          hf.find_rotary_emb(None, []) is None and
          hf.find_rotary_emb(types.SimpleNamespace(rotary_emb=None), []) is None,
          "find_rotary_emb: the text model's, else an attention module's, else None")
    inv, sc, note = hf.rope_frequencies(rot, D)
    check(inv.dtype == np.float64 and list(inv) == [1.0, 0.5, 0.25, 0.125] and sc == 0.9 and
          note is None, "rope_frequencies: float64 inv_freq and attention_scaling")
    rot16 = torch.nn.Module()
    rot16.register_buffer("inv_freq", torch.tensor([1.0, 0.1], dtype=torch.bfloat16))
    inv, sc, note = hf.rope_frequencies(rot16, 4)
    check(list(inv) == [1.0, float(torch.tensor(0.1, dtype=torch.bfloat16).double())] and
          sc == 0.0 and note is None,
          "rope_frequencies: a bf16 buffer's values; no attention_scaling: 0 (not recorded)")
    inv, sc, note = hf.rope_frequencies(rot, 16)
    check(inv is None and sc == 0.9 and "shape (4,), not [8]" in note,
          "rope_frequencies: a buffer of another size is not recorded (%s)" % note)
    check(hf.rope_frequencies(None, D) == (None, 0.0, None), "rope_frequencies: no module")


def check_tensor_view():
    """kvtrace.tensor_view: host tensors keep mem 0 / no stream; a CUDA tensor (faked here:
    only its attributes are read) gives mem 1, its device ordinal and torch's current stream
    for that device. Nothing is submitted."""
    x = torch.zeros(1, 5, 2, 4)  # [B, T, H, D] memory
    v, _ = kvtrace.tensor_view(x.transpose(1, 2)[:, :, 1:, :])  # [1, H, T-1, D] view
    check(v.mem == 0 and v.device_idx == 0 and not v.stream and v.ndim == 4 and
          list(v.shape) == [1, 2, 4, 4] and list(v.stride) == [40, 4, 8, 1] and
          v.data == x.data_ptr() + 8 * 4, "tensor_view: CPU tensor is a host view with strides "
          "(mem %d, stream %r, strides %s)" % (v.mem, v.stream, list(v.stride)))

    class FakeCudaTensor(object):
        device = torch.device("cuda", 1)
        dtype = torch.bfloat16
        shape = (1, 3, 7, 16)

        def data_ptr(self):
            return 0x7f0000001000

        def stride(self):
            return (336, 16, 48, 1)

    class FakeStream(object):
        cuda_stream = 0x5eed

    saved = torch.cuda.current_stream
    seen = []
    torch.cuda.current_stream = lambda device=None: seen.append(device) or FakeStream()
    try:
        v, _ = kvtrace.tensor_view(FakeCudaTensor())
    finally:
        torch.cuda.current_stream = saved
    check(v.mem == 1 and v.device_idx == 1 and v.stream == 0x5eed and
          v.data == 0x7f0000001000 and list(v.stride) == [336, 16, 48, 1] and
          v.dtype == 2 and seen and str(seen[0]) == "cuda:1",
          "tensor_view: CUDA tensor -> mem 1, device 1, the current stream of cuda:1, bf16, "
          "strides (mem %d, dev %d, stream %r, asked for %s)" % (v.mem, v.device_idx, v.stream,
                                                                 seen))


def main():
    print("transformers %s (%s), torch %s, library %s" % (
        transformers.__version__, "test stand-in" if STANDIN else "real", torch.__version__,
        kvtrace.lib_path()))
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import kvtrace; "
         "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
         % os.path.join(ROOT, "python")], capture_output=True, text=True)
    check(lazy.returncode == 0 and lazy.stdout.strip() == "[]",
          "import kvtrace imports neither torch nor transformers (%s%s)"
          % (lazy.stdout.strip(), lazy.stderr.strip()[-200:]))
    with tempfile.TemporaryDirectory() as tmp:
        check_plain_functions()
        check_tensor_view()
        if STANDIN:  # both conventions; the default style last, for what follows
            default = transformers.set_standin_style(4)
            for style in sorted({4, 5} - {default}) + [default]:
                transformers.set_standin_style(style)
                check_config_convention(style)
                check_capture("cpu", tmp, "cpu, stand-in %s" % transformers.__version__)
        else:
            check_capture("cpu", tmp)
        check_rope_frequencies()
        check_rope_details(tmp)
        check_errors_and_restore(tmp)
        check_robustness(tmp)
        if torch.cuda.is_available():
            check_capture("cuda", tmp)
        else:
            print("note: no CUDA device: the CUDA capture is not checked")
    if FAILS:
        print("%d check(s) failed" % len(FAILS))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
