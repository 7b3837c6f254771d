/* policy.c - the policy registry (built from policies/policy_list.h), spec parsing
 * ("snapkv:window=32,kernel=7,pool=max"), the one option parser shared by every policy, and
 * budget lists ("64,128,10%").
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "replay_internal.h"

static const kvt_policy_def *const registry[] = {
#define KVT_POLICY(name) &kvt_policy_def_##name,
#include "policies/policy_list.h"
#undef KVT_POLICY
};
#define N_REGISTRY (sizeof(registry) / sizeof(registry[0]))

const kvt_policy_def *kvt_policy_def_find(const char *name)
{
    for (size_t i = 0; i < N_REGISTRY; i++)
        if (!strcmp(registry[i]->name, name))
            return registry[i];
    return NULL;
}

/* ---- options ---- */
static const char *const leverage_names[4] = {"key", "value", "kv_avg", "kv_product"};
static const char *const method_names[6] = {"headwise", "attn",  "keydiff",
                                            "vnorm",    "knorm", "mixkv"};

static const char *reduce_name(kvt_reduce r)
{
    return r == KVT_REDUCE_MAX ? "max" : r == KVT_REDUCE_SUM ? "sum" : "mean";
}

typedef enum {
    O_INT,
    O_DBL,
    O_BOOL,
    O_POOL,
    O_REDUCE,
    O_HEADS,
    O_ALLOC,
    O_STR,
    O_U64,
    O_TAU,
    O_BLEND, /* compactor blend: a number >= 0, or "ratio" (NaN) */
    O_ALIGN,
    O_LEVERAGE,
    O_METHOD,
    O_MERGE,
    O_CHUNK_SCORES
} okind;
/* the generic options' groups (opt_group): taken by every policy of a kind (group_ok) besides
   its own keys, and listed in its options only when set (group_set); G_OWN: a policy's own,
   taken when its keys name it */
enum { G_OWN, G_THINK, G_LAYERS, G_CHUNK };
typedef struct opt_desc {
    const char *key;
    okind kind;
    size_t off;
    double lo, hi; /* numeric range (inclusive); O_REDUCE: the kvt_reduce values taken */
    const char *doc;
} opt_desc;

