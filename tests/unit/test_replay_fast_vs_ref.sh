#!/bin/bash
# test_replay_fast_vs_ref.sh - a whole replay with the fast CPU kernels (the default) against
# the same replay with the plain references (KVT_KERNELS=ref), every policy (the 14 of 'all'
# and h2o, oracle, quest, lagkv, qfilter, cur, hybridkv-like, lightkv-like, sparsemm, headkv,
# mixkv-sparsemm; knorm, cur and expected-attention with adaptive=1; keydiff-block, whose sets
# are measured budget by budget; simlayerkv, which reads the window probabilities on the host;
# snapkv:merge=weighted, whose merged sets are measured on the host; finch; cam; fastv,
# ranked per trace from layer 0 before the layers are replayed; lookm, merged and not, a
# ranking per budget; cake, its layer budgets from every layer's window attention;
# elastic-cache, merged into anchors by position; chunkkv:reuse=2, each layer pair keeping its
# first layer's chunks; vl-cache on the vision-language trace, its layer budgets and scores
# from every layer's post-vision attention, and aircache-like, from its elite instruction
# tokens' attention; snapkv and h2o with think=, their kept keys' channels pruned on the host;
# adakv and h2o with layer_weights= on the sample, each layer at its own budgets; snapkv and
# keydiff-block with chunk_length=; snapkv, tova, keydiff, expected-attention, leverage,
# compactor and streamingllm with chunk_scores=, each chunk scored on its own on the host;
# expected-attention with stats=; knorm, keydiff, qfilter, tova, streamingllm and
# expected-attention with decoding=, rkv, knorm
# with dms_decoding=1 and h2o-greedy with decode=1, their caches measured through the decode
# steps on the host)
# at several budgets, on the bundled real trace and on a synthetic
# vision-language trace long enough for several 256-key blocks. Kept counts and every metric
# but the output error and coverage must agree within 1e-9. Coverage comes from an f32 cosine
# table in both paths, a dense f32 product on the fast path: it may differ by a few f32 ulps
# (within 1e-6).
# The output errors may differ more: both paths store probabilities in f32, the fast path's
# logits differ from the reference's in the last bits of a double, which now and then moves a
# probability by one f32 ulp, and a relative error ||o_S - o|| / ||o|| whose ||o|| is small
# amplifies that (seen: 4.5e-5 on an error of 1.1 for knorm on the sample trace). So errors
# must agree within 1e-3, and at most 1% of them may differ by more than 1e-9. A third trace
# has Q_all and no stored column sums, so that h2o's sums are computed by the replay (and
# h2o-greedy, expected-attention, noncausal-attention and compactor, which read Q_all, run, and
# leverage,
# which un-rotates the keys); a fourth has a prompt of
# 4300 tokens, so that the rankings with --device cuda run on the GPU; a fifth has one layer of
# Qwen2-VL-7B's shape (28 query heads on 4 KV heads: groups of 7; D = 128); a sixth is a
# stories260K capture with KVzip's scores, whose kvzip sets are shared unevenly over layers and
# heads (some heads keep no prompt key at 4 tokens with sinks=0). The synthetic traces
# store K and V in bf16 (the Q_all one in f16), which --device cuda uploads as stored and widens
# on the GPU; the policies that read K or V on the host (quest, lagkv, qfilter, cur, the merging
# ones, the Q_all ones) then get them widened on the host. The vision-language trace is also written in
# small records (several per tensor), which must give exactly its metrics.
#
# With the argument `cuda` (test_replay_device_gpu, label gpu) the first replay is
# `--device cuda` with the reference kernels on the host (KVT_KERNELS=ref), so the layer
# context from the CUDA kernels is held to the same bounds against the all-reference replay;
# `--device cuda:0` gives the same results and `cuda:63` (not there) one line naming it;
# without a usable GPU that test is "not run".
set -u
MODE=${1:-fast}
BIN=${KVT_BIN:?}
ROOT=${KVT_SOURCE_ROOT:?}
PY=${KVT_PYTHON:-/usr/bin/python3}
SAMPLE=$ROOT/traces/samples/stories260K.kvt
[ -f "$SAMPLE" ] || { echo "SKIP: no sample trace"; exit 77; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAILED: $*"; exit 1; }
FIRST=()
if [ "$MODE" = cuda ]; then
    if ! $BIN replay "$SAMPLE" --policies full --budgets 16 --device cuda --profile \
        -o "$TMP/probe.json" >/dev/null 2>"$TMP/err"; then
        grep -q "no usable CUDA device\|built without CUDA" "$TMP/err" && {
            echo "SKIP: $(cat "$TMP/err")"
            exit 77
        }
        cat "$TMP/err"
        fail "replay --device cuda"
    fi
    grep -q "^profile: gpu sweep kernels .* TFLOP" "$TMP/err" || fail "--profile has no GPU lines"
    grep -q "^profile: gpu sweep kernels by kind: output sweeps [0-9.]* s, coverage" "$TMP/err" \
        || fail "--profile does not split the sweep kernels by kind"
    grep -q "^profile: gpu: device released in [0-9.]* s (" "$TMP/err" \
        || fail "the GPU was not released while the results were written"
    # the copies and the host's waits timed without waiting for the events (ctx_gpu.c's tm_*)
    awk '/^profile: gpu upload \(host to device\)/ && $(NF - 1) > 0 { ok = 1 } END { exit !ok }' \
        "$TMP/err" || fail "--profile booked no time to the uploads"
    grep -q "^profile: gpu: the host waited [1-9][0-9]* times" "$TMP/err" \
        || fail "--profile does not count the host's waits"
    grep -q "^profile: gpu memory: .* on device 0: " "$TMP/err" || fail "--profile names no device"
    # a device chosen by number: device 0 gives the same results; one that is not there is one
    # line naming it
    $BIN replay "$SAMPLE" --policies full --budgets 16 --device cuda:0 -o "$TMP/probe0.json" \
        >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "--device cuda:0"; }
    cmp -s "$TMP/probe.json" "$TMP/probe0.json" || fail "--device cuda:0 differs from cuda"
    $BIN replay "$SAMPLE" --policies full --budgets 16 --device cuda:63 -o "$TMP/x.json" \
        >/dev/null 2>"$TMP/err" && fail "--device cuda:63 ran"
    [ "$(wc -l <"$TMP/err")" -eq 1 ] && grep -q "CUDA device 63: not there ([0-9]* visible: " \
        "$TMP/err" || { cat "$TMP/err"; fail "--device cuda:63: the message"; }
    FIRST=(env KVT_KERNELS=ref)
