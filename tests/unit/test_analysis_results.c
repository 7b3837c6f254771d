/* test_analysis_results.c - results.json written and read back gives the same numbers (NaN as
 * null), summaries follow their definitions, a newer results_version is refused, and the
 * selection export (binary and JSON) holds exactly the kept sets of kvt_replay_layer_select in
 * the documented layout and order.
 */
#include <time.h>

#include <cjson/cJSON.h>

#include "kvt_analysis.h"
#include "replay_test_util.h"

enum { L = 3, T = 48, D = 8, Hq = 4, Hkv = 2, W = 8, G = 3 };
#define NPOL 6
static const char *specs[NPOL] = {
    "snapkv:window=8", "adakv:window=8,heads=query", "quest",
    "oracle",          "lightkv-like:window=8",      "tova:decoding=1,prefill=1"};

static bool same(double a, double b)
{
    return (isnan(a) && isnan(b)) || a == b;
}

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* a results.json of one policy, one budget and one trace that claims n_layers L, n_q_heads Hq
 * and n_kv_heads Hkv, with one run of n_heads H' whose nine metric grids are `grid`, and r_all
 * `r_all` (JSON text) */
static const char *claim_metrics_extra = ""; /* more entries of the run's "metrics" */
static int claim_tokens = 100;               /* the trace's n_tokens */