#define OFF(f) offsetof(kvt_policy_opts, f)
static const opt_desc opts_table[] = {
    {"window", O_INT, OFF(window), 0, 1e9, "observation window W (window queries, kept)"},
    {"kernel", O_INT, OFF(kernel), 1, 1e6, "pooling kernel size (odd)"},
    {"pool", O_POOL, OFF(pool), 0, 0, "avg|max"},
    {"reduce", O_REDUCE, OFF(reduce), KVT_REDUCE_MEAN, KVT_REDUCE_SUM,
     "GQA score reduction mean|max|sum"},
    {"heads", O_HEADS, OFF(per_query), 0, 0, "kv|query selection granularity"},
    {"alpha", O_DBL, OFF(alpha), 0, 1, "AdaKV safeguard floor"},
    {"normalize", O_BOOL, OFF(normalize), 0, 0,
     "AdaKV 3a score normalisation; finch: weigh each window query by the keys it sees 0|1"},
    {"alloc", O_ALLOC, OFF(alloc), 0, 0, "AdaKV allocation a (3a, repo) | b (3b, paper)"},
    {"skip", O_INT, OFF(skip), 0, 1e6, "AdaKV: layers below skip get the uniform budget"},
    {"adaptive", O_BOOL, OFF(adaptive), 0, 0,
     "AdaKV's head-adaptive budgets from the policy's scores 0|1"},
    {"beta", O_DBL, OFF(beta), 1e-9, 1e9, "PyramidKV beta; HeadKV head_beta (>= 1)"},
    {"fallback", O_BOOL, OFF(fallback), 0, 0, "PyramidKV uniform fallback when N < 2(B-W)"},
    {"sinks", O_INT, OFF(sinks), 0, 1e9,
     "sink tokens (streamingllm, expected-attention, lagkv, cur, duo-attention, simlayerkv, "
     "kvzip)"},
    {"recent", O_INT, OFF(recent), 0, 1e9,
     "duo-attention: recent tokens of a streaming head; compactor: recent tokens protected"},
    {"sketch", O_INT, OFF(sketch), 0, 4096,
     "leverage, compactor: columns of the Gaussian sketch of the keys (0: exact leverage)"},
    {"layerwise", O_BOOL, OFF(layerwise), 0, 0,
     "kvzip: every layer prunes the same share, not a threshold over all layers' scores 0|1"},
    {"uniform", O_BOOL, OFF(uniform), 0, 0,
     "kvzip: every KV head keeps its B best scores (KVzip's pair-uniform level) 0|1"},
    {"blend", O_BLEND, OFF(blend), 0, 1e6,
     "compactor: the leverage's weight (default: each budget's compression ratio 1 - B/T)"},
    {"threshold", O_DBL, OFF(threshold), 0, 1,
     "simlayerkv: a layer is lazy when its last queries' attention to the kept tokens is above; "
     "vl-cache: an attention score below this share of its row's largest is sparse"},
    {"last", O_INT, OFF(last), 1, 1e6,
     "simlayerkv: the last window queries that judge a layer; fastv: rank by the last N prompt "
     "queries (default: every prompt query); vl-cache: the last N post-vision queries (default: "
     "all)"},
    {"ratio", O_DBL, OFF(ratio), 0, 1,
     "SparseMM minimum share of b per head; cam: start_budget_ratio"},
    {"expected", O_BOOL, OFF(expected), 0, 0,
     "cam: merge by each Bernoulli draw's expectation, not the draw 0|1"},
    {"scores", O_STR, OFF(scores), 0, 0,
     "score file: SparseMM/HeadKV/DuoAttention head scores (JSON or a text table; "
     "duo-attention also .npy), external token scores (.npy, or a directory of NAME.npy per "
     "trace NAME.kvt)"},
    {"rtable", O_STR, OFF(rtable), 0, 0, "MixKV offline redundancy table (JSON)"},
    {"filters", O_STR, OFF(filters), 0, 0,
     "qfilter: Q-filters (.npy [layers, KV heads, head dim], or a safetensors file or hub "
     "checkpoint folder with kvpress's q_filters)"},
    {"stats", O_STR, OFF(stats), 0, 0,
     "expected-attention: the queries' mean and covariance from a calibration set (a "
     "safetensors file or hub checkpoint folder with kvpress's ExpectedAttentionStats "
     "query_mean [layers, query heads, D], query_cov [.., D, D]) instead of the prompt's"},
    {"page", O_INT, OFF(page), 1, 1e6, "Quest page size"},
    {"dense_layers", O_INT, OFF(dense_layers), 0, 1e6,
     "Quest: first layers left dense; fastv: K, the layers before the pruning"},
    {"group", O_REDUCE, OFF(group), KVT_REDUCE_MAX, KVT_REDUCE_SUM, "Quest GQA page score max|sum"},
    {"theta", O_DBL, OFF(theta), 1e-9, 1, "HybridKV-like attention mass threshold"},
    {"tau", O_TAU, OFF(tau), 0, 1, "HybridKV-like static threshold or median"},
    {"split", O_DBL, OFF(split), 0, 1, "HybridKV-like static share r of the budget"},
    {"tau1", O_DBL, OFF(tau1), 1e-3, 1e3, "cake: the layer preference's entropy exponent 1/tau1"},
    {"tau2", O_DBL, OFF(tau2), 1e-3, 1e3, "cake: the layer preference's variance exponent 1/tau2"},
    {"gamma", O_DBL, OFF(gamma), 0, 1e9,
     "cake: the token score's weight of the window attention's variance"},
    {"recent_share", O_DBL, OFF(recent_share), 0, 1,
     "lookm: share of the budget kept as the most recent tokens (LOOK-M's recent_ratio over "
     "hh_ratio + recent_ratio)"},
    {"chunk", O_INT, OFF(chunk), 1, 1e6,
     "chunk size (chunkkv, hybridkv-like, noncausal-attention)"},
    {"reuse", O_INT, OFF(reuse), 1, 1e6,
     "chunkkv: layer-wise index reuse, each group of this many layers keeps the chunks its first "
     "layer selects (1: none)"},
    {"align", O_ALIGN, OFF(chunk_kvpress), 0, 0,
     "prefix (chunkkv: the window apart, B-W in chunks; pyramidkv: the schedule on B-W, window "
     "on top) | kvpress (ChunkKVPress: the whole sequence, max(1, int(n_chunks*(1-ratio))) "
     "chunks; PyramidKVPress: its layer counts, window inside; ratio 1 - the budget's share)"},
    {"chunk_score", O_REDUCE, OFF(chunk_score), KVT_REDUCE_MAX, KVT_REDUCE_SUM,
     "HybridKV-like chunk score sum|max"},
    {"floor", O_DBL, OFF(floor_frac), 0, 1, "HybridKV-like static floor (share of b)"},
    {"merge_window", O_INT, OFF(merge_window), 2, 1e6, "LightKV-like matching window"},
    {"seed", O_U64, OFF(seed), 0, 0, "random seed"},
    {"future", O_INT, OFF(n_future), 1, 1e7,
     "expected-attention: future positions the mean rotation averages"},
    {"cov", O_BOOL, OFF(use_cov), 0, 0, "expected-attention: the queries' covariance term 0|1"},
    {"vnorm", O_BOOL, OFF(use_vnorm), 0, 0, "expected-attention: scores times ||v|| 0|1"},
    {"epsilon", O_DBL, OFF(epsilon), 0, 1e9, "expected-attention: added to scores before ||v||"},
    {"lag", O_INT, OFF(lag), 2, 1e6, "lagkv: partition size"},
    {"cross", O_BOOL, OFF(cross), 0, 0, "lagkv: compare scores across partitions, not ranks 0|1"},
    {"leverage", O_LEVERAGE, OFF(leverage), 0, 0, "cur: key|value|kv_avg|kv_product"},
    {"method", O_METHOD, OFF(method), 0, 0,
     "mixkv: headwise (r d' + (1-r)(p + v')) | attn (p) | keydiff (d') | vnorm (p + v') | "
     "knorm (p + k') | mixkv (0.33 (d' + p + v')): MixKV's SELECT_METHOD ablations"},
    {"merge", O_MERGE, OFF(merge), 0, 0,
     "none|pivot|weighted: merge each dropped token into the kept entry with the most similar "
     "key (KVCache-Factory's --merge, LOOK-M); elastic-cache: also position, its own merge"},
    {"local", O_INT, OFF(local), 0, 1e6, "cur: block of the norms' normalisation (0: none)"},
    {"block", O_INT, OFF(block), 1, 1e6, "keydiff-block: tokens per block"},
    {"critical", O_STR, OFF(critical), 0, 0,
     "CriticalKV: .npy [layers, KV heads, tokens] of ||W_o v||_1 (kvtrace.critical_norms)"},
    {"dms", O_DBL, OFF(dms), -1e300, 1e300,
     "DMSPress: keep the tokens scoring >= this threshold, and the last dms_window tokens "
     "(at most the budget; --budgets 100% is kvpress's DMSPress)"},
    {"dms_window", O_INT, OFF(dms_window), 0, 1e9,
     "DMSPress: sliding_window_size, the last tokens no threshold evicts"},
    {"dms_decoding", O_BOOL, OFF(dms_decoding), 0, 0,
     "DMSPress(decoding=True) 0|1: while decoding, each token that leaves the last dms_window "
     "is evicted if it scores below dms= (needs K_decode and V_decode)"},
    {"decoding", O_INT, OFF(decoding), 1, 1e9,
     "DecodingPress: every N decode steps the cache, prompt and decode tokens, is compressed "
     "back to the budget by the policy's scores (the prompt kept whole at prefill; needs "
     "K_decode and V_decode)"},
    {"decode", O_BOOL, OFF(greedy_decode), 0, 0,
     "h2o-greedy 0|1: the eviction goes on through the decode steps, each step's query adding "
     "to the scores (H2O while generating); rkv 0|1: R-KV's compressions while decoding (on by "
     "default); both need K_decode and V_decode"},
    {"lambda", O_DBL, OFF(mix_lambda), 0, 1,
     "rkv: the weight of the attention term against the redundancy term (mix_lambda)"},
    {"interval", O_INT, OFF(interval), 1, 1e9,
     "rkv: compress when the sequence reaches a multiple of this length (divide_length)"},
    {"prefill", O_BOOL, OFF(decode_prefill), 0, 0,
     "decoding: also compress the prompt to the budget at prefill 0|1 (PrefillDecodingPress "
     "with the same press)"},
    {"first", O_DBL, OFF(first), 0, 1, "CriticalKV: first_stage_ratio"},
    {"ceps", O_DBL, OFF(ceps), 0, 1e9, "CriticalKV: epsilon added to the scores"},
    {"think", O_DBL, OFF(think), 0, 1,
     "ThinK: share of key channels zeroed in the kept keys, by query-weighted energy (0: off)"},
    {"think_window", O_INT, OFF(think_window), 1, 1e6,
     "think: the last window queries that score the channels"},
    {"think_recent", O_INT, OFF(think_recent), 0, 1e9,
     "think: the last prompt tokens whose keys keep every channel"},
    {"layer_weights", O_STR, OFF(layer_weights), 0, 0,
     "each layer's share of the budget: one weight > 0 per layer (text or .npy); layer l keeps "
     "B * w_l / mean(w)"},
    {"chunk_length", O_INT, OFF(chunk_length), 1, 1e9,
     "the budget shared over chunks of this many tokens, each keeping its share of them by the "
     "policy's ranking (FinchPress's chunk_length; 0: off)"},
    {"chunk_scores", O_CHUNK_SCORES, OFF(chunk_scores), 0, 0,
     "with chunk_length: prompt (one ranking of the whole prompt) | own (each chunk scored as a "
     "prompt of its own: kvpress's ChunkPress; snapkv, tova: from the chunk's last queries) | "
     "kvpress (own, with kvpress's positions: snapkv's and tova's queries turned to the "
     "prompt's last, compactor's by the tokens after the chunk, expected-attention's future "
     "from the chunk's length)"},
};
#define N_OPTS (sizeof(opts_table) / sizeof(opts_table[0]))

