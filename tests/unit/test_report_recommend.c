/* test_report_recommend.c - kvt_recommend on a constructed result (one trace, L=2, two KV
 * heads, T=100, budgets 10/20/40/80) whose answers are computed by hand in the comments:
 * cheapest setting, ties, knees, per-layer / per-head budgets, the layer allocation, "nothing
 * meets", the metric fallback, argument errors, and the same answers after a results.json
 * write/read round trip. Then the same data with budgets above the prompt (entry counts use
 * min(budget, T), "all"), two traces of different prompts with percentage budgets (every count
 * summed over both), a metric measured on one trace of two, budgets that all keep the whole
 * prompt, and the messages of a metric no candidate has. Values are dyadic so every mean is
 * exact in double.
 */
#include "test_report_util.h"

/* the text and JSON of a recommendation, into buf */
static void render(const kvt_recommendation *rec, const kvt_results *r, char *buf, size_t cap)
{
    char path[256];
    kvt_test_tmp(path, sizeof(path), "render.txt");
    FILE *f = fopen(path, "w+");
    KVT_CHECK(f ? KVT_OK : KVT_ERR_IO);
    KVT_EXPECT_STATUS(kvt_recommendation_print(rec, r, f), KVT_OK);
    KVT_EXPECT_STATUS(kvt_recommendation_write_json(rec, r, f), KVT_OK);
    rewind(f);
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = 0;
    fclose(f);
    remove(path);
}

#define EXPECT_IN(buf, s)     KVT_EXPECT_MSG(strstr(buf, s) != NULL, "no '%s' in:\n%s", s, buf)
#define EXPECT_NOT_IN(buf, s) KVT_EXPECT_MSG(strstr(buf, s) == NULL, "'%s' in:\n%s", s, buf)

/* T = 30: budgets 40 and 80 keep the whole prompt (30 tokens), whatever their number */
static void check_above_prompt(void)
{
    const char *path = "short.kvt";
    const int n_tokens[1] = {30};
    const int tok[1][NB] = {{10, 20, 40, 80}};
    kvt_results *r = build_traces("short", &path, 1, "10,20,40,80", n_tokens, tok);
    kvt_recommend_opts o = {KVT_REC_METRIC_AUTO, true, 0.25};
    kvt_recommendation *rec = NULL;
    char buf[8192];
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->found && rec->policy == P_SNAP && rec->budget == 1);
    if (rec && rec->found && rec->n_layers == L) {
        /* as check_main, but budget 40 keeps 30 tokens: layer 1 (40) costs 2*30, head
         * (1, 0) 30. Uniform 4*20 = 80, layers 2*20 + 2*30 = 100, heads 20+20+30+20 = 90;
         * the allocation stays 20/20 = 80. Full cache 2*2*30 = 120. */
        KVT_EXPECT(rec->layer_budget[0] == 1 && rec->layer_budget[1] == 2);
        KVT_EXPECT(rec->head_budget[2] == 2);
        KVT_EXPECT_NEAR(rec->uniform_entries, 80, 0);
        KVT_EXPECT_NEAR(rec->layer_entries, 100, 0);
        KVT_EXPECT_NEAR(rec->head_entries, 90, 0);
        KVT_EXPECT_NEAR(rec->alloc_entries, 80, 0);
        KVT_EXPECT(rec->budget_keeps_all[2] && rec->budget_keeps_all[3] &&
                   !rec->budget_keeps_all[1]);
        render(rec, r, buf, sizeof(buf));
        EXPECT_IN(buf, "  L0:20 L1:all\n");
        EXPECT_IN(buf, "entries (full cache 120): uniform 80, allocation 80, per-layer 100, "
                       "per-head 90 (");
        EXPECT_IN(buf, "  L1     all    20\n");
        EXPECT_IN(buf, "\"layer_budget_tokens\":\t[20, 30]");
        EXPECT_IN(buf, "\"layer_budget\":\t[\"20\", \"all\"]");
        EXPECT_IN(buf, "\"head_entries\":\t90");
        EXPECT_NOT_IN(buf, "L1:40");
    }
    kvt_recommendation_free(rec);

    /* err_decode <= 0.2: snapkv at 40 (0.140625) and 80 (0.0625) meet but keep the whole
     * cache (4*30 = 120 entries); at equal cost the better value names snapkv at 80. Nothing
     * below meets; the nearest is snapkv at 20 (0.25). */
    o.target = 0.2;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && !rec->found && rec->any_compressing && rec->full_cache_meets);
    KVT_EXPECT(rec && rec->full_cache_policy == P_SNAP && rec->full_cache_budget == 3);
    KVT_EXPECT(rec && rec->has_closest && rec->closest_policy == P_SNAP &&
               rec->closest_budget == 1);
    if (rec) {
        render(rec, r, buf, sizeof(buf));
        EXPECT_IN(buf, "recommended: none: no setting below the full cache meets the target "
                       "(snapkv at budget 80 meets it by keeping the whole cache");
        EXPECT_IN(buf, "; the nearest is snapkv at budget 20 (err_decode 0.25)");
        EXPECT_IN(buf, "\"why_none\":\t\"only_full_cache_meets\"");
        EXPECT_IN(buf, "\"whole_prompt\":\ttrue");
    }
    kvt_recommendation_free(rec);
    kvt_results_free(r);

    /* T = 10: every budget keeps the whole prompt; nothing compresses, nothing is nearest */
    const int n10[1] = {10};
    r = build_traces("tiny", &path, 1, "10,20,40,80", n10, tok);
    o.target = 0.25;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && !rec->found && !rec->any_compressing && !rec->has_closest);
    if (rec) {
        render(rec, r, buf, sizeof(buf));
        EXPECT_IN(buf, "recommended: none: no setting below the full cache meets the target "
                       "(budgets 10, 20, 40, 80 keep the whole prompt");
        EXPECT_IN(buf, "replay budgets below the prompt length\n");
        EXPECT_IN(buf, "\"why_none\":\t\"no_compressing_setting\"");
    }
    kvt_recommendation_free(rec);
    kvt_results_free(r);
}

