/* test_report_html.c - kvt_report_write on the constructed result (test_report_util.h) with a
 * hostile model name and path, plus a per-layer allocation (tova keeps 1.5x the budget on layer
 * 0 and 0.5x on layer 1) and a text/image modality table:
 * - the data helpers: per-head values, per-layer kept entries, which policy allocates, the
 *   heatmap budget (the recommended one), modality shares, the Chart.js path override;
 * - index.html holds the hostile strings only as escaped text (HTML entities in the markup,
 *   \u003c escapes in the JSON blob, which parses back to the results' numbers), has exactly
 *   the expected script elements, no http(s) src/href, a Content-Security-Policy, and inlines
 *   a Chart.js file whose "</script" and "<!--" come out escaped; without the Chart.js file the
 *   page is still written, with a note;
 * - a figure for each measured metric and none for unmeasured ones; the redundancy, per-head,
 *   modality and allocation figures; every PNG in the directory decodes (cairo), is 900x540 and
 *   not a single colour, and the expected number of them exists.
 */
#include <cairo.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <sys/stat.h>

#include "report_internal.h"
#include "test_report_util.h"

#define HOSTILE "<script>alert(1)</script><b onmouseover=\"x\">&'"
/* the same as the page data writes it: cJSON's escapes, then '<', '>', '&' as \u00XX */
#define HOSTILE_JSON                                                                               \
    "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e\\u003cb onmouseover=\\\"x\\\"\\u003e"       \
    "\\u0026'"

static int count(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
        n++;
    return n;
}

/* decodes, 900x540, more than 1000 pixels differ from the first one */
static void check_png(const char *path)
{
    cairo_surface_t *s = cairo_image_surface_create_from_png(path);
    KVT_EXPECT_MSG(cairo_surface_status(s) == CAIRO_STATUS_SUCCESS, "%s does not decode", path);
    if (cairo_surface_status(s) == CAIRO_STATUS_SUCCESS) {
        int w = cairo_image_surface_get_width(s), h = cairo_image_surface_get_height(s);
        KVT_EXPECT_MSG(w == 900 && h == 540, "%s is %dx%d", path, w, h);
        cairo_surface_flush(s);
        const unsigned char *px = cairo_image_surface_get_data(s);
        int stride = cairo_image_surface_get_stride(s);
        uint32_t first = *(const uint32_t *)px & 0xffffffu;
        long other = 0;
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                other += (*(const uint32_t *)(px + (size_t)y * stride + 4 * (size_t)x) &
                          0xffffffu) != first;
        KVT_EXPECT_MSG(other > 1000, "%s: only %ld pixels differ from the first", path, other);
    }
    cairo_surface_destroy(s);
}

/* check and remove every PNG in dir; @return how many */
static int check_all_pngs(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    KVT_EXPECT(d != NULL);
    struct dirent *e;
    char path[1024];
    while (d && (e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 5 || strcmp(e->d_name + len - 4, ".png"))
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        check_png(path);
        remove(path);
        n++;
    }
    if (d)
        closedir(d);
    return n;
}

static bool exists(const char *dir, const char *name)
{
    char path[1024];
    struct stat st;
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    return stat(path, &st) == 0;
}

/* tova allocates (layer 0 keeps 1.5x, its head 0 2x and head 1 1x; layer 1 0.5x: same total) and
 * every trace token has a
 * modality: 60 text, 40 image; each head keeps 70% text and 30% image entries (full: all) */
static void add_alloc_and_modality(kvt_results *r)
{
    kvt_trace_result *t = r->traces[0];
    t->has_modality = true;
    t->modality_counts[0] = 60;
    t->modality_counts[1] = 40;
    for (int p = 0; p < NP; p++)
        for (int b = 0; b < NB; b++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++) {
                    kvt_head_metrics *m = kvt_trace_result_at(t, (size_t)p, (size_t)b, l, h);
                    if (p == P_TOVA)
                        m->n_keep = btok[b] * (l == 0 ? (h == 0 ? 2.0 : 1.0) : 0.5);
                    for (int k = 0; k < KVT_N_MODALITIES; k++)
                        m->n_keep_mod[k] = 0.0;
                    m->n_keep_mod[0] = p == P_FULL ? 60 : 0.7 * m->n_keep;
                    m->n_keep_mod[1] = p == P_FULL ? 40 : 0.3 * m->n_keep;
                    /* redundancy of the kept keys: text 0.25; image 0.375 and 0.625 by layer
                       (mean 0.5), none for tova at 10 */
                    m->r_kept_mod[0] = 0.25;
                    m->r_kept_mod[1] = p == P_TOVA && b == 0 ? NAN : l == 0 ? 0.375 : 0.625;
                }
    for (int i = 0; i < L * H; i++) { /* of all keys: text 0.125, image 0.75 / 0.85 by layer */
        t->r_all_mod[i * KVT_N_MODALITIES + 0] = 0.125;
        t->r_all_mod[i * KVT_N_MODALITIES + 1] = i < H ? 0.75 : 0.85;
    }
}

