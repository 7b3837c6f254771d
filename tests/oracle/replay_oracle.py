#!/usr/bin/python3
"""replay_oracle.py - an independent NumPy oracle of kvtrace's policy replay.

Written from /work/shared/POLICIES.md (the policy and metric definitions) and DESIGN.md §4
only, without reading the C replay code, so that the two implementations check each other.
Everything is computed in float64 from the trace tensors converted to float32.

What it implements (POLICIES.md section in brackets):
  * window attention scores [§0.1]: softmax over all N keys with the causal mask inside the
    window only, mean over the last W window queries, no renormalisation, GQA reduction
    (mean, or max) BEFORE pooling, 1-D pooling stride 1 padding k//2 (avg: zero padding,
    divisor always k = count_include_pad; max: padding ignored);
  * snapkv [§1], pyramidkv [§2] (MixKV/AdaKV variant, or the KVCache-Factory N < 2·base
    fallback with fallback=1), adakv allocation 3a [§3] (normalize, alpha, floor, round half
    to even = torch.round), mixkv-snapkv / mixkv-pyramidkv / mixkv-adakv [§4.1, §4.3] with
    online r, streamingllm [§7] (sinks + recent), h2o [§6] one shot from column sums;
    sparsemm [§5] and headkv [§11] static head budgets from a head-score table (scores=),
    mixkv-sparsemm [§4.3] (sparsemm's caps, each head's top-cap by the MixKV composite);
    extras: full, knorm, vnorm, keydiff [§8], tova [§8], oracle (decode-attention ranking);
    chunkkv [§11, kvpress ChunkKVPress]: the prefix in chunks of C from token 0, a chunk's
    score the mean over its tokens of the snapkv scores summed over the heads, the window
    plus the floor((B−W)/C) best whole chunks, one set for the layer; with align=kvpress,
    kvpress's own rule (SnapKVPress pads the window with the largest score of any head, then
    ChunkKVPress cuts all N tokens into chunks and keeps max(1, int(n_chunks·(1−ratio)))
    of them, ratio = 1 − B/N);
  * fastv [§11]: layers below dense_layers=K whole, later ones the first B of one ranking
    made from layer K−1 (fastv_order): non-visual tokens most recent first, then image/video
    tokens by the attention they receive (column sums averaged over the query heads, or with
    last=N the mean window probabilities of the last N queries). Written in the same session
    as the C policy, from the same reading of §11 and FastV's code: it checks the arithmetic
    and the layer bookkeeping, not the reading;
  * lookm [§11, LOOK-M's text prior; merge=none only: test_merge.py checks the merges]: at
    budget B the R = floor(recent_share·min(B, N)) most recent tokens, then, of the tokens
    before them, the text (non-visual) ones by their column sums (GQA-reduced), then the
    image/video ones by theirs. Also written in the same session as the C policy, from the
    same reading of LOOK-M's code;
  * cake [§11, CAKE's released code]: layer preferences H^(1/tau1)·V^(1/tau2) from every
    layer's last W window probabilities over the prefix (cake_pref: entropy with +1e-10 in the
    log; the unbiased variance over the window queries, summed), the layers' prefix budgets
    (B−W)·L split by them and passed through CAKE's adjust_budgets (cake_counts, then clamped
    to [0, N−W]); tokens by the average-pooled (k = 5) mean + gamma·variance of the window
    probabilities, group mean; N <= B + W keeps all, B <= W the last B. Written in the same
    session as the C policy from the same reading of the code;
  * vl-cache [§11, VL-Cache]: the post-vision queries (every prompt token after the last
    image/video token, or the last N of them with last=N; the window queries when they hold
    them, else Q_all) attend causally over the keys; a layer's density is the share of those
    attention entries at or above threshold·(the row's largest), and the layers keep
    clip(λ·density, 1, N) tokens summing to L·B (λ by bisection), rounded down with the rest
    to the largest remainders (within 1e-9: the lower layer); a token's score is the attention
    the post-vision queries give it (summed; group-reduced by reduce=), the last `window`
    tokens first. Written in the same session as the C policy from the same reading of §11;
  * metrics [§12, DESIGN §4]: attention recall and relative output error ‖o_S−o‖/‖o‖ (o_S
    renormalised over the kept set) on all stored window queries and on decode queries (which
    also see the decode keys 0..s when the trace has K_decode/V_decode; those are never
    evicted), key-space coverage (mean over probe keys of the best cosine to a kept key) and
    its k-center radius, coverage_dropped (the same mean over the probe keys that are NOT
    kept; null when no probe is dropped or nothing is kept), head redundancy r on all keys and
    on the kept set, head_overlap (mean Jaccard index of the head's kept set with each other
    head's set of the same layer, policy and budget, at the policy's granularity; null with a
    single head); with a modality table, per modality: kept count, window recall, coverage and
    head redundancy of the kept keys and of all keys.

Conventions (where the spec leaves room; the same as analysis/RESULTS.md documents):
  * Budget B = entries kept per head, window included: b = B − W prefix tokens are selected.
    If N <= B every policy keeps all N. If B < W, a window policy keeps the last B tokens.
  * Ranking: window first (most recent first), then the prefix by score descending, ties to
    the LOWER token index (np.argsort(-s, kind="stable")); NaN last.
  * AdaKV's global top-k breaks ties by the lower flattened index g·|P| + rank.
  * Selection per KV head (heads=kv, mean GQA reduction) or per query head (heads=query).
  * Per-KV-head recall/err = mean over the group's query heads and their queries.

Python API:  replay_layer(...)  one layer (numpy arrays in), replay_trace(...)  a .kvt file.
CLI:  replay_oracle.py TRACE -o out.json [--policies LIST] [--budgets 64,128,10%] ...
Output JSON: {"settings": {...}, "trace": {...}, "policies": {label: {"budgets": {str(B):
  {"budget_tokens": B, "layers": [{"heads": [{"kept": [...], "n_keep", "recall",
  "recall_decode", "err_window", "err_decode", "coverage", "coverage_radius",
  "coverage_dropped", "r_all", "r_kept", "head_overlap", "by_modality" (with a modality
  table: {"n_keep"|"recall"|"coverage"|"r_kept"|"r_all": {"text", "image", "video",
  "other"}})}, ...]}, ...]}}}}}
  (null where not applicable).
"""
import argparse
import functools
import fractions
import json
import math
import os
import sys

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("SKIP: numpy is not installed for " + sys.executable)
    sys.exit(77)

