/* test_kernels_ref.c - the reference kernels on hand-computed cases and against brute force:
 * causal window softmax, pooling (count_include_pad avg, max), GQA reduction, ranking ties,
 * redundancy closed forms, the recall/output-error sweep, coverage and redundancy sweeps,
 * Quest page bounds.
 */
#include "replay_test_util.h"

#include "../../kernels/ref/sweep_cuts.h"

static void test_attn_probs(void)
{
    /* D=1, scale 1: q=1 sees keys with logits = key values */
    const float q[2] = {1.0f, 1.0f};
    const float k[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    int vis[2] = {3, 4}; /* window W=2 of T=4: query 0 at position 2 sees 0..2 */
    float pr[8];
    double lse[2], work[5]; /* T + n2 */
    KVT_EXPECT_STATUS(
        kvt_attn_probs_ref(q, 2, 1, k, 4, vis, NULL, 0, NULL, 1.0, pr, NULL, lse, work), KVT_OK);
    double z0 = 1 + exp(1) + exp(2), z1 = z0 + exp(3);
    KVT_EXPECT_NEAR(pr[0], 1 / z0, 1e-7);
    KVT_EXPECT_NEAR(pr[2], exp(2) / z0, 1e-7);
    KVT_EXPECT(pr[3] == 0.0f); /* masked inside the window */
    KVT_EXPECT_NEAR(pr[7], exp(3) / z1, 1e-7);
    KVT_EXPECT_NEAR(lse[1], log(z1), 1e-12);
    /* two blocks: the second query sees 1 extra key */
    const float k2[1] = {1.0f};
    int vis2[2] = {0, 1};
    float p2[2];
    KVT_EXPECT_STATUS(kvt_attn_probs_ref(q, 2, 1, k, 4, vis, k2, 1, vis2, 1.0, pr, p2, NULL, work),
                      KVT_OK);
    KVT_EXPECT(p2[0] == 0.0f);
    KVT_EXPECT_NEAR(p2[1], exp(1) / (z1 + exp(1)), 1e-7);
    /* NaN */
    const float kn[2] = {NAN, 0};
    int v1[1] = {2};
    KVT_EXPECT_STATUS(
        kvt_attn_probs_ref(q, 1, 1, kn, 2, v1, NULL, 0, NULL, 1.0, pr, NULL, NULL, work),
        KVT_ERR_NAN);
}

static void test_pool_reduce_rank(void)
{
    const double s[3] = {1, 2, 3};
    double o[3];
    KVT_EXPECT_STATUS(kvt_pool1d_ref(s, 3, 3, KVT_POOL_AVG, o), KVT_OK);
    KVT_EXPECT_NEAR(o[0], 1.0, 1e-15); /* (0+1+2)/3: the edge is damped */
    KVT_EXPECT_NEAR(o[1], 2.0, 1e-15);
    KVT_EXPECT_NEAR(o[2], 5.0 / 3, 1e-15);
    KVT_EXPECT_STATUS(kvt_pool1d_ref(s, 3, 3, KVT_POOL_MAX, o), KVT_OK);
    KVT_EXPECT(o[0] == 2 && o[1] == 3 && o[2] == 3);
    KVT_EXPECT_STATUS(kvt_pool1d_ref(s, 3, 5, KVT_POOL_AVG, o), KVT_OK);
    KVT_EXPECT_NEAR(o[0], 6.0 / 5, 1e-15);
    KVT_EXPECT_STATUS(kvt_pool1d_ref(s, 3, 4, KVT_POOL_AVG, o), KVT_ERR_INVALID_ARG);

    const double a[8] = {1, 2, 3, 4, 5, 6, 7, 8}; /* Hq=4, n=2 -> Hkv=2 */
    double r[4];
    KVT_EXPECT_STATUS(kvt_gqa_reduce_ref(a, 4, 2, 2, KVT_REDUCE_MEAN, r), KVT_OK);
    KVT_EXPECT(r[0] == 2 && r[1] == 3 && r[2] == 6 && r[3] == 7);
    KVT_EXPECT_STATUS(kvt_gqa_reduce_ref(a, 4, 2, 2, KVT_REDUCE_MAX, r), KVT_OK);
    KVT_EXPECT(r[0] == 3 && r[1] == 4 && r[2] == 7 && r[3] == 8);
    KVT_EXPECT_STATUS(kvt_gqa_reduce_ref(a, 4, 2, 2, KVT_REDUCE_SUM, r), KVT_OK);
    KVT_EXPECT(r[0] == 4 && r[3] == 14);
    KVT_EXPECT_STATUS(kvt_gqa_reduce_ref(a, 3, 2, 2, KVT_REDUCE_SUM, r), KVT_ERR_INVALID_ARG);

    const double sc[7] = {0.5, 2, NAN, 2, 1, 0.5, 3};
    int32_t ord[7], w[7];
    kvt_rank_desc_ref(sc, 7, ord, w);
    const int32_t want[7] = {6, 1, 3, 4, 0, 5, 2}; /* ties by lower index, NaN last */
    KVT_EXPECT(memcmp(ord, want, sizeof(want)) == 0);
}

static void test_redundancy(void)
{
    /* identical keys: r = 1; orthonormal keys (T = D): r = 0 */
    float k[16];
    double m[4];
    for (int t = 0; t < 4; t++)
        for (int d = 0; d < 4; d++)
            k[t * 4 + d] = d == 0 ? 2.0f : 0.5f;
    kvt_unit_rows_ref(k, 4, 4, NULL, m);
    KVT_EXPECT_NEAR(kvt_redundancy_ref(m, 4, 4), 1.0, 1e-12);
    for (int t = 0; t < 4; t++)
        for (int d = 0; d < 4; d++)
            k[t * 4 + d] = t == d ? 3.0f : 0.0f;
    kvt_unit_rows_ref(k, 4, 4, NULL, m);
    KVT_EXPECT_NEAR(kvt_redundancy_ref(m, 4, 4), 0.0, 1e-12);
    KVT_EXPECT(isnan(kvt_redundancy_ref(m, 4, 1)));
    double nrm[4];
    kvt_row_norms_ref(k, 4, 4, nrm);
    KVT_EXPECT_NEAR(nrm[2], 3.0, 1e-12);
}

/* brute force recall / error of one query for the set order[0..c) */
static void brute(const float *p, const float *v, int T, int D, const int32_t *order, int c,
                  double pe, const double *oe, double *rec, double *err)
{
    double o[64] = {0}, os[64] = {0}, r = pe;
    for (int j = 0; j < T; j++)
        for (int d = 0; d < D; d++)
            o[d] += (double)p[j] * v[j * D + d];
    for (int t = 0; t < c; t++) {
        int j = order[t];
        r += p[j];
        for (int d = 0; d < D; d++)
            os[d] += (double)p[j] * v[j * D + d];
    }
    double num = 0, den = 0;
    for (int d = 0; d < D; d++) {
        double e = oe ? oe[d] : 0;
        double a = (os[d] + e) / r, b = o[d] + e;
        num += (a - b) * (a - b);
        den += b * b;
    }
    *rec = r;
    *err = sqrt(num / den);
}

static void test_sweep_output(void)
{
    enum { T = 37, D = 5, NQ = 3 };
    kvt_rng r;
    kvt_rng_seed(&r, 7);
    float *q = tl_randn(&r, NQ * D, 1.0), *k = tl_randn(&r, T * D, 1.0),
          *v = tl_randn(&r, T * D, 1.0);
    float p[NQ * T];
    int vis[NQ] = {T - 2, T - 1, T};
    double work[T], a[NQ * D], pe[NQ] = {0.1, 0.0, 0.25}, oe[NQ * D];
    KVT_CHECK(
        kvt_attn_probs_ref(q, NQ, D, k, T, vis, NULL, 0, NULL, 1 / sqrt(D), p, NULL, NULL, work));
    for (int i = 0; i < NQ; i++) {
        double s = 0;
        for (int j = 0; j < T; j++)
            s += p[i * T + j];
        for (int j = 0; j < T; j++) /* scale so that the prompt mass is 1 - pe */
            p[i * T + j] = (float)(p[i * T + j] / s * (1 - pe[i]));
        for (int d = 0; d < D; d++) {
            a[i * D + d] = 0;
            for (int j = 0; j < T; j++)
                a[i * D + d] += (double)p[i * T + j] * v[j * D + d];
            oe[i * D + d] = pe[i] * (d + 1) * 0.3;
        }
    }
    int32_t order[T], wk[T];
    double sc[T];
    for (int j = 0; j < T; j++)
        sc[j] = kvt_rng_uniform(&r);
    kvt_rank_desc_ref(sc, T, order, wk);
    int32_t cuts[] = {0, 1, 5, 18, 19, 30, 36, T};
    int nc = (int)(sizeof(cuts) / sizeof(cuts[0]));
    double rec[NQ * 8], err[NQ * 8];
    void *ws = malloc(kvt_sweep_output_workspace_bytes(NQ, D));
    KVT_EXPECT_STATUS(kvt_sweep_output_ref(NQ, T, D, p, T, v, a, D, pe, 1, oe, NULL, order, cuts,
                                           nc, NULL, NULL, 0, rec, err, NULL, ws),
                      KVT_OK);
    for (int i = 0; i < NQ; i++) {
        double prev = -1;
        for (int c = 0; c < nc; c++) {
            double br, be;
            if (cuts[c] == 0 && pe[i] == 0) {
                KVT_EXPECT(err[i * nc + c] == 1.0); /* nothing kept */
                continue;
            }
            brute(p + i * T, v, T, D, order, cuts[c], pe[i], oe + i * D, &br, &be);
            KVT_EXPECT_NEAR(rec[i * nc + c], br, 1e-6);
            KVT_EXPECT_NEAR(err[i * nc + c], be, 1e-7);
            KVT_EXPECT(rec[i * nc + c] >= prev - 1e-12); /* monotone in the budget */
            prev = rec[i * nc + c];
        }
        KVT_EXPECT(rec[i * nc + nc - 1] == 1.0); /* full budget: recall 1 */
        KVT_EXPECT(err[i * nc + nc - 1] == 0.0); /* and error exactly 0 */
    }
    int32_t bad[] = {3, 3};
    KVT_EXPECT_STATUS(kvt_sweep_output_ref(NQ, T, D, p, T, v, a, D, NULL, 1, NULL, NULL, order, bad,
                                           2, NULL, NULL, 0, rec, err, NULL, ws),
                      KVT_ERR_INVALID_ARG);

    /* coverage and redundancy sweeps against brute force */
    float ku[T * D], ct[T * 4];
    double mean[D];
    kvt_unit_rows_ref(k, T, D, ku, mean);
    int32_t probe[4] = {0, 9, 18, 27};
    uint8_t pm[4] = {0, 1, 1, 0};
    KVT_CHECK(kvt_cosine_table_ref(ku, T, D, probe, 4, ct));
    double cov[8], rad[8], cm[8 * KVT_N_MODALITIES], rr[8], cd[8];
    float cw[4];
    double rw[D];
    int32_t pp[4], pos[T];
    for (int t = 0; t < T; t++)
        pos[order[t]] = t;
    for (int i = 0; i < 4; i++)
        pp[i] = pos[probe[i]];
    KVT_CHECK(kvt_sweep_coverage_ref(ct, T, 4, 4, order, cuts, nc, pm, pp, cw, cov, rad, cm, cd));
    /* over the first 2 probes only (a policy's prefix): the same sweep, summarised over 2 */
    double cov2[8], rad2[8], cm2[8 * KVT_N_MODALITIES], cd2[8];
    KVT_CHECK(
        kvt_sweep_coverage_ref(ct, T, 4, 2, order, cuts, nc, pm, pp, cw, cov2, rad2, cm2, cd2));
    KVT_EXPECT(isnan(cov2[0]));
    KVT_EXPECT_STATUS(
        kvt_sweep_coverage_ref(ct, T, 4, 5, order, cuts, nc, pm, pp, cw, cov2, rad2, cm2, cd2),
        KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_sweep_redundancy_ref(ku, T, D, order, cuts, nc, rw, rr));
    KVT_EXPECT(isnan(cov[0]) && isnan(rr[0]) && isnan(rr[1]));
    for (int c = 1; c < nc; c++) {
        double s = 0, mx = 0, m0 = 0, sd = 0, s2 = 0, mx2 = 0, sd2 = 0, bests[4];
        int nd = 0, nd2 = 0;
        for (int i = 0; i < 4; i++) {
            double best = -2;
            bool kept = false;
            for (int t = 0; t < cuts[c]; t++) {
                best = ct[order[t] * 4 + i] > best ? ct[order[t] * 4 + i] : best;
                kept |= order[t] == probe[i];
            }
            if (!kept)
                sd += best, nd++;
            s += best;
            mx = 1 - best > mx ? 1 - best : mx;
            if (i == 0 || i == 3)
                m0 += best / 2;
            bests[i] = best;
            if (i < 2) {
                s2 += best / 2;
                mx2 = 1 - best > mx2 ? 1 - best : mx2;
                if (!kept)
                    sd2 += best, nd2++;
            }
        }
        KVT_EXPECT_NEAR(cov2[c], s2, 1e-12);
        KVT_EXPECT_NEAR(rad2[c], mx2, 1e-12);
        KVT_EXPECT(nd2 > 0 ? fabs(cd2[c] - sd2 / nd2) < 1e-12 : isnan(cd2[c]));
        KVT_EXPECT_NEAR(cm2[c * KVT_N_MODALITIES + 0], bests[0], 1e-12); /* probe 0 alone */
        KVT_EXPECT_NEAR(cm2[c * KVT_N_MODALITIES + 1], bests[1], 1e-12); /* probe 1 alone */
        KVT_EXPECT_NEAR(cov[c], s / 4, 1e-12);
        if (nd > 0)
            KVT_EXPECT_NEAR(cd[c], sd / nd, 1e-12);
        else
            KVT_EXPECT(isnan(cd[c]));
        KVT_EXPECT_NEAR(rad[c], mx, 1e-12);
        KVT_EXPECT_NEAR(cm[c * KVT_N_MODALITIES + 0], m0, 1e-12);
        KVT_EXPECT(isnan(cm[c * KVT_N_MODALITIES + 2]));
        if (cuts[c] >= 2) {
            double mm[D] = {0};
            for (int t = 0; t < cuts[c]; t++)
                for (int d = 0; d < D; d++)
                    mm[d] += (double)ku[order[t] * D + d] / cuts[c];
            KVT_EXPECT_NEAR(rr[c], kvt_redundancy_ref(mm, D, cuts[c]), 1e-9);
        }
    }
    KVT_EXPECT_NEAR(cov[nc - 1], 1.0, 1e-6); /* every probe is kept at the full budget */
    KVT_EXPECT_NEAR(rr[nc - 1], kvt_redundancy_ref(mean, D, T), 1e-9);
    free(ws);
    free(q);
    free(k);
    free(v);
}

/* how far the output sweep walks (the GPU profile books its bytes and FLOP from it) */
static void test_sweep_walk(void)
{
    const int32_t a[4] = {3, 8, 10, 15}; /* T = 20: forward to 10, backward from 20 down to 15 */
    KVT_EXPECT(kvt_sweep_n_fwd(a, 4, 20) == 3 && kvt_sweep_walk(a, 4, 20) == 10 + 5);
    KVT_EXPECT(kvt_sweep_n_fwd(a, 4, 21) == 3 && kvt_sweep_walk(a, 4, 21) == 10 + 6);
    KVT_EXPECT(kvt_sweep_n_fwd(a, 4, 16) == 2 && kvt_sweep_walk(a, 4, 16) == 8 + 6);
    KVT_EXPECT(kvt_sweep_walk(a, 2, 100) == 8); /* forward only */
    const int32_t b[2] = {12, 16};              /* backward only: 16 - 12 */
    KVT_EXPECT(kvt_sweep_n_fwd(b, 2, 16) == 0 && kvt_sweep_walk(b, 2, 16) == 4);
    const int32_t c[3] = {0, 1, 2}; /* T = 2: 0 and 1 forward (1 = T/2), 2 backward (nothing) */
    KVT_EXPECT(kvt_sweep_n_fwd(c, 3, 2) == 2 && kvt_sweep_walk(c, 3, 2) == 1);
    KVT_EXPECT(kvt_sweep_walk(c, 0, 2) == 0);
}

static void test_pages(void)
{
    const float k[10] = {1, -1, 2, 0, /* page 0: tokens 0,1 */ -3, 1, 0, 4, /* page 1 */ 5, 5};
    float mn[6], mx[6];
    KVT_CHECK(kvt_page_bounds_ref(k, 5, 2, 2, mn, mx)); /* 3 pages, the last partial */
    KVT_EXPECT(mn[0] == 1 && mx[0] == 2 && mn[1] == -1 && mx[1] == 0);
    KVT_EXPECT(mn[2] == -3 && mx[2] == 0 && mn[3] == 1 && mx[3] == 4);
    KVT_EXPECT(mn[4] == 5 && mx[5] == 5);
    const float q[2] = {1, -1};
    double U[3];
    kvt_page_upper_ref(q, mn, mx, 3, 2, U);
    KVT_EXPECT_NEAR(U[0], 2 + 1, 1e-12);  /* max(1,2) + max(1,0) */
    KVT_EXPECT_NEAR(U[1], 0 + -1, 1e-12); /* max(-3,0) + max(-1,-4) */
    KVT_EXPECT_NEAR(U[2], 0, 1e-12);
}

int main(void)
{
    test_attn_probs();
    test_pool_reduce_rank();
    test_redundancy();
    test_sweep_output();
    test_sweep_walk();
    test_pages();
    return kvt_test_result("test_kernels_ref");
}