fi
$BIN synth --shape tiny-vl --tokens 700 --decode 8 --seed 3 -o "$TMP/vl.kvt" >/dev/null 2>&1 \
    || fail "synth"
# h2o from Q_all (no stored column sums): the replay computes the sums itself
$BIN synth --shape tiny --tokens 300 --decode 4 --seed 5 --q-all --colsum off --dtype f16 \
    -o "$TMP/qa.kvt" >/dev/null 2>&1 || fail "synth q-all"
# expected-attention:stats= (kvpress's ExpectedAttentionStatsPress): statistics of that trace's
# shape written by plain Python (no library in the interpreter: under ASan it cannot load one)
read -r SL SH SD < <($BIN info "$TMP/qa.kvt" |
    sed -n 's/^shape *L=\([0-9]*\) Hq=\([0-9]*\) Hkv=[0-9]* *D=\([0-9]*\).*/\1 \2 \3/p')
"$PY" - "$TMP/st.safetensors" "$SL" "$SH" "$SD" <<'PYEOF' || fail "stats file"
import json, random, struct, sys
L, H, D = map(int, sys.argv[2:5])
rnd = random.Random(7)
mean = [rnd.gauss(0, 1) for _ in range(L * H * D)]
cov = []
for _ in range(L * H):  # A A^T / D: symmetric, positive semi-definite
    A = [[rnd.gauss(0, 1) for _ in range(D)] for _ in range(D)]
    cov += [sum(A[i][k] * A[j][k] for k in range(D)) / D for i in range(D) for j in range(D)]
m, c = struct.pack("<%dd" % len(mean), *mean), struct.pack("<%dd" % len(cov), *cov)
hdr = json.dumps({"query_mean": {"dtype": "F64", "shape": [L, H, D], "data_offsets": [0, len(m)]},
                  "query_cov": {"dtype": "F64", "shape": [L, H, D, D],
                                "data_offsets": [len(m), len(m) + len(c)]}}).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(hdr)) + hdr + m + c)
PYEOF
STATS=",expected-attention:stats=$TMP/st.safetensors,expected-attention:stats=$TMP/st.safetensors,heads=query,chunk_length=64,chunk_scores=kvpress"
# a prompt long enough (over 4096 ranked tokens) for the GPU's rankings (kvt_ctx_gpu_rank)
$BIN synth --shape tiny --tokens 4300 --decode 4 --seed 9 -o "$TMP/long.kvt" >/dev/null 2>&1 \
    || fail "synth long"
