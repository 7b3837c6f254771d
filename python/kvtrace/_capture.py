"""_capture.py - CaptureSession over the C capture API (capture/kvt_capture.h).

Tensors are handed to C as strided views of the caller's memory: a NumPy array, any object
with __array_interface__ (shape, strides and data pointer are passed through, nothing is
copied in Python), or a torch.Tensor on the CPU or a CUDA device (data_ptr/stride/dtype, bf16
included). For host memory the C side gathers the view into the stored dtype and copies it
before the call returns; a CUDA tensor is read on the producer's stream (torch's current
stream for the tensor's device), so the call does not wait for the GPU.
"""
import ctypes
import os
import threading

import numpy as np

from . import _lib
from ._errors import TraceError, call
from ._trace import (_FLOAT_CODES, C_INT, C_INT32, C_UINT32, C_UINT64, _FORK_RESET, _NoCopy,
                     _Replacing, dtype_code, force_message, header_text, int_arg, path_arg,
                     str_arg)

_TYPESTR = {"<f4": _lib.DTYPE_F32, "<f2": _lib.DTYPE_F16, "<u2": _lib.DTYPE_BF16,
            "=f4": _lib.DTYPE_F32, "=f2": _lib.DTYPE_F16, "=u2": _lib.DTYPE_BF16,
            "|f4": _lib.DTYPE_F32, "|f2": _lib.DTYPE_F16}
_ITEMSIZE = {_lib.DTYPE_F32: 4, _lib.DTYPE_F16: 2, _lib.DTYPE_BF16: 2}
# torch dtypes by name (str(tensor.dtype) without "torch.") -> kvt_dtype code; hf.py derives
# the stored dtype of a capture from it
TORCH_DTYPES = {"float32": _lib.DTYPE_F32, "float16": _lib.DTYPE_F16,
                "bfloat16": _lib.DTYPE_BF16}

# enum kvt_mem (capture/kvt_capture.h)
MEM_HOST = 0
MEM_CUDA = 1


