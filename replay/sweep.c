/* sweep.c - one layer, every policy, every budget: builds the layer context once, runs each
 * policy's selection once, then measures all budgets of a head from its single ranking
 * (recall and output error by the running-sum sweep, coverage by a running best cosine, r of
 * the kept set by a running unit-key sum), per KV head or per query head. Metrics are
 * defined in analysis/RESULTS.md; policies in ../shared/POLICIES.md.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/ctx_gpu.h"
#include "replay_internal.h"

typedef struct scratch {
    int n_b, n_qmax, n_probe;
    int n_v;   /* capacity in "virtual" budgets: the budgets of every policy sharing a sweep */
    int cur_g; /* KV head being measured */
    int32_t *cuts;
    int *map;
    double *rec, *err, *rmod; /* [n_qmax, n_b(, NM)] */
    double *rec2, *err2;      /* [n_qmax, n_b]: the decode sweep's, queued beside the window's */
    void *sw;                 /* sweep_output workspace */
    double *cov, *rad, *cmod, *rk, *cdrop;
    double *cd_sum; /* [n_v] coverage_dropped over the sets that have dropped probes, */
    int *cd_n;      /* and how many: a mean over the steps where it is defined */
    float *cwork;
    double *rwork;
    int32_t *posO;
    int32_t *posT;      /* [T] position of each token in the ranking being swept */
    int32_t *probe_pos; /* [n_probe] posT of each probe */
    int32_t *probe;
    uint8_t *probe_mod;
    float *ct;     /* [T, n_probe] cosine table of the current KV head (host sweeps) */
    float *cbest;  /* [n_v, n_probe] each probe's best cosine per cut (GPU sweeps) */
    double *z;     /* [T] */
    uint8_t *keep; /* [T] merged policies: token kept unchanged */
    double *acc;
    int32_t *vcnt, *vocnt; /* [n_v] counts of the shared sweep, the oracle's counts */
    kvt_head_metrics **vm; /* [n_v] where each virtual budget's metrics go */
    double *brec, *berr;   /* [n_v] */
    double *brmod;         /* [n_v, NM] */
    float *pwt, *pdt;      /* the current KV head's window / decode probabilities token-major:
                              [T, Gs*Wt] and [T, Gs*Gd] (fast path only, else NULL; pdt made
                              by the first sweep over a head's decode queries that reads it) */
    bool pdt_want;         /* the current KV head's decode sweeps read pdt (decode_wanted) */
    int pdt_g;             /* the KV head whose rows pdt holds, -1: none */
    /* redundancy by modality (mod_cuts, mod_sweep): */
    int n_mods;            /* modalities present in the prompt */
    int mod_count[KVT_NM]; /* the prompt's tokens of each */
    int32_t *mord;         /* [T] a ranking filtered to one modality, then the others */
    int32_t *mcuts;        /* [NM, n_v] each modality's cuts */
    int *mmap;             /* [NM, n_v] index into them of the ranking's cut, -1: NaN */
    double *mrk;           /* [NM, n_v] r at each modality's cuts */
    double *msum;          /* [NM, D] merged sets: sum of each modality's unit keys */
} scratch;

static void scratch_free(scratch *s)
{
    kvt_free(s->cuts);
    kvt_free(s->map);
    kvt_free(s->rec);
    kvt_free(s->err);
    kvt_free(s->rmod);
    kvt_free(s->rec2);
    kvt_free(s->err2);
    kvt_free(s->sw);
    kvt_free(s->cov);
    kvt_free(s->rad);
    kvt_free(s->cmod);
    kvt_free(s->rk);
    kvt_free(s->cdrop);
    kvt_free(s->cd_sum);
    kvt_free(s->cd_n);
    kvt_free(s->posT);
    kvt_free(s->probe_pos);
    kvt_free(s->cwork);
    kvt_free(s->rwork);
    kvt_free(s->posO);
    kvt_free(s->probe);
    kvt_free(s->probe_mod);
    kvt_free(s->ct);
    kvt_free(s->cbest);
    kvt_free(s->z);
    kvt_free(s->keep);
    kvt_free(s->acc);
    kvt_free(s->vcnt);
    kvt_free(s->vocnt);
    kvt_free(s->vm);
    kvt_free(s->brec);
    kvt_free(s->berr);
    kvt_free(s->brmod);
    kvt_free(s->pwt);
    kvt_free(s->pdt);
    kvt_free(s->mord);
    kvt_free(s->mcuts);
    kvt_free(s->mmap);
    kvt_free(s->mrk);
    kvt_free(s->msum);
    memset(s, 0, sizeof(*s));
}

static kvt_status scratch_init(scratch *s, const kvt_layer_ctx *c, int n_b, int n_pol, int n_probe)
{
    memset(s, 0, sizeof(*s));
    s->pdt_g = -1;
    int nq = c->Gs * (c->Wt > c->Gd ? c->Wt : c->Gd);
    s->n_b = n_b;
    s->n_v = n_b * n_pol;
    s->n_qmax = nq;
    s->n_probe = n_probe;
    size_t T = (size_t)c->T, D = (size_t)c->D, nb = (size_t)s->n_v;
    s->cuts = kvt_malloc(nb * sizeof(int32_t));
    s->map = kvt_malloc(nb * sizeof(int));
    s->rec = kvt_malloc((size_t)nq * nb * sizeof(double));
    s->err = kvt_malloc((size_t)nq * nb * sizeof(double));
    s->rmod = kvt_malloc((size_t)nq * nb * KVT_NM * sizeof(double));
    s->rec2 = kvt_malloc((size_t)nq * nb * sizeof(double));
    s->err2 = kvt_malloc((size_t)nq * nb * sizeof(double));
    s->sw = kvt_malloc(kvt_sweep_output_cpu_workspace_bytes(nq, c->D) + 8);
    s->cov = kvt_malloc(nb * sizeof(double));
    s->rad = kvt_malloc(nb * sizeof(double));
    s->cmod = kvt_malloc(nb * KVT_NM * sizeof(double));
    s->rk = kvt_malloc(nb * sizeof(double));
    s->cdrop = kvt_malloc(nb * sizeof(double));
    s->cd_sum = kvt_malloc(nb * sizeof(double));
    s->cd_n = kvt_malloc(nb * sizeof(int));
    s->posT = kvt_malloc(T * sizeof(int32_t));
    s->probe_pos = kvt_malloc(((size_t)n_probe + 1) * sizeof(int32_t));
    s->cwork = kvt_malloc(((size_t)n_probe + 1) * sizeof(float));
    s->rwork = kvt_malloc(D * sizeof(double));
    s->posO = kvt_malloc(T * sizeof(int32_t));
    s->probe = kvt_malloc(((size_t)n_probe + 1) * sizeof(int32_t));
    s->probe_mod = kvt_malloc((size_t)n_probe + 1);
    if (c->gpu) /* the cosine table stays on the device */
        s->cbest = kvt_malloc((nb * (size_t)n_probe + 1) * sizeof(float));
    else
        s->ct = kvt_malloc((T * (size_t)n_probe + 1) * sizeof(float));
    s->z = kvt_malloc(T * sizeof(double));
    s->keep = kvt_malloc(T + 1);
    s->acc = kvt_malloc(D * sizeof(double));
    s->vcnt = kvt_malloc(nb * sizeof(int32_t));
    s->vocnt = kvt_malloc(nb * sizeof(int32_t));
    s->vm = kvt_malloc(nb * sizeof(kvt_head_metrics *));
    s->brec = kvt_malloc(nb * sizeof(double));
    s->berr = kvt_malloc(nb * sizeof(double));
    s->brmod = kvt_malloc(nb * KVT_NM * sizeof(double));
    for (int t = 0; c->in->modality && t < c->T; t++)
        s->mod_count[c->in->modality[t] % KVT_NM]++;
    for (int k = 0; k < KVT_NM; k++)
        s->n_mods += s->mod_count[k] > 0;
    if (s->n_mods > 1) { /* with one modality its r is the whole set's */
        s->mord = kvt_malloc(T * sizeof(int32_t));
        s->mcuts = kvt_malloc(nb * KVT_NM * sizeof(int32_t));
        s->mmap = kvt_malloc(nb * KVT_NM * sizeof(int));
        s->mrk = kvt_malloc(nb * KVT_NM * sizeof(double));
        s->msum = kvt_malloc(D * KVT_NM * sizeof(double));
        if (!s->mord || !s->mcuts || !s->mmap || !s->mrk || !s->msum) {
            scratch_free(s);
            return kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory (layer scratch)");
        }
    }
    if (!kvt_kernels_ref_only() && !c->gpu) { /* the device sweeps do not read them */
        s->pwt = kvt_malloc(T * (size_t)c->Gs * c->Wt * sizeof(float) + 1);
        if (!s->pwt) {
            scratch_free(s);
            return kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory (layer scratch)");
        }
    }
    if (!s->vcnt || !s->vocnt || !s->vm || !s->brec || !s->berr || !s->brmod || !s->cuts ||
        !s->map || !s->rec || !s->err || !s->rmod || !s->rec2 || !s->err2 || !s->sw || !s->cov ||
        !s->rad || !s->cmod || !s->rk || !s->cdrop || !s->cd_sum || !s->cd_n || !s->posT ||
        !s->probe_pos || !s->cwork || !s->rwork || !s->posO || !s->probe || !s->probe_mod ||
        !(s->ct || s->cbest) || !s->z || !s->keep || !s->acc) {
        scratch_free(s);
        return kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory (layer scratch)");
    }
    /* probes: i*T/n for i < n (all keys when n == T), see RESULTS.md */
    for (int i = 0; i < n_probe; i++) {
        s->probe[i] = (int32_t)((int64_t)i * c->T / n_probe);
        s->probe_mod[i] = c->in->modality ? c->in->modality[s->probe[i]] % KVT_NM : 0;
    }
    return KVT_OK;
}

/* sorted unique cuts of counts [n_b]; map[b] = its index */
static int make_cuts(const int32_t *cnt, size_t stride, int n_b, int32_t *cuts, int *map)
{
    int n = 0;
    for (int b = 0; b < n_b; b++) {
        int32_t x = cnt[(size_t)b * stride];
        int pos = 0;
        while (pos < n && cuts[pos] < x)
            pos++;
        if (pos < n && cuts[pos] == x)
            continue;
        memmove(cuts + pos + 1, cuts + pos, (size_t)(n - pos) * sizeof(int32_t));
        cuts[pos] = x;
        n++;
    }
    for (int b = 0; b < n_b; b++) {
        int32_t x = cnt[(size_t)b * stride];
        for (int i = 0; i < n; i++)
            if (cuts[i] == x)
                map[b] = i;
    }
    return n;
}