# --------------------------------------------------------------------------------------------
# Policy registry: name -> default options. Option names follow `kvtrace replay
# --list-policies` so that specs read the same on both sides; clamp_r is oracle-only.
# --------------------------------------------------------------------------------------------
_SNAP = {"window": 32, "kernel": 5, "pool": "avg", "reduce": "mean", "heads": "kv"}
POLICIES = {
    "full": {"heads": "kv"},
    "streamingllm": {"heads": "kv", "sinks": 4},
    "h2o": {"window": 32, "reduce": "mean", "heads": "kv"},
    "tova": {"heads": "kv"},
    "snapkv": dict(_SNAP),
    "chunkkv": dict(_SNAP, chunk=10, align="prefix"),
    "pyramidkv": dict(_SNAP, beta=20, fallback=0),
    "adakv": dict(_SNAP, alpha=0.2, normalize=1, skip=0),
    "knorm": {"window": 0, "heads": "kv"},
    "vnorm": {"window": 0, "heads": "kv"},
    "keydiff": {"window": 0, "heads": "kv"},
    "mixkv-snapkv": dict(_SNAP, clamp_r=1, method="headwise"),
    "mixkv-pyramidkv": dict(_SNAP, beta=20, fallback=0, clamp_r=1, method="headwise"),
    "mixkv-adakv": dict(_SNAP, alpha=0.2, normalize=1, skip=0, clamp_r=1, method="headwise"),
    "mixkv-sparsemm": dict(_SNAP, ratio=0.1, scores="", clamp_r=1, method="headwise"),
    "oracle": {"window": 0, "heads": "kv"},
    "sparsemm": dict(_SNAP, ratio=0.1, scores=""),
    "headkv": {"window": 32, "kernel": 7, "pool": "max", "reduce": "mean", "heads": "query",
               "beta": 1.01, "scores": ""},
    "fastv": {"heads": "kv", "dense_layers": 2, "last": 0},
    "lookm": {"reduce": "mean", "heads": "kv", "recent_share": 0.5, "merge": "pivot"},
    "cake": {"window": 32, "heads": "kv", "tau1": 1.0, "tau2": 1.0, "gamma": 200.0},
    "vl-cache": {"window": 0, "heads": "kv", "reduce": "mean", "threshold": 0.01, "last": 0},
}
NEEDS = {"h2o": "colsum", "lookm": "colsum", "oracle": "decode"}
MODALITY_NAMES = ("text", "image", "video", "other")
DEFAULT_POLICIES = ["full", "streamingllm", "snapkv", "pyramidkv", "adakv", "mixkv-snapkv",
                    "mixkv-pyramidkv", "mixkv-adakv"]


def _parse_value(s):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    low = s.lower()
    if low in ("true", "yes", "on"):
        return 1
    if low in ("false", "no", "off"):
        return 0
    return s


def parse_policy(spec):
    """"name:key=value,key=value" -> (label, name, options with defaults filled in)."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in POLICIES:
        raise ValueError("unknown policy %r (known: %s)" % (name, ", ".join(POLICIES)))
    opts = dict(POLICIES[name])
    if rest:
        for item in rest.split(","):
            if not item.strip():
                continue
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or k not in opts:
                raise ValueError("policy %s: unknown option %r (options: %s)"
                                 % (name, item, ", ".join(opts)))
            opts[k] = _parse_value(v.strip())
    if opts.get("pool", "avg") not in ("avg", "max"):
        raise ValueError("pool must be avg or max")
    if opts.get("reduce", "mean") not in ("mean", "max"):
        raise ValueError("reduce must be mean or max")
    if opts.get("heads", "kv") not in ("kv", "query"):
        raise ValueError("heads must be kv or query")
    return spec, name, opts


def split_policy_list(text):
    """The CLI convention: comma-separated specs; an item with '=' and no ':' continues the
    previous spec ("snapkv:kernel=7,pool=max,adakv" -> two specs)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def budget_fraction(b, n_tokens):
    """The fraction of the prompt a budget was written as: "10%" -> 0.1, 64 -> 64/T (of the
    tokens it resolves to). kvpress-aligned policies take their compression ratio from it."""
    if isinstance(b, str) and b.strip().endswith("%"):
        return float(b.strip()[:-1]) / 100.0
    return resolve_budget(b, n_tokens) / float(n_tokens)


def resolve_budget(b, n_tokens):
    """64 -> 64; "64" -> 64; "10%" -> max(1, floor(0.1*T + 0.5)), in exact decimal arithmetic
    ("20.5%" of 300 is 61.5 -> 62)."""
    if isinstance(b, str) and b.strip().endswith("%"):
        f = fractions.Fraction(b.strip()[:-1]) / 100
        return max(1, int(math.floor(f * n_tokens + fractions.Fraction(1, 2))))
    return int(b)


# --------------------------------------------------------------------------------------------
# §0.1 primitives
# --------------------------------------------------------------------------------------------
def softmax_masked(z):
    """Row softmax in float64 of logits where -inf marks masked entries."""
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def group_of(n_q_heads, n_kv_heads):
    """g(h) = floor(h / G): the repeat_kv layout."""
    G = n_q_heads // n_kv_heads
    return np.arange(n_q_heads) // G


def window_probs(K, Qw, scale=None):
    """Pr[h, i, j] for every stored window query i (position N−Wt+i) over all N keys: causal
    mask inside the window only. K [Hkv,N,D], Qw [Hq,Wt,D] -> [Hq,Wt,N] float64."""
    K = np.asarray(K, dtype=np.float64)
    Qw = np.asarray(Qw, dtype=np.float64)
    Hkv, N, D = K.shape
    Hq, Wt, _ = Qw.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    gi = group_of(Hq, Hkv)
    z = np.einsum("hwd,hnd->hwn", Qw, K[gi]) * scale
    pos = N - Wt + np.arange(Wt)
    mask = np.arange(N)[None, :] > pos[:, None]
    z[:, mask] = -np.inf
    return softmax_masked(z)


def window_scores(Pw, W):
    """a_h[j] = (1/W) Σ_{last W window queries} Pr[i, j] for j in P = [0, N−W): [Hq, N−W]."""
    Hq, Wt, N = Pw.shape
    if W > Wt:
        raise ValueError("window W=%d exceeds the stored window Wt=%d" % (W, Wt))
    return Pw[:, Wt - W:, :N - W].mean(axis=1)


def reduce_heads(a, n_kv_heads, how="mean"):
    """GQA reduction of per-query-head rows a [Hq, n] to [Hkv, n] (mean or max)."""
    Hq = a.shape[0]
    G = Hq // n_kv_heads
    r = a.reshape(n_kv_heads, G, -1)
    return r.mean(axis=1) if how == "mean" else r.max(axis=1)


