/* cmd_replay.c - `kvtrace replay TRACE... --policies ... --budgets ... -o results.json`: replays
 * every policy at every budget on each trace (layer by layer, threads over layers), writes the
 * versioned results.json (analysis/RESULTS.md) and optionally the kept indices
 * (--export-selection). Thin: parsing and progress here, the work in replay/ and analysis/.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kvt_analysis.h"
#include "kvt_cli.h"
#include "kvt_kernels.h"
#include "kvt_replay.h"
#include "kvt_trace.h"

static void help(void)
{
    printf("usage: kvtrace replay TRACE... [--policies LIST] [--budgets LIST] -o results.json\n"
           "                      [--window W] [--threads N] [--memory-limit SIZE] [--seed S]\n"
           "                      [--per-query-head] [--decode-probs auto|all|group]\n"
           "                      [--coverage-probes N] [--export-selection FILE] [--force]\n"
           "                      [--shard I/N] [--device cpu|cuda[:LIST]|auto] [--profile]\n\n"
           "Replay KV-cache compression policies offline on captured traces and measure every\n"
           "budget at once: attention recall, output error on window and held-out decode\n"
           "queries, key coverage (all and dropped keys), head redundancy, overlap of the\n"
           "heads' kept sets, modality mix, oracle overlap, kept bytes.\n"
           "Several traces (prompts of one model) go into one results.json, per trace and\n"
           "aggregated. Fields: analysis/RESULTS.md.\n\n"
           "  --policies LIST   comma-separated specs NAME[:key=value,...]; an item with '='\n"
           "                    and no ':' continues the previous spec, e.g.\n"
           "                    snapkv,adakv:alpha=0.2,snapkv:kernel=7,pool=max\n"
           "                    (default: %s;\n"
           "                    'all' = these 14: every policy with public code that\n"
           "                    needs nothing but K, V and the window queries)\n"
           "  --policy SPEC     add one policy (repeatable)\n"
           "  --budgets LIST    entries kept per head per layer, window included: tokens\n"
           "                    (64,128) and/or percentages of the prompt (10%%,20%%);\n"
           "                    default 64,128,256,512\n"
           "  --window W        observation window of every policy that ranks by window\n"
           "                    queries (snapkv, finch, cam, chunkkv, pyramidkv, adakv, mixkv-*,\n"
           "                    sparsemm, headkv, cake, hybridkv-like, lightkv-like) whose spec\n"
           "                    sets no window=\n"
           "                    (default: each policy's own, 32; a trace keeps W queries)\n"
           "  --threads N       worker threads over layers (default: all cores, as many as\n"
           "                    the memory holds: each holds about one layer's arrays)\n"
           "  --memory-limit SIZE  memory the default --threads plans for (512M, 40G;\n"
           "                    default: what the machine has available; under MPI shared\n"
           "                    by the processes on one machine)\n"
           "  --decode-probs M  how a worker holds a layer's decode queries' attention over\n"
           "                    the prompt (4 x query heads x decode steps x T bytes): all\n"
           "                    (computed once), group (one KV head's query heads at a time,\n"
           "                    computed again for each policy that reads them: less memory,\n"
           "                    slower, the same results; with --device cuda the GPU holds\n"
           "                    them all and group copies one KV head's to the host for a\n"
           "                    policy that reads them there), auto (default: all, unless\n"
           "                    the threads planned would then not fit in the memory)\n",
           KVT_CLI_ALL_POLICIES);
    printf("  --device D        where each layer's attention, outputs, norms, unit keys and\n"
           "                    recall/error/coverage sweeps run: cpu (default), cuda (every\n"
           "                    visible GPU, each layer on one; the policies' logic stays on\n"
           "                    the host), cuda:LIST (those GPUs: cuda:1, cuda:0,2, cuda:0-3),\n"
           "                    or auto (cuda when a GPU is usable)\n"
           "  --profile         print where the time went on stderr: reading the trace, layer\n"
           "                    contexts, policies and sweeps, the CPU's dense-product kernels,\n"
           "                    the peak memory against the estimate per worker thread;\n"
           "                    with --device cuda also uploads, kernels (with the bandwidth\n"
           "                    they achieved) and downloads\n"
           "  --seed S          seed of the random policy (default 0)\n"
           "  --per-query-head  select per query head (original SnapKV) instead of per KV head\n"
           "  --coverage-probes N  probe keys per head for coverage (default %d, 0 = off)\n"
           "  --export-selection FILE  kept indices per policy/budget/layer/head (binary, or\n"
           "                    JSON if FILE ends in .json; layout in analysis/RESULTS.md)\n"
           "  -o, --output FILE results.json to write\n"
           "  --force           overwrite existing output files\n"
           "  --shard I/N       replay only shard I (0..N-1) of the (trace, layer) units: unit\n"
           "                    u (traces in order, then layers) goes to shard u %% N. Writes a\n"
           "                    partial results.json (and a part of the selection export);\n"
           "                    combine all N with kvtrace merge\n"
           "  --list-policies   print the policies with their options and defaults\n\n"
           "Under an MPI launcher (mpirun -n N kvtrace replay ..., or srun), process R replays\n"
           "shard R/N and rank 0 merges the parts into the one results.json a single process\n"
           "writes (and the selection export); --threads defaults to the cores of a node over its\n"
           "processes.%s\n",
           KVT_DEFAULT_COVERAGE_PROBES,
           kvt_cli_mpi_library() ? "" : "\n(This kvtrace was built without MPI.)");
}

/* The worker threads: --threads N as given; else the cores (a node's cores shared by its
 * processes under MPI), lowered to what the memory holds at kvt_replay_worker_bytes each (the
 * largest over the traces) with a note saying so. A warning when the threads chosen may not
 * fit (the system would kill the replay). *wb receives the estimate (0 if unknown). *dp
 * (--decode-probs) is resolved when it is KVT_DECODE_PROBS_AUTO, with a note when that holds
 * the decode probabilities one KV group at a time. */
