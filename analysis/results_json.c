/* results_json.c - results.json, version KVT_RESULTS_VERSION: the writer (atomic: a temporary
 * file in the same directory (kvt_create_tmp_sibling), written, fsync'ed, then renamed over
 * PATH, so PATH is either the old file or the complete new one) and the reader that report/ and
 * recommend use. Layout field by field in RESULTS.md. NaN (not applicable) is written as null and
 * read back as NaN.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kvt_analysis.h"

static const char *const mod_names[KVT_N_MODALITIES] = {"text", "image", "video", "other"};

typedef struct metric_desc {
    const char *name;
    size_t off;
    bool optional; /* added within results_version 1: absent in older files, read as null */
    double lo, hi; /* the values a metric can take (hi < lo: n_keep, bounded by T + Gd) */
} metric_desc;
#define HM(f) offsetof(kvt_head_metrics, f)
static const metric_desc metrics[] = {
    {"n_keep", HM(n_keep), false, 0, -1},
    {"recall_window", HM(recall_window), false, 0, 1 + 1e-6},
    {"err_window", HM(err_window), false, 0, INFINITY},
    {"recall_decode", HM(recall_decode), false, 0, 1 + 1e-6},
    {"err_decode", HM(err_decode), false, 0, INFINITY},
    {"coverage", HM(coverage), false, -1 - 1e-6, 1 + 1e-6},
    {"coverage_radius", HM(coverage_radius), false, -1e-6, 2 + 1e-6},
    {"coverage_dropped", HM(coverage_dropped), true, -1 - 1e-6, 1 + 1e-6},
    {"head_overlap", HM(head_overlap), true, 0, 1 + 1e-6},
    {"r_kept", HM(r_kept), false, -1 - 1e-6, 1 + 1e-6},
    {"oracle_overlap", HM(oracle_overlap), false, 0, 1 + 1e-6},
};
static const metric_desc mod_metrics[] = {
    {"n_keep", HM(n_keep_mod), false, 0, -1},
    {"recall_window", HM(recall_window_mod), false, 0, 1 + 1e-6},
    {"coverage", HM(coverage_mod), false, -1 - 1e-6, 1 + 1e-6},
    {"r_kept", HM(r_kept_mod), true, -1 - 1e-6, 1 + 1e-6},
};
#define N_METRICS     (sizeof(metrics) / sizeof(metrics[0]))
#define N_MOD_METRICS (sizeof(mod_metrics) / sizeof(mod_metrics[0]))

cJSON *kvt_json_number(double x)
{
    if (isnan(x) || isinf(x))
        return cJSON_CreateNull();
    char b[40];
    kvt_fmt_double(x, b, sizeof(b));
    return cJSON_CreateRaw(b);
}

static double get_num(const cJSON *x)
{
    return cJSON_IsNumber(x) ? x->valuedouble : NAN;
}

/* a count or seed read back: 0 unless a finite number in [0, 2^64) (NaN, negative or huge
 * values would make the integer conversion undefined) */
static uint64_t get_u64(const cJSON *x, double max)
{
    double v = get_num(x);
    return v >= 0 && v < max ? (uint64_t)v : 0;
}

static void add_num(cJSON *o, const char *k, double x)
{
    cJSON_AddItemToObject(o, k, kvt_json_number(x));
}

static cJSON *summary_json(const kvt_run_summary *s, bool has_mod)
{
    cJSON *o = cJSON_CreateObject();
    add_num(o, "n_keep", s->n_keep);
    add_num(o, "recall_window", s->recall_window);
    add_num(o, "err_window", s->err_window);
    add_num(o, "recall_decode", s->recall_decode);
    add_num(o, "err_decode", s->err_decode);
    add_num(o, "coverage", s->coverage);
    add_num(o, "coverage_radius", s->coverage_radius);
    add_num(o, "coverage_dropped", s->coverage_dropped);
    add_num(o, "head_overlap", s->head_overlap);
    add_num(o, "r_kept", s->r_kept);
    add_num(o, "r_all", s->r_all);
    add_num(o, "oracle_overlap", s->oracle_overlap);
    add_num(o, "kept_entries", s->kept_entries);
    add_num(o, "full_entries", s->full_entries);
    add_num(o, "kept_bytes", s->kept_bytes);
    add_num(o, "full_bytes", s->full_bytes);
    add_num(o, "compression_ratio", s->compression_ratio);
    add_num(o, "kept_fraction", s->kept_fraction);
    if (has_mod) {
        cJSON *bm = cJSON_AddObjectToObject(o, "by_modality");
        for (int k = 0; k < KVT_N_MODALITIES; k++) {
            cJSON *m = cJSON_AddObjectToObject(bm, mod_names[k]);
            add_num(m, "kept_entries", s->kept_mod[k]);
            add_num(m, "full_entries", s->total_mod[k]);
            add_num(m, "recall_window", s->recall_window_mod[k]);
            add_num(m, "coverage", s->coverage_mod[k]);
            add_num(m, "r_kept", s->r_kept_mod[k]);
            add_num(m, "r_all", s->r_all_mod[k]);
        }
    } else
        cJSON_AddNullToObject(o, "by_modality");
    return o;
}

static cJSON *grid(const kvt_trace_result *t, size_t p, size_t b, int H, size_t off, int mod)
{
    cJSON *a = cJSON_CreateArray();
    for (int l = 0; l < t->n_layers; l++) {
        cJSON *row = cJSON_CreateArray();
        for (int h = 0; h < H; h++) {
            const char *m = (const char *)kvt_trace_result_at(t, p, b, l, h);
            const double *x = (const double *)(m + off);
            cJSON_AddItemToArray(row, kvt_json_number(mod < 0 ? x[0] : x[mod]));
        }
        cJSON_AddItemToArray(a, row);
    }
    return a;
}