def pool1d(s, k, how="avg"):
    """Stride 1, padding k//2, output length len(s). avg: zeros outside, divisor always k.
    max: max over in-range entries only."""
    s = np.asarray(s, dtype=np.float64)
    n = s.shape[-1]
    if k <= 1 or n == 0:
        return s.copy()
    if k % 2 == 0:
        raise ValueError("kernel must be odd")
    h = k // 2
    if how == "avg":
        pad = np.zeros(s.shape[:-1] + (n + 2 * h,))
        pad[..., h:h + n] = s
        out = np.zeros_like(s)
        for t in range(k):
            out += pad[..., t:t + n]
        return out / k
    pad = np.full(s.shape[:-1] + (n + 2 * h,), -np.inf)
    pad[..., h:h + n] = s
    out = np.full_like(s, -np.inf)
    for t in range(k):
        out = np.maximum(out, pad[..., t:t + n])
    return out


def unit_rows(X):
    X = np.asarray(X, dtype=np.float64)
    n = np.linalg.norm(X, axis=-1, keepdims=True)
    return X / np.maximum(n, 1e-12)


def head_redundancy(K):
    """MixKV r = (n·||m||² − 1)/(n − 1), m the mean of the n unit keys; None for n < 2."""
    n = K.shape[0]
    if n < 2:
        return None
    m = unit_rows(K).mean(axis=0)
    return float((n * np.dot(m, m) - 1.0) / (n - 1.0))


def stable_desc_order(score):
    """Indices by score descending, ties by lower index, NaN last."""
    s = np.asarray(score, dtype=np.float64)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, kind="stable")


def chunk_mean(x):
    """A chunk's mean score, x[0] + mean(x − x[0]): exact when every token scores the same
    (the window's tokens under align=kvpress), so such chunks tie whatever their size."""
    return x[0] + (x - x[0]).mean()


def window_first_order(prefix_score, N, W):
    """Window first (N−1, N−2, ..., N−W), then the prefix [0, N−W) by score."""
    win = np.arange(N - 1, N - W - 1, -1, dtype=np.int64)
    return np.concatenate([win, stable_desc_order(prefix_score).astype(np.int64)])


# --------------------------------------------------------------------------------------------
# Budget allocations
# --------------------------------------------------------------------------------------------
def pyramid_budgets(B, W, N, L, beta=20, fallback=False):
    """Selected prefix tokens b_l per layer (window W extra), POLICIES §2. fallback=True adds
    the KVCache-Factory rule (N < 2·base -> uniform base). The short-prompt rule (N < B) is
    the caller's. L = 1 gives b = B − W."""
    base = B - W
    if fallback and N < 2 * base:
        return [base] * L
    if L <= 1:
        return [base] * L
    min_num = base // beta
    max_num = 2 * base - min_num
    if max_num >= N - W:
        max_num = N - W
        min_num = 2 * base - max_num
    steps = (max_num - min_num) // (L - 1)
    return [max_num - l * steps for l in range(L)]