enum { Q_WINDOW, Q_DECODE_ALL, Q_DECODE_STEP };

/* Whether KV head g's sweeps over all its decode queries should read their probabilities
 * token-major (pdt): a sweep gathers the probabilities of the tokens it walks, in ranking order
 * up to its largest cut, for each query. From the rows (p) that is a scattered read per query
 * and token; from the copy one contiguous run per token, but the copy costs a pass over all T
 * tokens of the KV head's decode rows. So the copy is made where the sweeps walk, together,
 * at least 2T tokens (each sweep its largest kept count; a query-head policy's sweep is one
 * head's rows, 1/Gs of them). Either way the same bits (kvt_sweep_output_cpu).
 * Measured (bench/RESULTS.md, 2026-12-08): llama3-8b shape, T 4096, G 1024, budgets up to 10%,
 * 1 to 4 policies: the sweeps 0.7 s a layer faster without the copy; 14 policies with budgets
 * up to 30%, 0.9 s faster with it. */
static bool decode_wanted(const kvt_layer_ctx *c, const kvt_layer_selection *sels, size_t n_pol,
                          int n_b, int g)
{
    double walk = 0.0;
    for (size_t p = 0; p < n_pol; p++) {
        const kvt_layer_selection *sel = &sels[p];
        if (!sel->has_fixed || sel->dec || sel->merged)
            continue; /* no sweep over all decode queries (query_launch's Q_DECODE_ALL) */
        const int h0 = sel->per_query ? g * c->Gs : g, h1 = sel->per_query ? h0 + c->Gs : g + 1;
        for (int h = h0; h < h1; h++) {
            if (sel->step_head && sel->step_head[h])
                continue;
            int most = 0;
            for (int b = 0; b < n_b; b++) {
                const int n = sel->count[(size_t)b * sel->n_heads + h];
                most = n > most ? n : most;
            }
            walk += sel->per_query ? (double)most / c->Gs : (double)most;
        }
    }
    return walk >= 2.0 * c->T;
}

/* s->pdt holding KV head g's decode probabilities token-major (the fast path's copy), made on
 * the first sweep that reads it (where decode_wanted): none does for a layer whose policies are
 * all decode-time caches (their decode metrics are kvt_dec_metrics'). NULL when out of
 * memory. */
static const float *decode_t(const kvt_layer_ctx *c, scratch *s, int g)
{
    const size_t n = (size_t)c->Gs * c->Gd;
    if (!s->pdt && !(s->pdt = kvt_malloc((size_t)c->T * n * sizeof(float) + 1)))
        return NULL;
    if (s->pdt_g != g) {
        kvt_transpose_f32_cpu(kvt_ctx_prd_row(c, (size_t)g * n), (int)n, c->T, (size_t)c->T, s->pdt,
                              n);
        s->pdt_g = g;
    }
    return s->pdt;
}

/* One output sweep launched (query_launch) and reduced to its means (query_reduce). With the
 * GPU a head's window, decode and set sweeps are queued together and their results waited for
 * once (kvt_ctx_gpu_defer); query_reduce reads s->map, which every sweep of the head computes
 * alike from the same counts. */
typedef struct qs_job {
    int n_q, n_cut;
    bool mod;                 /* recall by modality swept */
    double *rec, *err, *rmod; /* [n_q, n_cut(, NM)] */
} qs_job;

/* the sweep of the queries of query heads [hq0, hq0+nh) into rec, err (and rmod when want_mod
 * and the layer has modalities) */
static kvt_status query_launch(const kvt_layer_ctx *c, scratch *s, int kind, int step, int hq0,
                               int nh, const int32_t *order, const int32_t *cnt, size_t cstride,
                               int n_b, bool want_mod, double *rec, double *err, double *rmod,
                               qs_job *j)
{
    const int T = c->T, D = c->D, Wt = c->Wt, Gd = c->Gd;
    int n_cut = make_cuts(cnt, cstride, n_b, s->cuts, s->map);
    const float *p, *pt = NULL;
    const double *a, *pe = NULL, *oe = NULL, *mm = NULL, *rf;
    size_t sp, sa, se = 1, st = 0;
    const int hr = hq0 % c->Gs; /* first head's rank in its KV group */
    int n_q;
    const uint8_t *mod = NULL;
    if (kind == Q_WINDOW) {
        n_q = nh * Wt;
        p = c->prw + (size_t)hq0 * Wt * T, sp = T;
        a = c->aw + (size_t)hq0 * Wt * D, sa = D;
        rf = c->rsw + (size_t)hq0 * Wt;
        if (s->pwt)
            pt = s->pwt + (size_t)hr * Wt, st = (size_t)c->Gs * Wt;
        if (c->massw_mod && want_mod) {
            mod = c->in->modality;
            mm = c->massw_mod + (size_t)hq0 * Wt * KVT_NM;
        }
    } else if (kind == Q_DECODE_ALL) {
        n_q = nh * Gd;
        p = kvt_ctx_prd_row(c, (size_t)hq0 * Gd), sp = T;
        a = c->ad + (size_t)hq0 * Gd * D, sa = D;
        rf = c->rsd + (size_t)hq0 * Gd;
        if (s->pdt_want) {
            const float *t = decode_t(c, s, hq0 / c->Gs);
            KVT_RETURN_IF(!t, KVT_ERR_NOMEM, "replay: out of memory (layer scratch)");
            pt = t + (size_t)hr * Gd, st = (size_t)c->Gs * Gd;
        }
        if (c->has_extra)
            pe = c->pd_extra + (size_t)hq0 * Gd, oe = c->od_extra + (size_t)hq0 * Gd * D;
    } else {
        n_q = nh;
        p = kvt_ctx_prd_row(c, (size_t)hq0 * Gd + (size_t)step), sp = (size_t)Gd * T;
        a = c->ad + ((size_t)hq0 * Gd + step) * D, sa = (size_t)Gd * D;
        rf = c->rsd + (size_t)hq0 * Gd + step, se = Gd; /* the stride of pe and rf */
        if (c->has_extra) {
            pe = c->pd_extra + (size_t)hq0 * Gd + step;
            oe = c->od_extra + ((size_t)hq0 * Gd + step) * D;
        }
    }
    *j = (qs_job){n_q, n_cut, mod != NULL, rec, err, rmod};
    if (c->gpu) /* --device cuda (pt is NULL then: see scratch_init); V is the KV head's */
        return kvt_ctx_gpu_sweep_output(c->gpu, n_q, T, D, p, sp, hq0 / c->Gs, a, sa, pe, se, oe,
                                        rf, order, s->cuts, n_cut, mod, mm, KVT_NM, rec, err,
                                        mod ? rmod : NULL);
    const float *v = c->v + (size_t)(hq0 / c->Gs) * T * D;
    return kvt_sweep_output(n_q, T, D, p, sp, pt, st, v, a, sa, pe, se, oe, rf, order, s->cuts,
                            n_cut, mod, mm, KVT_NM, rec, err, mod ? rmod : NULL, s->sw);
}

/* mean recall/err (and window recall by modality) over the job's queries, for every budget:
 * out_rec[b], out_err[b], out_rmod[b][NM] (may be NULL) */
static void query_reduce(const scratch *s, const qs_job *j, int n_b, double *out_rec,
                         double *out_err, double *out_rmod)
{
    const int n_q = j->n_q, n_cut = j->n_cut;
    for (int b = 0; b < n_b; b++) {
        int ci = s->map[b];
        double r = 0.0, e = 0.0;
        for (int q = 0; q < n_q; q++) {
            r += j->rec[(size_t)q * n_cut + ci];
            e += j->err[(size_t)q * n_cut + ci];
        }
        out_rec[b] = r / n_q;
        out_err[b] = e / n_q;
        if (out_rmod)
            for (int m = 0; m < KVT_NM; m++) {
                double sum = 0.0;
                int k = 0;
                for (int q = 0; j->mod && q < n_q; q++) {
                    double x = j->rmod[((size_t)q * n_cut + ci) * KVT_NM + m];
                    if (!isnan(x))
                        sum += x, k++;
                }
                out_rmod[(size_t)b * KVT_NM + m] = k ? sum / k : NAN;
            }
    }
}

/* one sweep at once: query_launch, its results waited for, query_reduce */
static kvt_status query_sweep(const kvt_layer_ctx *c, scratch *s, int kind, int step, int hq0,
                              int nh, const int32_t *order, const int32_t *cnt, size_t cstride,
                              int n_b, double *out_rec, double *out_err, double *out_rmod)
{
    qs_job j;
    KVT_FORWARD(query_launch(c, s, kind, step, hq0, nh, order, cnt, cstride, n_b, out_rmod != NULL,
                             s->rec, s->err, s->rmod, &j));
    query_reduce(s, &j, n_b, out_rec, out_err, out_rmod);
    return KVT_OK;
}

/* the probes in a policy's prefix [0, T-W) (POLICIES §12: coverage is a mean over j in P):
 * the probes ascend, so they are the first ones */
static int probes_in_prefix(const scratch *s, int T, int W)
{
    int n = 0;
    while (n < s->n_probe && s->probe[n] < T - W)
        n++;
    return n;
}

/* Head redundancy by modality (DESIGN §4: r on all keys and on the kept set, per modality):
 * modality k's kept keys at the ranking's cuts [n_cut] are the first of its own tokens in the
 * ranking. s->mord = order [T] filtered to k's tokens, then the others' (a whole order, as the
 * sweeps read); row k of mcuts gets how many of k's tokens each cut holds (ascending, without
 * repeats), mmap which of them each cut is, -1 under two (r is NaN). Returns their count. */
