#!/usr/bin/python3
"""test_gpu_scripts_dry.py - the GPU session's Python scripts must not rot between the sessions
that have a GPU (device time is scarce: a script that fails at its first line wastes it).

On the CPU, with the transformers stand-in (tests/oracle/hf_standin) when transformers is not
installed:
  * bench/capture_overhead.py --dry-run: a tiny Llama through kvtrace.capture at two prompt
    lengths; exit 0, a JSON with one result per length and no recorded error (with the
    stand-in: once per style, transformers 5.x's and 4.x's config conventions);
  * scripts/gpu_hf_check.py --only selftest: its comparison and input-building helpers;
  * scripts/gpu_hf_check.py --only a --device cpu --dtypes float32: part (a), stories260K as an
    HF Llama captured in prefill and generate against the C engine's sample trace, every
    check passing (with the stand-in: once per style);
  * bench/run_gpu.sh at T=512 on 2 layers with DEVICE=cpu (needs KVT_BIN): synth, column sums,
    the kvtrace replays, the PyTorch peer and its agreement check, the summary;
  * scripts/gpu_session.sh (needs KVT_BIN) over a stand-in bundle of this build: its steps
    `tests replay`, a table with a row per step (the GPU tests NOT RUN here), the logs packed,
    and, with a budget too small for anything, every step SKIPPED, the table still written and
    a rerun: line naming them; single steps by name run alone; a bundle whose binaries do not
    run reported (bundle_check.log) and the steps needing it NOT RUN; a bundle whose source
    list shows a changed or an added file refused (exit 3).
Exit 77 (not run) without NumPy or torch. Run with /usr/bin/python3; KVT_LIB, KVT_SOURCE_ROOT.
"""
import gzip
import json
import os
import re
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


def uses_standin():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return True
    return False


def env():
    e = dict(os.environ)
    path = [os.path.join(ROOT, "python")]
    if uses_standin():
        path.append(os.path.join(ROOT, "tests", "oracle", "hf_standin"))
    e["PYTHONPATH"] = os.pathsep.join(path + [e.get("PYTHONPATH", "")])
    return e


def run(args, what, extra_env=None):
    p = subprocess.run([sys.executable] + args, env=dict(env(), **(extra_env or {})), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:])
        print("FAILED: %s exited %d" % (what, p.returncode))
        sys.exit(1)
    return p


def session(tmp, e):
    """scripts/gpu_session.sh over a stand-in for .devbundle made of this build's files."""
    kbin = os.path.abspath(os.environ["KVT_BIN"])
    build = os.path.dirname(os.path.dirname(kbin))
    fb = os.path.join(tmp, "bundle")
    os.makedirs(os.path.join(fb, "bin"))
    os.makedirs(os.path.join(fb, "lib"))
    os.symlink(kbin, os.path.join(fb, "bin", "kvtrace"))
    os.symlink(os.path.abspath(os.environ["KVT_LIB"]), os.path.join(fb, "lib", "libkvtrace.so"))
    gpu_tests = ["test_capture_device_gpu", "test_capture_colsum_gpu", "test_kernels_cuda",
                 "test_capture_timeline_gpu"]
    for t in gpu_tests:
        p = os.path.join(build, "tests", t)
        if os.path.exists(p):
            os.symlink(p, os.path.join(fb, "bin", t))
    with open(os.path.join(fb, "REVISION"), "w") as f:
        f.write("stand-in\n")
    # device_bundle.sh gzips the large libraries; the session unpacks them before anything runs
    packed = b"\x7fELF stand-in library " * 1000
    with gzip.open(os.path.join(fb, "lib", "libstandin.so.1.gz"), "wb") as f:
        f.write(packed)
    # (budget, what each row may say): the GPU tests cannot run here (77: NOT RUN)
    for budget, want in (("300", {"test_replay_device_gpu": ("NOT RUN", "PASS"),
                                  "replay_bench": ("PASS",)}),
                         ("15", {"test_replay_device_gpu": ("SKIPPED",),
                                 "replay_bench": ("SKIPPED",)})):
        out = os.path.join(tmp, "gs_" + budget)
        e2 = dict(e, BUNDLE=fb, BUDGET_S=budget, OUT=out, FORCE="0")
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_session.sh"), "tests",
                            "replay"], env=e2, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        summary = os.path.join(out, "summary.txt")
        rows = open(summary).read() if os.path.exists(summary) else ""
        bad = r.returncode != 0 or not os.path.exists(os.path.join(out, "gpu_session.tar.gz"))
        for name, ok in want.items():
            row = [l for l in rows.splitlines() if l.startswith(name + " ")]
            if not row or not any(w in row[0] for w in ok):
                bad = True
        if budget == "300":
            lib = os.path.join(fb, "lib", "libstandin.so.1")
            if not os.path.exists(lib) or open(lib, "rb").read() != packed or \
                    os.path.exists(lib + ".gz"):
                print("FAILED: scripts/gpu_session.sh did not unpack the bundle's gzipped library")
                sys.exit(1)
            logs = subprocess.run(["tar", "-tzf", os.path.join(out, "gpu_session.tar.gz")],
                                  capture_output=True, text=True).stdout
            bad = bad or "replay_bench.log" not in logs or "run_gpu.log" not in logs
        else:  # the second call's command names exactly the skipped steps, in order
            skipped = [l.split()[0] for l in rows.splitlines() if " SKIPPED " in l]
            bad = bad or ("rerun: BUDGET_S=<lease left - 40> bash scripts/gpu_session.sh %s"
                          % " ".join(skipped)) not in rows.splitlines()
        if bad:
            print(r.stdout[-3000:], r.stderr[-2000:], rows)
            print("FAILED: scripts/gpu_session.sh (budget %s s) did not leave the table and "
                  "logs expected" % budget)
            sys.exit(1)
        print("gpu_session.sh, budget %s s: %s" % (budget, " | ".join(
            " ".join(l.split()) for l in rows.splitlines()[1:])))
    single_steps(fb, e, tmp)
    stale_bundle(fb, e)


