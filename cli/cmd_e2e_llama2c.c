/* cmd_e2e_llama2c.c - `kvtrace e2e-llama2c`: the end-to-end check of the replay's proxies on
 * the built-in llama2.c engine. A replay judges each layer's kept set on its own, with the
 * queries of the uncompressed run; a real compressed cache also changes every later layer's
 * inputs. This command replays the policies on traces captured by `capture-llama2c` (one, or
 * a benchmark's prompts, then averaged), then runs each trace's decode steps again
 * (teacher-forced: the same input tokens) with each (policy, budget)'s kept sets as the
 * attention mask of every layer and head, and measures what the compression did to the
 * model's next-token distribution: KL divergence from the
 * uncompressed run, top-1 agreement, the reference token's log-loss. It reports them beside
 * the replay's proxies (err_decode, recall_decode) and how well the proxies rank the settings
 * (Spearman's rho). Schema: analysis/RESULTS.md "End-to-end check".
 * Exit status: 0 written; 1 failed (one error line); 2 bad usage.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvt_analysis.h"
#include "kvt_cli.h"
#include "kvt_llama2c.h"
#include "kvt_replay.h"
#include "kvt_trace.h"

#define CMD              "e2e-llama2c"
#define E2E_VERSION      1
#define DEFAULT_POLICIES "streamingllm,snapkv,pyramidkv,adakv,knorm"
#define DEFAULT_BUDGETS  "32,64,128,25%"

static void help(void)
{
    printf("usage: kvtrace e2e-llama2c TRACE... --model FILE.bin [--policies LIST]\n"
           "                           [--budgets LIST]\n"
           "                           [--window W] [--threads N] [--seed S]\n"
           "                           [--export-selection FILE] -o e2e.json [--force]\n\n"
           "The end-to-end check of the replay's proxies on the built-in llama2.c engine.\n"
           "TRACE must have been captured from FILE.bin by `kvtrace capture-llama2c` with\n"
           "decode steps (--decode G; h2o needs --colsum or --q-all, h2o-greedy and the\n"
           "other Q_all policies --q-all, kvzip --kvzip). Each policy is replayed at each\n"
           "budget (as `kvtrace replay`), then the model runs the trace's\n"
           "G decode steps again, fed the same tokens, with every layer and head attending\n"
           "only to the prompt tokens the policy kept (and to the decode tokens; a per-step\n"
           "policy's set of that step; a decoding=, dms_decoding=1, h2o-greedy decode=1 or\n"
           "rkv policy's cache of that step, decode tokens too). Per (policy, budget): the mean\n"
           "and largest KL divergence of the next-token distribution from the uncompressed\n"
           "run (nats), top-1 agreement, the reference token's mean log-loss, beside the\n"
           "replay's proxies; and Spearman's rho between each proxy and the KL over all\n"
           "settings.\n"
           "With several traces (prompts of one model), each setting's measures are the\n"
           "means over the traces (the largest KL the largest), its proxies the replay's\n"
           "aggregate, and each trace's own are listed too. kvtrace recommend --e2e\n"
           "e2e.json --max-kl K names the cheapest setting of mean KL <= K; for a HF\n"
           "transformers model, kvtrace.hf.e2e (Python) writes the same file.\n\n"
           "  --model FILE      the llama2.c checkpoint the trace was captured from\n"
           "  --policies LIST   as for replay, 'all' too (default %s);\n"
           "                    a merged policy (lookm, elastic-cache, cam, lightkv-like,\n"
           "                    merge=, think=) runs with its merged (or pruned) keys and\n"
           "                    values in the cache\n"
           "  --budgets LIST    as for replay (default %s)\n"
           "  --window W        window= of every policy that ranks by window queries\n"
           "                    whose spec sets none (as replay --window; not h2o, random)\n"
           "  --threads N       replay and decode threads (default: all cores)\n"
           "  --seed S          seed of the random policy (default 0)\n"
           "  --export-selection FILE  also write the kept sets applied (as replay)\n"
           "  -o FILE           e2e.json (analysis/RESULTS.md, \"End-to-end check\")\n"
           "  --force           overwrite existing outputs\n",
           DEFAULT_POLICIES, DEFAULT_BUDGETS);
}

/* the kept sets of every (policy, budget), as the engine's masks, and a merged policy's keys
 * and values */
typedef struct masks {
    int L, Hq, Hkv, T, G, D;
    size_t n_pol, n_b;
    kvt_policy *const *pols;
    uint8_t **keep;   /* [n_pol * n_b]: [L, Hq, T], or [G, L, Hq, T] for a per-step policy
                         ([G, L, Hq, T + G] for one that evicts decode tokens: row_width) */
    uint8_t **mflag;  /* [n_pol * n_b]: a merged policy's [L, Hq, T], 1 where the entry query
                         head h sees is merged; NULL for the others */
    float **mk, **mv; /* [n_pol * n_b]: with mflag: [L, Hq, T, D] the merged keys and values */
    kvt_selection_writer *sw; /* --export-selection, fed the same records */
} masks;

/* a merged record's entries, as each query head of its selection head sees them */
static void put_merged(const masks *m, int layer, const kvt_selection_rec *r)
{
    const size_t pb = (size_t)r->policy * m->n_b + (size_t)r->budget;
    const bool per_q = kvt_policy_per_query_head(m->pols[r->policy]);
    const int group = m->Hq / m->Hkv, h0 = per_q ? r->head : r->head * group;
    for (int h = h0; h < h0 + (per_q ? 1 : group); h++) {
        const size_t base = ((size_t)layer * m->Hq + (size_t)h) * m->T;
        for (size_t e = 0, ce = 0; e < r->n; e++) {
            if (!r->changed[e])
                continue;
            const size_t t = (size_t)r->idx[e];
            m->mflag[pb][base + t] = 1;
            memcpy(m->mk[pb] + (base + t) * m->D, r->k + ce * m->D, (size_t)m->D * sizeof(float));
            memcpy(m->mv[pb] + (base + t) * m->D, r->v + ce * m->D, (size_t)m->D * sizeof(float));
            ce++;
        }
    }
}

/* a mask row's positions: the prompt's T, or T + G for a policy whose caches hold decode
   tokens (decoding=, dms_decoding=1: step s's row holds the entries, prompt and decode tokens,
   it sees) */
