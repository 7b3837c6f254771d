"""kvtrace.hf.e2e: the end-to-end check of a replay's proxies on a transformers model, as
`kvtrace e2e-llama2c` does it on the built-in llama2.c engine (analysis/RESULTS.md,
"End-to-end check"; the same e2e.json, which `kvtrace report RESULTS --e2e e2e.json` plots).

    kvtrace replay run.kvt --policies snapkv,h2o --budgets 64,128 -o results.json \\
        --export-selection sel.bin
    d = kvtrace.hf.e2e(model, "results.json", "sel.bin", "e2e.json")
    d["spearman"]["err_decode_vs_kl"]

The replay's kept sets (the selection export) mask the model's attention: for each trace, the
prompt runs uncompressed, then the trace's decode steps run again, fed the same tokens
(teacher forcing, in forward calls of as many steps as max_decode_bytes holds after the
prompt's cache: all G in one for a short generation), once with the whole
cache (the reference) and once per (policy, budget) with query head h of layer l attending
only to the prompt tokens its set kept and to the decode tokens up to its own. The mask is
handed to the model's own attention function (the registry entry, wrapped as capture() wraps
it), so the model computes exactly as it would; the reference goes through the same masked
path, so a setting that keeps everything has a KL of exactly 0.
"""
import functools
import json
import math
import os
import types

import numpy as np

from . import _lib
from ._errors import TraceError
from ._selection import Selection
from ._trace import Trace, path_arg

E2E_VERSION = 1
KEY_TOLERANCE = 1e-2  # layer 0's keys against the trace's, over their scale (bf16: 2^-9)

_ERR_IO = -1
_ERR_CORRUPT = -3
_ERR_INVALID = -7
_ERR_STATE = -9
_ERR_UNSUPPORTED = -13


def _spec(pol):
    """The spec of a results.json policy from its effective options (what the replay ran), or
    None when an option cannot be written in a spec (a value holding ',')."""
    parts = []
    for k, v in (pol.get("options") or {}).items():
        if v is None:
            continue
        v = ("1" if v else "0") if isinstance(v, bool) else repr(v) if isinstance(v, float) \
            else str(v)
        if "," in v:
            return None
        parts.append("%s=%s" % (k, v))
    return pol["name"] + (":" + ",".join(parts) if parts else "")


class _Groups1:
    """The attention module as the registry function sees it, with num_key_value_groups 1: the
    keys and values it is handed are already one per query head (merged ones substituted)."""

    num_key_value_groups = 1

    def __init__(self, module):
        self.__dict__["_module"] = module

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _fail(msg, status=_ERR_INVALID):
    return TraceError(status, "kvtrace.hf.e2e: " + msg)


