#!/usr/bin/env python3
"""gpu_hf_check.py - the HF-transformers checks of issue #6 (a) and (b), for one short
device session (torch 2.x + transformers + CUDA; no network, no downloads: every model is
built here, from models/stories260K.bin or from random weights).

(a) stories260K as an HF LlamaForCausalLM (python/kvtrace/llama2c_hf.py: wq/wk rows permuted
    from llama2.c's interleaved RoPE pairs to HF's rotate_half halves), on the GPU in float32
    and in bfloat16:
    - prefill-only capture (decode=0): the logits are bit-identical with and without
      capture, and the trace's K/V are bit-identical to the model's own KV cache;
    - greedy generate from the sample trace's prompt (traces/samples/stories260K.kvt, T=448)
      with kvtrace.capture(window=W, decode=G) and max_new_tokens = G + 1 (the last
      generated token is never fed back, so G + 1 new tokens make G decode forwards, as the
      C engine's G decode steps): the raw logits of every step are bit-identical with and
      without capture; the decode tokens are forced to the trace's decode ids with a logits
      processor (output_logits are taken before processors, so the check of the free
      greedy choice still stands: float32 must pick the trace's ids itself, bf16 may not);
    - the captured trace equals the C engine's sample trace: K, Q_window, Q_decode,
      K_decode with their channels reordered by hf_channel_order, V, V_decode as they are,
      attn_colsum when both have it; token tables and header fields.
      Tolerance, relative to max|x| of the tensor: float32 1e-4 (as
      tests/oracle/test_python_capture_llama2c.py; TF32 is switched off). bfloat16:
      2^(l-5) at layer l (0-based). bf16 keeps 8 significant bits (unit roundoff
      u = 2^-8); layer 0's K/Q/V are one bf16 matmul of bf16-rounded weights and a
      bf16-rounded normalised input, rounded again on output, so they sit within a few u
      of f32; 2^-5 = 8u of max|x| leaves room for the attention (colsum) computed from
      them. The rounding of the residual stream then compounds layer by layer: a CPU
      emulation of this bf16 forward against f32 measured, worst kind per layer
      (attn_colsum, Q_decode included), 1.4%, 2.0%, 5.2%, 6.9%, 7.7% at layers 0..4,
      against 3.1%, 6.3%, 12.5%, 25%, 50% allowed (normalised RMS errors 0.4-5.6%, in the
      JSON). A wrong channel order, layer, token or head gives errors of 100% and more
      (132-172% for the K/Q of stories260K without the channel reordering).
(b) a randomly initialised tiny Qwen2VLForConditionalGeneration (2 text layers, hidden 128,
    M-RoPE sections [4, 6, 6]; a 2-block vision tower) with one 8x12-patch image:
    input_ids = text + vision_start + image_token_id x n + vision_end + text, n =
    grid_t*grid_h*grid_w / spatial_merge_size^2 = 24, pixel_values [96, 1176],
    image_grid_thw [[1, 8, 12]]; the trace marks exactly the image tokens as image, its
    positions table has 3 rows equal to the position ids the model's text rotary embedding
    received in prefill, to the model's own get_rope_index and to an independent NumPy
    implementation of the M-RoPE rule; the header says rope mrope; logits unchanged.
(llava) optional: a tiny random LlavaForConditionalGeneration (CLIP tower + Llama text):
    image tokens labelled, positions 1 row = 0..T-1, rope default.

Every step runs in try/except: a failure is recorded and the next step runs. Results go to
$OUT/gpu_hf_check.json (OUT defaults to /tmp/kvt_gpu_out; the only file written there), the
traces to --trace-dir (/tmp/kvt_gpu_traces); a summary is printed. Exit 0 when every check
passed, 1 otherwise.

usage: python3 scripts/gpu_hf_check.py [--only a,b,llava,selftest] [--device cuda]
                                      [--dtypes float32,bfloat16]
       python3 scripts/gpu_hf_check.py --only selftest     # CPU: the helpers, no transformers
"""
import argparse
import inspect
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

MODEL = os.path.join(ROOT, "models", "stories260K.bin")
SAMPLE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
PERMUTED_KINDS = ("K", "Q_window", "Q_decode", "K_decode", "Q_all")
TENSOR_KINDS = ("K", "V", "Q_window", "Q_decode", "K_decode", "V_decode", "attn_colsum")
F32_TOL = 1e-4


def f32_tol(layer):
    return F32_TOL


def bf16_tol(layer):
    """Allowed max|a-b| / max|b| at layer `layer` for a bf16 run against f32 (docstring)."""
    return 2.0 ** (int(layer) - 5)


# ------------------------------------------------------------------ report
class Report:
    def __init__(self):
        self.data = {"checks": [], "steps": {}, "env": {}, "started": time.time()}

    def check(self, name, ok, detail="", strict=True, **extra):
        detail = "" if detail is None else detail
        row = {"name": name, "ok": bool(ok), "strict": bool(strict), "detail": str(detail)}
        row.update(extra)
        self.data["checks"].append(row)
        tag = "ok" if ok else ("FAILED" if strict else "note")
        print("  %s: %s%s" % (tag, name, (" (" + str(detail) + ")") if detail != "" else ""),
              flush=True)
        return bool(ok)

    def step(self, name, fn, *a, **kw):
        print("== %s" % name, flush=True)
        t0 = time.time()
        try:
            out = fn(*a, **kw)
            self.data["steps"][name] = {"ok": True, "seconds": round(time.time() - t0, 3)}
            return out
        except Exception as e:  # record and go on
            tb = traceback.format_exc()
            self.data["steps"][name] = {"ok": False, "seconds": round(time.time() - t0, 3),
                                        "error": "%s: %s" % (type(e).__name__, e),
                                        "traceback": tb[-4000:]}
            print("  STEP FAILED: %s: %s\n%s" % (type(e).__name__, e, tb[-1500:]), flush=True)
            return None

    def failed(self):
        bad = [c["name"] for c in self.data["checks"] if c["strict"] and not c["ok"]]
        bad += ["step " + n for n, s in self.data["steps"].items() if not s["ok"]]
        return bad

    def save(self, path):
        self.data["seconds"] = round(time.time() - self.data["started"], 3)
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)

    def summary(self):
        c = self.data["checks"]
        n_ok = sum(1 for x in c if x["ok"])
        n_bad = sum(1 for x in c if x["strict"] and not x["ok"])
        n_note = sum(1 for x in c if not x["strict"] and not x["ok"])
        st = self.data["steps"]
        lines = ["checks: %d passed, %d failed, %d notes; steps: %d ran, %d failed"
                 % (n_ok, n_bad, n_note, len(st), sum(1 for s in st.values() if not s["ok"]))]
        for n in self.failed():
            lines.append("  FAILED: " + n)
        return "\n".join(lines)


