#!/usr/bin/python3
"""test_python_selection.py - kvtrace.read_selection: a replay's exported kept sets in Python.

Two synthetic traces are replayed with policies of every kind of export record (KV heads,
query heads, head-adaptive, per decode step, merged), exported twice by the same replay
settings: binary and JSON. Checked:

  * the header: policies (label, name, granularity, per_step, merged), budgets, traces;
  * every kept set read through kvtrace (binary and JSON) equals the JSON file parsed by the
    json module, looked up by label/text/path and by index; records() yields them all in the
    file's order with the same fields;
  * mask() is the kept sets as a bool [heads, T], in one library call the same masks and
    errors as head by head for every policy, budget, layer and step; shape() gives layers,
    KV or query heads, decode steps;
  * errors: an unknown label or budget (ValueError listing the export's), a set the export
    lacks (TraceError naming it and the shape), a file cut short or missing (TraceError with
    the reader's message), use after close; no copies; threads reading across close();
  * the binary file's delta records (against the step before: a decode-time cache,
    knorm:decoding=1,prefill=1; against the budget before: the larger budgets' sets):
    analysis/RESULTS.md's NumPy reader, run as printed there, gives every set the JSON file
    holds, and the file is smaller than the same records written whole.

Environment (tests/cmake/python.cmake): KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT. Exit 77 without
NumPy or the CLI.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import check, finish, raises, run  # noqa: E402 - exits 77 without NumPy/CLI
import numpy as np  # noqa: E402
import kvtrace  # noqa: E402


SPECS = ["snapkv:window=8", "snapkv:window=8,heads=query,label=snapq", "adakv:window=8",
         "quest:page=4", "lightkv-like:window=8", "hybridkv-like:window=8,label=hyb",
         "knorm:decoding=1,prefill=1"]
LABELS = ["snapkv:window=8", "snapq", "adakv:window=8", "quest:page=4", "lightkv-like:window=8",
          "hyb", "knorm:decoding=1,prefill=1"]

with tempfile.TemporaryDirectory() as tmp:
    tr = [os.path.join(tmp, "a.kvt"), os.path.join(tmp, "b.kvt")]
    run("synth", "--shape", "tiny", "--tokens", "48", "--window", "8", "--decode", "4",
        "-o", tr[0])
    run("synth", "--shape", "tiny", "--tokens", "40", "--window", "8", "--decode", "4",
        "--seed", "3", "-o", tr[1])
    args = ["replay"] + tr + sum((["--policy", s] for s in SPECS), []) + [
        "--budgets", "4,16,50%", "--threads", "2", "--force"]
    run(*(args + ["--export-selection", os.path.join(tmp, "s.bin"),
                  "-o", os.path.join(tmp, "r1.json")]))
    run(*(args + ["--export-selection", os.path.join(tmp, "s.json"),
                  "-o", os.path.join(tmp, "r2.json")]))
    ref = json.load(open(os.path.join(tmp, "s.json")))
    recs = ref["records"]
    T = [48, 40]

    for name in ("s.bin", "s.json"):
        path = os.path.join(tmp, name)
        with kvtrace.read_selection(path) as sel:
            check([p["label"] for p in sel.policies] == LABELS, "%s: labels %s" %
                  (name, sel.policies))
            check([p["name"] for p in sel.policies] == [p["name"] for p in ref["policies"]],
                  "%s: names" % name)
            check([p["query_heads"] for p in sel.policies] ==
                  [p["granularity"] == "query_head" for p in ref["policies"]] and
                  sel.policies[1]["query_heads"] and not sel.policies[0]["query_heads"],
                  "%s: granularity %s" % (name, sel.policies))
            check([p["per_step"] for p in sel.policies] ==
                  [False, False, False, True, False, True, True]
                  and [p["merged"] for p in sel.policies] == [False] * 4 + [True, False, False],
                  "%s: per_step/merged %s" % (name, sel.policies))
            check(sel.budgets == ["4", "16", "50%"] and sel.traces == tr and
                  len(sel) == len(recs) and sel.shard is None and sel.version ==
                  ref["selection_version"], "%s: header %r" % (name, sel))
            # every set, by name and by index, against the json module's reading
            n = 0
            for r in recs:
                want = sorted(r["kept"])
                by_name = sel.kept(LABELS[r["policy"]], sel.budgets[r["budget"]], r["layer"],
                                   r["head"], trace=tr[r["trace"]], step=r["step"])
                by_idx = sel.kept(r["policy"], r["budget"], r["layer"], r["head"],
                                  trace=r["trace"], step=r["step"])
                if not check(by_name.dtype == np.int32 and by_name.tolist() == want and
                             by_idx.tolist() == want, "%s: %s: got %s" % (name, r, by_name)):
                    break
                n += 1
            got = list(sel.records())
            fields_ok = len(got) == len(recs) and all(
                (g["trace"], g["policy"], g["budget"], g["layer"], g["head"], g["step"],
                 g["budget_tokens"], g["kept"].tolist(), g["label"], g["budget_text"],
                 g["query_head"], g["merged"]) ==
                (r["trace"], r["policy"], r["budget"], r["layer"], r["head"], r["step"],
                 r["budget_tokens"], sorted(r["kept"]), LABELS[r["policy"]],
                 sel.budgets[r["budget"]], bool(r["flags"] & 4), bool(r["flags"] & 2))
                for g, r in zip(got, recs))
            check(fields_ok, "%s: records() differs from the JSON records" % name)
            steps = sum(1 for r in recs if r["step"] >= 0)
            if n == len(recs) and fields_ok:
                print("ok: %s: %d kept sets (%d per decode step) equal the JSON export's" %
                      (name, n, steps))
            check(steps > 0, "no per-step records (quest)")
            # shape and mask
            check(sel.shape("snapkv:window=8") == (2, 2, 0) and sel.shape("snapq") == (2, 4, 0)
                  and sel.shape("quest:page=4", trace=1) == (2, 2, 4),
                  "%s: shapes %s %s %s" % (name, sel.shape(0), sel.shape(1), sel.shape(3, 1)))
            m = sel.mask("adakv:window=8", "16", layer=1, n_tokens=T[1], trace=1)
            want = np.zeros((2, T[1]), bool)
            for r in recs:
                if (r["trace"], r["policy"], r["budget"], r["layer"]) == (1, 2, 1, 1):
                    want[r["head"], r["kept"]] = True
            check(m.shape == (2, T[1]) and (m == want).all() and m.sum() > 0,
                  "%s: mask %s vs %s" % (name, m.sum(1), want.sum(1)))
            # mask() takes every head in one library call (kvt_selection_mask, called here
            # directly): the same masks as head by head through kept(), and an error where that
            # raises, for every policy, budget, layer and step (static heads at a step, a
            # decode-time cache's decode tokens); mask() itself as head by head
            import ctypes
            from kvtrace import _selection
            n_cmp = n_err = bad = 0
            for t_ in range(len(T)):
                for p_ in range(len(sel.policies)):
                    nl_, nh_, ns_ = sel.shape(p_, t_)
                    for b_ in range(len(sel.budgets)):
                        for l_ in range(nl_ + 1):  # (one layer beyond: a missing set)
                            for st_ in [-1] + list(range(ns_)):
                                n_tok = T[t_] + ns_
                                cm = np.zeros((nh_, n_tok), np.uint8)
                                with sel._use() as h:
                                    cst = _selection._L().kvt_selection_mask(
                                        h, t_, p_, b_, l_, st_, n_tok,
                                        cm.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                        cm.nbytes)
                                _selection._has_mask = False
                                try:
                                    pm = sel.mask(p_, b_, l_, n_tok, trace=t_, step=st_)
                                except (kvtrace.TraceError, ValueError):
                                    pm = None
                                _selection._has_mask = True
                                n_cmp += 1
                                n_err += pm is None
                                bad += (cst != 0) if pm is not None else (cst == 0)
                                bad += pm is not None and not np.array_equal(cm.astype(bool), pm)
                                if pm is not None and n_cmp % 7 == 0:  # the public path too
                                    bad += not np.array_equal(
                                        sel.mask(p_, b_, l_, n_tok, trace=t_, step=st_), pm)
            check(n_cmp > 100 and n_err > 10 and bad == 0,
                  "%s: mask() in one call vs head by head: %d of %d differ (%d errors)"
                  % (name, bad, n_cmp, n_err))
            # hybridkv-like's static heads have no set per step: at a step, kept() gives the
            # prompt-time set they keep at every step (the replay's rule); beyond the steps,
            # nothing
            static = {(r["trace"], r["budget"], r["layer"], r["head"]) for r in recs
                      if r["policy"] == 5 and r["step"] < 0} - \
                {(r["trace"], r["budget"], r["layer"], r["head"]) for r in recs
                 if r["policy"] == 5 and r["step"] >= 0}
            ok = len(static) > 0
            for (t_, b_, l_, h_) in sorted(static)[:6]:
                ok &= sel.kept("hyb", b_, l_, h_, trace=t_, step=2).tolist() == \
                    sel.kept("hyb", b_, l_, h_, trace=t_).tolist()
            check(ok, "%s: static heads at a step: %d of them" % (name, len(static)))
            if static:
                t_, b_, l_, h_ = sorted(static)[0]
                raises(kvtrace.TraceError, lambda: sel.kept("hyb", b_, l_, h_, trace=t_,
                                                            step=99),
                       "step 99", "%s: a static head beyond the steps" % name)
            # a per-step policy asked for its prompt's set: the error says which steps exist
            qh = [r for r in recs if r["policy"] == 3 and r["step"] < 0]
            if not qh:
                raises(kvtrace.TraceError, lambda: sel.kept("quest:page=4", 0, 0, 0),
                       "a per-step policy: pass step=0..3", "%s: quest without a step" % name)
            raises(ValueError, lambda: sel.kept(0, 0, 0, 0, step=-2), "step -2",
                   "%s: step below -1" % name)
            # errors
            raises(ValueError, lambda: sel.kept("snapkv", "16", 0, 0), "it has snapkv:window=8",
                   "%s: unknown label" % name)
            raises(ValueError, lambda: sel.kept(0, "32", 0, 0), "budget '32' is not in the "
                   "export; it has 4, 16, 50%", "%s: unknown budget" % name)
            raises(ValueError, lambda: sel.kept(0, 7, 0, 0), "budget 7 is out of range",
                   "%s: budget index" % name)
            raises(ValueError, lambda: sel.kept(0, 0, 0, 0, trace="c.kvt"), "trace 'c.kvt'",
                   "%s: unknown trace" % name)
            raises(kvtrace.TraceError, lambda: sel.kept(0, 0, 5, 0), "no kept set for policy "
                   "snapkv:window=8, budget 4, trace 0, layer 5, head 0 (it has 2 layers, 2 "
                   "heads, 0 steps)", "%s: missing set" % name)
            raises(ValueError, lambda: sel.mask(0, 2, 0, n_tokens=10), "beyond n_tokens=10",
                   "%s: mask too short" % name)
            # integers that do not fit a C int, floats and bools are refused, not wrapped or
            # truncated into another layer's set (2**32 + 1 was layer 1, 1.9 was 1)
            for kw, v, exc, said in (("layer", 2**32 + 1, ValueError, "layer = 4294967297"),
                                     ("head", 2**32, ValueError, "head = 4294967296"),
                                     ("step", 2**32 + 3, ValueError, "step = 4294967299"),
                                     ("layer", 1.9, TypeError, "layer must be an integer"),
                                     ("head", True, TypeError, "not a bool"),
                                     ("layer", -1, ValueError, "layer = -1")):
                a = dict(policy=0, budget=0, layer=0, head=0)
                a[kw] = v
                raises(exc, lambda: sel.kept(**a), said, "%s: kept(%s=%r)" % (name, kw, v))
            raises(ValueError, lambda: sel.mask(0, 0, 0, n_tokens=-1), "n_tokens = -1",
                   "%s: mask(n_tokens=-1)" % name)
            raises(ValueError, lambda: sel.mask(0, 0, 2**32, n_tokens=T[0]), "layer = 4294967296",
                   "%s: mask(layer=2**32)" % name)
            # NumPy integers (argmax, arange) index like ints
            check(sel.kept(np.int64(0), np.int32(1), np.int64(1), np.uint8(1),
                           trace=np.int64(0)).tolist() == sel.kept(0, 1, 1, 1).tolist(),
                  "%s: NumPy integer indices" % name)
        raises(kvtrace.TraceError, lambda: sel.kept(0, 0, 0, 0), "is closed",
               "%s: after close" % name)
        raises(kvtrace.TraceError, lambda: list(sel.records()), "is closed",
               "%s: records after close" % name)

    # no copies (it owns a C handle); threads read while another closes: each read returns a
    # set or raises "is closed", nothing crashes
    import copy
    import threading
    sel = kvtrace.read_selection(os.path.join(tmp, "s.bin"))
    raises(TypeError, lambda: copy.copy(sel), "cannot be copied", "copy")
    outcomes, want0 = [], sel.kept(0, 0, 0, 0).tolist()

    def reader():
        for _ in range(2000):
            try:
                if sel.kept(0, 0, 0, 0).tolist() != want0:
                    outcomes.append("wrong")
                    return
            except kvtrace.TraceError as e:
                outcomes.append("closed" if "is closed" in str(e) else str(e))
                return
        outcomes.append("done")
    ths = [threading.Thread(target=reader) for _ in range(4)]
    for t in ths:
        t.start()
    sel.close()
    for t in ths:
        t.join()
    check(len(outcomes) == 4 and set(outcomes) <= {"closed", "done"},
          "threads and close: %s" % outcomes)
    print("ok: 4 threads reading across close(): %s" % sorted(outcomes))

    # the binary layout's delta records, decoded by RESULTS.md's NumPy reader as printed
    doc = open(os.path.join(os.environ["KVT_SOURCE_ROOT"], "analysis", "RESULTS.md")).read()
    code = doc.split("Reading it with NumPy:")[1].split("```python\n")[1].split("```")[0]
    env = {}
    with open(os.path.join(tmp, "s.bin"), "rb") as f_in:  # the name the snippet opens
        open(os.path.join(tmp, "sel.bin"), "wb").write(f_in.read())
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        exec(compile(code, "RESULTS.md", "exec"), env)
    finally:
        os.chdir(cwd)
    sets, raw = env["sets"], env["raw"]
    off = 16 + int.from_bytes(raw[12:16], "little")
    n_delta, n_evict, n_bdelta, whole = 0, 0, 0, off + 16
    while off < len(raw) - 16:
        n_delta += raw[off + 10] & 8 != 0
        n_bdelta += raw[off + 10] & 16 != 0
        n_evict += raw[off + 10] & 8 != 0 and raw[off + 32:off + 36] != bytes(4)
        off += 36 + 4 * int.from_bytes(raw[off + 28:off + 32], "little")
    same = len(sets) == len(recs) and all(
        sets[(r["trace"], r["policy"], r["budget"], r["layer"], r["head"], r["step"])].tolist()
        == sorted(r["kept"]) for r in recs)
    whole += sum(36 + 4 * len(r["kept"]) for r in recs)
    knorm_steps = sum(1 for r in recs if r["policy"] == 6 and r["step"] >= 0)
    check(same and n_delta >= knorm_steps // 2 and n_evict > 0 and n_bdelta > 0 and
          len(raw) < whole and env["hdr"]["selection_version"] == 3, "RESULTS.md's reader: %d "
          "sets, same %s, %d step deltas (%d removing tokens), %d budget deltas, %d bytes "
          "(whole: %d)" % (len(sets), same, n_delta, n_evict, n_bdelta, len(raw), whole))
    print("ok: RESULTS.md's NumPy reader: %d sets equal the JSON export's; %d step deltas "
          "(%d removing tokens; %d knorm steps), %d budget deltas; %d bytes against %d written "
          "whole" % (len(sets), n_delta, n_evict, knorm_steps, n_bdelta, len(raw), whole))

    # damaged and missing files: the C reader's checked message
    raw = open(os.path.join(tmp, "s.bin"), "rb").read()
    cut = os.path.join(tmp, "cut.bin")
    open(cut, "wb").write(raw[:len(raw) // 2])
    e = raises(kvtrace.TraceError, lambda: kvtrace.read_selection(cut), "cut.bin",
               "a file cut short")
    check(e is not None and e.status_name in ("KVT_ERR_CORRUPT", "KVT_ERR_TRUNCATED"),
          "cut short: status %s" % (e and e.status_name))
    raises(kvtrace.TraceError, lambda: kvtrace.read_selection(os.path.join(tmp, "no.bin")),
           "no.bin", "a missing file")
    raises(TypeError, lambda: kvtrace.read_selection(3), "path must be", "a bad path")

finish("test_python_selection")
