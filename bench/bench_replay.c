/* bench_replay.c - replay throughput (issue #3 benchmark, not a test): writes a synthetic
 * llama3-8b-shaped trace (L=32, Hq=32, Hkv=8, D=128, T=8192, W=32, G=16 by default), then
 * times every policy at 8 budgets (64..2048, 5%, 10%) against 1 budget: 256, and 2048 (the
 * largest of the sweep, i.e. what re-selecting per budget would pay at least once; the sweep
 * must cost well under 2x that), for each thread count, with peak RSS. Results go to stdout as a
 * markdown table for bench/RESULTS.md.
 *
 * usage: bench_replay [--reuse] [--layers L] [--tokens T] [--threads 1,2,4] [--probes N]
 *                     [--keep FILE] [--policies LIST]
 * --reuse (first): replay an existing --keep FILE instead of writing it again. Each replay
 * runs in a forked child; the peak RSS column is the largest child's, the replay alone.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvt_kernels.h"
#include "kvt_replay.h"
#include "kvt_trace.h"

#define POLICIES                                                                                   \
    "full,random,streamingllm,tova,snapkv,chunkkv,pyramidkv,adakv,knorm,vnorm,keydiff,"            \
    "mixkv-snapkv,mixkv-pyramidkv,mixkv-adakv,h2o,oracle,quest,hybridkv-like,lightkv-like"

static void check(kvt_status s, const char *what)
{
    if (s != KVT_OK) {
        fprintf(stderr, "bench_replay: %s: %s (%s)\n", what, kvt_status_str(s), kvt_error_msg());
        exit(1);
    }
}

static int write_trace(const char *path, int L, int T, int Hq, int Hkv, int D, int W, int G)
{
    char hdr[512];
    snprintf(hdr, sizeof(hdr),
             "{\"format\":\"kvtrace\",\"model\":{\"name\":\"synthetic-llama3-8b\","
             "\"arch\":\"llama\",\"n_layers\":%d,\"n_q_heads\":%d,\"n_kv_heads\":%d,"
             "\"head_dim\":%d,\"rope\":{\"type\":\"default\",\"theta\":500000}},"
             "\"kv_dtype\":\"bf16\",\"n_tokens\":%d,\"window\":%d,\"n_decode\":%d}",
             L, Hq, Hkv, D, T, W, G);
    kvt_writer_opts wo = {.force = true, .n_threads = 2, .level = 1};
    kvt_trace_writer *w;
    check(kvt_trace_writer_create(path, hdr, &wo, &w), "create trace");
    size_t big = (size_t)Hq * T; /* colsum, and the largest tensor is Hkv*T*D */
    size_t n = (size_t)Hkv * T * D > big ? (size_t)Hkv * T * D : big;
    uint16_t *x = malloc(n * sizeof(uint16_t));
    float *cs = malloc(big * sizeof(float));
    kvt_rng r;
    kvt_rng_seed(&r, 1);
    uint8_t *mod = calloc((size_t)T, 1);
    for (int j = T / 8; j < T / 2; j++)
        mod[j] = KVT_MOD_IMAGE; /* a vision block, for lightkv-like/hybridkv-like */
    for (int l = 0; l < L; l++) {
        const struct {
            int kind, heads, tok;
        } ts[] = {{KVT_KIND_K, Hkv, T},        {KVT_KIND_V, Hkv, T},
                  {KVT_KIND_Q_WINDOW, Hq, W},  {KVT_KIND_Q_DECODE, Hq, G},
                  {KVT_KIND_K_DECODE, Hkv, G}, {KVT_KIND_V_DECODE, Hkv, G}};
        for (size_t k = 0; k < sizeof(ts) / sizeof(ts[0]); k++) {
            size_t m = (size_t)ts[k].heads * ts[k].tok * D;
            for (size_t i = 0; i < m; i++)
                x[i] = kvt_f32_to_bf16((float)kvt_rng_normal(&r));
            kvt_record_info in = {.kind = ts[k].kind,
                                  .layer = l,
                                  .head_end = (uint32_t)ts[k].heads,
                                  .tok_end = (uint32_t)ts[k].tok,
                                  .dim = (uint32_t)D,
                                  .dtype = KVT_DTYPE_BF16};
            check(kvt_trace_writer_append(w, &in, x), "append");
        }
        for (size_t i = 0; i < big; i++) /* plausible column sums: decaying with position */
            cs[i] = (float)(1.0 + 50.0 / (1.0 + (double)(i % (size_t)T)) * kvt_rng_uniform(&r));
        kvt_record_info c = {.kind = KVT_KIND_ATTN_COLSUM,
                             .layer = l,
                             .head_end = (uint32_t)Hq,
                             .tok_end = (uint32_t)T,
                             .dim = 1,
                             .dtype = KVT_DTYPE_F32};
        check(kvt_trace_writer_append(w, &c, cs), "append colsum");
    }
    kvt_record_info mi = {.kind = KVT_KIND_MODALITY,
                          .layer = -1,
                          .head_end = 1,
                          .tok_end = (uint32_t)T,
                          .dim = 1,
                          .dtype = KVT_DTYPE_U8};
    check(kvt_trace_writer_append(w, &mi, mod), "append modality");
    check(kvt_trace_writer_finish(w), "finish");
    kvt_trace_writer_free(w);
    free(x);
    free(cs);
    free(mod);
    return 0;
}

