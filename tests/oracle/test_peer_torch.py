#!/usr/bin/python3
"""test_peer_torch.py - bench/peer_torch.py (the PyTorch peer of issue #7) on the CPU agrees
with bench/peer_numpy.py (the NumPy peer of issue #8) and with `kvtrace replay`.

Traces, from `kvtrace synth` in a temporary folder:
  * tiny-bf16:  `--shape tiny --tokens 300` (L2, GQA 4/2, D16, W32, 16 decode steps with decode
                K/V, column sums, bf16): every policy runs;
  * tiny-f32:   `--shape tiny --tokens 120 --decode 0 --colsum off --dtype f32`: no decode
                queries and no column sums, so h2o and oracle are skipped by both peers;
  * llama3-8b:  the first 2 layers of `--shape llama3-8b --tokens 256` (GQA 32/8, D128, bf16,
                decode, column sums): 8 KV heads, enough for AdaKV's budget split to matter.
Budgets: below the window, the window, just above it, a fraction, T-10 and T+50 (more than
the prompt). For every policy but random (each peer has its own RNG) every metric of
peer_torch --device cpu equals peer_numpy's to 1e-4 (relative to max(1, |value|)); n_keep
exactly, random included. Then `peer_torch.py --compare` against a `kvtrace replay`
results.json of the same sweep must pass (exit 0) and the -o JSON must hold the time split.

Environment (set by ctest): KVT_BIN (the kvtrace CLI), KVT_LIB (libkvtrace.so),
KVT_SOURCE_ROOT (the repository). Exit 0 pass, 1 fail, 77 not run (no torch, no NumPy, no
CLI or library).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

try:
    import numpy
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)
try:
    import torch
except ImportError:
    print("SKIP: torch is not installed")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
BIN = os.environ.get("KVT_BIN")
LIB = os.environ.get("KVT_LIB")
if not BIN or not os.path.exists(BIN):
    print("SKIP: KVT_BIN is not set to the kvtrace CLI")
    sys.exit(77)
if not LIB or not os.path.exists(LIB):
    print("SKIP: KVT_LIB does not name libkvtrace.so")
    sys.exit(77)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import peer_numpy  # noqa: E402
import peer_torch  # noqa: E402

TOL = 1e-4
POLICIES = ["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "knorm", "random", "oracle"]
# (tag, T, synth options, layers kept: the llama3-8b synth has 32, the test uses 2 of them)
TRACES = [("tiny-bf16", 300, ["--shape", "tiny", "--tokens", "300", "--seed", "5"], None),
          ("tiny-f32", 120, ["--shape", "tiny", "--tokens", "120", "--decode", "0",
                             "--colsum", "off", "--dtype", "f32", "--seed", "6"], None),
          ("llama3-8b", 256, ["--shape", "llama3-8b", "--tokens", "256", "--seed", "3"], 2)]


def run(cmd, env=None):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, env=env)
    return p.returncode, p.stdout


def same(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= TOL * max(1.0, abs(a), abs(b))


def main():
    print("test_peer_torch: torch %s, numpy %s, %s" % (torch.__version__, numpy.__version__,
                                                      sys.executable))
    fails = []
    tmp = tempfile.mkdtemp(prefix="kvt_peer_torch_")
    env = dict(os.environ, KVT_LIB=LIB,
               PYTHONPATH=os.path.join(ROOT, "python") +
               (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    try:
        for tag, T, args, keep in TRACES:
            path = os.path.join(tmp, tag + ".kvt")
            full = path + ".full" if keep else path
            rc, out = run([BIN, "synth"] + args + ["--threads", "2", "--force", "-o", full])
            if rc != 0:
                print("FAIL %s: kvtrace synth exited %d:\n%s" % (tag, rc, out))
                return 1
            if keep:
                peer_numpy.cut(full, keep, path)
                os.remove(full)
            budgets = ["16", "32", "40", "30%", str(T - 10), str(T + 50)]
            with warnings.catch_warnings():        # nanmean of the absent decode metrics
                warnings.simplefilter("ignore", RuntimeWarning)
                ref = peer_numpy.replay(path, POLICIES, budgets, 64)
            got = peer_torch.replay(path, POLICIES, budgets, 64, device="cpu")
            if got["policies"] != ref["policies"] or got["skipped"] != ref["skipped"]:
                fails.append("%s: policies %s (skipped %s), peer_numpy %s (skipped %s)" % (
                    tag, got["policies"], got["skipped"], ref["policies"], ref["skipped"]))
                continue
            n, worst = 0, 0.0
            for p in ref["policies"]:
                for b in budgets:
                    r, g = ref["results"][p][b], got["results"][p][b]
                    for k, v in r.items():
                        if p == "random" and k != "n_keep":
                            continue
                        n += 1
                        if not same(g[k], v):
                            fails.append("%s %s budget %s %s: peer_torch %.8g, peer_numpy %.8g"
                                         % (tag, p, b, k, g[k], v))
                        elif not math.isnan(v):
                            worst = max(worst, abs(g[k] - v))
            print("%-10s %d policies (skipped: %s) x %d budgets: %d values compared, largest "
                  "gap %.1e" % (tag, len(ref["policies"]), ",".join(ref["skipped"]) or "none",
                                len(budgets), n, worst))
            # the CLI: --compare against kvtrace replay of the same sweep, -o with the times
            pols = ",".join(ref["policies"])
            res = os.path.join(tmp, tag + "_kvtrace.json")
            rc, out = run([BIN, "replay", path, "--policies", pols, "--budgets",
                           ",".join(budgets), "--threads", "1", "--coverage-probes", "64",
                           "--force", "-o", res])
            if rc != 0:
                fails.append("%s: kvtrace replay exited %d: %s" % (tag, rc, out[-2000:]))
                continue
            js = os.path.join(tmp, tag + "_peer_torch.json")
            rc, out = run([sys.executable, os.path.join(ROOT, "bench", "peer_torch.py"), path,
                           "--device", "cpu", "--policies", pols, "--budgets",
                           ",".join(budgets), "--probes", "64", "--compare", res, "-o", js],
                          env=env)
            if rc != 0:
                fails.append("%s: peer_torch.py --compare exited %d:\n%s" % (tag, rc, out))
                continue
            with open(js) as f:
                o = json.load(f)
            for k in ("read", "h2d", "attention", "policies", "compute"):
                if not isinstance(o.get("time", {}).get(k), float):
                    fails.append("%s: peer_torch JSON has no time.%s" % (tag, k))
            for p, ag in o.get("agreement", {}).items():
                if p != "random" and ag["recall_window"] > 1e-4:
                    fails.append("%s: %s recall differs from kvtrace by %.2e"
                                 % (tag, p, ag["recall_window"]))
            if set(o.get("agreement", {})) != set(ref["policies"]):
                fails.append("%s: agreement for %s, expected %s" % (
                    tag, sorted(o.get("agreement", {})), sorted(ref["policies"])))
            print("%-10s peer_torch.py --compare kvtrace: ok" % tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in fails[:40]:
        print("FAIL " + f)
    if len(fails) > 40:
        print("... %d more failures" % (len(fails) - 40))
    print("test_peer_torch: %s" % ("FAIL" if fails else "PASS"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
