/* alloc.c - budget allocation shared by several policies: the AdaKV head-wise allocation
 * (POLICIES §3a repo form and §3b paper/kvpress form), the PyramidKV layer schedule (§2) and
 * the reader of per-(layer, head) tables, JSON or text (SparseMM and DuoAttention head scores,
 * MixKV offline r).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <sys/stat.h>

#include "replay_internal.h"

/* Global top-n over H descending lists vals[g][0..P) (each sorted descending), scaled by
 * w[g]; start[g] = first candidate of head g. Ties: lower flattened index g*P + rank (which is
 * lower head, then the head's own tie order: lower token index). Adds the picks to picks[g]. */
static void global_top(const double *vals, const double *w, int H, int P, long n, int *start,
                       int *picks)
{
    for (long k = 0; k < n; k++) {
        int best = -1;
        double bv = 0.0;
        for (int g = 0; g < H; g++) {
            if (start[g] >= P)
                continue;
            double x = vals[(size_t)g * P + start[g]] * (w ? w[g] : 1.0);
            if (best < 0 || x > bv) { /* strict: equal values keep the lower head */
                best = g;
                bv = x;
            }
        }
        if (best < 0)
            return;
        start[best]++;
        picks[best]++;
    }
}

kvt_status kvt_adakv_sort(const double *p, int H, int P, double *sorted)
{
    KVT_RETURN_IF(H < 1 || P < 0, KVT_ERR_INVALID_ARG, "adakv: bad allocation input H=%d P=%d", H,
                  P);
    int32_t *ord = kvt_malloc(((size_t)P + 1) * sizeof(int32_t));
    int32_t *work = kvt_malloc(((size_t)P + 1) * sizeof(int32_t));
    if (!ord || !work) {
        kvt_free(ord);
        kvt_free(work);
        return kvt_error_set(KVT_ERR_NOMEM, "adakv: out of memory");
    }
    kvt_status st = KVT_OK;
    for (int g = 0; g < H && !st; g++) {
        st = kvt_rank_desc(p + (size_t)g * P, P, ord, work);
        for (int t = 0; t < P && !st; t++)
            sorted[(size_t)g * P + t] = p[(size_t)g * P + ord[t]];
    }
    kvt_free(ord);
    kvt_free(work);
    return st;
}

kvt_status kvt_adakv_alloc_sorted(const double *sorted, int H, int P, int b, int W, double alpha,
                                  bool normalize, char form, int *caps)
{
    KVT_RETURN_IF(H < 1 || P < 0 || b < 0 || b > P, KVT_ERR_INVALID_ARG,
                  "adakv: bad allocation input H=%d P=%d b=%d", H, P, b);
    double *w = kvt_malloc((size_t)H * sizeof(double));
    int *start = kvt_calloc((size_t)H, sizeof(int)), *picks = kvt_calloc((size_t)H, sizeof(int));
    if (!w || !start || !picks) {
        kvt_free(w);
        kvt_free(start);
        kvt_free(picks);
        return kvt_error_set(KVT_ERR_NOMEM, "adakv: out of memory");
    }
    for (int g = 0; g < H; g++) {
        double top = 0.0, all = 0.0;
        for (int t = 0; t < P; t++) {
            double x = sorted[(size_t)g * P + t];
            all += x;
            if (t < b)
                top += x;
        }
        w[g] = all > 0.0 ? top / all : 0.0;
    }
    if (form == 'b') {
        /* 3b: each head keeps n_safe = floor(alpha*B) of its best entries; the window
         * (max-padded scores) comes first, so only n_safe - W prefix tokens are forced. */
        int B = b + W;
        int n_safe = (int)floor(alpha * B);
        int forced = n_safe - W > 0 ? n_safe - W : 0;
        if (forced > b)
            forced = b;
        long rest = (long)H * b;
        for (int g = 0; g < H; g++) {
            start[g] = forced;
            picks[g] = forced;
            rest -= forced;
        }
        global_top(sorted, NULL, H, P, rest, start, picks);
        for (int g = 0; g < H; g++)
            caps[g] = picks[g];
    } else {
        /* 3a: counts of the global top H*b of (optionally normalised) scores, then
         * cap = round(n*(1-alpha) + floor(alpha*b)) */
        global_top(sorted, normalize ? w : NULL, H, P, (long)H * b, start, picks);
        double fl = floor(alpha * b);
        for (int g = 0; g < H; g++) {
            double cap = kvt_round_even(picks[g] * (1.0 - alpha) + fl);
            caps[g] = cap < 0 ? 0 : (cap > P ? P : (int)cap);
        }
    }
    kvt_free(w);
    kvt_free(start);
    kvt_free(picks);
    return KVT_OK;
}

