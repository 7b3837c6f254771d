/* gpu_kernels.c - bench_gpu_kernels (issue #7): each CUDA kernel of replay --device cuda alone,
 * at the shapes of one layer of the replay benchmark (bench/run_gpu.sh: llama3-8b, T = 32768,
 * 8 budgets, 256 coverage probes), so that a GPU session can say which kernel is how far from
 * the device's roofline, and whether the GPU's time or the host's (launches, copies,
 * synchronisation) makes a call slow. `replay --profile` gives the time by category over a
 * whole replay with every worker at once; this gives it per kernel, one call at a time.
 *
 * For each case: the median over --reps calls of the GPU's time (CUDA events around the
 * call, on one stream) and of the host's (the call until its work is done), the bytes the
 * kernel must move at least and the f64 multiplies and adds it must make (the kernels take
 * their sums in double, rounded as the references round them: the products of f32 values as
 * fused multiply-adds, each counted as two operations), and, given the ceilings (--read-gbs,
 * --f64-gops: run_gpu.sh passes bench_gpu_peak's f64 FMA rate in G op/s), the time against the
 * larger bound. Each call as the replay makes
 * it: the attention and norms of every KV head at once (one call per layer), the cosine table
 * per KV head, an output sweep per (ranking, query kind, KV head) over the Gs query heads of
 * one KV head, a redundancy sweep and coverage bests per (ranking, KV head).
 *
 * usage: bench_gpu_kernels [--tokens T] [--dim D] [--group Gs] [--kv-heads Hkv] [--window W]
 *                          [--decode G] [--probes P] [--reps N] [--read-gbs X] [--f64-gops Y]
 *                          [--json FILE]
 * Exit 0, 77 without a usable GPU, 1 on an error (the failing call's message on stderr). The
 * data are random; the probabilities positive, so that no product is skipped as a zero.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_common.h"
#include "kvt_kernels_cuda.h"

#define MAX_CUT  16
#define N_CASES  18
#define MAX_REPS 1000

typedef struct bk_shape {
    int T, D, Gs, Hkv, W, G, P, reps, n_cut;
    int32_t cuts[MAX_CUT];
} bk_shape;

typedef struct bk_data {
    /* every KV head's (K: kvf, V: v [Hkv, T, D]; probabilities prw, prd [Hq, W or G, T]): the
       attention and norms take them all, a sweep the first head's */
    float *v, *kd, *qw, *qd, *prw, *prd, *pr2, *ku, *kvf, *ct, *best;
    uint16_t *kv16;
    double *lse, *aw, *ad, *rsw, *rsd, *mean, *inv, *norm, *rec, *err, *rd, *sc, *sc_work, *rs;
    int32_t *order, *probe, *rorder;
    unsigned long long *first;
    void *work;
    size_t work_bytes;
    int *vis_w, *vis_d, *vis2_d; /* host */
} bk_data;

typedef struct bk_result {
    const char *name;
    double gpu_us, host_us, bytes, ops;
} bk_result;

static const char *case_name[N_CASES] = {
    "widen bf16 K (all KV heads)",
    "nonfinite check K (all KV heads)",
    "attn probs, window rows (all KV heads)",
    "attn probs, decode rows + keys (all KV heads)",
    "attn output, window rows (all KV heads)",
    "attn output, decode rows (all KV heads)",
    "row masses, window rows (all KV heads)",
    "row norms K and V (all KV heads)",
    "unit keys and means (a call per KV head)",
    "cosine table (probes, one KV head)",
    "coverage bests (all cuts)",
    "output sweep, window rows",
    "output sweep, decode rows",
    "redundancy sweep",
    "rankings (KV heads)",
    "window scores (snapkv)",
    "decode scores (oracle)",
    "output sweep, window rows, 1 cut",
};

