"""qfilters(): Q-filters calibrated on the queries of one or more traces, for
`kvtrace replay --policy qfilter:filters=FILE.npy`.

The Q-Filters paper (arXiv 2503.02812) calibrates one filter per head offline, on the queries
of a corpus; kvpress's QFilterPress loads such filters from the HF hub. This does the same on
the traces given: for every layer and KV head (or query head, heads="query"), the top right
singular vector of the stacked queries of the head's query heads over every trace (the unit
eigenvector of the largest eigenvalue of sum q q^T, in float64), oriented so that the queries'
projections on it sum to at most zero (an exact zero sum: the largest |f_e|, the lowest e among
equals, made negative), as `qfilter` orients the filter it calibrates on one trace's window
queries. With one trace and queries="window" the filters are that calibration's, to rounding.
"""
import numpy as np

from ._trace import model_shape, open as _open


def _orient(f, qsum):
    """f or -f: the queries' projections (their sum's, qsum) at most zero"""
    s = float(qsum @ f)
    big = int(np.argmax(np.abs(f)))
    return -f if s > 0 or (s == 0 and f[big] > 0) else f


def qfilters(paths, queries="window", heads="kv"):
    """Filters [layers, KV heads (or query heads), head dim] as float64, from the traces at
    `paths` (one path or a list; they must share the model's shape).

    queries: "window" (the stored window queries, in every trace) or "all" (Q_all: every
    prompt query, in traces captured with --q-all / with_q_all=True).
    heads: "kv" (one filter per KV head, from its query heads' queries: kvpress's layout) or
    "query" (one per query head, for qfilter:heads=query).
    Save the result with np.save and replay with `qfilter:filters=FILE.npy`."""
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    if queries not in ("window", "all"):
        raise ValueError("queries must be 'window' or 'all', got %r" % (queries,))
    if heads not in ("kv", "query"):
        raise ValueError("heads must be 'kv' or 'query', got %r" % (heads,))
    kind = "Q_window" if queries == "window" else "Q_all"
    shape = cov = None
    for p in paths:
        with _open(p) as t:
            s = model_shape(t.header, p, "qfilters")[:4]
            if shape is None:
                shape = s
                L, Hq, Hkv, D = s
                H = Hq if heads == "query" else Hkv
                G = Hq // Hkv
                cov = np.zeros((L, H, D, D))
                qsum = np.zeros((L, H, D))
            elif s != shape:
                raise ValueError("%s: layers, query heads, KV heads, head dim %s; the first "
                                 "trace has %s" % (p, s, shape))
            for layer in range(L):
                if not t.has(kind, layer):
                    raise ValueError("%s: no %s for layer %d%s" % (
                        p, kind, layer, " (capture with --q-all or with_q_all=True)"
                        if kind == "Q_all" else ""))
                q = t.read(kind, layer, dtype="float32").astype(np.float64)  # [Hq, n, D]
                for h in range(H):
                    rows = (q[h] if heads == "query" else q[h * G:(h + 1) * G]).reshape(-1, D)
                    cov[layer, h] += rows.T @ rows
                    qsum[layer, h] += rows.sum(axis=0)
    if shape is None:
        raise ValueError("no trace given")
    out = np.zeros(cov.shape[:3])
    for layer in range(cov.shape[0]):
        for h in range(cov.shape[1]):
            if not np.any(cov[layer, h]):
                continue  # queries all zero: f = 0, every score ties
            f = np.linalg.eigh(cov[layer, h])[1][:, -1]
            out[layer, h] = _orient(f, qsum[layer, h])
    return out
