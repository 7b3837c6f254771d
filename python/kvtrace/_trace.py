"""_trace.py - the trace reader (Trace, open), writer (TraceWriter) and verify(), and the
argument checks shared by the binding (integers that must fit their C type, paths and strings
without NUL)."""
import contextlib
import ctypes
import json
import operator
import os
import threading
import warnings
import weakref

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
# the stored dtype of each integer token table (traces/FORMAT.md)
_TABLE_DTYPE = {_lib.KINDS["token_ids"]: _lib.DTYPE_I32, _lib.KINDS["modality"]: _lib.DTYPE_U8,
                _lib.KINDS["positions"]: _lib.DTYPE_I32,
                _lib.KINDS["decode_token_ids"]: _lib.DTYPE_I32}
# every table (layer -1) and its dtype; the per-layer kinds (layer 0..L-1) and theirs
_TABLE_STORED = dict(_TABLE_DTYPE)
_TABLE_STORED[_lib.KINDS["token_text"]] = _lib.DTYPE_U8
_TABLE_STORED[_lib.KINDS["meta_json"]] = _lib.DTYPE_U8
_LAYER_DTYPES = {code: _FLOAT_CODES for name, code in _lib.KINDS.items()
                 if code not in _lib.TABLE_KINDS}
_LAYER_DTYPES[_lib.KINDS["attn_colsum"]] = (_lib.DTYPE_F32,)
_MAX_MODALITY = max(_lib.MODALITIES.values())  # 0 text, 1 image, 2 video, 3 other

# ---- argument checks: ctypes silently wraps an integer that does not fit its C type, and a
# char * ends at the first NUL, so both are refused before any C call ----
C_INT = ("int", -(1 << 31), (1 << 31) - 1)
C_INT32 = ("int32", -(1 << 31), (1 << 31) - 1)
C_UINT32 = ("uint32", 0, (1 << 32) - 1)
C_UINT64 = ("uint64", 0, (1 << 64) - 1)


def int_arg(value, name, ctype, lo=None, hi=None):
    """value as a Python int that fits the C type `ctype` (C_INT, C_UINT32, ...) and [lo, hi]
    when given. TypeError for a non-integer (a float, a str), ValueError out of range; both
    name the argument."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError("%s must be an integer, got %r (%s)"
                        % (name, value, type(value).__name__)) from None
    cname, clo, chi = ctype
    lo = clo if lo is None else max(lo, clo)
    hi = chi if hi is None else min(hi, chi)
    if not lo <= v <= hi:
        raise ValueError("%s = %d is out of range [%d, %d]%s" % (
            name, v, lo, hi, " (the C type is %s)" % cname if (lo, hi) == (clo, chi) else ""))
    return v


def path_arg(path, name="path"):
    """(str or bytes path, its bytes for C). TypeError for a non-path, ValueError for a NUL."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError("%s must be a str, bytes or os.PathLike, got %s"
                        % (name, type(path).__name__)) from None
    b = os.fsencode(p)
    if b"\0" in b:
        raise ValueError("%s %r contains a NUL character" % (name, p))
    return p, b


def str_arg(value, name):
    """A str (or None) as UTF-8 bytes for a char * argument; TypeError for a non-str,
    ValueError for a NUL (C would cut the string there) or a lone surrogate (os.fsdecode's
    stand-in for a non-UTF-8 byte: the trace's JSON header holds UTF-8 text only)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("%s must be a str, got %r (%s)" % (name, value, type(value).__name__))
    if "\0" in value:
        raise ValueError("%s %r contains a NUL character" % (name, value))
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("%s %r is not valid Unicode text (a lone surrogate)"
                         % (name, value)) from None


def _is_torch(x):
    """A torch.Tensor (or Parameter), told by its type's module: torch is not imported here."""
    return type(x).__module__.split(".")[0] == "torch" and callable(getattr(x, "detach", None))


def host_array(x):
    """(NumPy array, bf16) of x, where bf16 says the array holds bf16 bit patterns (uint16).
    A torch.Tensor is detached (requires_grad is fine) and brought to the host, a bfloat16
    one as its bit patterns (exact: NumPy has no bfloat16); an ml_dtypes bfloat16 array gives
    its bit patterns too; bytes-like objects are uint8; anything else goes through
    np.asarray."""
    if _is_torch(x):
        import torch
        t = x.detach()
        if t.dtype == torch.bfloat16:
            return t.cpu().contiguous().view(torch.int16).numpy().view(np.uint16), True
        return t.cpu().numpy(), False
    if isinstance(x, (bytes, bytearray, memoryview)):
        return np.frombuffer(x, np.uint8), False
    a = np.asarray(x)
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:  # ml_dtypes
        return a.view(np.uint16), True
    return a, False


def _describe(x):
    """What x is, for an error message: "a float32 array", "a torch.float32 tensor", ..."""
    if _is_torch(x):
        return "a %s tensor" % x.dtype
    if isinstance(x, (np.ndarray, np.generic)):
        return "a %s %s" % (x.dtype, "array" if isinstance(x, np.ndarray) else "scalar")
    return "%r (%s)" % (x, type(x).__name__) if len(repr(x)) <= 40 else "a %s" % type(x).__name__


