#!/usr/bin/python3
"""test_chunkkv_reuse.py - chunkkv:reuse=N, ChunkKV's layer-wise index reuse: the layers form
groups of N from layer 0 and every layer of a group keeps the chunks the group's first layer
selects.

On the bundled stories260K trace (5 layers) and a 2-layer llama3-8b-shaped synthetic one, for
reuse 2, 3 and 5 (and with heads=query, align=kvpress):
  * every (layer, head, budget)'s exported kept set equals plain chunkkv's set of the group's
    first layer (same options, reuse=1) at that budget;
  * a group's first layer's metrics equal plain chunkkv's bit for bit (the policy computes its
    window scores from the trace with the kernels the layer's own replay uses);
  * the other layers' metrics differ somewhere (their own queries judge another layer's set);
  * reuse=1 is plain chunkkv, bit for bit; reuse=0 and a one-layer replay are refused
    (test_replay_policies).
Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the CLI or the library.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import ROOT, check, finish, need_library, run  # noqa: E402

need_library()

SAMPLE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")


def kept_sets(path):
    exp = json.load(open(path))
    out = {}
    for r in exp["records"]:
        out[(exp["policies"][r["policy"]]["label"], r["budget_tokens"], r["layer"],
             r["head"])] = r["kept"]
    return out


def check_trace(name, trace, base, budgets, work):
    specs = [base + ",label=plain"] + ["%s,reuse=%d,label=r%d" % (base, n, n) for n in (1, 2, 3, 5)]
    sel, res = os.path.join(work, "sel.json"), os.path.join(work, "r.json")
    run("replay", trace, "--policies", ",".join(specs), "--budgets", budgets,
        "--export-selection", sel, "-o", res, "--force")
    kept = kept_sets(sel)
    r = json.load(open(res))
    runs = {(x["label"], x["budget_tokens"]): x["metrics"] for x in r["traces"][0]["runs"]}
    L = r["traces"][0]["n_layers"]
    bts = sorted({b for (_, b) in runs})
    n_sets = bad_sets = 0
    for n in (1, 2, 3, 5):
        lab = "r%d" % n
        same_leader, differs = True, False
        for b in bts:
            for (lb, bb, layer, head), ks in kept.items():
                if lb != lab or bb != b:
                    continue
                n_sets += 1
                want = kept[("plain", b, layer - layer % n, head)]
                if ks != want:
                    bad_sets += 1
                    if bad_sets <= 3:
                        print("  %s %s B %d layer %d head %d: %s, want %s" % (
                            name, lab, b, layer, head, ks[:10], want[:10]))
            for metric, grid in runs[(lab, b)].items():
                ref = runs[("plain", b)][metric]
                for layer in range(L):
                    if layer % n == 0:
                        same_leader &= grid[layer] == ref[layer]
                    elif grid[layer] != ref[layer]:
                        differs = True
        check(same_leader, "%s %s: the groups' first layers' metrics equal plain chunkkv's" % (
            name, lab))
        check(n == 1 or L <= 1 or differs, "%s %s: the other layers' metrics differ" % (name, lab))
    print("%s %s: %d kept sets, %d not the group's first layer's" % (name, base, n_sets,
                                                                    bad_sets))
    check(n_sets > 0 and bad_sets == 0, "%s %s: kept sets" % (name, base))


def main():
    with tempfile.TemporaryDirectory() as work:
        check_trace("stories260K", SAMPLE, "chunkkv", "48,96,200,50%", work)
        check_trace("stories260K", SAMPLE, "chunkkv:heads=query,chunk=4", "40,64", work)
        check_trace("stories260K", SAMPLE, "chunkkv:align=kvpress", "48,20%", work)
        syn = os.path.join(work, "syn.kvt")
        run("synth", "--shape", "llama3-8b", "--layers", "4", "--tokens", "600", "--window",
            "32", "--decode", "4", "--seed", "4", "-o", syn)
        check_trace("llama3-8b", syn, "chunkkv", "64,256,25%", work)
    finish("test_chunkkv_reuse")


if __name__ == "__main__":
    main()