/* the case's bytes at least and f64 operations (multiplies and adds) */
static void case_cost(int c, const bk_shape *s, double *bytes, double *ops)
{
    const double T = s->T, D = s->D, nw = (double)s->Gs * s->W, nd = (double)s->Gs * s->G;
    const double n = (double)s->Hkv * T * D, P = s->P, walk = s->cuts[s->n_cut - 1];
    const double Hq = (double)s->Gs * s->Hkv;
    *ops = 0;
    switch (c) {
    case 0:
        *bytes = 6 * n;
        break;
    case 1:
        *bytes = 4 * n;
        break;
    case 2:
        *bytes = 4 * (nw * D + T * D + nw * T), *ops = 2 * nw * T * D;
        break;
    case 3:
        *bytes = 4 * (nd * D + (T + s->G) * D + nd * (T + s->G)), *ops = 2 * nd * (T + s->G) * D;
        break;
    case 4:
        *bytes = 4 * (nw * T + T * D) + 8 * nw * D, *ops = 2 * nw * T * D;
        break;
    case 5:
        *bytes = 4 * (nd * T + T * D) + 8 * nd * D, *ops = 2 * nd * T * D;
        break;
    case 6:
        *bytes = 4 * nw * T, *ops = nw * T;
        break;
    case 7: /* K and V */
        *bytes = 8 * T * D + 16 * T, *ops = 4 * T * D;
        break;
    case 8:
        *bytes = 12 * T * D + 8 * D, *ops = 4 * T * D;
        break;
    case 9:
        *bytes = 4 * T * D + 4 * T * P, *ops = 2 * T * P * D;
        break;
    case 10:
        *bytes = 4 * walk * (P + 1) + 4 * s->n_cut * P;
        break;
    case 11:
    case 17:
        *bytes = 4 * (walk * nw + walk * D + walk), *ops = 3 * nw * walk * D;
        break;
    case 12:
        *bytes = 4 * (walk * nd + walk * D + walk), *ops = 3 * nd * walk * D;
        break;
    case 13:
        *bytes = 4 * walk * (D + 1), *ops = walk * D;
        break;
    case 14:
        *bytes = 12 * s->Hkv * T;
        break;
    case 15:
        *bytes = 4 * Hq * s->W * T, *ops = Hq * s->W * T;
        break;
    case 16:
        *bytes = 4 * Hq * s->G * T, *ops = Hq * s->G * T;
        break;
    default:
        *bytes = 0;
    }
    if (c >= 2 && c <= 8) /* every KV head in the call */
        *bytes *= s->Hkv, *ops *= s->Hkv;
    if (c == 17) /* one cut: the walk up to the first */
        *bytes *= (double)s->cuts[0] / walk, *ops *= (double)s->cuts[0] / walk;
}

