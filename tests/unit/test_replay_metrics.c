/* test_replay_metrics.c - metrics of one in-memory layer for every policy: closed forms (full
 * budget gives recall 1 and error 0 and coverage 1; identical keys give r = 1), recall
 * monotone in the budget for a fixed ranking, the oracle's decode recall >= every
 * uniform-budget policy's, the sweep equal to a brute-force evaluation of the kept set, and
 * the whole-trace driver (threads, sink) equal to the in-memory layer.
 */
#include <pthread.h>

#include "replay_internal.h" /* the merged K/V of a lightkv-like selection */
#include "kvt_kernels.h"
#include "replay_test_util.h"

#define NPOL 16
static const char *specs[NPOL] = {"full",
                                  "snapkv:window=8",
                                  "pyramidkv:window=8",
                                  "adakv:window=8",
                                  "mixkv-snapkv:window=8",
                                  "mixkv-adakv:window=8",
                                  "streamingllm",
                                  "random:window=8",
                                  "knorm",
                                  "vnorm",
                                  "keydiff",
                                  "tova",
                                  "oracle",
                                  "quest:dense_layers=0",
                                  "hybridkv-like:window=8,chunk=4",
                                  "lightkv-like:window=8"};
enum {
    P_FULL,
    P_SNAP,
    P_PYR,
    P_ADA,
    P_MIXS,
    P_MIXA,
    P_STREAM,
    P_RAND,
    P_KNORM,
    P_VNORM,
    P_KDIFF,
    P_TOVA,
    P_ORACLE,
    P_QUEST,
    P_HYB,
    P_LIGHT
};

static kvt_policy **make_policies(bool per_query)
{
    kvt_policy **p = calloc(NPOL, sizeof(*p));
    kvt_policy_globals g = {.seed = 3, .per_query_head = per_query};
    for (int i = 0; i < NPOL; i++)
        KVT_CHECK(kvt_policy_create(specs[i], &g, &p[i]));
    return p;
}

static void free_policies(kvt_policy **p)
{
    for (int i = 0; i < NPOL; i++)
        kvt_policy_free(p[i]);
    free(p);
}

#define M(pol, b, h) (&m[((size_t)(pol)*NB + (b)) * Hq + (h)])

/* brute force: mean recall / error of the window queries of KV head g for a kept set */
static void brute_window(const test_layer *t, int g, const int32_t *kept, size_t n, double *rec,
                         double *err)
{
    const kvt_layer_input *in = &t->in;
    int T = in->T, D = in->D, Gs = in->Hq / in->Hkv, W = in->W;
    double sr = 0, se = 0;
    for (int u = 0; u < Gs; u++)
        for (int i = 0; i < W; i++) {
            const float *q = in->q_window + ((size_t)(g * Gs + u) * W + i) * D;
            int pos = T - W + i;
            double z[512], mx = -1e300, Z = 0, ZS = 0, o[64] = {0}, os[64] = {0};
            for (int j = 0; j <= pos; j++) {
                z[j] = 0;
                for (int d = 0; d < D; d++)
                    z[j] += (double)q[d] * in->k[((size_t)g * T + j) * D + d];
                z[j] /= sqrt(D);
                mx = z[j] > mx ? z[j] : mx;
            }
            for (int j = 0; j <= pos; j++) {
                double e = exp(z[j] - mx);
                Z += e;
                for (int d = 0; d < D; d++)
                    o[d] += e * in->v[((size_t)g * T + j) * D + d];
            }
            for (size_t s = 0; s < n; s++) {
                int j = kept[s];
                if (j > pos)
                    continue;
                double e = exp(z[j] - mx);
                ZS += e;
                for (int d = 0; d < D; d++)
                    os[d] += e * in->v[((size_t)g * T + j) * D + d];
            }
            double num = 0, den = 0;
            for (int d = 0; d < D; d++) {
                num += (os[d] / ZS - o[d] / Z) * (os[d] / ZS - o[d] / Z);
                den += (o[d] / Z) * (o[d] / Z);
            }
            sr += ZS / Z;
            se += sqrt(num / den);
        }
    *rec = sr / (Gs * W);
    *err = se / (Gs * W);
}

/* head redundancy r (MixKV) of n keys [n, D] given by row pointers: NaN under two */
static double brute_r(const float *const *rows, int n, int D)
{
    if (n < 2)
        return NAN;
    double s[64] = {0}, s2 = 0;
    for (int i = 0; i < n; i++) {
        double nn = 0;
        for (int d = 0; d < D; d++)
            nn += (double)rows[i][d] * rows[i][d];
        for (int d = 0; d < D; d++)
            s[d] += rows[i][d] / sqrt(nn);
    }
    for (int d = 0; d < D; d++)
        s2 += s[d] * s[d];
    return (s2 / n - 1.0) / (n - 1);
}

/* r_kept by modality of KV head g's kept set idx [n] (token indices), or of a merged set when
 * ms is given (its changed entries' own keys): each modality's keys alone, by brute force,
 * against got [NM] (NaN where the modality has under two kept keys or none in the prompt) */
static void check_r_mod(const kvt_layer_input *in, int g, const int32_t *idx, size_t n,
                        const kvt_merged_set *ms, const double *got, const char *what)
{
    const int T = in->T, D = in->D;
    for (int k = 0; k < KVT_N_MODALITIES; k++) {
        const float *rows[512];
        int nk = 0;
        for (size_t e = 0, ce = 0; e < (ms ? (size_t)ms->n : n); e++) {
            const int32_t j = ms ? ms->idx[e] : idx[e];
            const bool chg = ms && ms->changed[e];
            if (in->modality[j] == k)
                rows[nk++] = chg ? ms->k + ce * D : in->k + ((size_t)g * T + j) * D;
            ce += chg;
        }
        const double want = brute_r(rows, nk, D);
        KVT_EXPECT_MSG((isnan(want) && isnan(got[k])) || fabs(got[k] - want) <= 1e-6,
                       "%s: r_kept of modality %d (%d keys) %.17g, brute %.17g", what, k, nk,
                       got[k], want);
    }
}

/* The set metrics of a per-step head (quest; hybridkv-like's dynamic heads, which also have a
 * prompt-time set) are the mean over its decode-step sets: the oracle overlap and the image
 * tokens kept, by brute force from the exported sets. m: the policy's metrics, [b * stride +
 * h]. @return how many per-step heads were checked. */
static int check_step_means(const kvt_layer_input *in, kvt_policy *pol, kvt_policy *orc,
                            const int *B, int nb, const kvt_head_metrics *m, size_t stride)
{
    kvt_layer_selection *sel = NULL, *os = NULL;
    KVT_CHECK(kvt_replay_layer_select(in, pol, B, nb, &sel));
    KVT_CHECK(kvt_replay_layer_select(in, orc, B, nb, &os));
    int n_heads = 0, G = (int)kvt_layer_selection_n_steps(sel);
    for (int h = 0; h < kvt_layer_selection_n_heads(sel); h++) {
        if (!kvt_layer_selection_head_per_step(sel, h))
            continue;
        n_heads++;
        for (int b = 0; b < nb; b++) {
            int32_t o[512], k[512];
            size_t no, nk;
            KVT_CHECK(kvt_layer_selection_kept(os, (size_t)b, h, -1, o, 512, &no));
            double ov = 0.0, img = 0.0, rm[KVT_N_MODALITIES] = {0};
            for (int st = 0; st < G; st++) {
                KVT_CHECK(kvt_layer_selection_kept(sel, (size_t)b, h, st, k, 512, &nk));
                const int g = h / (kvt_layer_selection_n_heads(sel) / in->Hkv);
                for (int mk = 0; mk < KVT_N_MODALITIES; mk++) {
                    const float *rows[512];
                    int nr = 0;
                    for (size_t i = 0; i < nk; i++)
                        if (in->modality[k[i]] == mk)
                            rows[nr++] = in->k + ((size_t)g * in->T + k[i]) * in->D;
                    rm[mk] += brute_r(rows, nr, in->D) / G;
                }
                int hit = 0;
                for (size_t i = 0; i < nk; i++) {
                    img += (in->modality[k[i]] == 1) / (double)G;
                    for (size_t j = 0; j < no; j++)
                        hit += k[i] == o[j];
                }
                ov += (double)hit / (double)no / G;
            }
            const kvt_head_metrics *x = &m[(size_t)b * stride + h];
            KVT_EXPECT_MSG(fabs(x->oracle_overlap - ov) <= 1e-12, "b=%d h=%d overlap %.17g, %.17g",
                           b, h, x->oracle_overlap, ov);
            KVT_EXPECT_MSG(fabs(x->n_keep_mod[1] - img) <= 1e-9, "b=%d h=%d image %.17g, %.17g", b,
                           h, x->n_keep_mod[1], img);
            for (int mk = 0; mk < KVT_N_MODALITIES; mk++) /* NaN if a step has under two */
                KVT_EXPECT_MSG((isnan(rm[mk]) && isnan(x->r_kept_mod[mk])) ||
                                   fabs(x->r_kept_mod[mk] - rm[mk]) <= 1e-6,
                               "b=%d h=%d r_kept of modality %d %.17g, %.17g", b, h, mk,
                               x->r_kept_mod[mk], rm[mk]);
        }
    }
    kvt_layer_selection_free(sel);
    kvt_layer_selection_free(os);
    return n_heads;
}

