/* test_kernels_cpu.c - the fast CPU kernels (kernels/cpu/, dense products through OpenBLAS or
 * the blocked fallback) against their references on fixed-seed random inputs and awkward
 * shapes (T = 1, T not a multiple of the 256-key block, D = 64, 80, 128, one query, a window
 * wider than the prompt prefix), the way ggml's test-backend-ops compares backends:
 * elementwise |a - b| <= atol + rtol*|ref| and a normalised error bound, guard words after
 * every output left untouched, NaN where the reference has NaN, the same status on bad input.
 * Also the plain gemm against a triple loop, and the ref/fast switch (KVT_KERNELS=ref).
 */
#include <string.h>

#include "kernel_test_inputs.h"
#include "replay_test_util.h"

/* Tolerances: both sides accumulate in double and differ only in summation order; results
 * stored in f32 (probabilities, cosines) may then round to neighbouring floats. */
#define ATOL_F32 2e-7 /* one f32 ulp at 1 is 1.2e-7 */
#define RTOL_F32 1e-6
#define ATOL_F64 1e-12
#define RTOL_F64 1e-10
#define NMSE_MAX 1e-12
#define GUARD    0x7fc0dead /* a NaN pattern nobody writes */
#define N_GUARD  16

static int n_mismatch;

static void put_guard(void *end)
{
    uint32_t *g = end;
    for (int i = 0; i < N_GUARD; i++)
        g[i] = GUARD;
}

static bool guard_ok(const void *end)
{
    const uint32_t *g = end;
    for (int i = 0; i < N_GUARD; i++)
        if (g[i] != GUARD)
            return false;
    return true;
}

/* compare n values; returns true if all are within tolerance */
static bool close_f64(const char *what, const double *ref, const double *got, size_t n, double atol,
                      double rtol)
{
    double num = 0.0, den = 0.0;
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(ref[i]) || isnan(got[i])) {
            if (isnan(ref[i]) != isnan(got[i]) && bad++ < 10)
                fprintf(stderr, "  %s[%zu]: ref %.17g got %.17g (NaN mismatch)\n", what, i, ref[i],
                        got[i]);
            continue;
        }
        double d = fabs(ref[i] - got[i]);
        num += d * d;
        den += ref[i] * ref[i];
        if (d > atol + rtol * fabs(ref[i]) && bad++ < 10)
            fprintf(stderr, "  %s[%zu]: ref %.17g got %.17g\n", what, i, ref[i], got[i]);
    }
    if (den > 0 && num / den > NMSE_MAX && bad++ < 10)
        fprintf(stderr, "  %s: NMSE %.3g\n", what, num / den);
    n_mismatch += bad;
    return bad == 0;
}

static bool close_f32(const char *what, const float *ref, const float *got, size_t n)
{
    double *a = malloc((n + 1) * sizeof(double)), *b = malloc((n + 1) * sizeof(double));
    for (size_t i = 0; i < n; i++)
        a[i] = ref[i], b[i] = got[i];
    bool ok = close_f64(what, a, b, n, ATOL_F32, RTOL_F32);
    free(a);
    free(b);
    return ok;
}