# ------------------------------------------------------------------ helpers (CPU)
def rel_err(a, b):
    """max|a - b| / max|b| (inf when the shapes differ)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def rms_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def compare_traces(got, ref, order, tol_fn, kinds=TENSOR_KINDS):
    """Compare the per-layer tensors of two open traces. `got` is in HF channel order, `ref`
    in llama2.c order: for PERMUTED_KINDS the reference's last axis is reordered by `order`
    (HF channel c = llama2.c channel order[c]). Returns rows {kind, layer, err, rms, tol, ok}
    and, for kinds present in only one trace, a row with ok False and a note."""
    rows = []
    L = ref.header["model"]["n_layers"]
    for kind in kinds:
        in_got, in_ref = got.has(kind), ref.has(kind)
        if not in_got and not in_ref:
            continue
        if in_got != in_ref:
            rows.append({"kind": kind, "layer": None, "ok": False,
                         "note": "only in the %s trace" % ("captured" if in_got else "reference")})
            continue
        for l in range(L):
            a = got.read(kind, layer=l, dtype="float32")
            b = ref.read(kind, layer=l, dtype="float32")
            if kind in PERMUTED_KINDS and order is not None:
                b = b[..., order]
            e, r, t = rel_err(a, b), rms_err(a, b), tol_fn(l)
            rows.append({"kind": kind, "layer": l, "err": e, "rms": r, "tol": t,
                         "ok": e <= t, "shape": list(a.shape), "ref_shape": list(b.shape)})
    return rows


def summarize_rows(rows):
    bad = [r for r in rows if not r["ok"]]
    worst = max((r.get("err", 0.0) for r in rows), default=0.0)
    txt = "%d tensors, worst rel %.3g" % (len(rows), worst)
    if bad:
        txt += "; bad: " + ", ".join(
            "%s/L%s %s" % (r["kind"], r["layer"],
                           r.get("note") or "%.3g>%.3g" % (r.get("err", 0), r.get("tol", 0)))
            for r in bad[:6])
    return not bad, txt


def kv_from_cache(cache, layer):
    """(keys, values) [B, Hkv, T, D] of one layer from any transformers cache layout."""
    if hasattr(cache, "layers") and not isinstance(cache, (tuple, list)):
        lay = cache.layers[layer]
        if hasattr(lay, "keys") and not callable(lay.keys):
            return lay.keys, lay.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    if isinstance(cache, (tuple, list)) or hasattr(cache, "__getitem__"):
        kv = cache[layer]
        return kv[0], kv[1]
    # anything else: per-layer lists named like keys/values
    lists = {n: v for n, v in vars(cache).items() if isinstance(v, (list, tuple))}
    kn = [n for n in lists if "key" in n.lower()]
    vn = [n for n in lists if "value" in n.lower()]
    if len(kn) == 1 and len(vn) == 1:
        return lists[kn[0]][layer], lists[vn[0]][layer]
    raise TypeError("cannot read layer %d of a %s" % (layer, type(cache).__name__))


def n_image_tokens(grid_thw, merge):
    t, h, w = (int(x) for x in grid_thw)
    if h % merge or w % merge:
        raise ValueError("grid %s is not divisible by the merge size %d" % (grid_thw, merge))
    return t * h * w // (merge * merge)


def build_vl_ids(text_before, text_after, n_img, image_token_id, vision_start_id=None,
                 vision_end_id=None):
    """text + [vision_start] + image_token_id x n_img + [vision_end] + text, as int64."""
    seq = list(text_before)
    if vision_start_id is not None:
        seq.append(vision_start_id)
    seq += [image_token_id] * n_img
    if vision_end_id is not None:
        seq.append(vision_end_id)
    seq += list(text_after)
    return np.asarray(seq, dtype=np.int64)


def mrope_reference(ids, image_token_id, video_token_id, vision_start_id, image_grid_thw,
                    video_grid_thw, merge):
    """Qwen2-VL 3-D positions [3, T] by the published rule (own implementation): text
    tokens count up on all three rows; a vision block that starts after `s` earlier
    positions gets (s + t, s + h, s + w) over its (t, h/merge, w/merge) grid in t, h, w
    order; the text after it resumes at 1 + the block's largest position."""
    ids = np.asarray(ids).reshape(-1)
    T = len(ids)
    out = np.zeros((3, T), dtype=np.int64)
    img = list(image_grid_thw) if image_grid_thw is not None else []
    vid = list(video_grid_thw) if video_grid_thw is not None else []
    nxt = 0  # next text position
    i = 0
    while i < T:
        tok = int(ids[i])
        if tok in (image_token_id, video_token_id):  # a vision block: a run of its tokens
            grid = img.pop(0) if tok == image_token_id else vid.pop(0)
            t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
            n = t * h * w
            if np.any(ids[i:i + n] != tok):
                raise ValueError("vision block at %d shorter than its grid (%d tokens)" % (i, n))
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            blk = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + nxt
            out[:, i:i + n] = blk
            nxt = int(blk.max()) + 1
            i += n
        else:
            out[:, i] = nxt
            nxt += 1
            i += 1
    return out


def positions_3T(p):
    """A position-id tensor/array from the model as [rows, T] int64 NumPy: [3, B, T] or
    [4, B, T] (the text row first, dropped) give batch 0's three rows; a 2-D array is taken
    as [rows, T] as it is (a [1, T] batch of one, or an already batch-free [3, T]); [T] gives
    one row."""
    if hasattr(p, "detach"):
        p = p.detach().to("cpu").numpy()
    p = np.asarray(p)
    if p.ndim == 3:
        p = p[:, 0, :]
        if p.shape[0] == 4:  # newer versions prepend the text positions
            p = p[1:]
    elif p.ndim == 1:
        p = p[None, :]
    return p.astype(np.int64)


def stats_of(cap):
    """The capture's stats dict (set when its block ended), or {"stats": repr} without one."""
    s = getattr(cap, "stats", None)
    return s if isinstance(s, dict) else {"stats": repr(s)}


# ------------------------------------------------------------------ torch helpers
def torch_env(rep, device):
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception as e:
        info["transformers"] = "not importable: %s" % e
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import kvtrace
        info["kvtrace"] = kvtrace.__version__
        info["libkvtrace"] = kvtrace.lib_path()
    except Exception as e:
        info["kvtrace"] = "not importable: %s" % e
    # f32 means f32: no TF32 in matmuls or convolutions. torch >= 2.9 has fp32_precision
    # settings for this, deprecates the allow_tf32 flags and refuses a mix of the two: the new
    # ones where they exist
    def has(obj, name):  # torch < 2.9's cuBLAS module raises AssertionError, not AttributeError
        try:
            getattr(obj, name)
            return True
        except Exception:
            return False

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if has(matmul, "fp32_precision"):
        matmul.fp32_precision = "ieee"
        conv = getattr(cudnn, "conv", None)
        if conv is not None and has(conv, "fp32_precision"):
            conv.fp32_precision = "ieee"
        else:
            cudnn.allow_tf32 = False
        info["tf32_off"] = "fp32_precision = ieee"
    else:
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False
        info["tf32_off"] = "allow_tf32 = False"
    rep.data["env"].update(info)
    print("env: " + json.dumps(info), flush=True)
    return info