static void test_step_set_means(void)
{
    enum { T = 96, Hq = 4, NB = 4 };
    test_layer t;
    tl_random(&t, 5, T, 8, Hq, 2, 8, 6, true);
    kvt_policy *p[3];
    const char *sp[3] = {"hybridkv-like:window=8,chunk=4", "quest:page=8,dense_layers=0", "oracle"};
    for (int i = 0; i < 3; i++)
        KVT_CHECK(kvt_policy_create(sp[i], NULL, &p[i]));
    const int B[NB] = {16, 24, 40, 64};
    kvt_head_metrics *m = malloc(sizeof(*m) * 3 * NB * Hq);
    kvt_replay_opts o = {.coverage_probes = -1};
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&t.in, p, 3, B, NB, &o, m), KVT_OK);
    KVT_EXPECT(check_step_means(&t.in, p[0], p[2], B, NB, m, Hq) == 1); /* median split */
    KVT_EXPECT(check_step_means(&t.in, p[1], p[2], B, NB, m + NB * Hq, Hq) == 2);
    /* the dynamic head's step sets are not its prompt-time set (else this checks nothing) */
    kvt_layer_selection *sel = NULL;
    KVT_CHECK(kvt_replay_layer_select(&t.in, p[0], B, NB, &sel));
    int differ = 0;
    for (int h = 0; h < 2; h++)
        for (int st = 0; st < 6 && kvt_layer_selection_head_per_step(sel, h); st++) {
            int32_t a[T], b[T];
            size_t na, nb;
            KVT_CHECK(kvt_layer_selection_kept(sel, 0, h, -1, a, T, &na));
            KVT_CHECK(kvt_layer_selection_kept(sel, 0, h, st, b, T, &nb));
            differ += na != nb || memcmp(a, b, na * sizeof(int32_t)) != 0;
        }
    KVT_EXPECT(differ > 0);
    kvt_layer_selection_free(sel);
    /* head_overlap with per-step heads: the Jaccard of the two KV heads' sets at each step (a
     * head that does not re-select keeps its prompt-time set), averaged over the steps */
    for (int q = 0; q < 2; q++) {
        KVT_CHECK(kvt_replay_layer_select(&t.in, p[q], B, NB, &sel));
        for (int b = 0; b < NB; b++) {
            double jm = 0;
            for (int st = 0; st < 6; st++) {
                int32_t a[T], c2[T];
                size_t na, nc, in = 0;
                KVT_CHECK(kvt_layer_selection_kept(
                    sel, (size_t)b, 0, kvt_layer_selection_head_per_step(sel, 0) ? st : -1, a, T,
                    &na));
                KVT_CHECK(kvt_layer_selection_kept(
                    sel, (size_t)b, 1, kvt_layer_selection_head_per_step(sel, 1) ? st : -1, c2, T,
                    &nc));
                for (size_t i = 0; i < na; i++)
                    for (size_t j = 0; j < nc; j++)
                        in += a[i] == c2[j];
                jm += (double)in / (double)(na + nc - in) / 6;
            }
            const kvt_head_metrics *x = &m[(size_t)(q * NB + b) * Hq];
            KVT_EXPECT_MSG(fabs(x[0].head_overlap - jm) <= 1e-12 &&
                               x[1].head_overlap == x[0].head_overlap,
                           "%s b=%d head_overlap %.17g %.17g, %.17g", sp[q], b, x[0].head_overlap,
                           x[1].head_overlap, jm);
        }
        kvt_layer_selection_free(sel);
    }
    free(m);
    for (int i = 0; i < 3; i++)
        kvt_policy_free(p[i]);
    tl_free(&t);
}

/* lightkv-like with window=2 < the 8 stored window queries and image tokens up to T-3: merged
 * entries fall inside the stored window, and a window query at position pos sees only the
 * entries whose token index is <= pos. err_window against a brute force over the merged K/V. */
static void test_merged_causal(void)
{
    enum { T = 40, D = 8, W = 8, NB = 2 };
    test_layer t;
    tl_random(&t, 9, T, D, 2, 1, W, 0, true);
    for (int j = 0; j < T; j++)
        t.mod[j] = j >= 10 && j < T - 2;
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("lightkv-like:window=2", NULL, &p));
    const int B[NB] = {20, 28};
    kvt_head_metrics m[NB * 2];
    kvt_replay_opts o = {.coverage_probes = -1};
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&t.in, &p, 1, B, NB, &o, m), KVT_OK);
    kvt_layer_selection *sel = NULL;
    KVT_CHECK(kvt_replay_layer_select(&t.in, p, B, NB, &sel));
    int late = 0; /* changed entries after the first window query */
    for (int b = 0; b < NB; b++) {
        const kvt_merged_set *ms = &sel->merged[b];
        double sum = 0.0;
        for (int u = 0; u < 2; u++)
            for (int i = 0; i < W; i++) {
                const float *q = t.in.q_window + ((size_t)u * W + i) * D;
                const int pos = T - W + i;
                double mx = -INFINITY, Z = 0, ZS = 0, oo[D] = {0}, os[D] = {0}, z[T];
                for (int j = 0; j <= pos; j++) {
                    z[j] = 0;
                    for (int d = 0; d < D; d++)
                        z[j] += (double)q[d] * t.k[(size_t)j * D + d];
                    z[j] /= sqrt(D);
                    mx = fmax(mx, z[j]);
                }
                for (int j = 0; j <= pos; j++) {
                    Z += exp(z[j] - mx);
                    for (int d = 0; d < D; d++)
                        oo[d] += exp(z[j] - mx) * t.v[(size_t)j * D + d];
                }
                for (int e = 0, ce = 0; e < ms->n; ce += ms->changed[e], e++) {
                    late += ms->changed[e] && ms->idx[e] > T - W && u == 0 && i == 0;
                    if (ms->idx[e] > pos)
                        continue;
                    const float *ke =
                        ms->changed[e] ? ms->k + (size_t)ce * D : t.k + (size_t)ms->idx[e] * D;
                    const float *ve =
                        ms->changed[e] ? ms->v + (size_t)ce * D : t.v + (size_t)ms->idx[e] * D;
                    double ze = 0;
                    for (int d = 0; d < D; d++)
                        ze += (double)q[d] * ke[d];
                    double w = exp(ze / sqrt(D) - mx);
                    ZS += w;
                    for (int d = 0; d < D; d++)
                        os[d] += w * ve[d];
                }
                double num = 0, den = 0;
                for (int d = 0; d < D; d++) {
                    num += (os[d] / ZS - oo[d] / Z) * (os[d] / ZS - oo[d] / Z);
                    den += (oo[d] / Z) * (oo[d] / Z);
                }
                sum += sqrt(num / den);
            }
        KVT_EXPECT_MSG(fabs(m[b * 2].err_window - sum / (2 * W)) <= 1e-5, "B=%d: %.9f, brute %.9f",
                       B[b], m[b * 2].err_window, sum / (2 * W));
    }
    KVT_EXPECT(late > 0); /* else the window's causality is not exercised */
    kvt_layer_selection_free(sel);
    kvt_policy_free(p);
    tl_free(&t);

    /* the merge weights are the text queries' attention summed over EVERY query head (POLICIES
     * §10 proxy): changing only KV head 1's queries changes KV head 0's merged keys */
    tl_random(&t, 11, T, D, 4, 2, W, 0, true);
    for (int j = 0; j < T; j++)
        t.mod[j] = j >= 4 && j < T - 8;
    for (int j = T - W; j < T; j++)
        t.mod[j] = 0; /* text window queries */
    KVT_CHECK(kvt_policy_create("lightkv-like:window=2", NULL, &p));
    const int B1[1] = {16};
    kvt_layer_selection *s0 = NULL, *s1 = NULL;
    KVT_CHECK(kvt_replay_layer_select(&t.in, p, B1, 1, &s0));
    for (size_t i = (size_t)2 * W * D; i < (size_t)4 * W * D; i++) /* query heads 2, 3 */
        t.qw[i] *= -3.0f;
    KVT_CHECK(kvt_replay_layer_select(&t.in, p, B1, 1, &s1));
    const kvt_merged_set *a = &s0->merged[0], *b = &s1->merged[0];
    KVT_EXPECT(a->n_changed > 0);
    KVT_EXPECT_MSG(a->n_changed != b->n_changed ||
                       memcmp(a->k, b->k, (size_t)a->n_changed * D * sizeof(float)) != 0,
                   "head 0's merge ignores the other heads' attention");
    kvt_layer_selection_free(s0);
    kvt_layer_selection_free(s1);
    kvt_policy_free(p);
    tl_free(&t);
}