static void write_claim(const char *path, int n_layers, int n_q, int n_kv, int n_heads,
                        const char *grid, const char *r_all, const char *runs_extra)
{
    static const char *names[] = {"n_keep",          "recall_window", "err_window",
                                  "recall_decode",   "err_decode",    "coverage",
                                  "coverage_radius", "r_kept",        "oracle_overlap"};
    FILE *f = fopen(path, "w");
    KVT_EXPECT(f != NULL);
    if (!f)
        return;
    fprintf(f,
            "{\"results_version\": 1, \"settings\": {\"policies\": [{\"label\": \"snapkv\", "
            "\"name\": \"snapkv\"}], \"budgets\": [{\"text\": \"40\", \"kind\": \"tokens\", "
            "\"value\": 40}]}, \"traces\": [{\"path\": \"claim.kvt\", \"n_layers\": %d, "
            "\"n_q_heads\": %d, \"n_kv_heads\": %d, \"n_tokens\": %d, \"head_dim\": 4, "
            "\"r_all\": %s, \"runs\": [",
            n_layers, n_q, n_kv, claim_tokens, r_all);
    if (grid) {
        fprintf(f,
                "{\"policy\": 0, \"budget\": 0, \"n_heads\": %d, \"budget_tokens\": 40, "
                "\"metrics\": {",
                n_heads);
        for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
            fprintf(f, "%s\"%s\": %s", k ? ", " : "", names[k], grid);
        fprintf(f, "%s}%s}", claim_metrics_extra, runs_extra);
    }
    fputs("]}]}\n", f);
    fclose(f);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* claims the file cannot back are refused before anything is sized from them (RELIABILITY.md:
 * 20000 x 1000 used to allocate and NaN-fill 3.2 GB first) */
static void test_claimed_dimensions(const char *path)
{
    kvt_results *r = NULL;
    const char *g22 = "[[0.5, null], [1, 0.25]]";
    /* huge claim, small grids: the size bound (and the shapes) refuse it */
    write_claim(path, 20000, 1000, 1000, 1000, g22, "[[0.1, 0.2], [0.3, 0.4]]", "");
    (void)kvt_alloc_fail_at(0); /* restart the allocation count */
    double t0 = now_s();
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    double dt = now_s() - t0;
    uint64_t n_allocs = kvt_alloc_fail_at(0);
    KVT_EXPECT_MSG(dt < 1.0, "refusing a 20000 x 1000 claim took %.2f s", dt);
    /* the file's strings and arrays only; create() makes ~10 more, one of them 3.2 GB */
    KVT_EXPECT_MSG(n_allocs < 16, "%llu allocations", (unsigned long long)n_allocs);
    KVT_EXPECT(r == NULL);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "claim.kvt") && strstr(kvt_error_msg(), "n_layers"),
                   "message: %s", kvt_error_msg());
    /* the same claim with no runs and no r_all: nothing to check the shape of, the bound holds */
    write_claim(path, 20000, 1000, 1000, 1000, NULL, "null", "");
    t0 = now_s();
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT(now_s() - t0 < 1.0 && r == NULL);
    /* overflowing products are refused, not wrapped */
    write_claim(path, 2147483647, 2147483647, 1, 1, NULL, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    /* small claims within the bound: every grid must still be exactly [L][n_heads] */
    write_claim(path, 3, 2, 2, 2, g22, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "metrics.n_keep is not [3][2]"), "message: %s",
                   kvt_error_msg());
    write_claim(path, 2, 2, 2, 2, g22, "[[0.1, 0.2]]", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "r_all is not [2][2]"), "message: %s", kvt_error_msg());
    write_claim(path, 2, 2, 2, 2, g22, "null, \"r_all_by_modality\": {\"image\": [[0.1, 0.2]]}",
                "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "r_all_by_modality.image is not [2][2]"), "message: %s",
                   kvt_error_msg());
    write_claim(path, 2, 2, 2, 2, g22,
                "null, \"r_all_by_modality\": {\"text\": [[0.1, 0.2], [0.3, 7]]}", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT); /* r > 1 */
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "r_all_by_modality.text"), "message: %s",
                   kvt_error_msg());
    write_claim(path, 2, 2, 2, 2, g22, "null",
                ", \"by_modality\": {\"n_keep\": {\"text\": [[1, 2, 3], [4, 5, 6]]}}");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    write_claim(path, 2, 4, 2, 3, g22, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT); /* n_heads not Hkv or Hq */
    /* a run that names another policy or budget than the settings (a hand edit) */
    write_claim(path, 2, 2, 2, 2, g22, "null", ", \"label\": \"h2o\"");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "is not labelled snapkv at budget 40"), "message: %s",
                   kvt_error_msg());
    write_claim(path, 2, 2, 2, 2, g22, "null", ", \"budget_text\": \"64\"");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    write_claim(path, 2, 2, 2, 2, g22, "null", ", \"label\": \"snapkv\", \"budget_text\": \"40\"");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_OK);
    kvt_results_free(r);
    r = NULL;
    /* ... and a matching file still reads: null = NaN, r_all absent = NaN */
    write_claim(path, 2, 2, 2, 2, g22, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_OK);
    if (r) {
        const kvt_trace_result *t = r->traces[0];
        const kvt_head_metrics *m0 = kvt_trace_result_at(t, 0, 0, 0, 0);
        const kvt_head_metrics *m1 = kvt_trace_result_at(t, 0, 0, 0, 1);
        const kvt_head_metrics *m3 = kvt_trace_result_at(t, 0, 0, 1, 1);
        KVT_EXPECT(m0->recall_window == 0.5 && isnan(m1->recall_window) &&
                   m3->oracle_overlap == 0.25 && isnan(t->r_all[3]));
        /* the metrics added within version 1 are absent here (an older file): null */
        KVT_EXPECT(isnan(m0->coverage_dropped) && isnan(m3->head_overlap));
        for (int k = 0; k < KVT_N_MODALITIES; k++)
            KVT_EXPECT(isnan(m0->r_kept_mod[k]) && isnan(t->r_all_mod[k]));
        kvt_results_free(r);
        r = NULL;
    }
    /* ... but present, they must have the grid's shape, and are read */
    claim_metrics_extra = ", \"head_overlap\": [[0.5]]";
    write_claim(path, 2, 2, 2, 2, g22, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "metrics.head_overlap is not [2][2]"), "message: %s",
                   kvt_error_msg());
    claim_metrics_extra = ", \"head_overlap\": [[0.5, 1], [null, 0.75]]";
    write_claim(path, 2, 2, 2, 2, g22, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_OK);
    if (r) {
        const kvt_trace_result *t = r->traces[0];
        KVT_EXPECT(kvt_trace_result_at(t, 0, 0, 1, 1)->head_overlap == 0.75 &&
                   isnan(kvt_trace_result_at(t, 0, 0, 1, 0)->head_overlap));
        kvt_results_free(r);
        r = NULL;
    }
    claim_metrics_extra = "";
    /* values no replay writes: refused with the metric and the place, not summarised into nan */
    const struct {
        const char *grid, *msg;
    } bad[] = {{"[[7, 0.5], [0.5, 0.5]]", "metrics.recall_window[0][0] = 7: not null or a number"},
               {"[[\"abc\", 1], [1, 1]]", "metrics.n_keep[0][0] = \"abc\""},
               {"[[1e999, 1], [1, 1]]", "metrics.n_keep[0][0]"},
               {"[[-3, 0], [0, 0]]", "metrics.n_keep[0][0] = -3"},
               {"[[101, 0], [0, 0]]", "metrics.n_keep[0][0] = 101"},
               {"[[0.5, 0.5], [0.5, -0.5]]",
                "metrics.n_keep[1][1] = -0.5: not null or a number in [0, 100]"}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        write_claim(path, 2, 2, 2, 2, bad[i].grid, "null", "");
        KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), bad[i].msg), "%s: %s", bad[i].grid, kvt_error_msg());
    }
    claim_tokens = 0; /* shares and byte counts divide by T */
    write_claim(path, 2, 2, 2, 2, g22, "null", "");
    KVT_EXPECT_STATUS(kvt_results_read(path, &r), KVT_ERR_CORRUPT);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "n_tokens 0"), "message: %s", kvt_error_msg());
    claim_tokens = 100;
    kvt_error_clear();
}