static kvt_status run_case(int c, const bk_shape *s, bk_data *d, cudaStream_t st)
{
    const int T = s->T, D = s->D, nw = s->Gs * s->W, nd = s->Gs * s->G;
    const size_t n = (size_t)s->Hkv * T * D;
    const double scale = 1.0 / sqrt((double)D);
    void *sp = (void *)st;
    switch (c) {
    case 0:
        return kvt_widen_cuda(KVT_DTYPE_BF16, d->kv16, n, d->kvf, sp);
    case 1:
        return kvt_first_nonfinite_cuda(d->kvf, n, d->first, sp);
    case 2:
        return kvt_attn_probs_batch_cuda(d->qw, nw, D, d->kvf, T, d->vis_w, NULL, 0, NULL, scale,
                                         d->prw, NULL, d->lse, s->Hkv, sp);
    case 3:
        return kvt_attn_probs_batch_cuda(d->qd, nd, D, d->kvf, T, d->vis_d, d->kd, s->G, d->vis2_d,
                                         scale, d->prd, d->pr2, d->lse, s->Hkv, sp);
    case 4:
        return kvt_attn_output_batch_cuda(d->prw, nw, T, (size_t)T, d->v, D, d->aw, (size_t)D,
                                          s->Hkv, sp);
    case 5:
        return kvt_attn_output_batch_cuda(d->prd, nd, T, (size_t)T, d->v, D, d->ad, (size_t)D,
                                          s->Hkv, sp);
    case 6:
        return kvt_row_mass_cuda(d->prw, nw * s->Hkv, T, (size_t)T, NULL, d->rsw, NULL, sp);
    case 7: {
        kvt_status e = kvt_row_norms_cuda(d->kvf, T * s->Hkv, D, d->norm, sp);
        return e ? e : kvt_row_norms_cuda(d->v, T * s->Hkv, D, d->norm + (size_t)T * s->Hkv, sp);
    }
    case 8:
        for (int h = 0; h < s->Hkv; h++) {
            const size_t o = (size_t)h * T * D;
            kvt_status e = kvt_unit_rows_cuda(d->kvf + o, T, D, d->ku + o, d->mean + (size_t)h * D,
                                              d->inv, sp);
            if (e)
                return e;
        }
        return KVT_OK;
    case 9:
        return kvt_cosine_table_cuda(d->ku, T, D, d->probe, s->P, d->ct, sp);
    case 10:
        return kvt_coverage_best_cuda_ws(d->ct, T, s->P, d->order, s->cuts, s->n_cut, d->best,
                                         d->work, d->work_bytes, sp);
    case 11:
    case 17:
        return kvt_sweep_output_cuda_ws(nw, T, D, d->prw, (size_t)T, d->v, d->aw, (size_t)D, NULL,
                                        1, NULL, d->rsw, d->order, s->cuts, c == 17 ? 1 : s->n_cut,
                                        NULL, NULL, 0, d->rec, d->err, NULL, d->work, d->work_bytes,
                                        sp);
    case 12:
        return kvt_sweep_output_cuda_ws(nd, T, D, d->prd, (size_t)T, d->v, d->ad, (size_t)D, NULL,
                                        1, NULL, d->rsd, d->order, s->cuts, s->n_cut, NULL, NULL, 0,
                                        d->rec, d->err, NULL, d->work, d->work_bytes, sp);
    case 13:
        return kvt_sweep_redundancy_cuda_ws(d->ku, T, D, d->order, s->cuts, s->n_cut, d->rd,
                                            d->work, d->work_bytes, sp);
    case 14:
        return kvt_rank_desc_segmented_cuda(d->rs, s->Hkv, T, d->rorder, sp);
    case 15:
        return kvt_window_scores_cuda(d->prw, s->Gs * s->Hkv, s->Hkv, s->W, s->W, T, 7,
                                      KVT_POOL_AVG, KVT_REDUCE_MEAN, false, d->sc_work, d->sc, sp);
    case 16:
        return kvt_col_mean_cuda(d->prd, s->Hkv, nd, T, T, d->sc, sp);
    }
    return KVT_ERR_INVALID_ARG;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* a device array of n random floats in [lo, lo + span) */
static void *dev_random(size_t n, kvt_rng *r, float lo, float span, bool *ok)
{
    float *h = malloc((n ? n : 1) * sizeof(float));
    void *d = NULL;
    if (!h || cudaMalloc(&d, (n ? n : 1) * sizeof(float)) != cudaSuccess) {
        free(h);
        *ok = false;
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        h[i] = lo + span * (float)kvt_rng_uniform(r);
    if (cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess)
        *ok = false;
    free(h);
    return d;
}

static void *dev_zero(size_t bytes, bool *ok)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 1) != cudaSuccess || cudaMemset(d, 0, bytes) != cudaSuccess)
        *ok = false;
    return d;
}