def adakv_caps(pooled, b, alpha=0.2, normalize=True, layer=0, skip=0, margin=None):
    """AdaKV 3a allocation (POLICIES §3) from per-head pooled scores pooled [H', |P|].
    Returns the per-head selected counts cap_g (window extra), or None for "no compression"
    (b > |P|). margin: optional list that receives the relative score gap at the global
    top-H'·b boundary (small = a near-tie that may decide the allocation)."""
    pooled = np.asarray(pooled, dtype=np.float64)
    H, nP = pooled.shape
    if b > nP:
        return None
    if b <= 0:
        return np.zeros(H, dtype=np.int64)
    if layer < skip:
        return np.full(H, b, dtype=np.int64)
    s = -np.sort(-pooled, axis=1)  # each head descending
    if normalize:
        tot = s.sum(axis=1, keepdims=True)
        top = s[:, :b].sum(axis=1, keepdims=True)
        w = np.where(tot != 0, top / np.where(tot != 0, tot, 1.0), 0.0)
        s = s * w
    flat = s.reshape(-1)
    gorder = stable_desc_order(flat)
    picks = gorder[:H * b]
    if margin is not None and H * b < flat.size:
        # the allocation only depends on which HEAD the boundary values come from: the gap
        # between the lowest pick of one head and the highest non-pick of another head
        picked = np.zeros(flat.size, bool)
        picked[picks] = True
        fs, ps = flat.reshape(H, nP), picked.reshape(H, nP)
        lo_pick = np.where(ps, fs, np.inf).min(axis=1)
        hi_rest = np.where(~ps, fs, -np.inf).max(axis=1)
        gaps = [(lo_pick[g] - hi_rest[g2]) / max(abs(lo_pick[g]), 1e-300)
                for g in range(H) for g2 in range(H)
                if g != g2 and np.isfinite(lo_pick[g]) and np.isfinite(hi_rest[g2])]
        margin.append(float(min(gaps)) if gaps else None)
    n = np.bincount(picks // nP, minlength=H)
    cap = np.rint(n * (1.0 - alpha) + math.floor(alpha * b)).astype(np.int64)
    return np.clip(cap, 0, nP)


# --------------------------------------------------------------------------------------------
# MixKV §4.1
# --------------------------------------------------------------------------------------------
def mean_key(kh):
    """The mean unit key the diversity scores use: zero when its norm is at most 1e-9 (keys
    that cancel out: its direction is rounding, analysis/RESULTS.md), so every score ties."""
    m = kh.mean(axis=0)
    return m if np.linalg.norm(m) > 1e-9 else np.zeros_like(m)


def mixkv_composite(p, Kg, Vg, W, clamp_r=True, method="headwise"):
    """c[j] over the prefix for one head: p pooled attention [|P|], Kg/Vg the KV head's keys and
    values [N, D]; method: MixKV's SELECT_METHOD (§4.4). Returns (c, r)."""
    p = np.asarray(p, dtype=np.float64)
    Kg = np.asarray(Kg, dtype=np.float64)
    Vg = np.asarray(Vg, dtype=np.float64)
    N = Kg.shape[0]
    nP = N - W
    mp = p.mean() if nP > 0 else 0.0
    # intrinsic importance: VNorm, min-max over P (flat -> 0), mean-matched to mean(p)
    # (method knorm: the same of the negative key norms, k' of §4.4)
    u = -np.linalg.norm(Kg[:nP], axis=1) if method == "knorm" else np.linalg.norm(Vg[:nP], axis=1)
    if nP > 0 and u.max() > u.min():
        uh = (u - u.min()) / (u.max() - u.min())
    else:
        uh = np.zeros(nP)
    vprime = uh * mp / ((uh.mean() if nP else 0.0) + 1e-8)
    # diversity: KeyDiff, unit-key mean over ALL N keys
    kh = unit_rows(Kg)
    m = mean_key(kh)
    delta = -(kh[:nP] @ m)
    if nP > 0:
        dh = (delta - delta.min()) / (delta.max() - delta.min() + 1e-8)
    else:
        dh = delta
    dprime = dh * mp / ((dh.mean() if nP else 0.0) + 1e-8)
    r = (N * float(m @ m) - 1.0) / (N - 1.0) if N > 1 else 0.0
    if clamp_r:
        r = min(1.0, max(0.0, r))
    c = {"attn": p, "keydiff": dprime, "vnorm": p + vprime, "knorm": p + vprime,
         "mixkv": 0.33 * (dprime + p + vprime)}.get(method, r * dprime + (1.0 - r) * (p + vprime))
    return c, r


# --------------------------------------------------------------------------------------------
# Layer context and metrics
# --------------------------------------------------------------------------------------------
class LayerInputs:
    """One layer's tensors (float64 copies). K, V [Hkv,N,D]; Qw [Hq,Wt,D]; optional Qd
    [Hq,Gd,D], Kd/Vd [Hkv,Gd,D] (decode keys/values), colsum [Hq,N]."""

    def __init__(self, K, V, Qw, Qd=None, Kd=None, Vd=None, colsum=None, scale=None,
                 modality=None, Qall=None):
        f = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
        self.K, self.V, self.Qw, self.Qall = f(K), f(V), f(Qw), f(Qall)
        self.Qd, self.Kd, self.Vd, self.colsum = f(Qd), f(Kd), f(Vd), f(colsum)
        self.Hkv, self.N, self.D = self.K.shape
        self.Hq, self.Wt = self.Qw.shape[:2]
        if self.Hq % self.Hkv:
            raise ValueError("Hq=%d is not a multiple of Hkv=%d" % (self.Hq, self.Hkv))
        self.G = self.Hq // self.Hkv
        self.gi = group_of(self.Hq, self.Hkv)
        self.scale = 1.0 / math.sqrt(self.D) if scale is None else float(scale)
        self.Pw = window_probs(self.K, self.Qw, self.scale)
        self._decode()
        self.r_all = [head_redundancy(self.K[g]) for g in range(self.Hkv)]
        self.modality = None if modality is None else np.asarray(modality).astype(np.int64)

    def _decode(self):
        self.Pd = None
        if self.Qd is None or self.Qd.shape[1] == 0:
            return
        Q, gi = self.Qd, self.gi
        Gd = Q.shape[1]
        z = np.einsum("hsd,hnd->hsn", Q, self.K[gi]) * self.scale  # [Hq, Gd, N]
        if self.Kd is not None and self.Vd is not None:
            zx = np.einsum("hsd,htd->hst", Q, self.Kd[gi]) * self.scale  # [Hq, Gd, Gd]
            zx[:, np.arange(Gd)[None, :] > np.arange(Gd)[:, None]] = -np.inf
        else:
            zx = np.full((self.Hq, Gd, 0), -np.inf)
        m = np.maximum(z.max(axis=2), zx.max(axis=2, initial=-np.inf))[..., None]
        e, ex = np.exp(z - m), np.exp(zx - m)
        Z = e.sum(axis=2) + ex.sum(axis=2)
        self.Pd = e / Z[..., None]                                  # [Hq, Gd, N]
        self.px = ex.sum(axis=2) / Z                                # [Hq, Gd]
        if ex.shape[2]:
            self.ox = np.einsum("hst,htd->hsd", ex, self.Vd[gi]) / Z[..., None]
        else:
            self.ox = np.zeros((self.Hq, Gd, self.V.shape[2]))

    # -- metric helpers for one query head h and kept index set S --
    @staticmethod
    def _recall_err(P, V, S, px=None, ox=None):
        """P [nq, N] probabilities, V [N, Dv]. Returns (recall mean, err mean) over queries."""
        nq = P.shape[0]
        if px is None:
            px = np.zeros(nq)
            ox = np.zeros((nq, V.shape[1]))
        Z = P.sum(axis=1) + px
        num = P @ V + ox
        o = num / Z[:, None]
        PS = P[:, S]
        mass = PS.sum(axis=1) + px
        rec = mass / Z
        numS = PS @ V[S] + ox
        err = np.ones(nq)
        ok = mass > 0
        oS = numS[ok] / mass[ok][:, None]
        no = np.linalg.norm(o[ok], axis=1)
        err[ok] = np.linalg.norm(oS - o[ok], axis=1) / no
        return float(rec.mean()), float(err.mean())

    def metrics(self, qheads, g, S, probes, W=0):
        """Metrics of kept set S (sorted index array) of KV head g, judged on query heads
        `qheads` (the group for kv granularity, one head for query granularity). Coverage is
        over the probe keys of the policy's prefix [0, N-W) (POLICIES §12: j in P); the probe
        grid is floor(i*N/n) over all N tokens, n = min(probes, N).
        coverage_dropped: the mean of max_{s in S} cos(k_j, k_s) over the probe keys j that
        are not in S (the same probes and cosines as coverage); None when every probe is kept
        or S is empty. head_overlap needs the other heads: replay_layer adds it."""
        rw, ew, rd, ed = [], [], [], []
        for h in qheads:
            r, e = self._recall_err(self.Pw[h], self.V[g], S)
            rw.append(r)
            ew.append(e)
            if self.Pd is not None:
                r, e = self._recall_err(self.Pd[h], self.V[g], S, self.px[h], self.ox[h])
                rd.append(r)
                ed.append(e)
        kh = unit_rows(self.K[g])
        n = min(probes, self.N)
        pidx = (np.arange(n) * self.N) // n if n > 0 else None
        if pidx is not None:
            pidx = pidx[pidx < self.N - W]
            n = len(pidx)
        best = None
        cov = rad = cov_drop = None
        if n > 0 and len(S):
            cos = kh[pidx] @ kh[S].T
            best = cos.max(axis=1)
            cov, rad = float(best.mean()), float((1.0 - best).max())
            inS = np.zeros(self.N, bool)
            inS[S] = True
            dropped = ~inS[pidx]
            if dropped.any():
                cov_drop = float(best[dropped].mean())
        out = {
            "recall": float(np.mean(rw)),
            "err_window": float(np.mean(ew)),
            "recall_decode": float(np.mean(rd)) if rd else None,
            "err_decode": float(np.mean(ed)) if ed else None,
            "coverage": cov,
            "coverage_radius": rad,
            "coverage_dropped": cov_drop,
            "r_all": self.r_all[g],
            "r_kept": head_redundancy(self.K[g][S]),
        }
        if self.modality is not None:
            out["by_modality"] = self._by_modality(qheads, g, S, best, pidx)
        return out

    def _by_modality(self, qheads, g, S, best, pidx):
        """Per modality m: kept count; window recall = kept mass on m / full mass on m,
        averaged over the (query head, window query) pairs that put mass on m; coverage =
        mean best cosine over the probe keys of m; head redundancy of the kept keys of m
        (r_kept) and of all keys of m (r_all), None under two keys."""
        mod = self.modality
        inS = np.zeros(self.N, bool)
        inS[S] = True
        res = {"n_keep": {}, "recall": {}, "coverage": {}, "r_kept": {}, "r_all": {}}
        for code, name in enumerate(MODALITY_NAMES):
            on = mod == code
            res["n_keep"][name] = int((inS & on).sum())
            res["r_kept"][name] = head_redundancy(self.K[g][inS & on])
            res["r_all"][name] = head_redundancy(self.K[g][on])
            ratios = []
            for h in qheads:
                full = self.Pw[h][:, on].sum(axis=1)
                kept = self.Pw[h][:, inS & on].sum(axis=1)
                ratios += list(kept[full > 0] / full[full > 0])
            res["recall"][name] = float(np.mean(ratios)) if ratios else None
            if best is not None and on[pidx].any():
                res["coverage"][name] = float(best[on[pidx]].mean())
            else:
                res["coverage"][name] = None
        return res


def _orders_and_counts(name, o, ctx, B, layer, n_layers, frac=None):
    """For one policy and budget: the per-head ranking (all N tokens) and kept counts.
    Returns (orders [H'][N], counts [H'], info) where info holds "scores" (per head, the
    ranking score of every token, +inf for protected ones, or None) and "alloc_margin"."""
    info = {"scores": None, "alloc_margin": None}
    o_, c_ = _orders_and_counts_impl(name, o, ctx, B, layer, n_layers, info,
                                     B / float(ctx.N) if frac is None else frac)
    return o_, c_, info


def _win_scores(prefix_score, N, W):
    return np.concatenate([np.asarray(prefix_score, dtype=np.float64), np.full(W, np.inf)])


def _orders_and_counts_impl(name, o, ctx, B, layer, n_layers, info, frac):
    N, W = ctx.N, int(o.get("window", 0))
    query = o.get("heads", "kv") == "query"
    H = ctx.Hq if query else ctx.Hkv
    heads_kv = [ctx.gi[h] for h in range(H)] if query else list(range(H))
    short = N <= B  # B = T keeps everything too, for every policy (RESULTS.md)

    def uniform(n):
        return [min(n, N)] * H

    if name == "full":
        return [np.arange(N)] * H, [N] * H
    if name == "fastv":
        # layers below K whole; later ones the trace-wide ranking (fastv_order)
        if layer < int(o["dense_layers"]):
            return [np.arange(N)] * H, [N] * H
        order = ctx.fastv_orders[(int(o["dense_layers"]), int(o["last"]))]
        return [order] * H, uniform(N if short else B)
    if name == "cake":
        W = min(W, N)
        if W > ctx.Wt:
            raise ValueError("cake: window %d > stored window %d" % (W, ctx.Wt))
        pw = ctx.Pw[:, ctx.Wt - W:, :N - W]
        a = pw.mean(axis=1) + float(o["gamma"]) * (pw.var(axis=1, ddof=1) if W > 1 else 0)
        red = a if query else reduce_heads(a, ctx.Hkv, "mean")
        sc = pool1d(red, 5, "avg")
        orders = [window_first_order(sc[hh], N, W) for hh in range(H)]
        info["scores"] = [_win_scores(sc[hh], N, W) for hh in range(H)]
        if B <= W:
            return orders, uniform(B)
        if N <= B + W:
            return orders, [N] * H
        prefs = ctx.cake_prefs[(W, float(o["tau1"]), float(o["tau2"]))]
        return orders, [W + cake_counts(prefs, B - W, N - W)[layer]] * H
    if name == "vl-cache":
        dens, scores = ctx.vlcache[_vlcache_key(o)]
        sc = scores[layer]
        W = min(W, N)
        orders = [window_first_order(sc[hh][:N - W], N, W) for hh in range(H)]
        info["scores"] = [_win_scores(sc[hh][:N - W], N, W) for hh in range(H)]
        return orders, [vlcache_counts(dens, N, B)[layer]] * H
    if name == "lookm":
        if str(o.get("merge", "pivot")) != "none":
            raise ValueError("lookm: the oracle does not merge (give merge=none)")
        if ctx.colsum is None:
            raise ValueError("lookm needs attn_colsum")
        sc = ctx.colsum if query else reduce_heads(ctx.colsum, ctx.Hkv, o["reduce"])
        Bc = min(B, N)
        R = int(math.floor(float(o["recent_share"]) * Bc))
        vis = (np.isin(ctx.modality[:N - R], (1, 2)) if ctx.modality is not None
               else np.zeros(N - R, dtype=bool))
        before = np.arange(N - R)
        orders, scores = [], []
        for hh in range(H):
            sp = sc[hh][:N - R]
            orders.append(np.concatenate([
                np.arange(N - 1, N - R - 1, -1), before[~vis][stable_desc_order(sp[~vis])],
                before[vis][stable_desc_order(sp[vis])]]).astype(np.int64))
            scores.append(np.concatenate([sp, np.full(R, np.inf)]))
        info["scores"] = scores
        return orders, uniform(Bc)
    if name == "streamingllm":
        s = min(int(o["sinks"]), N)
        order = np.concatenate([np.arange(s), np.arange(N - 1, s - 1, -1)])
        return [order] * H, uniform(N if short else B)
    if name == "tova":
        # last window query's attention averaged over all Hq heads; one set for the layer;
        # the last token always kept.
        sc = ctx.Pw[:, -1, :N - 1].mean(axis=0)
        order = window_first_order(sc, N, 1)
        info["scores"] = [_win_scores(sc, N, 1)] * H
        return [order] * H, uniform(N if short else B)
    if name in ("knorm", "vnorm", "keydiff", "oracle"):
        orders = []
        for hh in range(H):
            g = heads_kv[hh]
            if name == "knorm":
                full = -np.linalg.norm(ctx.K[g], axis=1)
            elif name == "vnorm":
                full = np.linalg.norm(ctx.V[g], axis=1)
            elif name == "keydiff":
                kh = unit_rows(ctx.K[g])
                full = -(kh @ mean_key(kh))
            else:
                if ctx.Pd is None:
                    raise ValueError("oracle needs decode queries")
                qh = [hh] if query else list(np.where(ctx.gi == g)[0])
                full = ctx.Pd[qh].mean(axis=(0, 1))
            orders.append(window_first_order(full[:N - W], N, W))
            info.setdefault("_s", []).append(_win_scores(full[:N - W], N, W))
        info["scores"] = info.pop("_s")
        return orders, uniform(N if short else B)

    # window policies from here on
    if name == "h2o":
        W = min(W, N)
        if ctx.colsum is None:
            raise ValueError("h2o needs attn_colsum")
        a = ctx.colsum[:, :N - W]
        sc = a if query else reduce_heads(a, ctx.Hkv, o["reduce"])
    else:
        if W > ctx.Wt:
            raise ValueError("%s: window %d > stored window %d" % (name, W, ctx.Wt))
        a = window_scores(ctx.Pw, W)
        red = a if query else reduce_heads(a, ctx.Hkv, o["reduce"])
        sc = pool1d(red, int(o["kernel"]), o["pool"])
    pooled = sc
    chunk_take = None
    if name == "chunkkv" and o["align"] == "kvpress":
        # kvpress: SnapKVPress.score pads the window with scores.max() (over every head and
        # prefix token), ChunkKVPress sums the heads and averages each chunk of the sequence
        C, nP = int(o["chunk"]), N - W
        padded = np.concatenate([sc, np.full((H, W), sc.max() if sc.size else 0.0)], axis=1)
        tok = padded.sum(axis=0)
        starts = list(range(0, N, C))
        sizes = [min(C, N - a) for a in starts]
        cscore = np.array([chunk_mean(tok[a:a + C]) for a in starts])
        ranked = sorted(range(len(starts)), key=lambda i: (-cscore[i], i))
        order = np.concatenate([np.arange(starts[i], starts[i] + sizes[i]) for i in ranked])
        info["scores"] = [np.repeat(cscore, sizes)] * H
        if B >= N:
            return [order] * H, [N] * H
        ratio = 1.0 - frac  # kvpress's compression_ratio for this budget
        take = max(1, int(len(starts) * (1 - ratio)))
        return [order] * H, [sum(sizes[i] for i in ranked[:take])] * H
    if name == "chunkkv":
        # every token carries its chunk's score: a stable sort then orders whole chunks,
        # best first (ties: lower chunk), ascending inside a chunk
        C, nP = int(o["chunk"]), N - W
        tok = sc.sum(axis=0)
        starts = list(range(0, nP, C))
        cscore = np.array([chunk_mean(tok[a:a + C]) for a in starts])
        per_tok = np.repeat(cscore, [min(C, nP - a) for a in starts]) if starts else tok
        sc = np.tile(per_tok, (H, 1))
        ranked = sorted(range(len(starts)), key=lambda i: (-cscore[i], i))
        chunk_take = [min(C, nP - starts[i]) for i in ranked]
    if name.startswith("mixkv-"):
        sc = np.stack([mixkv_composite(pooled[hh], ctx.K[heads_kv[hh]], ctx.V[heads_kv[hh]], W,
                                       bool(o["clamp_r"]), o["method"])[0] for hh in range(H)]) \
            if N - W > 0 else pooled
    orders = [window_first_order(sc[hh], N, W) for hh in range(H)]
    info["scores"] = [_win_scores(sc[hh], N, W) for hh in range(H)]
    if short:
        return orders, [N] * H
    if B < W:
        return orders, [B] * H
    nP = N - W
    base = B - W
    if name in ("snapkv", "h2o", "mixkv-snapkv"):
        return orders, [W + min(base, nP)] * H
    if name == "chunkkv":
        return orders, [W + sum(chunk_take[:base // int(o["chunk"])])] * H
    if name in ("pyramidkv", "mixkv-pyramidkv"):
        bl = pyramid_budgets(B, W, N, n_layers, int(o["beta"]), bool(o["fallback"]))[layer]
        return orders, [W + max(0, min(bl, nP))] * H
    if name in ("adakv", "mixkv-adakv"):
        margin = []
        caps = adakv_caps(pooled, base, float(o["alpha"]), bool(o["normalize"]), layer,
                          int(o["skip"]), margin)
        info["alloc_margin"] = margin[0] if margin else None
        if caps is None:
            return orders, [N] * H
        return orders, [W + int(c) for c in caps]
    if name in ("sparsemm", "headkv", "mixkv-sparsemm"):
        return orders, [W + c for c in head_score_caps(name, o, base, nP, layer, n_layers, H)]
    raise ValueError("unknown policy %s" % name)


def head_score_caps(name, o, b, nP, layer, n_layers, H):
    """SparseMM (POLICIES §5; also mixkv-sparsemm's, §4.3) and HeadKV (§11) caps of the H
    selection heads of `layer`:
    sigma = score / (sum of the first n_layers rows of the table), summed over a head's
    columns (a GQA group, when the table has a column per query head and H is per KV head);
    min = floor(ratio*b) (sparsemm) or b - floor(b/beta) (headkv);
    cap = round_half_even(sigma*(b - min)*n_layers*H + min), clamped to [0, nP].
    The table: [[...]] rows by layer, or {"layer-head": number or [numbers] (mean)}."""
    tab, total = _head_table(o["scores"], n_layers)
    C = len(tab[0])
    if C % H:
        raise ValueError("%s: table of %d columns for %d heads" % (name, C, H))
    per = C // H
    mn = (b - math.floor(b / float(o["beta"]))) if name == "headkv" else \
        math.floor(float(o["ratio"]) * b)
    caps = []
    for h in range(H):
        sig = 0.0
        for u in range(per):
            sig += tab[layer][h * per + u] / total
        cap = round(sig * (b - mn) * n_layers * H + mn)  # Python rounds half to even
        caps.append(int(min(max(cap, 0), nP)))
    return caps


@functools.lru_cache(maxsize=None)
def _head_table(path, n_layers):
    """A head-score table file as rows of floats, and the sum of its first n_layers rows in
    the order of the C sum (read once per file)."""
    with open(path) as f:
        js = json.load(f)
    if isinstance(js, dict):
        cells = {}
        for k, v in js.items():
            l, h = (int(x) for x in k.split("-")[:2])
            cells[(l, h)] = float(np.mean(v)) if isinstance(v, list) else float(v)
        L = 1 + max(l for l, _ in cells)
        C = 1 + max(h for _, h in cells)
        tab = [[cells.get((l, h), float("nan")) for h in range(C)] for l in range(L)]
    else:
        tab = [[float(x) for x in row] for row in js]
    if len(tab) < n_layers:
        raise ValueError("%s: %d layers in the table, the model has %d" % (path, len(tab),
                                                                          n_layers))
    total = 0.0
    for l in range(n_layers):  # the order of the C sum
        for x in tab[l]:
            total += x
    return tab, total


def _tie_margin(order, n, scores, hh):
    if scores is None or n <= 0 or n >= len(order):
        return None
    sc = scores[hh]
    hi, lo = sc[order[n - 1]], sc[order[n]]
    if not (np.isfinite(hi) and np.isfinite(lo)):
        return None
    return float(abs(hi - lo) / max(abs(hi), abs(lo), 1e-300))


def head_overlaps(sets):
    """head_overlap of every head: for head h, the mean over the other heads h' of the
    Jaccard index |S_h ∩ S_h'| / |S_h ∪ S_h'| (two empty sets count as identical: 1).
    None for every head when there is a single head."""
    sets = [set(int(x) for x in s) for s in sets]
    H = len(sets)
    if H < 2:
        return [None] * H
    out = []
    for h in range(H):
        js = []
        for h2 in range(H):
            if h2 == h:
                continue
            u = len(sets[h] | sets[h2])
            js.append(len(sets[h] & sets[h2]) / u if u else 1.0)
        out.append(float(sum(js) / len(js)))
    return out


def cov_window(name, o):
    """The window W whose prefix [0, N-W) coverage is measured over: the policy's own window
    (tova's is its last token; streamingllm, full and quest have none)."""
    if name == "tova":
        return 1
    if name in ("streamingllm", "full", "quest", "lagkv", "fastv", "lookm"):
        return 0
    return int(o.get("window", 0))


def replay_layer(K, V, Qw, Qd=None, Kd=None, Vd=None, colsum=None, *, policies=None,
                 budgets=(64, 128), layer=0, n_layers=1, scale=None, coverage_probes=256,
                 ctx=None, debug=False):
    """Replay policies on one layer.

    K, V [Hkv,N,D]; Qw [Hq,Wt,D]; Qd [Hq,Gd,D] or None; Kd, Vd [Hkv,Gd,D] or None;
    colsum [Hq,N] or None (h2o). policies: specs ("snapkv:kernel=7,pool=max") or
    (label, name, options) tuples; budgets: tokens or "10%" strings.
    Returns {label: {B: [head dict, ...]}} where each head dict has "kept" (sorted list),
    "n_keep" and the metrics, including "head_overlap" (head_overlaps() over the heads of
    this policy and budget, at the policy's granularity). Policies whose input is missing
    are skipped. debug=True adds "tie_margin" (relative score gap between the last kept and
    the first dropped token: a tiny value marks a near-tie that another implementation may
    break differently) and "alloc_margin" (the same at AdaKV's global top-k boundary)."""
    if ctx is None:
        ctx = LayerInputs(K, V, Qw, Qd, Kd, Vd, colsum, scale)
    pols = [p if isinstance(p, tuple) else parse_policy(p)
            for p in (policies or DEFAULT_POLICIES)]
    out = {}
    for label, name, o in pols:
        if NEEDS.get(name) == "colsum" and ctx.colsum is None:
            continue
        if NEEDS.get(name) == "decode" and ctx.Pd is None:
            continue
        query = o.get("heads", "kv") == "query"
        res = {}
        for b in budgets:
            B = resolve_budget(b, ctx.N)
            orders, counts, info = _orders_and_counts(name, o, ctx, B, layer, n_layers,
                                                      budget_fraction(b, ctx.N))
            heads = []
            for hh, (order, n) in enumerate(zip(orders, counts)):
                S = np.sort(order[:n])
                g = int(ctx.gi[hh]) if query else hh
                qheads = [hh] if query else list(range(g * ctx.G, (g + 1) * ctx.G))
                d = {"kept": [int(x) for x in S], "n_keep": int(len(S))}
                d.update(ctx.metrics(qheads, g, S, coverage_probes, cov_window(name, o)))
                if debug:
                    d["tie_margin"] = _tie_margin(order, n, info["scores"], hh)
                    d["alloc_margin"] = info["alloc_margin"]
                heads.append(d)
            for d, ov in zip(heads, head_overlaps([d["kept"] for d in heads])):
                d["head_overlap"] = ov
            res[B] = heads
        out[label] = res
    return out


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------
def _import_kvtrace():
    try:
        import kvtrace
        return kvtrace
    except ImportError:
        root = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__))))
        sys.path.insert(0, os.path.join(root, "python"))
    import kvtrace
    return kvtrace


