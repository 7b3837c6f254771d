/* test_replay_faults.c - allocation failure at every allocation site in turn (the kvt_malloc
 * hook of common/) during a replay: one layer with every policy but the two that need a scores
 * file (fast and reference kernels),
 * a whole trace on two worker threads, and results.json written and read back. Every failure
 * must come back as KVT_ERR_NOMEM with a message (never a crash, a wrong status or a partial
 * success), leave nothing allocated (the ASan build checks leaks), and leave no results file
 * behind; an existing results file stays intact.
 */
#include <unistd.h>

#include "kvt_analysis.h"
#include "replay_test_util.h"

enum { T = 80, D = 8, Hq = 4, Hkv = 2, W = 32, G = 3, L = 2 };

/* run f(arg) with the n-th allocation failing, for n = 1, 2, ... until nothing fails */
static int fault_loop(const char *what, kvt_status (*f)(void *), void *arg,
                      void (*after)(void *, bool failed))
{
    int n_fail = 0;
    for (uint64_t n = 1; n < 200000; n++) {
        kvt_alloc_fail_at(n);
        kvt_status s = f(arg);
        bool fired = kvt_alloc_fail_fired();
        kvt_alloc_fail_at(0);
        if (after)
            after(arg, fired);
        if (!fired) {
            KVT_EXPECT_MSG(s == KVT_OK, "%s: no failure injected, got %s (%s)", what,
                           kvt_status_str(s), kvt_error_msg());
            break;
        }
        n_fail++;
        KVT_EXPECT_MSG(s == KVT_ERR_NOMEM && kvt_error_msg()[0], "%s: allocation %llu: got %s (%s)",
                       what, (unsigned long long)n, kvt_status_str(s), kvt_error_msg());
    }
    printf("%s: %d allocation sites failed in turn\n", what, n_fail);
    KVT_EXPECT(n_fail > 10);
    return n_fail;
}

typedef struct layer_job {
    test_layer t;
    kvt_policy **pols;
    size_t n_pol;
    int budgets[4];
    kvt_head_metrics *m;
} layer_job;

static kvt_status run_layer(void *arg)
{
    layer_job *j = arg;
    return kvt_replay_layer_metrics(&j->t.in, j->pols, j->n_pol, j->budgets, 4, NULL, j->m);
}

typedef struct trace_job {
    const char *path, *out;
    kvt_policy **pols;
    size_t n_pol;
    kvt_budget *bud;
    size_t n_bud;
    kvt_trace_result *res;
} trace_job;

static kvt_status run_trace(void *arg)
{
    trace_job *j = arg;
    kvt_replay_opts o = {.n_threads = 2, .coverage_probes = 16};
    return kvt_replay_trace(j->path, j->pols, j->n_pol, j->bud, j->n_bud, &o, &j->res);
}

static void after_trace(void *arg, bool failed)
{
    trace_job *j = arg;
    KVT_EXPECT(failed ? j->res == NULL : j->res != NULL);
    kvt_trace_result_free(j->res);
    j->res = NULL;
}

/* results: build from a replayed trace, write (over an existing file), read back */
static kvt_status run_results(void *arg)
{
    trace_job *j = arg;
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = 16};
    kvt_trace_result *tr = NULL;
    kvt_results *r = NULL, *back = NULL;
    kvt_status s = kvt_replay_trace(j->path, j->pols, j->n_pol, j->bud, j->n_bud, &o, &tr);
    if (!s)
        s = kvt_results_create(j->pols, j->n_pol, j->bud, j->n_bud, &r);
    if (!s) {
        s = kvt_results_add_trace(r, tr); /* takes tr, also on failure */
        tr = NULL;
    }
    if (!s)
        s = kvt_results_write(r, j->out, true);
    if (!s)
        s = kvt_results_read(j->out, &back);
    kvt_trace_result_free(tr);
    kvt_results_free(r);
    kvt_results_free(back);
    return s;
}