def tensor_view(x, name="tensor", streams=None):
    """Build a kvt_tensor_view over x without copying. Returns (view, keepalive).

    x: [H, T, D] or [1, H, T, D] in the logical axis order (use a transposed view, e.g.
    a[:, :, i].transpose(1, 0, 2) of a [T, H, D] buffer, for other layouts: the strides carry
    the layout). float32, float16, or bf16 (uint16 bit patterns, ml_dtypes.bfloat16 or
    torch.bfloat16). Strides may be anything, including negative and 0.

    A torch.Tensor on a CUDA device gives a device view (mem = KVT_MEM_CUDA, device_idx = its
    device ordinal, stream = torch.cuda.current_stream(device).cuda_stream): the library reads
    it on that stream, so work the engine enqueues there afterwards may reuse the memory. A
    library built without CUDA, or a machine without a device, refuses it (KVT_ERR_NO_CUDA).
    Host views have mem = KVT_MEM_HOST, device_idx = 0 and no stream.

    streams: an optional dict {device ordinal: stream handle} shared by the views of one call,
    so that torch's current stream is looked up once per device and call, not per tensor."""
    v = _lib.TensorView()
    keep = x
    mem, device_idx, stream = MEM_HOST, 0, None
    if hasattr(x, "data_ptr") and callable(getattr(x, "stride", None)) and hasattr(x, "dtype"):
        # torch.Tensor (duck-typed: torch is only imported for a CUDA tensor)
        dev = getattr(x, "device", None)
        dev_type = getattr(dev, "type", "cpu") if dev is not None else "cpu"
        if dev_type == "cuda":
            import torch
            mem = MEM_CUDA
            index = getattr(dev, "index", None)
            device_idx = int(index) if index is not None else int(torch.cuda.current_device())
            stream = streams.get(device_idx) if streams is not None else None
            if stream is None:
                stream = torch.cuda.current_stream(dev).cuda_stream
                if streams is not None:
                    streams[device_idx] = stream
        elif dev_type != "cpu":
            raise TraceError(-13, "%s: tensors on %s devices are not supported by the capture "
                             "API (host and CUDA only)" % (name, dev_type))
        tname = str(x.dtype).replace("torch.", "")
        if tname not in TORCH_DTYPES:
            raise ValueError("%s: dtype %s not supported (float32, float16, bfloat16)"
                             % (name, x.dtype))
        code = TORCH_DTYPES[tname]
        shape = tuple(int(s) for s in x.shape)
        strides = tuple(int(s) for s in x.stride())
        ptr = int(x.data_ptr())
    else:
        if not hasattr(x, "__array_interface__"):
            x = np.asarray(x)  # buffer-protocol objects: a view, no copy
            keep = x
        ai = x.__array_interface__
        shape = tuple(int(s) for s in ai["shape"])
        typestr = ai["typestr"]
        code = _TYPESTR.get(typestr)
        if code is None:
            dtn = getattr(getattr(x, "dtype", None), "name", "")
            if dtn == "bfloat16" and typestr.endswith("2"):
                code = _lib.DTYPE_BF16
            else:
                raise ValueError("%s: element type %s not supported (float32, float16, or bf16 "
                                 "as uint16)" % (name, typestr))
        item = _ITEMSIZE[code]
        data = ai.get("data")
        if isinstance(data, tuple):
            ptr = int(data[0]) if data[0] is not None else 0
        else:
            # data is a buffer object or None (the object itself is the buffer): let NumPy
            # resolve the pointer (a view, not a copy).
            arr = np.asarray(x)
            keep = (x, arr)
            ptr = arr.__array_interface__["data"][0]
            ai = arr.__array_interface__
        bstrides = ai.get("strides")
        if bstrides is None:
            strides, acc = [], 1
            for s in reversed(shape):
                strides.append(acc)
                acc *= s
            strides = tuple(reversed(strides))
        else:
            if any(s % item for s in bstrides):
                raise ValueError("%s: strides %s are not multiples of the element size %d"
                                 % (name, bstrides, item))
            strides = tuple(int(s) // item for s in bstrides)
    if len(shape) not in (3, 4):
        raise ValueError("%s: expected a [H, T, D] or [1, H, T, D] tensor, got shape %s"
                         % (name, shape))
    v.data = ptr
    v.dtype = code
    v.ndim = len(shape)
    for i, (s, st) in enumerate(zip(shape, strides)):
        v.shape[i] = s
        v.stride[i] = st
    v.mem = mem
    v.device_idx = device_idx
    v.stream = stream  # None = NULL (host views)
    return v, keep


def kv_dtype_code(kv_dtype, name="kv_dtype"):
    """The kvt_dtype code of a capture's stored dtype: "f32", "bf16", "f16" (or "float32",
    "bfloat16", "float16", ...), a NumPy dtype, or torch.float32 / torch.bfloat16 /
    torch.float16. ValueError (TypeError for a non-dtype) naming the argument otherwise."""
    stores = ("a capture stores \"f32\", \"bf16\" or \"f16\" (or torch.float32, "
              "torch.bfloat16, torch.float16)")
    if kv_dtype is None:  # np.dtype(None) would be float64
        raise TypeError("%s None: a capture session stores one dtype, fixed when it opens; %s"
                        % (name, stores))
    try:
        code = dtype_code(kv_dtype)
    except (TypeError, ValueError) as e:
        raise type(e)("%s %r: %s; %s" % (name, kv_dtype, e, stores)) from None
    if code not in _FLOAT_CODES:
        raise ValueError("%s %r: %s" % (name, kv_dtype, stores))
    return code


def _host_array(a):
    """A NumPy array of `a`: an array, a sequence, a scalar, or a torch tensor (on any device;
    copied to the host; bfloat16, which NumPy lacks, as float32, exactly)."""
    if hasattr(a, "detach") and hasattr(a, "cpu") and hasattr(a, "numpy"):
        a = a.detach()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.cpu().numpy()
    return np.asarray(a)


def _int_table(a, name, n_tokens, np_dtype, lo, hi, rows_ok=False):
    """A per-token table as a contiguous array of np_dtype: [T] (or [P, T] with rows_ok), of
    integers within [lo, hi]. ValueError/TypeError naming the table (a wrong length: its shape
    and T; a bad value: the value)."""
    arr = _host_array(a)
    shape_ok = arr.ndim == 1 or (rows_ok and arr.ndim == 2)
    if not shape_ok or arr.shape[-1] != n_tokens:
        raise ValueError("set_tokens: %s has shape %s; this session has n_tokens = %d, so it "
                         "must be [%d]%s" % (name, arr.shape, n_tokens, n_tokens,
                                             " or [P, %d]" % n_tokens if rows_ok else ""))
    if arr.dtype.kind == "f" and arr.size:  # whole numbers in a float array are fine
        frac = arr[~(np.isfinite(arr) & (arr == np.floor(arr)))]
        if frac.size:
            raise ValueError("set_tokens: %s holds %r, not an integer"
                             % (name, float(frac.flat[0])))
    elif arr.dtype.kind not in "iub" and arr.size:  # a bool mask is 0/1
        raise TypeError("set_tokens: %s must hold integers, got dtype %s" % (name, arr.dtype))
    if arr.size:
        mn, mx = int(arr.min()), int(arr.max())
        if mn < lo or mx > hi:
            bad = mn if mn < lo else mx
            raise ValueError("set_tokens: %s holds %d, outside [%d, %d]" % (name, bad, lo, hi))
    return np.ascontiguousarray(arr, dtype=np_dtype)


def _rope_pairs_code(rope_pairs):
    """The kvt_rope_pairs code of "half", "interleaved" or None; ValueError otherwise."""
    if isinstance(rope_pairs, (str, type(None))) and rope_pairs in _lib.ROPE_PAIRS:
        return _lib.ROPE_PAIRS[rope_pairs]
    raise ValueError("rope_pairs %r is not a RoPE pairing (known: \"half\", \"interleaved\", "
                     "or None)" % (rope_pairs,))


def _float_arg(value, name, zero=None):
    """value as a finite float >= 0; TypeError for a non-number (None, a str...), ValueError
    otherwise. Both name the argument and the value. zero, when given, says what 0 means
    ("0 for ..."): the rule is then said as > 0, or that."""
    if isinstance(value, (str, bytes)):
        raise TypeError("%s must be a number, got %r" % (name, value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError("%s must be a number, got %r (%s)"
                        % (name, value, type(value).__name__)) from None
    if not (np.isfinite(v) and v >= 0.0):
        raise ValueError("%s = %r must be a finite number %s"
                         % (name, v, "> 0 (or %s)" % zero if zero else ">= 0"))
    return v


def _rope_inv_freq_array(inv_freq, head_dim):
    """A ctypes double array of the head_dim/2 RoPE frequencies, or None for None. ValueError
    naming rope_inv_freq for an odd head_dim, another shape, or a value that is not a finite
    number >= 0; TypeError for values that are not numbers."""
    if inv_freq is None:
        return None
    if head_dim % 2:
        raise ValueError("rope_inv_freq needs an even head_dim (head_dim = %d)" % head_dim)
    arr = _host_array(inv_freq)
    if arr.dtype.kind not in "fiu":
        raise TypeError("rope_inv_freq must hold numbers, got dtype %s" % arr.dtype)
    n = head_dim // 2
    if arr.shape != (n,):
        raise ValueError("rope_inv_freq has shape %s; head_dim = %d, so it must be [%d] (one "
                         "frequency per pair)" % (arr.shape, head_dim, n))
    arr = arr.astype(np.float64)
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr >= 0.0)))
    if bad.size:
        raise ValueError("rope_inv_freq[%d] = %r is not a finite frequency >= 0"
                         % (bad[0], float(arr[bad[0]])))
    return (ctypes.c_double * n)(*arr.tolist())