/* one (policy, budget) run of a trace: its settings, metrics per layer and head, per-layer and
 * whole summaries; NULL when out of memory */
static cJSON *run_json(const kvt_trace_result *t, size_t p, size_t b)
{
    cJSON *run = cJSON_CreateObject();
    int H = t->policy_heads[p], B = t->budget_tokens[b];
    cJSON_AddNumberToObject(run, "policy", (double)p);
    cJSON_AddNumberToObject(run, "budget", (double)b);
    cJSON_AddStringToObject(run, "label", t->policy_labels[p]);
    cJSON_AddStringToObject(run, "budget_text", t->budget_texts[b]);
    cJSON_AddNumberToObject(run, "budget_tokens", B);
    cJSON_AddNumberToObject(run, "window", t->policy_window[p]);
    cJSON_AddStringToObject(run, "granularity", H == t->n_kv_heads ? "kv_head" : "query_head");
    cJSON_AddNumberToObject(run, "n_heads", H);
    /* with layer_weights=, the layers' budgets differ: the smallest decides both flags */
    const int mb = t->min_budget[p * t->n_budgets + b];
    if (mb != B)
        cJSON_AddNumberToObject(run, "layer_budget_min", mb);
    cJSON_AddBoolToObject(run, "short_prompt", t->n_tokens < mb);
    cJSON_AddBoolToObject(run, "budget_below_window", mb < t->policy_window[p]);
    cJSON *mj = cJSON_AddObjectToObject(run, "metrics");
    for (size_t k = 0; k < N_METRICS; k++)
        cJSON_AddItemToObject(mj, metrics[k].name, grid(t, p, b, H, metrics[k].off, -1));
    if (t->has_modality) {
        cJSON *bm = cJSON_AddObjectToObject(run, "by_modality");
        for (size_t k = 0; k < N_MOD_METRICS; k++) {
            cJSON *x = cJSON_AddObjectToObject(bm, mod_metrics[k].name);
            for (int m = 0; m < KVT_N_MODALITIES; m++)
                cJSON_AddItemToObject(x, mod_names[m], grid(t, p, b, H, mod_metrics[k].off, m));
        }
    } else
        cJSON_AddNullToObject(run, "by_modality");
    cJSON *pl = cJSON_AddObjectToObject(run, "per_layer");
    kvt_run_summary *ls = kvt_malloc((size_t)t->n_layers * sizeof(*ls));
    if (!ls) { /* never write a results file with a section missing */
        cJSON_Delete(run);
        return NULL;
    }
    for (int l = 0; l < t->n_layers; l++)
        kvt_summarize_trace(t, p, b, l, &ls[l]);
    const struct {
        const char *n;
        size_t off;
    } f[] = {{"n_keep", offsetof(kvt_run_summary, n_keep)},
             {"recall_window", offsetof(kvt_run_summary, recall_window)},
             {"err_window", offsetof(kvt_run_summary, err_window)},
             {"recall_decode", offsetof(kvt_run_summary, recall_decode)},
             {"err_decode", offsetof(kvt_run_summary, err_decode)},
             {"coverage", offsetof(kvt_run_summary, coverage)},
             {"coverage_dropped", offsetof(kvt_run_summary, coverage_dropped)},
             {"head_overlap", offsetof(kvt_run_summary, head_overlap)},
             {"r_kept", offsetof(kvt_run_summary, r_kept)},
             {"r_all", offsetof(kvt_run_summary, r_all)},
             {"oracle_overlap", offsetof(kvt_run_summary, oracle_overlap)},
             {"kept_entries", offsetof(kvt_run_summary, kept_entries)}};
    for (size_t k = 0; k < sizeof(f) / sizeof(f[0]); k++) {
        cJSON *arr = cJSON_AddArrayToObject(pl, f[k].n);
        for (int l = 0; l < t->n_layers; l++)
            cJSON_AddItemToArray(
                arr, kvt_json_number(*(const double *)((const char *)&ls[l] + f[k].off)));
    }
    kvt_free(ls);
    kvt_run_summary s;
    kvt_summarize_trace(t, p, b, -1, &s);
    cJSON_AddItemToObject(run, "summary", summary_json(&s, t->has_modality));
    return run;
}

/* The runs of a trace are built on several threads: formatting their numbers (the shortest
 * round-tripping text of each, kvt_fmt_double) is most of the time results.json takes, and a
 * large replay writes hundreds of thousands of them. Each run is built whole by one thread and
 * the runs are added in order, so the text does not depend on the threads. */
typedef struct runs_job {
    const kvt_trace_result *t;
    cJSON **out; /* [n] */
    size_t n, next;
    pthread_mutex_t mu;
} runs_job;

static void *runs_worker(void *arg)
{
    runs_job *j = arg;
    for (;;) {
        pthread_mutex_lock(&j->mu);
        size_t i = j->next++;
        pthread_mutex_unlock(&j->mu);
        if (i >= j->n)
            return NULL;
        j->out[i] = run_json(j->t, i / j->t->n_budgets, i % j->t->n_budgets);
    }
}

/* every run of t into out [n_policies * n_budgets] (NULL where out of memory) */
static void build_runs(const kvt_trace_result *t, cJSON **out, size_t n)
{
    runs_job j = {t, out, n, 0, PTHREAD_MUTEX_INITIALIZER};
    const int nc = kvt_cpu_count();
    size_t numbers = n * (size_t)t->n_layers * (size_t)(t->n_q_heads > 0 ? t->n_q_heads : 1);
    int n_th = numbers < 20000 ? 1 : nc > 32 ? 32 : nc; /* small: not worth it */
    if ((size_t)n_th > n)
        n_th = (int)n;
    pthread_t th[32];
    int started = 0;
    for (; started < n_th - 1; started++) /* the caller is one of them */
        if (pthread_create(&th[started], NULL, runs_worker, &j))
            break;
    runs_worker(&j);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_mutex_destroy(&j.mu);
}