static void check_data_helpers(const kvt_results *r)
{
    KVT_EXPECT_NEAR(kvt_report_head_value(r, P_SNAP, 0, KVT_REC_METRIC_ERR_DECODE, 1, 0), 0.625, 0);
    KVT_EXPECT(isnan(kvt_report_head_value(r, P_SNAP, 0, KVT_REC_METRIC_RECALL_DECODE, 1, 0)));
    KVT_EXPECT(isnan(kvt_report_head_value(r, P_SNAP, 0, KVT_REC_METRIC_ERR_DECODE, 2, 0)));
    KVT_EXPECT_NEAR(kvt_report_layer_keep(r, P_TOVA, 0, 0), 15.0, 0);
    KVT_EXPECT_NEAR(kvt_report_layer_keep(r, P_TOVA, 3, 1), 40.0, 0);
    KVT_EXPECT_NEAR(kvt_report_layer_keep(r, P_SNAP, 2, 1), 40.0, 0);
    KVT_EXPECT_NEAR(kvt_report_head_keep(r, P_TOVA, 0, 0, 0), 20.0, 0);
    KVT_EXPECT_NEAR(kvt_report_head_keep(r, P_TOVA, 0, 0, 1), 10.0, 0);
    KVT_EXPECT_NEAR(kvt_report_head_keep(r, P_TOVA, 3, 1, 1), 40.0, 0);
    KVT_EXPECT(isnan(kvt_report_head_keep(r, P_TOVA, 0, 0, 2))); /* no head 2 */
    KVT_EXPECT(isnan(kvt_report_head_keep(r, P_TOVA, 0, 2, 0))); /* no layer 2 */
    KVT_EXPECT(isnan(kvt_report_head_keep(r, P_TOVA, NB, 0, 0)));
    KVT_EXPECT(kvt_report_policy_allocates(r, P_TOVA));
    KVT_EXPECT(!kvt_report_policy_allocates(r, P_SNAP));
    KVT_EXPECT(!kvt_report_policy_allocates(r, P_FULL));   /* references never */
    KVT_EXPECT(!kvt_report_policy_allocates(r, P_ORACLE)); /* (full keeps T everywhere) */
    KVT_EXPECT(kvt_report_metric_measured(r, KVT_REC_METRIC_ERR_DECODE));
    KVT_EXPECT(!kvt_report_metric_measured(r, KVT_REC_METRIC_COVERAGE));
    bool rec = false;
    KVT_EXPECT_EQ_U64(kvt_report_heat_budget(r, NULL, &rec), 3); /* snapkv at 80 is recommended */
    KVT_EXPECT(rec);
    /* image share of tova at 10: 0.3 * 10 * 4 heads / (40 tokens * 2 layers * 2 heads) */
    KVT_EXPECT_NEAR(kvt_report_modality_share(r, P_TOVA, 0, 1), 12.0 / 160.0, 1e-12);
    KVT_EXPECT_NEAR(kvt_report_modality_share(r, P_FULL, 2, 0), 1.0, 1e-12);
    KVT_EXPECT(isnan(kvt_report_modality_share(r, P_TOVA, 0, 2))); /* no video tokens */
    KVT_EXPECT_NEAR(kvt_report_modality_tokens(r, 1), 40.0, 0);
}

