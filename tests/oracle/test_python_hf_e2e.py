#!/usr/bin/env python3
"""test_python_hf_e2e.py - kvtrace.hf.e2e, the end-to-end check of a replay's proxies on a
transformers model, against `kvtrace e2e-llama2c` on the built-in C engine.

stories260K runs in both: as a llama2.c checkpoint in the C engine, and converted to a HF
LlamaForCausalLM (python/kvtrace/llama2c_hf.py; the real transformers when it imports, else
the stand-in in tests/oracle/hf_standin). HF's keys hold the llama2.c channels reordered
(hf_channel_order), so each C-engine trace is copied with its K and query channels reordered
that way (the HF model's own keys, which hf.e2e compares with the trace's): every policy's
kept sets on the copy are checked to be the original's, record for record. Then:
  * the bundled trace (T = 448, 64 decode steps; 23 policies with per-step, per-query-head
    and merged ones (lookm, elastic-cache, cam, snapkv:merge=weighted per query head,
    h2o:think=0.25 with its pruned key channels; adakv with layer_weights=; keydiff with each
    chunk of chunk_length= scored on its own; knorm:decoding=16, knorm with dms_decoding=1,
    tova:decoding=1,prefill=1 (TOVA's own eviction, one cache per layer),
    expected-attention:decoding=8 and rkv:interval=16 (R-KV, compressing at 4 decode steps),
    whose caches evict decode tokens too), 3
    budgets): every setting's KL (mean, max, each step), top-1 agreement and log-loss equal
    e2e-llama2c's within float32 rounding (two engines, two summation orders), the proxies,
    kept fractions and budget tokens exactly; `full` has KL exactly 0 and top-1 1; the merged
    policies run with their merged keys and values (replayed again in-process, kvt_replay_sets)
    and land where e2e-llama2c's do; Spearman's rho is that of an independent NumPy rank
    correlation over the settings; `kvtrace report --e2e` plots the file and names the engine
    that ran it, and refuses an engine or a why of the wrong type; a merged policy whose
    replay here keeps another set than the export's is refused;
  * two traces (the bundled one and a bf16 capture of another prompt): the runs' means, the
    largest KL and each trace's own measures equal e2e-llama2c's on the originals; the same
    with a model that hands its attention no mask (the stand-in's mask builder replaced), so
    that hf.e2e's mask alone, decode causality included, masks it;
  * h2o-greedy with decode=1 (its caches evict decode tokens; a capture with Q_all), per KV
    and per query head: the same step sets on the channel-reordered copy, and every run as
    e2e-llama2c's;
  * a vision-language prompt end to end: kvtrace.capture of the HF model with its config
    naming one token id the image token (64 of them in the prompt, 48 text tokens after),
    vl-cache replayed on it (unlike layer counts) and aircache-like (the text kept, the image
    tokens shared unevenly at 80), both run by hf.e2e;
  * the prompt's forward call computes the last position's logits only (logits_to_keep=1),
    as do kvzip_scores' calls; the decode steps' call all G;
  * max_decode_bytes: the decode steps in calls of 5, 7 or 13 steps, or one (the calls' sizes
    as the bound gives them, the cache growing between calls): the same runs within rounding
    on both cases above (decode-time caches, per-step and merged policies among them), also
    with a model that hands its attention no mask (hf.e2e's causal mask over the cache so
    far); a bound that is not a positive integer refused;
  * refusals, each one message, with the attention registry restored after: a selection
    export of another replay, a trace moved since the replay (then given with traces=, the
    same runs), a trace that is not the one replayed (fingerprint), a trace of
    another model's shape, a trace captured from another model (its keys), a trace without
    decode steps or without their token ids, a sharded part, an existing out without force (before the model runs), out
    naming an input, out in a missing directory, a full disk (the old out kept, no temporary
    file left), logits that are not finite (a NaN weight), a cache that lost a token, an
    attention implementation other than sdpa, prompt_inputs of other tokens.
Environment: KVT_SOURCE_ROOT, KVT_LIB, KVT_BIN; KVT_TEST_DEVICE (default cpu; the GPU
session's scripts/gpu_session.sh runs it with cuda and the real transformers). Exit 0 pass, 1 fail, 77 not run (no NumPy,
torch or the CLI)."""
import json
import os
import sys
import tempfile

from cli_test import ROOT, check, finish, need_library, raises, run

import numpy as np

try:
    import torch
except ImportError:
    print("SKIP: torch is not installed for " + sys.executable)
    sys.exit(77)