def _num(x):
    """A finite float, else None (JSON null), as e2e-llama2c writes NaN and Inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dec12(x):
    return float("%.12f" % x)


def _ranks(x):
    """Average ranks (1-based); values equal to 12 decimal places tie (e2e-llama2c's rule)."""
    q = [_dec12(v) for v in x]
    return [sum(b < a for b in q) + (sum(b == a for b in q) + 1) / 2.0 for a in q]


def spearman(x, y):
    """Spearman's rho of two equal-length sequences: Pearson's correlation of their average
    ranks; None below three values or when either side is constant."""
    n = len(x)
    if n < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx = sum(r / n for r in rx)
    my = sum(r / n for r in ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx > 0 and syy > 0:
        return sxy / math.sqrt(sxx * syy)
    return None


def _load_results(path):
    try:
        with open(path, "rb") as f:
            res = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise _fail("cannot read %s: %s" % (path, e.strerror or e), _ERR_IO) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail("%s is not a results.json (not valid JSON: %s)" % (path, e),
                    _ERR_CORRUPT) from None
    ok = isinstance(res, dict) and res.get("results_version") == 1
    st = res.get("settings") if ok else None
    ok = ok and isinstance(st, dict) and isinstance(st.get("policies"), list) and \
        isinstance(st.get("budgets"), list) and isinstance(res.get("traces"), list) and \
        len(res["traces"]) > 0 and st["policies"] and st["budgets"]
    if not ok:
        raise _fail("%s is not a results.json of kvtrace replay (results_version 1 with "
                    "settings, traces)" % path, _ERR_CORRUPT)
    if res.get("shard") is not None:
        raise _fail("%s is one part of a sharded replay (replay --shard): merge the parts "
                    "with kvtrace merge first" % path)
    n_runs = len(st["policies"]) * len(st["budgets"])
    agg = res.get("aggregate")
    for t, tr in enumerate(res["traces"]):
        runs = tr.get("runs") if isinstance(tr, dict) else None
        if not isinstance(runs, list) or len(runs) != n_runs or not isinstance(
                tr.get("path"), str) or not isinstance(tr.get("n_tokens"), int):
            raise _fail("%s: traces[%d] lacks its path, n_tokens or one run per (policy, "
                        "budget)" % (path, t), _ERR_CORRUPT)
    if not isinstance(agg, list) or len(agg) != n_runs:
        raise _fail("%s has no aggregate of one entry per (policy, budget)" % path,
                    _ERR_CORRUPT)
    return res


def _summary(run, key):
    s = run.get("summary") if isinstance(run, dict) else None
    return s.get(key) if isinstance(s, dict) else None


def _same_replay(res, sel, rpath):
    st = res["settings"]
    labels = [p.get("label") for p in st["policies"]]
    budgets = [b.get("text") for b in st["budgets"]]
    paths = [t["path"] for t in res["traces"]]
    if sel.shard is not None:
        raise _fail("%s is one part of a sharded replay's selection export: merge the parts "
                    "with kvtrace merge first" % sel.path)
    for what, a, b in (("policies", [p["label"] for p in sel.policies], labels),
                       ("budgets", sel.budgets, budgets), ("traces", sel.traces, paths)):
        if a != b:
            raise _fail("%s and %s are not from one replay: the export's %s are %s, the "
                        "results' %s" % (sel.path, rpath, what, a, b))


def _write_atomic(path, text, force):
    if os.path.exists(path) and not force:
        raise _fail("%s exists (pass force=True to overwrite it)" % path, _ERR_IO)
    if os.path.exists(path) and not os.path.isfile(path):
        raise _fail("%s exists and is not a regular file: refusing to replace it" % path,
                    _ERR_IO)
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _fail("cannot write %s: %s" % (path, e.strerror or e), _ERR_IO) from None


class _Run(object):
    """What one (policy, budget) did on one trace."""

    def __init__(self, applied, kl_steps=None, top1=None, nll=None, why=None):
        self.applied, self.why = applied, why
        self.kl_steps = kl_steps  # [G] float
        self.kl_mean = sum(kl_steps) / len(kl_steps) if applied else None
        self.kl_max = max(kl_steps) if applied else None
        self.top1, self.nll = top1, nll


def e2e(model, results, selection, out=None, *, traces=None, prompt_inputs=None,
        force=False, max_merged_bytes=1 << 30, max_decode_bytes=1 << 30):
    """The end-to-end check of a replay's proxies on a transformers model: e2e.json as
    `kvtrace e2e-llama2c` writes it (analysis/RESULTS.md, "End-to-end check").

    results: the results.json of `kvtrace replay` and selection: its `--export-selection`
    file (a path or an open kvtrace.Selection), both from one replay of traces captured from
    this model with decode steps (kvtrace.capture(..., decode=G)). traces: the trace paths
    to use in place of the results' (moved files; each must have the fingerprint the results
    name). prompt_inputs: per trace, a dict of keyword arguments for the prompt's forward call
    in place of input_ids alone (a vision-language prompt's pixel_values and image_grid_thw,
    with its input_ids, which must be the trace's token ids). out: where to write e2e.json
    (force=True to overwrite it); None writes nothing.

    For each trace the prompt runs uncompressed, then its decode steps again, fed the trace's
    decode tokens, once with the whole cache and once per (policy, budget) with every layer's
    and head's attention masked to the prompt tokens its kept set holds (a per-step policy's
    set of that step) and the decode tokens (a decoding= policy's: its cache at that step);
    the next-token distributions give the KL
    divergence from the uncompressed run, top-1 agreement and the reference token's log-loss.
    A merged policy (lookm, elastic-cache, cam, lightkv-like, merge=, think=) is replayed again here
    (kvt_replay_sets, from its effective options in the results), its kept sets checked
    against the export's, and its merged keys and values handed to the attention in place of
    the cached ones of the entries they replace, per query head (heads=query too); the cache
    itself is left as it is. max_merged_bytes bounds the host memory those sets take: the
    budgets are replayed together while their sets' estimate (every layer's and head's kept
    entries with merged keys and values, as if all were merged) stays under it, else in
    groups of consecutive budgets, a budget over it alone (the same sets, more replays).
    max_decode_bytes bounds what one forward call of decode steps takes on the model's
    device: the G steps run in calls of n steps (teacher forcing, the cache growing), n the
    most (at least 1) whose estimate fits, n x (Hq x (T + G) x 13 bytes: the attention's mask,
    as bools and floats, and its scores and weights in float32; + vocabulary x 32 bytes: the
    logits and their log-probabilities, three of them in float64); the reference's logits are
    kept whole on the host (G x vocabulary float32), a call's copied to the device when a
    setting's are compared with them. The measures are each step's, so only rounding differs
    with n. Needs attn_implementation="sdpa" (the
    mask is handed to the model's attention function), batch size 1, a dynamic cache that
    holds every token (no sliding-window cache). Returns the e2e.json contents as a dict."""
    import torch

    from . import hf

    for name, v in (("max_merged_bytes", max_merged_bytes),
                    ("max_decode_bytes", max_decode_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _fail("%s=%r: a positive number of bytes is needed" % (name, v))
    rpath = os.fsdecode(path_arg(results)[0])
    res = _load_results(rpath)
    own_sel = not isinstance(selection, Selection)
    sel = Selection(selection) if own_sel else selection
    opened = []
    try:
        _same_replay(res, sel, rpath)
        st = res["settings"]
        n_pol, n_b = len(st["policies"]), len(st["budgets"])
        rtr = res["traces"]
        paths = [t["path"] for t in rtr] if traces is None else [
            os.fsdecode(path_arg(p)[0]) for p in traces]
        if len(paths) != len(rtr):
            raise _fail("%d traces given, the results hold %d" % (len(paths), len(rtr)))
        if prompt_inputs is not None and len(prompt_inputs) != len(paths):
            raise _fail("prompt_inputs holds %d entries, one per trace (%d) is needed"
                        % (len(prompt_inputs), len(paths)))
        for p in [out] if out is not None else []:  # refused before the model runs
            p = os.fsdecode(path_arg(p)[0])
            for other in [rpath, sel.path] + paths:
                if os.path.exists(p) and os.path.exists(other) and os.path.samefile(p, other):
                    raise _fail("out %s is an input (%s)" % (p, other))
            if os.path.exists(p) and not force:
                raise _fail("%s exists (pass force=True to overwrite it)" % p, _ERR_IO)
            if not os.path.isdir(os.path.dirname(os.path.abspath(p))):
                raise _fail("cannot write %s: its directory does not exist" % p, _ERR_IO)
        cap = hf.Capture(model, os.devnull)  # the model checks and the attention registry
        if cap.attn_implementation != "sdpa":
            raise _fail("the model uses attn_implementation=%r, which takes no per-head 4-D "
                        "attention mask: load it with attn_implementation=\"sdpa\""
                        % (cap.attn_implementation,), _ERR_UNSUPPORTED)
        L, Hq, Hkv, D = cap.n_layers, cap.n_q_heads, cap.n_kv_heads, cap.head_dim
        group = Hq // Hkv
        dev = next(model.parameters()).device
        trs = []
        for t, p in enumerate(paths):
            if traces is None and not os.path.exists(p):
                raise _fail("%s (traces[%d] of %s) does not exist: the results name the trace as "
                            "replay was given it; pass traces=[...] with its path from here"
                            % (p, t, rpath), _ERR_IO)
            tr = Trace(p)
            opened.append(tr)
            trs.append(tr)
            fp = rtr[t].get("fingerprint")
            if isinstance(fp, str) and tr.fingerprint != fp:
                raise _fail("%s is not the trace %s was replayed on as traces[%d] (fingerprint "
                            "%s, the results' %s)" % (p, rpath, t, tr.fingerprint, fp))
            m = tr.header.get("model") if isinstance(tr.header.get("model"), dict) else {}
            got = tuple(m.get(k) for k in ("n_layers", "n_q_heads", "n_kv_heads", "head_dim"))
            if got != (L, Hq, Hkv, D):
                raise _fail("%s is another model (L=%s Hq=%s Hkv=%s D=%s) than this one (L=%d "
                            "Hq=%d Hkv=%d D=%d): give the model the trace was captured from"
                            % ((p,) + got + (L, Hq, Hkv, D)))

        state = {"mode": None, "calls": 0, "k0": None, "T": 0, "g0": 0, "mask": None,
                 "merge": None}
        layer_of, slot, impl = cap._layer_of, cap._slot, cap.attn_implementation
        orig = slot[impl]

        def combine(am, keep, q, k):
            """The mask of the decode steps g0.. (this call's nq queries) over the prompt and
            the decode tokens so far, keep [Hq, nq or 1, T or T + G] the kept sets'."""
            T, g0, nq, nk = state["T"], state["g0"], q.shape[-2], k.shape[-2]
            if nk != T + g0 + nq:
                raise _fail("a layer attends to %d keys, not the prompt's %d and the %d decode "
                            "tokens: a cache that does not hold every token (sliding window) "
                            "cannot be masked" % (nk, T, g0 + nq), _ERR_UNSUPPORTED)
            keep = keep.to(q.device)
            allowed = torch.ones((Hq, nq, nk), dtype=torch.bool, device=q.device)
            allowed[:, :, :T] = keep[..., :T]
            allowed[:, :, T:] = torch.ones(nq, g0 + nq, dtype=torch.bool,
                                           device=q.device).tril(diagonal=g0)
            if keep.shape[-1] > T:  # decoding=: each step's cache holds some decode tokens
                allowed[:, :, T:] &= keep[..., T:T + g0 + nq]
            allowed = allowed[None]
            if am is None:
                return allowed
            am = am[..., :nk]
            if am.dtype == torch.bool:
                return am & allowed
            return torch.where(allowed, am, torch.full((), torch.finfo(am.dtype).min,
                                                       dtype=am.dtype, device=am.device))

        def substitute(x, sub, which):
            """x [B, Hkv, S, D] repeated to [B, Hq, S, D], then each query head's merged
            entries (sub[h] = (positions, keys, values)) written over their prompt rows."""
            x = x.repeat_interleave(group, dim=1)
            for h, (pos, kv) in enumerate(sub):
                if pos is not None:
                    x[:, h, pos.to(x.device)] = kv[which].to(device=x.device, dtype=x.dtype)
            return x

        @functools.wraps(orig)
        def e2e_attention(module, *args, **kwargs):
            layer = layer_of.get(id(module))
            if layer is not None and state["mode"] is not None:
                args = list(args)
                qk = args[:2] + [kwargs.get(n) for n in ("query", "key")[len(args[:2]):]]
                if state["mode"] == "prompt":
                    if layer == 0:
                        state["k0"] = qk[1][0].detach().float().cpu().numpy()
                else:
                    pos = 3 if len(args) > 3 else None
                    am = args[3] if pos else kwargs.get("attention_mask")
                    am = combine(am, state["mask"](layer), qk[0], qk[1])
                    if pos:
                        args[3] = am
                    else:
                        kwargs["attention_mask"] = am
                    sub = state["merge"](layer) if state["merge"] is not None else None
                    if sub is not None:  # one key and value per query head, merged ones in
                        for i, name in ((1, "key"), (2, "value")):
                            x = args[i] if len(args) > i else kwargs[name]
                            x = substitute(x, sub, i - 1)
                            if len(args) > i:
                                args[i] = x
                            else:
                                kwargs[name] = x
                        module = _Groups1(module)
                state["calls"] += 1
            return orig(module, *args, **kwargs)

        def forward(what, **kw):
            state["calls"] = 0
            o = model(use_cache=True, **kw)
            if state["calls"] != L:
                raise _fail("%s: %d of %d text attention layers called the registry entry %r"
                            % (what, state["calls"], L, impl), _ERR_STATE)
            return o

        # what every trace's run shares
        run = types.SimpleNamespace(torch=torch, model=model, cap=cap, sel=sel, st=st,
                                    state=state, forward=forward, dev=dev, group=group,
                                    max_merged_bytes=max_merged_bytes,
                                    max_decode_bytes=max_decode_bytes)
        per_trace = []
        slot[impl] = e2e_attention
        try:
            with torch.no_grad():
                for t, tr in enumerate(trs):
                    per_trace.append(_run_trace(
                        run, tr, rtr[t], t, None if prompt_inputs is None else prompt_inputs[t]))
        finally:
            state["mode"] = None
            if slot.get(impl) is e2e_attention:
                slot[impl] = orig
        doc = _document(res, per_trace, cap, paths, n_pol, n_b, model)
    finally:
        for tr in opened:
            tr.close()
        if own_sel:
            sel.close()
    if out is not None:
        _write_atomic(os.fsdecode(path_arg(out)[0]), json.dumps(doc, indent="\t") + "\n",
                      force)
    return doc


def _run_trace(run, tr, rt, t, extra):
    """One trace (index t, results' entry rt, prompt_inputs entry extra): the uncompressed
    prompt, the reference decode and every setting's. run holds what the traces share."""
    from . import hf
    torch, model, cap, sel, st = run.torch, run.model, run.cap, run.sel, run.st
    state, forward, dev, group = run.state, run.forward, run.dev, run.group
    path = tr.path if isinstance(tr.path, str) else os.fsdecode(tr.path)
    T = int(tr.header.get("n_tokens", -1))
    tok = tr.tokens
    ids, dec = tok["token_ids"], tok["decode_token_ids"]
    if ids is None or len(ids) != T:
        raise _fail("%s has no token_ids table of its %d prompt tokens" % (path, T))
    G = int(rt.get("n_decode") or 0)
    if G == 0 and tr.has("Q_decode", 0):  # cut short: no proxies, layer 0's steps rerun
        G = int(tr.shape("Q_decode", 0)[1])
    if dec is not None:
        G = min(G, len(dec))
    if G < 1:
        raise _fail("%s has no decode steps: the end-to-end check reruns them (capture with "
                    "decode=G)" % path, _ERR_STATE)
    if dec is None:
        raise _fail("%s has no decode_token_ids table: the end-to-end check feeds the decode "
                    "steps the tokens they were captured with (kvtrace.capture records them)"
                    % path, _ERR_STATE)
    # a VL model may keep it in its text config only (LLaVA in newer transformers)
    V = int(hf._cfg_get(model.config, "vocab_size") or 0) or None
    allids = np.concatenate([ids, dec[:G]]).astype(np.int64)
    if V is not None and (allids.min() < 0 or allids.max() >= V):
        bad = int(np.nonzero((allids < 0) | (allids >= V))[0][0])
        raise _fail("%s: token id %d at position %d is outside the model's vocabulary of %d"
                    % (path, int(allids[bad]), bad, V))
    kw = dict(extra) if extra is not None else {}
    if "input_ids" in kw:
        given = np.asarray(kw["input_ids"].detach().cpu() if hasattr(kw["input_ids"], "detach")
                           else kw["input_ids"]).reshape(-1)
        if given.shape != ids.shape or not np.array_equal(given, ids):
            raise _fail("prompt_inputs[%d]'s input_ids are not %s's %d prompt tokens"
                        % (t, path, T))
    kw["input_ids"] = torch.as_tensor(ids.astype(np.int64))[None].to(dev)
    for k, v in hf._last_logits_only(model).items():  # the prompt's logits are not read
        kw.setdefault(k, v)
    state.update(mode="prompt", T=T, k0=None)
    o = forward("the prompt of " + path, **kw)
    cache = o.past_key_values
    if cache is None:
        raise _fail("the model returned no KV cache (use_cache)", _ERR_STATE)
    k0 = state["k0"]
    kref = tr.read("K", layer=0, dtype="float32")
    if k0 is None or k0.shape != kref.shape:
        raise _fail("%s: layer 0's keys [%s] are not the model's %s" % (
            path, ",".join(map(str, kref.shape)), None if k0 is None else list(k0.shape)))
    kscale = float(np.abs(k0).max())
    kerr = float(np.abs(kref.astype(np.float64) - k0).max())
    kerr = kerr / kscale if kscale > 0 else kerr
    if not kerr <= KEY_TOLERANCE:
        raise _fail("%s was not captured from this model over its own tokens: layer 0's keys "
                    "differ by %.3g of their scale" % (path, kerr))
    dec_t = torch.as_tensor(dec[:G].astype(np.int64))[None].to(dev)
    Hq, L_ = cap.n_q_heads, cap.n_layers
    # steps per forward call: the mask (bools and floats), scores and weights, and logits
    step_bytes = Hq * (T + G) * 13 + (V or 0) * 32
    n_call = max(1, min(G, run.max_decode_bytes // step_bytes))

    def decode(mask, merge, take):
        """The decode steps with mask(layer, g0, n) (and merge) in calls of n_call steps;
        take(g0, logits [n, V] float32) gets each call's logits."""
        try:
            for g0 in range(0, G, n_call):
                n = min(n_call, G - g0)
                state.update(mode="decode", g0=g0, merge=merge,
                             mask=lambda layer, g0=g0, n=n: mask(layer, g0, n))
                try:
                    lg = forward("the decode steps of " + path, input_ids=dec_t[:, g0:g0 + n],
                                 past_key_values=cache).logits[0, -n:]
                finally:
                    state.update(mode=None, merge=None, g0=0)
                bad = ~torch.isfinite(lg)
                if bool(bad.any()):
                    g = g0 + int(bad.any(dim=-1).nonzero()[0, 0])
                    raise _fail("%s: the model's logits at decode step %d are not finite (NaN "
                                "or Inf): no KL can be measured" % (path, g), _ERR_STATE)
                take(g0, lg.float())
        finally:
            hf._crop_cache(cache, T)

    everything = torch.ones((Hq, 1, T), dtype=torch.bool)
    ref_parts, lg_dev = [], []  # the reference's logits on the host; where the model gives them

    def keep_ref(g0, lg):
        ref_parts.append(lg.cpu())  # (only a call's go back to the device)
        lg_dev[:] = [lg.device]

    decode(lambda layer, g0, n: everything, None, keep_ref)
    ref_logits = torch.cat(ref_parts) if len(ref_parts) > 1 else ref_parts[0]
    ref_parts.clear()
    ref = ref_logits.argmax(dim=-1)
    nll_full, d = 0.0, lg_dev[0]
    for g0 in range(0, G, n_call):  # (one call: the whole G at once, as the settings' are)
        lp_ref = torch.log_softmax(ref_logits[g0:g0 + n_call].to(d).double(), dim=-1)
        nll_full += float((-lp_ref[torch.arange(lp_ref.shape[0], device=d),
                                   ref[g0:g0 + n_call].to(d)]).sum())
    nll_full /= G
    del lp_ref
    runs = []
    for p, pol in enumerate(st["policies"]):
        merged = bool(pol.get("merged"))
        per_step = bool(pol.get("per_step"))
        # a policy whose caches evict decode tokens too (decoding=, dms_decoding=1, h2o-greedy
        # decode=1, rkv): its step sets hold decode tokens (T + s; step 0's holds its own T)
        width = T
        if per_step and G > 0 and not merged:
            k0 = sel.kept(p, 0, 0, 0, trace=t, step=0)
            width = T + G if k0.size and k0[-1] >= T else T
        qheads = sel.policies[p]["query_heads"]
        groups = [range(len(st["budgets"]))]
        if merged:
            spec = _spec(pol)
            if spec is None:
                why = ("an option of the merged policy %s cannot be written in a spec to "
                       "replay it again here for its merged keys and values" % pol.get("label"))
                runs += [_Run(False, why=why) for _ in st["budgets"]]
                continue
            groups = _budget_groups(st["budgets"], T, L_, Hq if qheads else Hq // group,
                                    cap.head_dim, run.max_merged_bytes)
        for grp in groups:
            sets = None
            if merged:
                sets = _merged_sets(path, spec, st["budgets"], grp, st.get("seed", 0), sel, p,
                                    t, T, L_, pol.get("label"))
            runs += _run_budgets(run, decode, sel, p, grp, sets, t, T, G, per_step, width, qheads,
                                 (ref_logits, ref, n_call))
    return {"path": path, "fingerprint": tr.fingerprint, "T": T, "G": G, "kerr": kerr,
            "vocab": int(ref_logits.shape[-1]),
            "nll_full": nll_full, "runs": runs, "rt": rt}


def _run_budgets(run, decode, sel, p, grp, sets, t, T, G, per_step, width, qheads, refs):
    """Policy p's decode at each budget of grp (indices into the settings' budgets), with its
    merged sets where sets is not None: a _Run each. refs: the reference's logits [G, V]
    (float32, on the host), its tokens [G] and the steps per decode call."""
    torch, group, Hq = run.torch, run.group, run.cap.n_q_heads
    ref_logits, ref, n_call = refs
    runs = []
    for b in grp:
        def mask(layer, g0, n, b=b):
            if per_step:  # each step's set: width T, or T + G with decode tokens in it
                m = np.stack([sel.mask(p, b, layer, width, trace=t, step=g)
                              for g in range(g0, g0 + n)], axis=1)
            else:
                m = sel.mask(p, b, layer, T, trace=t)[:, None]
            if not qheads:
                m = np.repeat(m, group, axis=0)
            return torch.from_numpy(m)

        merge = None
        if sets is not None:
            def merge(layer, b=b):
                return _substitution(torch, sets, b, layer, Hq, group, qheads)

        kl_steps, hits, nll = [], 0, 0.0

        def take(g0, lg):  # each step's KL from the reference, top-1 and log-loss
            nonlocal hits, nll
            n = lg.shape[0]
            lp_ref = torch.log_softmax(ref_logits[g0:g0 + n].to(lg.device).double(), dim=-1)
            lp = torch.log_softmax(lg.double(), dim=-1)
            kl = (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1).clamp(min=0.0)
            kl_steps.extend(float(x) for x in kl.cpu())
            r = ref[g0:g0 + n].to(lg.device)
            hits += int((lg.argmax(dim=-1) == r).sum())
            nll += float((-lp[torch.arange(n, device=lp.device), r]).sum())

        decode(mask, merge, take)
        runs.append(_Run(True, kl_steps, hits / G, nll / G))
    return runs


def _budget_groups(budgets, T, L, H, D, cap_bytes):
    """The settings' budgets as groups of consecutive indices whose merged sets, as
    _merged_sets holds them, take at most cap_bytes together by estimate (L layers x H
    selection heads of n kept entries each: the index, the changed flag, merged keys and
    values for every entry, and the object); a budget over it is a group alone."""
    groups, cur, used = [], [], 0
    for b, bud in enumerate(budgets):
        v = float(bud.get("value") or 0)
        n = math.ceil(v * T) if bud.get("kind") == "fraction" else int(v)
        n = max(0, min(T, n))
        est = L * H * (n * (4 + 1 + 8 * D) + 512)
        if cur and used + est > cap_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(b)
        used += est
    return groups + [cur] if cur else groups


def _merged_sets(path, spec, budgets, grp, seed, sel, p, t, T, L, label):
    """A merged policy's kept sets at the budgets grp (indices into the settings' budgets)
    with their merged keys and values, replayed again on the trace (kvt_replay_sets), each
    checked against the export's set of the same (budget, layer, head):
    {(budget, layer, head): KeptSet}, budget an index into the settings' budgets."""
    from ._replay_sets import replay_sets
    texts = ",".join(budgets[b].get("text") for b in grp)
    try:
        got = replay_sets(path, spec, texts, int(seed or 0))
    except TraceError as e:
        raise _fail("%s: replaying the merged policy %s again for its merged keys and values "
                    "failed: %s" % (path, label, e), e.status)
    sets = {}
    for (_, b, layer, head, step), ks in got.items():
        if step >= 0:
            raise _fail("%s: the merged policy %s keeps a set per decode step, which this "
                        "check does not apply" % (path, label), _ERR_UNSUPPORTED)
        sets[(grp[b], layer, head)] = ks
    masks = {}  # (budget, layer): the export's [heads, T], read once for all its heads
    for (b, layer, head), ks in sets.items():
        if (b, layer) not in masks:
            masks[(b, layer)] = sel.mask(p, b, layer, T, trace=t)
        want = masks[(b, layer)][head]
        mine = np.zeros(T, dtype=bool)
        mine[ks.idx] = True
        if not np.array_equal(mine, want):
            raise _fail("%s: the merged policy %s replayed again here keeps another set than "
                        "the export at budget %d, layer %d, head %d (a file its options name "
                        "changed, or another build of kvtrace?)" % (path, label, b, layer, head),
                        _ERR_STATE)
    pairs, n_b = len({(b, la) for b, la, _ in sets}), len(grp)
    if pairs != n_b * L:
        raise _fail("%s: the merged policy %s replayed again here gave sets of %d (budget, "
                    "layer) pairs, not %d" % (path, label, pairs, n_b * L), _ERR_STATE)
    return sets


def _substitution(torch, sets, b, layer, Hq, group, qheads):
    """Per query head (positions, (keys, values)) of its merged entries at budget b in the
    layer, or None when no head has one."""
    sub, any_ = [(None, None)] * Hq, False
    for h in range(Hq):
        ks = sets.get((b, layer, h if qheads else h // group))
        if ks is None or ks.changed is None or not ks.changed.any():
            continue
        pos = torch.from_numpy(ks.idx[ks.changed].astype(np.int64))
        sub[h] = (pos, (torch.from_numpy(ks.k), torch.from_numpy(ks.v)))
        any_ = True
    return sub if any_ else None


def _document(res, per_trace, cap, paths, n_pol, n_b, model):
    """e2e.json's contents, field for field as e2e-llama2c writes them."""
    st = res["settings"]
    n_tr = len(per_trace)
    tv = cap.info.get("transformers_version")
    doc = {"e2e_version": E2E_VERSION,
           "generator": "kvtrace " + _lib.lib().kvt_version_string().decode(),
           "model": cap.name,
           "vocab_size": per_trace[0]["vocab"],  # the logits' own width
           "engine": {"name": "transformers", "version": tv,
                      "attn_implementation": cap.attn_implementation,
                      "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                      "device": str(next(model.parameters()).device)},
           "traces": [], "runs": []}
    for et, path in zip(per_trace, paths):
        doc["traces"].append({"path": path, "fingerprint": et["fingerprint"],
                              "n_prompt": et["T"], "n_decode": et["G"],
                              "trace_key_error": _num(et["kerr"]),
                              "nll_uncompressed": _num(et["nll_full"])})
    e_x, e_kl, r_x, r_kl = [], [], [], []
    for p in range(n_pol):
        pol = st["policies"][p]
        for b in range(n_b):
            i = p * n_b + b
            agg = res["aggregate"][i]
            rs = [et["runs"][i] for et in per_trace]
            applied = rs[0].applied
            if applied and n_tr == 1:
                kl, kl_max, top1, nll = rs[0].kl_mean, rs[0].kl_max, rs[0].top1, rs[0].nll
            elif applied:
                kl = sum(r.kl_mean / n_tr for r in rs)
                top1 = sum(r.top1 / n_tr for r in rs)
                nll = sum(r.nll / n_tr for r in rs)
                kl_max = max(r.kl_max for r in rs)
            else:
                kl = kl_max = top1 = nll = None
            run0 = per_trace[0]["rt"]["runs"][i]
            o = {"policy": pol.get("label"), "name": pol.get("name"),
                 "budget": st["budgets"][b].get("text"),
                 "budget_tokens": run0.get("budget_tokens"),
                 "kept_fraction": _num(_summary(agg, "kept_fraction")),
                 "applied": applied}
            if not applied:
                o["why"] = rs[0].why
            o.update({"kl_mean": _num(kl), "kl_max": _num(kl_max),
                      "top1_agreement": _num(top1), "nll_mean": _num(nll),
                      "proxy": {k: _num(_summary(agg, k)) for k in (
                          "err_decode", "recall_decode", "err_window", "recall_window")},
                      "per_trace": []})
            for et, r in zip(per_trace, rs):
                tr_run = et["rt"]["runs"][i]
                o["per_trace"].append({
                    "budget_tokens": tr_run.get("budget_tokens"),
                    "kl_mean": _num(r.kl_mean), "kl_max": _num(r.kl_max),
                    "top1_agreement": _num(r.top1), "nll_mean": _num(r.nll),
                    "kl_steps": [_num(x) for x in r.kl_steps] if r.applied else [],
                    "proxy": {k: _num(_summary(tr_run, k)) for k in ("err_decode",
                                                                     "recall_decode")}})
            doc["runs"].append(o)
            ed, rd = o["proxy"]["err_decode"], o["proxy"]["recall_decode"]
            if applied and ed is not None:
                e_x.append(ed)
                e_kl.append(kl)
            if applied and rd is not None:
                r_x.append(1.0 - rd)
                r_kl.append(kl)
    doc["spearman"] = {"err_decode_vs_kl": _num(spearman(e_x, e_kl)),
                       "missed_recall_decode_vs_kl": _num(spearman(r_x, r_kl)),
                       "n_settings": len(e_x)}
    return doc
