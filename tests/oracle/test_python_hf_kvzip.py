#!/usr/bin/env python3
"""test_python_hf_kvzip.py - kvtrace.hf.kvzip_scores (KVzip's context-reconstruction scores of a
HF transformers model, as kvpress's KVzipPress computes them) and kvtrace.capture(...,
kvzip=scores).

The model is test_python_hf_capture.py's random-init Llama (3 layers, 8 query heads on 2 KV
heads, head dim 8; the real transformers when it imports, else the test stand-in). Checks:
  * the scores of a 40-token prompt (prefix_length 2, chunks of 16: [2, 18), [18, 34),
    [34, 40); instruction ids [3, 4] before the first chunk, [5] and the previous chunk's last
    8 tokens before the others, suffix [6, 7]) against NumPy from an independent run: for each
    chunk, one uncached forward of prompt + repeat input whose attention inputs a recorder
    keeps, and, in float64, each repeat query's softmax over the keys [0, min(4, start)),
    the chunk and the repeat keys up to its own; a key's score the largest over the group's
    query heads and the repeat rows. Tokens before prefix_length: 1 (below n_sink = 4);
  * the attention registry is restored, also when a chunk's forward raises;
  * kvzip_prompts builds kvpress's prompts from a tokenizer's chat template (and "\\n" without
    one), and kvzip_scores uses them;
  * kvtrace.capture(model, path, kvzip=scores) stores them as the kvzip_score records, bit for
    bit, with the rest of the trace as without, and how they were made as capture.kvzip; a wrong shape or a prompt of another length
    is refused with a message saying so; `kvtrace replay --policies kvzip` runs on the trace.
Environment: KVT_SOURCE_ROOT, KVT_LIB, KVT_BIN. Exit 0 pass, 1 fail, 77 not run (no NumPy or
torch for this interpreter)."""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_python_hf_capture as hc  # noqa: E402 - exits 77 without NumPy or torch

np, torch, kvtrace, hf = hc.np, hc.torch, hc.kvtrace, hc.hf
check, expect_error = hc.check, hc.expect_error

TP, CHUNK, PREFIX, N_SINK, TAIL = 40, 16, 2, 4, 8
FIRST, LATER, SUFFIX = [3, 4], [5], [6, 7]


def oracle(model, ids):
    """[L, Hkv, TP] float64 scores from one uncached forward per chunk (the recorder's q, k)."""
    x = [int(t) for t in ids[0]]
    out = np.zeros((hc.L, hc.HKV, TP))
    out[:, :, :N_SINK] = 1.0
    G = hc.HQ // hc.HKV
    prev = []
    for i, a in enumerate(range(PREFIX, TP, CHUNK)):
        b = min(a + CHUNK, TP)
        lead = FIRST if i == 0 else LATER + prev[-TAIL:]
        rep = lead + SUFFIX + x[a:b]
        nq, sink = len(rep), min(N_SINK, a)
        with hc.Recorder() as rec, torch.no_grad():
            model(input_ids=torch.tensor([x + rep]), use_cache=False)
        pre, _ = rec.split()
        for layer in range(hc.L):
            q, k, _ = pre[layer]  # [1, Hq, N, D], [1, Hkv, N, D]
            q, k = q[0].astype(np.float64), k[0].astype(np.float64)
            for g in range(hc.HKV):
                keys = np.concatenate([k[g, :sink], k[g, a:b], k[g, TP:]])
                best = np.zeros(b - a)  # the chunk's scores replace the initial ones
                for h in range(g * G, (g + 1) * G):
                    for r in range(nq):
                        z = keys[:sink + b - a + r + 1] @ q[h, TP + r] / np.sqrt(hc.D)
                        p = np.exp(z - z.max())
                        p /= p.sum()
                        best = np.maximum(best, p[sink:sink + b - a])
                out[layer, g, a:b] = best
        prev = x[a:b]
    return out


class FakeTokenizer(object):
    """Each character is a token (ord % vocab); a chat template wraps the user turn."""

    def __init__(self, template):
        self.chat_template = "fake" if template else None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % hc.VOCAB for c in text]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, enable_thinking):
        return "<s>[U]" + messages[0]["content"] + "[/U]\n[A]"