static double at(const cJSON *a, int i)
{
    const cJSON *v = cJSON_GetArrayItem(a, i);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* the JSON blob of the page script parses back to the results' numbers and strings */
static void check_page_data(const char *html)
{
    static const char open_tag[] = "<script type=\"application/json\" id=\"kvt-data\">";
    const char *b = strstr(html, open_tag), *e = b ? strstr(b, "</script>") : NULL;
    KVT_EXPECT(b && e);
    if (!b || !e)
        return;
    b += sizeof(open_tag) - 1;
    char *text = strndup(b, (size_t)(e - b));
    cJSON *d = cJSON_Parse(text);
    KVT_EXPECT(d != NULL);
    const cJSON *model = cJSON_GetObjectItem(d, "model");
    KVT_EXPECT(cJSON_IsString(model) && !strcmp(model->valuestring, HOSTILE));
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(cJSON_GetObjectItem(d, "policies")), NP);
    KVT_EXPECT_NEAR(cJSON_GetObjectItem(d, "heat_budget")->valuedouble, 3, 0);
    const cJSON *heat = cJSON_GetObjectItem(d, "heat");
    const cJSON *hm = cJSON_GetObjectItem(heat, "metrics");
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(hm), 2);
    const cJSON *m0 = cJSON_GetArrayItem(hm, 0), *m1 = cJSON_GetArrayItem(hm, 1);
    KVT_EXPECT(!strcmp(cJSON_GetObjectItem(m0, "metric")->valuestring, "recall_window"));
    KVT_EXPECT(!strcmp(cJSON_GetObjectItem(m1, "metric")->valuestring, "err_decode"));
    /* grid[policy][budget][layer * H + head]: snapkv, budget 10, layer 1, head 0 */
    const cJSON *row =
        cJSON_GetArrayItem(cJSON_GetArrayItem(cJSON_GetObjectItem(m1, "grid"), P_SNAP), 0);
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(row), L * H);
    KVT_EXPECT_NEAR(at(row, 1 * H + 0), 0.625, 0);
    const cJSON *curves = cJSON_GetObjectItem(d, "curves");
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(curves), 2); /* err_decode, recall_window */
    const cJSON *c0 = cJSON_GetArrayItem(curves, 0);
    KVT_EXPECT(!strcmp(cJSON_GetObjectItem(c0, "metric")->valuestring, "err_decode"));
    KVT_EXPECT_NEAR(at(cJSON_GetArrayItem(cJSON_GetObjectItem(c0, "value"), P_SNAP), 3), 0.0625, 0);
    KVT_EXPECT_NEAR(at(cJSON_GetArrayItem(cJSON_GetObjectItem(c0, "n_keep"), P_SNAP), 1), 20, 0);
    const cJSON *alloc = cJSON_GetObjectItem(d, "alloc");
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(alloc), 1);
    const cJSON *a0 = cJSON_GetArrayItem(alloc, 0);
    KVT_EXPECT_NEAR(cJSON_GetObjectItem(a0, "policy")->valuedouble, P_TOVA, 0);
    const cJSON *keep0 = cJSON_GetArrayItem(cJSON_GetObjectItem(a0, "keep"), 0);
    KVT_EXPECT(at(keep0, 0) == 15 && at(keep0, 1) == 5);
    const cJSON *hk = cJSON_GetObjectItem(a0, "head_keep"); /* [budget][layer * H + head] */
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(hk), NB);
    const cJSON *hk0 = cJSON_GetArrayItem(hk, 0);
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(hk0), L * H);
    KVT_EXPECT(at(hk0, 0) == 20 && at(hk0, 1) == 10 && at(hk0, 2) == 5 && at(hk0, 3) == 5);
    const cJSON *mod = cJSON_GetObjectItem(d, "modality");
    const cJSON *names = cJSON_GetObjectItem(mod, "names");
    KVT_EXPECT_EQ_U64(cJSON_GetArraySize(names), 2);
    KVT_EXPECT(!strcmp(cJSON_GetArrayItem(names, 1)->valuestring, "image"));
    const cJSON *img = cJSON_GetArrayItem(cJSON_GetObjectItem(mod, "share"), 1);
    KVT_EXPECT_NEAR(at(cJSON_GetArrayItem(img, P_TOVA), 0), 0.075, 0);
    cJSON_Delete(d);
    free(text);
}