static void test_gemm(void)
{
    kvt_rng r;
    kvt_rng_seed(&r, 7);
    const int shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {17, 128, 256}, {64, 80, 33}, {2, 3, 0}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        for (int bt = 0; bt < 2; bt++) {
            double *A = malloc(((size_t)m * k + 1) * 8), *B = malloc(((size_t)k * n + 1) * 8);
            double *C = malloc(((size_t)m * n + N_GUARD) * 8), *R = malloc((size_t)m * n * 8);
            for (size_t i = 0; i < (size_t)m * k; i++)
                A[i] = kvt_rng_uniform(&r) - 0.5;
            for (size_t i = 0; i < (size_t)k * n; i++)
                B[i] = kvt_rng_uniform(&r) - 0.5;
            for (size_t i = 0; i < (size_t)m * n; i++)
                C[i] = R[i] = kvt_rng_uniform(&r);
            put_guard(C + (size_t)m * n);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    double acc = 0.0;
                    for (int p = 0; p < k; p++)
                        acc += A[(size_t)i * k + p] *
                               (bt ? B[(size_t)j * k + p] : B[(size_t)p * n + j]);
                    R[(size_t)i * n + j] = 0.5 * R[(size_t)i * n + j] - 2.0 * acc;
                }
            kvt_gemm_f64(bt, m, n, k, -2.0, A, k, B, bt ? k : n, 0.5, C, n);
            KVT_EXPECT_MSG(close_f64("gemm_f64", R, C, (size_t)m * n, 1e-13, 1e-12),
                           "gemm_f64 m=%d n=%d k=%d trans=%d", m, n, k, bt);
            KVT_EXPECT(guard_ok(C + (size_t)m * n));
            if (!bt) { /* the same product with A stored transposed, [k, m] */
                double *At = malloc(((size_t)k * m + 1) * 8);
                for (int i = 0; i < m; i++)
                    for (int p = 0; p < k; p++)
                        At[(size_t)p * m + i] = A[(size_t)i * k + p];
                for (int i = 0; i < m; i++) /* C0 again: R = 0.5*C0 - 2*acc, so C0 = 2*(R+2acc) */
                    for (int j = 0; j < n; j++) {
                        double acc = 0.0;
                        for (int p = 0; p < k; p++)
                            acc += A[(size_t)i * k + p] * B[(size_t)p * n + j];
                        C[(size_t)i * n + j] = 2.0 * (R[(size_t)i * n + j] + 2.0 * acc);
                    }
                kvt_gemm_f64_at(m, n, k, -2.0, At, m, B, n, 0.5, C, n);
                KVT_EXPECT_MSG(close_f64("gemm_f64_at", R, C, (size_t)m * n, 1e-13, 1e-12),
                               "gemm_f64_at m=%d n=%d k=%d", m, n, k);
                KVT_EXPECT(guard_ok(C + (size_t)m * n));
                free(At);
            }
            free(A), free(B), free(C), free(R);
        }
    }
}

static void test_attn(int n_q, int T, int D, int n2, uint64_t seed)
{
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    kt_attn in;
    kt_attn_make(&in, &r, n_q, T, D, n2);
    float *q = in.q, *k = in.k, *k2 = in.k2, *v = in.v;
    int *vis = in.vis, *vis2 = in.vis2;
    size_t np = (size_t)n_q * T, np2 = (size_t)n_q * n2;
    float *pa = malloc((np + N_GUARD) * 4), *pb = malloc((np + N_GUARD) * 4);
    float *qa = malloc((np2 + N_GUARD) * 4), *qb = malloc((np2 + N_GUARD) * 4);
    double *la = malloc((size_t)n_q * 8), *lb = malloc((size_t)n_q * 8);
    double *work = malloc(((size_t)T + n2 + 1) * 8);
    put_guard(pb + np);
    put_guard(qb + np2);
    const float *kk2 = n2 ? k2 : NULL;
    double scale = 1.0 / sqrt((double)D);
    KVT_CHECK(kvt_attn_probs_ref(q, n_q, D, k, T, vis, kk2, n2, vis2, scale, pa, n2 ? qa : NULL, la,
                                 work));
    KVT_CHECK(kvt_attn_probs_cpu(q, n_q, D, k, T, vis, kk2, n2, vis2, scale, pb, n2 ? qb : NULL, lb,
                                 work));
    KVT_EXPECT_MSG(close_f32("probs", pa, pb, np), "attn_probs n_q=%d T=%d D=%d n2=%d", n_q, T, D,
                   n2);
    KVT_EXPECT(close_f32("probs2", qa, qb, np2));
    KVT_EXPECT(close_f64("lse", la, lb, (size_t)n_q, ATOL_F64, RTOL_F64));
    KVT_EXPECT(guard_ok(pb + np) && guard_ok(qb + np2));
    /* masked keys are exactly 0 in both */
    for (int i = 0; i < n_q; i++)
        for (int j = vis[i]; j < T; j++)
            KVT_EXPECT(pb[(size_t)i * T + j] == 0.0f);
    /* the zs variants write what the plain calls do, and zs gives lse; the block-1
       probabilities again from zs (block 2 not given) are the same bits, over stale memory */
    float *pz = malloc((np + N_GUARD) * 4), *pg = malloc((np + N_GUARD) * 4);
    float *qz = malloc((np2 + N_GUARD) * 4);
    double *lz = malloc((size_t)n_q * 8), *zs = malloc((size_t)n_q * 16);
    for (int ref = 0; ref < 2; ref++) {
        KVT_CHECK((ref ? kvt_attn_probs_zs_ref : kvt_attn_probs_zs_cpu)(
            q, n_q, D, k, T, vis, kk2, n2, vis2, scale, pz, n2 ? qz : NULL, lz, zs, work));
        KVT_EXPECT(!memcmp(pz, ref ? pa : pb, np * 4) &&
                   !memcmp(lz, ref ? la : lb, (size_t)n_q * 8));
        KVT_EXPECT(!memcmp(qz, ref ? qa : qb, np2 * 4));
        for (int i = 0; i < n_q; i++)
            KVT_EXPECT(lz[i] == zs[2 * i] + log(zs[2 * i + 1]));
        memset(pg, 0x7f, np * 4);
        put_guard(pg + np);
        KVT_CHECK((ref ? kvt_attn_probs_again_ref : kvt_attn_probs_again_cpu)(q, n_q, D, k, T, vis,
                                                                              scale, zs, pg, work));
        KVT_EXPECT_MSG(!memcmp(pg, pz, np * 4), "attn_probs_again%s n_q=%d T=%d D=%d n2=%d",
                       ref ? "_ref" : "_cpu", n_q, T, D, n2);
        KVT_EXPECT(guard_ok(pg + np));
    }

    /* weighted value sums from the same probabilities */
    size_t no = (size_t)n_q * D;
    double *oa = malloc(no * 8), *ob = malloc((no + N_GUARD) * 8);
    put_guard(ob + no);
    kvt_attn_output_ref(pa, n_q, T, T, v, D, oa, D);
    KVT_CHECK(kvt_attn_output_cpu(pa, n_q, T, T, v, D, ob, D));
    KVT_EXPECT_MSG(close_f64("output", oa, ob, no, ATOL_F64, RTOL_F64), "attn_output T=%d D=%d", T,
                   D);
    KVT_EXPECT(guard_ok(ob + no));

    /* NaN in a key: the same status from both */
    if (T > 1) {
        k[(size_t)(T / 2) * D] = NAN;
        int vis_all = T;
        KVT_EXPECT_STATUS(
            kvt_attn_probs_cpu(q, 1, D, k, T, &vis_all, NULL, 0, NULL, scale, pb, NULL, lb, work),
            KVT_ERR_NAN);
        KVT_EXPECT_STATUS(kvt_attn_probs_again_cpu(q, 1, D, k, T, &vis_all, scale, zs, pg, work),
                          KVT_ERR_NAN);
        KVT_EXPECT_STATUS(kvt_attn_probs_again_ref(q, 1, D, k, T, &vis_all, scale, zs, pg, work),
                          KVT_ERR_NAN);
    }
    kt_attn_free(&in);
    free(pz), free(pg), free(qz), free(lz), free(zs);
    free(pa), free(pb), free(qa);
    free(qb), free(la), free(lb), free(work), free(oa), free(ob);
}