/* one replay in a forked child, so that its peak RSS is its own (not the trace writer's nor
 * an earlier run's): returns the seconds, *rss_mib the child's peak resident set */
static double run(const char *path, kvt_policy **pols, size_t n_pol, const char *budgets,
                  int threads, int probes, double *rss_mib)
{
    int fd[2];
    if (pipe(fd) != 0) {
        perror("bench_replay: pipe");
        exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("bench_replay: fork");
        exit(1);
    }
    if (pid == 0) {
        close(fd[0]);
        kvt_budget *b;
        size_t nb;
        check(kvt_budgets_parse(budgets, &b, &nb), "budgets");
        kvt_replay_opts o = {.n_threads = threads, .coverage_probes = probes};
        kvt_trace_result *res;
        uint64_t t0 = kvt_now_ns();
        check(kvt_replay_trace(path, (kvt_policy *const *)pols, n_pol, b, nb, &o, &res), "replay");
        double s = (double)(kvt_now_ns() - t0) * 1e-9;
        kvt_trace_result_free(res);
        kvt_free(b);
        if (write(fd[1], &s, sizeof(s)) != (ssize_t)sizeof(s))
            _exit(1);
        _exit(0);
    }
    close(fd[1]);
    double s = -1.0;
    if (read(fd[0], &s, sizeof(s)) != (ssize_t)sizeof(s))
        s = -1.0;
    close(fd[0]);
    int ws;
    struct rusage ru;
    if (wait4(pid, &ws, 0, &ru) != pid || !WIFEXITED(ws) || WEXITSTATUS(ws) != 0 || s < 0) {
        fprintf(stderr, "bench_replay: the replay failed\n");
        exit(1);
    }
    *rss_mib = (double)ru.ru_maxrss / 1024.0;
    return s;
}

int main(int argc, char **argv)
{
    int L = 32, T = 8192, Hq = 32, Hkv = 8, D = 128, W = 32, G = 16, probes = -1;
    const char *threads = NULL, *keep = NULL, *plist = POLICIES;
    bool reuse = false;
    kvt_kernels_blas_reexec(argv); /* never OpenBLAS's generic kernels on a CPU it does not know */
    if (argc > 1 && !strcmp(argv[1], "--reuse")) { /* leading flag: keep an existing trace */
        reuse = true;
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 == argc) /* an option without its value, or --help */
            argv[i] = "";
        if (!strcmp(argv[i], "--layers"))
            L = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--tokens"))
            T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = argv[i + 1];
        else if (!strcmp(argv[i], "--probes"))
            probes = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--policies"))
            plist = argv[i + 1];
        else if (!strcmp(argv[i], "--keep"))
            keep = argv[i + 1];
        else {
            fprintf(stderr, "usage: bench_replay [--reuse] [--layers L] [--tokens T] "
                            "[--threads 1,2,4] [--probes N] [--keep TRACE] [--policies LIST]\n");
            return 2;
        }
    }
    char path[256];
    snprintf(path, sizeof(path), "%s", keep ? keep : "/tmp/kvt_bench_replay.kvt");
    if (keep && reuse && access(path, R_OK) == 0)
        fprintf(stderr, "bench_replay: reusing %s\n", path);
    else {
        fprintf(stderr, "bench_replay: writing L=%d T=%d Hq=%d Hkv=%d D=%d trace %s\n", L, T, Hq,
                Hkv, D, path);
        write_trace(path, L, T, Hq, Hkv, D, W, G);
    }
    kvt_policy **pols;
    size_t n_pol;
    check(kvt_policy_list_parse(plist, NULL, &pols, &n_pol), "policies");
    char budgets8[128];
    snprintf(budgets8, sizeof(budgets8), "64,128,256,512,1024,2048,5%%,10%%");
    char thr[64];
    snprintf(thr, sizeof(thr), "%s", threads ? threads : "1");
    printf("| T | threads | policies | 1 budget 256 (s) | 1 budget 2048 (s) | 8 budgets (s) | "
           "8 / 2048 | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|\n");
    for (char *tok = strtok(thr, ","); tok; tok = strtok(NULL, ",")) {
        int n_th = atoi(tok);
        double r1, rm, r8;
        double t1 = run(path, pols, n_pol, "256", n_th, probes, &r1);
        double tm = run(path, pols, n_pol, "2048", n_th, probes, &rm);
        double t8 = run(path, pols, n_pol, budgets8, n_th, probes, &r8);
        double rss = r1 > rm ? r1 : rm;
        printf("| %d | %d | %zu | %.2f | %.2f | %.2f | %.2f | %.0f |\n", T, n_th, n_pol, t1, tm, t8,
               t8 / tm, r8 > rss ? r8 : rss);
        fflush(stdout);
    }
    kvt_policy_list_free(pols, n_pol);
    if (!keep)
        unlink(path);
    return 0;
}
