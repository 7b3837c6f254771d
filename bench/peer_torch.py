#!/usr/bin/python3
"""peer_torch.py - the replay sweep "as a researcher would write it" in PyTorch (issue #7).

The same sweep as bench/peer_numpy.py (same policies, metrics, options, output JSON and
--compare), on torch tensors on --device (default cuda when available): for each layer it
reads K, V, Q_window, Q_decode, K_decode, V_decode (and ATTN_COLSUM if present) through the
Python binding on the host, copies them to the device, computes the window and decode
attention of every KV-head group with torch.matmul and softmax in float32, the SnapKV scores
(POLICIES.md §0.1: mean over the last W window queries, GQA mean, avgpool k=5 with zero
padding), and then, for every policy and EVERY budget, re-selects each KV head's kept set with
torch.topk and measures attention recall and relative output error (window and decode
queries, analysis/RESULTS.md definitions) and key coverage on probe keys with matmuls over the
gathered kept set. Nothing is shared between budgets: that is the point of the comparison.
float32 products, float64 sums where peer_numpy takes them in float64.

Policies as in peer_numpy: streamingllm, h2o (only with attn_colsum), snapkv, pyramidkv,
adakv (3a, normalize, alpha 0.2), knorm, random (window kept, own torch RNG: its numbers are
neither kvtrace's nor peer_numpy's), oracle (decode attention). Ties are broken by torch.topk.

Times (JSON "time", seconds, summed over layers; torch.cuda.synchronize(), or a blocking copy
to the host, before every clock read): read (the trace into host NumPy arrays, float32), h2d
(host-to-device copies), attention and policies (device compute; "compute" is their sum);
"init_s" (CUDA context and first kernels, before the sweep's clock starts) is reported apart.

usage:
  peer_torch.py TRACE [--device cuda|cpu] [--policies LIST] [--budgets LIST] [--probes P]
                      [--layers 0,1] [-o peer.json] [--compare kvtrace_results.json]
                      [--tol 1e-3]
  peer_torch.py --cut N SRC DST      (as peer_numpy.py --cut)
Run with /usr/bin/python3, PYTHONPATH=python and KVT_LIB=<build>/libkvtrace.so. Works with
PyTorch 1.13 and 2.x.
"""
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_numpy as pn  # noqa: E402  (the options, constants, cut and compare)

