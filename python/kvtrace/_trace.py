"""_trace.py - the trace reader (Trace, open), writer (TraceWriter) and verify()."""
import ctypes
import json
import os

import numpy as np

from . import _lib
from ._errors import TraceError, call

# stored dtype code -> NumPy dtype returned by read(dtype=None). bf16 has no NumPy type: its
# raw 16-bit patterns come back as uint16 (bf16_to_f32 converts them).
_NP_OF_CODE = {
    _lib.DTYPE_F16: np.dtype("<f2"),
    _lib.DTYPE_BF16: np.dtype("<u2"),
    _lib.DTYPE_F32: np.dtype("<f4"),
    _lib.DTYPE_I32: np.dtype("<i4"),
    _lib.DTYPE_U8: np.dtype("u1"),
}
_FLOAT_CODES = (_lib.DTYPE_F16, _lib.DTYPE_BF16, _lib.DTYPE_F32)


def kind_code(kind):
    """Kind name ("K", "q_window", ...; case-insensitive) or code -> code."""
    if isinstance(kind, (int, np.integer)):
        return int(kind)
    if isinstance(kind, str):
        for name, code in _lib.KINDS.items():
            if name.lower() == kind.lower():
                return code
    raise ValueError("unknown record kind %r (known: %s)" % (kind, ", ".join(_lib.KINDS)))


def kind_name(code):
    return _lib.KIND_NAMES.get(code, "kind%d" % code)


def dtype_code(dt):
    """"f16"/"float16"/np.float16, "bf16"/"bfloat16", "f32"/"float32"/np.float32, "i32", "u8"
    -> kvt_dtype code."""
    if isinstance(dt, (int, np.integer)):
        return int(dt)
    if isinstance(dt, str):
        s = dt.lower()
        alias = {"f16": 1, "fp16": 1, "float16": 1, "half": 1, "bf16": 2, "bfloat16": 2,
                 "f32": 3, "fp32": 3, "float32": 3, "float": 3, "i32": 4, "int32": 4,
                 "u8": 5, "uint8": 5}
        if s in alias:
            return alias[s]
        raise ValueError("unknown dtype %r" % dt)
    d = np.dtype(dt)
    if d.name == "bfloat16":  # ml_dtypes
        return _lib.DTYPE_BF16
    m = {"float16": 1, "float32": 3, "int32": 4, "uint8": 5}
    if d.name not in m:
        raise ValueError("dtype %s has no kvtrace equivalent" % d)
    return m[d.name]