def _mrope_section(section, head_dim, rope_code):
    """M-RoPE's 3 section sizes as a list of ints ([0, 0, 0] for None). ValueError naming
    mrope_section unless they are 3 integers >= 0 summing to head_dim/2, with rope "mrope"."""
    if section is None:
        return [0, 0, 0]
    vals = list(_host_array(section).reshape(-1)) if not isinstance(section, (str, bytes)) \
        else None
    if vals is None or len(vals) != 3:
        raise ValueError("mrope_section %r must be 3 integers (pairs in the t, h, w sections)"
                         % (section,))
    out = [int_arg(v.item() if hasattr(v, "item") else v, "mrope_section[%d]" % i, C_INT, 0)
           for i, v in enumerate(vals)]
    if sum(out) != head_dim // 2:
        raise ValueError("mrope_section %s sums to %d; it must sum to head_dim/2 = %d"
                         % (out, sum(out), head_dim // 2))
    if rope_code != _lib.ROPE_KINDS["mrope"]:
        raise ValueError("mrope_section %s is for M-RoPE: pass rope=\"mrope\"" % (out,))
    return out


def _flag(value, name):
    """A yes/no option: a bool, a NumPy bool or the integers 0 and 1; anything else (the
    string "no", say, which Python would take as true) raises TypeError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise TypeError("%s must be True or False, got %r" % (name, value))


class CaptureSession(_NoCopy):
    """A capture session writing one .kvt trace (kvt_capture_open ... kvt_capture_close).

        with kvtrace.CaptureSession("out.kvt", n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv,
                                    head_dim=D, n_tokens=T, window=W, kv_dtype="f16") as s:
            s.set_tokens(token_ids=ids)
            for l in range(L):
                s.submit_kv(l, 0, k[l], v[l])          # [Hkv, T, D] views
                s.submit_queries(l, 0, q[l])           # [Hq, n, D], last W kept
            ...
    Leaving the block closes the session (finishing the trace); close() returns the final
    stats, and so do stats() and close() again afterwards (a close that raised raises the
    same TraceError again; stats() still returns the final counters).

    timeline=True collects a GPU timeline with CUPTI from open to close (kernel time by
    category, copies, and how much of the capture's own copies overlapped compute: those on
    capture_stream, a CUDA stream handle or an object with .cuda_stream such as
    torch.cuda.Stream, or without it those the session made of device tensors on its own
    stream); with device tensors, close() waits for the device before it stops CUPTI (with
    host tensors an engine should synchronise before close). Where CUPTI cannot run (another
    CUPTI client such as a profiler is attached, no driver...), timeline_reason says why and
    the trace records it; while it collects, a profiler started meanwhile (torch.profiler
    included) cannot attach. set_timeline_absent(reason) records why an engine has no
    timeline.

    Arguments are checked before the C call (ValueError or TypeError naming the argument and
    its value): integers must fit their C field (n_tokens, window, n_decode, decode_chunk:
    uint32; n_layers, heads, head_dim, level, n_threads: int), strings and the path hold no
    NUL, kv_dtype is f32/bf16/f16 (torch dtypes accepted; not None: the stored dtype is fixed
    at open), rope is "none", "default", "mrope" or its code, rope_theta and attn_scale are
    finite numbers > 0 or 0 (rope_theta 0: not known, written as 0; attn_scale 0:
    1/sqrt(head_dim)), capture_stream is an integer handle or has one in .cuda_stream,
    with_colsum, with_q_all, no_shuffle, force and timeline are True or False (or 0, 1).
    capture: a dict (or JSON object text) merged into the header's "capture" object; its keys
    may not restate the session's own record there (api, with_colsum, with_q_all,
    decode_chunk, zstd_level, byteplane: TraceError), which the options set.

    Optional RoPE details, recorded in the header's model.rope (traces/FORMAT.md) when given
    (a replay policy that works on pre-RoPE queries, expected-attention, needs rope_pairs):
      rope_pairs:             which dimensions rotate together: "half" (i and i + D/2,
                              transformers' rotate_half), "interleaved" (2i and 2i + 1,
                              llama2.c, Meta's reference code), or None (not recorded);
      rope_inv_freq:          the model's own frequencies of the D/2 pairs (scaled RoPE such as
                              Llama 3.1's included): a sequence, NumPy array or torch tensor of
                              head_dim/2 finite numbers >= 0; None: theta^(-2i/D);
      rope_attention_scaling: the factor on cos and sin (transformers' attention_scaling); 0
                              (the default): not recorded, readers take 1;
      mrope_section:          M-RoPE (rope="mrope") only: the pairs in the t, h, w sections,
                              3 integers >= 0 summing to head_dim/2; None: not recorded.
    Each is checked here (ValueError or TypeError naming it).

    Threads may share a session: every call is serialised by a lock (the C session is not
    thread-safe), and a submission after close() raises TraceError ("is closed"). With
    force=True over an existing trace, a session that does not finish complete leaves the
    old trace unchanged and the new one in a temporary file next to it: close() then warns
    (RuntimeWarning) and partial_path names it. A session cannot be copied or pickled, nor
    used in a forked child; garbage collection there drops it without closing the parent's."""

    def __init__(self, path, *, n_layers, n_q_heads, n_kv_heads, head_dim, n_tokens, window,
                 kv_dtype="f32", name="model", arch="llama", rope="default", rope_theta=0.0,
                 attn_scale=0.0, engine_name="kvtrace-python", engine_version=None, gpu=None,
                 n_decode=0, decode_chunk=0, with_colsum=False, with_q_all=False, capture=None,
                 level=0, n_threads=0, max_pending_bytes=0, max_record_bytes=0,
                 no_shuffle=False, force=False, timeline=False, capture_stream=None,
                 rope_pairs=None, rope_inv_freq=None, rope_attention_scaling=0.0,
                 mrope_section=None):
        self._h = None
        self._tl = None
        with_colsum, with_q_all, no_shuffle, force, timeline = (_flag(v, n) for v, n in (
            (with_colsum, "with_colsum"), (with_q_all, "with_q_all"), (no_shuffle, "no_shuffle"),
            (force, "force"), (timeline, "timeline")))
        L = _lib.lib()
        if not _lib.has_capture():
            raise TraceError(-13, "%s was built without the capture API" % _lib.lib_path())
        from . import __version__
        self.path, bpath = path_arg(path)
        self._strings = [str_arg(v, n) for v, n in (
            (name, "name"), (arch, "arch"), (engine_name, "engine_name"),
            (engine_version or __version__, "engine_version"), (gpu, "gpu"))]
        if isinstance(rope, str):
            if rope not in _lib.ROPE_KINDS:
                raise ValueError("rope %r is not a rope kind (known: %s)"
                                 % (rope, ", ".join(_lib.ROPE_KINDS)))
            rope_code = _lib.ROPE_KINDS[rope]
        else:
            rope_code = int_arg(rope, "rope", C_INT)
        n_tokens = int_arg(n_tokens, "n_tokens", C_UINT32)
        head_dim = int_arg(head_dim, "head_dim", C_INT)
        pairs_code = _rope_pairs_code(rope_pairs)
        # the frequencies as a C double array: the library copies them into the header at
        # open; kept on self all the same, as long as the session that was given them
        self._rope_inv_freq = _rope_inv_freq_array(rope_inv_freq, head_dim)
        sections = _mrope_section(mrope_section, head_dim, rope_code)
        if capture_stream is not None:  # a handle (an address) or a torch.cuda.Stream
            capture_stream = int_arg(getattr(capture_stream, "cuda_stream", capture_stream),
                                     "capture_stream", C_UINT64)
        model = _lib.CaptureModel(
            name=self._strings[0], arch=self._strings[1],
            n_layers=int_arg(n_layers, "n_layers", C_INT),
            n_q_heads=int_arg(n_q_heads, "n_q_heads", C_INT),
            n_kv_heads=int_arg(n_kv_heads, "n_kv_heads", C_INT),
            head_dim=head_dim,
            kv_dtype=kv_dtype_code(kv_dtype), rope=rope_code,
            rope_theta=_float_arg(rope_theta, "rope_theta", "0 when not known"),
            attn_scale=_float_arg(attn_scale, "attn_scale", "0 for 1/sqrt(head_dim)"),
            engine_name=self._strings[2],
            engine_version=self._strings[3], gpu=self._strings[4],
            rope_pairs=pairs_code, rope_inv_freq=self._rope_inv_freq,
            rope_attention_scaling=_float_arg(rope_attention_scaling, "rope_attention_scaling"),
            mrope_section=(ctypes.c_int * 3)(*sections))
        cj = None
        if capture is not None:
            cj = header_text(capture, "capture")
        self._cj = cj
        opts = _lib.CaptureOpts(
            n_tokens=n_tokens, window=int_arg(window, "window", C_UINT32),
            n_decode=int_arg(n_decode, "n_decode", C_UINT32),
            decode_chunk=int_arg(decode_chunk, "decode_chunk", C_UINT32),
            with_colsum=with_colsum, with_q_all=with_q_all, capture_json=cj,
            writer=_lib.WriterOpts(
                level=int_arg(level, "level", C_INT),
                n_threads=int_arg(n_threads, "n_threads", C_INT),
                max_pending_bytes=int_arg(max_pending_bytes, "max_pending_bytes", C_UINT64),
                no_shuffle=no_shuffle,
                max_record_bytes=int_arg(max_record_bytes, "max_record_bytes", C_UINT64),
                force=force))
        self._lock = threading.RLock()
        _FORK_RESET.add(self)  # a forked child gets a fresh lock (its calls raise, not hang)
        self._pid = os.getpid()
        self.partial_path = None
        self._replacing = _Replacing(self.path, bpath)
        self._final = None       # the stats kvt_capture_close returned
        self._close_error = None  # the TraceError close() raised, if it did
        h = ctypes.c_void_p()
        try:
            call(L.kvt_capture_open, bpath, ctypes.byref(model), ctypes.byref(opts),
                 ctypes.byref(h))
        except TraceError as e:
            raise force_message(e) from None
        self._h = h
        self._replacing.after(L.kvt_capture_file(h))
        self.n_layers = model.n_layers
        self.n_kv_heads = model.n_kv_heads
        self.n_tokens = n_tokens
        self._tl_stream = (0, 0)  # CUPTI's (context id, stream id) of the capture's copies
        self.timeline_reason = None
        self.timeline = None
        if timeline:
            self._start_timeline(capture_stream)

    def _start_timeline(self, capture_stream):
        L = _lib.lib()
        why = ctypes.create_string_buffer(256)
        tl = L.kvt_timeline_start(why, len(why))
        if not tl:
            self.set_timeline_absent(why.value.decode("utf-8", "replace"))
            return
        self._tl = tl
        if capture_stream is not None:
            handle = getattr(capture_stream, "cuda_stream", capture_stream)
            cid, sid = ctypes.c_uint32(), ctypes.c_uint32()
            call(L.kvt_timeline_stream_id, tl, ctypes.c_void_p(int(handle)), ctypes.byref(cid),
                 ctypes.byref(sid))
            self._tl_stream = (cid.value, sid.value)

    def set_timeline_absent(self, reason):
        """Record why the trace has no GPU timeline (one line)."""
        text = str_arg(str(reason), "reason")
        with self._lock:
            h = self._handle()
            self.timeline_reason = str(reason)
            call(_lib.lib().kvt_capture_set_timeline_absent, h, text)

    def _stop_timeline(self, h):
        tl, self._tl = self._tl, None
        if not tl:
            return
        L = _lib.lib()
        # CUPTI's flush holds complete records only of finished work: the capture's own copies
        # and the engine's kernels first; a failure here is the session's, raised by close
        L.kvt_capture_sync_device(h)
        if not self._tl_stream[1]:  # device tensors: the capture copies them on its own stream
            dev_stream = L.kvt_capture_device_stream(h)
            cid, sid = ctypes.c_uint32(), ctypes.c_uint32()
            if dev_stream and L.kvt_timeline_stream_id(tl, ctypes.c_void_p(dev_stream),
                                                       ctypes.byref(cid), ctypes.byref(sid)) == 0:
                self._tl_stream = (cid.value, sid.value)
        t = _lib.CaptureTimeline()
        st = L.kvt_timeline_stop(tl, self._tl_stream[0], self._tl_stream[1], ctypes.byref(t))
        if st == 0:
            self.timeline = {n: int(getattr(t, n)) for n, _ in _lib.CaptureTimeline._fields_}
            call(L.kvt_capture_set_timeline, h, ctypes.byref(t))
        else:
            msg = L.kvt_error_msg().decode("utf-8", "replace")
            if msg.startswith("timeline: "):  # the library's prefix; the reason's is "CUPTI: "
                msg = msg[len("timeline: "):]
            self.timeline_reason = "CUPTI: " + msg
            call(L.kvt_capture_set_timeline_absent, h, self.timeline_reason.encode("utf-8"))

    def _after_fork(self):
        self._lock = threading.RLock()

    def _handle(self):
        if self._h is None:
            raise TraceError(-9, "capture session for %s is closed" % self.path)
        if os.getpid() != self._pid:
            raise TraceError(-9, "capture session for %s belongs to process %d: it cannot be "
                             "used in a forked child" % (self.path, self._pid))
        return self._h

    def set_tokens(self, token_ids=None, modality=None, positions=None):
        """Per-token tables: token_ids [T] int (each fits int32), modality [T] (ints 0..3 or
        names "text", "image", "video", "other"), positions [T] or [P, T] int32 (P = 1, or 3
        for rope="mrope"). Each may be None. T is the session's n_tokens: a table of another
        length is refused (ValueError naming it), as is a value that does not fit. One call
        per session gives them all (a second raises TraceError: the tables are written
        once)."""
        L = _lib.lib()
        T = self.n_tokens
        ids = mod = pos = None
        n_rows = 0
        if token_ids is not None:
            ids = _int_table(token_ids, "token_ids", T, np.int32, C_INT32[1], C_INT32[2])
        if modality is not None:
            # numbers (an array, a torch tensor, a sequence) or names (any iterable of them)
            if isinstance(modality, np.ndarray) or hasattr(modality, "detach"):
                m = _host_array(modality)
            elif isinstance(modality, (str, bytes)) or not hasattr(modality, "__iter__"):
                m = np.asarray(modality)  # a scalar: refused below, naming the table
            else:
                m = list(modality)  # a list, tuple, generator...
            if isinstance(m, np.ndarray) and m.dtype.kind in "UO" and m.ndim == 1:
                m = list(m)  # an array of names (or of names and numbers)
            if isinstance(m, list) and any(isinstance(x, str) for x in m):
                names = []
                for x in m:
                    if isinstance(x, str) and x not in _lib.MODALITIES:
                        raise ValueError("set_tokens: modality %r is not a modality name "
                                         "(known: %s, or 0..3)"
                                         % (x, ", ".join(_lib.MODALITIES)))
                    names.append(_lib.MODALITIES[x] if isinstance(x, str) else x)
                m = names
            mod = _int_table(m, "modality", T, np.uint8, 0, max(_lib.MODALITIES.values()))
        if positions is not None:
            pos = _int_table(positions, "positions", T, np.int32, C_INT32[1], C_INT32[2],
                             rows_ok=True)
            n_rows = 1 if pos.ndim == 1 else pos.shape[0]
        p = ctypes.POINTER
        with self._lock:
            call(L.kvt_capture_set_tokens, self._handle(),
                 ids.ctypes.data_as(p(ctypes.c_int32)) if ids is not None else None,
                 mod.ctypes.data_as(p(ctypes.c_uint8)) if mod is not None else None,
                 pos.ctypes.data_as(p(ctypes.c_int32)) if pos is not None else None, n_rows)

    def submit_kv(self, layer, tok_begin, k, v):
        """Keys and values of `layer` for tokens [tok_begin, tok_begin + n): [(1,) Hkv, n, D]."""
        layer = int_arg(layer, "layer", C_INT)
        tok_begin = int_arg(tok_begin, "tok_begin", C_UINT32)
        streams = {}
        kv, kk = tensor_view(k, "k", streams)
        vv, vk = tensor_view(v, "v", streams)
        with self._lock:
            call(_lib.lib().kvt_capture_submit_kv, self._handle(), layer, tok_begin,
                 ctypes.byref(kv), ctypes.byref(vv))
        del kk, vk

    def submit_queries(self, layer, tok_begin, q):
        """Prompt queries of `layer` for tokens [tok_begin, tok_begin + n): [(1,) Hq, n, D]."""
        layer = int_arg(layer, "layer", C_INT)
        tok_begin = int_arg(tok_begin, "tok_begin", C_UINT32)
        qv, qk = tensor_view(q, "q")
        with self._lock:
            call(_lib.lib().kvt_capture_submit_queries, self._handle(), layer, tok_begin,
                 ctypes.byref(qv))
        del qk

    def submit_decode(self, layer, step, q, k, v):
        """Decode steps [step, step + n) of `layer`: q [(1,) Hq, n, D], k, v [(1,) Hkv, n, D]."""
        layer = int_arg(layer, "layer", C_INT)
        step = int_arg(step, "step", C_UINT32)
        streams = {}
        qv, qk = tensor_view(q, "q", streams)
        kv, kk = tensor_view(k, "k", streams)
        vv, vk = tensor_view(v, "v", streams)
        with self._lock:
            call(_lib.lib().kvt_capture_submit_decode, self._handle(), layer, step,
                 ctypes.byref(qv), ctypes.byref(kv), ctypes.byref(vv))
        del qk, kk, vk

    def submit_kvzip(self, layer, scores):
        """KVzip's scores of `layer` (the kvzip_score record, traces/FORMAT.md): [Hkv, T] (or
        [Hkv, T, 1]), each key's largest attention in the engine's context-reconstruction pass,
        in [0, 1]; once per layer."""
        layer = int_arg(layer, "layer", C_INT)
        a = np.ascontiguousarray(_host_array(scores), dtype=np.float32)
        want = (self.n_kv_heads, self.n_tokens)
        if a.shape not in (want, want + (1,)):
            raise ValueError("scores: shape %s, not [%d, %d] (KV heads, tokens)"
                             % ((a.shape,) + want))
        with self._lock:
            call(_lib.lib().kvt_capture_submit_kvzip, self._handle(), layer,
                 a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))

    def submit_decode_token(self, step, token_id):
        step = int_arg(step, "step", C_UINT32)
        token_id = int_arg(token_id, "token_id", C_INT32)
        with self._lock:
            call(_lib.lib().kvt_capture_submit_decode_token, self._handle(), step, token_id)

    @staticmethod
    def _stats_dict(s):
        out = {n: int(getattr(s, n)) for n, _ in _lib.CaptureStats._fields_ if n != "writer"}
        out["writer"] = {n: int(getattr(s.writer, n)) for n, _ in _lib.WriterStats._fields_}
        return out

    @staticmethod
    def _copy_stats(d):
        return dict(d, writer=dict(d["writer"]))

    def stats(self):
        """The session's counters (a dict; "writer" holds the writer's); after close(), the
        final ones that close() returned (also when it raised)."""
        with self._lock:
            if self._h is None and self._final is not None:
                return self._copy_stats(self._final)
            s = _lib.CaptureStats()
            _lib.lib().kvt_capture_get_stats(self._handle(), ctypes.byref(s))
        return self._stats_dict(s)

    def close(self):
        """Finish the trace and free the session (freed whatever the result). Returns the
        final stats; raises TraceError if the trace is incomplete or a write failed. With
        force=True over an existing trace, an incomplete or failed trace does not replace it:
        partial_path then names the new trace's temporary file (a RuntimeWarning too).
        Idempotent: closing again returns the same final stats, or raises the same
        TraceError (status and message) as the first close; stats() returns them too."""
        with self._lock:
            if self._h is None and self._final is not None:
                e = self._close_error
                if e is not None:
                    raise TraceError(e.status, str(e))
                return self._copy_stats(self._final)
            h = self._handle()
            s = _lib.CaptureStats()
            try:
                try:
                    self._stop_timeline(h)
                finally:
                    self._h = None
                    try:
                        call(_lib.lib().kvt_capture_close, h, ctypes.byref(s))
                    finally:
                        self._final = self._stats_dict(s)
            except TraceError as e:
                self._close_error = e
                raise
            finally:
                self._replacing.partial("capture session closed incomplete or failed", self)
            return self._copy_stats(self._final)

    @property
    def closed(self):
        return self._h is None

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if self._h is None:
            return False
        if et is None:
            self.close()
        else:
            try:
                self.close()
            except TraceError:
                pass  # the original exception matters more
        return False

    def __del__(self):
        try:
            if getattr(self, "_pid", None) != os.getpid():
                self._h = self._tl = None  # a forked child's copy: the session is the parent's
                return
            if getattr(self, "_tl", None):  # never closed: stop collecting, drop the summary
                tl, self._tl = self._tl, None
                _lib.lib().kvt_timeline_stop(tl, 0, 0, ctypes.byref(_lib.CaptureTimeline()))
            if getattr(self, "_h", None) is not None:
                h, self._h = self._h, None
                _lib.lib().kvt_capture_close(h, None)
        except Exception:
            pass