static int row_width(const masks *m, size_t policy)
{
    return (kvt_policy_flags(m->pols[policy]) & KVT_POLICY_DECODE_EVICT) ? m->T + m->G : m->T;
}

/* the mask rows of record r at decode step `step` (-1: a fixed set's, at every step) */
static kvt_status put_rows(const masks *m, int layer, const kvt_selection_rec *r, int step)
{
    const bool per_q = kvt_policy_per_query_head(m->pols[r->policy]);
    const int group = m->Hq / m->Hkv, rw = row_width(m, (size_t)r->policy);
    const int h0 = per_q ? r->head : r->head * group, nh = per_q ? 1 : group;
    uint8_t *row = m->keep[(size_t)r->policy * m->n_b + (size_t)r->budget] +
                   (step > 0 ? (size_t)step * m->L * m->Hq * rw : 0) +
                   ((size_t)layer * m->Hq + (size_t)h0) * rw;
    for (size_t j = 0; j < r->n; j++) {
        KVT_RETURN_IF(r->idx[j] < 0 || r->idx[j] >= rw, KVT_ERR_STATE,
                      "layer %d: kept index %d outside the %s", layer, (int)r->idx[j],
                      rw > m->T ? "prompt and decode tokens" : "prompt");
        for (int h = 0; h < nh; h++)
            row[(size_t)h * rw + (size_t)r->idx[j]] = 1;
    }
    return KVT_OK;
}

/* A layer's kept sets into the masks (a call of them: a head's prompt-time set comes with its
 * step 0, kvt_selection_sink). A per-step policy's head that re-selects at each step has a set
 * per step; one that does not (hybridkv-like's static heads) keeps its prompt-time set at
 * every step, as the replay measures it. */
