"""_lib.py - loads libkvtrace.so with ctypes and declares the C API (traces/kvt_trace.h,
common/kvt_common.h, capture/kvt_capture.h). No compiled extension: every structure below
mirrors the C declaration field by field (tests/oracle/test_python_binding.py checks the
sizes and offsets against a C compiler when one is available).

Library lookup, first hit wins:
  1. $KVT_LIB: a path to the library file, or a directory that holds libkvtrace.so;
  2. next to the package: python/kvtrace/libkvtrace.so, python/libkvtrace.so;
  3. an installed layout: <prefix>/lib*/libkvtrace.so.0 when the package sits in
     <prefix>/lib*/python3*/site-packages;
  4. the build folders of a source checkout: <repo>/build/libkvtrace.so, then the newest
     <repo>/build*/libkvtrace.so (sanitizer builds are skipped: they cannot be loaded into an
     unsanitized interpreter);
  5. the dynamic linker's standard search (LD_LIBRARY_PATH, ld.so.cache): libkvtrace.so.0,
     libkvtrace.so.
"""
import ctypes
import ctypes.util
import glob
import os
import threading

ABI_VERSION = 5

# ---- enums (numbers are part of the trace format / public ABI) ----
KVT_OK = 0
STATUS_NAMES = {
    0: "KVT_OK", -1: "KVT_ERR_IO", -2: "KVT_ERR_CORRUPT", -3: "KVT_ERR_VERSION",
    -4: "KVT_ERR_NOMEM", -5: "KVT_ERR_NO_CUDA", -6: "KVT_ERR_CUDA", -7: "KVT_ERR_INVALID_ARG",
    -8: "KVT_ERR_NOT_FOUND", -9: "KVT_ERR_STATE", -10: "KVT_ERR_OVERFLOW",
    -11: "KVT_ERR_TRUNCATED", -12: "KVT_ERR_CHECKSUM", -13: "KVT_ERR_UNSUPPORTED",
    -14: "KVT_ERR_NAN",
}

DTYPE_INVALID, DTYPE_F16, DTYPE_BF16, DTYPE_F32, DTYPE_I32, DTYPE_U8 = 0, 1, 2, 3, 4, 5
DTYPE_NAMES = {DTYPE_F16: "f16", DTYPE_BF16: "bf16", DTYPE_F32: "f32", DTYPE_I32: "i32",
               DTYPE_U8: "u8"}
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}

KINDS = {
    "K": 1, "V": 2, "Q_window": 3, "Q_decode": 4, "K_decode": 5, "V_decode": 6,
    "attn_colsum": 7, "Q_all": 8, "kvzip_score": 9, "token_ids": 16, "modality": 17, "positions": 18,
    "decode_token_ids": 19, "token_text": 20, "meta_json": 32,
}
KIND_NAMES = {v: k for k, v in KINDS.items()}
TABLE_KINDS = {16, 17, 18, 19, 20, 32}  # layer -1

MODALITIES = {"text": 0, "image": 1, "video": 2, "other": 3}
ROPE_KINDS = {"none": 0, "default": 1, "mrope": 2}
ROPE_PAIRS = {None: 0, "half": 1, "interleaved": 2}


# ---- structures ----
class RecordInfo(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("layer", ctypes.c_int32),
        ("head_begin", ctypes.c_uint32),
        ("head_end", ctypes.c_uint32),
        ("tok_begin", ctypes.c_uint32),
        ("tok_end", ctypes.c_uint32),
        ("dim", ctypes.c_uint32),
        ("dtype", ctypes.c_int),
        ("filter", ctypes.c_int),
        ("seq", ctypes.c_uint32),
        ("raw_bytes", ctypes.c_uint64),
        ("comp_bytes", ctypes.c_uint64),
        ("file_offset", ctypes.c_uint64),
    ]


class WriterOpts(ctypes.Structure):
    _fields_ = [
        ("level", ctypes.c_int),
        ("n_threads", ctypes.c_int),
        ("max_pending_bytes", ctypes.c_uint64),
        ("no_shuffle", ctypes.c_bool),
        ("max_record_bytes", ctypes.c_uint64),
        ("force", ctypes.c_bool),
    ]


