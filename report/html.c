/* html.c - `kvtrace report RESULTS -o DIR`: DIR/index.html, one self-contained page that
 * fetches nothing (PNGs inlined as data: URIs, Chart.js inlined, a Content-Security-Policy that
 * forbids every fetch), plus the PNG figures (png.c). Every string taken from the results (model
 * names, labels, paths, the trace header) is HTML-escaped in the markup; the interactive charts
 * and heatmaps (page.js) read one JSON blob in which '<', '>' and '&' are \u escapes, so no
 * string can end the script element.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kvt_report.h"
#include "report_internal.h"

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

/* The targets of the trade-off table: the page's own and a fixed ladder, strictest first. */
static size_t target_ladder(const kvt_recommendation *rec, double *t)
{
    static const double err[] = {0.05, 0.1, 0.2, 0.3, 0.5}, rcl[] = {0.99, 0.95, 0.9, 0.8, 0.7};
    const double *lad = rec->target_is_max ? err : rcl;
    size_t n = 0;
    bool own = false;
    for (size_t i = 0; i < 5; i++) {
        if (!own && (rec->target_is_max ? rec->target <= lad[i] : rec->target >= lad[i])) {
            t[n++] = rec->target;
            own = true;
            if (rec->target == lad[i])
                continue;
        }
        t[n++] = lad[i];
    }
    if (!own)
        t[n++] = rec->target;
    return n;
}

static void put_setting_cells(FILE *f, const kvt_results *r, const kvt_recommendation *q)
{
    char a[32];
    if (!q->found) {
        fputs("<td colspan=\"5\">none", f);
        if (q->has_closest) {
            fputs(" (nearest: ", f);
            put_escaped(f, r->policies[q->closest_policy].label);
            fputs(" at ", f);
            put_escaped(f, r->budgets[q->closest_budget].text);
            fprintf(f, ", %s)", kvt_report_num(q->closest_value, a, sizeof(a)));
        }
        fputs("</td>", f);
        return;
    }
    fputs("<td>", f);
    put_escaped(f, r->policies[q->policy].label);
    fputs("</td><td>", f);
    put_escaped(f, r->budgets[q->budget].text);
    fprintf(f, "</td><td>%s</td><td>%.1f%%</td><td>%.3g&times;</td>",
            kvt_report_num(q->value, a, sizeof(a)), 100.0 * q->summary.kept_fraction,
            q->summary.compression_ratio);
}

/* the cheapest setting meeting each target of the ladder, the page's own target in bold */
static void put_target_table(FILE *f, const kvt_results *r, const kvt_recommendation *rec)
{
    double t[6];
    size_t n = target_ladder(rec, t);
    const char *mn = kvt_rec_metric_name(rec->metric);
    fprintf(f,
            "<p>The cheapest setting at other targets (%s %s target):</p>\n<table "
            "id=\"rec-targets\"><tr><th>target</th><th>policy</th><th>budget</th><th>%s</th>"
            "<th>KV kept</th><th>smaller by</th></tr>\n",
            mn, rec->target_is_max ? "&le;" : "&ge;", mn);
    for (size_t i = 0; i < n; i++) {
        kvt_recommend_opts o = {rec->metric, rec->target_is_max, t[i]};
        kvt_recommendation *q = NULL;
        bool own = t[i] == rec->target; /* the page's own: already computed */
        fprintf(f, "<tr%s><td>%s %g</td>", own ? " class=\"sel\"" : "",
                rec->target_is_max ? "&le;" : "&ge;", t[i]);
        if (own)
            put_setting_cells(f, r, rec);
        else if (kvt_recommend(r, &o, &q) == KVT_OK)
            put_setting_cells(f, r, q);
        else
            fputs("<td colspan=\"5\">-</td>", f);
        fputs("</tr>\n", f);
        kvt_recommendation_free(q);
    }
    fputs("</table>\n", f);
}

