/* kvt_report.h - what a user does with a results.json: the recommended compression setting
 * (cheapest policy and budget meeting a quality target), the knee budget of each policy, and
 * per-layer / per-head budget suggestions read off the measured curves; and the report (PNG
 * figures drawn with cairo, one self-contained index.html). Input is only a kvt_results
 * (analysis/, read with kvt_results_read); nothing here replays anything.
 */
#ifndef KVT_REPORT_H
#define KVT_REPORT_H

#include <stdio.h>

#include "kvt_analysis.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Metrics with a curve against budget (RESULTS.md "The metrics"). A target can be set on all
 *  but head_overlap, which describes the selections rather than their quality (the CLI
 *  refuses it as a target; the report draws it). */
typedef enum kvt_rec_metric {
    KVT_REC_METRIC_AUTO = -1, /* err_decode / recall_decode if measured, else the window one */
    KVT_REC_METRIC_ERR_WINDOW = 0,
    KVT_REC_METRIC_ERR_DECODE = 1,
    KVT_REC_METRIC_RECALL_WINDOW = 2,
    KVT_REC_METRIC_RECALL_DECODE = 3,
    KVT_REC_METRIC_COVERAGE = 4,
    KVT_REC_METRIC_COVERAGE_DROPPED = 5,
    KVT_REC_METRIC_HEAD_OVERLAP = 6,
} kvt_rec_metric;

/** Name as in results.json ("err_decode"), or NULL for a bad value. */
const char *kvt_rec_metric_name(kvt_rec_metric m);
/** Parse a metric name. @return KVT_OK or KVT_ERR_INVALID_ARG. */
kvt_status kvt_rec_metric_parse(const char *name, kvt_rec_metric *out);
/** true for the error metrics (a target is a maximum), false for recall and coverage. */
bool kvt_rec_metric_is_error(kvt_rec_metric m);
/** What kind of metric m is and the target it takes, for messages: "a recall metric: it needs
 *  --min-recall R" (static text). */
const char *kvt_rec_metric_kind(kvt_rec_metric m);

typedef struct kvt_recommend_opts {
    kvt_rec_metric metric; /* KVT_REC_METRIC_AUTO picks by target kind and what was measured */
    bool target_is_max;    /* true: metric <= target (--max-error); false: >= (--min-recall) */
    double target;
} kvt_recommend_opts;
/** The default target of recommend and report: output error <= 0.1 on the automatic metric. */
#define KVT_RECOMMEND_OPTS_DEFAULT ((kvt_recommend_opts){KVT_REC_METRIC_AUTO, true, 0.1})

/** One policy's measured curve: metric value of each budget and where it bends. */
typedef struct kvt_rec_curve {
    size_t policy;        /* index into results->policies */
    bool candidate;       /* false for the references full and oracle, and unmeasured metrics */
    int knee_budget;      /* budget index of the knee, -1 if none (fewer than 3 points, flat, or
                             no bend); see kvt_recommend */
    int cheapest_ok;      /* cheapest budget index meeting the target, -1 if none */
    double *value;        /* [n_budgets] aggregate metric (NaN = not measured) */
    double *n_keep;       /* [n_budgets] mean kept entries per KV head and layer (the cost axis:
                             a heads=query policy's count per query head times
                             kvt_report_kv_heads_factor, so every policy by its cache size) */
    double *kept_entries; /* [n_budgets] total kept entries over traces, layers and heads */
} kvt_rec_curve;