kvtrace = pn.kvtrace
KEYS = pn.KEYS
F64 = torch.float64


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Layer:
    """One layer's attention, every KV head at once: probabilities, full outputs, unit keys,
    probes. Tensors are [Hkv, ...]; rows of a group are (query head, position)."""

    def __init__(self, K, V, Qw, Qd, Kd, Vd, n_probes):
        H, T, D = K.shape
        dev = K.device
        G = Qw.shape[0] // H
        Wt = Qw.shape[1]
        scale = 1.0 / math.sqrt(D)
        # window queries: causal mask inside the window only
        z = torch.matmul(Qw.reshape(H, G * Wt, D), K.transpose(1, 2)) * scale   # [H, G*Wt, T]
        pos = T - Wt + torch.arange(Wt, device=dev)
        mask = torch.arange(T, device=dev)[None, :] > pos[:, None]               # [Wt, T]
        z = z.view(H, G, Wt, T).masked_fill(mask, float("-inf")).view(H, G * Wt, T)
        self.Pw = torch.softmax(z, dim=-1)
        del z
        self.Zw = self.Pw.sum(-1, dtype=F64)
        self.ow = torch.matmul(self.Pw, V)
        # decode queries: all T prompt keys plus decode keys 0..s (never evicted)
        self.Pd = None
        if Qd is not None:
            Gd = Qd.shape[1]
            q = Qd.reshape(H, G * Gd, D)
            zd = torch.matmul(q, K.transpose(1, 2)) * scale                       # [H, G*Gd, T]
            if Kd is not None:
                zx = torch.matmul(q, Kd.transpose(1, 2)) * scale                  # [H, G*Gd, Gd]
                causal = torch.ones(Gd, Gd, dtype=torch.bool, device=dev).triu(1)
                zx = zx.view(H, G, Gd, Gd).masked_fill(causal, float("-inf")).view(H, G * Gd, Gd)
            else:
                zx = torch.full((H, G * Gd, 1), float("-inf"), device=dev)
            m = torch.maximum(zd.amax(-1), zx.amax(-1))[..., None]
            e, ex = torch.exp(zd - m), torch.exp(zx - m)
            del zd
            Z = e.sum(-1, dtype=F64) + ex.sum(-1, dtype=F64)                     # [H, G*Gd]
            self.Pd = (e / Z[..., None]).float()
            del e
            self.px = ex.sum(-1, dtype=F64) / Z
            if Kd is not None:
                self.ox = torch.matmul(ex, Vd).double() / Z[..., None]
            else:
                self.ox = torch.zeros(H, G * Gd, D, dtype=F64, device=dev)
            self.od = torch.matmul(self.Pd, V).double() + self.ox
            self.Zd = self.Pd.sum(-1, dtype=F64) + self.px
        self.V = V
        self.Kh = K / K.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = min(n_probes, T)
        self.Kp = None
        self.pidx = (torch.arange(n, device=dev) * T) // n
        if n > 0:
            self.Kp = self.Kh[:, self.pidx]                                         # [H, n, D]

    def _rec_err(self, P, Z, o, idx, valid, px=None, ox=None):
        R, D = P.shape[1], self.V.shape[2]
        PS = torch.gather(P, 2, idx[:, None, :].expand(-1, R, -1))                 # [H, R, n]
        if valid is not None:
            PS = PS * valid[:, None, :]
        VS = torch.gather(self.V, 1, idx[:, :, None].expand(-1, -1, D))            # [H, n, D]
        mass = PS.sum(-1, dtype=F64)
        num = torch.matmul(PS, VS).double()
        if px is not None:
            mass = mass + px
            num = num + ox
        ok = mass > 0
        oS = num / torch.where(ok, mass, torch.ones_like(mass))[..., None]
        err = (oS - o).norm(dim=-1) / o.double().norm(dim=-1)
        err = torch.where(ok, err, torch.ones_like(err))
        return (mass / Z).mean(-1), err.mean(-1)

    def metrics(self, idx, valid, W=0):
        """[H, 6] (KEYS order) for kept indices idx [H, n] (entries where valid [H, n] is
        False, if given, are not kept); coverage over the probes of the prefix [0, T-W)."""
        H, n = idx.shape
        dev = idx.device
        nk = (valid.sum(-1) if valid is not None else
              torch.full((H,), n, device=dev)).double()
        rw, ew = self._rec_err(self.Pw, self.Zw, self.ow, idx, valid)
        nan = torch.full((H,), float("nan"), dtype=F64, device=dev)
        rd = ed = nan
        if self.Pd is not None:
            rd, ed = self._rec_err(self.Pd, self.Zd, self.od, idx, valid, self.px, self.ox)
        cov = nan
        inP = self.pidx < self.Kh.shape[1] - W
        if self.Kp is not None and n > 0 and bool(inP.any()):
            KS = torch.gather(self.Kh, 1, idx[:, :, None].expand(-1, -1, self.Kh.shape[2]))
            c = torch.matmul(self.Kp[:, inP], KS.transpose(1, 2))                   # [H, P, n]
            if valid is not None:
                c = c.masked_fill(~valid[:, None, :], float("-inf"))
            cov = c.amax(-1).double().mean(-1)
            cov = torch.where(nk > 0, cov, nan)
        return torch.stack([nk, rw, ew, rd, ed, cov], dim=1)


def top(score, n):
    """Indices [H, n] of each row's n largest scores (torch.topk; n clipped to the row)."""
    n = max(0, min(int(n), score.shape[1]))
    return torch.topk(score, n, dim=-1).indices