/* coverage_dropped of a per-step head is the mean over the steps that drop a probe: quest at
 * T = 100, pages of 16 and B = 90 keeps everything while the partial last page is being
 * written (steps 0..11) and drops a page at steps 12..15 */
static void test_step_coverage_dropped(void)
{
    test_layer t;
    tl_random(&t, 21, 100, 8, 2, 1, 8, 16, false);
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("quest:page=16,dense_layers=0", NULL, &p));
    const int B[1] = {90};
    kvt_head_metrics m[2];
    kvt_replay_opts o = {.coverage_probes = -1};
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&t.in, &p, 1, B, 1, &o, m), KVT_OK);
    KVT_EXPECT_MSG(m[0].n_keep < 100 && m[0].n_keep > 96, "n_keep %g", m[0].n_keep);
    KVT_EXPECT_MSG(!isnan(m[0].coverage_dropped) && m[0].coverage_dropped <= 1.0 + 1e-6,
                   "coverage_dropped %g", m[0].coverage_dropped);
    kvt_policy_free(p);
    tl_free(&t);
}

/* coverage is a mean over the policy's prefix [0, T-W) (POLICIES §12), not over the window it
 * keeps for free. T = 8, W = 2: prefix keys e1 (even j) and e3 (odd j), j = 0 and 1 shortest;
 * window keys e2. snapkv:window=2 at B = 2 keeps the window alone: coverage 0 over the 6
 * prefix keys (0.25 over all 8, as it was); knorm (no window) at B = 2 keeps {0, 1}: 6 of the
 * 8 keys covered at cosine 1, the window's two at 0 */
static void test_coverage_prefix(void)
{
    enum { T = 8, D = 4 };
    test_layer t;
    tl_random(&t, 5, T, D, 1, 1, 2, 0, false);
    for (int j = 0; j < T; j++) {
        float *k = t.k + (size_t)j * D;
        memset(k, 0, D * sizeof(float));
        k[j >= T - 2 ? 1 : j % 2 ? 2 : 0] = j < 2 ? 0.5f : 1.0f;
    }
    kvt_policy *p[2] = {NULL, NULL};
    KVT_CHECK(kvt_policy_create("snapkv:window=2", NULL, &p[0]));
    KVT_CHECK(kvt_policy_create("knorm", NULL, &p[1]));
    const int B[1] = {2};
    kvt_head_metrics m[2];
    kvt_replay_opts o = {.coverage_probes = -1};
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&t.in, p, 2, B, 1, &o, m), KVT_OK);
    KVT_EXPECT_MSG(fabs(m[0].coverage) < 1e-7 && fabs(m[0].coverage_radius - 1.0) < 1e-7,
                   "snapkv: coverage %g radius %g (want 0, 1)", m[0].coverage,
                   m[0].coverage_radius);
    KVT_EXPECT_MSG(fabs(m[0].coverage_dropped) < 1e-7, "snapkv dropped %g", m[0].coverage_dropped);
    KVT_EXPECT_MSG(fabs(m[1].coverage - 0.75) < 1e-7 && fabs(m[1].coverage_radius - 1.0) < 1e-7,
                   "knorm: coverage %g radius %g (want 0.75, 1)", m[1].coverage,
                   m[1].coverage_radius);
    KVT_EXPECT_MSG(fabs(m[1].coverage_dropped - 4.0 / 6.0) < 1e-7, "knorm dropped %g",
                   m[1].coverage_dropped);
    kvt_policy_free(p[0]);
    kvt_policy_free(p[1]);
    tl_free(&t);
}

/* Head redundancy by modality, worked by hand (DESIGN §4; r = (||sum of unit keys||^2 / n - 1)
 * / (n - 1)). T = 8, D = 2, text tokens 0..3 with keys e1, 2e1, e1, e1+e2; image tokens 4..7
 * with keys e2, -e2, 3e2, -2e2. Text: all four sum to (3 + 1/sqrt2, 1/sqrt2), r = (2 + sqrt2)/4;
 * {0, 3}: r = sqrt2/2. Image: any two of opposite sign give -1, the four -1/3, {5, 6, 7} -1/3.
 * streamingllm:sinks=1 keeps {0} and the most recent B - 1. */
static void test_redundancy_by_modality(void)
{
    enum { T = 8, D = 2, NB = 4 };
    test_layer t;
    tl_random(&t, 3, T, D, 1, 1, 2, 0, true);
    const float keys[T][D] = {{1, 0}, {2, 0}, {1, 0}, {1, 1}, {0, 1}, {0, -1}, {0, 3}, {0, -2}};
    memcpy(t.k, keys, sizeof(keys));
    for (int j = 0; j < T; j++)
        t.mod[j] = j >= 4;
    kvt_policy *p[2] = {NULL, NULL};
    KVT_CHECK(kvt_policy_create("full", NULL, &p[0]));
    KVT_CHECK(kvt_policy_create("streamingllm:sinks=1", NULL, &p[1]));
    const int B[NB] = {3, 4, 6, 8};
    kvt_head_metrics m[2 * NB];
    double r_all, r_all_mod[KVT_N_MODALITIES];
    kvt_replay_opts o = {.coverage_probes = -1};
    KVT_EXPECT_STATUS(
        kvt_replay_layer_metrics_frac(&t.in, p, 2, B, NULL, NB, &o, m, &r_all, r_all_mod), KVT_OK);
    const double r_text = (2 + sqrt(2)) / 4, r_img = -1.0 / 3;
    /* the full cache, and r on all keys */
    KVT_EXPECT_NEAR(m[0].r_kept_mod[0], r_text, 1e-7);
    KVT_EXPECT_NEAR(m[0].r_kept_mod[1], r_img, 1e-7);
    KVT_EXPECT(isnan(m[0].r_kept_mod[2]) && isnan(m[0].r_kept_mod[3]));
    KVT_EXPECT_NEAR(r_all_mod[0], r_text, 1e-7);
    KVT_EXPECT_NEAR(r_all_mod[1], r_img, 1e-7);
    KVT_EXPECT(isnan(r_all_mod[2]) && isnan(r_all_mod[3]));
    KVT_EXPECT_NEAR(r_all, (2 + 3 * sqrt(2)) / 56, 1e-7); /* all eight: the image keys cancel */
    /* streamingllm: B=3 {0, 6, 7}; B=4 {0, 5, 6, 7}; B=6 {0, 3..7}; B=8 everything */
    const kvt_head_metrics *s = &m[NB];
    const double want[NB][2] = {{NAN, -1.0}, {NAN, r_img}, {sqrt(2) / 2, r_img}, {r_text, r_img}};
    for (int b = 0; b < NB; b++)
        for (int k = 0; k < 2; k++)
            KVT_EXPECT_MSG(isnan(want[b][k]) ? isnan(s[b].r_kept_mod[k])
                                             : fabs(s[b].r_kept_mod[k] - want[b][k]) < 1e-7,
                           "B=%d modality %d: r %.17g, want %.17g", B[b], k, s[b].r_kept_mod[k],
                           want[b][k]);
    /* one modality: its r is the whole set's (the same number), the others NaN */
    memset(t.mod, 0, T);
    KVT_EXPECT_STATUS(
        kvt_replay_layer_metrics_frac(&t.in, p, 2, B, NULL, NB, &o, m, &r_all, r_all_mod), KVT_OK);
    KVT_EXPECT(r_all_mod[0] == r_all && isnan(r_all_mod[1]));
    for (int i = 0; i < 2 * NB; i++)
        KVT_EXPECT(m[i].r_kept_mod[0] == m[i].r_kept && isnan(m[i].r_kept_mod[1]) &&
                   isnan(m[i].r_kept_mod[2]));
    /* no modality table: NaN */
    t.in.modality = NULL;
    KVT_EXPECT_STATUS(
        kvt_replay_layer_metrics_frac(&t.in, p, 2, B, NULL, NB, &o, m, &r_all, r_all_mod), KVT_OK);
    for (int k = 0; k < KVT_N_MODALITIES; k++)
        KVT_EXPECT(isnan(r_all_mod[k]) && isnan(m[0].r_kept_mod[k]) && isnan(m[NB].r_kept_mod[k]));
    KVT_EXPECT(!isnan(r_all) && !isnan(m[0].r_kept));
    kvt_policy_free(p[0]);
    kvt_policy_free(p[1]);
    tl_free(&t);
}

/* ---- fastv, worked by hand ---- */
typedef struct fv_sets {
    int32_t idx[2][3][8]; /* [layer][budget] kept indices of head 0 */
    size_t n[2][3];
} fv_sets;

