/* html.c - `kvtrace report RESULTS -o DIR`: DIR/index.html, one self-contained page
 * (figures inlined as data: URIs, no network fetch), plus DIR/<metric>.png for every measured
 * metric (png.c). Every string taken from the results (model names, labels, paths, the
 * trace header) is HTML-escaped.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kvt_report.h"

static void put_escaped(FILE *f, const char *s)
{
    for (; s && *s; s++)
        switch (*s) {
        case '&':
            fputs("&amp;", f);
            break;
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        case '\'':
            fputs("&#39;", f);
            break;
        default:
            fputc(*s, f);
        }
}

/* the file at path as base64 into f */
static kvt_status put_base64_file(FILE *f, const char *path)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    FILE *in = fopen(path, "rb");
    KVT_RETURN_IF(!in, KVT_ERR_IO, "report: cannot read %s", path);
    unsigned char b[3];
    size_t n;
    while ((n = fread(b, 1, 3, in)) > 0) {
        unsigned v = (unsigned)b[0] << 16 | (n > 1 ? (unsigned)b[1] << 8 : 0) | (n > 2 ? b[2] : 0);
        fputc(tab[v >> 18 & 63], f);
        fputc(tab[v >> 12 & 63], f);
        fputc(n > 1 ? tab[v >> 6 & 63] : '=', f);
        fputc(n > 2 ? tab[v & 63] : '=', f);
    }
    fclose(in);
    return KVT_OK;
}

static void put_recommendation(FILE *f, const kvt_results *r)
{
    kvt_recommend_opts o = {KVT_REC_METRIC_AUTO, true, 0.1};
    kvt_recommendation *rec = NULL;
    char *text = NULL;
    size_t len = 0;
    fputs("<h2>Recommended settings (output error &le; 0.1)</h2>\n", f);
    if (kvt_recommend(r, &o, &rec)) {
        fputs("<p>No recommendation: ", f);
        put_escaped(f, kvt_error_msg());
        fputs("</p>\n", f);
        return;
    }
    FILE *m = open_memstream(&text, &len);
    if (m) {
        kvt_recommendation_print(rec, r, m);
        fclose(m);
        fputs("<pre>", f);
        put_escaped(f, text);
        fputs("</pre>\n", f);
        free(text);
    }
    /* best candidate per budget */
    fprintf(f,
            "<h2>Best policy per budget (%s)</h2>\n<table><tr><th>budget</th><th>policy</th>"
            "<th>%s</th></tr>\n",
            kvt_rec_metric_name(rec->metric), kvt_rec_metric_name(rec->metric));
    for (size_t b = 0; b < rec->n_budgets; b++) {
        int best = -1;
        for (size_t p = 0; p < rec->n_policies; p++) {
            double v = rec->curves[p].value[b];
            if (!rec->curves[p].candidate || isnan(v))
                continue;
            if (best < 0 || (rec->target_is_max ? v < rec->curves[best].value[b]
                                                : v > rec->curves[best].value[b]))
                best = (int)p;
        }
        fputs("<tr><td>", f);
        put_escaped(f, r->budgets[b].text);
        fputs("</td><td>", f);
        put_escaped(f, best < 0 ? "-" : r->policies[best].label);
        if (best < 0)
            fputs("</td><td>-</td></tr>\n", f);
        else
            fprintf(f, "</td><td>%.4g</td></tr>\n", rec->curves[best].value[b]);
    }
    fputs("</table>\n", f);
    kvt_recommendation_free(rec);
}

static void put_trace_meta(FILE *f, const kvt_trace_result *t)
{
    fputs("<tr><td>", f);
    put_escaped(f, t->model_name);
    fputs("</td><td>", f);
    put_escaped(f, t->model_arch);
    fprintf(f, "</td><td>%d</td><td>%d / %d</td><td>%d</td><td>%d</td><td>%d</td><td>", t->n_layers,
            t->n_q_heads, t->n_kv_heads, t->n_tokens, t->window_stored, t->n_decode);
    put_escaped(f, t->kv_dtype);
    fputs("</td><td>", f);
    put_escaped(f, t->path);
    fputs("</td></tr>\n<tr><td colspan=\"9\"><details><summary>trace header</summary><pre>", f);
    put_escaped(f, t->header_json);
    fputs("</pre></details></td></tr>\n", f);
}

/* the redundancy heatmap: the PNG, and an HTML table of the same cells with the value of
 * each on hover (title), so the page needs no script for it */