def kept_sets(pol, B, T, W, H, dev, score=None, n_sel=None):
    """(idx [H, n], valid [H, n] or None): every head's kept set at budget B: the window
    (last W) + the top n_sel of score [H, T-W] (window policies; n_sel an int or one per head),
    or the top B of score [H, T] over all T (knorm, oracle)."""
    def ar(a, b):
        return torch.arange(a, b, device=dev).expand(H, -1)
    if T <= B:  # B = T keeps everything too, for every policy
        return ar(0, T), None
    if pol == "streamingllm":
        s = min(pn.SINKS, B)
        return torch.cat([ar(0, s), ar(T - (B - s), T)], dim=1), None
    if pol in ("knorm", "oracle"):
        return top(score, B), None
    if B < W:
        return ar(T - B, T), None
    win = ar(T - W, T)
    if isinstance(n_sel, (list, tuple)):                 # AdaKV: a count per head
        ns = [max(0, min(int(x), T - W)) for x in n_sel]
        k = max(ns)
        idx = top(score, k)                              # sorted: the first ns[g] are head g's
        valid = torch.arange(k, device=dev)[None, :] < torch.tensor(ns, device=dev)[:, None]
        ones = torch.ones(H, W, dtype=torch.bool, device=dev)
        return torch.cat([idx, win], dim=1), torch.cat([valid, ones], dim=1)
    return torch.cat([top(score, min(n_sel, T - W)), win], dim=1), None