/** The answer of kvt_recommend. Free with kvt_recommendation_free. */
typedef struct kvt_recommendation {
    kvt_rec_metric metric; /* the metric used (never AUTO) */
    bool target_is_max;
    double target;
    bool found;              /* false: no (policy, budget) meets the target */
    size_t policy, budget;   /* the recommendation when found */
    double value;            /* its metric value */
    kvt_run_summary summary; /* its aggregate summary (kept entries, bytes, ratio) */
    /* when nothing meets the target: the candidate (policy, budget) nearest to it (the best
       measured value; ties: fewer kept entries, then the lower policy and budget index) */
    bool has_closest;
    size_t closest_policy, closest_budget;
    double closest_value;
    double full_entries; /* entries of the whole cache over traces, layers and KV heads; a
                            candidate setting keeping that many compresses nothing and is
                            never recommended */
    /* when nothing is recommended: whether any candidate setting keeps less than the whole
       cache, and the cheapest candidate setting that meets the target only by keeping the
       whole cache (so "nothing meets" can say that the full cache would) */
    bool any_compressing;
    bool full_cache_meets;
    size_t full_cache_policy, full_cache_budget;
    size_t n_policies, n_budgets, n_traces;
    kvt_rec_curve *curves;    /* [n_policies] */
    bool *budget_keeps_all;   /* [n_budgets] the budget's tokens are >= T on every trace: it
                                 keeps the whole prompt */
    size_t n_traces_measured; /* traces on which some candidate has a value of the metric;
                                 the aggregate is the mean over these */
    bool *trace_measured;     /* [n_traces] */
    /* per-layer and per-head suggestions for the recommended policy (when found and every
       trace has the same shape): the cheapest budget index whose measured value meets the
       target on that layer (mean over heads and traces) or head (mean over traces); -1 when
       even the largest budget does not. The cost of budget b per head and layer is
       sum over traces of min(tokens of b, T): a budget at or above the prompt keeps the
       prompt. Entry counts below use that cost, so they are summed over every trace, as
       summary.kept_entries and full_entries are. */
    int n_layers, n_heads;  /* 0 when not computed */
    int *layer_budget;      /* [L] */
    int *head_budget;       /* [L, H'] */
    int *layer_alloc;       /* [L] greedy allocation (budget index per layer) whose mean over
                               layers meets the target, never costlier than the uniform
                               recommended budget (which it then is); all -1 if none does */
    double alloc_entries;   /* sum over layers of H' * cost of layer_alloc; NaN if none */
    double uniform_entries; /* L * H' * cost of the recommended budget */
    double layer_entries;   /* sum over layers of H' * cost of the suggestion; NaN if one is -1 */
    double head_entries;    /* sum over heads of the cost of the suggestion; NaN if one is -1 */
} kvt_recommendation;

/** Recommend a setting from a complete result (not a --shard part).
 *  Candidates are every policy but the references `full` and `oracle` (oracle reads the
 *  future decode queries, so it cannot be deployed). The metric of (policy, budget) is its
 *  aggregate (kvt_summarize_results); the cost is its kept entries summed over traces,
 *  layers and heads. The cheapest meeting candidate wins; at equal cost the better value,
 *  then the lower policy index, then the lower budget index. A setting that keeps the whole
 *  cache (kept entries = full_entries: a short prompt, a policy that leaves layers dense)
 *  compresses nothing and is neither recommended nor a cheapest or nearest setting.
 *  Knee: the points (n_keep, value) of a policy, sorted by n_keep, are normalised to [0, 1]
 *  on both axes so that the first point is (0, 0) and the last (1, 1) (an error curve is
 *  flipped by this); the knee is the interior point with the largest y - x, if that is > 0
 *  (Kneedle, Satopaa et al. 2011). NaN points are skipped.
 *  Layer allocation (layer_alloc): every layer starts at the smallest budget; while the mean
 *  over layers of the layer values misses the target, the layer whose next larger budget
 *  improves its value most per added token moves up (ties: lower layer). This spends budget
 *  where the measured curves say it helps, like PyramidKV/AdaKV do online. When that ends at
 *  or above the uniform recommended budget's cost, the allocation is the uniform budget.
 *  A metric measured on only some traces (err_decode on a trace without decode steps) is the
 *  mean over those (n_traces_measured, trace_measured).
 * @param out caller frees with kvt_recommendation_free. "Nothing meets" is KVT_OK with
 *        found = false.
 * @return KVT_OK, KVT_ERR_INVALID_ARG (partial result, no trace, metric not measured by any
 *         candidate: the message says why), KVT_ERR_NOMEM. */
kvt_status kvt_recommend(const kvt_results *r, const kvt_recommend_opts *o,
                         kvt_recommendation **out);
void kvt_recommendation_free(kvt_recommendation *rec);