static kvt_status fv_sink(void *user, int layer, const kvt_selection_rec *recs, size_t n, bool last)
{
    (void)last;
    fv_sets *s = user;
    for (size_t i = 0; i < n; i++)
        if (recs[i].head == 0 && recs[i].step < 0 && layer < 2 && recs[i].budget < 3 &&
            recs[i].n <= 8) {
            memcpy(s->idx[layer][recs[i].budget], recs[i].idx, recs[i].n * sizeof(int32_t));
            s->n[layer][recs[i].budget] = recs[i].n;
        }
    return KVT_OK;
}

/* fastv:dense_layers=1,last=1 on 2 layers, T = 8, image tokens 2..5. Layer 0's last query
 * (1, 0) against keys (a_j, 0), a = {0.5, -1, 0, 3, 1, 2, 4, 0}: the image tokens rank 3, 5,
 * 4, 2; the text tokens go first, most recent first: 7, 6, 1, 0. Layer 1 keeps the first B of
 * 7 6 1 0 3 5 4 2; layer 0 keeps all 8. Without column sums or Q_all the default (every query)
 * is refused by name, and a layer replay of layer 1 is refused (it needs layer 0). */
static void test_fastv(void)
{
    enum { L = 2, T = 8, D = 2, W = 1, G = 2 };
    test_layer layers[L];
    for (int l = 0; l < L; l++) {
        tl_random(&layers[l], 40 + (uint64_t)l, T, D, 1, 1, W, G, true);
        layers[l].in.layer = l;
        layers[l].in.n_layers = L;
    }
    const float a[T] = {0.5f, -1, 0, 3, 1, 2, 4, 0};
    for (int j = 0; j < T; j++) {
        layers[0].k[j * D] = a[j];
        layers[0].k[j * D + 1] = 0;
        layers[0].mod[j] = j >= 2 && j <= 5;
    }
    layers[0].qw[0] = 1, layers[0].qw[1] = 0;
    char path[256];
    kvt_test_tmp(path, sizeof(path), "fastv.kvt");
    tl_write_trace(path, L, T, D, 1, 1, W, G, layers);
    kvt_policy *p[2] = {NULL, NULL};
    KVT_CHECK(kvt_policy_create("fastv:dense_layers=1,last=1", NULL, &p[0]));
    KVT_CHECK(kvt_policy_create("fastv:dense_layers=1", NULL, &p[1]));
    kvt_budget *bud;
    size_t nb;
    KVT_CHECK(kvt_budgets_parse("3,5,6", &bud, &nb));
    fv_sets s;
    memset(&s, 0, sizeof(s));
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = -1, .sink = fv_sink, .sink_user = &s};
    kvt_trace_result *res = NULL;
    KVT_EXPECT_STATUS(kvt_replay_trace(path, p, 1, bud, nb, &o, &res), KVT_OK);
    const int32_t want[3][6] = {{1, 6, 7}, {0, 1, 3, 6, 7}, {0, 1, 3, 5, 6, 7}};
    const size_t wn[3] = {3, 5, 6};
    for (int b = 0; b < 3; b++) {
        KVT_EXPECT_MSG(s.n[0][b] == T, "layer 0 budget %d keeps %zu", b, s.n[0][b]);
        KVT_EXPECT_MSG(s.n[1][b] == wn[b] && !memcmp(s.idx[1][b], want[b], wn[b] * 4),
                       "layer 1 budget %d: %zu kept", b, s.n[1][b]);
        if (res)
            KVT_EXPECT(kvt_trace_result_at(res, 0, (size_t)b, 1, 0)->n_keep == (double)wn[b] &&
                       kvt_trace_result_at(res, 0, (size_t)b, 0, 0)->n_keep == T);
    }
    kvt_trace_result_free(res);
    res = NULL;
    o.sink = NULL;
    KVT_EXPECT_STATUS(kvt_replay_trace(path, &p[1], 1, bud, nb, &o, &res), KVT_ERR_NOT_FOUND);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "layer 0 has no attention column sums and no Q_all"),
                   "message: %s", kvt_error_msg());
    /* the check before a replay refuses it the same way, and passes last=1, computing nothing */
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p[1], 1, bud, nb), KVT_ERR_NOT_FOUND);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "layer 0 has no attention column sums and no Q_all"),
                   "check: %s", kvt_error_msg());
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p[0], 1, bud, nb), KVT_OK);
    kvt_head_metrics m[3];
    const int B[3] = {3, 5, 6};
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&layers[0].in, p, 1, B, 3, &o, m), KVT_OK);
    KVT_EXPECT(m[0].n_keep == T);
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&layers[1].in, p, 1, B, 3, &o, m),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "replay the whole trace"), "message: %s",
                   kvt_error_msg());
    kvt_policy *bad = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("fastv:dense_layers=0", NULL, &bad), KVT_ERR_INVALID_ARG);
    kvt_free(bud);
    kvt_policy_free(p[0]);
    kvt_policy_free(p[1]);
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    remove(path);
}

