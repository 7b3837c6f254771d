/* report_internal.h - what the report/ files share and nothing outside report/ uses: the
 * script of index.html (report/page.js, compiled in as page_js.c, which the build generates
 * with cmake/embed_text.cmake) and the value of a recommend metric (recommend.c).
 */
#ifndef KVT_REPORT_INTERNAL_H
#define KVT_REPORT_INTERNAL_H

#include <cairo.h>
#include <cjson/cJSON.h>

#include "kvt_report.h"

/** The page script of index.html: the lines of report/page.js after its header comment, one
 *  per entry without the '\n', NULL-terminated (generated at build time). It reads the JSON blob
 *  (#kvt-data), draws the per-head heatmaps (always) and, when window.Chart exists, the
 *  Chart.js figures; it then sets body data-charts-ok / data-heatmaps-ok to the number drawn, or
 *  lists errors in #js-errors. It holds no "</script" and no "<!--" (the build fails if page.js
 *  does). */
extern const char *const kvt_report_page_js[];

#include "kvt_report.h"

/** The value of metric m in a run summary / in one head's metrics (NaN for AUTO). */
double kvt_rec_summary_value(const kvt_run_summary *s, kvt_rec_metric m);
double kvt_rec_head_value(const kvt_head_metrics *h, kvt_rec_metric m);
/** root as indented JSON and a newline on f (recommend --json, recommend --e2e --json); root
 *  stays the caller's. @return KVT_OK, KVT_ERR_NOMEM, KVT_ERR_IO ("recommend: write failed"). */
kvt_status kvt_report_print_json(const cJSON *root, FILE *f);
/** x as %.4g into buf, or "-" for NaN; returns buf. */
const char *kvt_report_num(double x, char *buf, size_t cap);
/** A recommended setting keeping at least this share of the cache "barely compresses": the
 *  output says so (adakv at a budget of 100% keeps 99.7%, 1.003x smaller). */
#define KVT_REC_BARELY 0.95

/** Whether (policy p, budget b) of rec keeps less than the whole cache (a candidate setting
 *  that keeps it all compresses nothing, so it is no answer). */
static inline bool kvt_rec_compresses(const kvt_recommendation *rec, size_t p, size_t b)
{
    return rec->curves[p].kept_entries[b] < rec->full_entries;
}

/* ---- drawing helpers shared by the PNG figures (png.c) ---- */
/** Colour k of the figures' palette (cycles), as {r, g, b} in [0, 1]. */
const double *kvt_report_palette(size_t k);
/** Series k's line: colour k % 10, and a dash pattern by k / 10 (solid, dots, dash-dot, long
 *  dashes, dash-dot-dot) so that 50 series differ; ref (full, oracle): dashed 6-4. */
void kvt_report_series_style(cairo_t *cr, size_t k, bool ref);
/** Series k's marker at (x, y), filled in the current colour: a circle, square, triangle,
 *  diamond or downward triangle by k / 10. */
void kvt_report_marker(cairo_t *cr, size_t k, double x, double y, double r);
/** text into buf, cut (whole UTF-8 characters, "..." at the cut) to max_w pixels at the
 *  current font. */
void kvt_report_fit_text(cairo_t *cr, const char *text, double max_w, char *buf, size_t cap);
/** kvt_report_fit_text's text shown at the current point. */
void kvt_report_show_fit(cairo_t *cr, const char *text, double max_w);
/** A legend row at (x, y): series k's line (current dash) and marker, then its label cut to
 *  fit max_w pixels. */
void kvt_report_legend_entry(cairo_t *cr, double x, double y, const char *label, size_t k,
                             double max_w);
/** The figure's height, grown from height when its legend of n_entries rows (16 px from top +
 *  10) would not fit: a legend is never cut. */
int kvt_report_legend_height(int height, double top, size_t n_entries);
/** Write surface s to path as a PNG and destroy it; KVT_ERR_IO names the file and errno. */
kvt_status kvt_report_save_png(cairo_surface_t *s, const char *path);
/** A light grey grid line from (x0, y0) to (x1, y1); leaves the source black and the width 1. */
void kvt_report_grid_line(cairo_t *cr, double x0, double y0, double x1, double y1);

/** A linear axis over [lo, hi] with round ticks, as charting libraries pick them: the step is
 *  1, 2, 2.5 or 5 times a power of ten, the smallest giving at most max_ticks intervals; the
 *  axis runs from lo rounded down to hi rounded up to a multiple of it (a flat or empty range
 *  is widened to [lo, lo + 1]). *decimals: the digits after the point a tick label needs. */
void kvt_report_nice_axis(double lo, double hi, int max_ticks, double *axis_lo, double *axis_hi,
                          double *step, int *decimals);

/** The best-per-budget table ranks the candidates keeping at most this times the budget's
 *  entries (per-layer and per-head allocations round; chunkkv keeps fewer). */
#define KVT_REPORT_BUDGET_SLACK 1.05

/** The tokens per head and layer budget b keeps on trace t: its tokens, at most the prompt. */
static inline int kvt_report_kept_tokens(const kvt_trace_result *t, size_t b)
{
    return t->budget_tokens[b] < t->n_tokens ? t->budget_tokens[b] : t->n_tokens;
}

#endif /* KVT_REPORT_INTERNAL_H */
