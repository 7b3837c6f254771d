/* kernel_test_inputs.h - inputs shared by the kernel tests (test_kernels_cpu, test_kernels_cuda),
 * so that every implementation is checked on the same problems: uniform fills, a shuffled
 * ranking, and one output-sweep problem (skewed probabilities with an exact zero, values, their
 * full sums, modality masses, decode extras, and cuts on both sides of T/2 including 0, T and
 * the 256-key block edges).
 */
#ifndef KVT_KERNEL_TEST_INPUTS_H
#define KVT_KERNEL_TEST_INPUTS_H

#include <stdlib.h>

#include "kvt_kernels.h"
#include "kvt_test.h"

static void kt_fill(kvt_rng *r, float *x, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)((kvt_rng_uniform(r) * 2.0 - 1.0) * scale);
}

/* order [T] = a uniformly shuffled 0..T-1 */
static void kt_shuffle(kvt_rng *r, int32_t *order, int T)
{
    for (int j = 0; j < T; j++)
        order[j] = j;
    for (int j = T - 1; j > 0; j--) {
        int i = (int)(kvt_rng_u64(r) % (uint64_t)(j + 1));
        int32_t t = order[i];
        order[i] = order[j], order[j] = t;
    }
}

/* pos[i] = the place of token probe[i] in order [T] (a ranking: a permutation of 0..T-1) */
static inline void kt_probe_positions(const int32_t *order, int T, const int32_t *probe, int n,
                                      int32_t *pos)
{
    int32_t *at = malloc((size_t)T * sizeof(int32_t) + 4);
    for (int t = 0; t < T; t++)
        at[order[t]] = t;
    for (int i = 0; i < n; i++)
        pos[i] = at[probe[i]];
    free(at);
}

/* one attention problem: queries q [n_q, D] of a causal window over keys k [T, D] (query i
 * sees T - n_q + i + 1 of them, at least 1), values v [T, D], a second key block k2 [n2, D]
 * of which query i sees i mod (n2 + 1) */
typedef struct kt_attn {
    float *q, *k, *k2, *v;
    int *vis, *vis2;
} kt_attn;

static void kt_attn_make(kt_attn *a, kvt_rng *r, int n_q, int T, int D, int n2)
{
    a->q = malloc((size_t)n_q * D * 4 + 4), a->k = malloc((size_t)T * D * 4 + 4);
    a->k2 = malloc(((size_t)n2 * D + 1) * 4), a->v = malloc((size_t)T * D * 4 + 4);
    kt_fill(r, a->q, (size_t)n_q * D, 2.0f);
    kt_fill(r, a->k, (size_t)T * D, 2.0f);
    kt_fill(r, a->k2, (size_t)n2 * D, 2.0f);
    kt_fill(r, a->v, (size_t)T * D, 1.0f);
    a->vis = malloc((size_t)n_q * sizeof(int) + 4), a->vis2 = malloc((size_t)n_q * sizeof(int) + 4);
    for (int i = 0; i < n_q; i++) {
        a->vis[i] = T - n_q + i + 1 > 1 ? T - n_q + i + 1 : 1;
        a->vis2[i] = n2 ? i % (n2 + 1) : 0;
    }
}

static void kt_attn_free(kt_attn *a)
{
    free(a->q), free(a->k), free(a->k2), free(a->v), free(a->vis), free(a->vis2);
}

typedef struct kt_sweep {
    int n_q, T, D, n_cut;
    float *p, *v;     /* [n_q, T], [T, D] */
    double *a, *mm;   /* full sums [n_q, D], masses by modality [n_q, NM] */
    double *pe, *oe;  /* decode extras [n_q], [n_q, D] */
    uint8_t *mod;     /* [T] */
    int32_t *order;   /* [T] */
    int32_t cuts[16]; /* [n_cut] */
} kt_sweep;

static void kt_sweep_make(kt_sweep *s, kvt_rng *r, int n_q, int T, int D)
{
    const int NMOD = KVT_N_MODALITIES;
    s->n_q = n_q, s->T = T, s->D = D;
    s->p = malloc((size_t)n_q * T * 4 + 4);
    s->v = malloc((size_t)T * D * 4 + 4);
    kt_fill(r, s->v, (size_t)T * D, 1.0f);
    for (int q = 0; q < n_q; q++) {
        double sum = 0.0;
        for (int j = 0; j < T; j++) {
            double x = kvt_rng_uniform(r);
            x = x * x * x; /* skewed, some near zero */
            s->p[(size_t)q * T + j] = (float)x;
            sum += x;
        }
        for (int j = 0; j < T; j++)
            s->p[(size_t)q * T + j] = (float)(s->p[(size_t)q * T + j] / (sum * 1.25));
    }
    s->p[0] = 0.0f; /* an exact zero */
    s->a = malloc((size_t)n_q * D * 8 + 8);
    s->mm = malloc((size_t)n_q * NMOD * 8 + 8);
    s->pe = malloc((size_t)n_q * 8 + 8);
    s->oe = malloc((size_t)n_q * D * 8 + 8);
    s->mod = malloc((size_t)T + 1);
    for (int j = 0; j < T; j++)
        s->mod[j] = (uint8_t)(j % 3 == 1);
    kvt_attn_output_ref(s->p, n_q, T, T, s->v, D, s->a, D);
    for (int q = 0; q < n_q; q++) {
        for (int m = 0; m < NMOD; m++)
            s->mm[(size_t)q * NMOD + m] = 0.0;
        for (int j = 0; j < T; j++)
            s->mm[(size_t)q * NMOD + s->mod[j]] += s->p[(size_t)q * T + j];
        s->pe[q] = 0.2;
        for (int d = 0; d < D; d++)
            s->oe[(size_t)q * D + d] = 0.2 * (kvt_rng_uniform(r) - 0.5);
    }
    s->order = malloc((size_t)T * 4 + 4);
    kt_shuffle(r, s->order, T);
    const int32_t cand[] = {0, 1, 3, 255, 256, 257, T / 2, T / 2 + 1, T - 300, T - 1, T};
    s->n_cut = 0;
    for (size_t i = 0; i < sizeof(cand) / sizeof(cand[0]); i++)
        if (cand[i] >= 0 && cand[i] <= T && (s->n_cut == 0 || cand[i] > s->cuts[s->n_cut - 1]))
            s->cuts[s->n_cut++] = cand[i];
}

static void kt_sweep_free(kt_sweep *s)
{
    free(s->p), free(s->v), free(s->a), free(s->mm), free(s->pe), free(s->oe), free(s->mod);
    free(s->order);
}

#endif /* KVT_KERNEL_TEST_INPUTS_H */