static kvt_status collect(void *user, int layer, const kvt_selection_rec *recs, size_t n, bool last)
{
    masks *m = user;
    const size_t heads = (size_t)m->Hq;                          /* at most, for either head kind */
    uint8_t *stepped = kvt_calloc(m->n_pol * m->n_b * heads, 1); /* has step sets */
    KVT_RETURN_IF(!stepped, KVT_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        if (recs[i].step >= 0)
            stepped[((size_t)recs[i].policy * m->n_b + (size_t)recs[i].budget) * heads +
                    (size_t)recs[i].head] = 1;
    kvt_status st = KVT_OK;
    for (size_t i = 0; i < n && !st; i++) {
        const kvt_selection_rec *r = &recs[i];
        const size_t pb = (size_t)r->policy * m->n_b + (size_t)r->budget;
        if (r->step >= m->G)
            continue;
        if (r->changed && m->mflag[pb])
            put_merged(m, layer, r);
        if (!(kvt_policy_flags(m->pols[r->policy]) & KVT_POLICY_PER_STEP))
            st = put_rows(m, layer, r, 0);
        else if (r->step >= 0)
            st = put_rows(m, layer, r, r->step);
        else if (!stepped[pb * heads + (size_t)r->head])
            for (int g = 0; g < m->G && !st; g++)
                st = put_rows(m, layer, r, g);
    }
    kvt_free(stepped);
    if (st)
        return st;
    return m->sw ? kvt_selection_writer_sink(m->sw, layer, recs, n, last) : KVT_OK;
}

/* one (policy, budget): what the compressed run did to the next-token distribution */
typedef struct e2e_run {
    bool applied;
    double kl_mean, kl_max, top1, nll; /* nll: the reference token's mean log-loss */
    double *kl_steps;                  /* [G] */
} e2e_run;

/* log-softmax of logits [n] into lp, in double */
static void log_softmax(const float *logits, int n, double *lp)
{
    double mx = logits[0];
    for (int i = 1; i < n; i++)
        mx = logits[i] > mx ? logits[i] : mx;
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += exp((double)logits[i] - mx);
    double lse = mx + log(s);
    for (int i = 0; i < n; i++)
        lp[i] = (double)logits[i] - lse;
}

/* x to 12 decimal places: values that differ only by rounding (a recall of 1 + 4e-16 against
 * 1, an error of 1e-17 against 0) tie when ranked (the measures are of order 1) */
static double dec12(double x)
{
    char b[400];
    snprintf(b, sizeof(b), "%.12f", x);
    return strtod(b, NULL);
}

/* average ranks of x [n] (ties, at 12 decimal places, share their mean rank) into r; q [n]
 * scratch */
static void ranks(const double *x, int n, double *r, double *q)
{
    for (int i = 0; i < n; i++)
        q[i] = dec12(x[i]);
    for (int i = 0; i < n; i++) {
        int less = 0, equal = 0;
        for (int j = 0; j < n; j++) {
            less += q[j] < q[i];
            equal += q[j] == q[i];
        }
        r[i] = less + (equal + 1) / 2.0;
    }
}

/* Spearman's rho of (x, y) [n]: Pearson's correlation of their average ranks; NaN when n < 3
 * or either is constant */
static double spearman(const double *x, const double *y, int n)
{
    if (n < 3)
        return NAN;
    double *rx = kvt_malloc(3 * (size_t)n * sizeof(double)), *ry = rx + n, *q = ry + n;
    double rho = NAN;
    if (rx) {
        ranks(x, n, rx, q);
        ranks(y, n, ry, q);
        double mx = 0, my = 0, sxy = 0, sxx = 0, syy = 0;
        for (int i = 0; i < n; i++)
            mx += rx[i] / n, my += ry[i] / n;
        for (int i = 0; i < n; i++) {
            sxy += (rx[i] - mx) * (ry[i] - my);
            sxx += (rx[i] - mx) * (rx[i] - mx);
            syy += (ry[i] - my) * (ry[i] - my);
        }
        if (sxx > 0 && syy > 0)
            rho = sxy / sqrt(sxx * syy);
    }
    kvt_free(rx);
    return rho;
}

/* the compressed runs, on a pool of threads: each worker runs the prompt into its own state,
 * then takes (policy, budget) settings in turn: rewind to the end of the prompt, mask, decode
 * the same tokens */
typedef struct decode_job {
    const kvt_llama2c_model *model;
    const int32_t *ids; /* [T + G] */
    int T, V;
    uint32_t G;
    const double *lp_full; /* [G, V] the reference log-probabilities */
    const int32_t *ref;    /* [G] the reference's greedy tokens */
    const masks *mk;
    e2e_run *runs; /* [n_pol * n_b] */
    kvt_progress *pr;
    pthread_mutex_t mu;
    size_t next, done, n_runs;
    kvt_status err;
    char msg[512];
} decode_job;

static kvt_status decode_one(decode_job *j, kvt_llama2c_state *s, size_t i, double *lp_c)
{
    const masks *mk = j->mk;
    const uint8_t *keep = mk->keep[i];
    e2e_run *r = &j->runs[i];
    const int T = j->T, V = j->V, rw = row_width(mk, i / mk->n_b);
    const bool per_step = kvt_policy_flags(mk->pols[i / mk->n_b]) & KVT_POLICY_PER_STEP;
    const size_t rows = (size_t)mk->L * mk->Hq, plane = rows * rw;
    /* decoding=, dms_decoding=1: step g's rows cut to the T + g positions before its token */
    uint8_t *cut = rw > T ? kvt_malloc(plane) : NULL;
    KVT_RETURN_IF(rw > T && !cut, KVT_ERR_NOMEM, "out of memory (decode masks)");
    kvt_status st = kvt_llama2c_state_rewind(s, (uint32_t)T);
    /* a merged policy's entries in place of the prompt's (a policy that merges none: cleared) */
    if (!st)
        st = kvt_llama2c_state_set_merged(s, mk->mflag[i], mk->mk[i], mk->mv[i],
                                          mk->mflag[i] ? (uint32_t)T : 0);
    for (uint32_t g = 0; g < j->G && !st; g++) {
        const float *lg;
        const uint8_t *km = keep + (per_step ? g * plane : 0);
        uint32_t n_masked = (uint32_t)T;
        if (cut) { /* the positions before step g's token: it always sees itself */
            n_masked = (uint32_t)T + g;
            for (size_t x = 0; x < rows; x++)
                memcpy(cut + x * n_masked, km + x * (size_t)rw, n_masked);
            km = cut;
        }
        if ((st = kvt_llama2c_state_set_mask(s, km, n_masked)) ||
            (st = kvt_llama2c_forward(s, j->ids[T + g], &lg)))
            break;
        const double *lp_f = j->lp_full + (size_t)g * V;
        log_softmax(lg, V, lp_c);
        double kl = 0.0;
        for (int v = 0; v < V; v++)
            kl += exp(lp_f[v]) * (lp_f[v] - lp_c[v]);
        kl = kl > 0 ? kl : 0.0; /* rounding below zero when identical */
        const int32_t ref = j->ref[g];
        r->kl_steps[g] = kl;
        r->kl_mean += kl; /* sums here, means below: a share of G/G is exactly 1 */
        r->kl_max = fmax(r->kl_max, kl);
        r->top1 += kvt_llama2c_argmax(lg, V) == ref;
        r->nll += -lp_c[ref];
    }
    kvt_free(cut);
    if (st)
        return st;
    r->kl_mean /= j->G, r->top1 /= j->G, r->nll /= j->G;
    r->applied = true;
    return KVT_OK;
}

static void *decode_worker(void *arg)
{
    decode_job *j = arg;
    kvt_llama2c_state *s = NULL;
    double *lp_c = kvt_malloc((size_t)j->V * sizeof(double));
    kvt_status st = lp_c ? kvt_llama2c_state_create(j->model, false, &s)
                         : kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    const float *lg;
    for (int i = 0; !st && i < j->T; i++)
        st = kvt_llama2c_forward(s, j->ids[i], &lg);
    for (;;) {
        pthread_mutex_lock(&j->mu);
        if (st && !j->err) {
            j->err = st;
            snprintf(j->msg, sizeof(j->msg), "%s", kvt_error_msg());
        }
        size_t i = j->err ? SIZE_MAX : j->next++;
        pthread_mutex_unlock(&j->mu);
        if (i >= j->mk->n_pol * j->mk->n_b)
            break;
        st = decode_one(j, s, i, lp_c);
        if (!st) {
            pthread_mutex_lock(&j->mu);
            kvt_progress_update(j->pr, ++j->done, j->n_runs);
            pthread_mutex_unlock(&j->mu);
        }
    }
    kvt_llama2c_state_free(s);
    kvt_free(lp_c);
    return NULL;
}

/* the trace's token tables: prompt ids [T] and decode-step input ids [G] */
static kvt_status read_ids(kvt_trace_reader *rd, int kind, int n, int32_t *dst, const char *path,
                           const char *what)
{
    uint32_t h, t, d;
    kvt_dtype dt;
    kvt_status st = kvt_trace_reader_shape(rd, -1, kind, &h, &t, &d, &dt);
    kvt_error_clear();
    KVT_RETURN_IF(st || h != 1 || d != 1 || (int)t != n, KVT_ERR_NOT_FOUND,
                  "%s has no %s table of %d ids (capture it with kvtrace capture-llama2c)", path,
                  what, n);
    return kvt_trace_reader_read(rd, -1, kind, 0, 1, KVT_DTYPE_INVALID, dst,
                                 (size_t)n * sizeof(int32_t));
}

/* one trace of the check: its token tables, the uncompressed run's next-token logits at the
 * decode steps, and what each (policy, budget) did on it */
typedef struct e2e_trace {
    const char *path;
    int T;
    uint32_t G;
    int32_t *ids;    /* [T + G] prompt, then decode-step inputs */
    double *lp_full; /* [G, V] the uncompressed run's next-token log-probabilities */
    int32_t *ref;    /* [G] and its greedy tokens */
    double kerr;     /* layer 0's keys: the trace's against this model's, over their scale */
    double nll_full; /* the uncompressed run's mean -log p of its own greedy token */
    kvt_cli_decode_held held; /* what the trace's layers hold of the decode steps */
    e2e_run *runs;            /* [n_pol * n_b] */
} e2e_trace;

static void trace_free(e2e_trace *et, size_t n_runs)
{
    for (size_t i = 0; et->runs && i < n_runs; i++)
        kvt_free(et->runs[i].kl_steps);
    kvt_free(et->runs);
    kvt_free(et->ids);
    kvt_free(et->lp_full);
    kvt_free(et->ref);
}

/* Check the trace at et->path against the model (shape, decode steps, token tables, layer 0's
 * keys) and run the model over it uncompressed. Errors name the trace; warnings (a trace cut
 * short) go to notes. */
static kvt_status trace_prepare(const kvt_llama2c_model *model, const char *model_path,
                                e2e_trace *et, FILE *notes)
{
    const kvt_llama2c_config *c = kvt_llama2c_model_config(model);
    const int L = c->n_layers, Hq = c->n_heads, Hkv = c->n_kv_heads, D = c->head_dim;
    const int V = c->vocab_size;
    const char *path = et->path;
    kvt_trace_reader *rd = NULL;
    kvt_llama2c_state *s = NULL;
    float *kref = NULL;
    cJSON *hdr = NULL;
    KVT_FORWARD(kvt_trace_reader_open(path, &rd));
    kvt_status st = KVT_OK;
    kvt_cli_trace_note(notes, CMD, path, rd, L, &et->held);
    hdr = cJSON_Parse(kvt_trace_reader_header_json(rd));
    const cJSON *mo = cJSON_GetObjectItemCaseSensitive(hdr, "model");
    const cJSON *jf[] = {cJSON_GetObjectItemCaseSensitive(mo, "n_layers"),
                         cJSON_GetObjectItemCaseSensitive(mo, "n_q_heads"),
                         cJSON_GetObjectItemCaseSensitive(mo, "n_kv_heads"),
                         cJSON_GetObjectItemCaseSensitive(mo, "head_dim"),
                         cJSON_GetObjectItemCaseSensitive(hdr, "n_tokens")};
    int tv[5];
    for (int k = 0; k < 5; k++)
        tv[k] = cJSON_IsNumber(jf[k]) ? jf[k]->valueint : -1;
    const int T = et->T = tv[4];
    uint32_t h, t, d, G = 0;
    kvt_dtype dt;
    if (tv[0] != L || tv[1] != Hq || tv[2] != Hkv || tv[3] != D) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s is another model (L=%d Hq=%d Hkv=%d D=%d) than %s (L=%d Hq=%d "
                           "Hkv=%d D=%d): give the checkpoint the trace was captured from",
                           path, tv[0], tv[1], tv[2], tv[3], model_path, L, Hq, Hkv, D);
        goto out;
    }
    if (kvt_trace_reader_shape(rd, 0, KVT_KIND_Q_DECODE, &h, &G, &d, &dt) || G == 0) {
        const cJSON *nd = cJSON_GetObjectItemCaseSensitive(hdr, "n_decode");
        st = kvt_trace_reader_recovered(rd) && cJSON_IsNumber(nd) && nd->valueint > 0
                 ? kvt_error_set(KVT_ERR_NOT_FOUND,
                                 "%s has no decode steps: the trace is incomplete (recovered by "
                                 "scanning), cut short before them; the end-to-end check reruns "
                                 "them (see kvtrace verify)",
                                 path)
                 : kvt_error_set(KVT_ERR_NOT_FOUND,
                                 "%s has no decode steps: the end-to-end check reruns them "
                                 "(capture with --decode G)",
                                 path);
        goto out;
    }
    et->G = G;
    if (kvt_trace_reader_shape(rd, 0, KVT_KIND_K, &h, &t, &d, &dt) || (int)h != Hkv ||
        (int)t != T || (int)d != D) { /* the keys compared below are the header's shape */
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: layer 0 K is missing or does not match the header [%d,%d,%d]", path,
                           Hkv, T, D);
        goto out;
    }
    if (T < 1 || (uint64_t)T + G > (uint64_t)c->seq_len) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: %d prompt tokens and %u decode steps do not fit %s's context "
                           "of %d",
                           path, T, G, model_path, c->seq_len);
        goto out;
    }
    et->ids = kvt_malloc(((size_t)T + G) * sizeof(int32_t));
    et->lp_full = kvt_malloc((size_t)G * V * sizeof(double));
    et->ref = kvt_malloc((size_t)G * sizeof(int32_t));
    kref = kvt_malloc((size_t)Hkv * T * D * sizeof(float));
    if (!et->ids || !et->lp_full || !et->ref || !kref) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((st = read_ids(rd, KVT_KIND_TOKEN_IDS, T, et->ids, path, "token_ids")) ||
        (st = read_ids(rd, KVT_KIND_DECODE_TOKEN_IDS, (int)G, et->ids + T, path,
                       "decode_token_ids")) ||
        (st = kvt_trace_reader_read(rd, 0, KVT_KIND_K, 0, (uint32_t)Hkv, KVT_DTYPE_F32, kref,
                                    (size_t)Hkv * T * D * sizeof(float))))
        goto out;
    for (int i = 0; i < T + (int)G; i++)
        if (et->ids[i] < 0 || et->ids[i] >= V) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s: token id %d at position %d is outside %s's vocabulary of %d",
                               path, (int)et->ids[i], i, model_path, V);
            goto out;
        }
    /* the uncompressed run: the prompt, then the decode steps' reference distributions */
    if ((st = kvt_llama2c_state_create(model, false, &s)))
        goto out;
    const float *lg = NULL;
    for (int i = 0; i < T && !st; i++)
        st = kvt_llama2c_forward(s, et->ids[i], &lg);
    double kerr = 0.0, kscale = 0.0;
    const float *kc = kvt_llama2c_state_keys(s, 0);
    for (int g = 0; g < Hkv && !st; g++)
        for (int j = 0; j < T; j++)
            for (int k = 0; k < D; k++) {
                double a = kref[((size_t)g * T + j) * D + k];
                double b = kc[((size_t)j * Hkv + g) * D + k];
                kerr = fmax(kerr, fabs(a - b));
                kscale = fmax(kscale, fabs(b));
            }
    et->kerr = kscale > 0 ? kerr / kscale : kerr;
    if (!st && !(et->kerr <= 1e-2)) { /* bf16 storage rounds to 2^-9 of the scale */
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s was not captured from %s over its own tokens: layer 0's keys "
                           "differ by %.3g of their scale",
                           path, model_path, et->kerr);
        goto out;
    }
    et->nll_full = 0.0;
    for (uint32_t g = 0; g < G && !st; g++)
        if (!(st = kvt_llama2c_forward(s, et->ids[T + g], &lg))) {
            double *lp = et->lp_full + (size_t)g * V;
            log_softmax(lg, V, lp);
            et->ref[g] = kvt_llama2c_argmax(lg, V);
            et->nll_full += -lp[et->ref[g]];
        }
    et->nll_full /= G;
