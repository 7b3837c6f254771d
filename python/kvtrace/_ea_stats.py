"""ea_stats(): the query statistics of kvpress's ExpectedAttentionStatsPress, calibrated on the
prompt queries of one or more traces, for `kvtrace replay --policy expected-attention:stats=PATH`.

kvpress's ExpectedAttentionStats (expected_attention_with_stats.py) runs the model over a
calibration set, takes every layer's queries before RoPE, drops each sample's first n_sink
tokens, and keeps, per layer and query head, their mean and covariance (over N - 1, N the
queries of all samples together); the press then uses those in place of the prompt's own. This
computes the same from traces captured with every prompt query (Q_all: --q-all,
with_q_all=True): each query's RoPE is undone as the trace's header records it (model.rope:
type, pairs, inv_freq or theta, attention_scaling, M-RoPE's mrope_section and position rows),
and the statistics are taken over the traces' tokens past `sinks`, in float64, in two passes.
`save_safetensors` writes them in the layout the hub checkpoints have (query_mean, query_cov).
"""
import json
import struct

import numpy as np

from ._trace import model_shape, open as _open


def _rope(t, path, D):
    """(lo, hi, angles [T, D/2], attention_scaling) of the trace's RoPE, or None for type none;
    ValueError when the header does not say enough to undo it."""
    h = t.header
    ro = (h.get("model") or {}).get("rope")
    if not isinstance(ro, dict) or not isinstance(ro.get("type"), str):
        raise ValueError("ea_stats: %s: the header does not say how RoPE was applied "
                         "(model.rope.type)" % path)
    if ro["type"] == "none":
        return None
    if ro["type"] not in ("default", "mrope"):
        raise ValueError("ea_stats: %s: model.rope.type %r is not one kvtrace knows"
                         % (path, ro["type"]))
    pairs = ro.get("pairs")
    if pairs is None and (h.get("engine") or {}).get("name") == "kvtrace-llama2c":
        pairs = "interleaved"  # kvtrace's llama2.c engine, before pairs was recorded
    if pairs not in ("half", "interleaved"):
        raise ValueError("ea_stats: %s: the header does not say which dimensions RoPE rotates "
                         "together (model.rope.pairs)" % path)
    if D % 2:
        raise ValueError("ea_stats: %s: RoPE with an odd head_dim %d" % (path, D))
    half = D // 2
    if "inv_freq" in ro:
        freq = np.asarray(ro["inv_freq"], dtype=np.float64)
        if freq.shape != (half,) or not np.all(np.isfinite(freq)) or np.any(freq < 0):
            raise ValueError("ea_stats: %s: model.rope.inv_freq is not %d finite numbers >= 0"
                             % (path, half))
    else:
        theta = ro.get("theta")
        if not isinstance(theta, (int, float)) or not theta > 0 or not np.isfinite(theta):
            raise ValueError("ea_stats: %s: model.rope has neither inv_freq nor a positive "
                             "theta" % path)
        freq = float(theta) ** (-2.0 * np.arange(half) / D)
    a = ro.get("attention_scaling", 1.0)
    if not isinstance(a, (int, float)) or not a > 0 or not np.isfinite(a):
        raise ValueError("ea_stats: %s: model.rope.attention_scaling is not a positive number"
                         % path)
    T = h["n_tokens"]
    pos = t.tokens["positions"]
    pos = np.arange(T)[None] if pos is None else np.asarray(pos, dtype=np.int64).reshape(-1, T)
    if ro["type"] == "mrope":
        sec = ro.get("mrope_section", (h.get("capture") or {}).get("mrope_section"))
        if (not isinstance(sec, list) or len(sec) != 3 or
                any(not isinstance(s, int) or s < 0 for s in sec) or sum(sec) != half or
                pos.shape[0] != 3):
            raise ValueError("ea_stats: %s: an M-RoPE trace needs model.rope.mrope_section (3 "
                             "integers >= 0 summing to head_dim/2 = %d) and 3 rows of "
                             "positions" % (path, half))
        row = np.repeat(np.arange(3), sec)
    else:
        row = np.zeros(half, dtype=np.int64)
    ang = pos[np.minimum(row, pos.shape[0] - 1)].T.astype(np.float64) * freq[None]  # [T, half]
    i = np.arange(half)
    lo, hi = (2 * i, 2 * i + 1) if pairs == "interleaved" else (i, i + half)
    return lo, hi, ang, float(a)


def _pre_rope(q, rope):
    """q [H, n, D] (post-RoPE, tokens of the angles' rows) back to pre-RoPE, float64."""
    if rope is None:
        return q
    lo, hi, ang, a = rope
    c, s = np.cos(ang)[None], np.sin(ang)[None]
    x, y = q[..., lo], q[..., hi]
    out = q.copy()
    out[..., lo] = (c * x + s * y) / a
    out[..., hi] = (c * y - s * x) / a
    return out


def ea_stats(paths, sinks=4):
    """(query_mean [layers, query heads, D], query_cov [layers, query heads, D, D]) as float64:
    the mean and covariance (over N - 1) of the pre-RoPE prompt queries of the traces at `paths`
    (one path or a list; the same model's shape; each with Q_all), each trace's first `sinks`
    tokens left out, as kvpress's ExpectedAttentionStats computes them over a calibration set.
    Write them with save_safetensors(path, ...) and replay expected-attention:stats=PATH."""
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError("ea_stats: sinks must be an integer >= 0, got %r" % (sinks,))
    if not paths:
        raise ValueError("ea_stats: no trace given")
    shape, ropes = None, []
    for p in paths:
        with _open(p) as t:
            s = model_shape(t.header, p, "ea_stats")[:4]
            if shape is not None and s != shape:
                raise ValueError("ea_stats: %s: layers, query heads, KV heads, head dim %s; the "
                                 "first trace has %s" % (p, s, shape))
            shape = s
            ropes.append(_rope(t, p, s[3]))
            for layer in range(s[0]):
                if not t.has("Q_all", layer):
                    raise ValueError("ea_stats: %s: no Q_all for layer %d (capture with --q-all "
                                     "or with_q_all=True)" % (p, layer))
    L, Hq, _, D = shape

    def queries(i, t, layer):
        q = t.read("Q_all", layer, dtype="float32").astype(np.float64)  # [Hq, T, D]
        rope = ropes[i]
        if rope is not None:
            lo, hi, ang, a = rope
            rope = (lo, hi, ang[sinks:], a)
        return _pre_rope(q[:, sinks:], rope)

    mean = np.zeros((L, Hq, D))
    cov = np.zeros((L, Hq, D, D))
    for layer in range(L):
        n, tot = 0, np.zeros((Hq, D))
        for i, p in enumerate(paths):
            with _open(p) as t:
                x = queries(i, t, layer)
                n += x.shape[1]
                tot += x.sum(axis=1)
        if n < 2:
            raise ValueError("ea_stats: %d queries past the sinks over every trace; the "
                             "covariance needs at least 2" % n)
        mean[layer] = tot / n
        for i, p in enumerate(paths):
            with _open(p) as t:
                x = queries(i, t, layer) - mean[layer][:, None]
                cov[layer] += np.einsum("hni,hnj->hij", x, x)
        cov[layer] /= n - 1
    return mean, cov


def save_safetensors(path, tensors, metadata=None):
    """Write tensors ({name: array}, each as float32) to `path` in the safetensors layout the HF
    hub's checkpoints use (an 8-byte little-endian header length, a JSON header, the data);
    metadata: a dict of strings for its "__metadata__"."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
