#!/usr/bin/env python3
"""capture_overhead.py - what kvtrace.capture costs during a long prefill (issue #6 (c)).

A Llama-3-8B-shaped transformers LlamaForCausalLM (hidden 4096, 32 query / 8 KV heads of
128, intermediate 14336, vocab 128256, rope_theta 500000; --layers of them, default 32) with
RANDOM weights, built in bfloat16 directly on the GPU (no checkpoint, no download), runs a
prefill model(input_ids, use_cache=True) of T random token ids for each T in --tokens:

  * warm-up: one prefill without capture at each T, and one small capture before the runs
    (CUDA module load, library start);
  * then, alternating: --repeats prefills without capture and --cap-repeats prefills inside
    kvtrace.capture(model, path, window=--window, decode=0, level=--level,
    n_threads=--threads, force=True); each timed with torch.cuda.synchronize() around it
    (wall clock: host-side stalls of the capture count).

Reported per T (medians over the runs; every run is in the JSON):
  prefill_ms / prefill_cap_ms  the forward alone, without / inside the capture block;
  overhead_pct                 (prefill_cap_ms - prefill_ms) / prefill_ms (target <= 10%);
  e2e_cap_ms                   capture open -> forward -> close (close drains the
                               pipeline: copies, compression, file writes);
  capture_GBps                 bytes submitted (raw K+V+Q_window, stats bytes_submitted)
                               / e2e_cap_ms, in 10^9 B/s;
  ratio                        writer raw_bytes / comp_bytes (zstd over byte planes) on
                               this model's activations (random weights: real activations
                               of a model, not of a trained one), and raw / file bytes;
  dev_MB_measured              device memory the capture holds outside torch's allocator:
                               the drop of cudaMemGetInfo's free bytes from before the block
                               to after the forward (still inside it), minus the growth of
                               torch.cuda.memory_reserved() over the same span
                               (torch.cuda.max_memory_allocated cannot see the library's
                               cudaMalloc); dev_MB_stats: the library's own count
                               (stats device_bytes), pinned_MB: stats pinned_bytes;
  rss_peak_delta_MB            peak resident set size during the block (sampled every 5 ms
                               from /proc/self/statm) minus the RSS before it (pinned host
                               buffers count once touched); ru_maxrss_MB: the process peak.

Output: $OUT/capture_overhead.json and $OUT/capture_overhead.md (markdown for
bench/RESULTS.md, with the device name and the command). OUT defaults to /tmp/kvt_gpu_out.
Traces go to --trace-dir (default /tmp/kvt_bench_traces, NOT under $OUT: up to 4 GiB
raw each at 32K tokens) and are deleted after each run unless --keep-traces.
Every step is in try/except: a failure is recorded and the next T runs. --budget-s stops
starting new sizes once exceeded. Defaults take a few minutes on an H200.

usage: python3 bench/capture_overhead.py [--layers 32] [--tokens 8192,16384,32768]
       python3 bench/capture_overhead.py --dry-run      # a tiny model on the CPU (plumbing)
"""
import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256,
                 max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                 tie_word_embeddings=False, hidden_act="silu", attention_bias=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
            hidden_act="silu", attention_bias=False)
MB = 1 << 20


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return 0


class RssSampler:
    """Peak RSS over a span, sampled from /proc/self/statm (no CUDA calls)."""

    def __init__(self, period=0.005):
        self.period = period
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        return False


