"""_errors.py - TraceError and the status check shared by every wrapper."""
from . import _lib


class TraceError(Exception):
    """A kvtrace C call failed. str(e) is the library's message (kvt_error_msg), `status` the
    kvt_status number (negative) and `status_name` its name, e.g. "KVT_ERR_CHECKSUM"."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = int(status)
        self.status_name = _lib.STATUS_NAMES.get(self.status, "KVT_ERR_%d" % self.status)


def error_message(status):
    L = _lib.lib()
    msg = L.kvt_error_msg()
    msg = msg.decode("utf-8", "replace") if msg else ""
    if not msg:
        s = L.kvt_status_str(status)
        msg = s.decode("utf-8", "replace") if s else "error %d" % status
    return msg


def call(fn, *args):
    """Call a kvt_status-returning C function; raise TraceError on failure."""
    L = _lib.lib()
    L.kvt_error_clear()
    st = fn(*args)
    if st != _lib.KVT_OK:
        raise TraceError(st, error_message(st))
    return st