kvt_status kvt_adakv_alloc(const double *p, int H, int P, int b, int W, double alpha,
                           bool normalize, char form, int *caps)
{
    KVT_RETURN_IF(H < 1 || P < 0 || b < 0 || b > P, KVT_ERR_INVALID_ARG,
                  "adakv: bad allocation input H=%d P=%d b=%d", H, P, b);
    double *sorted = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    KVT_RETURN_IF(!sorted, KVT_ERR_NOMEM, "adakv: out of memory");
    kvt_status st = kvt_adakv_sort(p, H, P, sorted);
    if (!st)
        st = kvt_adakv_alloc_sorted(sorted, H, P, b, W, alpha, normalize, form, caps);
    kvt_free(sorted);
    return st;
}

int kvt_pyramid_layer_budget(int B, int W, int T, int L, int l, double beta, bool fallback)
{
    if (T < B)
        return -1; /* short prompt: compress nothing */
    int base = B - W;
    if (base <= 0)
        return 0;
    if (fallback && T < 2 * base)
        return base; /* KVCache-Factory: plain SnapKV budget */
    long min_num = (long)floor(base / beta);
    long max_num = 2L * base - min_num;
    if (max_num >= T - W) {
        max_num = T - W;
        min_num = 2L * base - max_num;
    }
    if (L <= 1)
        return base;
    long steps = (max_num - min_num) / (L - 1);
    long bl = max_num - (long)l * steps;
    return bl < 0 ? 0 : (int)bl;
}

static double json_value(const cJSON *v, bool *ok)
{
    *ok = true;
    if (cJSON_IsNumber(v))
        return v->valuedouble;
    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) > 0) {
        double s = 0.0;
        int n = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, v)
        {
            if (!cJSON_IsNumber(x)) {
                *ok = false;
                return NAN;
            }
            s += x->valuedouble;
            n++;
        }
        return s / n;
    }
    *ok = false;
    return NAN;
}

/* An object key of a head table: "L-H" or "L-H-key" (1), "L-H-value" (0: MixKV's tables hold
 * value-cache redundancies too; only the keys' are used), anything else -1. */
static int head_key(const char *s, int *l, int *h)
{
    int n = -1;
    if (sscanf(s, "%d-%d%n", l, h, &n) != 2 || n < 0 || *l < 0 || *h < 0 || *l > 100000 ||
        *h > 100000)
        return -1;
    return !s[n] || !strcmp(s + n, "-key") ? 1 : !strcmp(s + n, "-value") ? 0 : -1;
}

/* a table of per-(layer, head) numbers is a few KiB; refuse anything absurd: the file's size,
 * and the layers x heads it holds (or its "layer-head" keys name) */
#define KVT_HEAD_TABLE_MAX_BYTES   (64 << 20)
#define KVT_HEAD_TABLE_MAX_ENTRIES (1 << 24)

static kvt_status too_many(const char *path, long long L, long long H)
{
    return kvt_error_set(KVT_ERR_CORRUPT,
                         "%s: %lld layers x %lld heads is more than a head table holds (%d "
                         "entries)",
                         path, L, H, KVT_HEAD_TABLE_MAX_ENTRIES);
}

/* A text table (DuoAttention's full_attention_heads.tsv, np.savetxt): a row of numbers per
 * line, separated by tabs, blanks or commas; every row as long as the first; blank lines and
 * lines starting with '#' skipped. NaN, inf or anything but a plain number is refused. */
static kvt_status read_text_table(const char *path, char *txt, int *n_layers, int *n_heads,
                                  double **out)
{
    int L = 0, H = 0, cap = 0;
    double *tab = NULL;
    kvt_status st = KVT_OK;
    char *line = txt;
    for (int ln = 1; line && *line; ln++) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        char *c = line;
        while (*c == ' ' || *c == '\t' || *c == '\r')
            c++;
        if (*c && *c != '#') {
            int h = 0;
            while (*c) {
                char *e;
                errno = 0;
                double x = strtod(c, &e);
                if (e == c || errno == ERANGE || !isfinite(x) ||
                    !(*e == '\0' || *e == ' ' || *e == '\t' || *e == ',' || *e == '\r')) {
                    st = kvt_error_set(KVT_ERR_CORRUPT,
                                       "%s line %d: expected numbers separated by tabs, blanks "
                                       "or commas (or a JSON table)",
                                       path, ln);
                    goto out;
                }
                if (L == 0) {
                    if (h >= KVT_HEAD_TABLE_MAX_ENTRIES) {
                        st = too_many(path, 1, (long long)h + 1);
                        goto out;
                    }
                    if (h >= cap) {
                        cap = cap ? 2 * cap : 16;
                        double *t2 = kvt_realloc(tab, (size_t)cap * sizeof(double));
                        if (!t2) {
                            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                            goto out;
                        }
                        tab = t2;
                    }
                } else if (h >= H) {
                    st = kvt_error_set(KVT_ERR_CORRUPT,
                                       "%s line %d: more than the first row's %d "
                                       "numbers",
                                       path, ln, H);
                    goto out;
                }
                tab[(size_t)L * H + h++] = x;
                c = e;
                while (*c == ' ' || *c == '\t' || *c == ',' || *c == '\r')
                    c++;
            }
            if (L == 0) {
                H = h;
                cap = 0; /* from here on the table grows a row at a time */
            } else if (h != H) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "%s line %d: %d numbers; the first row has %d",
                                   path, ln, h, H);
                goto out;
            }
            L++;
            if ((long long)(L + 1) * H > KVT_HEAD_TABLE_MAX_ENTRIES) {
                st = too_many(path, L + 1, H);
                goto out;
            }
            double *t2 = kvt_realloc(tab, ((size_t)L + 1) * H * sizeof(double));
            if (!t2) {
                st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                goto out;
            }
            tab = t2;
        }
        line = nl ? nl + 1 : NULL;
    }
    if (L == 0 || H == 0) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: empty head table", path);
        goto out;
    }
    *n_layers = L;
    *n_heads = H;
    *out = tab;
    tab = NULL;