/* H2O column sums: the fast path against the reference, T around the 64-row and 256-key
 * blocks, and the same error for a non-finite logit */
static void test_colsum(int T, int D, uint64_t seed)
{
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    size_t n = (size_t)T * D;
    float *q = malloc(n * 4 + 4), *k = malloc(n * 4 + 4);
    for (size_t i = 0; i < n; i++)
        q[i] = (float)kvt_rng_normal(&r), k[i] = (float)kvt_rng_normal(&r);
    double *a = malloc(((size_t)T + 1) * 8), *b = malloc(((size_t)T + N_GUARD) * 8);
    double *work = malloc(((size_t)T + 1) * 8);
    put_guard(b + T);
    double scale = 1.0 / sqrt((double)D);
    KVT_CHECK(kvt_attn_colsum_ref(q, k, T, D, scale, work, a));
    KVT_CHECK(kvt_attn_colsum_cpu(q, k, T, D, scale, work, b));
    /* a probability may move by one f32 ulp (6e-8 relative); a column sums up to T of them */
    KVT_EXPECT_MSG(close_f64("colsum", a, b, (size_t)T, 1e-9, 1e-6), "colsum T=%d D=%d", T, D);
    KVT_EXPECT(guard_ok(b + T));
    double tot = 0;
    for (int j = 0; j < T; j++)
        tot += b[j];
    KVT_EXPECT_MSG(fabs(tot - T) < 1e-4 * T, "colsum total %g, want T=%d", tot,
                   T); /* rows sum to 1 */
    if (T > 3) {
        k[(size_t)(T / 2) * D + 1] = INFINITY;
        kvt_status sa = kvt_attn_colsum_ref(q, k, T, D, scale, work, a);
        KVT_EXPECT_STATUS(sa, KVT_ERR_NAN);
        char ma[200];
        snprintf(ma, sizeof(ma), "%s", kvt_error_msg());
        KVT_EXPECT_STATUS(kvt_attn_colsum_cpu(q, k, T, D, scale, work, b), sa);
        KVT_EXPECT_MSG(!strcmp(ma, kvt_error_msg()), "ref '%s', cpu '%s'", ma, kvt_error_msg());
    }
    free(q), free(k), free(a), free(b), free(work);
}

