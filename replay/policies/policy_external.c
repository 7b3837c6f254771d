/* policy_external.c - `external`: your own per-token scores, from a NumPy file
 * (scores=FILE.npy, np.save of an array [L, H', T]: layers, heads, prompt tokens; H' = the KV
 * heads, or the query heads with heads=query), or, for a replay of several traces, from a
 * directory (scores=DIR) holding one NAME.npy per trace NAME.kvt. Each head keeps its
 * highest-scoring tokens, ties to the earlier token, the last `window` prompt tokens always
 * (default 0), with the uniform budget of every other policy or, with adaptive=1, AdaKV's
 * head-adaptive budgets computed from these scores (alpha, normalize, alloc and skip as
 * adakv's): a score computed in Python from a trace (or from anywhere) is replayed at every
 * budget with every metric, without writing C.
 */
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#include "../replay_internal.h"

static void d_external(kvt_policy_opts *o)
{
    o->window = 0;
}

/* FILE into a new array */
static kvt_status load_scores(const char *path, const char *hint, kvt_npy **out)
{
    return kvt_npy_load("external", path, "[layers, heads, tokens]", hint, out);
}

static kvt_status init_external(kvt_policy *p)
{
    KVT_RETURN_IF(!p->o.scores, KVT_ERR_INVALID_ARG,
                  "external needs scores=FILE.npy: np.save of a float array [layers, heads, "
                  "tokens] (README: your own policy)");
    struct stat sb;
    if (stat(p->o.scores, &sb) == 0 && S_ISDIR(sb.st_mode))
        return KVT_OK; /* one NAME.npy per trace, read when the trace is replayed (bind) */
    kvt_npy *a;
    KVT_FORWARD(load_scores(p->o.scores, "", &a));
    p->state = a;
    p->one_trace = true;
    return KVT_OK;
}

/* The file's shape against the trace's, and every score a number (the window's too) */
static kvt_status check_scores(const kvt_policy *p, const kvt_npy *a, const char *file, int L,
                               int Hq, int Hkv, int T)
{
    const int H = p->o.per_query ? Hq : Hkv;
    KVT_RETURN_IF(a->shape[0] != L || a->shape[1] != H || a->shape[2] != T, KVT_ERR_INVALID_ARG,
                  "external: %s has shape (%d, %d, %d); this trace needs (%d, %d, %d): %d layers, "
                  "%d %s heads (heads=%s), %d prompt tokens (one scores file per trace)",
                  file, a->shape[0], a->shape[1], a->shape[2], L, H, T, L, H,
                  p->o.per_query ? "query" : "KV", p->o.per_query ? "query" : "kv", T);
    const int P = T - (p->o.window < T ? p->o.window : T); /* adaptive shares the prefix's mass */
    for (size_t i = 0; i < a->n; i++) {
        double v = kvt_npy_at(a, i);
        int l = (int)(i / ((size_t)H * T)), h = (int)(i / T % H), j = (int)(i % T);
        if (!isnan(v) &&
            (!p->o.adaptive || p->o.alloc != 'a' || j >= P || (v >= 0 && v < INFINITY)))
            continue;
        if (isnan(v))
            return kvt_error_set(KVT_ERR_NAN,
                                 "external: %s: NaN score at layer %d, head %d, token %d", file, l,
                                 h, j);
        return kvt_error_set(KVT_ERR_INVALID_ARG,
                             "external: %s: score %g at layer %d, head %d, token %d: adaptive=1 "
                             "with alloc=a shares the budget by the scores' mass, so they must "
                             "be finite and >= 0 (alloc=b, kvpress's AdaKVPress, takes any "
                             "scores)",
                             file, v, l, h, j);
    }
    return KVT_OK;
}

/* scores=DIR: DIR/NAME.npy for the trace NAME.kvt (or NAME); false for scores=FILE or a name
 * too long for buf */
static bool trace_file_external(const kvt_policy *p, const char *path, char *buf, size_t cap)
{
    if (p->one_trace || !p->o.scores)
        return false;
    return kvt_trace_npy_path(p->o.scores, path, buf, cap);
}

/* before the trace's first layer: scores=FILE is checked against it; scores=DIR gives the
 * trace's own file, DIR/NAME.npy for the trace NAME.kvt (or NAME), read and checked */
static kvt_status bind_external(const kvt_policy *p, const char *path, int L, int Hq, int Hkv,
                                int T, void **state)
{
    if (p->state)
        return check_scores(p, p->state, p->o.scores, L, Hq, Hkv, T);
    char file[4096];
    KVT_RETURN_IF(!trace_file_external(p, path, file, sizeof(file)), KVT_ERR_INVALID_ARG,
                  "external: scores file name too long");
    kvt_npy *a;
    KVT_FORWARD(load_scores(file, " (scores=DIR holds one NAME.npy per trace NAME.kvt)", &a));
    kvt_status st = check_scores(p, a, file, L, Hq, Hkv, T);
    if (st) {
        kvt_npy_destroy(a);
        return st;
    }
    *state = a;
    return KVT_OK;
}

static void unbind_external(void *state)
{
    kvt_npy_destroy(state);
}

static kvt_status sel_external(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                               kvt_layer_selection *sel)
{
    const kvt_npy *a = p->state;
    const int T = c->T, H = kvt_ctx_heads(c, p->o.per_query);
    const int W = p->o.window < T ? p->o.window : T, P = T - W;
    KVT_RETURN_IF(!a, KVT_ERR_INVALID_ARG,
                  "external: scores=%s is a directory of per-trace files, read by a trace replay "
                  "(kvt_replay_trace); give a layer replay its FILE.npy",
                  p->o.scores);
    KVT_RETURN_IF(a->shape[0] != c->n_layers || a->shape[1] != H || a->shape[2] != T, KVT_ERR_STATE,
                  "external: %s: the trace was not checked", p->o.scores);
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, W, n_b, true));
    double *s = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "out of memory");
    const size_t base = (size_t)c->layer * H * T;
    for (int h = 0; h < H; h++)
        for (int j = 0; j < P; j++)
            s[(size_t)h * P + j] = kvt_npy_at(a, base + (size_t)h * T + j);
    kvt_status st = kvt_sel_rank_counts(c, p, s, W, B, n_b, sel);
    kvt_free(s);
    return st;
}

const kvt_policy_def kvt_policy_def_external = {
    .name = "external",
    .summary = "your own per-token scores: keeps each head's highest (scores=FILE.npy, "
               "[layers, heads, tokens], or scores=DIR of NAME.npy per trace NAME.kvt; "
               "adaptive=1: AdaKV's head budgets from them)",
    .keys = "window,heads,scores,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,"
            "dms_window",
    .defaults = d_external,
    .init = init_external,
    .fini = kvt_policy_fini_npy,
    .bind = bind_external,
    .unbind = unbind_external,
    .trace_file = trace_file_external,
    .select = sel_external,
};