def main():
    model = hc.build()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, hc.VOCAB, (1, TP), generator=g)
    orig = hc.registry()["sdpa"]
    s = hf.kvzip_scores(model, ids, chunk=CHUNK, prefix_length=PREFIX, first_ids=FIRST,
                        later_ids=LATER, suffix_ids=SUFFIX, n_sink=N_SINK, tail=TAIL)
    check(hc.registry()["sdpa"] is orig, "kvzip_scores restored the attention registry")
    want = oracle(model, ids)
    d = np.abs(s - want)
    check(s.shape == (hc.L, hc.HKV, TP) and s.dtype == np.float32,
          "scores [%d, %d, %d] float32 (%s %s)" % (hc.L, hc.HKV, TP, s.shape, s.dtype))
    check(d.max() < 1e-5, "scores equal the uncached NumPy recomputation (%d values, largest "
          "difference %.2g)" % (s.size, d.max()))
    check((s[:, :, :PREFIX] == 1).all() and (s >= 0).all() and (s <= 1).all(),
          "prefix tokens below n_sink score 1; every score in [0, 1]")
    # chunk 0 has no sinks (start 2: min(4, 2) = 2 sinks; a different n_sink changes chunk 0)
    s2 = hf.kvzip_scores(model, ids, chunk=CHUNK, prefix_length=PREFIX, first_ids=FIRST,
                         later_ids=LATER, suffix_ids=SUFFIX, n_sink=0, tail=TAIL)
    check(np.abs(s2 - s)[:, :, PREFIX:].max() > 1e-3, "n_sink changes the scores")

    # a chunk's forward that raises (an instruction id outside the vocabulary) leaves the
    # registry as it was
    expect_error(lambda: hf.kvzip_scores(model, ids, chunk=CHUNK, first_ids=[hc.VOCAB + 5]),
                 [], "an instruction id outside the vocabulary", exc=Exception)
    check(hc.registry()["sdpa"] is orig, "the registry is restored after a failed chunk")
    # an empty prompt is named as such (was: "prefix_length = 0 is out of range [0, -1]")
    expect_error(lambda: hf.kvzip_scores(model, ids[:, :0]), ["the prompt to score is empty"],
                 "an empty prompt")

    # kvpress's prompts from a tokenizer
    tok = FakeTokenizer(True)
    pl, f, lt, sf = hf.kvzip_prompts(tok)
    check(pl == len("<s>[U]") and f == tok.encode(hf.KVZIP_FIRST) and
          lt == tok.encode(hf.KVZIP_LATER) and sf == tok.encode("[/U]\n[A]"),
          "kvzip_prompts: the chat template's prefix (%d) and suffix, kvpress's instructions"
          % pl)
    pl0, _, _, sf0 = hf.kvzip_prompts(FakeTokenizer(False))
    check(pl0 == 0 and sf0 == [ord("\n") % hc.VOCAB], "kvzip_prompts without a template")
    st = hf.kvzip_scores(model, ids, tokenizer=tok, chunk=CHUNK)
    se = hf.kvzip_scores(model, ids, chunk=CHUNK, prefix_length=pl, first_ids=f, later_ids=lt,
                         suffix_ids=sf)
    check(np.array_equal(st, se), "kvzip_scores(tokenizer=) uses kvzip_prompts")

    # the capture stores them
    with tempfile.TemporaryDirectory() as tmp:
        path, plain = os.path.join(tmp, "kz.kvt"), os.path.join(tmp, "plain.kvt")
        for p, kz in ((path, s), (plain, None)):
            with kvtrace.capture(model, p, window=4, decode=3, kvzip=kz):
                hc.generate(model, ids)
        with kvtrace.open(path) as t, kvtrace.open(plain) as t0:
            got = np.stack([t.read("kvzip_score", layer)[:, :, 0] for layer in range(hc.L)])
            check(np.array_equal(got, s), "capture(kvzip=) stores the scores bit for bit")
            check(not t0.has("kvzip_score", 0), "a capture without kvzip= stores none")
            same = all(np.array_equal(t.read(k, layer), t0.read(k, layer))
                       for layer in range(hc.L) for k in ("K", "V", "Q_window", "Q_decode"))
            check(same, "the rest of the trace is as without kvzip=")
            want = {"source": "kvtrace.hf.kvzip_scores", "chunk": CHUNK, "n_sink": N_SINK,
                    "tail": TAIL, "prefix_length": PREFIX, "first_instruction_ids": 2,
                    "later_instruction_ids": 1, "suffix_ids": 2}
            got_info = t.header["capture"].get("kvzip")
            check(got_info == want, "the header's capture.kvzip says how they were made: %s"
                  % got_info)
            check("kvzip" not in t0.header["capture"], "no capture.kvzip without kvzip=")
        given = os.path.join(tmp, "given.kvt")  # a plain array: its origin is not known
        with kvtrace.capture(model, given, window=4, decode=3, kvzip=np.array(s)):
            hc.generate(model, ids)
        with kvtrace.open(given) as t:
            check(t.header["capture"].get("kvzip") == {"source": "given"},
                  "a plain array's capture.kvzip: %s" % t.header["capture"].get("kvzip"))
        expect_error(lambda: kvtrace.capture(model, plain, kvzip=s[:, :1], force=True),
                     ["kvzip", "KV heads"], "kvzip= of the wrong shape")

        def short():
            with kvtrace.capture(model, plain, kvzip=s[:, :, :-1], force=True):
                hc.generate(model, ids)
        expect_error(short, ["kvzip", "39 tokens", "40"], "kvzip= of another prompt length")
        bin_ = os.environ.get("KVT_BIN")
        if bin_:
            r = subprocess.run([bin_, "replay", path, "--policies", "kvzip,kvzip:layerwise=1",
                                "--window", "4", "--budgets", "8,50%", "-o",
                                os.path.join(tmp, "r.json")], capture_output=True, text=True)
            check(r.returncode == 0, "kvtrace replay --policies kvzip on the HF trace (%s)"
                  % r.stderr.strip()[-200:])
    if hc.FAILS:
        print("%d check(s) failed" % len(hc.FAILS))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