/* The export of one process rebuilt from two "processes" (blocks writers, even and odd
 * layers, replayed with a layer mask) and a file writer taking their layers in order: the same
 * bytes as ref (an MPI launch's --export-selection) */
static void test_blocks(const char *tpath, kvt_policy **pols, const kvt_budget *bud, size_t nb,
                        const char *ref, const char *out)
{
    const char *tp[1] = {tpath};
    int btok[3] = {12, 12, 100};
    kvt_selection_writer *part[2], *fw;
    for (int r = 0; r < 2; r++) {
        uint8_t mask[L];
        for (int l = 0; l < L; l++)
            mask[l] = (uint8_t)(l % 2 == r);
        KVT_CHECK(kvt_selection_writer_open_blocks(out, pols, NPOL, nb, 1, &part[r]));
        KVT_CHECK(kvt_selection_writer_begin_trace(part[r], 0, L, btok));
        kvt_replay_opts o = {.n_threads = 2,
                             .coverage_probes = -1,
                             .sink = kvt_selection_writer_sink,
                             .sink_user = part[r],
                             .layer_mask = mask,
                             .layer_mask_len = L};
        kvt_trace_result *tr = NULL;
        KVT_CHECK(kvt_replay_trace(tpath, pols, NPOL, bud, nb, &o, &tr));
        kvt_trace_result_free(tr);
        KVT_CHECK(kvt_selection_writer_end_trace(part[r])); /* half the layers: fine here */
    }
    char *bytes = NULL;
    size_t n = 0, nr = 0;
    KVT_EXPECT_STATUS(kvt_selection_writer_take_block(part[0], 0, 1, &bytes, &n, &nr),
                      KVT_ERR_NOT_FOUND); /* odd layers are the other process's */
    KVT_EXPECT_STATUS(kvt_selection_writer_take_block(part[0], 1, 0, &bytes, &n, &nr),
                      KVT_ERR_NOT_FOUND); /* no trace 1 */
    KVT_CHECK(kvt_selection_writer_open(out, true, pols, NPOL, bud, nb, tp, 1, &fw));
    KVT_CHECK(kvt_selection_writer_begin_trace(fw, 0, L, btok));
    for (int l = L - 1; l >= 0; l--) { /* any order: the writer writes in layer order */
        KVT_CHECK(kvt_selection_writer_take_block(part[l % 2], 0, l, &bytes, &n, &nr));
        KVT_EXPECT(nr > 0 && n > 0);
        KVT_CHECK(kvt_selection_writer_put_block(fw, l, bytes, n, nr));
    }
    KVT_EXPECT_STATUS(kvt_selection_writer_take_block(part[0], 0, 0, &bytes, &n, &nr),
                      KVT_ERR_NOT_FOUND); /* taken already */
    bytes = kvt_malloc(4);
    KVT_EXPECT_STATUS(kvt_selection_writer_put_block(fw, 0, bytes, 0, 0), KVT_ERR_STATE);
    KVT_CHECK(kvt_selection_writer_end_trace(fw));
    KVT_CHECK(kvt_selection_writer_close(fw));
    KVT_CHECK(kvt_selection_writer_close(part[0]));
    KVT_CHECK(kvt_selection_writer_close(part[1]));
    size_t na = 0, nb2 = 0;
    unsigned char *a = kvt_test_slurp(ref, &na), *b = kvt_test_slurp(out, &nb2);
    KVT_EXPECT_MSG(a && b && na == nb2 && !memcmp(a, b, na), "%s: %zu bytes vs %zu in %s", out, nb2,
                   na, ref);
    free(a);
    free(b);
    /* a blocks writer refuses a trace begun twice */
    KVT_CHECK(kvt_selection_writer_open_blocks(out, pols, NPOL, nb, 1, &part[0]));
    KVT_CHECK(kvt_selection_writer_begin_trace(part[0], 0, L, btok));
    KVT_EXPECT_STATUS(kvt_selection_writer_begin_trace(part[0], 0, L, btok), KVT_ERR_STATE);
    KVT_CHECK(kvt_selection_writer_close(part[0]));
}

