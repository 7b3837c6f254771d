"""_capture.py - CaptureSession over the C capture API (capture/kvt_capture.h).

Tensors are handed to C as strided views of the caller's memory: a NumPy array, any object
with __array_interface__ (shape, strides and data pointer are passed through, nothing is
copied in Python), or a torch.Tensor on the CPU or a CUDA device (data_ptr/stride/dtype, bf16
included). For host memory the C side gathers the view into the stored dtype and copies it
before the call returns; a CUDA tensor is read on the producer's stream (torch's current
stream for the tensor's device), so the call does not wait for the GPU.
"""
import ctypes
import json
import os

import numpy as np

from . import _lib
from ._errors import TraceError, call
from ._trace import dtype_code

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


def _i32_array(a, name, ndim_ok=(1,)):
    arr = np.ascontiguousarray(a, dtype=np.int32)
    if arr.ndim not in ndim_ok:
        raise ValueError("%s: bad shape %s" % (name, arr.shape))
    return arr


class CaptureSession:
    """A capture session writing one .kvt trace (kvt_capture_open ... kvt_capture_close).

        with kvtrace.CaptureSession("out.kvt", n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv,
                                    head_dim=D, n_tokens=T, window=W, kv_dtype="f16") as s:
            s.set_tokens(token_ids=ids)
            for l in range(L):
                s.submit_kv(l, 0, k[l], v[l])          # [Hkv, T, D] views
                s.submit_queries(l, 0, q[l])           # [Hq, n, D], last W kept
            ...
    Leaving the block closes the session (finishing the trace); close() returns the stats.

    timeline=True collects a GPU timeline with CUPTI from open to close (kernel time by
    category, copies, and how much of the copies on capture_stream, a CUDA stream handle or
    an object with .cuda_stream such as torch.cuda.Stream, overlapped compute); where CUPTI
    cannot run, timeline_reason says why and the trace records it. set_timeline_absent(reason)
    records why an engine has no timeline."""

    def __init__(self, path, *, n_layers, n_q_heads, n_kv_heads, head_dim, n_tokens, window,
                 kv_dtype="f32", name="model", arch="llama", rope="default", rope_theta=0.0,
                 attn_scale=0.0, engine_name="kvtrace-python", engine_version=None, gpu=None,
                 n_decode=0, decode_chunk=0, with_colsum=False, with_q_all=False, capture=None,
                 level=0, n_threads=0, max_pending_bytes=0, max_record_bytes=0,
                 no_shuffle=False, force=False, timeline=False, capture_stream=None):
        L = _lib.lib()
        if not _lib.has_capture():
            raise TraceError(-13, "%s was built without the capture API" % _lib.lib_path())
        from . import __version__
        self.path = os.fspath(path)
        self._strings = [s.encode("utf-8") if s is not None else None for s in
                         (name, arch, engine_name, engine_version or __version__, gpu)]
        rope_code = _lib.ROPE_KINDS[rope] if isinstance(rope, str) else int(rope)
        model = _lib.CaptureModel(
            name=self._strings[0], arch=self._strings[1], n_layers=n_layers,
            n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            kv_dtype=dtype_code(kv_dtype), rope=rope_code, rope_theta=rope_theta,
            attn_scale=attn_scale, engine_name=self._strings[2],
            engine_version=self._strings[3], gpu=self._strings[4])
        cj = None
        if capture is not None:
            cj = (capture if isinstance(capture, str) else json.dumps(capture)).encode("utf-8")
        self._cj = cj
        opts = _lib.CaptureOpts(
            n_tokens=n_tokens, window=window, n_decode=n_decode, decode_chunk=decode_chunk,
            with_colsum=with_colsum, with_q_all=with_q_all, capture_json=cj,
            writer=_lib.WriterOpts(level=level, n_threads=n_threads,
                                   max_pending_bytes=max_pending_bytes, no_shuffle=no_shuffle,
                                   max_record_bytes=max_record_bytes, force=force))
        h = ctypes.c_void_p()
        call(L.kvt_capture_open, os.fsencode(self.path), ctypes.byref(model),
             ctypes.byref(opts), ctypes.byref(h))
        self._h = h
        self.n_layers = n_layers
        self._tl = None
        self._tl_stream = 0
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
            sid = ctypes.c_uint32()
            call(L.kvt_timeline_stream_id, tl, ctypes.c_void_p(int(handle)), ctypes.byref(sid))
            self._tl_stream = sid.value

    def set_timeline_absent(self, reason):
        """Record why the trace has no GPU timeline (one line)."""
        self.timeline_reason = str(reason)
        call(_lib.lib().kvt_capture_set_timeline_absent, self._handle(),
             self.timeline_reason.encode("utf-8"))

    def _stop_timeline(self, h):
        tl, self._tl = self._tl, None
        if not tl:
            return
        L = _lib.lib()
        t = _lib.CaptureTimeline()
        st = L.kvt_timeline_stop(tl, self._tl_stream, ctypes.byref(t))
        if st == 0:
            self.timeline = {n: int(getattr(t, n)) for n, _ in _lib.CaptureTimeline._fields_}
            call(L.kvt_capture_set_timeline, h, ctypes.byref(t))
        else:
            self.timeline_reason = "CUPTI: " + L.kvt_error_msg().decode("utf-8", "replace")
            call(L.kvt_capture_set_timeline_absent, h, self.timeline_reason.encode("utf-8"))

    def _handle(self):
        if self._h is None:
            raise TraceError(-9, "capture session for %s is closed" % self.path)
        return self._h

    def set_tokens(self, token_ids=None, modality=None, positions=None):
        """Per-token tables: token_ids [T] int, modality [T] (ints 0..3 or names "text",
        "image", "video", "other"), positions [T] or [P, T] (P = 1 or 3). Each may be None."""
        L = _lib.lib()
        ids = mod = pos = None
        n_rows = 0
        if token_ids is not None:
            ids = _i32_array(token_ids, "token_ids")
        if modality is not None:
            m = list(modality) if not isinstance(modality, np.ndarray) else modality
            if len(m) and isinstance(m[0], str):
                m = [_lib.MODALITIES[x] for x in m]
            mod = np.ascontiguousarray(m, dtype=np.uint8)
        if positions is not None:
            pos = _i32_array(positions, "positions", (1, 2))
            n_rows = 1 if pos.ndim == 1 else pos.shape[0]
        p = ctypes.POINTER
        call(L.kvt_capture_set_tokens, self._handle(),
             ids.ctypes.data_as(p(ctypes.c_int32)) if ids is not None else None,
             mod.ctypes.data_as(p(ctypes.c_uint8)) if mod is not None else None,
             pos.ctypes.data_as(p(ctypes.c_int32)) if pos is not None else None, n_rows)

    def submit_kv(self, layer, tok_begin, k, v):
        """Keys and values of `layer` for tokens [tok_begin, tok_begin + n): [(1,) Hkv, n, D]."""
        streams = {}
        kv, kk = tensor_view(k, "k", streams)
        vv, vk = tensor_view(v, "v", streams)
        call(_lib.lib().kvt_capture_submit_kv, self._handle(), int(layer), int(tok_begin),
             ctypes.byref(kv), ctypes.byref(vv))
        del kk, vk

    def submit_queries(self, layer, tok_begin, q):
        """Prompt queries of `layer` for tokens [tok_begin, tok_begin + n): [(1,) Hq, n, D]."""
        qv, qk = tensor_view(q, "q")
        call(_lib.lib().kvt_capture_submit_queries, self._handle(), int(layer), int(tok_begin),
             ctypes.byref(qv))
        del qk

    def submit_decode(self, layer, step, q, k, v):
        """Decode steps [step, step + n) of `layer`: q [(1,) Hq, n, D], k, v [(1,) Hkv, n, D]."""
        streams = {}
        qv, qk = tensor_view(q, "q", streams)
        kv, kk = tensor_view(k, "k", streams)
        vv, vk = tensor_view(v, "v", streams)
        call(_lib.lib().kvt_capture_submit_decode, self._handle(), int(layer), int(step),
             ctypes.byref(qv), ctypes.byref(kv), ctypes.byref(vv))
        del qk, kk, vk

    def submit_decode_token(self, step, token_id):
        call(_lib.lib().kvt_capture_submit_decode_token, self._handle(), int(step),
             int(token_id))

    @staticmethod
    def _stats_dict(s):
        out = {n: int(getattr(s, n)) for n, _ in _lib.CaptureStats._fields_ if n != "writer"}
        out["writer"] = {n: int(getattr(s.writer, n)) for n, _ in _lib.WriterStats._fields_}
        return out

    def stats(self):
        s = _lib.CaptureStats()
        _lib.lib().kvt_capture_get_stats(self._handle(), ctypes.byref(s))
        return self._stats_dict(s)

    def close(self):
        """Finish the trace and free the session (freed whatever the result). Returns the
        final stats; raises TraceError if the trace is incomplete or a write failed."""
        h = self._handle()
        try:
            self._stop_timeline(h)
        finally:
            self._h = None
            s = _lib.CaptureStats()
            call(_lib.lib().kvt_capture_close, h, ctypes.byref(s))
        return self._stats_dict(s)

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
            if getattr(self, "_tl", None):  # never closed: stop collecting, drop the summary
                tl, self._tl = self._tl, None
                _lib.lib().kvt_timeline_stop(tl, 0, ctypes.byref(_lib.CaptureTimeline()))
            if getattr(self, "_h", None) is not None:
                h, self._h = self._h, None
                _lib.lib().kvt_capture_close(h, None)
        except Exception:
            pass
