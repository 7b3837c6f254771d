#!/usr/bin/env python3
"""test_recommend_e2e.py - `kvtrace recommend --e2e E2E.json --max-kl K`: the cheapest setting
whose measured mean next-token KL is at most K, from an end-to-end check's e2e.json.

  * a hand-made e2e.json whose answers are worked out below: the references (full, oracle), a
    setting that keeps the whole cache and a merged one that did not run are never chosen; a
    KL equal to the target meets it; a tie in kept share goes to the smaller KL, then to the
    earlier run; each policy's cheapest budget meeting the target, or its smallest KL; when
    nothing meets it, the nearest setting (smallest KL), exit 3 and one line on stderr; text
    and JSON agree;
  * a real e2e.json (kvtrace e2e-llama2c on the bundled trace, 36 settings) at 12 targets
    against the same rule written here in Python;
  * report --e2e --max-kl K: the section names the same setting (or the nearest), none
    without --max-kl; --max-kl without --e2e or below 0 refused;
  * refusals, exit 2 with one line: --max-kl without --e2e, --e2e with RESULTS or with
    --max-error, a KL target that is negative or not a number; exit 1 for a damaged file.
Environment: KVT_SOURCE_ROOT, KVT_BIN. Exit 0 pass, 1 fail, 77 not run."""
import json
import os
import tempfile

from cli_test import ROOT, check, finish, run

MODEL = os.path.join(ROOT, "models", "stories260K.bin")
SAMPLE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
POLICIES = ("full,streamingllm,snapkv,pyramidkv,adakv,knorm,h2o,random,quest,hybridkv-like,"
            "lookm,snapkv:heads=query,label=sq")
BUDGETS = "48,96,25%"


def setting(policy, budget, kept, kl, name=None, applied=True, tokens=16):
    return {"policy": policy, "name": name or policy.split(":")[0], "budget": budget,
            "budget_tokens": tokens, "kept_fraction": kept, "applied": applied,
            "kl_mean": kl if applied else None, "kl_max": 2 * kl if applied else None,
            "top1_agreement": 0.75 if applied else None, "nll_mean": 1.5 if applied else None,
            "proxy": {"err_decode": 0.25, "recall_decode": 0.5}, "per_trace": []}


RUNS = [setting("full", "16", 1.0, 0.0),              # 0: a reference
        setting("a", "16", 0.1, 0.5),                 # 1
        setting("a", "32", 0.2, 0.08),                # 2
        setting("b", "16", 0.1, 0.09),                # 3: ties with 4, earlier
        setting("c", "16", 0.1, 0.09),                # 4
        setting("c", "32", 0.1, 0.07),                # 5: the same share as 4, smaller KL
        setting("lookm", "8", 0.01, 0.0, applied=False),   # 6: not run
        setting("e", "100%", 1.0, 0.0),               # 7: keeps the whole cache
        setting("mine", "8", 0.02, 0.0, name="oracle"),    # 8: a reference by its name
        setting("g", "8", 0.05, 0.1)]                 # 9: exactly at 0.1
DOC = {"e2e_version": 1, "generator": "kvtrace test", "model": "hand.bin", "vocab_size": 32,
       "traces": [{"path": "t.kvt", "n_prompt": 64, "n_decode": 8}], "runs": RUNS,
       "spearman": {"err_decode_vs_kl": None, "missed_recall_decode_vs_kl": None,
                    "n_settings": 0}}


def rec(path, *args):
    return run("recommend", "--e2e", path, *args, ok=False)


def rule(runs, k):
    """The cheapest candidate with kl_mean <= k (kept share, then KL, then order), else None;
    and the nearest (smallest KL, then kept share) when none."""
    cand = [i for i, r in enumerate(runs) if r["applied"] and r["kl_mean"] is not None and
            r["kept_fraction"] is not None and r["kept_fraction"] < 1 and
            r["name"] not in ("full", "oracle")]
    ok = [i for i in cand if runs[i]["kl_mean"] <= k]
    if ok:
        return min(ok, key=lambda i: (runs[i]["kept_fraction"], runs[i]["kl_mean"], i)), None
    near = min(cand, key=lambda i: (runs[i]["kl_mean"], runs[i]["kept_fraction"], i)) \
        if cand else None
    return None, near