static cJSON *trace_json(const kvt_results *r, const kvt_trace_result *t)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "path", t->path ? t->path : "");
    if (t->fingerprint[0])
        cJSON_AddStringToObject(o, "fingerprint", t->fingerprint);
    cJSON *hdr = t->header_json ? cJSON_Parse(t->header_json) : NULL;
    cJSON_AddItemToObject(o, "header", hdr ? hdr : cJSON_CreateNull());
    cJSON *model = cJSON_AddObjectToObject(o, "model");
    cJSON_AddStringToObject(model, "name", t->model_name ? t->model_name : "");
    cJSON_AddStringToObject(model, "arch", t->model_arch ? t->model_arch : "");
    cJSON_AddNumberToObject(o, "n_layers", t->n_layers);
    cJSON_AddNumberToObject(o, "n_q_heads", t->n_q_heads);
    cJSON_AddNumberToObject(o, "n_kv_heads", t->n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", t->head_dim);
    cJSON_AddNumberToObject(o, "n_tokens", t->n_tokens);
    cJSON_AddNumberToObject(o, "window_stored", t->window_stored);
    cJSON_AddNumberToObject(o, "n_decode", t->n_decode);
    cJSON_AddBoolToObject(o, "has_decode_kv", t->has_decode_kv);
    cJSON_AddStringToObject(o, "kv_dtype", t->kv_dtype);
    cJSON_AddNumberToObject(o, "kv_elem_bytes", t->kv_elem_bytes);
    cJSON_AddNumberToObject(o, "coverage_probes", t->n_probes);
    if (t->has_modality) {
        cJSON *mc = cJSON_AddObjectToObject(o, "modality_counts");
        for (int k = 0; k < KVT_N_MODALITIES; k++)
            cJSON_AddNumberToObject(mc, mod_names[k], (double)t->modality_counts[k]);
    } else
        cJSON_AddNullToObject(o, "modality_counts");
    cJSON *ra = cJSON_AddArrayToObject(o, "r_all");
    for (int l = 0; l < t->n_layers; l++) {
        cJSON *row = cJSON_CreateArray();
        for (int g = 0; g < t->n_kv_heads; g++)
            cJSON_AddItemToArray(row, kvt_json_number(t->r_all[(size_t)l * t->n_kv_heads + g]));
        cJSON_AddItemToArray(ra, row);
    }
    if (t->has_modality) {
        cJSON *rm = cJSON_AddObjectToObject(o, "r_all_by_modality");
        for (int k = 0; k < KVT_N_MODALITIES; k++) {
            cJSON *a = cJSON_AddArrayToObject(rm, mod_names[k]);
            for (int l = 0; l < t->n_layers; l++) {
                cJSON *row = cJSON_CreateArray();
                for (int g = 0; g < t->n_kv_heads; g++)
                    cJSON_AddItemToArray(
                        row,
                        kvt_json_number(
                            t->r_all_mod[((size_t)l * t->n_kv_heads + g) * KVT_N_MODALITIES + k]));
                cJSON_AddItemToArray(a, row);
            }
        }
    } else
        cJSON_AddNullToObject(o, "r_all_by_modality");
    cJSON *runs = cJSON_AddArrayToObject(o, "runs");
    const size_t n_runs = t->n_policies * t->n_budgets;
    cJSON **rj = kvt_calloc(n_runs ? n_runs : 1, sizeof(*rj));
    if (!rj) {
        cJSON_Delete(o);
        return NULL;
    }
    build_runs(t, rj, n_runs);
    bool ok = true;
    for (size_t i = 0; i < n_runs; i++) {
        ok = ok && rj[i];
        if (ok)
            cJSON_AddItemToArray(runs, rj[i]);
        else
            cJSON_Delete(rj[i]); /* never write a results file with a section missing */
    }
    kvt_free(rj);
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    (void)r;
    return o;
}

