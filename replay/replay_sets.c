/* replay_sets.c - kvt_replay_sets: a replay whose only output is every kept set, merged keys
 * and values included, handed to a plain callback (for callers over a foreign-function
 * interface, which cannot build kvt_replay_opts or read kvt_selection_rec). */

#include "kvt_kernels.h"
#include "replay_internal.h"

typedef struct sets_user {
    kvt_policy **pols;
    kvt_sets_fn fn;
    void *user;
    int D;
} sets_user;

static kvt_status sets_sink(void *user, int layer, const kvt_selection_rec *recs, size_t n,
                            bool last)
{
    sets_user *u = user;
    (void)last;
    for (size_t i = 0; i < n; i++) {
        const kvt_selection_rec *r = &recs[i];
        int n_chg = 0;
        for (size_t e = 0; r->changed && e < r->n; e++)
            n_chg += r->changed[e] != 0;
        KVT_RETURN_IF(r->n > (size_t)INT32_MAX, KVT_ERR_STATE, "a kept set of %zu entries", r->n);
        if (u->fn(u->user, r->policy, r->budget, layer, r->head,
                  kvt_policy_per_query_head(u->pols[r->policy]), r->step, (int)r->n, r->idx,
                  r->changed, n_chg, u->D, r->changed ? r->k : NULL, r->changed ? r->v : NULL))
            return kvt_error_set(KVT_ERR_STATE, "the caller stopped the replay at layer %d", layer);
    }
    return KVT_OK;
}

kvt_status kvt_replay_sets(const char *path, const char *policies, const char *budgets,
                           uint64_t seed, kvt_sets_fn fn, void *user)
{
    KVT_RETURN_IF(!path || !policies || !budgets || !fn, KVT_ERR_INVALID_ARG,
                  "kvt_replay_sets: a trace, policies, budgets and a function are needed");
    kvt_policy_globals g = {.seed = seed};
    kvt_policy **pols = NULL;
    size_t n_pol = 0, n_b = 0;
    kvt_budget *bud = NULL;
    kvt_trace_reader *r = NULL;
    kvt_trace_result *res = NULL;
    kvt_status st = kvt_policy_list_parse(policies, &g, &pols, &n_pol);
    if (!st)
        st = kvt_budgets_parse(budgets, &bud, &n_b);
    uint32_t nh, nt, dim = 0;
    kvt_dtype dt;
    if (!st && !(st = kvt_trace_reader_open(path, &r)) &&
        kvt_trace_reader_shape(r, 0, KVT_KIND_K, &nh, &nt, &dim, &dt))
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: layer 0 has no keys", path);
    /* the kernels make the process's BLAS single-threaded; a caller's library that shares it
       (torch in Python) gets its own thread count back after */
    const int blas_threads = kvt_blas_threads_set(1);
    if (!st) {
        sets_user u = {.pols = pols, .fn = fn, .user = user, .D = (int)dim};
        kvt_replay_opts o = {
            .n_threads = 1, .coverage_probes = 0, .sink = sets_sink, .sink_user = &u};
        st = kvt_replay_trace(path, pols, n_pol, bud, n_b, &o, &res);
    }
    kvt_blas_threads_set(blas_threads);
    if (r)
        kvt_trace_reader_close(r);
    kvt_trace_result_free(res);
    kvt_free(bud);
    kvt_policy_list_free(pols, n_pol);
    return st;
}
