/* e2e.c - the end-to-end check's e2e.json (kvtrace e2e-llama2c, analysis/RESULTS.md "End-to-end
 * check") for the report: read and checked field by field, and drawn as a scatter of each
 * setting's proxy (the replay's err_decode) against what the compression did to the model's
 * output (the mean next-token KL), one colour per policy.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cairo.h>
#include <cjson/cJSON.h>

#include "report_internal.h"

#define E2E_MAX_BYTES (256u << 20) /* far above any real e2e.json: a bound, not a limit */

void kvt_e2e_free(kvt_e2e *e)
{
    if (!e)
        return;
    for (size_t i = 0; e->runs && i < e->n_runs; i++) {
        kvt_free(e->runs[i].policy);
        kvt_free(e->runs[i].budget);
        kvt_free(e->runs[i].why);
        kvt_free(e->runs[i].name);
    }
    kvt_free(e->runs);
    for (size_t i = 0; e->traces && i < e->n_traces; i++)
        kvt_free(e->traces[i].path);
    kvt_free(e->traces);
    kvt_free(e->model);
    kvt_free(e->engine);
    kvt_free(e);
}

long kvt_e2e_find_trace(const kvt_e2e *e, size_t k, const kvt_results *r)
{
    const kvt_e2e_trace *x = &e->traces[k];
    for (size_t t = 0; t < r->n_traces; t++) {
        const kvt_trace_result *y = r->traces[t];
        if (x->fingerprint[0] && y->fingerprint[0]) {
            if (!strcmp(x->fingerprint, y->fingerprint))
                return (long)t;
            continue; /* another capture, whatever its name */
        }
        char a[PATH_MAX], b[PATH_MAX];
        if (!strcmp(y->path, x->path) ||
            (realpath(y->path, a) && realpath(x->path, b) && !strcmp(a, b)))
            return (long)t;
    }
    return -1;
}

/* a number or null (NaN) at o[key]; false when absent or of another type */
static bool num_or_null(const cJSON *o, const char *key, double *v)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsNumber(x)) {
        *v = x->valuedouble;
        return true;
    }
    *v = NAN;
    return cJSON_IsNull(x);
}

static char *str_dup(const cJSON *o, const char *key)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(x) ? kvt_strdup(x->valuestring) : NULL;
}

/* runs[i]'s optional string o[key] into *out (NULL when absent) */
static kvt_status opt_string(const cJSON *o, const char *key, const char *path, size_t i,
                             char **out)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    KVT_RETURN_IF(x && !cJSON_IsString(x), KVT_ERR_CORRUPT, "%s: runs[%zu].%s is not a string",
                  path, i, key);
    KVT_RETURN_IF(x && !(*out = kvt_strdup(x->valuestring)), KVT_ERR_NOMEM, "out of memory");
    return KVT_OK;
}

/* root's optional engine object (kvtrace.hf.e2e) as one line of text into *out (NULL when
 * absent): its name and version, attention implementation, dtype and device, those it has */
static kvt_status read_engine(const cJSON *root, const char *path, char **out)
{
    *out = NULL;
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(root, "engine");
    if (!en)
        return KVT_OK;
    static const char *const keys[] = {"name", "version", "attn_implementation", "dtype", "device"};
    const cJSON *v[5];
    size_t n = 1;
    for (int k = 0; k < 5; k++) {
        v[k] = cJSON_IsObject(en) ? cJSON_GetObjectItemCaseSensitive(en, keys[k]) : NULL;
        KVT_RETURN_IF(!cJSON_IsObject(en) || (v[k] && !cJSON_IsString(v[k])), KVT_ERR_CORRUPT,
                      "%s: engine is not an object of strings (name, version, "
                      "attn_implementation, dtype, device)",
                      path);
        n += v[k] ? strlen(v[k]->valuestring) + 4 : 0;
    }
    char *s = kvt_calloc(n, 1);
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "out of memory");
    for (int k = 0; k < 5; k++) /* "name version, attn, dtype on device" */
        if (v[k] && v[k]->valuestring[0]) {
            const char *sep = !s[0] ? "" : k == 1 ? " " : k == 4 ? " on " : ", ";
            strcat(strcat(s, sep), v[k]->valuestring);
        }
    *out = s;
    return KVT_OK;
}