/* rec: the page's recommendation, or NULL with why_not saying why there is none */
static void put_recommendation(FILE *f, const kvt_results *r, const kvt_recommendation *rec,
                               const char *why_not, const size_t *order)
{
    char *text = NULL, a[32];
    size_t len = 0;
    if (!rec) {
        fputs("<h2 id=\"recommendation\">Recommended settings</h2>\n<p>No recommendation: ", f);
        put_escaped(f, why_not);
        fputs("</p>\n", f);
        return;
    }
    const char *mn = kvt_rec_metric_name(rec->metric), *rel = rec->target_is_max ? "&le;" : "&ge;";
    fprintf(f, "<h2 id=\"recommendation\">Recommended settings (%s %s %g)</h2>\n", mn, rel,
            rec->target);
    fputs("<p id=\"rec-headline\">", f);
    if (rec->found) {
        fputs("<strong>", f);
        put_escaped(f, r->policies[rec->policy].label);
        fputs(" at budget ", f);
        put_escaped(f, r->budgets[rec->budget].text);
        fprintf(f,
                "</strong>: %s %s, keeping %.1f%% of the KV cache (%.3g&times; smaller), is the "
                "cheapest measured setting that meets the target.",
                mn, kvt_report_num(rec->value, a, sizeof(a)), 100.0 * rec->summary.kept_fraction,
                rec->summary.compression_ratio);
        if (rec->summary.kept_fraction >= KVT_REC_BARELY)
            fputs(" It barely compresses: the target needs nearly the whole cache (a looser "
                  "target, or budgets between the measured ones, may find a cheaper setting).",
                  f);
    } else {
        if (!rec->any_compressing || rec->full_cache_meets) /* as recommend says it */
            fprintf(f, "<strong>No setting below the full cache meets %s %s %g</strong> (%s).", mn,
                    rel, rec->target,
                    rec->any_compressing ? "only settings that keep the whole cache meet it"
                                         : "every measured budget keeps the whole prompt");
        else
            fprintf(f, "<strong>No measured setting meets %s %s %g.</strong>", mn, rel,
                    rec->target);
        if (rec->has_closest) {
            fputs(" The nearest is ", f);
            put_escaped(f, r->policies[rec->closest_policy].label);
            fputs(" at budget ", f);
            put_escaped(f, r->budgets[rec->closest_budget].text);
            fprintf(f, " (%s %s).", mn, kvt_report_num(rec->closest_value, a, sizeof(a)));
        }
        fputs(" Relax the target (<code>kvtrace report --max-error E</code> or "
              "<code>--min-recall R</code>) or replay larger budgets.",
              f);
    }
    fputs("</p>\n", f);
    put_target_table(f, r, rec);
    FILE *m = open_memstream(&text, &len);
    if (m) {
        kvt_recommendation_print(rec, r, m);
        fclose(m);
        fputs("<p>Details (<code>kvtrace recommend</code>): each policy's cheapest budget "
              "meeting the target and the knee of its curve; per-layer and per-head budgets of "
              "the recommended policy.</p>\n<pre>",
              f);
        put_escaped(f, text);
        fputs("</pre>\n", f);
        free(text);
    }
    /* best candidate per budget, smallest budget first, among those keeping about what the
       budget says: a policy may keep more (lightkv-like never drops text tokens) or fewer
       (chunkkv keeps whole chunks), and one keeping far more would win every row for it. A
       better over-budget candidate is named beside, with what it keeps. */
    fprintf(f,
            "<h2>Best policy per budget (%s)</h2>\n<p>At each budget, the candidate with the best "
            "%s among those keeping at most the budget's share of the KV cache (%.0f%% slack for "
            "rounding), and the share it keeps. A candidate that keeps more and scores better is "
            "named in the last column.</p>\n<table><tr><th>budget</th><th>policy</th>"
            "<th>%s</th><th>KV kept</th><th>better, over the budget</th></tr>\n",
            kvt_rec_metric_name(rec->metric), kvt_rec_metric_name(rec->metric),
            100.0 * (KVT_REPORT_BUDGET_SLACK - 1.0), kvt_rec_metric_name(rec->metric));
    for (size_t bi = 0; bi < rec->n_budgets; bi++) {
        size_t b = order[bi];
        double nominal = 0; /* the entries the budget keeps: its tokens per head and layer */
        for (size_t t = 0; t < r->n_traces; t++)
            nominal += (double)r->traces[t]->n_layers * r->traces[t]->n_kv_heads *
                       kvt_report_kept_tokens(r->traces[t], b);
        int best = -1, over = -1;
        kvt_run_summary sb = {0}, so = {0};
        for (size_t p = 0; p < rec->n_policies; p++) {
            double v = rec->curves[p].value[b];
            kvt_run_summary s;
            if (!rec->curves[p].candidate || isnan(v) || !kvt_rec_compresses(rec, p, b) ||
                kvt_summarize_results(r, p, b, &s) != KVT_OK)
                continue;
            bool within = s.kept_entries <= KVT_REPORT_BUDGET_SLACK * nominal;
            int *slot = within ? &best : &over;
            if (*slot < 0 || (rec->target_is_max ? v < rec->curves[*slot].value[b]
                                                 : v > rec->curves[*slot].value[b])) {
                *slot = (int)p;
                *(within ? &sb : &so) = s;
            }
        }
        if (over >= 0 && best >= 0 &&
            !(rec->target_is_max ? rec->curves[over].value[b] < rec->curves[best].value[b]
                                 : rec->curves[over].value[b] > rec->curves[best].value[b]))
            over = -1; /* not better than the best within the budget */
        fputs("<tr><td>", f);
        put_escaped(f, r->budgets[b].text);
        fputs("</td><td>", f);
        if (best < 0)
            fputs("-</td><td>-</td><td>-", f);
        else {
            put_escaped(f, r->policies[best].label);
            fprintf(f, "</td><td>%.4g</td><td>%.1f%%", rec->curves[best].value[b],
                    100.0 * sb.kept_fraction);
        }
        fputs("</td><td>", f);
        if (over < 0)
            fputs("-", f);
        else {
            put_escaped(f, r->policies[over].label);
            fprintf(f, ": %.4g, keeping %.1f%%", rec->curves[over].value[b],
                    100.0 * so.kept_fraction);
        }
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n", f);
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

/* the Policies table: each policy's effective options (from its options JSON, key=value) and
 * what its flags mean for reading the figures */
static void put_policies(FILE *f, const kvt_results *r)
{
    fputs("<h2 id=\"policies\">Policies</h2>\n<table><tr><th>label</th><th>policy</th>"
          "<th>effective options</th><th>notes</th></tr>\n",
          f);
    for (size_t p = 0; p < r->n_policies; p++) {
        const kvt_results_policy *rp = &r->policies[p];
        fputs("<tr><td>", f);
        put_escaped(f, rp->label);
        fputs("</td><td>", f);
        put_escaped(f, rp->name);
        fputs("</td><td>", f);
        cJSON *o = rp->options_json ? cJSON_Parse(rp->options_json) : NULL;
        const cJSON *it;
        bool first = true;
        cJSON_ArrayForEach(it, o)
        {
            char num[64];
            if (cJSON_IsNumber(it))
                kvt_fmt_double(it->valuedouble, num, sizeof(num));
            const char *v = cJSON_IsString(it)   ? it->valuestring
                            : cJSON_IsTrue(it)   ? "1"
                            : cJSON_IsFalse(it)  ? "0"
                            : cJSON_IsNumber(it) ? num
                                                 : "none";
            fputs(first ? "" : ", ", f);
            put_escaped(f, it->string);
            fputc('=', f);
            put_escaped(f, v);
            first = false;
        }
        fputs("</td><td>", f);
        static const struct {
            unsigned flag;
            const char *text;
        } notes[] = {
            {KVT_POLICY_LIKE, "inferred: an emulation of a method without public code (its "
                              "inferred parts: analysis/RESULTS.md)"},
            {KVT_POLICY_MERGED, "merged or pruned entries (the errors and coverage are on their "
                                "keys and values; recall is not measured)"},
            {KVT_POLICY_PER_STEP, "selects again at every decode step"},
            {KVT_POLICY_PER_BUDGET, "kept sets not nested across budgets"}};
        const char *sep = "";
        /* decoding=N, dms_decoding=1, h2o-greedy's and rkv's decode=1: its per-step sets are
           caches that evict decode tokens (said below) */
        const cJSON *dec = cJSON_GetObjectItemCaseSensitive(o, "decoding");
        const bool dms_dec = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "dms_decoding"));
        const bool g_dec = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "decode"));
        for (size_t k = 0; k < sizeof(notes) / sizeof(notes[0]); k++)
            if ((rp->flags & notes[k].flag) && !(notes[k].flag == KVT_POLICY_PER_STEP &&
                                                 (cJSON_IsNumber(dec) || dms_dec || g_dec))) {
                fprintf(f, "%s%s", sep, notes[k].text);
                sep = "; ";
            }
        /* the generic options that change what a budget means */
        if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, "layer_weights"))) {
            fprintf(f,
                    "%seach layer its own budget (layer_weights=): a budget is the mean over "
                    "layers, the per-layer figures show each layer's",
                    sep);
            sep = "; ";
        }
        if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, "stats"))) {
            fprintf(f,
                    "%sthe queries' statistics from a calibration set (stats=), not the prompt's",
                    sep);
            sep = "; ";
        }
        if (cJSON_IsNumber(dec)) {
            fprintf(f,
                    "%sthe cache, decode tokens too, compressed back to the budget every %d "
                    "decode steps (decoding=), %s at prefill; the decode metrics and kept "
                    "entries follow it",
                    sep, dec->valueint,
                    cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "prefill"))
                        ? "and the prompt to the budget"
                        : "the prompt kept whole");
            sep = "; ";
        }
        if (dms_dec) {
            fprintf(f,
                    "%sdecode tokens too evicted by the threshold as they leave the last "
                    "dms_window tokens (dms_decoding=1); the decode metrics and kept entries "
                    "follow the cache",
                    sep);
            sep = "; ";
        }
        const cJSON *iv = cJSON_GetObjectItemCaseSensitive(o, "interval");
        if (g_dec && cJSON_IsNumber(iv)) /* rkv */
            fprintf(f,
                    "%sthe cache, decode tokens too, compressed back to the budget whenever the "
                    "sequence reaches a multiple of %d tokens (interval=), and the prompt at "
                    "prefill once it holds the budget; the decode metrics and kept entries "
                    "follow it",
                    sep, iv->valueint);
        else if (g_dec)
            fprintf(f,
                    "%sthe eviction going on through the decode steps, decode tokens too "
                    "(decode=1); the decode metrics and kept entries follow the cache",
                    sep);
        sep = g_dec ? "; " : sep;
        const cJSON *cl = cJSON_GetObjectItemCaseSensitive(o, "chunk_length");
        const cJSON *cs = cJSON_GetObjectItemCaseSensitive(o, "chunk_scores");
        if (cJSON_IsNumber(cl))
            fprintf(f, "%sthe budget shared over chunks of %d prompt tokens (chunk_length=)%s", sep,
                    cl->valueint,
                    cJSON_IsString(cs) && strcmp(cs->valuestring, "prompt")
                        ? ", each chunk scored as a prompt of its own (chunk_scores=)"
                        : "");
        cJSON_Delete(o);
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n", f);
}

static const kvt_rec_metric figs[] = {KVT_REC_METRIC_ERR_DECODE,  KVT_REC_METRIC_RECALL_DECODE,
                                      KVT_REC_METRIC_ERR_WINDOW,  KVT_REC_METRIC_RECALL_WINDOW,
                                      KVT_REC_METRIC_COVERAGE,    KVT_REC_METRIC_COVERAGE_DROPPED,
                                      KVT_REC_METRIC_HEAD_OVERLAP};

/* what a quality figure shows, for its caption */
static const char *metric_blurb(kvt_rec_metric m)
{
    switch (m) {
    case KVT_REC_METRIC_ERR_DECODE:
        return "output error ||o_S - o|| / ||o|| on the held-out decode queries (lower is better)";
    case KVT_REC_METRIC_RECALL_DECODE:
        return "the share of the decode queries' attention the kept entries hold";
    case KVT_REC_METRIC_ERR_WINDOW:
        return "output error on the window queries the policies select with (lower is better)";
    case KVT_REC_METRIC_RECALL_WINDOW:
        return "the share of the window queries' attention the kept entries hold";
    case KVT_REC_METRIC_COVERAGE:
        return "key coverage: the mean over probe keys of the best cosine to a kept key";
    case KVT_REC_METRIC_COVERAGE_DROPPED:
        return "the same over the dropped probe keys only: how well the kept keys stand in for "
               "the evicted ones";
    default:
        return "how alike the heads' kept sets are: the mean Jaccard overlap with the layer's "
               "other heads (1: every head keeps the same tokens)";
    }
}
#define N_FIGS (sizeof(figs) / sizeof(figs[0]))
static const char *const mod_names[KVT_N_MODALITIES] = {"text", "image", "video", "other"};
enum { FIG_W = 900, FIG_H = 540 }; /* every PNG of the report */

/* What the report draws, decided once from the results; shared by the PNG and HTML passes. */
typedef struct report_plan {
    const char *dir;
    bool drawn[N_FIGS];         /* curve of figs[i] measured */
    kvt_rec_metric heat[2];     /* recall and output error metrics of the heatmaps */
    double heat_vmax[2];        /* colour scale of each: [0, vmax] */
    size_t n_heat;              /* how many of heat[] are measured */
    size_t heat_budget;         /* budget index the heatmaps open at */
    bool heat_recommended;      /* heat_budget is the recommended budget (else the middle one) */
    kvt_recommendation *rec;    /* the page's recommendation at `target`, NULL if none */
    char rec_why_not[256];      /* why rec is NULL */
    kvt_recommend_opts target;  /* the page's quality target */
    bool mod[KVT_N_MODALITIES]; /* modality figure drawn (tokens of it, and some non-text) */
    bool multimodal;
    bool *alloc;        /* [n_policies] kvt_report_policy_allocates */
    bool *alloc_heads;  /* [n_policies] its kept entries per head drawn (at heat_budget) */
    size_t *order;      /* [n_budgets] kvt_report_budget_order: smallest budget first */
    const kvt_e2e *e2e; /* the end-to-end check's section, or NULL */
} report_plan;