/* transposed: the fast sweep also gets the probabilities token-major (a padded stride) */
static void test_sweep(int n_q, int T, int D, bool with_mod, bool extra, bool transposed,
                       uint64_t seed)
{
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    kt_sweep S;
    kt_sweep_make(&S, &r, n_q, T, D);
    float *p = S.p, *v = S.v;
    double *a = S.a, *mm = S.mm, *pe = S.pe, *oe = S.oe;
    uint8_t *mod = S.mod;
    int32_t *order = S.order, *cuts = S.cuts;
    int n_cut = S.n_cut;
    size_t pts = transposed ? (size_t)n_q + 3 : 0;
    float *pt = malloc(((size_t)T * (n_q + 3) + 1) * 4);
    const float *ptp = transposed ? pt : NULL;
    if (transposed)
        kvt_transpose_f32_cpu(p, n_q, T, (size_t)T, pt, pts);
    for (int j = 0; transposed && j < T; j++)
        for (int q = 0; q < n_q; q++)
            KVT_EXPECT(pt[(size_t)j * pts + q] == p[(size_t)q * T + j]);
    size_t nr = (size_t)n_q * n_cut, nm = nr * KVT_N_MODALITIES;
    double *ra = malloc(nr * 8), *ea = malloc(nr * 8), *ma = malloc(nm * 8);
    double *rb = malloc((nr + N_GUARD) * 8), *eb = malloc((nr + N_GUARD) * 8);
    double *mb = malloc((nm + N_GUARD) * 8);
    put_guard(rb + nr), put_guard(eb + nr), put_guard(mb + nm);
    void *wa = malloc(kvt_sweep_output_workspace_bytes(n_q, D));
    void *wb = malloc(kvt_sweep_output_cpu_workspace_bytes(n_q, D));
    const uint8_t *md = with_mod ? mod : NULL;
    KVT_CHECK(kvt_sweep_output_ref(n_q, T, D, p, T, v, a, D, extra ? pe : NULL, 1,
                                   extra ? oe : NULL, NULL, order, cuts, n_cut, md, mm,
                                   KVT_N_MODALITIES, ra, ea, with_mod ? ma : NULL, wa));
    KVT_CHECK(kvt_sweep_output_cpu(n_q, T, D, p, T, ptp, pts, v, a, D, extra ? pe : NULL, 1,
                                   extra ? oe : NULL, NULL, order, cuts, n_cut, md, mm,
                                   KVT_N_MODALITIES, rb, eb, with_mod ? mb : NULL, wb));
    KVT_EXPECT_MSG(close_f64("recall", ra, rb, nr, 1e-12, 1e-10), "sweep n_q=%d T=%d D=%d", n_q, T,
                   D);
    /* the caller's cached row sums give exactly the same answer as computing them */
    double *rs = malloc((size_t)n_q * 8), *rc = malloc(nr * 8), *ec = malloc(nr * 8);
    for (int q = 0; q < n_q; q++) {
        double sum = 0.0;
        for (int j = 0; j < T; j++)
            sum += p[(size_t)q * T + j];
        rs[q] = sum;
    }
    KVT_CHECK(kvt_sweep_output_cpu(n_q, T, D, p, T, ptp, pts, v, a, D, extra ? pe : NULL, 1,
                                   extra ? oe : NULL, rs, order, cuts, n_cut, md, mm,
                                   KVT_N_MODALITIES, rc, ec, NULL, wb));
    KVT_EXPECT(!memcmp(rc, rb, nr * 8) && !memcmp(ec, eb, nr * 8));
    free(rs), free(rc), free(ec);
    /* error is a ratio of small differences near full sets: relative 1e-7 */
    KVT_EXPECT_MSG(close_f64("err", ea, eb, nr, 1e-9, 1e-7), "sweep err n_q=%d T=%d D=%d", n_q, T,
                   D);
    if (with_mod)
        KVT_EXPECT(close_f64("recall_mod", ma, mb, nm, 1e-12, 1e-10));
    KVT_EXPECT(guard_ok(rb + nr) && guard_ok(eb + nr) && guard_ok(mb + nm));
    /* bad cuts: the same status */
    int32_t bad[2] = {5, 3};
    KVT_EXPECT_STATUS(kvt_sweep_output_cpu(n_q, T, D, p, T, ptp, pts, v, a, D, NULL, 1, NULL, NULL,
                                           order, bad, 2, NULL, NULL, 0, rb, eb, NULL, wb),
                      KVT_ERR_INVALID_ARG);

    /* cosine table over unit keys, probes including the first and last key */
    float *ku = malloc((size_t)T * D * 4);
    kvt_unit_rows_ref(v, T, D, ku, NULL);
    int n_probe = T < 37 ? T : 37;
    int32_t *probe = malloc((size_t)n_probe * 4);
    for (int i = 0; i < n_probe; i++)
        probe[i] = (int32_t)((int64_t)i * T / n_probe);
    probe[n_probe - 1] = T - 1;
    size_t nc = (size_t)T * n_probe;
    float *ca = malloc(nc * 4), *cb = malloc((nc + N_GUARD) * 4);
    put_guard(cb + nc);
    KVT_CHECK(kvt_cosine_table_ref(ku, T, D, probe, n_probe, ca));
    KVT_CHECK(kvt_cosine_table_cpu(ku, T, D, probe, n_probe, cb));
    KVT_EXPECT_MSG(close_f32("cosine", ca, cb, nc), "cosine T=%d D=%d", T, D);
    KVT_EXPECT(guard_ok(cb + nc));
    /* coverage and redundancy sweeps over the same table and cuts: bitwise the reference's */
    {
        uint8_t pm[64];
        for (int i = 0; i < n_probe; i++)
            pm[i] = (uint8_t)(mod[probe[i]] % KVT_N_MODALITIES);
        size_t nk = (size_t)n_cut * KVT_N_MODALITIES;
        double cva[16], cvb[16 + N_GUARD], rda[16], rdb[16], cma[16 * 4], cmb[16 * 4 + N_GUARD];
        double rka[16], rkb[16 + N_GUARD], wk[256], cda[16], cdb[16 + N_GUARD];
        float wf[64];
        int32_t pp[64]; /* each probe's place in the ranking */
        kt_probe_positions(order, T, probe, n_probe, pp);
        put_guard(cvb + n_cut), put_guard(cmb + nk), put_guard(rkb + n_cut), put_guard(cdb + n_cut);
        /* every probe, and the first ones only (a policy's prefix) */
        const int nes[2] = {n_probe, n_probe * 2 / 3};
        for (int k = 0; k < 2; k++) {
            const int ne = nes[k];
            KVT_CHECK(kvt_sweep_coverage_ref(ca, T, n_probe, ne, order, cuts, n_cut, pm, pp, wf,
                                             cva, rda, cma, cda));
            KVT_CHECK(kvt_sweep_coverage_cpu(ca, T, n_probe, ne, order, cuts, n_cut, pm, pp, wf,
                                             cvb, rdb, cmb, cdb));
            KVT_EXPECT_MSG(!memcmp(cva, cvb, (size_t)n_cut * 8) &&
                               !memcmp(rda, rdb, (size_t)n_cut * 8) && !memcmp(cma, cmb, nk * 8) &&
                               !memcmp(cda, cdb, (size_t)n_cut * 8),
                           "coverage over %d of %d probes", ne, n_probe);
            KVT_EXPECT(guard_ok(cdb + n_cut));
        }
        KVT_CHECK(kvt_sweep_redundancy_ref(ku, T, D, order, cuts, n_cut, wk, rka));
        KVT_CHECK(kvt_sweep_redundancy_cpu(ku, T, D, order, cuts, n_cut, wk, rkb));
        KVT_EXPECT(!memcmp(rka, rkb, (size_t)n_cut * 8));
        KVT_EXPECT(guard_ok(cvb + n_cut) && guard_ok(cmb + nk) && guard_ok(rkb + n_cut));
        KVT_EXPECT_STATUS(kvt_sweep_coverage_cpu(ca, T, n_probe, n_probe, order, bad, 2, pm, NULL,
                                                 wf, cvb, rdb, cmb, NULL),
                          KVT_ERR_INVALID_ARG);
        KVT_EXPECT_STATUS(kvt_sweep_redundancy_cpu(ku, T, D, order, bad, 2, wk, rkb),
                          KVT_ERR_INVALID_ARG);
    }
    probe[0] = T;
    KVT_EXPECT_STATUS(kvt_cosine_table_cpu(ku, T, D, probe, n_probe, cb), KVT_ERR_INVALID_ARG);

    free(pt);
    kt_sweep_free(&S);
    free(ra);
    free(ea), free(ma), free(rb), free(eb), free(mb), free(wa), free(wb), free(ku), free(probe);
    free(ca), free(cb);
}

