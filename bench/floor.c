/* floor.c - bench_floor (issue #8): the least time any replay of a sweep could take on this
 * machine. Measures the rates that bound a replay from below - decompressing the trace's
 * records with kvtrace's reader (1 and N threads; plus ZSTD_decompress alone on one payload),
 * SGEMM at the replay's shapes (OpenBLAS cblas_sgemm when built with it, else a plain loop,
 * and the output says which), and the running max of the coverage probes - then prices a
 * sweep: floor = bytes to decompress / read rate + FLOPs / SGEMM rate + compares / max rate.
 * Not a test; numbers depend on the machine. Run by bench/run_all.sh; see bench/RESULTS.md.
 *
 * usage: bench_floor TRACE [--threads N] [--policies NP] [--budgets NB] [--bmax B]
 *                          [--probes P] [--min-time S]
 *
 * The FLOPs per layer (letters of kvt_trace.h; Bmax = the largest budget, P = probe keys):
 *   window logits   Hq*Wt*T*D*2          [W*G x D] x [D x T] per KV head
 *   decode logits   Hq*Gd*T*D*2          [Gd*G x D] x [D x T] per KV head
 *   outputs         NP*Hq*(Wt+Gd)*Bmax*D*2  each policy's kept set up to the largest budget
 *   coverage cos    Hkv*T*P*D*2          [T x D] x [D x P] once per KV head
 *   coverage max    NP*Hkv*T*P compares  running max along each policy's ranking
 * Softmax, selection and everything else are left out: this is a floor, not a model. The
 * stages are added (no overlap of reading and compute assumed). floor_cpu_s prices them at
 * one thread's rate per CPU-second; floor_s = floor_cpu_s / N, perfect scaling over N
 * workers (the replay runs one layer per worker). Wall-clock totals are printed too.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <zstd.h>

#include "kvt_trace.h"

/* The one compile-time switch of this tool (set by bench/CMakeLists.txt when pkg-config finds
 * openblas). An #if here is clearer than a stub file for a single call site. */
#if KVT_FLOOR_HAVE_CBLAS
#include <cblas.h>
#define SGEMM_KIND "OpenBLAS cblas_sgemm"
#else
#define SGEMM_KIND "naive loop (no BLAS found at build time)"
#endif

static void die(const char *what)
{
    fprintf(stderr, "bench_floor: %s: %s\n", what, kvt_error_msg());
    exit(1);
}

static double now_s(void)
{
    return (double)kvt_now_ns() * 1e-9;
}

/* ---------------------------------------------------------------------------------------- */
/* Running fn on N threads                                                                  */
/* ---------------------------------------------------------------------------------------- */
typedef struct job job;
typedef void (*job_fn)(job *j);
struct job {
    job_fn fn;
    int tid, n_threads;
    const char *path;
    /* trace reading */
    uint64_t comp_bytes, raw_bytes, n_records;
    /* sgemm / max: private buffers, built by the thread itself */
    int M, N, K, reps;
    float *a, *b, *c;
    int32_t *perm;
    double cpu_s; /* this thread's CPU time in fn (CLOCK_THREAD_CPUTIME_ID) */
};

static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU seconds of all threads of the last run_threads call. */
static double g_cpu_s;

static void *job_main(void *arg)
{
    job *j = arg;
    double t0 = thread_cpu_s();
    j->fn(j);
    j->cpu_s = thread_cpu_s() - t0;
    return NULL;
}

/* Runs fn on n threads (j[0..n-1] filled by the caller); returns the wall time. */
static double run_threads(job *j, int n)
{
    pthread_t th[256];
    double t0 = now_s();
    for (int i = 0; i < n; i++)
        if (pthread_create(&th[i], NULL, job_main, &j[i])) {
            fprintf(stderr, "bench_floor: pthread_create failed\n");
            exit(1);
        }
    g_cpu_s = 0.0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        g_cpu_s += j[i].cpu_s;
    }
    return now_s() - t0;
}

/* ---------------------------------------------------------------------------------------- */
/* Decompression                                                                            */
/* ---------------------------------------------------------------------------------------- */
/* Records a replay needs: everything per layer but Q_ALL (only h2o without colsum uses it). */
static bool needed(const kvt_record_info *ri)
{
    return ri->kind != KVT_KIND_Q_ALL;
}