def bf16_to_f32(a):
    """uint16 bf16 bit patterns -> float32 (exact)."""
    a = np.asarray(a, dtype=np.uint16)
    return (a.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a):
    """float32 -> uint16 bf16 bit patterns, round to nearest even, NaN kept quiet."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    nan = np.isnan(a)
    rounded = np.where(nan, ((bits >> 16) | 0x40) & 0xFFFF, rounded)
    return rounded.astype(np.uint16)


def _record_dict(ri):
    return {
        "kind": kind_name(ri.kind),
        "kind_code": int(ri.kind),
        "layer": int(ri.layer),
        "head_begin": int(ri.head_begin),
        "head_end": int(ri.head_end),
        "tok_begin": int(ri.tok_begin),
        "tok_end": int(ri.tok_end),
        "dim": int(ri.dim),
        "dtype": _lib.DTYPE_NAMES.get(ri.dtype, "dtype%d" % ri.dtype),
        "filter": int(ri.filter),
        "seq": int(ri.seq),
        "raw_bytes": int(ri.raw_bytes),
        "comp_bytes": int(ri.comp_bytes),
        "file_offset": int(ri.file_offset),
    }


def verify(path):
    """Check every checksum of a trace (kvt_trace_verify). Returns a dict: ok, header_ok,
    trailer_ok, index_ok, n_records_ok, n_records_bad, n_records_expected, tail_bytes_lost,
    problems (list of {file_offset, seq, kind, layer, what}). Raises TraceError if the file is
    not a trace at all (I/O error, bad magic, unknown major version)."""
    L = _lib.lib()
    rep = _lib.VerifyReport()
    call(L.kvt_trace_verify, os.fsencode(path), ctypes.byref(rep))
    try:
        problems = []
        for i in range(rep.n_problems):
            p = rep.problems[i]
            problems.append({
                "file_offset": int(p.file_offset), "seq": int(p.seq),
                "kind": kind_name(p.kind) if p.kind else None, "layer": int(p.layer),
                "what": p.what.decode("utf-8", "replace"),
            })
        out = {
            "header_ok": bool(rep.header_ok), "trailer_ok": bool(rep.trailer_ok),
            "index_ok": bool(rep.index_ok), "n_records_ok": int(rep.n_records_ok),
            "n_records_bad": int(rep.n_records_bad),
            "n_records_expected": int(rep.n_records_expected),
            "tail_bytes_lost": int(rep.tail_bytes_lost), "problems": problems,
        }
    finally:
        L.kvt_verify_report_free(ctypes.byref(rep))
    out["ok"] = (out["header_ok"] and out["trailer_ok"] and out["index_ok"]
                 and out["n_records_bad"] == 0 and out["tail_bytes_lost"] == 0
                 and not problems)
    return out


class Trace:
    """A .kvt trace opened for reading (kvt_trace_reader). Use kvtrace.open(path).

    Attributes: path, header (dict), records (list of dicts, file order), tokens (dict of
    token tables), meta (list of meta_json objects), version (major, minor), recovered,
    recovery_note, file_bytes, bytes_read. Methods: read, shape, stored_dtype, has, layers,
    verify, close. A context manager."""

    def __init__(self, path):
        self.path = os.fspath(path)
        L = _lib.lib()
        h = ctypes.c_void_p()
        call(L.kvt_trace_reader_open, os.fsencode(self.path), ctypes.byref(h))
        self._h = h
        self._records = None
        self._tokens = None
        try:
            txt = L.kvt_trace_reader_header_json(h)
            self.header = json.loads(txt.decode("utf-8")) if txt else {}
        except Exception:
            self.close()
            raise

    # ---- lifetime ----
    def close(self):
        h = getattr(self, "_h", None)
        if h is not None and h.value:
            _lib.lib().kvt_trace_reader_close(h)
        self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _handle(self):
        if self._h is None:
            raise TraceError(-9, "trace %s is closed" % self.path)
        return self._h

    def __repr__(self):
        m = self.header.get("model", {}) if isinstance(self.header, dict) else {}
        return "<kvtrace.Trace %r model=%r L=%s T=%s>" % (
            self.path, m.get("name"), m.get("n_layers"), self.header.get("n_tokens"))

    # ---- file facts ----
    @property
    def version(self):
        a, b = ctypes.c_int(), ctypes.c_int()
        _lib.lib().kvt_trace_reader_version(self._handle(), ctypes.byref(a), ctypes.byref(b))
        return (a.value, b.value)

    @property
    def recovered(self):
        return bool(_lib.lib().kvt_trace_reader_recovered(self._handle()))

    @property
    def recovery_note(self):
        s = _lib.lib().kvt_trace_reader_recovery_note(self._handle())
        return s.decode("utf-8", "replace") if s else ""

    @property
    def file_bytes(self):
        return int(_lib.lib().kvt_trace_reader_file_bytes(self._handle()))

    @property
    def bytes_read(self):
        return int(_lib.lib().kvt_trace_reader_bytes_read(self._handle()))

    @property
    def records(self):
        if self._records is None:
            L = _lib.lib()
            h = self._handle()
            out = []
            for i in range(L.kvt_trace_reader_n_records(h)):
                ri = _lib.RecordInfo()
                call(L.kvt_trace_reader_record, h, i, ctypes.byref(ri))
                out.append(_record_dict(ri))
            self._records = out
        return list(self._records)

    def layers(self, kind="K"):
        """Sorted layer numbers that have records of `kind`."""
        c = kind_code(kind)
        return sorted({r["layer"] for r in self.records if r["kind_code"] == c})

    # ---- tensors ----
    def _layer_arg(self, code, layer):
        if layer is None:
            if code in _lib.TABLE_KINDS:
                return -1
            raise ValueError("%s is a per-layer tensor: pass layer=" % kind_name(code))
        return int(layer)

    def _shape_c(self, code, layer):
        nh, nt, dim, dt = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_int()
        call(_lib.lib().kvt_trace_reader_shape, self._handle(), layer, code, ctypes.byref(nh),
             ctypes.byref(nt), ctypes.byref(dim), ctypes.byref(dt))
        return nh.value, nt.value, dim.value, dt.value

    def has(self, kind, layer=None):
        c = kind_code(kind)
        lay = -1 if (layer is None and c in _lib.TABLE_KINDS) else layer
        return any(r["kind_code"] == c and (lay is None or r["layer"] == lay)
                   for r in self.records)

    def shape(self, kind, layer=None):
        """(n_heads, n_tok, dim) of the (layer, kind) tensor. TraceError if absent."""
        c = kind_code(kind)
        nh, nt, dim, _ = self._shape_c(c, self._layer_arg(c, layer))
        return (nh, nt, dim)

    def stored_dtype(self, kind, layer=None):
        """Stored dtype name ("f16", "bf16", "f32", "i32", "u8") of (layer, kind)."""
        c = kind_code(kind)
        return _lib.DTYPE_NAMES.get(self._shape_c(c, self._layer_arg(c, layer))[3])

    def read(self, kind, layer=None, heads=None, dtype=None):
        """Read a (layer, kind) tensor as a [heads, n_tok, dim] NumPy array.

        kind:  name or code ("K", "V", "Q_window", "Q_decode", "attn_colsum", "token_ids"...).
        layer: required for per-layer kinds; tables (layer -1) need none.
        heads: None (all), an int (that head; the head axis is dropped), a (begin, end)
               tuple, a range/slice, or a list of head numbers.
        dtype: None = the stored dtype (f16 -> float16, bf16 -> uint16 bit patterns,
               f32 -> float32, i32 -> int32, u8 -> uint8); "float32" (or "f32", np.float32)
               converts (float kinds in the C library, exactly).
        Only the records that intersect the heads are read."""
        c = kind_code(kind)
        lay = self._layer_arg(c, layer)
        nh, nt, dim, stored = self._shape_c(c, lay)
        squeeze, index = False, None
        if heads is None:
            hb, he = 0, nh
        elif isinstance(heads, (int, np.integer)):
            h = int(heads)
            if h < 0:
                h += nh
            if not 0 <= h < nh:
                raise IndexError("head %d out of range [0, %d)" % (int(heads), nh))
            hb, he, squeeze = h, h + 1, True
        elif isinstance(heads, tuple) and len(heads) == 2 and all(
                isinstance(x, (int, np.integer)) for x in heads):
            hb, he = int(heads[0]), int(heads[1])
        else:
            if isinstance(heads, slice):
                sel = list(range(nh))[heads]
            else:
                sel = [int(x) for x in heads]
            if not sel:
                raise ValueError("empty head selection")
            if any(not 0 <= x < nh for x in sel):
                raise IndexError("head out of range [0, %d): %r" % (nh, sel))
            hb, he = min(sel), max(sel) + 1
            if sel != list(range(hb, he)):
                index = [x - hb for x in sel]
        if not (0 <= hb < he <= nh):
            raise IndexError("heads [%d, %d) out of range [0, %d)" % (hb, he, nh))
        want_f32 = dtype is not None and dtype_code(dtype) == _lib.DTYPE_F32
        if dtype is not None and not want_f32:
            if dtype_code(dtype) != stored:
                raise ValueError("dtype must be None (stored) or float32")
        as_code = _lib.DTYPE_F32 if (want_f32 and stored in _FLOAT_CODES) else 0
        npdt = np.dtype("<f4") if as_code else _NP_OF_CODE.get(stored)
        if npdt is None:
            raise TraceError(-13, "unknown stored dtype code %d" % stored)
        out = np.empty((he - hb, nt, dim), dtype=npdt)
        call(_lib.lib().kvt_trace_reader_read, self._handle(), lay, c, hb, he, as_code,
             out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        if want_f32 and not as_code:
            out = out.astype(np.float32)
        if index is not None:
            out = out[index]
        if squeeze:
            out = out[0]
        return out

    def read_record(self, i):
        """The decoded payload of record i (file order) as a [heads, n_tok, dim] array in the
        stored dtype."""
        r = self.records[i]
        npdt = _NP_OF_CODE[_lib.DTYPE_CODES[r["dtype"]]]
        out = np.empty((r["head_end"] - r["head_begin"], r["tok_end"] - r["tok_begin"],
                        r["dim"]), dtype=npdt)
        call(_lib.lib().kvt_trace_reader_read_record, self._handle(), i,
             out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    # ---- tables ----
    @property
    def tokens(self):
        """Token tables as NumPy arrays, None where the trace has none:
        token_ids [T] int32, modality [T] uint8 (0 text, 1 image, 2 video, 3 other),
        positions [P, T] int32 (P = 1, or 3 for M-RoPE), decode_token_ids [G] int32,
        token_text list of str."""
        if self._tokens is None:
            t = {}
            for name in ("token_ids", "modality", "decode_token_ids"):
                t[name] = self.read(name)[0, :, 0] if self.has(name) else None
            t["positions"] = self.read("positions")[:, :, 0] if self.has("positions") else None
            if self.has("token_text"):
                raw = self.read("token_text").tobytes()
                parts = raw.split(b"\0")
                if parts and parts[-1] == b"":
                    parts = parts[:-1]
                t["token_text"] = [p.decode("utf-8", "replace") for p in parts]
            else:
                t["token_text"] = None
            self._tokens = t
        return dict(self._tokens)

    @property
    def meta(self):
        """The meta_json records, parsed, in file order."""
        out = []
        for i, r in enumerate(self.records):
            if r["kind_code"] == _lib.KINDS["meta_json"]:
                raw = self.read_record(i).tobytes().rstrip(b"\0")
                out.append(json.loads(raw.decode("utf-8")))
        return out

    def verify(self):
        """kvtrace.verify(self.path)."""
        return verify(self.path)


def open(path):  # noqa: A001 - the module-level name users expect
    """Open a .kvt trace for reading; raises TraceError (with the C library's message)."""
    return Trace(path)


class TraceWriter:
    """Write a .kvt trace directly (kvt_trace_writer): for tests, converters and engines that
    do not need the capture session's bookkeeping.

        with kvtrace.TraceWriter("x.kvt", {"format": "kvtrace", ...}) as w:
            w.append("K", k, layer=0)             # k: [H, T, D] array
            w.append("token_ids", ids)            # 1-D tables become [1, T, 1]
    The header should follow traces/FORMAT.md (JSON header) for other tools to use the file.
    Leaving the block normally finishes the file (index + trailer); an exception leaves it
    unfinished, as a crash would. With force=True over an existing trace, the new one is
    written next to it (PATH.tmp.PID.N) and renamed over it only by finish(): unfinished, the
    old trace stays and the new records are in that file."""

    def __init__(self, path, header, level=0, n_threads=0, max_pending_bytes=0,
                 no_shuffle=False, max_record_bytes=0, force=False):
        self.path = os.fspath(path)
        L = _lib.lib()
        if not isinstance(header, str):
            header = json.dumps(header)
        opts = _lib.WriterOpts(level=level, n_threads=n_threads,
                               max_pending_bytes=max_pending_bytes, no_shuffle=no_shuffle,
                               max_record_bytes=max_record_bytes, force=force)
        h = ctypes.c_void_p()
        call(L.kvt_trace_writer_create, os.fsencode(self.path), header.encode("utf-8"),
             ctypes.byref(opts), ctypes.byref(h))
        self._h = h
        self._finished = False

    def _handle(self):
        if self._h is None:
            raise TraceError(-9, "writer for %s is closed" % self.path)
        return self._h

    def append(self, kind, data, layer=None, head_begin=0, tok_begin=0, dtype=None):
        """Append a [H, T, D] block (1-D -> [1, T, 1], 2-D [P, T] -> [P, T, 1]) covering heads
        [head_begin, head_begin+H) and tokens [tok_begin, tok_begin+T) of (layer, kind).
        dtype: None = from the array (float16, float32, int32, uint8); "bf16" stores bf16
        (uint16 arrays are taken as bit patterns, float arrays are rounded)."""
        c = kind_code(kind)
        if layer is None:
            if c not in _lib.TABLE_KINDS:
                raise ValueError("%s is a per-layer tensor: pass layer=" % kind_name(c))
            layer = -1
        a = np.asarray(data)
        if a.ndim == 1:
            a = a.reshape(1, -1, 1)
        elif a.ndim == 2:
            a = a.reshape(a.shape[0], a.shape[1], 1)
        elif a.ndim != 3:
            raise ValueError("data must be 1-, 2- or 3-D, got shape %s" % (a.shape,))
        if dtype is not None and dtype_code(dtype) == _lib.DTYPE_BF16:
            code = _lib.DTYPE_BF16
            if a.dtype != np.uint16:
                a = f32_to_bf16(a.astype(np.float32))
        else:
            code = dtype_code(dtype if dtype is not None else a.dtype)
            a = a.astype(_NP_OF_CODE[code], copy=False)
        a = np.ascontiguousarray(a)
        info = _lib.RecordInfo(kind=c, layer=int(layer), head_begin=head_begin,
                               head_end=head_begin + a.shape[0], tok_begin=tok_begin,
                               tok_end=tok_begin + a.shape[1], dim=a.shape[2], dtype=code)
        call(_lib.lib().kvt_trace_writer_append, self._handle(), ctypes.byref(info),
             a.ctypes.data_as(ctypes.c_void_p))

    def append_json(self, obj):
        """Append a meta_json record (obj: dict or JSON text)."""
        if not isinstance(obj, str):
            obj = json.dumps(obj)
        call(_lib.lib().kvt_trace_writer_append_json, self._handle(), obj.encode("utf-8"))

    def stats(self):
        s = _lib.WriterStats()
        _lib.lib().kvt_trace_writer_get_stats(self._handle(), ctypes.byref(s))
        return {n: int(getattr(s, n)) for n, _ in _lib.WriterStats._fields_}

    def finish(self):
        """Write the index and trailer (then only close is allowed)."""
        call(_lib.lib().kvt_trace_writer_finish, self._handle())
        self._finished = True

    def close(self):
        """Free the writer; without finish() the file is left as a crash would leave it (a
        forced replacement: in its temporary file, the old trace untouched)."""
        if self._h is not None and self._h.value:
            _lib.lib().kvt_trace_writer_free(self._h)
        self._h = None

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        try:
            if et is None and not self._finished:
                self.finish()
        finally:
            self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
