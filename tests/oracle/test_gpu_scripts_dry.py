#!/usr/bin/python3
"""test_gpu_scripts_dry.py - the GPU session's Python scripts must not rot between the sessions
that have a GPU (device time is scarce: a script that fails at its first line wastes it).

On the CPU, with the transformers stand-in (tests/oracle/hf_standin) when transformers is not
installed:
  * bench/capture_overhead.py --dry-run: a tiny Llama through kvtrace.capture at two prompt
    lengths; exit 0, a JSON with one result per length and no recorded error;
  * scripts/gpu_hf_check.py --only selftest: its comparison and input-building helpers;
  * bench/run_gpu.sh at T=512 on 2 layers with DEVICE=cpu (needs KVT_BIN): synth, column sums,
    the kvtrace replays, the PyTorch peer and its agreement check, the summary.
Exit 77 (not run) without NumPy or torch. Run with /usr/bin/python3; KVT_LIB, KVT_SOURCE_ROOT.
"""
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:
    print("SKIP: %s" % e)
    sys.exit(77)

ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env():
    e = dict(os.environ)
    path = [os.path.join(ROOT, "python")]
    try:
        import transformers  # noqa: F401
    except ImportError:
        path.append(os.path.join(ROOT, "tests", "oracle", "hf_standin"))
    e["PYTHONPATH"] = os.pathsep.join(path + [e.get("PYTHONPATH", "")])
    return e


def run(args, what):
    p = subprocess.run([sys.executable] + args, env=env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:])
        print("FAILED: %s exited %d" % (what, p.returncode))
        sys.exit(1)
    return p


def main():
    with tempfile.TemporaryDirectory() as tmp:
        run([os.path.join(ROOT, "bench", "capture_overhead.py"), "--dry-run", "--device", "cpu",
             "--layers", "2", "--tokens", "64,128", "--out", tmp,
             "--trace-dir", os.path.join(tmp, "traces")], "capture_overhead.py --dry-run")
        res = json.load(open(os.path.join(tmp, "capture_overhead.json")))
        errs = res.get("errors") or []
        runs = res.get("sizes") or []
        if errs:
            print("FAILED: capture_overhead.py recorded errors: %s" % json.dumps(errs)[:2000])
            sys.exit(1)
        if len(runs) != 2:
            print("FAILED: capture_overhead.py: want 2 results, got keys %s" % list(res))
            sys.exit(1)
        p = run([os.path.join(ROOT, "scripts", "gpu_hf_check.py"), "--only", "selftest",
                 "--out", tmp], "gpu_hf_check.py --only selftest")
        print(p.stdout.strip().splitlines()[-2:])
        if os.environ.get("KVT_BIN"):
            e = env()
            e.update(OUT=os.path.join(tmp, "rg"), WORK=os.path.join(tmp, "rgw"), T="512",
                     LAYERS="2", DEVICE="cpu", PYTHON=sys.executable)
            r = subprocess.run(["bash", os.path.join(ROOT, "bench", "run_gpu.sh")], env=e,
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
            summary = os.path.join(tmp, "rg", "summary.md")
            if r.returncode != 0 or not os.path.exists(summary):
                print(r.stdout[-3000:], r.stderr[-3000:])
                print("FAILED: bench/run_gpu.sh (dry, on the CPU) exited %d" % r.returncode)
                sys.exit(1)
            print("run_gpu.sh: %s" % r.stdout.strip().splitlines()[-1])
    print("test_gpu_scripts_dry: ok")


if __name__ == "__main__":
    main()
