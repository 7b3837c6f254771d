#!/usr/bin/python3
"""test_critical.py - `critical=FILE.npy` (kvpress's CriticalKVPress and CriticalAdaKVPress)
against NumPy written from kvpress/presses/criticalkv_press.py @0603dec, and
kvtrace.critical_norms against kvpress's vwl1norm.

CriticalKVPress.score, at n_kept = N:
    stage 1: the int(N * first_stage_ratio) highest scores are set to the maximum
    stage 2: the others score (score + epsilon) * ||v W_o||_1
    the N highest are kept
CriticalAdaKVPress.compress:
    n_safe = int(N * alpha): each head's n_safe highest set to the maximum
    head budgets c_h: how many of the layer's H * N highest scores fall in head h
    stage 1: each head's int(c_h * first_stage_ratio) highest set to the maximum
    stage 2: (score + epsilon) * ||v W_o||_1; each head keeps its c_h highest
Written literally, with the window's (or sinks') scores +inf (kvtrace keeps them first; kvpress
pads them with the layer's maximum, a tie) and ties to the earlier token, then the lower head
(kvtrace's rule; torch.topk leaves them unspecified). Scores come from the NumPy references:
SnapKV (replay_oracle's window_probs, window_scores, reduce_heads, pool1d), -||k|| (knorm) and
expected-attention (test_expected_attention_synth, sinks=0 and vnorm=0 as kvpress advises). The
norms come from kvtrace.critical_norms with random output projections, checked first against a
direct transcription of vwl1norm.

Also: the sets of CriticalAdaKV are not all nested across budgets (a ranking per budget), a
file of another shape or with a negative norm is refused in one line, and adaptive=1 with
alloc=a is refused; critical=DIR (one NAME.npy per trace) over two traces gives each trace the
sets of its own replay, a file for one trace given two is refused, and a trace without its file
in DIR is refused before any work. Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT; exit 77 without NumPy, the
CLI or the library.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import (ROOT, check, finish, need_library, replay_export,  # noqa: E402
                      refused as cli_refused, run,
                      score_traces)  # (exits 77 without NumPy or the CLI)
import numpy as np  # noqa: E402

kvtrace = need_library()
import replay_oracle as ro  # noqa: E402
import test_expected_attention_synth as ea_synth  # noqa: E402


def vwl1norm(V, Wo, Hq):
    """kvpress's vwl1norm: V [Hkv, T, D], Wo = o_proj.weight [hidden, Hq*D] -> [Hkv, T]"""
    Hkv, T, D = V.shape
    G = Hq // Hkv
    Wt = Wo.T.reshape(Hq, D, -1)                       # Wo.transpose(0, 1).view(Hq, D, hidden)
    Vr = np.repeat(V, G, axis=0)                       # repeat_kv
    n = np.stack([np.abs(Vr[h] @ Wt[h]).sum(-1) for h in range(Hq)])  # [Hq, T]
    return n.reshape(Hkv, G, T).mean(axis=1)


def top(x, n):
    """The n highest of x (ties to the lower index)."""
    return np.lexsort((np.arange(x.size), -x))[:n]


def critical_kv(S, w, N, f, eps):
    """CriticalKVPress's kept sets [H] of scores S [H, T] (+inf: kept first), norms w [H, T]."""
    H, T = S.shape
    out = []
    for h in range(H):
        if N >= T:
            out.append(set(range(T)))
            continue
        r = (S[h] + eps) * w[h]
        r[top(S[h], int(N * f))] = np.inf
        out.append(set(int(j) for j in top(r, N)))
    return out