static void test_switch(void)
{
    /* the dispatchers follow kvt_kernels_use_ref; both give the same answer here */
    kvt_kernels_use_ref(true);
    KVT_EXPECT(kvt_kernels_ref_only());
    kvt_kernels_use_ref(false);
    KVT_EXPECT(!kvt_kernels_ref_only());
    KVT_EXPECT(!strcmp(kvt_kernels_cpu_backend(), "openblas") ||
               !strcmp(kvt_kernels_cpu_backend(), "blocked-c"));
}

/* kvt_accum_rows and kvt_dot_queries (the decode-time caches' metrics and scores): bitwise
 * their references at awkward widths (1 to 28 query heads: blocks of four and every
 * remainder; 1 to 9 keys: groups of four and every remainder; D = 1, 13, 64, 80, 128), guard
 * words after each output; the dispatchers too */
static void test_accum_dot(void)
{
    static const int nus[] = {1, 2, 3, 4, 5, 7, 8, 28}, Ds[] = {1, 13, 64, 80, 128};
    static const int nks[] = {1, 2, 3, 4, 5, 9};
    enum { NK_MAX = 9 };
    kvt_rng r;
    kvt_rng_seed(&r, 2207);
    int bad = 0, n_cases = 0;
    for (int a = 0; a < 8; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 6; c++) {
                const int nu = nus[a], D = Ds[b], nk = nks[c];
                float *v = tl_randn(&r, (size_t)D * NK_MAX, 3.0),
                      *qt = tl_randn(&r, (size_t)D * nu, 2.0);
                const float *kp[NK_MAX];
                for (int j = 0; j < nk; j++) /* rows out of order, one twice */
                    kp[j] = v + (size_t)((j * 5 + 2) % (nk > 1 ? nk - 1 : 1)) * D;
                double *p = malloc(nu * sizeof(double));
                const size_t ns = (size_t)nu * D, nz = (size_t)nu * nk;
                double *s0 = malloc((ns + N_GUARD) * sizeof(double)),
                       *s1 = malloc((ns + N_GUARD) * sizeof(double)),
                       *s2 = malloc((ns + N_GUARD) * sizeof(double));
                double *z0 = malloc((nz + N_GUARD) * sizeof(double)),
                       *z1 = malloc((nz + N_GUARD) * sizeof(double)),
                       *z2 = malloc((nz + N_GUARD) * sizeof(double));
                for (int x = 0; x < nu; x++) /* probabilities over a wide range, some negated */
                    p[x] = (x % 3 == 2 ? -1.0 : 1.0) * exp(-20.0 * kvt_rng_uniform(&r));
                for (size_t i = 0; i < ns; i++)
                    s0[i] = s1[i] = s2[i] = kvt_rng_normal(&r);
                put_guard(s1 + ns);
                put_guard(z1 + nz);
                kvt_accum_rows_ref(s0, nu, D, p, v);
                kvt_accum_rows_cpu(s1, nu, D, p, v);
                kvt_kernels_use_ref(true);
                kvt_accum_rows(s2, nu, D, p, v);
                kvt_dot_queries(qt, nu, D, kp, nk, z2);
                kvt_kernels_use_ref(false);
                kvt_dot_queries_ref(qt, nu, D, kp, nk, z0);
                kvt_dot_queries_cpu(qt, nu, D, kp, nk, z1);
                bool ok =
                    !memcmp(s0, s1, ns * sizeof(double)) && !memcmp(s0, s2, ns * sizeof(double)) &&
                    !memcmp(z0, z1, nz * sizeof(double)) && !memcmp(z0, z2, nz * sizeof(double)) &&
                    guard_ok(s1 + ns) && guard_ok(z1 + nz);
                if (!ok && bad++ < 5)
                    fprintf(stderr,
                            "  accum_rows/dot_queries nu=%d D=%d keys=%d differ from the "
                            "reference\n",
                            nu, D, nk);
                n_cases++;
                free(v), free(qt), free(p), free(s0), free(s1), free(s2), free(z0), free(z1),
                    free(z2);
            }
    n_mismatch += bad;
    KVT_EXPECT_MSG(bad == 0, "%d of %d accum_rows/dot_queries cases differ", bad, n_cases);
}