static void test_layer_metrics(bool per_query)
{
    enum { T = 120, D = 16, Hq = 4, Hkv = 2, W = 8, G = 5, NB = 5 };
    test_layer t;
    tl_random(&t, per_query ? 77 : 76, T, D, Hq, Hkv, W, G, true);
    /* KV head 1 gets identical keys: r = 1 on all keys and on every kept set */
    for (int j = 0; j < T; j++)
        for (int d = 0; d < D; d++)
            t.k[((size_t)1 * T + j) * D + d] = (float)(d + 1) * 0.1f;
    kvt_policy **pols = make_policies(per_query);
    const int B[NB] = {16, 24, 40, 64, 200};
    kvt_head_metrics *m = malloc(sizeof(*m) * NPOL * NB * Hq);
    kvt_replay_opts o = {.coverage_probes = -1};
    KVT_EXPECT_STATUS(
        kvt_replay_layer_metrics(&t.in, (kvt_policy *const *)pols, NPOL, B, NB, &o, m), KVT_OK);
    int H = per_query ? Hq : Hkv;
    for (int h = 0; h < H; h++) {
        int g = per_query ? h / 2 : h;
        for (int b = 0; b < NB; b++) {
            const kvt_head_metrics *f = M(P_FULL, b, h);
            KVT_EXPECT(f->recall_window == 1.0 && f->err_window == 0.0);
            KVT_EXPECT(f->recall_decode == 1.0 && f->err_decode == 0.0);
            KVT_EXPECT_NEAR(f->coverage, 1.0, 1e-6);
            KVT_EXPECT(isnan(f->coverage_dropped)); /* every probe kept */
            KVT_EXPECT(f->head_overlap == 1.0);
            KVT_EXPECT(M(P_STREAM, b, h)->head_overlap == 1.0); /* the same positions */
            if (g == 1 && b < 4) /* identical keys: a dropped key is a kept one */
                KVT_EXPECT_NEAR(M(P_SNAP, b, h)->coverage_dropped, 1.0, 1e-6);
            KVT_EXPECT(f->n_keep == T);
            KVT_EXPECT(f->n_keep_mod[0] + f->n_keep_mod[1] == T && f->n_keep_mod[1] == 40);
            if (g == 1)
                KVT_EXPECT_NEAR(f->r_kept, 1.0, 1e-6);
            /* short prompt (B=200 > T): every policy keeps everything */
            for (int p = 0; p < NPOL; p++) {
                const kvt_head_metrics *x = M(p, 4, h);
                KVT_EXPECT_MSG(x->n_keep == T, "%s n_keep %g", specs[p], x->n_keep);
                if (p != P_QUEST && p != P_LIGHT)
                    KVT_EXPECT_MSG(x->err_window == 0.0, "%s", specs[p]);
            }
            /* oracle's decode recall >= every uniform-budget policy's */
            const int uni[] = {P_SNAP, P_MIXS, P_STREAM, P_RAND, P_KNORM, P_VNORM, P_KDIFF, P_TOVA};
            for (size_t u = 0; u < sizeof(uni) / sizeof(uni[0]); u++) {
                KVT_EXPECT(M(uni[u], b, h)->n_keep == (B[b] < T ? B[b] : T));
                KVT_EXPECT_MSG(M(P_ORACLE, b, h)->recall_decode >=
                                   M(uni[u], b, h)->recall_decode - 1e-12,
                               "%s B=%d: oracle %.6f < %.6f", specs[uni[u]], B[b],
                               M(P_ORACLE, b, h)->recall_decode, M(uni[u], b, h)->recall_decode);
            }
            KVT_EXPECT_NEAR(M(P_ORACLE, b, h)->oracle_overlap, 1.0, 1e-12);
            /* recall never decreases with the budget for a fixed ranking */
            if (b > 0)
                for (int p = 0; p < NPOL; p++)
                    if (p != P_LIGHT && p != P_QUEST && p != P_PYR && p != P_ADA && p != P_MIXA &&
                        p != P_HYB)
                        KVT_EXPECT_MSG(M(p, b, h)->recall_window >=
                                           M(p, b - 1, h)->recall_window - 1e-12,
                                       "%s", specs[p]);
            /* per-step and merged policies */
            KVT_EXPECT(isnan(M(P_QUEST, b, h)->recall_window));
            KVT_EXPECT(M(P_QUEST, b, h)->recall_decode > 0 && M(P_QUEST, b, h)->recall_decode <= 1);
            KVT_EXPECT(isnan(M(P_LIGHT, b, h)->recall_window));
            KVT_EXPECT(M(P_LIGHT, b, h)->err_window >= 0 && !isnan(M(P_LIGHT, b, h)->coverage));
            for (int p = 0; p < NPOL; p++) {
                const kvt_head_metrics *x = M(p, b, h);
                KVT_EXPECT_MSG(!isnan(x->n_keep) && !isnan(x->err_decode) &&
                                   !isnan(x->oracle_overlap),
                               "%s b=%d h=%d", specs[p], b, h);
                KVT_EXPECT(!(x->recall_decode > 1.0 + 1e-12)); /* NaN for merged */
            }
        }
        for (int b = 0; b < 4; b++) { /* window recall/error of snapkv by brute force */
            kvt_layer_selection *sel;
            KVT_CHECK(kvt_replay_layer_select(&t.in, pols[P_SNAP], B, NB, &sel));
            int32_t kept[256];
            size_t n;
            KVT_CHECK(kvt_layer_selection_kept(sel, (size_t)b, h, -1, kept, 256, &n));
            double br, be;
            if (!per_query) {
                brute_window(&t, g, kept, n, &br, &be);
                KVT_EXPECT_NEAR(M(P_SNAP, b, h)->recall_window, br, 2e-6);
                KVT_EXPECT_NEAR(M(P_SNAP, b, h)->err_window, be, 2e-5);
            }
            kvt_layer_selection_free(sel);
        }
    }
    /* head_overlap of snapkv: mean Jaccard with the other heads, from the exported sets */
    kvt_layer_selection *hs;
    KVT_CHECK(kvt_replay_layer_select(&t.in, pols[P_SNAP], B, NB, &hs));
    for (int b = 0; b < NB; b++) {
        static int32_t sets[Hq][T];
        size_t ns[Hq];
        for (int h = 0; h < H; h++)
            KVT_CHECK(kvt_layer_selection_kept(hs, (size_t)b, h, -1, sets[h], T, &ns[h]));
        for (int h = 0; h < H; h++) {
            double jm = 0;
            for (int h2 = 0; h2 < H; h2++) {
                size_t in = 0;
                for (size_t i = 0; i < ns[h] && h2 != h; i++)
                    for (size_t j = 0; j < ns[h2]; j++)
                        in += sets[h][i] == sets[h2][j];
                jm += h2 == h ? 0 : (double)in / (double)(ns[h] + ns[h2] - in) / (H - 1);
            }
            KVT_EXPECT_MSG(fabs(M(P_SNAP, b, h)->head_overlap - jm) <= 1e-12,
                           "head_overlap b=%d h=%d %.17g, %.17g", b, h,
                           M(P_SNAP, b, h)->head_overlap, jm);
        }
    }
    kvt_layer_selection_free(hs);
    /* r_kept by modality of every policy's fixed and merged sets, by brute force (per-step
     * heads: test_step_set_means); a text-and-image prompt, so each is its own sweep */
    int n_sets = 0;
    for (int p = 0; p < NPOL; p++) {
        kvt_layer_selection *sel;
        KVT_CHECK(kvt_replay_layer_select(&t.in, pols[p], B, NB, &sel));
        for (int b = 0; b < NB; b++)
            for (int h = 0; h < H; h++) {
                const int g = per_query ? h / 2 : h;
                char what[96];
                snprintf(what, sizeof(what), "%s B=%d h=%d", specs[p], B[b], h);
                if (sel->merged) {
                    check_r_mod(&t.in, g, NULL, 0, &sel->merged[(size_t)b * H + h],
                                M(p, b, h)->r_kept_mod, what);
                    n_sets++;
                    continue;
                }
                if (kvt_layer_selection_head_per_step(sel, h))
                    continue;
                int32_t kept[T];
                size_t n;
                KVT_CHECK(kvt_layer_selection_kept(sel, (size_t)b, h, -1, kept, T, &n));
                check_r_mod(&t.in, g, kept, n, NULL, M(p, b, h)->r_kept_mod, what);
                n_sets++;
            }
        kvt_layer_selection_free(sel);
    }
    KVT_EXPECT_MSG(n_sets >= (NPOL - 2) * NB * H, "%d sets checked", n_sets);
    for (size_t i = (size_t)H; i < Hq; i++) /* unused head slots stay NaN */
        KVT_EXPECT(isnan(M(P_SNAP, 0, i)->n_keep));
    /* a policy's metrics do not depend on the other policies of the run, although policies
     * that rank a head identically (snapkv, pyramidkv, adakv here) share one sweep over the
     * union of their cuts: each alone gives the same numbers (to rounding: block boundaries) */
    kvt_head_metrics *m1 = malloc(sizeof(*m1) * NB * Hq);
    for (int p = 0; p < NPOL; p++) {
        KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&t.in, &pols[p], 1, B, NB, &o, m1), KVT_OK);
        const size_t nf = sizeof(*m1) / sizeof(double);
        for (size_t i = 0; i < (size_t)NB * Hq; i++) {
            const double *x = (const double *)&m1[i], *y = (const double *)&m[p * NB * Hq + i];
            for (size_t k = 0; k < nf; k++)
                KVT_EXPECT_MSG((isnan(x[k]) && isnan(y[k])) || fabs(x[k] - y[k]) <= 1e-9,
                               "%s alone: slot %zu field %zu %.17g vs %.17g", specs[p], i, k, x[k],
                               y[k]);
        }
    }
    free(m1);
    free(m);
    free_policies(pols);
    tl_free(&t);
}

/* ---- the trace driver ---- */
typedef struct sink_state {
    pthread_mutex_t mu; /* the sink is called from worker threads; the callee serialises */
    int n_calls;        /* layers ended (last = true) */
    size_t n_recs;
} sink_state;

static kvt_status sink(void *user, int layer, const kvt_selection_rec *recs, size_t n, bool last)
{
    sink_state *s = user;
    pthread_mutex_lock(&s->mu);
    s->n_calls += last;
    s->n_recs += n;
    pthread_mutex_unlock(&s->mu);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 1; j < recs[i].n; j++)
            if (recs[i].idx[j] <= recs[i].idx[j - 1] || recs[i].layer != layer)
                return kvt_error_set(KVT_ERR_STATE, "unsorted record");
    return KVT_OK;
}

static void test_trace_driver(void)
{
    enum { L = 3, T = 64, D = 8, Hq = 4, Hkv = 2, W = 8, G = 4, NB = 3 };
    test_layer layers[L];
    for (int l = 0; l < L; l++) {
        tl_random(&layers[l], 100 + (uint64_t)l, T, D, Hq, Hkv, W, G, true);
        layers[l].in.layer = l;
        layers[l].in.n_layers = L;
    }
    char path[256];
    kvt_test_tmp(path, sizeof(path), "replay.kvt");
    tl_write_trace(path, L, T, D, Hq, Hkv, W, G, layers);
    kvt_policy **pols = make_policies(false);
    kvt_budget *bud;
    size_t nb;
    KVT_CHECK(kvt_budgets_parse("16,25%,32", &bud, &nb));
    sink_state ss = {.mu = PTHREAD_MUTEX_INITIALIZER};
    kvt_replay_opts o = {.n_threads = 2, .coverage_probes = 32, .sink = sink, .sink_user = &ss};
    kvt_trace_result *res = NULL;
    KVT_EXPECT_STATUS(kvt_replay_trace(path, (kvt_policy *const *)pols, NPOL, bud, nb, &o, &res),
                      KVT_OK);
    KVT_EXPECT(ss.n_calls == L && ss.n_recs > 0);
    if (res) {
        KVT_EXPECT(res->n_layers == L && res->n_tokens == T && res->n_decode == G);
        KVT_EXPECT(res->has_decode_kv && res->has_modality && res->modality_counts[1] == 21);
        KVT_EXPECT(res->budget_tokens[1] == 16 && res->n_probes == 32);
        KVT_EXPECT(res->policy_window[P_SNAP] == 8 && res->policy_window[P_TOVA] == 1);
        /* equal to the in-memory layer */
        const int B[NB] = {16, 16, 32};
        kvt_head_metrics *m = malloc(sizeof(*m) * NPOL * NB * Hq);
        for (int l = 0; l < L; l++) {
            KVT_CHECK(kvt_replay_layer_metrics(&layers[l].in, (kvt_policy *const *)pols, NPOL, B,
                                               NB, &o, m));
            for (int p = 0; p < NPOL; p++)
                for (int b = 0; b < NB; b++)
                    for (int h = 0; h < Hkv; h++) {
                        const kvt_head_metrics *a =
                            kvt_trace_result_at(res, (size_t)p, (size_t)b, l, h);
                        KVT_EXPECT(memcmp(a, M(p, b, h), sizeof(*a)) == 0);
                    }
            KVT_EXPECT(!isnan(res->r_all[l * Hkv]));
        }
        free(m);
    }
    kvt_trace_result_free(res);
    /* missing decode queries for the oracle: a clear error */
    kvt_policy *h2o;
    KVT_CHECK(kvt_policy_create("h2o", NULL, &h2o));
    KVT_EXPECT_STATUS(kvt_replay_trace(path, &h2o, 1, bud, nb, NULL, &res), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "attn_colsum") != NULL);
    kvt_policy_free(h2o);
    /* another writer's header naming the model in Latin-1 (not UTF-8): results.json holds the
       name, and JSON holds UTF-8 only, so the stray byte reads as '?' */
    tl_write_trace_named(path, "caf\xe9 \xc3\xa9", L, T, D, Hq, Hkv, W, G, layers);
    o.sink = NULL;
    KVT_EXPECT_STATUS(kvt_replay_trace(path, (kvt_policy *const *)pols, 1, bud, nb, &o, &res),
                      KVT_OK);
    if (res)
        KVT_EXPECT_MSG(!strcmp(res->model_name, "caf? \xc3\xa9"), "model name \"%s\"",
                       res->model_name);
    kvt_trace_result_free(res);
    kvt_free(bud);
    free_policies(pols);
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    unlink(path);
}

