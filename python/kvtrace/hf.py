"""hf.py - capture the KV cache of a HuggingFace transformers model while it generates.

    import kvtrace
    with kvtrace.capture(model, "out.kvt", window=32, decode=64) as cap:
        model.generate(**inputs, max_new_tokens=65, do_sample=False)  # 64 decode steps
    cap.stats                                   # the session's counters, after the block

What is recorded (text decoder layers only; vision towers are left alone):
  * K, V of the prompt [Hkv, T, D] and the last W prompt queries [Hq, W, D] of every layer,
    post-RoPE, as the model hands them to its attention function (GQA not expanded);
  * the first `decode` decode steps: the query, key and value of each new token, and its
    input token id; generation goes on after that, uncaptured;
  * per-token tables: prompt token ids, modality (image/video token ids from the config),
    position ids (3 rows per token for M-RoPE models: Qwen2-VL, Qwen2.5-VL);
  * in the header's model.rope: pairs "half" (every supported model rotates with
    transformers' rotate_half), the text rotary embedding's own frequencies (its inv_freq
    buffer, scaled RoPE included) and attention_scaling, and M-RoPE's mrope_section.

How: transformers (>= 4.48; for Qwen2-VL and Qwen2.5-VL >= 4.53) dispatches attention through
a registry, ALL_ATTENTION_FUNCTIONS ("sdpa", "flash_attention_2", ...). For the duration of the
block the model's entry is replaced by a wrapper that hands query/key/value of the text
attention modules to the C capture session (by data pointer, strides and, on a GPU, torch's
current stream: nothing is copied through Python memory) and then calls the original function,
unchanged; the name stays the same, so mask creation is untouched and the logits are those of
an uncaptured run. Forward pre-hooks on the model and on its text model see input_ids and
position_ids. The registry and the hooks are restored when the block ends, also on an exception.

Limits (each fails with a message saying so): batch size 1 (num_beams=1), no padding in the
attention mask, the prompt in one forward call (no chunked prefill, assisted decoding, or a
second generate call in the block), a dynamic cache (not a static one, nor use_cache=False,
which recomputes the whole sequence at every step), and an attention implementation from the
registry: a model loaded with attn_implementation="eager" must be loaded with "sdpa" (or
"flash_attention_2") instead.

kvtrace.hf.e2e(model, "results.json", "sel.bin", "e2e.json") is the end-to-end check of a
replay's proxies on the model (the kept sets as attention masks; _hf_e2e.py).

The plain functions token_modality, mrope_positions and rope_positions hold the table
logic; they take tensors or arrays and return NumPy arrays. Importing this module imports
neither torch nor transformers.
"""
import functools
import inspect
import json
import os
import re

import numpy as np

from ._capture import TORCH_DTYPES, _host_array, kv_dtype_code
from ._errors import TraceError
from ._lib import DTYPE_NAMES
from ._trace import C_INT, C_UINT32, int_arg, path_arg

MIN_TRANSFORMERS = (4, 48)
# model types whose attention classes went through the registry later than 4.48: Qwen2-VL and
# Qwen2.5-VL kept their own Qwen2VLSdpaAttention-style classes (torch's SDPA called directly)
# until transformers 4.53
MIN_TRANSFORMERS_BY_TYPE = {"qwen2_vl": (4, 53), "qwen2_5_vl": (4, 53)}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen2_vl", "qwen2_5_vl", "llava")
LLAVA_TEXT_TYPES = ("llama", "mistral", "qwen2")
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# module-name parts that mark a vision tower (its attention calls the same registry)
VISION_MARKERS = ("visual", "vision_tower", "vision_model")

_ERR_UNSUPPORTED = -13
_ERR_STATE = -9
_ERR_INVALID = -7
_ERR_IO = -1
_MISSING = object()
# the captures whose attention wrapper is in a registry now, in installation order
_INSTALLED = []


def _fail(msg, status=_ERR_UNSUPPORTED):
    return TraceError(status, "kvtrace.capture: " + msg)


def _int_option(value, name, ctype, lo=None, hi=None):
    """An integer option of capture(): TraceError (KVT_ERR_INVALID_ARG) naming it otherwise."""
    try:
        return int_arg(value, name, ctype, lo, hi)
    except (TypeError, ValueError) as e:
        raise _fail(str(e), _ERR_INVALID) from None


# ------------------------------------------------------------------------------------------
# plain functions (no torch needed)
# ------------------------------------------------------------------------------------------

def _np(x, dtype=None):
    if x is None:
        return None
    a = _host_array(x)  # a torch tensor copied to the host
    return a.astype(dtype) if dtype is not None else a


def _cfg_get(config, *names):
    """First attribute of `config` (then of its text config) among names that is not None."""
    cfgs = [config]
    try:
        tc = _text_config(config)
    except Exception:  # a get_text_config that raises: the config alone
        tc = None
    if tc is not None and tc is not config:
        cfgs.append(tc)
    for c in cfgs:
        for n in names:
            v = getattr(c, n, None)
            if v is not None:
                return v
    return None


def token_modality(input_ids, config):
    """Modality of each prompt token, [T] uint8: 1 (image) where the id is the config's image
    token (image_token_id; LLaVA's image_token_index), 2 (video) where it is video_token_id,
    0 (text) elsewhere. input_ids: [T] or [1, T] (tensor, array or list)."""
    ids = _np(input_ids, np.int64).reshape(-1)
    out = np.zeros(ids.shape[0], dtype=np.uint8)
    image = _cfg_get(config, "image_token_id", "image_token_index")
    video = _cfg_get(config, "video_token_id")
    if image is not None:
        out[ids == int(image)] = 1
    if video is not None:
        out[ids == int(video)] = 2
    return out


def mrope_positions(position_ids, n_tokens):
    """M-RoPE position ids [3, T] int32 (rows t, h, w) from what the text model received:
    None (text only: 0..T-1 on every row), [T] or [B, T] (the same row three times),
    [3, B, T], or [4, B, T] (transformers 5.x generate: the text positions in row 0, the three
    rotary rows after them, which the text model splits off). Batch row 0 is taken."""
    T = int(n_tokens)
    if position_ids is None:
        return np.tile(np.arange(T, dtype=np.int32), (3, 1))
    p = _np(position_ids, np.int64)
    if p.ndim == 1:
        p = np.tile(p[None, :], (3, 1))
    elif p.ndim == 2:
        p = np.tile(p[0:1, :], (3, 1))
    elif p.ndim == 3:
        if p.shape[0] == 4:
            p = p[1:]
        elif p.shape[0] != 3:
            raise _fail("M-RoPE position_ids of shape %s (want [3, B, T] or [4, B, T])"
                        % (tuple(p.shape),), _ERR_INVALID)
        p = p[:, 0, :]
    else:
        raise _fail("position_ids of shape %s" % (tuple(p.shape),), _ERR_INVALID)
    if p.shape[1] != T:
        raise _fail("position_ids cover %d tokens, the prompt has %d" % (p.shape[1], T),
                    _ERR_INVALID)
    return np.ascontiguousarray(p, dtype=np.int32)