/* the page of the hostile result with the fake Chart.js */
static void check_page(const char *html)
{
    KVT_EXPECT(strstr(html, "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b onmouseover=&quot;x&quot;"
                            "&gt;&amp;&#39;") != NULL);
    KVT_EXPECT(strstr(html, HOSTILE_JSON) != NULL);
    KVT_EXPECT(strstr(html, "<script>alert") == NULL);
    KVT_EXPECT(strstr(html, "onmouseover=\"") == NULL);
    /* error hook, JSON data, Chart.js, page script: nothing else opens a script */
    KVT_EXPECT_EQ_U64(count(html, "<script"), 4);
    KVT_EXPECT_EQ_U64(count(html, "<script type=\"application/json\" id=\"kvt-data\">"), 1);
    KVT_EXPECT(strstr(html, "Content-Security-Policy") != NULL);
    KVT_EXPECT(strstr(html, "src=\"http") == NULL && strstr(html, "href=\"http") == NULL);
    KVT_EXPECT(strstr(html, "http://") == NULL && strstr(html, "https://") == NULL);
    /* the fake Chart.js: its end-of-script and comment openers escaped, the rest verbatim */
    KVT_EXPECT(strstr(html, "var s = \"<\\/script><\\!-- <\\/SCRIPT >\";") != NULL);
    KVT_EXPECT(strstr(html, "window.Chart = undefined;") != NULL);
    KVT_EXPECT(strstr(html, "id=\"no-chartjs\"") == NULL);
    KVT_EXPECT(strstr(html, "id=\"fig-err_decode\"") != NULL);
    KVT_EXPECT(strstr(html, "id=\"chart-err_decode\"") != NULL);
    KVT_EXPECT(strstr(html, "id=\"fig-recall_window\"") != NULL);
    KVT_EXPECT(strstr(html, "id=\"fig-coverage\"") == NULL);
    KVT_EXPECT(strstr(html, "id=\"fig-redundancy\"") != NULL);
    KVT_EXPECT(strstr(html, "title=\"layer 1, KV head 1: r = 0.5000\"") != NULL);
    KVT_EXPECT(strstr(html, "src=\"data:image/png;base64,iVBORw0KGgo") != NULL);
    KVT_EXPECT(strstr(html, "<option value=\"3\" selected>80</option>") != NULL);
    KVT_EXPECT(strstr(html, "the budget of the recommended setting") != NULL);
    KVT_EXPECT(strstr(html, "id=\"chart-mod-image\"") != NULL);
    KVT_EXPECT(strstr(html, "id=\"chart-mod-text\"") != NULL);
    /* head redundancy by modality: text and image columns (no video tokens) */
    KVT_EXPECT(strstr(html, "<table id=\"table-mod-redundancy\"><tr><th>policy</th><th>budget"
                            "</th><th>text</th><th>image</th></tr>") != NULL);
    KVT_EXPECT(strstr(html, "<tr id=\"mod-r-all\"><th colspan=\"2\">all keys</th><td>0.125</td>"
                            "<td>0.800</td></tr>") != NULL);
    KVT_EXPECT(strstr(html, "<tr><td>snapkv</td><td>10</td><td>0.250</td><td>0.500</td></tr>") !=
               NULL);
    KVT_EXPECT(strstr(html, "<tr><td>tova</td><td>10</td><td>0.250</td><td>&ndash;</td></tr>") !=
               NULL);
    KVT_EXPECT(strstr(html, "id=\"chart-alloc-1\"") != NULL); /* tova */
    KVT_EXPECT(strstr(html, "id=\"chart-alloc-2\"") == NULL); /* snapkv keeps the budget */
    KVT_EXPECT(strstr(html, "<div id=\"alloc-heatmaps\">") != NULL);
    KVT_EXPECT(strstr(html, "<select id=\"alloc-budget\"><option value=\"0\">10</option>") != NULL);
    KVT_EXPECT_EQ_U64(count(html, "<option value=\"3\" selected>80</option>"), 2);
    KVT_EXPECT(strstr(html, "alt=\"alloc_heads_01_tova.png\"") != NULL);
    /* err <= 0.1: snapkv at 80 (0.0625); tova reaches 0.125 */
    KVT_EXPECT(strstr(html, "recommended: snapkv at budget 80 ") != NULL);
    KVT_EXPECT(strstr(html, "<h2 id=\"recommendation\">Recommended settings (err_decode &le; "
                            "0.1)</h2>") != NULL);
    KVT_EXPECT(strstr(html, "<p id=\"rec-headline\"><strong>snapkv at budget 80</strong>: "
                            "err_decode 0.0625, keeping 80.0% of the KV cache (1.25&times; "
                            "smaller)") != NULL);
    /* the ladder, worked from test_report_util.h: cheapest meeting setting per target */
    KVT_EXPECT(strstr(html, "<tr><td>&le; 0.05</td><td colspan=\"5\">none (nearest: snapkv at "
                            "80, 0.0625)</td></tr>\n<tr class=\"sel\"><td>&le; 0.1</td><td>"
                            "snapkv</td><td>80</td><td>0.0625</td><td>80.0%</td><td>1.25&times;"
                            "</td></tr>\n<tr><td>&le; 0.2</td><td>snapkv</td><td>40</td><td>"
                            "0.1406</td><td>40.0%</td><td>2.5&times;</td></tr>\n<tr><td>&le; "
                            "0.3</td><td>snapkv</td><td>20</td><td>0.25</td><td>20.0%</td><td>"
                            "5&times;</td></tr>\n<tr><td>&le; 0.5</td><td>snapkv</td><td>10</td>"
                            "<td>0.5</td><td>10.0%</td><td>10&times;</td></tr>\n</table>") != NULL);
}

