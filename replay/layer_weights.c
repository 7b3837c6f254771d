/* layer_weights.c - layer_weights=FILE on a policy that takes one budget for every layer: the
 * budget B of the sweep becomes layer l's own, B_l = max(1, floor(B * w_l / mean(w) + 0.5)),
 * so that the mean over layers stays about B (within half a token) and the budget axis
 * compares with the uniform policy's at equal cost. A budget written as a share f of the
 * prompt gives layer l the share f * w_l / mean(w), which the policies that follow kvpress's
 * compression ratio read: kvpress's PerLayerCompressionPress (per-layer compression ratios r_l
 * over a ScorerPress) is weights 1 - r_l at the budget mean(1 - r_l) written as a share.
 * The policy's select sees B_l as if it were the uniform budget; the metrics stay under B. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "replay_internal.h"

#define MAX_LAYER_WEIGHTS 100000

static kvt_status add_weight(const char *policy, const char *path, double x, double **w, int *n,
                             int *cap)
{
    KVT_RETURN_IF(!isfinite(x) || x <= 0, KVT_ERR_INVALID_ARG,
                  "%s: layer_weights=%s: weight %d is %g; every layer's weight must be a finite "
                  "number > 0",
                  policy, path, *n, x);
    KVT_RETURN_IF(*n >= MAX_LAYER_WEIGHTS, KVT_ERR_INVALID_ARG,
                  "%s: layer_weights=%s: more than %d weights", policy, path, MAX_LAYER_WEIGHTS);
    if (*n == *cap) {
        int nc = *cap ? 2 * *cap : 64;
        double *g = kvt_realloc(*w, (size_t)nc * sizeof(double));
        KVT_RETURN_IF(!g, KVT_ERR_NOMEM, "out of memory");
        *w = g, *cap = nc;
    }
    (*w)[(*n)++] = x;
    return KVT_OK;
}

/* the text form: numbers separated by blanks, commas or newlines, optionally inside one pair of
 * brackets (a JSON array); '#' starts a comment to the end of its line */
static kvt_status parse_text(const char *policy, const char *path, const char *s, double **w,
                             int *n)
{
    int cap = 0;
    for (;;) {
        while (*s &&
               (isspace((unsigned char)*s) || *s == ',' || *s == '[' || *s == ']' || *s == '#')) {
            if (*s == '#')
                while (*s && *s != '\n')
                    s++;
            else
                s++;
        }
        if (!*s)
            break;
        char *e;
        errno = 0;
        double x = strtod(s, &e);
        if (e == s || errno == ERANGE ||
            (*e && !isspace((unsigned char)*e) && *e != ',' && *e != ']' && *e != '#')) {
            char tok[24];
            size_t k = 0;
            while (s[k] && !isspace((unsigned char)s[k]) && !strchr(",]#", s[k]) &&
                   k + 1 < sizeof(tok))
                k++;
            memcpy(tok, s, k);
            tok[k] = '\0';
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s: layer_weights=%s: '%s' is not a number (expected one "
                                 "weight per layer)",
                                 policy, path, tok);
        }
        KVT_FORWARD(add_weight(policy, path, x, w, n, &cap));
        s = e;
    }
    return KVT_OK;
}

kvt_status kvt_layer_weights_read(const char *policy, const char *path, kvt_layer_weights *lw)
{
    memset(lw, 0, sizeof(*lw));
    double *w = NULL;
    int n = 0, cap = 0;
    kvt_status st = KVT_OK;
    size_t len = strlen(path);
    if (len >= 4 && !strcmp(path + len - 4, ".npy")) {
        kvt_npy a;
        if ((st = kvt_read_npy(path, &a)))
            return kvt_error_set(st, "%s: layer_weights: %s", policy, kvt_error_msg());
        if (a.ndim != 1 && !(a.ndim == 2 && a.shape[1] == 1))
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s: layer_weights=%s: expected a 1-D array of one weight per "
                               "layer, got %d dimensions",
                               policy, path, a.ndim);
        for (size_t i = 0; !st && i < a.n; i++)
            st = add_weight(policy, path, kvt_npy_at(&a, i), &w, &n, &cap);
        kvt_npy_free(&a);
    } else {
        char *text = NULL;
        size_t bytes = 0;
        if ((st = kvt_read_text_file(path, 16u << 20, &text, &bytes)))
            return kvt_error_set(st, "%s: layer_weights: %s", policy, kvt_error_msg());
        if (memchr(text, '\0', bytes))
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s: layer_weights=%s: a binary file (expected numbers as text, "
                               "or a .npy)",
                               policy, path);
        else
            st = parse_text(policy, path, text, &w, &n);
        kvt_free(text);
    }
    if (!st && n == 0)
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: layer_weights=%s: no weights (expected one number per layer)",
                           policy, path);
    if (st) {
        kvt_free(w);
        return st;
    }
    /* the sum the budgets divide by, once: weights near DBL_MAX divided by the largest */
    double sum = 0, top = 0, div = 1;
    for (int i = 0; i < n; i++) {
        sum += w[i];
        top = w[i] > top ? w[i] : top;
    }
    if (!isfinite(sum)) {
        div = top, sum = 0;
        for (int i = 0; i < n; i++)
            sum += w[i] / div;
    }
    *lw = (kvt_layer_weights){.w = w, .n = n, .div = div, .sum = sum};
    return KVT_OK;
}

void kvt_layer_budgets(const kvt_layer_weights *lw, int layer, const int *B, const double *frac,
                       int n_b, int *Bl, double *fl)
{
    /* x * w_l / mean(w) as (x * w_l * L) / sum: one rounding after exact products when the
       weights are integers (a recommend --write-allocation file), so such a layer gets exactly
       its share */
    const double wn = lw->w[layer] / lw->div * lw->n;
    for (int b = 0; b < n_b; b++) {
        double x = floor((double)B[b] * wn / lw->sum + 0.5);
        Bl[b] = !(x >= 1) ? 1 : x > 1e9 ? 1000000000 : (int)x;
        if (fl)
            fl[b] = frac[b] * wn / lw->sum;
    }
}

int kvt_layer_budget_min(const kvt_layer_weights *lw, int B)
{
    int m = B;
    for (int l = 0; lw->w && l < lw->n; l++) {
        int Bl;
        kvt_layer_budgets(lw, l, &B, NULL, 1, &Bl, NULL);
        m = l == 0 || Bl < m ? Bl : m;
    }
    return m;
}