static bool key_accepted(const kvt_policy_def *d, const char *key)
{
    size_t n = strlen(key);
    const char *k = d->keys;
    while (k && *k) {
        const char *e = strchr(k, ',');
        size_t len = e ? (size_t)(e - k) : strlen(k);
        if (len == n && !strncmp(k, key, n))
            return true;
        k = e ? e + 1 : NULL;
    }
    return false;
}

static int opt_group(const opt_desc *od)
{
    const char *k = od->key;
    return !strcmp(k, "think") || !strcmp(k, "think_window") || !strcmp(k, "think_recent") ? G_THINK
           : !strcmp(k, "layer_weights")                              ? G_LAYERS
           : !strcmp(k, "chunk_length") || !strcmp(k, "chunk_scores") ? G_CHUNK
                                                                      : G_OWN;
}

/* whether policy d takes the generic options of group g:
 * think=, think_window=, think_recent=: every policy that keeps a fixed set of plain entries
 *   (not one that merges them by definition, or selects per decode step);
 * layer_weights=: every policy that gives each layer the same budget (not one that shares the
 *   budget out over the layers itself, nor full);
 * chunk_length=: every policy that keeps a plain set of prompt tokens ranked by it (not one that
 *   merges by definition, selects per decode step, shares the budget over the layers itself,
 *   or keeps everything) */
static bool group_ok(const kvt_policy_def *d, int g)
{
    const unsigned merged_or_step = KVT_POLICY_MERGED | KVT_POLICY_PER_STEP;
    switch (g) {
    case G_THINK:
        return !(d->flags & merged_or_step);
    case G_LAYERS:
        return !(d->flags & KVT_POLICY_LAYER_BUDGETS);
    case G_CHUNK:
        return !(d->flags & (merged_or_step | KVT_POLICY_LAYER_BUDGETS)) &&
               d != &kvt_policy_def_elastic_cache;
    }
    return false;
}

/* whether the options o set group g (then listed in the policy's options) */
static bool group_set(const kvt_policy_opts *o, int g)
{
    return g == G_THINK    ? o->think > 0
           : g == G_LAYERS ? o->layer_weights != NULL
           : g == G_CHUNK  ? o->chunk_length > 0
                           : false;
}

static bool opt_accepted(const kvt_policy_def *d, const opt_desc *od)
{
    return key_accepted(d, od->key) || group_ok(d, opt_group(od));
}

static const opt_desc *find_opt(const char *key)
{
    for (size_t i = 0; i < N_OPTS; i++)
        if (!strcmp(opts_table[i].key, key))
            return &opts_table[i];
    return NULL;
}

/* plain decimal numbers only, as --budgets takes them: strtod alone would take " 8", "0x10",
 * "inf"; an integer option also refuses a fraction or an exponent ("1e1", "16.0") */
static bool plain_number(const char *s, bool integer)
{
    if (*s == '-' || (*s == '+' && !integer))
        s++;
    const char *d = s;
    while (*s >= '0' && *s <= '9')
        s++;
    if (integer)
        return s > d && *s == '\0';
    size_t n = (size_t)(s - d); /* digits of the mantissa: 8, 8., 8.5 and .5 */
    if (*s == '.')
        for (s++; *s >= '0' && *s <= '9'; s++)
            n++;
    if (n == 0)
        return false;
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-')
            s++;
        const char *x = s;
        while (*s >= '0' && *s <= '9')
            s++;
        if (s == x)
            return false;
    }
    return *s == '\0';
}

static bool parse_dbl(const char *s, double *out)
{
    char *e;
    if (!plain_number(s, false))
        return false;
    errno = 0;
    double v = strtod(s, &e);
    if (errno || e == s || *e || !isfinite(v))
        return false;
    *out = v;
    return true;
}

/* label=NAME: printable ASCII without ':' (','  and '=' cannot reach here), at most 64 bytes */
static kvt_status set_label(kvt_policy *p, const char *val)
{
    size_t n = strlen(val);
    bool ok = n >= 1 && n <= 64;
    for (size_t i = 0; ok && i < n; i++)
        ok = val[i] > ' ' && val[i] < 127 && val[i] != ':';
    KVT_RETURN_IF(!ok, KVT_ERR_INVALID_ARG,
                  "%s: label=%s: expected 1 to 64 printable characters without blanks or ':'",
                  p->def->name, val);
    char *l = kvt_strdup(val);
    KVT_RETURN_IF(!l, KVT_ERR_NOMEM, "out of memory");
    kvt_free(p->label);
    p->label = l;
    return KVT_OK;
}