def mrope_flat_note(positions, modality):
    """A note (str) when an M-RoPE prompt holds image or video tokens but its position ids
    [3, T] are the same on all three rows: the model was run without its 3-D positions
    (transformers 5.x's generate falls back to text positions, with no error, when the inputs
    lack mm_token_type_ids), so the trace records 1-D positions over the vision tokens. None
    otherwise (no vision tokens, no table, or 3-D rows)."""
    if positions is None or modality is None:
        return None
    p = np.asarray(positions)
    vis = np.asarray(modality) > 0
    if p.ndim != 2 or p.shape[0] != 3 or not vis.any():
        return None
    if np.array_equal(p[1], p[0]) and np.array_equal(p[2], p[0]):
        return ("the prompt holds %d image/video tokens but its M-RoPE position ids are the "
                "same on all three rows: the model ran with 1-D positions over them (pass "
                "mm_token_type_ids, or the processor's full output, to generate)"
                % int(vis.sum()))
    return None


def rope_positions(position_ids, n_tokens):
    """1-D RoPE position ids [T] int32: 0..T-1 when None, else row 0 of [B, T] (or [T])."""
    T = int(n_tokens)
    if position_ids is None:
        return np.arange(T, dtype=np.int32)
    p = _np(position_ids, np.int64)
    if p.ndim == 2:
        p = p[0]
    elif p.ndim == 3:  # an M-RoPE-shaped input to a 1-D model: the temporal row
        p = p[-3 if p.shape[0] == 4 else 0, 0]
    if p.ndim != 1 or p.shape[0] != T:
        raise _fail("position_ids of shape %s for a %d-token prompt"
                    % (tuple(_np(position_ids).shape), T), _ERR_INVALID)
    return np.ascontiguousarray(p, dtype=np.int32)


def _version_tuple(v):
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(v))
    if not m:
        return None
    return tuple(int(x) if x is not None else 0 for x in m.groups())


def _transformers_version(transformers):
    """The version of the transformers module in use (a function, so that a test can stand in
    an old one: transformers 5 keeps __version__ where assigning the module attribute does not
    reach every reader)."""
    return str(getattr(transformers, "__version__", "unknown"))


def check_transformers_version(version, model_type=None):
    """Raise TraceError if `version` (a transformers version string) is too old, for any model
    or, given `model_type`, for that model type (Qwen2-VL and Qwen2.5-VL need 4.53)."""
    t = _version_tuple(version)
    late = model_type in MIN_TRANSFORMERS_BY_TYPE
    need = MIN_TRANSFORMERS_BY_TYPE[model_type] if late else MIN_TRANSFORMERS
    if t is None or t[:2] < need:
        raise _fail("transformers %s is not supported%s: it needs transformers >= %d.%d (from "
                    "that version on, %s attention goes through the attention registry, "
                    "ALL_ATTENTION_FUNCTIONS)"
                    % (version, " for " + model_type if late else "", need[0], need[1],
                       model_type + "'s" if late else "text"))


def check_model_type(config):
    """(model_type, text_model_type) of a supported model; TraceError otherwise."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise _fail("model type %r is not supported (supported: %s)"
                    % (mt, ", ".join(SUPPORTED_MODEL_TYPES)))
    tc = _text_config(config)
    tmt = getattr(tc, "model_type", mt)
    if mt == "llava" and tmt not in LLAVA_TEXT_TYPES:
        raise _fail("LLaVA with a %r language model is not supported (supported: %s)"
                    % (tmt, ", ".join(LLAVA_TEXT_TYPES)))
    return mt, tmt


def _text_config(config):
    gt = getattr(config, "get_text_config", None)
    if callable(gt):
        tc = gt()
        if tc is not None:
            return tc
    return getattr(config, "text_config", None) or config


def _rope_params(tc):
    """(is_mrope, mrope_section or None, rope_theta) from a text config. transformers 4.x keeps
    rope_theta as an attribute and M-RoPE's mrope_section in the rope_scaling dict; 5.x keeps
    both in the rope_parameters dict (rope_scaling is an alias of it, a rope_theta keyword is
    converted into it, and there is no rope_theta attribute). The dict's rope_theta wins over
    an attribute: it is what 5.x's rotary embeddings read."""
    section = None
    theta = None
    for attr in ("rope_parameters", "rope_scaling"):
        d = getattr(tc, attr, None)
        if isinstance(d, dict):
            if section is None and d.get("mrope_section") is not None:
                section = list(d["mrope_section"])
            if theta is None and d.get("rope_theta") is not None:
                theta = d["rope_theta"]
    if theta is None:
        theta = getattr(tc, "rope_theta", None)
    return section is not None, section, float(theta) if theta is not None else 0.0


def rope_scaling_info(tc):
    """The text config's RoPE scaling as a JSON-safe dict ({"rope_type": "llama3", "factor":
    8.0, ...} for Llama 3.1), or None for plain RoPE: the trace's model.rope says "default"
    (or "mrope") and its theta, and this, recorded in the capture object, says how the
    frequencies were scaled. rope_parameters (5.x) or rope_scaling (4.x); rope_theta and
    mrope_section are left out (model.rope and capture.mrope_section hold them)."""
    for attr in ("rope_parameters", "rope_scaling"):
        d = getattr(tc, attr, None)
        if not isinstance(d, dict):
            continue
        kind = d.get("rope_type", d.get("type"))
        if kind in (None, "default", "mrope"):
            return None
        out = {}
        for k, v in d.items():
            if k in ("rope_theta", "mrope_section", "type"):
                continue
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError):
                v = repr(v)
            out[str(k)] = v
        out["rope_type"] = str(kind)
        return out
    return None


def find_rotary_emb(text_model, attn_modules=()):
    """The rotary embedding module of the text decoder: the text model's `rotary_emb` (Llama,
    Mistral, Qwen2, Qwen2-VL's and Qwen2.5-VL's language model, LLaVA's language model, in
    transformers 4.48 to 5.x), else one kept on a text attention module (some versions hold one
    there as well); None when neither has one."""
    for owner in [text_model] + [m for _, m in attn_modules][:1]:
        rot = getattr(owner, "rotary_emb", None) if owner is not None else None
        if rot is not None and getattr(rot, "inv_freq", None) is not None:
            return rot
    return None


def rope_frequencies(rotary, head_dim):
    """(inv_freq, attention_scaling, note) of a rotary embedding module, as the capture records
    them in model.rope: inv_freq, its `inv_freq` buffer as float64 [head_dim/2] (the model's
    own frequencies, scaled RoPE included; None without the module, or when the buffer has
    another shape: note then says why); attention_scaling, its `attention_scaling` attribute
    (the factor on cos and sin; 0.0 when absent: not recorded)."""
    if rotary is None:
        return None, 0.0, None
    scaling = getattr(rotary, "attention_scaling", None)
    try:
        scaling = float(scaling) if scaling is not None else 0.0
    except (TypeError, ValueError):
        scaling = 0.0
    if not (np.isfinite(scaling) and scaling >= 0.0):
        scaling = 0.0
    inv = _host_array(rotary.inv_freq).astype(np.float64)  # a bf16 buffer exactly, too
    n = int(head_dim) // 2
    if inv.shape != (n,):
        return None, scaling, ("%s.inv_freq has shape %s, not [%d] (head_dim / 2): the "
                               "frequencies are not recorded" % (type(rotary).__name__,
                                                                tuple(inv.shape), n))
    if not bool(np.all(np.isfinite(inv) & (inv >= 0.0))):
        return None, scaling, ("%s.inv_freq holds values that are not finite frequencies >= "
                               "0: the frequencies are not recorded" % type(rotary).__name__)
    return np.ascontiguousarray(inv), scaling, None