int main(void)
{
    const char *specs = "full,random,streamingllm,tova,snapkv,pyramidkv,adakv,knorm,vnorm,"
                        "keydiff,mixkv-snapkv,mixkv-pyramidkv,mixkv-adakv,h2o,oracle,quest,"
                        "hybridkv-like,lightkv-like,snapkv:heads=query,adakv:alloc=b,chunkkv,"
                        "lightkv-like:heads=query,qfilter,qfilter:heads=query,cur,"
                        "cur:local=0,leverage=kv_avg,knorm:adaptive=1,keydiff-block:block=8,"
                        "simlayerkv:threshold=0.2,snapkv:merge=pivot,h2o:merge=weighted,cam";
    layer_job lj = {.budgets = {4, 36, 50, 70}};
    tl_random(&lj.t, 5, T, D, Hq, Hkv, W, G, true);
    float *cs = calloc((size_t)Hq * T, sizeof(float));
    for (int i = 0; i < Hq * T; i++)
        cs[i] = (float)(i % 7) / 7.0f;
    lj.t.in.attn_colsum = cs;
    KVT_CHECK(kvt_policy_list_parse(specs, NULL, &lj.pols, &lj.n_pol));
    lj.m = calloc(lj.n_pol * 4 * Hq, sizeof(kvt_head_metrics));
    fault_loop("layer, fast kernels", run_layer, &lj, NULL);
    kvt_kernels_use_ref(true);
    fault_loop("layer, reference kernels", run_layer, &lj, NULL);
    kvt_kernels_use_ref(false);

    /* a trace of L layers (layer i from seed i), without h2o (no column sums in it) */
    char path[256], out[256];
    kvt_test_tmp(path, sizeof(path), "faults.kvt");
    kvt_test_tmp(out, sizeof(out), "faults.json");
    test_layer layers[L];
    for (int l = 0; l < L; l++)
        tl_random(&layers[l], 10 + (uint64_t)l, T, D, Hq, Hkv, W, G, true);
    tl_write_trace(path, L, T, D, Hq, Hkv, W, G, layers);
    trace_job tj = {.path = path, .out = out};
    KVT_CHECK(kvt_policy_list_parse("snapkv,pyramidkv,adakv,oracle,quest,lightkv-like", NULL,
                                    &tj.pols, &tj.n_pol));
    KVT_CHECK(kvt_budgets_parse("8,16,50%", &tj.bud, &tj.n_bud));
    fault_loop("trace, 2 threads", run_trace, &tj, after_trace);

    /* results.json: an existing file must survive every failed write */
    FILE *f = fopen(out, "w");
    fputs("{\"previous\": true}\n", f);
    fclose(f);
    int n = 0;
    for (uint64_t k = 1; k < 200000; k++) {
        kvt_alloc_fail_at(k);
        kvt_status s = run_results(&tj);
        bool fired = kvt_alloc_fail_fired();
        kvt_alloc_fail_at(0);
        if (!fired) {
            KVT_CHECK(s);
            break;
        }
        n++;
        KVT_EXPECT_MSG(s == KVT_ERR_NOMEM, "results: allocation %llu: %s (%s)",
                       (unsigned long long)k, kvt_status_str(s), kvt_error_msg());
        char *txt = (char *)kvt_test_slurp(out, NULL);
        /* before the rename the old file is intact; after it, the new one is complete */
        KVT_EXPECT_MSG(txt && (strstr(txt, "\"previous\"") || strstr(txt, "\"aggregate\"")),
                       "results: allocation %llu left a partial file", (unsigned long long)k);
        free(txt);
    }
    printf("results write/read: %d allocation sites failed in turn\n", n);

    kvt_policy_list_free(lj.pols, lj.n_pol);
    kvt_policy_list_free(tj.pols, tj.n_pol);
    kvt_free(tj.bud);
    free(lj.m);
    free(cs);
    tl_free(&lj.t);
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    unlink(path);
    unlink(out);
    return kvt_test_result("test_replay_faults");
}