/** A few lines of text explaining the recommendation. Every entry count is an integer summed
 *  over all traces; a budget's tokens are what it keeps per head and layer on each trace
 *  ("45 or 20 tokens ..., by trace" when they differ); a suggested budget that keeps the whole
 *  prompt reads "all". @return KVT_OK or KVT_ERR_IO. */
kvt_status kvt_recommendation_print(const kvt_recommendation *rec, const kvt_results *r, FILE *f);
/** The same as one JSON object (labels escaped by cJSON). A budget is {index, text, tokens,
 *  tokens_by_trace, whole_prompt}: tokens (kept per head and layer) is null when the traces
 *  differ. The *_tokens suggestion arrays hold that number, or the array by trace when the
 *  traces differ, or null (beyond the largest budget); layer_budget / head_budget /
 *  layer_alloc hold the budget texts ("all" for the whole prompt). The top level says over
 *  which traces the metric was measured (n_traces, n_traces_measured, traces_not_measured:
 *  [{path, why}], why null or "no decode steps") and, when nothing is found, why_none
 *  ("not_met", "only_full_cache_meets" with full_cache_setting, "no_compressing_setting").
 *  @return KVT_OK, KVT_ERR_NOMEM, KVT_ERR_IO. */
kvt_status kvt_recommendation_write_json(const kvt_recommendation *rec, const kvt_results *r,
                                         FILE *f);
/** Write the layer allocation (layer_alloc) to `path` atomically as a layer_weights= file
 *  (RESULTS.md "layer_weights="): '#' lines naming the policy, the target and the budget at
 *  which a replay with policy:layer_weights=path gives each layer its allocated budget (the
 *  allocation's mean), then one weight per layer: the allocated budget in tokens when it keeps
 *  the same tokens on every trace, else the budget's share of the prompt. budget[cap] (may be
 *  NULL) gets that mean as a budget text ("144", "27.5%"). @return KVT_OK; KVT_ERR_INVALID_ARG when
 * there is no allocation (no recommendation, or no layer allocation meets the target); KVT_ERR_IO,
 * KVT_ERR_NOMEM. */
kvt_status kvt_recommendation_write_allocation(const kvt_recommendation *rec, const kvt_results *r,
                                               const char *path, char *budget, size_t cap);

/* ---- report: figures and the HTML page ---- */

/** Draw `metric` of every policy against its mean kept entries per head and layer (log2 axis),
 *  one line per policy, full and oracle dashed, into a PNG of width x height pixels (cairo).
 * @return KVT_OK, KVT_ERR_INVALID_ARG (metric not measured, size too small), KVT_ERR_IO. */
kvt_status kvt_report_plot_metric(const kvt_results *r, kvt_rec_metric metric, const char *path,
                                  int width, int height);

/** Head redundancy r_all of (layer, KV head), the mean over the traces that have it; NaN if
 *  none (RESULTS.md "r_all"). */
double kvt_report_redundancy(const kvt_results *r, int layer, int head);
/** Viridis colour of v in [0, 1] (clamped; NaN as 0) into rgb[3], components in [0, 1]. */
void kvt_report_colormap(double v, double rgb[3]);
/** Heatmap of head redundancy (layers x KV heads of the first trace's shape, the mean over
 *  traces) with a colour bar, into a PNG. @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_IO. */
kvt_status kvt_report_plot_redundancy(const kvt_results *r, const char *path, int width,
                                      int height);

/* ---- data behind the per-head, modality and allocation figures (report_data.c) ---- */

/** Value of `metric` at (policy, budget, layer, head), the mean over the traces that have that
 *  layer and head and a value there; NaN if none. Heads are the policy's (Hkv, or Hq with
 *  heads=query). */
double kvt_report_head_value(const kvt_results *r, size_t pol, size_t bud, kvt_rec_metric metric,
                             int layer, int head);
/** Query heads per KV head for a heads=query policy (its kept entries per head times this are
 *  per KV head, the KV cache it keeps), 1 for the others. */
double kvt_report_kv_heads_factor(const kvt_results *r, size_t pol);
/** Kept entries of (policy, budget, layer, head), the mean over the traces that have that
 *  layer and head and a count there; NaN if none. */