/* the page at targets of the caller's: one nothing meets, and a recall target */
static void check_targets(const kvt_results *r, const char *dir, const char *path)
{
    kvt_recommend_opts strict = {KVT_REC_METRIC_AUTO, true, 0.01};
    KVT_EXPECT_STATUS(kvt_report_write(r, dir, &strict), KVT_OK);
    char *html = (char *)kvt_test_slurp(path, NULL);
    KVT_EXPECT(html != NULL);
    if (html) {
        KVT_EXPECT(strstr(html, "Recommended settings (err_decode &le; 0.01)</h2>") != NULL);
        KVT_EXPECT(strstr(html, "<strong>No measured setting meets err_decode &le; 0.01."
                                "</strong> The nearest is snapkv at budget 80 (err_decode "
                                "0.0625).") != NULL);
        KVT_EXPECT(strstr(html, "<th>smaller by</th></tr>\n<tr class=\"sel\"><td>&le; 0.01"
                                "</td><td colspan=\"5\">none (nearest: snapkv at 80, 0.0625)"
                                "</td></tr>\n<tr><td>&le; 0.05</td>") != NULL);
        /* nothing recommended: the heatmaps open at the middle budget, index 2 */
        KVT_EXPECT(strstr(html, "<option value=\"2\" selected>40</option>") != NULL);
        KVT_EXPECT(strstr(html, "the middle of the budget sweep") != NULL);
    }
    free(html);
    /* recall_window = 1 - err_decode >= 0.9: snapkv at 80 (0.9375); at 0.8 snapkv at 40 */
    kvt_recommend_opts rc = {KVT_REC_METRIC_AUTO, false, 0.9};
    KVT_EXPECT_STATUS(kvt_report_write(r, dir, &rc), KVT_OK);
    html = (char *)kvt_test_slurp(path, NULL);
    KVT_EXPECT(html != NULL);
    if (html) {
        KVT_EXPECT(strstr(html, "Recommended settings (recall_window &ge; 0.9)</h2>") != NULL);
        KVT_EXPECT(strstr(html, "<tr><td>&ge; 0.99</td><td colspan=\"5\">none (nearest: "
                                "snapkv at 80, 0.9375)</td></tr>") != NULL);
        KVT_EXPECT(strstr(html, "<tr class=\"sel\"><td>&ge; 0.9</td><td>snapkv</td><td>80</td>"
                                "<td>0.9375</td>") != NULL);
        KVT_EXPECT(strstr(html, "<tr><td>&ge; 0.8</td><td>snapkv</td><td>40</td><td>0.8594"
                                "</td>") != NULL);
        KVT_EXPECT(strstr(html, "<option value=\"3\" selected>80</option>") != NULL);
    }
    free(html);
}

/* round axis ticks, worked by hand: the smallest of 1, 2, 2.5, 5 x 10^k giving <= 8 steps */
static void check_axis(double lo, double hi, double want_lo, double want_hi, double want_step,
                       int want_dec)
{
    double a, b, s;
    int d;
    kvt_report_nice_axis(lo, hi, 8, &a, &b, &s, &d);
    KVT_EXPECT_MSG(fabs(a - want_lo) < 1e-12 && fabs(b - want_hi) < 1e-9 &&
                       fabs(s - want_step) < 1e-12 && d == want_dec,
                   "axis [%g, %g]: [%g, %g] step %g, %d decimals", lo, hi, a, b, s, d);
}