static int mod_cuts(const kvt_layer_ctx *c, scratch *s, const int32_t *order, const int32_t *cuts,
                    int n_cut, int k)
{
    const uint8_t *mod = c->in->modality;
    const int T = c->T;
    int32_t *mc = s->mcuts + (size_t)k * s->n_v;
    int *mm = s->mmap + (size_t)k * s->n_v;
    int n = 0, have = 0, ci = 0;
    for (int t = 0; t <= T; t++) {
        for (; ci < n_cut && cuts[ci] == t; ci++) {
            if (have < 2)
                mm[ci] = -1;
            else if (n > 0 && mc[n - 1] == have)
                mm[ci] = n - 1;
            else
                mc[n] = have, mm[ci] = n++;
        }
        if (t < T && mod[order[t]] % KVT_NM == k)
            s->mord[have++] = order[t];
    }
    for (int t = 0; t < T; t++)
        if (mod[order[t]] % KVT_NM != k)
            s->mord[have++] = order[t];
    return n;
}

/* the redundancy sweep of s->mord at row k's n cuts into row k of mrk. On the GPU the upload of
 * mord first waits for the downloads queued before it (ctx_gpu.c's copy_up): one round trip
 * per modality, where the head's other sweeps share one */
static kvt_status mod_sweep(const kvt_layer_ctx *c, scratch *s, int g, int k, int n)
{
    const int32_t *mc = s->mcuts + (size_t)k * s->n_v;
    double *rk = s->mrk + (size_t)k * s->n_v;
    if (n == 0)
        return KVT_OK;
    if (c->gpu)
        return kvt_ctx_gpu_set_sweep(c->gpu, g, s->mord, mc, n, NULL, rk);
    return kvt_sweep_redundancy(c->ku + (size_t)g * c->T * c->D, c->T, c->D, s->mord, mc, n,
                                s->rwork, rk);
}

/* set metrics of one ranking at budgets [n_b]: coverage, radius, by modality, r_kept, kept by
 * modality, oracle overlap. Coverage is over the probes of the prefix of window W. Results are
 * ADDED to the metric slots m[b] times `wgt` (for averaging over decode steps). oord/ocnt [n_b]:
 * the oracle's ranking and counts of the same head, or NULL. In two steps, as the output
 * sweeps (query_launch): set_launch sweeps coverage and redundancy (with the GPU: queued, the
 * results waited for by the caller; *n_cut_out cuts), set_finish adds them, with the kept
 * counts, modality mix and oracle overlap, to the metrics. */
static kvt_status set_launch(const kvt_layer_ctx *c, scratch *s, int g, int W, const int32_t *order,
                             const int32_t *cnt, size_t cstride, int n_b, int *n_cut_out)
{
    const int T = c->T, D = c->D, n_eval = probes_in_prefix(s, T, W);
    int n_cut = *n_cut_out = make_cuts(cnt, cstride, n_b, s->cuts, s->map);
    if (s->n_probe > 0) { /* where each probe's token is in the ranking: kept below a cut */
        for (int t = 0; t < T; t++)
            s->posT[order[t]] = t;
        for (int i = 0; i < s->n_probe; i++)
            s->probe_pos[i] = s->posT[s->probe[i]];
    }
    if (c->gpu) /* each probe's best per cut and the redundancy on the GPU */
        KVT_FORWARD(kvt_ctx_gpu_set_sweep(c->gpu, g, order, s->cuts, n_cut,
                                          s->n_probe > 0 ? s->cbest : NULL, s->rk));
    else {
        if (s->n_probe > 0)
            KVT_FORWARD(kvt_sweep_coverage(s->ct, T, s->n_probe, n_eval, order, s->cuts, n_cut,
                                           s->probe_mod, s->probe_pos, s->cwork, s->cov, s->rad,
                                           s->cmod, s->cdrop));
        KVT_FORWARD(kvt_sweep_redundancy(c->ku + (size_t)g * T * D, T, D, order, s->cuts, n_cut,
                                         s->rwork, s->rk));
    }
    for (int k = 0; k < KVT_NM && s->n_mods > 1; k++)
        if (s->mod_count[k] > 0)
            KVT_FORWARD(mod_sweep(c, s, g, k, mod_cuts(c, s, order, s->cuts, n_cut, k)));
    return KVT_OK;
}

static void set_finish(const kvt_layer_ctx *c, scratch *s, int W, const int32_t *order,
                       const int32_t *cnt, size_t cstride, int n_b, int n_cut, const int32_t *oord,
                       const int32_t *ocnt, double wgt, kvt_head_metrics *const *m)
{
    const int T = c->T, n_eval = probes_in_prefix(s, T, W);
    if (c->gpu) /* the GPU's bests summarised here */
        for (int ci = 0; ci < n_cut && s->n_probe > 0; ci++)
            kvt_coverage_summary(s->cbest + (size_t)ci * s->n_probe, n_eval, s->cuts[ci],
                                 s->probe_mod, s->probe_pos, s->cov + ci, s->rad + ci,
                                 s->cmod + (size_t)ci * KVT_NM, s->cdrop + ci);
    if (oord)
        for (int t = 0; t < T; t++)
            s->posO[oord[t]] = t;
    const uint8_t *mod = c->in->modality;
    for (int b = 0; b < n_b; b++) {
        kvt_head_metrics *hm = m[b];
        int ci = s->map[b], n = cnt[(size_t)b * cstride];
        hm->n_keep += wgt * n;
        if (s->n_probe > 0) {
            hm->coverage += wgt * s->cov[ci];
            hm->coverage_radius += wgt * s->rad[ci];
            if (!isnan(s->cdrop[ci])) { /* every probe kept: not defined for this set */
                s->cd_sum[b] += s->cdrop[ci];
                s->cd_n[b]++;
            }
            for (int k = 0; k < KVT_NM; k++)
                hm->coverage_mod[k] += wgt * s->cmod[(size_t)ci * KVT_NM + k];
        }
        hm->r_kept += wgt * s->rk[ci];
        for (int k = 0; k < KVT_NM && mod; k++) {
            double r = NAN; /* no keys of k */
            if (s->n_mods < 2 && s->mod_count[k] > 0)
                r = s->rk[ci];
            else if (s->n_mods > 1 && s->mod_count[k] > 0) {
                const int mi = s->mmap[(size_t)k * s->n_v + ci];
                r = mi < 0 ? NAN : s->mrk[(size_t)k * s->n_v + mi];
            }
            hm->r_kept_mod[k] += wgt * r;
        }
        if (mod) {
            double cm[KVT_NM] = {0};
            for (int t = 0; t < n; t++)
                cm[mod[order[t]] % KVT_NM] += 1.0;
            for (int k = 0; k < KVT_NM; k++)
                hm->n_keep_mod[k] += wgt * cm[k];
        }
        if (oord) {
            int no = ocnt[b], hit = 0;
            for (int t = 0; t < n; t++)
                hit += s->posO[order[t]] < no;
            hm->oracle_overlap += wgt * (no > 0 ? (double)hit / no : NAN);
        }
    }
}

/* one ranking's set metrics at once: set_launch, its results waited for, set_finish */
static kvt_status set_sweep(const kvt_layer_ctx *c, scratch *s, int g, int W, const int32_t *order,
                            const int32_t *cnt, size_t cstride, int n_b, const int32_t *oord,
                            const int32_t *ocnt, double wgt, kvt_head_metrics *const *m)
{
    int n_cut = 0;
    KVT_FORWARD(set_launch(c, s, g, W, order, cnt, cstride, n_b, &n_cut));
    set_finish(c, s, W, order, cnt, cstride, n_b, n_cut, oord, ocnt, wgt, m);
    return KVT_OK;
}

static void zero_set_fields(kvt_head_metrics *hm, bool cov, bool mod, bool oracle)
{
    hm->n_keep = 0.0;
    hm->coverage = hm->coverage_radius = hm->coverage_dropped = cov ? 0.0 : NAN;
    hm->r_kept = 0.0;
    hm->oracle_overlap = oracle ? 0.0 : NAN;
    for (int k = 0; k < KVT_NM; k++) {
        hm->coverage_mod[k] = cov && mod ? 0.0 : NAN;
        hm->n_keep_mod[k] = mod ? 0.0 : NAN;
        hm->r_kept_mod[k] = mod ? 0.0 : NAN;
    }
}

static void set_nan(kvt_head_metrics *hm)
{
    double *d = (double *)hm;
    for (size_t i = 0; i < sizeof(*hm) / sizeof(double); i++)
        d[i] = NAN;
}

/* metrics of head h, every budget, of the n_mem subset (ranking) selections ms[]: the same
 * granularity and, when n_mem > 1, the same fixed ranking of the head (no per-step ranking), so
 * that one sweep over the union of their cuts measures them all. Member k's budget b goes to
 * m[k][b * mstride]. */