double kvt_report_head_keep(const kvt_results *r, size_t pol, size_t bud, int layer, int head);
/** Mean kept entries per head of `layer` for (policy, budget), mean over the traces that have
 *  the layer; NaN if none. */
double kvt_report_layer_keep(const kvt_results *r, size_t pol, size_t bud, int layer);
/** true if the policy allocates: at some budget its kept entries differ between the layers or
 *  heads of a trace (PyramidKV, AdaKV, MixKV-AdaKV, SparseMM, ...). false for the references
 *  full and oracle. */
bool kvt_report_policy_allocates(const kvt_results *r, size_t pol);
/** true if some (policy, budget) of the run has `metric` measured (not NaN). */
bool kvt_report_metric_measured(const kvt_results *r, kvt_rec_metric metric);
/** The budgets from smallest to largest (by their tokens, the mean over traces: "10%" of a
 *  448-token prompt is 45), ties in the order given: every chart, table and menu of the
 *  report lists budgets in this order, whatever order --budgets gave. order: [n_budgets]. */
void kvt_report_budget_order(const kvt_results *r, size_t *order);
/** Budget index the per-head heatmaps open at: the budget of the page's recommendation
 *  (kvt_recommend at `target`; NULL: output error <= 0.1) when there is one, else the middle
 *  budget of the sweep in kvt_report_budget_order. @param recommended receives which of the
 *  two (may be NULL). */
size_t kvt_report_heat_budget(const kvt_results *r, const kvt_recommend_opts *target,
                              bool *recommended);
/** Share of the tokens of modality m (0 text, 1 image, 2 video, 3 other) kept by (policy,
 *  budget) over all traces: kept_mod / total_mod of kvt_summarize_results; NaN without a
 *  modality table or without tokens of m. */
double kvt_report_modality_share(const kvt_results *r, size_t pol, size_t bud, int m);
/** Tokens of modality m over all traces (0 without a modality table). */
double kvt_report_modality_tokens(const kvt_results *r, int m);
/** Path of the Chart.js file inlined into index.html: $KVT_CHARTJS if set and not empty, else
 *  the build-time KVT_CHARTJS_PATH (CMake cache variable). Owned by the environment or static. */
const char *kvt_report_chartjs_path(void);

/* ---- more figures (png.c), each a PNG that stands alone: title, axes, legend / colour bar */

/** Heatmap of `metric` per layer and head of (policy, budget), colour scale [0, vmax] (viridis)
 *  with a colour bar. @return KVT_OK, KVT_ERR_INVALID_ARG (bad index, too small), KVT_ERR_IO. */
kvt_status kvt_report_plot_head_metric(const kvt_results *r, size_t pol, size_t bud,
                                       kvt_rec_metric metric, double vmax, const char *path,
                                       int width, int height);
/** Share of the tokens of modality m kept against budget, one line per policy.
 * @return KVT_OK, KVT_ERR_INVALID_ARG (no tokens of m), KVT_ERR_IO. */
kvt_status kvt_report_plot_modality(const kvt_results *r, int m, const char *path, int width,
                                    int height);
/** Mean kept entries per head against layer for one policy, one line per budget (the layer
 *  allocation of PyramidKV, AdaKV...). @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_IO. */
kvt_status kvt_report_plot_layer_keep(const kvt_results *r, size_t pol, const char *path, int width,
                                      int height);
/** Heatmap of the kept entries per layer and head of (policy, budget) (the head allocation of
 *  AdaKV...), colour scale [0, the largest count of this policy and of every allocating policy
 *  with the same kind of head at this budget] with a colour bar, so that their figures compare.
 * @return KVT_OK, KVT_ERR_INVALID_ARG (bad index, too small, nothing kept), KVT_ERR_IO. */
kvt_status kvt_report_plot_head_keep(const kvt_results *r, size_t pol, size_t bud, const char *path,
                                     int width, int height);