/* x [2, T, D] (16-bit) as a trace may store it, into out (3 pieces, in pc): head 1's tokens
 * [40, T) as byte planes first, then head 0 in row order, then head 1's tokens [0, 40) as byte
 * planes */
static void stored_pieces(const uint16_t *x, int T, int D, uint8_t *out, kvt_trace_piece *pc)
{
    const uint32_t t = (uint32_t)T;
    const kvt_trace_piece want[3] = {
        {1, 2, 40, t, true, 0}, {0, 1, 0, t, false, 0}, {1, 2, 0, 40, true, 0}};
    size_t off = 0;
    for (int i = 0; i < 3; i++) {
        pc[i] = want[i];
        pc[i].offset = off;
        const size_t n = (size_t)(pc[i].tok_end - pc[i].tok_begin) * D;
        const uint16_t *src = x + ((size_t)pc[i].head_begin * T + pc[i].tok_begin) * D;
        for (size_t j = 0; j < n; j++) {
            if (pc[i].planes) {
                out[off + j] = (uint8_t)(src[j] & 0xff);
                out[off + n + j] = (uint8_t)(src[j] >> 8);
            } else {
                out[off + 2 * j] = (uint8_t)(src[j] & 0xff);
                out[off + 2 * j + 1] = (uint8_t)(src[j] >> 8);
            }
        }
        off += 2 * n;
    }
}

/* a kvt_layer_input.kv_rest over the pieces stored_pieces made (K's and V's), failing the
 * last record with `fail` unless it is KVT_OK */
typedef struct stored_src {
    const uint8_t *st[2];
    const kvt_trace_piece *pc[2];
    kvt_status fail;
    size_t
        extra; /* bytes asked for beyond each record's (a record that disagrees with its piece) */
} stored_src;

static kvt_status feed_rest(void *user, int kind, size_t first, const kvt_trace_sink *sink)
{
    const stored_src *s = user;
    const int t = kind == KVT_KIND_K ? 0 : 1;
    for (size_t i = first; i < 3; i++) {
        const kvt_trace_piece *p = &s->pc[t][i];
        const size_t bytes = (size_t)(p->head_end - p->head_begin) * (p->tok_end - p->tok_begin) *
                             16 * 2; /* D = 16 */
        void *buf;
        KVT_FORWARD(sink->room(sink->user, bytes + s->extra, &buf));
        if (!buf)
            return KVT_OK;
        if (s->fail && i == 2)
            return kvt_error_set(s->fail, "record %zu: payload checksum mismatch", i);
        memcpy(buf, s->st[t] + p->offset, bytes);
        KVT_FORWARD(sink->put(sink->user, p, buf));
    }
    return KVT_OK;
}

/* K and V given in 16 bits (k16, v16), in order or as a trace stores them (pieces), give, bit for
 * bit, the metrics of the same values given widened to f32, for every policy (those that read K
 * or V on the host included: quest, the merging ones), in bf16 and f16; a layer given both ways,
 * a dtype that is not 16-bit, or pieces that overlap, leave rows out or lie outside, are
 * refused */
static void test_kv16_input(void)
{
    enum { T = 90, D = 16, Hq = 4, Hkv = 2, W = 8, G = 4, NB = 3 };
    const size_t n = (size_t)Hkv * T * D;
    const kvt_dtype dts[] = {KVT_DTYPE_BF16, KVT_DTYPE_F16};
    kvt_policy **pols = make_policies(false);
    const int B[NB] = {8, 30, 60};
    kvt_head_metrics *m32 = malloc(sizeof(*m32) * NPOL * NB * Hq);
    kvt_head_metrics *m16 = malloc(sizeof(*m16) * NPOL * NB * Hq);
    uint16_t *k16 = malloc(n * 2), *v16 = malloc(n * 2);
    kvt_replay_opts o = {.coverage_probes = -1};
    for (int t_i = 0; t_i < 2; t_i++) {
        test_layer t;
        tl_random(&t, 91 + t_i, T, D, Hq, Hkv, W, G, true);
        /* the 16-bit values, and the same widened into the f32 arrays */
        KVT_CHECK(kvt_convert_from_f32(dts[t_i], t.k, k16, n));
        KVT_CHECK(kvt_convert_from_f32(dts[t_i], t.v, v16, n));
        KVT_CHECK(kvt_convert_to_f32(dts[t_i], k16, t.k, n));
        KVT_CHECK(kvt_convert_to_f32(dts[t_i], v16, t.v, n));
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&t.in, (kvt_policy *const *)pols, NPOL, B, NB, &o, m32),
            KVT_OK);
        kvt_layer_input in = t.in;
        in.k = in.v = NULL, in.k16 = k16, in.v16 = v16, in.k16_dtype = dts[t_i];
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, NPOL, B, NB, &o, m16), KVT_OK);
        KVT_EXPECT_MSG(!memcmp(m32, m16, sizeof(*m32) * NPOL * NB * Hq),
                       "%s K and V: metrics differ from the widened f32 input's",
                       kvt_dtype_name(dts[t_i]));
        /* the same as a trace stores them: pieces out of order, split along heads and tokens,
           byte planes and not (kvt_trace_reader_read_sink's pieces) */
        kvt_trace_piece kp[3], vp[3];
        uint8_t *ks = malloc(n * 2), *vs = malloc(n * 2);
        stored_pieces(k16, T, D, ks, kp);
        stored_pieces(v16, T, D, vs, vp);
        in.k16 = (const uint16_t *)ks, in.v16 = (const uint16_t *)vs;
        in.k_pieces = kp, in.v_pieces = vp, in.n_k_pieces = in.n_v_pieces = 3;
        memset(m16, 0, sizeof(*m16) * NPOL * NB * Hq);
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, NPOL, B, NB, &o, m16), KVT_OK);
        KVT_EXPECT_MSG(!memcmp(m32, m16, sizeof(*m32) * NPOL * NB * Hq),
                       "%s K and V as stored pieces: metrics differ from the widened f32 input's",
                       kvt_dtype_name(dts[t_i]));
        /* the first pieces given, the rest read through kv_rest (as replay --device cuda's
           worker reads ahead until the GPU is ready, and the context reads the rest), with no
           array at all when none is given; a record kv_rest fails on is the layer's error */
        stored_src src = {{ks, vs}, {kp, vp}, KVT_OK, 0};
        in.kv_rest = feed_rest, in.kv_user = &src;
        for (size_t m = 0; m <= 3; m++) {
            in.n_k_pieces = m, in.n_v_pieces = 3 - m;
            in.k16 = m ? (const uint16_t *)ks : NULL, in.v16 = m < 3 ? (const uint16_t *)vs : NULL;
            memset(m16, 0, sizeof(*m16) * NPOL * NB * Hq);
            KVT_EXPECT_STATUS(
                kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, NPOL, B, NB, &o, m16),
                KVT_OK);
            KVT_EXPECT_MSG(!memcmp(m32, m16, sizeof(*m32) * NPOL * NB * Hq),
                           "%s K and V, %zu and %zu pieces given, the rest through kv_rest: "
                           "metrics differ from the widened f32 input's",
                           kvt_dtype_name(dts[t_i]), m, 3 - m);
        }
        src.extra = 2; /* a record two bytes longer than its piece */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        KVT_EXPECT(strstr(kvt_error_msg(), "bytes disagree with its piece") != NULL);
        src.extra = 0, src.fail = KVT_ERR_CHECKSUM;
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_CHECKSUM);
        in.kv_rest = NULL, in.k16 = (const uint16_t *)ks, in.v16 = (const uint16_t *)vs;
        in.n_k_pieces = in.n_v_pieces = 3;
        /* pieces that overlap, leave rows out, or lie outside the array are refused */
        kp[2].tok_end = 41; /* overlaps piece 0 at token 40 */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        kp[2].tok_end = 39; /* row 39 of head 1 missing */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        kp[2].tok_end = 40, vp[1].offset = n * 2 - 2; /* past the end */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        in.n_v_pieces = 0; /* K's pieces without V's */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        free(ks), free(vs);
        in.k16 = k16, in.v16 = v16, in.k_pieces = in.v_pieces = NULL, in.n_k_pieces = 0;
        in.k = t.k; /* both ways */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        in.k = NULL, in.k16_dtype = KVT_DTYPE_F32;
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        in.k16_dtype = dts[t_i], in.v16 = NULL; /* K without V */
        KVT_EXPECT_STATUS(
            kvt_replay_layer_metrics(&in, (kvt_policy *const *)pols, 1, B, NB, &o, m16),
            KVT_ERR_INVALID_ARG);
        tl_free(&t);
    }
    free_policies(pols);
    free(m32), free(m16), free(k16), free(v16);
}