def _kv_dtype_of(tensor):
    """The trace dtype ("bf16", "f16", "f32") of a torch tensor's dtype. The capture reads
    float32, float16 and bfloat16 tensors only, whatever kv_dtype says."""
    name = str(tensor.dtype).replace("torch.", "")
    if name not in TORCH_DTYPES:
        raise _fail("attention tensors of dtype %s cannot be captured (float32, float16 or "
                    "bfloat16 only, whatever kv_dtype is): run the model in one of those, e.g. "
                    "model.to(torch.float32)" % name, _ERR_INVALID)
    return DTYPE_NAMES[TORCH_DTYPES[name]]


def _escapes_only(s):
    """Whether every lone surrogate in s is one os.fsdecode makes (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in s)


def _sliding_window(v):
    """A sliding window's size in tokens (an int >= 1), or 0 for none (None, False, 0)."""
    try:
        n = int(v) if v is not None and not isinstance(v, bool) else 0
    except (TypeError, ValueError):
        return 0
    return n if n > 0 else 0


def _cfg_int(tc, name):
    v = getattr(tc, name, None)
    if v is None:
        raise _fail("the text config (%s) has no %s: cannot tell the attention shape"
                    % (type(tc).__name__, name), _ERR_INVALID)
    return _int_option(v, "config." + name, C_INT, 1)


# ------------------------------------------------------------------------------------------
# the capture
# ------------------------------------------------------------------------------------------

def _is_vision_name(name):
    return any(m in name for m in VISION_MARKERS)


def find_text_attention(model):
    """[(name, module)] of the text decoder attention modules (having layer_idx and q_proj, not
    under a vision tower), sorted by layer_idx."""
    out = []
    for name, m in model.named_modules():
        if getattr(m, "layer_idx", None) is None or not hasattr(m, "q_proj"):
            continue
        if _is_vision_name(name):
            continue
        out.append((name, m))
    out.sort(key=lambda nm: int(nm[1].layer_idx))
    return out


def _find_text_model(model, attn_ids):
    """The module that owns the decoder `layers` holding the text attention modules."""
    import torch
    for _, m in model.named_modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and any(
                id(getattr(l, "self_attn", None)) in attn_ids for l in layers):
            return m
    return None


def _registry_of(attn_module):
    """The ALL_ATTENTION_FUNCTIONS object the attention module's forward looks up (a global of
    its modeling file); None when neither the forward nor its module refers to the registry
    (an attention class from before the registry); _MISSING when it cannot tell (a decorator
    that hides the function: the capture then checks at run time that calls arrive)."""
    fwd = inspect.unwrap(type(attn_module).forward)
    code = getattr(fwd, "__code__", None)
    if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
        return fwd.__globals__.get("ALL_ATTENTION_FUNCTIONS", _MISSING)
    mod = inspect.getmodule(type(attn_module))
    mod_vars = vars(mod) if mod is not None else {}
    if code is not None and "ALL_ATTENTION_FUNCTIONS" not in mod_vars and \
            getattr(fwd, "__module__", None) == type(attn_module).__module__:
        return None
    return _MISSING


def _registry_slot(registry, impl):
    """The dict that holds the function `registry[impl]` resolves to: a plain dict before
    transformers 4.51; an AttentionInterface (GeneralInterface) after: its instance-local
    mapping if it overrides impl, else the class-wide _global_mapping (what
    AttentionInterface.register updates)."""
    if isinstance(registry, dict):
        return registry if impl in registry else None
    local = getattr(registry, "_local_mapping", None)
    if isinstance(local, dict) and impl in local:
        return local
    glob = getattr(type(registry), "_global_mapping", None)
    if isinstance(glob, dict) and impl in glob:
        return glob
    return None


class _LayerState(object):
    __slots__ = ("prefilled", "n_decode_calls", "n_captured")

    def __init__(self):
        self.prefilled = False
        self.n_decode_calls = 0
        self.n_captured = 0  # decode steps submitted