/** Write DIR/index.html and the PNG figures. The page is self-contained and fetches nothing:
 *  PNGs are inlined as data: URIs, Chart.js (kvt_report_chartjs_path) is inlined with every
 *  "</script" and "<!--" escaped, and the data of the interactive charts and heatmaps is one
 *  JSON blob in <script type="application/json"> with '<', '>' and '&' written as \u escapes;
 *  every other string from the results is HTML-escaped. Without the Chart.js file the page
 *  shows the PNGs and a note saying so (not an error).
 *  PNGs: <metric>.png for each measured metric, redundancy.png, heat_<metric>_<NN>_<label>.png
 *  (recall and output error per layer and head of policy NN at the budget of
 *  kvt_report_heat_budget), modality_<name>.png (only when a trace holds non-text tokens) and
 *  alloc_<NN>_<label>.png and alloc_heads_<NN>_<label>.png (its kept entries per layer and head
 *  at the heatmaps' budget) for each policy that allocates (kvt_report_policy_allocates); <label>
 *  is the policy label with every character but [A-Za-z0-9_-] replaced by '-' (32 at most).
 *  The recommendation section answers `target` (NULL: output error <= 0.1, as kvtrace
 *  recommend): the cheapest setting meeting it (or the nearest miss), a table of the cheapest
 *  setting at a ladder of targets (0.05 ... 0.5 for an error, 0.99 ... 0.7 for a recall, and
 *  `target` itself), the text of kvt_recommendation_print and the best policy per budget.
 *  DIR is created if missing. Every file is written into a staging directory in DIR
 *  (.kvt-report-XXXXXX) and moved into DIR, figures first, only once all are complete, so an
 *  error (a full disk) leaves a previous report in DIR as it was, figures included (a run
 *  killed while drawing leaves its staging directory behind and the previous report; one
 *  killed while the files are being moved may leave new figures beside the old page). A name in DIR
 * that is not a regular file (a FIFO, a directory, a symbolic link) is not replaced: an error.
 * @return KVT_OK, KVT_ERR_INVALID_ARG (no trace), KVT_ERR_IO. */
kvt_status kvt_report_write(const kvt_results *r, const char *dir,
                            const kvt_recommend_opts *target);

/* ---- the end-to-end check (kvtrace e2e-llama2c's e2e.json, analysis/RESULTS.md) ---- */
/** One (policy, budget) of an e2e.json; NaN where the file has null. */
typedef struct kvt_e2e_run {
    char *policy, *budget; /* label and budget text */
    char *name;            /* registry name ("snapkv"); NULL where the file has none */
    int budget_tokens;     /* the budget in tokens on the trace (>= 1) */
    bool applied;          /* false: a merged policy, not run (every measure NaN) */
    char *why;             /* why it was not run, as the file says (NULL: it says nothing) */
    double kept_fraction, kl_mean, kl_max, top1, nll;
    double err_decode, recall_decode; /* the replay's proxies */
} kvt_e2e_run;

/** A trace the check ran on. */
typedef struct kvt_e2e_trace {
    char *path;           /* as the command was given it */
    char fingerprint[17]; /* kvt_trace_reader_fingerprint ("" from an older e2e.json) */
    int n_prompt, n_decode;
} kvt_e2e_trace;

typedef struct kvt_e2e {
    char *model;  /* path as the command was given it (kvtrace.hf.e2e: the model's name) */
    char *engine; /* what ran the model: "transformers 4.56.0, sdpa, bfloat16, cuda:0" from the
                     file's engine object (kvtrace.hf.e2e); NULL: the built-in llama2.c engine
                     (kvtrace e2e-llama2c writes none) */
    size_t n_traces;
    kvt_e2e_trace *traces;
    size_t n_runs;
    kvt_e2e_run *runs;
    double rho_err_decode, rho_missed_recall; /* Spearman's rho against kl_mean (NaN: null) */
    double max_kl; /* not from the file: the report's --max-kl target (NaN, as read: none);
                      the section then names kvt_recommend_e2e's answer */
} kvt_e2e;

/** Read an e2e.json (e2e_version 1), every field checked before use.
 * @param out free with kvt_e2e_free.
 * @return KVT_OK, KVT_ERR_IO, KVT_ERR_CORRUPT (the message names the field), KVT_ERR_VERSION
 *  (a newer e2e_version), KVT_ERR_NOMEM. */