/* results.json as a cJSON_Print'ed text (free with cJSON_free) */
static kvt_status print_results(const kvt_results *r, char **out)
{
    *out = NULL;
    cJSON *root = cJSON_CreateObject();
    KVT_RETURN_IF(!root, KVT_ERR_NOMEM, "out of memory");
    cJSON_AddNumberToObject(root, "results_version", KVT_RESULTS_VERSION);
    cJSON_AddStringToObject(root, "generator", r->generator ? r->generator : "kvtrace");
    cJSON *set = cJSON_AddObjectToObject(root, "settings");
    cJSON *pl = cJSON_AddArrayToObject(set, "policies");
    for (size_t i = 0; i < r->n_policies; i++) {
        const kvt_results_policy *p = &r->policies[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "label", p->label);
        cJSON_AddStringToObject(o, "name", p->name);
        cJSON *opt = p->options_json ? cJSON_Parse(p->options_json) : NULL;
        cJSON_AddItemToObject(o, "options", opt ? opt : cJSON_CreateObject());
        cJSON_AddBoolToObject(o, "per_step", (p->flags & KVT_POLICY_PER_STEP) != 0);
        cJSON_AddBoolToObject(o, "merged", (p->flags & KVT_POLICY_MERGED) != 0);
        cJSON_AddBoolToObject(o, "inferred", (p->flags & KVT_POLICY_LIKE) != 0);
        cJSON_AddBoolToObject(o, "per_budget", (p->flags & KVT_POLICY_PER_BUDGET) != 0);
        cJSON_AddItemToArray(pl, o);
    }
    cJSON *bl = cJSON_AddArrayToObject(set, "budgets");
    for (size_t i = 0; i < r->n_budgets; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "text", r->budgets[i].text);
        cJSON_AddStringToObject(o, "kind", r->budgets[i].is_fraction ? "fraction" : "tokens");
        cJSON_AddNumberToObject(o, "value", r->budgets[i].value);
        cJSON_AddItemToArray(bl, o);
    }
    cJSON_AddNumberToObject(set, "seed", (double)r->seed);
    cJSON_AddNumberToObject(set, "coverage_probes", r->coverage_probes);
    cJSON_AddNumberToObject(set, "threads", r->n_threads);
    cJSON_AddStringToObject(set, "device", r->device[0] ? r->device : "cpu");
    cJSON_AddBoolToObject(set, "per_query_head", r->per_query_head);
    if (r->shard_count > 0) {
        cJSON *sh = cJSON_AddObjectToObject(root, "shard");
        cJSON_AddNumberToObject(sh, "index", r->shard_index);
        cJSON_AddNumberToObject(sh, "count", r->shard_count);
        cJSON *ua = cJSON_AddArrayToObject(sh, "units");
        for (size_t i = 0; i < r->n_units; i++) {
            cJSON *u = cJSON_CreateArray();
            cJSON_AddItemToArray(u, cJSON_CreateNumber(r->units[2 * i]));
            cJSON_AddItemToArray(u, cJSON_CreateNumber(r->units[2 * i + 1]));
            cJSON_AddItemToArray(ua, u);
        }
    }
    cJSON *tr = cJSON_AddArrayToObject(root, "traces");
    for (size_t i = 0; i < r->n_traces; i++) {
        cJSON *tj = trace_json(r, r->traces[i]);
        if (!tj) {
            cJSON_Delete(root);
            return kvt_error_set(KVT_ERR_NOMEM, "out of memory building the results of %s",
                                 r->traces[i]->path ? r->traces[i]->path : "a trace");
        }
        cJSON_AddItemToArray(tr, tj);
    }
    cJSON *ag = cJSON_AddArrayToObject(root, "aggregate");
    bool any_mod = false;
    for (size_t i = 0; i < r->n_traces; i++)
        any_mod |= r->traces[i]->has_modality;
    for (size_t p = 0; r->n_traces && p < r->n_policies; p++)
        for (size_t b = 0; b < r->n_budgets; b++) {
            kvt_run_summary s;
            if (kvt_summarize_results(r, p, b, &s))
                continue;
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "policy", (double)p);
            cJSON_AddNumberToObject(o, "budget", (double)b);
            cJSON_AddStringToObject(o, "label", r->policies[p].label);
            cJSON_AddStringToObject(o, "budget_text", r->budgets[b].text);
            cJSON_AddNumberToObject(o, "n_traces", (double)r->n_traces);
            cJSON_AddItemToObject(o, "summary", summary_json(&s, any_mod));
            cJSON_AddItemToArray(ag, o);
        }
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    KVT_RETURN_IF(!txt, KVT_ERR_NOMEM, "out of memory printing results");
    *out = txt;
    return KVT_OK;
}

kvt_status kvt_results_write(const kvt_results *r, const char *path, bool force)
{
    KVT_RETURN_IF(!force && access(path, F_OK) == 0, KVT_ERR_IO,
                  "%s exists (use --force to overwrite)", path);
    char *txt = NULL;
    kvt_status st = print_results(r, &txt);
    if (st)
        return st;
    st = kvt_write_file_atomic(path, txt, strlen(txt));
    cJSON_free(txt);
    return st;
}

kvt_status kvt_results_to_json(const kvt_results *r, char **txt, size_t *len)
{
    *txt = NULL;
    *len = 0;
    char *p = NULL;
    kvt_status st = print_results(r, &p);
    if (st)
        return st;
    size_t n = strlen(p);
    *txt = kvt_malloc(n + 1);
    if (*txt) {
        memcpy(*txt, p, n + 1);
        *len = n;
    }
    cJSON_free(p);
    KVT_RETURN_IF(!*txt, KVT_ERR_NOMEM, "out of memory printing results");
    return KVT_OK;
}

/* ---- reader ---- */
static const cJSON *item(const cJSON *o, const char *k)
{
    return cJSON_GetObjectItemCaseSensitive(o, k);
}

static int get_int(const cJSON *o, const char *k, int dflt)
{
    const cJSON *x = item(o, k);
    return cJSON_IsNumber(x) ? x->valueint : dflt;
}

static char *dup_str(const cJSON *o, const char *k)
{
    const cJSON *x = item(o, k);
    return kvt_strdup(cJSON_IsString(x) ? x->valuestring : "");
}

/* true if `a` is an array of exactly L rows, each an array of exactly H entries (entries that
 * are not numbers read as NaN) */
static bool grid_shape_ok(const cJSON *a, int L, int H)
{
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != L)
        return false;
    const cJSON *row;
    cJSON_ArrayForEach(row, a)
    {
        if (!cJSON_IsArray(row) || cJSON_GetArraySize(row) != H)
            return false;
    }
    return true;
}

/* every entry of the [L][H] grid `a` null or a number in [lo, hi]; else false and the first
 * bad entry's place and text in why */
static bool grid_values_ok(const cJSON *a, double lo, double hi, char *why, size_t cap)
{
    int l = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, a)
    {
        int h = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, row)
        {
            if (!cJSON_IsNull(x) && !(cJSON_IsNumber(x) && x->valuedouble >= lo &&
                                      x->valuedouble <= hi && isfinite(x->valuedouble))) {
                char *t = cJSON_PrintUnformatted(x);
                snprintf(why, cap, "[%d][%d] = %.40s", l, h, t ? t : "?");
                cJSON_free(t);
                return false;
            }
            h++;
        }
        l++;
    }
    return true;
}