class WriterStats(ctypes.Structure):
    _fields_ = [
        ("n_records", ctypes.c_uint64),
        ("raw_bytes", ctypes.c_uint64),
        ("comp_bytes", ctypes.c_uint64),
        ("file_bytes", ctypes.c_uint64),
        ("stall_ns", ctypes.c_uint64),
        ("peak_pending_bytes", ctypes.c_uint64),
    ]


class VerifyProblem(ctypes.Structure):
    _fields_ = [
        ("file_offset", ctypes.c_uint64),
        ("seq", ctypes.c_int32),
        ("kind", ctypes.c_int),
        ("layer", ctypes.c_int32),
        ("what", ctypes.c_char * 200),
    ]


class VerifyReport(ctypes.Structure):
    _fields_ = [
        ("header_ok", ctypes.c_bool),
        ("trailer_ok", ctypes.c_bool),
        ("index_ok", ctypes.c_bool),
        ("n_records_ok", ctypes.c_uint64),
        ("n_records_bad", ctypes.c_uint64),
        ("n_records_expected", ctypes.c_uint64),
        ("tail_bytes_lost", ctypes.c_uint64),
        ("n_problems", ctypes.c_size_t),
        ("problems", ctypes.POINTER(VerifyProblem)),
    ]


VIEW_MAX_DIMS = 4


class TensorView(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * VIEW_MAX_DIMS),
        ("stride", ctypes.c_int64 * VIEW_MAX_DIMS),
        ("mem", ctypes.c_int),
        ("device_idx", ctypes.c_int),
        ("stream", ctypes.c_void_p),
    ]


class CaptureModel(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("arch", ctypes.c_char_p),
        ("n_layers", ctypes.c_int),
        ("n_q_heads", ctypes.c_int),
        ("n_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("kv_dtype", ctypes.c_int),
        ("rope", ctypes.c_int),
        ("rope_theta", ctypes.c_double),
        ("attn_scale", ctypes.c_double),
        ("engine_name", ctypes.c_char_p),
        ("engine_version", ctypes.c_char_p),
        ("gpu", ctypes.c_char_p),
        ("rope_pairs", ctypes.c_int),
        ("rope_inv_freq", ctypes.POINTER(ctypes.c_double)),
        ("rope_attention_scaling", ctypes.c_double),
        ("mrope_section", ctypes.c_int * 3),
    ]


class CaptureOpts(ctypes.Structure):
    _fields_ = [
        ("n_tokens", ctypes.c_uint32),
        ("window", ctypes.c_uint32),
        ("n_decode", ctypes.c_uint32),
        ("decode_chunk", ctypes.c_uint32),
        ("with_colsum", ctypes.c_bool),
        ("with_q_all", ctypes.c_bool),
        ("capture_json", ctypes.c_char_p),
        ("writer", WriterOpts),
        ("device_ring_bytes", ctypes.c_uint64),
    ]


class CaptureStats(ctypes.Structure):
    _fields_ = [
        ("n_submits", ctypes.c_uint64),
        ("bytes_submitted", ctypes.c_uint64),
        ("stall_ns", ctypes.c_uint64),
        ("colsum_ns", ctypes.c_uint64),
        ("n_decode", ctypes.c_uint32),
        ("writer", WriterStats),
        ("device_d2h_bytes", ctypes.c_uint64),
        ("device_stall_ns", ctypes.c_uint64),
        ("device_bytes", ctypes.c_uint64),
        ("pinned_bytes", ctypes.c_uint64),
        ("device_peak_slots", ctypes.c_uint32),
        ("device_slots", ctypes.c_uint32),
        ("other_device_bytes", ctypes.c_uint64),
    ]


class CaptureTimeline(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "n_kernels", "attention_ns", "gemm_ns", "other_ns", "n_memcpy", "memcpy_bytes",
        "memcpy_ns", "capture_copy_bytes", "capture_copy_ns", "capture_copy_overlap_ns")]