static int plan_threads(const char *cmd, const char *const *traces, size_t n_traces,
                        kvt_policy *const *pols, size_t n_pol, int probes, kvt_device device,
                        int threads, uint64_t mem_limit, const kvt_cli_mpi *mpi, uint64_t *wb,
                        kvt_decode_probs *dp)
{
    int max_layers = 0, n_l;
    uint64_t wbm[2] = {0, 0}; /* all of the decode probabilities held, one group's */
    *wb = 0;
    for (size_t t = 0; t < n_traces; t++) { /* a bad trace fails later, with its own message */
        uint64_t b[2];
        if (kvt_replay_worker_bytes_modes(traces[t], pols, n_pol, probes, device, &b[0], &b[1]) ==
            KVT_OK)
            for (int grp = 0; grp < 2; grp++)
                wbm[grp] = b[grp] > wbm[grp] ? b[grp] : wbm[grp];
        if (kvt_replay_trace_shape(traces[t], &n_l, NULL) == KVT_OK && n_l > max_layers)
            max_layers = n_l;
        kvt_error_clear();
    }
    int local = mpi->size > 1 && mpi->local_size > 1 ? mpi->local_size : 1;
    /* the machine's memory (or --memory-limit, also per machine) shared by its processes */
    uint64_t avail = (mem_limit ? mem_limit : kvt_mem_available()) / (uint64_t)local;
    if (mem_limit && !avail)
        avail = 1; /* a limit below the processes: as small as it gets, not "unknown" */
    const char *what = mem_limit ? "--memory-limit" : "available";
    int want = threads ? threads : (kvt_cpu_count() / local > 1 ? kvt_cpu_count() / local : 1);
    if (*dp == KVT_DECODE_PROBS_AUTO) {
        *dp = kvt_replay_decode_probs_auto(threads, want, max_layers, wbm[0], wbm[1], avail);
        if (*dp == KVT_DECODE_PROBS_GROUP && mpi->rank == 0) {
            char all[32], grp[32], have[32];
            fprintf(stderr,
                    "kvtrace %s: each worker holds the decode queries' attention of one KV group "
                    "at a time (about %s a worker, not %s; %s is %s): computed again for each "
                    "policy that reads it, slower, the same results (--decode-probs all to "
                    "hold it whole)\n",
                    cmd, kvt_cli_bytes_text((double)wbm[1], grp, sizeof(grp)),
                    kvt_cli_bytes_text((double)wbm[0], all, sizeof(all)), what,
                    kvt_cli_bytes_text((double)avail, have, sizeof(have)));
        }
    }
    *wb = wbm[*dp == KVT_DECODE_PROBS_GROUP];
    int n = kvt_replay_threads(threads, want, 0, *wb, avail); /* the library's rule */
    if (mpi->rank != 0 || !*wb || !avail)
        return n;
    char each[32], have[32], total[32];
    kvt_cli_bytes_text((double)*wb, each, sizeof(each));
    kvt_cli_bytes_text((double)avail, have, sizeof(have));
    int used = n < max_layers || max_layers < 1 ? n : max_layers; /* threads that get a layer */
    if (n < want && n < max_layers)
        fprintf(stderr,
                "kvtrace %s: %d worker thread%s, not %d: each holds about %s for a layer of these "
                "traces and %s is %s%s (--threads N or --memory-limit SIZE to choose)\n",
                cmd, n, n == 1 ? "" : "s", want, each, have, mem_limit ? "the limit" : what,
                local > 1 ? " for each of this machine's MPI processes" : "");
    if ((uint64_t)used * *wb > avail) {
        if (used == 1)
            fprintf(stderr,
                    "kvtrace %s: warning: one worker thread holds about %s for a layer of these "
                    "traces, "
                    "more than the %s %s: the system may kill the replay for lack of memory\n",
                    cmd, each, have, what);
        else
            fprintf(stderr,
                    "kvtrace %s: warning: %d worker threads hold about %s (%s each for a layer of "
                    "these "
                    "traces), more than the %s %s: the system may kill the replay for lack of "
                    "memory (fewer --threads)\n",
                    cmd, used, kvt_cli_bytes_text((double)used * *wb, total, sizeof(total)), each,
                    have, what);
    } else if (mem_limit) { /* a limit above what the machine has: the plan may still not fit */
        uint64_t real = kvt_mem_available() / (uint64_t)local;
        if (real && (uint64_t)used * *wb > real) {
            char mach[32];
            kvt_cli_bytes_text((double)real, mach, sizeof(mach));
            fprintf(stderr,
                    "kvtrace %s: warning: %d worker thread%s hold%s about %s, within the %s "
                    "%s but more than the %s this machine has available%s: the system may "
                    "kill the replay for lack of memory\n",
                    cmd, used, used == 1 ? "" : "s", used == 1 ? "s" : "",
                    kvt_cli_bytes_text((double)used * *wb, total, sizeof(total)), have,
                    local > 1 ? "share of the --memory-limit" : "--memory-limit", mach,
                    local > 1 ? " for each of its MPI processes" : "");
        }
    }
    return n;
}

static uint64_t cmd_t0;     /* when kvt_cmd_replay started */
static uint64_t cmd_dev_ns; /* resolving --device (loading the CUDA driver) */

/* --device cuda: after the last replay the GPU is released (kvt_replay_release_device, CUDA's
 * teardown) on a thread while the results are written, instead of at exit */
typedef struct dev_release {
    pthread_t th;
    bool started, done;
    kvt_status st;
    uint64_t ns;
} dev_release;
static dev_release cmd_release;

static void *release_run(void *arg)
{
    dev_release *r = arg;
    uint64_t t0 = kvt_now_ns();
    r->st = kvt_replay_release_device();
    r->ns = kvt_now_ns() - t0;
    return NULL;
}

static void release_join(dev_release *r)
{
    if (r->started && !r->done) {
        pthread_join(r->th, NULL);
        r->done = true;
    }
}

