/* test_report_util.h - the constructed result of the report tests: one trace, L=2 layers, two
 * KV heads, T=100, policies full, tova, snapkv, oracle, budgets 10/20/40/80, dyadic err_decode
 * values (every mean exact in double) and recall_window = 1 - err_decode; build_traces makes
 * the same with other prompt lengths, budgets and several traces. The expected answers are
 * worked out in test_report_recommend.c.
 */
#ifndef TEST_REPORT_UTIL_H
#define TEST_REPORT_UTIL_H

#include "kvt_report.h"
#include "kvt_test.h"

enum { L = 2, H = 2, T = 100, NB = 4, NP = 4 };
enum { P_FULL, P_TOVA, P_SNAP, P_ORACLE };
static const char *specs[NP] = {"full", "tova", "snapkv", "oracle"};
static const int btok[NB] = {10, 20, 40, 80};

/* snapkv err_decode per (layer, head) at budgets 10, 20, 40, 80. Means over the 4 heads:
 * 0.5, 0.25, 0.140625, 0.0625. */
static const double snap_err[L][H][NB] = {
    {{0.375, 0.125, 0.0625, 0.03125}, {0.5, 0.25, 0.125, 0.0625}},
    {{0.625, 0.375, 0.25, 0.09375}, {0.5, 0.25, 0.125, 0.0625}},
};
static const double tova_err[NB] = {0.75, 0.5, 0.25, 0.125}; /* every head */

/* one trace of the constructed result: prompt of n_tokens, budget b = tok[b] tokens (what
 * the replay records, even above the prompt), snapkv keeps min(tok[b], n_tokens) per head */
static kvt_trace_result *build_trace(const char *model_name, const char *path, int n_tokens,
                                     const int *tok, kvt_policy *const *pols, const kvt_budget *bud)
{
    kvt_trace_result *t;
    KVT_CHECK(kvt_trace_result_create(L, H, H, NP, NB, &t));
    t->path = kvt_strdup(path);
    t->header_json = kvt_strdup("{}");
    t->model_name = kvt_strdup(model_name);
    t->model_arch = kvt_strdup("llama");
    t->head_dim = 4;
    t->n_tokens = n_tokens;
    t->window_stored = 8;
    t->n_decode = 4;
    t->kv_elem_bytes = 2;
    snprintf(t->kv_dtype, sizeof(t->kv_dtype), "f16");
    for (int p = 0; p < NP; p++) {
        t->policy_labels[p] = kvt_strdup(specs[p]);
        t->policy_names[p] = kvt_strdup(specs[p]);
        t->policy_flags[p] = kvt_policy_flags(pols[p]);
        t->policy_heads[p] = H;
        t->policy_window[p] = 0;
    }
    for (int b = 0; b < NB; b++) {
        t->budget_texts[b] = kvt_strdup(bud[b].text);
        t->budget_tokens[b] = tok[b];
    }
    for (int i = 0; i < L * H; i++)
        t->r_all[i] = 0.5;
    for (int p = 0; p < NP; p++)
        for (int b = 0; b < NB; b++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++) {
                    kvt_head_metrics *m = kvt_trace_result_at(t, (size_t)p, (size_t)b, l, h);
                    double e = p == P_FULL   ? 0.0
                               : p == P_TOVA ? tova_err[b]
                               : p == P_SNAP ? snap_err[l][h][b]
                                             : 0.015625;
                    m->n_keep = p == P_FULL || tok[b] > n_tokens ? n_tokens : tok[b];
                    m->err_decode = e;
                    m->recall_window = 1.0 - e; /* recall_decode stays NaN: auto falls back */
                }
    return t;
}

/* A result over n_traces traces with the budgets `budgets` (NB of them); trace i has prompt
 * n_tokens[i] and budget tokens tok[i][b]; its path is paths[i]. */
static kvt_results *build_traces(const char *model_name, const char *const *paths, size_t n_traces,
                                 const char *budgets, const int *n_tokens, const int (*tok)[NB])
{
    kvt_policy *pols[NP];
    for (int i = 0; i < NP; i++)
        KVT_CHECK(kvt_policy_create(specs[i], NULL, &pols[i]));
    kvt_budget *bud;
    size_t nb;
    KVT_CHECK(kvt_budgets_parse(budgets, &bud, &nb));
    KVT_CHECK(nb == NB ? KVT_OK : KVT_ERR_INVALID_ARG);
    kvt_results *r;
    KVT_CHECK(kvt_results_create(pols, NP, bud, nb, &r));
    for (size_t i = 0; i < n_traces; i++)
        KVT_CHECK(kvt_results_add_trace(
            r, build_trace(model_name, paths[i], n_tokens[i], tok[i], pols, bud)));
    for (int i = 0; i < NP; i++)
        kvt_policy_free(pols[i]);
    kvt_free(bud);
    return r;
}

/* the constructed result: one trace, T = 100, budgets 10/20/40/80 */
static kvt_results *build(const char *model_name, const char *path)
{
    const int n_tokens[1] = {T};
    const int tok[1][NB] = {{btok[0], btok[1], btok[2], btok[3]}};
    return build_traces(model_name, &path, 1, "10,20,40,80", n_tokens, tok);
}

#endif /* TEST_REPORT_UTIL_H */