class Capture(object):
    """The context manager returned by kvtrace.capture(). Attributes: path, session (the
    CaptureSession once the prompt arrived, else None), stats (dict, after the block),
    n_tokens (T), window (W), n_decode_steps (decode forward calls seen, captured or not),
    attn_implementation (the registry entry that is wrapped), info (what was found: layers,
    attention implementation, versions), partial_path (after the block, with force=True over
    an existing trace that was not replaced: the new trace's temporary file, else None)."""

    def __init__(self, model, path, *, window=32, decode=64, kv_dtype=None, with_colsum=False,
                 with_q_all=False, timeline=False, level=1, n_threads=0, force=False,
                 name=None, kvzip=None):
        try:
            import torch
        except ImportError as e:
            raise _fail("needs torch (%s)" % e)
        try:
            import transformers
        except ImportError as e:
            raise _fail("needs transformers (%s)" % e)
        self._torch = torch
        try:
            self.path = path_arg(path)[0]
        except (TypeError, ValueError) as e:
            raise _fail(str(e), _ERR_INVALID) from None
        p = os.fsdecode(self.path)
        if not p or p.endswith(os.sep):  # (an existing directory: refused on entering)
            raise _fail("cannot write %r: %s" % (p, "an empty path" if not p else
                                                 "it names a directory, not a trace file"),
                        _ERR_INVALID)
        out_dir = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(out_dir):
            raise _fail("cannot write %s: the directory %s does not exist"
                        % (self.path, os.fsdecode(out_dir)), _ERR_IO)
        self.window_requested = _int_option(window, "window", C_UINT32, 1)
        self.decode = _int_option(decode, "decode", C_UINT32, 0, 1 << 30)  # the C limit
        self.with_colsum = bool(with_colsum)
        self.with_q_all = bool(with_q_all)
        self.timeline = bool(timeline)
        self.level = _int_option(level, "level", C_INT)
        self.n_threads = _int_option(n_threads, "n_threads", C_INT)
        self.force = bool(force)
        if kv_dtype is not None:  # checked here, not at the first forward call
            try:
                kv_dtype = DTYPE_NAMES[kv_dtype_code(kv_dtype)]
            except (TypeError, ValueError) as e:
                raise _fail(str(e), _ERR_INVALID) from None
        if name is not None and "\0" in str(name):
            raise _fail("name %r contains a NUL character" % (name,), _ERR_INVALID)
        if name is not None:
            try:
                str(name).encode("utf-8")
            except UnicodeEncodeError:  # a surrogate (os.fsdecode of a non-UTF-8 name)
                raise _fail("name %r is not valid Unicode text: the trace's JSON header "
                            "holds it as UTF-8" % (name,), _ERR_INVALID) from None

        tv = _transformers_version(transformers)
        check_transformers_version(tv)
        config = getattr(model, "config", None)
        if config is None:
            raise _fail("%s has no .config: pass a transformers PreTrainedModel"
                        % type(model).__name__, _ERR_INVALID)
        self.model_type, self.text_model_type = check_model_type(config)
        check_transformers_version(tv, self.model_type)
        tc = _text_config(config)
        self._config = config

        attn = find_text_attention(model)
        if not attn:
            raise _fail("no text attention modules (with layer_idx and q_proj) in %s"
                        % type(model).__name__)
        n_layers = int(getattr(tc, "num_hidden_layers", len(attn)))
        idx = [int(m.layer_idx) for _, m in attn]
        if idx != list(range(n_layers)):
            raise _fail("found text attention layers %s, the config has %d layers"
                        % (idx, n_layers), _ERR_INVALID)
        self.n_layers = n_layers
        self._layer_of = {id(m): int(m.layer_idx) for _, m in attn}
        first = attn[0][1]
        mcfg = getattr(first, "config", None)
        if mcfg is None:
            mcfg = tc
        impl = getattr(mcfg, "_attn_implementation", None)
        if isinstance(impl, dict):  # a per-sub-config mapping: the text part
            impl = impl.get("text_config", impl.get("", None))
        self.attn_implementation = impl
        if impl is None or impl == "eager":
            raise _fail("the model uses attn_implementation=%r, which transformers does not "
                        "dispatch through its attention registry: load it with "
                        "attn_implementation=\"sdpa\" (or \"flash_attention_2\")" % (impl,))
        registry = _registry_of(first)
        if registry is None:
            raise _fail("%s.forward in transformers %s does not dispatch through the "
                        "attention registry (ALL_ATTENTION_FUNCTIONS): use a newer transformers"
                        % (type(first).__name__, tv))
        if registry is _MISSING:
            registry = getattr(inspect.getmodule(type(first)), "ALL_ATTENTION_FUNCTIONS", None)
        if registry is None:
            from transformers import modeling_utils
            registry = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
        slot = _registry_slot(registry, impl) if registry is not None else None
        if slot is None:
            raise _fail("attention implementation %r is not in transformers' attention "
                        "registry: load the model with attn_implementation=\"sdpa\" (or "
                        "\"flash_attention_2\")" % (impl,))
        self._slot = slot

        self.n_q_heads = _cfg_int(tc, "num_attention_heads")
        self.n_kv_heads = (_cfg_int(tc, "num_key_value_heads")
                           if getattr(tc, "num_key_value_heads", None) else self.n_q_heads)
        # the attention module's own head size first: Qwen2-VL's text attention uses
        # hidden_size // num_attention_heads whatever the config's head_dim says
        hd = getattr(first, "head_dim", None) or getattr(tc, "head_dim", None)
        self.head_dim = int(hd) if hd else _cfg_int(tc, "hidden_size") // self.n_q_heads
        # a float64 model: its attention tensors cannot be captured (any kv_dtype); say so
        # now, not in the first forward call (float8 weights compute in a wider dtype)
        wdt = getattr(getattr(getattr(first, "q_proj", None), "weight", None), "dtype", None)
        if wdt is not None and str(wdt) == "torch.float64":
            raise _fail("the model runs in float64: the capture takes float32, float16 or "
                        "bfloat16 attention tensors only (whatever kv_dtype is): convert the "
                        "model, e.g. model.to(torch.float32)", _ERR_INVALID)
        self.mrope, self.mrope_section, self.rope_theta = _rope_params(tc)
        if self.model_type in MROPE_MODEL_TYPES and not self.mrope:
            raise _fail("%s config has no mrope_section in rope_scaling/rope_parameters"
                        % self.model_type, _ERR_INVALID)
        if self.mrope:
            ok = len(self.mrope_section) == 3
            try:
                self.mrope_section = [int_arg(v, "mrope_section", C_INT, 0)
                                      for v in self.mrope_section]
            except (TypeError, ValueError):
                ok = False
            if not ok or sum(self.mrope_section) != self.head_dim // 2:
                raise _fail("the config's mrope_section %s is not 3 integers >= 0 summing to "
                            "head_dim / 2 = %d" % (self.mrope_section, self.head_dim // 2),
                            _ERR_INVALID)
        self.kv_dtype = kv_dtype  # None: the attention tensors' dtype, at the first call
        self.name = name or getattr(config, "_name_or_path", None) or type(model).__name__
        # the default name: a path from a non-UTF-8 folder holds surrogates; they become U+FFFD
        self.name = str(self.name).encode("utf-8", "surrogateescape" if _escapes_only(
            str(self.name)) else "replace").decode("utf-8", "replace")

        self._kvzip = None
        self._kvzip_info = None
        if kvzip is not None:  # [L, Hkv, T] from kvzip_scores(); T is checked at the prompt
            info = getattr(kvzip, "kvzip_info", None)  # how kvzip_scores made them
            self._kvzip_info = dict(info) if isinstance(info, dict) else None
            self._kvzip = np.ascontiguousarray(_host_array(kvzip), dtype=np.float32)
            if self._kvzip.ndim != 3 or self._kvzip.shape[:2] != (n_layers, self.n_kv_heads):
                raise _fail("kvzip: shape %s, not [%d layers, %d KV heads, T tokens] (the "
                            "scores of kvtrace.hf.kvzip_scores)"
                            % (self._kvzip.shape, n_layers, self.n_kv_heads), _ERR_INVALID)
        self._model = model
        self._text_model = _find_text_model(model, set(self._layer_of))
        self._attn = attn
        self.info = {
            "transformers_version": str(tv),
            "torch_version": str(torch.__version__),
            "attn_implementation": impl,
            "model_class": type(model).__name__,
            "model_type": self.model_type,
            "text_model_type": self.text_model_type,
            "text_attention_class": type(first).__name__,
            "text_attention_modules": [n for n, _ in attn],
            "text_model": type(self._text_model).__name__ if self._text_model is not None
            else None,
        }
        scaling = rope_scaling_info(tc)
        if scaling is not None:
            self.info["rope_scaling"] = scaling
        # run state
        self.session = None
        self.stats = None
        self.n_tokens = None
        self.window = None
        self.n_decode_steps = 0
        self._state = None
        self._entered = False
        self._installed = False
        self._handles = []
        self._saved_forward = []
        self._orig_fn = None
        self._wrapper = None
        self._prompt_ids = None
        self._prompt_pos = None
        self._decode_tokens = {}  # decode step -> input token id, until the step is captured
        self.partial_path = None
        self._n_text_forward = 0
        self._n_model_forward = 0
        self._no_cache = False  # the last forward call ran without a KV cache (use_cache=False)

    # ---- installation ----
    def __enter__(self):
        if self._entered:
            raise _fail("a capture object can be used for one with-block only", _ERR_STATE)
        self._entered = True
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            # a directory, FIFO or device is never replaced (the C writer refuses it too, but
            # only at the first forward call, with the model already running)
            raise _fail("%s exists and is not a regular file: refusing to replace it"
                        % self.path, _ERR_IO)
        if os.path.exists(self.path) and not self.force:
            raise _fail("%s exists (pass force=True to overwrite it)" % self.path, _ERR_IO)
        self._reserve_device()
        try:
            self._install()
        except BaseException:
            # __exit__ does not run when __enter__ raises: let go of the reservation here
            self._release_device()
            raise
        return self

    def _reserve_device(self):
        """A model on a CUDA device: its capture's device ring and pinned host memory are
        allocated now, not in the first forward pass (pinning the 1 GiB took about 0.5 s on an
        H200 machine). Where that fails, the session allocates them itself when it opens, and
        says why it cannot."""
        self._reserved = False
        try:
            p = next(self._model.parameters())
        except (AttributeError, StopIteration, TypeError):
            return
        dev = getattr(p, "device", None)
        if getattr(dev, "type", None) != "cuda":
            return
        from . import _lib
        L = _lib.lib()
        idx = dev.index if dev.index is not None else self._torch.cuda.current_device()
        if L.kvt_capture_reserve_device(int(idx), 0, 0) == 0:
            self._reserved = True
        else:
            L.kvt_error_clear()

    def _release_device(self):
        """A reservation the session did not take (no forward pass, or an error before it)."""
        if getattr(self, "_reserved", False):
            from . import _lib
            _lib.lib().kvt_capture_release_device_reserve()
            self._reserved = False

    def _install(self):
        orig = self._slot[self.attn_implementation]
        cap = self

        @functools.wraps(orig)
        def kvtrace_attention(module, *args, **kwargs):
            # the registry's convention: (module, query, key, value, attention_mask, **kw);
            # the call is passed on exactly as it came. Once its capture has ended (a wrapper
            # left in the registry by overlapping captures), it only passes calls on.
            if cap._installed and id(module) in cap._layer_of:
                qkv = list(args[:3])
                for n in ("query", "key", "value")[len(qkv):]:
                    qkv.append(kwargs.get(n))
                cap._on_attention(module, qkv[0], qkv[1], qkv[2], kwargs)
            return cap._orig_fn(module, *args, **kwargs)

        self._orig_fn = orig
        self._wrapper = kvtrace_attention
        self._slot[self.attn_implementation] = kvtrace_attention
        self._installed = True
        _INSTALLED.append(self)
        try:
            self._add_pre_hook(self._model, self._on_model_forward)
            if self._text_model is not None:
                self._add_pre_hook(self._text_model, self._on_text_forward)
        except BaseException:
            self._uninstall()
            raise

    def _add_pre_hook(self, module, fn):
        try:
            h = module.register_forward_pre_hook(fn, with_kwargs=True)  # torch >= 2.0
            self._handles.append(h)
            return
        except TypeError:
            pass
        # torch < 2.0: no kwargs in pre-hooks; shadow the instance's forward instead
        prev = module.__dict__.get("forward", _MISSING)
        bound = module.forward

        @functools.wraps(bound)
        def forward(*args, **kwargs):
            fn(module, args, kwargs)
            return bound(*args, **kwargs)

        module.__dict__["forward"] = forward
        self._saved_forward.append((module, prev, forward))

    def _uninstall(self):
        if not self._installed:
            return
        self._installed = False
        if self in _INSTALLED:
            _INSTALLED.remove(self)
        try:
            if self._slot.get(self.attn_implementation) is self._wrapper:
                self._slot[self.attn_implementation] = self._orig_fn
            else:
                # overlapping captures ending out of order: a later capture's wrapper calls
                # ours; it now calls what ours called, and ours leaves the chain
                later = [c for c in _INSTALLED if c._orig_fn is self._wrapper]
                if later:
                    later[0]._orig_fn = self._orig_fn
                else:
                    import warnings
                    warnings.warn("kvtrace.capture: the attention registry entry %r was "
                                  "replaced during the capture; left as it is (the capture's "
                                  "wrapper in it only passes calls on)"
                                  % self.attn_implementation)
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            for module, prev, ours in reversed(self._saved_forward):
                if module.__dict__.get("forward") is ours:
                    if prev is _MISSING:
                        del module.__dict__["forward"]
                    else:
                        module.__dict__["forward"] = prev
            self._saved_forward = []
            # a wrapper left in the registry (another wrapper was put over ours) only passes
            # calls on, but it holds this capture: let go of the model (its weights) here
            self._model = self._text_model = self._attn = None
            self._layer_of = {}

    def __exit__(self, et, ev, tb):
        try:
            self._uninstall()  # may warn: with warnings as errors, that raises
        finally:
            try:
                self._end_session(et)
            finally:
                self._release_device()
        return False

    def _end_session(self, et):
        s = self.session
        if s is None:
            if et is None:
                n_fwd = max(self._n_text_forward, self._n_model_forward)
                if n_fwd:
                    raise _fail("the model ran %d time(s) but its text attention modules never "
                                "called the registry entry %r: this model or transformers "
                                "version does not dispatch attention through "
                                "ALL_ATTENTION_FUNCTIONS" % (n_fwd, self.attn_implementation))
                raise _fail("nothing was captured: no forward pass of the model's text layers "
                            "ran inside the with-block", _ERR_STATE)
            return False
        err = None
        if self._kvzip is not None and et is None:
            try:  # refused (a score outside [0, 1]): the trace is closed without them
                for layer in range(self.n_layers):
                    s.submit_kvzip(layer, self._kvzip[layer])
            except TraceError as e:
                err = e
        try:
            self.stats = s.close()
            if err is not None:
                raise err
        except TraceError:
            if et is None:
                raise
            # the block's own exception matters more; the trace holds what was submitted
        finally:
            # force=True over an existing trace, not finished complete: the old trace is
            # unchanged, the new one is there (the session warned, RuntimeWarning)
            self.partial_path = s.partial_path
        return False

    # ---- hooks ----
    def _note_cache(self, module, kwargs):
        """Whether this forward call runs without a KV cache: use_cache=False (given, or the
        config's default that transformers falls back on) and no past_key_values."""
        uc = kwargs.get("use_cache", None)
        if uc is None:
            uc = getattr(getattr(module, "config", None), "use_cache", None)
        self._no_cache = (uc is not None and not bool(uc) and
                          kwargs.get("past_key_values", None) is None)

    def _on_model_forward(self, module, args, kwargs):
        if not self._installed:  # a wrapper left on the model (torch < 2.0): passes calls on
            return
        torch = self._torch
        self._n_model_forward += 1
        self._note_cache(module, kwargs)
        ids = kwargs.get("input_ids", None)
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is not None and not isinstance(ids, torch.Tensor):
            ids = None
        if self.session is None:
            if ids is not None:
                if ids.dim() == 2 and ids.shape[0] != 1:
                    raise _fail("batch size %d: one sequence only (batch size 1, num_beams=1, "
                                "num_return_sequences=1)" % ids.shape[0])
            am = kwargs.get("attention_mask", None)
            if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[0] == 1 and \
                    bool((am == 0).any()):
                raise _fail("the attention mask has padding: pass the prompt unpadded")
            # small tables, copied to the host here, before this call's GPU work is queued
            self._prompt_ids = _np(ids, np.int64).reshape(-1) if ids is not None else None
            # position ids: the text model's own (its pre-hook, later in this call) where
            # there is one, else the model's
            if self._text_model is None:
                self._prompt_pos = _np(kwargs.get("position_ids", None), np.int64)
            return
        # after the prompt: a decode step (one new token) gives its input token id
        if ids is None:
            return
        if ids.shape[-1] != 1:
            return  # a multi-token call: the attention wrapper says why it is refused
        g = self.n_decode_steps
        self.n_decode_steps += 1
        if g < self.decode:  # recorded once every layer has captured step g
            self._decode_tokens[g] = int(ids.reshape(-1)[-1])

    def _on_text_forward(self, module, args, kwargs):
        if not self._installed:
            return
        self._n_text_forward += 1
        if "use_cache" in kwargs or "past_key_values" in kwargs:
            self._note_cache(module, kwargs)
        if self.session is None:
            self._prompt_pos = _np(kwargs.get("position_ids", None), np.int64)

    # ---- the attention wrapper's work ----
    def _on_attention(self, module, query, key, value, kwargs):
        layer = self._layer_of[id(module)]
        if query.shape[0] != 1 or key.shape[0] != 1:
            raise _fail("batch size %d: one sequence only (batch size 1, num_beams=1, "
                        "num_return_sequences=1)" % max(query.shape[0], key.shape[0]))
        q_len, k_len = int(query.shape[-2]), int(key.shape[-2])
        if self.session is None:
            if k_len != q_len:
                raise _fail("the first attention call saw %d keys for %d queries: the cache "
                            "already held tokens (past_key_values passed in) or is a static "
                            "cache; capture needs a fresh dynamic cache" % (k_len, q_len))
            self._open(module, query, key, kwargs)
        st = self._state[layer]
        T = self.n_tokens
        sliding = _sliding_window(kwargs.get("sliding_window", None)) or \
            _sliding_window(getattr(module, "sliding_window", None))
        if not st.prefilled:
            if q_len != T or k_len != T:
                raise _fail("layer %d: a prompt split over several forward calls (%d queries, "
                            "%d keys; the first call had %d tokens): chunked prefill is not "
                            "supported" % (layer, q_len, k_len, T))
            # a query at position p sees the keys (p - sliding, p]: all of the prompt's only
            # while T <= sliding, and a decode step g's only while T + g + 1 <= sliding.
            # The replay computes full causal attention, so a prompt past the window is
            # refused, and decode steps stop where the window starts to hide keys
            if sliding and T > sliding:
                raise _fail("layer %d attends through a sliding window of %d tokens, shorter "
                            "than the %d-token prompt: the replay computes full causal "
                            "attention, so its recall and errors would not be this model's; "
                            "capture a prompt of at most %d tokens" % (layer, sliding, T,
                                                                       sliding))
            if sliding and self.decode > sliding - T:
                import warnings
                warnings.warn("kvtrace.capture: layer %d attends through a sliding window of %d "
                              "tokens: %d of the %d decode steps are captured (a later step's "
                              "window no longer holds the whole prompt)"
                              % (layer, sliding, sliding - T, self.decode), stacklevel=2)
                self.decode = sliding - T
            s = self.session
            s.submit_kv(layer, 0, key, value)
            qb = 0 if (self.with_colsum or self.with_q_all) else T - self.window
            s.submit_queries(layer, qb, query[:, :, qb:, :])
            st.prefilled = True
            return
        if q_len != 1:
            if self._no_cache:
                raise _fail("layer %d: a %d-token forward call after the prompt, without a KV "
                            "cache: the model runs with use_cache=False, so every step "
                            "recomputes the whole sequence; the capture needs the KV cache: "
                            "generate with use_cache=True (the default)" % (layer, q_len))
            raise _fail("layer %d: a %d-token forward call after the prompt: a chunked prefill, "
                        "assisted/speculative decoding or a second generate call inside one "
                        "capture block is not supported%s" % (layer, q_len, (
                            " (its %d keys are all its own: no cache held the prompt, as with a "
                            "second prompt or a model run with use_cache=False)" % k_len
                            if k_len == q_len else "")))
        g = st.n_decode_calls
        st.n_decode_calls += 1
        # checked at every step, also past the captured ones: a second generate (a 1-token
        # prompt has a fresh cache) is refused as documented, whenever it comes
        if k_len > T + g + 1:
            raise _fail("layer %d decode step %d: %d keys in the cache, expected %d (a static "
                        "cache is not supported)" % (layer, g, k_len, T + g + 1))
        want = T + g + 1
        if sliding:  # the cache keeps the last sliding_window - 1 (or sliding_window) tokens
            want = min(want, max(1, sliding - 1))
        if k_len < want:
            raise _fail("layer %d: a 1-token forward call with %d key(s) in its cache after "
                        "the %d-token prompt (decode step %d expects %s%d): a second generate or "
                        "forward call inside one capture block (one prompt per capture), or "
                        "an offloaded cache, is not supported"
                        % (layer, k_len, T, g, "at least " if want < T + g + 1 else "", want))
        if g >= self.decode:
            return
        self.session.submit_decode(layer, g, query, key[:, :, -1:, :], value[:, :, -1:, :])
        st.n_captured = g + 1
        tok = self._decode_tokens.get(g)
        if tok is not None and all(x.n_captured > g for x in self._state):
            del self._decode_tokens[g]
            self.session.submit_decode_token(g, tok)

    def _open(self, module, query, key, kwargs):
        from ._capture import CaptureSession
        torch = self._torch
        T = int(query.shape[-2])
        hq, hkv, d = int(query.shape[1]), int(key.shape[1]), int(query.shape[-1])
        if (hq, hkv, d) != (self.n_q_heads, self.n_kv_heads, self.head_dim):
            raise _fail("attention tensors have %d query heads, %d KV heads, head dim %d; the "
                        "config says %d, %d, %d" % (hq, hkv, d, self.n_q_heads,
                                                      self.n_kv_heads, self.head_dim),
                        _ERR_INVALID)
        W = min(self.window_requested, T)
        if self._kvzip is not None and self._kvzip.shape[2] != T:
            raise _fail("kvzip: scores of %d tokens, but the prompt has %d: score the prompt "
                        "the model runs here" % (self._kvzip.shape[2], T), _ERR_INVALID)
        model_kv = _kv_dtype_of(query)  # refused here, before the session opens
        kv_dtype = self.kv_dtype if self.kv_dtype is not None else model_kv
        scaling = kwargs.get("scaling", None)
        if scaling is None:
            scaling = getattr(module, "scaling", None)
        gpu = None
        if query.is_cuda:
            gpu = torch.cuda.get_device_name(query.device)
        info = dict(self.info)
        info.update({"source": "kvtrace.capture (python/kvtrace/hf.py)",
                     "window_requested": self.window_requested,
                     "decode_requested": self.decode,
                     "device": str(query.device), "model_dtype": str(query.dtype)})
        if self.mrope_section is not None:
            info["mrope_section"] = self.mrope_section
        if self._kvzip is not None:
            info["kvzip"] = self._kvzip_info or {"source": "given"}

        # token tables, from the pre-hooks of this forward call
        ids_np = self._prompt_ids
        if ids_np is not None:
            if ids_np.shape[0] != T:
                info["token_ids_note"] = ("input_ids hold %d tokens, the text layers saw %d: "
                                          "token ids and modality not recorded"
                                          % (ids_np.shape[0], T))
                ids_np = None
        modality = token_modality(ids_np, self._config) if ids_np is not None else None
        if self.mrope:
            pos = mrope_positions(self._prompt_pos, T)
            note = mrope_flat_note(pos, modality)
            if note is not None:
                import warnings
                info["positions_note"] = note
                warnings.warn("kvtrace.capture: " + note, stacklevel=2)
        else:
            pos = rope_positions(self._prompt_pos, T)
        # the frequencies the prompt was rotated with: read now, after the text model's rotary
        # embedding ran for the prompt (a dynamic RoPE updates inv_freq there)
        inv_freq, attention_scaling, note = rope_frequencies(
            find_rotary_emb(self._text_model, self._attn), d)
        if note is not None:
            info["rope_note"] = note

        sess = CaptureSession(
            self.path, n_layers=self.n_layers, n_q_heads=hq, n_kv_heads=hkv, head_dim=d,
            n_tokens=T, window=W, kv_dtype=kv_dtype, name=str(self.name),
            arch=self.text_model_type if self.model_type == "llava" else self.model_type,
            rope="mrope" if self.mrope else "default", rope_theta=self.rope_theta,
            attn_scale=float(scaling) if scaling else 0.0, engine_name="transformers",
            engine_version=self.info["transformers_version"], gpu=gpu, n_decode=self.decode,
            with_colsum=self.with_colsum, with_q_all=self.with_q_all, capture=json.dumps(info),
            level=self.level, n_threads=self.n_threads or max(1, (os.cpu_count() or 2) - 2),
            force=self.force, timeline=self.timeline, capture_stream=None,
            rope_pairs="half", rope_inv_freq=inv_freq, rope_attention_scaling=attention_scaling,
            mrope_section=self.mrope_section if self.mrope else None)
        self.session = sess
        self.n_tokens = T
        self.window = W
        self._state = [_LayerState() for _ in range(self.n_layers)]
        sess.set_tokens(
            token_ids=ids_np.astype(np.int32) if ids_np is not None else None,
            modality=modality, positions=pos)


def capture(model, path, *, window=32, decode=64, kv_dtype=None, with_colsum=False,
            with_q_all=False, timeline=False, level=1, n_threads=0, force=False, name=None,
            kvzip=None):
    """Record the KV cache of a transformers model into a .kvt trace while it runs:

        with kvtrace.capture(model, "out.kvt", window=32, decode=64):
            model.generate(**inputs, max_new_tokens=65, do_sample=False)  # 64 decode steps

    Supported: model types llama, mistral, qwen2, qwen2_vl, qwen2_5_vl and llava (with a
    llama, mistral or qwen2 language model), transformers >= 4.48 (qwen2_vl and qwen2_5_vl:
    >= 4.53), an attention
    implementation from transformers' registry ("sdpa", "flash_attention_2", ...; not
    "eager"), batch size 1.

    window:      prompt queries kept (the last W, W = min(window, T)).
    decode:      decode steps captured (query, key, value, input token); later steps run
                 uncaptured.
    kv_dtype:    stored dtype ("bf16", "f16", "f32"); default: the dtype of the attention
                 tensors (the model's dtype).
    with_colsum: also attention column sums over all prompt queries (computed by the library).
    with_q_all:  also every prompt query (Q_all).
    timeline:    collect a CUPTI GPU timeline from the first prompt call to the end (not
                 with another CUPTI client attached; a profiler started meanwhile, such as
                 torch.profiler, cannot attach).
    level, n_threads: zstd level (default 1; 0 = the library's, 3) and compressor threads (0 =
                 all cores but two), so that compression keeps pace with a GPU's prefill: on
                 byte-planed bf16 KV level 1 compresses about 1.7-2x faster than level 3 and as
                 well or better (bench/RESULTS.md, "Trace writer/reader throughput").
    force:       overwrite an existing file: the new trace replaces it when the block ends
                 with a complete prompt; otherwise the old file is unchanged, the new trace
                 stays in a temporary file next to it (.partial_path, and a RuntimeWarning).
    name:        the model name in the header.
    kvzip:       KVzip's scores of the prompt, [L, Hkv, T] from kvzip_scores(model, ids):
                 stored as the kvzip_score records the replay's `kvzip` policy reads.

    Returns a Capture (a context manager): .path, .session, .stats (after the block). The
    session opens at the first forward call (T = its token count) and closes when the block
    ends, also when it raises (the trace then holds what was submitted, and the block's
    exception propagates). Errors: kvtrace.TraceError with a message saying what is not
    supported; the arguments (window, decode, kv_dtype, level, n_threads, the output's
    directory) and the model's dtype are checked here, before the model runs."""
    return Capture(model, path, window=window, decode=decode, kv_dtype=kv_dtype,
                   with_colsum=with_colsum, with_q_all=with_q_all, timeline=timeline,
                   level=level, n_threads=n_threads, force=force, name=name, kvzip=kvzip)


# ------------------------------------------------------------------------------------------
# KVzip's context-reconstruction scores
# ------------------------------------------------------------------------------------------

KVZIP_FIRST = "\n\nRepeat the previous context exactly."
KVZIP_LATER = "\n\nRepeat the part of the previous context exactly, starting with"


def kvzip_prompts(tokenizer):
    """kvpress's KVzipPress prompts from a tokenizer: (prefix_length, first, later, suffix),
    the chat template's tokens before the context, the instruction ids before the first chunk
    and before the others, and the ids that end the user turn (\"\\n\" without a template)."""
    def enc(text):
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]

    if getattr(tokenizer, "chat_template", None) is None:
        prefix, suffix = "", "\n"
    else:
        dummy = "dummy context"
        sep = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}],
                                             add_generation_prompt=True, tokenize=False,
                                             enable_thinking=False)
        context, suffix = text.split(sep)
        prefix = context.split(dummy)[0]
    return len(enc(prefix)), enc(KVZIP_FIRST), enc(KVZIP_LATER), enc(suffix)