# (C type name, ctypes structure) for the layout check in the tests.
STRUCTS = {
    "kvt_record_info": RecordInfo,
    "kvt_writer_opts": WriterOpts,
    "kvt_writer_stats": WriterStats,
    "kvt_verify_problem": VerifyProblem,
    "kvt_verify_report": VerifyReport,
    "struct kvt_tensor_view": TensorView,
    "struct kvt_capture_model": CaptureModel,
    "struct kvt_capture_opts": CaptureOpts,
    "struct kvt_capture_stats": CaptureStats,
    "kvt_capture_timeline": CaptureTimeline,
}

_P = ctypes.POINTER
_vp = ctypes.c_void_p
_cp = ctypes.c_char_p
_int = ctypes.c_int
_u32 = ctypes.c_uint32
_i32 = ctypes.c_int32
_sz = ctypes.c_size_t
_u64 = ctypes.c_uint64

# name: (restype, argtypes)
_PROTOS = {
    "kvt_abi_version": (_int, []),
    "kvt_version_string": (_cp, []),
    "kvt_status_str": (_cp, [_int]),
    "kvt_error_msg": (_cp, []),
    "kvt_error_clear": (None, []),
    "kvt_kind_name": (_cp, [_int]),
    "kvt_dtype_name": (_cp, [_int]),
    # writer
    "kvt_trace_writer_create": (_int, [_cp, _cp, _P(WriterOpts), _P(_vp)]),
    "kvt_trace_writer_append": (_int, [_vp, _P(RecordInfo), _vp]),
    "kvt_trace_writer_append_json": (_int, [_vp, _cp]),
    "kvt_trace_writer_finish": (_int, [_vp]),
    "kvt_trace_writer_get_stats": (None, [_vp, _P(WriterStats)]),
    "kvt_trace_writer_free": (None, [_vp]),
    "kvt_trace_writer_file": (_cp, [_vp]),
    # reader
    "kvt_trace_reader_open": (_int, [_cp, _P(_vp)]),
    "kvt_trace_reader_close": (None, [_vp]),
    "kvt_trace_reader_header_json": (_cp, [_vp]),
    "kvt_trace_reader_fingerprint": (None, [_vp, ctypes.c_char_p]),
    "kvt_trace_reader_version": (None, [_vp, _P(_int), _P(_int)]),
    "kvt_trace_reader_recovered": (ctypes.c_bool, [_vp]),
    "kvt_trace_reader_recovery_note": (_cp, [_vp]),
    "kvt_trace_reader_file_bytes": (_u64, [_vp]),
    "kvt_trace_reader_n_records": (_sz, [_vp]),
    "kvt_trace_reader_record": (_int, [_vp, _sz, _P(RecordInfo)]),
    "kvt_trace_reader_shape": (_int, [_vp, _i32, _int, _P(_u32), _P(_u32), _P(_u32), _P(_int)]),
    "kvt_trace_reader_read": (_int, [_vp, _i32, _int, _u32, _u32, _int, _vp, _sz]),
    "kvt_trace_reader_read_record": (_int, [_vp, _sz, _vp, _sz]),
    "kvt_trace_reader_bytes_read": (_u64, [_vp]),
    # verify
    "kvt_trace_verify": (_int, [_cp, _P(VerifyReport)]),
    "kvt_verify_report_free": (None, [_P(VerifyReport)]),
}