def adakv_caps(pooled, b):
    """POLICIES §3a with normalize=True, alpha=0.2: per-head counts of the global top H*b."""
    H, nP = pooled.shape
    s = torch.sort(pooled, dim=1, descending=True).values
    w = s[:, :b].sum(1, keepdim=True) / s.sum(1, keepdim=True)
    s = s * w
    picks = torch.topk(s.reshape(-1), H * b).indices
    n = torch.bincount(picks // nP, minlength=H).double()
    caps = torch.round(n * (1 - pn.ALPHA) + math.floor(pn.ALPHA * b)).clamp(0, nP)
    return [int(x) for x in caps.tolist()]


def replay(path, policies, budgets, probes, layers=None, seed=0, device="cpu"):
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False    # float32 products, not TF32
    t0 = time.perf_counter()
    torch.matmul(torch.ones(8, 8, device=dev), torch.ones(8, 8, device=dev)).sum().item()
    sync(dev)
    init_s = time.perf_counter() - t0
    t_start = time.perf_counter()
    tim = {"read": 0.0, "h2d": 0.0, "attention": 0.0, "policies": 0.0}
    with kvtrace.open(path) as t:
        sw = pn.Sweep(t, policies, budgets, layers)
        L, layer_ids, Hkv, T, Wt, G, W = sw.L, sw.layer_ids, sw.Hkv, sw.T, sw.Wt, sw.G, sw.W
        has_dec, has_dkv, has_cs = sw.has_dec, sw.has_dkv, sw.has_cs
        pols, skipped, Bs, acc = sw.pols, sw.skipped, sw.Bs, sw.acc
        for layer in layer_ids:
            t1 = time.perf_counter()
            names = ["K", "V", "Q_window"]
            names += ["Q_decode"] if has_dec else []
            names += ["K_decode", "V_decode"] if has_dkv else []
            names += ["attn_colsum"] if has_cs else []
            host = {k: t.read(k, layer=layer, dtype="float32") for k in names}
            t2 = time.perf_counter()
            x = {k: torch.from_numpy(a).to(dev) for k, a in host.items()}
            sync(dev)
            t3 = time.perf_counter()
            K, V = x["K"], x["V"]
            lay = Layer(K, V, x["Q_window"], x.get("Q_decode"), x.get("K_decode"),
                        x.get("V_decode"), probes)
            a = lay.Pw.view(Hkv, G, Wt, T)[:, :, Wt - W:, :T - W].mean(dim=(1, 2))  # [H, T-W]
            snap = F.avg_pool1d(a[:, None, :], pn.KERNEL, stride=1, padding=pn.KERNEL // 2,
                                count_include_pad=True)[:, 0, :]
            sync(dev)
            t4 = time.perf_counter()
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed + 1000003 * layer)
            rows = []
            for pol in pols:
                for B in Bs:
                    score, n_sel = None, B - W
                    if pol in ("snapkv", "pyramidkv", "adakv"):
                        score = snap
                        if pol == "pyramidkv":
                            n_sel = max(0, pn.pyramid_b(B, W, T, L, layer))
                        elif pol == "adakv" and W <= B <= T:
                            n_sel = adakv_caps(snap, B - W) if B > W else [0] * Hkv
                    elif pol == "h2o":
                        score = x["attn_colsum"][:, :T - W, 0].reshape(Hkv, G, T - W).mean(1)
                    elif pol == "knorm":
                        score = -K.norm(dim=-1)
                    elif pol == "oracle":
                        score = lay.Pd.mean(1)
                    elif pol == "random":
                        score = torch.rand(Hkv, T - W, generator=gen, device=dev)
                    idx, valid = kept_sets(pol, B, T, W, Hkv, dev, score, n_sel)
                    rows.append(lay.metrics(idx, valid, pn.cov_window(pol, W)))
            vals = torch.stack(rows).cpu().numpy()            # [n_pol * n_budgets, H, 6]
            t5 = time.perf_counter()                          # .cpu() waited for the device
            i = 0
            for pol in pols:
                for btext in budgets:
                    acc[(pol, btext)].append(vals[i])
                    i += 1
            del lay, x, host
            tim["read"] += t2 - t1
            tim["h2d"] += t3 - t2
            tim["attention"] += t4 - t3
            tim["policies"] += t5 - t4
            print("peer_torch: layer %d: read %.2f s, to %s %.2f s, attention %.2f s, %d "
                  "policies x %d budgets %.2f s" % (layer, t2 - t1, dev.type, t3 - t2, t4 - t3,
                                                    len(pols), len(Bs), t5 - t4),
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - t_start
    tim["compute"] = tim["attention"] + tim["policies"]
    res = {}
    for (p, b), blocks in acc.items():
        a = np.concatenate(blocks, axis=0)                   # [layers * H, 6]
        res.setdefault(p, {})[b] = {k: float(np.nanmean(a[:, j])) if np.isfinite(a[:, j]).any()
                                    else float("nan") for j, k in enumerate(KEYS)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"trace": path, "layers": layer_ids, "n_layers": L, "T": T, "policies": pols,
            "skipped": skipped, "budgets": budgets, "probes": probes, "total_s": total,
            "time": tim, "init_s": init_s, "blas_threads": str(torch.get_num_threads()),
            "device": str(dev), "device_name": name, "torch": torch.__version__,
            "results": res}


def main(argv=None):
    ap = pn.arg_parser(__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    a = ap.parse_args(argv)
    if a.cut:
        pn.cut(a.cut[1], int(a.cut[0]), a.cut[2])
        return 0
    pols, budgets, layers = pn.sweep_args(ap, a)
    out = replay(a.trace, pols, budgets, a.probes, layers, a.seed, a.device)
    t = out["time"]
    return pn.report(out, a, "peer_total_s %.3f  (read %.2f, h2d %.2f, attention %.2f, "
                     "policies x budgets %.2f; device %s (%s), torch %s, %s threads; "
                     "init %.2f s apart)" % (out["total_s"], t["read"], t["h2d"],
                                             t["attention"], t["policies"], out["device"],
                                             out["device_name"], out["torch"],
                                             out["blas_threads"], out["init_s"]))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a crash (out of memory, a CUDA error) is not a disagreement (exit 1)
        traceback.print_exc()
        sys.exit(2)