try:
    import transformers  # noqa: F401
    STANDIN = False
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "tests", "oracle", "hf_standin"))
    STANDIN = True

kvtrace = need_library()
from kvtrace import hf, llama2c_hf  # noqa: E402

MODEL = os.path.join(ROOT, "models", "stories260K.bin")
SAMPLE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
POLICIES = ("full,streamingllm,snapkv,pyramidkv,adakv,knorm,h2o,random,quest,hybridkv-like,"
            "snapkv:heads=query,label=snapkv-q,lookm,elastic-cache,cam,"
            "snapkv:merge=weighted,heads=query,label=snapkv-wq,h2o:think=0.25,label=h2o-think")
BUDGETS = "48,96,25%"
CHANNEL_KINDS = ("K", "Q_window", "Q_decode", "K_decode", "Q_all")


def hf_order_copy(src, dst, drop=()):
    """src with its K and query channels in HF's order (and the header saying rotate_half),
    without the record kinds in `drop`."""
    with kvtrace.open(src) as t:
        hdr = json.loads(json.dumps(t.header))
        order = llama2c_hf.hf_channel_order(hdr["model"]["head_dim"])
        hdr["model"]["rope"]["pairs"] = "half"
        with kvtrace.TraceWriter(dst, hdr) as w:
            for i, r in enumerate(t.records):
                if r["kind"] in drop:
                    continue
                x = t.read_record(i)
                if r["kind"] in CHANNEL_KINDS:
                    x = np.ascontiguousarray(x[..., order])
                at = {} if r["layer"] < 0 else {"layer": r["layer"]}
                w.append(r["kind"], x, head_begin=r["head_begin"], tok_begin=r["tok_begin"], **at)
    return dst


def same_selections(a, b, what):
    with kvtrace.read_selection(a) as x, kvtrace.read_selection(b) as y:
        ra, rb = list(x.records()), list(y.records())
    key = ("trace", "policy", "budget", "layer", "head", "step")
    bad = sum(1 for p, q in zip(ra, rb) if any(p[k] != q[k] for k in key) or
              not np.array_equal(p["kept"], q["kept"]))
    check(len(ra) == len(rb) and len(ra) > 0 and bad == 0,
          "%s: the HF-order copy's kept sets are the original's (%d/%d records, %d differ)"
          % (what, len(ra), len(rb), bad))


def close(a, b, rel=2e-4, abs_=2e-6):
    return a is not None and b is not None and abs(a - b) <= abs_ + rel * abs(b)


def same(p, q):
    """Two proxy dicts equal to 1e-12 (null where the other is null)."""
    return p.keys() == q.keys() and all(
        (p[k] is None) == (q[k] is None) and (p[k] is None or close(p[k], q[k], 1e-12, 1e-15))
        for k in p)


def from_results(d, res):
    """hf.e2e's proxies, kept fractions and budget tokens are the results.json's, exactly."""
    with open(res) as f:
        r = json.load(f)
    ok = len(d["runs"]) == len(r["aggregate"])
    for run_, agg in zip(d["runs"], r["aggregate"]):
        s = agg["summary"]
        ok = ok and run_["kept_fraction"] == s["kept_fraction"] and all(
            run_["proxy"][k] == s.get(k) for k in run_["proxy"])
        for t, pt in enumerate(run_["per_trace"]):
            tr = r["traces"][t]["runs"][d["runs"].index(run_)]
            ok = ok and pt["budget_tokens"] == tr["budget_tokens"] and all(
                pt["proxy"][k] == tr["summary"].get(k) for k in pt["proxy"])
    return ok


def compare_run(h, c, what):
    """One e2e.json run of hf.e2e against e2e-llama2c's."""
    ok = (h["policy"], h["name"], h["budget"], h["budget_tokens"]) == (
        c["policy"], c["name"], c["budget"], c["budget_tokens"])
    # the replays of two traces, whose channels differ in order: the proxies agree to the
    # last bits (a merged policy's merged keys are summed in another order)
    ok = ok and same(h["proxy"], c["proxy"]) and h["kept_fraction"] == c["kept_fraction"]
    ok = ok and h["applied"] and c["applied"] and "why" not in h
    ok = ok and close(h["kl_mean"], c["kl_mean"]) and close(h["kl_max"], c["kl_max"])
    ok = ok and h["top1_agreement"] == c["top1_agreement"] and close(h["nll_mean"],
                                                                     c["nll_mean"])
    for hp, cp in zip(h["per_trace"], c["per_trace"]):
        ok = ok and same(hp["proxy"], cp["proxy"]) and hp["budget_tokens"] == cp["budget_tokens"]
        ok = ok and len(hp["kl_steps"]) == len(cp["kl_steps"]) and all(
            close(x, y, 1e-3, 1e-5) for x, y in zip(hp["kl_steps"], cp["kl_steps"]))
        ok = ok and close(hp["kl_mean"], cp["kl_mean"]) and hp["top1_agreement"] == \
            cp["top1_agreement"]
    return check(ok, "%s %s %s: KL %s against e2e-llama2c's %s, top-1 %s / %s" % (
        what, h["policy"], h["budget"], h["kl_mean"], c["kl_mean"], h["top1_agreement"],
        c["top1_agreement"]))