def critical_adakv(S, w, N, f, eps, alpha):
    """CriticalAdaKVPress's kept sets [H]."""
    H, T = S.shape
    if N >= T:
        return [set(range(T))] * H
    S = S.copy()
    for h in range(H):
        S[h, top(S[h], int(N * alpha))] = np.inf
    c = np.bincount(top(S.reshape(-1), H * N) // T, minlength=H)
    out = []
    for h in range(H):
        s = S[h].copy()
        s[top(s, int(c[h] * f))] = np.inf
        r = (s + eps) * w[h]
        out.append(set(int(j) for j in top(r, c[h])))
    return out


def snapkv_scores(t, layer, W, kernel=5):
    """SnapKV's scores [Hkv, T] (window +inf): the replay oracle's window attention, GQA mean,
    avg pooling."""
    K = t.read("K", layer, dtype="float32").astype(np.float64)
    Qw = t.read("Q_window", layer, dtype="float32").astype(np.float64)
    T = K.shape[1]
    p = ro.pool1d(ro.reduce_heads(ro.window_scores(ro.window_probs(K, Qw), W), K.shape[0]),
                  kernel, "avg")
    return np.concatenate([p, np.full((K.shape[0], W), np.inf)], axis=1)[:, :T]


def knorm_scores(t, layer, W=0):
    return -np.linalg.norm(t.read("K", layer, dtype="float32").astype(np.float64), axis=-1)


def compare(name, path, spec, budgets, work, scores, w, ada=False, f=0.5, eps=1e-4, alpha=0.2,
            G=1):
    """Every exported kept set against the oracle; returns {(layer, head): [sets by budget]}."""
    recs = replay_export(path, spec, budgets, work)["records"]
    bad, cache, by = 0, {}, {}
    with kvtrace.open(path) as t:
        for r in recs:
            layer, B = r["layer"], r["budget_tokens"]
            if (layer, B) not in cache:
                S = np.repeat(scores(t, layer), G, axis=0)
                cache[(layer, B)] = (critical_adakv(S, w[layer], B, f, eps, alpha) if ada
                                     else critical_kv(S, w[layer], B, f, eps))
            want = cache[(layer, B)][r["head"]]
            by.setdefault((layer, r["head"]), []).append(set(r["kept"]))
            if want != set(r["kept"]):
                bad += 1
                if bad <= 3:
                    print("  %s %s layer %d head %d B %d: check %s, replay %s" % (
                        name, spec, layer, r["head"], B, sorted(want - set(r["kept"]))[:8],
                        sorted(set(r["kept"]) - want)[:8]))
    print("%s %s: %d sets, %d differ" % (name, spec, len(recs), bad))
    check(recs and bad == 0, "%s %s: %d of %d kept sets differ" % (name, spec, bad, len(recs)))
    return by


def not_nested(by):
    return sum(any(not a <= b for a, b in zip(v, v[1:])) for v in by.values())


def main():
    with tempfile.TemporaryDirectory() as work:
        a, s = score_traces(work, q_all=True)
        rng = np.random.default_rng(11)

        def norms(path, heads="kv"):
            with kvtrace.open(path) as t:
                m = t.header["model"]
                L, Hq, D = m["n_layers"], m["n_q_heads"], m["head_dim"]
                hidden = Hq * D
                o_proj = [rng.standard_normal((hidden, Hq * D)) / np.sqrt(Hq * D)
                          for _ in range(L)]
                w = kvtrace.critical_norms(path, o_proj, heads=heads)
                try:  # the torch path (float32), on the CPU here
                    import torch
                    wt = kvtrace.critical_norms(path, [torch.from_numpy(x) for x in o_proj],
                                                heads=heads, device="cpu")
                    err = np.abs(wt - w).max() / np.abs(w).max()
                    check(err < 1e-5, "critical_norms device='cpu': %.3g from NumPy's" % err)
                    # the model's parameters as they are (requires_grad; bf16): were torch's
                    # "Can't call numpy() on Tensor that requires grad" / "unsupported
                    # ScalarType BFloat16" with device=None
                    params = [torch.nn.Parameter(torch.from_numpy(x)) for x in o_proj]
                    wp = kvtrace.critical_norms(path, params, heads=heads)
                    check(np.array_equal(wp, w), "critical_norms of Parameters: not NumPy's")
                    bf = [p.detach().to(torch.bfloat16).requires_grad_() for p in params]
                    wb = kvtrace.critical_norms(path, bf, heads=heads)
                    want = kvtrace.critical_norms(path, [b.detach().float().numpy() for b in bf],
                                                  heads=heads)
                    check(np.array_equal(wb, want), "critical_norms of bf16 Parameters")
                except ImportError:
                    print("(no torch: the device path is not checked)")
                if heads == "kv":  # the helper against vwl1norm, every layer
                    for layer in range(L):
                        V = t.read("V", layer, dtype="float32").astype(np.float64)
                        ref = vwl1norm(V, o_proj[layer], Hq)
                        err = np.abs(w[layer] - ref).max() / np.abs(ref).max()
                        check(err < 1e-12, "critical_norms layer %d: %.3g from vwl1norm" %
                              (layer, err))
            f = os.path.join(work, "w_%s_%s.npy" % (os.path.basename(path), heads))
            np.save(f, w.astype(np.float32))
            return f, w.astype(np.float32).astype(np.float64)

        fa, wa = norms(a)
        fq, wq = norms(a, heads="query")
        fs, ws = norms(s)
        with kvtrace.open(a) as t:
            m = t.header["model"]
            G = m["n_q_heads"] // m["n_kv_heads"]
        budgets = "8,10,16,40,50%,149,200"
        snap = lambda t, layer: snapkv_scores(t, layer, 8)  # noqa: E731
        compare("llama2c", a, "snapkv:window=8,critical=" + fa, budgets, work, snap, wa)
        compare("llama2c", a, "snapkv:window=8,first=0.3,ceps=0.01,critical=" + fa, budgets,
                work, snap, wa, f=0.3, eps=0.01)
        by = compare("llama2c", a, "adakv:window=8,alloc=b,critical=" + fa, budgets, work, snap,
                     wa, ada=True)
        nn = not_nested(by)
        # alpha 0.9: the forced tokens outnumber the first stage (max(n_safe, c * first))
        by = compare("llama2c", a, "adakv:window=8,alloc=b,alpha=0.9,critical=" + fa, budgets,
                     work, snap, wa, ada=True, alpha=0.9)
        nn += not_nested(by)
        by = compare("llama2c", a, "knorm:adaptive=1,critical=" + fa, "1,3,10,40,50%,149", work,
                     knorm_scores, wa, ada=True)
        nn += not_nested(by)
        compare("llama2c", a, "knorm:critical=" + fa, "1,3,10,40,50%,149", work, knorm_scores, wa)
        compare("llama2c", a, "knorm:heads=query,critical=" + fq, "3,10,40", work, knorm_scores,
                wq, G=G)
        compare("llama2c", a, "knorm:heads=query,adaptive=1,alpha=0.5,critical=" + fa,
                "3,10,40", work, knorm_scores, np.repeat(wa, G, axis=1), ada=True, alpha=0.5, G=G)
        ea, _ = ea_synth.scores(s, sinks=0, vnorm=False)
        for spec, ada in (("expected-attention:sinks=0,vnorm=0,critical=", False),
                          ("expected-attention:sinks=0,vnorm=0,adaptive=1,critical=", True)):
            by = compare("llama3-8b", s, spec + fs, "8,60,50%", work, lambda t, layer: ea[layer],
                         ws, ada=ada)
            nn += not_nested(by) if ada else 0
        print("CriticalAdaKV (layer, head) pairs whose sets are not nested: %d" % nn)
        check(nn > 0, "every CriticalAdaKV set nested: the per-budget form is not exercised")

        def refused(spec, want, rc=1):
            cli_refused(["replay", a, "--policy", spec, "--budgets", "10", "-o",
                         os.path.join(work, "x.json"), "--force"], want, rc)
        refused("snapkv:window=8,critical=" + fs, "this trace needs (5, 4, 150)")
        neg = wa.copy()
        neg[1, 2, 7] = -1
        fn = os.path.join(work, "neg.npy")
        np.save(fn, neg)
        refused("knorm:critical=" + fn, "norm -1 at layer 1, head 2, token 7")
        refused("knorm:adaptive=1,alloc=a,critical=" + fa, "whose allocation is alloc=b", 2)
        refused("knorm:critical=" + os.path.join(work, "missing.npy"), "missing.npy")

        # critical=DIR: one NAME.npy per trace NAME.kvt, for a replay of several traces; the
        # sets equal each trace's own replay with its file
        b = os.path.join(work, "b.kvt")
        run("capture-llama2c", "--model", os.path.join(ROOT, "models", "stories260K.bin"),
            "--tokens", "120", "--decode", "2", "--window", "8", "-o", b)
        fb, _ = norms(b)
        d = os.path.join(work, "crit")
        os.mkdir(d)
        os.link(fa, os.path.join(d, "a.npy"))
        os.link(fb, os.path.join(d, "b.npy"))
        spec = "adakv:window=8,alloc=b,critical="
        sel = os.path.join(work, "both.json")
        run("replay", a, b, "--policy", spec + d, "--budgets", "10,40", "--export-selection",
            sel, "-o", os.path.join(work, "both_r.json"), "--force")
        with open(sel) as f:
            both = json.load(f)["records"]
        with open(os.path.join(work, "both_r.json")) as f:  # CriticalAdaKV: a set per budget
            pol = json.load(f)["settings"]["policies"][0]
        check(pol["per_budget"] is True, "critical=DIR: per_budget %r" % pol["per_budget"])
        n_same = 0
        for ti, (path, fp) in enumerate(((a, fa), (b, fb))):
            one = replay_export(path, spec + fp, "10,40", work)["records"]
            key = lambda r: (r["layer"], r["head"], r["budget_tokens"])  # noqa: E731
            mine = {key(r): r["kept"] for r in both if r["trace"] == ti}
            same = len(one) == len(mine) and all(mine.get(key(r)) == r["kept"] for r in one)
            n_same += same
            check(same, "critical=DIR: trace %d's sets differ from its own replay" % ti)
        print("critical=DIR over 2 traces: %d of 2 traces' sets equal their own replays" % n_same)
        r = run("replay", a, b, "--policy", "snapkv:window=8,critical=" + fa, "-o",
                os.path.join(work, "x.json"), "--force", ok=False)
        check(r.returncode == 2 and "file describes one trace, and 2 are given" in r.stderr,
              "critical=FILE with 2 traces: %d %r" % (r.returncode, r.stderr))
        os.remove(os.path.join(d, "b.npy"))
        r = run("replay", a, b, "--policy", spec + d, "-o", os.path.join(work, "x.json"),
                "--force", ok=False)
        check(r.returncode != 0 and "b.npy" in r.stderr and
              len(r.stderr.strip().splitlines()) == 1 and
              not os.path.exists(os.path.join(work, "x.json")),
              "critical=DIR without b.npy: %d %r" % (r.returncode, r.stderr))
    finish("test_critical")


if __name__ == "__main__":
    main()
