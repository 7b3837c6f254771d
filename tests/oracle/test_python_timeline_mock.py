#!/usr/bin/python3
"""test_python_timeline_mock.py - CaptureSession(timeline=True) in Python over the mock CUPTI
(tests/mock_cupti; ctest puts its folder first on LD_LIBRARY_PATH), so that the binding's
side of the CUPTI timeline runs without a GPU:

  * the capture stream given as a handle resolves to CUPTI's (context, stream) pair: copies on
    that stream count as the capture's, a copy on another context's stream with the same id
    does not; the summary equals the one worked by hand and the trace records it;
  * a stop that fails (records dropped) gives a one-line reason starting "CUPTI: " once, in
    s.timeline_reason and in the trace;
  * another CUPTI client attached: the capture goes on and says why; a later session works.

Environment: KVT_LIB (libkvtrace.so), KVT_SOURCE_ROOT, KVT_MOCK_CUPTI_SONAME (the name the
library loads CUPTI by). Exit 77 without NumPy or the library.
"""
import ctypes
import os
import re
import shutil
import sys
import tempfile
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


def knobs():
    """enum kvt_mock_knob, read from the header so that the numbers cannot drift."""
    with open(os.path.join(ROOT, "tests", "mock_cupti", "kvt_mock_cupti.h")) as f:
        text = f.read()
    body = text[text.index("enum kvt_mock_knob {"):]
    body = body[:body.index("};")]
    return {n: i for i, n in enumerate(re.findall(r"^\s*KVT_MOCK_([A-Z_]+)\s*,", body, re.M))}


K = knobs()
M = ctypes.CDLL(os.environ["KVT_MOCK_CUPTI_SONAME"])
if not hasattr(M, "kvt_mock_cupti_set"):
    sys.exit("%s is not the mock CUPTI: is its folder on LD_LIBRARY_PATH?"
             % os.environ["KVT_MOCK_CUPTI_SONAME"])
M.kvt_mock_cupti_set.argtypes = [ctypes.c_int, ctypes.c_longlong]
M.kvt_mock_cupti_set.restype = ctypes.c_longlong
M.kvt_mock_cupti_get.argtypes = [ctypes.c_int]
M.kvt_mock_cupti_get.restype = ctypes.c_longlong
M.kvt_mock_cupti_kernel.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64,
                                    ctypes.c_uint64, ctypes.c_char_p]
M.kvt_mock_cupti_copy.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64,
                                  ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32]
NAMES = [b"flash_fwd_kernel<Flash_fwd_kernel_traits<128>>",
         b"nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN"]  # alive until delivered


def stream(ctx, sid):
    """KVT_MOCK_STREAM: the fake driver's handle of stream sid in context ctx."""
    return (ctx << 16) | sid


class TimelineMock(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvt_tlmock_")
        M.kvt_mock_cupti_reset()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def capture(self, name, script=None, **kw):
        x = np.ones((1, 4, 4), np.float32)
        path = os.path.join(self.dir, name)
        with kvtrace.CaptureSession(path, n_layers=1, n_q_heads=1, n_kv_heads=1, head_dim=4,
                                    n_tokens=4, window=1, timeline=True, **kw) as s:
            s.submit_kv(0, 0, x, x)
            s.submit_queries(0, 3, x[:, 3:])
            if script:
                script()
        with kvtrace.open(path) as t:
            return s, t.meta[-1]["timeline"]

    def test_summary(self):
        # context 1: attention [0,100), GEMM [100,300); the capture's copy (stream 7) [50,150)
        # runs under both (100 overlapped); context 2's stream 7 copies 999 bytes, not the
        # capture's
        def script():
            M.kvt_mock_cupti_kernel(1, 3, 0, 100, NAMES[0])
            M.kvt_mock_cupti_kernel(1, 3, 100, 300, NAMES[1])
            M.kvt_mock_cupti_copy(1, 7, 50, 150, 4096, 1)
            M.kvt_mock_cupti_copy(2, 7, 0, 100, 999, 1)
        s, tl = self.capture("a.kvt", script, capture_stream=stream(1, 7))
        want = {"n_kernels": 2, "attention_ns": 100, "gemm_ns": 200, "other_ns": 0,
                "n_memcpy": 2, "memcpy_bytes": 5095, "memcpy_ns": 200,
                "capture_copy_bytes": 4096, "capture_copy_ns": 100,
                "capture_copy_overlap_ns": 100}
        self.assertIsNone(s.timeline_reason)
        self.assertEqual(s.timeline, want)
        self.assertEqual(tl, dict(want, source="cupti"))
        self.assertEqual(M.kvt_mock_cupti_get(K["SUBSCRIBED"]), 0)

    def test_stop_fails(self):
        def script():
            M.kvt_mock_cupti_kernel(1, 3, 0, 100, NAMES[0])
            M.kvt_mock_cupti_set(K["DROPPED"], 3)
        s, tl = self.capture("b.kvt", script)
        self.assertIsNone(s.timeline)
        self.assertEqual(s.timeline_reason,
                         "CUPTI: 3 activity records dropped: CUPTI had no buffer space for them")
        self.assertEqual(tl, {"absent": s.timeline_reason})

    def test_other_client(self):
        M.kvt_mock_cupti_set(K["OTHER_SUBSCRIBER"], 1)
        s, tl = self.capture("c.kvt")
        self.assertTrue(s.timeline_reason.startswith("CUPTI: another CUPTI client is attached"),
                        s.timeline_reason)
        self.assertEqual(tl, {"absent": s.timeline_reason})
        M.kvt_mock_cupti_set(K["OTHER_SUBSCRIBER"], 0)
        s, tl = self.capture("d.kvt", lambda: M.kvt_mock_cupti_kernel(1, 3, 0, 5, NAMES[1]))
        self.assertIsNone(s.timeline_reason)
        self.assertEqual((tl["n_kernels"], tl["gemm_ns"]), (1, 5))


if __name__ == "__main__":
    unittest.main(verbosity=1)
