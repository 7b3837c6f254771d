"""kvtrace.read_selection: the kept token indices a replay exported (`kvtrace replay
--export-selection FILE`, binary or JSON; analysis/RESULTS.md "Selection export"), read through
the C library's checked reader (kvt_selection_read), for applying a policy's kept sets in an
engine or studying them in NumPy.

    with kvtrace.read_selection("sel.bin") as sel:
        sel.policies                  # [{"label", "name", "query_heads", "per_step", "merged"}]
        idx = sel.kept("snapkv", "64", layer=3, head=1)        # int32 [n], ascending
        m = sel.mask("snapkv", "64", layer=3, n_tokens=T)      # bool [heads, T]
        for r in sel.records(): ...                            # one dict per kept set

Each set is copied out as it is asked for: a delta record (a decode step's set stored as its
changes from the step before) is expanded then, and memory stays the file's and the sets the
reader holds whole.
"""
import contextlib
import ctypes
import operator

from . import _lib
from ._errors import TraceError, call
from ._trace import C_INT, _Guard, _NoCopy, int_arg, path_arg

_P = ctypes.POINTER
_ERR_INVALID_ARG = -7  # kvt_status values (common/kvt_common.h)
_ERR_NOT_FOUND = -8
_ERR_STATE = -9

_FLAG_STEP, _FLAG_MERGED, _FLAG_QHEAD = 0x1, 0x2, 0x4


class _Policy(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char_p), ("name", ctypes.c_char_p),
                ("query_heads", ctypes.c_bool), ("per_step", ctypes.c_bool),
                ("merged", ctypes.c_bool)]


class _Header(ctypes.Structure):
    _fields_ = [("selection_version", ctypes.c_int), ("generator", ctypes.c_char_p),
                ("json", ctypes.c_bool), ("n_policies", ctypes.c_size_t),
                ("policies", _P(_Policy)), ("n_budgets", ctypes.c_size_t),
                ("budgets", _P(ctypes.c_char_p)), ("n_traces", ctypes.c_size_t),
                ("traces", _P(ctypes.c_char_p)), ("n_records", ctypes.c_size_t),
                ("shard_index", ctypes.c_int), ("shard_count", ctypes.c_int),
                ("shard_settings", ctypes.c_char_p)]


class _Record(ctypes.Structure):
    _fields_ = [("trace", ctypes.c_int), ("policy", ctypes.c_int), ("budget", ctypes.c_int),
                ("layer", ctypes.c_int), ("head", ctypes.c_int), ("step", ctypes.c_int),
                ("flags", ctypes.c_uint), ("budget_tokens", ctypes.c_int),
                ("n", ctypes.c_size_t), ("idx", _P(ctypes.c_int32))]


_PROTOS = {
    "kvt_selection_read": (ctypes.c_int, [ctypes.c_char_p, _P(ctypes.c_void_p)]),
    "kvt_selection_free": (None, [ctypes.c_void_p]),
    "kvt_selection_get_header": (_P(_Header), [ctypes.c_void_p]),
    "kvt_selection_record_info": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t,
                                                 _P(_Record)]),
    "kvt_selection_copy_set": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t,
                                              _P(ctypes.c_int32), ctypes.c_size_t]),
    "kvt_selection_find_record": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                 ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                 ctypes.c_int, _P(ctypes.c_size_t)]),
    "kvt_selection_shape": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                           _P(ctypes.c_int), _P(ctypes.c_int), _P(ctypes.c_int)]),
}
# a library built before kvt_selection_mask: Selection.mask goes head by head
_MASK_PROTO = {
    "kvt_selection_mask": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_size_t, _P(ctypes.c_uint8), ctypes.c_size_t]),
}
_has_mask = None
_declared = False


def _L():
    global _declared
    global _has_mask
    L = _lib.lib()
    if not _declared:
        _lib._declare(L, _PROTOS)
        _has_mask = _lib._declare(L, _MASK_PROTO, required=False)
        _declared = True
    return L


def _s(b):
    return b.decode("utf-8", "replace") if b is not None else None


def _np():
    try:
        import numpy
    except ImportError:  # pragma: no cover - NumPy is a dependency of every array method
        raise ImportError("kvtrace.Selection's arrays need NumPy")
    return numpy