kvt_status kvt_e2e_parse(const char *txt, size_t len, const char *path, kvt_e2e **out)
{
    *out = NULL;
    cJSON *root = cJSON_ParseWithLength(txt, len);
    KVT_RETURN_IF(!root, KVT_ERR_CORRUPT, "%s is not valid JSON", path);
    kvt_status st = KVT_OK;
    kvt_e2e *e = kvt_calloc(1, sizeof(*e));
    if (!e) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(root, "e2e_version");
    if (!cJSON_IsNumber(ver)) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: no e2e_version (not an e2e.json of kvtrace e2e-llama2c)", path);
        goto out_free;
    }
    if (ver->valueint != 1) {
        st = kvt_error_set(ver->valueint > 1 ? KVT_ERR_VERSION : KVT_ERR_CORRUPT,
                           "%s: e2e_version %d; this kvtrace reads version 1", path, ver->valueint);
        goto out_free;
    }
    const cJSON *runs = cJSON_GetObjectItemCaseSensitive(root, "runs");
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(root, "spearman");
    const cJSON *trs = cJSON_GetObjectItemCaseSensitive(root, "traces");
    e->model = str_dup(root, "model");
    if (!cJSON_IsArray(runs) || !cJSON_IsObject(sp) || !cJSON_IsArray(trs) || !e->model ||
        !num_or_null(sp, "err_decode_vs_kl", &e->rho_err_decode) ||
        !num_or_null(sp, "missed_recall_decode_vs_kl", &e->rho_missed_recall)) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: lacks one of model, traces, runs, spearman (analysis/RESULTS.md, "
                           "\"End-to-end check\")",
                           path);
        goto out_free;
    }
    e->max_kl = NAN;
    if ((st = read_engine(root, path, &e->engine)))
        goto out_free;
    e->n_traces = (size_t)cJSON_GetArraySize(trs);
    if (e->n_traces == 0 || !(e->traces = kvt_calloc(e->n_traces, sizeof(*e->traces)))) {
        st = e->n_traces ? kvt_error_set(KVT_ERR_NOMEM, "out of memory")
                         : kvt_error_set(KVT_ERR_CORRUPT, "%s: no traces", path);
        goto out_free;
    }
    size_t k = 0;
    const cJSON *tj;
    cJSON_ArrayForEach(tj, trs)
    {
        const cJSON *np = cJSON_GetObjectItemCaseSensitive(tj, "n_prompt");
        const cJSON *nd = cJSON_GetObjectItemCaseSensitive(tj, "n_decode");
        kvt_e2e_trace *x = &e->traces[k];
        if (!(x->path = str_dup(tj, "path")) || !cJSON_IsNumber(np) || !cJSON_IsNumber(nd) ||
            np->valueint < 1 || nd->valueint < 1) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: traces[%zu] lacks path, or n_prompt or n_decode >= 1", path, k);
            goto out_free;
        }
        x->n_prompt = np->valueint, x->n_decode = nd->valueint;
        const cJSON *fp = cJSON_GetObjectItemCaseSensitive(tj, "fingerprint");
        if (fp && !(cJSON_IsString(fp) && strlen(fp->valuestring) == 16 &&
                    strspn(fp->valuestring, "0123456789abcdef") == 16)) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: traces[%zu].fingerprint is not 16 hex digits",
                               path, k);
            goto out_free;
        }
        if (fp) /* absent in files written before it was: "", matched by path */
            memcpy(x->fingerprint, fp->valuestring, 17);
        k++;
    }
    e->n_runs = (size_t)cJSON_GetArraySize(runs);
    if (e->n_runs == 0 || !(e->runs = kvt_calloc(e->n_runs, sizeof(*e->runs)))) {
        st = e->n_runs ? kvt_error_set(KVT_ERR_NOMEM, "out of memory")
                       : kvt_error_set(KVT_ERR_CORRUPT, "%s: no runs", path);
        goto out_free;
    }
    size_t i = 0;
    const cJSON *o;
    cJSON_ArrayForEach(o, runs)
    {
        kvt_e2e_run *x = &e->runs[i];
        const cJSON *ap = cJSON_GetObjectItemCaseSensitive(o, "applied");
        const cJSON *px = cJSON_GetObjectItemCaseSensitive(o, "proxy");
        const cJSON *bt = cJSON_GetObjectItemCaseSensitive(o, "budget_tokens");
        x->policy = str_dup(o, "policy");
        x->budget = str_dup(o, "budget");
        x->budget_tokens = cJSON_IsNumber(bt) ? bt->valueint : -1;
        if (!x->policy || !x->budget || x->budget_tokens < 1 || !cJSON_IsBool(ap) ||
            !cJSON_IsObject(px) || !num_or_null(o, "kept_fraction", &x->kept_fraction) ||
            !num_or_null(o, "kl_mean", &x->kl_mean) || !num_or_null(o, "kl_max", &x->kl_max) ||
            !num_or_null(o, "top1_agreement", &x->top1) || !num_or_null(o, "nll_mean", &x->nll) ||
            !num_or_null(px, "err_decode", &x->err_decode) ||
            !num_or_null(px, "recall_decode", &x->recall_decode)) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: runs[%zu] lacks a field or has one of the wrong type "
                               "(policy, budget, budget_tokens, applied, kept_fraction, kl_mean, "
                               "kl_max, "
                               "top1_agreement, nll_mean, proxy.err_decode, proxy.recall_decode)",
                               path, i);
            goto out_free;
        }
        x->applied = cJSON_IsTrue(ap);
        if ((st = opt_string(o, "name", path, i, &x->name)) ||
            (st = opt_string(o, "why", path, i, &x->why)))
            goto out_free;
        if (x->applied &&
            !(x->kl_mean >= 0 && x->kl_max >= x->kl_mean && x->top1 >= 0 && x->top1 <= 1)) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: runs[%zu] (%s at %s): kl_mean %g, kl_max %g, top1_agreement "
                               "%g are not a KL >= 0, its maximum and a share",
                               path, i, x->policy, x->budget, x->kl_mean, x->kl_max, x->top1);
            goto out_free;
        }
        i++;
    }
    *out = e;
    e = NULL;