/* "<prefix>_<NN>_<label>.png" with the label reduced to [A-Za-z0-9_-] and 32 characters */
static void policy_file(char *buf, size_t cap, const char *prefix, size_t p, const char *label)
{
    int n = snprintf(buf, cap, "%s_%02zu_", prefix, p);
    size_t k = n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
    for (size_t i = 0; label[i] && i < 32 && k + 5 < cap; i++) {
        char c = label[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '-';
        buf[k++] = ok ? c : '-';
    }
    snprintf(buf + k, cap - k, ".png");
}

static void plan_free(report_plan *pl)
{
    kvt_free(pl->alloc);
    pl->alloc = NULL;
    kvt_free(pl->alloc_heads);
    pl->alloc_heads = NULL;
    kvt_free(pl->order);
    pl->order = NULL;
    kvt_recommendation_free(pl->rec);
    pl->rec = NULL;
}

static kvt_status plan_create(const kvt_results *r, const char *dir,
                              const kvt_recommend_opts *target, report_plan *pl)
{
    memset(pl, 0, sizeof(*pl));
    pl->dir = dir;
    pl->target = target ? *target : KVT_RECOMMEND_OPTS_DEFAULT;
    /* the recommendation, once for the whole page: a target the caller gave must be answerable
       (its metric measured); the default one may not be, and the page then says why */
    kvt_status st = kvt_recommend(r, &pl->target, &pl->rec);
    if (st && target)
        return st;
    if (st)
        snprintf(pl->rec_why_not, sizeof(pl->rec_why_not), "%s", kvt_error_msg());
    pl->alloc = kvt_calloc(r->n_policies, sizeof(*pl->alloc));
    pl->alloc_heads = kvt_calloc(r->n_policies, sizeof(*pl->alloc_heads));
    pl->order = kvt_calloc(r->n_budgets, sizeof(*pl->order));
    if (!pl->alloc || !pl->alloc_heads || !pl->order) {
        plan_free(pl);
        return kvt_error_set(KVT_ERR_NOMEM, "report: out of memory");
    }
    kvt_report_budget_order(r, pl->order);
    for (size_t p = 0; p < r->n_policies; p++)
        pl->alloc[p] = kvt_report_policy_allocates(r, p);
    const kvt_rec_metric recall = kvt_report_metric_measured(r, KVT_REC_METRIC_RECALL_DECODE)
                                      ? KVT_REC_METRIC_RECALL_DECODE
                                      : KVT_REC_METRIC_RECALL_WINDOW;
    const kvt_rec_metric err = kvt_report_metric_measured(r, KVT_REC_METRIC_ERR_DECODE)
                                   ? KVT_REC_METRIC_ERR_DECODE
                                   : KVT_REC_METRIC_ERR_WINDOW;
    if (kvt_report_metric_measured(r, recall))
        pl->heat[pl->n_heat] = recall, pl->heat_vmax[pl->n_heat++] = 1.0;
    if (kvt_report_metric_measured(r, err)) {
        /* errors pass 1 when a set points the output elsewhere; 1 (no better than keeping
           nothing) gets the top colour, the hover text has the value */
        pl->heat[pl->n_heat] = err, pl->heat_vmax[pl->n_heat++] = 1.0;
    }
    pl->heat_recommended = pl->rec && pl->rec->found; /* as kvt_report_heat_budget */
    pl->heat_budget = pl->heat_recommended ? pl->rec->budget : pl->order[r->n_budgets / 2];
    for (int m = 1; m < KVT_N_MODALITIES; m++)
        pl->multimodal |= kvt_report_modality_tokens(r, m) > 0;
    for (int m = 0; m < KVT_N_MODALITIES; m++)
        pl->mod[m] = pl->multimodal && kvt_report_modality_tokens(r, m) > 0;
    return KVT_OK;
}

/* every PNG of the report into pl->dir */
static kvt_status draw_pngs(const kvt_results *r, report_plan *pl)
{
    char path[4096], name[256];
    for (size_t i = 0; i < N_FIGS; i++) {
        snprintf(path, sizeof(path), "%s/%s.png", pl->dir, kvt_rec_metric_name(figs[i]));
        kvt_status st = kvt_report_plot_metric(r, figs[i], path, FIG_W, FIG_H);
        if (st == KVT_ERR_INVALID_ARG)
            continue; /* not measured on these traces */
        KVT_FORWARD(st);
        pl->drawn[i] = true;
    }
    snprintf(path, sizeof(path), "%s/redundancy.png", pl->dir);
    KVT_FORWARD(kvt_report_plot_redundancy(r, path, FIG_W, FIG_H));
    for (size_t k = 0; k < pl->n_heat; k++)
        for (size_t p = 0; p < r->n_policies; p++) {
            char prefix[64];
            snprintf(prefix, sizeof(prefix), "heat_%s", kvt_rec_metric_name(pl->heat[k]));
            policy_file(name, sizeof(name), prefix, p, r->policies[p].label);
            snprintf(path, sizeof(path), "%s/%s", pl->dir, name);
            KVT_FORWARD(kvt_report_plot_head_metric(r, p, pl->heat_budget, pl->heat[k],
                                                    pl->heat_vmax[k], path, FIG_W, FIG_H));
        }
    for (int m = 0; m < KVT_N_MODALITIES; m++) {
        if (!pl->mod[m])
            continue;
        snprintf(path, sizeof(path), "%s/modality_%s.png", pl->dir, mod_names[m]);
        KVT_FORWARD(kvt_report_plot_modality(r, m, path, FIG_W, FIG_H));
    }
    for (size_t p = 0; p < r->n_policies; p++) {
        if (!pl->alloc[p])
            continue;
        policy_file(name, sizeof(name), "alloc", p, r->policies[p].label);
        snprintf(path, sizeof(path), "%s/%s", pl->dir, name);
        KVT_FORWARD(kvt_report_plot_layer_keep(r, p, path, FIG_W, FIG_H));
        policy_file(name, sizeof(name), "alloc_heads", p, r->policies[p].label);
        snprintf(path, sizeof(path), "%s/%s", pl->dir, name);
        kvt_status st = kvt_report_plot_head_keep(r, p, pl->heat_budget, path, FIG_W, FIG_H);
        if (st == KVT_ERR_INVALID_ARG)
            continue; /* nothing kept at that budget */
        KVT_FORWARD(st);
        pl->alloc_heads[p] = true;
    }
    if (pl->e2e) {
        snprintf(path, sizeof(path), "%s/e2e.png", pl->dir);
        KVT_FORWARD(kvt_report_plot_e2e(pl->e2e, path, FIG_W, FIG_H));
    }
    return KVT_OK;
}

/* <img> of DIR/file inlined as a data: URI */
static kvt_status put_img(FILE *f, const char *dir, const char *file, const char *alt)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    fputs("<img alt=\"", f);
    put_escaped(f, alt);
    fputs("\" src=\"data:image/png;base64,", f);
    KVT_FORWARD(put_base64_file(f, path));
    fputs("\">", f);
    return KVT_OK;
}

/* an interactive chart (canvas) with its PNG folded below it, or only the PNG without
 * Chart.js */
static kvt_status put_chart(FILE *f, bool chartjs, const char *canvas_id, const char *dir,
                            const char *file, const char *alt)
{
    if (!chartjs)
        return put_img(f, dir, file, alt);
    fprintf(f,
            "<div class=\"chart\"><canvas id=\"%s\"></canvas></div><details><summary>PNG "
            "version (",
            canvas_id);
    put_escaped(f, file);
    fputs(")</summary>", f);
    KVT_FORWARD(put_img(f, dir, file, alt));
    fputs("</details>", f);
    return KVT_OK;
}

static void put_colorbar(FILE *f, double vmax, const char *label)
{
    fprintf(f, "<div class=\"cbar\"><span>0</span><span class=\"cbar-grad\"></span><span>%.2f ",
            vmax);
    put_escaped(f, label);
    fputs("</span></div>\n", f);
}

/* the redundancy heatmap: the PNG, and an HTML table of the same cells with the value of
 * each on hover (title) and a colour bar, so it needs no script */