def fastv_order(ctx, n_last):
    """FastV's ranking from layer K-1's inputs ctx: the non-visual tokens (text, other) most
    recent first, then the image and video tokens by the attention they receive, averaged over
    the query heads: summed over every prompt query (the column sums; n_last = 0) or over the
    last n_last prompt (window) queries; ties to the lower index."""
    if n_last == 0:
        if ctx.colsum is None:
            raise ValueError("fastv needs attn_colsum (or last=N)")
        score = ctx.colsum.mean(axis=0)
    else:
        score = ctx.Pw[:, -n_last:, :].mean(axis=(0, 1))
    vis = np.isin(ctx.modality, (1, 2))
    text = np.where(~vis)[0][::-1]
    vidx = np.where(vis)[0]
    return np.concatenate([text, vidx[stable_desc_order(score[vidx])]]).astype(np.int64)


def cake_pref(ctx, W, tau1, tau2):
    """CAKE's preference of one layer: entropy^(1/tau1) · variance^(1/tau2) of the last W window
    probabilities over the prefix, summed over query heads (and window queries, for the
    entropy)."""
    pw = ctx.Pw[:, ctx.Wt - W:, :ctx.N - W]
    ent = float(-(pw * np.log(pw + 1e-10)).sum())
    var = float(pw.var(axis=1, ddof=1).sum())
    return ent ** (1.0 / tau1) * var ** (1.0 / tau2)