out_free:
    kvt_e2e_free(e);
    cJSON_Delete(root);
    return st;
}

kvt_status kvt_e2e_read(const char *path, kvt_e2e **out)
{
    *out = NULL;
    char *txt;
    size_t len;
    KVT_FORWARD(kvt_read_text_file(path, E2E_MAX_BYTES, &txt, &len));
    kvt_status st = kvt_e2e_parse(txt, len, path, out);
    kvt_free(txt);
    return st;
}

/* the policies of e in first-appearance order into idx[n_runs] (the run's policy number);
 * returns how many */
static size_t policy_numbers(const kvt_e2e *e, size_t *idx)
{
    size_t n = 0;
    for (size_t i = 0; i < e->n_runs; i++) {
        size_t k = 0;
        while (k < i && strcmp(e->runs[k].policy, e->runs[i].policy))
            k++;
        idx[i] = k < i ? idx[k] : n++;
    }
    return n;
}

/* a filled circle (or square) of colour col at (x, y) */
kvt_status kvt_report_plot_e2e(const kvt_e2e *e, const char *path, int width, int height)
{
    KVT_RETURN_IF(width < 200 || height < 150, KVT_ERR_INVALID_ARG, "plot: too small");
    size_t *pol = kvt_malloc(e->n_runs * sizeof(size_t));
    KVT_RETURN_IF(!pol, KVT_ERR_NOMEM, "out of memory");
    size_t n_pol = policy_numbers(e, pol);
    double xmax = 0, ymax = 0;
    size_t n_pts = 0;
    for (size_t i = 0; i < e->n_runs; i++)
        if (e->runs[i].applied && isfinite(e->runs[i].err_decode) && isfinite(e->runs[i].kl_mean)) {
            xmax = fmax(xmax, e->runs[i].err_decode);
            ymax = fmax(ymax, e->runs[i].kl_mean);
            n_pts++;
        }
    const double ml = 70, mr = 190, mt = 40, mb = 55;
    size_t n_leg = 0; /* the policies with a point: every one in the legend */
    for (size_t k = 0; k < n_pol; k++) {
        bool any = false;
        for (size_t i = 0; i < e->n_runs && !any; i++)
            any = pol[i] == k && e->runs[i].applied && isfinite(e->runs[i].err_decode) &&
                  isfinite(e->runs[i].kl_mean);
        n_leg += any;
    }
    height = kvt_report_legend_height(height, mt, n_leg);
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
    cairo_t *cr = cairo_create(s);
    const double pw = width - ml - mr, ph = height - mt - mb;
    double x0, x1, xs, y0, y1, ys;
    int xd, yd;
    kvt_report_nice_axis(0.0, xmax > 0 ? xmax : 1.0, 8, &x0, &x1, &xs, &xd);
    kvt_report_nice_axis(0.0, ymax > 0 ? ymax : 1.0, 8, &y0, &y1, &ys, &yd);
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_set_font_size(cr, 13);
    char title[200], lab[32];
    snprintf(title, sizeof(title),
             "end to end: %zu settings, Spearman's rho (err_decode vs KL) = %s", n_pts,
             kvt_report_num(e->rho_err_decode, lab, sizeof(lab)));
    cairo_move_to(cr, ml, mt - 15);
    kvt_report_show_fit(cr, title, width - ml - 10);
    cairo_set_font_size(cr, 11);
    const int nxt = (int)lround(x1 / xs), nyt = (int)lround(y1 / ys);
    for (int i = 0; i <= nyt; i++) {
        double py = mt + ph - ph * i / (double)nyt;
        kvt_report_grid_line(cr, ml, py, ml + pw, py);
        snprintf(lab, sizeof(lab), "%.*f", yd, ys * i);
        cairo_text_extents_t te;
        cairo_text_extents(cr, lab, &te);
        cairo_move_to(cr, ml - 8 - te.width - te.x_bearing, py + 4);
        cairo_show_text(cr, lab);
    }
    for (int i = 0; i <= nxt; i++) {
        double px = ml + pw * i / (double)nxt;
        kvt_report_grid_line(cr, px, mt, px, mt + ph);
        snprintf(lab, sizeof(lab), "%.*f", xd, xs * i);
        cairo_text_extents_t te;
        cairo_text_extents(cr, lab, &te);
        cairo_move_to(cr, px - te.width / 2, mt + ph + 18);
        cairo_show_text(cr, lab);
    }
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, ml, mt, pw, ph);
    cairo_stroke(cr);
    const char *xt = "replay proxy: output error on held-out decode queries (err_decode)";
    const char *yt = "model's next-token KL from the uncompressed run (nats)";
    cairo_text_extents_t ext;
    cairo_text_extents(cr, xt, &ext);
    cairo_move_to(cr, ml + pw / 2 - ext.width / 2, height - 15);
    cairo_show_text(cr, xt);
    cairo_save(cr);
    cairo_text_extents(cr, yt, &ext);
    cairo_move_to(cr, 18, mt + ph / 2 + ext.width / 2);
    cairo_rotate(cr, -M_PI / 2);
    cairo_show_text(cr, yt);
    cairo_restore(cr);
    size_t li = 0;
    for (size_t k = 0; k < n_pol; k++) { /* colour and marker shape per policy */
        const double *col = kvt_report_palette(k);
        const char *label = NULL;
        for (size_t i = 0; i < e->n_runs; i++) {
            const kvt_e2e_run *x = &e->runs[i];
            if (pol[i] != k || !x->applied || !isfinite(x->err_decode) || !isfinite(x->kl_mean))
                continue;
            double px = ml + fmin(x->err_decode, x1) / x1 * pw;
            double py = mt + ph - fmin(x->kl_mean, y1) / y1 * ph;
            cairo_set_source_rgb(cr, col[0], col[1], col[2]);
            kvt_report_marker(cr, k, px, py, 4);
            label = x->policy;
        }
        if (label) { /* the marker, then the label; a policy with no point gets no line */
            cairo_set_source_rgb(cr, col[0], col[1], col[2]);
            kvt_report_marker(cr, k, ml + pw + 20, mt + 10 + 16 * li, 4);
            cairo_set_source_rgb(cr, 0, 0, 0);
            cairo_move_to(cr, ml + pw + 35, mt + 14 + 16 * li);
            kvt_report_show_fit(cr, label, mr - 45);
            li++;
        }
    }
    cairo_destroy(cr);
    kvt_free(pol);
    return kvt_report_save_png(s, path);
}