/* --profile: where the time went, on stderr (one "profile:" line per part) */
static void print_profile(const kvt_replay_profile *p, kvt_device device, uint64_t wb, int threads)
{
    double wall = p->wall_ns * 1e-9;
    fflush(stdout); /* the table first, also when both streams go to one pipe */
    fprintf(stderr,
            "profile: wall %.3f s, %llu layers; summed over workers: read %.3f s, "
            "context %.3f s, policies+sweeps %.3f s (selections %.3f s)\n",
            wall, (unsigned long long)p->n_layers, p->read_ns * 1e-9, p->context_ns * 1e-9,
            p->measure_ns * 1e-9, p->select_ns * 1e-9);
    const double so_far = (kvt_now_ns() - cmd_t0) * 1e-9;
    fprintf(stderr,
            "profile: the command so far %.3f s: the wall above, and %.3f s before and after "
            "it (options, trace headers, device checks %.3f s, writing the results)\n",
            so_far, so_far - wall, cmd_dev_ns * 1e-9);
    if (device == KVT_DEVICE_CUDA)
        fprintf(stderr,
                "profile: gpu: CUDA context and memory plan %.3f s (a thread, while the workers "
                "read); workers waiting for it or for room on the GPU %.3f s, summed\n",
                p->gpu_plan_ns * 1e-9, p->gpu_wait_ns * 1e-9);
    if (device == KVT_DEVICE_CUDA && (p->kv_ahead_bytes || p->kv_streamed_bytes)) {
        char ahead[32], streamed[32];
        fprintf(stderr,
                "profile: gpu: K and V as stored: %s read ahead into host memory while the GPU "
                "was not ready for their layer, %s decompressed into pinned memory as the "
                "layer's context started (both in the read above)\n",
                kvt_cli_bytes_text((double)p->kv_ahead_bytes, ahead, sizeof(ahead)),
                kvt_cli_bytes_text((double)p->kv_streamed_bytes, streamed, sizeof(streamed)));
    }
    release_join(&cmd_release);
    if (cmd_release.started)
        fprintf(stderr,
                "profile: gpu: device released in %.3f s%s (CUDA's teardown, on a thread while "
                "the results were written)\n",
                cmd_release.ns * 1e-9, cmd_release.st ? ", with an error" : "");
    if (p->prd_group_layers)
        fprintf(stderr,
                "profile: decode probabilities held one KV group at a time in %llu layers: "
                "%llu groups computed again, %.3f s (in policies+sweeps)\n",
                (unsigned long long)p->prd_group_layers, (unsigned long long)p->prd_again,
                p->prd_again_ns * 1e-9);
    if (p->prd_copied)
        fprintf(stderr,
                "profile: decode probabilities held one KV group at a time: %llu groups copied "
                "from the GPU for host readers, %.3f s (in policies+sweeps)\n",
                (unsigned long long)p->prd_copied, p->prd_copied_ns * 1e-9);
    char blas[160];
    kvt_kernels_cpu_describe(blas, sizeof(blas));
    fprintf(stderr, "profile: CPU dense products: %s\n", blas);
    struct rusage ru;
    if (!getrusage(RUSAGE_SELF, &ru)) {
        char peak[32], each[32], total[32];
        fprintf(
            stderr,
            "profile: memory: peak RSS %s; estimated %s = %d worker thread%s x %s per "
            "worker%s\n",
            kvt_cli_bytes_text((double)ru.ru_maxrss * 1024.0, peak, sizeof(peak)),
            wb ? kvt_cli_bytes_text((double)wb * threads, total, sizeof(total)) : "?", threads,
            threads == 1 ? "" : "s", wb ? kvt_cli_bytes_text((double)wb, each, sizeof(each)) : "?",
            device == KVT_DEVICE_CUDA ? " (host memory; the CUDA runtime's own is not in it)" : "");
    }
    if (device != KVT_DEVICE_CUDA)
        return;
    const struct {
        const char *what;
        uint64_t ns, bytes, flop;
    } g[] = {{"upload (host to device)", p->gpu_upload_ns, p->gpu_upload_bytes, 0},
             {"attention kernels", p->gpu_attn_ns, p->gpu_attn_bytes, p->gpu_attn_flop},
             {"norm kernels", p->gpu_norm_ns, p->gpu_norm_bytes, 0},
             {"sweep kernels", p->gpu_sweep_ns, p->gpu_sweep_bytes, p->gpu_sweep_flop},
             {"column-sum kernels", p->gpu_colsum_ns, p->gpu_colsum_bytes, p->gpu_colsum_flop},
             {"download (device to host)", p->gpu_download_ns, p->gpu_download_bytes, 0}};
    for (size_t i = 0; i < sizeof(g) / sizeof(g[0]); i++) {
        if (i == 4 && !g[i].ns && !g[i].bytes)
            continue; /* no column sums computed */
        fprintf(stderr, "profile: gpu %-26s %9.3f s %10.3f GB %9.1f GB/s", g[i].what,
                g[i].ns * 1e-9, g[i].bytes * 1e-9,
                g[i].ns ? (double)g[i].bytes / (double)g[i].ns : 0.0);
        if (g[i].flop)
            fprintf(stderr, " %10.5f TFLOP %7.2f TFLOP/s", g[i].flop * 1e-12,
                    g[i].ns ? (double)g[i].flop / (double)g[i].ns * 1e-3 : 0.0);
        fputc('\n', stderr);
    }
    const uint64_t *k = p->gpu_sweep_kind_ns;
    fprintf(stderr,
            "profile: gpu sweep kernels by kind: output sweeps %.3f s, coverage %.3f s (cosine "
            "tables, bests), redundancy %.3f s, scores %.3f s (window, decode), rankings %.3f s\n",
            k[KVT_GPU_SWEEP_OUTPUT] * 1e-9, k[KVT_GPU_SWEEP_COVERAGE] * 1e-9,
            k[KVT_GPU_SWEEP_REDUNDANCY] * 1e-9, k[KVT_GPU_SWEEP_SCORES] * 1e-9,
            k[KVT_GPU_SWEEP_RANK] * 1e-9);
    fprintf(stderr,
            "profile: gpu sweep calls %llu, %.3f s inside them by the host clock (kernels and "
            "copies above: GPU time by CUDA events, GB at least what each must move)\n",
            (unsigned long long)p->gpu_sweep_calls, p->gpu_sweep_wall_ns * 1e-9);
    fprintf(stderr,
            "profile: gpu: the host waited %llu times for the layers' streams (results, staging "
            "buffers), %.3f s summed; the profile's timing adds no wait\n",
            (unsigned long long)p->gpu_syncs, p->gpu_sync_ns * 1e-9);
    if (p->gpu_worker_bytes) {
        char per[32], fr[32], tot[32], devs[256] = "", lay[512] = "";
        size_t nd = 0, nl = 0;
        for (int d = 0; d < KVT_MAX_CUDA_DEVICES; d++) {
            if (p->gpu_devices >> d & 1 && nd < sizeof(devs))
                nd += (size_t)snprintf(devs + nd, sizeof(devs) - nd, "%s%d", nd ? "," : "", d);
            if (p->gpu_device_layers[d] && nl < sizeof(lay))
                nl += (size_t)snprintf(lay + nl, sizeof(lay) - nl, "%s%llu on %d", nl ? ", " : "",
                                       (unsigned long long)p->gpu_device_layers[d], d);
        }
        const bool several = p->gpu_devices & (p->gpu_devices - 1);
        fprintf(stderr,
                "profile: gpu memory: about %s per worker's layer, %s free of %s at the start on "
                "device%s %s: %llu of the %llu worker thread%s on the GPU%s at a time\n",
                kvt_cli_bytes_text((double)p->gpu_worker_bytes, per, sizeof(per)),
                kvt_cli_bytes_text((double)p->gpu_mem_free, fr, sizeof(fr)),
                kvt_cli_bytes_text((double)p->gpu_mem_total, tot, sizeof(tot)), several ? "s" : "",
                devs, (unsigned long long)p->gpu_slots, (unsigned long long)p->gpu_threads,
                p->gpu_threads == 1 ? "" : "s", several ? "s" : "");
        if (several)
            fprintf(stderr, "profile: gpu layers by device: %s\n", lay);
    }
}

/* "0,2", "1-3", "5": CUDA device numbers and ranges into *mask (bit d: device d) */
static bool parse_cuda_list(const char *v, uint64_t *mask)
{
    *mask = 0;
    for (;;) {
        char *end;
        long a = strtol(v, &end, 10), b = a;
        if (end == v || a < 0 || a >= KVT_MAX_CUDA_DEVICES)
            return false;
        if (*end == '-') {
            v = end + 1;
            b = strtol(v, &end, 10);
            if (end == v || b < a || b >= KVT_MAX_CUDA_DEVICES)
                return false;
        }
        for (long d = a; d <= b; d++)
            *mask |= UINT64_C(1) << d;
        if (!*end)
            return true;
        if (*end != ',')
            return false;
        v = end + 1;
    }
}

/* MPI: rank 0 receives every process's partial result (txt: this one's) and merges them into
 * *res, the result one process gives; the other processes only send */
static kvt_status mpi_collect(kvt_cli_mpi *m, char *txt, size_t len, kvt_results **res)
{
    char **texts = NULL;
    size_t *lens = NULL;
    kvt_status st = kvt_cli_mpi_gather(m, txt, len, &texts, &lens);
    if (m->rank != 0)
        return KVT_OK;
    kvt_results **parts = kvt_calloc((size_t)m->size, sizeof(*parts));
    char(*names)[32] = kvt_calloc((size_t)m->size, sizeof(*names));
    const char **np = kvt_calloc((size_t)m->size, sizeof(*np));
    if (!st && (!parts || !names || !np))
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory merging the MPI ranks' results");
    for (int r = 0; !st && r < m->size; r++) {
        snprintf(names[r], sizeof(names[r]), "MPI rank %d", r);
        np[r] = names[r];
        st = kvt_results_parse(texts[r], lens[r], names[r], &parts[r]);
    }
    if (!st)
        st = kvt_results_merge(parts, np, (size_t)m->size);
    if (!st) { /* parts[0] is the merged result */
        kvt_results_free(*res);
        *res = parts[0];
        parts[0] = NULL;
    }
    for (int r = 0; r < m->size; r++) {
        if (parts)
            kvt_results_free(parts[r]);
        if (r && texts)
            kvt_free(texts[r]);
    }
    kvt_free(parts);
    kvt_free(names);
    kvt_free(np);
    kvt_free(texts);
    kvt_free(lens);
    return st;
}

