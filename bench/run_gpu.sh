#!/usr/bin/env bash
# run_gpu.sh - the GPU benchmark of issue #7, one command for a device machine (H200, 16 cores,
# no network; nvcc, CMake, Python with torch): a llama3-8b-shaped synthetic trace at T=32768
# (bf16), all policies (streamingllm, h2o, snapkv, pyramidkv, adakv, knorm, random, oracle) at 8
# budgets, replayed by (most needed first, so that a short deadline cuts the least needed)
#   1. `kvtrace replay --device cuda` (its results must agree with the CPU replay's: every
#      metric mean within 1e-3, the bound tests/unit/test_replay_fast_vs_ref.sh sets on the
#      output errors; the other metrics agree far closer), then the device's ceilings,
#   2. bench/peer_torch.py --device cuda (the PyTorch peer: topk per budget, nothing shared),
#   3. `kvtrace replay --device cuda` again with one worker (the kernels on their own),
#   4. `kvtrace replay` on the CPU (threads = nproc),
# each one's wall time and results into $OUT as JSON, plus summary.md with the device name and
# the ratios (issue #7's target: the whole replay at least 10x faster than the PyTorch peer).
# The kernels' roofline (issue #7: within 3x): `replay --profile` books each kernel category's
# GPU time (CUDA events), the bytes it must move and, for attention and column sums, its FLOP;
# a second `--device cuda` replay with one worker on 2 of the layers gives those figures
# without other workers' kernels alongside, and a short torch step measures the device's
# ceilings (read and copy bandwidth of 1 GiB, f64 and f32 matmul); summary.md then holds, per
# category, the measured time against max(bytes / read bandwidth, FLOP / f64 rate): the kernels
# take logits and sums in double, in the references' order, to agree with them bit for bit.
#
# The trace: the first LAYERS layers of the llama3-8b shape (`kvtrace synth --layers`, records
# identical to the whole shape's). Its attention column sums (which h2o needs) are O(T^2 D) per
# head, one core per layer: at T=32768 about 5 CPU-minutes per layer (measured on a 2-core VM:
# 161 CPU-s for 32 layers at T=4096, x64), so a colsum synth would not fit in the minutes this
# script is sized for. So by default (COLSUM=gpu) the synth stores every prompt query instead
# (--q-all --colsum off: O(T) per layer; 289 CPU-s and 8.4 GB for 32 layers at T=32768 on that
# VM, half that for 16), and a short torch step on the GPU computes the same causal column sums
# from Q_all and K (f32 softmax, f64 sums, as kvt_synth_colsum_head; checked against the
# synth's own colsum at T=1024: 1.2e-6 relative, every other tensor bit-identical) and writes
# the layers, without Q_all, to the trace the three replays read. With COLSUM=synth or off the
# synth's own trace is the one they read.
# LAYERS=16 by default: one layer per core for the CPU replay (threads over layers). Estimates
# for 16 cores from the 2-core VM's rates: synth 15-30 s, colsum step 20-30 s (Q_all reads in
# parallel, ~0.3 s of GPU per layer), kvtrace CPU replay 3-5 s with OpenBLAS (12 CPU-s per
# layer without: 15-25 s), peer_torch 15-25 s (its host reads alone ~1 s per layer): 2-3
# minutes in all, 4 at worst; LAYERS=32 adds about a minute. COLSUM=synth uses
# `kvtrace synth --colsum on` instead (~5-6 min on 16 cores at T=32768 and LAYERS=16, ~10 at
# 32); COLSUM=off leaves h2o
# out.
#
# usage (on the device machine, from anywhere):  bash bench/run_gpu.sh
# environment (defaults in brackets):
#   OUT [/tmp/kvt_gpu_bench]  results: bench.json, summary.md, run_gpu.log, kvtrace_cpu.json,
#                             kvtrace_cuda.json, peer_torch.json, gpu_kernels.json (each kernel
#                             alone: bench_gpu_kernels), run_gpu_logs.tar.gz (every step's whole
#                             log) (at most 8 files, small)
#   WORK [/tmp/kvt_gpu_work]  traces (the synth with Q_all is about 4 GB at T=32768 and 16
#                             layers) and step logs; reused if present
#   KVT_BIN, KVT_LIB  the kvtrace CLI and libkvtrace.so to use (scripts/gpu_session.sh sets
#                     them to .devbundle's); else BUILD [build-gpu]: bin/kvtrace and
#                     libkvtrace.so there, configured and built here (Release, KVT_CUDA=AUTO)
#                     when either is missing. DEPS: a folder of shared libraries to put on
#                     LD_LIBRARY_PATH (for a build carried from elsewhere without an RPATH)
#   T [32768]  LAYERS [16]  COLSUM [gpu]  THREADS [nproc]  PROBES [256]  SEED [1]
#   POLICIES [streamingllm,h2o,snapkv,pyramidkv,adakv,knorm,random,oracle]
#   BUDGETS [64,128,256,512,1024,2048,5%,10%]
#   DEVICE [cuda]  device of peer_torch, of the colsum step and of kvtrace replay --device
#   PYTHON [python3]  a Python with torch and NumPy
#   FORCE [0]  1 = synthesise the traces again
#   REPEAT [3]  runs of `kvtrace replay --device cuda` without --profile after the profiled one
#               (the ratios take their median)
#   TAIL [12]  lines of each step's log shown after it
#   COLSUM_BLOCK [4096]  query rows per block in the colsum step (its logits and their softmax
#                        take 2 x G x BLOCK x T floats on the GPU, 4 GiB at T=32768 with G=4;
#                        lower it on a smaller GPU)
#   timeouts, seconds: TO_BUILD [300] TO_SYNTH [300] TO_COLSUM [240] TO_REPLAY [240]
#                      TO_PEER [300]
#   KVT_DEADLINE  epoch seconds by which the script must be done (scripts/gpu_session.sh sets
#                 it from its budget): every step's timeout is cut so that the summary is
#                 still written 20 s before it, and a step with under 10 s left is skipped
# Exit status: 0 when every step that ran succeeded, the peer agreed with kvtrace and
# kvtrace --device cuda agreed with the CPU replay (1e-3); 1 else.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=${OUT:-/tmp/kvt_gpu_bench}
WORK=${WORK:-/tmp/kvt_gpu_work}
BUILD=${BUILD:-build-gpu}
T=${T:-32768}
LAYERS=${LAYERS:-16}
COLSUM=${COLSUM:-gpu}
THREADS=${THREADS:-$(nproc)}
PROBES=${PROBES:-256}
SEED=${SEED:-1}
POLICIES=${POLICIES:-streamingllm,h2o,snapkv,pyramidkv,adakv,knorm,random,oracle}
BUDGETS=${BUDGETS:-64,128,256,512,1024,2048,5%,10%}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
FORCE=${FORCE:-0}
TO_BUILD=${TO_BUILD:-300}
TO_SYNTH=${TO_SYNTH:-300}
TO_COLSUM=${TO_COLSUM:-240}
TO_REPLAY=${TO_REPLAY:-240}
TO_PEER=${TO_PEER:-300}
REPEAT=${REPEAT:-3}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
GIVEN=${KVT_BIN:-}${KVT_LIB:-}
KVT=${KVT_BIN:-$BUILD/bin/kvtrace}
export KVT_LIB=${KVT_LIB:-$BUILD/libkvtrace.so}
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
[ -n "${DEPS:-}" ] && export LD_LIBRARY_PATH=$DEPS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/run_gpu.log") 2>&1
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
T_SCRIPT=$(now)
FAILED=()
declare -A WALL RC