class KVzipScores(np.ndarray):
    """kvzip_scores' result: a float32 array [L, Hkv, T] with .kvzip_info, how it was made
    (chunk, n_sink, tail, prefix_length and the instruction and suffix lengths), which
    capture(..., kvzip=) records in the trace's header as capture.kvzip."""

    def __array_finalize__(self, obj):
        self.kvzip_info = getattr(obj, "kvzip_info", None)


def kvzip_scores(model, input_ids, *, tokenizer=None, chunk=2048, prefix_length=None,
                 first_ids=None, later_ids=None, suffix_ids=None, n_sink=4, tail=8):
    """KVzip's (arXiv 2505.23416) context-reconstruction scores of a prompt, as NVIDIA
    kvpress's KVzipPress computes them: [L, Hkv, T] float32, for kvtrace.capture(...,
    kvzip=scores), which stores them for the replay's `kvzip` policy.

        s = kvtrace.hf.kvzip_scores(model, ids, tokenizer=tok)
        with kvtrace.capture(model, "out.kvt", kvzip=s):
            model.generate(ids, max_new_tokens=65, do_sample=False)

    The model runs the prompt, then, chunk by chunk of `chunk` tokens from prefix_length on,
    a repeat input after it (an instruction, for every chunk but the first the previous
    chunk's last `tail` tokens, the suffix, the chunk) whose queries attend, per KV head's
    group, to the first min(n_sink, chunk start) keys, the chunk and the repeat keys up to
    their own; a key's score is the largest probability it gets. The cache is cut back to the
    prompt after each chunk. Tokens before prefix_length keep kvpress's initial score: 1 for
    the first n_sink, else 0. With `tokenizer`, the instructions, suffix and prefix length are
    kvpress's (kvzip_prompts); without, prefix_length 0 and no instruction or suffix unless
    given as token ids (first_ids, later_ids defaulting to first_ids, suffix_ids). Scores are
    computed in float32 from the attention's own tensors (kvpress keeps them in the model's
    dtype). Costs about two to three prefills, as kvpress's. Same model support as capture();
    batch size 1. Returns a KVzipScores (an ndarray) whose .kvzip_info says how it was made."""
    import torch
    cap = Capture(model, os.devnull)  # the model checks and the attention registry; no file
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise _fail("kvzip_scores: input_ids of shape %s: one sequence (batch size 1)"
                    % (tuple(ids.shape),), _ERR_INVALID)
    T = int(ids.shape[1])
    if T < 1:
        raise _fail("kvzip_scores: input_ids holds no token: the prompt to score is empty",
                    _ERR_INVALID)
    chunk = _int_option(chunk, "chunk", C_INT, 1)
    n_sink = _int_option(n_sink, "n_sink", C_INT, 0)
    tail = _int_option(tail, "tail", C_INT, 0)
    if tokenizer is not None:
        tp, tf, tl, ts = kvzip_prompts(tokenizer)
        prefix_length = tp if prefix_length is None else prefix_length
        first_ids = tf if first_ids is None else first_ids
        later_ids = tl if later_ids is None else later_ids
        suffix_ids = ts if suffix_ids is None else suffix_ids
    prefix_length = _int_option(prefix_length or 0, "prefix_length", C_INT, 0, T - 1)
    first_ids = [int(i) for i in (first_ids or [])]
    later_ids = first_ids if later_ids is None else [int(i) for i in later_ids]
    suffix_ids = [int(i) for i in (suffix_ids or [])]
    L, Hkv, G = cap.n_layers, cap.n_kv_heads, cap.n_q_heads // cap.n_kv_heads
    scores = np.zeros((L, Hkv, T), np.float32)
    scores[:, :, :n_sink] = 1.0  # kvpress's start; the chunks overwrite from prefix_length on
    run = {"start": 0, "end": 0, "calls": 0}
    layer_of, orig = cap._layer_of, cap._slot[cap.attn_implementation]

    @functools.wraps(orig)
    def kvzip_attention(module, *args, **kwargs):
        layer = layer_of.get(id(module))
        if layer is not None and run["end"] > run["start"]:
            qkv = list(args[:2])
            for n in ("query", "key")[len(qkv):]:
                qkv.append(kwargs.get(n))
            q, k = qkv[0][0].float(), qkv[1][0].float()  # [Hq, q, D], [Hkv, T + q, D]
            nq, D = q.shape[-2], q.shape[-1]
            a, b = run["start"], run["end"]
            sink = min(n_sink, a)
            keys = torch.cat([k[:, :sink], k[:, a:b], k[:, k.shape[1] - nq:]], dim=1)
            z = q.reshape(Hkv, G, nq, D) @ keys.transpose(-1, -2)[:, None] / (D ** 0.5)
            future = torch.triu(torch.ones(nq, nq, dtype=torch.bool, device=z.device), 1)
            z[..., sink + b - a:] = z[..., sink + b - a:].masked_fill(future, float("-inf"))
            p = torch.softmax(z, dim=-1)[..., sink:sink + b - a]
            scores[layer, :, a:b] = p.amax(dim=(1, 2)).cpu().numpy()
            run["calls"] += 1
        return orig(module, *args, **kwargs)

    slot, impl = cap._slot, cap.attn_implementation
    dev = next(model.parameters()).device
    last = _last_logits_only(model)  # no pass here reads the logits
    with torch.no_grad():
        out = model(input_ids=ids.to(dev), use_cache=True, **last)
        cache = out.past_key_values
        if cache is None:
            raise _fail("kvzip_scores: the model returned no KV cache (use_cache)", _ERR_STATE)
        prev = []
        slot[impl] = kvzip_attention
        try:
            for i, a in enumerate(range(prefix_length, T, chunk)):
                b = min(a + chunk, T)
                ctx = [int(t) for t in ids[0, a:b]]
                lead = first_ids if i == 0 else later_ids + prev[max(len(prev) - tail, 0):]
                rep = torch.tensor([lead + suffix_ids + ctx], dtype=ids.dtype, device=dev)
                run.update(start=a, end=b, calls=0)
                model(input_ids=rep, past_key_values=cache, use_cache=True, **last)
                if run["calls"] != L:
                    raise _fail("kvzip_scores: %d of %d text attention layers called the "
                                "registry entry %r" % (run["calls"], L, impl))
                _crop_cache(cache, T)
                prev = ctx
        finally:
            run.update(start=0, end=0)
            if slot.get(impl) is kvzip_attention:
                slot[impl] = orig
    out = scores.view(KVzipScores)
    out.kvzip_info = {"source": "kvtrace.hf.kvzip_scores", "chunk": chunk, "n_sink": n_sink,
                      "tail": tail, "prefix_length": prefix_length,
                      "first_instruction_ids": len(first_ids),
                      "later_instruction_ids": len(later_ids), "suffix_ids": len(suffix_ids)}
    return out


def _last_logits_only(model):
    """Keyword arguments that make a causal LM's forward compute the logits of the last
    position alone (logits_to_keep=1, num_logits_to_keep=1 before transformers 4.50), where
    its forward takes one: a prompt's [T, vocab] float32 logits are gigabytes at long T (16 GiB
    for 32K tokens of a 128K vocabulary). {} where it takes neither."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _crop_cache(cache, T):
    """Forget a dynamic cache's entries from token T on (the repeat rows)."""
    if hasattr(cache, "crop"):
        cache.crop(T)
        return
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for lay in layers:
            lay.keys, lay.values = lay.keys[..., :T, :], lay.values[..., :T, :]
        return
    for lst in (cache.key_cache, cache.value_cache):  # transformers before 4.54
        for i, x in enumerate(lst):
            lst[i] = x[..., :T, :]


from ._hf_e2e import e2e  # noqa: E402  (it uses this module's Capture and _crop_cache)