static kvt_status set_opt(kvt_policy *p, const char *key, const char *val)
{
    const kvt_policy_def *d = p->def;
    const opt_desc *od = find_opt(key);
    if (!od || !opt_accepted(d, od)) {
        char more[128] = ""; /* the generic options d takes */
        for (size_t i = 0; i < N_OPTS; i++)
            if (group_ok(d, opt_group(&opts_table[i])))
                snprintf(more + strlen(more), sizeof(more) - strlen(more), "%s%s",
                         more[0] ? "," : "", opts_table[i].key);
        if (od && opt_group(od) == G_LAYERS)
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s: layer_weights= is for a policy that gives every layer the "
                                 "same budget; %s %s",
                                 d->name, d->name,
                                 d == &kvt_policy_def_full ? "keeps every token of every layer"
                                                           : "shares the budget out over the "
                                                             "layers itself");
        return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: unknown option '%s' (accepted: %s%s%s)",
                             d->name, key, d->keys, d->keys[0] && more[0] ? "," : "",
                             d->keys[0] || more[0] ? more : "none");
    }
    char *base = (char *)&p->o;
    double x;
    switch (od->kind) {
    case O_INT:
    case O_DBL:
        if (!parse_dbl(val, &x) || x < od->lo || x > od->hi ||
            (od->kind == O_INT && !plain_number(val, true)))
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: %s=%s: expected %s in [%g, %g]", d->name,
                                 key, val, od->kind == O_INT ? "an integer" : "a number", od->lo,
                                 od->hi);
        if (od->kind == O_INT)
            *(int *)(base + od->off) = (int)x;
        else
            *(double *)(base + od->off) = x;
        if (!strcmp(key, "kernel") && ((int)x) % 2 == 0)
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: kernel=%s must be odd", d->name, val);
        return KVT_OK;
    case O_TAU:
        if (!strcmp(val, "median")) {
            *(double *)(base + od->off) = NAN;
            return KVT_OK;
        }
        if (!parse_dbl(val, &x) || x < 0 || x > 1)
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: tau=%s: expected median or [0,1]",
                                 d->name, val);
        *(double *)(base + od->off) = x;
        return KVT_OK;
    case O_BLEND:
        if (!strcmp(val, "ratio")) {
            *(double *)(base + od->off) = NAN;
            return KVT_OK;
        }
        if (!parse_dbl(val, &x) || x < 0 || x > 1e6)
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s: blend=%s: expected ratio or a number in [0, 1e6]", d->name,
                                 val);
        *(double *)(base + od->off) = x;
        return KVT_OK;
    case O_U64: {
        char *e;
        errno = 0;
        unsigned long long u = strtoull(val, &e, 10);
        if (errno || e == val || *e || !plain_number(val, true) || val[0] == '-')
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s: %s=%s: expected an integer from 0 to 18446744073709551615",
                                 d->name, key, val);
        *(uint64_t *)(base + od->off) = u;
        return KVT_OK;
    }
    case O_BOOL:
        if (!strcmp(val, "1") || !strcmp(val, "true") || !strcmp(val, "yes"))
            *(bool *)(base + od->off) = true;
        else if (!strcmp(val, "0") || !strcmp(val, "false") || !strcmp(val, "no"))
            *(bool *)(base + od->off) = false;
        else
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: %s=%s: expected 0 or 1", d->name, key,
                                 val);
        return KVT_OK;
    case O_POOL:
        if (!strcmp(val, "avg") || !strcmp(val, "avgpool"))
            p->o.pool = KVT_POOL_AVG;
        else if (!strcmp(val, "max") || !strcmp(val, "maxpool"))
            p->o.pool = KVT_POOL_MAX;
        else
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: pool=%s: expected avg or max", d->name,
                                 val);
        return KVT_OK;
    case O_REDUCE: {
        /* each option takes the reductions in its range: Quest's page score and HybridKV-like's
         * chunk score have no mean */
        int r = -1;
        char list[64] = "";
        for (int i = (int)od->lo; i <= (int)od->hi; i++) {
            if (!strcmp(val, reduce_name((kvt_reduce)i)))
                r = i;
            snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s",
                     i == (int)od->lo   ? ""
                     : i == (int)od->hi ? " or "
                                        : ", ",
                     reduce_name((kvt_reduce)i));
        }
        if (r < 0)
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: %s=%s: expected %s", d->name, key, val,
                                 list);
        *(kvt_reduce *)(base + od->off) = (kvt_reduce)r;
        return KVT_OK;
    }
    case O_HEADS:
        if (!strcmp(val, "kv"))
            p->o.per_query = false;
        else if (!strcmp(val, "query"))
            p->o.per_query = true;
        else
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: heads=%s: expected kv or query", d->name,
                                 val);
        return KVT_OK;
    case O_CHUNK_SCORES:
        if (!strcmp(val, "prompt"))
            p->o.chunk_scores = KVT_CHUNK_PROMPT;
        else if (!strcmp(val, "own"))
            p->o.chunk_scores = KVT_CHUNK_OWN;
        else if (!strcmp(val, "kvpress"))
            p->o.chunk_scores = KVT_CHUNK_KVPRESS;
        else
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s: chunk_scores=%s: expected prompt, own or kvpress", d->name,
                                 val);
        return KVT_OK;
    case O_ALIGN:
        if (!strcmp(val, "prefix"))
            p->o.chunk_kvpress = false;
        else if (!strcmp(val, "kvpress"))
            p->o.chunk_kvpress = true;
        else
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: align=%s: expected prefix or kvpress",
                                 d->name, val);
        return KVT_OK;
    case O_MERGE:
        if (!strcmp(val, "none"))
            p->o.merge = 0;
        else if (!strcmp(val, "pivot"))
            p->o.merge = 'p';
        else if (!strcmp(val, "weighted"))
            p->o.merge = 'w';
        else if (!strcmp(val, "position") && d == &kvt_policy_def_elastic_cache)
            p->o.merge = 'e'; /* Elastic Cache's own, made by its select (not merge.c) */
        else
            return kvt_error_set(
                KVT_ERR_INVALID_ARG, "%s: merge=%s: expected none, pivot%s", d->name, val,
                d == &kvt_policy_def_elastic_cache ? ", weighted or position"
                : !strcmp(val, "position") ? " or weighted (position is elastic-cache's own merge)"
                                           : " or weighted");
        return KVT_OK;
    case O_LEVERAGE:
        for (int i = 0; i < 4; i++)
            if (!strcmp(val, leverage_names[i])) {
                p->o.leverage = (kvt_leverage)i;
                return KVT_OK;
            }
        return kvt_error_set(KVT_ERR_INVALID_ARG,
                             "%s: leverage=%s: expected key, value, kv_avg or kv_product", d->name,
                             val);
    case O_METHOD:
        for (int i = 0; i < 6; i++)
            if (!strcmp(val, method_names[i])) {
                p->o.method = (kvt_mix_method)i;
                return KVT_OK;
            }
        return kvt_error_set(
            KVT_ERR_INVALID_ARG,
            "%s: method=%s: expected headwise, attn, keydiff, vnorm, knorm or mixkv", d->name, val);
    case O_ALLOC:
        if (!strcmp(val, "a") || !strcmp(val, "3a"))
            p->o.alloc = 'a';
        else if (!strcmp(val, "b") || !strcmp(val, "3b"))
            p->o.alloc = 'b';
        else
            return kvt_error_set(KVT_ERR_INVALID_ARG, "%s: alloc=%s: expected a (3a) or b (3b)",
                                 d->name, val);
        return KVT_OK;
    case O_STR: {
        char **dst = (char **)(base + od->off);
        kvt_free(*dst);
        *dst = kvt_strdup(val);
        return *dst ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    }
    return KVT_ERR_INVALID_ARG;
}

static void base_defaults(kvt_policy_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->window = 32;
    o->kernel = 5;
    o->pool = KVT_POOL_AVG;
    o->reduce = KVT_REDUCE_MEAN;
    o->alpha = 0.2;
    o->normalize = true;
    o->alloc = 'a';
    o->beta = 20;
    o->sinks = 4;
    o->ratio = 0.1;
    o->page = 16;
    o->dense_layers = 2;
    o->group = KVT_REDUCE_MAX;
    o->theta = 0.9;
    o->tau = NAN;
    o->split = 0.5;
    o->chunk = 16;
    o->reuse = 1;
    o->chunk_score = KVT_REDUCE_SUM;
    o->floor_frac = 0.2;
    o->merge_window = 64;
    o->think_window = 32;
    o->think_recent = 32;
    o->first = 0.5;
    o->ceps = 1e-4;
    o->dms = NAN;
    o->dms_window = 128;
    o->recent = 256;
    o->threshold = 0.9;
    o->last = 1;
}