out:
    kvt_llama2c_state_free(s);
    kvt_free(kref);
    cJSON_Delete(hdr);
    kvt_trace_reader_close(rd);
    return st;
}

/* Replay the policies on trace t and rerun its decode steps with their kept sets: et->runs.
 * The replay's result goes into res (the proxies), its kept sets to sw when exporting, what
 * the replay's table would warn of to notes. */
static kvt_status trace_run(const kvt_llama2c_model *model, e2e_trace *et, size_t t,
                            kvt_policy *const *pols, size_t n_pol, const kvt_budget *budgets,
                            size_t n_b, int threads, kvt_selection_writer *sw, kvt_results *res,
                            kvt_progress *pr, FILE *notes)
{
    const kvt_llama2c_config *c = kvt_llama2c_model_config(model);
    const int L = c->n_layers, Hq = c->n_heads, T = et->T;
    const uint32_t G = et->G;
    masks mk = {.L = L,
                .Hq = Hq,
                .Hkv = c->n_kv_heads,
                .D = c->head_dim,
                .T = T,
                .G = (int)G,
                .n_pol = n_pol,
                .n_b = n_b,
                .pols = pols,
                .sw = sw};
    kvt_trace_result *tr = NULL;
    int *btok = kvt_malloc(n_b * sizeof(int));
    mk.keep = kvt_calloc(n_pol * n_b, sizeof(uint8_t *));
    mk.mflag = kvt_calloc(n_pol * n_b, sizeof(uint8_t *));
    mk.mk = kvt_calloc(n_pol * n_b, sizeof(float *));
    mk.mv = kvt_calloc(n_pol * n_b, sizeof(float *));
    et->runs = kvt_calloc(n_pol * n_b, sizeof(e2e_run));
    kvt_status st = KVT_OK;
    if (!btok || !mk.keep || !mk.mflag || !mk.mk || !mk.mv || !et->runs) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    size_t n_runs = 0;
    for (size_t p = 0; p < n_pol; p++) {
        unsigned f = kvt_policy_flags(pols[p]);
        for (size_t b = 0; b < n_b; b++, n_runs++) {
            const size_t i = p * n_b + b, n = (size_t)L * Hq * (size_t)row_width(&mk, p) *
                                              ((f & KVT_POLICY_PER_STEP) ? G : 1);
            const size_t nm = (size_t)L * Hq * T;
            et->runs[i].kl_steps = kvt_malloc((size_t)G * sizeof(double));
            if (!(mk.keep[i] = kvt_calloc(n, 1)) || !et->runs[i].kl_steps ||
                ((f & KVT_POLICY_MERGED) &&
                 (!(mk.mflag[i] = kvt_calloc(nm, 1)) ||
                  !(mk.mk[i] = kvt_malloc(nm * mk.D * sizeof(float) + 1)) ||
                  !(mk.mv[i] = kvt_malloc(nm * mk.D * sizeof(float) + 1))))) {
                st = kvt_error_set(KVT_ERR_NOMEM, "out of memory (kept-set masks)");
                goto out;
            }
        }
    }
    for (size_t b = 0; b < n_b; b++)
        btok[b] = kvt_budget_tokens(&budgets[b], T);
    if (sw && (st = kvt_selection_writer_begin_trace(sw, (int)t, L, btok)))
        goto out;
    kvt_replay_opts ro = {
        .n_threads = threads, .coverage_probes = -1, .sink = collect, .sink_user = &mk};
    kvt_progress_start(pr, "replay");
    st = kvt_replay_trace(et->path, pols, n_pol, budgets, n_b, &ro, &tr);
    kvt_progress_end(pr);
    if (st || (sw && (st = kvt_selection_writer_end_trace(sw))))
        goto out;
    kvt_cli_decode_note(notes, CMD, et->path, tr, &et->held); /* e.g. no proxies: said why */
    kvt_cli_budget_notes(notes, CMD, et->path, tr);
    if (tr->n_decode > 0 && (uint32_t)tr->n_decode < G) {
        /* a trace cut short in its decode records: layer 0 holds more steps than every layer
           holds whole. The replay's proxies, and a per-step policy's kept sets, are of the
           first tr->n_decode steps: rerun those (a later step would see no prompt token) */
        et->G = (uint32_t)tr->n_decode;
        et->nll_full = 0.0;
        for (uint32_t g = 0; g < et->G; g++)
            et->nll_full += -et->lp_full[(size_t)g * c->vocab_size + et->ref[g]];
        et->nll_full /= et->G;
    }
    st = kvt_results_add_trace(res, tr); /* takes tr, also on failure */
    tr = NULL;
    if (st)
        goto out;
    /* the compressed runs, one thread per core (or --threads) */
    decode_job dj = {.model = model,
                     .ids = et->ids,
                     .T = T,
                     .V = c->vocab_size,
                     .G = et->G,
                     .lp_full = et->lp_full,
                     .ref = et->ref,
                     .mk = &mk,
                     .runs = et->runs,
                     .pr = pr,
                     .n_runs = n_runs};
    int n_th = threads > 0 ? threads : kvt_cpu_count();
    n_th = n_th < (int)n_runs ? n_th : (int)n_runs;
    n_th = n_th < 64 ? n_th : 64;
    pthread_t th[64];
    pthread_mutex_init(&dj.mu, NULL);
    kvt_progress_start(pr, "decode");
    int started = 0;
    for (; started < n_th; started++)
        if (pthread_create(&th[started], NULL, decode_worker, &dj))
            break;
    if (started == 0 && n_runs > 0)
        decode_worker(&dj); /* no thread could start: run in the caller */
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    kvt_progress_end(pr);
    pthread_mutex_destroy(&dj.mu);
    if (dj.err)
        st = kvt_error_set(dj.err, "%s", dj.msg);
out:
    for (size_t i = 0; mk.keep && i < n_pol * n_b; i++)
        kvt_free(mk.keep[i]);
    for (size_t i = 0; mk.mflag && mk.mk && mk.mv && i < n_pol * n_b; i++)
        kvt_free(mk.mflag[i]), kvt_free(mk.mk[i]), kvt_free(mk.mv[i]);
    kvt_free(mk.keep);
    kvt_free(mk.mflag);
    kvt_free(mk.mk);
    kvt_free(mk.mv);
    kvt_free(btok);
    kvt_trace_result_free(tr);
    return st;
}

