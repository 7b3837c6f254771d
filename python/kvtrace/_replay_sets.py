"""_replay_sets.py - a replay's kept sets, merged keys and values included, in this process
(kvt_replay_sets, replay/kvt_replay.h): what kvtrace.hf.e2e needs of a merged policy, whose
selection export holds its representatives but not the keys and values merged into them."""
import ctypes
import os

import numpy as np

from . import _errors, _lib

_P = ctypes.POINTER
_SETS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            _P(ctypes.c_int32), _P(ctypes.c_uint8), ctypes.c_int, ctypes.c_int,
                            _P(ctypes.c_float), _P(ctypes.c_float))


class KeptSet:
    """One kept set: idx [n] ascending; for a merged set changed [n] (bool) and k, v
    [n_changed, D] the merged keys and values of the changed entries in entry order (None for
    a plain set). query_head: head is a query head (else a KV head)."""

    __slots__ = ("query_head", "idx", "changed", "k", "v")

    def __init__(self, query_head, idx, changed, k, v):
        self.query_head, self.idx, self.changed, self.k, self.v = query_head, idx, changed, k, v


def replay_sets(trace, policies, budgets, seed=0):
    """Replay `policies` (a --policies list) at `budgets` (a --budgets list, e.g. "64,10%") on
    the trace file `trace` as `kvtrace replay` does (one thread, no coverage) and return
    {(policy, budget, layer, head, step): KeptSet}, indices into the lists as given; step -1
    is the set kept for the prompt. Raises TraceError with the library's message."""
    L = _lib.lib()
    fn = getattr(L, "kvt_replay_sets", None)
    if fn is None:
        raise OSError("%s has no kvt_replay_sets: rebuild libkvtrace" % _lib._lib_path)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64, _SETS_FN,
                   ctypes.c_void_p]
    out, failed = {}, []

    def take(_user, pol, bud, layer, head, qh, step, n, idx, changed, n_chg, D, k, v):
        try:
            i = np.ctypeslib.as_array(idx, (n,)).copy() if n else np.zeros(0, np.int32)
            if changed:
                c = np.ctypeslib.as_array(changed, (n,)).astype(bool) if n else \
                    np.zeros(0, bool)
                kk = np.ctypeslib.as_array(k, (n_chg, D)).copy() if n_chg else \
                    np.zeros((0, D), np.float32)
                vv = np.ctypeslib.as_array(v, (n_chg, D)).copy() if n_chg else \
                    np.zeros((0, D), np.float32)
            else:
                c = kk = vv = None
            out[(pol, bud, layer, head, step)] = KeptSet(bool(qh), i, c, kk, vv)
            return 0
        except BaseException as e:  # noqa: B902 - handed back to the caller below
            failed.append(e)
            return 1

    cb = _SETS_FN(take)
    path = os.fsencode(trace)  # str, bytes or a path object
    try:
        _errors.call(fn, path, policies.encode(), budgets.encode(), int(seed), cb, None)
    except _errors.TraceError:
        if failed:
            raise failed[0]
        raise
    return out
