#!/usr/bin/python3
"""test_python_binding.py - the ctypes binding python/kvtrace against libkvtrace.so.

  * struct layouts: every ctypes Structure matches the C header (sizeof/offsetof printed by
    a small C program compiled against the headers; skipped without a C compiler);
  * round trip of every dtype (f16, bf16, f32, i32, u8) through kvtrace.TraceWriter and
    kvtrace.open: exact values in the stored dtype, float32 conversion in C, head ranges
    across split records, token tables, meta_json, verify;
  * CaptureSession: strided, negative-stride, zero-stride, 4-D, __array_interface__-only and
    bf16-as-uint16 inputs; f32 -> f16/bf16 rounding in C equals NumPy's; column sums equal a
    NumPy computation; decode steps; errors;
  * errors: corrupt payload (checksum), truncated file (recovered), garbage, missing file,
    missing tensor, closed handle: TraceError with the C library's message;
  * library lookup through KVT_LIB (file or directory) and a clear error for a bad path;
  * robustness (class Robustness): set_tokens table lengths and value ranges against
    n_tokens, kv_dtype and rope checked up front (torch dtypes accepted), several threads on
    one session (exact data), close racing submits and reads, force=True leaving the old
    trace and naming the new one (partial_path, RuntimeWarning), append_json/meta with bad
    JSON, integers that do not fit their C type and NUL in paths and strings, copy/pickle
    refused, a forked child's garbage collection leaving the parent's session alone, and
    errors that name the argument (rope, name, modality, read_record); the RoPE details
    (rope_pairs, rope_inv_freq, rope_attention_scaling, mrope_section) read back exactly from
    model.rope, and bad ones are refused naming the argument (and by the C library itself),
    as are rope_theta and attn_scale that are negative, NaN, infinite or not numbers (0
    keeps its meaning), kv_dtype=None and a capture_stream that is not a handle;
  * a QA pass (classes QAFindings, QAFindingsCapture): heads= refuses floats and bools,
    bf16_to_f32/f32_to_bf16 refuse what they would turn into garbage (float64 rounded once),
    TraceWriter.append takes torch bf16 and requires_grad tensors and says what to do with
    float64, refuses records FORMAT.md forbids or no reader finds (a per-layer kind at layer
    -1, a table with a layer, modality 4, a meta_json record that is not JSON), read-only
    Trace.tokens and fresh records that raise after close, CaptureSession's final stats
    after its with block and an idempotent close, and messages in Python terms (force=True,
    NumPy values and NaN in a header, an unknown kind code); a third (QAFindings3): bf16 bit
    patterns appended as f32/f16 values, token tables of the wrong shape refused, a header
    without a model object, capture options that are not booleans, capture= keys that
    restate the session's own record, and read(heads=LIST) reading only the named heads.

Environment: KVT_LIB (libkvtrace.so), KVT_SOURCE_ROOT (repository). Exit 77 without NumPy or
the library.
"""
import copy
import ctypes
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import unittest
import warnings

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
LIB = os.environ.get("KVT_LIB")
if not LIB or not os.path.exists(LIB):
    print("SKIP: KVT_LIB does not name libkvtrace.so")
    sys.exit(77)
sys.path.insert(0, os.path.join(ROOT, "python"))
import kvtrace  # noqa: E402
from kvtrace import _lib  # noqa: E402

HEADER = {"format": "kvtrace", "created_by": "test_python_binding.py", "endianness": "little",
          "model": {"name": "binding-test", "arch": "llama", "n_layers": 2, "n_q_heads": 4,
                    "n_kv_heads": 2, "head_dim": 8, "rope": {"type": "none"}},
          "kv_dtype": "f16", "n_tokens": 24, "window": 4, "n_decode": 3,
          "engine": {"name": "numpy", "version": "x"}, "gpu": None, "capture": {}}


def tmpdir():
    d = tempfile.mkdtemp(prefix="kvt_py_")
    return d


class Layout(unittest.TestCase):
    def test_struct_layouts_match_c(self):
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            self.skipTest("no C compiler")
        lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "kvt_capture.h"',
                 'int main(void) {']
        for cname, st in _lib.STRUCTS.items():
            lines.append('printf("%s %%zu\\n", sizeof(%s));' % (cname.replace(" ", "_"), cname))
            for f, _ in st._fields_:
                lines.append('printf("%s.%s %%zu\\n", offsetof(%s, %s));'
                             % (cname.replace(" ", "_"), f, cname, f))
        lines += ["return 0;", "}"]
        d = tmpdir()
        try:
            src, exe = os.path.join(d, "l.c"), os.path.join(d, "l")
            with open(src, "w") as f:
                f.write("\n".join(lines))
            inc = []
            for sub in ("common", "traces", "capture"):
                inc += ["-I", os.path.join(ROOT, sub)]
            p = subprocess.run([cc, "-std=c11", "-o", exe, src] + inc, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True)
            self.assertEqual(p.returncode, 0, p.stdout)
            out = subprocess.run([exe], stdout=subprocess.PIPE, universal_newlines=True).stdout
        finally:
            shutil.rmtree(d, ignore_errors=True)
        c = dict(line.split() for line in out.splitlines())
        for cname, st in _lib.STRUCTS.items():
            key = cname.replace(" ", "_")
            self.assertEqual(int(c[key]), ctypes.sizeof(st), "sizeof " + cname)
            for f, _ in st._fields_:
                self.assertEqual(int(c[key + "." + f]), getattr(st, f).offset, cname + "." + f)