def _json_default(o):
    """json.dumps(default=): NumPy scalars and arrays as the Python values they hold."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError("Object of type %s is not JSON serializable" % type(o).__name__)


def json_text(obj, what):
    """obj (a dict) as JSON text; NumPy scalars and arrays are written as their values.
    ValueError starting with `what` for what JSON cannot hold: NaN and Infinity (not JSON:
    readers refuse them), an object of another type."""
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default)
    except ValueError as e:
        if "Out of range float" in str(e):
            raise ValueError("%s: NaN and Infinity are not allowed (JSON has no such numbers)"
                             % what) from None
        raise ValueError("%s cannot be written as JSON: %s" % (what, e)) from None
    except TypeError as e:
        raise ValueError("%s cannot be written as JSON: %s" % (what, e)) from None


class _NotJson(ValueError):
    pass


def _no_constant(c):
    raise _NotJson("%s is not allowed in JSON" % c)


def check_json_object(text, what):
    """text must be one JSON object (no NaN or Infinity): ValueError starting with `what`."""
    try:
        parsed = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise ValueError("%s: the text is not valid JSON (%s): %r" % (what, e, text[:80])) \
            from None
    if not isinstance(parsed, dict):
        raise ValueError("%s: the text must be one JSON object, got a %s"
                         % (what, type(parsed).__name__))


def header_text(header, what="header"):
    """A JSON header (dict, or its text) as bytes for C. A dict is written by json_text; a
    text holding NaN or Infinity is refused here (the C library would only say "not a JSON
    object"); other faults of a text are the C library's to report."""
    if isinstance(header, str):
        try:
            json.loads(header, parse_constant=_no_constant)
        except _NotJson as e:
            raise ValueError("%s: %s" % (what, e)) from None
        except ValueError:
            pass  # not JSON at all: the C library says so
    else:
        header = json_text(header, what)
    return str_arg(header, what)


def force_message(e):
    """A TraceError from opening a writer or session over an existing file, with the C
    library's "(use --force to overwrite)" (the CLI's option) said the Python way."""
    msg = str(e)
    if "--force" not in msg:
        return e
    return TraceError(e.status, msg.replace("(use --force to overwrite)",
                                            "(pass force=True to overwrite it)"))


class _Replacing(object):
    """The file a writer with force=True writes when it replaces an existing trace: the
    library renames it over the trace only when the new one is finished (and, for a capture,
    complete), and otherwise leaves it there and the old trace unchanged, which it reports
    only on stderr. after(file) takes kvt_trace_writer_file / kvt_capture_file right after the
    open; partial(what, owner) after the close: owner.partial_path = that temporary file if it
    is still there (else None), then a Python warning naming it (set first: with warnings as
    errors, the warning is raised and partial_path still says where the new trace is)."""

    def __init__(self, path_str, path_bytes):
        self.final = path_str
        self._bytes = path_bytes
        self.tmp = None

    def after(self, file_bytes):
        if file_bytes and file_bytes != self._bytes:
            self.tmp = os.fsdecode(file_bytes)

    def partial(self, what, owner):
        owner.partial_path = None
        if self.tmp is None or not os.path.exists(self.tmp):
            return
        owner.partial_path = self.tmp
        warnings.warn("kvtrace: %s: %s was not replaced (it is unchanged); the new trace is in "
                      "%s" % (what, self.final, self.tmp), RuntimeWarning, stacklevel=3)


# Objects whose locks a forked child must not inherit in the state another thread of the
# parent left them in (held, or counting a call in flight): each has _after_fork().
_FORK_RESET = weakref.WeakSet()


def _after_fork_in_child():
    for o in list(_FORK_RESET):
        o._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Guard(object):
    """Serialises a C handle's uses against its end across threads. shared(): around a call
    the C library allows concurrently (reader reads, writer appends); exclusive(): around
    finish/close, which holds new calls back as soon as it waits, then waits for the calls in
    flight (so a stream of calls from other threads cannot starve it). Not re-entrant: a
    thread inside shared() must not call exclusive()."""

    def __init__(self):
        self._after_fork()
        _FORK_RESET.add(self)

    def _after_fork(self):
        self._cv = threading.Condition(threading.Lock())
        self._users = 0
        self._waiting = 0
        self._excl = False

    @contextlib.contextmanager
    def shared(self):
        with self._cv:
            while self._excl or self._waiting:
                self._cv.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._cv:
                self._users -= 1
                if not self._users:
                    self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cv:
            self._waiting += 1
            try:
                while self._excl or self._users:
                    self._cv.wait()
            finally:
                self._waiting -= 1
            self._excl = True
        try:
            yield
        finally:
            with self._cv:
                self._excl = False
                self._cv.notify_all()


class _NoCopy(object):
    """A handle on a C object: a copy would free it twice."""

    def __copy__(self):
        raise TypeError("a %s cannot be copied (it owns a C handle): open another one"
                        % type(self).__name__)

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError("a %s cannot be pickled (it owns a C handle)" % type(self).__name__)


def _is_scalar(x):
    """A number rather than a collection: Python and NumPy scalars, 0-d arrays and tensors."""
    if isinstance(x, (int, float, complex, np.generic)):
        return True
    return getattr(x, "ndim", None) == 0 and not isinstance(x, (str, bytes))


def head_number(x, name="heads"):
    """One head number as a Python int: an int, a NumPy integer, a 0-d integer array or
    tensor. TypeError naming `name` for anything else: a float (2.0 too: as for every
    integer argument of the binding), a bool (a mask is not a head list), a string."""
    dt = getattr(x, "dtype", None)
    if isinstance(x, bool) or (dt is not None and str(dt) in ("bool", "torch.bool")):
        raise TypeError("%s takes head numbers, got %s: a boolean mask is not a head list "
                        "(pass np.flatnonzero(mask))" % (name, _describe(x)))
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError("%s takes integer head numbers, got %s" % (name, _describe(x))) \
            from None


def kind_code(kind):
    """Kind name ("K", "q_window", ...; case-insensitive) or code -> code."""
    if isinstance(kind, (bool, np.bool_)):
        raise TypeError("kind must be a name or a code, not a bool")
    if isinstance(kind, (int, np.integer)):
        return int_arg(kind, "kind", C_INT)
    if isinstance(kind, str):
        for name, code in _lib.KINDS.items():
            if name.lower() == kind.lower():
                return code
    raise ValueError("unknown record kind %r (known: %s)" % (kind, ", ".join(_lib.KINDS)))


def kind_name(code):
    return _lib.KIND_NAMES.get(code, "kind%d" % code)


_DTYPE_ALIAS = {"f16": 1, "fp16": 1, "float16": 1, "half": 1, "bf16": 2, "bfloat16": 2,
                "f32": 3, "fp32": 3, "float32": 3, "float": 3, "i32": 4, "int32": 4,
                "u8": 5, "uint8": 5}


def dtype_code(dt):
    """"f16"/"float16"/np.float16/torch.float16, "bf16"/"bfloat16"/torch.bfloat16,
    "f32"/"float32"/np.float32/torch.float32, "i32", "u8" -> kvt_dtype code."""
    if isinstance(dt, (bool, np.bool_)):
        raise TypeError("dtype must be a name, a NumPy/torch dtype or a code, not a bool")
    if isinstance(dt, (int, np.integer)):
        return int_arg(dt, "dtype code", C_INT)
    if isinstance(dt, str):
        s = dt.lower()
        if s in _DTYPE_ALIAS:
            return _DTYPE_ALIAS[s]
        raise ValueError("unknown dtype %r (known: f16, bf16, f32, i32, u8 and their NumPy "
                         "and torch names)" % dt)
    if type(dt).__module__ == "torch" and str(dt).startswith("torch."):  # a torch.dtype
        name = str(dt)[len("torch."):]
        if name in _DTYPE_ALIAS:
            return _DTYPE_ALIAS[name]
        raise ValueError("dtype %s has no kvtrace equivalent" % dt)
    try:
        d = np.dtype(dt)
    except TypeError:
        raise TypeError("dtype %r is not a dtype (f16, bf16, f32, i32, u8 and their NumPy and "
                        "torch names)" % (dt,)) from None
    if d.name == "bfloat16":  # ml_dtypes
        return _lib.DTYPE_BF16
    m = {"float16": 1, "float32": 3, "int32": 4, "uint8": 5}
    if d.name not in m:
        raise ValueError("dtype %s has no kvtrace equivalent" % d)
    return m[d.name]


def model_shape(header, path, what):
    """(n_layers, n_q_heads, n_kv_heads, head_dim, n_tokens) of a trace's header, each a
    positive integer with n_q_heads a multiple of n_kv_heads; ValueError naming `what` and the
    field otherwise (a trace written by TraceWriter may hold any JSON object as its header)."""
    m = header.get("model") if isinstance(header, dict) else None
    if not isinstance(m, dict):
        raise ValueError("%s: %s: the trace's header has no \"model\" object (n_layers, "
                         "n_q_heads, n_kv_heads, head_dim)" % (what, path))
    vals = []
    for src, key in ((m, "n_layers"), (m, "n_q_heads"), (m, "n_kv_heads"), (m, "head_dim"),
                     (header, "n_tokens")):
        v = src.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError("%s: %s: the header's %s%s is %r, not a positive integer"
                             % (what, path, "" if src is header else "model.", key, v))
        vals.append(v)
    if vals[1] % vals[2]:
        raise ValueError("%s: %s: n_q_heads %d is not a multiple of n_kv_heads %d"
                         % (what, path, vals[1], vals[2]))
    return tuple(vals)


def _u16_bits(x):
    """x as native uint16 bit patterns when it holds 16-bit integers (uint16 or int16, either
    byte order: a '>u2' array's values are the patterns), else None."""
    if x.dtype.kind in "iu" and x.dtype.itemsize == 2:
        return x.astype(x.dtype.newbyteorder("="), copy=False).view(np.uint16)
    return None


def bf16_to_f32(a):
    """bf16 bit patterns -> float32 (exact). a: a uint16 (or int16) NumPy array of bit
    patterns, as Trace.read returns a bf16 tensor, an ml_dtypes bfloat16 array, or a
    torch.bfloat16 tensor (its values, exactly). Anything else (float values, a list, a
    torch float32 tensor) raises TypeError: its bits would be made up from its values."""
    if _is_torch(a) or isinstance(a, (np.ndarray, np.generic)):
        bits, bf16 = host_array(a)
        u16 = bits.view(np.uint16) if bf16 else _u16_bits(bits)
        if u16 is not None:
            b32 = u16.reshape(-1).astype(np.uint32) << np.uint32(16)
            return b32.view(np.float32).reshape(bits.shape)
    raise TypeError("bf16_to_f32 takes bf16 bit patterns: a uint16 or int16 NumPy array (what "
                    "Trace.read returns for bf16) or a torch.bfloat16 tensor, got %s"
                    % _describe(a))


def f32_to_bf16(a):
    """Float values -> uint16 bf16 bit patterns, rounded to nearest even (float64 once, not
    through float32), NaN kept quiet. a: a float NumPy array, a float or a list of floats, a
    torch floating tensor (a torch.bfloat16 one gives its own bits, exactly). Integer and bool
    input raises TypeError: a uint16 array is likely bf16 bits already (bf16_to_f32 reads
    them), and integer values are converted explicitly (np.asarray(a, np.float32))."""
    x, bf16 = host_array(a)
    if bf16:
        return np.array(x, dtype=np.uint16)
    shape = x.shape
    if x.dtype.kind != "f":
        raise TypeError("f32_to_bf16 takes float values (a float NumPy array, floats, a torch "
                        "floating tensor), got %s%s" % (_describe(a), (
                            ": uint16/int16 data look like bf16 bit patterns already (see "
                            "bf16_to_f32)" if _u16_bits(x) is not None else
                            ": convert integer values first, e.g. np.asarray(a, np.float32)")))
    if x.dtype.itemsize > 4:
        # float64 -> float32 rounded to odd, then float32 -> bf16 to nearest even: the same
        # result as rounding float64 to bf16 at once (float32 keeps 16 more bits)
        x64 = x.astype(np.float64).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            f = x64.astype(np.float32)
        f64 = f.astype(np.float64)
        inexact = (f64 != x64) & ~np.isnan(x64)
        b32 = f.view(np.uint32).copy()
        b32[inexact & (np.abs(f64) > np.abs(x64))] -= 1  # toward zero (sign and magnitude)
        b32[inexact] |= 1
        x = b32.view(np.float32)
    else:
        x = np.array(x, dtype=np.float32).reshape(-1)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    nan = np.isnan(x)
    rounded = np.where(nan, ((bits >> 16) | 0x40) & 0xFFFF, rounded)
    return rounded.astype(np.uint16).reshape(shape)


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
    call(L.kvt_trace_verify, path_arg(path)[1], ctypes.byref(rep))
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


class Trace(_NoCopy):
    """A .kvt trace opened for reading (kvt_trace_reader). Use kvtrace.open(path).

    Attributes: path, header (dict), records (list of dicts, file order), tokens (dict of
    token tables, read-only arrays), meta (list of meta_json objects), version (major, minor),
    recovered, recovery_note, file_bytes, bytes_read. Methods: read, shape, stored_dtype,
    has, layers, verify, close. A context manager. Each access to records, tokens and meta
    returns new containers: changing one changes nothing the Trace returns later.

    Threads may read one Trace concurrently; close() waits for the reads in flight, and any
    use after it raises TraceError ("is closed"), records and tokens included (read before
    or not); path and header stay. A Trace cannot be copied or pickled (open the path
    again); a forked child may read it, and its garbage collection there leaves the parent's
    reader alone."""

    def __init__(self, path):
        self._h = None
        self.path, bpath = path_arg(path)
        self._pid = os.getpid()
        self._guard = _Guard()
        L = _lib.lib()
        h = ctypes.c_void_p()
        call(L.kvt_trace_reader_open, bpath, ctypes.byref(h))
        self._h = h
        self._records = None
        self._tokens = None
        try:
            txt = L.kvt_trace_reader_header_json(h)
            # a header string that is not UTF-8 (another writer's, or kvtrace's before
            # 2026-12-03 given a non-UTF-8 file name) reads as os.fsdecode reads file names
            self.header = json.loads(txt.decode("utf-8", "surrogateescape")) if txt else {}
        except Exception:
            self.close()
            raise

    # ---- lifetime ----
    def close(self):
        """Close the reader (after the reads other threads have in flight). Idempotent."""
        with self._guard.exclusive():
            h, self._h = self._h, None
            self._records = self._tokens = None  # closed: these raise "is closed" too
            if h is not None and h.value:
                _lib.lib().kvt_trace_reader_close(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            if getattr(self, "_pid", None) != os.getpid():
                self._h = None  # a forked child's copy: the reader is the parent's
                return
            h, self._h = self._h, None  # unreferenced: no read can be in flight
            if h is not None and h.value:
                _lib.lib().kvt_trace_reader_close(h)
        except Exception:
            pass

    def _handle(self):
        if self._h is None:
            raise TraceError(-9, "trace %s is closed" % self.path)
        return self._h

    @contextlib.contextmanager
    def _use(self):
        """The reader handle, held open (against close() in another thread) for the block."""
        with self._guard.shared():
            yield self._handle()

    def __repr__(self):
        h = self.header if isinstance(self.header, dict) else {}
        m = h.get("model") if isinstance(h.get("model"), dict) else {}
        return "<kvtrace.Trace %r model=%r L=%s T=%s>" % (
            self.path, m.get("name"), m.get("n_layers"), h.get("n_tokens"))

    # ---- file facts ----
    @property
    def version(self):
        a, b = ctypes.c_int(), ctypes.c_int()
        with self._use() as h:
            _lib.lib().kvt_trace_reader_version(h, ctypes.byref(a), ctypes.byref(b))
        return (a.value, b.value)

    @property
    def recovered(self):
        with self._use() as h:
            return bool(_lib.lib().kvt_trace_reader_recovered(h))

    @property
    def recovery_note(self):
        with self._use() as h:
            s = _lib.lib().kvt_trace_reader_recovery_note(h)
            return s.decode("utf-8", "replace") if s else ""

    @property
    def file_bytes(self):
        with self._use() as h:
            return int(_lib.lib().kvt_trace_reader_file_bytes(h))

    @property
    def bytes_read(self):
        with self._use() as h:
            return int(_lib.lib().kvt_trace_reader_bytes_read(h))

    @property
    def fingerprint(self):
        """16 lowercase hex digits naming what the trace holds (its header and every record's
        payload checksum; kvt_trace_reader_fingerprint): results.json's traces[t].fingerprint,
        equal for copies of one capture, different for another prompt or capture."""
        buf = ctypes.create_string_buffer(17)
        with self._use() as h:
            _lib.lib().kvt_trace_reader_fingerprint(h, buf)
        return buf.value.decode("ascii")

    def _record_list(self):
        """The cached record dicts (not to be changed); TraceError once closed."""
        with self._use() as h:
            recs = self._records
            if recs is None:
                L = _lib.lib()
                recs = []
                for i in range(L.kvt_trace_reader_n_records(h)):
                    ri = _lib.RecordInfo()
                    call(L.kvt_trace_reader_record, h, i, ctypes.byref(ri))
                    recs.append(_record_dict(ri))
                self._records = recs
        return recs

    @property
    def records(self):
        """The records in file order, as new dicts on each access (see _record_dict)."""
        return [dict(r) for r in self._record_list()]

    def layers(self, kind="K"):
        """Sorted layer numbers that have records of `kind`."""
        c = kind_code(kind)
        return sorted({r["layer"] for r in self._record_list() if r["kind_code"] == c})

    # ---- tensors ----
    def _layer_arg(self, code, layer):
        if layer is None:
            if code in _lib.TABLE_KINDS:
                return -1
            raise ValueError("%s is a per-layer tensor: pass layer=" % kind_name(code))
        return int_arg(layer, "layer", C_INT32)

    def _shape_c(self, code, layer):
        nh, nt, dim, dt = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_int()
        with self._use() as h:
            try:
                call(_lib.lib().kvt_trace_reader_shape, h, layer, code, ctypes.byref(nh),
                     ctypes.byref(nt), ctypes.byref(dim), ctypes.byref(dt))
            except TraceError as e:
                if code in _lib.KIND_NAMES or e.status_name != "KVT_ERR_NOT_FOUND":
                    raise
                # the C library names known kinds only
                raise TraceError(e.status, "the trace has no record of kind %d for layer %d "
                                 "(%d is not a kvtrace record kind; known: %s)"
                                 % (code, layer, code, ", ".join(
                                     "%s (%d)" % kv for kv in _lib.KINDS.items()))) from None
        return nh.value, nt.value, dim.value, dt.value

    def has(self, kind, layer=None):
        c = kind_code(kind)
        lay = -1 if (layer is None and c in _lib.TABLE_KINDS) else layer
        return any(r["kind_code"] == c and (lay is None or r["layer"] == lay)
                   for r in self._record_list())

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
               tuple, a range/slice, or a list of head numbers (in any order, repeats
               allowed; a negative one counts from the end, as an int does). Head numbers are
               integers (Python, NumPy, 0-d integer tensors); a float (2.0 included) or a bool
               (a mask is not a head list: np.flatnonzero(mask) is) raises TypeError naming
               heads.
        dtype: None = the stored dtype (f16 -> float16, bf16 -> uint16 bit patterns,
               f32 -> float32, i32 -> int32, u8 -> uint8); "float32" (or "f32", np.float32)
               converts (float kinds in the C library, exactly).
        Only the records that intersect the heads are read: a list's heads in runs of
        consecutive numbers, so a head it does not name may be missing from the trace."""
        c = kind_code(kind)
        lay = self._layer_arg(c, layer)
        nh, nt, dim, stored = self._shape_c(c, lay)
        squeeze, index = False, None
        if heads is None:
            hb, he = 0, nh
        elif _is_scalar(heads):
            h = head_number(heads)
            if h < 0:
                h += nh
            if not 0 <= h < nh:
                raise IndexError("head %d out of range [0, %d)" % (head_number(heads), nh))
            hb, he, squeeze = h, h + 1, True
        elif isinstance(heads, tuple) and len(heads) == 2:
            hb, he = head_number(heads[0]), head_number(heads[1])
        else:
            if isinstance(heads, slice):
                for x in (heads.start, heads.stop, heads.step):
                    if x is not None:
                        head_number(x, "heads slice")
                sel = list(range(nh))[heads]
            else:
                try:
                    it = iter(heads)
                except TypeError:
                    raise TypeError("heads must be None, an int, a (begin, end) pair, a range, "
                                    "a slice or a list of head numbers, got %s"
                                    % _describe(heads)) from None
                sel = [head_number(x) for x in it]
            if not sel:
                raise ValueError("empty head selection")
            if any(not -nh <= x < nh for x in sel):
                raise IndexError("head out of range [0, %d): %r" % (nh, sel))
            sel = [x + nh if x < 0 else x for x in sel]
            hb, he = min(sel), max(sel) + 1
            if sel != list(range(hb, he)):
                index = sel
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
        runs = [[hb, he]]
        if index is not None:  # the named heads' runs of consecutive numbers, read apart
            runs = []
            for x in sorted(set(index)):
                if runs and runs[-1][1] == x:
                    runs[-1][1] = x + 1
                else:
                    runs.append([x, x + 1])
        parts = []
        with self._use() as h:
            for rb, re_ in runs:
                out = np.empty((re_ - rb, nt, dim), dtype=npdt)
                call(_lib.lib().kvt_trace_reader_read, h, lay, c, rb, re_, as_code,
                     out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
                parts.append(out)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if want_f32 and not as_code:
            out = out.astype(np.float32)
        if index is not None:
            pos = {x: i for i, x in enumerate(sorted(set(index)))}
            out = out[[pos[x] for x in index]]
        if squeeze:
            out = out[0]
        return out

    def read_record(self, i):
        """The decoded payload of record i (file order; negative counts from the end, as for
        a list) as a [heads, n_tok, dim] array in the stored dtype."""
        recs = self._record_list()
        try:
            idx = operator.index(i)
        except TypeError:
            raise TypeError("read_record: the record number must be an integer, got %r" % (i,)) \
                from None
        if idx < 0:
            idx += len(recs)
        if not 0 <= idx < len(recs):
            raise IndexError("read_record: record %d out of range: the trace has %d records"
                             % (i, len(recs)))
        r = recs[idx]
        npdt = _NP_OF_CODE.get(_lib.DTYPE_CODES.get(r["dtype"]))
        if npdt is None:
            raise TraceError(-13, "record %d has an unknown dtype %s" % (idx, r["dtype"]))
        out = np.empty((r["head_end"] - r["head_begin"], r["tok_end"] - r["tok_begin"],
                        r["dim"]), dtype=npdt)
        with self._use() as h:
            call(_lib.lib().kvt_trace_reader_read_record, h, idx,
                 out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    # ---- tables ----
    @property
    def tokens(self):
        """Token tables as NumPy arrays, None where the trace has none:
        token_ids [T] int32, modality [T] uint8 (0 text, 1 image, 2 video, 3 other),
        positions [P, T] int32 (P = 1, or 3 for M-RoPE), decode_token_ids [G] int32,
        token_text list of str. The arrays are read-only (read once, shared by every access:
        np.array(a) is a copy to change); a new dict and token_text list on each access.
        TraceError once the Trace is closed."""
        self._handle()  # closed: "is closed", whether the tables were read before or not
        t = self._tokens
        if t is None:
            t = {}
            for name in ("token_ids", "modality", "decode_token_ids"):
                t[name] = self.read(name)[0, :, 0] if self.has(name) else None
            t["positions"] = self.read("positions")[:, :, 0] if self.has("positions") else None
            for name in ("token_ids", "modality", "decode_token_ids", "positions"):
                if t[name] is not None:
                    t[name] = np.array(t[name])  # its own memory, not a view
                    t[name].setflags(write=False)
            if self.has("token_text"):
                raw = self.read("token_text").tobytes()
                parts = raw.split(b"\0")
                if parts and parts[-1] == b"":
                    parts = parts[:-1]
                t["token_text"] = [p.decode("utf-8", "replace") for p in parts]
            else:
                t["token_text"] = None
            self._tokens = t
        out = dict(t)
        if out["token_text"] is not None:
            out["token_text"] = list(out["token_text"])
        return out

    @property
    def meta(self):
        """The meta_json records, parsed, in file order."""
        out = []
        for i, r in enumerate(self._record_list()):
            if r["kind_code"] == _lib.KINDS["meta_json"]:
                raw = self.read_record(i).tobytes().rstrip(b"\0")
                try:
                    out.append(json.loads(raw.decode("utf-8")))
                except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                    raise TraceError(-2, "%s: meta_json record %d (seq %d, file offset %d) is "
                                     "not valid JSON: %s" % (self.path, i, r["seq"],
                                                             r["file_offset"], e)) from None
        return out

    def verify(self):
        """kvtrace.verify(self.path)."""
        return verify(self.path)


def open(path):  # noqa: A001 - the module-level name users expect
    """Open a .kvt trace for reading; raises TraceError (with the C library's message)."""
    return Trace(path)


class TraceWriter(_NoCopy):
    """Write a .kvt trace directly (kvt_trace_writer): for tests, converters and engines that
    do not need the capture session's bookkeeping.

        with kvtrace.TraceWriter("x.kvt", {"format": "kvtrace", ...}) as w:
            w.append("K", k, layer=0)             # k: [H, T, D] array
            w.append("token_ids", ids)            # 1-D tables become [1, T, 1]
    The header should follow traces/FORMAT.md (JSON header) for other tools to use the file.
    Leaving the block normally finishes the file (index + trailer); an exception leaves it
    unfinished, as a crash would. With force=True over an existing trace, the new one is
    written next to it (PATH.tmp.PID.N) and renamed over it only by finish(): unfinished, the
    old trace stays, the new records are in that file, close() warns (RuntimeWarning) and
    partial_path names it.

    Threads may append concurrently (the C writer is thread-safe); finish() and close() wait
    for the appends in flight, and a use after close raises TraceError ("is closed"). A
    writer cannot be copied or pickled, nor used in a forked child (its compression threads
    are the parent's): there, garbage collection drops it without touching the file."""

    def __init__(self, path, header, level=0, n_threads=0, max_pending_bytes=0,
                 no_shuffle=False, max_record_bytes=0, force=False):
        self._h = None
        self.path, bpath = path_arg(path)
        self.partial_path = None
        self._pid = os.getpid()
        self._guard = _Guard()
        L = _lib.lib()
        header = header_text(header)
        opts = _lib.WriterOpts(level=int_arg(level, "level", C_INT),
                               n_threads=int_arg(n_threads, "n_threads", C_INT),
                               max_pending_bytes=int_arg(max_pending_bytes, "max_pending_bytes",
                                                         C_UINT64),
                               no_shuffle=no_shuffle,
                               max_record_bytes=int_arg(max_record_bytes, "max_record_bytes",
                                                        C_UINT64),
                               force=force)
        self._replacing = _Replacing(self.path, bpath)
        h = ctypes.c_void_p()
        try:
            call(L.kvt_trace_writer_create, bpath, header, ctypes.byref(opts), ctypes.byref(h))
        except TraceError as e:
            raise force_message(e) from None
        self._h = h
        self._replacing.after(L.kvt_trace_writer_file(h))
        self._finished = False

    def _handle(self):
        if self._h is None:
            raise TraceError(-9, "writer for %s is closed" % self.path)
        if os.getpid() != self._pid:
            raise TraceError(-9, "writer for %s belongs to process %d: it cannot be used in a "
                             "forked child" % (self.path, self._pid))
        return self._h

    @contextlib.contextmanager
    def _use(self):
        with self._guard.shared():
            yield self._handle()

    def append(self, kind, data, layer=None, head_begin=0, tok_begin=0, dtype=None):
        """Append a [H, T, D] block (1-D -> [1, T, 1], 2-D [P, T] -> [P, T, 1]) covering heads
        [head_begin, head_begin+H) and tokens [tok_begin, tok_begin+T) of (layer, kind).

        data: a NumPy array (or anything np.asarray takes), bytes, or a torch.Tensor (detached
        and copied to the host; requires_grad is fine; a torch.bfloat16 tensor is stored as
        bf16, bit-exactly).
        layer: 0 or more for the per-layer kinds (K, V, Q_window, ...: FORMAT.md's
        0..n_layers-1); none (or -1) for the tables (token_ids, modality, positions,
        decode_token_ids, token_text, meta_json). Anything else is refused (ValueError): the
        reader would never find the record.
        dtype: None = from the array (float16, float32, int32, uint8; bf16 for torch.bfloat16
        and ml_dtypes), except that the tables always take their FORMAT.md dtype (token_ids,
        positions, decode_token_ids: i32; modality, token_text, meta_json: u8) from any
        integer or bool array, so torch.arange's int64 works. Float64 (a list of floats, say)
        is not narrowed silently: pass dtype="f32" (or "f16", "bf16") to round it, or convert
        it. "bf16" stores bf16 (float arrays are rounded to nearest even). For the per-layer
        kinds a uint16 or int16 array holds bf16 bit patterns, as Trace.read returns a bf16
        tensor and CaptureSession takes one: stored as bf16 by default, and widened exactly
        before a dtype="f32" or "f16" conversion (never taken as the integers 16256, ...).
        The per-layer kinds are f16, bf16 or f32 (attn_colsum: f32 only).
        Checked against FORMAT.md: integer tables must fit their dtype (an int64 token id
        that does not fit i32 is refused, not wrapped), float data is not truncated into an
        integer dtype, modality holds 0..3 (text, image, video, other), and a meta_json record
        must hold one JSON object (as append_json checks; NaN is not JSON)."""
        c = kind_code(kind)
        kname = kind_name(c)
        if c in _lib.TABLE_KINDS:
            if layer is not None and int_arg(layer, "layer", C_INT32) != -1:
                raise ValueError("append: %s is a table (layer -1 in traces/FORMAT.md): pass no "
                                 "layer, got layer=%r" % (kname, layer))
            layer = -1
        else:
            if layer is None:
                raise ValueError("%s is a per-layer tensor: pass layer=" % kname)
            layer = int_arg(layer, "layer", C_INT32)
            if layer < 0 and c in _LAYER_DTYPES:
                raise ValueError("append: %s is a per-layer tensor: layer must be 0 or more "
                                 "(0..n_layers-1, traces/FORMAT.md), got %d" % (kname, layer))
        head_begin = int_arg(head_begin, "head_begin", C_UINT32)
        tok_begin = int_arg(tok_begin, "tok_begin", C_UINT32)
        a, bits = host_array(data)
        if not bits and c not in _lib.TABLE_KINDS and _u16_bits(a) is not None:
            a, bits = _u16_bits(a), True  # bf16 bit patterns (Trace.read's bf16, see above)
        if a.dtype.kind not in "biuf":
            raise ValueError("append: %s data of dtype %s: kvtrace stores numbers (f16, bf16, "
                             "f32, i32, u8)" % (kname, a.dtype))
        if a.ndim == 1:
            a = a.reshape(1, -1, 1)
        elif a.ndim == 2:
            a = a.reshape(a.shape[0], a.shape[1], 1)
        elif a.ndim != 3:
            raise ValueError("data must be 1-, 2- or 3-D, got shape %s" % (a.shape,))
        code = None if dtype is None else dtype_code(dtype)
        if c in _TABLE_STORED:
            if code is not None and code != _TABLE_STORED[c]:
                raise ValueError("append: %s is stored as %s (traces/FORMAT.md), not %s"
                                 % (kname, _lib.DTYPE_NAMES[_TABLE_STORED[c]],
                                    _lib.DTYPE_NAMES.get(code, code)))
            code = _TABLE_STORED[c]
        if bits:
            if code is None:
                code = _lib.DTYPE_BF16
            elif code != _lib.DTYPE_BF16:
                a, bits = bf16_to_f32(a), False  # exact; converted below like any float
        if code is None:
            if a.dtype.name not in ("float16", "float32", "int32", "uint8"):
                raise ValueError(
                    "append: %s data of dtype %s: kvtrace stores f16, bf16, f32, i32 or u8, "
                    "and does not narrow %s silently: pass dtype= (e.g. dtype=\"f32\", which "
                    "rounds to float32) or convert the data (np.asarray(x, np.float32))"
                    % (kname, a.dtype, a.dtype))
            code = dtype_code(a.dtype)
        if c in _LAYER_DTYPES and code not in _LAYER_DTYPES[c]:
            names = [_lib.DTYPE_NAMES[x] for x in _LAYER_DTYPES[c]]
            raise ValueError("append: %s is stored as %s (traces/FORMAT.md), not %s" % (
                kname, names[-1] if len(names) == 1 else
                ", ".join(names[:-1]) + " or " + names[-1], _lib.DTYPE_NAMES.get(code, code)))
        if code == _lib.DTYPE_BF16:
            if bits:
                a = a.view(np.uint16)
            elif _u16_bits(a) is not None:
                a = _u16_bits(a)
            else:
                a = f32_to_bf16(a if a.dtype.kind == "f" else a.astype(np.float64))
        else:
            if code not in _NP_OF_CODE:
                raise ValueError("dtype %r is not a kvtrace dtype (f16, bf16, f32, i32, u8)"
                                 % (dtype if dtype is not None else a.dtype,))
            want = _NP_OF_CODE[code]
            if want.kind in "iu" and a.dtype != want:
                if a.dtype.kind not in "iub":
                    raise TypeError("append: %s data cannot be stored as %s without losing "
                                    "values" % (a.dtype, _lib.DTYPE_NAMES[code]))
                lim = np.iinfo(want)
                mn, mx = (int(a.min()), int(a.max())) if a.size else (0, 0)
                if mn < lim.min or mx > lim.max:
                    raise ValueError("append: values in [%d, %d] do not fit %s"
                                     % (mn, mx, _lib.DTYPE_NAMES[code]))
            a = a.astype(want, copy=False)
        a = np.ascontiguousarray(a)
        if c == _lib.KINDS["modality"] and a.size and int(a.max()) > _MAX_MODALITY:
            raise ValueError("append: modality holds %d: its values are 0 text, 1 image, "
                             "2 video, 3 other (traces/FORMAT.md)" % int(a.max()))
        if c == _lib.KINDS["meta_json"]:
            raw = a.tobytes().rstrip(b"\0")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError("append: a meta_json record must be the UTF-8 text of one "
                                 "JSON object (append_json writes one): %s" % e) from None
            check_json_object(text, "append: meta_json (append_json writes one from a dict)")
        head_end = int_arg(head_begin + a.shape[0], "head_begin + heads", C_UINT32)
        tok_end = int_arg(tok_begin + a.shape[1], "tok_begin + tokens", C_UINT32)
        info = _lib.RecordInfo(kind=c, layer=layer, head_begin=head_begin, head_end=head_end,
                               tok_begin=tok_begin, tok_end=tok_end,
                               dim=int_arg(a.shape[2], "dim", C_UINT32), dtype=code)
        with self._use() as h:
            call(_lib.lib().kvt_trace_writer_append, h, ctypes.byref(info),
                 a.ctypes.data_as(ctypes.c_void_p))

    def append_json(self, obj):
        """Append a meta_json record: obj is a dict or the text of one JSON object (checked
        here: FORMAT.md says one JSON object, and Trace.meta parses it; NaN and Infinity are
        not JSON). NumPy scalars and arrays in a dict are written as their values."""
        if isinstance(obj, str):
            check_json_object(obj, "append_json")
        elif isinstance(obj, dict):
            obj = json_text(obj, "append_json: the dict")
        else:
            raise TypeError("append_json: obj must be a dict or the text of a JSON object, "
                            "got %s" % type(obj).__name__)
        data = str_arg(obj, "append_json text")
        with self._use() as h:
            call(_lib.lib().kvt_trace_writer_append_json, h, data)

    def stats(self):
        s = _lib.WriterStats()
        with self._use() as h:
            _lib.lib().kvt_trace_writer_get_stats(h, ctypes.byref(s))
        return {n: int(getattr(s, n)) for n, _ in _lib.WriterStats._fields_}

    def finish(self):
        """Write the index and trailer (then only close is allowed)."""
        with self._guard.exclusive():
            call(_lib.lib().kvt_trace_writer_finish, self._handle())
            self._finished = True

    def close(self):
        """Free the writer; without finish() the file is left as a crash would leave it (a
        forced replacement: in its temporary file, named by partial_path and a warning, the
        old trace untouched)."""
        with self._guard.exclusive():
            h, self._h = self._h, None
            if h is None or not h.value:
                return
            if os.getpid() != self._pid:
                return  # a forked child: the writer is the parent's
            _lib.lib().kvt_trace_writer_free(h)
        self._replacing.partial("TraceWriter closed unfinished", self)

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
            if getattr(self, "_pid", None) != os.getpid():
                self._h = None  # a forked child's copy: the writer is the parent's
                return
            h, self._h = self._h, None  # unreferenced: no append can be in flight
            if h is not None and h.value:
                _lib.lib().kvt_trace_writer_free(h)
        except Exception:
            pass