/* fill metric field `off` (+mod) of run (p, b) from an [L][H] array; false on a bad shape */
static bool read_grid(kvt_trace_result *t, size_t p, size_t b, int H, const cJSON *a, size_t off,
                      int mod)
{
    if (!grid_shape_ok(a, t->n_layers, H))
        return false;
    int l = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, a)
    {
        int h = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, row)
        {
            char *m = (char *)kvt_trace_result_at(t, p, b, l, h);
            double *d = (double *)(m + off);
            d[mod < 0 ? 0 : mod] = get_num(x);
            h++;
        }
        l++;
    }
    return true;
}

/* Metric cells (P x B x L x Hq kvt_head_metrics) a results file of `len` bytes may make the
 * reader allocate, over all its traces. A present grid entry takes at least two bytes of text
 * ("0," or "0]"), so a file holds at most len/2 of them; the slack (11 MB of metrics) lets a
 * small file of a model with many query heads per KV head (MQA), whose kv_head grids hold
 * fewer values than the Hq-wide arrays they are stored in, through. */
#define RESULTS_CELL_SLACK ((size_t)1 << 16)

/* Check what trace `idx` claims before anything is sized from it: the dimensions, the cells
 * they need against what is left of the file's budget (*cells_left, decremented), and the
 * shape of every run's grids and of r_all. A claim the file cannot back is KVT_ERR_CORRUPT,
 * so memory stays proportional to the file. */
static kvt_status check_trace(const kvt_results *r, const cJSON *tj, size_t idx, size_t *cells_left)
{
    int L = get_int(tj, "n_layers", 0), Hq = get_int(tj, "n_q_heads", 0);
    int Hkv = get_int(tj, "n_kv_heads", 0);
    const cJSON *pj = item(tj, "path");
    const char *name = cJSON_IsString(pj) ? pj->valuestring : "?";
    KVT_RETURN_IF(L < 1 || Hq < 1 || Hkv < 1, KVT_ERR_CORRUPT,
                  "results: trace %zu (%s): n_layers %d, n_q_heads %d, n_kv_heads %d must be >= 1",
                  idx, name, L, Hq, Hkv);
    /* the byte counts and kept shares divide by these: a file that zeroes them is not ours */
    int T = get_int(tj, "n_tokens", 0), D = get_int(tj, "head_dim", 0);
    int G = get_int(tj, "n_decode", 0), eb = get_int(tj, "kv_elem_bytes", 2);
    KVT_RETURN_IF(T < 1 || D < 1 || G < 0 || eb < 1 || eb > 8, KVT_ERR_CORRUPT,
                  "results: trace %zu (%s): n_tokens %d, head_dim %d, n_decode %d, kv_elem_bytes "
                  "%d out of range",
                  idx, name, T, D, G, eb);
    const double max_keep = (double)T + (double)G;
    char why[96];
    /* metrics are stored [L][Hq] per run: a run of Hkv > Hq heads would index past them */
    KVT_RETURN_IF(Hkv > Hq, KVT_ERR_CORRUPT,
                  "results: trace %zu (%s): n_kv_heads %d > n_q_heads %d", idx, name, Hkv, Hq);
    size_t cells;
    bool big = kvt_mul_overflow(r->n_policies * r->n_budgets, (size_t)L * (size_t)Hq, &cells);
    KVT_RETURN_IF(big || cells > *cells_left, KVT_ERR_CORRUPT,
                  "results: trace %zu (%s): n_layers %d x n_q_heads %d x %zu policies x %zu "
                  "budgets is more metric values than the file can hold (corrupt n_layers or "
                  "n_q_heads)",
                  idx, name, L, Hq, r->n_policies, r->n_budgets);
    *cells_left -= cells;
    const cJSON *ra = item(tj, "r_all");
    KVT_RETURN_IF(ra && !cJSON_IsNull(ra) && !grid_shape_ok(ra, L, Hkv), KVT_ERR_CORRUPT,
                  "results: trace %zu (%s): r_all is not [%d][%d] (n_layers x n_kv_heads)", idx,
                  name, L, Hkv);
    const cJSON *rm = item(tj, "r_all_by_modality");
    for (int k = 0; cJSON_IsObject(rm) && k < KVT_N_MODALITIES; k++) {
        const cJSON *g = item(rm, mod_names[k]);
        KVT_RETURN_IF(g && !grid_shape_ok(g, L, Hkv), KVT_ERR_CORRUPT,
                      "results: trace %zu (%s): r_all_by_modality.%s is not [%d][%d] (n_layers x "
                      "n_kv_heads)",
                      idx, name, mod_names[k], L, Hkv);
        KVT_RETURN_IF(g && !grid_values_ok(g, -1 - 1e-6, 1 + 1e-6, why, sizeof(why)),
                      KVT_ERR_CORRUPT,
                      "results: trace %zu (%s): r_all_by_modality.%s%s: not null or a number in "
                      "[-1, 1]",
                      idx, name, mod_names[k], why);
    }
    const cJSON *run;
    cJSON_ArrayForEach(run, item(tj, "runs"))
    {
        int p = get_int(run, "policy", -1), b = get_int(run, "budget", -1);
        int H = get_int(run, "n_heads", 0);
        KVT_RETURN_IF(p < 0 || (size_t)p >= r->n_policies || b < 0 || (size_t)b >= r->n_budgets ||
                          (H != Hkv && H != Hq),
                      KVT_ERR_CORRUPT,
                      "results: trace %zu (%s): bad run (policy %d, budget %d, n_heads %d)", idx,
                      name, p, b, H);
        const cJSON *mj = item(run, "metrics");
        for (size_t k = 0; k < N_METRICS; k++)
            KVT_RETURN_IF(!(metrics[k].optional && !item(mj, metrics[k].name)) &&
                              !grid_shape_ok(item(mj, metrics[k].name), L, H),
                          KVT_ERR_CORRUPT,
                          "results: trace %zu (%s): run %d/%d: metrics.%s is not [%d][%d] "
                          "(n_layers x n_heads)",
                          idx, name, p, b, metrics[k].name, L, H);
        for (size_t k = 0; k < N_METRICS; k++) {
            const metric_desc *md = &metrics[k];
            const cJSON *g = item(mj, md->name);
            double hi = md->hi < md->lo ? max_keep : md->hi;
            KVT_RETURN_IF(g && !grid_values_ok(g, md->lo, hi, why, sizeof(why)), KVT_ERR_CORRUPT,
                          "results: trace %zu (%s): run %d/%d: metrics.%s%s: not null or a number "
                          "in [%g, %g]",
                          idx, name, p, b, md->name, why, md->lo, hi);
        }
        const cJSON *bm = item(run, "by_modality");
        for (size_t k = 0; cJSON_IsObject(bm) && k < N_MOD_METRICS; k++)
            for (int m = 0; m < KVT_N_MODALITIES; m++) {
                const cJSON *g = item(item(bm, mod_metrics[k].name), mod_names[m]);
                KVT_RETURN_IF(g && !grid_shape_ok(g, L, H), KVT_ERR_CORRUPT,
                              "results: trace %zu (%s): run %d/%d: by_modality.%s.%s is not "
                              "[%d][%d] (n_layers x n_heads)",
                              idx, name, p, b, mod_metrics[k].name, mod_names[m], L, H);
                const metric_desc *md = &mod_metrics[k];
                double hi = md->hi < md->lo ? max_keep : md->hi;
                KVT_RETURN_IF(g && !grid_values_ok(g, md->lo, hi, why, sizeof(why)),
                              KVT_ERR_CORRUPT,
                              "results: trace %zu (%s): run %d/%d: by_modality.%s.%s%s: not "
                              "null or a number in [%g, %g]",
                              idx, name, p, b, md->name, mod_names[m], why, md->lo, hi);
            }
    }
    return KVT_OK;
}