/* one line of the table on stdout: a (policy, budget)'s model-level numbers */
typedef struct e2e_row {
    bool applied;
    double kept, err_decode, recall_decode, kl, kl_max, top1;
} e2e_row;

/* The table, printed only once e2e.json is written: a script reading stdout never sees the
 * results of a failed run */
static void print_table(kvt_policy *const *pols, size_t n_pol, const kvt_budget *budgets,
                        size_t n_b, const e2e_row *rows)
{
    int lw = kvt_cli_label_width(pols, n_pol, 24);
    printf("%-*s %8s %7s %9s %9s %10s %8s %8s\n", lw, "policy", "budget", "kept", "err_d",
           "recall_d", "KL", "KL max", "top1");
    for (size_t p = 0; p < n_pol; p++)
        for (size_t b = 0; b < n_b; b++) {
            const e2e_row *x = &rows[p * n_b + b];
            char c1[32] = "-", c2[32] = "-";
            if (isfinite(x->err_decode))
                snprintf(c1, sizeof(c1), "%.4f", x->err_decode);
            if (isfinite(x->recall_decode))
                snprintf(c2, sizeof(c2), "%.4f", x->recall_decode);
            if (x->applied)
                printf("%-*s %8s %6.1f%% %9s %9s %10.3g %8.3g %7.1f%%\n", lw,
                       kvt_policy_label(pols[p]), budgets[b].text, 100.0 * x->kept, c1, c2, x->kl,
                       x->kl_max, 100.0 * x->top1);
            else
                printf("%-*s %8s %6.1f%% %9s %9s %10s %8s %8s\n", lw, kvt_policy_label(pols[p]),
                       budgets[b].text, 100.0 * x->kept, c1, c2, "-", "-", "-");
        }
}