int main(void)
{
    check_axis(0, 1.41, 0, 1.6, 0.2, 1); /* 0.1 would be 15 steps */
    check_axis(0, 1.0, 0, 1.0, 0.2, 1);
    check_axis(0, 1.72, 0, 1.75, 0.25, 2); /* 0.2 would be 9 */
    check_axis(0, 0.05, 0, 0.05, 0.01, 2); /* 0.005 would be 10 */
    check_axis(0, 1234, 0, 1400, 200, 0);
    check_axis(-0.3, 1, -0.4, 1.0, 0.2, 1);
    check_axis(3, 3, 3, 4, 0.2, 1); /* flat: widened to [3, 4] */
    double rgb[3];
    kvt_report_colormap(0.0, rgb);
    KVT_EXPECT(rgb[0] == 0.267 && rgb[1] == 0.005 && rgb[2] == 0.329); /* viridis ends */
    kvt_report_colormap(1.5, rgb);
    KVT_EXPECT(rgb[0] == 0.993 && rgb[1] == 0.906 && rgb[2] == 0.144);
    kvt_report_colormap(NAN, rgb);
    KVT_EXPECT(rgb[0] == 0.267);

    kvt_results *r = build(HOSTILE, HOSTILE ".kvt");
    KVT_EXPECT_NEAR(kvt_report_redundancy(r, 1, 0), 0.5, 0);
    KVT_EXPECT(isnan(kvt_report_redundancy(r, 2, 0)));
    add_alloc_and_modality(r);
    check_data_helpers(r);

    char dir[256], path[512], js[512];
    kvt_test_tmp(dir, sizeof(dir), "report_XXXXXX"); /* fresh even where a pid's old one stayed */
    KVT_EXPECT(mkdtemp(dir) != NULL);
    snprintf(js, sizeof(js), "%s/fake-chart.js", dir);
    FILE *f = fopen(js, "w");
    KVT_EXPECT(f != NULL);
    if (f) {
        fputs("window.Chart = undefined;\nvar s = \"</script><!-- </SCRIPT >\";\n", f);
        fclose(f);
    }
    setenv("KVT_CHARTJS", js, 1);
    KVT_EXPECT(strcmp(kvt_report_chartjs_path(), js) == 0);
    KVT_EXPECT_STATUS(kvt_report_write(r, dir, NULL), KVT_OK);
    remove(js);
    snprintf(path, sizeof(path), "%s/index.html", dir);
    char *html = (char *)kvt_test_slurp(path, NULL);
    KVT_EXPECT(html != NULL);
    if (html) {
        check_page(html);
        check_page_data(html);
    }
    free(html);
    KVT_EXPECT(!exists(dir, "coverage.png"));
    KVT_EXPECT(exists(dir, "heat_err_decode_02_snapkv.png"));
    KVT_EXPECT(exists(dir, "heat_recall_window_03_oracle.png")); /* no recall_decode measured */
    KVT_EXPECT(exists(dir, "modality_image.png") && exists(dir, "modality_text.png"));
    KVT_EXPECT(!exists(dir, "modality_video.png"));
    KVT_EXPECT(exists(dir, "alloc_01_tova.png") && !exists(dir, "alloc_02_snapkv.png"));
    KVT_EXPECT(exists(dir, "alloc_heads_01_tova.png") && !exists(dir, "alloc_heads_02_snapkv.png"));
    /* err_decode, recall_window, redundancy; 2 metrics x 4 policies; text, image; tova's 2 */
    KVT_EXPECT_EQ_U64(check_all_pngs(dir), 3 + 8 + 2 + 2);
    check_targets(r, dir, path);

    /* the Chart.js file missing: still a page, with the PNGs and a note saying so */
    setenv("KVT_CHARTJS", js, 1);
    KVT_EXPECT_STATUS(kvt_report_write(r, dir, NULL), KVT_OK);
    html = (char *)kvt_test_slurp(path, NULL);
    KVT_EXPECT(html != NULL);
    if (html) {
        KVT_EXPECT(strstr(html, "id=\"no-chartjs\"") != NULL);
        KVT_EXPECT_EQ_U64(count(html, "<script"), 3);
        KVT_EXPECT(strstr(html, "<canvas") == NULL);
        KVT_EXPECT(strstr(html, "id=\"fig-err_decode\"><img") != NULL);
    }
    free(html);
    remove(path);
    KVT_EXPECT_EQ_U64(check_all_pngs(dir), 15);
    unsetenv("KVT_CHARTJS");
    snprintf(path, sizeof(path), "%s/.kvtrace-report-files", dir); /* the report's manifest */
    remove(path);
    KVT_EXPECT(rmdir(dir) == 0);
    kvt_results_free(r);
    kvt_report_global_cleanup(); /* LeakSanitizer: cairo's and fontconfig's caches */
    return kvt_test_result("test_report_html");
}