static kvt_status measure_head(const kvt_layer_ctx *c, scratch *s,
                               const kvt_layer_selection *const *ms, int n_mem, int h,
                               const kvt_layer_selection *orc, kvt_head_metrics *const *m,
                               size_t mstride)
{
    const kvt_layer_selection *sel = ms[0];
    const int T = c->T, H = sel->n_heads, n_b = s->n_b, Gd = c->Gd, n_v = n_mem * n_b;
    const int g = kvt_ctx_kv_of(c, sel->per_query, h);
    const int hq0 = sel->per_query ? h : g * c->Gs, nh = sel->per_query ? 1 : c->Gs;
    double *brec = s->brec, *berr = s->berr, *rmod = s->brmod;
    kvt_status st = KVT_OK;
    const bool mod = c->in->modality != NULL, cov = s->n_probe > 0;
    const bool step = sel->step_head && sel->step_head[h];
    const int32_t *oord = orc ? orc->order + (size_t)h * T : NULL;
    for (int v = 0; v < n_v; v++) {
        const kvt_layer_selection *mk = ms[v / n_b];
        int b = v % n_b;
        kvt_head_metrics *hm = m[v / n_b] + (size_t)b * mstride;
        s->vm[v] = hm;
        s->vcnt[v] = mk->has_fixed ? mk->count[(size_t)b * H + h] : 0;
        s->vocnt[v] = orc ? orc->count[(size_t)b * H + h] : 0;
        set_nan(hm);
        zero_set_fields(hm, cov, mod, orc != NULL);
        s->cd_sum[v] = 0.0;
        s->cd_n[v] = 0;
    }
    if (sel->has_fixed) {
        const int32_t *ord = sel->order + (size_t)h * T;
        /* the window, decode and set sweeps of the head's ranking (the same counts, so the same
           cuts), queued together on the GPU and waited for once; a decoding= cache's decode
           metrics are its own (kvt_dec_metrics), so it is never shared */
        const bool dec = Gd > 0 && !step && !sel->dec, set = !(Gd > 0 && step);
        qs_job jw, jd;
        int set_cuts = 0;
        if (c->gpu)
            kvt_ctx_gpu_defer(c->gpu, true);
        st = query_launch(c, s, Q_WINDOW, 0, hq0, nh, ord, s->vcnt, 1, n_v, true, s->rec, s->err,
                          s->rmod, &jw);
        if (!st && dec)
            st = query_launch(c, s, Q_DECODE_ALL, 0, hq0, nh, ord, s->vcnt, 1, n_v, false, s->rec2,
                              s->err2, NULL, &jd);
        /* a per-step head's set metrics are the mean over its step sets (below) */
        if (!st && set)
            st = set_launch(c, s, g, sel->window, ord, s->vcnt, 1, n_v, &set_cuts);
        if (c->gpu) { /* the results, now */
            kvt_status st2 = kvt_ctx_gpu_defer(c->gpu, false);
            st = st ? st : st2;
        }
        if (st)
            return st;
        query_reduce(s, &jw, n_v, brec, berr, rmod);
        for (int v = 0; v < n_v; v++) {
            kvt_head_metrics *hm = s->vm[v];
            hm->recall_window = brec[v];
            hm->err_window = berr[v];
            for (int k = 0; k < KVT_NM; k++)
                hm->recall_window_mod[k] = mod ? rmod[(size_t)v * KVT_NM + k] : NAN;
        }
        if (dec) {
            query_reduce(s, &jd, n_v, brec, berr, NULL);
            for (int v = 0; v < n_v; v++) {
                s->vm[v]->recall_decode = brec[v];
                s->vm[v]->err_decode = berr[v];
            }
        }
        if (set)
            set_finish(c, s, sel->window, ord, s->vcnt, 1, n_v, set_cuts, oord, s->vocnt, 1.0,
                       s->vm);
    }
    if (Gd > 0 && step) { /* a single member (per-step rankings are never shared) */
        for (int b = 0; b < n_b; b++)
            s->vm[b]->recall_decode = s->vm[b]->err_decode = 0.0;
        for (int sx = 0; sx < Gd; sx++) {
            const int32_t *ord = sel->step_order + ((size_t)h * Gd + sx) * T;
            const int32_t *cnt = sel->step_count + (size_t)h * Gd + sx;
            size_t cs = (size_t)H * Gd;
            if ((st = query_sweep(c, s, Q_DECODE_STEP, sx, hq0, nh, ord, cnt, cs, n_b, brec, berr,
                                  NULL)))
                return st;
            for (int b = 0; b < n_b; b++) {
                s->vm[b]->recall_decode += brec[b] / Gd;
                s->vm[b]->err_decode += berr[b] / Gd;
            }
            if ((st = set_sweep(c, s, g, sel->window, ord, cnt, cs, n_b, oord, s->vocnt, 1.0 / Gd,
                                s->vm)))
                return st;
        }
    }
    for (int v = 0; v < n_v && cov; v++)
        s->vm[v]->coverage_dropped = s->cd_n[v] ? s->cd_sum[v] / s->cd_n[v] : NAN;
    return KVT_OK;
}

/* output error of one query at position pos against a merged set: it sees the entries whose
 * token index (cidx[e] for changed entry e) is <= pos. Entries that are original tokens keep
 * their original probability p_j, summed over those kept unchanged (`unch`; the full sums
 * less the others would be rounding noise for a query that sees little that is kept); only
 * changed entries need new logits: w_e = exp(q.k'_e*scale - lse). Extra (decode) keys as in
 * the sweep. */
static double merged_err(const kvt_layer_ctx *c, scratch *s, const kvt_merged_set *ms,
                         const int32_t *cidx, int pos, const int32_t *unch, int n_unch,
                         const float *q, const float *p, double lse, const double *a_full,
                         double pe, const double *oe)
{
    const int T = c->T, D = c->D;
    const float *V = c->v + (size_t)(s->cur_g) * T * D;
    double r_full = 0.0;
    for (int j = 0; j < T; j++)
        r_full += p[j];
    double r = 0.0; /* summed over what is kept, not the full sums less the dropped: no
                       cancellation when the query sees little or nothing that is kept */
    for (int d = 0; d < D; d++)
        s->acc[d] = 0.0;
    for (int i = 0; i < n_unch; i++) {
        double pj = p[unch[i]];
        r += pj;
        for (int d = 0; d < D; d++)
            s->acc[d] += pj * V[(size_t)unch[i] * D + d];
    }
    for (int e = 0; e < ms->n_changed; e++) {
        if (cidx[e] > pos) /* after the query: not visible to it */
            continue;
        double z = 0.0;
        for (int d = 0; d < D; d++)
            z += (double)q[d] * ms->k[(size_t)e * D + d];
        double w = exp(z * c->scale - lse);
        r += w;
        const float *ve = ms->v ? ms->v + (size_t)e * D : V + (size_t)cidx[e] * D;
        for (int d = 0; d < D; d++)
            s->acc[d] += w * ve[d];
    }
    double kept = r + pe, total = r_full + pe, num = 0.0, den = 0.0;
    if (!(kept > 0.0))
        return 1.0;
    for (int d = 0; d < D; d++) {
        double x = oe ? oe[d] : 0.0;
        double o = (a_full[d] + x) / total, os = (s->acc[d] + x) / kept;
        num += (os - o) * (os - o);
        den += o * o;
    }
    return den > 0 ? sqrt(num / den) : (num > 0 ? 1.0 : 0.0);
}

/* Fast path of merged_err for n_q consecutive queries (rows of q, p, lse, a_full; pe/oe per
 * query or NULL): the unchanged kept tokens' sums and the changed entries' weights and sums are
 * dense products over blocks of MB entries. wt > 0: the queries are window queries, wt per query
 * head, row i at position T - wt + i % wt, seeing the changed entries up to it; wt = 0:
 * decode queries, which see them all. *err_sum = sum of the n_q errors. */
#define MB 256
static kvt_status merged_errs_fast(const kvt_layer_ctx *c, int g, const kvt_merged_set *ms,
                                   const int32_t *cidx, int wt, const int32_t *unch, int n_unch,
                                   int n_q, const float *q, const float *p, const double *lse,
                                   const double *a_full, const double *pe, const double *oe,
                                   double *err_sum)
{
    const int T = c->T, D = c->D;
    const float *V = c->v + (size_t)g * T * D;
    size_t nq = (size_t)n_q;
    double *acc =
        kvt_malloc((nq * D + nq * 2 + nq * MB + (size_t)MB * D * 2 + nq * D) * sizeof(double));
    KVT_RETURN_IF(!acc, KVT_ERR_NOMEM, "replay: out of memory (merged error)");
    double *r = acc + nq * D, *rf = r + nq, *pg = rf + nq, *vg = pg + nq * MB;
    double *kg = vg + (size_t)MB * D, *qd = kg + (size_t)MB * D;
    for (size_t i = 0; i < nq; i++) {
        const float *pq = p + i * T;
        double sum = 0.0;
        for (int j = 0; j < T; j++)
            sum += pq[j];
        rf[i] = sum;
        r[i] = 0.0;
    }
    memset(acc, 0, nq * D * sizeof(double));
    for (size_t i = 0; i < nq * D; i++)
        qd[i] = q[i];
    /* the unchanged kept tokens (summed, not the full sums less the dropped: merged_err) */
    for (int b0 = 0; b0 < n_unch; b0 += MB) {
        int nb = n_unch - b0 < MB ? n_unch - b0 : MB;
        for (int u = 0; u < nb; u++)
            for (int d = 0; d < D; d++)
                vg[(size_t)u * D + d] = V[(size_t)unch[b0 + u] * D + d];
        for (size_t i = 0; i < nq; i++) {
            double sum = 0.0;
            for (int u = 0; u < nb; u++) {
                double pj = p[i * T + unch[b0 + u]];
                pg[i * nb + u] = pj;
                sum += pj;
            }
            r[i] += sum;
        }
        kvt_gemm_f64(false, n_q, D, nb, 1.0, pg, nb, vg, D, 1.0, acc, D);
    }
    /* plus the changed entries: w = exp(q.k' * scale - lse) */
    for (int b0 = 0; b0 < ms->n_changed; b0 += MB) {
        int nb = ms->n_changed - b0 < MB ? ms->n_changed - b0 : MB;
        for (size_t i = 0; i < (size_t)nb * D; i++) {
            kg[i] = ms->k[(size_t)b0 * D + i];
            vg[i] = ms->v ? ms->v[(size_t)b0 * D + i]
                          : V[(size_t)cidx[b0 + (int)(i / (size_t)D)] * D + i % (size_t)D];
        }
        kvt_gemm_f64(true, n_q, nb, D, c->scale, qd, D, kg, D, 0.0, pg, nb);
        for (size_t i = 0; i < nq; i++) {
            double sum = 0.0;
            const int pos = wt > 0 ? T - wt + (int)(i % (size_t)wt) : T;
            for (int u = 0; u < nb; u++) {
                double w = cidx[b0 + u] > pos ? 0.0 : exp(pg[i * nb + u] - lse[i]);
                pg[i * nb + u] = w;
                sum += w;
            }
            r[i] += sum;
        }
        kvt_gemm_f64(false, n_q, D, nb, 1.0, pg, nb, vg, D, 1.0, acc, D);
    }
    double tot = 0.0;
    for (size_t i = 0; i < nq; i++) {
        double x = pe ? pe[i] : 0.0, kept = r[i] + x, total = rf[i] + x, num = 0.0, den = 0.0;
        if (!(kept > 0.0)) {
            tot += 1.0;
            continue;
        }
        for (int d = 0; d < D; d++) {
            double y = oe ? oe[i * D + d] : 0.0;
            double o = (a_full[i * D + d] + y) / total, os = (acc[i * D + d] + y) / kept;
            num += (os - o) * (os - o);
            den += o * o;
        }
        tot += den > 0 ? sqrt(num / den) : (num > 0 ? 1.0 : 0.0);
    }
    kvt_free(acc);
    *err_sum = tot;
    return KVT_OK;
}
#undef MB

/* The fast path of a merged set's coverage: the cosines of m entries' unit keys ek [m, D] with the
 * first ne probes' pk [ne, D] as one product (cs [m, ne]), each rounded to f32 as the plain loop
 * rounds its sums, into every probe's best so far. */