def supports_output_logits():
    try:
        from transformers import GenerationConfig
        return hasattr(GenerationConfig(), "output_logits")
    except Exception:
        return False


def make_force_processor(prompt_len, tokens):
    """A LogitsProcessor that makes step i (0-based after the prompt) emit tokens[i]; steps
    past the list are left alone."""
    import torch
    try:
        from transformers import LogitsProcessor
    except ImportError:
        from transformers.generation import LogitsProcessor

    class ForceTokens(LogitsProcessor):
        def __call__(self, input_ids, scores):
            i = input_ids.shape[1] - prompt_len
            if 0 <= i < len(tokens):
                forced = torch.full_like(scores, float("-inf"))
                forced[:, int(tokens[i])] = 0
                return forced
            return scores

    return ForceTokens()


def no_eos(model):
    """Generation must not stop early: the C engine never stops."""
    for obj in (getattr(model, "generation_config", None), model.config):
        if obj is None:
            continue
        try:
            obj.eos_token_id = None
        except Exception:
            pass
        try:
            if getattr(obj, "pad_token_id", None) is None:
                obj.pad_token_id = 0
        except Exception:
            pass


def generate(model, n_new, force=None, prompt_len=None, **inputs):
    """Greedy generate; returns (sequences [1, N] CPU, raw logits [steps, V] on device or
    None when this transformers has no output_logits)."""
    import torch
    try:
        from transformers import LogitsProcessorList
    except ImportError:
        from transformers.generation import LogitsProcessorList
    kw = dict(max_new_tokens=n_new, do_sample=False, return_dict_in_generate=True,
              num_beams=1, pad_token_id=0)
    if supports_output_logits():
        kw["output_logits"] = True
    else:
        kw["output_scores"] = True
    if force is not None:
        kw["logits_processor"] = LogitsProcessorList([make_force_processor(prompt_len, force)])
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    logits = getattr(out, "logits", None) if "output_logits" in kw else None
    if logits is not None:
        logits = torch.stack([x[0] for x in logits])
    return out.sequences.detach().cpu(), logits


def run_captured(model, path, fn, **opts):
    """fn() inside kvtrace.capture(model, path, **opts); returns (fn's result, stats)."""
    import kvtrace
    cap = kvtrace.capture(model, path, **opts)
    with cap:
        out = fn()
    return out, stats_of(cap)


def stored_bits(t, kv_name):
    """A torch tensor as the trace stores it: float32 values or bf16 bit patterns (uint16)."""
    import torch
    t = t.detach()
    if kv_name == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
    if kv_name == "f16":
        return t.to(torch.float16).cpu().numpy()
    return t.to(torch.float32).cpu().numpy()


def check_header(rep, tag, t, **want):
    h = t.header
    m = h.get("model", {})
    got = {"n_tokens": h.get("n_tokens"), "window": h.get("window"),
           "n_decode": h.get("n_decode"), "kv_dtype": h.get("kv_dtype"),
           "n_layers": m.get("n_layers"), "n_q_heads": m.get("n_q_heads"),
           "n_kv_heads": m.get("n_kv_heads"), "head_dim": m.get("head_dim"),
           "rope": (m.get("rope") or {}).get("type"),
           "rope_theta": (m.get("rope") or {}).get("theta")}
    bad = {k: (got.get(k), v) for k, v in want.items() if v is not None and got.get(k) != v
           and not (isinstance(v, float) and got.get(k) is not None
                    and abs(float(got.get(k)) - v) <= 1e-6 * abs(v))}
    rep.check("%s: header %s" % (tag, ", ".join("%s=%s" % kv for kv in want.items())), not bad,
              "mismatch (got, want): %s" % bad if bad else "")
    return got


def check_rope_details(rep, tag, t, model, mrope_section=None):
    """model.rope holds what kvtrace replay's expected-attention needs to undo RoPE: pairs
    "half", inv_freq equal to the text rotary embedding's own buffer (as doubles, exactly),
    attention_scaling as the module's, and M-RoPE's sections."""
    ro = (t.header.get("model") or {}).get("rope") or {}
    rot = None
    for name, mod in model.named_modules():  # the text decoder's, not a vision tower's
        if name.endswith("rotary_emb") and getattr(mod, "inv_freq", None) is not None \
                and "visual" not in name and "vision" not in name:
            rot = mod
            break
    want = None if rot is None else rot.inv_freq.detach().double().cpu().numpy()
    got = np.asarray(ro.get("inv_freq", []), np.float64)
    scaling = None if rot is None else getattr(rot, "attention_scaling", None)
    ok = (ro.get("pairs") == "half" and want is not None and got.shape == want.shape
          and bool(np.all(got == want))
          and (scaling is None or ro.get("attention_scaling") == float(scaling))
          and (mrope_section is None or ro.get("mrope_section") == list(mrope_section)))
    rep.check("%s: header model.rope pairs half, inv_freq == rotary_emb's%s" % (
        tag, ", mrope_section %s" % list(mrope_section) if mrope_section else ""), ok,
        "model.rope %s; module %s" % (json.dumps({k: v for k, v in ro.items() if k != "inv_freq"}),
                                      type(rot).__name__ if rot is not None else None))


def check_verify(rep, tag, path):
    import kvtrace
    v = kvtrace.verify(path)
    rep.check("%s: kvtrace.verify ok" % tag, v.get("ok"),
              "" if v.get("ok") else json.dumps({k: v[k] for k in v if k != "problems"})
              + " " + json.dumps(v.get("problems", [])[:3]))


# ------------------------------------------------------------------ (a) stories260K
def part_a(rep, args):
    import kvtrace
    from kvtrace import llama2c_hf

    ck = llama2c_hf.load_llama2c(MODEL)
    ref = kvtrace.open(SAMPLE)
    h = ref.header
    T, W, G = int(h["n_tokens"]), int(h["window"]), int(h.get("n_decode") or 0)
    D = int(h["model"]["head_dim"])
    prompt = np.asarray(ref.tokens["token_ids"], dtype=np.int64)
    decode = (np.asarray(ref.tokens["decode_token_ids"], dtype=np.int64) if G
              else np.zeros(0, np.int64))
    order = llama2c_hf.hf_channel_order(D)
    rep.data["a"] = {"T": T, "W": W, "G": G, "sample": SAMPLE}
    print("  sample: T=%d W=%d G=%d D=%d, order %s" % (T, W, G, D, order.tolist()), flush=True)
    for dtname, kvname, tol_fn in (("float32", "f32", f32_tol), ("bfloat16", "bf16", bf16_tol)):
        if dtname not in args.dtypes:
            continue
        rep.step("a/%s" % dtname, part_a_dtype, rep, args, ck, ref, prompt, decode, order,
                 dtname, kvname, tol_fn)
    ref.close()


