/* report_internal.h - what the report/ files share and nothing outside report/ uses: the
 * script of index.html (report/page.js, compiled in as page_js.c, which the build generates
 * with cmake/embed_text.cmake) and the value of a recommend metric (recommend.c).
 */
#ifndef KVT_REPORT_INTERNAL_H
#define KVT_REPORT_INTERNAL_H

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

#endif /* KVT_REPORT_INTERNAL_H */