/* MPI with --export-selection: rank 0 writes the export in (trace, layer) order, each layer
 * encoded by the process that replayed it (which sends its layers in that same order). On
 * rank 0, *sw (the blocks writer) becomes the file writer with the last trace still open, as
 * one process leaves it until results.json is written. A failure on rank 0 still receives
 * every layer, so no process waits for ever. */
static kvt_status mpi_selection(kvt_cli_mpi *m, kvt_selection_writer **sw, const char *path,
                                bool force, kvt_policy *const *pols, size_t n_pol,
                                const kvt_budget *budgets, size_t n_b, const char *const *traces,
                                size_t n_traces, const int *shape)
{
    kvt_selection_writer *fw = NULL;
    int *btok = kvt_malloc(n_b * sizeof(int));
    kvt_status st = kvt_selection_writer_end_trace(*sw); /* the last trace of the blocks */
    if (!st && !btok)
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    if (!st && m->rank == 0)
        st = kvt_selection_writer_open(path, force, pols, n_pol, budgets, n_b, traces, n_traces,
                                       &fw);
    uint64_t u = 0; /* (trace, layer) unit, numbered as --shard numbers them */
    for (size_t t = 0; t < n_traces; t++) {
        const int n_layers = shape[2 * t], T = shape[2 * t + 1]; /* as every process read it */
        for (size_t b = 0; !st && b < n_b; b++)
            btok[b] = kvt_budget_tokens(&budgets[b], T);
        if (!st && m->rank == 0)
            st = kvt_selection_writer_begin_trace(fw, (int)t, n_layers, btok);
        for (int l = 0; l < n_layers; l++, u++) {
            int owner = 0;
            while (owner < m->size && !kvt_shard_owns(u, owner, m->size))
                owner++;
            char *bytes = NULL;
            uint64_t n = 0, n_recs = 0;
            size_t nb = 0, nr = 0;
            kvt_status ls = KVT_OK;
            if (owner == m->rank) {
                ls = kvt_selection_writer_take_block(*sw, (int)t, l, &bytes, &nb, &nr);
                n = ls ? UINT64_MAX : nb;
                n_recs = nr;
                if (m->rank != 0) { /* a missing layer travels as the marker */
                    kvt_cli_mpi_send(m, bytes, n, n_recs);
                    kvt_free(bytes);
                    continue;
                }
            } else if (m->rank == 0) {
                ls = kvt_cli_mpi_recv(m, owner, !st, &bytes, &n, &n_recs);
                if (!ls && n == UINT64_MAX)
                    ls = kvt_error_set(KVT_ERR_STATE,
                                       "selection export: MPI rank %d lacks layer %d of %s", owner,
                                       l, traces[t]);
            } else
                continue; /* another process's layer */
            st = st ? st : ls;
            if (!st)
                st = kvt_selection_writer_put_block(fw, l, bytes, (size_t)n, (size_t)n_recs);
            else
                kvt_free(bytes);
        }
        if (!st && m->rank == 0 && t + 1 < n_traces)
            st = kvt_selection_writer_end_trace(fw);
    }
    kvt_free(btok);
    if (m->rank == 0) {
        kvt_selection_writer_close(*sw);
        *sw = NULL;
        if (st) /* nothing published; an old export is left as it was */
            kvt_selection_writer_discard(fw);
        else
            *sw = fw;
    }
    return st;
}

/* What every part of one sharded export must share, for its header's "shard" object (JSON
 * text, kvt_free it; NULL when out of memory): the seed, each policy's effective options and
 * each trace's fingerprint, which kvtrace merge compares */
static char *part_settings(uint64_t seed, kvt_policy *const *pols, size_t n_pol,
                           const char *const *traces, size_t n_traces)
{
    cJSON *o = cJSON_CreateObject(), *opts = cJSON_AddArrayToObject(o, "options"),
          *fps = cJSON_AddArrayToObject(o, "fingerprints");
    char buf[32];
    snprintf(buf, sizeof(buf), "%llu", (unsigned long long)seed);
    cJSON_AddStringToObject(o, "seed", buf);
    for (size_t p = 0; opts && p < n_pol; p++) {
        char *j = kvt_policy_options_json(pols[p]);
        cJSON_AddItemToArray(opts, j ? cJSON_Parse(j) : cJSON_CreateNull());
        kvt_free(j);
    }
    for (size_t t = 0; fps && t < n_traces; t++) {
        kvt_trace_reader *rd = NULL;
        char fp[17] = "";
        if (kvt_trace_reader_open(traces[t], &rd) == KVT_OK)
            kvt_trace_reader_fingerprint(rd, fp);
        kvt_trace_reader_close(rd);
        cJSON_AddItemToArray(fps, cJSON_CreateString(fp));
    }
    char *txt = o ? cJSON_PrintUnformatted(o) : NULL, *out = txt ? kvt_strdup(txt) : NULL;
    cJSON_free(txt);
    cJSON_Delete(o);
    return out;
}

/* "I/N" with 0 <= I < N */
static bool parse_shard(const char *v, int *index, int *count)
{
    const char *slash = strchr(v, '/');
    char a[32];
    if (!slash || (size_t)(slash - v) >= sizeof(a))
        return false;
    memcpy(a, v, (size_t)(slash - v));
    a[slash - v] = '\0';
    return kvt_cli_parse_int(a, 0, 1000000, index) &&
           kvt_cli_parse_int(slash + 1, 1, 1000000, count) && *index < *count;
}

