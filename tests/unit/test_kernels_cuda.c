/* test_kernels_cuda.c - the CUDA kernels (kernels/cuda/) against their references, the way
 * ggml's test-backend-ops compares backends (issue #7): fresh fixed-seed inputs and awkward
 * shapes (T = 1, T not a multiple of a block, more queries than keys, a second key block,
 * one row, D = 64, 80, 128, segments of 1 to 8160),
 * exact permutations and bitwise bests where the reference's arithmetic is reproduced, f32
 * ulp-level tolerances where only the summation order differs, guard words after every device
 * output left untouched, no NaN where the reference has none, and bad arguments refused.
 * Label gpu: exits 77 ("not run") without a CUDA device. KVT_KERNELS_MAX_T=N skips the cases
 * longer than N tokens (rows, for the norms and rankings) and says how many: compute-sanitizer's
 * racecheck runs the whole test in about 100 s on an H200, the short cases hold every block
 * layout and partial tile.
 */
#include <cuda_runtime_api.h>

#include "kernel_test_inputs.h"
#include "kvt_kernels_cuda.h"

#define N_GUARD 16

static int max_t;   /* KVT_KERNELS_MAX_T: cases longer than this are skipped (0: none) */
static int skipped; /* how many */

static bool too_long(int T)
{
    if (max_t <= 0 || T <= max_t)
        return false;
    skipped++;
    return true;
}
#define GUARD 0xA5u /* byte pattern of the guard words */

static void *to_dev(const void *h, size_t bytes)
{
    void *d = NULL;
    KVT_EXPECT(cudaMalloc(&d, bytes + 1) == cudaSuccess);
    if (bytes)
        KVT_EXPECT(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    return d;
}

/* a device output of `bytes` followed by N_GUARD guard words */
static void *out_dev(size_t bytes)
{
    void *d = NULL;
    KVT_EXPECT(cudaMalloc(&d, bytes + N_GUARD * 4) == cudaSuccess);
    KVT_EXPECT(cudaMemset(d, (int)GUARD, bytes + N_GUARD * 4) == cudaSuccess);
    return d;
}

/* copy an output back and check its guard */
static void from_dev(void *h, const void *d, size_t bytes, const char *what)
{
    unsigned char g[N_GUARD * 4];
    KVT_EXPECT(cudaDeviceSynchronize() == cudaSuccess);
    if (bytes)
        KVT_EXPECT(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(g, (const char *)d + bytes, sizeof(g), cudaMemcpyDeviceToHost) ==
               cudaSuccess);
    int bad = 0;
    for (size_t i = 0; i < sizeof(g); i++)
        bad += g[i] != GUARD;
    KVT_EXPECT_MSG(bad == 0, "%s: %d guard bytes overwritten", what, bad);
}

/* |a - b| <= atol + rtol |a| for all, no NaN unless both; returns mismatches */
static int cmp64(const char *what, const double *a, const double *b, size_t n, double atol,
                 double rtol)
{
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        bool ok = (isnan(a[i]) && isnan(b[i])) ||
                  (!isnan(b[i]) && fabs(a[i] - b[i]) <= atol + rtol * fabs(a[i]));
        if (!ok && bad++ < 5)
            fprintf(stderr, "  %s[%zu]: ref %.17g cuda %.17g\n", what, i, a[i], b[i]);
    }
    return bad;
}

static int cmp32(const char *what, const float *a, const float *b, size_t n)
{
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        bool ok =
            (isnan(a[i]) && isnan(b[i])) || (!isnan(b[i]) && d <= 2e-7 + 1e-6 * fabs((double)a[i]));
        if (!ok && bad++ < 5)
            fprintf(stderr, "  %s[%zu]: ref %.9g cuda %.9g\n", what, i, a[i], b[i]);
    }
    return bad;
}