/* Each thread opens its own reader and decodes records tid, tid+N, ... */
static void read_job(job *j)
{
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(j->path, &r))
        die("open");
    size_t n = kvt_trace_reader_n_records(r), cap = 0;
    uint8_t *buf = NULL;
    for (size_t i = (size_t)j->tid; i < n; i += (size_t)j->n_threads) {
        kvt_record_info ri;
        if (kvt_trace_reader_record(r, i, &ri))
            die("record");
        if (!needed(&ri))
            continue;
        if (ri.raw_bytes > cap) {
            cap = (size_t)ri.raw_bytes;
            free(buf);
            buf = malloc(cap);
            if (!buf)
                die("malloc");
        }
        if (kvt_trace_reader_read_record(r, i, buf, cap))
            die("read_record");
        j->comp_bytes += ri.comp_bytes;
        j->raw_bytes += ri.raw_bytes;
        j->n_records++;
    }
    free(buf);
    kvt_trace_reader_close(r);
}

typedef struct read_rate {
    double s, comp_mbs, raw_mbs;
    double cpu_raw_mbs; /* raw MB per CPU-second of the reading threads */
    uint64_t comp_bytes, raw_bytes, n_records;
} read_rate;

static read_rate measure_read(const char *path, int n_threads)
{
    job j[256];
    memset(j, 0, sizeof(j));
    for (int i = 0; i < n_threads; i++)
        j[i] = (job){.fn = read_job, .tid = i, .n_threads = n_threads, .path = path};
    read_rate rr = {.s = run_threads(j, n_threads)};
    double cpu = g_cpu_s;
    for (int i = 0; i < n_threads; i++) {
        rr.comp_bytes += j[i].comp_bytes;
        rr.raw_bytes += j[i].raw_bytes;
        rr.n_records += j[i].n_records;
    }
    rr.comp_mbs = (double)rr.comp_bytes / rr.s * 1e-6;
    rr.raw_mbs = (double)rr.raw_bytes / rr.s * 1e-6;
    rr.cpu_raw_mbs = cpu > 0 ? (double)rr.raw_bytes / cpu * 1e-6 : 0.0;
    return rr;
}

/* ZSTD_decompress alone on the payload frame of the largest record (it follows the 96-byte
 * Record_Header_Frame, traces/FORMAT.md), repeated for min_time seconds: no file I/O, no
 * byte-plane merge, no checksum. Returns raw MB/s; *comp_mbs gets the compressed rate. */
static double measure_zstd_raw(const char *path, double min_time, double *comp_mbs,
                               double *cpu_raw_mbs, uint64_t *rec_raw, uint64_t *rec_comp)
{
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(path, &r))
        die("open");
    kvt_record_info best = {0}, ri;
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++)
        if (!kvt_trace_reader_record(r, i, &ri) && ri.raw_bytes > best.raw_bytes)
            best = ri;
    kvt_trace_reader_close(r);
    *rec_raw = best.raw_bytes;
    *rec_comp = best.comp_bytes;
    if (!best.raw_bytes)
        return 0.0;
    uint8_t *src = malloc(best.comp_bytes), *dst = malloc(best.raw_bytes);
    int fd = open(path, O_RDONLY);
    if (!src || !dst || fd < 0 ||
        pread(fd, src, best.comp_bytes, (off_t)(best.file_offset + 96)) !=
            (ssize_t)best.comp_bytes) {
        fprintf(stderr, "bench_floor: cannot read the payload of the largest record\n");
        exit(1);
    }
    close(fd);
    ZSTD_DCtx *dc = ZSTD_createDCtx();
    int reps = 0;
    double t0 = now_s(), c0 = thread_cpu_s(), t;
    do {
        size_t n = ZSTD_decompressDCtx(dc, dst, best.raw_bytes, src, best.comp_bytes);
        if (ZSTD_isError(n) || n != best.raw_bytes) {
            fprintf(stderr, "bench_floor: ZSTD_decompress: %s\n",
                    ZSTD_isError(n) ? ZSTD_getErrorName(n) : "size mismatch");
            exit(1);
        }
        reps++;
        t = now_s() - t0;
    } while (t < min_time);
    double cpu = thread_cpu_s() - c0;
    ZSTD_freeDCtx(dc);
    free(src);
    free(dst);
    *comp_mbs = (double)best.comp_bytes * reps / t * 1e-6;
    *cpu_raw_mbs = cpu > 0 ? (double)best.raw_bytes * reps / cpu * 1e-6 : 0.0;
    return (double)best.raw_bytes * reps / t * 1e-6;
}