#define COV_ROWS 128
static void cov_block(const double *ek, int m, const double *pk, int ne, int D, double *cs,
                      float *bestv)
{
    if (ne <= 0)
        return;
    kvt_gemm_f64(true, m, ne, D, 1.0, ek, D, pk, D, 0.0, cs, ne);
    for (int r = 0; r < m; r++)
        for (int i = 0; i < ne; i++) {
            float xf = (float)cs[(size_t)r * ne + i];
            bestv[i] = xf > bestv[i] ? xf : bestv[i];
        }
}

static kvt_status measure_merged(const kvt_layer_ctx *c, scratch *s, const kvt_layer_selection *sel,
                                 int h, const kvt_layer_selection *orc, kvt_head_metrics *m,
                                 size_t mstride)
{
    const int T = c->T, D = c->D, H = sel->n_heads, Wt = c->Wt, Gd = c->Gd;
    const int g = kvt_ctx_kv_of(c, sel->per_query, h);
    const int hq0 = sel->per_query ? h : g * c->Gs, nh = sel->per_query ? 1 : c->Gs;
    const uint8_t *mod = c->in->modality;
    s->cur_g = g;
    int max_chg = 0;
    for (int b = 0; b < s->n_b; b++)
        if (sel->merged[(size_t)b * H + h].n_changed > max_chg)
            max_chg = sel->merged[(size_t)b * H + h].n_changed;
    float *cu = kvt_malloc(((size_t)max_chg * D + 1) * sizeof(float));   /* unit changed keys */
    int32_t *cidx = kvt_malloc(((size_t)max_chg + 1) * sizeof(int32_t)); /* their tokens */
    /* the fast path's coverage: the probes' unit keys and blocks of entries' in double, and
       their cosines */
    const bool dense = !kvt_kernels_ref_only() && s->n_probe > 0;
    const size_t npk = dense ? (size_t)s->n_probe : 0;
    double *pk =
        dense
            ? kvt_malloc((npk * D + (size_t)COV_ROWS * D + (size_t)COV_ROWS * npk) * sizeof(double))
            : NULL;
    if (!cu || !cidx || (dense && !pk)) {
        kvt_free(cu);
        kvt_free(cidx);
        kvt_free(pk);
        return kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory (merged keys)");
    }
    double *ek = pk ? pk + npk * D : NULL, *cs = pk ? ek + (size_t)COV_ROWS * D : NULL;
    for (size_t i = 0; i < npk; i++)
        for (int d = 0; d < D; d++)
            pk[i * D + d] = c->ku[((size_t)g * T + s->probe[i]) * D + d];
    if (orc)
        for (int t = 0; t < T; t++)
            s->posO[orc->order[(size_t)h * T + t]] = t;
    for (int b = 0; b < s->n_b; b++) {
        const kvt_merged_set *ms = &sel->merged[(size_t)b * H + h];
        kvt_head_metrics *hm = m + (size_t)b * mstride;
        set_nan(hm);
        hm->n_keep = ms->n - ms->n_changed * sel->pruned_share;
        /* unch = the original tokens kept unchanged, ascending (posO-free scratch: s->cuts is
         * too small, use the z buffer's memory as int32) */
        int32_t *unch = (int32_t *)s->z, n_unch = 0;
        uint8_t *keep = s->keep; /* 1 for those, for coverage_dropped below */
        memset(keep, 0, (size_t)T);
        for (int e = 0; e < ms->n; e++)
            if (!ms->changed[e])
                keep[ms->idx[e]] = 1, unch[n_unch++] = ms->idx[e];
        for (int e2 = 0, ce = 0; e2 < ms->n; e2++)
            if (ms->changed[e2])
                cidx[ce++] = ms->idx[e2];
        double e = 0.0;
        kvt_status st = KVT_OK;
        if (!kvt_kernels_ref_only()) {
            size_t q0 = (size_t)hq0 * Wt;
            st = merged_errs_fast(c, g, ms, cidx, Wt, unch, n_unch, nh * Wt,
                                  c->in->q_window + q0 * D, c->prw + q0 * T, c->lsew + q0,
                                  c->aw + q0 * D, NULL, NULL, &e);
        } else
            for (int u = 0; u < nh; u++)
                for (int i = 0; i < Wt; i++) {
                    size_t qi = (size_t)(hq0 + u) * Wt + i;
                    e += merged_err(c, s, ms, cidx, T - Wt + i, unch, n_unch,
                                    c->in->q_window + qi * D, c->prw + qi * T, c->lsew[qi],
                                    c->aw + qi * D, 0.0, NULL);
                }
        hm->err_window = e / (nh * Wt);
        if (Gd > 0 && !st) {
            e = 0.0;
            if (!kvt_kernels_ref_only()) {
                size_t q0 = (size_t)hq0 * Gd;
                st =
                    merged_errs_fast(c, g, ms, cidx, 0, unch, n_unch, nh * Gd,
                                     c->in->q_decode + q0 * D, kvt_ctx_prd_row(c, q0), c->lsed + q0,
                                     c->ad + q0 * D, c->has_extra ? c->pd_extra + q0 : NULL,
                                     c->has_extra ? c->od_extra + q0 * D : NULL, &e);
            } else
                for (int u = 0; u < nh; u++)
                    for (int i = 0; i < Gd; i++) {
                        size_t qi = (size_t)(hq0 + u) * Gd + i;
                        e += merged_err(c, s, ms, cidx, T, unch, n_unch, c->in->q_decode + qi * D,
                                        kvt_ctx_prd_row(c, qi), c->lsed[qi], c->ad + qi * D,
                                        c->has_extra ? c->pd_extra[qi] : 0.0,
                                        c->has_extra ? c->od_extra + qi * D : NULL);
                    }
            hm->err_decode = e / (nh * Gd);
        }
        if (st) {
            kvt_free(cu);
            kvt_free(cidx);
            kvt_free(pk);
            return st;
        }
        /* unit merged keys, their redundancy, coverage of the probes (unchanged entries from
         * the cosine table, changed ones directly) */
        double *mean = s->rwork, *u = s->acc;
        int nk[KVT_NM] = {0}; /* entries of each modality (the token each stands at) */
        for (int d = 0; d < D; d++)
            mean[d] = 0.0;
        if (s->msum)
            memset(s->msum, 0, (size_t)KVT_NM * D * sizeof(double));
        for (int e2 = 0, ce = 0; e2 < ms->n; e2++) {
            const float *row =
                ms->changed[e2] ? ms->k + (size_t)ce * D : c->k + ((size_t)g * T + ms->idx[e2]) * D;
            kvt_unit_rows_ref(row, 1, D, ms->changed[e2] ? cu + (size_t)ce * D : NULL, u);
            ce += ms->changed[e2] != 0;
            for (int d = 0; d < D; d++)
                mean[d] += u[d];
            if (s->msum) {
                const int k = mod[ms->idx[e2]] % KVT_NM;
                nk[k]++;
                for (int d = 0; d < D; d++)
                    s->msum[(size_t)k * D + d] += u[d];
            }
        }
        if (ms->n > 0)
            for (int d = 0; d < D; d++)
                mean[d] /= ms->n;
        hm->r_kept = kvt_redundancy_ref(mean, D, ms->n);
        for (int k = 0; k < KVT_NM && mod; k++) /* one modality: its r is the whole set's */
            hm->r_kept_mod[k] = !s->mod_count[k] ? NAN
                                : s->msum ? kvt_redundancy_of_sum(s->msum + (size_t)k * D, D, nk[k])
                                          : hm->r_kept;
        if (s->n_probe > 0 && ms->n > 0) {
            double sum = 0.0, rad = -INFINITY, sm[KVT_NM] = {0}, sd = 0.0;
            int cm[KVT_NM] = {0}, nd = 0;
            /* best cosine of each probe: entries outer so that the table is read by rows. With
               the GPU the cosine table stays on the device: unchanged keys like changed ones */
            float *bestv = s->cwork;
            const int np = s->n_probe, ne = probes_in_prefix(s, T, sel->window);
            for (int i = 0; i < ne; i++)
                bestv[i] = -INFINITY;
            int nrow = 0; /* entries in ek waiting for their product (fast path) */
            for (int e2 = 0, ce = 0; e2 < ms->n; e2++) {
                if (!ms->changed[e2] && s->ct) {
                    const float *row = s->ct + (size_t)ms->idx[e2] * np;
                    for (int i = 0; i < ne; i++)
                        bestv[i] = row[i] > bestv[i] ? row[i] : bestv[i];
                    continue;
                }
                const float *ke = ms->changed[e2] ? cu + (size_t)ce++ * D
                                                  : c->ku + ((size_t)g * T + ms->idx[e2]) * D;
                if (dense) { /* a block of entries by the probes, as one product */
                    for (int d = 0; d < D; d++)
                        ek[(size_t)nrow * D + d] = ke[d];
                    if (++nrow == COV_ROWS) {
                        cov_block(ek, nrow, pk, ne, D, cs, bestv);
                        nrow = 0;
                    }
                    continue;
                }
                for (int i = 0; i < ne; i++) {
                    const float *kp = c->ku + ((size_t)g * T + s->probe[i]) * D;
                    double x = 0.0;
                    for (int d = 0; d < D; d++)
                        x += (double)kp[d] * ke[d];
                    float xf = (float)x;
                    bestv[i] = xf > bestv[i] ? xf : bestv[i];
                }
            }
            if (nrow > 0)
                cov_block(ek, nrow, pk, ne, D, cs, bestv);
            for (int i = 0; i < ne; i++) {
                double best = bestv[i];
                sum += best;
                rad = 1.0 - best > rad ? 1.0 - best : rad;
                sm[s->probe_mod[i]] += best;
                cm[s->probe_mod[i]]++;
                if (!keep[s->probe[i]]) { /* its own key is not in the cache */
                    sd += best;
                    nd++;
                }
            }
            hm->coverage = ne ? sum / ne : NAN;
            hm->coverage_radius = ne ? rad : NAN;
            hm->coverage_dropped = nd ? sd / nd : NAN;
            for (int k = 0; k < KVT_NM; k++)
                hm->coverage_mod[k] = mod && cm[k] ? sm[k] / cm[k] : NAN;
        }
        if (mod) {
            for (int k = 0; k < KVT_NM; k++)
                hm->n_keep_mod[k] = 0.0;
            for (int e2 = 0; e2 < ms->n; e2++)
                hm->n_keep_mod[mod[ms->idx[e2]] % KVT_NM] +=
                    ms->changed[e2] ? 1.0 - sel->pruned_share : 1.0;
        }
        if (orc) {
            int no = orc->count[(size_t)b * H + h], hit = 0;
            for (int e2 = 0; e2 < ms->n; e2++)
                hit += s->posO[ms->idx[e2]] < no;
            hm->oracle_overlap = no > 0 ? (double)hit / no : NAN;
        }
    }
    kvt_free(cu);
    kvt_free(cidx);
    kvt_free(pk);
    return KVT_OK;
}

