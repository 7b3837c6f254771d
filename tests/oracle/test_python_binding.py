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
  * library lookup through KVT_LIB (file or directory) and a clear error for a bad path.

Environment: KVT_LIB (libkvtrace.so), KVT_SOURCE_ROOT (repository). Exit 77 without NumPy or
the library.
"""
import ctypes
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import unittest

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
            self.assertEqual(t.version, (1, 0))
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


class Capture(unittest.TestCase):
    def setUp(self):
        if not kvtrace.has_capture():
            self.skipTest("library built without the capture API")
        self.dir = tmpdir()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

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
        self.assertIn("KVT_LIB", p.stdout)

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