/* two traces, T = 100 and 50, budgets 10%..80%: 10/20/40/80 and 5/10/20/40 tokens. The values
 * are the same on both, so the answers are those of check_main, but every count covers both
 * traces: snapkv at 20% keeps 4*20 + 4*10 = 120 of 400 + 200 = 600 entries; uniform 120,
 * layers 2*30 + 2*60 = 180, heads 30+30+60+30 = 150, allocation 20%/20% = 120. */
static void check_two_traces(void)
{
    const char *paths[2] = {"long.kvt", "short.kvt"};
    const int n_tokens[2] = {100, 50};
    const int tok[2][NB] = {{10, 20, 40, 80}, {5, 10, 20, 40}};
    kvt_results *r = build_traces("two", paths, 2, "10%,20%,40%,80%", n_tokens, tok);
    kvt_recommend_opts o = {KVT_REC_METRIC_AUTO, true, 0.25};
    kvt_recommendation *rec = NULL;
    char buf[8192];
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->found && rec->policy == P_SNAP && rec->budget == 1);
    if (rec && rec->found) {
        KVT_EXPECT_NEAR(rec->summary.kept_entries, 120, 0);
        KVT_EXPECT_NEAR(rec->summary.full_entries, 600, 0);
        KVT_EXPECT_NEAR(rec->uniform_entries, 120, 0);
        KVT_EXPECT_NEAR(rec->layer_entries, 180, 0);
        KVT_EXPECT_NEAR(rec->head_entries, 150, 0);
        KVT_EXPECT_NEAR(rec->alloc_entries, 120, 0);
        render(rec, r, buf, sizeof(buf));
        EXPECT_IN(buf, "target: err_decode <= 0.25 (mean over 2 traces, layers and heads)\n");
        EXPECT_IN(buf, "recommended: snapkv at budget 20% (20 or 10 tokens per KV head per layer, "
                       "by trace): err_decode 0.25, keeps 20.0% of the KV cache (5x smaller, "
                       "120 of 600 entries)");
        EXPECT_IN(buf, "entries summed over the 2 traces (full cache 600): uniform 120, "
                       "allocation 120, per-layer 180, per-head 150 (");
        EXPECT_IN(buf, "\"tokens\":\tnull");
        EXPECT_IN(buf, "\"tokens_by_trace\":\t[20, 10]");
        EXPECT_IN(buf, "\"layer_budget_tokens\":\t[[20, 10], [40, 20]]");
    }
    kvt_recommendation_free(rec);

    /* three traces (T = 100, 50, 100): a range */
    const char *p3[3] = {"a.kvt", "b.kvt", "c.kvt"};
    const int n3[3] = {100, 50, 100};
    const int tok3[3][NB] = {{10, 20, 40, 80}, {5, 10, 20, 40}, {10, 20, 40, 80}};
    kvt_results *r3 = build_traces("three", p3, 3, "10%,20%,40%,80%", n3, tok3);
    KVT_EXPECT_STATUS(kvt_recommend(r3, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->found);
    if (rec && rec->found) {
        render(rec, r3, buf, sizeof(buf));
        EXPECT_IN(buf, "(10 to 20 tokens per KV head per layer, by trace)");
        KVT_EXPECT_NEAR(rec->uniform_entries, 4 * 50, 0);
        KVT_EXPECT_NEAR(rec->uniform_entries, rec->summary.kept_entries, 0);
    }
    kvt_recommendation_free(rec);
    kvt_results_free(r3);

    /* err_decode measured on one trace of the two (the second has no decode steps): the
     * mean is over that one, and the text and JSON say so */
    kvt_trace_result *nd = r->traces[1];
    nd->n_decode = 0;
    for (size_t p = 0; p < NP; p++)
        for (size_t b = 0; b < NB; b++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++)
                    kvt_trace_result_at(nd, p, b, l, h)->err_decode = NAN;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->metric == KVT_REC_METRIC_ERR_DECODE && rec->n_traces_measured == 1 &&
               rec->trace_measured[0] && !rec->trace_measured[1]);
    KVT_EXPECT(rec && rec->found && rec->policy == P_SNAP && rec->budget == 1);
    if (rec) {
        render(rec, r, buf, sizeof(buf));
        EXPECT_IN(buf, "target: err_decode <= 0.25 (mean over 1 of 2 traces, layers and heads; "
                       "err_decode is not measured on short.kvt (no decode steps))\n");
        EXPECT_IN(buf, "\"n_traces\":\t2");
        EXPECT_IN(buf, "\"n_traces_measured\":\t1");
        EXPECT_IN(buf, "\"path\":\t\"short.kvt\"");
        EXPECT_IN(buf, "\"why\":\t\"no decode steps\"");
    }
    kvt_recommendation_free(rec);
    kvt_results_free(r);
}