/* measure_head of a selection with a ranking per budget (border): each budget measured alone,
 * as a one-budget selection of its own ranking (the oracle's counts of that budget too) */
static kvt_status measure_per_budget(const kvt_layer_ctx *c, scratch *s,
                                     const kvt_layer_selection *sel, int h,
                                     const kvt_layer_selection *orc, kvt_head_metrics *m,
                                     size_t mstride)
{
    const int n_b = s->n_b, H = sel->n_heads;
    kvt_status st = KVT_OK;
    for (int b = 0; b < n_b && !st; b++) {
        kvt_layer_selection one = *sel, oone;
        one.border = NULL;
        one.order = sel->border + (size_t)b * H * sel->T;
        one.count = sel->count + (size_t)b * H;
        one.n_budgets = 1;
        if (orc) {
            oone = *orc;
            oone.count = orc->count + (size_t)b * H;
            oone.n_budgets = 1;
        }
        const kvt_layer_selection *ms = &one;
        kvt_head_metrics *mb = m + (size_t)b * mstride;
        s->n_b = 1;
        st = measure_head(c, s, &ms, 1, h, orc ? &oone : NULL, &mb, mstride);
        s->n_b = n_b;
    }
    return st;
}

/* head h of sel can share its sweeps with another selection of the same ranking and window
 * (coverage is over the window's prefix): one fixed ranking for every budget, no per-step
 * rankings or decode-time caches, not merged */
static bool shareable(const kvt_layer_selection *sel, int h)
{
    return !sel->merged && !sel->border && !sel->dec && sel->has_fixed &&
           !(sel->step_head && sel->step_head[h]);
}

static kvt_status run_select(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    memset(sel, 0, sizeof(*sel));
    /* layer_weights=: the policy selects at this layer's own budgets (layer_weights.c) */
    int *Bl = NULL;
    double *fl = NULL;
    const double *frac = c->budget_frac;
    if (p->lw.w) {
        KVT_RETURN_IF(p->lw.n != c->n_layers || c->layer < 0 || c->layer >= c->n_layers,
                      KVT_ERR_INVALID_ARG,
                      "%s: layer_weights=%s has %d weights; the trace has %d layers (one weight "
                      "per layer)",
                      p->def->name, p->o.layer_weights, p->lw.n, c->n_layers);
        Bl = kvt_malloc((size_t)(n_b > 0 ? n_b : 1) * sizeof(int));
        fl = frac ? kvt_malloc((size_t)(n_b > 0 ? n_b : 1) * sizeof(double)) : NULL;
        if (!Bl || (frac && !fl)) {
            kvt_free(Bl);
            kvt_free(fl);
            return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        }
        kvt_layer_budgets(&p->lw, c->layer, B, frac, n_b, Bl, fl);
        B = Bl;
        c->budget_frac = fl;
    }
    /* the short-prompt rule (POLICIES §0.1.8): a prompt shorter than every budget is kept
       whole, whatever the policy, which reads nothing of it (its window may be longer than
       the prompt) */
    bool short_prompt = n_b > 0 && !p->o.greedy_decode; /* (decode tokens fill its cache) */
    for (int b = 0; b < n_b; b++)
        short_prompt = short_prompt && B[b] > c->T;
    const kvt_policy_def *def = short_prompt ? &kvt_policy_def_full : p->def;
    uint64_t t0 = kvt_now_ns();
    /* chunk_scores=own|kvpress: each chunk ranked on its own (chunk_length.c) */
    const bool own = p->o.chunk_scores && !short_prompt;
    c->selecting = def; /* kvt_ctx_fetch holds it to its host reads */
    c->selecting_reads = short_prompt ? def->host_reads : kvt_policy_host_reads(p);
    kvt_status st = own ? kvt_sel_chunk_own(c, p, B, n_b, sel) : def->select(c, p, B, n_b, sel);
    c->selecting = NULL;
    sel->gpu = NULL; /* only while selecting */
    /* chunk_length=: the budget shared over the prompt's chunks (chunk_length.c), at this
       layer's budgets; not for a prompt kept whole */
    if (!st && p->o.chunk_length > 0 && !short_prompt)
        st = kvt_sel_chunk(c, p->def->name, p->o.chunk_length, B, c->budget_frac, n_b, sel);
    /* decoding= or dms_decoding=1: the caches through the decode steps (decoding.c) */
    if (!st && (p->o.decoding > 0 || p->o.dms_decoding))
        st = kvt_sel_decoding(c, p, B, n_b, sel);
    c->budget_frac = frac;
    kvt_free(Bl);
    kvt_free(fl);
    KVT_PROF_ADD(c->prof, select_ns, kvt_now_ns() - t0);
    if (st) {
        kvt_sel_clear(sel);
        return st;
    }
    /* sanity: counts within 0..T */
    if (sel->count)
        for (int i = 0; i < n_b * sel->n_heads; i++)
            if (sel->count[i] < 0 || sel->count[i] > c->T) {
                kvt_sel_clear(sel);
                return kvt_error_set(KVT_ERR_STATE, "%s: internal error: count %d outside 0..%d",
                                     p->def->name, sel->count[i], c->T);
            }
    if (sel->border && n_b > 0) /* the shared ranking (no metric reads it): the last budget's */
        memcpy(sel->order, sel->border + (size_t)(n_b - 1) * sel->n_heads * sel->T,
               (size_t)sel->n_heads * sel->T * sizeof(int32_t));
    /* the kept sets become merged ones: merge= (merge.c; unless the policy made its own, as
       elastic-cache's), or think= with its kept keys' channels pruned (think.c); a policy
       takes one or the other (kvt_policy_create) */
    const bool merge = p->o.merge && !sel->merged, think = p->o.think > 0;
    if (merge || think) {
        t0 = kvt_now_ns();
        st = merge ? kvt_sel_merge(c, p->o.merge, sel) : kvt_sel_think(c, &p->o, sel);
        KVT_PROF_ADD(c->prof, select_ns, kvt_now_ns() - t0);
        if (st) {
            kvt_sel_clear(sel);
            return kvt_error_set(st, "%s: %s", p->def->name, kvt_error_msg());
        }
    }
    return KVT_OK;
}