def rho_numpy(x, y):
    """Spearman's rho written apart: average ranks by sorting, Pearson with NumPy."""
    def ranks(a):
        a = np.round(np.asarray(a, float), 12)
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        i = 0
        while i < len(a):
            j = i
            while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2.0 + 1
            i = j + 1
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def registry_entry():
    from transformers import modeling_utils
    return modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]


def main():
    work = tempfile.mkdtemp(prefix="kvt_hf_e2e_")
    device = os.environ.get("KVT_TEST_DEVICE") or "cpu"  # cuda in the GPU session
    if device != "cpu" and not torch.cuda.is_available():
        print("SKIP: KVT_TEST_DEVICE=%s, and torch sees no GPU" % device)
        sys.exit(77)
    model = llama2c_hf.to_torch_model(MODEL, "float32", device)
    sdpa = registry_entry()

    # ---- one trace: the bundled capture ----
    lw = os.path.join(work, "lw.txt")  # layer_weights=: each layer its own budget
    with open(lw, "w") as f:
        f.write("1 2 4 4 4\n")
    pols = POLICIES + (",adakv:layer_weights=%s,label=adakv-lw,"
                       "keydiff:chunk_length=100,chunk_scores=own,label=keydiff-chunks,"
                       "knorm:decoding=16,label=knorm-dec,"
                       "knorm:dms=-3.2,dms_decoding=1,dms_window=16,label=knorm-dmsdec,"
                       "tova:decoding=1,prefill=1,label=tova-dec,"
                       "expected-attention:decoding=8,label=ea-dec,"
                       "rkv:interval=16,label=rkv" % lw)
    hfk = hf_order_copy(SAMPLE, os.path.join(work, "hf.kvt"))
    res, sel = os.path.join(work, "res.json"), os.path.join(work, "sel.bin")
    run("replay", hfk, "--policies", pols, "--budgets", BUDGETS, "-o", res,
        "--export-selection", sel)
    run("replay", SAMPLE, "--policies", pols, "--budgets", BUDGETS, "-o",
        os.path.join(work, "c_res.json"), "--export-selection", os.path.join(work, "c_sel.bin"))
    same_selections(os.path.join(work, "c_sel.bin"), sel, "bundled trace")
    c_e2e = os.path.join(work, "c_e2e.json")
    run("e2e-llama2c", SAMPLE, "--model", MODEL, "--policies", pols, "--budgets", BUDGETS,
        "-o", c_e2e)
    out = os.path.join(work, "e2e.json")
    d = hf.e2e(model, res, sel, out)
    with open(out) as f:
        check(json.load(f) == d, "e2e.json holds the dict returned")
    with open(c_e2e) as f:
        c = json.load(f)
    check(registry_entry() is sdpa, "the attention registry is restored after the run")
    check(from_results(d, res), "proxies, kept fractions and budget tokens: results.json's")
    check(len(d["runs"]) == len(c["runs"]) == 69, "69 runs (23 policies x 3 budgets)")
    for h, cr in zip(d["runs"], c["runs"]):
        compare_run(h, cr, "one trace")
    t0, c0 = d["traces"][0], c["traces"][0]
    with kvtrace.open(hfk) as t:
        fp = t.fingerprint
    with open(res) as f:
        check(json.load(f)["traces"][0]["fingerprint"] == fp == t0["fingerprint"],
              "the trace's fingerprint is results.json's and e2e.json's")
    check((t0["n_prompt"], t0["n_decode"]) == (448, 64) and t0["trace_key_error"] < 1e-5 and
          close(t0["nll_uncompressed"], c0["nll_uncompressed"]),
          "trace facts: T 448, G 64, key error %.3g, reference log-loss %s / %s" % (
              t0["trace_key_error"], t0["nll_uncompressed"], c0["nll_uncompressed"]))
    full = [r for r in d["runs"] if r["name"] == "full"]
    check(all(r["kl_mean"] == 0 and r["kl_max"] == 0 and r["top1_agreement"] == 1 and
              set(r["per_trace"][0]["kl_steps"]) == {0} for r in full),
          "full: KL exactly 0 at every step, top-1 exactly 1")
    # the decode steps in calls of 5 (max_decode_bytes: 5 x (Hq x (T + G) x 13 + vocab x 32)),
    # the caches that evict decode tokens (knorm:decoding=16, tova, rkv, ...) masked over the
    # decode tokens so far: the same runs within rounding, full's KL still exactly 0
    dc = hf.e2e(model, res, sel, max_decode_bytes=5 * (8 * 512 * 13 + 512 * 32))
    check(all(close(a["kl_mean"], b["kl_mean"]) and
              close(a["kl_max"], b["kl_max"]) and
              a["top1_agreement"] == b["top1_agreement"] and a["applied"] == b["applied"]
              for a, b in zip(dc["runs"], d["runs"])) and
          all(r["kl_max"] == 0 for r in dc["runs"] if r["name"] == "full"),
          "decode steps 5 a call: the same runs as all 64 in one")
    applied = [r for r in d["runs"] if r["applied"] and r["proxy"]["err_decode"] is not None]
    rho = rho_numpy([r["proxy"]["err_decode"] for r in applied],
                    [r["kl_mean"] for r in applied])
    rho_r = rho_numpy([1 - r["proxy"]["recall_decode"] for r in applied
                       if r["proxy"]["recall_decode"] is not None],
                      [r["kl_mean"] for r in applied if r["proxy"]["recall_decode"] is not None])
    sp = d["spearman"]
    check(sp["n_settings"] == 69 and abs(sp["err_decode_vs_kl"] - rho) < 1e-12 and
          abs(sp["missed_recall_decode_vs_kl"] - rho_r) < 1e-12 and rho > 0.8,
          "Spearman's rho over the 69 settings: %s / %s (NumPy %s / %s)" % (
              sp["err_decode_vs_kl"], sp["missed_recall_decode_vs_kl"], rho, rho_r))
    check(d["engine"]["name"] == "transformers" and d["engine"]["attn_implementation"] == "sdpa"
          and d["model"] and d["vocab_size"] == 512, "engine, model and vocabulary named")
    rep = os.path.join(work, "report")
    r = run("report", res, "--e2e", out, "-o", rep, ok=False)
    check(r.returncode == 0 and os.path.exists(os.path.join(rep, "e2e.png")),
          "kvtrace report --e2e plots hf.e2e's file: %s" % r.stderr.strip()[-300:])
    page = open(os.path.join(rep, "index.html")).read() if r.returncode == 0 else ""
    intro = "<code>kvtrace.hf.e2e</code> (transformers %s, sdpa, float32 on %s)" % (
        d["engine"]["version"], d["engine"]["device"])
    check(intro in page and 'class="e2e-why"' not in page,
          "the report names the engine (%r), and no setting went unrun" % intro)
    for name, doc, want in (
            ("engine.json", dict(d, engine="transformers"), "engine is not an object"),
            ("engine2.json", dict(d, engine=dict(d["engine"], dtype=16)),
             "engine is not an object of strings"),
            ("why.json", dict(d, runs=[dict(d["runs"][-1], why=1)]), "runs[0].why is not a "
             "string")):
        bp = os.path.join(work, name)
        with open(bp, "w") as f:
            json.dump(doc, f)
        rd = os.path.join(work, "rep_" + name)
        r = run("report", res, "--e2e", bp, "-o", rd, ok=False)
        check(r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and
              want in r.stderr and not os.path.exists(rd + "/index.html"),
              "report --e2e %s refused: exit %d %r" % (name, r.returncode, r.stderr))

    # ---- two traces: a bf16 capture of another prompt beside the bundled one ----
    second = os.path.join(work, "second.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", "160", "--decode", "20", "--window",
        "32", "--seed", "5", "--dtype", "bf16", "-o", second)
    hf2 = hf_order_copy(second, os.path.join(work, "hf2.kvt"))
    pol2, bud2 = "streamingllm,snapkv,quest,snapkv:heads=query,label=sq", "32,25%"
    res2, sel2 = os.path.join(work, "res2.json"), os.path.join(work, "sel2.bin")
    run("replay", hfk, hf2, "--policies", pol2, "--budgets", bud2, "-o", res2,
        "--export-selection", sel2)
    run("replay", SAMPLE, second, "--policies", pol2, "--budgets", bud2, "-o",
        os.path.join(work, "c_res2.json"), "--export-selection",
        os.path.join(work, "c_sel2.bin"))
    same_selections(os.path.join(work, "c_sel2.bin"), sel2, "two traces")
    c2 = os.path.join(work, "c_e2e2.json")
    run("e2e-llama2c", SAMPLE, second, "--model", MODEL, "--policies", pol2, "--budgets", bud2,
        "-o", c2)
    with open(c2) as f:
        cc = json.load(f)
    listing = sorted(os.listdir(work))
    d2 = hf.e2e(model, res2, sel2)
    wrote = sorted(os.listdir(work)) != listing
    vocab = model.config.vocab_size  # a config without it (a VL model's top level)
    del model.config.vocab_size
    try:
        d2v = hf.e2e(model, res2, sel2)
    finally:
        model.config.vocab_size = vocab
    check(d2v["runs"] == d2["runs"] and d2v["vocab_size"] == d2["vocab_size"] == 512,
          "a config without vocab_size: the same runs, the logits' width as vocab_size")
    with kvtrace.read_selection(sel2) as open_sel:  # an open Selection: used, left open
        d2s = hf.e2e(model, res2, open_sel)
        check(d2s["runs"] == d2["runs"] and open_sel.kept(0, 0, 0, 0).size == 32,
              "an open Selection gives the same runs and stays open")
    check(not wrote, "out=None writes nothing")
    check([t["n_decode"] for t in d2["traces"]] == [64, 20] and
          d2["traces"][1]["trace_key_error"] < 2 ** -8,
          "two traces: 64 and 20 decode steps, the bf16 trace's key error %.3g" %
          d2["traces"][1]["trace_key_error"])
    check(from_results(d2, res2), "two traces: proxies and budget tokens as results.json's")
    for h, cr in zip(d2["runs"], cc["runs"]):
        compare_run(h, cr, "two traces")
    check(len(d2["runs"]) == 8 and close(d2["spearman"]["err_decode_vs_kl"],
                                         cc["spearman"]["err_decode_vs_kl"], 1e-9, 1e-9),
          "two traces: 8 runs, rho %s (e2e-llama2c %s)" % (d2["spearman"]["err_decode_vs_kl"],
                                                          cc["spearman"]["err_decode_vs_kl"]))

    # ---- h2o-greedy:decode=1 (H2O's eviction through the decode steps, from Q_all): its
    # caches hold decode tokens, masked by hf.e2e as by e2e-llama2c ----
    qa = os.path.join(work, "qa.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", "160", "--decode", "20", "--window",
        "32", "--seed", "6", "--q-all", "-o", qa)
    hfq = hf_order_copy(qa, os.path.join(work, "hfq.kvt"))
    pol4 = "h2o-greedy,h2o-greedy:decode=1,h2o-greedy:decode=1,heads=query,window=8"
    bud4 = "16,48,25%"
    res4, sel4 = os.path.join(work, "res4.json"), os.path.join(work, "sel4.bin")
    run("replay", hfq, "--policies", pol4, "--budgets", bud4, "-o", res4, "--export-selection",
        sel4)
    run("replay", qa, "--policies", pol4, "--budgets", bud4, "-o",
        os.path.join(work, "c_res4.json"), "--export-selection",
        os.path.join(work, "c_sel4.bin"))
    same_selections(os.path.join(work, "c_sel4.bin"), sel4, "h2o-greedy:decode=1")
    c4 = os.path.join(work, "c_e2e4.json")
    run("e2e-llama2c", qa, "--model", MODEL, "--policies", pol4, "--budgets", bud4, "-o", c4)
    with open(c4) as f:
        cc4 = json.load(f)
    d4 = hf.e2e(model, res4, sel4)
    check(len(d4["runs"]) == len(cc4["runs"]) == 9, "h2o-greedy:decode=1: 9 runs")
    for h, cr in zip(d4["runs"], cc4["runs"]):
        compare_run(h, cr, "h2o-greedy:decode=1")
    kl16 = {r["policy"]: r["kl_mean"] for r in d4["runs"] if r["budget"] == "16"}
    check(kl16["h2o-greedy"] != kl16["h2o-greedy:decode=1"],
          "h2o-greedy:decode=1 at 16: KL %r, without decode=1 %r" % (
              kl16["h2o-greedy:decode=1"], kl16["h2o-greedy"]))

    # ---- a vision-language prompt through the whole pipeline: kvtrace.capture records the
    # tokens the config names image tokens as such, vl-cache replays it, hf.e2e runs it ----
    vl = os.path.join(work, "vl.kvt")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(8, 512, (1, 120), generator=g)
    ids[0, 8:72] = 5  # 64 "image" tokens, 48 text tokens after them
    model.config.image_token_id = 5
    try:
        with kvtrace.capture(model, vl, window=48, decode=12):
            model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                           max_new_tokens=13, do_sample=False)
    finally:
        del model.config.image_token_id
    res3, sel3 = os.path.join(work, "vl_res.json"), os.path.join(work, "vl_sel.bin")
    run("replay", vl, "--policies", "full,snapkv,vl-cache,vl-cache:last=16,aircache-like",
        "--budgets", "24,48,80", "-o", res3, "--export-selection", sel3)
    with open(res3) as f:
        r3 = json.load(f)
    tr3 = r3["traces"][0]
    vlc = [x for x in tr3["runs"] if x["label"] == "vl-cache"]
    aic = [x["per_layer"]["n_keep"] for x in tr3["runs"] if x["label"] == "aircache-like"]
    check(tr3["modality_counts"]["image"] == 64 and
          all(len(set(x["per_layer"]["n_keep"])) > 1 for x in vlc),
          "vision-language capture: 64 image tokens; vl-cache's layers keep unlike counts: %s"
          % [x["per_layer"]["n_keep"] for x in vlc])
    # aircache-like keeps the 56 text tokens (the last B of them below that), and at 80 its
    # layers share 24 x 5 image tokens unevenly
    check(aic[0] == [24] * 5 and aic[1] == [48] * 5 and sum(aic[2]) == 80 * 5 and
          len(set(aic[2])) > 1 and min(aic[2]) > 56,
          "vision-language capture: aircache-like's layer counts %s" % aic)
    d3 = hf.e2e(model, res3, sel3)
    kl3 = {(x["policy"], x["budget"]): x["kl_mean"] for x in d3["runs"]}
    check(all(x["applied"] for x in d3["runs"]) and kl3[("full", "24")] == 0 and
          all(v is not None and v > 0 for k, v in kl3.items() if k[0] != "full"),
          "vision-language capture: hf.e2e runs vl-cache and aircache-like end to end: %s" % kl3)

    # the prompt's forward computes the last position's logits only (a long prompt's [T, V]
    # logits are gigabytes); the decode steps' forward all G; kvzip_scores' passes the last
    import functools
    seen = []
    plain = model.forward

    @functools.wraps(plain)
    def recording(*a, **kw):
        seen.append((kw["input_ids"].shape[1], kw.get("logits_to_keep")))
        return plain(*a, **kw)

    model.forward = recording
    try:
        hf.e2e(model, res2, sel2)
        n_pro = len(seen)
        hf.kvzip_scores(model, kvtrace.open(hf2).tokens["token_ids"][None].astype(np.int64),
                        chunk=64)
    finally:
        del model.forward
    want = [(448, 1)] + [(64, None)] * 9 + [(160, 1)] + [(20, None)] * 9
    check(seen[:n_pro] == want and len(seen) == n_pro + 4 and
          all(k == 1 for _, k in seen[n_pro:]),
          "logits_to_keep=1 for the prompts and kvzip's passes, all logits for the decode "
          "steps: %s" % seen)
    # max_decode_bytes: the decode steps in calls of n, the cache growing between them: a
    # bound of 7 steps of the first trace (T + G = 512; 13 of the second's 180) and of one
    # byte (a step a call); the same runs within rounding
    step = lambda tg: 8 * tg * 13 + 512 * 32  # noqa: E731 - Hq x (T + G) x 13 + vocab x 32
    d7 = {}
    for bound in (7 * step(512), 1):
        seen[:] = []
        model.forward = recording
        try:
            d7[bound] = hf.e2e(model, res2, sel2, max_decode_bytes=bound)
        finally:
            del model.forward
        n1, n2 = (7, 13) if bound > 1 else (1, 1)
        want = ([(448, 1)] + ([(n1, None)] * (64 // n1) + [(64 % n1, None)] * (64 % n1 > 0)) * 9
                + [(160, 1)] + ([(n2, None)] * (20 // n2) + [(20 % n2, None)] * (20 % n2 > 0))
                * 9)
        check(seen == want, "max_decode_bytes=%d: calls of %d and %d steps: %s"
              % (bound, n1, n2, seen[:12]))
        check(all(close(a["kl_mean"], b["kl_mean"]) and
                  close(a["kl_max"], b["kl_max"]) and
                  close(a["nll_mean"], b["nll_mean"]) and
                  a["top1_agreement"] == b["top1_agreement"]
                  for a, b in zip(d7[bound]["runs"], d2["runs"])) and
              all(len(pa["kl_steps"]) == len(pb["kl_steps"]) and
                  all(close(x, y, 1e-3, 1e-5) for x, y in zip(pa["kl_steps"], pb["kl_steps"]))
                  for a, b in zip(d7[bound]["runs"], d2["runs"])
                  for pa, pb in zip(a["per_trace"], b["per_trace"])),
              "max_decode_bytes=%d: the same runs as all steps in one call" % bound)

    if STANDIN:  # a model that hands attention no mask of its own: hf.e2e's alone, causal too
        from transformers.models.llama import modeling_llama
        saved = modeling_llama._attention_mask_4d
        modeling_llama._attention_mask_4d = lambda *a, **k: None
        try:
            d5 = hf.e2e(model, res2, sel2)
            d6 = hf.e2e(model, res2, sel2, max_decode_bytes=1)
        finally:
            modeling_llama._attention_mask_4d = saved
        check(all(close(a["kl_mean"], b["kl_mean"], 1e-6, 1e-9) and
                  a["top1_agreement"] == b["top1_agreement"]
                  for a, b in zip(d5["runs"], d2["runs"])),
              "no mask from the model: the same runs as with its causal mask")
        check(all(close(a["kl_mean"], b["kl_mean"]) and
                  a["top1_agreement"] == b["top1_agreement"]
                  for a, b in zip(d6["runs"], d2["runs"])),
              "no mask from the model, a step a call: hf.e2e's mask over the cache so far")

    # ---- refusals ----
    def refused(want, what, *args, **kw):
        raises(kvtrace.TraceError, lambda: hf.e2e(*args, **kw), want, what)
        check(registry_entry() is sdpa, "%s: the registry is restored" % what)

    refused("are not from one replay", "a selection of another replay", model, res, sel2)
    # a merged policy replayed here keeping another set than the export's (another build, or
    # a file its options name changed since): refused, naming the setting
    from kvtrace import _replay_sets
    plain_sets = _replay_sets.replay_sets

    def shifted(*a, **kw):  # one more token in one set
        got = plain_sets(*a, **kw)
        ks = got[(0, 1, 2, 1, -1)]
        ks.idx = np.sort(np.append(ks.idx, min(set(range(448)) - set(ks.idx.tolist()))))
        return got

    _replay_sets.replay_sets = shifted
    try:
        refused("keeps another set than the export at budget 1, layer 2, head 1",
                "a merged policy's sets replayed here unlike the export's", model, res, sel)
    finally:
        _replay_sets.replay_sets = plain_sets
    # max_merged_bytes: a merged policy's budgets replayed together under the bound (the
    # default here), each alone over it; the same runs either way
    calls = []

    def counting(path, spec, budgets, seed=0):
        calls.append((spec, budgets))
        return plain_sets(path, spec, budgets, seed)

    _replay_sets.replay_sets = counting
    try:
        d1 = hf.e2e(model, res, sel)
        together, calls[:] = list(calls), []
        dg = hf.e2e(model, res, sel, max_merged_bytes=1)
    finally:
        _replay_sets.replay_sets = plain_sets
    merged = ["lookm", "elastic-cache", "cam", "snapkv", "h2o"]  # specs: effective options
    check(d1["runs"] == dg["runs"] == d["runs"] and
          [b for _, b in together] == [BUDGETS] * 5 and
          [s.split(":")[0] for s, _ in together] == merged and
          [b for _, b in calls] == BUDGETS.split(",") * 5,
          "max_merged_bytes=1 replays each budget alone (%s; together: %s), the same runs"
          % (calls, together))
    for bad in (0, -5, True, 1.5, "1"):
        refused("max_merged_bytes=%r: a positive number of bytes" % (bad,),
                "max_merged_bytes=%r" % (bad,), model, res, sel, max_merged_bytes=bad)
        refused("max_decode_bytes=%r: a positive number of bytes" % (bad,),
                "max_decode_bytes=%r" % (bad,), model, res, sel, max_decode_bytes=bad)
    refused("is not the trace", "a trace that is not the one replayed", model, res, sel,
            traces=[hf2])
    refused("traces given", "a trace list of another length", model, res, sel,
            traces=[hfk, hf2])
    moved = os.path.join(work, "moved")
    os.mkdir(moved)
    os.rename(hfk, os.path.join(moved, "hf.kvt"))
    refused("pass traces=[...]", "a trace moved since the replay", model, res, sel)
    dm = hf.e2e(model, res, sel, traces=[os.path.join(moved, "hf.kvt")])
    check(dm["runs"] == d["runs"] and dm["traces"][0]["path"].startswith(moved),
          "traces= names the moved trace: the same runs, its path")
    os.rename(os.path.join(moved, "hf.kvt"), hfk)
    # the original C-engine trace: llama2.c channel order, so not this model's keys
    refused("not captured from this model", "keys of another model", model,
            os.path.join(work, "c_res.json"), os.path.join(work, "c_sel.bin"))
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    refused("is another model", "a model of another shape", other, res, sel)
    nodec = os.path.join(work, "nodec.kvt")
    with kvtrace.open(hfk) as t:
        with kvtrace.TraceWriter(nodec, t.header) as w:
            w.append("token_ids", t.read("token_ids"))
            for layer in t.layers():
                for kind in ("K", "V", "Q_window"):
                    w.append(kind, t.read(kind, layer), layer=layer)
    res3, sel3 = os.path.join(work, "res3.json"), os.path.join(work, "sel3.bin")
    run("replay", nodec, "--policies", "snapkv", "--budgets", "64", "-o", res3,
        "--export-selection", sel3)
    refused("has no decode steps", "a trace without decode steps", model, res3, sel3)
    noids = hf_order_copy(SAMPLE, os.path.join(work, "noids.kvt"), drop=("decode_token_ids",))
    run("replay", noids, "--policies", "snapkv", "--budgets", "64", "-o", res3,
        "--export-selection", sel3, "--force")
    refused("has no decode_token_ids table", "decode steps without their tokens", model, res3,
            sel3)
    part, psel = os.path.join(work, "part.json"), os.path.join(work, "part.bin")
    run("replay", hfk, "--policies", "snapkv", "--budgets", "64", "--shard", "0/2", "-o", part,
        "--export-selection", psel)
    refused("sharded replay", "a sharded part", model, part, psel)
    refused("exists (pass force=True", "an existing out", model, res, sel, out)
    refused("is an input", "out naming the results", model, res, sel, res, force=True)
    # a full disk (here RLIMIT_FSIZE: write() fails with EFBIG): one message naming the file,
    # the old e2e.json left as it was, no temporary file left beside it
    import resource
    import signal
    before = open(out, "rb").read()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        refused("cannot write " + out, "a full disk", model, res, sel, out, force=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    check(open(out, "rb").read() == before and
          not [f for f in os.listdir(work) if f.startswith("e2e.json.tmp")],
          "a full disk: e2e.json as it was, no temporary file left")
    with open(res) as f:
        check(json.load(f)["results_version"] == 1, "the results are left as they were")
    ids = kvtrace.open(hfk).tokens["token_ids"].astype(np.int64)
    bad = torch.as_tensor(ids[::-1].copy())[None]
    refused("are not", "prompt_inputs of other tokens", model, res, sel,
            prompt_inputs=[{"input_ids": bad}])
    d4 = hf.e2e(model, res2, sel2, prompt_inputs=[
        {"input_ids": torch.as_tensor(ids)[None]}, None])
    check(d4["runs"] == d2["runs"], "prompt_inputs of the trace's own tokens: the same runs")
    with torch.no_grad():  # a NaN in the weights: one message, not a KL of NaN in the file
        w = model.lm_head.weight
        saved_w = w[3, 0].item()
        w[3, 0] = float("nan")
    try:
        refused("are not finite (NaN or Inf)", "NaN logits", model, res2, sel2)
    finally:
        with torch.no_grad():
            w[3, 0] = saved_w
    crop = hf._crop_cache  # a cache that lost a token (as a sliding window drops them)
    hf._crop_cache = lambda cache, T: crop(cache, T - 1)
    try:
        refused("cannot be masked", "a cache that does not hold every token", model, res2,
                sel2)
    finally:
        hf._crop_cache = crop
    nodir = os.path.join(work, "no", "such", "dir", "e2e.json")
    refused("its directory does not exist", "out in a missing directory", model, res2, sel2,
            nodir)
    from transformers import modeling_utils
    reg = modeling_utils.ALL_ATTENTION_FUNCTIONS
    had = "flash_attention_2" in reg
    if not had:  # the stand-in registers sdpa only: a stand-in entry under the name
        reg["flash_attention_2"] = sdpa
    model.config._attn_implementation = "flash_attention_2"
    try:
        refused("attn_implementation=\"sdpa\"", "flash attention", model, res, sel)
    finally:
        model.config._attn_implementation = "sdpa"
        if not had:
            del reg["flash_attention_2"]
    finish("test_python_hf_e2e", work)


if __name__ == "__main__":
    main()