void kvt_policy_free(kvt_policy *p)
{
    if (!p)
        return;
    if (p->def && p->def->fini)
        p->def->fini(p);
    kvt_free(p->o.scores);
    kvt_free(p->o.rtable);
    kvt_free(p->o.filters);
    kvt_free(p->o.stats);
    kvt_free(p->o.critical);
    kvt_free(p->o.layer_weights);
    kvt_free(p->lw.w);
    kvt_npy_destroy(p->crit);
    kvt_free(p->label);
    kvt_free(p);
}

kvt_status kvt_policy_create(const char *spec, const kvt_policy_globals *g, kvt_policy **out)
{
    *out = NULL;
    KVT_RETURN_IF(!spec || !*spec, KVT_ERR_INVALID_ARG, "empty policy spec");
    char name[64];
    const char *colon = strchr(spec, ':');
    size_t nlen = colon ? (size_t)(colon - spec) : strlen(spec);
    KVT_RETURN_IF(nlen == 0 || nlen >= sizeof(name), KVT_ERR_INVALID_ARG, "bad policy spec '%s'",
                  spec);
    KVT_RETURN_IF(colon && !colon[1], KVT_ERR_INVALID_ARG,
                  "policy spec '%s': a ':' with no options after it (write '%.*s', or "
                  "'%.*s:key=value')",
                  spec, (int)nlen, spec, (int)nlen, spec);
    memcpy(name, spec, nlen);
    name[nlen] = '\0';
    const kvt_policy_def *d = kvt_policy_def_find(name);
    if (!d) {
        char list[1024] = "";
        for (size_t i = 0; i < N_REGISTRY; i++) {
            strncat(list, registry[i]->name, sizeof(list) - strlen(list) - 3);
            if (i + 1 < N_REGISTRY)
                strncat(list, ", ", sizeof(list) - strlen(list) - 1);
        }
        return kvt_error_set(KVT_ERR_INVALID_ARG, "unknown policy '%s' (known: %s)", name, list);
    }
    kvt_policy *p = kvt_calloc(1, sizeof(*p));
    KVT_RETURN_IF(!p, KVT_ERR_NOMEM, "out of memory");
    p->def = d;
    base_defaults(&p->o);
    if (g) {
        p->o.seed = g->seed;
        p->o.per_query = g->per_query_head;
    }
    if (d->defaults)
        d->defaults(&p->o);
    if (g && g->window > 0 && (d->flags & KVT_POLICY_WINDOW_QUERY))
        p->o.window = g->window; /* the spec's window= still wins */
    kvt_status st = KVT_OK;
    char *opts = NULL;
    const char *think_extra = NULL; /* think_window= or think_recent= given */
    const char *dms_extra = NULL;   /* dms_window= or dms_decoding= given */
    bool prefill = false;           /* prefill= given */
    p->label = kvt_strdup(spec);
    if (!p->label) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_fail;
    }
    if (colon && colon[1]) {
        opts = kvt_strdup(colon + 1);
        if (!opts) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_fail;
        }
        char *save = NULL;
        const char *seen[N_OPTS];
        size_t n_seen = 0;
        for (char *tok = strtok_r(opts, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(tok, '=');
            if (!eq || eq == tok || !eq[1]) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s: option '%s' is not key=value", d->name,
                                   tok);
                goto out_fail;
            }
            *eq = '\0';
            for (size_t i = 0; i < n_seen; i++)
                if (!strcmp(seen[i], tok)) {
                    st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s: option '%s' given twice", d->name,
                                       tok);
                    goto out_fail;
                }
            if (n_seen < N_OPTS)
                seen[n_seen++] = tok;
            if (!strcmp(tok, "label")) { /* every policy: the name results and reports show */
                if ((st = set_label(p, eq + 1)))
                    goto out_fail;
                continue;
            }
            if ((st = set_opt(p, tok, eq + 1)))
                goto out_fail;
            if (!think_extra && (!strcmp(tok, "think_window") || !strcmp(tok, "think_recent")))
                think_extra = !strcmp(tok, "think_window") ? "think_window" : "think_recent";
            if (!dms_extra && (!strcmp(tok, "dms_window") || !strcmp(tok, "dms_decoding")))
                dms_extra = !strcmp(tok, "dms_window") ? "dms_window" : "dms_decoding";
            prefill = prefill || !strcmp(tok, "prefill");
        }
    }
    if (p->o.think > 0 && p->o.merge) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: think= prunes the key channels of a set of prompt tokens, and "
                           "merge=%s merges entries into them (give merge=none)",
                           d->name,
                           p->o.merge == 'p'   ? "pivot"
                           : p->o.merge == 'w' ? "weighted"
                                               : "position");
        goto out_fail;
    }
    if ((p->o.think > 0 || p->o.merge) && kvt_policy_decode_evict(p)) {
        const bool think = p->o.think > 0;
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: %s the prompt-time set, and %s keeps caches of whole %s through "
                           "the decode steps (give one of them)",
                           d->name,
                           think ? "think= prunes the key channels of"
                                 : "merge= merges dropped tokens into",
                           kvt_policy_decode_option(p), think ? "keys" : "entries");
        goto out_fail;
    }
    if (!(p->o.think > 0) && think_extra) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: %s= is an option of think=, which is off (give think=R, R > 0)",
                           d->name, think_extra);
        goto out_fail;
    }
    if (p->o.chunk_scores && !p->o.chunk_length) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: chunk_scores= is an option of chunk_length=, which is off (give "
                           "chunk_length=N)",
                           d->name);
        goto out_fail;
    }
    if (p->o.chunk_scores && !d->chunk_rank) {
        st = kvt_error_set(
            KVT_ERR_INVALID_ARG,
            "%s: chunk_scores=%s: each chunk scored as a prompt of its own is "
            "replayed for snapkv, tova, keydiff, expected-attention, leverage, compactor, "
            "lagkv, cur, streamingllm, knorm and vnorm; give chunk_scores=prompt",
            d->name, p->o.chunk_scores == KVT_CHUNK_OWN ? "own" : "kvpress");
        goto out_fail;
    }
    if (isnan(p->o.dms) && dms_extra) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: %s= is an option of dms=, which is off (give dms=THRESHOLD)",
                           d->name, dms_extra);
        goto out_fail;
    }
    if (!isnan(p->o.dms) && (p->o.adaptive || p->o.critical || p->o.chunk_length)) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: dms= keeps each head's tokens above a threshold, and %s= shares "
                           "the budget its own way (give one of them)",
                           d->name,
                           p->o.adaptive   ? "adaptive"
                           : p->o.critical ? "critical"
                                           : "chunk_length");
        goto out_fail;
    }
    if (p->o.greedy_decode && p->o.chunk_length) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: decode=1 goes on evicting from the whole prompt's cache, and "
                           "chunk_length= shares the budget over chunks (give one of them)",
                           d->name);
        goto out_fail;
    }
    if (!p->o.decoding && prefill) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: prefill= is an option of decoding=, which is off (give "
                           "decoding=N)",
                           d->name);
        goto out_fail;
    }
    if (p->o.decoding) {
        const char *other = p->o.adaptive                                  ? "adaptive"
                            : p->o.critical                                ? "critical"
                            : !isnan(p->o.dms)                             ? "dms"
                            : p->o.chunk_length                            ? "chunk_length"
                            : p->o.layer_weights                           ? "layer_weights"
                            : p->o.window > 0 && key_accepted(d, "window") ? "window"
                                                                           : NULL;
        if (other) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s: decoding= scores every cache entry alike and keeps the same "
                               "budget in every layer and head, as kvpress's DecodingPress; "
                               "%s= is not replayed with it",
                               d->name, other);
            goto out_fail;
        }
    }
    if (p->o.chunk_scores && p->o.critical) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: chunk_scores= scores each chunk on its own, and critical= "
                           "weighs the scores of the whole prompt (give one of them)",
                           d->name);
        goto out_fail;
    }
    if ((d->flags & KVT_POLICY_WINDOW_QUERY) && p->o.window < 1) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: window=%d: it ranks by the window queries, so window >= 1", d->name,
                           p->o.window);
        goto out_fail;
    }
    if (d->init && (st = d->init(p)))
        goto out_fail;
    if (p->o.layer_weights && (st = kvt_layer_weights_read(d->name, p->o.layer_weights, &p->lw)))
        goto out_fail;
    if (p->o.critical) { /* CriticalKV's ||W_o v|| of one trace */
        if ((p->o.adaptive || d == &kvt_policy_def_adakv) && p->o.alloc != 'b') {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s: critical= with AdaKV's budgets replays kvpress's "
                               "CriticalAdaKVPress, whose allocation is alloc=b",
                               d->name);
            goto out_fail;
        }
        if (!kvt_is_dir(p->o.critical)) { /* a directory: one NAME.npy per trace (bind) */
            if ((st = kvt_npy_load(d->name, p->o.critical, "[layers, KV heads, tokens]",
                                   " (critical=: kvtrace.critical_norms)", &p->crit)))
                goto out_fail;
            p->one_trace = true;
        }
    }
    kvt_free(opts);
    *out = p;
    return KVT_OK;