static kvt_status put_redundancy(FILE *f, const kvt_results *r, const char *dir)
{
    const kvt_trace_result *t = r->traces[0];
    fputs("<h2>Head-wise redundancy</h2>\n<figure id=\"fig-redundancy\">", f);
    KVT_FORWARD(put_img(f, dir, "redundancy.png", "head redundancy heatmap"));
    fputs("<figcaption>MixKV head redundancy r of all keys per layer and KV head (mean over "
          "traces); 1 = all keys point the same way. Hover the table for values."
          "</figcaption></figure>\n",
          f);
    put_colorbar(f, 1.0, "r");
    fputs("<table class=\"heat\" id=\"heat-redundancy\"><tr><th>layer</th>", f);
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

static kvt_status put_curves(FILE *f, const kvt_results *r, const report_plan *pl, bool chartjs)
{
    char file[64], id[64], alt[96];
    fputs("<h2>Quality against budget</h2>\n<p>One line per policy against the mean kept "
          "entries per head and layer (log scale); dashed: the references full cache and oracle "
          "(it reads the future decode queries)."
          "</p>\n",
          f);
    bool none = true;
    for (size_t i = 0; i < N_FIGS; i++)
        none &= !pl->drawn[i];
    if (none) { /* say why the section is empty */
        fputs("<p class=\"note\" id=\"curves-none\">Nothing to plot: no policy but the full "
              "cache has a measured value (the results hold only <code>full</code>, or every "
              "metric of the others is null). Replay the policies to compare with "
              "<code>kvtrace replay --policies</code>.</p>\n",
              f);
        return KVT_OK;
    }
    if (chartjs)
        fputs("<p>Hover a point for its policy, budget and value; click a legend entry to hide "
              "a line.</p>\n",
              f);
    for (size_t i = 0; i < N_FIGS; i++) {
        if (!pl->drawn[i])
            continue;
        const char *m = kvt_rec_metric_name(figs[i]);
        snprintf(file, sizeof(file), "%s.png", m);
        snprintf(id, sizeof(id), "chart-%s", m);
        snprintf(alt, sizeof(alt), "%s against budget", m);
        fprintf(f, "<figure id=\"fig-%s\">", m);
        KVT_FORWARD(put_chart(f, chartjs, id, pl->dir, file, alt));
        fprintf(f,
                "<figcaption>%s of each policy against the mean kept entries per KV head and "
                "layer (a heads=query policy's per query head times the query heads per KV "
                "head: the cache it keeps): %s.",
                m, metric_blurb(figs[i]));
        /* a policy with no value of this metric has no line: say so, or it looks not run */
        bool any = false;
        for (size_t p = 0; p < r->n_policies; p++) {
            bool measured = false;
            for (size_t b = 0; b < r->n_budgets && !measured; b++) {
                kvt_run_summary s;
                measured = kvt_summarize_results(r, p, b, &s) == KVT_OK &&
                           !isnan(kvt_rec_summary_value(&s, figs[i]));
            }
            if (measured)
                continue;
            fputs(any ? ", " : " Not measured, so not drawn: ", f);
            put_escaped(f, r->policies[p].label);
            any = true;
        }
        fputs(any ? ".</figcaption></figure>\n" : "</figcaption></figure>\n", f);
    }
    return KVT_OK;
}

/* the budget <select> of a section, smallest budget first, opened at the heatmaps' budget */
static void put_budget_select(FILE *f, const kvt_results *r, const report_plan *pl, const char *id)
{
    fprintf(f, "<p><label for=\"%s\">budget</label> <select id=\"%s\">", id, id);
    for (size_t bi = 0; bi < r->n_budgets; bi++) {
        size_t b = pl->order[bi];
        fprintf(f, "<option value=\"%zu\"%s>", b, b == pl->heat_budget ? " selected" : "");
        put_escaped(f, r->budgets[b].text);
        fputs("</option>", f);
    }
    fputs("</select></p>\n", f);
}

/* The end of a heatmap section's paragraph (which budget the page opens at), its budget
 * <select id=select_id>, the <div id=div_id> the page script fills, and the opening of the
 * <details> that holds the PNG versions */
static void put_heat_controls(FILE *f, const kvt_results *r, const report_plan *pl,
                              const char *select_id, const char *div_id)
{
    fputs(" The page opens at budget ", f);
    put_escaped(f, r->budgets[pl->heat_budget].text);
    fputs(pl->heat_recommended ? ", the budget of the recommended setting above"
                               : ", the middle of the budget sweep (no setting meets the target)",
          f);
    fputs("; the PNG files show that budget.</p>\n", f);
    put_budget_select(f, r, pl, select_id);
    fprintf(f,
            "<div id=\"%s\"><noscript>The interactive heatmaps need JavaScript; the PNG "
            "versions are below.</noscript></div>\n<details><summary>PNG versions (budget ",
            div_id);
    put_escaped(f, r->budgets[pl->heat_budget].text);
    fputs(")</summary>\n", f);
}

static kvt_status put_heatmaps(FILE *f, const kvt_results *r, const report_plan *pl)
{
    char name[256];
    if (pl->n_heat == 0)
        return KVT_OK;
    fputs("<h2 id=\"per-head\">Recall and output error per layer and head</h2>\n<p>", f);
    for (size_t k = 0; k < pl->n_heat; k++)
        fprintf(f, "%s%s", k ? " and " : "", kvt_rec_metric_name(pl->heat[k]));
    fputs(" of each policy per layer and head (the mean over traces); colour scale 0 to 1, "
          "errors above 1 get the top colour; grey: not measured. Hover a cell for its value.",
          f);
    put_heat_controls(f, r, pl, "heat-budget", "heatmaps");
    for (size_t k = 0; k < pl->n_heat; k++)
        for (size_t p = 0; p < r->n_policies; p++) {
            char prefix[64];
            snprintf(prefix, sizeof(prefix), "heat_%s", kvt_rec_metric_name(pl->heat[k]));
            policy_file(name, sizeof(name), prefix, p, r->policies[p].label);
            fputs("<figure class=\"heat-png\">", f);
            KVT_FORWARD(put_img(f, pl->dir, name, name));
            fputs("</figure>\n", f);
        }
    fputs("</details>\n", f);
    return KVT_OK;
}

/* one cell of the redundancy-by-modality table: r to 3 decimals, or a dash for null */
static void put_r_cell(FILE *f, double v)
{
    if (isnan(v))
        fputs("<td>&ndash;</td>", f);
    else
        fprintf(f, "<td>%.3f</td>", v);
}

/* head redundancy by modality (DESIGN §4): of all the keys of each modality, then of those each
 * policy keeps at each budget (the aggregate over traces) */
static kvt_status put_modality_redundancy(FILE *f, const kvt_results *r, const report_plan *pl)
{
    fputs("<h3 id=\"modality-redundancy\">Head redundancy by modality</h3>\n<p>MixKV head "
          "redundancy r of the keys of each modality: of all of them, then of those each policy "
          "keeps at each budget (the mean over traces, layers and heads; a dash: under two such "
          "keys). A lower kept r than the policy it builds on means more diverse keys kept.</p>\n"
          "<table id=\"table-mod-redundancy\"><tr><th>policy</th><th>budget</th>",
          f);
    for (int m = 0; m < KVT_N_MODALITIES; m++)
        if (pl->mod[m])
            fprintf(f, "<th>%s</th>", mod_names[m]);
    fputs("</tr>\n", f);
    kvt_run_summary s;
    KVT_FORWARD(kvt_summarize_results(r, 0, 0, &s));
    fputs("<tr id=\"mod-r-all\"><th colspan=\"2\">all keys</th>", f);
    for (int m = 0; m < KVT_N_MODALITIES; m++)
        if (pl->mod[m])
            put_r_cell(f, s.r_all_mod[m]);
    fputs("</tr>\n", f);
    for (size_t p = 0; p < r->n_policies; p++)
        for (size_t bi = 0; bi < r->n_budgets; bi++) { /* smallest budget first */
            const size_t b = pl->order[bi];
            KVT_FORWARD(kvt_summarize_results(r, p, b, &s));
            fputs("<tr><td>", f);
            put_escaped(f, r->policies[p].label);
            fputs("</td><td>", f);
            put_escaped(f, r->budgets[b].text);
            fputs("</td>", f);
            for (int m = 0; m < KVT_N_MODALITIES; m++)
                if (pl->mod[m])
                    put_r_cell(f, s.r_kept_mod[m]);
            fputs("</tr>\n", f);
        }
    fputs("</table>\n", f);
    return KVT_OK;
}

static kvt_status put_modality(FILE *f, const kvt_results *r, const report_plan *pl, bool chartjs)
{
    char file[64], id[64], alt[96];
    fputs("<h2 id=\"modality\">Modality retention</h2>\n", f);
    if (!pl->multimodal) {
        fputs("<p class=\"note\" id=\"modality-text-only\">The traces hold only text tokens (or "
              "no modality table), so there is no image/text retention to show.</p>\n",
              f);
        return KVT_OK;
    }
    fputs("<p>Share of the tokens of each modality that each policy keeps at each budget (kept "
          "entries over the entries of that modality in the full cache, summed over traces, "
          "layers and heads; a policy that selects per query head has a set per query head, "
          "so its full cache counts query heads).</p>\n",
          f);
    for (int m = 0; m < KVT_N_MODALITIES; m++) {
        if (!pl->mod[m])
            continue;
        snprintf(file, sizeof(file), "modality_%s.png", mod_names[m]);
        snprintf(id, sizeof(id), "chart-mod-%s", mod_names[m]);
        snprintf(alt, sizeof(alt), "share of %s tokens kept", mod_names[m]);
        fprintf(f, "<figure id=\"fig-modality-%s\">", mod_names[m]);
        KVT_FORWARD(put_chart(f, chartjs, id, pl->dir, file, alt));
        fprintf(f, "<figcaption>Share of %s tokens kept.</figcaption></figure>\n", mod_names[m]);
    }
    return put_modality_redundancy(f, r, pl);
}

/* how the allocating policies split their budget over the heads of each layer */
static kvt_status put_alloc_heads(FILE *f, const kvt_results *r, const report_plan *pl)
{
    char name[256];
    fputs("<h3 id=\"alloc-heads\">Kept entries per layer and head</h3>\n<p>How each of these "
          "policies splits its budget over the heads of each layer (the mean over traces); "
          "one colour scale for all of them, 0 to the largest count of any of them (with the "
          "same kind of head) at that budget, so that the tables compare; grey: not measured. "
          "Hover a cell for its count and its ratio to the mean head of the layer.",
          f);
    put_heat_controls(f, r, pl, "alloc-budget", "alloc-heatmaps");
    bool missing = false;
    for (size_t p = 0; p < r->n_policies; p++) {
        missing |= pl->alloc[p] && !pl->alloc_heads[p];
        if (!pl->alloc_heads[p])
            continue;
        policy_file(name, sizeof(name), "alloc_heads", p, r->policies[p].label);
        fputs("<figure class=\"heat-png\">", f);
        KVT_FORWARD(put_img(f, pl->dir, name, name));
        fputs("</figure>\n", f);
    }
    if (missing) { /* say which have no figure, rather than leave them out silently */
        fputs("<p class=\"note\">No kept entries measured at this budget for ", f);
        bool first = true;
        for (size_t p = 0; p < r->n_policies; p++)
            if (pl->alloc[p] && !pl->alloc_heads[p]) {
                fputs(first ? "" : ", ", f);
                put_escaped(f, r->policies[p].label);
                first = false;
            }
        fputs(": no PNG for them.</p>\n", f);
    }
    fputs("</details>\n", f);
    return KVT_OK;
}

static kvt_status put_alloc(FILE *f, const kvt_results *r, const report_plan *pl, bool chartjs)
{
    char file[256], id[64];
    bool any = false;
    fputs("<h2 id=\"alloc\">Allocated budgets per layer and head</h2>\n", f);
    for (size_t p = 0; p < r->n_policies; p++)
        any |= pl->alloc[p];
    if (!any) {
        fputs("<p class=\"note\">No policy of this run allocates its budget unevenly over "
              "layers or heads (PyramidKV, AdaKV, MixKV-AdaKV, SparseMM do).</p>\n",
              f);
        return KVT_OK;
    }
    fputs("<p>Policies whose kept entries differ between layers or heads: the mean kept entries "
          "per head of each layer, one line per budget.</p>\n",
          f);
    for (size_t p = 0; p < r->n_policies; p++) {
        if (!pl->alloc[p])
            continue;
        policy_file(file, sizeof(file), "alloc", p, r->policies[p].label);
        snprintf(id, sizeof(id), "chart-alloc-%zu", p);
        fprintf(f, "<figure class=\"alloc\" id=\"fig-alloc-%zu\">", p);
        KVT_FORWARD(put_chart(f, chartjs, id, pl->dir, file, "kept entries per layer"));
        fputs("<figcaption>", f);
        put_escaped(f, r->policies[p].label);
        fputs(": mean kept entries per head by layer.</figcaption></figure>\n", f);
    }
    return put_alloc_heads(f, r, pl);
}

/* ---- the JSON blob of the page script ---- */

/* cJSON builder that remembers a failed allocation instead of dropping the item */
static void add(cJSON *to, cJSON *item, bool *ok)
{
    if (!item || !to || !cJSON_AddItemToArray(to, item)) {
        cJSON_Delete(item);
        *ok = false;
    }
}

static void put_field(cJSON *to, const char *key, cJSON *item, bool *ok)
{
    if (!item || !to || !cJSON_AddItemToObject(to, key, item)) {
        cJSON_Delete(item);
        *ok = false;
    }
}

/* a number with 5 significant digits (the page shows 4), null for NaN/Inf */
static cJSON *num(double v)
{
    char b[32];
    if (!isfinite(v))
        return cJSON_CreateNull();
    snprintf(b, sizeof(b), "%.5g", v);
    return cJSON_CreateNumber(strtod(b, NULL));
}

static cJSON *build_curves(const kvt_results *r, const report_plan *pl, bool *ok)
{
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; i < N_FIGS; i++) {
        if (!pl->drawn[i])
            continue;
        cJSON *c = cJSON_CreateObject(), *nk = cJSON_CreateArray(), *val = cJSON_CreateArray();
        for (size_t p = 0; p < r->n_policies; p++) {
            cJSON *nk_row = cJSON_CreateArray(), *val_row = cJSON_CreateArray();
            for (size_t b = 0; b < r->n_budgets; b++) {
                kvt_run_summary s;
                bool have = kvt_summarize_results(r, p, b, &s) == KVT_OK;
                double v = have ? kvt_rec_summary_value(&s, figs[i]) : NAN;
                add(nk_row, num(have ? s.n_keep * kvt_report_kv_heads_factor(r, p) : NAN), ok);
                add(val_row, num(have ? v : NAN), ok);
            }
            add(nk, nk_row, ok);
            add(val, val_row, ok);
        }
        put_field(c, "metric", cJSON_CreateString(kvt_rec_metric_name(figs[i])), ok);
        put_field(c, "n_keep", nk, ok);
        put_field(c, "value", val, ok);
        add(arr, c, ok);
    }
    return arr;
}