def main():
    work = tempfile.mkdtemp(prefix="kvt_rec_e2e_")
    hand = os.path.join(work, "hand.json")
    with open(hand, "w") as f:
        json.dump(DOC, f)

    # the default target, 0.1: g at 8 (KL exactly 0.1) is the cheapest meeting it
    r = rec(hand)
    check(r.returncode == 0 and r.stdout.startswith("recommended: g at 8 (16 tokens per head")
          and "mean KL 0.1 nats" in r.stdout and "keeping 5% of the KV cache (20x smaller)"
          in r.stdout and r.stderr == "", "default --max-kl 0.1: g at 8: %r %r" % (
              r.stdout[:300], r.stderr))
    check("measured end to end by kvtrace e2e-llama2c (the built-in llama2.c engine) on the "
          "model hand.bin, 1 trace, 8 decode steps in all" in r.stdout, "the source named")
    lines = r.stdout.splitlines()
    table = lines[lines.index("cheapest budget meeting the target, per policy:") + 1:]
    want = {"full": "(a reference)", "a": "32 (mean KL 0.08, keeps 20%)",
            "b": "16 (mean KL 0.09, keeps 10%)", "c": "32 (mean KL 0.07, keeps 10%)",
            "lookm": "- (no setting measured)", "e": "- (no setting measured)",
            "mine": "(a reference)", "g": "8 (mean KL 0.1, keeps 5%)"}
    got = {ln.split()[0]: ln.split(None, 1)[1] for ln in table}
    check(got == want, "per policy: %s" % got)

    # just below 0.1: b at 16 and c at 16/32 share 10%; c at 32 has the smaller KL
    r = rec(hand, "--max-kl", "0.0999", "--json")
    j = json.loads(r.stdout) if r.returncode == 0 else {}
    check(j.get("found") and j["recommendation"]["label"] == "c" and
          j["recommendation"]["budget"] == "32" and j["recommendation"]["kl_mean"] == 0.07 and
          j["recommendation"]["compression_ratio"] == 10 and j["target"] == 0.0999 and
          j["n_candidates"] == 6 and j["engine"] is None and j["source"] == "e2e",
          "--max-kl 0.0999: c at 32 (the tie in share to the smaller KL): %s" % r.stdout[:400])
    pol = {p["label"]: p for p in j.get("policies", [])}
    check(pol.get("b", {}).get("cheapest_meeting", {}).get("budget") == "16" and
          pol["a"]["cheapest_meeting"]["budget"] == "32" and
          pol["g"]["cheapest_meeting"] is None and pol["g"]["lowest_kl"]["kl_mean"] == 0.1 and
          pol["full"]["candidate"] is False and pol["mine"]["candidate"] is False and
          pol["lookm"]["lowest_kl"] is None, "JSON per policy: %s" % pol)
    # the tie of b and c at 16 (same share, same KL) goes to the earlier: drop c at 32
    tie = dict(DOC, runs=RUNS[:5] + RUNS[6:9])
    tj = os.path.join(work, "tie.json")
    with open(tj, "w") as f:
        json.dump(tie, f)
    r = rec(tj, "--max-kl", "0.09", "--json")
    j = json.loads(r.stdout) if r.returncode == 0 else {}
    check(j.get("recommendation", {}).get("label") == "b", "a tie goes to the earlier run: %s"
          % j.get("recommendation"))

    # nothing meets 0.01: exit 3, the nearest is c at 32 (KL 0.07), one line on stderr
    r = rec(hand, "--max-kl", "0.01")
    check(r.returncode == 3 and "no setting meets mean KL <= 0.01 (6 candidate settings "
          "measured)" in r.stdout and "nearest: c at 32" in r.stdout and
          r.stderr.strip().splitlines() == ["kvtrace recommend: no setting meets the target: "
                                            "mean KL <= 0.01 nats in %s (6 candidate settings)"
                                            % hand],
          "nothing meets 0.01: exit %d %r %r" % (r.returncode, r.stdout[:300], r.stderr))
    r = rec(hand, "--max-kl", "0.01", "--json")
    j = json.loads(r.stdout) if r.stdout else {}
    check(r.returncode == 3 and j.get("found") is False and j["recommendation"] is None and
          j["nearest"]["label"] == "c" and j["nearest"]["budget"] == "32",
          "nothing meets 0.01, JSON: %s" % r.stdout[:300])
    # an engine, as kvtrace.hf.e2e writes it, is named
    hfj = os.path.join(work, "hf.json")
    with open(hfj, "w") as f:
        json.dump(dict(DOC, engine={"name": "transformers", "version": "4.56.0",
                                    "attn_implementation": "sdpa", "dtype": "bfloat16",
                                    "device": "cuda:0"}), f)
    r = rec(hfj)
    check(r.returncode == 0 and "measured end to end by kvtrace.hf.e2e (transformers 4.56.0, "
          "sdpa, bfloat16 on cuda:0) on the model hand.bin" in r.stdout,
          "the engine of kvtrace.hf.e2e named: %r" % r.stdout[-400:])

    # a real e2e.json against the rule, at targets between its KLs
    real = os.path.join(work, "real.json")
    run("e2e-llama2c", SAMPLE, "--model", MODEL, "--policies", POLICIES, "--budgets",
        BUDGETS, "-o", real)
    with open(real) as f:
        runs = json.load(f)["runs"]
    kls = sorted({x["kl_mean"] for x in runs if x["applied"]})
    targets = [0.0, kls[1] / 2] + [kls[i] for i in range(1, len(kls), max(1, len(kls) // 9))]
    bad = []
    for k in targets:
        r = rec(real, "--max-kl", repr(k), "--json")
        j = json.loads(r.stdout)
        best, near = rule(runs, k)
        got = (j["recommendation"] or j.get("nearest") or {})
        want = runs[best if best is not None else near]
        if (r.returncode != (0 if best is not None else 3) or
                (got.get("label"), got.get("budget")) != (want["policy"], want["budget"]) or
                got.get("kl_mean") != want["kl_mean"]):
            bad.append((k, r.returncode, got.get("label"), got.get("budget"), want["policy"],
                        want["budget"]))
    check(len(targets) >= 10 and not bad, "the real file at %d targets: %s" % (len(targets),
                                                                               bad))

    # report --max-kl: the e2e section names recommend --e2e's answer (or the nearest)
    res = os.path.join(work, "res.json")
    run("replay", SAMPLE, "--policies", POLICIES, "--budgets", BUDGETS, "-o", res)
    for k, cls in (("1", ""), ("0", ' class="note"'), (None, None)):
        rd = os.path.join(work, "rep_%s" % k)
        r = run("report", res, "--e2e", real, "-o", rd, *(["--max-kl", k] if k else []))
        page = open(os.path.join(rd, "index.html")).read()
        if k is None:
            check('id="e2e-recommend"' not in page, "report without --max-kl: no KL answer")
            continue
        j = json.loads(rec(real, "--max-kl", k, "--json").stdout)
        x = j["recommendation"] or j["nearest"]
        want = '<p id="e2e-recommend"%s>By the model\'s own output: %s <b>%s at %s</b>' % (
            cls, "the cheapest setting of mean KL at most 1 nats is" if j["found"] else
            "no setting has a mean KL at most 0 nats; the nearest is", x["label"], x["budget"])
        check(want in page, "report --max-kl %s names recommend --e2e's %s at %s" % (
            k, x["label"], x["budget"]))
    for args, want in ((["--max-kl", "1"], "--max-kl needs --e2e"),
                       (["--e2e", real, "--max-kl", "-1"], "expected a finite number >= 0")):
        rd = os.path.join(work, "rep_bad")
        r = run("report", res, "-o", rd, *args, ok=False)
        check(r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and
              want in r.stderr and not os.path.exists(rd),
              "report %s: exit %d %r" % (" ".join(args), r.returncode, r.stderr))

    # refusals: one line each
    for args, want, code in (
            (["--max-kl", "0.1"], "--max-kl needs --e2e", 2),
            ([os.path.join(work, "r.json"), "--e2e", hand], "give no RESULTS", 2),
            (["--e2e", hand, "--max-error", "0.1"], "not by --max-error", 2),
            (["--e2e", hand, "--max-kl", "-1"], "expected a finite number >= 0", 2),
            (["--e2e", hand, "--max-kl", "nan"], "expected a finite number >= 0", 2),
            (["--e2e", hand, "--max-kl"], "--max-kl needs a value", 2),
            (["--e2e", os.path.join(work, "none.json")], "none.json", 1)):
        r = run("recommend", *args, ok=False)
        check(r.returncode == code and len(r.stderr.strip().splitlines()) == 1 and
              want in r.stderr and r.stdout == "",
              "recommend %s: exit %d %r" % (" ".join(args[-3:]), r.returncode, r.stderr))
    dmg = os.path.join(work, "dmg.json")
    with open(dmg, "w") as f:
        json.dump(dict(DOC, runs=[dict(RUNS[1], name=7)]), f)
    r = rec(dmg)
    check(r.returncode == 1 and "runs[0].name is not a string" in r.stderr and r.stdout == "",
          "a damaged e2e.json: exit %d %r" % (r.returncode, r.stderr))
    finish("test_recommend_e2e", work)


if __name__ == "__main__":
    main()