out_fail:
    kvt_free(opts);
    kvt_policy_free(p);
    return st;
}

void kvt_policy_list_free(kvt_policy **p, size_t n)
{
    if (!p)
        return;
    for (size_t i = 0; i < n; i++)
        kvt_policy_free(p[i]);
    kvt_free(p);
}

kvt_status kvt_policy_list_parse(const char *list, const kvt_policy_globals *g, kvt_policy ***out,
                                 size_t *n_out)
{
    *out = NULL;
    *n_out = 0;
    KVT_RETURN_IF(!list || !*list, KVT_ERR_INVALID_ARG, "empty policy list");
    kvt_status st = KVT_OK;
    kvt_policy **arr = NULL;
    size_t n = 0;
    char *copy = kvt_strdup(list);
    char **specs = kvt_calloc(strlen(list) + 1, sizeof(char *));
    size_t n_specs = 0;
    if (!copy || !specs) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    /* split into specs: an item containing '=' but no ':' continues the previous spec */
    {
        char *p = copy;
        while (p) {
            char *e = strchr(p, ',');
            if (e)
                *e = '\0';
            if (!*p) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG, "empty item in policy list '%s'", list);
                goto out_free;
            }
            if (strchr(p, '=') && !strchr(p, ':')) {
                if (!n_specs) {
                    st =
                        kvt_error_set(KVT_ERR_INVALID_ARG, "option '%s' before any policy name", p);
                    goto out_free;
                }
                char *prev = specs[n_specs - 1];
                size_t len = strlen(prev) + strlen(p) + 2;
                char *m = kvt_malloc(len);
                if (!m) {
                    st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                    goto out_free;
                }
                /* "adakv,alpha=0.2" is "adakv:alpha=0.2": the first option opens the list */
                snprintf(m, len, "%s%c%s", prev, strchr(prev, ':') ? ',' : ':', p);
                kvt_free(prev);
                specs[n_specs - 1] = m;
            } else {
                specs[n_specs] = kvt_strdup(p);
                if (!specs[n_specs]) {
                    st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                    goto out_free;
                }
                n_specs++;
            }
            p = e ? e + 1 : NULL;
        }
    }
    arr = kvt_calloc(n_specs ? n_specs : 1, sizeof(*arr));
    if (!arr) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    for (size_t i = 1; i < n_specs; i++) { /* "scores=a,b.npy": a path cut at its comma */
        const char *last = strrchr(specs[i - 1], ','), *c = strchr(specs[i - 1], ':');
        last = last ? last + 1 : c ? c + 1 : specs[i - 1];
        const char *eq = strchr(last, '=');
        char key[32] = "";
        if (eq && (size_t)(eq - last) < sizeof(key))
            memcpy(key, last, (size_t)(eq - last));
        const opt_desc *od = find_opt(key);
        if (!strchr(specs[i], ':') && od && od->kind == O_STR && strpbrk(specs[i], "./") &&
            !kvt_policy_def_find(specs[i])) { /* a path's rest */
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "'%s' after '%s' is not a policy: a %s= path may not contain a "
                               "comma (options are comma-separated)",
                               specs[i], specs[i - 1], key);
            goto out_free;
        }
    }
    for (size_t i = 0; i < n_specs; i++) {
        for (size_t j = 0; j < i; j++)
            if (!strcmp(specs[i], specs[j])) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG, "policy '%s' is listed twice", specs[i]);
                goto out_free;
            }
        if ((st = kvt_policy_create(specs[i], g, &arr[n])))
            goto out_free;
        n++;
        for (size_t j = 0; j + 1 < n; j++) /* results, exports and reports key on the label */
            if (!strcmp(arr[j]->label, arr[n - 1]->label)) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "policies '%s' and '%s' have the same label '%s' (label=NAME "
                                   "names one)",
                                   specs[j], specs[i], arr[n - 1]->label);
                goto out_free;
            }
    }
    *out = arr;
    *n_out = n;
    arr = NULL;
    n = 0;