_CAPTURE_PROTOS = {
    "kvt_capture_open": (_int, [_cp, _P(CaptureModel), _P(CaptureOpts), _P(_vp)]),
    "kvt_capture_set_tokens": (_int, [_vp, _P(_i32), _P(ctypes.c_uint8), _P(_i32), _int]),
    "kvt_capture_submit_kv": (_int, [_vp, _int, _u32, _P(TensorView), _P(TensorView)]),
    "kvt_capture_submit_queries": (_int, [_vp, _int, _u32, _P(TensorView)]),
    "kvt_capture_submit_decode": (_int, [_vp, _int, _u32, _P(TensorView), _P(TensorView),
                                         _P(TensorView)]),
    "kvt_capture_submit_decode_token": (_int, [_vp, _u32, _i32]),
    "kvt_capture_submit_kvzip": (_int, [_vp, _int, _P(ctypes.c_float)]),
    "kvt_capture_get_stats": (None, [_vp, _P(CaptureStats)]),
    "kvt_capture_close": (_int, [_vp, _P(CaptureStats)]),
    "kvt_capture_file": (_cp, [_vp]),
    "kvt_capture_device_stream": (_vp, [_vp]),
    "kvt_capture_sync_device": (_int, [_vp]),
    "kvt_capture_reserve_device": (_int, [_int, _u64, _u64]),
    "kvt_capture_release_device_reserve": (None, []),
    "kvt_capture_device_reserved_bytes": (_u64, []),
    "kvt_capture_set_timeline": (_int, [_vp, _P(CaptureTimeline)]),
    "kvt_capture_set_timeline_absent": (_int, [_vp, _cp]),
    "kvt_timeline_start": (_vp, [ctypes.c_char_p, _sz]),
    "kvt_timeline_stream_id": (_int, [_vp, _vp, _P(_u32), _P(_u32)]),
    "kvt_timeline_stop": (_int, [_vp, _u32, _u32, _P(CaptureTimeline)]),
}

_lib = None
_lib_path = None
_has_capture = False
_lock = threading.Lock()


def _candidates():
    env = os.environ.get("KVT_LIB")
    if env:
        if os.path.isdir(env):
            yield os.path.join(env, "libkvtrace.so")
        else:
            yield env
        return  # an explicit choice is not second-guessed
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (here, os.path.dirname(here)):
        for n in ("libkvtrace.so", "libkvtrace.so.0"):
            yield os.path.join(d, n)
    # installed: <prefix>/lib/python3.X/site-packages/kvtrace -> <prefix>/lib
    parts = here.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].startswith("python3") and i > 0:
            libdir = os.sep.join(parts[:i])
            for n in ("libkvtrace.so.0", "libkvtrace.so"):
                yield os.path.join(libdir, n)
            break
    # source checkout: python/kvtrace -> repo root
    repo = os.path.dirname(os.path.dirname(here))
    builds = glob.glob(os.path.join(repo, "build*", "libkvtrace.so"))
    builds.sort(key=lambda b: (os.path.basename(os.path.dirname(b)) != "build",
                               -os.path.getmtime(b)))
    for b in builds:
        if not _sanitized(b):  # an ASan library cannot be loaded into python
            yield b
    yield "libkvtrace.so.0"
    found = ctypes.util.find_library("kvtrace")
    if found:
        yield found
    yield "libkvtrace.so"


def _sanitized(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return True
    return b"libasan.so" in data or b"__asan_init" in data


def _declare(lib, protos, required=True):
    for name, (res, args) in protos.items():
        try:
            f = getattr(lib, name)
        except AttributeError:
            if required:
                raise OSError("%s lacks the symbol %s" % (_lib_path, name))
            return False
        f.restype = res
        f.argtypes = args
    return True


def lib():
    """The loaded library (loaded on first use). Raises OSError if none can be loaded."""
    global _lib, _lib_path, _has_capture
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        errors = []
        for cand in _candidates():
            if os.sep in cand and not os.path.exists(cand):
                if os.environ.get("KVT_LIB"):  # the user's own choice: say it is not there
                    errors.append("%s (KVT_LIB): no such file" % cand)
                continue
            try:
                handle = ctypes.CDLL(cand)
            except OSError as e:
                errors.append("%s: %s" % (cand, e))
                continue
            _lib_path = cand
            _declare(handle, _PROTOS)
            abi = handle.kvt_abi_version()
            if abi != ABI_VERSION:
                raise OSError("%s has ABI version %d, this binding expects %d"
                              % (cand, abi, ABI_VERSION))
            _has_capture = _declare(handle, _CAPTURE_PROTOS, required=False)
            _lib = handle
            return _lib
        raise OSError("cannot load libkvtrace.so (set KVT_LIB to its path); tried: "
                      + ("; ".join(errors) if errors else "no candidate file exists"))


def lib_path():
    lib()
    return _lib_path


def has_capture():
    lib()
    return _has_capture
