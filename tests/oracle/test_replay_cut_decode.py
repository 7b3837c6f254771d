#!/usr/bin/python3
"""test_replay_cut_decode.py - a trace whose capture was cut short in its decode steps (killed,
disk full) replays with the decode steps every layer holds whole: its layers then hold
different counts, and a layer's K_decode may end before its Q_decode (the records of a chunk
are written Q, K, V). The results must equal those of a capture of the same prompt that
planned exactly that many steps (greedy decoding: the same first steps), but for the header.
Checked on cuts at several places of the decode records, from the records' offsets.
"""
import json
import os
import tempfile

from cli_test import ROOT, check, run, finish

import kvtrace

MODEL = os.path.join(ROOT, "models", "stories260K.bin")
if not os.path.exists(MODEL):
    MODEL = "/work/shared/models/stories260K.bin"
POL = "snapkv:window=16,oracle,quest,h2o:window=16"


def capture(path, decode):
    run("capture-llama2c", "--model", MODEL, "--tokens", 150, "--window", 16, "--decode",
        decode, "--decode-chunk", 8, "--colsum", "--force", "-o", path)


def runs(path):
    """The replay's per-run numbers of the one trace (what must not depend on the cut)."""
    with open(path) as f:
        r = json.load(f)
    t = r["traces"][0]
    return t["n_decode"], json.dumps(t["runs"], sort_keys=True)


tmp = tempfile.mkdtemp()
full = os.path.join(tmp, "full.kvt")
capture(full, 40)
with kvtrace.open(full) as tr:
    recs = tr.records
L = 1 + max(r["layer"] for r in recs)
dec = [r for r in recs if r["kind"] in ("Q_decode", "K_decode", "V_decode")]
check(len(dec) == 3 * L * 5, "%d decode records for %d layers x 5 chunks" % (len(dec), L))
data = open(full, "rb").read()
# cuts: inside the last chunk between a layer's Q_decode and K_decode, between layers of the
# third chunk, and right after the first chunk's records
# (whether the layers then hold different counts)
cuts = [(dec[-2]["file_offset"] + 5, True), (dec[3 * 2 * L + 3 * 1 + 1]["file_offset"] + 1, True),
        (dec[3 * L]["file_offset"], False)]
for i, (cut, uneven) in enumerate(cuts):
    cp = os.path.join(tmp, "cut%d.kvt" % i)
    with open(cp, "wb") as f:
        f.write(data[:cut])
    # the steps every layer holds whole, from the records (Q, K and V each)
    with kvtrace.open(cp) as tr:
        counts = [tr.shape(k, l)[1] if tr.has(k, l) else 0
                  for l in range(L) for k in ("Q_decode", "K_decode", "V_decode")]
    g = min(counts)
    check(g < 40 and (max(counts) > g) == uneven,
          "cut %d: layers hold %s decode steps" % (i, sorted(set(counts))))
    out = os.path.join(tmp, "cut%d.json" % i)
    r = run("replay", cp, "--policies", POL, "--budgets", "24,48", "--threads", 2, "-o", out,
            ok=False)
    if not check(r.returncode == 0, "cut %d: replay exits %d: %s" % (i, r.returncode, r.stderr)):
        continue
    # a warning says so when the layers differ (not when every layer holds the same steps,
    # fewer than planned, as after an early stop), and that the trace is incomplete
    said = "decode metrics from %d decode steps, those every layer holds whole" % g
    check((said in r.stderr) == uneven and "is incomplete" in r.stderr,
          "cut %d: warnings %r" % (i, r.stderr))
    ref = os.path.join(tmp, "ref%d.kvt" % i)
    capture(ref, g)
    ref_out = os.path.join(tmp, "ref%d.json" % i)
    rr = run("replay", ref, "--policies", POL, "--budgets", "24,48", "--threads", 2, "-o",
             ref_out)
    check("warning" not in rr.stderr, "a whole %d-step capture: %r" % (g, rr.stderr))
    (gc, a), (gr, b) = runs(out), runs(ref_out)
    check(gc == g and gr == g, "cut %d: n_decode %d / %d, want %d" % (i, gc, gr, g))
    check(a == b, "cut %d: the results differ from a capture of %d steps" % (i, g))
    print("ok: cut %d at byte %d of %d: %d decode steps replayed, as a %d-step capture" %
          (i, cut, len(data), g, g))
# a cut right before the first chunk's last V_decode: every layer holds 8 decode queries, the
# last layer no decode values, so no layer's decode queries see the decode tokens' keys (the
# metrics of every layer change): a warning names the layer
cp = os.path.join(tmp, "cut_nov.kvt")
last_v = dec[3 * L - 1]
check(last_v["kind"] == "V_decode" and last_v["layer"] == L - 1, "record %r" % last_v)
with open(cp, "wb") as f:
    f.write(data[:last_v["file_offset"]])
r = run("replay", cp, "--policies", POL, "--budgets", "24,48", "--threads", 2, "-o",
        os.path.join(tmp, "cut_nov.json"), ok=False)
said = "layer %d lacks the decode steps' keys or values" % (L - 1)
check(r.returncode == 0 and said in r.stderr, "cut before layer %d's V_decode: exit %d, %r" %
      (L - 1, r.returncode, r.stderr))
print("ok: a layer without decode values is named")
finish("test_replay_cut_decode", tmp)