# a real model's head layout: odd query groups, the kernels' D = 128 paths
$BIN synth --shape qwen2-vl-7b --layers 1 --tokens 200 --decode 4 --seed 12 -o "$TMP/qvl.kvt" \
    >/dev/null 2>&1 || fail "synth qwen2-vl-7b"
$BIN capture-llama2c --model "$ROOT/models/stories260K.bin" --tokens 300 --decode 4 --window 8 \
    --kvzip -o "$TMP/kz.kvt" >/dev/null 2>&1 || fail "capture --kvzip"
# SparseMM's per-head scores for the sample (5 layers x 8 query heads) and vl (2 x 4)
"$PY" -c 'import json, sys
for path, L, H in (("stories260K", 5, 8), ("vl", 2, 4)):
    json.dump([[((l * 7 + h * 3) % 11) / 10 for h in range(H)] for l in range(L)],
              open(sys.argv[1] + "/scores_" + path + ".json", "w"))' "$TMP" || fail "scores"
for tr in "$SAMPLE" "$TMP/vl.kvt" "$TMP/qa.kvt" "$TMP/long.kvt" "$TMP/qvl.kvt" "$TMP/kz.kvt"; do
    name=$(basename "$tr" .kvt)
    # every policy: the defaults, and those that need more than K, V and the window queries
    SET=(--policies "all,h2o,oracle,quest,lagkv,qfilter,qfilter:heads=query,cur,knorm:adaptive=1,cur:adaptive=1,keydiff-block:block=32,simlayerkv:threshold=0.3,snapkv:merge=weighted,finch,cam,hybridkv-like,lightkv-like,sparsemm:scores=$TMP/scores_$name.json,headkv:scores=$TMP/scores_$name.json,mixkv-sparsemm:scores=$TMP/scores_$name.json,fastv:dense_layers=1,fastv:dense_layers=1,last=2,lookm,lookm:merge=none,heads=query,recent_share=0.25,cake,cake:heads=query,gamma=0,elastic-cache,elastic-cache:heads=query,sinks=1,chunkkv:reuse=2,snapkv:think=0.4,think_window=8"
        --budgets 16,64,300,50% --threads 2 --seed 7)
    # layer_weights= (each layer's own budget; the oracle at those budgets) on the 5 layers
    [ "$name" = stories260K ] && printf '1 2 4 4 4\n' >"$TMP/lw5.txt" &&
        SET[1]+=",adakv:layer_weights=$TMP/lw5.txt,h2o:layer_weights=$TMP/lw5.txt,heads=query,snapkv:chunk_length=64,keydiff-block:block=32,chunk_length=100"
    [ "$name" = vl ] && SET[1]+=",vl-cache:last=16,vl-cache:last=4,heads=query,window=2,aircache-like:last=16,aircache-like:last=8,heads=query,threshold=0.5"
    [ "$name" = qa ] &&
        SET=(--policies h2o,h2o-greedy,h2o-greedy:heads=query,reduce=max,h2o-greedy:decode=1,window=8,h2o-greedy:decode=1,heads=query,lookm,snapkv,full,expected-attention,noncausal-attention,expected-attention:adaptive=1,leverage,leverage:sketch=0,heads=query,compactor,compactor:heads=query,blend=0.5,h2o:think=0.3,heads=query,think_window=8,think_recent=0,snapkv:window=8,chunk_length=64,chunk_scores=kvpress,tova:chunk_length=100,chunk_scores=own,keydiff:chunk_length=50,chunk_scores=own,heads=query,expected-attention:chunk_length=64,chunk_scores=kvpress,leverage:sketch=0,chunk_length=64,chunk_scores=own,streamingllm:chunk_length=64,chunk_scores=own,compactor:chunk_length=80,chunk_scores=kvpress,sketch=8,expected-attention:decoding=3,sinks=2,prefill=1,expected-attention:decoding=2,sinks=1,heads=query$STATS --budgets 8,16,32,64,128,50% --threads 2 --seed 7)
    [ "$name" = long ] &&
        SET=(--policies snapkv,pyramidkv,adakv,knorm,streamingllm,oracle --budgets 64,512,10%
            --threads 2 --seed 7)
    [ "$name" = qvl ] && SET=(--policies all,h2o,oracle,quest,knorm:decoding=2,keydiff:decoding=1,prefill=1,heads=query,qfilter:decoding=2,tova:decoding=1,prefill=1,tova:decoding=3,heads=query,streamingllm:decoding=1,prefill=1,knorm:dms=-17.9,dms_decoding=1,dms_window=2,rkv:interval=2,rkv:interval=3,heads=query,reduce=mean
        --budgets 16,64,50% --threads 2 --seed 7)
    [ "$name" = kz ] && SET=(--policies kvzip,kvzip:layerwise=1,sinks=0,snapkv:window=8
        --budgets 4,16,64,50% --threads 2 --seed 7)
    DEV=()
    [ "$MODE" = cuda ] && DEV=(--device cuda)
    "${FIRST[@]}" $BIN replay "$tr" "${SET[@]}" "${DEV[@]}" -o "$TMP/$name.fast.json" >/dev/null \
        2>"$TMP/err" || { cat "$TMP/err"; fail "$MODE replay of $name"; }
    KVT_KERNELS=ref $BIN replay "$tr" "${SET[@]}" -o "$TMP/$name.ref.json" >/dev/null \
        2>"$TMP/err" || { cat "$TMP/err"; fail "reference replay of $name"; }
    "$PY" - "$TMP/$name.fast.json" "$TMP/$name.ref.json" <<'PYEOF' || fail "$name differs"
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
worst, werr, wcov = [0.0, ""], [0.0, ""], [0.0, ""]
n, n_err, n_err_off = [0], [0], [0]
def walk(x, y, path):
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), path
        for k in x:
            walk(x[k], y[k], path + "/" + k)
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            walk(u, v, "%s[%d]" % (path, i))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        assert isinstance(y, (int, float)), path
        n[0] += 1
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), path
            return
        d = abs(x - y)
        is_err = "/err_" in path or path.endswith("err_window") or path.endswith("err_decode")
        w = werr if is_err else (wcov if "coverage" in path else worst)
        n_err[0] += is_err
        n_err_off[0] += is_err and d > 1e-9
        if d > w[0]:
            w[:] = [d, path]
    elif x != y and not path.endswith("generator") and not path.endswith("/device"):
        raise AssertionError("%s: %r != %r" % (path, x, y))