# step NAME TIMEOUT CMD...: run CMD under timeout, output into $WORK/NAME.log (its tail shown);
# WALL[NAME] seconds, RC[NAME] exit status (124: timed out). Never stops the script.
step() {
    local name=$1 lim=$2 t0 rc left
    shift 2
    echo
    if [ -n "${KVT_DEADLINE:-}" ]; then
        left=$((KVT_DEADLINE - $(date +%s) - 20))
        if [ "$left" -lt 10 ]; then
            echo "== $name: skipped, ${left} s left before KVT_DEADLINE"
            WALL[$name]=0
            RC[$name]=124
            FAILED+=("$name (skipped: deadline)")
            return 0
        fi
        [ "$lim" -gt "$left" ] && lim=$left
    fi
    echo "== $name (timeout ${lim} s): $*"
    t0=$(now)
    set +e
    timeout "$lim" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    set -e
    WALL[$name]=$(secs "$t0" "$(now)")
    RC[$name]=$rc
    tail -n "${TAIL:-12}" "$WORK/$name.log"
    if [ "$rc" = 124 ]; then
        echo "$name: TIMED OUT after $lim s"
    fi
    echo "$name: exit $rc, ${WALL[$name]} s wall"
    [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
    # every step's whole log comes back (one file: the device tool returns few)
    (cd "$WORK" && tar -czf "$OUT/run_gpu_logs.tar.gz" ./*.log ./*_profile.txt) 2>/dev/null || true
    return 0
}

echo "== machine"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
GPU_NAME=${GPU_NAME:-none}
CPU_NAME=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1 || true)
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "gpu: $GPU_NAME"
echo "cpu: ${CPU_NAME:-?}, $(nproc) cores online; memory $(free -g 2>/dev/null | awk '/^Mem:/ { print $2 " GiB" }')"
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "$(git diff --quiet 2>/dev/null || echo '(working tree modified)')"
TORCH=$("$PYTHON" -c 'import numpy, torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())') \
    || { echo "run_gpu: $PYTHON has no torch or NumPy (set PYTHON)"; exit 1; }
echo "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])'), torch $TORCH"
echo "trace: llama3-8b shape, T=$T, first $LAYERS layers, colsum $COLSUM; policies $POLICIES;" \
     "budgets $BUDGETS; probes $PROBES; threads $THREADS"

# ---- build ----------------------------------------------------------------------------------
if [ ! -x "$KVT" ] || [ ! -e "$KVT_LIB" ]; then
    if [ -n "$GIVEN" ]; then
        echo "run_gpu: KVT_BIN ($KVT) or KVT_LIB ($KVT_LIB) does not exist"
        exit 1
    fi
    step build "$TO_BUILD" bash -c "cmake -S '$ROOT' -B '$BUILD' -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DKVT_CUDA=AUTO -DBUILD_TESTING=OFF && cmake --build '$BUILD' -j$(nproc) --target kvtrace_cli kvtrace \
        && { cmake --build '$BUILD' --target bench_gpu_peak bench_gpu_kernels >/dev/null 2>&1 || true; }" # (CUDA only)
    if [ "${RC[build]}" != 0 ]; then
        echo "run_gpu: the build failed (missing libraries? the CMake log above names them);" \
             "build elsewhere and pass BUILD= (and DEPS= for its shared libraries)"
        exit 1
    fi
fi
ldd "$KVT" "$KVT_LIB" > "$WORK/ldd.txt" 2>&1 || true  # one section per file, "FILE:" first
if grep -q 'not found' "$WORK/ldd.txt"; then
    grep 'not found' "$WORK/ldd.txt" | sort -u
    echo "run_gpu: shared libraries missing for $KVT (set DEPS to a folder holding them)"
    exit 1
fi
"$KVT" --help > /dev/null || { echo "run_gpu: $KVT does not run here"; exit 1; }
BLAS=no   # the CLI links the modules statically: its own libraries (its ldd section) tell
if awk -v f="$KVT:" '$0 == f { on = 1; next } /^[^[:space:]]/ { on = 0 } on' "$WORK/ldd.txt" |
    grep -q -i openblas; then
    BLAS=yes
fi
echo "kvtrace: $KVT, $KVT_LIB (CPU fast path with OpenBLAS: $BLAS)"

# ---- the trace ------------------------------------------------------------------------------
# FULL: the synth's output; TRACE: the trace the replays read (FULL itself unless COLSUM=gpu)
case $COLSUM in
gpu)   FULL=$WORK/llama3-8b_T${T}_L${LAYERS}_qall.kvt; SYNTH_ARGS=(--colsum off --q-all) ;;
synth) FULL=$WORK/llama3-8b_T${T}_L${LAYERS}_colsum.kvt; SYNTH_ARGS=(--colsum on) ;;
off)   FULL=$WORK/llama3-8b_T${T}_L${LAYERS}.kvt; SYNTH_ARGS=(--colsum off) ;;
*)     echo "run_gpu: COLSUM must be gpu, synth or off"; exit 1 ;;
esac
TRACE=$FULL
[ "$COLSUM" = gpu ] && TRACE=$WORK/llama3-8b_T${T}_L${LAYERS}_colsum-gpu.kvt
if [ ! -s "$TRACE" ] || [ "$FORCE" = 1 ]; then
    if [ ! -s "$FULL" ] || [ "$FORCE" = 1 ]; then
        # only the LAYERS layers used (records identical to the whole shape's first layers)
        step synth "$TO_SYNTH" "$KVT" synth --shape llama3-8b --tokens "$T" "${SYNTH_ARGS[@]}" \
            --layers "$LAYERS" --level 1 --seed "$SEED" --threads "$THREADS" --force -o "$FULL"
        [ "${RC[synth]}" = 0 ] || { rm -f "$FULL"; echo "run_gpu: no trace"; exit 1; }
    fi
    if [ "$COLSUM" = gpu ]; then
        # the first LAYERS layers of FULL without Q_all, plus attn_colsum computed from Q_all
        cat > "$WORK/colsum_cut.py" <<'EOF'
import json, math, os, sys, time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import kvtrace
src, dst, n_layers, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dev = torch.device(device)
if dev.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
BLOCK = int(os.environ.get("COLSUM_BLOCK", "4096"))


def colsum_group(q, k, scale):
    """Causal attention column sums of the G query heads q [G, T, D] on keys k [T, D]:
    out[h, j] = sum over i >= j of softmax over j' <= i of (q_hi * scale . k_j') at j
    (f32 softmax, f64 sums, as kvt_synth_colsum_head)."""
    G, T, D = q.shape
    out = torch.zeros(G, T, dtype=torch.float64, device=q.device)
    for i0 in range(0, T, BLOCK):
        i1 = min(T, i0 + BLOCK)
        z = torch.matmul(q[:, i0:i1] * scale, k[:i1].T)                      # [G, bs, i1]
        mask = (torch.arange(i1, device=q.device)[None, :]
                > torch.arange(i0, i1, device=q.device)[:, None])
        z.masked_fill_(mask, float("-inf"))
        out[:, :i1] += torch.softmax(z, dim=-1).sum(1, dtype=torch.float64)
        del z
    return out.float()


def read_layer(layer, kinds):
    """Every record of the layer in its stored dtype, and K and Q_all in float32; one reader
    per call, so that layers decompress in parallel (the binding releases the GIL)."""
    with kvtrace.open(src) as t:
        stored = [(k, t.read(k, layer=layer), t.stored_dtype(k, layer)) for k in kinds]
        return (stored, t.read("K", layer=layer, dtype="float32"),
                t.read("Q_all", layer=layer, dtype="float32"))


t0, tc = time.perf_counter(), 0.0
with kvtrace.open(src) as t:
    hdr = json.loads(json.dumps(t.header))
    L = int(hdr["model"]["n_layers"])
    n_layers = min(n_layers, L)
    Hq, Hkv, D = (int(hdr["model"][k]) for k in ("n_q_heads", "n_kv_heads", "head_dim"))
    G = Hq // Hkv
    scale = float(np.float32(1.0 / math.sqrt(D)))
    hdr["model"]["n_layers"] = n_layers
    syn = hdr.get("synthetic")
    if isinstance(syn, dict) and isinstance(syn.get("layers"), list):
        syn["layers"] = syn["layers"][:n_layers]
    hdr["cut_from"] = {"path": os.path.abspath(src), "n_layers": L}
    if not t.has("Q_all", 0):
        sys.exit("colsum: %s has no Q_all" % src)
    cap = hdr.setdefault("capture", {})
    cap["with_colsum"], cap["with_q_all"] = True, False
    hdr["colsum_from"] = ("Q_all and K, by bench/run_gpu.sh (torch %s on %s; f32 softmax, f64 "
                          "sums)" % (torch.__version__, device))
    tables, kinds = [], []
    for r in t.records:
        if r["layer"] < 0 and r["kind"] not in tables:
            tables.append(r["kind"])
        elif r["layer"] == 0 and r["kind"] not in ("Q_all", "attn_colsum", *kinds):
            kinds.append(r["kind"])
    lvl = int(cap.get("zstd_level", 3) or 3)
    n_cpu = os.cpu_count() or 2
    with kvtrace.TraceWriter(dst, hdr, level=lvl, n_threads=n_cpu, force=True) as w, \
            ThreadPoolExecutor(max_workers=max(1, min(8, n_cpu // 2))) as pool:
        for k in tables:
            w.append(k, t.read(k), dtype="bf16" if t.stored_dtype(k) == "bf16" else None)
        ahead = max(1, min(8, n_cpu // 2))
        todo = [pool.submit(read_layer, l, kinds) for l in range(min(ahead, n_layers))]
        for layer in range(n_layers):
            stored, K, Q = todo[layer].result()
            todo[layer] = None
            if layer + ahead < n_layers:
                todo.append(pool.submit(read_layer, layer + ahead, kinds))
            for k, a, sd in stored:
                w.append(k, a, layer=layer, dtype="bf16" if sd == "bf16" else None)
            c0 = time.perf_counter()
            K = torch.from_numpy(K).to(dev)
            cs = np.empty((Hq, K.shape[1], 1), dtype=np.float32)
            for g in range(Hkv):
                q = torch.from_numpy(Q[g * G:(g + 1) * G]).to(dev)
                cs[g * G:(g + 1) * G, :, 0] = colsum_group(q, K[g], scale).cpu().numpy()
            del stored, Q, q, K
            tc += time.perf_counter() - c0
            w.append("attn_colsum", cs, layer=layer)
            print("colsum: layer %d done, %.1f s" % (layer, time.perf_counter() - t0),
                  flush=True)
print("colsum: %d of %d layers of %s into %s in %.1f s (colsum %.1f s on %s)"
      % (n_layers, L, src, dst, time.perf_counter() - t0, tc, device))
EOF
        step colsum "$TO_COLSUM" "$PYTHON" "$WORK/colsum_cut.py" "$FULL" "$TRACE" "$LAYERS" "$DEVICE"
        [ "${RC[colsum]}" = 0 ] || { rm -f "$TRACE"; echo "run_gpu: no trace"; exit 1; }
    fi
fi
"$KVT" info "$TRACE" | tee "$WORK/trace_info.txt" | sed -n 1,4p
TRACE_MB=$(du -m "$TRACE" | cut -f1)
if ! grep -q '^attn_colsum' "$WORK/trace_info.txt"; then
    POLICIES=$(echo "$POLICIES" | tr ',' '\n' | grep -vx h2o | paste -sd, -)
    echo "no attn_colsum in the trace: h2o left out"
fi
sync
# --profile: the time split (read / context / sweeps; with --device cuda uploads, kernels
# with the bandwidth they achieved, downloads, the host's waits), kept as kvtrace_*_profile.txt
# (in the logs)
REPLAY_ARGS=(--policies "$POLICIES" --budgets "$BUDGETS" --coverage-probes "$PROBES" --force)

# ---- 1. kvtrace replay --device cuda --------------------------------------------------------
step kvtrace_cuda "$TO_REPLAY" "$KVT" replay "$TRACE" "${REPLAY_ARGS[@]}" --profile \
    --threads "$THREADS" --device "$DEVICE" -o "$OUT/kvtrace_cuda.json"
grep '^profile:' "$WORK/kvtrace_cuda.log" >"$WORK/kvtrace_cuda_profile.txt" || true
# then REPEAT runs without --profile, the run a user makes (these machines are shared and
# noisy): the ratios take their median wall time (the profiled run's when none finished), the
# summary lists every one and the profiled run's
CUDA_WALLS=
for ((r = 1; r <= REPEAT; r++)); do
    [ "${RC[kvtrace_cuda]}" = 0 ] || break
    step "kvtrace_cuda_$r" "$TO_REPLAY" "$KVT" replay "$TRACE" "${REPLAY_ARGS[@]}" \
        --threads "$THREADS" --device "$DEVICE" -o "$WORK/kvtrace_cuda_$r.json"
    [ "${RC[kvtrace_cuda_$r]}" = 0 ] && CUDA_WALLS="$CUDA_WALLS ${WALL[kvtrace_cuda_$r]}"
done
CUDA_WALLS=${CUDA_WALLS# }
# ---- the device's ceilings, measured here (the roofline the kernels are held to) -----------
cat > "$WORK/peak.py" <<'EOF2'
import json, sys, time
import torch
dev = torch.device(sys.argv[1])
cuda = dev.type == "cuda"
if cuda:
    m = torch.backends.cuda.matmul
    try:  # f32 means f32: torch >= 2.9 has fp32_precision, older ones allow_tf32
        m.fp32_precision = "ieee"
    except Exception:
        m.allow_tf32 = False
n = (1 << 28) if cuda else (1 << 22)   # floats: 1 GiB on the GPU, 16 MiB on the CPU
mm = 8192 if cuda else 512


def timed(fn, reps):
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


a = torch.rand(n, device=dev)
b = torch.empty_like(a)
t_copy = timed(lambda: b.copy_(a), 10)
t_read = timed(lambda: a.sum(), 10)
x = torch.rand(mm, mm, device=dev)
y = torch.rand(mm, mm, device=dev)
t_mm = timed(lambda: torch.matmul(x, y), 5)
x64, y64 = x.double(), y.double()
t_mm64 = timed(lambda: torch.matmul(x64, y64), 3)
r = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
     "copy_GBps": 2 * 4 * n / t_copy / 1e9, "read_GBps": 4 * n / t_read / 1e9,
     "fp32_matmul_TFLOPps": 2 * mm ** 3 / t_mm / 1e12,
     "fp64_matmul_TFLOPps": 2 * mm ** 3 / t_mm64 / 1e12, "bytes": 4 * n, "matmul_n": mm}
print(json.dumps(r))
json.dump(r, open(sys.argv[2], "w"), indent=1)
EOF2
step peak 60 "$PYTHON" "$WORK/peak.py" "$DEVICE" "$WORK/peak.json"
# the scalar f64 rates (bench/gpu_peak.cu): the replay kernels' own arithmetic, separate f64
# multiplies and adds, has a lower ceiling than the f64 matmul's tensor cores
PEAK_BIN=$(dirname "$KVT")/bench_gpu_peak
[ -x "$PEAK_BIN" ] || PEAK_BIN=$BUILD/bench/bench_gpu_peak
if [ "$DEVICE" = cuda ] && [ -x "$PEAK_BIN" ] && [ -f "$WORK/peak.json" ]; then
    step gpu_peak 60 "$PEAK_BIN"
    "$PYTHON" - "$WORK/peak.json" "$WORK/gpu_peak.log" <<'EOF2' || true
import json, sys
peak = json.load(open(sys.argv[1]))
for line in open(sys.argv[2]):
    if line.startswith("{"):
        g = json.loads(line)
        peak.update({k: g[k] for k in ("fp64_muladd_Gops", "fp64_fma_TFLOPps")})
json.dump(peak, open(sys.argv[1], "w"), indent=1)
EOF2
fi
# each replay kernel alone at this run's T (bench/gpu_kernels.c), against the ceilings above:
# which kernel is how far from its bound, and what a call costs the host beyond the GPU's time
KERN_BIN=$(dirname "$KVT")/bench_gpu_kernels
[ -x "$KERN_BIN" ] || KERN_BIN=$BUILD/bench/bench_gpu_kernels
if [ "$DEVICE" = cuda ] && [ -x "$KERN_BIN" ]; then
    # the f64 ceiling: the FMA rate in G op/s (an FMA as two), as the kernels' products of f32
    # values are fused multiply-adds (kvt_cu_madd_f32)
    read -r READ_GBS F64_GOPS < <("$PYTHON" -c 'import json, sys
try:
    p = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    p = {}
print(p.get("read_GBps") or 0, (p.get("fp64_fma_TFLOPps") or 0) * 1e3)' "$WORK/peak.json")
    step gpu_kernels 60 "$KERN_BIN" --tokens "$T" --probes "$PROBES" --read-gbs "$READ_GBS" \
        --f64-gops "$F64_GOPS" --json "$OUT/gpu_kernels.json"
fi

# ---- 2. the PyTorch peer on the GPU ---------------------------------------------------------
CMP="$OUT/kvtrace_cuda.json" # its metrics checked against kvtrace's (the CPU run's without it)
[ -s "$CMP" ] || CMP="$OUT/kvtrace_cpu.json"
step peer_torch "$TO_PEER" "$PYTHON" bench/peer_torch.py "$TRACE" --device "$DEVICE" \
    --policies "$POLICIES" --budgets "$BUDGETS" --probes "$PROBES" \
    --compare "$CMP" -o "$OUT/peer_torch.json"
grep -E '^(peer_total_s|agreement)' "$WORK/peer_torch.log" || true

# ---- 3. the kernels on their own ------------------------------------------------------------
# the kernels' own figures without other workers' kernels beside them: one worker, the
# layers of shard 0 of 8 (2 of 16); appended to the profile file after a marker line
step kvtrace_cuda_1t "$TO_REPLAY" "$KVT" replay "$TRACE" "${REPLAY_ARGS[@]}" --profile \
    --threads 1 --shard 0/8 --device "$DEVICE" -o "$WORK/kvtrace_cuda_1t.json"
{ echo "# one worker, shard 0/8"; grep '^profile:' "$WORK/kvtrace_cuda_1t.log"; } \
    >>"$WORK/kvtrace_cuda_profile.txt" || true

# ---- 4. kvtrace replay on the CPU (last: a short deadline skips this one) ----------------
step kvtrace_cpu "$TO_REPLAY" "$KVT" replay "$TRACE" "${REPLAY_ARGS[@]}" --profile \
    --threads "$THREADS" -o "$OUT/kvtrace_cpu.json"
grep '^profile:' "$WORK/kvtrace_cpu.log" >"$WORK/kvtrace_cpu_profile.txt" || true

# ---- summary --------------------------------------------------------------------------------
echo
echo "== summary"
export GPU_NAME CPU_NAME BLAS T LAYERS COLSUM THREADS PROBES POLICIES BUDGETS DEVICE TRACE TRACE_MB OUT
export W_SYNTH=${WALL[synth]:-} W_COLSUM=${WALL[colsum]:-}
export W_KCPU=${WALL[kvtrace_cpu]:-} R_KCPU=${RC[kvtrace_cpu]:-}
W_KCUDA=${WALL[kvtrace_cuda]:-}
[ -n "${CUDA_WALLS:-}" ] && W_KCUDA=$(tr ' ' '\n' <<<"$CUDA_WALLS" | sort -g |
    awk '{ a[NR] = $1 } END { print NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
export W_KCUDA R_KCUDA=${RC[kvtrace_cuda]:-} CUDA_WALLS=${CUDA_WALLS:-}
export W_KCUDA_PROF=${WALL[kvtrace_cuda]:-}
export W_PEER=${WALL[peer_torch]:-} R_PEER=${RC[peer_torch]:-} W_BUILD=${WALL[build]:-}
export WORK
W_SCRIPT=$(secs "$T_SCRIPT" "$(now)")
export W_SCRIPT
set +e
"$PYTHON" - <<'EOF'
import json, math, os, sys
sys.path.insert(0, "bench")
import peer_numpy
e = os.environ
out = e["OUT"]


def num(x):
    return float(x) if x not in (None, "") else None


def load(name):
    p = os.path.join(out, name)
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


peer = load("peer_torch.json")
steps = {
    "kvtrace_cpu": {"wall_s": num(e["W_KCPU"]), "exit": e["R_KCPU"], "results": "kvtrace_cpu.json"},
    "kvtrace_cuda": {"wall_s": num(e["W_KCUDA"]), "exit": e["R_KCUDA"],
                     "results": "kvtrace_cuda.json",
                     "runs_s": [float(x) for x in e["CUDA_WALLS"].split()],
                     "profiled_run_s": num(e["W_KCUDA_PROF"])},
    "peer_torch": {"wall_s": num(e["W_PEER"]), "exit": e["R_PEER"], "results": "peer_torch.json",
                   "sweep_s": peer and peer["total_s"], "time": peer and peer["time"],
                   "init_s": peer and peer["init_s"], "torch": peer and peer["torch"],
                   "device_name": peer and peer["device_name"]},
}
ratios = {}
pw = num(e["W_PEER"])
ps = peer and peer["total_s"]
for k in ("kvtrace_cpu", "kvtrace_cuda"):
    w = steps[k].get("wall_s")
    # the peer's exit 1 is a disagreement (its timings stand); no results file: no ratio
    if w and steps[k]["exit"] == "0" and pw and ps and e["R_PEER"] in ("0", "1"):
        ratios["peer_torch_process / " + k] = pw / w
        ratios["peer_torch_sweep / " + k] = ps / w
agree = {}  # policy: the largest |diff| of any metric mean, kvtrace --device cuda vs CPU
AGREE_TOL = 1e-3  # tests/unit/test_replay_fast_vs_ref.sh's bound (on the output errors)
L = list(range(int(e["LAYERS"])))
if load("kvtrace_cuda.json") and load("kvtrace_cpu.json"):
    a = peer_numpy.kvtrace_means(os.path.join(out, "kvtrace_cpu.json"), L)
    b = peer_numpy.kvtrace_means(os.path.join(out, "kvtrace_cuda.json"), L)
    for p in a:
        d = 0.0
        for bt, m in a[p].items():
            for k, v in m.items():
                w = b.get(p, {}).get(bt, {}).get(k, float("nan"))
                if math.isnan(v) and math.isnan(w):
                    continue
                dd = abs(v - w)
                d = max(d, float("inf") if math.isnan(dd) else dd)
        agree[p] = d


def profile_kernels(path):
    """{(section, what): {s, GB, TFLOP}} from the 'profile: gpu ...' lines of a profile file;
    section "all" for the run with every worker, "1t" after the '# one worker' marker."""
    out, sec = {}, "all"
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("# one worker"):
            sec = "1t"
            continue
        if not line.startswith("profile: gpu ") or " GB/s" not in line:
            continue
        body = line[len("profile: gpu "):]
        what, rest = body.split("  ", 1)
        f = rest.split()
        try:
            d = {"s": float(f[0]), "GB": float(f[2])}
            if "TFLOP" in f:
                d["TFLOP"] = float(f[f.index("TFLOP") - 1])
        except (ValueError, IndexError):
            continue
        out[(sec, what.strip())] = d
    return out


def roofline(prof, peak):
    """Per kernel category: the time the device's ceilings allow (bytes at the measured read
    bandwidth, FLOP at the measured f64 matmul rate, whichever is longer: the kernels take
    logits and sums in double, for bitwise agreement with the references) against the time
    measured (the one-worker run's when there is one)."""
    rows = []
    if not peak:
        return rows
    bw = peak["read_GBps"]
    fl = peak.get("fp64_matmul_TFLOPps") or 0.0
    alu = peak.get("fp64_fma_TFLOPps") or 0.0  # scalar f64 FMA, 2 FLOP each
    sec = "1t" if any(k[0] == "1t" for k in prof) else "all"
    for (sc, what), d in sorted(prof.items()):
        if sc != sec or "kernels" not in what or d["s"] <= 0:
            continue
        t_mem = d["GB"] / bw
        t_fl = d.get("TFLOP", 0.0) / fl if fl > 0 else 0.0
        bound = max(t_mem, t_fl)
        # the same against the scalar f64 ceiling: how well the kernel uses the arithmetic it
        # is made of (its products of f32 values are fused multiply-adds, kvt_cu_madd_f32)
        t_alu = d.get("TFLOP", 0.0) / alu if alu > 0 else 0.0
        bound_alu = max(t_mem, t_alu)
        rows.append({"kernels": what, "run": "one worker" if sec == "1t" else "all workers",
                     "s": d["s"], "GB": d["GB"], "GBps": d["GB"] / d["s"],
                     "TFLOP": d.get("TFLOP"), "bound_s": bound,
                     "bound_by": "memory" if t_mem >= t_fl else "f64 compute",
                     "x_roofline": d["s"] / bound if bound > 0 else None,
                     "bound_alu_s": bound_alu if alu > 0 else None,
                     "x_alu_bound": d["s"] / bound_alu if alu > 0 and bound_alu > 0 else None})
    return rows


try:
    peak = json.load(open(os.path.join(e["WORK"], "peak.json")))
except (OSError, ValueError):
    peak = None
roof = roofline(profile_kernels(os.path.join(e["WORK"], "kvtrace_cuda_profile.txt")), peak)
bench = {"issue": 7, "device_name": e["GPU_NAME"], "cpu": e["CPU_NAME"], "threads": int(e["THREADS"]),
         "kvtrace_openblas": e["BLAS"] == "yes",
         "trace": {"path": e["TRACE"], "shape": "llama3-8b", "T": int(e["T"]),
                   "layers": int(e["LAYERS"]), "dtype": "bf16", "colsum": e["COLSUM"],
                   "stored_mb": int(e["TRACE_MB"])},
         "policies": e["POLICIES"].split(","), "budgets": e["BUDGETS"].split(","),
         "probes": int(e["PROBES"]),
         "prepare_s": {"build": num(e["W_BUILD"]), "synth": num(e["W_SYNTH"]),
                       "colsum": num(e["W_COLSUM"])},
         "steps": steps, "ratios": ratios,
         "peer_vs_kvtrace_cpu": peer and peer.get("agreement"),
         "kvtrace_cuda_vs_cpu_max_abs_diff": agree or None,
         "kvtrace_cuda_vs_cpu_tolerance": AGREE_TOL,
         "device_peak": peak, "kernel_roofline": roof,
         "script_s": num(e["W_SCRIPT"])}
with open(os.path.join(out, "bench.json"), "w") as f:
    json.dump(bench, f, indent=1)


def fmt(x, f="%.2f"):
    return "-" if x is None else f % x


md = ["# kvtrace replay vs the PyTorch peer (issue #7)", "",
      "Device: **%s**; CPU: %s, %s threads. Synthetic data, not real KV." % (
          e["GPU_NAME"], e["CPU_NAME"] or "?", e["THREADS"]), "",
      "Trace: llama3-8b shape (Hq32 Hkv8 D128), T=%s, bf16, first %s layers, attn_colsum: %s "
      "(%s MB stored). Policies: %s. Budgets: %s. %s coverage probes." % (
          e["T"], e["LAYERS"], e["COLSUM"], e["TRACE_MB"], e["POLICIES"], e["BUDGETS"],
          e["PROBES"]), "",
      "| run | wall s | notes |", "|---|---|---|",
      "| `kvtrace replay` (CPU, %s threads) | %s | exit %s; OpenBLAS fast path: %s |" % (
          e["THREADS"], fmt(num(e["W_KCPU"])), e["R_KCPU"], e["BLAS"]),
      "| `kvtrace replay --device %s` | %s | exit %s%s; the run with --profile: %s s |" % (
          e["DEVICE"], fmt(num(e["W_KCUDA"])), e["R_KCUDA"],
          "; median of %d runs without --profile: %s s" % (
              len(e["CUDA_WALLS"].split()), ", ".join(e["CUDA_WALLS"].split()))
          if e["CUDA_WALLS"].split() else "", fmt(num(e["W_KCUDA_PROF"])))]
if peer:
    t = peer["time"]
    md.append("| `peer_torch.py --device %s` | %s (process) | sweep %.2f s = read %.2f + h2d "
              "%.2f + attention %.2f + policies x budgets %.2f; device init %.2f s apart; torch %s"
              " |" % (e["DEVICE"], fmt(pw), peer["total_s"], t["read"], t["h2d"],
                      t["attention"], t["policies"], peer["init_s"], peer["torch"]))
else:
    md.append("| `peer_torch.py --device %s` | %s | exit %s, no results |" % (
        e["DEVICE"], fmt(pw), e["R_PEER"]))
md += ["", "Ratios (peer time / kvtrace time; issue #7's target: kvtrace's whole replay at least "
       "10x faster than the PyTorch peer):", ""]
md += ["- %s: **%.2fx**" % (k, v) for k, v in ratios.items()] or ["- none (a run failed)"]
if peer and peer.get("agreement"):
    md += ["", "peer_torch vs kvtrace CPU, largest |diff| over budgets (means over layers and "
           "heads; random: own RNG):", ""]
    md += ["- %s: recall %.1e, err_window %.1e, coverage %.1e" % (
        p, a["recall_window"], a["err_window"], a["coverage"])
        for p, a in peer["agreement"].items()]
disagree = sorted(p for p, d in agree.items() if not d <= AGREE_TOL)
if agree:
    md += ["", "kvtrace --device %s vs CPU, largest |diff| of any metric mean (at most %.0e): "
           % (e["DEVICE"], AGREE_TOL) + ", ".join("%s %.1e" % kv for kv in agree.items())]
    if disagree:
        md += ["", "**kvtrace --device %s DISAGREES with the CPU replay (over %.0e): %s**"
               % (e["DEVICE"], AGREE_TOL, ", ".join(disagree))]
if roof:
    md += ["", "Kernels against the device's roofline (issue #7's target: within 3x). Ceilings "
           "measured in this run: read %.0f GB/s (a 1 GiB sum), copy %.0f GB/s, f64 matmul "
           "%.1f TFLOP/s (f32, TF32 off: %.1f); bound = the longer of bytes / read bandwidth "
           "and FLOP / f64 rate (the kernels compute in double, for bitwise agreement with the "
           "references; the matmul's f64 tensor cores make this a generous ceiling); kernel "
           "time by CUDA events, %s. Last column: the same against scalar f64 fused "
           "multiply-adds, the instructions of the kernels' inner loops (bench_gpu_peak: f64 "
           "FMA %s TFLOP/s; separate multiplies and adds %s G op/s):" % (
               peak["read_GBps"], peak["copy_GBps"], peak["fp64_matmul_TFLOPps"],
               peak["fp32_matmul_TFLOPps"], roof[0]["run"],
               fmt(peak.get("fp64_fma_TFLOPps")), fmt(peak.get("fp64_muladd_Gops"), "%.0f")),
           "",
           "| kernels | GPU s | GB at least | GB/s | TFLOP | bound s (by) | x roofline "
           "| x scalar-f64-FMA bound |",
           "|---|---|---|---|---|---|---|---|"]
    md += ["| %s | %.4f | %.3f | %.0f | %s | %.4f (%s) | **%s** | %s |" % (
        r["kernels"], r["s"], r["GB"], r["GBps"], fmt(r["TFLOP"], "%.3f"), r["bound_s"],
        r["bound_by"], fmt(r["x_roofline"], "%.2f"), fmt(r["x_alu_bound"], "%.2f"))
        for r in roof]
    # the sweep category by kind, from the same run (one worker when there is one)
    kinds, sec = {}, "all"
    try:
        for line in open(os.path.join(e["WORK"], "kvtrace_cuda_profile.txt")):
            if line.startswith("# one worker"):
                sec = "1t"
            elif line.startswith("profile: gpu sweep kernels by kind: "):
                kinds[sec] = line.strip()[len("profile: gpu sweep kernels by kind: "):]
    except OSError:
        pass
    if kinds:
        md += ["", "Sweep kernels by kind (%s): %s." % (
            "one worker" if "1t" in kinds else "all workers", kinds.get("1t", kinds.get("all")))]
elif peak:
    md += ["", "No GPU kernel figures in the profiles (replay --device %s)." % e["DEVICE"]]
# the whole run's time split and how K and V were read (ahead into host memory, or streamed
# through pinned memory once the GPU was ready), as --profile printed them
try:
    split = []
    for line in open(os.path.join(e["WORK"], "kvtrace_cuda_profile.txt")):
        if line.startswith("# one worker"):
            break
        if line.startswith(("profile: wall ", "profile: gpu: CUDA context",
                            "profile: gpu: K and V as stored")):
            split.append(line.strip()[len("profile: "):])
    if split:
        md += ["", "Time split of `--device cuda` (all workers, --profile):", ""]
        md += ["- " + l for l in split]
except OSError:
    pass
try:  # each kernel alone (bench_gpu_kernels): its markdown table as it printed it
    kl = [l.rstrip() for l in open(os.path.join(e["WORK"], "gpu_kernels.log"))
          if l.startswith("|") or l.startswith("# bench_gpu_kernels")]
except OSError:
    kl = []
if kl:
    md += ["", "Each kernel alone, one call of one query group or KV head at this T "
           "(bench_gpu_kernels; x bound: GPU time over the longer of bytes / read bandwidth and "
           "f64 operations / bench_gpu_peak's FMA rate; host us: the call until its work "
           "is done):", "", kl[0].lstrip("# "), ""] + kl[1:]
md += ["", "Preparation (not timed against anything): build %s s, synth %s s, colsum %s s; "
       "whole script %s s." % (fmt(num(e["W_BUILD"])), fmt(num(e["W_SYNTH"])),
                               fmt(num(e["W_COLSUM"])), fmt(num(e["W_SCRIPT"])))]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(3 if disagree else 0)
EOF
SUM_RC=$?
set -e
if [ "$SUM_RC" = 3 ]; then
    FAILED+=("kvtrace --device $DEVICE vs CPU (a metric mean differs by more than 1e-3)")
elif [ "$SUM_RC" != 0 ]; then
    FAILED+=("summary (exit $SUM_RC)")
fi
echo
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "run_gpu: FAILED: ${FAILED[*]} (logs in $WORK)"
    exit 1
fi
echo "run_gpu: done; results in $OUT"