def cake_counts(prefs, b, P):
    """Every layer's prefix budget: the total b·L split by the preferences, truncated, then
    cake/utils.py adjust_budgets (excess above P shared by the layers below P; then the total
    restored on the layers below P, or taken from those above 1), clamped to [0, P]."""
    L = len(prefs)
    total = b * L
    s = sum(prefs)
    f = [p / s * total for p in prefs] if s > 0 and math.isfinite(s) else [total / L] * L
    bl = np.array([int(x) for x in f], dtype=np.int64)
    excess = np.maximum(bl - P, 0)
    bl = np.minimum(bl, P)
    ex = int(excess.sum())
    if ex > 0:
        ok = bl < P
        n = int(ok.sum())
        if n > 0:
            bl[ok] += ex // n
            bl[np.where(ok)[0][:ex % n]] += 1
    diff = total - int(bl.sum())
    if diff != 0:
        ok = bl < P if diff > 0 else bl > 1
        n = int(ok.sum())
        if n > 0:
            sign = 1 if diff > 0 else -1
            bl[ok] += sign * (abs(diff) // n)
            bl[np.where(ok)[0][:abs(diff) % n]] += sign
    return [int(min(max(x, 0), P)) for x in bl]


def _vlcache_key(o):
    return (o.get("heads", "kv"), o["reduce"], float(o["threshold"]), int(o["last"]))


def vlcache_layer(ctx, o):
    """One layer's (density, scores [H', N]) for vl-cache: the attention of the post-vision
    queries (after the last image/video token; the last `last` of them when last > 0)."""
    N = ctx.N
    vis = np.where(np.isin(ctx.modality, (1, 2)))[0]
    if len(vis) == 0 or vis[-1] == N - 1:
        raise ValueError("vl-cache: no post-vision query")
    n = N - 1 - int(vis[-1])
    if int(o["last"]) > 0:
        n = min(n, int(o["last"]))
    Q = ctx.Qw if ctx.Wt >= n else ctx.Qall
    if Q is None:
        raise ValueError("vl-cache: %d post-vision queries need Q_all" % n)
    pos = np.arange(N - n, N)
    z = np.einsum("hid,hjd->hij", Q[:, Q.shape[1] - n:, :], ctx.K[ctx.gi]) * ctx.scale
    seen = np.arange(N)[None, :] <= pos[:, None]                   # [n, N]
    z = np.where(seen[None], z, -np.inf)
    top = z.max(axis=2, keepdims=True)
    thr = float(o["threshold"])
    rel = np.where(seen[None], z - top, 0.0)
    sparse = (rel < math.log(thr)) & seen[None] if thr > 0 else np.zeros(z.shape, bool)
    density = 1.0 - sparse.sum() / float(ctx.Hq * seen.sum())
    e = np.exp(z - top)
    a = (e / e.sum(axis=2, keepdims=True)).sum(axis=1)             # [Hq, N]
    red = a if o.get("heads", "kv") == "query" else reduce_heads(a, ctx.Hkv, o["reduce"])
    return density, red


def vlcache_counts(dens, N, B):
    """Each layer's kept tokens: clip(lam·d, 1, N) summing to L·B (lam by bisection), rounded
    down, the rest one each to the largest remainders (within 1e-9: the lower layer)."""
    d = np.asarray(dens, dtype=np.float64)
    L = len(d)
    if B >= N:
        return [N] * L
    lo, hi = 0.0, N / d.min()
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if np.clip(mid * d, 1, N).sum() < B * L:
            lo = mid
        else:
            hi = mid
    x = hi * d
    held = (x <= 1) | (x >= N)
    c = np.clip(np.floor(x), 1, N).astype(np.int64)
    rem = np.where(held, -1.0, x - np.floor(x))
    for _ in range(B * L - int(c.sum())):
        cand = [l for l in range(L) if c[l] < N]
        best = cand[0]
        for l in cand[1:]:
            if rem[l] > rem[best] + 1e-9:
                best = l
        c[best] += 1
        rem[best] = -2.0
    return [int(v) for v in c]


def load_layer(t, layer, scale=None):
    """LayerInputs of one layer of an open kvtrace.Trace (float32 -> float64)."""
    def rd(kind):
        return t.read(kind, layer=layer, dtype="float32") if t.has(kind, layer) else None

    colsum = rd("attn_colsum")
    if colsum is not None:
        colsum = colsum[:, :, 0]
    return LayerInputs(rd("K"), rd("V"), rd("Q_window"), rd("Q_decode"), rd("K_decode"),
                       rd("V_decode"), colsum, scale, t.tokens["modality"], rd("Q_all"))


def replay_trace(path, policies=None, budgets=(64, 128, 256, 512), layers=None,
                 coverage_probes=256, scale=None, debug=False):
    """Replay a .kvt trace; returns the canonical JSON object (see the module docstring)."""
    kvtrace = _import_kvtrace()
    pols = [parse_policy(p) for p in (policies or DEFAULT_POLICIES)]
    with kvtrace.open(path) as t:
        hdr = t.header
        model = hdr.get("model", {})
        L = int(model.get("n_layers", len(t.layers("K"))))
        if scale is None and model.get("attn_scale"):  # the model's own softmax scale
            scale = float(model["attn_scale"])
        layer_ids = list(range(L)) if layers is None else list(layers)
        N = t.shape("K", 0)[1]
        out = {"policies": {}, "settings": {
            "policies": [{"label": lb, "name": n, "options": o} for lb, n, o in pols],
            "budgets": [str(b) for b in budgets], "coverage_probes": coverage_probes},
            "trace": {"path": os.fspath(path), "n_layers": L, "n_tokens": N,
                      "layers": layer_ids}}
        for label, name, o in pols:
            out["policies"][label] = {"name": name, "options": o, "budgets": {}}
        fastv = {}  # (K, last) -> the ranking of layers >= K, from layer K - 1
        for _, name, o in pols:
            key = (int(o.get("dense_layers", 0)), int(o.get("last", 0)))
            if name == "fastv" and key not in fastv and 1 <= key[0] < L:
                fastv[key] = fastv_order(load_layer(t, key[0] - 1, scale), key[1])
        cake = {}  # (W, tau1, tau2) -> every layer's preference
        for _, name, o in pols:
            if name == "cake":
                key = (int(o["window"]), float(o["tau1"]), float(o["tau2"]))
                if key not in cake and key[0] < N:
                    cake[key] = [cake_pref(load_layer(t, l, scale), key[0], key[1], key[2])
                                 for l in range(L)]
        vlc = {}  # _vlcache_key -> (every layer's density, every layer's scores)
        for _, name, o in pols:
            if name == "vl-cache" and _vlcache_key(o) not in vlc:
                per = [vlcache_layer(load_layer(t, l, scale), o) for l in range(L)]
                vlc[_vlcache_key(o)] = ([x[0] for x in per], [x[1] for x in per])
        for layer in layer_ids:
            ctx = load_layer(t, layer, scale)
            ctx.fastv_orders = fastv
            ctx.cake_prefs = cake
            ctx.vlcache = vlc
            res = replay_layer(None, None, None, policies=pols, budgets=budgets, layer=layer,
                               n_layers=L, coverage_probes=coverage_probes, ctx=ctx,
                               debug=debug)
            for label, by_b in res.items():
                pb = out["policies"][label]["budgets"]
                for B, heads in by_b.items():
                    pb.setdefault(str(B), {"budget_tokens": B, "layers": []})
                    pb[str(B)]["layers"].append({"layer": layer, "heads": heads})
        # drop policies that were skipped for lack of input
        for label in list(out["policies"]):
            if not out["policies"][label]["budgets"]:
                out["policies"][label]["skipped"] = "missing input (%s)" % NEEDS.get(
                    out["policies"][label]["name"], "?")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help="comma-separated specs NAME[:key=value,...]")
    ap.add_argument("--policy", action="append", default=[], help="add one spec")
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    ap.add_argument("--coverage-probes", type=int, default=256)
    ap.add_argument("--scale", type=float, default=None, help="softmax scale (1/sqrt(D))")
    ap.add_argument("--indent", type=int, default=None)
    ap.add_argument("--debug", action="store_true",
                    help="add tie_margin / alloc_margin to every head")
    a = ap.parse_args(argv)
    pols = split_policy_list(a.policies) + a.policy
    budgets = [b if b.endswith("%") else int(b) for b in a.budgets.split(",") if b]
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    res = replay_trace(a.trace, pols, budgets, layers, a.coverage_probes, a.scale, a.debug)
    with open(a.output, "w") as f:
        json.dump(res, f, indent=a.indent, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