/* the vectorised loops of vec_cpu.c (whichever clone this CPU runs) */
static void test_vec(void)
{
    /* exp to within 1 ulp of libm's over [-708, 0], 0 below; the sum in double */
    enum { N = 4099 };
    double *z = malloc(N * sizeof(double)), *x = malloc(N * sizeof(double));
    kvt_rng r;
    kvt_rng_seed(&r, 91);
    for (int i = 0; i < N; i++)
        x[i] = -760.0 * kvt_rng_uniform(&r);
    const double edge[] = {0.0,  -0.0,   -1e-300, -0.3465735902799726, -0.34657359027997264,
                           -1.0, -707.9, -708.0,  -708.0000001,        -745.2,
                           -1e6};
    memcpy(x, edge, sizeof(edge));
    memcpy(z, x, N * sizeof(double));
    double sum = kvt_exp_shift_sum_cpu(z, N, 0.0), want = 0.0, worst = 0.0;
    for (int i = 0; i < N; i++) {
        double e = exp(x[i]);
        want += z[i];
        if (x[i] < -708.0) {
            KVT_EXPECT_MSG(z[i] == 0.0, "exp(%.17g) = %g, want 0 below -708", x[i], z[i]);
            continue;
        }
        double rel = fabs(z[i] - e) / e;
        worst = rel > worst ? rel : worst;
        KVT_EXPECT_MSG(rel <= 2.3e-16, "exp(%.17g): %.17g vs libm %.17g", x[i], z[i], e);
    }
    KVT_EXPECT_NEAR(sum, want, 1e-12 * fabs(want));
    KVT_EXPECT(z[0] == 1.0 && z[1] == 1.0);
    /* shift: exp(z - m) */
    double y[3] = {3.0, 2.0, 1.0};
    KVT_EXPECT_NEAR(kvt_exp_shift_sum_cpu(y, 3, 3.0), 1.0 + exp(-1.0) + exp(-2.0), 1e-15);
    /* max and the first non-finite logit */
    double m = 0.0;
    KVT_EXPECT(kvt_max_finite_cpu(x, N, &m) == -1 && m == 0.0);
    KVT_EXPECT(kvt_max_finite_cpu(x, 0, &m) == -1 && isinf(m) && m < 0);
    x[1000] = INFINITY, x[3000] = NAN;
    KVT_EXPECT(kvt_max_finite_cpu(x, N, &m) == 1000);
    x[1000] = -1.0;
    KVT_EXPECT(kvt_max_finite_cpu(x, N, &m) == 3000);
    free(z), free(x);

    /* f32 helpers against plain loops */
    enum { T = 1037, D = 80 };
    float *k = malloc((size_t)T * D * 4), *ka = malloc((size_t)T * D * 4);
    float *kb = malloc((size_t)T * D * 4);
    uint8_t *mod = malloc(T);
    kt_fill(&r, k, (size_t)T * D, 3.0f);
    for (int j = 0; j < D; j++)
        k[(size_t)5 * D + j] = 0.0f; /* a zero row: the 1e-12 floor */
    for (int j = 0; j < T; j++)
        mod[j] = (uint8_t)(j % 7); /* codes >= 4 count as the last modality */
    double na[T], nb[T], ma[D], mb[D], sa = 0.0, pa[4] = {0}, pb[4];
    kvt_row_norms_ref(k, T, D, na);
    kvt_row_norms_cpu(k, T, D, nb);
    KVT_EXPECT(close_f64("row_norms", na, nb, T, ATOL_F64, RTOL_F64));
    kvt_unit_rows_ref(k, T, D, ka, ma);
    kvt_unit_rows_cpu(k, T, D, kb, mb);
    KVT_EXPECT(close_f32("unit_rows", ka, kb, (size_t)T * D));
    KVT_EXPECT(close_f64("unit_mean", ma, mb, D, ATOL_F64, RTOL_F64));
    for (int j = 0; j < T; j++) {
        sa += k[j];
        pa[mod[j] < 3 ? mod[j] : 3] += k[j];
    }
    KVT_EXPECT_NEAR(kvt_sum_f32_cpu(k, T), sa, 1e-12);
    kvt_mass_by_mod_cpu(k, mod, T, pb);
    KVT_EXPECT(close_f64("mass_by_mod", pa, pb, 4, ATOL_F64, RTOL_F64));
    KVT_EXPECT(kvt_first_nonfinite_f32_cpu(k, (size_t)T * D) == (size_t)T * D);
    k[(size_t)T * D - 1] = NAN;
    KVT_EXPECT(kvt_first_nonfinite_f32_cpu(k, (size_t)T * D) == (size_t)T * D - 1);
    k[4097] = -INFINITY;
    KVT_EXPECT(kvt_first_nonfinite_f32_cpu(k, (size_t)T * D) == 4097);
    /* transpose: odd shapes, padded strides */
    const int sh[][2] = {{1, 1}, {33, 70}, {128, 1037}};
    for (int s = 0; s < 3; s++) {
        int rows = sh[s][0], cols = sh[s][1];
        size_t lds = (size_t)cols + 2, ldd = (size_t)rows + 5;
        float *src = malloc((size_t)rows * lds * 4), *dst = malloc(((size_t)cols * ldd + 1) * 4);
        kt_fill(&r, src, (size_t)rows * lds, 1.0f);
        for (size_t i = 0; i < (size_t)cols * ldd; i++)
            dst[i] = -7.0f;
        kvt_transpose_f32_cpu(src, rows, cols, lds, dst, ldd);
        int bad = 0;
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++)
                bad += dst[(size_t)j * ldd + i] != src[(size_t)i * lds + j];
        for (int j = 0; j < cols; j++)
            for (size_t i = (size_t)rows; i < ldd; i++)
                bad += dst[(size_t)j * ldd + i] != -7.0f; /* padding untouched */
        KVT_EXPECT_MSG(bad == 0, "transpose %dx%d: %d wrong", rows, cols, bad);
        free(src), free(dst);
    }
    free(k), free(ka), free(kb), free(mod);
}

