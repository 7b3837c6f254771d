/* test_report_recommend.c - kvt_recommend on a constructed result (one trace, L=2, two KV
 * heads, T=100, budgets 10/20/40/80) whose answers are computed by hand in the comments:
 * cheapest setting, ties, knees, per-layer / per-head budgets, the layer allocation, "nothing
 * meets", the metric fallback, argument errors, and the same answers after a results.json
 * write/read round trip. Values are dyadic so every mean is exact in double.
 */
#include "test_report_util.h"

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
    KVT_EXPECT(strstr(buf, "uniform 80, allocation 80, per-layer 120, per-head 100") != NULL);
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