class RoundTrip(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tmpdir()
        cls.path = os.path.join(cls.dir, "rt.kvt")
        rng = np.random.default_rng(0)
        H, Hq, T, D, W = 2, 4, 24, 8, 4
        cls.K = [(rng.standard_normal((H, T, D)) * 3).astype(np.float16) for _ in range(2)]
        vf = [rng.standard_normal((H, T, D)).astype(np.float32) * 100 for _ in range(2)]
        cls.Vbits = [kvtrace.f32_to_bf16(v) for v in vf]
        cls.Vf = vf
        cls.Q = [rng.standard_normal((Hq, W, D)).astype(np.float32) for _ in range(2)]
        cls.colsum = rng.random((Hq, T, 1)).astype(np.float32)
        cls.ids = rng.integers(-5, 1 << 30, T).astype(np.int32)
        cls.mod = (np.arange(T) % 4).astype(np.uint8)
        cls.pos = np.stack([np.arange(T), np.arange(T) // 2, np.arange(T) % 3]).astype(np.int32)
        cls.text = ["tok%d" % i for i in range(T - 1)] + ["é"]
        w = kvtrace.TraceWriter(cls.path, HEADER, max_record_bytes=256, n_threads=2)
        if True:
            for l in range(2):
                w.append("K", cls.K[l], layer=l)
                if l == 0:
                    w.append("V", cls.Vbits[l], layer=l, dtype="bf16")  # bit patterns
                else:
                    w.append("V", cls.Vf[l], layer=l, dtype="bf16")     # rounded in Python
                w.append("Q_window", cls.Q[l], layer=l)
            w.append("attn_colsum", cls.colsum, layer=0)
            w.append("token_ids", cls.ids)
            w.append("modality", cls.mod)
            w.append("positions", cls.pos)
            w.append("decode_token_ids", np.array([7, 8, 9], np.int32))
            w.append("token_text", np.frombuffer(
                b"".join(s.encode() + b"\0" for s in cls.text), np.uint8))
            w.append_json({"hello": [1, 2, 3]})
        w.finish()
        cls.stats = w.stats()  # after finish: every queued record is counted
        w.close()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_header_and_records(self):
        with kvtrace.open(self.path) as t:
            self.assertEqual(t.header, HEADER)
            self.assertEqual(t.version, (1, 1))
            self.assertFalse(t.recovered)
            self.assertEqual(t.recovery_note, "")
            recs = t.records
            self.assertEqual(len(recs), self.stats["n_records"])
            ks = [r for r in recs if r["kind"] == "K" and r["layer"] == 0]
            self.assertGreater(len(ks), 1, "max_record_bytes=256 should split K along heads")
            self.assertEqual({r["dtype"] for r in recs if r["kind"] == "V"}, {"bf16"})
            self.assertEqual(t.layers("K"), [0, 1])
            self.assertEqual(t.shape("K", 1), (2, 24, 8))
            self.assertEqual(t.shape("positions"), (3, 24, 1))
            self.assertEqual(t.stored_dtype("V", 0), "bf16")
            self.assertEqual(t.stored_dtype("modality"), "u8")
            self.assertTrue(t.has("attn_colsum", 0))
            self.assertFalse(t.has("attn_colsum", 1))
            self.assertIn("binding-test", repr(t))

    def test_every_dtype_exact(self):
        with kvtrace.open(self.path) as t:
            for l in range(2):
                k = t.read("K", layer=l)
                self.assertEqual(k.dtype, np.float16)
                np.testing.assert_array_equal(k, self.K[l])
                v = t.read("V", layer=l)
                self.assertEqual(v.dtype, np.uint16)
                np.testing.assert_array_equal(v, self.Vbits[l])
                q = t.read("q_window", layer=l)  # kind names are case-insensitive
                self.assertEqual(q.dtype, np.float32)
                np.testing.assert_array_equal(q, self.Q[l])
            np.testing.assert_array_equal(t.read("attn_colsum", layer=0), self.colsum)
            ids = t.read("token_ids")
            self.assertEqual((ids.dtype, ids.shape), (np.int32, (1, 24, 1)))
            np.testing.assert_array_equal(ids[0, :, 0], self.ids)
            mod = t.read(17)
            self.assertEqual(mod.dtype, np.uint8)
            np.testing.assert_array_equal(mod[0, :, 0], self.mod)

    def test_float32_conversion(self):
        with kvtrace.open(self.path) as t:
            for l in range(2):
                k = t.read("K", layer=l, dtype="float32")
                self.assertEqual(k.dtype, np.float32)
                np.testing.assert_array_equal(k, self.K[l].astype(np.float32))
                v = t.read("V", layer=l, dtype=np.float32)
                np.testing.assert_array_equal(v, kvtrace.bf16_to_f32(self.Vbits[l]))
                np.testing.assert_array_equal(t.read("Q_window", layer=l, dtype="f32"),
                                              self.Q[l])
            ids = t.read("token_ids", dtype="float32")
            self.assertEqual(ids.dtype, np.float32)
            np.testing.assert_array_equal(ids[0, :, 0], self.ids.astype(np.float32))
            with self.assertRaises(ValueError):
                t.read("K", layer=0, dtype="int32")
        # bf16 rounding: nearest even, exact values survive, NaN stays NaN
        x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -0.0, np.inf, np.nan], np.float32)
        b = kvtrace.f32_to_bf16(x)
        np.testing.assert_array_equal(b[:5], [0x3F80, 0x3F80, 0x3F82, 0x8000, 0x7F80])
        self.assertTrue(np.isnan(kvtrace.bf16_to_f32(b)[5]))
        np.testing.assert_allclose(kvtrace.bf16_to_f32(self.Vbits[1]), self.Vf[1], rtol=2 ** -8)

    def test_head_selection(self):
        with kvtrace.open(self.path) as t:
            np.testing.assert_array_equal(t.read("K", 0, heads=1), self.K[0][1])
            np.testing.assert_array_equal(t.read("K", 0, heads=-1), self.K[0][1])
            np.testing.assert_array_equal(t.read("Q_window", 1, heads=(1, 3)), self.Q[1][1:3])
            np.testing.assert_array_equal(t.read("Q_window", 1, heads=[3, 0]),
                                          self.Q[1][[3, 0]])
            np.testing.assert_array_equal(t.read("Q_window", 1, heads=slice(None, None, 2)),
                                          self.Q[1][::2])
            np.testing.assert_array_equal(t.read("Q_window", 1, heads=range(2, 4)),
                                          self.Q[1][2:4])
            with self.assertRaises(IndexError):
                t.read("K", 0, heads=2)
            with self.assertRaises(ValueError):
                t.read("K")  # per-layer kind without a layer

    def test_random_access_reads_little(self):
        with kvtrace.open(self.path) as t:
            before = t.bytes_read
            t.read("K", 1, heads=0)
            self.assertLess(t.bytes_read - before, t.file_bytes // 4)

    def test_tables_and_meta(self):
        with kvtrace.open(self.path) as t:
            tk = t.tokens
            np.testing.assert_array_equal(tk["token_ids"], self.ids)
            np.testing.assert_array_equal(tk["modality"], self.mod)
            np.testing.assert_array_equal(tk["positions"], self.pos)
            np.testing.assert_array_equal(tk["decode_token_ids"], [7, 8, 9])
            self.assertEqual(tk["token_text"], self.text)
            self.assertEqual(t.meta, [{"hello": [1, 2, 3]}])

    def test_verify_ok(self):
        rep = kvtrace.verify(self.path)
        self.assertTrue(rep["ok"], rep)
        self.assertEqual(rep["n_records_ok"], self.stats["n_records"])
        with kvtrace.open(self.path) as t:
            self.assertTrue(t.verify()["ok"])

    def test_writer_errors(self):
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace.TraceWriter(self.path, HEADER)  # exists, no force
        self.assertEqual(e.exception.status_name, "KVT_ERR_IO")
        self.assertTrue(str(e.exception))
        p = os.path.join(self.dir, "x.kvt")
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace.TraceWriter(p, "[1, 2]")  # not a JSON object
        self.assertEqual(e.exception.status_name, "KVT_ERR_INVALID_ARG")
        w = kvtrace.TraceWriter(p, HEADER, force=True)
        w.finish()
        with self.assertRaises(kvtrace.TraceError) as e:
            w.append("K", np.zeros((1, 2, 3), np.float32), layer=0)
        self.assertEqual(e.exception.status_name, "KVT_ERR_STATE")
        w.close()
        w.close()  # idempotent

    def test_bf16_bits_any_byte_order(self):
        # 16-bit integer arrays are bf16 bit patterns in either byte order: a '>u2' array
        # (np.frombuffer of big-endian bytes) was stored as bf16 of its numeric values
        bits = np.array([0x3F80, 0x4000, 0xC040], np.uint16)
        for a in (bits, bits.astype(">u2"), bits.astype(np.int16), bits.astype(">i2")):
            np.testing.assert_array_equal(kvtrace.bf16_to_f32(a), [1.0, 2.0, -3.0])
        p = os.path.join(self.dir, "be.kvt")
        with kvtrace.TraceWriter(p, HEADER) as w:
            w.append("K", bits.astype(">u2").reshape(1, 3, 1), layer=0, dtype="bf16")
            w.append("V", bits.reshape(1, 3, 1), layer=0, dtype="bf16")
        with kvtrace.open(p) as t:
            np.testing.assert_array_equal(t.read("K", 0, dtype="float32").ravel(), [1, 2, -3])
            np.testing.assert_array_equal(t.read("V", 0, dtype="float32").ravel(), [1, 2, -3])

    def test_bool_is_not_a_code(self):
        # append(True, ...) wrote a K record (kind code 1); a bool dtype code likewise
        p = os.path.join(self.dir, "b.kvt")
        with kvtrace.TraceWriter(p, HEADER) as w:
            with self.assertRaises(TypeError):
                w.append(True, np.zeros((1, 2, 3), np.float32), layer=0)
            with self.assertRaises(TypeError):
                w.append("K", np.zeros((1, 2, 3), np.float32), layer=0, dtype=True)
            w.append("K", np.zeros((1, 2, 3), np.float32), layer=0)

    def test_token_tables_from_int64(self):
        # token tables take their FORMAT.md dtype from any integer or bool array (an int64
        # array, e.g. torch.arange's, was "dtype int64 has no kvtrace equivalent"); values
        # that do not fit are refused, K/V keep the array's own dtype
        p = os.path.join(self.dir, "t64.kvt")
        with kvtrace.TraceWriter(p, HEADER) as w:
            w.append("token_ids", np.arange(5, dtype=np.int64) + 100)
            w.append("modality", np.array([0, 0, 1, 1, 0], np.int64))
            w.append("positions", np.arange(15, dtype=np.int64).reshape(3, 5))
            w.append("decode_token_ids", np.array([True, False]))
            with self.assertRaises(ValueError):
                w.append("token_ids", np.array([1 << 40], np.int64), tok_begin=5)
            with self.assertRaises(ValueError):
                w.append("modality", np.array([256], np.int64), tok_begin=5)
            with self.assertRaises(ValueError):  # not a table: no kvtrace dtype for int64
                w.append("K", np.zeros((1, 2, 3), np.int64), layer=0)
        with kvtrace.open(p) as t:
            self.assertEqual(t.stored_dtype("token_ids"), "i32")
            self.assertEqual(t.stored_dtype("modality"), "u8")
            np.testing.assert_array_equal(t.tokens["token_ids"], np.arange(5) + 100)
            np.testing.assert_array_equal(t.tokens["modality"], [0, 0, 1, 1, 0])
            np.testing.assert_array_equal(t.tokens["positions"], np.arange(15).reshape(3, 5))
            np.testing.assert_array_equal(t.tokens["decode_token_ids"], [1, 0])


class Corruption(unittest.TestCase):
    def setUp(self):
        self.dir = tmpdir()
        self.path = os.path.join(self.dir, "c.kvt")
        rng = np.random.default_rng(1)
        with kvtrace.TraceWriter(self.path, HEADER) as w:
            for l in range(2):
                w.append("K", rng.standard_normal((2, 24, 8)).astype(np.float32), layer=l)
                w.append("V", rng.standard_normal((2, 24, 8)).astype(np.float32), layer=l)
        with kvtrace.open(self.path) as t:
            self.recs = t.records

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_corrupt_payload(self):
        r = [r for r in self.recs if r["kind"] == "K" and r["layer"] == 1][0]
        bad = os.path.join(self.dir, "bad.kvt")
        with open(self.path, "rb") as f:
            raw = bytearray(f.read())
        off = r["file_offset"] + 96 + r["comp_bytes"] // 2  # inside the payload frame
        raw[off] ^= 0x5A
        with open(bad, "wb") as f:
            f.write(raw)
        with kvtrace.open(bad) as t:
            np.testing.assert_array_equal(t.read("K", 0).shape, (2, 24, 8))  # others fine
            with self.assertRaises(kvtrace.TraceError) as e:
                t.read("K", 1)
            self.assertIn(e.exception.status_name, ("KVT_ERR_CHECKSUM", "KVT_ERR_CORRUPT"))
            self.assertTrue(len(str(e.exception)) > 5)
            self.assertNotEqual(str(e.exception), "corrupt input")  # the detailed message
        rep = kvtrace.verify(bad)
        self.assertFalse(rep["ok"])
        self.assertGreaterEqual(rep["n_records_bad"], 1)
        self.assertTrue(rep["problems"])
        self.assertTrue(any(p["layer"] == 1 for p in rep["problems"]))

    def test_truncated_file_is_recovered(self):
        cut = os.path.join(self.dir, "cut.kvt")
        with open(self.path, "rb") as f:
            raw = f.read()
        last = max(r["file_offset"] for r in self.recs)
        with open(cut, "wb") as f:
            f.write(raw[:last + 50])  # the last record is incomplete
        with kvtrace.open(cut) as t:
            self.assertTrue(t.recovered)
            self.assertTrue(t.recovery_note)
            self.assertEqual(len(t.records), len(self.recs) - 1)
        rep = kvtrace.verify(cut)
        self.assertFalse(rep["ok"])
        self.assertFalse(rep["trailer_ok"])

    def test_not_a_trace(self):
        junk = os.path.join(self.dir, "junk.kvt")
        with open(junk, "wb") as f:
            f.write(b"this is not a trace at all" * 10)
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace.open(junk)
        self.assertEqual(e.exception.status_name, "KVT_ERR_CORRUPT")
        self.assertTrue(str(e.exception))
        with self.assertRaises(kvtrace.TraceError):
            kvtrace.verify(junk)
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace.open(os.path.join(self.dir, "missing.kvt"))
        self.assertEqual(e.exception.status_name, "KVT_ERR_IO")
        self.assertIn("missing.kvt", str(e.exception))

    def test_missing_tensor_and_closed(self):
        t = kvtrace.open(self.path)
        with self.assertRaises(kvtrace.TraceError) as e:
            t.read("Q_window", layer=0)
        self.assertEqual(e.exception.status_name, "KVT_ERR_NOT_FOUND")
        self.assertIn("Q_window", str(e.exception))
        with self.assertRaises(kvtrace.TraceError):
            t.read("K", layer=7)
        with self.assertRaises(ValueError):
            t.read("nonsense", layer=0)
        t.close()
        with self.assertRaises(kvtrace.TraceError):
            t.read("K", layer=0)
        t.close()


class ArrayInterfaceOnly:
    """An object that is not a NumPy array but exposes __array_interface__."""

    def __init__(self, a):
        self._a = a
        self.__array_interface__ = dict(a.__array_interface__)


class FakeTorchTensor:
    """Duck-types the parts of torch.Tensor the binding uses (torch is not installed here)."""

    class _Dev:
        def __init__(self, t):
            self.type = t

    def __init__(self, a, dtype, device="cpu"):
        self._a, self.dtype, self.device = a, dtype, self._Dev(device)
        self.shape = a.shape

    def data_ptr(self):
        return self._a.__array_interface__["data"][0]

    def stride(self):
        return tuple(s // self._a.itemsize for s in self._a.strides)


class CaptureCase(unittest.TestCase):
    """A test of the capture API, in a temporary directory (self.dir)."""

    def setUp(self):
        if not kvtrace.has_capture():
            self.skipTest("library built without the capture API")
        self.dir = tmpdir()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Capture(CaptureCase):

    def test_views_and_roundtrip(self):
        rng = np.random.default_rng(4)
        L, Hq, Hkv, D, T, W, G = 4, 4, 2, 8, 20, 5, 3
        path = os.path.join(self.dir, "cap.kvt")
        K = rng.standard_normal((L, Hkv, T, D)).astype(np.float32)
        V = rng.standard_normal((L, Hkv, T, D)).astype(np.float32)
        Q = rng.standard_normal((L, Hq, T, D)).astype(np.float32)
        dq = rng.standard_normal((L, Hq, G, D)).astype(np.float32)
        dk = rng.standard_normal((L, Hkv, G, D)).astype(np.float32)
        dv = rng.standard_normal((L, Hkv, G, D)).astype(np.float32)
        expect_k, expect_v = [], []
        with kvtrace.CaptureSession(path, n_layers=L, n_q_heads=Hq, n_kv_heads=Hkv,
                                    head_dim=D, n_tokens=T, window=W, kv_dtype="f32",
                                    name="cap-test", rope="mrope", rope_theta=1e6, n_decode=G,
                                    with_colsum=True, capture={"who": "test"}) as s:
            s.set_tokens(token_ids=np.arange(T), modality=["text"] * 5 + ["image"] * (T - 5),
                         positions=np.stack([np.arange(T)] * 3))
            # layer 0: engine [T, H, D] buffers as strided views, in two ubatches
            kb = np.ascontiguousarray(K[0].transpose(1, 0, 2))
            vb = np.ascontiguousarray(V[0].transpose(1, 0, 2))
            s.submit_kv(0, 0, kb[:7].transpose(1, 0, 2), vb[:7].transpose(1, 0, 2))
            s.submit_kv(0, 7, kb[7:].transpose(1, 0, 2), vb[7:].transpose(1, 0, 2))
            expect_k.append(K[0])
            expect_v.append(V[0])
            # layer 1: negative token stride and 4-D [1, H, T, D]
            krev = K[1][:, ::-1]
            s.submit_kv(1, 0, krev[None], V[1][None])
            expect_k.append(krev)
            expect_v.append(V[1])
            # layer 2: zero stride (one token broadcast) and an __array_interface__ object
            kz = np.broadcast_to(K[2][:, :1], (Hkv, T, D))
            s.submit_kv(2, 0, kz, ArrayInterfaceOnly(V[2]))
            expect_k.append(np.array(kz))
            expect_v.append(V[2])
            # layer 3: float16 and bf16-as-uint16 inputs (converted to f32 by C)
            k16 = K[3].astype(np.float16)
            vbf = kvtrace.f32_to_bf16(V[3])
            s.submit_kv(3, 0, k16, vbf)
            expect_k.append(k16.astype(np.float32))
            expect_v.append(kvtrace.bf16_to_f32(vbf))
            for l in range(L):
                s.submit_queries(l, 0, Q[l][:, :12])
                s.submit_queries(l, 12, Q[l][:, 12:])
            self.assertEqual(s.stats()["n_submits"], 5 + 2 * L)
            # KVzip's scores: [Hkv, T] or [Hkv, T, 1]; a wrong shape or a value above 1 refused
            kz = rng.random((L, Hkv, T)).astype(np.float32)
            with self.assertRaises(ValueError):
                s.submit_kvzip(0, kz[0][:, :-1])
            bad = kz[0].copy()
            bad[1, 2] = 1.5
            with self.assertRaises(kvtrace.TraceError) as e:
                s.submit_kvzip(0, bad)
            self.assertIn("KV head 1, token 2", str(e.exception))
            for l in range(L):
                s.submit_kvzip(l, kz[l] if l % 2 else kz[l][:, :, None])
            for step in range(G):
                for l in range(L):
                    sl = slice(step, step + 1)
                    s.submit_decode(l, step, dq[l][:, sl], dk[l][:, sl], dv[l][:, sl])
                s.submit_decode_token(step, 100 + step)
        self.assertTrue(s.closed)
        with kvtrace.open(path) as t:
            self.assertEqual(t.header["model"]["name"], "cap-test")
            self.assertEqual(t.header["model"]["n_kv_heads"], Hkv)
            self.assertEqual(t.header["n_tokens"], T)
            self.assertEqual(t.header["capture"]["who"], "test")
            for l in range(L):
                np.testing.assert_array_equal(t.read("K", l), expect_k[l])
                np.testing.assert_array_equal(t.read("V", l), expect_v[l])
                np.testing.assert_array_equal(t.read("Q_window", l), Q[l][:, T - W:])
                np.testing.assert_array_equal(t.read("Q_decode", l), dq[l])
                np.testing.assert_array_equal(t.read("K_decode", l), dk[l])
                np.testing.assert_array_equal(t.read("V_decode", l), dv[l])
                np.testing.assert_array_equal(t.read("kvzip_score", l)[:, :, 0], kz[l])
                # column sums: sum over queries i >= j of the causal softmax, in NumPy
                cs = t.read("attn_colsum", l)[:, :, 0]
                want = np.zeros((Hq, T))
                for h in range(Hq):
                    z = Q[l][h].astype(np.float64) @ expect_k[l][h // 2].astype(np.float64).T
                    z /= math.sqrt(D)
                    z[np.triu(np.ones((T, T), bool), 1)] = -np.inf
                    e = np.exp(z - z.max(axis=1, keepdims=True))
                    want[h] = (e / e.sum(axis=1, keepdims=True)).sum(axis=0)
                np.testing.assert_allclose(cs, want, rtol=1e-5, atol=1e-6)
            tk = t.tokens
            np.testing.assert_array_equal(tk["token_ids"], np.arange(T))
            np.testing.assert_array_equal(tk["modality"], [0] * 5 + [1] * (T - 5))
            self.assertEqual(tk["positions"].shape, (3, T))
            np.testing.assert_array_equal(tk["decode_token_ids"], [100, 101, 102])
            self.assertTrue(t.verify()["ok"])

    def test_torch_like_tensors(self):
        rng = np.random.default_rng(8)
        x = rng.standard_normal((6, 2, 4)).astype(np.float32)  # [T, H, D] engine buffer
        bits = kvtrace.f32_to_bf16(x)
        path = os.path.join(self.dir, "torch.kvt")
        with kvtrace.CaptureSession(path, n_layers=1, n_q_heads=2, n_kv_heads=2, head_dim=4,
                                    n_tokens=6, window=2, kv_dtype="bf16") as s:
            k = FakeTorchTensor(bits.transpose(1, 0, 2), "torch.bfloat16")
            v = FakeTorchTensor(x.transpose(1, 0, 2), "torch.float32")
            s.submit_kv(0, 0, k, v)
            s.submit_queries(0, 4, FakeTorchTensor(x[4:].transpose(1, 0, 2), "torch.float32"))
            # a CUDA tensor becomes a device view on torch's current stream (not submitted:
            # this fake's memory is on the host)
            fake_torch = types.ModuleType("torch")
            fake_torch.cuda = types.SimpleNamespace(
                current_device=lambda: 3,
                current_stream=lambda dev=None: types.SimpleNamespace(cuda_stream=0xabc))
            saved = sys.modules.get("torch")
            sys.modules["torch"] = fake_torch
            try:
                view, _ = kvtrace.tensor_view(FakeTorchTensor(x[4:].transpose(1, 0, 2),
                                                              "torch.float32", device="cuda"))
            finally:
                if saved is None:
                    del sys.modules["torch"]
                else:
                    sys.modules["torch"] = saved
            self.assertEqual((view.mem, view.device_idx, view.stream), (1, 3, 0xabc))
            with self.assertRaises(ValueError):
                s.submit_kv(0, 6, FakeTorchTensor(x, "torch.float64"), v)
        with kvtrace.open(path) as t:
            np.testing.assert_array_equal(t.read("K", 0), bits.transpose(1, 0, 2))
            np.testing.assert_array_equal(t.read("V", 0), kvtrace.f32_to_bf16(
                x.transpose(1, 0, 2)))

    def test_timeline(self):
        x = np.ones((1, 4, 4), np.float32)

        def run(path, **kw):
            with kvtrace.CaptureSession(path, n_layers=1, n_q_heads=1, n_kv_heads=1,
                                        head_dim=4, n_tokens=4, window=1, **kw) as s:
                s.submit_kv(0, 0, x, x)
                s.submit_queries(0, 3, x[:, 3:])
                if "reason" in kw.get("capture", {}):
                    s.set_timeline_absent(kw["capture"]["reason"])
            with kvtrace.open(path) as t:
                return s, t.meta[-1]["timeline"]

        s, tl = run(os.path.join(self.dir, "tl.kvt"), timeline=True)
        if s.timeline_reason is None:  # CUPTI ran (a GPU machine): a summary, no copies
            self.assertEqual(tl["source"], "cupti")
            self.assertEqual(s.timeline["capture_copy_bytes"], 0)
        else:  # here: why not, in one line, in the trace too
            self.assertTrue(s.timeline_reason.startswith("CUPTI: "), s.timeline_reason)
            self.assertEqual(tl, {"absent": s.timeline_reason})
        s, tl = run(os.path.join(self.dir, "tl2.kvt"), capture={"reason": "engine: no GPU"})
        self.assertEqual(tl, {"absent": "engine: no GPU"})
        s, tl = run(os.path.join(self.dir, "tl3.kvt"))
        self.assertEqual(tl, {"absent": "not collected by this engine"})

    def test_rounding_matches_numpy(self):
        rng = np.random.default_rng(6)
        x = (rng.standard_normal((1, 64, 4)) * 10).astype(np.float32)
        x[0, 0, :] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 65504.0, 1e-6]  # halfway cases, edges
        for dt in ("f16", "bf16"):
            path = os.path.join(self.dir, "r%s.kvt" % dt)
            with kvtrace.CaptureSession(path, n_layers=1, n_q_heads=1, n_kv_heads=1,
                                        head_dim=4, n_tokens=64, window=1, kv_dtype=dt) as s:
                s.submit_kv(0, 0, x, x)
                s.submit_queries(0, 63, x[:, 63:])
            with kvtrace.open(path) as t:
                self.assertEqual(t.stored_dtype("K", 0), dt)
                k = t.read("K", 0)
                if dt == "f16":
                    np.testing.assert_array_equal(k, x.astype(np.float16))
                else:
                    np.testing.assert_array_equal(k, kvtrace.f32_to_bf16(x))

    def test_errors(self):
        path = os.path.join(self.dir, "e.kvt")
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace.CaptureSession(path, n_layers=1, n_q_heads=3, n_kv_heads=2, head_dim=4,
                                   n_tokens=8, window=2)
        self.assertEqual(e.exception.status_name, "KVT_ERR_INVALID_ARG")
        self.assertTrue(str(e.exception))
        s = kvtrace.CaptureSession(path, n_layers=1, n_q_heads=2, n_kv_heads=1, head_dim=4,
                                   n_tokens=8, window=2)
        with self.assertRaises(kvtrace.TraceError) as e:  # wrong head count
            s.submit_kv(0, 0, np.zeros((2, 8, 4), np.float32), np.zeros((2, 8, 4), np.float32))
        self.assertEqual(e.exception.status_name, "KVT_ERR_INVALID_ARG")
        with self.assertRaises(ValueError):  # float64 is not a capture dtype
            s.submit_kv(0, 0, np.zeros((1, 8, 4)), np.zeros((1, 8, 4)))
        with self.assertRaises(ValueError):  # 2-D
            s.submit_queries(0, 0, np.zeros((8, 4), np.float32))
        with self.assertRaises(kvtrace.TraceError) as e:  # incomplete prompt
            s.close()
        self.assertEqual(e.exception.status_name, "KVT_ERR_STATE")
        with self.assertRaises(kvtrace.TraceError):
            s.close()  # already closed
        with kvtrace.open(path) as t:  # still a readable trace
            self.assertEqual(t.meta[-1]["capture_stats"]["complete"], False)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def append_raw(w, kind, layer, payload):
    """Append a u8 record straight through kvt_trace_writer_append, past the binding's checks
    (a record the binding refuses, as another writer could leave it)."""
    info = _lib.RecordInfo(kind=_lib.KINDS[kind], layer=layer, head_begin=0, head_end=1,
                           tok_begin=0, tok_end=len(payload), dim=1, dtype=_lib.DTYPE_U8)
    buf = ctypes.create_string_buffer(payload, len(payload))
    from kvtrace._errors import call
    call(_lib.lib().kvt_trace_writer_append, w._h, ctypes.byref(info), buf)


class FakeTorchDtype(object):
    """Looks like a torch.dtype to the binding (type module "torch", str "torch.NAME")."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


FakeTorchDtype.__module__ = "torch"


class Robustness(CaptureCase):
    """The review's findings on the binding: bad input gets one clear error, never a crash or
    silent wrong data, and complete records stay readable."""

    def sess(self, fname="s.kvt", **kw):
        a = dict(n_layers=1, n_q_heads=2, n_kv_heads=1, head_dim=4, n_tokens=8, window=2)
        a.update(kw)
        return kvtrace.CaptureSession(os.path.join(self.dir, fname), **a)

    @staticmethod
    def fill(s, value=0.0):
        x = np.full((1, 8, 4), value, np.float32)
        s.submit_kv(0, 0, x, x)
        s.submit_queries(0, 6, np.full((2, 2, 4), value, np.float32))

    # ---- finding 1: set_tokens against n_tokens ----
    def test_set_tokens_checks_lengths_and_ranges(self):
        T = 8
        s = self.sess(rope="mrope")
        bad = [
            (dict(token_ids=np.arange(3)), ValueError, ["token_ids", "(3,)", "n_tokens = 8"]),
            (dict(token_ids=np.arange(100)), ValueError, ["token_ids", "(100,)", "[8]"]),
            (dict(modality=[0] * 3), ValueError, ["modality", "(3,)"]),
            (dict(modality=[]), ValueError, ["modality", "(0,)"]),
            (dict(positions=np.zeros((3, T - 1), np.int32)), ValueError,
             ["positions", "(3, 7)", "[P, 8]"]),
            (dict(positions=np.zeros((T, 3), np.int32)), ValueError, ["positions", "(8, 3)"]),
            (dict(modality=[256] + [0] * (T - 1)), ValueError, ["modality", "256", "[0, 3]"]),
            (dict(modality=[-1] + [0] * (T - 1)), ValueError, ["modality", "-1"]),
            (dict(token_ids=np.full(T, 2 ** 31)), ValueError, ["token_ids", "2147483648"]),
            (dict(token_ids=np.full(T, 2 ** 40)), ValueError, ["token_ids"]),
            (dict(token_ids=np.arange(T) + 0.5), ValueError, ["token_ids", "not an integer"]),
            (dict(modality=["txt"] * T), ValueError, ["'txt'", "text, image, video, other"]),
            (dict(positions=np.full((3, T), 2 ** 31)), ValueError, ["positions"]),
        ]
        for kw, exc, words in bad:
            with self.assertRaises(exc, msg=repr(kw)) as e:
                s.set_tokens(**kw)
            for w in words:
                self.assertIn(w, str(e.exception), repr(kw))
        # nothing reached C: the tables can still be set, exactly
        ids = np.arange(T) * 1000 - 5
        pos = np.stack([np.arange(T), np.arange(T) // 2, np.arange(T) % 3]).astype(np.float64)
        s.set_tokens(token_ids=ids, modality=["text"] * 4 + [1, 2, 3, "image"], positions=pos)
        self.fill(s)
        s.close()
        with kvtrace.open(s.path) as t:
            tk = t.tokens
            np.testing.assert_array_equal(tk["token_ids"], ids)
            np.testing.assert_array_equal(tk["modality"], [0, 0, 0, 0, 1, 2, 3, 1])
            np.testing.assert_array_equal(tk["positions"], pos.astype(np.int32))
            self.assertTrue(t.verify()["ok"])

    def test_set_tokens_short_table_large_session(self):
        # a short table for a large T was read past its end (garbage or a segfault)
        s = self.sess(n_tokens=1 << 22, window=1, head_dim=1)
        for kw in (dict(token_ids=[1, 2, 3]), dict(modality=[0]), dict(positions=[0, 1])):
            with self.assertRaises(ValueError):
                s.set_tokens(**kw)
        del s

    # ---- finding 2 (binding part) and 13: kv_dtype, rope, strings ----
    def test_kv_dtype_rope_and_strings(self):
        for i, (dt, code) in enumerate((("bf16", "bf16"), ("float16", "f16"), (np.float32, "f32"),
                                        (FakeTorchDtype("bfloat16"), "bf16"),
                                        (FakeTorchDtype("float16"), "f16"),
                                        (FakeTorchDtype("float32"), "f32"))):
            with self.sess("dt%d.kvt" % i, kv_dtype=dt) as s:
                self.fill(s)
            with kvtrace.open(s.path) as t:
                self.assertEqual(t.header["kv_dtype"], code, repr(dt))
        try:
            import torch
            with self.sess("torch-bf16.kvt", kv_dtype=torch.bfloat16) as s:
                self.fill(s)
            with kvtrace.open(s.path) as t:
                self.assertEqual(t.header["kv_dtype"], "bf16")
        except ImportError:
            pass
        for dt in ("fp8", "i32", "u8", 99, FakeTorchDtype("float64")):
            with self.assertRaises(ValueError, msg=repr(dt)) as e:
                self.sess("x.kvt", kv_dtype=dt)
            self.assertIn("kv_dtype", str(e.exception))
            self.assertIn('"bf16"', str(e.exception))
        with self.assertRaises(ValueError) as e:
            self.sess("x.kvt", rope="yarn")
        self.assertIn("rope 'yarn'", str(e.exception))
        self.assertIn("none, default, mrope", str(e.exception))
        with self.assertRaises(TypeError) as e:
            self.sess("x.kvt", name=123)
        self.assertIn("name must be a str", str(e.exception))
        with self.assertRaises(ValueError) as e:  # C would keep "a" only
            self.sess("x.kvt", name="a\0b")
        self.assertIn("NUL", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "x.kvt")))

    # ---- RoPE details (model.rope: pairs, inv_freq, attention_scaling, mrope_section) ----
    def test_rope_details_round_trip(self):
        # head_dim 4: two pairs. Frequencies that are not float32 values, and float32 ones
        # (a torch buffer), must read back as the same doubles.
        cases = [
            ("none.kvt", dict(), {"type": "default", "theta": 0}),
            ("half.kvt", dict(rope_pairs="half", rope_inv_freq=[1.0, 1.0 / 3.0],
                              rope_attention_scaling=1.0 / 7.0),
             {"type": "default", "theta": 0, "pairs": "half", "inv_freq": [1.0, 1.0 / 3.0],
              "attention_scaling": 1.0 / 7.0}),
            ("inter.kvt", dict(rope_pairs="interleaved", rope_theta=1e4,
                               rope_inv_freq=np.array([0.5, 0.0], np.float32)),
             {"type": "default", "theta": 1e4, "pairs": "interleaved", "inv_freq": [0.5, 0.0]}),
            # float32 0.01 as a double: cJSON's own printer writes it 1 ulp off
            ("f32.kvt", dict(rope_pairs="half", rope_inv_freq=np.array([0.01, 1e-4], np.float32)),
             {"type": "default", "theta": 0, "pairs": "half",
              "inv_freq": [float(np.float32(0.01)), float(np.float32(1e-4))]}),
            ("mrope.kvt", dict(rope="mrope", rope_pairs="half", mrope_section=(1, 0, 1),
                               rope_theta=1e6),
             {"type": "mrope", "theta": 1e6, "pairs": "half", "mrope_section": [1, 0, 1]}),
        ]
        torch = optional_torch()
        if torch is not None:
            f = torch.tensor([1.0, 0.1], dtype=torch.bfloat16)  # no NumPy dtype: converted
            cases.append(("torch.kvt", dict(rope_pairs="half", rope_inv_freq=f),
                          {"type": "default", "theta": 0, "pairs": "half",
                           "inv_freq": [float(x) for x in f.double()]}))
        for fname, kw, want in cases:
            with self.sess(fname, **kw) as s:
                self.fill(s)
            with kvtrace.open(s.path) as t:
                self.assertEqual(t.header["model"]["rope"], want, fname)
                self.assertTrue(t.verify()["ok"], fname)

    def test_rope_details_refused(self):
        bad = [
            (dict(rope_pairs="rotate_half"), ValueError, ["rope_pairs 'rotate_half'", "half"]),
            (dict(rope_pairs=1), ValueError, ["rope_pairs 1"]),
            (dict(rope_inv_freq=[1.0, 0.1, 0.01]), ValueError,
             ["rope_inv_freq", "(3,)", "[2]"]),
            (dict(rope_inv_freq=[[1.0, 0.1]]), ValueError, ["rope_inv_freq", "(1, 2)"]),
            (dict(rope_inv_freq=[1.0, float("nan")]), ValueError,
             ["rope_inv_freq[1] = nan", "finite"]),
            (dict(rope_inv_freq=[-1.0, 0.1]), ValueError, ["rope_inv_freq[0] = -1.0"]),
            (dict(rope_inv_freq=[1.0, float("inf")]), ValueError, ["rope_inv_freq[1] = inf"]),
            (dict(rope_inv_freq=["a", "b"]), TypeError, ["rope_inv_freq", "numbers"]),
            (dict(head_dim=5, rope_inv_freq=[1.0, 0.1]), ValueError,
             ["rope_inv_freq", "even head_dim"]),
            (dict(rope_attention_scaling=-0.5), ValueError, ["rope_attention_scaling", ">= 0"]),
            (dict(rope_attention_scaling=float("nan")), ValueError,
             ["rope_attention_scaling"]),
            (dict(rope_attention_scaling="1"), TypeError, ["rope_attention_scaling"]),
            (dict(rope="mrope", mrope_section=[1, 1]), ValueError,
             ["mrope_section", "3 integers"]),
            (dict(rope="mrope", mrope_section=[1, 1, 1]), ValueError,
             ["mrope_section [1, 1, 1] sums to 3", "head_dim/2 = 2"]),
            (dict(rope="mrope", mrope_section=[3, -1, 0]), ValueError, ["mrope_section[1]"]),
            (dict(rope="mrope", mrope_section=[1.5, 0.5, 0]), TypeError, ["mrope_section[0]"]),
            (dict(mrope_section=[1, 0, 1]), ValueError, ["mrope_section", "rope=\"mrope\""]),
            # the model's other numbers: each named with its value, before ctypes sees it (it
            # said "must be real number, not str"; C took a negative theta into the header,
            # and refused attn_scale=-1 as "attn_scale and rope_theta must be finite")
            (dict(rope_theta=-5.0), ValueError, ["rope_theta = -5.0", "> 0", "0 when not known"]),
            (dict(rope_theta=float("nan")), ValueError, ["rope_theta = nan"]),
            (dict(rope_theta=float("-inf")), ValueError, ["rope_theta = -inf"]),
            (dict(rope_theta="1e4"), TypeError, ["rope_theta", "'1e4'"]),
            (dict(rope_theta=None), TypeError, ["rope_theta", "None"]),
            (dict(attn_scale=-1.0), ValueError,
             ["attn_scale = -1.0", "> 0", "0 for 1/sqrt(head_dim)"]),
            (dict(attn_scale=float("inf")), ValueError, ["attn_scale = inf"]),
            (dict(attn_scale=float("nan")), ValueError, ["attn_scale = nan"]),
            (dict(attn_scale=None), TypeError, ["attn_scale", "None"]),
            (dict(attn_scale="0.125"), TypeError, ["attn_scale", "'0.125'"]),
            # np.dtype(None) is float64: "dtype float64 has no kvtrace equivalent"
            (dict(kv_dtype=None), TypeError, ["kv_dtype None", "fixed when it opens", '"f32"',
                                              '"bf16"', '"f16"']),
            # was accepted unchecked, and int() raised unnamed later with timeline=True
            (dict(capture_stream="abc"), TypeError, ["capture_stream", "'abc'"]),
            (dict(capture_stream=-1), ValueError, ["capture_stream = -1"]),
        ]
        for kw, exc, words in bad:
            with self.assertRaises(exc, msg=repr(kw)) as e:
                self.sess("x.kvt", **kw)
            for w in words:
                self.assertIn(w, str(e.exception), repr(kw))
            self.assertNotIn("float64", str(e.exception), repr(kw))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "x.kvt")))
        # 0 keeps its meaning (theta not known: written as 0; attn_scale: 1/sqrt(D)), and
        # NumPy scalars are numbers
        for fname, kw, theta, scale in (("z.kvt", dict(rope_theta=0, attn_scale=0.0), 0, 0.5),
                                        ("p.kvt", dict(rope_theta=np.float32(1e4),
                                                       attn_scale=np.float64(0.125)), 1e4, 0.125)):
            with self.sess(fname, **kw) as s:
                self.fill(s)
            with kvtrace.open(s.path) as t:
                self.assertEqual(t.header["model"]["rope"]["theta"], theta, fname)
                self.assertEqual(t.header["model"]["attn_scale"], scale, fname)
        # the C library checks the same itself (a struct filled without the binding's checks)
        L = _lib.lib()
        m = _lib.CaptureModel(name=b"m", arch=b"llama", n_layers=1, n_q_heads=1, n_kv_heads=1,
                              head_dim=4, kv_dtype=_lib.DTYPE_F32, rope=1, rope_pairs=3)
        o = _lib.CaptureOpts(n_tokens=8, window=2)
        h = ctypes.c_void_p()
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace._errors.call(L.kvt_capture_open, os.path.join(self.dir, "c.kvt").encode(),
                                 ctypes.byref(m), ctypes.byref(o), ctypes.byref(h))
        self.assertIn("rope pairs 3", str(e.exception))
        # a negative theta was written into the header as "theta": -5; -1 is finite, and the
        # message said it was not
        for field, value, words in (("rope_theta", -5.0, ["rope_theta", "> 0", "got -5"]),
                                    ("attn_scale", -1.0, ["attn_scale", "> 0", "got -1"]),
                                    ("rope_theta", float("nan"), ["rope_theta", "got nan"])):
            m = _lib.CaptureModel(name=b"m", arch=b"llama", n_layers=1, n_q_heads=1,
                                  n_kv_heads=1, head_dim=4, kv_dtype=_lib.DTYPE_F32, rope=1)
            setattr(m, field, value)
            with self.assertRaises(kvtrace.TraceError, msg=field) as e:
                kvtrace._errors.call(L.kvt_capture_open,
                                     os.path.join(self.dir, "c.kvt").encode(),
                                     ctypes.byref(m), ctypes.byref(o), ctypes.byref(h))
            for w in words:
                self.assertIn(w, str(e.exception), field)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "c.kvt")))

    # ---- finding 3: threads ----
    def test_threads_share_a_session_exactly(self):
        L, T, H, D = 32, 512, 4, 64
        rng = np.random.default_rng(0)
        K = rng.standard_normal((L, H, T, D)).astype(np.float32)
        V = rng.standard_normal((L, H, T, D)).astype(np.float32)
        path = os.path.join(self.dir, "thr.kvt")
        s = kvtrace.CaptureSession(path, n_layers=L, n_q_heads=H, n_kv_heads=H, head_dim=D,
                                   n_tokens=T, window=8, kv_dtype="bf16")
        errs = []

        def work(l):
            try:
                s.submit_kv(l, 0, K[l], V[l])
                s.submit_queries(l, T - 8, K[l][:, T - 8:])
            except Exception as e:  # noqa: BLE001
                errs.append(repr(e))
        ths = [threading.Thread(target=work, args=(l,)) for l in range(L)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        self.assertEqual(errs, [])
        s.close()
        with kvtrace.open(path) as t:
            bad = [l for l in range(L) if not (
                np.array_equal(t.read("K", l), kvtrace.f32_to_bf16(K[l])) and
                np.array_equal(t.read("V", l), kvtrace.f32_to_bf16(V[l])) and
                np.array_equal(t.read("Q_window", l), kvtrace.f32_to_bf16(K[l][:, T - 8:])))]
            self.assertEqual(bad, [], "layers with wrong K/V/Q from concurrent submits")
            self.assertTrue(t.verify()["ok"])

    def test_close_while_other_threads_submit_or_read(self):
        L, T = 8, 512
        x = np.random.default_rng(1).random((8, T, 128)).astype(np.float32)
        s = kvtrace.CaptureSession(os.path.join(self.dir, "c.kvt"), n_layers=L, n_q_heads=8,
                                   n_kv_heads=8, head_dim=128, n_tokens=T, window=8,
                                   with_colsum=True)
        errs = []
        started = threading.Event()

        def submit():
            try:
                for l in range(L):
                    started.set()
                    s.submit_kv(l, 0, x, x)
                    s.submit_queries(l, 0, x)
            except kvtrace.TraceError as e:
                errs.append(str(e))
        th = threading.Thread(target=submit)
        th.start()
        started.wait()
        try:
            s.close()  # (a segfault before: the session freed under the submitting thread)
            closed_complete = True
        except kvtrace.TraceError as e:
            self.assertIn("incomplete prompt", str(e))
            closed_complete = False
        th.join()
        if closed_complete:  # the submitter won every race: nothing to refuse
            self.assertEqual(errs, [])
        else:
            self.assertEqual(len(errs), 1, errs)
            self.assertIn("is closed", errs[0])
        # writer: threads append while another closes (the C writer freed under them before)
        wpath = os.path.join(self.dir, "w.kvt")
        w = kvtrace.TraceWriter(wpath, {"format": "kvtrace"}, n_threads=2)
        werrs, go = [], threading.Event()

        def append(l):
            go.wait()
            try:
                for i in range(40):
                    w.append("K", x[:, :64], layer=l, tok_begin=64 * i)
            except kvtrace.TraceError as e:
                werrs.append(str(e))
        ws = [threading.Thread(target=append, args=(l,)) for l in range(4)]
        for a in ws:
            a.start()
        go.set()
        w.close()
        for a in ws:
            a.join()
        self.assertTrue(all("is closed" in e for e in werrs), werrs)
        with kvtrace.open(wpath) as t:  # every record written before the close is readable
            for r in range(len(t.records)):
                t.read_record(r)
        with self.assertRaises(kvtrace.TraceError):
            w.append("K", x[:, :64], layer=0)
        # reader: close() waits for the reads in flight, later reads raise "is closed"
        path = os.path.join(self.dir, "r.kvt")
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}, max_record_bytes=4096) as w:
            for l in range(4):
                w.append("K", x[:, :1024], layer=l)
        for _ in range(10):
            t = kvtrace.open(path)
            out = []

            def read():
                try:
                    for l in range(4):
                        out.append(np.array_equal(t.read("K", l), x[:, :1024]))
                except kvtrace.TraceError as e:
                    out.append(str(e))
            rs = [threading.Thread(target=read) for _ in range(3)]
            for r in rs:
                r.start()
            t.close()
            for r in rs:
                r.join()
            self.assertTrue(all(o is True or "is closed" in o for o in out), out)

    # ---- finding 4: force=True over an existing trace ----
    def test_force_keeps_old_trace_and_names_the_new_one(self):
        path = os.path.join(self.dir, "f.kvt")
        with self.sess("f.kvt") as s:
            self.fill(s, value=1.0)
        old = read_bytes(path)
        s = self.sess("f.kvt", force=True)
        x = np.full((1, 8, 4), 2.0, np.float32)
        s.submit_kv(0, 0, x, x)  # the queries never come: incomplete
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.assertRaises(kvtrace.TraceError):
                s.close()
        self.assertIsNotNone(s.partial_path)
        self.assertTrue(os.path.basename(s.partial_path).startswith("f.kvt.tmp.%d." % os.getpid()),
                        s.partial_path)
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        self.assertTrue(any(s.partial_path in m and "unchanged" in m for m in msgs), msgs)
        self.assertEqual(read_bytes(path), old, "the old trace is unchanged")
        with kvtrace.open(s.partial_path) as t:  # the new records are readable there
            np.testing.assert_array_equal(t.read("K", 0), x)
            self.assertFalse(t.meta[-1]["capture_stats"]["complete"])
        # a complete capture replaces it, leaves no temporary file and no partial_path
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.sess("f.kvt", force=True) as s2:
                self.fill(s2, value=3.0)
        self.assertIsNone(s2.partial_path)
        self.assertFalse([w for w in caught if issubclass(w.category, RuntimeWarning)])
        with kvtrace.open(path) as t:
            self.assertEqual(float(t.read("K", 0).max()), 3.0)
        # the writer: unfinished over an existing trace
        w = kvtrace.TraceWriter(path, {"format": "kvtrace"}, force=True)
        w.append("K", np.zeros((1, 2, 3), np.float32), layer=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w.close()
        self.assertTrue(w.partial_path and os.path.exists(w.partial_path))
        self.assertTrue(any(w.partial_path in str(c.message) for c in caught))
        with kvtrace.open(path) as t:
            self.assertEqual(float(t.read("K", 0).max()), 3.0)

    # ---- finding 6: meta_json ----
    def test_append_json_and_meta(self):
        path = os.path.join(self.dir, "j.kvt")
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}) as w:
            w.append("K", np.ones((1, 2, 3), np.float32), layer=0)
            for bad, exc in (("garbage", ValueError), ("[1, 2]", ValueError),
                             ('{"a": NaN}', ValueError), ({"a": float("nan")}, ValueError),
                             (42, TypeError), ('{"a": 1} x', ValueError)):
                with self.assertRaises(exc, msg=repr(bad)) as e:
                    w.append_json(bad)
                self.assertIn("append_json", str(e.exception))
            w.append_json({"ok": 1})
            w.append_json('{"ok": 2}')
        with kvtrace.open(path) as t:
            self.assertEqual(t.meta, [{"ok": 1}, {"ok": 2}])
        # a bad meta_json record (written through the C API: append refuses it too):
        # TraceError naming it, the rest of the trace readable
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}, force=True) as w:
            w.append("K", np.ones((1, 2, 3), np.float32), layer=0)
            w.append_json({"ok": 1})
            append_raw(w, "meta_json", -1, b"garbage")
        with kvtrace.open(path) as t:
            with self.assertRaises(kvtrace.TraceError) as e:
                t.meta
            self.assertEqual(e.exception.status_name, "KVT_ERR_CORRUPT")
            self.assertIn("meta_json record 2", str(e.exception))
            np.testing.assert_array_equal(t.read("K", 0), np.ones((1, 2, 3), np.float32))

    # ---- finding 7: integers at the ctypes boundary, NUL in paths ----
    def test_integers_and_paths(self):
        for kw, words in ((dict(n_tokens=2 ** 32 + 8), ["n_tokens", "4294967304", "uint32"]),
                          (dict(n_tokens=2 ** 40), ["n_tokens", "1099511627776"]),
                          (dict(n_tokens=-1), ["n_tokens"]),
                          (dict(n_layers=2 ** 32 + 1), ["n_layers"]),
                          (dict(n_decode=2 ** 32), ["n_decode"]),
                          (dict(window=2 ** 32 + 2), ["window"]),
                          (dict(max_record_bytes=-1), ["max_record_bytes"])):
            with self.assertRaises(ValueError, msg=repr(kw)) as e:
                self.sess("i.kvt", **kw)
            for w in words:
                self.assertIn(w, str(e.exception))
        with self.assertRaises(TypeError) as e:
            self.sess("i.kvt", n_tokens=8.0)
        self.assertIn("n_tokens must be an integer", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "i.kvt")))
        # a NUL in a path: refused, nothing created at the cut name
        for make in (lambda p: self.sess(p), lambda p: kvtrace.TraceWriter(
                os.path.join(self.dir, p), {"format": "kvtrace"}),
                lambda p: kvtrace.open(os.path.join(self.dir, p)),
                lambda p: kvtrace.verify(os.path.join(self.dir, p))):
            with self.assertRaises(ValueError) as e:
                make("a\0b")
            self.assertIn("NUL", str(e.exception))
        self.assertEqual(os.listdir(self.dir), [])
        s = self.sess(n_decode=2)
        x = np.zeros((1, 8, 4), np.float32)
        with self.assertRaises(ValueError):  # wrapped to layer 0 before
            s.submit_kv(2 ** 32, 0, x, x)
        with self.assertRaises(TypeError):  # truncated to layer 0 before
            s.submit_kv(0.7, 0, x, x)
        with self.assertRaises(ValueError):
            s.submit_kv(0, 2 ** 32, x, x)
        self.assertEqual(s.stats()["n_submits"], 0)
        self.fill(s)
        with self.assertRaises(ValueError):  # token id 2^40 was recorded as 0
            s.submit_decode_token(0, 2 ** 40)
        s.submit_decode_token(0, 2 ** 31 - 1)
        s.close()
        with kvtrace.open(s.path) as t:
            self.assertEqual(list(t.tokens["decode_token_ids"]), [2 ** 31 - 1])
            for layer in (2 ** 32, 2 ** 31, -2 ** 31 - 1):  # 2^32 returned layer 0 before
                with self.assertRaises(ValueError) as e:
                    t.read("K", layer)
                self.assertIn("layer", str(e.exception))
            with self.assertRaises(ValueError):
                t.read(2 ** 32 + 1, 0)
        w = kvtrace.TraceWriter(os.path.join(self.dir, "w.kvt"), {"format": "kvtrace"})
        with self.assertRaises(ValueError):  # head_end would wrap
            w.append("K", np.zeros((2, 2, 3), np.float32), layer=0, head_begin=2 ** 32 - 1)
        with self.assertRaises(ValueError):
            w.append("K", np.zeros((1, 2, 3), np.float32), layer=0, tok_begin=2 ** 33)
        with self.assertRaises(ValueError):  # int64 ids that do not fit i32
            w.append("token_ids", np.array([1, 2, 2 ** 40]), dtype="i32")
        with self.assertRaises(TypeError):  # float -> i32 would truncate
            w.append("token_ids", np.array([1.7, 2.2]), dtype="i32")
        w.finish()
        w.close()

    # ---- finding 8: copies and forks ----
    def test_copy_and_pickle_refused(self):
        path = os.path.join(self.dir, "c.kvt")
        w = kvtrace.TraceWriter(path, {"format": "kvtrace"})
        s = self.sess("s.kvt")
        w.append("K", np.ones((1, 2, 3), np.float32), layer=0)
        for obj in (w, s):
            for f in (copy.copy, copy.deepcopy, pickle.dumps):
                with self.assertRaises(TypeError, msg="%s %s" % (f.__name__, type(obj))):
                    f(obj)
        w.finish()
        w.close()
        t = kvtrace.open(path)
        for f in (copy.copy, copy.deepcopy, pickle.dumps):
            with self.assertRaises(TypeError) as e:
                f(t)
            self.assertIn("Trace", str(e.exception))
        np.testing.assert_array_equal(t.read("K", 0), np.ones((1, 2, 3), np.float32))
        t.close()
        self.fill(s)
        s.close()

    @unittest.skipUnless(hasattr(os, "fork"), "no fork")
    def test_forked_child_leaves_the_parents_session_alone(self):
        s = self.sess("p.kvt", n_threads=2)
        x = np.full((1, 8, 4), 5.0, np.float32)
        s.submit_kv(0, 0, x, x)
        t = kvtrace.open(self._finished_trace())

        def child():  # using the session is refused, dropping it closes nothing
            try:
                s.stats()
                return 3
            except kvtrace.TraceError as e:
                if "forked child" not in str(e):
                    return 4
            if not np.array_equal(t.read("K", 0), np.ones((1, 2, 3), np.float32)):
                return 5
            s.__del__()  # what dropping them runs: it must not finish the parent's trace
            t.__del__()
            return 0
        self.run_child(child, 60)
        s.submit_queries(0, 6, np.full((2, 2, 4), 5.0, np.float32))
        s.close()
        rep = kvtrace.verify(s.path)
        self.assertTrue(rep["ok"], rep["problems"][:2])
        with kvtrace.open(s.path) as t2:
            np.testing.assert_array_equal(t2.read("K", 0), x)
        np.testing.assert_array_equal(t.read("K", 0), np.ones((1, 2, 3), np.float32))
        t.close()

    def test_close_is_not_starved_and_a_child_forked_mid_read_can_close(self):
        path = self._finished_trace()
        t = kvtrace.open(path)
        stop, started = threading.Event(), threading.Barrier(5)

        def loop():
            started.wait()
            try:
                while not stop.is_set():
                    t.read("K", 0)
            except kvtrace.TraceError:
                pass  # closed under it: expected
        rs = [threading.Thread(target=loop) for _ in range(4)]
        for r in rs:
            r.start()
        started.wait()
        # a child forked while the readers run (one is likely inside a read): its copy of
        # the reader reads and closes without waiting for the parent's threads

        def child():
            if not np.array_equal(t.read("K", 0), np.ones((1, 2, 3), np.float32)):
                return 3
            t.close()
            return 0
        try:
            self.run_child(child, 30)
        except BaseException:
            stop.set()  # the readers end with the test
            raise
        # close() while 4 threads read in a loop: it holds new reads back, so it returns
        # (before: it waited as long as the readers kept reading)
        done = threading.Event()
        closer = threading.Thread(target=lambda: (t.close(), done.set()))
        closer.start()
        finished = done.wait(20)
        stop.set()
        closer.join()
        for r in rs:
            r.join()
        self.assertTrue(finished, "close() starved by readers")
        with self.assertRaises(kvtrace.TraceError):
            t.read("K", 0)

    def test_bool_mask_tables(self):
        s = self.sess()
        mask = np.arange(8) % 3 == 0  # modality as a mask (image tokens), ids too
        s.set_tokens(token_ids=mask, modality=mask)
        self.fill(s)
        s.close()
        with kvtrace.open(s.path) as t:
            np.testing.assert_array_equal(t.tokens["modality"], mask.astype(np.uint8))
            np.testing.assert_array_equal(t.tokens["token_ids"], mask.astype(np.int32))

    def run_child(self, body, seconds):
        """Runs body() in a forked child (its return value is the exit code; an exception is
        6) and asserts the child exits 0 within `seconds` (killed and failed otherwise)."""
        pid = os.fork()
        if pid == 0:
            code = 6
            try:
                code = body()
            except BaseException:  # noqa: BLE001
                pass
            finally:
                os._exit(code)
        for _ in range(int(seconds * 10)):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            self.fail("the forked child hung")
        self.assertTrue(os.WIFEXITED(status), "child died: status %d" % status)
        self.assertEqual(os.WEXITSTATUS(status), 0, "child exit code")

    def _finished_trace(self):
        path = os.path.join(self.dir, "ro.kvt")
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}) as w:
            w.append("K", np.ones((1, 2, 3), np.float32), layer=0)
        return path

    # ---- finding 13: read_record ----
    def test_read_record_index(self):
        path = self._finished_trace()
        with kvtrace.open(path) as t:
            n = len(t.records)
            np.testing.assert_array_equal(t.read_record(-1), t.read_record(n - 1))
            for i in (n, -n - 1, 2 ** 64):
                with self.assertRaises(IndexError) as e:
                    t.read_record(i)
                self.assertIn("read_record", str(e.exception))
                self.assertIn("%d records" % n, str(e.exception))
            with self.assertRaises(TypeError):
                t.read_record("0")



def optional_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


class QAFindings(unittest.TestCase):
    """A QA pass on the binding: values silently truncated or made up, records the reader
    cannot reach, final stats lost, cached data shared with the caller, messages that do not
    say how to proceed. Each case failed on the binding before its fix."""

    def setUp(self):
        self.dir = tmpdir()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def p(self, name):
        return os.path.join(self.dir, name)

    def k_trace(self, K):
        path = self.p("k.kvt")
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}, force=True) as w:
            w.append("K", K, layer=0)
        return path

    # ---- 1: heads= takes integers only ----
    def test_heads_refuses_non_integers(self):
        K = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
        nh = 4
        with kvtrace.open(self.k_trace(K)) as t:
            # (0, nh / 2) read heads [0, 2] (a list), [1.7] read head 1, 2.0 was "not iterable"
            for bad in ((0, nh / 2), [1.7], 2.0, np.float32(1), [np.float64(1.0)],
                        (0, np.float64(2)), slice(0, 2.0), np.array([0.0, 1.0]), object()):
                with self.assertRaises(TypeError, msg=repr(bad)) as e:
                    t.read("K", 0, heads=bad)
                self.assertIn("heads", str(e.exception), repr(bad))
                self.assertNotIn("iterable", str(e.exception), repr(bad))
            for mask in ([True, False, True, False], np.array([True, False]), True):
                with self.assertRaises(TypeError, msg=repr(mask)) as e:
                    t.read("K", 0, heads=mask)
                self.assertIn("mask", str(e.exception))
            # integers of every kind still work
            np.testing.assert_array_equal(t.read("K", 0, heads=np.int64(1)), K[1])
            np.testing.assert_array_equal(t.read("K", 0, heads=np.array(2)), K[2])
            np.testing.assert_array_equal(t.read("K", 0, heads=(np.int32(1), 3)), K[1:3])
            np.testing.assert_array_equal(t.read("K", 0, heads=np.array([3, 0])), K[[3, 0]])
            torch = optional_torch()
            if torch is not None:
                np.testing.assert_array_equal(t.read("K", 0, heads=torch.tensor(2)), K[2])
                np.testing.assert_array_equal(t.read("K", 0, heads=torch.tensor([0, 2])),
                                              K[[0, 2]])
                with self.assertRaises(TypeError) as e:
                    t.read("K", 0, heads=torch.tensor(2.0))
                self.assertIn("heads", str(e.exception))

    # ---- 2: bf16 conversions do not make bits up ----
    def test_bf16_conversions_refuse_values(self):
        bits = np.array([0x3F80, 0xC000, 0x7FC0], np.uint16)
        for bad in (np.array([1.5, 2.0], np.float32), np.array([1.5]), 1.5, [0x3F80],
                    np.array([1], np.int64)):
            with self.assertRaises(TypeError, msg=repr(bad)) as e:
                kvtrace.bf16_to_f32(bad)  # was garbage: 1.5 -> 1.4e-45 (the bits 0x10000)
            self.assertIn("uint16", str(e.exception))
        np.testing.assert_array_equal(kvtrace.bf16_to_f32(bits)[:2], [1.0, -2.0])
        np.testing.assert_array_equal(kvtrace.bf16_to_f32(bits.view(np.int16))[:2], [1.0, -2.0])
        self.assertEqual(float(kvtrace.bf16_to_f32(np.uint16(0x3F80))), 1.0)  # 0-d: as 1-d
        for bad in (bits, bits.view(np.int16), [1, 2], np.array([True])):
            with self.assertRaises(TypeError, msg=repr(bad)) as e:
                kvtrace.f32_to_bf16(bad)  # was: bit patterns taken as values
            self.assertIn("float values", str(e.exception))
        # float64 is rounded once (through float32 it was rounded twice: 0x3F80)
        x = np.array([1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8 + 2 ** -30), 2.0 ** -134 + 2.0 ** -160,
                      1e300, 1 + 2 ** -8, np.inf])
        np.testing.assert_array_equal(kvtrace.f32_to_bf16(x),
                                      [0x3F81, 0xBF81, 0x0001, 0x7F80, 0x3F80, 0x7F80])
        self.assertEqual(int(kvtrace.f32_to_bf16(1.0)), 0x3F80)
        torch = optional_torch()
        if torch is not None:
            tb = torch.tensor([1.5, -3.25, 1e-3], dtype=torch.bfloat16)
            want = tb.view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(kvtrace.bf16_to_f32(tb), tb.float().numpy())
            np.testing.assert_array_equal(kvtrace.f32_to_bf16(tb), want)
            np.testing.assert_array_equal(kvtrace.f32_to_bf16(tb.float().requires_grad_()),
                                          want)
            with self.assertRaises(TypeError):
                kvtrace.bf16_to_f32(tb.float())

    # ---- 3: TraceWriter.append takes what CaptureSession takes ----
    def test_writer_takes_torch_tensors_and_explains_float64(self):
        torch = optional_torch()
        path = self.p("w.kvt")
        rng = np.random.default_rng(3)
        x = rng.standard_normal((2, 3, 4)).astype(np.float32)
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}) as w:
            # float64 (a list of floats, say) is not narrowed silently, and the message says
            # what to do
            for bad in (x.astype(np.float64), x.tolist()):
                with self.assertRaises(ValueError) as e:
                    w.append("K", bad, layer=3)
                self.assertIn('dtype="f32"', str(e.exception))
                self.assertIn("float64", str(e.exception))
            w.append("K", x.tolist(), layer=3, dtype="f32")
            if torch is not None:
                tb = torch.tensor(x).to(torch.bfloat16)
                w.append("K", tb, layer=0)                      # was: unsupported ScalarType
                w.append("V", torch.tensor(x, requires_grad=True), layer=0)  # was: numpy()
                w.append("Q_window", tb, layer=0, dtype="f32")  # bf16 values, exactly
                w.append("V", tb, layer=1, dtype="bf16")
        with kvtrace.open(path) as t:
            np.testing.assert_array_equal(t.read("K", 3), x)
            if torch is not None:
                bits = tb.view(torch.int16).numpy().view(np.uint16)
                self.assertEqual(t.stored_dtype("K", 0), "bf16")
                np.testing.assert_array_equal(t.read("K", 0), bits)
                np.testing.assert_array_equal(t.read("V", 1), bits)
                self.assertEqual(t.stored_dtype("V", 0), "f32")
                np.testing.assert_array_equal(t.read("V", 0), x)
                np.testing.assert_array_equal(t.read("Q_window", 0), tb.float().numpy())

    # ---- 5: Trace.records and Trace.tokens are the caller's to change ----
    def test_tokens_and_records_are_not_shared(self):
        path = self.p("tok.kvt")
        ids = np.arange(6, dtype=np.int32) + 10
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}) as w:
            w.append("K", np.ones((1, 6, 2), np.float32), layer=0)
            w.append("token_ids", ids)
            w.append("positions", np.arange(6))
            w.append("token_text", np.frombuffer(b"a\0b\0", np.uint8))
        t = kvtrace.open(path)
        tk = t.tokens
        with self.assertRaises(ValueError):  # read-only (was: changed every later result)
            tk["token_ids"][0] = -999
        with self.assertRaises(ValueError):
            tk["positions"][0, 0] = -999
        tk["token_text"].append("c")
        tk["token_ids"] = None
        np.testing.assert_array_equal(t.tokens["token_ids"], ids)
        np.testing.assert_array_equal(t.tokens["positions"], [np.arange(6)])
        self.assertEqual(t.tokens["token_text"], ["a", "b"])
        recs = t.records
        recs[0]["layer"] = 99
        recs.clear()
        self.assertEqual(t.records[0]["layer"], 0)
        self.assertEqual(t.layers("K"), [0])
        # after close(): both raise "is closed" like every use, read before or not
        t.close()
        for name in ("records", "tokens", "meta"):
            with self.assertRaises(kvtrace.TraceError, msg=name) as e:
                getattr(t, name)
            self.assertIn("is closed", str(e.exception))
        self.assertEqual(t.header, {"format": "kvtrace"})

    # ---- 6: append refuses records the reader cannot reach, or FORMAT.md forbids ----
    def test_append_refuses_unreachable_or_invalid_records(self):
        path = self.p("a.kvt")
        x = np.ones((1, 4, 2), np.float32)
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}) as w:
            bad = [
                (lambda: w.append("K", x, layer=-1), ["K", "per-layer", "-1"]),
                (lambda: w.append("attn_colsum", x[:, :, :1], layer=-1), ["per-layer"]),
                (lambda: w.append("token_ids", np.arange(4), layer=0), ["token_ids", "table"]),
                (lambda: w.append("modality", [0, 1], layer=2), ["modality", "table"]),
                (lambda: w.append("modality", np.array([0, 4], np.uint8)),
                 ["modality", "4", "3 other"]),
                (lambda: w.append("modality", [0, 1, 9]), ["modality", "9"]),
                (lambda: w.append("meta_json", np.frombuffer(b"garbage", np.uint8)),
                 ["meta_json", "append_json", "not valid JSON"]),
                (lambda: w.append("meta_json", b'{"a": NaN}'), ["meta_json", "NaN"]),
                (lambda: w.append("meta_json", b"[1, 2]"), ["meta_json", "JSON object"]),
                (lambda: w.append("K", np.ones((1, 4, 2), np.int32), layer=0),
                 ["K", "f16, bf16 or f32", "i32"]),
                (lambda: w.append("attn_colsum", x.astype(np.float16)[:, :, :1], layer=0),
                 ["attn_colsum", "f32", "f16"]),
                (lambda: w.append("token_ids", np.arange(4), dtype="f32"), ["i32", "f32"]),
            ]
            for fn, words in bad:
                with self.assertRaises(ValueError, msg=repr(words)) as e:
                    fn()
                for word in words:
                    self.assertIn(word, str(e.exception))
            # what FORMAT.md allows still goes in
            w.append("K", x, layer=0)
            w.append("token_ids", np.arange(4), layer=-1)
            w.append("modality", np.array([0, 1, 2, 3], np.uint8))
            w.append("meta_json", b'{"a": 1}\0')
            self.assertEqual(w.stats()["n_records"], 4)
        with kvtrace.open(path) as t:
            self.assertEqual(len(t.records), 4)
            self.assertEqual(t.meta, [{"a": 1}])
            np.testing.assert_array_equal(t.tokens["modality"], [0, 1, 2, 3])
            self.assertTrue(t.verify()["ok"])

    # ---- 7: messages that say how to proceed in Python ----
    def test_large_meta_is_one_record(self):
        # a meta_json object above the writer's 4 MiB record size was split along tokens, and
        # Trace.meta then failed on "Unterminated string" (found by test_format_spec's author);
        # a meta record is one JSON object, never split; several stay several
        path = self.p("bigmeta.kvt")
        big = {"notes": "x" * (5 << 20)}
        with kvtrace.TraceWriter(path, {"format": "kvtrace"}) as w:
            w.append_json(big)
            w.append_json({"b": 1})
            w.append("meta_json", json.dumps({"c": 2}).encode() + b" " * (5 << 20))
        with kvtrace.open(path) as t:
            metas = [r for r in t.records if r["kind"] == "meta_json"]
            self.assertEqual(len(metas), 3)
            self.assertEqual(t.meta, [big, {"b": 1}, {"c": 2}])

    def test_messages(self):
        path = self.p("m.kvt")
        # NumPy scalars and arrays in a header or meta dict are written as their values
        hdr = {"format": "kvtrace", "n_tokens": np.int64(6), "x": np.float32(0.5),
               "flag": np.bool_(True), "ids": np.arange(3)}
        with kvtrace.TraceWriter(path, hdr) as w:
            w.append("K", np.ones((1, 2, 2), np.float32), layer=0)
            w.append_json({"n": np.int32(7)})
        with kvtrace.open(path) as t:
            self.assertEqual(t.header, {"format": "kvtrace", "n_tokens": 6, "x": 0.5,
                                        "flag": True, "ids": [0, 1, 2]})
            self.assertEqual(t.meta, [{"n": 7}])
            # an unknown kind code: the message names it (was: "no record for layer 0")
            with self.assertRaises(kvtrace.TraceError) as e:
                t.read(999, 0)
            self.assertEqual(e.exception.status_name, "KVT_ERR_NOT_FOUND")
            self.assertIn("kind 999", str(e.exception))
        # an existing file: the Python way to overwrite it
        with self.assertRaises(kvtrace.TraceError) as e:
            kvtrace.TraceWriter(path, {"format": "kvtrace"})
        self.assertEqual(e.exception.status_name, "KVT_ERR_IO")
        self.assertIn("force=True", str(e.exception))
        self.assertNotIn("--force", str(e.exception))
        if kvtrace.has_capture():
            with self.assertRaises(kvtrace.TraceError) as e:
                kvtrace.CaptureSession(path, n_layers=1, n_q_heads=1, n_kv_heads=1,
                                       head_dim=2, n_tokens=2, window=1)
            self.assertIn("force=True", str(e.exception))
            self.assertNotIn("--force", str(e.exception))
            x = np.ones((1, 2, 2), np.float32)
            with kvtrace.CaptureSession(self.p("c.kvt"), n_layers=1, n_q_heads=1, n_kv_heads=1,
                                        head_dim=2, n_tokens=2, window=1,
                                        capture={"seed": np.int64(5)}) as s:
                s.submit_kv(0, 0, x, x)
                s.submit_queries(0, 1, x[:, 1:])
            with kvtrace.open(s.path) as t:
                self.assertEqual(t.header["capture"]["seed"], 5)
        # NaN, and objects JSON does not know: ValueError saying so, nothing written
        other = self.p("nan.kvt")
        for bad, words in (({"a": float("nan")}, ["header", "NaN"]),
                           ({"a": np.float64("inf")}, ["header", "Infinity"]),
                           ('{"a": NaN}', ["header", "NaN"]),
                           ({"a": object()}, ["header", "object"])):
            with self.assertRaises(ValueError, msg=repr(bad)) as e:
                kvtrace.TraceWriter(other, bad)
            for word in words:
                self.assertIn(word, str(e.exception))
        self.assertFalse(os.path.exists(other))


class QAFindingsCapture(CaptureCase):
    """The QA pass's findings on CaptureSession."""

    def sess(self, fname, **kw):
        return kvtrace.CaptureSession(os.path.join(self.dir, fname), n_layers=1, n_q_heads=2,
                                      n_kv_heads=1, head_dim=4, n_tokens=8, window=2, **kw)

    # ---- 4: the final stats outlive the session ----
    def test_close_is_idempotent_and_keeps_the_final_stats(self):
        x = np.ones((1, 8, 4), np.float32)
        with self.sess("ok.kvt") as s:
            s.submit_kv(0, 0, x, x)
            s.submit_queries(0, 6, np.ones((2, 2, 4), np.float32))
        final = s.stats()  # was: "is closed" (the with block's close() result was lost)
        self.assertEqual(final["n_submits"], 2)
        self.assertGreater(final["writer"]["n_records"], 0)
        self.assertGreater(final["writer"]["file_bytes"], 0)
        self.assertEqual(s.close(), final)  # idempotent (was: "is closed")
        self.assertEqual(s.close(), final)
        s.stats()["writer"]["n_records"] = -1  # a copy each time
        self.assertEqual(s.stats(), final)
        with self.assertRaises(kvtrace.TraceError) as e:  # submitting after close still fails
            s.submit_kv(0, 0, x, x)
        self.assertIn("is closed", str(e.exception))
        with kvtrace.open(s.path) as t:
            self.assertEqual(t.meta[-1]["capture_stats"]["complete"], True)
        # a close that raised: closing again raises the same error, stats() has the counters
        s = self.sess("bad.kvt")
        s.submit_kv(0, 0, x, x)
        with self.assertRaises(kvtrace.TraceError) as e1:
            s.close()
        with self.assertRaises(kvtrace.TraceError) as e2:
            s.close()
        self.assertEqual((e2.exception.status_name, str(e2.exception)),
                         (e1.exception.status_name, str(e1.exception)))
        self.assertEqual(e1.exception.status_name, "KVT_ERR_STATE")
        self.assertEqual(s.stats()["n_submits"], 1)


class QAFindings2(CaptureCase):
    """A second QA pass (2026-12-03): each case failed before its fix."""

    def sess(self, fname, **kw):
        return kvtrace.CaptureSession(os.path.join(self.dir, fname), n_layers=1, n_q_heads=2,
                                      n_kv_heads=1, head_dim=4, n_tokens=8, window=2, **kw)

    def test_modality_from_torch(self):
        torch = optional_torch()
        if torch is None:
            self.skipTest("no torch")
        ids = torch.tensor([[5, 9, 9, 5, 9, 5, 5, 5]])  # HF-shaped [1, T]
        want = [0, 1, 1, 0, 1, 0, 0, 0]
        s = self.sess("m.kvt")
        try:
            # a [1, T] mask: a ValueError naming the table (was: torch's "Boolean value of
            # Tensor with more than one value is ambiguous"); a scalar: the same (was:
            # "'int' object is not iterable")
            for bad in ((ids == 9), 5):
                with self.assertRaises(ValueError) as e:
                    s.set_tokens(modality=bad)
                self.assertIn("modality", str(e.exception))
        finally:
            try:
                s.close()
            except kvtrace.TraceError:
                pass  # nothing was submitted: an incomplete trace
        names = ["image" if w else "text" for w in want]
        # a 1-D torch mask; names still in any iterable: an object array, a generator (a
        # review of the fix found both refused by its first version)
        for i, mod in enumerate(((ids[0] == 9), np.array(names, dtype=object),
                                 (n for n in names))):
            s = self.sess("m%d.kvt" % i)
            s.set_tokens(token_ids=ids[0], modality=mod)
            x = np.ones((1, 8, 4), np.float32)
            s.submit_kv(0, 0, x, x)
            s.submit_queries(0, 6, np.ones((2, 2, 4), np.float32))
            s.close()
            with kvtrace.open(s.path) as t:
                np.testing.assert_array_equal(t.tokens["modality"], want)

    def test_partial_path_with_warnings_as_errors(self):
        x = np.ones((1, 8, 4), np.float32)
        with self.sess("w.kvt") as s:
            s.submit_kv(0, 0, x, x)
            s.submit_queries(0, 6, np.ones((2, 2, 4), np.float32))
        s = self.sess("w.kvt", force=True)
        s.submit_kv(0, 0, x, x)  # incomplete
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with self.assertRaises(RuntimeWarning):
                s.close()
        # the warning names the temporary; partial_path does too (was: None)
        self.assertTrue(s.partial_path and os.path.exists(s.partial_path), s.partial_path)

    def test_lone_surrogate_refused(self):
        with self.assertRaises(ValueError) as e:
            self.sess("n.kvt", name="caf\udce9")
        self.assertIn("not valid Unicode", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "n.kvt")))

    def test_header_not_utf8_reads(self):
        # another writer's header naming the model in Latin-1: kvtrace.open reads it as
        # os.fsdecode reads such a file name (was: a bare UnicodeDecodeError)
        L = kvtrace._lib.lib()
        path = os.path.join(self.dir, "l1.kvt").encode()
        h = ctypes.c_void_p()
        hdr = b'{"format":"kvtrace","model":{"name":"caf\xe9"}}'
        self.assertEqual(L.kvt_trace_writer_create(path, hdr, None, ctypes.byref(h)), 0)
        self.assertEqual(L.kvt_trace_writer_finish(h), 0)
        L.kvt_trace_writer_free(h)
        with kvtrace.open(path) as t:
            self.assertEqual(t.header["model"]["name"], "caf\udce9")


class QAFindings3(CaptureCase):
    """A third QA pass (2026-12-06): each case failed before its fix."""

    def test_bf16_bits_rewritten_as_float(self):
        # Trace.read gives a bf16 tensor as uint16 bit patterns; appending them again with
        # dtype="f32" or "f16" stored the integers 16256, 49152, ... (and dtype None refused
        # them, suggesting dtype="f32"): they are bf16 bits for a per-layer kind
        src, dst = os.path.join(self.dir, "b.kvt"), os.path.join(self.dir, "c.kvt")
        vals = np.array([[[1.0, -2.0, 0.5, 3.0]]], np.float32)
        with kvtrace.TraceWriter(src, {"format": "kvtrace"}) as w:
            w.append("K", vals, layer=0, dtype="bf16")
        with kvtrace.open(src) as t:
            bits = t.read("K", 0)
        self.assertEqual(bits.dtype, np.uint16)
        for dt, stored in ((None, "bf16"), ("bf16", "bf16"), ("f32", "f32"), ("f16", "f16")):
            with kvtrace.TraceWriter(dst, {"format": "kvtrace"}, force=True) as w:
                w.append("K", bits, layer=0, dtype=dt)
                w.append("V", bits.view(np.int16), layer=0, dtype=dt)
            with kvtrace.open(dst) as t:
                for kind in ("K", "V"):
                    self.assertEqual(t.stored_dtype(kind, 0), stored)
                    np.testing.assert_array_equal(t.read(kind, 0, dtype="float32"), vals)
        # a table of 16-bit integers is still integers
        with kvtrace.TraceWriter(dst, {"format": "kvtrace"}, force=True) as w:
            w.append("token_ids", np.array([16256, 3], np.uint16))
        with kvtrace.open(dst) as t:
            np.testing.assert_array_equal(t.tokens["token_ids"], [16256, 3])

    def test_token_table_shape_refused(self):
        # a [T, 1] or [B, T] token table was written, and Trace.tokens returned its first row
        p = os.path.join(self.dir, "t.kvt")
        with kvtrace.TraceWriter(p, {"format": "kvtrace"}) as w:
            for kind, bad in (("token_ids", np.arange(5).reshape(5, 1)),
                              ("decode_token_ids", np.arange(6).reshape(2, 3)),
                              ("positions", np.zeros((4, 5), np.int32) + np.arange(5)),
                              ("modality", np.zeros((1, 5, 2), np.uint8))):
                with self.assertRaises(kvtrace.TraceError) as e:
                    w.append(kind, bad)
                self.assertIn("traces/FORMAT.md", str(e.exception))
                self.assertIn(kind, str(e.exception))
            w.append("positions", np.stack([np.arange(5)] * 3).astype(np.int32))  # M-RoPE
            w.append("token_ids", np.arange(5)[None])
        with kvtrace.open(p) as t:
            np.testing.assert_array_equal(t.tokens["token_ids"], np.arange(5))
            self.assertEqual(t.tokens["positions"].shape, (3, 5))

    def test_header_without_model(self):
        # qfilters and critical_norms raised TypeError/KeyError from inside the package, and
        # repr(Trace) AttributeError, on a trace whose header has no "model" object
        for i, hdr in enumerate(({"format": "kvtrace", "model": "llama"},
                                 {"format": "kvtrace"},
                                 {"format": "kvtrace", "n_tokens": 3,
                                  "model": {"n_layers": 1, "n_q_heads": 3, "n_kv_heads": 2,
                                            "head_dim": 4}})):
            p = os.path.join(self.dir, "h%d.kvt" % i)
            with kvtrace.TraceWriter(p, hdr) as w:
                w.append("V", np.ones((1, 3, 4), np.float32), layer=0)
            with kvtrace.open(p) as t:
                self.assertIn("kvtrace.Trace", repr(t))
            for call, what in ((lambda: kvtrace.qfilters([p]), "qfilters"),
                               (lambda: kvtrace.critical_norms(p, [np.ones((4, 12))]),
                                "critical_norms")):
                with self.assertRaises(ValueError) as e:
                    call()
                self.assertIn(what, str(e.exception))
                self.assertIn("model" if i < 2 else "multiple", str(e.exception))

    def test_read_head_list(self):
        # heads=[0, 2] read the whole range 0..2 (a trace without head 1 failed), and
        # heads=[-1] raised IndexError though heads=-1 counts from the end
        p = os.path.join(self.dir, "heads.kvt")
        x = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
        with kvtrace.TraceWriter(p, {"format": "kvtrace"}) as w:
            w.append("K", x[0:1], layer=0)
            w.append("K", x[2:4], layer=0, head_begin=2)
        with kvtrace.open(p) as t:
            np.testing.assert_array_equal(t.read("K", 0, heads=[0, 2]), x[[0, 2]])
            np.testing.assert_array_equal(t.read("K", 0, heads=[3, 0, 3, -1]), x[[3, 0, 3, 3]])
            np.testing.assert_array_equal(t.read("K", 0, heads=[-2], dtype="float32"), x[[2]])
            with self.assertRaises(kvtrace.TraceError):
                t.read("K", 0, heads=[0, 1])  # head 1 is missing
            with self.assertRaises(IndexError):
                t.read("K", 0, heads=[-5])

    def test_capture_options_checked(self):
        # with_q_all="no" captured Q_all (any truthy value), and capture={"with_colsum": True}
        # made the header claim column sums the trace does not have
        kw = dict(n_layers=1, n_q_heads=1, n_kv_heads=1, head_dim=4, n_tokens=3, window=1)
        p = os.path.join(self.dir, "o.kvt")
        for name in ("with_q_all", "with_colsum", "force", "no_shuffle", "timeline"):
            with self.assertRaises(TypeError) as e:
                kvtrace.CaptureSession(p, **dict(kw, **{name: "no"}))
            self.assertIn(name, str(e.exception))
        for key in ("with_colsum", "api", "zstd_level"):
            with self.assertRaises(kvtrace.TraceError) as e:
                kvtrace.CaptureSession(p, capture={key: True}, **kw)
            self.assertIn('"%s"' % key, str(e.exception))
        self.assertFalse(os.path.exists(p))
        x = np.ones((1, 3, 4), np.float32)
        with kvtrace.CaptureSession(p, capture={"note": "mine"}, with_q_all=np.bool_(True),
                                    with_colsum=0, **kw) as s:
            s.submit_kv(0, 0, x, x)
            s.submit_queries(0, 0, x)
        with kvtrace.open(p) as t:
            c = t.header["capture"]
            self.assertEqual((c["note"], c["with_q_all"], c["with_colsum"]), ("mine", True, False))
            self.assertTrue(t.has("Q_all", 0))


class Lookup(unittest.TestCase):
    def run_py(self, env_lib, code):
        env = dict(os.environ)
        env["KVT_LIB"] = env_lib
        env["PYTHONPATH"] = os.path.join(ROOT, "python")
        return subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True)

    def test_kvt_lib_directory_and_bad_path(self):
        code = "import kvtrace; print(kvtrace.lib_path()); print(kvtrace.library_version())"
        p = self.run_py(os.path.dirname(os.path.abspath(LIB)), code)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertIn("libkvtrace.so", p.stdout)
        p = self.run_py("/nonexistent/libkvtrace.so", code)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("/nonexistent/libkvtrace.so (KVT_LIB): no such file", p.stdout)

    def test_sample_trace(self):
        sample = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
        if not os.path.exists(sample):
            self.skipTest("no sample trace")
        with kvtrace.open(sample) as t:
            L = t.header["model"]["n_layers"]
            self.assertEqual(t.layers("K"), list(range(L)))
            k = t.read("K", layer=L - 1, dtype="float32")
            self.assertEqual(k.shape, (t.header["model"]["n_kv_heads"], t.header["n_tokens"],
                                       t.header["model"]["head_dim"]))
            self.assertTrue(np.isfinite(k).all())


if __name__ == "__main__":
    unittest.main(verbosity=1)