static void *dev_copy(const void *h, size_t bytes, bool *ok)
{
    void *d = dev_zero(bytes, ok);
    if (d && cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
        *ok = false;
    return d;
}

static bool alloc_data(const bk_shape *s, bk_data *d)
{
    const size_t T = (size_t)s->T, D = (size_t)s->D, nw = (size_t)s->Gs * s->W;
    const size_t nd = (size_t)s->Gs * s->G, n = (size_t)s->Hkv * T * D, P = (size_t)s->P;
    const size_t Hq = (size_t)s->Gs * s->Hkv;
    kvt_rng r;
    kvt_rng_seed(&r, 7);
    bool ok = true;
    memset(d, 0, sizeof(*d));
    const size_t H = (size_t)s->Hkv;
    d->kd = dev_random(H * s->G * D, &r, -1.0f, 2.0f, &ok);
    d->qw = dev_random(H * nw * D, &r, -1.0f, 2.0f, &ok);
    d->qd = dev_random(H * nd * D, &r, -1.0f, 2.0f, &ok);
    d->v = dev_random(n, &r, -1.0f, 2.0f, &ok);
    d->prw = dev_random(Hq * s->W * T, &r, 1e-6f, 1e-5f, &ok);
    d->prd = dev_random(Hq * s->G * T, &r, 1e-6f, 1e-5f, &ok);
    d->kvf = dev_random(n, &r, -1.0f, 2.0f, &ok);
    d->pr2 = dev_zero(H * nd * (size_t)s->G * sizeof(float), &ok);
    d->ku = dev_zero(n * sizeof(float), &ok);
    d->ct = dev_zero(T * P * sizeof(float), &ok);
    d->best = dev_zero((size_t)s->n_cut * P * sizeof(float), &ok);
    d->kv16 = dev_zero(n * sizeof(uint16_t), &ok); /* zeros: finite bf16 */
    d->lse = dev_zero(H * (nw > nd ? nw : nd) * sizeof(double), &ok);
    d->aw = dev_zero(H * nw * D * sizeof(double), &ok);
    d->ad = dev_zero(H * nd * D * sizeof(double), &ok);
    d->rsw = dev_zero(H * nw * sizeof(double), &ok);
    d->rsd = dev_zero(nd * sizeof(double), &ok);
    d->mean = dev_zero(H * D * sizeof(double), &ok);
    d->inv = dev_zero(kvt_unit_rows_cuda_work(s->T, s->D) * sizeof(double), &ok);
    d->norm = dev_zero(2 * H * T * sizeof(double), &ok);
    d->rec = dev_zero((nw > nd ? nw : nd) * s->n_cut * sizeof(double), &ok);
    d->err = dev_zero((nw > nd ? nw : nd) * s->n_cut * sizeof(double), &ok);
    d->rd = dev_zero((size_t)s->n_cut * sizeof(double), &ok);
    d->sc = dev_zero(Hq * T * sizeof(double), &ok);
    d->sc_work = dev_zero((Hq + (size_t)s->Hkv) * T * sizeof(double), &ok);
    d->first = dev_zero(sizeof(unsigned long long), &ok);
    d->rorder = dev_zero((size_t)s->Hkv * T * sizeof(int32_t), &ok);
    /* a random ranking, random probes, random scores to rank */
    int32_t *h = malloc(T * sizeof(int32_t));
    double *sc = malloc((size_t)s->Hkv * T * sizeof(double));
    if (!h || !sc) {
        free(h), free(sc);
        return false;
    }
    for (size_t i = 0; i < T; i++)
        h[i] = (int32_t)i;
    for (size_t i = T - 1; i > 0; i--) {
        size_t j = kvt_rng_u64(&r) % (i + 1);
        int32_t t = h[i];
        h[i] = h[j], h[j] = t;
    }
    d->order = dev_copy(h, T * sizeof(int32_t), &ok);
    d->probe = dev_copy(h, P * sizeof(int32_t), &ok); /* P <= T distinct tokens */
    for (size_t i = 0; i < (size_t)s->Hkv * T; i++)
        sc[i] = kvt_rng_uniform(&r);
    d->rs = dev_copy(sc, (size_t)s->Hkv * T * sizeof(double), &ok);
    free(h), free(sc);
    size_t w = kvt_sweep_cuda_work_bytes(s->T, s->n_cut, s->P);
    size_t wo = kvt_sweep_output_cuda_work_bytes((int)(nw > nd ? nw : nd), s->T, s->D, s->n_cut);
    size_t wr = kvt_sweep_redundancy_cuda_work_bytes(s->T, s->D, s->n_cut);
    d->work_bytes = w > wo ? (w > wr ? w : wr) : (wo > wr ? wo : wr);
    d->work = dev_zero(d->work_bytes, &ok);
    /* visible prefixes as the replay's: window query i of a head at position T - W + i */
    d->vis_w = malloc(nw * sizeof(int));
    d->vis_d = malloc((nd ? nd : 1) * sizeof(int));
    d->vis2_d = malloc((nd ? nd : 1) * sizeof(int));
    if (!d->vis_w || !d->vis_d || !d->vis2_d)
        return false;
    for (size_t i = 0; i < nw; i++)
        d->vis_w[i] = s->T - s->W + (int)(i % (size_t)s->W) + 1;
    for (size_t i = 0; i < nd; i++)
        d->vis_d[i] = s->T, d->vis2_d[i] = (int)(i % (size_t)s->G) + 1;
    return ok;
}

static void free_data(bk_data *d)
{
    void *p[] = {d->v,     d->kd,    d->qw,     d->qd,    d->prw,  d->prd, d->pr2,    d->ku,
                 d->kvf,   d->ct,    d->best,   d->kv16,  d->lse,  d->aw,  d->ad,     d->rsw,
                 d->rsd,   d->mean,  d->inv,    d->norm,  d->rec,  d->err, d->rd,     d->sc,
                 d->order, d->probe, d->rorder, d->first, d->work, d->rs,  d->sc_work};
    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++)
        if (p[i])
            cudaFree(p[i]);
    free(d->vis_w), free(d->vis_d), free(d->vis2_d);
}