static cJSON *build_heat(const kvt_results *r, const report_plan *pl, bool *ok)
{
    const kvt_trace_result *t = r->traces[0];
    cJSON *heat = cJSON_CreateObject(), *metrics = cJSON_CreateArray(),
          *heads = cJSON_CreateArray();
    put_field(heat, "L", cJSON_CreateNumber(t->n_layers), ok);
    for (size_t p = 0; p < r->n_policies; p++)
        add(heads, cJSON_CreateNumber(t->policy_heads[p]), ok);
    put_field(heat, "heads", heads, ok);
    put_field(heat, "kv_heads", cJSON_CreateNumber(t->n_kv_heads), ok);
    for (size_t k = 0; k < pl->n_heat; k++) {
        cJSON *hm = cJSON_CreateObject(), *grid = cJSON_CreateArray();
        put_field(hm, "metric", cJSON_CreateString(kvt_rec_metric_name(pl->heat[k])), ok);
        put_field(hm, "vmax", num(pl->heat_vmax[k]), ok);
        for (size_t p = 0; p < r->n_policies; p++) {
            cJSON *per_budget = cJSON_CreateArray();
            for (size_t b = 0; b < r->n_budgets; b++) {
                cJSON *cells = cJSON_CreateArray(); /* [L * H'], row-major */
                for (int l = 0; l < t->n_layers; l++)
                    for (int h = 0; h < t->policy_heads[p]; h++)
                        add(cells, num(kvt_report_head_value(r, p, b, pl->heat[k], l, h)), ok);
                add(per_budget, cells, ok);
            }
            add(grid, per_budget, ok);
        }
        put_field(hm, "grid", grid, ok);
        add(metrics, hm, ok);
    }
    put_field(heat, "metrics", metrics, ok);
    return heat;
}

static cJSON *build_modality(const kvt_results *r, const report_plan *pl, bool *ok)
{
    if (!pl->multimodal)
        return cJSON_CreateNull();
    cJSON *mod = cJSON_CreateObject(), *names = cJSON_CreateArray(), *share = cJSON_CreateArray();
    for (int m = 0; m < KVT_N_MODALITIES; m++) {
        if (!pl->mod[m])
            continue;
        add(names, cJSON_CreateString(mod_names[m]), ok);
        cJSON *per_pol = cJSON_CreateArray();
        for (size_t p = 0; p < r->n_policies; p++) {
            cJSON *row = cJSON_CreateArray();
            for (size_t b = 0; b < r->n_budgets; b++)
                add(row, num(kvt_report_modality_share(r, p, b, m)), ok);
            add(per_pol, row, ok);
        }
        add(share, per_pol, ok);
    }
    put_field(mod, "names", names, ok);
    put_field(mod, "share", share, ok);
    return mod;
}

static cJSON *build_alloc(const kvt_results *r, const report_plan *pl, bool *ok)
{
    cJSON *arr = cJSON_CreateArray();
    for (size_t p = 0; p < r->n_policies; p++) {
        if (!pl->alloc[p])
            continue;
        const kvt_trace_result *t = r->traces[0];
        cJSON *a = cJSON_CreateObject(), *keep = cJSON_CreateArray(), *heads = cJSON_CreateArray();
        put_field(a, "policy", cJSON_CreateNumber((double)p), ok);
        for (size_t b = 0; b < r->n_budgets; b++) {
            cJSON *row = cJSON_CreateArray(), *cells = cJSON_CreateArray(); /* [L * H'] */
            for (int l = 0; l < t->n_layers; l++) {
                add(row, num(kvt_report_layer_keep(r, p, b, l)), ok);
                for (int h = 0; h < t->policy_heads[p]; h++)
                    add(cells, num(kvt_report_head_keep(r, p, b, l, h)), ok);
            }
            add(keep, row, ok);
            add(heads, cells, ok);
        }
        put_field(a, "keep", keep, ok);
        put_field(a, "head_keep", heads, ok);
        add(arr, a, ok);
    }
    return arr;
}

