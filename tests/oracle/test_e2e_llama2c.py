#!/usr/bin/python3
"""test_e2e_llama2c.py - `kvtrace e2e-llama2c` against an independent NumPy implementation.

A trace is captured from stories260K (real weights) by `kvtrace capture-llama2c` (with KVzip's
scores), then `kvtrace e2e-llama2c` replays policies of each kind (KV heads, query heads,
head-adaptive, per decode step, merged, and kvzip's sets shared unevenly over layers and heads,
kvzip:sinks=0 at 4 tokens with heads that keep no prompt key) and reruns the decode steps with
their kept sets. Checked:

  * the kept sets it applied (--export-selection, read with kvtrace.read_selection) drive the
    NumPy float64 forward of tests/oracle/llama2c_oracle.py with the same masks (query rows
    past the prompt see only the kept prompt keys; per step for quest); its KL divergence
    from the unmasked forward, top-1 agreement and reference log-loss equal e2e.json's per
    (policy, budget) and per step, within f32-vs-f64 tolerance;
  * a budget above the prompt keeps everything: KL exactly 0, top-1 agreement 1;
  * one thread and two write the same file;
  * two traces: each trace's measures equal its own run's bit for bit, a setting's are their
    means (largest KL: the largest), its proxies the replay's aggregate over both;
  * the proxies beside them are the replay's (results of `kvtrace replay` on the same trace)
    and Spearman's rho is recomputed here from e2e.json's own columns;
  * merged policies run with their merged keys and values in the engine's cache: merge=pivot,
    merge=weighted per query head and elastic-cache against the NumPy forward whose decode
    rows see, through each query head, keys and values merged here (test_merge.merge_kv,
    test_elastic_cache.elastic_merge) from the same kept sets; lightkv-like runs (KL 0 above
    the prompt);
  * a trace cut short: replay's warnings (incomplete, no decode metrics) after the file is
    written, a missing rho blamed on the proxies, and a refusal of it in one line; one whose
    layers hold different numbers of decode steps reruns the steps every layer holds whole
    and gives what a capture of that many steps gives;
  * an e2e.json that cannot be written (a full disk): one line, no table on stdout;
  * kvtrace report --e2e: the section (scatter, rho, a row per setting), a note for another
    trace's e2e.json, and damaged ones refused with one line and no report;
  * e2e.json holds each trace's fingerprint (results.json's), and report --e2e matches traces
    by it: one trace given as ../t.kvt and t.kvt is one, another capture named t.kvt is not;
    an e2e.json without fingerprints is matched by path; an --e2e input that is one of the
    report's own files (DIR/e2e.png) is refused, not overwritten;
  * refused with one line: a trace of another model, a trace without decode steps, a trace
    whose keys this model did not produce, a header whose n_tokens its records contradict, a
    missing --model;
  * hybridkv-like's static heads keep their prompt-time set at every step (its budget above
    the prompt gives KL 0 like every other policy's).

Environment: KVT_BIN, KVT_LIB, KVT_SOURCE_ROOT. Exit 77 without NumPy, the CLI or the model.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import BIN, ROOT, check, finish, run  # noqa: E402 - exits 77 without NumPy/CLI
import numpy as np  # noqa: E402
import kvtrace  # noqa: E402
import llama2c_oracle  # noqa: E402
from test_elastic_cache import elastic_merge  # noqa: E402
from test_merge import merge_kv  # noqa: E402

MODEL = os.path.join(ROOT, "models", "stories260K.bin")
if not os.path.exists(MODEL):
    print("SKIP: no stories260K model")
    sys.exit(77)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def spearman(x, y):
    """Spearman's rho as RESULTS.md defines it: average ranks, values tied at 12 decimal
    places (so that 1 and 1 + 4e-16 tie), Pearson's correlation of the ranks"""
    def ranks(a):
        a = np.array([float("%.12f" % v) for v in a])
        return np.array([(a < v).sum() + ((a == v).sum() + 1) / 2.0 for v in a])
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


SPECS = ["streamingllm:sinks=4", "snapkv:window=16", "snapkv:window=16,heads=query,label=sq",
         "adakv:window=16", "h2o:window=8", "quest:page=8", "hybridkv-like:window=16",
         "lightkv-like:window=16", "snapkv:window=16,merge=pivot,label=sp",
         "elastic-cache", "h2o:window=8,merge=weighted,heads=query,label=hq", "kvzip",
         "kvzip:sinks=0,label=kz0"]