static int usage(void)
{
    fprintf(stderr, "usage: bench_gpu_kernels [--tokens T] [--dim D] [--group Gs] [--kv-heads "
                    "Hkv] [--window W] [--decode G] [--probes P] [--reps N] [--read-gbs X] "
                    "[--f64-gops Y] [--json FILE]\n");
    return 1;
}

int main(int argc, char **argv)
{
    bk_shape s = {.T = 32768, .D = 128, .Gs = 4, .Hkv = 8, .W = 32, .G = 16, .P = 256, .reps = 20};
    double read_gbs = 0, f64_gops = 0;
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *ip = !strcmp(a, "--tokens")     ? &s.T
                  : !strcmp(a, "--dim")      ? &s.D
                  : !strcmp(a, "--group")    ? &s.Gs
                  : !strcmp(a, "--kv-heads") ? &s.Hkv
                  : !strcmp(a, "--window")   ? &s.W
                  : !strcmp(a, "--decode")   ? &s.G
                  : !strcmp(a, "--probes")   ? &s.P
                  : !strcmp(a, "--reps")     ? &s.reps
                                             : NULL;
        if (!v)
            return usage();
        if (ip)
            *ip = atoi(v);
        else if (!strcmp(a, "--read-gbs"))
            read_gbs = atof(v);
        else if (!strcmp(a, "--f64-gops"))
            f64_gops = atof(v);
        else if (!strcmp(a, "--json"))
            json = v;
        else
            return usage();
        i++;
    }
    if (s.T < 2 || s.D < 1 || s.D > 512 || s.Gs < 1 || s.Hkv < 1 || s.W < 1 || s.W > s.T ||
        s.G < 1 || s.P < 1 || s.P > s.T || s.reps < 1 || s.reps > MAX_REPS) {
        fprintf(stderr,
                "bench_gpu_kernels: need 2 <= T, 1 <= D <= 512, W <= T, G >= 1, "
                "1 <= P <= T, 1 <= reps <= %d\n",
                MAX_REPS);
        return 1;
    }
    /* the benchmark's budgets: 64 ... 2048 tokens, 5% and 10% of T, kept below T */
    const int b[] = {64, 128, 256, 512, 1024, 2048, s.T / 20, s.T / 10};
    for (int i = 0; i < 8; i++) {
        int c = b[i] < s.T ? (b[i] > 0 ? b[i] : 1) : s.T - 1, j = s.n_cut;
        bool dup = false;
        for (int k = 0; k < s.n_cut; k++)
            dup = dup || s.cuts[k] == c;
        if (dup)
            continue;
        while (j > 0 && s.cuts[j - 1] > c) /* insertion: increasing */
            s.cuts[j] = s.cuts[j - 1], j--;
        s.cuts[j] = c, s.n_cut++;
    }
    char why[256] = "";
    if (kvt_cuda_devices(why, sizeof(why)) == 0) {
        printf("bench_gpu_kernels: %s: not run\n", why);
        return 77;
    }
    struct cudaDeviceProp prop;
    memset(&prop, 0, sizeof(prop));
    cudaGetDeviceProperties(&prop, 0);
    bk_data d = {0};
    cudaStream_t st = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    bk_result res[N_CASES];
    double *gt = malloc((size_t)s.reps * sizeof(double)),
           *ht = malloc((size_t)s.reps * sizeof(double));
    int rc = 1;
    if (!gt || !ht || !alloc_data(&s, &d) ||
        cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
        fprintf(stderr, "bench_gpu_kernels: out of memory (host or device) for T=%d\n", s.T);
        goto out;
    }
    for (int c = 0; c < N_CASES; c++) {
        kvt_status e = run_case(c, &s, &d, st); /* warm-up: first-call costs apart */
        for (int r = 0; !e && r < s.reps; r++) {
            float ms = 0.0f;
            uint64_t t0 = kvt_now_ns();
            if (cudaEventRecord(e0, st) != cudaSuccess || (e = run_case(c, &s, &d, st)) != KVT_OK ||
                cudaEventRecord(e1, st) != cudaSuccess || cudaEventSynchronize(e1) != cudaSuccess ||
                cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess) {
                if (!e)
                    e = kvt_error_set(KVT_ERR_CUDA, "%s", cudaGetErrorString(cudaGetLastError()));
                break;
            }
            ht[r] = (double)(kvt_now_ns() - t0) / 1e3;
            gt[r] = (double)ms * 1e3;
        }
        if (e) {
            fprintf(stderr, "bench_gpu_kernels: %s: %s\n", case_name[c], kvt_error_msg());
            goto out;
        }
        res[c].name = case_name[c];
        res[c].gpu_us = median(gt, s.reps);
        res[c].host_us = median(ht, s.reps);
        case_cost(c, &s, &res[c].bytes, &res[c].ops);
    }
    printf("# bench_gpu_kernels: %s, T=%d D=%d Gs=%d Hkv=%d W=%d G=%d probes=%d, %d cuts up to %d, "
           "median of %d\n\n",
           prop.name, s.T, s.D, s.Gs, s.Hkv, s.W, s.G, s.P, s.n_cut, s.cuts[s.n_cut - 1], s.reps);
    printf("| kernel (one call) | GPU us | host us | MB at least | GB/s | f64 Gop/s | x bound |\n"
           "|---|---|---|---|---|---|---|\n");
    for (int c = 0; c < N_CASES; c++) {
        const bk_result *x = &res[c];
        double bound = 0; /* us */
        if (read_gbs > 0)
            bound = x->bytes / (read_gbs * 1e3);
        if (f64_gops > 0 && x->ops / (f64_gops * 1e3) > bound)
            bound = x->ops / (f64_gops * 1e3);
        char xb[32] = "-";
        if (bound > 0)
            snprintf(xb, sizeof(xb), "%.1f", x->gpu_us / bound);
        printf("| %s | %.1f | %.1f | %.2f | %.0f | %.0f | %s |\n", x->name, x->gpu_us, x->host_us,
               x->bytes / 1e6, x->bytes / (x->gpu_us * 1e3), x->ops / (x->gpu_us * 1e3), xb);
    }
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            fprintf(stderr, "bench_gpu_kernels: %s: cannot write\n", json);
            goto out;
        }
        fprintf(f,
                "{\"device\": \"%s\", \"T\": %d, \"D\": %d, \"Gs\": %d, \"Hkv\": %d, \"W\": %d, "
                "\"G\": %d, \"probes\": %d, \"reps\": %d, \"read_gbs\": %g, \"f64_gops\": %g, "
                "\"kernels\": [",
                prop.name, s.T, s.D, s.Gs, s.Hkv, s.W, s.G, s.P, s.reps, read_gbs, f64_gops);
        for (int c = 0; c < N_CASES; c++)
            fprintf(
                f,
                "%s\n  {\"name\": \"%s\", \"gpu_us\": %.3f, \"host_us\": %.3f, \"bytes\": %.0f, "
                "\"f64_ops\": %.0f}",
                c ? "," : "", res[c].name, res[c].gpu_us, res[c].host_us, res[c].bytes, res[c].ops);
        fprintf(f, "\n]}\n");
        if (fclose(f)) {
            fprintf(stderr, "bench_gpu_kernels: %s: write failed\n", json);
            goto out;
        }
    }
    rc = 0;
out:
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    if (st)
        cudaStreamDestroy(st);
    free_data(&d);
    free(gt), free(ht);
    return rc;
}