static void list_policies(void)
{
    printf("%-18s %s\n", "policy", "description / options (defaults)");
    for (size_t i = 0; i < kvt_policy_registry_size(); i++) {
        kvt_policy_about a;
        kvt_policy_registry_get(i, &a);
        printf("%-18s %s%s%s%s\n%-18s   %s\n", a.name, a.summary,
               (a.flags & KVT_POLICY_NEEDS_DECODE) ? " [needs decode queries]" : "",
               (a.flags & KVT_POLICY_NEEDS_COLSUM) ? " [needs attn_colsum or Q_all]" : "",
               (a.flags & KVT_POLICY_NEEDS_QALL) ? " [needs Q_all]" : "", "", a.options);
    }
    printf("\nEvery policy also takes label=NAME: the name results, tables and reports show\n"
           "(default: the spec as given), e.g. external:scores=s.npy,label=mine.\n"
           "Every policy that keeps a fixed set of prompt tokens (not cam, lightkv-like,\n"
           "merge=, quest or hybridkv-like) also takes think=R: ThinK's key channel pruning,\n"
           "the floor(R*D) channels of least query-weighted key energy zeroed in the kept keys\n"
           "before the last think_recent tokens (32), scored by the last think_window window\n"
           "queries (32), e.g. snapkv:think=0.4 (analysis/RESULTS.md, think=R).\n"
           "Every policy that gives each layer the same budget (not pyramidkv, mixkv-pyramidkv,\n"
           "cake, vl-cache, aircache-like, kvzip, duo-attention, simlayerkv, sparsemm,\n"
           "mixkv-sparsemm, headkv, fastv or full) also takes layer_weights=FILE: one weight\n"
           "> 0 per layer (text or .npy), layer l keeping B*w_l/mean(w) at budget B, e.g.\n"
           "adakv:layer_weights=alloc.txt from kvtrace recommend --write-allocation\n"
           "(analysis/RESULTS.md, layer_weights=).\n"
           "Those policies but cam, lightkv-like, elastic-cache, quest and hybridkv-like also\n"
           "take chunk_length=N: each chunk of N prompt tokens keeps max(1, int(len*f)) of its\n"
           "tokens at a budget of share f, the ones the policy ranks highest (kvpress's\n"
           "FinchPress chunk_length), e.g. finch:window=16,chunk_length=1024. With\n"
           "chunk_scores=own, snapkv, tova, keydiff, expected-attention, leverage, compactor,\n"
           "lagkv, cur, streamingllm, knorm and vnorm score each chunk as a prompt of its own\n"
           "(snapkv, tova, expected-attention, compactor from its queries: Q_all);\n"
           "chunk_scores=kvpress turns those queries, or the future positions, as kvpress's\n"
           "ChunkPress does. knorm, keydiff, qfilter, expected-attention, snapkv, lagkv, cur,\n"
           "leverage, noncausal-attention, tova, observed-attention and external take\n"
           "dms=THRESHOLD: kvpress's\n"
           "DMSPress, each head keeping the last dms_window (128)\n"
           "tokens and the earlier ones scoring at least the threshold, at most the budget\n"
           "(--budgets 100%%: DMSPress itself; knorm and qfilter with dms_decoding=1 also\n"
           "evict decode tokens as they leave that window). knorm, keydiff, qfilter, tova\n"
           "and expected-attention take decoding=N: kvpress's DecodingPress, the cache\n"
           "(decode tokens too) compressed back to the budget every N decode steps\n"
           "(prefill=1: the prompt to the budget first; tova:decoding=1,prefill=1 is TOVA's\n"
           "own eviction); streamingllm takes it as StreamingLLM's rolling cache (sinks and\n"
           "the most recent); the trace needs K_decode and V_decode. h2o-greedy:decode=1\n"
           "goes on evicting through the decode steps, as H2O does while generating, and\n"
           "rkv (R-KV) compresses whenever the length reaches a multiple of interval=128\n"
           "(both also need K_decode and V_decode).\n");
}

static void progress_cb(void *user, uint64_t done, uint64_t total)
{
    kvt_progress_update(user, done, total);
}

/* The traces of one replay are prompts of one model: each given once, all of one shape
 * (layers, query and KV heads, head dim), checked from the headers before any work; a model
 * name or RoPE that differs from the first trace's is a warning (the same model captured by
 * two engines may be named differently). A trace recovered by scanning is a warning too. A
 * trace that cannot be read is left to the replay, which says why. Warnings go to notes (may
 * be NULL). */
static bool traces_ok(const char *cmd, const char *const *traces, size_t n, FILE *notes,
                      kvt_cli_decode_held *dh)
{
    int ref[4] = {0};
    const char *ref_path = NULL;
    char *ref_id = NULL;                    /* the first trace's model name and RoPE, as JSON */
    char(*fps)[17] = kvt_calloc(n + 1, 17); /* fingerprints: a copy of one capture is noted */
    if (!fps) {
        kvt_cli_fail(cmd, "out of memory");
        return false;
    }
    for (size_t t = 0; t < n; t++) {
        for (size_t u = 0; u < t; u++)
            if (kvt_cli_same_path(traces[t], traces[u])) {
                kvt_cli_fail(cmd, "%s is given twice (as %s and %s)", traces[t], traces[u],
                             traces[t]);
                cJSON_free(ref_id);
                kvt_free(fps);
                return false;
            }
        if (!kvt_cli_json_text_ok(cmd, "the path", traces[t])) { /* results.json names it */
            cJSON_free(ref_id);
            kvt_free(fps);
            return false;
        }
        kvt_trace_reader *rd = NULL;
        if (kvt_trace_reader_open(traces[t], &rd))
            continue;
        cJSON *hdr = cJSON_Parse(kvt_trace_reader_header_json(rd));
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(hdr, "model");
        static const char *const keys[4] = {"n_layers", "n_q_heads", "n_kv_heads", "head_dim"};
        int v[4];
        for (int k = 0; k < 4; k++) {
            const cJSON *x = cJSON_GetObjectItemCaseSensitive(m, keys[k]);
            v[k] = cJSON_IsNumber(x) ? x->valueint : -1;
        }
        cJSON *id = cJSON_CreateObject();
        if (id) {
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(m, "name");
            const cJSON *rope = cJSON_GetObjectItemCaseSensitive(m, "rope");
            if (nm)
                cJSON_AddItemToObject(id, "name", cJSON_Duplicate(nm, true));
            if (rope)
                cJSON_AddItemToObject(id, "rope", cJSON_Duplicate(rope, true));
        }
        char *idj = id ? cJSON_PrintUnformatted(id) : NULL;
        cJSON_Delete(id);
        cJSON_Delete(hdr);
        kvt_cli_decode_held none;
        kvt_cli_trace_note(notes, cmd, traces[t], rd, v[0], dh ? &dh[t] : &none); /* incomplete */
        kvt_trace_reader_fingerprint(rd, fps[t]);
        for (size_t u = 0; u < t && notes; u++)
            if (!strcmp(fps[u], fps[t])) {
                fprintf(notes,
                        "kvtrace %s: warning: %s holds the same capture as %s (fingerprint %s): "
                        "that prompt counts twice in the aggregates\n",
                        cmd, traces[t], traces[u], fps[t]);
                break;
            }
        kvt_trace_reader_close(rd);
        if (!ref_path) {
            memcpy(ref, v, sizeof(ref));
            ref_path = traces[t];
            ref_id = idj;
            continue;
        }
        if (memcmp(ref, v, sizeof(ref)) != 0) {
            kvt_cli_fail(cmd,
                         "%s is another model (L=%d Hq=%d Hkv=%d D=%d) than %s (L=%d Hq=%d Hkv=%d "
                         "D=%d): the traces of one replay are prompts of one model; replay them "
                         "separately",
                         traces[t], v[0], v[1], v[2], v[3], ref_path, ref[0], ref[1], ref[2],
                         ref[3]);
            cJSON_free(idj);
            cJSON_free(ref_id);
            kvt_free(fps);
            return false;
        }
        if (notes && idj && ref_id && strcmp(idj, ref_id))
            fprintf(notes,
                    "kvtrace %s: warning: %s's model %s differs from %s's %s; their results are "
                    "aggregated as prompts of one model (replay them separately if they are not)\n",
                    cmd, traces[t], idj, ref_path, ref_id);
        cJSON_free(idj);
    }
    cJSON_free(ref_id);
    kvt_free(fps);
    return true;
}