kvt_status kvt_replay_layer_select(const kvt_layer_input *in, const kvt_policy *p,
                                   const int *budget_tokens, size_t n_budgets,
                                   kvt_layer_selection **out)
{
    *out = NULL;
    KVT_RETURN_IF(n_budgets < 1 || n_budgets > 100000, KVT_ERR_INVALID_ARG, "bad budget count");
    for (size_t b = 0; b < n_budgets; b++)
        KVT_RETURN_IF(budget_tokens[b] < 1, KVT_ERR_INVALID_ARG, "budget %d < 1", budget_tokens[b]);
    kvt_layer_ctx c;
    KVT_FORWARD(kvt_ctx_build(in, &c));
    kvt_layer_selection *sel = kvt_calloc(1, sizeof(*sel));
    kvt_status st = sel ? run_select(&c, p, budget_tokens, (int)n_budgets, sel)
                        : kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    kvt_ctx_free(&c);
    if (st) {
        kvt_free(sel);
        return st;
    }
    *out = sel;
    return KVT_OK;
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The kept sets gathered for one sink call, each as an exp_rec: its record with the offsets of
 * its indices in pool and of its merged values in vpool, made pointers when the call is made
 * (the pools move as they grow). */
typedef struct exp_rec {
    kvt_selection_rec r;
    size_t at, vat; /* vat SIZE_MAX: r.v is the selection's own */
} exp_rec;

typedef struct exp_chunk {
    exp_rec *er;
    kvt_selection_rec *recs; /* [n] for the call */
    size_t n, cap_er, cap_recs;
    int32_t *pool;
    size_t n_idx, cap_idx;
    float *vpool;
    size_t n_val, cap_val;
} exp_chunk;

/* Room for `need` elements of `elem` bytes in *p (capacity *cap) */
static bool exp_room(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return true;
    size_t n = *cap ? *cap : 1024;
    while (n < need)
        n *= 2;
    void *g = kvt_realloc(*p, n * elem);
    if (!g)
        return false;
    *p = g;
    *cap = n;
    return true;
}

/* Append head h's sets of policy p at decode step x (-1: the prompt-time set), every budget's,
 * ascending */
static bool exp_step(exp_chunk *ch, const kvt_layer_ctx *c, const kvt_layer_selection *s, size_t p,
                     int n_b, int h, int x)
{
    for (int b = 0; b < n_b; b++) {
        const size_t bh = (size_t)b * s->n_heads + (size_t)h;
        const int32_t *src = NULL;
        size_t n = 0;
        const kvt_merged_set *m = NULL;
        if (x >= 0 && s->dec) /* decode-time caches: step x's cache, prompt and decode tokens */
            n = (size_t)c->T + (size_t)x + 1; /* at most */
        else if (x < 0 && s->merged) {        /* idx ascending: its entries stay in order */
            m = &s->merged[bh];
            src = m->idx, n = (size_t)m->n;
        } else if (x < 0 && s->has_fixed) {
            src = kvt_sel_ranking(s, b, h);
            n = (size_t)s->count[bh];
        } else if (x >= 0 && s->step_head && s->step_head[h]) {
            src = s->step_order + ((size_t)h * s->n_steps + x) * c->T;
            n = (size_t)s->step_count[bh * s->n_steps + x];
        } else
            continue;
        const size_t n_val = m && !m->v ? (size_t)m->n_changed * c->D : 0;
        if (!exp_room((void **)&ch->er, &ch->cap_er, ch->n + 1, sizeof(exp_rec)) ||
            !exp_room((void **)&ch->pool, &ch->cap_idx, ch->n_idx + n, sizeof(int32_t)) ||
            !exp_room((void **)&ch->vpool, &ch->cap_val, ch->n_val + n_val, sizeof(float)))
            return false;
        int32_t *dst = ch->pool + ch->n_idx;
        if (!src) /* (ascending) */
            n = (size_t)kvt_dec_visible(s, b, h, x, dst);
        else if (n) {
            memcpy(dst, src, n * sizeof(int32_t));
            qsort(dst, n, sizeof(int32_t), cmp_i32);
        }
        exp_rec *e = &ch->er[ch->n++];
        e->r = (kvt_selection_rec){.policy = (int)p,
                                   .budget = b,
                                   .layer = c->layer,
                                   .head = h,
                                   .step = x,
                                   .n = n,
                                   .changed = m ? m->changed : NULL,
                                   .k = m ? m->k : NULL,
                                   .v = m ? m->v : NULL};
        e->at = ch->n_idx;
        e->vat = SIZE_MAX;
        ch->n_idx += n;
        if (m && !m->v) { /* the changed entries keep their tokens' values */
            const float *V = c->v + (size_t)kvt_ctx_kv_of(c, s->per_query, h) * c->T * c->D;
            float *vd = ch->vpool + ch->n_val;
            for (int i = 0, ci = 0; i < m->n; i++)
                if (m->changed[i])
                    memcpy(vd + (size_t)ci++ * c->D, V + (size_t)m->idx[i] * c->D,
                           (size_t)c->D * sizeof(float));
            e->vat = ch->n_val;
            ch->n_val += n_val;
        }
    }
    return true;
}

/* Hand the gathered sets to the sink (last: the layer's last call) and start over */
static kvt_status exp_flush(exp_chunk *ch, const kvt_layer_ctx *c, const kvt_replay_opts *o,
                            bool last)
{
    if (!exp_room((void **)&ch->recs, &ch->cap_recs, ch->n + 1, sizeof(kvt_selection_rec)))
        return kvt_error_set(KVT_ERR_NOMEM, "selection export: out of memory");
    for (size_t i = 0; i < ch->n; i++) {
        ch->recs[i] = ch->er[i].r;
        ch->recs[i].idx = ch->pool + ch->er[i].at;
        if (ch->er[i].vat != SIZE_MAX)
            ch->recs[i].v = ch->vpool + ch->er[i].vat;
    }
    kvt_status st = o->sink(o->sink_user, c->layer, ch->recs, ch->n, last);
    ch->n = ch->n_idx = ch->n_val = 0;
    return st;
}

/* Hand every kept set of the layer to the sink, sorted ascending, in calls of about `chunk`
 * indices, records and merged values (KVT_SELECTION_CHUNK; tests: KVT_TEST_EXPORT_CHUNK): a
 * policy's heads in turn, each head's steps in order (its prompt-time set with its step 0),
 * each step's budgets together (kvt_selection_sink). */
static kvt_status export_layer(const kvt_layer_ctx *c, kvt_layer_selection *sels, size_t n_pol,
                               int n_b, const kvt_replay_opts *o)
{
    size_t chunk = KVT_SELECTION_CHUNK;
    const char *e = getenv("KVT_TEST_EXPORT_CHUNK");
    if (e && atoll(e) > 0)
        chunk = (size_t)atoll(e);
    exp_chunk ch = {0};
    kvt_status st = exp_room((void **)&ch.pool, &ch.cap_idx, 1, sizeof(int32_t)) &&
                            exp_room((void **)&ch.vpool, &ch.cap_val, 1, sizeof(float))
                        ? KVT_OK
                        : kvt_error_set(KVT_ERR_NOMEM, "selection export: out of memory");
    for (size_t p = 0; p < n_pol && !st; p++) {
        const kvt_layer_selection *s = &sels[p];
        const int n_x = s->dec ? s->dec_steps : s->n_steps;
        for (int h = 0; h < s->n_heads && !st; h++)
            for (int x = -1; x < n_x && !st; x++) {
                if (x != 0 && ch.n && ch.n_idx + ch.n + ch.n_val >= chunk)
                    st = exp_flush(&ch, c, o, false);
                if (!st && !exp_step(&ch, c, s, p, n_b, h, x))
                    st = kvt_error_set(KVT_ERR_NOMEM, "selection export: out of memory");
            }
    }
    if (!st)
        st = exp_flush(&ch, c, o, true);
    kvt_free(ch.er);
    kvt_free(ch.recs);
    kvt_free(ch.pool);
    kvt_free(ch.vpool);
    return st;
}

/* the kept set of head h at budget b and decode step x (-1: the prompt-time set; a head that
 * does not re-select uses it at every step) */
static const int32_t *kept_set(const kvt_layer_selection *sel, int b, int h, int x, int *n)
{
    const size_t bh = (size_t)b * sel->n_heads + (size_t)h;
    if (sel->merged) {
        *n = sel->merged[bh].n;
        return sel->merged[bh].idx;
    }
    if (x >= 0 && sel->step_head && sel->step_head[h]) {
        *n = sel->step_count[bh * sel->n_steps + (size_t)x];
        return sel->step_order + ((size_t)h * sel->n_steps + (size_t)x) * sel->T;
    }
    *n = sel->count[bh];
    return kvt_sel_ranking(sel, b, h);
}

/* head_overlap (RESULTS.md) of every head and budget of one policy: the mean over the layer's
 * other heads of the Jaccard index of the two kept sets; with per-step heads, of the sets of
 * each decode step, averaged over the steps. m: the policy's metrics, [b * stride + h]. */
static kvt_status head_overlaps(const kvt_layer_selection *sel, int n_b, kvt_head_metrics *m,
                                size_t stride)
{
    const int H = sel->n_heads;
    if (H < 2)
        return KVT_OK; /* no other head: stays null */
    bool per_step = false;
    for (int h = 0; h < H && sel->step_head; h++)
        per_step |= sel->step_head[h] != 0;
    const int n_x = per_step && sel->n_steps > 0 ? sel->n_steps : 1;
    const size_t words = ((size_t)sel->T + 63) / 64;
    uint64_t *bits = kvt_calloc((size_t)H * words, sizeof(uint64_t));
    int *card = kvt_malloc((size_t)H * sizeof(int));
    double *acc = kvt_malloc((size_t)H * sizeof(double));
    if (!bits || !card || !acc) {
        kvt_free(bits);
        kvt_free(card);
        kvt_free(acc);
        return kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory (head overlap)");
    }
    for (int b = 0; b < n_b; b++) {
        for (int h = 0; h < H; h++)
            acc[h] = 0.0;
        for (int x = 0; x < n_x; x++) {
            memset(bits, 0, (size_t)H * words * sizeof(uint64_t));
            for (int h = 0; h < H; h++) {
                int n;
                const int32_t *set = kept_set(sel, b, h, per_step ? x : -1, &n);
                uint64_t *w = bits + (size_t)h * words;
                for (int i = 0; i < n; i++)
                    w[set[i] >> 6] |= 1ull << (set[i] & 63);
                card[h] = n;
            }
            for (int h = 0; h < H; h++)
                for (int h2 = h + 1; h2 < H; h2++) {
                    const uint64_t *u = bits + (size_t)h * words, *v = bits + (size_t)h2 * words;
                    long inter = 0;
                    for (size_t i = 0; i < words; i++)
                        inter += __builtin_popcountll(u[i] & v[i]);
                    long uni = (long)card[h] + card[h2] - inter;
                    double j = uni > 0 ? (double)inter / (double)uni : NAN;
                    acc[h] += j;
                    acc[h2] += j;
                }
        }
        for (int h = 0; h < H; h++)
            m[(size_t)b * stride + (size_t)h].head_overlap = acc[h] / ((double)(H - 1) * n_x);
    }
    kvt_free(bits);
    kvt_free(card);
    kvt_free(acc);
    return KVT_OK;
}

/* r_all_mod [Hkv, NM]: the redundancy of each modality's keys, all T of them (as r_all); NaN
 * without a modality table. With one modality its r is r_all; else a sweep of the prompt's
 * order filtered to the modality, with one cut at its count (mod_cuts). */
static kvt_status r_all_by_mod(const kvt_layer_ctx *c, scratch *s, double *r_all_mod)
{
    for (int g = 0; g < c->Hkv; g++)
        for (int k = 0; k < KVT_NM; k++) {
            double *r = &r_all_mod[(size_t)g * KVT_NM + k];
            *r = NAN;
            if (c->in->modality && s->n_mods < 2 && s->mod_count[k] > 0)
                *r = c->r_all[g];
        }
    if (s->n_mods < 2)
        return KVT_OK;
    for (int t = 0; t < c->T; t++) /* the prompt's order */
        s->posT[t] = t;
    const int32_t all = c->T;
    for (int g = 0; g < c->Hkv; g++)
        for (int k = 0; k < KVT_NM; k++) {
            if (!s->mod_count[k])
                continue;
            const int n = mod_cuts(c, s, s->posT, &all, 1, k);
            KVT_FORWARD(mod_sweep(c, s, g, k, n)); /* not deferred: waited for */
            if (n)
                r_all_mod[(size_t)g * KVT_NM + k] = s->mrk[(size_t)k * s->n_v];
        }
    return KVT_OK;
}

kvt_status kvt_replay_layer_metrics(const kvt_layer_input *in, kvt_policy *const *pols,
                                    size_t n_pol, const int *budget_tokens, size_t n_budgets,
                                    const kvt_replay_opts *o, kvt_head_metrics *out)
{
    return kvt_replay_layer_metrics_frac(in, pols, n_pol, budget_tokens, NULL, n_budgets, o, out,
                                         NULL, NULL);
}

kvt_status kvt_replay_layer_metrics_frac(const kvt_layer_input *in, kvt_policy *const *pols,
                                         size_t n_pol, const int *budget_tokens,
                                         const double *budget_frac, size_t n_budgets,
                                         const kvt_replay_opts *o, kvt_head_metrics *out,
                                         double *r_all, double *r_all_mod)
{
    kvt_replay_opts def = {0};
    def.coverage_probes = -1;
    if (!o)
        o = &def;
    KVT_RETURN_IF(n_budgets < 1 || n_budgets > 4096 || n_pol < 1, KVT_ERR_INVALID_ARG,
                  "replay: need at least one policy and 1..4096 budgets");
    for (size_t b = 0; b < n_budgets; b++)
        KVT_RETURN_IF(budget_tokens[b] < 1, KVT_ERR_INVALID_ARG, "budget %d < 1", budget_tokens[b]);
    const int n_b = (int)n_budgets;
    kvt_layer_ctx c;
    KVT_RETURN_IF(o->device == KVT_DEVICE_AUTO, KVT_ERR_INVALID_ARG,
                  "replay: resolve --device auto first (kvt_replay_resolve_device)");
    uint64_t t_ctx = kvt_now_ns();
    KVT_FORWARD(
        kvt_ctx_build_on(in, &c, o->device == KVT_DEVICE_CUDA, o->decode_probs, o->profile));
    c.budget_frac = budget_frac;
    uint64_t t_measure = kvt_now_ns();
    KVT_PROF_ADD(o->profile, context_ns, t_measure - t_ctx - c.read_ns);
    KVT_PROF_ADD(o->profile, read_ns, c.read_ns); /* K and V streamed to the GPU */
    kvt_status st = KVT_OK;
    scratch s = {0};
    kvt_layer_selection orc[2];
    const kvt_layer_selection *orcp[2] = {NULL, NULL}; /* orc[i] or the run's own oracle */
    memset(orc, 0, sizeof(orc));
    kvt_layer_selection *sels = kvt_calloc(n_pol, sizeof(*sels));
    kvt_policy *oracle_pol[2] = {NULL, NULL};
    /* [n_pol] the oracle at the budgets of a policy with layer_weights= (else unused), and
       each policy's oracle: orcp[] or orc_lw[p] */
    kvt_layer_selection *orc_lw = NULL;
    const kvt_layer_selection **orc_of = NULL;
    const kvt_layer_selection **grp_sel = NULL;
    kvt_head_metrics **grp_m = NULL;
    uint8_t *done = NULL;
    if (!sels) {
        st = kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory");
        goto out_free;
    }
    int n_probe = o->coverage_probes < 0 ? KVT_DEFAULT_COVERAGE_PROBES : o->coverage_probes;
    if (n_probe > c.T)
        n_probe = c.T;
    if ((st = scratch_init(&s, &c, n_b, (int)n_pol, n_probe)))
        goto out_free;
    grp_sel = kvt_malloc(n_pol * sizeof(*grp_sel));
    grp_m = kvt_malloc(n_pol * sizeof(*grp_m));
    done = kvt_malloc(n_pol * (size_t)c.Gs + 1);
    orc_lw = kvt_calloc(n_pol, sizeof(*orc_lw));
    orc_of = kvt_calloc(n_pol, sizeof(*orc_of));
    if (!grp_sel || !grp_m || !done || !orc_lw || !orc_of) {
        st = kvt_error_set(KVT_ERR_NOMEM, "replay: out of memory");
        goto out_free;
    }
    for (size_t p = 0; p < n_pol; p++)
        if ((st = run_select(&c, pols[p], budget_tokens, n_b, &sels[p]))) {
            char msg[400];
            snprintf(msg, sizeof(msg), "%s", kvt_error_msg());   /* the buffer is reused */
            const char *nm = kvt_policy_name(pols[p]), *m = msg; /* "snapkv: " once */
            if (!strncmp(m, nm, strlen(nm)) && m[strlen(nm)] == ':' && m[strlen(nm) + 1] == ' ')
                m += strlen(nm) + 2;
            kvt_error_set(st, "policy %s: %s", kvt_policy_label(pols[p]), m);
            goto out_free;
        }
    /* the oracle's sets (same granularity) for the overlap metric */
    if (c.Gd > 0)
        for (int gq = 0; gq < 2; gq++) {
            bool need = false;
            for (size_t p = 0; p < n_pol; p++)
                need |= sels[p].per_query == gq;
            if (!need)
                continue;
            kvt_policy_globals g = {.per_query_head = gq == 1};
            if ((st = kvt_policy_create("oracle", &g, &oracle_pol[gq])))
                goto out_free;
            /* the run's own oracle at the same settings (window, granularity) is this one */
            for (size_t p = 0; p < n_pol && !orcp[gq]; p++)
                if (pols[p]->def == oracle_pol[gq]->def && !pols[p]->lw.w &&
                    pols[p]->o.window == oracle_pol[gq]->o.window && sels[p].per_query == gq)
                    orcp[gq] = &sels[p];
            if (!orcp[gq]) {
                if ((st = run_select(&c, oracle_pol[gq], budget_tokens, n_b, &orc[gq])))
                    goto out_free;
                orcp[gq] = &orc[gq];
            }
        }
    /* the oracle_overlap of a policy with layer_weights=: against the oracle at the same
       budgets of this layer */
    for (size_t p = 0; p < n_pol; p++) {
        orc_of[p] = orcp[sels[p].per_query];
        if (!orc_of[p] || !pols[p]->lw.w)
            continue;
        kvt_policy olw = *oracle_pol[sels[p].per_query];
        olw.lw = pols[p]->lw, olw.o.layer_weights = pols[p]->o.layer_weights;
        if ((st = run_select(&c, &olw, budget_tokens, n_b, &orc_lw[p])))
            goto out_free;
        orc_of[p] = &orc_lw[p];
    }
    for (size_t p = 0; p < n_pol; p++) /* the merged sets' metrics read the context on the host */
        if (sels[p].merged &&
            (st = kvt_ctx_fetch(&c, KVT_CTX_PRW | KVT_CTX_PRD | KVT_CTX_KU | KVT_CTX_KV)))
            goto out_free;
    for (size_t i = 0; i < n_pol * n_budgets * (size_t)c.Hq; i++) {
        double *d = (double *)&out[i];
        for (size_t k = 0; k < sizeof(out[0]) / sizeof(double); k++)
            d[k] = NAN;
    }
    for (int g = 0; g < c.Hkv; g++) {
        if (n_probe > 0 && c.gpu)
            st = kvt_ctx_gpu_cosines(c.gpu, g, s.probe, n_probe);
        else if (n_probe > 0)
            st = kvt_cosine_table(c.ku + (size_t)g * c.T * c.D, c.T, c.D, s.probe, n_probe, s.ct);
        if (st)
            goto out_free;
        memset(done, 0, n_pol * (size_t)c.Gs);
        if (c.Gd > 0 && (st = kvt_ctx_prd_group(&c, g)))
            goto out_free;
        if (s.pwt) /* this KV head's window probabilities token-major, for the sweeps (its
                      decode ones on their first sweep, where that pays: decode_t) */
            kvt_transpose_f32_cpu(c.prw + (size_t)g * c.Gs * c.Wt * c.T, c.Gs * c.Wt, c.T,
                                  (size_t)c.T, s.pwt, (size_t)c.Gs * c.Wt);
        s.pdt_want = s.pwt && c.Gd > 0 && decode_wanted(&c, sels, n_pol, n_b, g);
        for (size_t p = 0; p < n_pol; p++) {
            const kvt_layer_selection *sel = &sels[p];
            const kvt_layer_selection *oc = orc_of[p];
            int h0 = sel->per_query ? g * c.Gs : g, h1 = sel->per_query ? h0 + c.Gs : g + 1;
            for (int h = h0; h < h1; h++) {
                kvt_head_metrics *m = out + (p * n_budgets) * (size_t)c.Hq + (size_t)h;
                if (done[p * (size_t)c.Gs + (size_t)(h - h0)])
                    continue;
                if (sel->merged) {
                    if ((st = measure_merged(&c, &s, sel, h, oc, m, (size_t)c.Hq)))
                        goto out_free;
                    continue;
                }
                if (sel->border) {
                    if ((st = measure_per_budget(&c, &s, sel, h, oc, m, (size_t)c.Hq)))
                        goto out_free;
                    continue;
                }
                /* later policies that rank this head identically share its sweeps */
                int n_mem = 1;
                grp_sel[0] = sel, grp_m[0] = m;
                for (size_t p2 = p + 1; p2 < n_pol && shareable(sel, h); p2++)
                    if (sels[p2].per_query == sel->per_query && sels[p2].window == sel->window &&
                        orc_of[p2] == oc && shareable(&sels[p2], h) &&
                        memcmp(sels[p2].order + (size_t)h * c.T, sel->order + (size_t)h * c.T,
                               (size_t)c.T * sizeof(int32_t)) == 0) {
                        done[p2 * (size_t)c.Gs + (size_t)(h - h0)] = 1;
                        grp_sel[n_mem] = &sels[p2];
                        grp_m[n_mem++] = out + (p2 * n_budgets) * (size_t)c.Hq + (size_t)h;
                    }
                if ((st = measure_head(&c, &s, grp_sel, n_mem, h, oc, grp_m, (size_t)c.Hq)))
                    goto out_free;
            }
        }
    }
    for (int pq = 0; pq < 2; pq++) { /* decode-time caches' metrics, each granularity's at once */
        int n_dec = 0;
        for (size_t p = 0; p < n_pol; p++)
            if (sels[p].dec && (sels[p].per_query != 0) == pq) {
                grp_sel[n_dec] = &sels[p];
                grp_m[n_dec++] = out + (p * n_budgets) * (size_t)c.Hq;
            }
        if (n_dec && (st = kvt_dec_metrics(&c, grp_sel, grp_m, n_dec, (size_t)c.Hq)))
            goto out_free;
    }
    for (size_t p = 0; p < n_pol; p++)
        if ((st = head_overlaps(&sels[p], n_b, out + (p * n_budgets) * (size_t)c.Hq, (size_t)c.Hq)))
            goto out_free;
    if (o->sink)
        st = export_layer(&c, sels, n_pol, n_b, o);
    if (!st && r_all) /* the context's head redundancy, from its mean unit keys */
        memcpy(r_all, c.r_all, (size_t)c.Hkv * sizeof(double));
    if (!st && r_all_mod)
        st = r_all_by_mod(&c, &s, r_all_mod);
out_free:
    if (sels)
        for (size_t p = 0; p < n_pol; p++)
            kvt_sel_clear(&sels[p]);
    kvt_free(sels);
    if (orc_lw)
        for (size_t p = 0; p < n_pol; p++)
            kvt_sel_clear(&orc_lw[p]);
    kvt_free(orc_lw);
    kvt_free(orc_of);
    kvt_free(grp_sel);
    kvt_free(grp_m);
    kvt_free(done);
    for (int i = 0; i < 2; i++) {
        kvt_sel_clear(&orc[i]);
        kvt_policy_free(oracle_pol[i]);
    }
    scratch_free(&s);
    kvt_ctx_free(&c);
    KVT_PROF_ADD(o->profile, measure_ns, kvt_now_ns() - t_measure);
    KVT_PROF_ADD(o->profile, n_layers, 1);
    return st;
}
