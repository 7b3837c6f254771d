"""cli_test.py - what the Python tests of the kvtrace command share: the environment (KVT_BIN,
KVT_SOURCE_ROOT; the python/kvtrace package put on sys.path; exit 77, "not run", without NumPy
or the CLI), check() that records a failure and goes on, run() of the CLI, raises() and the
final exit. Import it first:

    from cli_test import BIN, ROOT, check, run, raises, finish
"""
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("numpy") is None:  # every user of this module needs it
    print("SKIP: no NumPy")
    sys.exit(77)

BIN = os.environ.get("KVT_BIN")
ROOT = os.environ.get("KVT_SOURCE_ROOT",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
if not BIN or not os.access(BIN, os.X_OK):
    print("SKIP: KVT_BIN does not name the kvtrace CLI")
    sys.exit(77)
sys.path.insert(0, os.path.join(ROOT, "python"))

failures = []


def check(ok, what):
    """Record a failure (and print it) unless ok; returns ok."""
    if not ok:
        failures.append(what)
        print("FAILED: " + what)
    return ok


def run(*args, ok=True):
    """kvtrace ARGS..., output captured; with ok, a non-zero exit ends the test."""
    r = subprocess.run([BIN] + [str(a) for a in args], capture_output=True, text=True)
    if ok and r.returncode != 0:
        raise SystemExit("FAILED: kvtrace %s: %s" % (" ".join(map(str, args)), r.stderr))
    return r


def raises(exc, fn, want, what):
    """fn() must raise exc with `want` in its message; returns the exception."""
    try:
        fn()
    except exc as e:
        good = want in str(e)
        check(good, "%s: %s %r lacks %r" % (what, type(e).__name__, str(e), want))
        if good:
            print("ok: %s: %s" % (what, e))
        return e
    check(False, "%s: no %s" % (what, exc.__name__))


def finish(name):
    """Exit 1 with the count of failures, else print NAME: ok."""
    if failures:
        print("%d failure(s)" % len(failures))
        sys.exit(1)
    print("%s: ok" % name)