/* ---------------------------------------------------------------------------------------- */
/* SGEMM: C[M x N] = A[M x K] * B[N x K]^T (row-major; B holds keys, one per row)           */
/* ---------------------------------------------------------------------------------------- */
static void sgemm_nt(int M, int N, int K, const float *a, const float *b, float *c)
{
#if KVT_FLOOR_HAVE_CBLAS
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a, K, b, K, 0.0f, c, N);
#else
    for (int i = 0; i < M; i++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++)
                s += a[(size_t)i * K + k] * b[(size_t)n * K + k];
            c[(size_t)i * N + n] = s;
        }
#endif
}

static float *rand_buf(size_t n, uint64_t seed)
{
    float *x = malloc(n * sizeof(float));
    if (!x)
        die("malloc");
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(kvt_rng_uniform(&r) - 0.5);
    return x;
}

static void sgemm_job(job *j)
{
    j->a = rand_buf((size_t)j->M * j->K, 1 + (uint64_t)j->tid);
    j->b = rand_buf((size_t)j->N * j->K, 100 + (uint64_t)j->tid);
    j->c = malloc((size_t)j->M * j->N * sizeof(float));
    sgemm_nt(j->M, j->N, j->K, j->a, j->b, j->c); /* warm-up, untimed by the caller's reps */
}

static void sgemm_run(job *j)
{
    for (int r = 0; r < j->reps; r++)
        sgemm_nt(j->M, j->N, j->K, j->a, j->b, j->c);
}

/* GFLOP/s of n_threads independent single-threaded SGEMMs (the replay parallelises over
 * layers, one worker per core), at least min_time seconds. */
static double measure_sgemm(int M, int N, int K, int n_threads, double min_time, double *cpu_gflops)
{
#if KVT_FLOOR_HAVE_CBLAS
    openblas_set_num_threads(1);
#endif
    job j[256];
    memset(j, 0, sizeof(j));
    for (int i = 0; i < n_threads; i++)
        j[i] = (job){.fn = sgemm_job, .tid = i, .n_threads = n_threads, .M = M, .N = N, .K = K};
    run_threads(j, n_threads); /* allocate, fill, warm up */
    double flop = 2.0 * M * N * K, t = 0.0;
    int reps = 1;
    for (;;) {
        for (int i = 0; i < n_threads; i++) {
            j[i].fn = sgemm_run;
            j[i].reps = reps;
        }
        t = run_threads(j, n_threads);
        if (t >= min_time || reps > (1 << 20))
            break;
        reps = t > 0.01 ? (int)(reps * min_time / t * 1.1) + 1 : reps * 10;
    }
    for (int i = 0; i < n_threads; i++) {
        free(j[i].a);
        free(j[i].b);
        free(j[i].c);
    }
    *cpu_gflops = flop * reps * n_threads / g_cpu_s * 1e-9;
    return flop * reps * n_threads / t * 1e-9;
}

/* ---------------------------------------------------------------------------------------- */
/* Coverage running max: best[p] = max(best[p], cos[s][p]) along a ranking of all T rows     */
/* ---------------------------------------------------------------------------------------- */
static void max_job(job *j)
{
    j->c = rand_buf((size_t)j->M * j->N, 7 + (uint64_t)j->tid); /* [T x P] cosines */
    j->a = malloc((size_t)j->N * sizeof(float));
    j->perm = malloc((size_t)j->M * sizeof(int32_t));
    kvt_rng r;
    kvt_rng_seed(&r, 3);
    for (int i = 0; i < j->M; i++)
        j->perm[i] = i;
    for (int i = j->M - 1; i > 0; i--) { /* a ranking visits rows in score order */
        int k = (int)(kvt_rng_u64(&r) % (uint64_t)(i + 1));
        int32_t x = j->perm[i];
        j->perm[i] = j->perm[k];
        j->perm[k] = x;
    }
}