class Selection(_NoCopy):
    """A selection export opened for reading (kvtrace.read_selection(path)). Everything is
    checked when the file is read; a damaged file raises TraceError naming what is wrong.

    Attributes: path, version, generator, policies (list of dicts), budgets (budget texts as
    given to replay, "64" or "10%"), traces (trace paths), n_records, shard (None, or
    (index, count) for a part of replay --shard). A policy is named by its label or index, a
    budget by its text or index, a trace by its path or index. Methods: kept, mask, shape,
    records, close. A context manager; the arrays returned are copies that outlive it.
    Threads may read one Selection concurrently; close() waits for the reads in flight. It
    cannot be copied or pickled (read the path again)."""

    def __init__(self, path):
        self._h = None
        self.path, bpath = path_arg(path)
        self._guard = _Guard()
        h = ctypes.c_void_p()
        L = _L()
        call(L.kvt_selection_read, bpath, ctypes.byref(h))
        self._h = h
        hd = L.kvt_selection_get_header(h).contents
        self.version = hd.selection_version
        self.generator = _s(hd.generator)
        self.policies = [{"label": _s(p.label), "name": _s(p.name),
                          "query_heads": bool(p.query_heads), "per_step": bool(p.per_step),
                          "merged": bool(p.merged)}
                         for p in hd.policies[:hd.n_policies]]
        self.budgets = [_s(b) for b in hd.budgets[:hd.n_budgets]]
        self.traces = [_s(t) for t in hd.traces[:hd.n_traces]]
        self.n_records = hd.n_records
        self.shard = (hd.shard_index, hd.shard_count) if hd.shard_count else None

    def close(self):
        """Free the export's memory (after the reads other threads have in flight).
        Idempotent; any later use raises TraceError."""
        with self._guard.exclusive():
            h, self._h = self._h, None
        if h is not None and h.value:
            _L().kvt_selection_free(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            h, self._h = self._h, None  # unreferenced: no read can be in flight
            if h is not None and h.value:
                _L().kvt_selection_free(h)
        except Exception:
            pass

    def __len__(self):
        return self.n_records

    def __repr__(self):
        return "<kvtrace.Selection %r: %d policies, %d budgets, %d traces, %d kept sets>" % (
            self.path, len(self.policies), len(self.budgets), len(self.traces), self.n_records)

    @contextlib.contextmanager
    def _use(self):
        """The handle, held open (against close() in another thread) for the block."""
        with self._guard.shared():
            if self._h is None:
                raise TraceError(_ERR_STATE, "selection %s is closed" % self.path)
            yield self._h

    # ---- names to indices ----
    @staticmethod
    def _index(value, names, what):
        if isinstance(value, bool):
            raise TypeError("%s must be a name or an index, not a bool" % what)
        if not isinstance(value, str) and hasattr(value, "__index__"):  # NumPy ints too
            value = operator.index(value)
            if 0 <= value < len(names):
                return value
            raise ValueError("%s %d is out of range: the export has %d (%s)"
                             % (what, value, len(names), ", ".join(names)))
        if isinstance(value, str):
            if value in names:
                return names.index(value)
            raise ValueError("%s %r is not in the export; it has %s"
                             % (what, value, ", ".join(names)))
        raise TypeError("%s must be a name or an index, not %s" % (what, type(value).__name__))

    def _pbt(self, policy, budget, trace):
        return (self._index(policy, [p["label"] for p in self.policies], "policy"),
                self._index(budget, self.budgets, "budget"),
                self._index(trace, self.traces, "trace"))

    # ---- data ----
    def shape(self, policy, trace=0):
        """(layers, heads, decode steps) of a policy's kept sets in a trace: heads are query
        heads for a heads=query policy, else KV heads; steps is 0 unless it selects per step."""
        p, _, t = self._pbt(policy, 0, trace)
        nl, nh, ns = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        with self._use() as h:
            call(_L().kvt_selection_shape, h, t, p, ctypes.byref(nl), ctypes.byref(nh),
                 ctypes.byref(ns))
        return (nl.value, nh.value, ns.value)

    def kept(self, policy, budget, layer, head, trace=0, step=-1):
        """The kept token indices (int32, ascending) of one head of one layer; step >= 0 is a
        per-step policy's set at that decode step (a head that does not re-select keeps its
        prompt-time set at every step). Raises TraceError if the export has no such set (its
        message names what was asked)."""
        _np()  # before anything: a clear error without NumPy
        p, b, t = self._pbt(policy, budget, trace)
        layer, head, step = _layer_head_step(layer, head, step)
        rec = ctypes.c_size_t()
        missing = None
        with self._use() as h:
            try:
                call(_L().kvt_selection_find_record, h, t, p, b, layer, head, step,
                     ctypes.byref(rec))
            except TraceError as e:
                if e.status != _ERR_NOT_FOUND:
                    raise
                missing = e
                nl, nh, ns = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
                call(_L().kvt_selection_shape, h, t, p, ctypes.byref(nl), ctypes.byref(nh),
                     ctypes.byref(ns))
                if 0 <= step < ns.value and self.policies[p]["per_step"]:
                    # a head that does not re-select (hybridkv-like's static heads) keeps its
                    # prompt-time set at every step, as the replay measured it
                    try:
                        call(_L().kvt_selection_find_record, h, t, p, b, layer, head, -1,
                             ctypes.byref(rec))
                        missing = None
                    except TraceError as e2:
                        if e2.status != _ERR_NOT_FOUND:
                            raise
            if missing is None:
                return _copy_set(h, rec.value)[1]
        nl, nh, ns = self.shape(p, t)
        hint = ""
        if step < 0 and ns > 0:
            hint = "; a per-step policy: pass step=0..%d" % (ns - 1)
        raise TraceError(missing.status, "%s: no kept set for policy %s, budget %s, trace %d, "
                         "layer %d, head %d%s (it has %d layers, %d heads, %d steps%s)"
                         % (self.path, self.policies[p]["label"], self.budgets[b], t, layer,
                            head, ", step %d" % step if step >= 0 else "", nl, nh, ns,
                            hint))

    def mask(self, policy, budget, layer, n_tokens, trace=0, step=-1):
        """bool [heads, n_tokens]: True where a head keeps the token (a kept-set mask for an
        engine's attention), for every head of the layer."""
        np = _np()
        nh = self.shape(policy, trace)[1]
        n_tokens = int_arg(_no_bool(n_tokens, "n_tokens"), "n_tokens", C_INT, lo=0)
        m = np.zeros((nh, n_tokens), bool)
        L = _L()
        if _has_mask and nh and n_tokens:  # every head in one library call
            p, b, t = self._pbt(policy, budget, trace)
            lay, _, stp = _layer_head_step(layer, 0, step)
            try:
                with self._use() as h:
                    call(L.kvt_selection_mask, h, t, p, b, lay, stp, n_tokens,
                         m.ctypes.data_as(_P(ctypes.c_uint8)), m.nbytes)
                return m
            except TraceError:  # head by head below, for the message that names it
                m[:] = False
        for h in range(nh):
            k = self.kept(policy, budget, layer, h, trace, step)
            if k.size and k[-1] >= n_tokens:
                raise ValueError("%s: layer %d head %d keeps token %d, beyond n_tokens=%d"
                                 % (self.path, layer, h, k[-1], n_tokens))
            m[h, k] = True
        return m

    def records(self):
        """Every kept set in file order, as dicts: trace, policy, budget (indices), label,
        budget_text, layer, head, step (-1: the prompt's set), budget_tokens, query_head,
        merged, kept (int32 array, a copy)."""
        for i in range(self.n_records):
            with self._use() as h:  # closed (even between two records): raises
                r, kept = _copy_set(h, i)
                d = {"trace": r.trace, "policy": r.policy, "budget": r.budget,
                     "label": self.policies[r.policy]["label"],
                     "budget_text": self.budgets[r.budget], "layer": r.layer, "head": r.head,
                     "step": r.step, "budget_tokens": r.budget_tokens,
                     "query_head": bool(r.flags & _FLAG_QHEAD),
                     "merged": bool(r.flags & _FLAG_MERGED), "kept": kept}
            yield d


def _layer_head_step(layer, head, step):
    """layer, head and step checked as C ints (ctypes would wrap 2**32 + 1 to 1 and truncate
    1.9 to 1), step >= -1."""
    layer = int_arg(_no_bool(layer, "layer"), "layer", C_INT, lo=0)
    head = int_arg(_no_bool(head, "head"), "head", C_INT, lo=0)
    step = int_arg(_no_bool(step, "step"), "step", C_INT)
    if step < -1:
        raise ValueError("step %d: a decode step is >= 0, or -1 for the prompt's set" % step)
    return layer, head, step


def _copy_set(h, i):
    """Record i's fields (a _Record; its idx not to be used) and its set, a new int32 array:
    expanded into the array, so the reader keeps nothing for it."""
    np = _np()
    r = _Record()
    call(_L().kvt_selection_record_info, h, i, ctypes.byref(r))
    kept = np.empty(r.n, np.int32)
    call(_L().kvt_selection_copy_set, h, i, kept.ctypes.data_as(_P(ctypes.c_int32)), r.n)
    return r, kept


def _no_bool(value, name):
    if isinstance(value, bool):
        raise TypeError("%s must be an integer, not a bool" % name)
    return value


def read_selection(path):
    """Read a selection export (replay --export-selection; binary or JSON, detected from the
    content). Raises TraceError on a missing, damaged or newer file."""
    return Selection(path)