out_free:
    kvt_policy_list_free(arr, n);
    if (specs)
        for (size_t i = 0; i < n_specs; i++)
            kvt_free(specs[i]);
    kvt_free(specs);
    kvt_free(copy);
    return st;
}

const char *kvt_policy_name(const kvt_policy *p)
{
    return p->def->name;
}

const char *kvt_policy_label(const kvt_policy *p)
{
    return p->label;
}

unsigned kvt_policy_flags(const kvt_policy *p)
{
    const bool ada = p->o.adaptive || p->def == &kvt_policy_def_adakv;
    /* chunk_scores=own|kvpress from each chunk's last queries: Q_all (kvpress: and RoPE) */
    const bool chunk_q = p->o.chunk_scores && p->def->chunk_rank && p->def->chunk_queries;
    /* stats=: expected-attention's statistics from a file, not from Q_all; decoding= without
       prefill=1 keeps the prompt whole and scores only the decode steps' caches */
    const bool no_q_all = p->o.stats || (p->o.decoding > 0 && !p->o.decode_prefill);
    const unsigned base = no_q_all ? p->def->flags & ~KVT_POLICY_NEEDS_QALL : p->def->flags;
    return base | (p->o.critical && ada ? KVT_POLICY_PER_BUDGET : 0) |
           (p->o.merge || p->o.think > 0 ? KVT_POLICY_MERGED : 0) |
           (chunk_q ? KVT_POLICY_NEEDS_QALL : 0) |
           (p->o.chunk_length > 0 ? KVT_POLICY_CHUNKED : 0) |
           (kvt_policy_decode_evict(p)
                ? KVT_POLICY_PER_STEP | KVT_POLICY_NEEDS_DECODE | KVT_POLICY_DECODE_EVICT
                : 0) |
           (chunk_q && p->o.chunk_scores == KVT_CHUNK_KVPRESS ? KVT_POLICY_NEEDS_ROPE : 0);
}

unsigned kvt_policy_host_reads(const kvt_policy *p)
{
    return p->def->host_reads |
           (p->o.chunk_scores && p->def->chunk_rank ? p->def->chunk_reads : 0) |
           (kvt_policy_decode_evict(p) ? KVT_CTX_KV | KVT_CTX_PRD
                                       : 0); /* the caches' decode metrics (decoding.c) */
}

bool kvt_policy_decode_evict(const kvt_policy *p)
{
    return p->o.decoding > 0 || p->o.dms_decoding || p->o.greedy_decode;
}

const char *kvt_policy_decode_option(const kvt_policy *p)
{
    return p->o.decoding > 0    ? "decoding="
           : p->o.dms_decoding  ? "dms_decoding=1"
           : p->o.greedy_decode ? "decode=1"
                                : NULL;
}

bool kvt_policy_per_query_head(const kvt_policy *p)
{
    return p->o.per_query;
}

bool kvt_policy_one_trace(const kvt_policy *p)
{
    return p->one_trace;
}

bool kvt_policy_trace_file(const kvt_policy *p, const char *trace, char *buf, size_t cap)
{
    if (p->def->trace_file && p->def->trace_file(p, trace, buf, cap))
        return true;
    return p->o.critical && !p->crit && kvt_trace_npy_path(p->o.critical, trace, buf, cap);
}

/* "key=value" of one option into buf; quoted = JSON form */
static void opt_value(const kvt_policy_opts *o, const opt_desc *od, bool json, char *buf,
                      size_t cap)
{
    const char *base = (const char *)o;
    const char *q = json ? "\"" : "";
    switch (od->kind) {
    case O_INT:
        snprintf(buf, cap, "%d", *(const int *)(base + od->off));
        break;
    case O_DBL:
        kvt_fmt_double(*(const double *)(base + od->off), buf, cap);
        break;
    case O_TAU:
    case O_BLEND: {
        double t = *(const double *)(base + od->off);
        if (isnan(t))
            snprintf(buf, cap, "%s%s%s", q, od->kind == O_TAU ? "median" : "ratio", q);
        else
            kvt_fmt_double(t, buf, cap);
        break;
    }
    case O_U64:
        snprintf(buf, cap, "%llu", (unsigned long long)*(const uint64_t *)(base + od->off));
        break;
    case O_BOOL:
        snprintf(buf, cap, "%s",
                 *(const bool *)(base + od->off) ? (json ? "true" : "1") : (json ? "false" : "0"));
        break;
    case O_POOL:
        snprintf(buf, cap, "%s%s%s", q, o->pool == KVT_POOL_MAX ? "max" : "avg", q);
        break;
    case O_REDUCE:
        snprintf(buf, cap, "%s%s%s", q, reduce_name(*(const kvt_reduce *)(base + od->off)), q);
        break;
    case O_HEADS:
        snprintf(buf, cap, "%s%s%s", q, o->per_query ? "query" : "kv", q);
        break;
    case O_ALLOC:
        snprintf(buf, cap, "%s%c%s", q, o->alloc, q);
        break;
    case O_ALIGN:
        snprintf(buf, cap, "%s%s%s", q, o->chunk_kvpress ? "kvpress" : "prefix", q);
        break;
    case O_CHUNK_SCORES:
        snprintf(buf, cap, "%s%s%s", q,
                 o->chunk_scores == KVT_CHUNK_OWN       ? "own"
                 : o->chunk_scores == KVT_CHUNK_KVPRESS ? "kvpress"
                                                        : "prompt",
                 q);
        break;
    case O_LEVERAGE:
        snprintf(buf, cap, "%s%s%s", q, leverage_names[o->leverage & 3], q);
        break;
    case O_METHOD:
        snprintf(buf, cap, "%s%s%s", q, method_names[o->method % 6], q);
        break;
    case O_MERGE:
        snprintf(buf, cap, "%s%s%s", q,
                 o->merge == 'p'   ? "pivot"
                 : o->merge == 'w' ? "weighted"
                 : o->merge == 'e' ? "position"
                                   : "none",
                 q);
        break;
    case O_STR: {
        const char *s = *(char *const *)(base + od->off);
        if (!s)
            snprintf(buf, cap, "%s", json ? "null" : "none");
        else if (json) {
            /* escape quotes and backslashes */
            size_t k = 0;
            buf[k++] = '"';
            for (; *s && k + 3 < cap; s++) {
                if (*s == '"' || *s == '\\')
                    buf[k++] = '\\';
                buf[k++] = (unsigned char)*s < 0x20 ? '?' : *s;
            }
            buf[k++] = '"';
            buf[k] = '\0';
        } else
            snprintf(buf, cap, "%s", s);
        break;
    }
    }
}

