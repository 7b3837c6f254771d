"""kvtrace - Python binding of libkvtrace.so (ctypes; no compiled extension).

    import kvtrace
    with kvtrace.open("run.kvt") as t:
        t.header["model"]["n_layers"]
        k = t.read("K", layer=0)                   # [Hkv, T, D], stored dtype
        q = t.read("Q_window", layer=0, dtype="float32")
        t.tokens["modality"]                       # [T] uint8 or None
        t.verify()["ok"]

    with kvtrace.capture(model, "out.kvt", window=32, decode=64):   # HF transformers
        model.generate(**inputs, max_new_tokens=65)   # 64 decode steps

    with kvtrace.read_selection("sel.bin") as sel:   # replay --export-selection
        idx = sel.kept("snapkv", "64", layer=0, head=1)    # kept token indices

    np.save("f.npy", kvtrace.qfilters(["a.kvt", "b.kvt"]))   # replay qfilter:filters=f.npy
    np.save("w.npy", kvtrace.critical_norms("a.kvt", o_proj))   # replay snapkv:critical=w.npy
    mu, cov = kvtrace.ea_stats(["a.kvt", "b.kvt"])                 # calibration traces' queries
    kvtrace.save_safetensors("s.safetensors", {"query_mean": mu, "query_cov": cov})
    #                                              replay expected-attention:stats=s.safetensors

    sets = kvtrace.replay_sets("a.kvt", "lookm", "64,10%")     # kept sets, merged K/V too

Errors from the C library raise kvtrace.TraceError with its message. The library is found
through $KVT_LIB first (see _lib.py for the full search order). Importing kvtrace imports
neither torch nor transformers (kvtrace.capture imports them when called).
"""
from ._errors import TraceError
from ._lib import KINDS, MODALITIES, lib_path, has_capture
from ._trace import Trace, TraceWriter, open, verify, bf16_to_f32, f32_to_bf16
from ._capture import CaptureSession, tensor_view
from ._selection import Selection, read_selection
from ._qfilter import qfilters
from ._critical import critical_norms
from ._ea_stats import ea_stats, save_safetensors
from ._replay_sets import KeptSet, replay_sets
from .hf import capture  # torch and transformers are imported when capture() is called

__version__ = "0.1.0"


def library_version():
    """Version string of the loaded libkvtrace.so."""
    from . import _lib
    return _lib.lib().kvt_version_string().decode()


__all__ = ["TraceError", "Trace", "TraceWriter", "CaptureSession", "capture", "open", "verify",
           "bf16_to_f32", "f32_to_bf16", "tensor_view", "KINDS", "MODALITIES", "lib_path",
           "has_capture", "library_version", "__version__", "Selection", "read_selection",
           "qfilters", "critical_norms", "ea_stats", "save_safetensors", "replay_sets",
           "KeptSet"]