def part_a_dtype(rep, args, ck, ref, prompt, decode, order, dtname, kvname, tol_fn):
    import torch
    import kvtrace
    from kvtrace import llama2c_hf

    tag = "a/" + dtname
    h = ref.header
    T, W, G = int(h["n_tokens"]), int(h["window"]), int(h.get("n_decode") or 0)
    L, Hq, Hkv, D = (int(h["model"][k]) for k in ("n_layers", "n_q_heads", "n_kv_heads",
                                                  "head_dim"))
    dev = args.device
    model = llama2c_hf.to_torch_model(ck, dtname, dev)
    no_eos(model)
    rep.check("%s: model uses sdpa" % tag,
              getattr(model.config, "_attn_implementation", None) == "sdpa",
              getattr(model.config, "_attn_implementation", None), strict=False)
    ids = torch.as_tensor(prompt[None, :], device=dev)
    am = torch.ones_like(ids)
    tdir = args.trace_dir
    os.makedirs(tdir, exist_ok=True)
    common = dict(window=W, kv_dtype=kvname, with_colsum=True, force=True)

    # ---- 1. prefill only
    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=am, use_cache=True)

    out0 = prefill()
    logits0 = out0.logits.detach().clone()
    kv0 = [tuple(x.detach().clone() for x in kv_from_cache(out0.past_key_values, l))
           for l in range(L)]
    del out0
    logits0b = prefill().logits.detach()
    det = torch.equal(logits0, logits0b)
    rep.check("%s: prefill is deterministic without capture" % tag, det, strict=False)
    p_pre = os.path.join(tdir, "a_%s_prefill.kvt" % dtname)
    try:
        out1, st = run_captured(model, p_pre, prefill, decode=0, **common)
    except Exception as e:
        rep.check("%s: prefill capture with colsum" % tag, False, "%s: %s; retrying without"
                  % (type(e).__name__, e))
        out1, st = run_captured(model, p_pre, prefill, decode=0,
                                **dict(common, with_colsum=False))
    rep.data.setdefault("stats", {})[tag + "/prefill"] = st
    rep.check("%s: prefill logits bit-identical with capture" % tag,
              torch.equal(out1.logits, logits0),
              "max |diff| %.3g" % (out1.logits.float() - logits0.float()).abs().max().item())
    del out1
    check_verify(rep, tag + " prefill", p_pre)
    t = kvtrace.open(p_pre)
    check_header(rep, tag + " prefill", t, n_tokens=T, window=W, n_decode=0, kv_dtype=kvname,
                 n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv, head_dim=D, rope="default",
                 rope_theta=10000.0)
    bad = []
    for l in range(L):
        for kind, x in (("K", kv0[l][0]), ("V", kv0[l][1])):
            want = stored_bits(x[0], kvname)
            got = t.read(kind, layer=l)
            if got.shape != want.shape or not np.array_equal(got, want):
                bad.append("%s/L%d" % (kind, l))
    rep.check("%s: prefill trace K/V bit-identical to the model's KV cache" % tag, not bad,
              ", ".join(bad[:8]))
    ok, txt = summarize_rows(compare_traces(t, ref, order, tol_fn, ("K", "V", "Q_window")))
    rep.check("%s: prefill trace vs C engine (K/Q reordered)" % tag, ok, txt)
    t.close()

    # ---- 2. generate with decode steps
    if G == 0:
        return
    n_new = G + 1
    inputs = dict(input_ids=ids, attention_mask=am)
    seq0, lg0 = generate(model, n_new, force=decode, prompt_len=T, **inputs)
    seq0b, lg0b = generate(model, n_new, force=decode, prompt_len=T, **inputs)
    if lg0 is not None:
        rep.check("%s: generate logits deterministic without capture" % tag,
                  torch.equal(lg0, lg0b), strict=False)
        free = lg0[:G].argmax(-1).cpu().numpy()
        agree = int((free == decode).sum())
        rep.check("%s: free greedy choice == C engine's decode ids" % tag, agree == G,
                  "%d of %d steps" % (agree, G), strict=(dtname == "float32"))
        rep.data.setdefault("a_greedy_agreement", {})[dtname] = agree
    p_gen = os.path.join(tdir, "a_%s_generate.kvt" % dtname)

    def gen():
        return generate(model, n_new, force=decode, prompt_len=T, **inputs)

    try:
        (seq1, lg1), st = run_captured(model, p_gen, gen, decode=G, **common)
    except Exception as e:
        rep.check("%s: generate capture with colsum" % tag, False, "%s: %s; retrying without"
                  % (type(e).__name__, e))
        (seq1, lg1), st = run_captured(model, p_gen, gen, decode=G,
                                       **dict(common, with_colsum=False))
    rep.data.setdefault("stats", {})[tag + "/generate"] = st
    rep.check("%s: generated %d tokens" % (tag, n_new), seq1.shape[1] == T + n_new,
              "sequence length %d" % seq1.shape[1])
    rep.check("%s: sequences equal with and without capture" % tag, torch.equal(seq0, seq1))
    if lg0 is not None and lg1 is not None:
        rep.check("%s: generate logits (all %d steps) bit-identical with capture" % (tag, n_new),
                  lg0.shape == lg1.shape and torch.equal(lg0, lg1),
                  "max |diff| %.3g" % ((lg0.float() - lg1.float()).abs().max().item()
                                       if lg0.shape == lg1.shape else float("inf")))
    check_verify(rep, tag + " generate", p_gen)
    t = kvtrace.open(p_gen)
    check_header(rep, tag + " generate", t, n_tokens=T, window=W, n_decode=G, kv_dtype=kvname,
                 n_layers=L, rope="default", rope_theta=10000.0)
    check_rope_details(rep, tag + " generate", t, model)
    tk = t.tokens
    rep.check("%s: token_ids == prompt" % tag, tk["token_ids"] is not None
              and np.array_equal(tk["token_ids"], prompt))
    rep.check("%s: decode_token_ids == C engine's" % tag, tk["decode_token_ids"] is not None
              and np.array_equal(tk["decode_token_ids"], decode))
    pos = tk["positions"]
    if pos is None:
        rep.check("%s: positions table present" % tag, False, "absent", strict=False)
    else:
        rep.check("%s: positions = 1 row 0..T-1" % tag, pos.shape == (1, T)
                  and np.array_equal(pos[0], np.arange(T)), "shape %s" % (pos.shape,))
    mod = tk["modality"]
    rep.check("%s: modality all text" % tag, mod is None or not np.any(mod), strict=False)
    rows = compare_traces(t, ref, order, tol_fn)
    ok, txt = summarize_rows(rows)
    rep.check("%s: generate trace vs C engine (all kinds, K/Q reordered)" % tag, ok, txt)
    rep.data.setdefault("a_errors", {})[dtname] = rows
    bad = []
    for l in range(L):
        for kind, x in (("K", kv0[l][0]), ("V", kv0[l][1])):
            if not np.array_equal(t.read(kind, layer=l), stored_bits(x[0], kvname)):
                bad.append("%s/L%d" % (kind, l))
    rep.check("%s: generate-trace prompt K/V == plain prefill's cache, bitwise" % tag,
              not bad, ", ".join(bad[:8]), strict=False)
    t.close()
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ (b) Qwen2-VL
QWEN_SPEC = dict(vocab=1024, image_token_id=1000, video_token_id=1001, vision_start_id=1002,
                 vision_end_id=1003, hidden=128, inter=256, layers=2, heads=4, kv_heads=2,
                 mrope_section=[4, 6, 6], rope_theta=10000.0, max_pos=4096,
                 v_depth=2, v_embed=64, v_heads=4, v_mlp_ratio=2, patch=14, tpatch=2, merge=2,
                 grid=(1, 8, 12), n_before=12, n_after=20, window=16, decode=6, seed=7)