/* the messages of a metric no candidate has, and of a target of the wrong kind */
static void check_messages(void)
{
    kvt_results *r = build("msg", "msg.kvt");
    kvt_recommendation *rec = NULL;
    kvt_recommend_opts wrong = {KVT_REC_METRIC_RECALL_WINDOW, true, 0.3};
    KVT_EXPECT_STATUS(kvt_recommend(r, &wrong, &rec), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "recall_window is a recall metric: it needs "
                                           "--min-recall R") != NULL,
                   "%s", kvt_error_msg());
    /* err_decode only on the references */
    kvt_trace_result *t = r->traces[0];
    for (size_t b = 0; b < NB; b++)
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                kvt_trace_result_at(t, P_SNAP, b, l, h)->err_decode = NAN;
                kvt_trace_result_at(t, P_TOVA, b, l, h)->err_decode = NAN;
            }
    kvt_recommend_opts ed = {KVT_REC_METRIC_ERR_DECODE, true, 0.3};
    KVT_EXPECT_STATUS(kvt_recommend(r, &ed, &rec), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "err_decode is measured only for full and oracle "
                                           "(references, never recommended)") != NULL,
                   "%s", kvt_error_msg());
    /* no decode steps at all: no policy has it, and the message says why (it named
       full/oracle before, whether or not they were in the result) */
    t->n_decode = 0;
    for (size_t b = 0; b < NB; b++)
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                kvt_trace_result_at(t, P_FULL, b, l, h)->err_decode = NAN;
                kvt_trace_result_at(t, P_ORACLE, b, l, h)->err_decode = NAN;
            }
    KVT_EXPECT_STATUS(kvt_recommend(r, &ed, &rec), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "err_decode is not measured: the trace has no decode "
                                           "steps") != NULL &&
                       strstr(kvt_error_msg(), "full/oracle") == NULL,
                   "%s", kvt_error_msg());
    KVT_EXPECT(rec == NULL);
    kvt_results_free(r);
}