/* the page data as JSON text; caller frees with cJSON_free */
static kvt_status build_data(const kvt_results *r, const report_plan *pl, char **out)
{
    bool ok = true;
    cJSON *d = cJSON_CreateObject(), *pols = cJSON_CreateArray(), *buds = cJSON_CreateArray();
    put_field(d, "model", cJSON_CreateString(r->traces[0]->model_name), &ok);
    for (size_t p = 0; p < r->n_policies; p++) {
        cJSON *o = cJSON_CreateObject();
        const char *name = r->policies[p].name;
        put_field(o, "label", cJSON_CreateString(r->policies[p].label), &ok);
        put_field(o, "name", cJSON_CreateString(name), &ok);
        put_field(o, "ref", cJSON_CreateBool(!strcmp(name, "full") || !strcmp(name, "oracle")),
                  &ok);
        add(pols, o, &ok);
    }
    for (size_t b = 0; b < r->n_budgets; b++)
        add(buds, cJSON_CreateString(r->budgets[b].text), &ok);
    put_field(d, "policies", pols, &ok);
    put_field(d, "budgets", buds, &ok);
    put_field(d, "heat_budget", cJSON_CreateNumber((double)pl->heat_budget), &ok);
    cJSON *ord = cJSON_CreateArray(); /* budget indices, smallest budget first */
    for (size_t b = 0; ord && b < r->n_budgets; b++)
        add(ord, cJSON_CreateNumber((double)pl->order[b]), &ok);
    put_field(d, "order", ord, &ok);
    put_field(d, "curves", build_curves(r, pl, &ok), &ok);
    put_field(d, "heat", build_heat(r, pl, &ok), &ok);
    put_field(d, "modality", build_modality(r, pl, &ok), &ok);
    put_field(d, "alloc", build_alloc(r, pl, &ok), &ok);
    *out = ok ? cJSON_PrintUnformatted(d) : NULL;
    cJSON_Delete(d);
    KVT_RETURN_IF(!*out, KVT_ERR_NOMEM, "report: out of memory building the page data");
    return KVT_OK;
}

/* JSON text inside <script type="application/json">: '<', '>' and '&' only occur in strings
 * there, where \u003c... means the same to JSON.parse, and without '<' nothing can end the
 * element */
static void put_json_script(FILE *f, const char *json)
{
    fputs("<script type=\"application/json\" id=\"kvt-data\">", f);
    for (const char *s = json; *s; s++)
        switch (*s) {
        case '<':
            fputs("\\u003c", f);
            break;
        case '>':
            fputs("\\u003e", f);
            break;
        case '&':
            fputs("\\u0026", f);
            break;
        default:
            fputc(*s, f);
        }
    fputs("</script>\n", f);
}

/* The Chart.js file, NUL-terminated, or NULL if it cannot be read (missing, empty, over 64 MiB,
 * no memory): the page then goes without charts. Caller frees with kvt_free. */
static char *chartjs_load(const char *path, size_t *len)
{
    FILE *in = kvt_fopen_regular(path); /* a FIFO in $KVT_CHARTJS would block */
    if (!in)
        return NULL;
    char *buf = NULL;
    long n = -1;
    if (fseek(in, 0, SEEK_END) == 0 && (n = ftell(in)) > 0 && n < (64L << 20) &&
        fseek(in, 0, SEEK_SET) == 0)
        buf = kvt_malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, in) != (size_t)n) {
        kvt_free(buf);
        buf = NULL;
    }
    fclose(in);
    if (buf) {
        buf[n] = 0;
        *len = (size_t)n;
    }
    return buf;
}

/* Inline Chart.js. "</script" (any case) becomes "<\/script" and "<!--" "<\!--": the same
 * JavaScript inside strings, regular expressions and comments, but neither ends nor escapes the
 * script element. */
static void put_chartjs(FILE *f, const char *path, const char *js, size_t n)
{
    fputs("<script>/* Chart.js, inlined from ", f);
    for (const char *p = path; *p; p++) /* the path in a comment: no "*" "/" or "<" from it */
        fputc(*p == '*' || *p == '<' ? '_' : *p, f);
    fputs(" */\n", f);
    for (size_t i = 0; i < n; i++) {
        if (js[i] == '<' && i + 8 <= n && js[i + 1] == '/' &&
            !strncasecmp(js + i + 2, "script", 6)) {
            fputs("<\\/", f);
            i++;
        } else if (js[i] == '<' && i + 4 <= n && !strncmp(js + i + 1, "!--", 3)) {
            fputs("<\\!", f);
            i++;
        } else
            fputc(js[i], f);
    }
    fputs("\n</script>\n", f);
}

static const char page_style[] =
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
    ".heat td{width:18px;height:12px;padding:0}.heat th{font-weight:normal;font-size:11px}"
    "tr.sel td{font-weight:bold}#rec-headline{font-size:1.1em}"
    ".note{background:#fff4ce;border:1px solid #e0c060;padding:6px 10px}"
    "#js-errors{background:#fde;border:1px solid #c66;color:#900}"
    ".chart{position:relative;height:440px}"
    ".hm-grid{display:flex;flex-wrap:wrap;gap:12px}.hm{margin:0}"
    ".hm figcaption{font-size:12px;max-width:260px;overflow-wrap:anywhere}"
    ".cbar{display:flex;align-items:center;gap:6px;font-size:12px;margin:4px 0}"
    ".cbar-grad{display:inline-block;width:200px;height:12px;border:1px solid #888;"
    "background:linear-gradient(to right,rgb(68,1,84),rgb(59,82,139),rgb(33,145,140),"
    "rgb(94,201,98),rgb(253,231,37))}";

/* ix[n_runs]: the runs of e by policy (first appearance) and budget, smallest first, as the
 * page lists budgets */
static void e2e_order(const kvt_e2e *e, size_t *ix)
{
    for (size_t i = 0; i < e->n_runs; i++) {
        size_t j = i; /* insertion: stable, and n_runs is small */
        const kvt_e2e_run *x = &e->runs[i];
        size_t px = 0;
        while (strcmp(e->runs[px].policy, x->policy))
            px++;
        while (j > 0) {
            const kvt_e2e_run *y = &e->runs[ix[j - 1]];
            size_t py = 0;
            while (strcmp(e->runs[py].policy, y->policy))
                py++;
            if (py < px || (py == px && y->budget_tokens <= x->budget_tokens))
                break;
            ix[j] = ix[j - 1];
            j--;
        }
        ix[j] = i;
    }
}

/* report --max-kl: the cheapest setting whose measured mean KL is at most the target */
static kvt_status put_e2e_choice(FILE *f, const kvt_e2e *e)
{
    kvt_e2e_choice *c;
    KVT_FORWARD(kvt_recommend_e2e(e, e->max_kl, &c));
    char a[32], b[32], d[32], g[32];
    fprintf(f, "<p id=\"e2e-recommend\"%s>By the model's own output: ",
            c->found ? "" : " class=\"note\"");
    const long k = c->found ? c->best : c->nearest;
    if (k >= 0) {
        const kvt_e2e_run *x = &e->runs[k];
        fprintf(f,
                c->found ? "the cheapest setting of mean KL at most %s nats is <b>"
                         : "no setting has a mean KL at most %s nats; the nearest is <b>",
                kvt_report_num(e->max_kl, a, sizeof(a)));
        put_escaped(f, x->policy);
        fputs(" at ", f);
        put_escaped(f, x->budget);
        fprintf(f,
                "</b>: mean KL %s, top-1 agreement %s%%, keeping %s%% of the KV cache (%sx "
                "smaller)",
                kvt_report_num(x->kl_mean, a, sizeof(a)),
                kvt_report_num(100.0 * x->top1, b, sizeof(b)),
                kvt_report_num(100.0 * x->kept_fraction, d, sizeof(d)),
                kvt_report_num(1.0 / x->kept_fraction, g, sizeof(g)));
    } else {
        fprintf(f, "no setting that compresses the cache has a measured mean KL (target %s nats)",
                kvt_report_num(e->max_kl, a, sizeof(a)));
    }
    fputs(" (<code>kvtrace recommend --e2e</code>).</p>\n", f);
    kvt_e2e_choice_free(c);
    return KVT_OK;
}

/* the end-to-end check (kvtrace e2e-llama2c): the scatter, the rank correlations and a table
 * of every setting, its proxies beside what it did to the model's output */