def qwen2vl_inputs(spec):
    """NumPy inputs for one image: input_ids [1, T], attention_mask, pixel_values
    [t*h*w, 3*tpatch*patch*patch] (float32), image_grid_thw [1, 3], image mask, and
    mm_token_type_ids (0 text, 1 image)."""
    rng = np.random.default_rng(spec["seed"])
    n = n_image_tokens(spec["grid"], spec["merge"])
    before = rng.integers(3, 900, spec["n_before"])
    after = rng.integers(3, 900, spec["n_after"])
    ids = build_vl_ids(before, after, n, spec["image_token_id"], spec["vision_start_id"],
                       spec["vision_end_id"])
    t, hh, ww = spec["grid"]
    px = rng.standard_normal((t * hh * ww, 3 * spec["tpatch"] * spec["patch"] ** 2))
    img = ids == spec["image_token_id"]
    return {"input_ids": ids[None, :], "attention_mask": np.ones((1, len(ids)), np.int64),
            "pixel_values": px.astype(np.float32),
            "image_grid_thw": np.asarray([spec["grid"]], dtype=np.int64),
            "image_mask": img, "mm_token_type_ids": img.astype(np.int32)[None, :],
            "n_image_tokens": n}


def _rope_field(tc, key):
    """A RoPE setting of a text config: from the rope_parameters dict (transformers 5.x; its
    rope_scaling is an alias of it), the rope_scaling dict (4.x), else the attribute. None when
    absent. (mrope_section and rope_theta are read with kvtrace.hf._rope_params instead, as
    the capture reads them.)"""
    for attr in ("rope_parameters", "rope_scaling"):
        d = getattr(tc, attr, None)
        if isinstance(d, dict) and d.get(key) is not None:
            return d[key]
    return getattr(tc, key, None)


def make_qwen2vl_config(spec):
    from transformers import Qwen2VLConfig
    from kvtrace.hf import _rope_params
    text = dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                intermediate_size=spec["inter"], num_hidden_layers=spec["layers"],
                num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                max_position_embeddings=spec["max_pos"], rms_norm_eps=1e-6,
                tie_word_embeddings=False, use_sliding_window=False,
                max_window_layers=spec["layers"])
    vision = dict(depth=spec["v_depth"], embed_dim=spec["v_embed"], hidden_size=spec["hidden"],
                  num_heads=spec["v_heads"], mlp_ratio=spec["v_mlp_ratio"], in_channels=3,
                  patch_size=spec["patch"], spatial_merge_size=spec["merge"],
                  temporal_patch_size=spec["tpatch"])
    tok = dict(image_token_id=spec["image_token_id"], video_token_id=spec["video_token_id"],
               vision_start_token_id=spec["vision_start_id"],
               vision_end_token_id=spec["vision_end_id"])
    rs = {"type": "mrope", "mrope_section": list(spec["mrope_section"])}
    rp = {"rope_type": "default", "mrope_section": list(spec["mrope_section"]),
          "rope_theta": spec["rope_theta"]}
    variants = [
        ("flat + rope_scaling", dict(text, vision_config=vision, rope_theta=spec["rope_theta"],
                                     rope_scaling=dict(rs), **tok)),
        ("text_config + rope_scaling",
         dict(text_config=dict(text, rope_theta=spec["rope_theta"], rope_scaling=dict(rs)),
              vision_config=vision, **tok)),
        ("text_config + rope_parameters",
         dict(text_config=dict(text, rope_parameters=dict(rp)), vision_config=vision, **tok)),
    ]
    errors = []
    for name, kw in variants:
        try:
            c = Qwen2VLConfig(**kw)
        except Exception as e:
            errors.append("%s: %s: %s" % (name, type(e).__name__, e))
            continue
        tc = c.get_text_config() if hasattr(c, "get_text_config") else getattr(c, "text_config", c)
        vc = c.vision_config
        _, section, theta = _rope_params(tc)  # theta 0.0 when absent
        got = dict(hidden=getattr(tc, "hidden_size", None),
                   layers=getattr(tc, "num_hidden_layers", None),
                   vocab=getattr(tc, "vocab_size", None), section=section,
                   theta=theta or None,
                   # "mrope" must have become "default" (both 4.x and 5.x convert it): the
                   # rotary embedding looks any other type up in ROPE_INIT_FUNCTIONS
                   # (no type at all: the default)
                   rope_type=_rope_field(tc, "rope_type") or _rope_field(tc, "type") or "default",
                   image=getattr(c, "image_token_id", None),
                   v_embed=getattr(vc, "embed_dim", None),
                   v_hidden=getattr(vc, "hidden_size", None))
        want = dict(hidden=spec["hidden"], layers=spec["layers"], vocab=spec["vocab"],
                    section=list(spec["mrope_section"]), theta=float(spec["rope_theta"]),
                    rope_type="default", image=spec["image_token_id"],
                    v_embed=spec["v_embed"], v_hidden=spec["hidden"])
        if got != want:
            errors.append("%s: came out as %s" % (name, got))
            continue
        try:
            c._attn_implementation = "sdpa"
        except Exception:
            pass
        return c, name
    raise RuntimeError("no Qwen2VLConfig variant gave the tiny model: " + " | ".join(errors))


def find_text_model(model):
    import torch
    for name, m in model.named_modules():
        if "visual" in name or "vision" in name:
            continue
        if hasattr(m, "embed_tokens") and isinstance(getattr(m, "layers", None),
                                                       torch.nn.ModuleList):
            return name, m
    raise RuntimeError("no text decoder (a module with embed_tokens and layers) found")


def record_positions(text_model):
    """Hooks that record the position ids the text model's rotary embedding (else the text
    model itself) receives. Returns (records list, remove function)."""
    rec = {"rotary": [], "text_model": []}
    undo = []

    def hook(module, fn):
        try:
            undo.append(module.register_forward_pre_hook(fn, with_kwargs=True).remove)
        except TypeError:  # torch < 2.0: wrap the instance's forward instead
            orig = module.forward

            def forward(*args, **kwargs):
                fn(module, args, kwargs)
                return orig(*args, **kwargs)
            module.forward = forward
            undo.append(lambda: module.__dict__.pop("forward", None))

    rot = getattr(text_model, "rotary_emb", None)
    if rot is not None:
        def rot_hook(mod, args, kwargs):
            p = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            rec["rotary"].append(None if p is None else p.detach().cpu().clone())
        hook(rot, rot_hook)

    def tm_hook(mod, args, kwargs):
        p = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        rec["text_model"].append(None if p is None else p.detach().cpu().clone())
    hook(text_model, tm_hook)

    def remove():
        for u in undo:
            u()
    return rec, remove