def table(out):
    path = os.path.join(out, "summary.txt")
    rows = open(path).read().splitlines()[1:] if os.path.exists(path) else []
    return {l.split()[0]: " ".join(l.split()[1:]) for l in rows if l.strip()}


def single_steps(fb, e, tmp):
    """Steps named alone run alone (the second call's rerun: list); a bundle whose kvtrace does
    not run is reported, with why, and the steps that need it are NOT RUN, not failed."""
    out = os.path.join(tmp, "gs_single")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_session.sh"),
                        "test_kernels_cuda", "hf_convert_test"],
                       env=dict(e, BUNDLE=fb, BUDGET_S="200", OUT=out), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    rows = table(out)
    if r.returncode != 0 or set(rows) - {"bundle"} != {"test_kernels_cuda", "hf_convert_test"}:
        print(r.stdout[-3000:], r.stderr[-2000:])
        print("FAILED: gpu_session.sh test_kernels_cuda hf_convert_test ran %s" % sorted(rows))
        sys.exit(1)
    broken = os.path.join(tmp, "broken_bundle")
    os.makedirs(os.path.join(broken, "bin"))
    os.makedirs(os.path.join(broken, "lib"))
    with open(os.path.join(broken, "bin", "kvtrace"), "w") as f:
        f.write("#!/bin/sh\necho 'kvtrace: /lib/x86_64-linux-gnu/libc.so.6: version "
                "GLIBC_2.99 not found' >&2\nexit 1\n")
    os.chmod(os.path.join(broken, "bin", "kvtrace"), 0o755)
    out = os.path.join(tmp, "gs_broken")
    # test_kernels_cuda named alone: its nvcc fallback runs instead (CC=false: it fails at once
    # here rather than build for a minute)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_session.sh"), "replay",
                        "hf_binding_test", "capture_overhead", "test_kernels_cuda"],
                       env=dict(e, BUNDLE=broken, BUDGET_S="200", OUT=out, CC="false"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    rows = table(out)
    logs = subprocess.run(["tar", "-tzf", os.path.join(out, "gpu_session.tar.gz")],
                          capture_output=True, text=True).stdout
    want = {"replay_bench", "hf_binding_test", "capture_overhead"}
    if (r.returncode != 0 or "GLIBC_2.99" not in r.stdout or "bundle_check.log" not in logs or
            "DOES NOT RUN" not in rows.get("bundle", "") or
            set(rows) - {"bundle"} != want | {"gpu_check_nvcc"} or
            not rows["gpu_check_nvcc"].startswith("FAIL") or
            any(not rows[k].startswith("NOT RUN (the bundle does not run here)") for k in want)):
        print(r.stdout[-3000:], r.stderr[-2000:], rows)
        print("FAILED: gpu_session.sh with a bundle that does not run")
        sys.exit(1)
    print("gpu_session.sh: single steps run alone; a bundle that does not run is named, with why")


def stale_bundle(fb, e):
    """gpu_session.sh refuses a bundle built from other sources (exit 3): a changed file, and a
    source file the bundle's list lacks (added since); the list of these very sources passes."""
    ls = subprocess.run(["git", "ls-files", "*.c", "*.h", "*.cu", "*.cuh", "*.cpp",
                         "*CMakeLists.txt", "*.cmake"], cwd=ROOT, capture_output=True, text=True)
    files = ls.stdout.split()
    if ls.returncode != 0 or "bench/gpu_peak.cu" not in files:
        print("stale-bundle check: not run (no git checkout here)")
        return
    sums = subprocess.run(["sha1sum"] + files, cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    changed = [l if not l.endswith(" cli/main.c") else "0" * 40 + "  cli/main.c" for l in sums]
    added = [l for l in sums if not l.endswith(" bench/gpu_peak.cu")]
    for what, lines, rc, said in (("current", sums, 0, None),
                                  ("changed", changed, 3, "cli/main.c: FAILED"),
                                  ("added", added, 3, "bench/gpu_peak.cu: ADDED since")):
        with open(os.path.join(fb, "SOURCES.sha1"), "w") as f:
            f.write("\n".join(lines) + "\n")
        out = os.path.join(os.path.dirname(fb), "gs_stale_" + what)
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_session.sh"), "tests"],
                           env=dict(e, BUNDLE=fb, BUDGET_S="15", OUT=out), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != rc or (said and said not in r.stdout):
            print(r.stdout[-3000:], r.stderr[-2000:])
            print("FAILED: gpu_session.sh with a bundle of %s sources: exit %d, want %d%s" % (
                what, r.returncode, rc, " and '%s'" % said if said else ""))
            sys.exit(1)
    os.remove(os.path.join(fb, "SOURCES.sha1"))
    print("gpu_session.sh: a bundle of changed or added sources is refused, current ones run")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for style in (("5", "4") if uses_standin() else (None,)):
            extra = {"KVT_HF_STANDIN_STYLE": style} if style else None
            what = "capture_overhead.py --dry-run%s" % (
                " (stand-in style %s.x)" % style if style else "")
            run([os.path.join(ROOT, "bench", "capture_overhead.py"), "--dry-run", "--device",
                 "cpu", "--layers", "2", "--tokens", "64,128", "--out", tmp,
                 "--trace-dir", os.path.join(tmp, "traces")], what, extra)
            res = json.load(open(os.path.join(tmp, "capture_overhead.json")))
            errs = res.get("errors") or []
            runs = res.get("sizes") or []
            if errs:
                print("FAILED: %s recorded errors: %s" % (what, json.dumps(errs)[:2000]))
                sys.exit(1)
            if len(runs) != 2:
                print("FAILED: %s: want 2 results, got keys %s" % (what, list(res)))
                sys.exit(1)
            print("%s: ok (transformers %s)" % (what, res.get("env", {}).get("transformers")))
        p = run([os.path.join(ROOT, "scripts", "gpu_hf_check.py"), "--only", "selftest",
                 "--out", tmp], "gpu_hf_check.py --only selftest")
        print(p.stdout.strip().splitlines()[-2:])
        for style in (("5", "4") if uses_standin() else (None,)):
            extra = {"KVT_HF_STANDIN_STYLE": style} if style else None
            what = "gpu_hf_check.py --only a (CPU, float32%s)" % (
                ", stand-in style %s.x" % style if style else "")
            p = run([os.path.join(ROOT, "scripts", "gpu_hf_check.py"), "--only", "a", "--device",
                     "cpu", "--dtypes", "float32", "--out", tmp,
                     "--trace-dir", os.path.join(tmp, "hf_traces")], what, extra)
            print("%s: %s" % (what, p.stdout.strip().splitlines()[-2]))
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
            # the ratio is timed on runs without --profile, the profiled one listed apart
            md = open(summary).read()
            if not re.search(r"median of 3 runs without --profile: [0-9.]+, [0-9.]+, [0-9.]+ s; "
                             r"the run with --profile: [0-9.]+ s", md):
                print(md)
                print("FAILED: run_gpu.sh's summary does not time runs without --profile")
                sys.exit(1)
            print("run_gpu.sh: %s" % r.stdout.strip().splitlines()[-1])
            session(tmp, e)
    print("test_gpu_scripts_dry: ok")


if __name__ == "__main__":
    main()
