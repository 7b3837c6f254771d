#!/usr/bin/python3
"""test_layer_weights.py - layer_weights=FILE (replay/layer_weights.c): the budget B of the sweep
becomes layer l's own, B_l = max(1, floor(B * w_l * L / sum(w) + 0.5)), and a budget written as
a share f of the prompt gives the policies that read it the share f * w_l * L / sum(w).

1. Layer by layer, a policy with layer_weights= at budget B is the same policy at budget B_l:
   every metric of every head of layer l (n_keep, recalls, errors, coverage, head and oracle
   overlaps, r_kept) and every exported kept set equal those of the plain policy's run at B_l,
   for window, score, per-query-head, per-budget, merged (merge=, think=) and per-step
   policies on the bundled stories260K trace (5 layers, T = 448, 64 decode steps).
2. chunkkv:align=kvpress at a budget written as a share (kvpress's PerLayerCompressionPress:
   weights 1 - r_l at the mean share) equals the plain policy at each layer's share.
3. B_l on awkward weights (rounding half up, the floor of 1, layers above the prompt) against
   the closed form in exact rational arithmetic, through each layer's n_keep; the run's
   layer_budget_min and short_prompt flags.
4. A .npy of the weights gives the same results as the text file; equal weights give exactly
   the plain policy's results.
5. kvtrace recommend --write-allocation: a replay of the written file at the budget it names
   keeps each layer's allocated budget, and costs the entries recommend counted; recommend's
   text says when the uniform budget at the allocation's mean was not measured.
6. kvtrace e2e-llama2c runs a policy with layer_weights=: equal weights give the plain
   policy's KL bit for bit, unequal ones another.
7. The refusals: one clear line each.
Environment: KVT_BIN, KVT_SOURCE_ROOT; exit 77 without NumPy or the CLI.
"""
import json
import math
import os
import sys
import tempfile
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, finish, refused, run  # noqa: E402  (exits 77 without NumPy)
import numpy as np  # noqa: E402

TRACE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
MODEL = os.path.join(ROOT, "models", "stories260K.bin")
work = tempfile.mkdtemp(prefix="kvt_lw_")