static const char *fmt(double x, char *buf, size_t cap, const char *f)
{
    if (isnan(x))
        snprintf(buf, cap, "-");
    else
        snprintf(buf, cap, f, x);
    return buf;
}

int kvt_cmd_replay(int argc, char **argv)
{
    cmd_t0 = kvt_now_ns();
    cmd_release = (dev_release){0};
    const char *cmd = "replay", *out = NULL, *export_path = NULL;
    char *policies_arg = NULL, *budgets_arg = NULL;
    const char **traces = kvt_calloc((size_t)argc + 1, sizeof(char *));
    size_t n_traces = 0;
    int threads = 0, probes = -1, rc = 1, shard_i = 0, shard_n = 0, window = 0;
    uint64_t mem_limit = 0, worker_bytes = 0;
    kvt_decode_probs decode_probs = KVT_DECODE_PROBS_AUTO;
    int *units = NULL; /* [n_units][2] (trace, layer) of this shard */
    int *shape = NULL; /* [n_traces][2] layers and tokens of each trace, when sharded */
    size_t n_units = 0, n_units_all = 0;
    uint8_t *mask = NULL;
    uint64_t seed = 0;
    /* warnings about the traces and budgets, told once the results are written: a run that
       fails says one line, its error */
    char *notes_buf = NULL;
    size_t notes_len = 0;
    kvt_cli_decode_held *dh = NULL; /* [n_traces] the decode steps the layers of each trace hold */
    FILE *notes = open_memstream(&notes_buf, &notes_len);
    if (!notes)
        notes = stderr;
    bool force = false, per_query = false;
    kvt_device device = KVT_DEVICE_CPU;
    uint64_t cuda_devices = 0; /* --device cuda:LIST; 0: every visible GPU */
    bool profile = false;
    kvt_replay_profile prof;
    memset(&prof, 0, sizeof(prof));
    kvt_policy **pols = NULL;
    size_t n_pol = 0, n_b = 0;
    kvt_budget *budgets = NULL;
    kvt_results *res = NULL;
    kvt_selection_writer *sw = NULL;
    kvt_status st;
    kvt_cli_mpi mpi; /* a launch by mpirun: one shard per process, rank 0 merges and writes */
    if ((rc = kvt_cli_mpi_begin(&mpi, cmd))) {
        kvt_free(traces);
        if (notes != stderr) {
            fclose(notes);
            free(notes_buf);
        }
        return rc;
    }
    rc = 1;
    if (!traces) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    if (kvt_cli_wants_help(argc, argv)) {
        if (mpi.rank == 0)
            help();
        rc = 0;
        goto out_free;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_VALUE()                                                                               \
    do {                                                                                           \
        if (!v) {                                                                                  \
            kvt_cli_fail(cmd, "%s needs a value", a);                                              \
            rc = 2; /* usage */                                                                    \
            goto out_free;                                                                         \
        }                                                                                          \
        i++;                                                                                       \
    } while (0)
        if (!strcmp(a, "--list-policies")) {
            if (mpi.rank == 0)
                list_policies();
            rc = 0;
            goto out_free;
        } else if (!strcmp(a, "--policies") || !strcmp(a, "--policy")) {
            NEED_VALUE();
            if ((rc = kvt_cli_append_policies(cmd, &policies_arg, v)))
                goto out_free;
            rc = 1;
        } else if (!strcmp(a, "--budgets")) { /* given twice: both lists, as --policies */
            NEED_VALUE();
            if (!(budgets_arg = kvt_cli_append_list(budgets_arg, v))) {
                kvt_cli_fail(cmd, "out of memory");
                goto out_free;
            }
        } else if (!strcmp(a, "--window")) {
            NEED_VALUE();
            if (!kvt_cli_parse_int(v, 1, 1 << 30, &window)) {
                kvt_cli_fail(cmd, "--window %s: expected a positive integer", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--profile")) {
            profile = true;
        } else if (!strcmp(a, "--device")) {
            NEED_VALUE();
            if (!strcmp(v, "cpu"))
                device = KVT_DEVICE_CPU;
            else if (!strcmp(v, "cuda"))
                device = KVT_DEVICE_CUDA;
            else if (!strcmp(v, "auto"))
                device = KVT_DEVICE_AUTO;
            else if (!strncmp(v, "cuda:", 5) && parse_cuda_list(v + 5, &cuda_devices))
                device = KVT_DEVICE_CUDA;
            else {
                kvt_cli_fail(cmd, "--device %s: expected cpu, cuda, cuda:LIST (cuda:0,2) or auto",
                             v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--threads")) {
            NEED_VALUE();
            if (!kvt_cli_parse_int(v, 1, 4096, &threads)) {
                kvt_cli_fail(cmd, "--threads %s: expected 1..4096", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--decode-probs")) {
            NEED_VALUE();
            static const char *const modes[] = {"auto", "all", "group"}; /* kvt_decode_probs */
            int m = 0;
            while (m < 3 && strcmp(v, modes[m]))
                m++;
            if (m < 3) {
                decode_probs = (kvt_decode_probs)m;
            } else {
                kvt_cli_fail(cmd, "--decode-probs %s: expected auto, all or group", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--memory-limit")) {
            NEED_VALUE();
            if (!kvt_cli_parse_size(v, &mem_limit)) {
                kvt_cli_fail(cmd, "--memory-limit %s: expected a size such as 512M or 40G", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--seed")) {
            NEED_VALUE();
            if (!kvt_cli_parse_u64(v, &seed)) {
                kvt_cli_fail(cmd, "--seed %s: expected a non-negative integer", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--coverage-probes")) {
            NEED_VALUE();
            if (!kvt_cli_parse_int(v, 0, 1 << 20, &probes)) {
                kvt_cli_fail(cmd, "--coverage-probes %s: expected 0..1048576", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--export-selection")) {
            NEED_VALUE();
            export_path = v;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            NEED_VALUE();
            out = v;
        } else if (!strcmp(a, "--shard")) {
            NEED_VALUE();
            if (!parse_shard(v, &shard_i, &shard_n)) {
                kvt_cli_fail(cmd, "--shard %s: expected I/N with 0 <= I < N, e.g. 0/4", v);
                rc = 2; /* usage */
                goto out_free;
            }
        } else if (!strcmp(a, "--force")) {
            force = true;
        } else if (!strcmp(a, "--per-query-head")) {
            per_query = true;
        } else if (a[0] == '-' && a[1]) {
            kvt_cli_fail(cmd, "unknown option %s (see kvtrace replay --help)", a);
            rc = 2; /* usage */
            goto out_free;
        } else
            traces[n_traces++] = a;
#undef NEED_VALUE
    }
    if (!n_traces || !out) {
        kvt_cli_fail(cmd, "no %s given (usage: kvtrace replay TRACE... -o results.json)",
                     n_traces ? "output file (-o FILE)" : "trace");
        rc = 2;
        goto out_free;
    }
    if (mpi.size > 1 && shard_n) {
        kvt_cli_fail(cmd, "--shard cannot be combined with an MPI launch (its N processes are "
                          "the N shards)");
        rc = 2;
        goto out_free;
    }
    /* outputs are checked before any work (by rank 0, which alone writes under MPI);
     * traces[n_traces] (calloc'ed spare slot) holds -o while the selection export is checked,
     * so neither output can overwrite an input or the other output */
    if (mpi.rank == 0 &&
        !kvt_cli_output_ok(cmd, out, force, (const char *const *)traces, (size_t)n_traces))
        goto out_free;
    if (export_path && mpi.rank == 0) {
        traces[n_traces] = out;
        bool ok = !kvt_cli_same_path(export_path, out);
        if (!ok)
            kvt_cli_fail(cmd, "--export-selection %s is also the -o output", export_path);
        rc = ok ? rc : 2;
        ok = ok && kvt_cli_output_ok(cmd, export_path, force, (const char *const *)traces,
                                     (size_t)n_traces + 1);
        traces[n_traces] = NULL;
        if (!ok)
            goto out_free;
    }
    dh = kvt_calloc(n_traces + 1, sizeof(*dh));
    if (!dh) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    if (!traces_ok(cmd, (const char *const *)traces, n_traces, mpi.rank == 0 ? notes : NULL, dh))
        goto out_free;
    {
        char why[160];
        kvt_device want = device;
        uint64_t t_dev = kvt_now_ns();
        /* --device cuda is checked by the replay itself, while its workers read their first
           layers (starting the CUDA driver takes about 0.1 s); auto needs the answer now */
        st = want == KVT_DEVICE_CUDA ? KVT_OK
                                     : kvt_replay_resolve_device(want, &device, why, sizeof(why));
        cmd_dev_ns = kvt_now_ns() - t_dev;
        if (st) {
            kvt_cli_fail_status(cmd, st, "--device");
            goto out_free;
        }
        if (want == KVT_DEVICE_AUTO && device == KVT_DEVICE_CPU && mpi.rank == 0)
            fprintf(stderr, "kvtrace replay: --device auto: on the CPU (%s)\n", why);
    }
    kvt_policy_globals g = {.seed = seed, .per_query_head = per_query, .window = window};
    if ((st = kvt_policy_list_parse(policies_arg ? policies_arg : KVT_CLI_ALL_POLICIES, &g, &pols,
                                    &n_pol))) {
        kvt_cli_fail_status(cmd, st, "--policies");
        rc = st == KVT_ERR_INVALID_ARG ? 2 : 1; /* a bad spec is a usage error */
        goto out_free;
    }
    if ((rc = kvt_cli_policy_files_ok(cmd, pols, n_pol, (const char *const *)traces, n_traces)))
        goto out_free; /* a usage error (2), said */
    if ((st = kvt_budgets_parse(budgets_arg ? budgets_arg : "64,128,256,512", &budgets, &n_b))) {
        kvt_cli_fail_status(cmd, st, "--budgets");
        rc = st == KVT_ERR_INVALID_ARG ? 2 : 1;
        goto out_free;
    }
    rc = 1;
    /* every trace against the policies at these budgets (windows, decode queries, column sums,
       external's scores=DIR files) before the first trace is replayed */
    for (size_t t = 0; t < n_traces; t++)
        if ((st = kvt_replay_check_trace(traces[t], pols, n_pol, budgets, n_b))) {
            kvt_cli_fail_status(cmd, st, traces[t]);
            goto out_free;
        }
    if ((st = kvt_results_create(pols, n_pol, budgets, n_b, &res))) {
        kvt_cli_fail_status(cmd, st, "results");
        goto out_free;
    }
    if (mpi.size > 1) { /* every process got this far: each replays its shard */
        if ((rc = kvt_cli_mpi_agree(&mpi, 0)))
            goto out_free;
        rc = 1;
        shard_i = mpi.rank;
        shard_n = mpi.size;
    }
    threads = plan_threads(cmd, (const char *const *)traces, n_traces, pols, n_pol, probes, device,
                           threads, mem_limit, &mpi, &worker_bytes, &decode_probs);
    res->seed = seed;
    res->coverage_probes = probes < 0 ? KVT_DEFAULT_COVERAGE_PROBES : probes;
    res->n_threads = threads > 0 ? threads : kvt_cpu_count();
    res->per_query_head = per_query;
    snprintf(res->device, sizeof(res->device), "%s", kvt_device_name(device));
    /* under MPI each process keeps the layers it replays; rank 0 writes them all in order */
    char *settings = NULL;
    if (export_path && shard_n && mpi.size == 1 &&
        !(settings = part_settings(seed, pols, n_pol, (const char *const *)traces, n_traces))) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    if (export_path &&
        (st = mpi.size > 1
                  ? kvt_selection_writer_open_blocks(export_path, pols, n_pol, n_b, n_traces, &sw)
                  : kvt_selection_writer_open_part(export_path, force, pols, n_pol, budgets, n_b,
                                                   (const char *const *)traces, n_traces, shard_i,
                                                   shard_n, settings, &sw))) {
        kvt_free(settings);
        kvt_cli_fail_status(cmd, st, export_path);
        goto out_free;
    }
    kvt_free(settings);
    for (size_t t = 0; t < n_traces; t++) {
        char label[512];
        snprintf(label, sizeof(label), "replay %s (layers)", traces[t]);
        kvt_progress pr; /* started right before the replay: every path after it ends it */
        kvt_replay_opts o = {.n_threads = threads,
                             .coverage_probes = probes,
                             .progress = progress_cb,
                             .progress_user = &pr,
                             .device = device,
                             .cuda_devices = cuda_devices,
                             /* an MPI launch's processes on this node share its GPUs */
                             .cuda_share_index = mpi.local_rank,
                             .cuda_share_count = mpi.local_size,
                             .profile = profile ? &prof : NULL,
                             .decode_probs = decode_probs};
        if (sw) {
            o.sink = kvt_selection_writer_sink;
            o.sink_user = sw;
        }
        if (shard_n) { /* this shard's layers of this trace */
            int n_layers = 0;
            if (!shape && !(shape = kvt_calloc(2 * n_traces, sizeof(int)))) {
                kvt_cli_fail(cmd, "out of memory");
                goto out_free;
            }
            if ((st = kvt_replay_trace_shape(traces[t], &n_layers, &shape[2 * t + 1]))) {
                kvt_cli_fail_status(cmd, st, traces[t]);
                goto out_free;
            }
            kvt_free(mask);
            mask = kvt_calloc((size_t)n_layers, 1);
            int *nu = kvt_realloc(units, (n_units + (size_t)n_layers) * 2 * sizeof(int));
            if (!mask || !nu) {
                kvt_cli_fail(cmd, "out of memory");
                goto out_free;
            }
            units = nu;
            for (int l = 0; l < n_layers; l++)
                if (kvt_shard_owns(n_units_all + (uint64_t)l, shard_i, shard_n)) {
                    mask[l] = 1;
                    units[2 * n_units] = (int)t;
                    units[2 * n_units + 1] = l;
                    n_units++;
                }
            n_units_all += (size_t)n_layers;
            shape[2 * t] = n_layers;
            o.layer_mask = mask;
            o.layer_mask_len = (size_t)n_layers;
        }
        /* the selection writer orders records by layer: it needs the layer count and the
         * budgets in tokens of this trace first */
        kvt_trace_result *tr = NULL;
        if (sw) {
            int n_layers = 0, T = 0;
            int *btok = kvt_malloc(n_b * sizeof(int));
            if (!btok) {
                kvt_cli_fail(cmd, "out of memory");
                goto out_free;
            }
            if (shape) /* read above for the shard's units */
                n_layers = shape[2 * t], T = shape[2 * t + 1];
            else
                st = kvt_replay_trace_shape(traces[t], &n_layers, &T);
            for (size_t b = 0; !st && b < n_b; b++)
                btok[b] = kvt_budget_tokens(&budgets[b], T);
            if (!st) /* a shard's part holds its layers only (not under MPI: all are kept) */
                st = kvt_selection_writer_begin_trace_part(sw, (int)t, n_layers, btok,
                                                           shard_n && mpi.size == 1 ? mask : NULL);
            kvt_free(btok);
            if (st) {
                kvt_cli_fail_status(cmd, st, traces[t]);
                goto out_free;
            }
        }
        kvt_progress_start(&pr, label);
        st = kvt_replay_trace(traces[t], pols, n_pol, budgets, n_b, &o, &tr);
        kvt_progress_end(&pr);
        if (st) {
            kvt_cli_fail_status(cmd, st, traces[t]);
            goto out_free;
        }
        if (mpi.rank == 0) {
            kvt_cli_decode_note(notes, cmd, traces[t], tr, &dh[t]);
            kvt_cli_budget_notes(notes, cmd, traces[t], tr);
        }
        /* the last trace is ended only once results.json is written: a selection writer
         * closed with a trace still open discards its file, so a failed results write leaves
         * the old selection export (if any) in place too */
        if (sw && t + 1 < n_traces && (st = kvt_selection_writer_end_trace(sw))) {
            kvt_cli_fail_status(cmd, st, export_path);
            goto out_free;
        }
        if ((st = kvt_results_add_trace(res, tr))) {
            kvt_cli_fail_status(cmd, st, traces[t]);
            goto out_free;
        }
    }
    /* nothing uses the GPU from here on: its teardown overlaps the writing (not under MPI,
       whose transports may hold CUDA state of their own until MPI_Finalize) */
    if (device == KVT_DEVICE_CUDA && mpi.size <= 1)
        cmd_release.started = !pthread_create(&cmd_release.th, NULL, release_run, &cmd_release);
    if (shard_n && (st = kvt_results_set_shard(res, shard_i, shard_n, units, n_units))) {
        kvt_cli_fail_status(cmd, st, "--shard");
        goto out_free;
    }
    if (mpi.size > 1) { /* every part to rank 0, which goes on with the merged result */
        char *txt = NULL;
        size_t len = 0;
        if ((st = kvt_results_to_json(res, &txt, &len)))
            kvt_cli_fail_status(cmd, st, "results");
        if ((rc = kvt_cli_mpi_agree(&mpi, st ? 1 : 0)) == 0)
            st = mpi_collect(&mpi, txt, len, &res);
        kvt_free(txt);
        if (rc)
            goto out_free;
        /* rank 0 alone merged: every process learns whether it could before the export
           stage, or the others would send layers rank 0 never receives */
        if (st)
            kvt_cli_fail_status(cmd, st, "merging the MPI ranks' results");
        if ((rc = kvt_cli_mpi_agree(&mpi, st ? 1 : 0)))
            goto out_free;
        rc = 1;
        if (sw && (st = mpi_selection(&mpi, &sw, export_path, force, pols, n_pol, budgets, n_b,
                                      (const char *const *)traces, n_traces, shape))) {
            kvt_cli_fail_status(cmd, st, export_path);
            goto out_free;
        }
        if (mpi.rank != 0) {
            rc = 0;
            goto out_free;
        }
        shard_n = 0; /* rank 0 holds the whole result now */
    }
    if ((st = kvt_results_write(res, out, force))) {
        kvt_cli_fail_status(cmd, st, "writing the results");
        goto out_free;
    }
    if (sw) {
        st = kvt_selection_writer_end_trace(sw);
        if (st == KVT_OK) {
            st = kvt_selection_writer_close(sw); /* renames the export into place */
            sw = NULL;
        }
        if (st) {
            kvt_cli_fail_status(cmd, st, export_path);
            goto out_free;
        }
    }
    if (notes != stderr && fflush(notes) == 0 && notes_len)
        fputs(notes_buf, stderr);
    if (shard_n) { /* means over a part would mislead: no table (its profile is its own) */
        if (profile)
            print_profile(&prof, device, worker_bytes, threads);
        fprintf(stderr,
                "replay: wrote %s: shard %d/%d, %zu of %zu (trace, layer) units; combine all %d "
                "shards with kvtrace merge\n",
                out, shard_i, shard_n, n_units, n_units_all, shard_n);
        rc = 0;
        goto out_free;
    }
    /* a short table on stdout: model-level means over all traces */
    int lw = kvt_cli_label_width(pols, n_pol, 28);
    printf("%-*s %8s %8s %9s %9s %9s %9s %8s\n", lw, "policy", "budget", "kept", "recall_w",
           "err_w", "recall_d", "err_d", "cover");
    for (size_t p = 0; p < n_pol; p++)
        for (size_t b = 0; b < n_b; b++) {
            kvt_run_summary s;
            if (kvt_summarize_results(res, p, b, &s))
                continue;
            char c[6][32];
            printf("%-*s %8s %7.1f%% %9s %9s %9s %9s %8s\n", lw, kvt_policy_label(pols[p]),
                   budgets[b].text, 100.0 * s.kept_fraction, fmt(s.recall_window, c[0], 32, "%.4f"),
                   fmt(s.err_window, c[1], 32, "%.4f"), fmt(s.recall_decode, c[2], 32, "%.4f"),
                   fmt(s.err_decode, c[3], 32, "%.4f"), fmt(s.coverage, c[4], 32, "%.4f"));
        }
    if (profile && mpi.size > 1)
        fprintf(stderr, "profile: MPI rank 0 of %d, its own shard:\n", mpi.size);
    if (profile)
        print_profile(&prof, device, worker_bytes, threads);
    char procs[48] = "";
    if (mpi.size > 1)
        snprintf(procs, sizeof(procs), ", %d MPI processes", mpi.size);
    fprintf(stderr, "replay: wrote %s (%zu trace%s, %zu polic%s, %zu budget%s%s)%s%s\n", out,
            n_traces, n_traces == 1 ? "" : "s", n_pol, n_pol == 1 ? "y" : "ies", n_b,
            n_b == 1 ? "" : "s", procs, export_path ? " and " : "", export_path ? export_path : "");
    rc = 0;
out_free:
    release_join(&cmd_release);
    kvt_free(dh);
    if (notes != stderr) {
        fclose(notes);
        free(notes_buf); /* open_memstream's, with malloc */
    }
    kvt_selection_writer_discard(sw); /* failed: an old export is left as it was */
    kvt_results_free(res);
    kvt_free(budgets);
    kvt_policy_list_free(pols, n_pol);
    kvt_free(policies_arg);
    kvt_free(budgets_arg);
    kvt_free(traces);
    kvt_free(units);
    kvt_free(shape);
    kvt_free(mask);
    return kvt_cli_mpi_end(&mpi, 3, rc); /* agreements: checks, replay, rank 0's merge */
}