# the merged policies whose keys and values the check merges itself (test_merge, Elastic Cache)
MERGES = {"sp": lambda K, V, idx: merge_kv(K, V, idx, "pivot"),
          "elastic-cache": lambda K, V, idx: elastic_merge(K, V, idx, 4),
          "hq": lambda K, V, idx: merge_kv(K, V, idx, "weighted")}
T, G = 96, 12
with tempfile.TemporaryDirectory() as tmp:
    tr = os.path.join(tmp, "t.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", str(T), "--decode", str(G), "--window",
        "16", "--colsum", "--kvzip", "-o", tr)
    out, sel_path = os.path.join(tmp, "e2e.json"), os.path.join(tmp, "sel.bin")
    budgets = "4,8,24,48,200"
    r = run("e2e-llama2c", tr, "--model", MODEL, "--policies", ",".join(SPECS), "--budgets",
            budgets, "--threads", "2", "--export-selection", sel_path, "-o", out)
    e2e = json.load(open(out))
    check(e2e["generator"].startswith("kvtrace "), "generator %r, not as results.json's" %
          e2e["generator"])
    # the decode reruns are spread over threads: one thread writes the same file
    out1 = os.path.join(tmp, "e2e1.json")
    run("e2e-llama2c", tr, "--model", MODEL, "--policies", ",".join(SPECS), "--budgets",
        budgets, "--threads", "1", "-o", out1)
    check(open(out1, "rb").read() == open(out, "rb").read(), "--threads 1 and 2 differ")
    t0 = e2e["traces"][0] if len(e2e["traces"]) == 1 else {}
    check(e2e["e2e_version"] == 1 and t0.get("path") == tr and t0.get("n_prompt") == T and
          t0.get("n_decode") == G and t0.get("trace_key_error", 1) < 1e-2,
          "header %s" % {k: e2e[k] for k in e2e if k != "runs"})
    runs = {(x["policy"], x["budget"]): x for x in e2e["runs"]}
    check(len(runs) == len(SPECS) * 5, "%d runs" % len(runs))
    with kvtrace.read_selection(sel_path) as sel:  # kz0 at 4 tokens: heads that keep nothing
        kz0 = [i for i, p in enumerate(sel.policies) if p["label"] == "kz0"][0]
        n_empty = sum(len(sel.kept(kz0, "4", layer=l, head=h)) == 0
                      for l in range(5) for h in range(4))
    check(n_empty > 0, "kvzip:sinks=0 at 4 tokens: %d heads keep no prompt key" % n_empty)

    m = llama2c_oracle.load(MODEL)
    with kvtrace.open(tr) as t:
        ids = np.concatenate([t.tokens["token_ids"], t.tokens["decode_token_ids"]]).astype(int)
    full, _, ks_full, vs_full, _ = llama2c_oracle.forward(m, ids, T)
    full = full[T:]  # [G, vocab] at the decode positions
    lpf = log_softmax(full)
    ref = full.argmax(-1)
    nll_full = float(-lpf[np.arange(G), ref].mean())
    check(abs(t0["nll_uncompressed"] - nll_full) < 1e-3,
          "uncompressed log-loss %g vs NumPy %g" % (t0["nll_uncompressed"], nll_full))
    L, Hq, Hkv = m["L"], m["Hq"], m["Hkv"]
    n_cmp, worst = 0, 0.0
    with kvtrace.read_selection(sel_path) as sel:
        for pi, p in enumerate(sel.policies):
            for b in sel.budgets:
                x = runs[(p["label"], b)]
                if p["merged"] and p["label"] not in MERGES:  # lightkv-like: run, not checked
                    check(x["applied"] and x["kl_mean"] >= 0 and
                          (b != "200" or x["kl_mean"] == 0),
                          "%s @ %s: a merged policy runs: %s" % (p["label"], b, x))
                    continue
                S = G if p["per_step"] else 1
                keep = np.zeros((S, L, Hq, T), bool)
                recs = [x for x in sel.records()
                        if x["policy"] == pi and sel.budgets[x["budget"]] == b]
                # a per-step policy's head with no set per step (hybridkv-like's static heads)
                # keeps its prompt-time set at every step, as the replay measures it
                stepped = {(x["layer"], x["head"]) for x in recs if x["step"] >= 0}
                for rec in recs:
                    if p["per_step"] and rec["step"] < 0 and (rec["layer"], rec["head"]) in \
                            stepped:
                        continue
                    steps = [rec["step"]] if rec["step"] >= 0 else range(S)
                    hs = [rec["head"]] if p["query_heads"] else \
                        range(rec["head"] * (Hq // Hkv), (rec["head"] + 1) * (Hq // Hkv))
                    for st in steps:
                        for h in hs:
                            keep[st, rec["layer"], h, rec["kept"]] = True
                merged = None
                if p["merged"]:  # the kept entries' keys and values, merged here from the
                    # uncompressed prompt's (K, V [L, T, Hkv, D] of the forward)
                    D, grp = m["D"], Hq // Hkv
                    merged = (np.zeros((L, Hq, T), bool), np.zeros((L, Hq, T, D)),
                              np.zeros((L, Hq, T, D)))
                    for rec in recs:  # per KV head (its query heads alike) or per query head
                        li, idx = rec["layer"], np.array(rec["kept"], dtype=int)
                        g = rec["head"] // grp if p["query_heads"] else rec["head"]
                        hs = [rec["head"]] if p["query_heads"] else range(g * grp, (g + 1) * grp)
                        mk_, mv_ = MERGES[p["label"]](ks_full[li, :T, g], vs_full[li, :T, g], idx)
                        for h in hs:
                            merged[0][li, h, idx] = True
                            merged[1][li, h, idx], merged[2][li, h, idx] = mk_, mv_
                comp = llama2c_oracle.forward(m, ids, T, keep, merged)[0][T:]
                lpc = log_softmax(comp)
                kl = (np.exp(lpf) * (lpf - lpc)).sum(-1)
                top2 = np.sort(full, -1)[:, -2:]
                sure = (top2[:, 1] - top2[:, 0]) > 1e-3  # no near-tie in the reference
                agree = comp.argmax(-1) == ref
                nll = -lpc[np.arange(G), ref]
                tol = lambda v: 2e-3 + 2e-3 * abs(v)  # noqa: E731 - f32 engine vs f64 oracle
                ok = (x["applied"] and
                      abs(x["kl_mean"] - kl.mean()) <= tol(kl.mean()) and
                      all(abs(a - c) <= tol(c)
                          for a, c in zip(x["per_trace"][0]["kl_steps"], kl)) and
                      x["per_trace"][0]["kl_mean"] == x["kl_mean"] and
                      abs(x["kl_max"] - kl.max()) <= tol(kl.max()) and
                      abs(x["nll_mean"] - nll.mean()) <= tol(nll.mean()) and
                      (not sure.all() or abs(x["top1_agreement"] - agree.mean()) < 1e-9))
                check(ok, "%s @ %s: kvtrace KL %s top1 %s nll %s; NumPy KL %.6g top1 %.4g "
                      "nll %.6g" % (p["label"], b, x["kl_mean"], x["top1_agreement"],
                                    x["nll_mean"], kl.mean(), agree.mean(), nll.mean()))
                worst = max(worst, abs(x["kl_mean"] - kl.mean()))
                n_cmp += 1
                if b == "200":  # above the prompt: nothing dropped
                    check(x["kl_mean"] == 0 and x["kl_max"] == 0 and x["top1_agreement"] == 1,
                          "%s @ 200 > T: %s" % (p["label"], x))
    print("ok: %d (policy, budget) runs equal the NumPy forward with the same masks (largest "
          "KL difference %.2g)" % (n_cmp, worst))
    kls = [x["kl_mean"] for x in e2e["runs"] if x["applied"]]
    check(max(kls) > 0.1, "no setting changed the output: KL %s" % kls)

    # the proxies are the replay's; rho recomputed from the file's columns
    res = os.path.join(tmp, "r.json")
    run("replay", tr, "--policies", ",".join(SPECS), "--budgets", budgets, "-o", res)
    rr = json.load(open(res))
    labels = [p["label"] for p in rr["settings"]["policies"]]
    for a in rr["aggregate"]:
        x = runs[(labels[a["policy"]], a["budget_text"])]
        for k in ("err_decode", "recall_decode", "err_window", "recall_window"):
            v, w = a["summary"].get(k), x["proxy"][k]
            check(v == w,  # the same double: both files write numbers exactly
                  "proxy %s of %s @ %s: %s vs replay's %s" % (k, x["policy"], x["budget"], w, v))
    ap = [x for x in e2e["runs"] if x["applied"] and x["proxy"]["err_decode"] is not None]
    rho = spearman([x["proxy"]["err_decode"] for x in ap], [x["kl_mean"] for x in ap])
    apr = [x for x in ap if x["proxy"]["recall_decode"] is not None]  # merged: no recall
    rho_r = spearman([1 - x["proxy"]["recall_decode"] for x in apr], [x["kl_mean"] for x in apr])
    check(abs(rho - e2e["spearman"]["err_decode_vs_kl"]) < 1e-9 and
          abs(rho_r - e2e["spearman"]["missed_recall_decode_vs_kl"]) < 1e-9 and
          e2e["spearman"]["n_settings"] == len(ap),
          "Spearman %s vs %s, %s recomputed" % (e2e["spearman"], rho, rho_r))
    # shares are counts over G: exactly 1 when every step agrees, never above
    check(all(x["top1_agreement"] is None or
              (x["top1_agreement"] <= 1 and abs(x["top1_agreement"] * G -
                                                round(x["top1_agreement"] * G)) < 1e-9)
              for x in e2e["runs"]), "top-1 shares: %s" % [x["top1_agreement"]
                                                           for x in e2e["runs"]])
    print("ok: proxies equal replay's; Spearman's rho err_decode vs KL = %.3f over %d settings"
          % (rho, len(ap)))
    check("Spearman's rho" in r.stderr and "policy" in r.stdout.splitlines()[0],
          "summary lines: %r %r" % (r.stdout[:200], r.stderr))

    # two traces (prompts of different lengths): each trace's measures are its own run's, bit
    # for bit; a setting's are their means (the largest KL the largest), its proxies the
    # replay's aggregate over both
    tr2 = os.path.join(tmp, "t2.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", "80", "--decode", "10", "--window",
        "16", "--colsum", "--seed", "5", "-o", tr2)
    sp2 = "snapkv:window=16,quest:page=8,adakv:window=16,lightkv-like:window=16"
    both, one, two = (os.path.join(tmp, n) for n in ("both.json", "one.json", "two.json"))
    run("e2e-llama2c", tr, tr2, "--model", MODEL, "--policies", sp2, "--budgets", "8,24,25%",
        "-o", both)
    run("e2e-llama2c", tr, "--model", MODEL, "--policies", sp2, "--budgets", "8,24,25%",
        "-o", one)
    run("e2e-llama2c", tr2, "--model", MODEL, "--policies", sp2, "--budgets", "8,24,25%",
        "-o", two)
    rb = os.path.join(tmp, "rboth.json")
    run("replay", tr, tr2, "--policies", sp2, "--budgets", "8,24,25%", "-o", rb)
    eb, e1, e2_ = (json.load(open(f)) for f in (both, one, two))
    agg = {(a["label"], a["budget_text"]): a["summary"] for a in json.load(open(rb))["aggregate"]}
    ok = [(x["path"], x["n_prompt"], x["n_decode"]) for x in eb["traces"]] == \
        [(tr, T, G), (tr2, 80, 10)]
    for x, y, z in zip(eb["runs"], e1["runs"], e2_["runs"]):
        keys = ("kl_mean", "kl_max", "top1_agreement", "nll_mean", "kl_steps", "budget_tokens")
        ok &= all(x["per_trace"][0][k] == y["per_trace"][0][k] and
                  x["per_trace"][1][k] == z["per_trace"][0][k] for k in keys)
        ok &= x["per_trace"][1]["budget_tokens"] == (20 if x["budget"] == "25%" else
                                                     int(x["budget"]))
        if x["applied"]:
            a, b = y["kl_mean"], z["kl_mean"]
            ok &= x["kl_mean"] == a / 2 + b / 2 and x["kl_max"] == max(y["kl_max"], z["kl_max"])
            ok &= x["top1_agreement"] == y["top1_agreement"] / 2 + z["top1_agreement"] / 2
        sm = agg[(x["policy"], x["budget"])]
        ok &= all(x["proxy"][k] == sm.get(k) for k in ("err_decode", "recall_decode"))
    check(ok, "two traces: %s" % json.dumps(eb)[:400])
    if ok:
        print("ok: two traces: each trace's measures are its own run's; means and the replay's "
              "aggregate over both")

    # one setting: no rank correlation, said in words (it printed "err_decode nan" over
    # "1 settings"); the JSON holds null
    one1 = os.path.join(tmp, "one1.json")
    r1 = run("e2e-llama2c", tr, "--model", MODEL, "--policies", "snapkv:window=16", "--budgets",
             "24", "-o", one1)
    check("(1 setting on 1 trace); no Spearman's rho: 1 setting with a measured KL, 3 needed"
          in r1.stderr and json.load(open(one1))["spearman"]["err_decode_vs_kl"] is None,
          "one setting: %r" % r1.stderr)

    # a trace cut short (capture killed, disk full): the replay's warnings, told after the
    # file is written, and a missing rho blamed on the proxies, not the KL (it said "0 settings
    # with a measured KL" over 6 KLs, and nothing at all for a cut before the last V_decode)
    chunked = os.path.join(tmp, "chunked.kvt")  # decode records in chunks of 4 steps
    run("capture-llama2c", "--model", MODEL, "--tokens", str(T), "--decode", str(G), "--window",
        "16", "--colsum", "--decode-chunk", "4", "-o", chunked)
    with kvtrace.open(chunked) as t:
        recs = t.records
    qd = [x for x in recs if x["kind"] == "Q_decode"]
    vd = [x for x in recs if x["kind"] == "V_decode"]
    whole = open(chunked, "rb").read()
    pol3 = "snapkv:window=16,h2o:window=8,streamingllm:sinks=4"
    for name, cut, want, unwanted in (
            ("cut_q.kvt", qd[2]["file_offset"] + 7,  # in the first chunk: layers 2.. hold none
             ["is incomplete", "no decode metrics: not every layer holds decode steps",
              "no Spearman's rho: the replay measured its proxies (err_decode, recall_decode) "
              "for 0 of the 6 settings with a measured KL, 3 needed"], "0 settings"),
            ("cut_v.kvt", vd[-1]["file_offset"],  # the last layer's last V_decode is lost
             ["is incomplete", "decode metrics from %d decode steps, those every layer holds "
              "whole (some layers hold %d)" % (G - 4, G),
              "Spearman's rho against the end-to-end KL over 6 settings"], "no decode metrics"),
            ("cut_end.kvt", recs[-1]["file_offset"],  # only the index is lost
             ["is incomplete", "Spearman's rho against the end-to-end KL over 6 settings"],
             "decode metrics")):
        cp = os.path.join(tmp, name)
        open(cp, "wb").write(whole[:cut])
        ce = os.path.join(tmp, name + ".json")
        rc = run("e2e-llama2c", cp, "--model", MODEL, "--policies", pol3, "--budgets", "16,48",
                 "-o", ce)
        ej = json.load(open(ce))
        lines = rc.stderr.strip().splitlines()
        check(all(w in rc.stderr for w in want) and unwanted not in rc.stderr and
              lines[-1].startswith("e2e-llama2c: wrote") and
              all(x["kl_mean"] is not None for x in ej["runs"]),
              "%s: stderr %r" % (name, rc.stderr))
    # ... and a run refused on it says one line, its error (the warnings are not told)
    bq = os.path.join(tmp, "cutq.json")
    rq = run("e2e-llama2c", os.path.join(tmp, "cut_q.kvt"), "--model", MODEL, "--policies",
             "quest:page=8", "-o", bq, ok=False)
    check(rq.returncode == 1 and len(rq.stderr.strip().splitlines()) == 1 and
          "needs decode queries" in rq.stderr and not os.path.exists(bq),
          "a refused cut trace: exit %d %r" % (rq.returncode, rq.stderr))
    # on the cut whose layers hold different numbers of steps, the steps every layer holds
    # whole are rerun, as the replay measures its proxies: the result is that of a capture of
    # that many steps (it reran layer 0's 12, where quest's per-step sets stop at 8, so its
    # last steps saw no prompt token)
    short = os.path.join(tmp, "short.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", str(T), "--decode", str(G - 4),
        "--window", "16", "--colsum", "--decode-chunk", "4", "-o", short)
    pq = pol3 + ",quest:page=8,hybridkv-like:window=16"
    ecut, eshort = (os.path.join(tmp, n) for n in ("ecut.json", "eshort.json"))
    run("e2e-llama2c", os.path.join(tmp, "cut_v.kvt"), "--model", MODEL, "--policies", pq,
        "--budgets", "16,48", "-o", ecut)
    run("e2e-llama2c", short, "--model", MODEL, "--policies", pq, "--budgets", "16,48",
        "-o", eshort)
    a, b = json.load(open(ecut)), json.load(open(eshort))
    check(a["runs"] == b["runs"] and a["spearman"] == b["spearman"] and
          [(x["n_decode"], x["nll_uncompressed"]) for x in a["traces"]] ==
          [(x["n_decode"], x["nll_uncompressed"]) for x in b["traces"]] == [
              (G - 4, b["traces"][0]["nll_uncompressed"])],
          "a cut with %d whole steps vs a %d-step capture: %s" %
          (G - 4, G - 4, [(x["policy"], x["budget"], x["kl_mean"], y["kl_mean"])
                          for x, y in zip(a["runs"], b["runs"]) if x != y][:4]))
    print("ok: a trace cut short: the replay's warnings, and why there is no rho")

    # e2e.json cannot be written (a full disk, here RLIMIT_FSIZE: write() fails with EFBIG):
    # exit 1 with one line, and nothing on stdout (the table was printed before the failed
    # write, so a script reading stdout saw results of a failed run), not even on a cut trace
    # with warnings to tell
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    for src in (tr, os.path.join(tmp, "cut_q.kvt")):
        full_o = os.path.join(tmp, "full_disk.json")
        rf = subprocess.run([BIN, "e2e-llama2c", src, "--model", MODEL, "--policies", pol3,
                             "--budgets", "16,48", "-o", full_o], capture_output=True, text=True,
                            preexec_fn=small_disk)
        check(rf.returncode == 1 and rf.stdout == "" and
              len(rf.stderr.strip().splitlines()) == 1 and full_o in rf.stderr and
              not os.path.exists(full_o),
              "a full disk: exit %d, stdout %r, stderr %r" % (rf.returncode, rf.stdout[:200],
                                                             rf.stderr))
    print("ok: e2e.json not written: one line, no table")

    # kvtrace report --e2e: the section, its scatter and a row per setting
    rep = os.path.join(tmp, "rep")
    r2 = run("report", res, "--e2e", out, "-o", rep)
    html = open(os.path.join(rep, "index.html")).read()
    sec = html[html.index('<h2 id="e2e">'):] if '<h2 id="e2e">' in html else ""
    rows = sec[:sec.index("</table>")].count("<tr>") - 1 if sec else -1
    png = open(os.path.join(rep, "e2e.png"), "rb").read() if os.path.exists(
        os.path.join(rep, "e2e.png")) else b""
    rho_txt = "%.4g" % e2e["spearman"]["err_decode_vs_kl"]
    check(sec and rows == len(e2e["runs"]) and "<b>%s</b>" % rho_txt in sec and
          'data:image/png;base64,' in sec and png[:8] == b"\x89PNG\r\n\x1a\n" and
          "not run" not in sec and "note:" not in r2.stderr,
          "report --e2e: section %d chars, %d rows, rho %s, png %d bytes, stderr %r" %
          (len(sec), rows, rho_txt, len(png), r2.stderr))
    print("ok: report --e2e: section with the scatter, rho %s and %d rows" % (rho_txt, rows))
    # ... of another trace: said, still drawn (an e2e.json without fingerprints, as written
    # before they were, is matched by path)
    other = os.path.join(tmp, "r_other.json")
    run("replay", tr, "--policies", "snapkv:window=16", "--budgets", "24",
        "-o", other)
    old_t0 = {k: v for k, v in t0.items() if k != "fingerprint"}
    moved = dict(e2e, traces=[dict(old_t0, path=os.path.join(tmp, "elsewhere.kvt"))])
    mj = os.path.join(tmp, "moved.json")
    json.dump(moved, open(mj, "w"))
    r3 = run("report", other, "--e2e", mj, "-o", os.path.join(tmp, "rep2"))
    check("note: %s checked %s" % (mj, moved["traces"][0]["path"]) in r3.stderr and
          'id="e2e-other-trace"' in open(os.path.join(tmp, "rep2", "index.html")).read() and
          'id="e2e-other-trace"' not in html,
          "report --e2e of another trace: %r" % r3.stderr)
    oldj = os.path.join(tmp, "old.json")
    json.dump(dict(e2e, traces=[old_t0]), open(oldj, "w"))
    r5 = run("report", other, "--e2e", oldj, "-o", os.path.join(tmp, "rep_old"))
    check("note:" not in r5.stderr, "an e2e.json without fingerprints: %r" % r5.stderr)

    # traces are matched by fingerprint, not by the path as given (it said "which r.json does
    # not hold" of one trace given as ../t.kvt and t.kvt, and took another capture of the same
    # name silently). e2e.json holds the replay's fingerprint of each trace
    fp = json.load(open(res))["traces"][0]["fingerprint"]
    check(t0.get("fingerprint") == fp, "e2e.json fingerprint %r, results.json's %r" %
          (t0.get("fingerprint"), fp))
    sub, d3 = os.path.join(tmp, "sub"), os.path.join(tmp, "d3")
    os.mkdir(sub)
    os.mkdir(d3)
    shutil.copy(tr2, os.path.join(d3, "t.kvt"))  # another capture named t.kvt
    for cwd, trace, name in ((sub, "../t.kvt", "rel.json"), (d3, "t.kvt", "same_name.json")):
        subprocess.run([BIN, "e2e-llama2c", trace, "--model", MODEL, "--policies",
                        "snapkv:window=16", "--budgets", "24", "-o", name], cwd=cwd, check=True,
                       capture_output=True)
    for e2e_in, want in ((os.path.join(sub, "rel.json"), None),
                         (os.path.join(d3, "same_name.json"), "another capture")):
        rd = os.path.join(tmp, "rep_" + os.path.basename(e2e_in))
        # from tmp: ../t.kvt is not there, t.kvt is the results' trace
        rr = subprocess.run([BIN, "report", other, "--e2e", e2e_in, "-o", rd], cwd=tmp,
                            capture_output=True, text=True)
        page = open(os.path.join(rd, "index.html")).read() if rr.returncode == 0 else ""
        said = 'id="e2e-other-trace"' in page
        check(rr.returncode == 0 and (("note:" in rr.stderr) == bool(want)) == True and
              said == bool(want) and (not want or want in rr.stderr),
              "report --e2e %s: exit %d, page note %s, stderr %r" %
              (e2e_in, rr.returncode, said, rr.stderr))
    print("ok: report --e2e matches traces by fingerprint")

    # an --e2e input among the files the report writes (DIR/e2e.png, DIR/index.html) is
    # refused, even with --force, as RESULTS is (it was overwritten with the figure)
    for name in ("e2e.png", "index.html"):
        rd = os.path.join(tmp, "rep_in_" + name)
        os.mkdir(rd)
        inside = os.path.join(rd, name)
        shutil.copy(out, inside)
        r6 = run("report", res, "-o", rd, "--e2e", inside, "--force", ok=False)
        check(r6.returncode == 1 and len(r6.stderr.strip().splitlines()) == 1 and
              "refusing to overwrite the input" in r6.stderr and
              open(inside, "rb").read() == open(out, "rb").read() and
              sorted(os.listdir(rd)) == [name],
              "report --e2e %s inside -o DIR: exit %d %r" % (name, r6.returncode, r6.stderr))
    print("ok: report refuses an --e2e input it would overwrite")

    # the table lists each policy's budgets smallest first, whatever order the file has
    rev = dict(e2e, runs=e2e["runs"][::-1])
    rj = os.path.join(tmp, "rev.json")
    json.dump(rev, open(rj, "w"))
    run("report", res, "--e2e", rj, "-o", os.path.join(tmp, "rep3"))
    h3 = open(os.path.join(tmp, "rep3", "index.html")).read()
    t3 = h3[h3.index('<table id="e2e-table">'):]
    t3 = t3[:t3.index("</table>")]
    cells = [row.split("</td><td>")[:2] for row in t3.split("<tr><td>")[1:]]
    order = [(c[0], c[1]) for c in cells]
    want = sorted(order, key=lambda pb: ([x["policy"] for x in rev["runs"]].index(pb[0]),
                                         runs[pb]["budget_tokens"]))
    check(order == want and len(order) == len(e2e["runs"]),
          "e2e table order %s, want %s" % (order[:6], want[:6]))
    # a damaged e2e.json: one line, no report
    for name, text, want in (("cut.json", open(out).read()[:200], "is not valid JSON"),
                             ("v2.json", json.dumps(dict(e2e, e2e_version=2)), "e2e_version 2"),
                             ("nokl.json", json.dumps(dict(e2e, runs=[
                                 {k: v for k, v in e2e["runs"][1].items() if k != "kl_mean"}])),
                              "runs[0] lacks a field"),
                             ("neg.json", json.dumps(dict(e2e, runs=[
                                 dict(e2e["runs"][1], kl_mean=-1.0)])), "are not a KL >= 0"),
                             ("fp.json", json.dumps(dict(e2e, traces=[
                                 dict(t0, fingerprint="0123")])), "is not 16 hex digits")):
        bp = os.path.join(tmp, name)
        open(bp, "w").write(text)
        rd = os.path.join(tmp, "rep_" + name)
        r4 = run("report", res, "--e2e", bp, "-o", rd, ok=False)
        check(r4.returncode == 1 and len(r4.stderr.strip().splitlines()) == 1 and
              want in r4.stderr and not os.path.exists(os.path.join(rd, "index.html")),
              "report --e2e %s: exit %d %r" % (name, r4.returncode, r4.stderr))

    # refusals: one line, exit 1 (2 for usage), no output
    def bad(args, want, code=1):
        o = os.path.join(tmp, "bad.json")
        r = run("e2e-llama2c", *args, "-o", o, ok=False)
        lines = r.stderr.strip().splitlines()
        ok = r.returncode == code and len(lines) == 1 and want in r.stderr and \
            not os.path.exists(o)
        check(ok, "%s: exit %d %r (want %r)" % (args, r.returncode, r.stderr, want))
        if ok:
            print("ok: refused: %s" % lines[0])

    syn = os.path.join(tmp, "syn.kvt")
    run("synth", "--shape", "tiny", "--tokens", "32", "--window", "8", "-o", syn)
    bad([syn, "--model", MODEL], "is another model")
    nod = os.path.join(tmp, "nodecode.kvt")
    run("capture-llama2c", "--model", MODEL, "--tokens", "40", "--decode", "0", "--window", "8",
        "-o", nod)
    bad([nod, "--model", MODEL], "has no decode steps")
    bad([tr], "--model FILE is required", 2)
    os.mkdir(os.path.join(tmp, "d2"))  # the same name in two directories, external's DIR
    shutil.copy(tr, os.path.join(tmp, "d2", "t.kvt"))
    bad([tr, os.path.join(tmp, "d2", "t.kvt"), "--model", MODEL, "--policies",
         "external:scores=%s" % tmp], "would both read", 2)
    # the same trace with layer 0's keys changed: not this model's run over these tokens
    forged = os.path.join(tmp, "forged.kvt")
    with kvtrace.open(tr) as t:
        with kvtrace.TraceWriter(forged, t.header) as w:
            for i, rec in enumerate(t.records):
                if rec["kind"] in ("meta_json",):
                    continue
                data = t.read_record(i)
                if rec["kind"] == "K" and rec["layer"] == 0:
                    data = (data.astype(np.float32) * 1.5).astype(data.dtype)
                w.append(rec["kind"], data, layer=rec["layer"] if rec["layer"] >= 0 else None,
                         head_begin=rec["head_begin"], tok_begin=rec["tok_begin"])
    bad([forged, "--model", MODEL], "was not captured from")
    # a header whose n_tokens is not its records' (checked before the keys are read)
    forged2 = os.path.join(tmp, "forged2.kvt")
    with kvtrace.open(tr) as t:
        hdr = dict(t.header, n_tokens=T + 8)
        with kvtrace.TraceWriter(forged2, hdr) as w:
            for i, rec in enumerate(t.records):
                if rec["kind"] != "meta_json":
                    w.append(rec["kind"], t.read_record(i),
                             layer=rec["layer"] if rec["layer"] >= 0 else None,
                             head_begin=rec["head_begin"], tok_begin=rec["tok_begin"])
    bad([forged2, "--model", MODEL], "layer 0 K is missing or does not match the header")

finish("test_e2e_llama2c")