/* the radix ranking gives the reference's permutation exactly: ties (by index), -0 == +0,
 * infinities, NaN last, every digit shared (skipped passes), sizes around the cut-over */
static void test_rank(void)
{
    kvt_rng r;
    kvt_rng_seed(&r, 101);
    const int ns[] = {0, 1, 63, 64, 65, 1000, 8160};
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++)
        for (int kind = 0; kind < 4; kind++) {
            int n = ns[i];
            double *s = malloc(((size_t)n + 1) * sizeof(double));
            int32_t *oa = malloc(((size_t)n + 1) * 4), *ob = malloc(((size_t)n + 1) * 4);
            int32_t *w = malloc(((size_t)n + 1) * 4);
            for (int j = 0; j < n; j++) {
                double u = kvt_rng_uniform(&r);
                if (kind == 0)
                    s[j] = u * 1e-4; /* probabilities: high bytes shared */
                else if (kind == 1)
                    s[j] = (double)(int)(u * 7) - 3.0; /* many ties, negatives */
                else if (kind == 2)
                    s[j] = 0.25; /* all equal: every pass skipped */
                else {
                    const double sp[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, -NAN, 1e-310, -1.0};
                    s[j] = u < 0.5 ? sp[(int)(u * 16)] : u - 0.75;
                }
            }
            kvt_rank_desc_ref(s, n, oa, w);
            KVT_CHECK(kvt_rank_desc_cpu(s, n, ob, w));
            KVT_EXPECT_MSG(!memcmp(oa, ob, (size_t)n * 4), "rank n=%d kind=%d", n, kind);
            free(s), free(oa), free(ob), free(w);
        }
}