static void max_run(job *j)
{
    const int T = j->M, P = j->N;
    float *best = j->a;
    for (int r = 0; r < j->reps; r++) {
        for (int p = 0; p < P; p++)
            best[p] = -2.0f;
        for (int s = 0; s < T; s++) {
            const float *row = j->c + (size_t)j->perm[s] * P;
            for (int p = 0; p < P; p++)
                best[p] = row[p] > best[p] ? row[p] : best[p];
        }
    }
}

/* Compares per second (G/s) of n_threads running maxima over [T x P] matrices. */
static double measure_max(int T, int P, int n_threads, double min_time, double *cpu_gcmps)
{
    job j[256];
    memset(j, 0, sizeof(j));
    for (int i = 0; i < n_threads; i++)
        j[i] = (job){.fn = max_job, .tid = i, .n_threads = n_threads, .M = T, .N = P};
    run_threads(j, n_threads);
    double t = 0.0;
    int reps = 1;
    for (;;) {
        for (int i = 0; i < n_threads; i++) {
            j[i].fn = max_run;
            j[i].reps = reps;
        }
        t = run_threads(j, n_threads);
        if (t >= min_time || reps > (1 << 20))
            break;
        reps = t > 0.01 ? (int)(reps * min_time / t * 1.1) + 1 : reps * 10;
    }
    *cpu_gcmps = (double)T * P * reps * n_threads / g_cpu_s * 1e-9;
    volatile float sink = j[0].a[0];
    (void)sink;
    for (int i = 0; i < n_threads; i++) {
        free(j[i].a);
        free(j[i].c);
        free(j[i].perm);
    }
    return (double)T * P * reps * n_threads / t * 1e-9;
}