kvt_status kvt_e2e_read(const char *path, kvt_e2e **out);
/** kvt_e2e_read of a text already in memory (`path` names it in messages). */
kvt_status kvt_e2e_parse(const char *txt, size_t len, const char *path, kvt_e2e **out);
void kvt_e2e_free(kvt_e2e *e);
/** The trace of r that the check's trace k ran on: the one of its fingerprint when both files
 *  hold one (copies of one capture match wherever they are and however their paths were
 *  given; another capture of the same name does not), else the one at its path (the same
 *  file, however spelt, as seen from the current directory).
 *  @return its index in r->traces, or -1 when r holds none. */
long kvt_e2e_find_trace(const kvt_e2e *e, size_t k, const kvt_results *r);
/** `kvtrace recommend --e2e`: the cheapest setting whose measured mean next-token KL is at most
 *  a target, from an e2e.json alone (cost: its kept_fraction, the share of the KV cache's
 *  entries kept, the same denominator for every setting of one check). */
typedef struct kvt_e2e_choice {
    double max_kl; /* the target: kl_mean <= max_kl */
    bool found;    /* a candidate meets it */
    long best;     /* index into e->runs of the recommendation (found), else -1 */
    long nearest;  /* when not found: the candidate of the smallest kl_mean, else -1 */
    size_t n_candidates;
    size_t n_policies; /* the runs' policy labels in first-appearance order */
    const char **policy;
    bool *candidate_policy; /* [n_policies] false for the references full and oracle */
    long *cheapest;         /* [n_policies] its cheapest run meeting the target, or -1 */
    long *lowest;           /* [n_policies] its candidate run of the smallest kl_mean (ties: the
                               cheaper), or -1 */
} kvt_e2e_choice;
/** Choose. Candidates: applied runs with a finite kl_mean and a kept_fraction below 1, of any
 *  policy but the references full and oracle (by registry name, else label). The cheapest is
 *  the smallest kept_fraction; ties go to the smaller kl_mean, then to the earlier run.
 *  @param out free with kvt_e2e_choice_free. @return KVT_OK (also when nothing meets the
 *  target: found false), KVT_ERR_INVALID_ARG (max_kl not >= 0), KVT_ERR_NOMEM. */
kvt_status kvt_recommend_e2e(const kvt_e2e *e, double max_kl, kvt_e2e_choice **out);
void kvt_e2e_choice_free(kvt_e2e_choice *c);
/** The choice as text (the setting, its KL, top-1 agreement, kept share, the proxies there, the
 *  engine and traces it was measured on, the cheapest budget of each policy).
 *  @return KVT_OK or KVT_ERR_IO. */
kvt_status kvt_e2e_choice_print(const kvt_e2e_choice *c, const kvt_e2e *e, FILE *f);
/** The same as one JSON object (analysis/RESULTS.md, "recommend --e2e --json").
 *  @return KVT_OK, KVT_ERR_NOMEM, KVT_ERR_IO. */
kvt_status kvt_e2e_choice_write_json(const kvt_e2e_choice *c, const kvt_e2e *e, FILE *f);
/** PNG scatter: each applied setting's proxy err_decode (x) against its mean next-token KL
 *  (y), one colour per policy, Spearman's rho in the title. */
kvt_status kvt_report_plot_e2e(const kvt_e2e *e, const char *path, int width, int height);
/** kvt_report_write with a section "End to end" from e2e (NULL: none): the scatter
 *  (e2e.png), the table of every setting and the rank correlations. */
kvt_status kvt_report_write_e2e(const kvt_results *r, const char *dir,
                                const kvt_recommend_opts *target, const kvt_e2e *e2e);

/** Release the font and surface caches cairo and fontconfig keep for the whole process (they
 *  are otherwise reported as leaks by LeakSanitizer). Call once before exit, when no other
 *  thread draws; drawing again afterwards works (the caches are rebuilt). */
void kvt_report_global_cleanup(void);

#ifdef __cplusplus
}
#endif
#endif /* KVT_REPORT_H */