int main(void)
{
    test_gemm();
    test_rank();
    test_vec();
    test_accum_dot();
    const int Ds[] = {64, 80, 128};
    for (int i = 0; i < 3; i++) {
        test_attn(1, 1, Ds[i], 0, 11 + i);     /* T = 1 */
        test_attn(32, 300, Ds[i], 0, 21 + i);  /* T not a multiple of the block */
        test_attn(16, 513, Ds[i], 16, 31 + i); /* decode queries with a second block */
        test_attn(40, 20, Ds[i], 0, 41 + i);   /* more queries than keys: clamped */
        test_colsum(1, Ds[i], 91 + i);
        test_colsum(63, Ds[i], 92 + i);
        test_colsum(65, Ds[i], 93 + i);
        test_colsum(300, Ds[i], 94 + i);
        for (int tr = 0; tr < 2; tr++) {
            test_sweep(1, 1, Ds[i], false, false, tr, 51 + i);
            test_sweep(12, 700, Ds[i], true, false, tr, 61 + i);
            test_sweep(5, 1030, Ds[i], false, true, tr, 71 + i);
            test_sweep(9, 600, Ds[i], true, true, tr, 81 + i);
        }
    }
    test_switch();
    if (n_mismatch)
        fprintf(stderr, "%d mismatches\n", n_mismatch);
    return kvt_test_result("test_kernels_cpu");
}