static void check_main(const kvt_results *r)
{
    /* err_decode <= 0.25: snapkv meets at 20 (mean 0.25, cost 2*2*20 = 80 entries), tova at
     * 40 (0.25, 160), oracle would be cheaper but is a reference. */
    kvt_recommend_opts o = {KVT_REC_METRIC_AUTO, true, 0.25};
    kvt_recommendation *rec = NULL;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    if (!rec)
        return;
    KVT_EXPECT(rec->metric == KVT_REC_METRIC_ERR_DECODE);
    KVT_EXPECT(rec->found && !rec->has_closest);
    KVT_EXPECT_EQ_U64(rec->policy, P_SNAP);
    KVT_EXPECT_EQ_U64(rec->budget, 1);
    KVT_EXPECT_NEAR(rec->value, 0.25, 0);
    KVT_EXPECT_NEAR(rec->summary.kept_entries, 80, 0);
    KVT_EXPECT_NEAR(rec->summary.full_entries, 400, 0);
    KVT_EXPECT_NEAR(rec->summary.kept_fraction, 0.2, 1e-15);
    KVT_EXPECT_NEAR(rec->summary.compression_ratio, 5, 1e-12);
    KVT_EXPECT(rec->curves[P_TOVA].cheapest_ok == 2);
    KVT_EXPECT(rec->curves[P_SNAP].cheapest_ok == 1);
    KVT_EXPECT(rec->curves[P_ORACLE].cheapest_ok == 0 && !rec->curves[P_ORACLE].candidate);
    KVT_EXPECT(!rec->curves[P_FULL].candidate);
    /* knees, x = n_keep normalised: 0, 1/7, 3/7, 1.
     * snapkv y = (0.5 - e)/0.4375: 0, 4/7, 23/28, 1; y - x: 3/7 (at 20) > 11/28 (at 40).
     * tova y = (0.75 - e)/0.625: 0, 0.4, 0.8, 1; y - x: 0.257 < 0.371 (at 40).
     * full and oracle are flat: no knee. */
    KVT_EXPECT(rec->curves[P_SNAP].knee_budget == 1);
    KVT_EXPECT(rec->curves[P_TOVA].knee_budget == 2);
    KVT_EXPECT(rec->curves[P_FULL].knee_budget == -1);
    KVT_EXPECT(rec->curves[P_ORACLE].knee_budget == -1);
    /* per layer: layer 0 means 0.4375, 0.1875 -> 20; layer 1: 0.5625, 0.3125, 0.1875 -> 40.
     * per head: 20 20 / 40 20. Entries: uniform 4*20 = 80, layers 2*20 + 2*40 = 120,
     * heads 100. */
    KVT_EXPECT(rec->n_layers == L && rec->n_heads == H);
    if (rec->n_layers == L) {
        KVT_EXPECT(rec->layer_budget[0] == 1 && rec->layer_budget[1] == 2);
        KVT_EXPECT(rec->head_budget[0] == 1 && rec->head_budget[1] == 1);
        KVT_EXPECT(rec->head_budget[2] == 2 && rec->head_budget[3] == 1);
    }
    KVT_EXPECT_NEAR(rec->uniform_entries, 80, 0);
    KVT_EXPECT_NEAR(rec->layer_entries, 120, 0);
    KVT_EXPECT_NEAR(rec->head_entries, 100, 0);
    /* allocation: from 10/10 (mean 0.5), both layers gain 0.25 per 10 tokens: layer 0 moves
     * (tie, lower layer), mean 0.375; layer 1 gains 0.025/token > layer 0's 0.0047: moves,
     * mean 0.25 meets. 20/20 = 80 entries. */
    if (rec->n_layers == L)
        KVT_EXPECT(rec->layer_alloc[0] == 1 && rec->layer_alloc[1] == 1);
    KVT_EXPECT_NEAR(rec->alloc_entries, 80, 0);

    char path[256];
    kvt_test_tmp(path, sizeof(path), "rec.txt");
    FILE *f = fopen(path, "w+");
    KVT_EXPECT_STATUS(kvt_recommendation_print(rec, r, f), KVT_OK);
    KVT_EXPECT_STATUS(kvt_recommendation_write_json(rec, r, f), KVT_OK);
    rewind(f);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = 0;
    fclose(f);
    remove(path);
    KVT_EXPECT_MSG(strstr(buf, "recommended: snapkv at budget 20 (20 tokens") != NULL, "%s", buf);
    KVT_EXPECT(strstr(buf, "L0:20 L1:40") != NULL);
    KVT_EXPECT(strstr(buf, "L0:20 L1:20") != NULL);
    KVT_EXPECT(strstr(buf, "entries (full cache 400): uniform 80, allocation 80, per-layer 120, "
                           "per-head 100 (") != NULL);
    KVT_EXPECT(strstr(buf, "target: err_decode <= 0.25 (mean over 1 trace, layers and heads)") !=
               NULL);
    KVT_EXPECT(strstr(buf, "per layer (snapkv, smallest measured budget meeting the target on "
                           "the layer):") != NULL); /* no "all" legend: no budget keeps it all */
    KVT_EXPECT(strstr(buf, "\"found\":\ttrue") != NULL);
    KVT_EXPECT(strstr(buf, "\"layer_budget_tokens\":\t[20, 40]") != NULL);
    KVT_EXPECT(strstr(buf, "\"layer_alloc_tokens\":\t[20, 20]") != NULL);
    kvt_recommendation_free(rec);

    /* err_decode <= 0.2: snapkv at 40 (0.140625; uniform 4*40 = 160 entries). Allocation goes
     * on from 20/20 (0.25): layer 0 gains 0.09375/20, layer 1 0.125/20: layer 1 to 40, mean
     * (0.1875 + 0.1875)/2 meets: 20/40 = 120 entries. Per layer 20/40; per head 20 40 / 80 40
     * = 180 entries. */
    o.target = 0.2;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->found && rec->policy == P_SNAP && rec->budget == 2);
    if (rec && rec->n_layers == L) {
        KVT_EXPECT(rec->layer_alloc[0] == 1 && rec->layer_alloc[1] == 2);
        KVT_EXPECT(rec->layer_budget[0] == 1 && rec->layer_budget[1] == 2);
        KVT_EXPECT(rec->head_budget[0] == 1 && rec->head_budget[1] == 2);
        KVT_EXPECT(rec->head_budget[2] == 3 && rec->head_budget[3] == 2);
        KVT_EXPECT_NEAR(rec->uniform_entries, 160, 0);
        KVT_EXPECT_NEAR(rec->alloc_entries, 120, 0);
        KVT_EXPECT_NEAR(rec->head_entries, 180, 0);
    }
    kvt_recommendation_free(rec);

    /* err_decode <= 0.125: snapkv needs 80 (0.140625 at 40) and gets 0.0625 there, tova meets
     * at 80 with 0.125: equal cost 320, the better value (snapkv) wins, not the lower index */
    o.target = 0.125;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->found && rec->policy == P_SNAP && rec->budget == 3 &&
               rec->value == 0.0625);
    kvt_recommendation_free(rec);

    /* err_decode <= 0.01: only full meets, and it is a reference: nothing meets. The nearest
     * candidate is snapkv at 80 (0.0625; tova reaches 0.125, oracle is a reference). */
    o.target = 0.01;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_OK);
    KVT_EXPECT(rec && !rec->found && rec->n_layers == 0);
    KVT_EXPECT(rec && rec->has_closest && rec->closest_policy == P_SNAP &&
               rec->closest_budget == 3 && rec->closest_value == 0.0625);
    if (rec) {
        FILE *g = fopen(path, "w+");
        KVT_EXPECT_STATUS(kvt_recommendation_print(rec, r, g), KVT_OK);
        KVT_EXPECT_STATUS(kvt_recommendation_write_json(rec, r, g), KVT_OK);
        rewind(g);
        n = fread(buf, 1, sizeof(buf) - 1, g);
        buf[n] = 0;
        fclose(g);
        remove(path);
        KVT_EXPECT_MSG(strstr(buf, "recommended: none: no setting meets the target; the nearest "
                                   "is snapkv at budget 80 (err_decode 0.0625)") != NULL,
                       "%s", buf);
        KVT_EXPECT(strstr(buf, "\"nearest\":\t{") != NULL);
        KVT_EXPECT(strstr(buf, "\"value\":\t0.0625") != NULL);
    }
    kvt_recommendation_free(rec);

    /* --min-recall 0.99 on recall_window (1 - e): nothing meets; snapkv at 80 is nearest
     * (0.9375) */
    kvt_recommend_opts hi = {KVT_REC_METRIC_AUTO, false, 0.99};
    KVT_EXPECT_STATUS(kvt_recommend(r, &hi, &rec), KVT_OK);
    KVT_EXPECT(rec && !rec->found && rec->has_closest && rec->closest_policy == P_SNAP &&
               rec->closest_budget == 3 && rec->closest_value == 0.9375);
    kvt_recommendation_free(rec);

    /* --min-recall 0.75: recall_decode is not measured, so recall_window (1 - e): snapkv 20 */
    kvt_recommend_opts m = {KVT_REC_METRIC_AUTO, false, 0.75};
    KVT_EXPECT_STATUS(kvt_recommend(r, &m, &rec), KVT_OK);
    KVT_EXPECT(rec && rec->metric == KVT_REC_METRIC_RECALL_WINDOW && rec->found &&
               rec->policy == P_SNAP && rec->budget == 1);
    kvt_recommendation_free(rec);

    /* errors: direction mismatch, unmeasured metric, NaN target */
    kvt_recommend_opts bad1 = {KVT_REC_METRIC_RECALL_WINDOW, true, 0.1};
    KVT_EXPECT_STATUS(kvt_recommend(r, &bad1, &rec), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(rec == NULL);
    kvt_recommend_opts bad2 = {KVT_REC_METRIC_COVERAGE, false, 0.9};
    KVT_EXPECT_STATUS(kvt_recommend(r, &bad2, &rec), KVT_ERR_INVALID_ARG);
    kvt_recommend_opts bad3 = {KVT_REC_METRIC_AUTO, true, NAN};
    KVT_EXPECT_STATUS(kvt_recommend(r, &bad3, &rec), KVT_ERR_INVALID_ARG);
}

