#!/usr/bin/python3
"""test_python_hf_reserve.py - kvtrace.capture's device reservation (Capture._reserve_device /
_release_device) is let go of on every way out of the with-block, also when __enter__ itself
raises after reserving (then __exit__ never runs). No torch, GPU or library needed: the
library's reserve/release calls are stood in for."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "python"))
try:
    from kvtrace import hf, _lib
except Exception as e:  # pragma: no cover
    print("SKIP: cannot import kvtrace.hf: %s" % e)
    sys.exit(77)


class FakeLib(object):
    def __init__(self):
        self.reserved = 0

    def kvt_capture_reserve_device(self, dev, ring, rec):
        self.reserved += 1
        return 0

    def kvt_capture_release_device_reserve(self):
        self.reserved = 0

    def kvt_error_clear(self):
        pass


class Dev(object):
    type = "cuda"
    index = 0


class Param(object):
    device = Dev()


class Model(object):
    def parameters(self):
        return iter([Param()])


def make(tmp):
    c = object.__new__(hf.Capture)
    c._entered = False
    c.path = os.path.join(tmp, "none.kvt")
    c.force = False
    c._model = Model()
    return c


def main():
    import tempfile
    fake = FakeLib()
    _lib.lib = lambda: fake
    fails = 0
    tmp = tempfile.mkdtemp()

    # __enter__ raises after reserving (installing the hooks fails)
    c = make(tmp)

    def bad_install():
        raise RuntimeError("install failed")
    c._install = bad_install
    try:
        c.__enter__()
        print("FAIL: __enter__ did not raise")
        fails += 1
    except RuntimeError:
        pass
    if fake.reserved != 0:
        print("FAIL: the reservation is left held after __enter__ raised")
        fails += 1

    # a normal block that fails inside: released by __exit__
    fake.reserved = 0
    c = make(tmp)
    c._install = lambda: None
    c._uninstall = lambda: None
    c._end_session = lambda et: False
    c.__enter__()
    if fake.reserved != 1:
        print("FAIL: __enter__ did not reserve")
        fails += 1
    c.__exit__(RuntimeError, RuntimeError("x"), None)
    if fake.reserved != 0:
        print("FAIL: __exit__ left the reservation held")
        fails += 1
    os.rmdir(tmp)
    print("%s" % ("FAIL" if fails else "OK"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