/* Read trace `idx`; check_trace first, so the arrays are sized only from claims the file backs. */
static kvt_status read_trace(const kvt_results *r, const cJSON *tj, size_t idx, size_t *cells_left,
                             kvt_trace_result **out)
{
    KVT_FORWARD(check_trace(r, tj, idx, cells_left));
    int L = get_int(tj, "n_layers", 0), Hq = get_int(tj, "n_q_heads", 0);
    int Hkv = get_int(tj, "n_kv_heads", 0);
    kvt_trace_result *t = NULL;
    KVT_FORWARD(kvt_trace_result_create(L, Hq, Hkv, r->n_policies, r->n_budgets, &t));
    kvt_status st = KVT_OK;
    uint8_t *seen = NULL; /* [n_policies, n_budgets] runs read */
    t->path = dup_str(tj, "path");
    const cJSON *hdr = item(tj, "header");
    t->header_json = cJSON_IsObject(hdr) ? cJSON_PrintUnformatted(hdr) : kvt_strdup("{}");
    const cJSON *model = item(tj, "model");
    t->model_name = dup_str(model, "name");
    t->model_arch = dup_str(model, "arch");
    t->head_dim = get_int(tj, "head_dim", 0);
    t->n_tokens = get_int(tj, "n_tokens", 0);
    t->window_stored = get_int(tj, "window_stored", 0);
    t->n_decode = get_int(tj, "n_decode", 0);
    t->has_decode_kv = cJSON_IsTrue(item(tj, "has_decode_kv"));
    t->kv_elem_bytes = get_int(tj, "kv_elem_bytes", 2);
    t->n_probes = get_int(tj, "coverage_probes", 0);
    const cJSON *kd = item(tj, "kv_dtype"), *fp = item(tj, "fingerprint");
    snprintf(t->kv_dtype, sizeof(t->kv_dtype), "%s", cJSON_IsString(kd) ? kd->valuestring : "?");
    if (cJSON_IsString(fp) && strlen(fp->valuestring) == 16) /* else "": unknown (older file) */
        snprintf(t->fingerprint, sizeof(t->fingerprint), "%s", fp->valuestring);
    const cJSON *mc = item(tj, "modality_counts");
    t->has_modality = cJSON_IsObject(mc);
    for (int k = 0; t->has_modality && k < KVT_N_MODALITIES; k++)
        t->modality_counts[k] = (int64_t)get_u64(item(mc, mod_names[k]), 0x1p63);
    if (!t->path || !t->header_json || !t->model_name || !t->model_arch) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_fail;
    }
    const cJSON *ra = item(tj, "r_all");
    if (cJSON_IsArray(ra)) { /* [L][Hkv]: checked by check_trace */
        size_t i = 0;
        const cJSON *row;
        cJSON_ArrayForEach(row, ra)
        {
            const cJSON *x;
            cJSON_ArrayForEach(x, row) t->r_all[i++] = get_num(x);
        }
    }
    const cJSON *rm = item(tj, "r_all_by_modality"); /* absent in older files: NaN */
    for (int k = 0; cJSON_IsObject(rm) && k < KVT_N_MODALITIES; k++) {
        size_t i = 0; /* [L][Hkv]: checked by check_trace */
        const cJSON *row;
        cJSON_ArrayForEach(row, item(rm, mod_names[k]))
        {
            const cJSON *x;
            cJSON_ArrayForEach(x, row)
            {
                t->r_all_mod[i * KVT_N_MODALITIES + (size_t)k] = get_num(x);
                i++;
            }
        }
    }
    for (size_t p = 0; p < r->n_policies; p++) {
        t->policy_labels[p] = kvt_strdup(r->policies[p].label);
        t->policy_names[p] = kvt_strdup(r->policies[p].name);
        t->policy_flags[p] = r->policies[p].flags;
        t->policy_heads[p] = Hkv;
        if (!t->policy_labels[p] || !t->policy_names[p]) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_fail;
        }
    }
    for (size_t b = 0; b < r->n_budgets; b++)
        if (!(t->budget_texts[b] = kvt_strdup(r->budgets[b].text))) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_fail;
        }
    const cJSON *runs = item(tj, "runs"), *run;
    /* one run per (policy, budget): a file with runs cut out (edited by hand, say) would
       read as unmeasured, and recommend or report would explain it wrongly */
    seen = kvt_calloc(r->n_policies * r->n_budgets + 1, 1);
    if (!seen) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_fail;
    }
    cJSON_ArrayForEach(run, runs)
    {
        int p = get_int(run, "policy", -1), b = get_int(run, "budget", -1);
        int H = get_int(run, "n_heads", 0);
        if (p < 0 || (size_t)p >= r->n_policies || b < 0 || (size_t)b >= r->n_budgets ||
            (H != Hkv && H != Hq)) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "results: bad run (policy %d, budget %d)", p, b);
            goto out_fail;
        }
        if (seen[(size_t)p * r->n_budgets + (size_t)b]++) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "results: trace %zu has two runs of policy %s at budget %s", idx,
                               r->policies[p].label, r->budgets[b].text);
            goto out_fail;
        }
        /* a run names its policy and budget as the settings do (a hand-edited file may not) */
        const cJSON *lb = item(run, "label"), *bt = item(run, "budget_text");
        int B = get_int(run, "budget_tokens", 0);
        if ((lb && (!cJSON_IsString(lb) || strcmp(lb->valuestring, r->policies[p].label))) ||
            (bt && (!cJSON_IsString(bt) || strcmp(bt->valuestring, r->budgets[b].text))) || B < 1) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "results: trace %zu: the run of policy %d at budget %d is not "
                               "labelled %s at budget %s with budget_tokens >= 1, as the "
                               "settings say",
                               idx, p, b, r->policies[p].label, r->budgets[b].text);
            goto out_fail;
        }
        t->policy_heads[p] = H;
        t->policy_window[p] = get_int(run, "window", 0);
        t->budget_tokens[b] = B;
        t->min_budget[(size_t)p * r->n_budgets + (size_t)b] = get_int(run, "layer_budget_min", B);
        const cJSON *mj = item(run, "metrics");
        for (size_t k = 0; k < N_METRICS; k++)
            if (!(metrics[k].optional && !item(mj, metrics[k].name)) &&
                !read_grid(t, (size_t)p, (size_t)b, H, item(mj, metrics[k].name), metrics[k].off,
                           -1)) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "results: run %d/%d: metric %s is not [%d][%d]",
                                   p, b, metrics[k].name, L, H);
                goto out_fail;
            }
        /* a head measured (any metric) has its kept count: a shard part's other layers are
           null throughout, while a null n_keep beside measured metrics (a file edited by hand)
           would read as keeping nothing */
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                const kvt_head_metrics *hm = kvt_trace_result_at(t, (size_t)p, (size_t)b, l, h);
                if (isnan(hm->n_keep) && !(isnan(hm->recall_window) && isnan(hm->err_window) &&
                                           isnan(hm->coverage) && isnan(hm->recall_decode))) {
                    st = kvt_error_set(KVT_ERR_CORRUPT,
                                       "results: trace %zu, policy %s at budget %s: n_keep is "
                                       "null at layer %d head %d, which has other metrics",
                                       idx, r->policies[p].label, r->budgets[b].text, l, h);
                    goto out_fail;
                }
            }
        const cJSON *bm = item(run, "by_modality");
        if (cJSON_IsObject(bm))
            for (size_t k = 0; k < N_MOD_METRICS; k++)
                for (int m = 0; m < KVT_N_MODALITIES; m++) {
                    const cJSON *g = item(item(bm, mod_metrics[k].name), mod_names[m]);
                    if (g && !read_grid(t, (size_t)p, (size_t)b, H, g, mod_metrics[k].off, m)) {
                        st = kvt_error_set(KVT_ERR_CORRUPT, "results: bad by_modality grid");
                        goto out_fail;
                    }
                }
    }
    for (size_t c = 0; c < r->n_policies * r->n_budgets; c++)
        if (!seen[c]) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "results: trace %zu has no run of policy %s at budget %s (runs cut "
                               "from the file?)",
                               idx, r->policies[c / r->n_budgets].label,
                               r->budgets[c % r->n_budgets].text);
            goto out_fail;
        }
    kvt_free(seen);
    *out = t;
    return KVT_OK;