static kvt_status put_redundancy(FILE *f, const kvt_results *r, const char *dir)
{
    const kvt_trace_result *t = r->traces[0];
    char path[4096];
    snprintf(path, sizeof(path), "%s/redundancy.png", dir);
    fputs("<h2>Head-wise redundancy</h2>\n<figure id=\"fig-redundancy\"><img alt=\"head "
          "redundancy heatmap\" src=\"data:image/png;base64,",
          f);
    KVT_FORWARD(put_base64_file(f, path));
    fputs("\"><figcaption>MixKV head redundancy r of all keys per layer and KV head (mean over "
          "traces); 1 = all keys point the same way. Hover the table for values."
          "</figcaption></figure>\n<table class=\"heat\"><tr><th>layer</th>",
          f);
    for (int h = 0; h < t->n_kv_heads; h++)
        fprintf(f, "<th>%d</th>", h);
    fputs("</tr>\n", f);
    for (int l = 0; l < t->n_layers; l++) {
        fprintf(f, "<tr><th>%d</th>", l);
        for (int h = 0; h < t->n_kv_heads; h++) {
            double rgb[3], v = kvt_report_redundancy(r, l, h);
            kvt_report_colormap(v, rgb);
            fprintf(f,
                    "<td title=\"layer %d, KV head %d: r = %.4f\" style=\"background:rgb(%d,%d,"
                    "%d)\"></td>",
                    l, h, v, (int)(rgb[0] * 255), (int)(rgb[1] * 255), (int)(rgb[2] * 255));
        }
        fputs("</tr>\n", f);
    }
    fputs("</table>\n", f);
    return KVT_OK;
}

kvt_status kvt_report_write(const kvt_results *r, const char *dir)
{
    KVT_RETURN_IF(r->n_traces == 0, KVT_ERR_INVALID_ARG, "report: no trace in the results");
    KVT_RETURN_IF(mkdir(dir, 0777) != 0 && errno != EEXIST, KVT_ERR_IO,
                  "report: cannot create %s: %s", dir, strerror(errno));
    static const kvt_rec_metric figs[] = {KVT_REC_METRIC_ERR_DECODE, KVT_REC_METRIC_RECALL_DECODE,
                                          KVT_REC_METRIC_ERR_WINDOW, KVT_REC_METRIC_RECALL_WINDOW,
                                          KVT_REC_METRIC_COVERAGE};
    bool drawn[sizeof(figs) / sizeof(figs[0])] = {false};
    char path[4096];
    for (size_t i = 0; i < sizeof(figs) / sizeof(figs[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s.png", dir, kvt_rec_metric_name(figs[i]));
        kvt_status st = kvt_report_plot_metric(r, figs[i], path, 900, 540);
        if (st == KVT_ERR_INVALID_ARG)
            continue; /* not measured on these traces */
        KVT_FORWARD(st);
        drawn[i] = true;
    }
    snprintf(path, sizeof(path), "%s/redundancy.png", dir);
    KVT_FORWARD(kvt_report_plot_redundancy(r, path, 900, 540));
    snprintf(path, sizeof(path), "%s/index.html", dir);
    FILE *f = fopen(path, "w");
    KVT_RETURN_IF(!f, KVT_ERR_IO, "report: cannot write %s: %s", path, strerror(errno));
    fputs("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>kvtrace "
          "report: ",
          f);
    put_escaped(f, r->traces[0]->model_name);
    fputs("</title>\n<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
          "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow-x:auto}.heat "
          "td{width:18px;height:12px}</style>\n"
          "</head><body>\n<h1>kvtrace report: ",
          f);
    put_escaped(f, r->traces[0]->model_name);
    fputs("</h1>\n<p>Generated by ", f);
    put_escaped(f, r->generator);
    fprintf(f, " from %zu trace%s, %zu policies, %zu budgets.</p>\n", r->n_traces,
            r->n_traces == 1 ? "" : "s", r->n_policies, r->n_budgets);
    fputs("<h2>Traces</h2>\n<table><tr><th>model</th><th>arch</th><th>layers</th><th>heads q/kv"
          "</th><th>tokens</th><th>window</th><th>decode</th><th>kv dtype</th><th>path</th></tr>\n",
          f);
    for (size_t i = 0; i < r->n_traces; i++)
        put_trace_meta(f, r->traces[i]);
    fputs("</table>\n", f);
    put_recommendation(f, r);
    kvt_status st = put_redundancy(f, r, dir);
    fputs("<h2>Quality against budget</h2>\n", f);
    for (size_t i = 0; i < sizeof(figs) / sizeof(figs[0]) && !st; i++) {
        if (!drawn[i])
            continue;
        snprintf(path, sizeof(path), "%s/%s.png", dir, kvt_rec_metric_name(figs[i]));
        fprintf(f,
                "<figure id=\"fig-%s\"><img alt=\"%s against budget\" src=\"data:image/png;base64,",
                kvt_rec_metric_name(figs[i]), kvt_rec_metric_name(figs[i]));
        st = put_base64_file(f, path);
        fprintf(f,
                "\"><figcaption>%s of each policy against the mean kept entries per head and "
                "layer; dashed: full cache and oracle (references).</figcaption></figure>\n",
                kvt_rec_metric_name(figs[i]));
    }
    fputs("</body></html>\n", f);
    if (ferror(f) && !st)
        st = kvt_error_set(KVT_ERR_IO, "report: write failed");
    if (fclose(f) && !st)
        st = kvt_error_set(KVT_ERR_IO, "report: write failed");
    return st;
}