int main(void)
{
    kvt_rec_metric m;
    KVT_EXPECT_STATUS(kvt_rec_metric_parse("coverage", &m), KVT_OK);
    KVT_EXPECT(m == KVT_REC_METRIC_COVERAGE && !kvt_rec_metric_is_error(m));
    KVT_EXPECT_STATUS(kvt_rec_metric_parse("err", &m), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_rec_metric_parse("coverage_dropped", &m), KVT_OK);
    KVT_EXPECT(m == KVT_REC_METRIC_COVERAGE_DROPPED && !kvt_rec_metric_is_error(m));
    KVT_EXPECT_STATUS(kvt_rec_metric_parse("head_overlap", &m), KVT_OK);
    KVT_EXPECT(m == KVT_REC_METRIC_HEAD_OVERLAP && !strcmp(kvt_rec_metric_name(m), "head_overlap"));

    kvt_results *r = build("constructed", "constructed.kvt");
    check_main(r);

    /* a setting that keeps the whole cache compresses nothing: snapkv at 80 made to keep all
     * T = 100 tokens is not recommended at err_decode <= 0.1 although 0.0625 meets it;
     * nothing else does, and the nearest compressing setting is tova at 80 (0.125, better
     * than snapkv's 0.140625 at 40) */
    {
        kvt_results *w = build("whole", "whole.kvt");
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++)
                kvt_trace_result_at(w->traces[0], P_SNAP, 3, l, h)->n_keep = T;
        kvt_recommend_opts o = {KVT_REC_METRIC_AUTO, true, 0.1};
        kvt_recommendation *rec = NULL;
        KVT_EXPECT_STATUS(kvt_recommend(w, &o, &rec), KVT_OK);
        KVT_EXPECT(rec && !rec->found && rec->full_entries == 400);
        KVT_EXPECT(rec && rec->curves[P_SNAP].cheapest_ok == -1);
        KVT_EXPECT(rec && rec->full_cache_meets && rec->full_cache_policy == P_SNAP &&
                   rec->full_cache_budget == 3 && rec->any_compressing);
        KVT_EXPECT(rec && rec->has_closest && rec->closest_policy == P_TOVA &&
                   rec->closest_budget == 3);
        kvt_recommendation_free(rec);
        kvt_results_free(w);
    }

    /* the same answers from the results.json the CLI reads */
    char path[256];
    kvt_test_tmp(path, sizeof(path), "results.json");
    KVT_CHECK(kvt_results_write(r, path, true));
    kvt_results *back = NULL;
    KVT_CHECK(kvt_results_read(path, &back));
    check_main(back);
    remove(path);

    check_above_prompt();
    check_two_traces();
    check_messages();

    /* a --shard part is refused */
    int units[2] = {0, 0};
    KVT_CHECK(kvt_results_set_shard(r, 0, 2, units, 1));
    kvt_recommend_opts o = {KVT_REC_METRIC_AUTO, true, 0.25};
    kvt_recommendation *rec = NULL;
    KVT_EXPECT_STATUS(kvt_recommend(r, &o, &rec), KVT_ERR_INVALID_ARG);
    kvt_results_free(back);
    kvt_results_free(r);
    return kvt_test_result("test_report_recommend");
}