def module_mentions(model, name):
    """Whether the source of the model's modeling module names `name` (an argument this
    version may take only through **kwargs)."""
    try:
        return name in inspect.getsource(sys.modules[type(model).__module__])
    except (KeyError, OSError, TypeError):
        return False


def call_get_rope_index(model, inp, torch_inputs):
    """The model's own get_rope_index, wherever this version keeps it, with the arguments
    its signature names (or, where it takes **kwargs, those its module mentions). Returns
    ([3, T] int64, where)."""
    for where, obj in (("model.model", getattr(model, "model", None)), ("model", model)):
        fn = getattr(obj, "get_rope_index", None) if obj is not None else None
        if fn is None:
            continue
        import torch
        params = inspect.signature(fn).parameters
        var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())

        def wants(k):
            return k in params or (var_kw and module_mentions(model, k))
        kw = {}
        for k in ("image_grid_thw", "video_grid_thw", "attention_mask"):
            if wants(k) and torch_inputs.get(k) is not None:
                kw[k] = torch_inputs.get(k)
        if wants("mm_token_type_ids"):  # newer versions: 0 text, 1 image, 2 video
            kw["mm_token_type_ids"] = torch.as_tensor(
                inp["mm_token_type_ids"], device=torch_inputs["input_ids"].device)
        pos = fn(torch_inputs["input_ids"], **kw)
        if isinstance(pos, (tuple, list)):
            pos = pos[0]
        return positions_3T(pos), where
    raise RuntimeError("no get_rope_index on model.model or model")


def accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def forward_wants(model, name):
    """Whether generate/forward should be given `name`: its forward names it, or takes
    **kwargs and the model's module uses it (transformers 5.x passes mm_token_type_ids that
    way; without it generate falls back to text positions, with no error)."""
    if accepts(model.forward, name):
        return True
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return (any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
            and module_mentions(model, name))