static kvt_status put_e2e(FILE *f, const kvt_results *r, const report_plan *pl)
{
    const kvt_e2e *e = pl->e2e;
    char a[32], b[32], c[32], d[32], g[32], h[32];
    fputs("<h2 id=\"e2e\">End to end: do the proxies predict the model's output?</h2>\n<p>", f);
    if (e->engine) { /* kvtrace.hf.e2e on a transformers model */
        fputs("<code>kvtrace.hf.e2e</code> (", f);
        put_escaped(f, e->engine);
        fputs(") reran the decode steps of ", f);
    } else {
        fputs("<code>kvtrace e2e-llama2c</code> reran the decode steps of ", f);
    }
    for (size_t t = 0; t < e->n_traces; t++) {
        fputs(t ? (t + 1 == e->n_traces ? " and " : ", ") : "", f);
        put_escaped(f, e->traces[t].path);
        fprintf(f, " (%d prompt tokens, %d steps)", e->traces[t].n_prompt, e->traces[t].n_decode);
    }
    fputs(" on the model ", f);
    put_escaped(f, e->model);
    fputs(", with each setting's kept sets masking every layer and head, fed the same tokens, "
          "and compared the next-token distributions with the uncompressed run. Spearman's rho "
          "against the mean KL: err_decode ",
          f);
    fprintf(f,
            "<b>%s</b>, 1 - recall_decode <b>%s</b> (1 = the proxy ranks the settings as "
            "the model's output does).</p>\n",
            kvt_report_num(e->rho_err_decode, a, sizeof(a)),
            kvt_report_num(e->rho_missed_recall, b, sizeof(b)));
    fputs("<figure id=\"fig-e2e\">", f);
    KVT_FORWARD(put_img(f, pl->dir, "e2e.png", "proxy err_decode against the end-to-end KL"));
    fputs("<figcaption>Each point is a (policy, budget): the replay's output error on held-out "
          "decode queries against the model's mean next-token KL divergence from the "
          "uncompressed run.</figcaption></figure>\n",
          f);
    if (isfinite(e->max_kl)) /* report --max-kl: the answer of the model's own output */
        KVT_FORWARD(put_e2e_choice(f, e));
    bool ours = true; /* is every trace of the check one of these results'? */
    for (size_t k = 0; k < e->n_traces && ours; k++)
        ours = kvt_e2e_find_trace(e, k, r) >= 0;
    if (!ours)
        fputs("<p class=\"note\" id=\"e2e-other-trace\">Note: this check ran on a trace the "
              "results above do not hold; its settings and numbers are its own.</p>\n",
              f);
    fputs("<table id=\"e2e-table\"><tr><th>policy</th><th>budget</th><th>kept</th>"
          "<th>err_decode</th><th>recall_decode</th><th>KL mean</th><th>KL max</th>"
          "<th>top-1 agreement</th><th>log-loss</th></tr>\n",
          f);
    size_t *ix = kvt_malloc(e->n_runs * sizeof(size_t));
    KVT_RETURN_IF(!ix, KVT_ERR_NOMEM, "report: out of memory");
    e2e_order(e, ix);
    for (size_t k = 0; k < e->n_runs; k++) {
        const kvt_e2e_run *x = &e->runs[ix[k]];
        fputs("<tr><td>", f);
        put_escaped(f, x->policy);
        fputs("</td><td>", f);
        put_escaped(f, x->budget);
        fprintf(f, "</td><td>%s%%</td><td>%s</td><td>%s</td>",
                kvt_report_num(100.0 * x->kept_fraction, a, sizeof(a)),
                kvt_report_num(x->err_decode, b, sizeof(b)),
                kvt_report_num(x->recall_decode, c, sizeof(c)));
        if (x->applied)
            fprintf(f, "<td>%s</td><td>%s</td><td>%s%%</td><td>%s</td></tr>\n",
                    kvt_report_num(x->kl_mean, d, sizeof(d)),
                    kvt_report_num(x->kl_max, g, sizeof(g)),
                    kvt_report_num(100.0 * x->top1, h, sizeof(h)),
                    kvt_report_num(x->nll, a, sizeof(a)));
        else if (e->engine) { /* kvtrace.hf.e2e: merged policies are not run, the file says why */
            fputs("<td colspan=\"4\" class=\"e2e-why\">not run", f);
            if (x->why) {
                fputs(": ", f);
                put_escaped(f, x->why);
            }
            fputs("</td></tr>\n", f);
        } else
            fputs("<td colspan=\"4\">not run (an e2e.json of a kvtrace before 2026-12-06, which "
                  "did not run merged policies)</td></tr>\n",
                  f);
    }
    fputs("</table>\n", f);
    kvt_free(ix);
    return KVT_OK;
}

/* everything between <body> and the scripts */
static kvt_status put_body(FILE *f, const kvt_results *r, const report_plan *pl, bool chartjs,
                           const char *chartjs_path)
{
    fputs("<h1>kvtrace report: ", f);
    put_escaped(f, r->traces[0]->model_name);
    fputs("</h1>\n<p>Generated by ", f);
    put_escaped(f, r->generator);
    fprintf(f, " from %zu trace%s, %zu policies, %zu budgets.</p>\n", r->n_traces,
            r->n_traces == 1 ? "" : "s", r->n_policies, r->n_budgets);
    if (!chartjs) {
        fputs("<p class=\"note\" id=\"no-chartjs\">Interactive charts are off: Chart.js was not "
              "found at ",
              f);
        put_escaped(f, chartjs_path);
        fputs(" when this report was written (install libjs-chart.js or set KVT_CHARTJS to a "
              "Chart.js 3 UMD file). The figures below are the static PNGs.</p>\n",
              f);
    }
    fputs("<pre id=\"js-errors\" hidden></pre>\n", f);
    fputs("<h2>Traces</h2>\n<table><tr><th>model</th><th>arch</th><th>layers</th><th>heads q/kv"
          "</th><th>tokens</th><th>window</th><th>decode</th><th>kv dtype</th><th>path</th></tr>\n",
          f);
    for (size_t i = 0; i < r->n_traces; i++)
        put_trace_meta(f, r->traces[i]);
    fputs("</table>\n", f);
    put_policies(f, r);
    put_recommendation(f, r, pl->rec, pl->rec_why_not, pl->order);
    KVT_FORWARD(put_curves(f, r, pl, chartjs));
    KVT_FORWARD(put_redundancy(f, r, pl->dir));
    KVT_FORWARD(put_heatmaps(f, r, pl));
    KVT_FORWARD(put_modality(f, r, pl, chartjs));
    KVT_FORWARD(put_alloc(f, r, pl, chartjs));
    if (pl->e2e)
        KVT_FORWARD(put_e2e(f, r, pl));
    return KVT_OK;
}

static kvt_status write_page(FILE *f, const kvt_results *r, const report_plan *pl)
{
    const char *chartjs_path = kvt_report_chartjs_path();
    char *json = NULL;
    KVT_FORWARD(build_data(r, pl, &json));
    /* the policy forbids every fetch, so even a bug cannot reach the network */
    fputs("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<meta "
          "http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
          "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n<title>kvtrace report: ",
          f);
    put_escaped(f, r->traces[0]->model_name);
    fprintf(f, "</title>\n<style>%s</style>\n", page_style);
    fputs("<script>window.kvtErrors=[];window.addEventListener('error',function(e){"
          "window.kvtErrors.push(String(e.message));document.documentElement.setAttribute("
          "'data-js-errors',String(window.kvtErrors.length));});</script>\n</head><body>\n",
          f);
    /* Chart.js after the body: the page shows before the 200 kB script is parsed */
    size_t js_len = 0;
    char *js = chartjs_load(chartjs_path, &js_len);
    if (!js)
        kvt_log(KVT_LOG_WARN,
                "report: no Chart.js at %s ($KVT_CHARTJS, or Debian's libjs-chart.js): the page "
                "shows the PNG figures instead of interactive charts",
                chartjs_path && *chartjs_path ? chartjs_path : "(none set)");
    kvt_status st = put_body(f, r, pl, js != NULL, chartjs_path);
    if (st)
        goto out_free_js;
    put_json_script(f, json);
    if (js)
        put_chartjs(f, chartjs_path, js, js_len);
    fputs("<script>\n", f);
    for (size_t i = 0; kvt_report_page_js[i]; i++) {
        fputs(kvt_report_page_js[i], f);
        fputc('\n', f);
    }
    fputs("</script>\n</body></html>\n", f);
out_free_js:
    kvt_free(js);
    cJSON_free(json);
    return st;
}

/* Move every file of the staging directory into dir (the PNGs, then index.html, so the page
 * never names a figure that is not there yet), or, when !commit, remove them; then remove
 * the staging directory. Nothing is moved if one of the names in dir is not a regular file
 * (only regular files are replaced), or is a file of the user's where no report is (dir has
 * neither index.html nor a report's file list: a report's files are replaced only with the
 * report, which the command replaces only with --force). The file list is moved first, so
 * that a commit cut short leaves a folder a later report recognises. Returns the first
 * failure when committing. */
#define MANIFEST ".kvtrace-report-files" /* the names of a report's files, one per line */

/* a name a manifest may list: a plain file name of dir, never the page or a staging name */
static bool manifest_name_ok(const char *n)
{
    return *n && !strchr(n, '/') && strcmp(n, ".") && strcmp(n, "..") && strcmp(n, "index.html") &&
           strcmp(n, MANIFEST) && strncmp(n, ".kvt-report-", 12) && strlen(n) < 256;
}

/* Write stage/MANIFEST: every file name in stage */
static kvt_status manifest_write(const char *stage)
{
    char path[4096 + 64];
    snprintf(path, sizeof(path), "%s/" MANIFEST, stage);
    DIR *d = opendir(stage);
    FILE *f = d ? fopen(path, "w") : NULL;
    struct dirent *e;
    while (f && (e = readdir(d)) != NULL)
        if (manifest_name_ok(e->d_name))
            fprintf(f, "%s\n", e->d_name);
    bool ok = f && !ferror(f) && fflush(f) == 0;
    if (f && fclose(f) != 0)
        ok = false;
    if (d)
        closedir(d);
    KVT_RETURN_IF(!ok, KVT_ERR_IO, "report: cannot write %s: %s", path, strerror(errno));
    return KVT_OK;
}

/* A manifest's text (NUL-terminated, kvt_free it), or NULL when there is none */
static char *manifest_read(const char *dir)
{
    char path[4096 + 64];
    snprintf(path, sizeof(path), "%s/" MANIFEST, dir);
    FILE *f = kvt_fopen_regular(path);
    char *t = f ? kvt_malloc((1 << 20) + 1) : NULL;
    size_t n = t ? fread(t, 1, 1 << 20, f) : 0;
    if (t)
        t[n] = '\0';
    if (f)
        fclose(f);
    return t;
}