class Bench:
    def __init__(self, args):
        import torch
        self.torch = torch
        self.args = args
        self.cuda = args.device.startswith("cuda")
        self.res = {"config": {}, "env": {}, "sizes": [], "errors": [],
                    "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.cap_opts = dict(window=args.window, decode=0, level=args.level,
                             n_threads=args.threads)

    # ---- device helpers (no-ops on the CPU) ----
    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def mem(self):
        """(free device bytes, torch reserved bytes)."""
        if not self.cuda:
            return 0, 0
        free, _ = self.torch.cuda.mem_get_info()
        return int(free), int(self.torch.cuda.memory_reserved())

    def env(self):
        torch = self.torch
        e = {"python": sys.version.split()[0], "torch": torch.__version__}
        try:
            import transformers
            e["transformers"] = transformers.__version__
        except Exception as ex:
            e["transformers"] = "not importable: %s" % ex
        import kvtrace
        e["kvtrace"] = kvtrace.__version__
        e["libkvtrace"] = kvtrace.lib_path()
        if self.cuda:
            e["gpu"] = torch.cuda.get_device_name(0)
            e["gpu_mem_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            e["cuda"] = torch.version.cuda
        e["cpus"] = os.cpu_count()
        self.res["env"] = e
        print("env: " + json.dumps(e), flush=True)

    def build(self):
        torch = self.torch
        from kvtrace.llama2c_hf import make_llama_config, new_llama_model
        a = self.args
        cfg = dict(TINY if a.dry_run else LLAMA3_8B, num_hidden_layers=a.layers)
        config = make_llama_config(cfg, "sdpa")
        dtype = torch.float32 if a.dry_run else torch.bfloat16
        t0 = time.time()
        # parameters in dtype, the RoPE inv_freq buffers float32, as in from_pretrained; born
        # on the GPU where torch can (no CPU init), else moved there
        model = new_llama_model(config, dtype, a.device if self.cuda else None)
        model = model.to(a.device).eval()
        self.sync()
        n_par = sum(p.numel() for p in model.parameters())
        self.res["config"] = dict(cfg, dtype=str(dtype), parameters=n_par,
                                  shape="tiny (dry run)" if a.dry_run else "Llama-3-8B",
                                  attn_implementation=getattr(model.config,
                                                              "_attn_implementation", None),
                                  build_s=round(time.time() - t0, 2))
        print("model: %.2fB parameters, %d layers, %s, built in %.1f s" % (
            n_par / 1e9, a.layers, dtype, time.time() - t0), flush=True)
        import inspect
        params = inspect.signature(model.forward).parameters
        self.kw = {}
        for k in ("logits_to_keep", "num_logits_to_keep"):  # no [T, 128256] logits
            if k in params:
                self.kw[k] = 1
                break
        self.model = model
        self.vocab = cfg["vocab_size"]

    def prefill(self, ids):
        with self.torch.no_grad():
            return self.model(input_ids=ids, use_cache=True, **self.kw)

    def timed_prefill(self, ids):
        with RssSampler():  # the same sampler thread as in the captured runs
            self.sync()
            t0 = time.perf_counter()
            out = self.prefill(ids)
            self.sync()
            ms = (time.perf_counter() - t0) * 1e3
            del out
        return ms

    def timed_capture(self, ids, path):
        import kvtrace
        a = self.args
        self.sync()
        free0, res0 = self.mem()
        rss0 = rss_bytes()
        with RssSampler() as rs:
            tc0 = time.perf_counter()
            cap = kvtrace.capture(self.model, path, force=True, **self.cap_opts)
            with cap:
                self.sync()
                t0 = time.perf_counter()
                out = self.prefill(ids)
                self.sync()
                t1 = time.perf_counter()
                free1, res1 = self.mem()
                del out
            tc1 = time.perf_counter()
        st = cap.stats if isinstance(cap.stats, dict) else {}
        w = st.get("writer", {}) or {}
        run = {"prefill_cap_ms": (t1 - t0) * 1e3, "e2e_cap_ms": (tc1 - tc0) * 1e3,
               "close_ms": (tc1 - t1) * 1e3,
               "bytes_submitted": st.get("bytes_submitted"),
               "raw_bytes": w.get("raw_bytes"), "comp_bytes": w.get("comp_bytes"),
               "file_bytes": w.get("file_bytes"),
               "stall_ms": (st.get("stall_ns") or 0) / 1e6,
               "writer_stall_ms": (w.get("stall_ns") or 0) / 1e6,
               "device_stall_ms": (st.get("device_stall_ns") or 0) / 1e6,
               "dev_bytes_measured": (free0 - free1) - (res1 - res0) if self.cuda else None,
               "torch_reserved_growth": res1 - res0,
               "dev_bytes_stats": st.get("device_bytes"), "pinned_bytes": st.get("pinned_bytes"),
               "device_slots": st.get("device_slots"),
               "device_peak_slots": st.get("device_peak_slots"),
               "peak_pending_bytes": w.get("peak_pending_bytes"),
               "rss_before": rss0, "rss_peak_delta": rs.peak - rss0, "stats": st}
        if run["bytes_submitted"]:
            run["capture_GBps"] = run["bytes_submitted"] / ((tc1 - tc0) * 1e9)
        if run["raw_bytes"] and run["comp_bytes"]:
            run["ratio"] = run["raw_bytes"] / run["comp_bytes"]
        if run["raw_bytes"] and run["file_bytes"]:
            run["ratio_file"] = run["raw_bytes"] / run["file_bytes"]
        try:
            t = kvtrace.open(path)
            run["trace_n_tokens"] = t.header.get("n_tokens")
            run["trace_layers"] = len(t.layers("K"))
            t.close()
        except Exception as e:
            run["trace_open_error"] = str(e)
        if not a.keep_traces:
            try:
                os.remove(path)
            except OSError:
                pass
        return run

    def one_size(self, T):
        torch = self.torch
        a = self.args
        g = torch.Generator(device=a.device if self.cuda else "cpu").manual_seed(a.seed + T)
        ids = torch.randint(0, self.vocab, (1, T), device=a.device, generator=g)
        row = {"T": T, "runs_nocap": [], "runs_cap": []}
        self.res["sizes"].append(row)
        row["warmup_ms"] = self.timed_prefill(ids)
        path = os.path.join(a.trace_dir, "bench_T%d.kvt" % T)
        for r in range(max(a.repeats, a.cap_repeats)):
            if r < a.repeats:
                row["runs_nocap"].append(self.timed_prefill(ids))
            if r < a.cap_repeats:
                try:
                    row["runs_cap"].append(self.timed_capture(ids, path))
                except Exception as e:
                    row.setdefault("cap_errors", []).append("%s: %s" % (type(e).__name__, e))
                    self.res["errors"].append({"T": T, "where": "capture run %d" % r,
                                               "error": traceback.format_exc()[-3000:]})
                    print("  capture run failed: %s: %s" % (type(e).__name__, e), flush=True)
            if self.cuda:
                torch.cuda.empty_cache()
        med = statistics.median
        if row["runs_nocap"]:
            row["prefill_ms"] = med(row["runs_nocap"])
        caps = row["runs_cap"]
        if caps:
            for k in ("prefill_cap_ms", "e2e_cap_ms", "close_ms", "capture_GBps", "ratio",
                      "ratio_file", "stall_ms", "device_stall_ms", "writer_stall_ms"):
                v = [c[k] for c in caps if c.get(k) is not None]
                if v:
                    row[k] = med(v)
            for k in ("bytes_submitted", "raw_bytes", "comp_bytes", "file_bytes"):
                row[k] = caps[-1].get(k)
            for k in ("dev_bytes_measured", "dev_bytes_stats", "pinned_bytes", "rss_peak_delta"):
                v = [c[k] for c in caps if c.get(k) is not None]
                if v:
                    row[k + "_max"] = max(v)
        if row.get("prefill_ms") and row.get("prefill_cap_ms"):
            row["overhead_pct"] = 100.0 * (row["prefill_cap_ms"] - row["prefill_ms"]) / \
                row["prefill_ms"]
            row["overhead_e2e_pct"] = 100.0 * (row["e2e_cap_ms"] - row["prefill_ms"]) / \
                row["prefill_ms"]
        print("  T=%d: prefill %.1f ms, with capture %s ms (%s), open->close %s ms, %s GB/s, "
              "ratio %s" % (T, row.get("prefill_ms", float("nan")), fmt(row.get("prefill_cap_ms")),
                            fmt(row.get("overhead_pct"), "%+.1f%%"), fmt(row.get("e2e_cap_ms")),
                            fmt(row.get("capture_GBps"), "%.2f"), fmt(row.get("ratio"), "%.3f")),
              flush=True)
        del ids

    def run(self):
        a = self.args
        t_start = time.time()
        os.makedirs(a.trace_dir, exist_ok=True)
        self.env()
        self.build()
        # warm-up capture: CUDA module load, library start
        try:
            ids = self.torch.randint(0, self.vocab, (1, min(1024, min(a.tokens))),
                                     device=a.device)
            self.timed_prefill(ids)
            w = self.timed_capture(ids, os.path.join(a.trace_dir, "warmup.kvt"))
            self.res["warmup_capture"] = {k: w.get(k) for k in ("e2e_cap_ms", "capture_GBps",
                                                                "ratio", "trace_layers")}
        except Exception:
            self.res["errors"].append({"where": "warm-up capture",
                                       "error": traceback.format_exc()[-3000:]})
            print("warm-up capture failed:\n" + traceback.format_exc()[-1500:], flush=True)
        for T in a.tokens:
            if time.time() - t_start > a.budget_s:
                self.res["sizes"].append({"T": T, "skipped": "time budget %.0f s spent"
                                          % a.budget_s})
                print("  T=%d skipped: time budget spent" % T, flush=True)
                continue
            try:
                self.one_size(T)
            except Exception as e:
                self.res["errors"].append({"T": T, "error": traceback.format_exc()[-3000:]})
                print("  T=%d FAILED: %s: %s" % (T, type(e).__name__, e), flush=True)
                if self.cuda:
                    self.torch.cuda.empty_cache()
            self.save()
        self.res["ru_maxrss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.res["seconds"] = round(time.time() - t_start, 1)
        self.save()

    def save(self):
        a = self.args
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "capture_overhead.json"), "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        with open(os.path.join(a.out, "capture_overhead.md"), "w") as f:
            f.write(markdown(self.res, self.cap_opts) + "\n")


def fmt(v, f="%.1f"):
    return "n/a" if v is None else f % v


def capture_call(opts):
    """kvtrace.capture(...) as the runs called it, for the markdown (n_threads only when set)."""
    return "kvtrace.capture(%s)" % ", ".join(
        "%s=%s" % (k, v) for k, v in opts.items() if k != "n_threads" or v)


def markdown(res, cap_opts):
    e, c = res.get("env", {}), res.get("config", {})
    lines = ["## Capture overhead, %s-shaped prefill (random weights, %s, %s layers), %s"
             % (c.get("shape", "?"), c.get("dtype", "?").replace("torch.", ""),
                c.get("num_hidden_layers", "?"),
                res.get("date", "")[:10]),
             "",
             "Machine: %s (%s GiB), %s CPUs, torch %s, transformers %s, CUDA %s. Command: `%s`."
             % (e.get("gpu", "CPU"), e.get("gpu_mem_GiB", "?"), e.get("cpus"), e.get("torch"),
                e.get("transformers"), e.get("cuda"), res.get("command")),
             "Prefill = `model(input_ids, use_cache=True)` (last-token logits only), wall clock "
             "with synchronisation; capture = `%s`; medians. Device MB: cudaMemGetInfo drop not "
             "explained by torch's reserved growth (library count in brackets). Host MB: peak "
             "RSS growth during the capture block." % capture_call(cap_opts),
             "",
             "| T | prefill (ms) | prefill in capture (ms) | overhead | open->close (ms) | "
             "capture GB/s | raw GB | ratio (raw/zstd) | stall (ms) | device MB | pinned MB | "
             "host RSS peak +MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("sizes", []):
        if r.get("skipped"):
            lines.append("| %d | skipped: %s |%s" % (r["T"], r["skipped"], "  |" * 10))
            continue
        dev = "n/a" if r.get("dev_bytes_measured_max") is None else \
            "%.0f" % (r["dev_bytes_measured_max"] / MB)
        if r.get("dev_bytes_stats_max") is not None:
            dev += " (%.0f)" % (r["dev_bytes_stats_max"] / MB)
        lines.append("| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["T"], fmt(r.get("prefill_ms")), fmt(r.get("prefill_cap_ms")),
            fmt(r.get("overhead_pct"), "%+.1f%%"), fmt(r.get("e2e_cap_ms")),
            fmt(r.get("capture_GBps"), "%.2f"),
            fmt(r["bytes_submitted"] / 1e9 if r.get("bytes_submitted") else None, "%.2f"),
            fmt(r.get("ratio"), "%.3f"), fmt(r.get("stall_ms")), dev,
            fmt(r["pinned_bytes_max"] / MB if r.get("pinned_bytes_max") is not None else None,
                "%.0f"),
            fmt(r["rss_peak_delta_max"] / MB if r.get("rss_peak_delta_max") is not None
                else None, "%.0f")))
    if res.get("errors"):
        lines.append("")
        lines.append("Errors: %d (see capture_overhead.json)." % len(res["errors"]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", default="8192,16384,32768",
                    help="comma list of prompt lengths (default 8192,16384,32768)")
    ap.add_argument("--repeats", type=int, default=3, help="prefills without capture per T")
    ap.add_argument("--cap-repeats", type=int, default=2, help="captured prefills per T")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--level", type=int, default=1,
                    help="zstd level (default 1, kvtrace.capture's; 0: the library's, 3)")
    ap.add_argument("--threads", type=int, default=0, help="compressor threads (0: default)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/kvt_gpu_out")
    ap.add_argument("--trace-dir", default="/tmp/kvt_bench_traces")
    ap.add_argument("--keep-traces", action="store_true")
    # under scripts/gpu_session.sh: KVT_DEADLINE (epoch seconds) ends the step; a size takes
    # under a minute on an H200, so none starts in the last 60 s
    dl = os.environ.get("KVT_DEADLINE")
    budget = 240.0 if not dl else max(10.0, min(240.0, float(dl) - time.time() - 60.0))
    ap.add_argument("--budget-s", type=float, default=budget,
                    help="start no new size after this many seconds (default 240, or up to "
                         "60 s before KVT_DEADLINE)")
    ap.add_argument("--dry-run", action="store_true",
                    help="a tiny float32 model on --device (e.g. cpu), to test the plumbing")
    a = ap.parse_args()
    a.tokens = [int(x) for x in a.tokens.split(",") if x.strip()]
    b = None
    try:
        b = Bench(a)
        b.run()
    except Exception:
        tb = traceback.format_exc()
        print(tb, flush=True)
        if b is not None:
            b.res["errors"].append({"where": "setup", "error": tb[-3000:]})
            b.save()
        else:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "capture_overhead.json"), "w") as f:
                json.dump({"errors": [{"where": "start", "error": tb[-3000:]}]}, f, indent=1)
    if b is not None:
        print("\n" + markdown(b.res, b.cap_opts))
        print("\nresults: %s" % os.path.join(a.out, "capture_overhead.json"))
        ok = not b.res["errors"] and all(r.get("runs_cap") for r in b.res["sizes"]
                                        if not r.get("skipped"))
        return 0 if ok else 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