static char *options_text(const kvt_policy_def *d, const kvt_policy_opts *o, bool json)
{
    size_t cap = 4096, len = 0;
    char *out = kvt_malloc(cap);
    if (!out)
        return NULL;
    len += (size_t)snprintf(out, cap, "%s", json ? "{" : "");
    bool first = true;
    kvt_policy_opts dflt; /* the policy's defaults: an option that is on by default is listed */
    base_defaults(&dflt);
    if (d->defaults)
        d->defaults(&dflt);
    for (size_t i = 0; i < N_OPTS; i++) {
        if (!key_accepted(d, opts_table[i].key) && !group_set(o, opt_group(&opts_table[i])))
            continue;
        /* stats=, dms=, dms_decoding=, decoding= and decode= (added after those policies'
           results existed) only when given, so that those results still merge with new ones;
           decode= always where the policy's default is on (rkv) */
        if ((!strcmp(opts_table[i].key, "stats") && !o->stats) ||
            (!strncmp(opts_table[i].key, "dms", 3) && isnan(o->dms)) ||
            (!strcmp(opts_table[i].key, "dms_decoding") && !o->dms_decoding) ||
            (!strcmp(opts_table[i].key, "decode") && !o->greedy_decode && !dflt.greedy_decode) ||
            ((!strcmp(opts_table[i].key, "decoding") || !strcmp(opts_table[i].key, "prefill")) &&
             !o->decoding))
            continue;
        char val[1200];
        opt_value(o, &opts_table[i], json, val, sizeof(val));
        int w = json ? snprintf(out + len, cap - len, "%s\"%s\": %s", first ? "" : ", ",
                                opts_table[i].key, val)
                     : snprintf(out + len, cap - len, "%s%s=%s", first ? "" : ",",
                                opts_table[i].key, val);
        if (w < 0 || (size_t)w >= cap - len)
            break;
        len += (size_t)w;
        first = false;
    }
    if (json && len + 2 < cap) {
        out[len++] = '}';
        out[len] = '\0';
    }
    return out;
}

char *kvt_policy_options_json(const kvt_policy *p)
{
    return options_text(p->def, &p->o, true);
}

size_t kvt_policy_registry_size(void)
{
    return N_REGISTRY;
}

void kvt_policy_registry_get(size_t i, kvt_policy_about *out)
{
    static char docs[N_REGISTRY][1024];
    memset(out, 0, sizeof(*out));
    if (i >= N_REGISTRY)
        return;
    const kvt_policy_def *d = registry[i];
    if (!docs[i][0]) {
        kvt_policy_opts o;
        base_defaults(&o);
        if (d->defaults)
            d->defaults(&o);
        char *t = options_text(d, &o, false);
        snprintf(docs[i], sizeof(docs[i]), "%s", t && *t ? t : "(none)");
        kvt_free(t);
    }
    out->name = d->name;
    out->summary = d->summary;
    out->options = docs[i];
    out->flags = d->flags;
}

/* ---- budgets ---- */
kvt_status kvt_budgets_parse(const char *list, kvt_budget **out, size_t *n_out)
{
    *out = NULL;
    *n_out = 0;
    KVT_RETURN_IF(!list || !*list, KVT_ERR_INVALID_ARG, "empty budget list");
    size_t cap = 1;
    for (const char *s = list; *s; s++)
        cap += *s == ',';
    kvt_budget *b = kvt_calloc(cap, sizeof(*b));
    KVT_RETURN_IF(!b, KVT_ERR_NOMEM, "out of memory");
    size_t n = 0;
    const char *p = list;
    while (p) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char item[32];
        if (len == 0 || len >= sizeof(item) || len >= sizeof(b[n].text)) {
            kvt_free(b);
            return kvt_error_set(KVT_ERR_INVALID_ARG, "bad budget item in '%s'", list);
        }
        memcpy(item, p, len);
        item[len] = '\0';
        kvt_budget *x = &b[n];
        memcpy(x->text, item, len + 1);
        /* plain decimals only: "64", "12.5%" (strtod alone would take 0x10, 1e2, +8, " 8") */
        size_t digits = strspn(item, "0123456789"), dot = item[digits] == '.';
        size_t frac = dot ? strspn(item + digits + 1, "0123456789") : 0;
        const char *rest = item + digits + dot + frac;
        bool plain =
            digits > 0 && (!strcmp(rest, "") ? !dot : !strcmp(rest, "%") && (!dot || frac));
        char *end;
        errno = 0;
        double v = strtod(item, &end);
        bool ok = plain && !errno && end != item && isfinite(v);
        if (ok && *end == '%' && end[1] == '\0') {
            x->is_fraction = true;
            x->value = v / 100.0;
            ok = v > 0.0 && v <= 100.0;
        } else {
            x->value = v;
            ok = ok && *end == '\0' && v >= 1.0 && v == floor(v) && v <= 2147483647.0;
        }
        if (!ok) {
            kvt_free(b);
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "bad budget '%s' (whole tokens >= 1 such as 64, or a "
                                 "percentage in (0%%, 100%%] such as 12.5%%)",
                                 item);
        }
        for (size_t j = 0; j < n; j++)
            if (b[j].is_fraction == x->is_fraction && b[j].value == x->value) {
                kvt_free(b);
                return kvt_error_set(KVT_ERR_INVALID_ARG, "budget '%s' is listed twice", item);
            }
        n++;
        p = e ? e + 1 : NULL;
    }
    *out = b;
    *n_out = n;
    return KVT_OK;
}

/* floor(P/100 * T + 1/2) for a percentage written P% ("12.5%"), exactly: P = num/scale in
   integers, so a product on .5 rounds up ("20.5%" of 300 is 61.5 -> 62; in double, 0.205 * 300
   is 61.4999... -> 61). false when the text is not plain decimals or the integers could
   overflow (the caller then rounds in double). */
static bool percent_tokens_exact(const char *text, int n_tokens, int64_t *out)
{
    int64_t num = 0, scale = 1;
    const char *s = text;
    if (!isdigit((unsigned char)*s) || n_tokens < 0)
        return false;
    for (; isdigit((unsigned char)*s); s++) {
        if (num > 1000)
            return false;
        num = num * 10 + (*s - '0');
    }
    if (*s == '.')
        for (s++; isdigit((unsigned char)*s); s++) {
            if (scale >= 1000000000)
                return false;
            num = num * 10 + (*s - '0');
            scale *= 10;
        }
    if (strcmp(s, "%") ||
        (n_tokens > 0 && num > (INT64_MAX - 100 * scale) / (2 * (int64_t)n_tokens)))
        return false;
    *out = (2 * num * n_tokens + 100 * scale) / (200 * scale);
    return true;
}

int kvt_budget_tokens(const kvt_budget *b, int n_tokens)
{
    if (!b->is_fraction)
        return (int)b->value;
    int64_t e;
    double t =
        percent_tokens_exact(b->text, n_tokens, &e) ? (double)e : floor(b->value * n_tokens + 0.5);
    return t < 1 ? 1 : (int)t;
}