int main(void)
{
    test_layer layers[L];
    for (int l = 0; l < L; l++) {
        tl_random(&layers[l], 300 + (uint64_t)l, T, D, Hq, Hkv, W, G, true);
        layers[l].in.layer = l;
        layers[l].in.n_layers = L;
    }
    char tpath[256], rpath[256], bpath[256], jpath[256];
    kvt_test_tmp(tpath, sizeof(tpath), "a.kvt");
    kvt_test_tmp(rpath, sizeof(rpath), "results.json");
    kvt_test_tmp(bpath, sizeof(bpath), "sel.bin");
    kvt_test_tmp(jpath, sizeof(jpath), "sel.json");
    tl_write_trace(tpath, L, T, D, Hq, Hkv, W, G, layers);

    kvt_policy *pols[NPOL];
    for (int i = 0; i < NPOL; i++)
        KVT_CHECK(kvt_policy_create(specs[i], NULL, &pols[i]));
    kvt_budget *bud;
    size_t nb;
    KVT_CHECK(kvt_budgets_parse("12,25%,100", &bud, &nb));
    const char *tp[1] = {tpath};
    kvt_selection_writer *wb, *wj;
    KVT_CHECK(kvt_selection_writer_open(bpath, true, pols, NPOL, bud, nb, tp, 1, &wb));
    KVT_CHECK(kvt_selection_writer_open(jpath, true, pols, NPOL, bud, nb, tp, 1, &wj));
    int btok[3] = {12, 12, 100};
    KVT_CHECK(kvt_selection_writer_begin_trace(wb, 0, L, btok));
    KVT_CHECK(kvt_selection_writer_begin_trace(wj, 0, L, btok));
    /* one replay into the binary writer (3 threads: out-of-order layers), one into JSON */
    kvt_replay_opts o = {
        .n_threads = 3, .coverage_probes = -1, .sink = kvt_selection_writer_sink, .sink_user = wb};
    kvt_trace_result *tr = NULL, *tr2 = NULL;
    KVT_CHECK(kvt_replay_trace(tpath, pols, NPOL, bud, nb, &o, &tr));
    o.sink_user = wj;
    o.n_threads = 1;
    KVT_CHECK(kvt_replay_trace(tpath, pols, NPOL, bud, nb, &o, &tr2));
    kvt_trace_result_free(tr2);
    KVT_CHECK(kvt_selection_writer_end_trace(wb));
    KVT_CHECK(kvt_selection_writer_end_trace(wj));
    KVT_CHECK(kvt_selection_writer_close(wb));
    KVT_CHECK(kvt_selection_writer_close(wj));
    {
        char b2[256], j2[256];
        test_blocks(tpath, pols, bud, nb, bpath, kvt_test_tmp(b2, sizeof(b2), "sel2.bin"));
        test_blocks(tpath, pols, bud, nb, jpath, kvt_test_tmp(j2, sizeof(j2), "sel2.json"));
        remove(b2);
        remove(j2);
    }

    kvt_results *res;
    KVT_CHECK(kvt_results_create(pols, NPOL, bud, nb, &res));
    KVT_CHECK(kvt_results_add_trace(res, tr));
    KVT_EXPECT_STATUS(kvt_results_write(res, rpath, true), KVT_OK);
    KVT_EXPECT_STATUS(kvt_results_write(res, rpath, false), KVT_ERR_IO); /* exists */
    kvt_results *back = NULL;
    KVT_EXPECT_STATUS(kvt_results_read(rpath, &back), KVT_OK);
    if (back) {
        KVT_EXPECT(back->n_policies == NPOL && back->n_budgets == 3 && back->n_traces == 1);
        KVT_EXPECT(!strcmp(back->policies[1].label, specs[1]));
        KVT_EXPECT(back->policies[2].flags & KVT_POLICY_PER_STEP);
        const kvt_trace_result *a = res->traces[0], *b = back->traces[0];
        KVT_EXPECT(b->n_tokens == T && b->n_decode == G && b->has_modality);
        KVT_EXPECT(b->policy_heads[1] == Hq && b->policy_heads[0] == Hkv);
        KVT_EXPECT(b->budget_tokens[1] == 12 && b->policy_window[0] == 8);
        int diffs = 0;
        for (size_t p = 0; p < NPOL; p++)
            for (size_t k = 0; k < 3; k++)
                for (int l = 0; l < L; l++)
                    for (int h = 0; h < a->policy_heads[p]; h++) {
                        const double *x = (const double *)kvt_trace_result_at(a, p, k, l, h);
                        const double *y = (const double *)kvt_trace_result_at(b, p, k, l, h);
                        for (size_t f = 0; f < sizeof(kvt_head_metrics) / sizeof(double); f++)
                            if (!same(x[f], y[f]) && diffs++ < 5)
                                fprintf(stderr, "p%zu b%zu l%d h%d field %zu: %.17g vs %.17g\n", p,
                                        k, l, h, f, x[f], y[f]);
                    }
        KVT_EXPECT_MSG(diffs == 0, "%d values differ after the round trip", diffs);
        for (int l = 0; l < L * Hkv; l++)
            KVT_EXPECT(same(a->r_all[l], b->r_all[l]));
        /* redundancy by modality: a text-and-image prompt has both, read back bit for bit */
        for (int i = 0; i < L * Hkv * KVT_N_MODALITIES; i++)
            KVT_EXPECT(same(a->r_all_mod[i], b->r_all_mod[i]) &&
                       isnan(a->r_all_mod[i]) == (i % KVT_N_MODALITIES > 1));
        kvt_run_summary s1, s2;
        KVT_CHECK(kvt_summarize_results(res, 0, 0, &s1));
        KVT_CHECK(kvt_summarize_results(back, 0, 0, &s2));
        KVT_EXPECT(s1.recall_window == s2.recall_window && s1.kept_bytes == s2.kept_bytes);
        KVT_EXPECT(s1.r_all_mod[1] == s2.r_all_mod[1] && !isnan(s1.r_all_mod[1]) &&
                   s1.r_kept_mod[0] == s2.r_kept_mod[0] && !isnan(s1.r_kept_mod[0]) &&
                   isnan(s1.r_kept_mod[2]));
        /* definitions: snapkv at B=12 keeps 12 per KV head everywhere */
        KVT_EXPECT(s1.kept_entries == 12.0 * L * Hkv && s1.full_entries == (double)L * Hkv * T);
        KVT_EXPECT_NEAR(s1.compression_ratio, T / 12.0, 1e-12);
        KVT_EXPECT(s1.kept_bytes == 12.0 * L * Hkv * D * 2 * 4);
        KVT_EXPECT(isnan(s1.kept_mod[2]) == false && s1.kept_mod[0] + s1.kept_mod[1] == 72);
        kvt_run_summary q;
        KVT_CHECK(kvt_summarize_results(res, 2, 0, &q));
        KVT_EXPECT(isnan(q.recall_window) && !isnan(q.recall_decode));
        kvt_results_free(back);
    }
    /* the text form (how MPI ranks exchange results): the file's bytes without its newline;
     * parsed and printed again it is the same text; cut short it is refused by name */
    {
        char *txt = NULL, *txt2 = NULL;
        size_t len = 0, len2 = 0, flen = 0;
        unsigned char *file = kvt_test_slurp(rpath, &flen);
        KVT_CHECK(kvt_results_to_json(res, &txt, &len));
        KVT_EXPECT(file && flen == len + 1 && !memcmp(file, txt, len) && file[len] == '\n');
        kvt_results *again = NULL;
        KVT_EXPECT_STATUS(kvt_results_parse(txt, len, "rank 1", &again), KVT_OK);
        if (again) {
            KVT_CHECK(kvt_results_to_json(again, &txt2, &len2));
            KVT_EXPECT(len2 == len && !memcmp(txt, txt2, len));
            kvt_results_free(again);
            again = NULL;
        }
        KVT_EXPECT_STATUS(kvt_results_parse(txt, len / 2, "rank 1", &again), KVT_ERR_CORRUPT);
        KVT_EXPECT(again == NULL && strstr(kvt_error_msg(), "rank 1"));
        kvt_free(txt);
        kvt_free(txt2);
        free(file);
    }
    /* a future version is refused */
    FILE *f = fopen(rpath, "w");
    fputs("{\"results_version\": 99}", f);
    fclose(f);
    KVT_EXPECT_STATUS(kvt_results_read(rpath, &back), KVT_ERR_VERSION);
    test_claimed_dimensions(rpath);

    /* the binary export: every record equals the in-memory selection. quest's steps make it
     * version 3: a step's record may hold its removed, then its added tokens against the
     * step before (flag 8; the reserved u32 counts the removed), applied here by hand */
    size_t n = 0;
    unsigned char *raw = kvt_test_slurp(bpath, &n);
    KVT_EXPECT(raw && n > 16 && !memcmp(raw, "KVTSEL\0\1", 8) && rd32(raw + 8) == 3);
    size_t off = 16 + rd32(raw + 12);
    cJSON *hdr = cJSON_ParseWithLength((const char *)raw + 16, rd32(raw + 12));
    KVT_EXPECT(hdr && cJSON_GetArraySize(cJSON_GetObjectItem(hdr, "policies")) == NPOL);
    cJSON_Delete(hdr);
    kvt_layer_selection *sel[L][NPOL];
    int bt[3] = {12, 12, 100};
    for (int l = 0; l < L; l++)
        for (int p = 0; p < NPOL; p++)
            KVT_CHECK(kvt_replay_layer_select(&layers[l].in, pols[p], bt, 3, &sel[l][p]));
    int n_rec = 0, bad = 0, last_layer = 0, n_delta = 0, n_evict = 0;
    /* the layer's sets by (policy, budget, head, step + 1): a delta record's base (a step's
       sets hold decode tokens too) */
    static int32_t set[NPOL][3][Hq][G + 1][T + G];
    static size_t n_set[NPOL][3][Hq][G + 1];
    int n_bdelta = 0;
    while (off + 36 <= n && rd32(raw + off) != 0x444E454Bu) { /* records, then "KEND" */
        const unsigned char *r = raw + off;
        KVT_EXPECT(rd32(r) == 0x4C45534Bu);
        int pol = r[6] | r[7] << 8, b = r[8] | r[9] << 8, flags = r[10] | r[11] << 8;
        int layer = (int)rd32(r + 12), head = (int)rd32(r + 16), step = (int32_t)rd32(r + 20);
        uint32_t cnt = rd32(r + 28);
        KVT_EXPECT(layer >= last_layer); /* layer order */
        last_layer = layer;
        KVT_EXPECT(((flags & 1) != 0) == (step >= 0));
        KVT_EXPECT(((flags & 4) != 0) == (pol == 1));
        KVT_CHECK(pol < NPOL && b < 3 && head < Hq && step + 1 <= G ? KVT_OK : KVT_ERR_CORRUPT);
        int32_t *cur = set[pol][b][head][step + 1];
        size_t nc = 0;
        if (flags & 24) { /* the base without the removed, with the added: a membership table */
            uint32_t n_rm = rd32(r + 32);
            const bool by_step = flags & 8;
            KVT_EXPECT((flags & 24) != 24 && (by_step ? step >= 0 : b >= 1));
            const int bb = by_step ? b : b - 1, bs = by_step ? step - 1 : step;
            const int32_t *prev = set[pol][bb < 0 ? 0 : bb][head][bs + 1 < 0 ? 0 : bs + 1];
            const size_t n_prev = n_set[pol][bb < 0 ? 0 : bb][head][bs + 1 < 0 ? 0 : bs + 1];
            bool in[T + G] = {false};
            for (size_t i = 0; i < n_prev; i++)
                in[prev[i]] = true;
            for (uint32_t i = 0; i < cnt && n_rm <= cnt; i++) {
                uint32_t x = rd32(r + 36 + 4 * i);
                KVT_EXPECT(x < T + G && in[x] == (i < n_rm)); /* removes held, adds new */
                if (x < T + G)
                    in[x] = i >= n_rm;
            }
            for (int x = 0; x < T + G; x++)
                if (in[x])
                    cur[nc++] = x;
            KVT_EXPECT(n_rm <= cnt);
            n_evict += by_step && n_rm > 0;
            KVT_EXPECT(cnt < nc); /* written as a delta only when that is smaller */
            n_delta += by_step;
            n_bdelta += !by_step;
        } else {
            for (uint32_t i = 0; i < cnt && i < T + G; i++)
                cur[nc++] = (int32_t)rd32(r + 36 + 4 * i);
            KVT_EXPECT(cnt <= T + G);
        }
        int32_t want[T + G];
        size_t nw = 0;
        KVT_CHECK(
            kvt_layer_selection_kept(sel[layer][pol], (size_t)b, head, step, want, T + G, &nw));
        bad += nw != nc || memcmp(want, cur, nc * sizeof(int32_t));
        n_set[pol][b][head][step + 1] = nc;
        off += 36 + 4 * (size_t)cnt;
        n_rec++;
    }
    KVT_EXPECT(off + 16 == n && rd32(raw + off) == 0x444E454Bu &&
               rd32(raw + off + 8) == (uint32_t)n_rec);
    /* per layer: snapkv 3x2, adakv 3x4, quest 3x2x3 steps, oracle 3x2, lightkv 3x2, tova
     * 3x2x(1 + 3) */
    KVT_EXPECT_MSG(n_rec == L * (6 + 12 + 18 + 6 + 6 + 24), "%d records", n_rec);
    KVT_EXPECT(bad == 0);
    KVT_EXPECT_MSG(n_delta > 0 && n_evict > 0 && n_bdelta > 0,
                   "%d step deltas, %d removing tokens; %d budget deltas", n_delta, n_evict,
                   n_bdelta);
    printf("binary export: %d records, %d of them step deltas (%d removing tokens), %d budget "
           "deltas\n",
           n_rec, n_delta, n_evict, n_bdelta);
    free(raw);
    /* the JSON export parses and holds the same number of records */
    raw = kvt_test_slurp(jpath, &n);
    cJSON *js = raw ? cJSON_Parse((const char *)raw) : NULL;
    KVT_EXPECT(js && cJSON_GetArraySize(cJSON_GetObjectItem(js, "records")) == n_rec);
    if (js) {
        cJSON *r0 = cJSON_GetArrayItem(cJSON_GetObjectItem(js, "records"), 0);
        KVT_EXPECT(cJSON_GetObjectItem(r0, "layer")->valueint == 0 &&
                   cJSON_GetObjectItem(r0, "step")->valueint == -1 &&
                   cJSON_GetArraySize(cJSON_GetObjectItem(r0, "kept")) == 12);
    }
    cJSON_Delete(js);
    free(raw);
    for (int l = 0; l < L; l++)
        for (int p = 0; p < NPOL; p++)
            kvt_layer_selection_free(sel[l][p]);
    kvt_results_free(res);
    for (int i = 0; i < NPOL; i++)
        kvt_policy_free(pols[i]);
    kvt_free(bud);
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    unlink(tpath);
    unlink(rpath);
    unlink(bpath);
    unlink(jpath);
    return kvt_test_result("test_analysis_results");
}