out:
    kvt_free(tab);
    return st;
}

kvt_status kvt_read_head_table(const char *path, int *n_layers, int *n_heads, double **out)
{
    kvt_status st = KVT_OK;
    char *txt = NULL;
    cJSON *root = NULL;
    double *tab = NULL;
    FILE *f = kvt_fopen_regular(path);
    KVT_RETURN_IF(!f, KVT_ERR_IO, "head table: %s", kvt_open_error(path));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0) { /* for the size: a regular file (kvt_fopen_regular) */
        fclose(f);
        return kvt_error_set(KVT_ERR_IO, "head table %s: %s", path, strerror(errno));
    }
    if (sb.st_size > KVT_HEAD_TABLE_MAX_BYTES) {
        fclose(f);
        return kvt_error_set(KVT_ERR_INVALID_ARG, "head table %s is larger than %d MiB", path,
                             KVT_HEAD_TABLE_MAX_BYTES >> 20);
    }
    long len = (long)sb.st_size;
    txt = kvt_malloc((size_t)len + 1);
    if (!txt) {
        fclose(f);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory reading %s", path);
    }
    size_t got = fread(txt, 1, (size_t)len, f);
    fclose(f);
    txt[got] = '\0';
    const char *first = txt + strspn(txt, " \t\r\n");
    if (*first != '{' && *first != '[') {
        st = read_text_table(path, txt, n_layers, n_heads, out);
        goto out_free;
    }
    root = cJSON_Parse(txt);
    if (!root) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s is not valid JSON", path);
        goto out_free;
    }
    int L = 0, H = 0;
    const cJSON *it;
    if (cJSON_IsArray(root)) {
        L = cJSON_GetArraySize(root);
        cJSON_ArrayForEach(it, root)
        {
            if (!cJSON_IsArray(it)) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "%s: expected an array of arrays", path);
                goto out_free;
            }
            H = cJSON_GetArraySize(it) > H ? cJSON_GetArraySize(it) : H;
        }
    } else if (cJSON_IsObject(root)) {
        cJSON_ArrayForEach(it, root)
        {
            int l, h, kind = head_key(it->string, &l, &h);
            if (kind < 0) {
                st = kvt_error_set(KVT_ERR_CORRUPT,
                                   "%s: key \"%s\" is not \"layer-head\", \"layer-head-key\" or "
                                   "\"layer-head-value\"",
                                   path, it->string);
                goto out_free;
            }
            if (kind == 0)
                continue;
            L = l + 1 > L ? l + 1 : L;
            H = h + 1 > H ? h + 1 : H;
        }
    } else {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: expected a JSON object or array", path);
        goto out_free;
    }
    if (L == 0 || H == 0) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: empty head table", path);
        goto out_free;
    }
    if ((long long)L * H > KVT_HEAD_TABLE_MAX_ENTRIES) { /* keys "99999-99999": 80 GB of NaN */
        st = too_many(path, L, H);
        goto out_free;
    }
    tab = kvt_malloc((size_t)L * H * sizeof(double));
    if (!tab) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    for (size_t i = 0; i < (size_t)L * H; i++)
        tab[i] = NAN;
    bool ok = true;
    if (cJSON_IsArray(root)) {
        int l = 0;
        cJSON_ArrayForEach(it, root)
        {
            int h = 0;
            const cJSON *x;
            cJSON_ArrayForEach(x, it) tab[(size_t)l * H + h++] = json_value(x, &ok);
            l++;
        }
    } else {
        cJSON_ArrayForEach(it, root)
        {
            int l, h;
            if (head_key(it->string, &l, &h) == 0)
                continue;
            if (!isnan(tab[(size_t)l * H + h])) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "%s: layer %d head %d given twice (\"%s\")",
                                   path, l, h, it->string);
                goto out_free;
            }
            tab[(size_t)l * H + h] = json_value(it, &ok);
            if (!ok)
                break;
        }
    }
    if (!ok) {
        st =
            kvt_error_set(KVT_ERR_CORRUPT, "%s: values must be numbers or arrays of numbers", path);
        goto out_free;
    }
    *n_layers = L;
    *n_heads = H;
    *out = tab;
    tab = NULL;
out_free:
    kvt_free(tab);
    cJSON_Delete(root);
    kvt_free(txt);
    return st;
}