out_fail:
    kvt_free(seen);
    kvt_trace_result_free(t);
    return st;
}

kvt_status kvt_results_read(const char *path, kvt_results **out)
{
    *out = NULL;
    char *txt;
    size_t len;
    KVT_FORWARD(kvt_read_text_file(path, SIZE_MAX, &txt, &len));
    kvt_status st = kvt_results_parse(txt, len, path, out);
    kvt_free(txt);
    return st;
}

kvt_status kvt_results_parse(const char *txt, size_t len, const char *path, kvt_results **out)
{
    *out = NULL;
    cJSON *root = cJSON_ParseWithLength(txt, len);
    KVT_RETURN_IF(!root, KVT_ERR_CORRUPT, "%s is not valid JSON", path);
    kvt_status st = KVT_OK;
    kvt_results *r = NULL;
    int ver = get_int(root, "results_version", -1);
    if (ver < 1) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: no results_version (not a kvtrace results file)",
                           path);
        goto out_free;
    }
    if (ver > KVT_RESULTS_VERSION) {
        st = kvt_error_set(KVT_ERR_VERSION,
                           "%s has results_version %d; this kvtrace reads up to %d (upgrade "
                           "kvtrace)",
                           path, ver, KVT_RESULTS_VERSION);
        goto out_free;
    }
    r = kvt_calloc(1, sizeof(*r));
    if (!r) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    r->results_version = ver;
    r->generator = dup_str(root, "generator");
    const cJSON *set = item(root, "settings");
    const cJSON *pl = item(set, "policies"), *bl = item(set, "budgets");
    int np = cJSON_GetArraySize(pl), nb = cJSON_GetArraySize(bl);
    if (np < 1 || nb < 1) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: settings lack policies or budgets", path);
        goto out_free;
    }
    r->policies = kvt_calloc((size_t)np, sizeof(*r->policies));
    r->budgets = kvt_calloc((size_t)nb, sizeof(*r->budgets));
    if (!r->generator || !r->policies || !r->budgets) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    r->n_policies = (size_t)np;
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, pl)
    {
        kvt_results_policy *p = &r->policies[i++];
        p->label = dup_str(x, "label");
        p->name = dup_str(x, "name");
        const cJSON *o = item(x, "options");
        p->options_json = o ? cJSON_PrintUnformatted(o) : kvt_strdup("{}");
        p->flags = (cJSON_IsTrue(item(x, "per_step")) ? KVT_POLICY_PER_STEP : 0) |
                   (cJSON_IsTrue(item(x, "merged")) ? KVT_POLICY_MERGED : 0) |
                   (cJSON_IsTrue(item(x, "inferred")) ? KVT_POLICY_LIKE : 0) |
                   (cJSON_IsTrue(item(x, "per_budget")) ? KVT_POLICY_PER_BUDGET : 0);
        if (!p->label || !p->name || !p->options_json) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free;
        }
        for (int q = 0; q + 1 < i; q++) /* labels name the rows: replay makes them unique */
            if (!strcmp(r->policies[q].label, p->label)) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "%s: two policies are labelled %s", path,
                                   p->label);
                goto out_free;
            }
    }
    r->n_budgets = (size_t)nb;
    i = 0;
    cJSON_ArrayForEach(x, bl)
    {
        kvt_budget *b = &r->budgets[i++];
        const cJSON *tx = item(x, "text"), *k = item(x, "kind");
        snprintf(b->text, sizeof(b->text), "%s", cJSON_IsString(tx) ? tx->valuestring : "");
        b->is_fraction = cJSON_IsString(k) && !strcmp(k->valuestring, "fraction");
        b->value = get_num(item(x, "value"));
        if (!cJSON_IsString(k) || (!b->is_fraction && strcmp(k->valuestring, "tokens")) ||
            !(b->value > 0) || !isfinite(b->value)) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: settings.budgets[%d] (%s): \"kind\" must be \"tokens\" or "
                               "\"fraction\" and \"value\" a number above 0",
                               path, i - 1, b->text);
            goto out_free;
        }
    }
    r->seed = get_u64(item(set, "seed"), 0x1p64);
    r->coverage_probes = get_int(set, "coverage_probes", -1);
    r->n_threads = get_int(set, "threads", 0);
    const cJSON *dv = item(set, "device");
    snprintf(r->device, sizeof(r->device), "%s",
             cJSON_IsString(dv) &&
                     (!strcmp(dv->valuestring, "cpu") || !strcmp(dv->valuestring, "cuda"))
                 ? dv->valuestring
                 : "cpu");
    r->per_query_head = cJSON_IsTrue(item(set, "per_query_head"));
    const cJSON *sh = item(root, "shard");
    if (sh) {
        const cJSON *ua = item(sh, "units");
        int nu = cJSON_GetArraySize(ua);
        r->shard_index = get_int(sh, "index", -1);
        r->shard_count = get_int(sh, "count", 0);
        if (r->shard_count < 1 || r->shard_index < 0 || r->shard_index >= r->shard_count ||
            !cJSON_IsArray(ua)) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: bad \"shard\" object", path);
            goto out_free;
        }
        r->units = nu ? kvt_malloc((size_t)nu * 2 * sizeof(int)) : NULL;
        if (nu && !r->units) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free;
        }
        const cJSON *u;
        cJSON_ArrayForEach(u, ua)
        {
            const cJSON *a = cJSON_GetArrayItem(u, 0), *b = cJSON_GetArrayItem(u, 1);
            if (!cJSON_IsArray(u) || cJSON_GetArraySize(u) != 2 || !cJSON_IsNumber(a) ||
                !cJSON_IsNumber(b) || a->valuedouble != (double)a->valueint ||
                b->valuedouble != (double)b->valueint) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "%s: shard.units[%zu] is not [trace, layer]",
                                   path, r->n_units);
                goto out_free;
            }
            r->units[2 * r->n_units] = a->valueint;
            r->units[2 * r->n_units + 1] = b->valueint;
            r->n_units++;
        }
    }
    const cJSON *tr = item(root, "traces");
    size_t cells_left = len / 2 + RESULTS_CELL_SLACK, idx = 0;
    cJSON_ArrayForEach(x, tr)
    {
        kvt_trace_result *t = NULL;
        if ((st = read_trace(r, x, idx++, &cells_left, &t)))
            goto out_free;
        if ((st = kvt_results_add_trace(r, t)))
            goto out_free;
    }
    *out = r;
    r = NULL;
out_free:
    kvt_results_free(r);
    cJSON_Delete(root);
    return st;
}