int kvt_cmd_e2e_llama2c(int argc, char **argv)
{
    const char *cmd = CMD;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    const char *model_path = NULL, *out = NULL, *export_path = NULL;
    const char **traces = kvt_calloc((size_t)argc + 1, sizeof(char *));
    size_t n_traces = 0;
    char *policies_arg = NULL, *budgets_arg = NULL; /* given twice: both lists, as replay */
    int window = 0, threads = 0, prc = 0;
    uint64_t seed = 0;
    bool force = false;
    for (int i = 1; i < argc && !prc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        const char **target = !strcmp(a, "--model")              ? &model_path
                              : !strcmp(a, "-o")                 ? &out
                              : !strcmp(a, "--export-selection") ? &export_path
                                                                 : NULL;
        bool pol = !strcmp(a, "--policies") || !strcmp(a, "--policy");
        bool num = !strcmp(a, "--budgets") || !strcmp(a, "--window") || !strcmp(a, "--threads") ||
                   !strcmp(a, "--seed");
        if ((target || pol || num) && !v) {
            kvt_cli_fail(cmd, "%s needs a value", a);
            prc = 2;
        } else if (target) {
            *target = v;
            i++;
            if (target == &model_path && !kvt_cli_json_text_ok(cmd, "the path", v))
                prc = 1; /* e2e.json names the model */
        } else if (pol) {
            prc = kvt_cli_append_policies(cmd, &policies_arg, v);
            i++;
        } else if (!strcmp(a, "--budgets")) {
            if (!(budgets_arg = kvt_cli_append_list(budgets_arg, v)))
                prc = kvt_cli_fail(cmd, "out of memory");
            i++;
        } else if (!strcmp(a, "--window") || !strcmp(a, "--threads")) {
            if (!kvt_cli_parse_int(v, 1, 1 << 30, a[2] == 'w' ? &window : &threads)) {
                kvt_cli_fail(cmd, "%s %s: expected a positive integer", a, v);
                prc = 2;
            }
            i++;
        } else if (!strcmp(a, "--seed")) {
            if (!kvt_cli_parse_u64(v, &seed)) {
                kvt_cli_fail(cmd, "--seed %s: expected a non-negative integer", v);
                prc = 2;
            }
            i++;
        } else if (!strcmp(a, "--force")) {
            force = true;
        } else if (a[0] == '-' && a[1]) {
            kvt_cli_fail(cmd, "unknown option %s (see kvtrace e2e-llama2c --help)", a);
            prc = 2;
        } else if (traces) {
            for (size_t t = 0; t < n_traces && !prc; t++)
                if (kvt_cli_same_path(traces[t], a)) {
                    kvt_cli_fail(cmd, "%s is given twice (as %s and %s)", a, traces[t], a);
                    prc = 2;
                }
            if (!prc && !kvt_cli_json_text_ok(cmd, "the path", a)) /* e2e.json names it */
                prc = 1;
            traces[n_traces++] = a;
        }
    }
    if (!traces && !prc)
        prc = kvt_cli_fail(cmd, "out of memory");
    if (!prc && (!n_traces || !model_path || !out)) {
        kvt_cli_fail(cmd, "%s is required (see kvtrace e2e-llama2c --help)",
                     !n_traces     ? "a TRACE"
                     : !model_path ? "--model FILE"
                                   : "-o FILE");
        prc = 2;
    }
    if (traces)
        traces[n_traces] = model_path; /* with the traces: what an output must not be */
    if (!prc && export_path && kvt_cli_same_path(out, export_path)) {
        kvt_cli_fail(cmd, "-o and --export-selection name the same file");
        prc = 2;
    }
    if (!prc &&
        (!kvt_cli_output_ok(cmd, out, force, traces, n_traces + 1) ||
         (export_path && !kvt_cli_output_ok(cmd, export_path, force, traces, n_traces + 1))))
        prc = 1;
    if (prc) {
        kvt_free(traces);
        kvt_free(policies_arg);
        kvt_free(budgets_arg);
        return prc;
    }

    int rc = 1;
    kvt_status st;
    kvt_llama2c_model *model = NULL;
    cJSON *root = NULL;
    kvt_policy **pols = NULL;
    kvt_budget *budgets = NULL;
    size_t n_pol = 0, n_b = 0;
    kvt_results *res = NULL;
    kvt_selection_writer *sw = NULL;
    e2e_trace *ets = kvt_calloc(n_traces, sizeof(e2e_trace));
    double *xs = NULL;
    e2e_row *rows = NULL;
    char *txt = NULL;
    kvt_progress pr;
    /* warnings about the traces and budgets, told once e2e.json is written (as replay): a run
       that fails says one line, its error */
    char *notes_buf = NULL;
    size_t notes_len = 0;
    FILE *notes = open_memstream(&notes_buf, &notes_len);
    if (!notes)
        notes = stderr;
    if (!ets) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    if ((st = kvt_llama2c_model_open(model_path, &model))) {
        kvt_cli_fail_status(cmd, st, model_path);
        goto out_free;
    }
    /* every trace checked and run uncompressed before any replay */
    for (size_t t = 0; t < n_traces; t++) {
        ets[t].path = traces[t];
        if ((st = trace_prepare(model, model_path, &ets[t], notes))) {
            kvt_cli_fail_status(cmd, st, traces[t]);
            goto out_free;
        }
    }
    kvt_policy_globals pg = {.seed = seed, .window = window};
    if ((st = kvt_policy_list_parse(policies_arg ? policies_arg : DEFAULT_POLICIES, &pg, &pols,
                                    &n_pol))) {
        kvt_cli_fail_status(cmd, st, "--policies");
        rc = st == KVT_ERR_INVALID_ARG ? 2 : 1;
        goto out_free;
    }
    if ((st = kvt_budgets_parse(budgets_arg ? budgets_arg : DEFAULT_BUDGETS, &budgets, &n_b))) {
        kvt_cli_fail_status(cmd, st, "--budgets");
        rc = st == KVT_ERR_INVALID_ARG ? 2 : 1;
        goto out_free;
    }
    if ((rc = kvt_cli_policy_files_ok(cmd, pols, n_pol, traces, n_traces)))
        goto out_free; /* a usage error (2), said */
    rc = 1;
    for (size_t t = 0; t < n_traces; t++)
        if ((st = kvt_replay_check_trace(traces[t], pols, n_pol, budgets, n_b))) {
            kvt_cli_fail_status(cmd, st, traces[t]);
            goto out_free;
        }
    if ((st = kvt_results_create(pols, n_pol, budgets, n_b, &res)) ||
        (export_path && (st = kvt_selection_writer_open(export_path, force, pols, n_pol, budgets,
                                                        n_b, traces, n_traces, &sw)))) {
        kvt_cli_fail_status(cmd, st, export_path && res ? export_path : "results");
        goto out_free;
    }
    res->seed = seed;
    for (size_t t = 0; t < n_traces; t++)
        if ((st = trace_run(model, &ets[t], t, pols, n_pol, budgets, n_b, threads, sw, res, &pr,
                            notes))) {
            kvt_cli_fail_status(cmd, st, traces[t]);
            goto out_free;
        }

    /* e2e.json, the table, and how well each proxy ranks the settings: each run's measures
       are the means over the traces (the largest KL the largest), its proxies the replay's
       aggregate (the mean of the per-trace means, as results.json's) */
    const size_t nr = n_pol * n_b;
    xs = kvt_malloc(nr * 4 * sizeof(double)); /* the proxies' and KL's pairs */
    rows = kvt_malloc(nr * sizeof(e2e_row));
    if (!xs || !rows) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    double *e_x = xs, *e_kl = xs + nr, *r_x = xs + 2 * nr, *r_kl = xs + 3 * nr;
    int n_err = 0, n_rec = 0;
    size_t n_runs = 0;
    root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "e2e_version", E2E_VERSION);
    char gen[64]; /* as results.json and the selection export */
    snprintf(gen, sizeof(gen), "kvtrace %s", kvt_version_string());
    cJSON_AddStringToObject(root, "generator", gen);
    cJSON_AddStringToObject(root, "model", model_path);
    cJSON_AddNumberToObject(root, "vocab_size", kvt_llama2c_model_config(model)->vocab_size);
    cJSON *jt = cJSON_AddArrayToObject(root, "traces");
    for (size_t t = 0; t < n_traces; t++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "path", ets[t].path);
        if (res->traces[t]->fingerprint[0]) /* what report --e2e matches results.json's by */
            cJSON_AddStringToObject(o, "fingerprint", res->traces[t]->fingerprint);
        cJSON_AddNumberToObject(o, "n_prompt", ets[t].T);
        cJSON_AddNumberToObject(o, "n_decode", ets[t].G);
        cJSON_AddItemToObject(o, "trace_key_error", kvt_json_number(ets[t].kerr));
        cJSON_AddItemToObject(o, "nll_uncompressed", kvt_json_number(ets[t].nll_full));
        cJSON_AddItemToArray(jt, o);
    }
    cJSON *jruns = cJSON_AddArrayToObject(root, "runs");
    for (size_t p = 0; p < n_pol; p++)
        for (size_t b = 0; b < n_b; b++) {
            const size_t i = p * n_b + b;
            const bool applied = ets[0].runs[i].applied;
            double kl = 0, kl_max = 0, top1 = 0, nll = 0;
            for (size_t t = 0; t < n_traces; t++) {
                const e2e_run *x = &ets[t].runs[i];
                kl += x->kl_mean / (double)n_traces, top1 += x->top1 / (double)n_traces;
                nll += x->nll / (double)n_traces, kl_max = fmax(kl_max, x->kl_max);
            }
            if (n_traces == 1) /* exactly the trace's */
                kl = ets[0].runs[i].kl_mean, top1 = ets[0].runs[i].top1, nll = ets[0].runs[i].nll;
            if (!applied)
                kl = kl_max = top1 = nll = NAN;
            n_runs += applied;
            kvt_run_summary sm;
            if (kvt_summarize_results(res, p, b, &sm))
                memset(&sm, 0, sizeof(sm));
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "policy", kvt_policy_label(pols[p]));
            cJSON_AddStringToObject(o, "name", kvt_policy_name(pols[p]));
            cJSON_AddStringToObject(o, "budget", budgets[b].text);
            cJSON_AddNumberToObject(o, "budget_tokens", kvt_budget_tokens(&budgets[b], ets[0].T));
            cJSON_AddItemToObject(o, "kept_fraction", kvt_json_number(sm.kept_fraction));
            cJSON_AddBoolToObject(o, "applied", applied);
            if (!applied)
                cJSON_AddStringToObject(o, "why", "the engine did not run this setting");
            cJSON_AddItemToObject(o, "kl_mean", kvt_json_number(kl));
            cJSON_AddItemToObject(o, "kl_max", kvt_json_number(kl_max));
            cJSON_AddItemToObject(o, "top1_agreement", kvt_json_number(top1));
            cJSON_AddItemToObject(o, "nll_mean", kvt_json_number(nll));
            cJSON *pj = cJSON_AddObjectToObject(o, "proxy");
            cJSON_AddItemToObject(pj, "err_decode", kvt_json_number(sm.err_decode));
            cJSON_AddItemToObject(pj, "recall_decode", kvt_json_number(sm.recall_decode));
            cJSON_AddItemToObject(pj, "err_window", kvt_json_number(sm.err_window));
            cJSON_AddItemToObject(pj, "recall_window", kvt_json_number(sm.recall_window));
            cJSON *pt = cJSON_AddArrayToObject(o, "per_trace");
            for (size_t t = 0; t < n_traces; t++) {
                const e2e_run *x = &ets[t].runs[i];
                kvt_run_summary ts;
                if (kvt_summarize_trace(res->traces[t], p, b, -1, &ts))
                    memset(&ts, 0, sizeof(ts));
                cJSON *q = cJSON_CreateObject();
                cJSON_AddNumberToObject(q, "budget_tokens",
                                        kvt_budget_tokens(&budgets[b], ets[t].T));
                cJSON_AddItemToObject(q, "kl_mean", kvt_json_number(applied ? x->kl_mean : NAN));
                cJSON_AddItemToObject(q, "kl_max", kvt_json_number(applied ? x->kl_max : NAN));
                cJSON_AddItemToObject(q, "top1_agreement",
                                      kvt_json_number(applied ? x->top1 : NAN));
                cJSON_AddItemToObject(q, "nll_mean", kvt_json_number(applied ? x->nll : NAN));
                cJSON *ks = cJSON_AddArrayToObject(q, "kl_steps");
                for (uint32_t g = 0; applied && g < ets[t].G; g++)
                    cJSON_AddItemToArray(ks, kvt_json_number(x->kl_steps[g]));
                cJSON *qp = cJSON_AddObjectToObject(q, "proxy");
                cJSON_AddItemToObject(qp, "err_decode", kvt_json_number(ts.err_decode));
                cJSON_AddItemToObject(qp, "recall_decode", kvt_json_number(ts.recall_decode));
                cJSON_AddItemToArray(pt, q);
            }
            cJSON_AddItemToArray(jruns, o);
            rows[i] = (e2e_row){.applied = applied,
                                .kept = sm.kept_fraction,
                                .err_decode = sm.err_decode,
                                .recall_decode = sm.recall_decode,
                                .kl = kl,
                                .kl_max = kl_max,
                                .top1 = top1};
            if (applied && isfinite(sm.err_decode)) {
                e_x[n_err] = sm.err_decode;
                e_kl[n_err++] = kl;
            }
            if (applied && isfinite(sm.recall_decode)) {
                r_x[n_rec] = 1.0 - sm.recall_decode;
                r_kl[n_rec++] = kl;
            }
        }
    double rho_err = spearman(e_x, e_kl, n_err), rho_rec = spearman(r_x, r_kl, n_rec);
    cJSON *sp = cJSON_AddObjectToObject(root, "spearman");
    cJSON_AddItemToObject(sp, "err_decode_vs_kl", kvt_json_number(rho_err));
    cJSON_AddItemToObject(sp, "missed_recall_decode_vs_kl", kvt_json_number(rho_rec));
    cJSON_AddNumberToObject(sp, "n_settings", n_err);
    if (!(txt = cJSON_Print(root))) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    if ((st = kvt_write_file_atomic(out, txt, strlen(txt)))) {
        kvt_cli_fail_status(cmd, st, out);
        goto out_free; /* the export is discarded */
    }
    if (sw) { /* after e2e.json, as replay puts its export after results.json */
        st = kvt_selection_writer_close(sw);
        sw = NULL;
        if (st) {
            kvt_cli_fail_status(cmd, st, export_path);
            goto out_free;
        }
    }
    if (notes != stderr && fflush(notes) == 0 && notes_len)
        fputs(notes_buf, stderr);
    print_table(pols, n_pol, budgets, n_b, rows);
    fflush(stdout);      /* the table before the summary line, when both go to one file */
    char re[16], rr[16]; /* NaN when the KL or the proxy is the same for every setting */
    snprintf(re, sizeof(re), isnan(rho_err) ? "n/a" : "%.3f", rho_err);
    snprintf(rr, sizeof(rr), isnan(rho_rec) ? "n/a" : "%.3f", rho_rec);
    if (n_err >= 3)
        fprintf(stderr,
                "e2e-llama2c: wrote %s (%zu setting%s on %zu trace%s); Spearman's rho against the "
                "end-to-end KL over %d settings: err_decode %s, 1 - recall_decode %s\n",
                out, n_runs, n_runs == 1 ? "" : "s", n_traces, n_traces == 1 ? "" : "s", n_err, re,
                rr);
    else if (n_runs < 3) /* a rank correlation needs 3 settings (the JSON holds null) */
        fprintf(stderr,
                "e2e-llama2c: wrote %s (%zu setting%s on %zu trace%s); no Spearman's rho: %zu "
                "setting%s with a measured KL, 3 needed\n",
                out, n_runs, n_runs == 1 ? "" : "s", n_traces, n_traces == 1 ? "" : "s", n_runs,
                n_runs == 1 ? "" : "s");
    else /* the KL was measured, the replay's proxies were not (a trace cut short) */
        fprintf(stderr,
                "e2e-llama2c: wrote %s (%zu settings on %zu trace%s); no Spearman's rho: the "
                "replay measured its proxies (err_decode, recall_decode) for %d of the %zu "
                "settings with a measured KL, 3 needed (decode metrics need decode steps that "
                "every layer of the trace holds)\n",
                out, n_runs, n_traces, n_traces == 1 ? "" : "s", n_err, n_runs);
    rc = 0;
out_free:
    if (sw)
        kvt_selection_writer_discard(sw); /* failed: an old export is left as it was */
    for (size_t t = 0; ets && t < n_traces; t++)
        trace_free(&ets[t], n_pol * n_b);
    kvt_free(ets);
    kvt_free(xs);
    kvt_free(rows);
    if (txt)
        cJSON_free(txt);
    cJSON_Delete(root);
    kvt_results_free(res);
    kvt_free(budgets);
    kvt_policy_list_free(pols, n_pol);
    kvt_llama2c_model_close(model);
    kvt_free(traces);
    kvt_free(policies_arg);
    kvt_free(budgets_arg);
    if (notes != stderr) {
        fclose(notes);
        free(notes_buf); /* open_memstream's, with malloc */
    }
    return rc;
}