/* After a new report is in place: remove the files the old report's manifest (old, its text)
 * lists and the new one (now) does not (figures of policies no longer in the results), so
 * that DIR holds one report. Only regular files are removed. */
static void manifest_prune(const char *dir, char *old, const char *now)
{
    char path[4096 + 512];
    for (char *save = NULL, *n = strtok_r(old, "\n", &save); n; n = strtok_r(NULL, "\n", &save)) {
        if (!manifest_name_ok(n))
            continue;
        bool kept = false; /* listed by the new manifest too */
        for (const char *p = now; p && !kept && (p = strstr(p, n)) != NULL; p += strlen(n))
            kept = (p == now || p[-1] == '\n') && (p[strlen(n)] == '\n' || !p[strlen(n)]);
        struct stat sb;
        snprintf(path, sizeof(path), "%s/%s", dir, n);
        if (!kept && lstat(path, &sb) == 0 && S_ISREG(sb.st_mode))
            unlink(path);
    }
}

static kvt_status stage_finish(const char *stage, const char *dir, bool commit)
{
    kvt_status st = KVT_OK;
    char from[4096 + 512], to[4096 + 512]; /* a directory name plus a file name */
    DIR *d = opendir(stage);
    if (!d)
        return commit
                   ? kvt_error_set(KVT_ERR_IO, "report: cannot read %s: %s", stage, strerror(errno))
                   : KVT_OK;
    /* the files of the report being replaced, and of this one */
    char *old = commit ? manifest_read(dir) : NULL, *now = commit ? manifest_read(stage) : NULL;
    struct stat ib; /* a report to replace is in dir: its page, or its file list */
    snprintf(to, sizeof(to), "%s/index.html", dir);
    bool a_report = lstat(to, &ib) == 0 && S_ISREG(ib.st_mode);
    snprintf(to, sizeof(to), "%s/" MANIFEST, dir);
    a_report = a_report || (lstat(to, &ib) == 0 && S_ISREG(ib.st_mode));
    for (int pass = -1; pass < 3; pass++) { /* -1: the names in dir, 0: the file list, 1:
                                               figures, 2: index */
        rewinddir(d);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(from, sizeof(from), "%s/%s", stage, e->d_name);
            snprintf(to, sizeof(to), "%s/%s", dir, e->d_name);
            if (pass < 0) {
                struct stat sb;
                if (commit && !st && lstat(to, &sb) == 0 && !S_ISREG(sb.st_mode))
                    st = kvt_error_set(KVT_ERR_IO,
                                       "report: %s exists and is not a regular file; not "
                                       "replaced",
                                       to);
                else if (commit && !st && !a_report && strcmp(e->d_name, MANIFEST) &&
                         lstat(to, &sb) == 0)
                    st = kvt_error_set(KVT_ERR_IO,
                                       "report: %s exists and %s holds no report (no "
                                       "index.html, no " MANIFEST "): not replaced (move it, "
                                       "or choose another -o DIR)",
                                       to, dir);
                continue;
            }
            int kind = !strcmp(e->d_name, MANIFEST) ? 0 : !strcmp(e->d_name, "index.html") ? 2 : 1;
            if (kind != pass)
                continue;
            if (commit && !st) {
                int fd = open(from, O_RDONLY | O_CLOEXEC); /* the bytes before the name */
                if (fd < 0 || fsync(fd) != 0 || rename(from, to) != 0)
                    st = kvt_error_set(KVT_ERR_IO, "report: cannot move %s to %s: %s", from, to,
                                       strerror(errno));
                if (fd >= 0)
                    close(fd);
            }
            remove(from); /* no-op after a rename */
        }
    }
    closedir(d);
    rmdir(stage);
    if (commit && !st && old && now)
        manifest_prune(dir, old, now);
    kvt_free(old);
    kvt_free(now);
    if (commit && !st) { /* the renames are on disk before the command says so */
        snprintf(to, sizeof(to), "%s/index.html", dir);
        kvt_fsync_dir_of(to);
    }
    return st;
}

/* Staging directories are named ".kvt-report-HOST-PID-XXXXXX": HOST is this machine's name
 * with every byte but letters, digits and '.' made '_', PID the writing process. */
#define STAGE_PREFIX ".kvt-report-"

static void stage_host(char *h, size_t cap)
{
    char raw[256] = "";
    if (gethostname(raw, sizeof(raw) - 1) != 0 || !raw[0])
        snprintf(raw, sizeof(raw), "localhost");
    size_t n = 0;
    for (const char *p = raw; *p && n + 1 < cap; p++)
        h[n++] = (char)(isalnum((unsigned char)*p) || *p == '.' ? *p : '_');
    h[n] = '\0';
}

/* Remove the staging directories in dir that a killed report of this machine left: those
 * whose PID no longer runs. Another machine's (a shared file system) and a running report's
 * are left alone. Best effort: a failure here changes nothing the report needs. */
static void stage_sweep(const char *dir, const char *host)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    char pre[128], path[4096 + 512];
    int np = snprintf(pre, sizeof(pre), STAGE_PREFIX "%s-", host);
    struct dirent *e;
    while (np > 0 && (size_t)np < sizeof(pre) && (e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, pre, (size_t)np))
            continue;
        char *end = NULL;
        long pid = strtol(e->d_name + np, &end, 10);
        if (pid <= 0 || end == e->d_name + np || *end != '-' || strlen(end + 1) != 6 ||
            (pid_t)pid == getpid() || kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        struct stat sb;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
            stage_finish(path, dir, false); /* removes its files, then the directory */
    }
    closedir(d);
}

kvt_status kvt_report_write(const kvt_results *r, const char *dir, const kvt_recommend_opts *target)
{
    return kvt_report_write_e2e(r, dir, target, NULL);
}

kvt_status kvt_report_write_e2e(const kvt_results *r, const char *dir,
                                const kvt_recommend_opts *target, const kvt_e2e *e2e)
{
    KVT_RETURN_IF(r->n_traces == 0 || r->n_policies == 0 || r->n_budgets == 0, KVT_ERR_INVALID_ARG,
                  "report: no trace, policy or budget in the results");
    KVT_RETURN_IF(r->shard_count > 0, KVT_ERR_INVALID_ARG,
                  "report: a partial result of replay --shard %d/%d: its summaries cover one "
                  "shard's layers (combine all parts with kvtrace merge first)",
                  r->shard_index, r->shard_count);
    report_plan pl; /* first: a target that cannot be answered creates nothing */
    KVT_FORWARD(plan_create(r, NULL, target, &pl));
    pl.e2e = e2e;
    kvt_status st = KVT_OK;
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
        st = kvt_error_set(KVT_ERR_IO, "report: cannot create %s: %s", dir, strerror(errno));
        plan_free(&pl);
        return st;
    }
    /* The whole report is written into a staging directory inside dir and moved into place
     * only when every file is complete: a failure (a full disk) leaves the previous report as
     * it was, figures included. */
    char stage[4096], path[4096 + 16], host[64];
    stage_host(host, sizeof(host));
    stage_sweep(dir, host);
    if (snprintf(stage, sizeof(stage), "%s/" STAGE_PREFIX "%s-%ld-XXXXXX", dir, host,
                 (long)getpid()) >= (int)sizeof(stage) - 64)
        st = kvt_error_set(KVT_ERR_INVALID_ARG, "report: the directory name is too long: %s", dir);
    else if (!mkdtemp(stage))
        st = kvt_error_set(KVT_ERR_IO, "report: cannot write in %s: %s", dir, strerror(errno));
    else /* removed on SIGINT, SIGTERM, SIGHUP (kvt_tmp_remove_on_signals) */
        kvt_tmp_dir_remember(stage);
    if (st) {
        plan_free(&pl);
        return st;
    }
    pl.dir = stage;
    st = draw_pngs(r, &pl);
    if (st)
        goto out;
    snprintf(path, sizeof(path), "%s/index.html", stage);
    FILE *f = fopen(path, "w");
    if (!f) {
        st = kvt_error_set(errno == ENOMEM ? KVT_ERR_NOMEM : KVT_ERR_IO,
                           "report: cannot write %s: %s", path, strerror(errno));
        goto out;
    }
    st = write_page(f, r, &pl); /* stage_finish fsyncs it before moving it */
    if (!st && (ferror(f) || fflush(f) != 0))
        st = kvt_error_set(KVT_ERR_IO, "report: cannot write %s: %s", path, strerror(errno));
    if (fclose(f) && !st)
        st = kvt_error_set(KVT_ERR_IO, "report: write failed: %s: %s", path, strerror(errno));
    if (!st) /* the figures' names, so that a later report into dir can remove stale ones */
        st = manifest_write(stage);
    const char *hold = getenv("KVT_TEST_REPORT_HOLD_S"); /* tests: a signal while staged */
    if (!st && hold && atoi(hold) > 0)
        sleep((unsigned)(atoi(hold) < 600 ? atoi(hold) : 600));
out:
    plan_free(&pl);
    kvt_status fin = stage_finish(stage, dir, st == KVT_OK);
    kvt_tmp_dir_forget(stage);
    return st ? st : fin;
}