def write(name, text):
    p = os.path.join(work, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def replay(specs, budgets, name, export=False):
    out = os.path.join(work, name + ".json")
    args = ["replay", TRACE, "--policies", ",".join(specs), "--budgets", budgets, "-o", out,
            "--force"]
    sel = os.path.join(work, name + ".sel.json")
    if export:
        args += ["--export-selection", sel]
    run(*args)
    with open(out) as f:
        res = json.load(f)
    exp = None
    if export:
        with open(sel) as f:
            exp = json.load(f)
    return res, exp


def runs_of(res):
    return {(r["label"], r["budget_text"]): r for r in res["traces"][0]["runs"]}


def same(a, b, m=""):
    """Equal: n_keep exactly; the other metrics within 1e-12 relative (each sweep sums its
    prefixes through its own budgets' cuts, so the last bit can differ)."""
    if a is None or b is None:
        return a is None and b is None
    if m == "n_keep":
        return a == b
    return abs(a - b) <= 1e-12 * max(1.0, abs(b))


def layer_budget(B, w, layer):
    """B_l in exact arithmetic: floor(B * w_l * L / sum(w) + 1/2), at least 1."""
    W = [Fraction(x) for x in w]
    x = Fraction(B) * W[layer] * len(W) / sum(W)
    return max(1, math.floor(x + Fraction(1, 2)))


# ---- 1. layer by layer, the plain policy at B_l ----
W5 = [1, 2, 4, 4, 4]  # at 72: 24 48 96 96 96; at 144: 48 96 192 192 192
wfile = write("w.txt", "# one weight per layer\n1\n2, 4\n4 4\n")
BASE = ["snapkv", "snapkv:heads=query", "adakv", "knorm", "streamingllm", "tova", "h2o", "oracle",
        "random", "chunkkv", "keydiff-block", "snapkv:merge=pivot", "snapkv:think=0.25", "quest",
        "cur"]
specs = BASE + ["%s%slayer_weights=%s" % (s, "," if ":" in s else ":", wfile) for s in BASE]
res, exp = replay(specs, "24,48,72,96,144,192", "inv", export=True)
R = runs_of(res)
recs = {}
for r in exp["records"]:
    recs[(exp["policies"][r["policy"]]["label"], r["layer"], r["head"], r["budget_tokens"])] = \
        sorted(r["kept"])
for s in BASE:
    lw = "%s%slayer_weights=%s" % (s, "," if ":" in s else ":", wfile)
    n_cmp = n_bad = n_sets = n_sets_bad = 0
    for B in (72, 144):
        a = R[(lw, str(B))]
        for layer in range(5):
            Bl = layer_budget(B, W5, layer)
            b = R[(s, str(Bl))]
            for m, grid in a["metrics"].items():
                for x, y in zip(grid[layer], b["metrics"][m][layer]):
                    n_cmp += 1
                    if not same(x, y, m):
                        n_bad += 1
                        if n_bad <= 3:
                            print("  %s B %d layer %d %s: %r, plain at %d: %r" % (
                                lw, B, layer, m, x, Bl, y))
            for h in range(a["n_heads"]):
                k1 = recs.get((lw, layer, h, B))
                k2 = recs.get((s, layer, h, Bl))
                if k1 is None and k2 is None:
                    continue  # a per-step policy exports no fixed set
                n_sets += 1
                n_sets_bad += k1 != k2
    print("%s: %d metric values, %d differ; %d kept sets, %d differ" % (
        s, n_cmp, n_bad, n_sets, n_sets_bad))
    check(n_cmp > 0 and n_bad == 0 and n_sets_bad == 0,
          "%s: layer_weights at B is not the plain policy at B_l (%d values, %d sets differ)" % (
              s, n_bad, n_sets_bad))
    check(s == "quest" or n_sets > 0, "%s: no kept sets compared" % s)
# the cost counts each layer's own budget
a = R[("snapkv:layer_weights=%s" % wfile, "144")]
check(a["per_layer"]["n_keep"] == [48.0, 96.0, 192.0, 192.0, 192.0],
      "snapkv layer_weights at 144: per-layer n_keep %r" % a["per_layer"]["n_keep"])
check(a.get("layer_budget_min") == 48 and a["short_prompt"] is False,
      "layer_budget_min %r" % a.get("layer_budget_min"))
check("layer_budget_min" not in R[("snapkv", "144")], "a plain run has no layer_budget_min")
opts = [p for p in res["settings"]["policies"] if p["label"] == "adakv:layer_weights=" + wfile]
check(len(opts) == 1 and opts[0]["options"].get("layer_weights") == wfile,
      "the options name the weights file: %r" % (opts[0]["options"] if opts else None))
plain = [p for p in res["settings"]["policies"] if p["label"] == "adakv"][0]
check("layer_weights" not in plain["options"], "a plain policy's options list no layer_weights")

# ---- 2. shares of the prompt: kvpress's PerLayerCompressionPress over ChunkKVPress ----
rfile = write("r.txt", "0.25 0.5 1 1 1\n")  # 1 - r_l for r = 0.75, 0.5, 0, 0, 0
spec = "chunkkv:align=kvpress"
res2, exp2 = replay([spec, spec + ",layer_weights=" + rfile], "25%,50%,75%,100%", "frac",
                    export=True)
R2 = runs_of(res2)
share = {0: "25%", 1: "50%", 2: "100%", 3: "100%", 4: "100%"}
bad = 0
for layer in range(5):
    a = R2[(spec + ",layer_weights=" + rfile, "75%")]
    b = R2[(spec, share[layer])]
    for m, grid in a["metrics"].items():
        bad += sum(not same(x, y, m) for x, y in zip(grid[layer], b["metrics"][m][layer]))
print("chunkkv:align=kvpress at 75%% (the mean of 1 - r) with weights 1 - r: %d values differ"
      % bad)
check(bad == 0, "per-layer shares: %d values differ from the plain policy at each share" % bad)

# ---- 3. the closed form on awkward weights ----
WA = [1, 3, 0.5, 7, 0.0004]
afile = write("awk.txt", "[1, 3, 0.5, 7, 4e-4]\n")
res3, _ = replay(["streamingllm:layer_weights=" + afile], "10,50,150,400", "awk")
for r in res3["traces"][0]["runs"]:
    B = r["budget_tokens"]
    want = [min(448, layer_budget(B, WA, l)) for l in range(5)]
    check(r["per_layer"]["n_keep"] == [float(x) for x in want],
          "budget %d: n_keep %r, closed form %r" % (B, r["per_layer"]["n_keep"], want))
    check(r.get("layer_budget_min", B) == min(layer_budget(B, WA, l) for l in range(5)),
          "budget %d: layer_budget_min %r" % (B, r.get("layer_budget_min")))
print("awkward weights: n_keep per layer as the closed form at 4 budgets")
# every nominal budget above the prompt, yet the first layers compress: not a short prompt,
# and the window is needed
res4, _ = replay(["snapkv:layer_weights=" + wfile], "500", "short")
r4 = res4["traces"][0]["runs"][0]
check(r4["short_prompt"] is False and r4["per_layer"]["n_keep"][0] == 167.0,
      "budget 500 over T = 448: short_prompt %r, layer 0 n_keep %r" % (
          r4["short_prompt"], r4["per_layer"]["n_keep"][0]))

# ---- 4. .npy and equal weights ----
npy = os.path.join(work, "w.npy")
np.save(npy, np.array(W5, dtype=np.float32))
eq = write("eq.txt", "3 3 3 3 3\n")
res5, _ = replay(["adakv", "adakv:layer_weights=" + npy, "adakv:layer_weights=" + eq,
                  "adakv:layer_weights=" + wfile], "72,144", "npy")
R5 = runs_of(res5)
for B in ("72", "144"):
    check(R5[("adakv:layer_weights=" + npy, B)]["metrics"] ==
          R5[("adakv:layer_weights=" + wfile, B)]["metrics"], ".npy weights differ from text")
    check(R5[("adakv:layer_weights=" + eq, B)]["metrics"] == R5[("adakv", B)]["metrics"],
          "equal weights differ from the plain policy at %s" % B)

# ---- 5. recommend --write-allocation, replayed ----
alloc = os.path.join(work, "alloc.txt")
replay(["snapkv", "adakv"], "48,96,192", "rec")
r = run("recommend", os.path.join(work, "rec.json"), "--max-error", "0.5",
        "--write-allocation", alloc, "--json")
rec = json.loads(r.stdout)["recommendation"]
with open(alloc) as f:
    text = f.read()
weights = [int(x) for x in text.split("\n") if x and not x.startswith("#")]
check(weights == rec["layer_alloc_tokens"], "the file's weights %r, recommend's allocation %r" % (
    weights, rec["layer_alloc_tokens"]))
mean = sum(weights) / len(weights)
check(len(set(weights)) > 1, "the allocation is uniform on this trace: %r" % weights)
check(("at the budget %g\n" % mean) in text, "the file names its mean %g: %r" % (mean, text))
label = rec["label"]
lspec = "%s%slayer_weights=%s" % (label, "," if ":" in label else ":", alloc)
check(("a replay of %s" % lspec.replace(alloc, "FILE")) in text, "the file names the spec")
if mean == int(mean):
    res6, _ = replay([lspec], str(int(mean)), "alloc")
    r6 = res6["traces"][0]["runs"][0]
    Ru = runs_of(json.load(open(os.path.join(work, "rec.json"))))
    want = [Ru[(label, str(x))]["per_layer"]["n_keep"][l] for l, x in enumerate(weights)]
    check(r6["per_layer"]["n_keep"] == want,
          "the allocation replayed keeps %r per layer; the uniform runs at its budgets %r" % (
              r6["per_layer"]["n_keep"], want))
    kept = sum(r6["per_layer"]["kept_entries"])
    check(kept == rec["alloc_entries"], "replayed %r entries, recommend counted %r" % (
        kept, rec["alloc_entries"]))
    print("recommend's allocation %s (%s) replayed at %d: %g entries" % (
        weights, label, mean, kept))
else:
    check(False, "the allocation's mean %g is not whole on this trace" % mean)

# the text says when the uniform budget at the allocation's mean was not measured, and not when
# it was (the allocation changes with the budgets measured)
notes = []
for name, budgets in (("rec", "48,96,192"), ("rec2", "48,96,144,192"), ("rec3", "48,96,134,192")):
    if name != "rec":
        replay(["snapkv", "adakv"], budgets, name)
    t = run("recommend", os.path.join(work, name + ".json"), "--max-error", "0.5").stdout
    js = json.loads(run("recommend", os.path.join(work, name + ".json"), "--max-error", "0.5",
                        "--json").stdout)["recommendation"]
    al = js["layer_alloc_tokens"]
    mean = int(math.floor(sum(al) / len(al) + 0.5))
    want = len(set(al)) > 1 and str(mean) not in budgets.split(",")
    note = "(a uniform %d tokens, its mean, costs about the same and was not measured" % mean
    check((note in t) == want and (want or "was not measured" not in t),
          "budgets %s, allocation %r: note %r expected %s in %r" % (budgets, al, note, want, t))
    notes.append((budgets, al, want))
check(notes[0][2] and not all(x[2] for x in notes),
      "the note both ways: %r" % notes)
# a policy that shares its budget over the layers itself takes no layer_weights=: no note, and
# the file says to give it to another policy
replay(["pyramidkv"], "48,96,192", "recpy")
t = run("recommend", os.path.join(work, "recpy.json"), "--max-error", "0.5",
        "--write-allocation", os.path.join(work, "py.txt")).stdout
with open(os.path.join(work, "py.txt")) as f:
    py = f.read()
check("was not measured" not in t and "another policy with layer_weights=FILE (pyramidkv shares "
      "its budget over the layers itself)" in py, "pyramidkv's allocation: %r, %r" % (t, py))
print("recommend's note on the allocation's unmeasured mean: %r" % notes)

# ---- 6. e2e-llama2c ----
cap = os.path.join(work, "cap.kvt")
run("capture-llama2c", "--model", MODEL, "--tokens", "120", "--decode", "6", "--window", "8",
    "-o", cap)
eq4 = write("eq5.txt", "1 1 1 1 1\n")
e2e = os.path.join(work, "e2e.json")
run("e2e-llama2c", cap, "--model", MODEL, "--policies",
    "snapkv,snapkv:layer_weights=%s,snapkv:layer_weights=%s" % (eq4, wfile), "--budgets", "24,48",
    "--window", "8", "-o", e2e)
with open(e2e) as f:
    E = json.load(f)
st = {(x["policy"], x["budget"]): x for x in E["runs"]}
for B in ("24", "48"):
    a, b, c = (st[("snapkv", B)], st[("snapkv:layer_weights=" + eq4, B)],
               st[("snapkv:layer_weights=" + wfile, B)])
    check(a["kl_mean"] == b["kl_mean"] and a["kl_max"] == b["kl_max"],
          "e2e at %s: equal weights KL %r, plain %r" % (B, b["kl_mean"], a["kl_mean"]))
    check(c["kl_mean"] != a["kl_mean"], "e2e at %s: unequal weights give the plain KL" % B)
    print("e2e at %s: mean KL plain %.6g, equal weights %.6g, weights 1,2,4,4,4 %.6g" % (
        B, a["kl_mean"], b["kl_mean"], c["kl_mean"]))

# ---- 7. refusals ----
T = ["replay", TRACE, "--budgets", "64", "-o", os.path.join(work, "x.json"), "--force",
     "--policies"]
four = write("four.txt", "1 1 1 1\n")
refused(T + ["snapkv:layer_weights=" + four], "has 4 weights; the trace has 5 layers")
for bad_text, want in (("1 2 0 1 1", "weight 2 is 0"), ("1 -2 1 1 1", "weight 1 is -2"),
                       ("1 nan 1 1 1", "weight 1 is nan"), ("1 two 1 1 1", "'two' is not a number"),
                       ("# nothing\n", "no weights"), ("1 1e999 1 1 1", "'1e999' is not a number")):
    refused(T + ["snapkv:layer_weights=" + write("bad.txt", bad_text)], want)
refused(T + ["snapkv:layer_weights=" + os.path.join(work, "missing.txt")], "missing.txt")
np.save(os.path.join(work, "two.npy"), np.ones((5, 2)))
refused(T + ["snapkv:layer_weights=" + os.path.join(work, "two.npy")], "expected a 1-D array")
refused(T + ["pyramidkv:layer_weights=" + wfile], "shares the budget out over the layers itself")
refused(T + ["full:layer_weights=" + wfile], "keeps every token of every layer")
refused(["recommend", "--e2e", e2e, "--write-allocation", alloc], "--e2e has none", rc=2)
r = run("recommend", os.path.join(work, "rec.json"), "--max-error", "1e-9",
        "--write-allocation", os.path.join(work, "none.txt"), ok=False)
check(r.returncode == 3 and "none.txt not written" in r.stderr,
      "no allocation: exit %d, %r" % (r.returncode, r.stderr))
check(not os.path.exists(os.path.join(work, "none.txt")), "a file written with no allocation")

finish("test_layer_weights", work)