/* ---------------------------------------------------------------------------------------- */
int main(int argc, char **argv)
{
    if (argc < 2 || argv[1][0] == '-') {
        fprintf(stderr, "usage: bench_floor TRACE [--threads N] [--policies NP] [--budgets NB] "
                        "[--bmax B] [--probes P] [--min-time S]\n");
        return 2;
    }
    const char *path = argv[1];
    int n_th = kvt_cpu_count(), n_pol = 8, n_bud = 8, bmax = 2048, probes = 256;
    double min_time = 0.5;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            n_th = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--policies"))
            n_pol = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--budgets"))
            n_bud = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--bmax"))
            bmax = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--probes"))
            probes = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--min-time"))
            min_time = atof(argv[i + 1]);
        else {
            fprintf(stderr, "bench_floor: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (n_th < 1 || n_th > 256)
        n_th = 1;

    /* ---- trace shape ---- */
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(path, &r))
        die("open");
    uint32_t Hkv, T, D, Hq = 0, Wt = 0, Gd = 0, d2;
    kvt_dtype dt;
    if (kvt_trace_reader_shape(r, 0, KVT_KIND_K, &Hkv, &T, &D, &dt))
        die("layer 0 has no K");
    if (kvt_trace_reader_shape(r, 0, KVT_KIND_Q_WINDOW, &Hq, &Wt, &d2, &dt))
        die("layer 0 has no Q_window");
    uint32_t hq2;
    if (kvt_trace_reader_shape(r, 0, KVT_KIND_Q_DECODE, &hq2, &Gd, &d2, &dt))
        Gd = 0;
    int L = 0;
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info ri;
        if (!kvt_trace_reader_record(r, i, &ri) && ri.kind == KVT_KIND_K && ri.layer + 1 > L)
            L = ri.layer + 1;
    }
    kvt_trace_reader_close(r);
    const uint32_t G = Hq / Hkv;
    if (bmax > (int)T)
        bmax = (int)T;
    if (probes > (int)T)
        probes = (int)T;

    printf("## bench_floor %s\n\n", path);
    printf("trace: L=%d Hq=%u Hkv=%u D=%u T=%u Wt=%u Gd=%u; sweep: %d policies, %d budgets, "
           "Bmax=%d, %d probes; threads=%d; SGEMM: %s\n\n",
           L, Hq, Hkv, D, T, Wt, Gd, n_pol, n_bud, bmax, probes, n_th, SGEMM_KIND);

    /* ---- rates: wall clock with 1 and N threads, and per CPU-second of 1 thread ---- */
    (void)measure_read(path, n_th); /* warm the page cache: the floor is not the disk */
    read_rate r1 = measure_read(path, 1);
    read_rate rn = measure_read(path, n_th);
    double zc = 0.0, zcpu = 0.0;
    uint64_t rec_raw, rec_comp;
    double zr = measure_zstd_raw(path, min_time, &zc, &zcpu, &rec_raw, &rec_comp);

    typedef struct rate3 {
        double w1, wn, c1; /* 1 thread wall, N threads wall (all threads), 1 thread per CPU-s */
    } rate3;
    double unused;
    const int Mw = (int)(Wt * G), Md = (int)(Gd * G), Mo = (int)((Wt + Gd) * G);
    rate3 gw, gd, go, gp, gc, mx;
    gw.w1 = measure_sgemm(Mw, (int)T, (int)D, 1, min_time, &gw.c1);
    gw.wn = measure_sgemm(Mw, (int)T, (int)D, n_th, min_time, &unused);
    gd = gw;
    if (Md) {
        gd.w1 = measure_sgemm(Md, (int)T, (int)D, 1, min_time, &gd.c1);
        gd.wn = measure_sgemm(Md, (int)T, (int)D, n_th, min_time, &unused);
    }
    /* outputs: [(Wt+Gd)*G x Bmax] x [Bmax x D], the P.V of the largest kept set */
    go.w1 = measure_sgemm(Mo, (int)D, bmax, 1, min_time, &go.c1);
    go.wn = measure_sgemm(Mo, (int)D, bmax, n_th, min_time, &unused);
    gp.w1 = measure_sgemm((int)T, 1024, (int)D, 1, min_time, &gp.c1); /* the P=1024 */
    gp.wn = measure_sgemm((int)T, 1024, (int)D, n_th, min_time, &unused);
    gc = gp;
    if (probes != 1024) {
        gc.w1 = measure_sgemm((int)T, probes, (int)D, 1, min_time, &gc.c1);
        gc.wn = measure_sgemm((int)T, probes, (int)D, n_th, min_time, &unused);
    }
    mx.w1 = measure_max((int)T, probes, 1, min_time, &mx.c1);
    mx.wn = measure_max((int)T, probes, n_th, min_time, &unused);
    const rate3 rd = {r1.raw_mbs, rn.raw_mbs, r1.cpu_raw_mbs};

    printf("### Rates\n\n| what | shape | 1 thread (wall) | 1 thread (per CPU-s) | %d threads "
           "(wall, all threads) |\n|---|---|---|---|---|\n",
           n_th);
    printf("| trace read (kvt_trace_reader_read_record, page cache warm) | %llu records, %.1f MB "
           "comp -> %.1f MB raw | %.0f MB/s raw (%.0f comp) | %.0f MB/s raw | %.0f MB/s raw (%.0f "
           "comp) |\n",
           (unsigned long long)r1.n_records, (double)r1.comp_bytes * 1e-6,
           (double)r1.raw_bytes * 1e-6, r1.raw_mbs, r1.comp_mbs, r1.cpu_raw_mbs, rn.raw_mbs,
           rn.comp_mbs);
    printf("| ZSTD_decompressDCtx alone (largest record, byte planes not merged) | %.2f MB -> "
           "%.2f MB | %.0f MB/s raw (%.0f comp) | %.0f MB/s raw | - |\n",
           (double)rec_comp * 1e-6, (double)rec_raw * 1e-6, zr, zc, zcpu);
    const struct {
        const char *what;
        int M, K, N;
        const rate3 *r;
    } gem[] = {
        {"SGEMM window logits", Mw, (int)D, (int)T, &gw},
        {"SGEMM decode logits", Md, (int)D, (int)T, &gd},
        {"SGEMM outputs P.V", Mo, bmax, (int)D, &go},
        {"SGEMM probes (issue shape)", (int)T, (int)D, 1024, &gp},
        {"SGEMM probes (this sweep)", (int)T, (int)D, probes, &gc},
    };
    for (size_t i = 0; i < sizeof(gem) / sizeof(gem[0]); i++) {
        if (!gem[i].M || (i == 4 && probes == 1024))
            continue;
        printf("| %s | [%d x %d] x [%d x %d] | %.1f GFLOP/s | %.1f GFLOP/s | %.1f GFLOP/s |\n",
               gem[i].what, gem[i].M, gem[i].K, gem[i].K, gem[i].N, gem[i].r->w1, gem[i].r->c1,
               gem[i].r->wn);
    }
    printf("| coverage running max | [%u x %d] rows in ranking order | %.2f Gcmp/s | %.2f Gcmp/s "
           "| %.2f Gcmp/s |\n\n",
           T, probes, mx.w1, mx.c1, mx.wn);

    /* ---- the floor ---- */
    const double f_win = (double)Hq * Wt * T * D * 2, f_dec = (double)Hq * Gd * T * D * 2;
    const double f_out = (double)n_pol * Hq * (Wt + Gd) * bmax * D * 2;
    const double f_cov = (double)Hkv * T * probes * D * 2;
    const double c_max = (double)n_pol * Hkv * T * probes;
    const struct {
        const char *name, *formula;
        double amount; /* per trace, in units of the rate */
        const char *unit;
        double scale; /* printed amount = amount * scale */
        const rate3 *r;
        double unit_per_rate; /* rates are in MB/s, GFLOP/s, Gcmp/s */
    } st[] = {
        {"decompress (needed records)", "raw bytes of every record but Q_all", (double)rn.raw_bytes,
         "MB", 1e-6, &rd, 1e6},
        {"window logits", "L*Hq*Wt*T*D*2", L * f_win, "GFLOP", 1e-9, &gw, 1e9},
        {"decode logits", "L*Hq*Gd*T*D*2", L * f_dec, "GFLOP", 1e-9, &gd, 1e9},
        {"outputs to Bmax", "L*NP*Hq*(Wt+Gd)*Bmax*D*2", L * f_out, "GFLOP", 1e-9, &go, 1e9},
        {"coverage cosines", "L*Hkv*T*P*D*2", L * f_cov, "GFLOP", 1e-9, &gc, 1e9},
        {"coverage running max", "L*NP*Hkv*T*P", L * c_max, "Gcmp", 1e-9, &mx, 1e9},
    };
    /* floor_s = CPU-seconds at the 1-thread per-CPU-second rates, divided by N (perfect scaling
     * over layers): the least time on N cores, and the figure least moved by other jobs on a
     * shared machine (CPU time leaves out the time a thread waited for a core). The wall-clock
     * totals with 1 and N threads are printed next to it. Stages are added: no overlap of
     * reading and compute is assumed. */
    double tot1 = 0.0, totn = 0.0, totc = 0.0;
    printf("### Floor\n\n| stage | amount | formula | s (1 thread, wall) | s (%d threads, wall) | "
           "CPU-s |\n|---|---|---|---|---|---|\n",
           n_th);
    for (size_t i = 0; i < sizeof(st) / sizeof(st[0]); i++) {
        const rate3 *rt = st[i].r;
        double s1 = rt->w1 > 0 ? st[i].amount / (rt->w1 * st[i].unit_per_rate) : 0.0;
        double sn = rt->wn > 0 ? st[i].amount / (rt->wn * st[i].unit_per_rate) : 0.0;
        double sc = rt->c1 > 0 ? st[i].amount / (rt->c1 * st[i].unit_per_rate) : 0.0;
        printf("| %s | %.2f %s | %s | %.3f | %.3f | %.3f |\n", st[i].name,
               st[i].amount * st[i].scale, st[i].unit, st[i].formula, s1, sn, sc);
        tot1 += s1;
        totn += sn;
        totc += sc;
    }
    printf("| **total** | | | **%.3f** | **%.3f** | **%.3f** |\n\n", tot1, totn, totc);
    printf("floor_s_1thread %.3f\n", tot1);
    printf("floor_s_%dthreads %.3f\n", n_th, totn);
    printf("floor_cpu_s %.3f\n", totc);
    printf("floor_s %.3f\n", totc / n_th);
    return 0;
}