/* ---- vl-cache, worked by hand ---- */
typedef struct vc_sets {
    char kept[2][8][64]; /* [layer][budget] head 0's kept set as "0,2,5" */
} vc_sets;

static kvt_status vc_sink(void *user, int layer, const kvt_selection_rec *recs, size_t n, bool last)
{
    (void)last;
    vc_sets *s = user;
    for (size_t i = 0; i < n; i++)
        if (recs[i].head == 0 && recs[i].step < 0 && layer < 2 && recs[i].budget < 8) {
            char *o = s->kept[layer][recs[i].budget];
            size_t len = 0;
            for (size_t e = 0; e < recs[i].n && len + 12 < 64; e++)
                len += (size_t)snprintf(o + len, 64 - len, "%s%d", e ? "," : "", recs[i].idx[e]);
        }
    return KVT_OK;
}

/* replay spec on the trace at path on n_threads (its bind's too) into *s: head 0's kept sets */
static kvt_status vc_run(const char *path, const char *spec, const char *budgets, int n_threads,
                         vc_sets *s, kvt_budget **bud, size_t *nb)
{
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    KVT_CHECK(kvt_budgets_parse(budgets, bud, nb));
    memset(s, 0, sizeof(*s));
    kvt_replay_opts o = {
        .n_threads = n_threads, .coverage_probes = -1, .sink = vc_sink, .sink_user = s};
    kvt_trace_result *res = NULL;
    kvt_status st = kvt_replay_trace(path, &p, 1, *bud, *nb, &o, &res);
    KVT_EXPECT_MSG(st == KVT_OK, "%s: %s", spec, kvt_error_msg());
    kvt_trace_result_free(res);
    kvt_policy_free(p);
    return st;
}

/* replay spec on the trace at path and compare head 0's kept sets of layers 0 and 1 */
static void vc_expect(const char *path, const char *spec, const char *budgets,
                      const char *const want[][2])
{
    kvt_budget *bud;
    size_t nb;
    vc_sets s;
    kvt_status st = vc_run(path, spec, budgets, 1, &s, &bud, &nb);
    for (size_t b = 0; b < nb && !st; b++)
        for (int l = 0; l < 2; l++)
            KVT_EXPECT_MSG(!strcmp(s.kept[l][b], want[b][l]), "%s B=%s layer %d: {%s}, want {%s}",
                           spec, bud[b].text, l, s.kept[l][b], want[b][l]);
    kvt_free(bud);
}

/* the bind's layers on two threads (kvt_bind_each_layer; ThreadSanitizer runs this test): the
   same kept sets as on one */
static void vc_same_threads(const char *path, const char *spec, const char *budgets)
{
    kvt_budget *b1, *b2;
    size_t n1, n2;
    vc_sets s1, s2;
    const kvt_status st1 = vc_run(path, spec, budgets, 1, &s1, &b1, &n1);
    const kvt_status st2 = vc_run(path, spec, budgets, 2, &s2, &b2, &n2);
    KVT_EXPECT_MSG(st1 || st2 || (s1.kept[1][0][0] && !memcmp(&s1, &s2, sizeof(s1))),
                   "%s: other sets on two threads", spec);
    kvt_free(b1);
    kvt_free(b2);
}

/* vl-cache on 2 layers, T = 8, one head, image tokens 2..4: the post-vision queries are
 * tokens 5, 6, 7, the three window queries, each (1, 0) against keys (a_j, 0) with the scale
 * 1/sqrt(2); a_j is 8 or 0, so a 0 is exp(-8/sqrt(2)) = 0.0035 of a row's largest: sparse
 * under 1%.
 * Layer 0, a = {8, 0, 8, 0, 0, 8, 0, 0}: rows 5, 6, 7 have 3 dense entries of 6, 7, 8: density
 * 9/21. Scores: the 8s that every row sees (0, 2, 5) tie, then the 0s every row sees (1, 3,
 * 4), then 6 (two rows), then 7: the ranking 0 2 5 1 3 4 6 7.
 * Layer 1, a = {8, 8, 8, 8, 0, 0, 0, 8}: 4, 4, 5 dense: 13/21. The ranking 0 1 2 3, then 7
 * (e^c / Z_7, about 0.2), then 4 5 (about 0.002), then 6.
 * Budgets: L B in proportion 9 : 13. B=2: 1.64, 2.36 -> 1, 2 and the token left to layer 0
 * (0.64 > 0.36): 2, 2. B=3: 2.45, 3.55 -> 2, 4. B=4: 3.27, 4.73 -> 3, 5. B=6: 4.91, 7.09 ->
 * 5, 7. B=7: 5.73, 8.27 -> 6, 8 (layer 1 held at T = 8). B=8 keeps everything. */
static void test_vl_cache(void)
{
    enum { L = 2, T = 8, D = 2, W = 3, G = 2 };
    test_layer layers[L];
    const float a[L][T] = {{8, 0, 8, 0, 0, 8, 0, 0}, {8, 8, 8, 8, 0, 0, 0, 8}};
    for (int l = 0; l < L; l++) {
        tl_random(&layers[l], 60 + (uint64_t)l, T, D, 1, 1, W, G, true);
        layers[l].in.layer = l;
        layers[l].in.n_layers = L;
        for (int j = 0; j < T; j++) {
            layers[l].k[j * D] = a[l][j];
            layers[l].k[j * D + 1] = 0;
            layers[l].mod[j] = j >= 2 && j <= 4;
        }
        for (int i = 0; i < W; i++)
            layers[l].qw[i * D] = 1, layers[l].qw[i * D + 1] = 0;
    }
    char path[256];
    kvt_test_tmp(path, sizeof(path), "vl_cache.kvt");
    tl_write_trace(path, L, T, D, 1, 1, W, G, layers);
    const char *const want[][2] = {{"0,2", "0,1"},
                                   {"0,2", "0,1,2,3"},
                                   {"0,2,5", "0,1,2,3,7"},
                                   {"0,1,2,3,5", "0,1,2,3,4,5,7"},
                                   {"0,1,2,3,4,5", "0,1,2,3,4,5,6,7"},
                                   {"0,1,2,3,4,5,6,7", "0,1,2,3,4,5,6,7"}};
    vc_expect(path, "vl-cache", "2,3,4,6,7,8", want);
    vc_expect(path, "vl-cache:heads=query", "2,3,4,6,7,8", want);
    /* window=1: token 7 first, then the ranking; B=4 keeps 3 and 5 */
    const char *const want_w[][2] = {{"0,2,7", "0,1,2,3,7"}};
    vc_expect(path, "vl-cache:window=1", "4", want_w);
    /* last=1: row 7 alone, 3/8 and 5/8 dense: B=4 keeps 3 and 5; the 8s tie, then the 0s */
    const char *const want_l[][2] = {{"0,2,5", "0,1,2,3,7"}};
    vc_expect(path, "vl-cache:last=1", "4", want_l);
    /* threshold=0: nothing is sparse, every layer keeps B */
    const char *const want_t[][2] = {{"0,2,5", "0,1,2"}};
    vc_expect(path, "vl-cache:threshold=0", "3", want_t);
    vc_same_threads(path, "vl-cache", "2,3,4,6,7,8");
    vc_same_threads(path, "aircache-like", "2,3,4,6,7,8");
    vc_same_threads(path, "aircache-like:heads=query,threshold=0", "2,4,7");
    /* one layer alone is refused: its budget needs every layer */
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("vl-cache", NULL, &p));
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = -1};
    kvt_head_metrics m[1];
    const int B1[1] = {4};
    KVT_EXPECT_STATUS(kvt_replay_layer_metrics(&layers[0].in, &p, 1, B1, 1, &o, m),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "replay the whole trace"), "message: %s",
                   kvt_error_msg());
    kvt_budget *bud;
    size_t nb;
    KVT_CHECK(kvt_budgets_parse("4", &bud, &nb));
    kvt_trace_result *res = NULL;
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p, 1, bud, nb), KVT_OK);
    /* a NaN key: named, nothing kept; the check before a replay reads no tensor, so the
       replay finds it */
    layers[1].k[3 * D + 1] = NAN;
    tl_write_trace(path, L, T, D, 1, 1, W, G, layers);
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p, 1, bud, nb), KVT_OK);
    KVT_EXPECT_STATUS(kvt_replay_trace(path, &p, 1, bud, nb, &o, &res), KVT_ERR_NAN);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "layer 1 query head 0: the logit of token 5's query on "
                                           "key 3 is not finite"),
                   "message: %s", kvt_error_msg());
    layers[1].k[3 * D + 1] = 0;
    /* four post-vision queries (image 2..3) but three stored, no Q_all: last=3 is named */
    for (int l = 0; l < L; l++)
        layers[l].mod[4] = 0;
    tl_write_trace(path, L, T, D, 1, 1, W, G, layers);
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p, 1, bud, nb), KVT_ERR_NOT_FOUND);
    KVT_EXPECT_STATUS(kvt_replay_trace(path, &p, 1, bud, nb, &o, &res), KVT_ERR_NOT_FOUND);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "4 post-vision queries") &&
                       strstr(kvt_error_msg(), "--q-all") && strstr(kvt_error_msg(), "last=3"),
                   "message: %s", kvt_error_msg());
    /* no visual token; a prompt that ends with one */
    memset(layers[0].mod, 0, T);
    tl_write_trace(path, L, T, D, 1, 1, W, G, layers);
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p, 1, bud, nb), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_replay_trace(path, &p, 1, bud, nb, &o, &res), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "no image or video tokens"), "message: %s",
                   kvt_error_msg());
    layers[0].mod[T - 1] = KVT_MOD_VIDEO;
    tl_write_trace(path, L, T, D, 1, 1, W, G, layers);
    KVT_EXPECT_STATUS(kvt_replay_check_trace(path, &p, 1, bud, nb), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "ends with an image or video token (7)"), "check: %s",
                   kvt_error_msg());
    KVT_EXPECT_STATUS(kvt_replay_trace(path, &p, 1, bud, nb, &o, &res), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "ends with an image or video token (7)"), "message: %s",
                   kvt_error_msg());
    KVT_EXPECT(res == NULL);
    kvt_free(bud);
    kvt_policy_free(p);
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    remove(path);
}