static void test_attn(int n_q, int T, int D, int n2, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    kt_attn in;
    kt_attn_make(&in, &r, n_q, T, D, n2);
    float *q = in.q, *k = in.k, *k2 = in.k2, *v = in.v;
    int *vis = in.vis, *vis2 = in.vis2;
    size_t np = (size_t)n_q * T, np2 = (size_t)n_q * n2, no = (size_t)n_q * D;
    float *pa = malloc(np * 4 + 4), *pb = malloc(np * 4 + 4);
    float *qa = malloc(np2 * 4 + 4), *qb = malloc(np2 * 4 + 4);
    double *la = malloc((size_t)n_q * 8), *lb = malloc((size_t)n_q * 8);
    double *oa = malloc(no * 8), *ob = malloc(no * 8), *work = malloc(((size_t)T + n2 + 1) * 8);
    const double scale = 1.0 / sqrt((double)D);
    const float *kk2 = n2 ? k2 : NULL;
    KVT_CHECK(kvt_attn_probs_ref(q, n_q, D, k, T, vis, kk2, n2, vis2, scale, pa, n2 ? qa : NULL, la,
                                 work));
    kvt_attn_output_ref(pa, n_q, T, T, v, D, oa, D);
    float *dq = to_dev(q, (size_t)n_q * D * 4), *dk = to_dev(k, (size_t)T * D * 4);
    float *dk2 = to_dev(k2, (size_t)n2 * D * 4), *dv = to_dev(v, (size_t)T * D * 4);
    float *dp = out_dev(np * 4), *dp2 = out_dev(np2 * 4);
    double *dl = out_dev((size_t)n_q * 8), *dout = out_dev(no * 8);
    KVT_CHECK(kvt_attn_probs_cuda(dq, n_q, D, dk, T, vis, n2 ? dk2 : NULL, n2, vis2, scale, dp,
                                  n2 ? dp2 : NULL, dl, NULL));
    from_dev(pb, dp, np * 4, "probs");
    from_dev(qb, dp2, np2 * 4, "probs2");
    from_dev(lb, dl, (size_t)n_q * 8, "lse");
    KVT_EXPECT_MSG(cmp32("probs", pa, pb, np) == 0, "probs n_q=%d T=%d D=%d n2=%d", n_q, T, D, n2);
    KVT_EXPECT(cmp32("probs2", qa, qb, np2) == 0);
    KVT_EXPECT(cmp64("lse", la, lb, (size_t)n_q, 1e-12, 1e-10) == 0);
    for (int i = 0; i < n_q; i++) /* masked keys exactly 0 */
        for (int j = vis[i]; j < T; j++)
            KVT_EXPECT(pb[(size_t)i * T + j] == 0.0f);
    if (n_q > 32) { /* 32 rows of logits at a time: the same bits as all rows at once */
        kvt_attn_cuda_set_zbuf_bytes(1);
        KVT_CHECK(kvt_attn_probs_cuda(dq, n_q, D, dk, T, vis, n2 ? dk2 : NULL, n2, vis2, scale, dp,
                                      n2 ? dp2 : NULL, dl, NULL));
        kvt_attn_cuda_set_zbuf_bytes(0);
        float *pc = malloc(np * 4 + 4), *qc = malloc(np2 * 4 + 4);
        double *lc = malloc((size_t)n_q * 8);
        from_dev(pc, dp, np * 4, "probs (row blocks)");
        from_dev(qc, dp2, np2 * 4, "probs2 (row blocks)");
        from_dev(lc, dl, (size_t)n_q * 8, "lse (row blocks)");
        KVT_EXPECT_MSG(!memcmp(pb, pc, np * 4) && !memcmp(qb, qc, np2 * 4) &&
                           !memcmp(lb, lc, (size_t)n_q * 8),
                       "probs in blocks of 32 rows differ: n_q=%d T=%d D=%d n2=%d", n_q, T, D, n2);
        free(pc), free(qc), free(lc);
    }
    /* outputs from the reference's probabilities */
    KVT_EXPECT(cudaMemcpy(dp, pa, np * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    KVT_CHECK(kvt_attn_output_cuda(dp, n_q, T, T, dv, D, dout, D, NULL));
    from_dev(ob, dout, no * 8, "output");
    KVT_EXPECT_MSG(cmp64("output", oa, ob, no, 1e-12, 1e-10) == 0, "output T=%d D=%d", T, D);
    /* a NaN key: the reference's status and message */
    if (T > 1) {
        k[(size_t)(T / 2) * D] = NAN;
        int vis_all = T;
        KVT_EXPECT_STATUS(
            kvt_attn_probs_ref(q, 1, D, k, T, &vis_all, NULL, 0, NULL, scale, pa, NULL, la, work),
            KVT_ERR_NAN);
        char want[256];
        snprintf(want, sizeof(want), "%s", kvt_error_msg());
        KVT_EXPECT(cudaMemcpy(dk, k, (size_t)T * D * 4, cudaMemcpyHostToDevice) == cudaSuccess);
        KVT_EXPECT_STATUS(kvt_attn_probs_cuda(dq, 1, D, dk, T, &vis_all, NULL, 0, NULL, scale, dp,
                                              NULL, dl, NULL),
                          KVT_ERR_NAN);
        KVT_EXPECT_MSG(!strcmp(kvt_error_msg(), want), "%s vs %s", kvt_error_msg(), want);
        /* a NaN in a key no query sees is no error (the tiles compute it and must ignore it) */
        int vis_half = T / 2;
        KVT_EXPECT_STATUS(
            kvt_attn_probs_ref(q, 1, D, k, T, &vis_half, NULL, 0, NULL, scale, pa, NULL, la, work),
            KVT_OK);
        KVT_EXPECT_STATUS(kvt_attn_probs_cuda(dq, 1, D, dk, T, &vis_half, NULL, 0, NULL, scale, dp,
                                              NULL, dl, NULL),
                          KVT_OK);
        KVT_EXPECT(cudaMemcpy(pb, dp, (size_t)T * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
        KVT_EXPECT(cmp32("probs (NaN unseen)", pa, pb, (size_t)T) == 0);
        int none = 0;
        KVT_EXPECT_STATUS(
            kvt_attn_probs_cuda(dq, 1, D, dk, T, &none, NULL, 0, NULL, scale, dp, NULL, dl, NULL),
            KVT_ERR_INVALID_ARG);
    }
    cudaFree(dq), cudaFree(dk), cudaFree(dk2), cudaFree(dv), cudaFree(dp), cudaFree(dp2);
    cudaFree(dl), cudaFree(dout);
    kt_attn_free(&in);
    free(pa), free(pb), free(qa);
    free(qb), free(la), free(lb), free(oa), free(ob), free(work);
}

/* nb batches in one call (the replay's KV groups at once): each batch bit for bit the call of
 * its own, the first batch's non-finite logit the one reported, and with the smallest buffer
 * (a launch per batch, 32 rows of logits at a time) the same bits and the same report */
static void test_attn_batch(int n_q, int T, int D, int n2, int nb, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    const size_t nqd = (size_t)n_q * D, nkd = (size_t)T * D, n2d = (size_t)n2 * D;
    const size_t np = (size_t)n_q * T, np2 = (size_t)n_q * n2, no = (size_t)n_q * D;
    float *q = malloc(nb * nqd * 4 + 4), *k = malloc(nb * nkd * 4 + 4);
    float *k2 = malloc(nb * n2d * 4 + 4), *v = malloc(nb * nkd * 4 + 4);
    kt_fill(&r, q, nb * nqd, 2.0f), kt_fill(&r, k, nb * nkd, 2.0f);
    kt_fill(&r, k2, nb * n2d, 2.0f), kt_fill(&r, v, nb * nkd, 1.0f);
    int *vis = malloc((size_t)n_q * sizeof(int)), *vis2 = malloc((size_t)n_q * sizeof(int));
    for (int i = 0; i < n_q; i++) {
        vis[i] = T - n_q + i + 1 > 1 ? T - n_q + i + 1 : 1;
        vis2[i] = n2 ? i % (n2 + 1) : 0;
    }
    const double scale = 1.0 / sqrt((double)D);
    float *dq = to_dev(q, nb * nqd * 4), *dk = to_dev(k, nb * nkd * 4);
    float *dk2 = to_dev(k2, nb * n2d * 4 + 4), *dv = to_dev(v, nb * nkd * 4);
    float *dp = out_dev(nb * np * 4), *dp2 = out_dev(nb * np2 * 4 + 4);
    double *dl = out_dev(nb * (size_t)n_q * 8), *dout = out_dev(nb * no * 8);
    float *pa = malloc(nb * np * 4 + 4), *pb = malloc(nb * np * 4 + 4);
    float *qa = malloc(nb * np2 * 4 + 4), *qb = malloc(nb * np2 * 4 + 4);
    double *la = malloc(nb * (size_t)n_q * 8), *lb = malloc(nb * (size_t)n_q * 8);
    double *oa = malloc(nb * no * 8), *ob = malloc(nb * no * 8);
    float *kk2 = n2 ? dk2 : NULL, *pp2 = n2 ? dp2 : NULL;
    for (int b = 0; b < nb; b++) { /* one call each */
        KVT_CHECK(kvt_attn_probs_cuda(dq + b * nqd, n_q, D, dk + b * nkd, T, vis,
                                      n2 ? kk2 + b * n2d : NULL, n2, vis2, scale, dp + b * np,
                                      n2 ? pp2 + b * np2 : NULL, dl + (size_t)b * n_q, NULL));
        KVT_CHECK(
            kvt_attn_output_cuda(dp + b * np, n_q, T, T, dv + b * nkd, D, dout + b * no, D, NULL));
    }
    from_dev(pa, dp, nb * np * 4, "probs"), from_dev(qa, dp2, nb * np2 * 4, "probs2");
    from_dev(la, dl, nb * (size_t)n_q * 8, "lse"), from_dev(oa, dout, nb * no * 8, "outputs");
    for (int zb = 0; zb < 2; zb++) { /* the default logit buffer, then 32 rows at a time */
        kvt_attn_cuda_set_zbuf_bytes(zb ? 1 : 0);
        KVT_EXPECT(cudaMemset(dp, 0, nb * np * 4) == cudaSuccess);
        KVT_EXPECT(cudaMemset(dout, 0, nb * no * 8) == cudaSuccess);
        KVT_CHECK(kvt_attn_probs_batch_cuda(dq, n_q, D, dk, T, vis, kk2, n2, vis2, scale, dp, pp2,
                                            dl, nb, NULL));
        KVT_CHECK(kvt_attn_output_batch_cuda(dp, n_q, T, T, dv, D, dout, D, nb, NULL));
        from_dev(pb, dp, nb * np * 4, "probs"), from_dev(qb, dp2, nb * np2 * 4, "probs2");
        from_dev(lb, dl, nb * (size_t)n_q * 8, "lse"), from_dev(ob, dout, nb * no * 8, "outputs");
        KVT_EXPECT_MSG(!memcmp(pa, pb, nb * np * 4) && !memcmp(qa, qb, nb * np2 * 4) &&
                           !memcmp(la, lb, nb * (size_t)n_q * 8) && !memcmp(oa, ob, nb * no * 8),
                       "batch of %d differs from its calls: n_q=%d T=%d D=%d n2=%d zbuf %d", nb,
                       n_q, T, D, n2, zb);
    }
    kvt_attn_cuda_set_zbuf_bytes(0);
    /* a NaN key in the last batch, then another in the second: the second's is the one
       reported, with its own call's message */
    if (nb >= 3 && T > 1) {
        char want[256] = "";
        for (int pass = 0; pass < 2; pass++) {
            const int b = pass ? 1 : nb - 1;
            k[b * nkd + (size_t)(T / 2 - pass) * D + 1] = NAN; /* another key: another message */
            KVT_EXPECT(cudaMemcpy(dk, k, nb * nkd * 4, cudaMemcpyHostToDevice) == cudaSuccess);
            KVT_EXPECT_STATUS(kvt_attn_probs_cuda(dq + b * nqd, n_q, D, dk + b * nkd, T, vis,
                                                  n2 ? kk2 + b * n2d : NULL, n2, vis2, scale, dp,
                                                  pp2, dl, NULL),
                              KVT_ERR_NAN);
            snprintf(want, sizeof(want), "%s", kvt_error_msg());
            for (int zb = 0; zb < 2; zb++) { /* one launch; a launch per batch */
                kvt_attn_cuda_set_zbuf_bytes(zb ? 1 : 0);
                KVT_EXPECT_STATUS(kvt_attn_probs_batch_cuda(dq, n_q, D, dk, T, vis, kk2, n2, vis2,
                                                            scale, dp, pp2, dl, nb, NULL),
                                  KVT_ERR_NAN);
                KVT_EXPECT_MSG(!strcmp(kvt_error_msg(), want), "%s vs %s", kvt_error_msg(), want);
            }
            kvt_attn_cuda_set_zbuf_bytes(0);
        }
    }
    KVT_EXPECT_STATUS(kvt_attn_probs_batch_cuda(dq, n_q, D, dk, T, vis, kk2, n2, vis2, scale, dp,
                                                pp2, dl, 0, NULL),
                      KVT_ERR_INVALID_ARG);
    cudaFree(dq), cudaFree(dk), cudaFree(dk2), cudaFree(dv), cudaFree(dp), cudaFree(dp2);
    cudaFree(dl), cudaFree(dout);
    free(q), free(k), free(k2), free(v), free(vis), free(vis2), free(pa), free(pb), free(qa);
    free(qb), free(la), free(lb), free(oa), free(ob);
}

/* rfull: the rows' stored masses given (as the replay gives them), else summed by the kernel */
static void test_sweep_rf(int n_q, int T, int D, bool with_mod, bool extra, bool rfull,
                          uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    kt_sweep S;
    kt_sweep_make(&S, &r, n_q, T, D);
    float *p = S.p, *v = S.v;
    double *a = S.a, *mm = S.mm, *pe = S.pe, *oe = S.oe;
    uint8_t *mod = S.mod;
    int32_t *order = S.order, *cuts = S.cuts;
    int n_cut = S.n_cut;
    const int NMOD = KVT_N_MODALITIES;
    size_t nr = (size_t)n_q * n_cut, nm = nr * NMOD;
    double *ra = malloc(nr * 8), *ea = malloc(nr * 8), *ma = malloc(nm * 8);
    double *rb = malloc(nr * 8), *eb = malloc(nr * 8), *mb = malloc(nm * 8);
    void *wa = malloc(kvt_sweep_output_workspace_bytes(n_q, D));
    const uint8_t *md = with_mod ? mod : NULL;
    double *rf = malloc((size_t)n_q * 8);
    for (int q = 0; q < n_q; q++) {
        rf[q] = 0.0;
        for (int j = 0; j < T; j++)
            rf[q] += p[(size_t)q * T + j];
    }
    KVT_CHECK(kvt_sweep_output_ref(n_q, T, D, p, T, v, a, D, extra ? pe : NULL, 1,
                                   extra ? oe : NULL, rfull ? rf : NULL, order, cuts, n_cut, md, mm,
                                   NMOD, ra, ea, with_mod ? ma : NULL, wa));
    float *dp = to_dev(p, (size_t)n_q * T * 4), *dv = to_dev(v, (size_t)T * D * 4);
    double *da = to_dev(a, (size_t)n_q * D * 8), *dpe = to_dev(pe, (size_t)n_q * 8);
    double *doe = to_dev(oe, (size_t)n_q * D * 8), *dmm = to_dev(mm, (size_t)n_q * NMOD * 8);
    int32_t *dord = to_dev(order, (size_t)T * 4);
    uint8_t *dmod = to_dev(mod, (size_t)T);
    double *drf = to_dev(rf, (size_t)n_q * 8);
    double *dr = out_dev(nr * 8), *de = out_dev(nr * 8), *dm = out_dev(nm * 8);
    KVT_CHECK(kvt_sweep_output_cuda(
        n_q, T, D, dp, T, dv, da, D, extra ? dpe : NULL, 1, extra ? doe : NULL, rfull ? drf : NULL,
        dord, cuts, n_cut, with_mod ? dmod : NULL, dmm, NMOD, dr, de, with_mod ? dm : NULL, NULL));
    from_dev(rb, dr, nr * 8, "recall");
    from_dev(eb, de, nr * 8, "err");
    from_dev(mb, dm, with_mod ? nm * 8 : 0, "recall_mod");
    KVT_EXPECT_MSG(cmp64("recall", ra, rb, nr, 1e-14, 1e-12) == 0, "sweep n_q=%d T=%d D=%d", n_q, T,
                   D);
    KVT_EXPECT_MSG(cmp64("err", ea, eb, nr, 1e-12, 1e-9) == 0, "sweep err n_q=%d T=%d D=%d", n_q, T,
                   D);
    if (with_mod)
        KVT_EXPECT(cmp64("recall_mod", ma, mb, nm, 1e-14, 1e-12) == 0);
    double dr_max = 0.0, de_max = 0.0; /* how far from the reference's bits */
    for (size_t i = 0; i < nr; i++) {
        if (ra[i] != rb[i])
            dr_max = fmax(dr_max, fabs(ra[i] - rb[i]) / fmax(fabs(ra[i]), 1e-300));
        if (ea[i] != eb[i])
            de_max = fmax(de_max, fabs(ea[i] - eb[i]) / fmax(fabs(ea[i]), 1e-300));
    }
    printf("sweep n_q=%d T=%d D=%d%s: largest relative difference from the reference: recall "
           "%.1e, err %.1e\n",
           n_q, T, D, rfull ? " (masses given)" : "", dr_max, de_max);
    int32_t bad[2] = {5, 3};
    KVT_EXPECT_STATUS(kvt_sweep_output_cuda(n_q, T, D, dp, T, dv, da, D, NULL, 1, NULL, NULL, dord,
                                            bad, 2, NULL, NULL, 0, dr, de, NULL, NULL),
                      KVT_ERR_INVALID_ARG);
    cudaFree(dp), cudaFree(dv), cudaFree(da), cudaFree(dpe), cudaFree(doe), cudaFree(dmm);
    cudaFree(dord), cudaFree(dmod), cudaFree(dr), cudaFree(de), cudaFree(dm), cudaFree(drf);
    kt_sweep_free(&S);
    free(rf);
    free(ra);
    free(ea), free(ma), free(rb), free(eb), free(mb), free(wa);
}

static void test_sweep(int n_q, int T, int D, bool with_mod, bool extra, uint64_t seed)
{
    test_sweep_rf(n_q, T, D, with_mod, extra, false, seed);
}

/* window scores from the references' pieces, every pooling and reduction */
static void test_scores(int Hq, int Hkv, int Wt, int W, int T, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    size_t np = (size_t)Hq * Wt * T;
    float *prw = malloc(np * 4);
    for (size_t i = 0; i < np; i++)
        prw[i] = (float)(kvt_rng_uniform(&r) * 1e-3);
    const int P = T - W;
    double *a = malloc(((size_t)Hq * P + 1) * 8), *red = malloc(((size_t)Hq * P + 1) * 8);
    double *want = malloc(((size_t)Hq * P + 1) * 8), *got = malloc(((size_t)Hq * P + 1) * 8);
    float *dprw = to_dev(prw, np * 4);
    double *dwork = out_dev(((size_t)Hq + Hkv) * P * 8 + 8), *dout = out_dev((size_t)Hq * P * 8);
    for (int h = 0; h < Hq; h++)
        kvt_col_mean_ref(prw + ((size_t)h * Wt + (Wt - W)) * T, W, T, P, a + (size_t)h * P);
    const kvt_reduce reds[] = {KVT_REDUCE_MEAN, KVT_REDUCE_MAX, KVT_REDUCE_SUM};
    for (int pq = 0; pq < 2; pq++)
        for (int ri = 0; ri < 3; ri++)
            for (int pl = 0; pl < 2; pl++)
                for (int kernel = 1; kernel <= 7; kernel += 6) {
                    kvt_pool pool = pl ? KVT_POOL_MAX : KVT_POOL_AVG;
                    int H = pq ? Hq : Hkv;
                    if (!pq)
                        KVT_CHECK(kvt_gqa_reduce_ref(a, Hq, Hkv, P, reds[ri], red));
                    for (int h = 0; h < H; h++)
                        KVT_CHECK(kvt_pool1d_ref((pq ? a : red) + (size_t)h * P, P, kernel, pool,
                                                 want + (size_t)h * P));
                    KVT_CHECK(kvt_window_scores_cuda(dprw, Hq, Hkv, Wt, W, T, kernel, pool,
                                                     reds[ri], pq, dwork, dout, NULL));
                    from_dev(got, dout, (size_t)H * P * 8, "window_scores");
                    KVT_EXPECT_MSG(!memcmp(want, got, (size_t)H * P * 8),
                                   "window scores Hq=%d Hkv=%d W=%d T=%d per_query=%d reduce=%d "
                                   "pool=%d kernel=%d",
                                   Hq, Hkv, W, T, pq, ri, pl, kernel);
                }
    KVT_EXPECT_STATUS(kvt_window_scores_cuda(dprw, Hq, Hkv, Wt, W, T, 4, KVT_POOL_AVG,
                                             KVT_REDUCE_MEAN, false, dwork, dout, NULL),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_window_scores_cuda(dprw, Hq, Hkv, Wt, Wt + 1, T, 1, KVT_POOL_AVG,
                                             KVT_REDUCE_MEAN, false, dwork, dout, NULL),
                      KVT_ERR_INVALID_ARG);
    /* the oracle's means: groups of R = Wt / 2 consecutive rows, bitwise kvt_col_mean_ref */
    const int R = Wt / 2 > 0 ? Wt / 2 : 1, H2 = Hq * Wt / R;
    double *mw = malloc((size_t)H2 * P * 8 + 8), *mg = malloc((size_t)H2 * P * 8 + 8);
    for (int h = 0; h < H2; h++)
        kvt_col_mean_ref(prw + (size_t)h * R * T, R, T, P, mw + (size_t)h * P);
    double *dmean = out_dev((size_t)H2 * P * 8);
    KVT_CHECK(kvt_col_mean_cuda(dprw, H2, R, T, P, dmean, NULL));
    from_dev(mg, dmean, (size_t)H2 * P * 8, "col_mean");
    KVT_EXPECT_MSG(!memcmp(mw, mg, (size_t)H2 * P * 8),
                   "col_mean H=%d R=%d T=%d P=%d: not bitwise the reference's", H2, R, T, P);
    KVT_EXPECT_STATUS(kvt_col_mean_cuda(dprw, H2, R, T, T + 1, dmean, NULL), KVT_ERR_INVALID_ARG);
    cudaFree(dprw), cudaFree(dwork), cudaFree(dout), cudaFree(dmean);
    free(prw), free(a), free(red), free(want), free(got), free(mw), free(mg);
}

static void test_colsum(int T, int D, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    float *q = malloc((size_t)T * D * 4), *k = malloc((size_t)T * D * 4);
    kt_fill(&r, q, (size_t)T * D, 2.0f);
    kt_fill(&r, k, (size_t)T * D, 2.0f);
    double *want = malloc((size_t)T * 8), *got = malloc((size_t)T * 8),
           *work = malloc((size_t)T * 8);
    const double scale = 1.0 / sqrt((double)D);
    KVT_CHECK(kvt_attn_colsum_ref(q, k, T, D, scale, work, want));
    float *dq = to_dev(q, (size_t)T * D * 4), *dk = to_dev(k, (size_t)T * D * 4);
    double *dwork = out_dev((size_t)T * 16), *dc = out_dev((size_t)T * 8);
    KVT_CHECK(kvt_attn_colsum_cuda(dq, dk, T, D, scale, dwork, dc, NULL));
    from_dev(got, dc, (size_t)T * 8, "colsum");
    /* sums of f32 probabilities: their exponentials may differ in the last ulp */
    KVT_EXPECT_MSG(cmp64("colsum", want, got, (size_t)T, 1e-9, 1e-6) == 0, "colsum T=%d D=%d", T,
                   D);
    double total = 0.0;
    for (int j = 0; j < T; j++)
        total += got[j];
    KVT_EXPECT_NEAR(total, (double)T, 1e-4 * T); /* every query's probabilities sum to ~1 */
    k[(size_t)(T - 1) * D] = NAN;
    KVT_EXPECT_STATUS(kvt_attn_colsum_ref(q, k, T, D, scale, work, want), KVT_ERR_NAN);
    char msg[256];
    snprintf(msg, sizeof(msg), "%s", kvt_error_msg());
    KVT_EXPECT(cudaMemcpy(dk, k, (size_t)T * D * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    KVT_EXPECT_STATUS(kvt_attn_colsum_cuda(dq, dk, T, D, scale, dwork, dc, NULL), KVT_ERR_NAN);
    KVT_EXPECT_MSG(!strcmp(msg, kvt_error_msg()), "%s vs %s", kvt_error_msg(), msg);
    cudaFree(dq), cudaFree(dk), cudaFree(dwork), cudaFree(dc);
    free(q), free(k), free(want), free(got), free(work);
}

static void test_norms(int n, int D, uint64_t seed)
{
    if (too_long(n))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    size_t nx = (size_t)n * D;
    float *x = malloc(nx * 4 + 4), *ka = malloc(nx * 4 + 4), *kb = malloc(nx * 4 + 4);
    double *na = malloc((size_t)n * 8 + 8), *nb = malloc((size_t)n * 8 + 8);
    double *ma = malloc((size_t)D * 8), *mb = malloc((size_t)D * 8);
    kt_fill(&r, x, nx, 3.0f);
    if (n > 2)
        memset(x + (size_t)2 * D, 0, (size_t)D * 4); /* a zero row: the 1e-12 floor */
    kvt_row_norms_ref(x, n, D, na);
    kvt_unit_rows_ref(x, n, D, ka, ma);
    float *dx = to_dev(x, nx * 4), *dku = out_dev(nx * 4);
    double *dn = out_dev((size_t)n * 8), *dm = out_dev((size_t)D * 8),
           *dinv = out_dev(kvt_unit_rows_cuda_work(n, D) * 8);
    KVT_CHECK(kvt_row_norms_cuda(dx, n, D, dn, NULL));
    KVT_CHECK(kvt_unit_rows_cuda(dx, n, D, dku, dm, dinv, NULL));
    from_dev(nb, dn, (size_t)n * 8, "row_norms");
    from_dev(kb, dku, nx * 4, "unit_rows");
    from_dev(mb, dm, (size_t)D * 8, "unit_mean");
    KVT_EXPECT_MSG(cmp64("norms", na, nb, (size_t)n, 1e-12, 1e-12) == 0, "norms n=%d D=%d", n, D);
    KVT_EXPECT_MSG(cmp32("ku", ka, kb, nx) == 0, "unit rows n=%d D=%d", n, D);
    KVT_EXPECT_MSG(cmp64("mean", ma, mb, (size_t)D, 1e-12, 1e-10) == 0, "mean n=%d D=%d", n, D);
    KVT_EXPECT_STATUS(kvt_row_norms_cuda(dx, -1, D, dn, NULL), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_unit_rows_cuda(dx, n, 0, dku, dm, dinv, NULL), KVT_ERR_INVALID_ARG);
    cudaFree(dx), cudaFree(dku), cudaFree(dn), cudaFree(dm), cudaFree(dinv);
    free(x), free(ka), free(kb), free(na), free(nb), free(ma), free(mb);
}

static void test_rank(int n_seg, int n, int kind, uint64_t seed)
{
    if (too_long(n))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    size_t tot = (size_t)n_seg * n;
    double *s = malloc(tot * 8 + 8);
    int32_t *oa = malloc(tot * 4 + 4), *ob = malloc(tot * 4 + 4), *w = malloc((size_t)n * 4 + 4);
    for (size_t j = 0; j < tot; j++) {
        double u = kvt_rng_uniform(&r);
        if (kind == 0)
            s[j] = u * 1e-4; /* probabilities */
        else if (kind == 1)
            s[j] = (double)(int)(u * 7) - 3.0; /* many ties */
        else {
            const double sp[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, -NAN, 1e-310, -1.0};
            s[j] = u < 0.5 ? sp[(int)(u * 16)] : u - 0.75;
        }
    }
    for (int g = 0; g < n_seg; g++)
        kvt_rank_desc_ref(s + (size_t)g * n, n, oa + (size_t)g * n, w);
    double *ds = to_dev(s, tot * 8);
    int32_t *dord = out_dev(tot * 4);
    KVT_CHECK(kvt_rank_desc_segmented_cuda(ds, n_seg, n, dord, NULL));
    from_dev(ob, dord, tot * 4, "rank");
    KVT_EXPECT_MSG(!memcmp(oa, ob, tot * 4), "rank n_seg=%d n=%d kind=%d", n_seg, n, kind);
    cudaFree(ds), cudaFree(dord);
    free(s), free(oa), free(ob), free(w);
}

/* T random unit keys [T, D] (malloc) */
static float *unit_keys(kvt_rng *r, int T, int D)
{
    size_t nk = (size_t)T * D;
    float *k = malloc(nk * 4), *ku = malloc(nk * 4);
    kt_fill(r, k, nk, 1.0f);
    kvt_unit_rows_ref(k, T, D, ku, NULL);
    free(k);
    return ku;
}

static void test_coverage(int T, int D, int n_probe, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    size_t nk = (size_t)T * D;
    float *ku = unit_keys(&r, T, D);
    int P = T < n_probe ? T : n_probe;
    int32_t *probe = malloc((size_t)P * 4), *order = malloc((size_t)T * 4);
    uint8_t *pm = malloc((size_t)P);
    for (int i = 0; i < P; i++) {
        probe[i] = (int32_t)((int64_t)i * T / P);
        pm[i] = (uint8_t)(i % 3);
    }
    probe[P - 1] = T - 1;
    kt_shuffle(&r, order, T);
    size_t nc = (size_t)T * P;
    float *ca = malloc(nc * 4), *cb = malloc(nc * 4);
    KVT_CHECK(kvt_cosine_table_ref(ku, T, D, probe, P, ca));
    float *dku = to_dev(ku, nk * 4), *dct = out_dev(nc * 4);
    int32_t *dprobe = to_dev(probe, (size_t)P * 4), *dord = to_dev(order, (size_t)T * 4);
    KVT_CHECK(kvt_cosine_table_cuda(dku, T, D, dprobe, P, dct, NULL));
    from_dev(cb, dct, nc * 4, "cosine_table");
    KVT_EXPECT_MSG(cmp32("cosine", ca, cb, nc) == 0, "cosine T=%d D=%d", T, D);
    KVT_EXPECT_MSG(!memcmp(ca, cb, nc * 4), "cosine T=%d D=%d P=%d: not bitwise the reference's", T,
                   D, P); /* the same products and sums in the same order */

    /* running bests from the reference's table: bitwise the reference's, and through the
     * shared summary the reference's metrics exactly */
    int32_t cand[] = {0, 1, 3, 255, 256, 257, T / 2, T - 1, T};
    int32_t cuts[16];
    int n_cut = 0;
    for (size_t i = 0; i < sizeof(cand) / sizeof(cand[0]); i++)
        if (cand[i] >= 0 && cand[i] <= T && (n_cut == 0 || cand[i] > cuts[n_cut - 1]))
            cuts[n_cut++] = cand[i];
    KVT_EXPECT(cudaMemcpy(dct, ca, nc * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    float *dbest = out_dev((size_t)n_cut * P * 4), *best = malloc((size_t)n_cut * P * 4);
    KVT_CHECK(kvt_coverage_best_cuda(dct, T, P, dord, cuts, n_cut, dbest, NULL));
    from_dev(best, dbest, (size_t)n_cut * P * 4, "coverage_best");
    double cva[16], rda[16], cma[16 * KVT_N_MODALITIES], cvb, rdb, cmb[KVT_N_MODALITIES];
    float *wf = malloc((size_t)P * 4);
    double cda[16], cdb;
    int32_t *pp = malloc((size_t)P * 4); /* each probe's place in the ranking */
    kt_probe_positions(order, T, probe, P, pp);
    KVT_CHECK(
        kvt_sweep_coverage_ref(ca, T, P, P, order, cuts, n_cut, pm, pp, wf, cva, rda, cma, cda));
    int bad = 0;
    for (int c = 0; c < n_cut; c++) {
        kvt_coverage_summary(best + (size_t)c * P, P, cuts[c], pm, pp, &cvb, &rdb, cmb, &cdb);
        bad += memcmp(&cva[c], &cvb, 8) != 0 || memcmp(&rda[c], &rdb, 8) != 0 ||
               memcmp(cma + (size_t)c * KVT_N_MODALITIES, cmb, sizeof(cmb)) != 0 ||
               memcmp(&cda[c], &cdb, 8) != 0;
    }
    KVT_EXPECT_MSG(bad == 0, "coverage T=%d: %d cuts differ", T, bad);
    /* the bests themselves, bitwise the reference's scan (b = v > b ? v : b in ranking order),
     * also on a table of ties and signed zeros, through the workspace variant */
    float *seq = malloc((size_t)n_cut * P * 4);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            const float vals[] = {0.0f, -0.0f, 0.5f, -0.5f, 0.5f, -0.0f};
            for (size_t j = 0; j < nc; j++)
                ca[j] = vals[kvt_rng_u64(&r) % 6];
            KVT_EXPECT(cudaMemcpy(dct, ca, nc * 4, cudaMemcpyHostToDevice) == cudaSuccess);
            size_t wb = kvt_sweep_cuda_work_bytes(T, n_cut, P);
            void *dw = out_dev(wb);
            KVT_CHECK(kvt_coverage_best_cuda_ws(dct, T, P, dord, cuts, n_cut, dbest, dw, wb, NULL));
            KVT_EXPECT(cudaDeviceSynchronize() == cudaSuccess);
            KVT_EXPECT_STATUS(
                kvt_coverage_best_cuda_ws(dct, T, P, dord, cuts, n_cut, dbest, dw, wb - 17, NULL),
                KVT_ERR_INVALID_ARG);
            from_dev(best, dbest, (size_t)n_cut * P * 4, "coverage_best ties");
            cudaFree(dw);
        }
        for (int i = 0; i < P; i++) {
            float b = -INFINITY;
            for (int c = 0, t = 0; c < n_cut; c++) {
                for (; t < cuts[c]; t++) {
                    float v = ca[(size_t)order[t] * P + i];
                    b = v > b ? v : b;
                }
                seq[(size_t)c * P + i] = b;
            }
        }
        KVT_EXPECT_MSG(!memcmp(seq, best, (size_t)n_cut * P * 4),
                       "coverage bests T=%d pass %d differ from the scan", T, pass);
    }
    free(seq);
    int32_t badcuts[2] = {5, 3};
    KVT_EXPECT_STATUS(kvt_coverage_best_cuda(dct, T, P, dord, badcuts, 2, dbest, NULL),
                      KVT_ERR_INVALID_ARG);
    cudaFree(dku), cudaFree(dct), cudaFree(dprobe), cudaFree(dord), cudaFree(dbest);
    free(ku), free(probe), free(pm), free(order), free(ca), free(cb), free(best);
    free(wf), free(pp);
}

/* row masses: every row's sum and masses by modality (codes past the last count as the
 * last) against sums in key order; a padded stride; rows of zeros */
static void test_row_mass(int n, int T, bool with_mod, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    const int NM = KVT_N_MODALITIES;
    const size_t stride = (size_t)T + 3, np = (size_t)n * stride;
    float *p = malloc(np * 4 + 4);
    uint8_t *mod = malloc((size_t)T + 1);
    kt_fill(&r, p, np, 1e-3f);
    for (size_t i = 0; i < np; i++)
        p[i] = fabsf(p[i]);
    if (n > 1)
        memset(p + stride, 0, (size_t)T * 4);
    for (int j = 0; j < T; j++)
        mod[j] = (uint8_t)(kvt_rng_u64(&r) % 6); /* 4 and 5 count as the last */
    double *sa = malloc((size_t)n * 8), *sb = malloc((size_t)n * 8);
    double *ma = malloc((size_t)n * NM * 8), *mb = malloc((size_t)n * NM * 8);
    for (int i = 0; i < n; i++) {
        double s = 0.0, m[KVT_N_MODALITIES] = {0};
        for (int j = 0; j < T; j++) {
            s += p[(size_t)i * stride + j];
            m[mod[j] < NM ? mod[j] : NM - 1] += p[(size_t)i * stride + j];
        }
        sa[i] = s;
        for (int k = 0; k < NM; k++)
            ma[(size_t)i * NM + k] = m[k];
    }
    float *dp = to_dev(p, np * 4);
    uint8_t *dmod = with_mod ? to_dev(mod, (size_t)T) : NULL;
    double *ds = out_dev((size_t)n * 8), *dm = out_dev((size_t)n * NM * 8);
    KVT_CHECK(kvt_row_mass_cuda(dp, n, T, stride, dmod, ds, dm, NULL));
    from_dev(sb, ds, (size_t)n * 8, "row_mass sums");
    KVT_EXPECT_MSG(cmp64("row sums", sa, sb, (size_t)n, 1e-15, 1e-12) == 0, "row_mass n=%d T=%d", n,
                   T);
    if (with_mod) {
        from_dev(mb, dm, (size_t)n * NM * 8, "row_mass by modality");
        KVT_EXPECT_MSG(cmp64("row masses", ma, mb, (size_t)n * NM, 1e-15, 1e-12) == 0,
                       "row_mass by modality n=%d T=%d", n, T);
    } else {
        from_dev(NULL, dm, 0, "row_mass (no modality: masses untouched)");
        unsigned char g[8];
        KVT_EXPECT(cudaMemcpy(g, dm, 8, cudaMemcpyDeviceToHost) == cudaSuccess);
        KVT_EXPECT_MSG(g[0] == GUARD && g[7] == GUARD, "row_mass wrote masses without mod");
    }
    KVT_EXPECT_STATUS(kvt_row_mass_cuda(dp, n, T, (size_t)T - 1, NULL, ds, NULL, NULL),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(
        kvt_row_mass_cuda(dp, n, T, stride, dmod ? dmod : (uint8_t *)dp, ds, NULL, NULL),
        KVT_ERR_INVALID_ARG);
    cudaFree(dp), cudaFree(dmod), cudaFree(ds), cudaFree(dm);
    free(p), free(mod), free(sa), free(sb), free(ma), free(mb);
}

/* Many cuts: up to KVT_CU_PCUTS (128) the sweeps' chunk tables are built on the device, beyond
 * it on the host and copied; either way the output sweep (forward and backward cuts), the
 * coverage bests and the redundancy agree with the references as with a few cuts. */
static void test_many_cuts(int T, int n_cut, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    const int n_q = 3, D = 64, P = 16;
    int32_t *cuts = malloc((size_t)n_cut * 4);
    for (int c = 0; c < n_cut; c++) /* 1 .. T, strictly increasing */
        cuts[c] = (int32_t)((int64_t)(c + 1) * T / n_cut);
    kt_sweep S;
    kt_sweep_make(&S, &r, n_q, T, D);
    size_t nr = (size_t)n_q * n_cut;
    double *ra = malloc(nr * 8), *ea = malloc(nr * 8), *rb = malloc(nr * 8), *eb = malloc(nr * 8);
    void *wa = malloc(kvt_sweep_output_workspace_bytes(n_q, D));
    KVT_CHECK(kvt_sweep_output_ref(n_q, T, D, S.p, T, S.v, S.a, D, NULL, 1, NULL, NULL, S.order,
                                   cuts, n_cut, NULL, NULL, 0, ra, ea, NULL, wa));
    float *dp = to_dev(S.p, (size_t)n_q * T * 4), *dv = to_dev(S.v, (size_t)T * D * 4);
    double *da = to_dev(S.a, (size_t)n_q * D * 8), *dr = out_dev(nr * 8), *de = out_dev(nr * 8);
    int32_t *dord = to_dev(S.order, (size_t)T * 4);
    KVT_CHECK(kvt_sweep_output_cuda(n_q, T, D, dp, T, dv, da, D, NULL, 1, NULL, NULL, dord, cuts,
                                    n_cut, NULL, NULL, 0, dr, de, NULL, NULL));
    from_dev(rb, dr, nr * 8, "recall"), from_dev(eb, de, nr * 8, "err");
    KVT_EXPECT_MSG(cmp64("recall", ra, rb, nr, 1e-14, 1e-12) == 0 &&
                       cmp64("err", ea, eb, nr, 1e-12, 1e-9) == 0,
                   "output sweep with %d cuts, T=%d", n_cut, T);
    /* coverage bests on a random table: bitwise the reference's scan */
    float *ct = malloc((size_t)T * P * 4), *best = malloc((size_t)n_cut * P * 4);
    kt_fill(&r, ct, (size_t)T * P, 1.0f);
    float *dct = to_dev(ct, (size_t)T * P * 4), *dbest = out_dev((size_t)n_cut * P * 4);
    KVT_CHECK(kvt_coverage_best_cuda(dct, T, P, dord, cuts, n_cut, dbest, NULL));
    from_dev(best, dbest, (size_t)n_cut * P * 4, "coverage_best");
    int bad = 0;
    for (int i = 0; i < P; i++) {
        float b = -INFINITY;
        for (int t = 0, c = 0; c < n_cut; t++) {
            for (; c < n_cut && cuts[c] == t; c++)
                bad += memcmp(&best[(size_t)c * P + i], &b, 4) != 0;
            if (t < T) {
                float v = ct[(size_t)S.order[t] * P + i];
                b = v > b ? v : b;
            }
        }
    }
    KVT_EXPECT_MSG(bad == 0, "coverage bests with %d cuts, T=%d: %d differ", n_cut, T, bad);
    /* redundancy of the kept unit keys */
    float *ku = unit_keys(&r, T, D);
    double *rka = malloc((size_t)n_cut * 8), *rkb = malloc((size_t)n_cut * 8);
    double *w = malloc((size_t)D * 8);
    KVT_CHECK(kvt_sweep_redundancy_ref(ku, T, D, S.order, cuts, n_cut, w, rka));
    float *dku = to_dev(ku, (size_t)T * D * 4);
    double *drk = out_dev((size_t)n_cut * 8);
    const size_t wb = kvt_sweep_redundancy_cuda_work_bytes(T, D, n_cut);
    void *dw = out_dev(wb);
    KVT_CHECK(kvt_sweep_redundancy_cuda_ws(dku, T, D, dord, cuts, n_cut, drk, dw, wb, NULL));
    from_dev(rkb, drk, (size_t)n_cut * 8, "redundancy");
    bad = 0;
    for (int c = 0; c < n_cut; c++)
        bad +=
            isnan(rka[c]) != isnan(rkb[c]) || (!isnan(rka[c]) && !(fabs(rka[c] - rkb[c]) <= 1e-12));
    KVT_EXPECT_MSG(bad == 0, "redundancy with %d cuts, T=%d: %d cuts off", n_cut, T, bad);
    cudaFree(dp), cudaFree(dv), cudaFree(da), cudaFree(dr), cudaFree(de), cudaFree(dord);
    cudaFree(dct), cudaFree(dbest), cudaFree(dku), cudaFree(drk), cudaFree(dw);
    kt_sweep_free(&S);
    free(cuts), free(ra), free(ea), free(rb), free(eb), free(wa), free(ct), free(best), free(ku);
    free(rka), free(rkb), free(w);
}

/* the redundancy sweep: bitwise the reference at every cut (NaN below 2 kept keys), cuts
 * 0, 1 and T, chunks of 128 ranked rows and a partial last one */
static void test_redundancy(int T, int D, uint64_t seed)
{
    if (too_long(T))
        return;
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    size_t nk = (size_t)T * D;
    float *ku = unit_keys(&r, T, D);
    int32_t *order = malloc((size_t)T * 4);
    kt_shuffle(&r, order, T);
    int32_t cand[] = {0, 1, 2, 3, 127, 128, 129, 300, T / 2, T - 1, T}, cuts[16];
    int n_cut = 0;
    for (size_t i = 0; i < sizeof(cand) / sizeof(cand[0]); i++)
        if (cand[i] >= 0 && cand[i] <= T && (n_cut == 0 || cand[i] > cuts[n_cut - 1]))
            cuts[n_cut++] = cand[i];
    double ra[16], rb[16], *w = malloc((size_t)D * 8);
    KVT_CHECK(kvt_sweep_redundancy_ref(ku, T, D, order, cuts, n_cut, w, ra));
    float *dku = to_dev(ku, nk * 4);
    int32_t *dord = to_dev(order, (size_t)T * 4);
    double *dr = out_dev((size_t)n_cut * 8);
    const size_t wb = kvt_sweep_redundancy_cuda_work_bytes(T, D, n_cut);
    void *dw = out_dev(wb);
    KVT_CHECK(kvt_sweep_redundancy_cuda_ws(dku, T, D, dord, cuts, n_cut, dr, dw, wb, NULL));
    from_dev(rb, dr, (size_t)n_cut * 8, "redundancy");
    from_dev(NULL, (char *)dw + wb, 0, "redundancy workspace"); /* its guard */
    /* the sums in chunks, then in order: the reference's up to rounding (r is a difference of
       O(1) terms, so an absolute bound) */
    int bad = 0;
    for (int c = 0; c < n_cut; c++)
        bad += isnan(ra[c]) != isnan(rb[c]) || (!isnan(ra[c]) && !(fabs(ra[c] - rb[c]) <= 1e-12));
    KVT_EXPECT_MSG(bad == 0, "redundancy T=%d D=%d: %d of %d cuts off the reference's by > 1e-12",
                   T, D, bad, n_cut);
    KVT_EXPECT_STATUS(
        kvt_sweep_redundancy_cuda_ws(dku, T, D, dord, cuts, n_cut, dr, dw, wb - 1, NULL),
        KVT_ERR_INVALID_ARG);
    int32_t badcuts[2] = {5, 3};
    KVT_EXPECT_STATUS(kvt_sweep_redundancy_cuda_ws(dku, T, D, dord, badcuts, 2, dr, dw, wb, NULL),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(
        kvt_sweep_redundancy_cuda_ws(dku, T, 600, dord, cuts, n_cut, dr, dw, wb, NULL),
        KVT_ERR_UNSUPPORTED);
    cudaFree(dku), cudaFree(dord), cudaFree(dr), cudaFree(dw);
    free(ku), free(order), free(w);
}

/* the first non-finite element: the lowest index of several, none, an empty array */
static void test_nonfinite(void)
{
    const size_t n = 1 << 20;
    float *x = calloc(n, 4);
    x[n - 1] = INFINITY, x[777] = NAN, x[1500] = -INFINITY;
    float *dx = to_dev(x, n * 4);
    unsigned long long *d = out_dev(8), got = 0;
    KVT_CHECK(kvt_first_nonfinite_cuda(dx, n, d, NULL));
    from_dev(&got, d, 8, "first_nonfinite");
    KVT_EXPECT_MSG(got == 777, "first non-finite: %llu, want 777", got);
    KVT_CHECK(kvt_first_nonfinite_cuda(dx, 777, d, NULL)); /* the finite prefix */
    from_dev(&got, d, 8, "first_nonfinite");
    KVT_EXPECT_MSG(got == 777, "all finite: %llu, want n = 777", got);
    KVT_CHECK(kvt_first_nonfinite_cuda(dx, 0, d, NULL));
    from_dev(&got, d, 8, "first_nonfinite");
    KVT_EXPECT_MSG(got == 0, "empty: %llu, want 0", got);
    KVT_EXPECT_STATUS(kvt_first_nonfinite_cuda(dx, n, NULL, NULL), KVT_ERR_INVALID_ARG);
    cudaFree(dx), cudaFree(d);
    free(x);
}

/* every 16-bit pattern of bf16 and f16 (NaNs, infinities, f16 subnormals, signed zeros) widened
 * on the device, bit for bit as kvt_convert_to_f32; an odd count at an odd offset; nothing */
static void test_widen(void)
{
    const size_t n = 65536 + 3;
    uint16_t *x = malloc(n * 2);
    float *want = malloc(n * 4), *got = malloc(n * 4);
    for (size_t i = 0; i < n; i++)
        x[i] = (uint16_t)(i * 40503u); /* a permutation of the patterns, then 3 more */
    const kvt_dtype dts[] = {KVT_DTYPE_BF16, KVT_DTYPE_F16};
    for (int t = 0; t < 2; t++) {
        const size_t off = 1, m = n - off; /* src 2 bytes into its buffer */
        uint16_t *dx = to_dev(x, n * 2);
        float *dy = out_dev(m * 4);
        KVT_CHECK(kvt_convert_to_f32(dts[t], x + off, want, m));
        KVT_CHECK(kvt_widen_cuda(dts[t], dx + off, m, dy, NULL));
        from_dev(got, dy, m * 4, "widen");
        size_t bad = 0;
        for (size_t i = 0; i < m; i++)
            bad += memcmp(&got[i], &want[i], 4) != 0;
        KVT_EXPECT_MSG(bad == 0, "widen %s: %zu of %zu elements not bitwise the host's",
                       kvt_dtype_name(dts[t]), bad, m);
        KVT_CHECK(kvt_widen_cuda(dts[t], dx, 0, NULL, NULL));
        cudaFree(dx), cudaFree(dy);
    }
    KVT_EXPECT_STATUS(kvt_widen_cuda(KVT_DTYPE_F32, x, 4, want, NULL), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_widen_cuda(KVT_DTYPE_BF16, NULL, 4, want, NULL), KVT_ERR_INVALID_ARG);
    free(x), free(want), free(got);
}

/* one trace record's elements as stored (row-major or byte planes) widened into their rows of a
 * [H, T, D] tensor on the device, bit for bit kvt_widen_stored_ref, the rows around the piece
 * left as they were: bf16 and f16, every bit pattern among the elements, pieces of one head or
 * several, T not a multiple of the block, D = 1, 3, 64, 80, 128, an odd element count */
static void test_widen_stored(void)
{
    static const struct {
        int H, T, D, h0, h1, t0, t1;
    } cs[] = {{4, 33, 64, 1, 3, 0, 33}, {1, 1, 1, 0, 1, 0, 1},       {2, 300, 3, 1, 2, 17, 290},
              {8, 70, 80, 0, 8, 5, 6},  {3, 257, 128, 0, 3, 0, 257}, {5, 9, 128, 2, 5, 3, 9}};
    const kvt_dtype dts[] = {KVT_DTYPE_BF16, KVT_DTYPE_F16};
    for (size_t c = 0; c < sizeof(cs) / sizeof(cs[0]); c++)
        for (int t = 0; t < 2; t++)
            for (int planes = 0; planes < 2; planes++) {
                const int H = cs[c].H, T = cs[c].T, D = cs[c].D;
                const int nh = cs[c].h1 - cs[c].h0, nt = cs[c].t1 - cs[c].t0;
                const size_t all = (size_t)H * T * D, n = (size_t)nh * nt * D;
                const size_t first = ((size_t)cs[c].h0 * T + cs[c].t0) * D;
                uint8_t *src = malloc(2 * n);
                float *want = malloc(all * 4), *got = malloc(all * 4);
                for (size_t i = 0; i < 2 * n; i++)
                    src[i] = (uint8_t)((i * 2654435761u) >> 13); /* every byte value */
                for (size_t i = 0; i < all; i++)
                    want[i] = -(float)i; /* the rows outside the piece */
                float *dy = out_dev(all * 4);
                KVT_EXPECT(cudaMemcpy(dy, want, all * 4, cudaMemcpyHostToDevice) == cudaSuccess);
                uint8_t *dx = to_dev(src, 2 * n);
                KVT_CHECK(kvt_widen_stored_ref(dts[t], planes, src, nh, nt, D, (size_t)T * D,
                                               want + first));
                KVT_CHECK(kvt_widen_stored_cuda(dts[t], planes, dx, nh, nt, D, (size_t)T * D,
                                                dy + first, NULL));
                from_dev(got, dy, all * 4, "widen_stored");
                size_t bad = 0;
                for (size_t i = 0; i < all; i++)
                    bad += memcmp(&got[i], &want[i], 4) != 0;
                KVT_EXPECT_MSG(bad == 0,
                               "widen_stored %s planes %d [%d,%d,%d] heads [%d,%d) tokens [%d,%d): "
                               "%zu of %zu elements not bitwise the reference's",
                               kvt_dtype_name(dts[t]), planes, H, T, D, cs[c].h0, cs[c].h1,
                               cs[c].t0, cs[c].t1, bad, all);
                cudaFree(dx), cudaFree(dy);
                free(src), free(want), free(got);
            }
    float f[4];
    uint16_t x[4] = {0};
    KVT_EXPECT_STATUS(kvt_widen_stored_cuda(KVT_DTYPE_F32, true, (uint8_t *)x, 1, 1, 4, 4, f, NULL),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(
        kvt_widen_stored_cuda(KVT_DTYPE_BF16, true, (uint8_t *)x, 2, 1, 4, 3, f, NULL),
        KVT_ERR_INVALID_ARG); /* head stride under a head's rows */
    KVT_EXPECT_STATUS(kvt_widen_stored_ref(KVT_DTYPE_BF16, true, (uint8_t *)x, 2, 1, 4, 3, f),
                      KVT_ERR_INVALID_ARG);
}

int main(void)
{
    char why[256] = "";
    if (kvt_cuda_devices(why, sizeof(why)) == 0) {
        printf("test_kernels_cuda: %s: not run\n", why);
        return 77;
    }
    const char *e = getenv("KVT_KERNELS_MAX_T");
    max_t = e ? atoi(e) : 0;
    const int Ds[] = {64, 80, 128};
    /* the output sweep keeps 1, 2 or 4 dimensions per thread by D: the other two */
    test_sweep(9, 600, 200, true, true, 61);
    test_sweep(5, 1030, 320, false, true, 62);
    /* the sweeps' chunk tables built on the device (up to 128 cuts) and on the host (more) */
    test_many_cuts(1000, 128, 68);
    test_many_cuts(1000, 200, 69);
    /* the KV groups of a layer at once: batches of rows past a tile, a second key block, decode
       keys; one of 5 rows */
    test_attn_batch(40, 1100, 128, 0, 3, 65);
    test_attn_batch(70, 700, 64, 5, 4, 66);
    test_attn_batch(5, 300, 80, 3, 2, 67);
    /* the attention outputs likewise (and the logits' tiles over D in several chunks) */
    test_attn(20, 1300, 200, 3, 63);
    test_attn(9, 400, 320, 0, 64);
    /* many chunks each way, the masses given as the replay gives them, a partial block of rows */
    test_sweep_rf(7, 5000, 128, true, true, true, 63);
    test_sweep_rf(128, 3000, 128, false, false, true, 64);
    for (int i = 0; i < 3; i++) {
        test_attn(1, 1, Ds[i], 0, 1 + i);     /* T = 1 */
        test_attn(32, 300, Ds[i], 0, 4 + i);  /* T not a multiple of the block */
        test_attn(16, 513, Ds[i], 16, 7 + i); /* decode queries with a second block */
        test_attn(40, 20, Ds[i], 0, 97 + i);  /* more queries than keys: clamped */
        /* several tiles of rows and keys, partial at both ends, a second key block */
        test_attn(70, 1100, Ds[i], 5, 131 + i);
        test_sweep(1, 1, Ds[i], false, false, 14 + i);
        test_sweep(12, 700, Ds[i], true, false, 17 + i);
        test_sweep(5, 1030, Ds[i], false, true, 24 + i);
        test_sweep(9, 600, Ds[i], true, true, 27 + i);
        test_row_mass(3, 1, true, 121 + i);
        test_row_mass(33, 1000 + 7 * i, i != 1, 124 + i);
        test_redundancy(1, Ds[i], 141 + i);
        test_redundancy(700, Ds[i], 144 + i);
        test_norms(1, Ds[i], 11 + i);
        test_norms(257, Ds[i], 21 + i);
        test_norms(1000, Ds[i], 31 + i);
        test_norms(2600, Ds[i], 34 + i); /* the mean in 3 parts of rows, the last partial */
        test_coverage(1, Ds[i], 37, 41 + i);
        test_coverage(300, Ds[i], 37, 51 + i);
        test_coverage(1030, Ds[i], 37, 61 + i);
        test_coverage(2600, Ds[i], 37, 71 + i);  /* cuts spanning several chunks of positions */
        test_coverage(1500, Ds[i], 256, 75 + i); /* the replay's default probes: 8 tiles */
        test_coverage(333, Ds[i], 70, 78 + i);   /* a partial tile of probes and of tokens */
    }
    const int ns[] = {1, 63, 64, 1000, 8160};
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++)
        for (int kind = 0; kind < 3; kind++) {
            test_rank(1, ns[i], kind, 71 + i);
            test_rank(8, ns[i], kind, 81 + i);
        }
    test_rank(0, 10, 0, 91);            /* nothing to do */
    test_scores(4, 2, 8, 8, 40, 101);   /* GQA, the whole window */
    test_scores(8, 8, 32, 5, 300, 102); /* MHA, part of the window */
    test_scores(2, 1, 4, 4, 5, 103);    /* a prefix of one token */
    test_nonfinite();
    test_widen();
    test_widen_stored();
    test_redundancy(1030, 200, 151); /* 2 and 3 dimensions per thread */
    test_redundancy(300, 320, 152);
    test_redundancy(260, 512, 153);
    test_redundancy(5000, 128, 154); /* chunks of 256 positions between distant cuts */
    test_colsum(1, 64, 111);
    test_colsum(300, 80, 112);
    test_colsum(1030, 128, 113);
    /* the logits' tiles read a row's dimensions in pairs: an odd last chunk of D (37 = 32 + 5,
       3), its last dimension alone */
    test_attn(33, 500, 37, 4, 114);
    test_attn(7, 90, 3, 0, 115);
    test_colsum(200, 37, 116);
    KVT_EXPECT_STATUS(kvt_rank_desc_segmented_cuda(NULL, -1, 4, NULL, NULL), KVT_ERR_INVALID_ARG);
    if (skipped)
        printf("test_kernels_cuda: %d cases longer than KVT_KERNELS_MAX_T=%d tokens skipped\n",
               skipped, max_t);
    return kvt_test_result("test_kernels_cuda");
}