def part_b(rep, args):
    import torch
    import kvtrace
    from transformers import Qwen2VLForConditionalGeneration

    spec = dict(QWEN_SPEC)
    dev = args.device
    cfg, variant = make_qwen2vl_config(spec)
    rep.data["b"] = {"config_variant": variant, "spec": {k: (list(v) if isinstance(v, tuple)
                                                             else v) for k, v in spec.items()}}
    torch.manual_seed(spec["seed"])
    model = Qwen2VLForConditionalGeneration(cfg).to(dev, torch.float32).eval()
    no_eos(model)
    n_par = sum(p.numel() for p in model.parameters())
    rep.data["b"]["parameters"] = n_par
    rep.data["b"]["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    print("  Qwen2-VL tiny: %d parameters, config %s, attn %s" % (
        n_par, variant, rep.data["b"]["attn_implementation"]), flush=True)
    inp = qwen2vl_inputs(spec)
    T = inp["input_ids"].shape[1]
    tin = {"input_ids": torch.as_tensor(inp["input_ids"], device=dev),
           "attention_mask": torch.as_tensor(inp["attention_mask"], device=dev),
           "pixel_values": torch.as_tensor(inp["pixel_values"], device=dev),
           "image_grid_thw": torch.as_tensor(inp["image_grid_thw"], device=dev)}
    if forward_wants(model, "mm_token_type_ids"):
        tin["mm_token_type_ids"] = torch.as_tensor(inp["mm_token_type_ids"], device=dev)
    rep.data["b"]["inputs"] = {k: list(v.shape) for k, v in tin.items()}
    rep.data["b"]["T"] = T
    ref_pos = mrope_reference(inp["input_ids"][0], spec["image_token_id"],
                              spec["video_token_id"], spec["vision_start_id"],
                              inp["image_grid_thw"], None, spec["merge"])
    try:
        own, where = call_get_rope_index(model, inp, tin)
        rep.data["b"]["get_rope_index"] = where
        rep.check("b: model's get_rope_index (%s) == NumPy M-RoPE rule" % where,
                  np.array_equal(own, ref_pos), "shape %s" % (own.shape,), strict=False)
    except Exception as e:
        own = None
        rep.check("b: model's get_rope_index callable", False, "%s: %s" % (type(e).__name__, e))

    _, tm = find_text_model(model)
    G, W = spec["decode"], spec["window"]
    rec, remove = record_positions(tm)
    try:
        seq0, lg0 = generate(model, G + 1, **tin)
    finally:
        remove()
    seen = [p for p in (rec["rotary"] or rec["text_model"]) if p is not None]
    model_pos = positions_3T(seen[0]) if seen else None
    rep.check("b: the text model received 3-D position ids in prefill",
              model_pos is not None and model_pos.shape == (3, T),
              "shape %s via %s" % (None if model_pos is None else model_pos.shape,
                                   "rotary_emb" if rec["rotary"] else "text model"))
    if model_pos is not None:
        rep.check("b: prefill position ids == NumPy M-RoPE rule",
                  model_pos.shape == ref_pos.shape and np.array_equal(model_pos, ref_pos),
                  strict=False)
        img = inp["image_mask"].astype(bool)
        flat = model_pos.shape == (3, T) and all(
            np.array_equal(model_pos[r][img], model_pos[0][img]) for r in (1, 2))
        # the issue's check: the image tokens' positions are the model's 3-D ones; flat rows
        # mean the inputs lacked what this version needs for them (mm_token_type_ids)
        rep.check("b: the image tokens got 3-D position ids (rows h, w differ from t)",
                  not flat, "inputs %s" % sorted(tin))

    path = os.path.join(args.trace_dir, "b_qwen2vl.kvt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (seq1, lg1), st = run_captured(model, path, lambda: generate(model, G + 1, **tin),
                                   window=W, decode=G, force=True)
    rep.data.setdefault("stats", {})["b"] = st
    rep.check("b: sequences equal with and without capture", torch.equal(seq0, seq1))
    if lg0 is not None and lg1 is not None:
        rep.check("b: generate logits bit-identical with capture",
                  lg0.shape == lg1.shape and torch.equal(lg0, lg1))
    check_verify(rep, "b", path)
    t = kvtrace.open(path)
    check_header(rep, "b", t, n_tokens=T, window=W, n_decode=G, n_layers=spec["layers"],
                 n_q_heads=spec["heads"], n_kv_heads=spec["kv_heads"],
                 head_dim=spec["hidden"] // spec["heads"], rope="mrope")
    check_rope_details(rep, "b", t, model, spec["mrope_section"])
    tk = t.tokens
    rep.check("b: token_ids == input_ids", tk["token_ids"] is not None
              and np.array_equal(tk["token_ids"], inp["input_ids"][0]))
    mod = tk["modality"]
    want_mod = inp["image_mask"].astype(np.uint8)
    rep.check("b: modality marks exactly the %d image tokens" % inp["n_image_tokens"],
              mod is not None and np.array_equal(mod, want_mod),
              "none" if mod is None else "image at %s" % np.flatnonzero(mod == 1).tolist()[:4])
    pos = tk["positions"]
    rep.check("b: positions table has 3 rows", pos is not None and pos.shape == (3, T),
              None if pos is None else "shape %s" % (pos.shape,))
    if pos is not None and pos.shape == (3, T):
        if model_pos is not None:
            rep.check("b: trace positions == the model's prefill position ids",
                      np.array_equal(pos, model_pos))
        if own is not None:
            rep.check("b: trace positions == model's get_rope_index", np.array_equal(pos, own))
        rep.check("b: trace positions == NumPy M-RoPE rule", np.array_equal(pos, ref_pos),
                  strict=False)  # the model's own ids are the reference; this is a cross-check
    k = t.read("K", layer=0)
    rep.check("b: K shape [Hkv, T, D]", k.shape == (spec["kv_heads"], T,
                                                     spec["hidden"] // spec["heads"]),
              "shape %s" % (k.shape,))
    rep.check("b: only the text layers captured", t.layers("K") == list(range(spec["layers"])),
              str(t.layers("K")))
    rep.data["b"]["positions"] = None if pos is None else pos.tolist()
    t.close()


# ------------------------------------------------------------------ (llava) optional
LLAVA_SPEC = dict(vocab=1024, image_token=1000, hidden=128, inter=256, layers=2, heads=4,
                  kv_heads=2, v_hidden=64, v_inter=128, v_layers=2, v_heads=4, image_size=56,
                  patch=14, n_before=10, n_after=14, window=8, decode=4, seed=11)


def make_llava_config(spec):
    from transformers import LlavaConfig
    vision = dict(model_type="clip_vision_model", hidden_size=spec["v_hidden"],
                  intermediate_size=spec["v_inter"], num_hidden_layers=spec["v_layers"],
                  num_attention_heads=spec["v_heads"], image_size=spec["image_size"],
                  patch_size=spec["patch"], projection_dim=spec["v_hidden"])
    text = dict(model_type="llama", vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                intermediate_size=spec["inter"], num_hidden_layers=spec["layers"],
                num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                max_position_embeddings=1024)
    n_img = (spec["image_size"] // spec["patch"]) ** 2
    errors = []
    for key in ("image_token_index", "image_token_id"):
        try:
            c = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", image_seq_length=n_img,
                            projector_hidden_act="gelu", **{key: spec["image_token"]})
        except Exception as e:
            errors.append("%s: %s" % (key, e))
            continue
        tid = getattr(c, "image_token_id", getattr(c, "image_token_index", None))
        tc = c.text_config
        if tid == spec["image_token"] and tc.hidden_size == spec["hidden"] \
                and tc.num_hidden_layers == spec["layers"]:
            try:
                c._attn_implementation = "sdpa"
            except Exception:
                pass
            return c, n_img
        errors.append("%s: token %s hidden %s" % (key, tid, tc.hidden_size))
    raise RuntimeError("no LlavaConfig variant: " + " | ".join(errors))


def part_llava(rep, args):
    import torch
    import kvtrace
    from transformers import LlavaForConditionalGeneration

    spec = dict(LLAVA_SPEC)
    dev = args.device
    cfg, n_img = make_llava_config(spec)
    torch.manual_seed(spec["seed"])
    model = LlavaForConditionalGeneration(cfg).to(dev, torch.float32).eval()
    no_eos(model)
    rng = np.random.default_rng(spec["seed"])
    ids = build_vl_ids(rng.integers(3, 900, spec["n_before"]),
                       rng.integers(3, 900, spec["n_after"]), n_img, spec["image_token"])
    T = len(ids)
    tin = {"input_ids": torch.as_tensor(ids[None, :], device=dev),
           "attention_mask": torch.ones((1, T), dtype=torch.long, device=dev),
           "pixel_values": torch.randn(1, 3, spec["image_size"], spec["image_size"],
                                       device=dev)}
    G, W = spec["decode"], spec["window"]
    seq0, lg0 = generate(model, G + 1, **tin)
    path = os.path.join(args.trace_dir, "llava.kvt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (seq1, lg1), st = run_captured(model, path, lambda: generate(model, G + 1, **tin),
                                   window=W, decode=G, force=True)
    rep.data.setdefault("stats", {})["llava"] = st
    if lg0 is not None and lg1 is not None:
        rep.check("llava: generate logits bit-identical with capture", torch.equal(lg0, lg1))
    check_verify(rep, "llava", path)
    t = kvtrace.open(path)
    check_header(rep, "llava", t, n_tokens=T, window=W, n_decode=G, n_layers=spec["layers"],
                 n_kv_heads=spec["kv_heads"], rope="default")
    tk = t.tokens
    mod = tk["modality"]
    rep.check("llava: modality marks exactly the %d image tokens" % n_img,
              mod is not None
              and np.array_equal(mod, (ids == spec["image_token"]).astype(np.uint8)))
    pos = tk["positions"]
    rep.check("llava: positions 1 row 0..T-1", pos is not None and pos.shape == (1, T)
              and np.array_equal(pos[0], np.arange(T)),
              None if pos is None else "shape %s" % (pos.shape,))
    rep.check("llava: only the text layers captured", t.layers("K") == list(range(spec["layers"])),
              str(t.layers("K")))
    t.close()


# ------------------------------------------------------------------ selftest (CPU)
def selftest(rep, args):
    """The helpers above on CPU data, without transformers or a GPU."""
    import tempfile
    import kvtrace
    from kvtrace import llama2c_hf

    # M-RoPE rule: the worked example of HF's get_rope_index docstring (a 3x2x2 video grid
    # after merging, then 5 text tokens) and a text+image+text sequence
    ids = np.array([5] * 12 + [7] * 5)
    p = mrope_reference(ids, image_token_id=9, video_token_id=5, vision_start_id=-1,
                        image_grid_thw=None, video_grid_thw=[(3, 4, 4)], merge=2)
    want = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7],
                     [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 3, 4, 5, 6, 7],
                     [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 3, 4, 5, 6, 7]])
    rep.check("selftest: M-RoPE rule reproduces HF's docstring example", np.array_equal(p, want))
    # the video example starts at position 0 only because nothing precedes it; the image case
    spec = dict(QWEN_SPEC)
    inp = qwen2vl_inputs(spec)
    ids = inp["input_ids"][0]
    n = inp["n_image_tokens"]
    a = spec["n_before"] + 1
    ok = (n == 24 and inp["pixel_values"].shape == (96, 1176)
          and int(inp["image_mask"].sum()) == n and ids[a - 1] == spec["vision_start_id"]
          and ids[a + n] == spec["vision_end_id"] and np.all(ids[a:a + n] == spec["image_token_id"])
          and np.array_equal(inp["mm_token_type_ids"][0], inp["image_mask"].astype(np.int32)))
    rep.check("selftest: Qwen2-VL inputs (24 image tokens, pixel_values [96, 1176])", ok,
              "T=%d" % len(ids))
    p = mrope_reference(ids, spec["image_token_id"], spec["video_token_id"],
                        spec["vision_start_id"], inp["image_grid_thw"], None, spec["merge"])
    blk = p[:, a:a + n]
    ok = (np.array_equal(p[:, :a], np.tile(np.arange(a), (3, 1)))
          and np.all(blk[0] == a) and np.array_equal(blk[1], a + np.repeat(np.arange(4), 6))
          and np.array_equal(blk[2], a + np.tile(np.arange(6), 4))
          and p[0, a + n] == a + 6 and np.all(np.diff(p[:, a + n:], axis=1) == 1)
          and np.all(p[:, a + n] == p[0, a + n]))
    rep.check("selftest: M-RoPE positions of text + image(4x6) + text", ok,
              "image block t=%d, h %d..%d, w %d..%d; text after starts at %d"
              % (blk[0, 0], blk[1].min(), blk[1].max(), blk[2].min(), blk[2].max(), p[0, a + n]))
    rep.check("selftest: positions_3T", np.array_equal(
        positions_3T(np.stack([np.arange(5)[None]] * 4)), np.tile(np.arange(5), (3, 1)))
        and positions_3T(np.arange(5)[None]).shape == (1, 5))
    try:
        n_image_tokens((1, 7, 8), 2)
        rep.check("selftest: n_image_tokens rejects a grid not divisible by the merge", False)
    except ValueError:
        rep.check("selftest: n_image_tokens rejects a grid not divisible by the merge", True)
    rep.check("selftest: bf16 tolerance 2^(l-5)", bf16_tol(0) == 1 / 32 and bf16_tol(4) == 0.5)

    # compare_traces: the sample trace rewritten in HF channel order passes with the order,
    # fails without it; a perturbed copy fails at the perturbed layer only
    ref = kvtrace.open(SAMPLE)
    h = ref.header
    L, Hq, Hkv, D = (h["model"][k] for k in ("n_layers", "n_q_heads", "n_kv_heads", "head_dim"))
    T, W, G = h["n_tokens"], h["window"], h["n_decode"]
    order = llama2c_hf.hf_channel_order(D)
    with tempfile.TemporaryDirectory() as tmp:
        def rewrite(path, bump_layer=None):
            with kvtrace.CaptureSession(path, n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv,
                                        head_dim=D, n_tokens=T, window=W, n_decode=G,
                                        kv_dtype="f32", force=True) as s:
                s.set_tokens(token_ids=ref.tokens["token_ids"])
                for l in range(L):
                    k = ref.read("K", layer=l, dtype="float32")[..., order]
                    v = ref.read("V", layer=l, dtype="float32")
                    q = np.zeros((Hq, T, D), np.float32)
                    q[:, T - W:] = ref.read("Q_window", layer=l, dtype="float32")[..., order]
                    if l == bump_layer:
                        k = k.copy()
                        k[0, 3, 1] += 0.01 * np.abs(k).max()
                    s.submit_kv(l, 0, k, v)
                    s.submit_queries(l, 0, q)
                for l in range(L):
                    rd = lambda kind: ref.read(kind, layer=l, dtype="float32")  # noqa: E731
                    s.submit_decode(l, 0, rd("Q_decode")[..., order], rd("K_decode")[..., order],
                                    rd("V_decode"))
                for g in range(G):
                    s.submit_decode_token(g, int(ref.tokens["decode_token_ids"][g]))
        good = os.path.join(tmp, "hf_order.kvt")
        rewrite(good)
        t = kvtrace.open(good)
        kinds = ("K", "V", "Q_window", "Q_decode", "K_decode", "V_decode")
        ok1, txt1 = summarize_rows(compare_traces(t, ref, order, f32_tol, kinds))
        ok2, txt2 = summarize_rows(compare_traces(t, ref, None, f32_tol, kinds))
        rep.check("selftest: compare_traces passes an HF-ordered copy with the order", ok1, txt1)
        rep.check("selftest: compare_traces fails it without the order", not ok2, txt2)
        t.close()
        bumped = os.path.join(tmp, "bumped.kvt")
        rewrite(bumped, bump_layer=2)
        t = kvtrace.open(bumped)
        rows = compare_traces(t, ref, order, f32_tol, ("K",))
        bad = [(r["kind"], r["layer"]) for r in rows if not r["ok"]]
        rep.check("selftest: a 1%-of-max change at layer 2 is caught there only",
                  bad == [("K", 2)], str(bad))
        rows = compare_traces(t, ref, order, bf16_tol, ("K",))
        rep.check("selftest: ... and is inside the bf16 tolerance", all(r["ok"] for r in rows))
        rows = compare_traces(t, ref, order, f32_tol, ("K", "attn_colsum"))
        rep.check("selftest: a kind present in one trace only is reported",
                  any(r["kind"] == "attn_colsum" and not r["ok"] for r in rows))
        t.close()
    ref.close()

    # torch-only helpers (no transformers needed)
    try:
        import torch
    except Exception:
        return
    x = torch.randn(2, 3, 5, 8)
    bits = stored_bits(x, "bf16")
    back = kvtrace.bf16_to_f32(bits)
    rep.check("selftest: stored_bits bf16 == torch's bf16 rounding",
              np.array_equal(back, x.to(torch.bfloat16).float().numpy()))

    class C:  # the three cache layouts
        pass
    new, old = C(), C()
    new.layers = [C()]
    new.layers[0].keys, new.layers[0].values = x, x + 1
    old.key_cache, old.value_cache = [x], [x + 1]
    ok = all(torch.equal(kv_from_cache(c, 0)[1], x + 1) for c in (new, old, [(x, x + 1)]))
    rep.check("selftest: kv_from_cache handles .layers, .key_cache and tuples", ok)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="a,b,llava",
                    help="comma list of parts: a, b, llava, selftest (default a,b,llava)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="model dtypes of part a (default float32,bfloat16)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/kvt_gpu_out")
    ap.add_argument("--trace-dir", default="/tmp/kvt_gpu_traces",
                    help="where the captured traces go (default /tmp/kvt_gpu_traces: not under "
                         "$OUT, whose files the device tool returns only 8 of)")
    args = ap.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    os.makedirs(args.out, exist_ok=True)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    rep = Report()
    rep.data["parts"] = parts
    if any(p != "selftest" for p in parts):
        rep.step("env", torch_env, rep, args.device)
    runners = {"a": part_a, "b": part_b, "llava": part_llava, "selftest": selftest}
    for p in parts:
        if p not in runners:
            rep.check("unknown part %r" % p, False)
            continue
        os.makedirs(args.trace_dir, exist_ok=True)
        rep.step(p, runners[p], rep, args)
        rep.save(os.path.join(args.out, "gpu_hf_check.json"))
    rep.save(os.path.join(args.out, "gpu_hf_check.json"))
    print("\n" + rep.summary())
    print("results: %s" % os.path.join(args.out, "gpu_hf_check.json"))
    return 1 if rep.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