/* ---- kvt_replay_sets: the kept sets a foreign caller gets, merged K/V included ---- */
typedef struct rs_seen {
    int n_calls, n_merged, stop_at;
    char first[8][256]; /* policy 0, layer 0, budget 0, heads 0..7: "idx:changed" */
    double ksum;        /* sum of the merged keys handed over */
} rs_seen;

static int rs_fn(void *user, int policy, int budget, int layer, int head, int query_head, int step,
                 int n, const int32_t *idx, const uint8_t *changed, int n_changed, int D,
                 const float *k, const float *v)
{
    rs_seen *s = user;
    (void)query_head, (void)v;
    if (++s->n_calls == s->stop_at)
        return 1;
    if (changed)
        s->n_merged++;
    for (int i = 0; changed && i < n_changed * D; i++)
        s->ksum += k[i];
    if (policy == 0 && layer == 0 && budget == 0 && step < 0 && head < 8) {
        size_t len = 0;
        for (int e = 0; e < n && len + 16 < 256; e++)
            len += (size_t)snprintf(s->first[head] + len, 256 - len, "%d:%d,", idx[e],
                                    changed ? changed[e] : 9);
    }
    return 0;
}

typedef struct rs_sink_seen {
    char first[8][256];
    double ksum;
} rs_sink_seen;

static kvt_status rs_sink(void *user, int layer, const kvt_selection_rec *recs, size_t n, bool last)
{
    (void)last;
    rs_sink_seen *s = user;
    for (size_t i = 0; i < n; i++) {
        const kvt_selection_rec *r = &recs[i];
        int n_chg = 0;
        for (size_t e = 0; r->changed && e < r->n; e++)
            n_chg += r->changed[e];
        for (int e = 0; r->changed && e < n_chg * 4; e++)
            s->ksum += r->k[e];
        if (r->policy == 0 && layer == 0 && r->budget == 0 && r->step < 0 && r->head < 8) {
            size_t len = 0;
            for (size_t e = 0; e < r->n && len + 16 < 256; e++)
                len += (size_t)snprintf(s->first[r->head] + len, 256 - len, "%d:%d,", r->idx[e],
                                        r->changed ? r->changed[e] : 9);
        }
    }
    return KVT_OK;
}

/* The same sets, merged keys and all, as the replay's own sink gets; a policy list's error and
 * a caller that stops are errors with one message; the BLAS thread count is handed back. */
static void test_replay_sets(void)
{
    enum { L = 2, T = 24, D = 4, Hq = 4, Hkv = 2, W = 4, G = 2 };
    test_layer layers[L];
    for (int l = 0; l < L; l++) {
        tl_random(&layers[l], 80 + (uint64_t)l, T, D, Hq, Hkv, W, G, true);
        layers[l].in.layer = l;
        layers[l].in.n_layers = L;
    }
    char path[256];
    kvt_test_tmp(path, sizeof(path), "replay_sets.kvt");
    tl_write_trace(path, L, T, D, Hq, Hkv, W, G, layers);
    const char *pols = "snapkv:window=2,merge=pivot,heads=query,snapkv:window=2";
    rs_seen s;
    memset(&s, 0, sizeof(s));
    KVT_EXPECT_STATUS(kvt_replay_sets(path, pols, "8,12", 0, rs_fn, &s), KVT_OK);
    /* 2 policies x 2 budgets x 2 layers: 4 query heads + 2 KV heads each */
    KVT_EXPECT_MSG(s.n_calls == 2 * 2 * (4 + 2) && s.n_merged == 2 * 2 * 4, "%d calls, %d merged",
                   s.n_calls, s.n_merged);
    kvt_policy **p = NULL;
    size_t np = 0, nb = 0;
    kvt_budget *bud = NULL;
    KVT_CHECK(kvt_policy_list_parse(pols, NULL, &p, &np));
    KVT_CHECK(kvt_budgets_parse("8,12", &bud, &nb));
    rs_sink_seen w;
    memset(&w, 0, sizeof(w));
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = 0, .sink = rs_sink, .sink_user = &w};
    kvt_trace_result *res = NULL;
    KVT_CHECK(kvt_replay_trace(path, p, np, bud, nb, &o, &res));
    for (int h = 0; h < 8; h++)
        KVT_EXPECT_MSG(!strcmp(s.first[h], w.first[h]), "head %d: {%s}, the sink's {%s}", h,
                       s.first[h], w.first[h]);
    KVT_EXPECT_MSG(s.ksum == w.ksum && s.ksum != 0, "merged keys %.17g, the sink's %.17g", s.ksum,
                   w.ksum);
    KVT_EXPECT(strstr(s.first[0], ":1,") != NULL); /* a merged entry among head 0's */
    kvt_trace_result_free(res);
    kvt_policy_list_free(p, np);
    kvt_free(bud);
    memset(&s, 0, sizeof(s));
    s.stop_at = 3;
    KVT_EXPECT_STATUS(kvt_replay_sets(path, pols, "8,12", 0, rs_fn, &s), KVT_ERR_STATE);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "the caller stopped the replay at layer 0"), "%s",
                   kvt_error_msg());
    KVT_EXPECT_STATUS(kvt_replay_sets(path, "nope", "8", 0, rs_fn, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_replay_sets(path, "snapkv", "0", 0, rs_fn, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_replay_sets(path, "snapkv", "8", 0, NULL, &s), KVT_ERR_INVALID_ARG);
    /* the thread count a caller set is its own again after */
    const int before = kvt_blas_threads_set(2);
    KVT_EXPECT_STATUS(kvt_replay_sets(path, "snapkv:window=2", "8", 0, rs_fn, &s), KVT_OK);
    KVT_EXPECT(kvt_blas_threads_set(before) ==
               (strcmp(kvt_kernels_cpu_backend(), "openblas") ? 1 : 2));
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    remove(path);
}

int main(void)
{
    test_kv16_input();
    test_layer_metrics(false);
    test_layer_metrics(true);
    test_step_set_means();
    test_merged_causal();
    test_step_coverage_dropped();
    test_coverage_prefix();
    test_redundancy_by_modality();
    test_fastv();
    test_vl_cache();
    test_replay_sets();
    test_trace_driver();
    return kvt_test_result("test_replay_metrics");
}