walk(a, b, "")
print("compared %d numbers: largest difference %.3g at %s; coverage: largest %.3g at %s; "
      "output errors: %d of %d differ by more than 1e-9, largest %.3g at %s"
      % (n[0], worst[0], worst[1], wcov[0], wcov[1], n_err_off[0], n_err[0], werr[0], werr[1]))
assert n[0] > 1000 and worst[0] <= 1e-9, worst
assert wcov[0] <= 1e-6, wcov
assert werr[0] <= 1e-3 and n_err_off[0] <= 0.01 * n_err[0], werr
PYEOF
done
# the vision-language trace written in small records (split along heads and tokens; with
# --device cuda, read ahead or streamed through pinned memory and merged on the GPU): the same
# metrics as the trace in one record per tensor, exactly
$BIN synth --shape tiny-vl --tokens 700 --decode 8 --seed 3 --record-bytes 2k \
    -o "$TMP/vl_split.kvt" >/dev/null 2>&1 || fail "synth split"
SET=(--policies "all,h2o,oracle,quest,lagkv,qfilter,qfilter:heads=query,cur,knorm:adaptive=1,cur:adaptive=1,keydiff-block:block=32,simlayerkv:threshold=0.3,snapkv:merge=weighted,finch,cam,hybridkv-like,lightkv-like,sparsemm:scores=$TMP/scores_vl.json,headkv:scores=$TMP/scores_vl.json,mixkv-sparsemm:scores=$TMP/scores_vl.json,fastv:dense_layers=1,fastv:dense_layers=1,last=2,lookm,lookm:merge=none,heads=query,recent_share=0.25,cake,cake:heads=query,gamma=0,elastic-cache,elastic-cache:heads=query,sinks=1,chunkkv:reuse=2,snapkv:think=0.4,think_window=8,vl-cache:last=16,vl-cache:last=4,heads=query,window=2,aircache-like:last=16,aircache-like:last=8,heads=query,threshold=0.5"
    --budgets 16,64,300,50% --threads 2 --seed 7)
"${FIRST[@]}" $BIN replay "$TMP/vl_split.kvt" "${SET[@]}" "${DEV[@]}" -o "$TMP/vl_split.json" \
    >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "$MODE replay of the split trace"; }
"$PY" - "$TMP/vl_split.json" "$TMP/vl.fast.json" <<'PYEOF' || fail "the split trace's metrics differ"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for r in (a, b):
    for t in r["traces"]:
        t.pop("path"), t.pop("fingerprint")
assert a["traces"] == b["traces"] and a["aggregate"] == b["aggregate"]
print("the trace in small records: the same metrics")
PYEOF
echo "$MODE == ref"
