/* llama2c.c - the built-in llama2.c engine (kvt_llama2c.h): checkpoint loading with full
 * validation, a plain-C f32 forward pass (RMSNorm, GQA attention with RoPE on pairs
 * (2i, 2i+1), SwiGLU FFN) written after the format description in models/README.md, prompt
 * generation from BOS, greedy decoding, and capture through the public kvt_capture_* API.
 * The NumPy oracle in tests/oracle/llama2c_oracle.py checks it.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvt_llama2c.h"

#define L2C_MAX_FIELD (1 << 20) /* upper bound on every header field */
#define L2C_HDR_BYTES 28u

struct kvt_llama2c_model {
    kvt_llama2c_config cfg;
    float *data; /* every float of the file after the header */
    /* views into data */
    const float *tok_emb; /* [vocab, dim] */
    const float *rms_att; /* [L, dim] */
    const float *wq;      /* [L, dim, dim] */
    const float *wk;      /* [L, kv_dim, dim] */
    const float *wv;      /* [L, kv_dim, dim] */
    const float *wo;      /* [L, dim, dim] */
    const float *rms_ffn; /* [L, dim] */
    const float *w1;      /* [L, hidden, dim] */
    const float *w2;      /* [L, dim, hidden] */
    const float *w3;      /* [L, hidden, dim] */
    const float *rms_out; /* [dim] */
    const float *wcls;    /* [vocab, dim] */
};

struct kvt_llama2c_state {
    const kvt_llama2c_model *m;
    uint32_t n_pos;
    bool keep_queries;
    float *x, *xb, *xb2, *hb, *hb2, *q, *att, *logits;
    float *key_cache;   /* [L, S, kv_dim] */
    float *value_cache; /* [L, S, kv_dim] */
    float *queries;     /* [L, S or 1, dim] */
    float *rope_cos;    /* [S, D/2] */
    float *rope_sin;
    const uint8_t *keep; /* [L, Hq, n_masked] borrowed (kvt_llama2c_state_set_mask), or NULL */
    uint32_t n_masked;
    const uint8_t *mflag; /* [L, Hq, n_merged] merged entries (kvt_llama2c_state_set_merged) */
    const float *mk, *mv; /* [L, Hq, n_merged, D] their keys and values */
    uint32_t n_merged;
};

/* ---- loading ---- */

static bool host_is_le(void)
{
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static int32_t le_i32(const uint8_t *p)
{
    uint32_t u =
        (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    int32_t v;
    memcpy(&v, &u, 4);
    return v;
}

static kvt_status read_all(int fd, void *buf, size_t n, const char *path)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (r < 0 && errno == EINTR)
            continue;
        KVT_RETURN_IF(r < 0, KVT_ERR_IO, "reading %s: %s", path, strerror(errno));
        KVT_RETURN_IF(r == 0, KVT_ERR_IO, "reading %s: file shrank while reading", path);
        p += r;
        n -= (size_t)r;
    }
    return KVT_OK;
}

static kvt_status check_config(const int32_t h[7], const char *path, kvt_llama2c_config *c)
{
    static const char *names[7] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                                   "n_kv_heads", "vocab_size", "seq_len"};
    for (int i = 0; i < 7; i++) {
        int32_t v = i == 5 && h[i] < 0 && h[i] != INT32_MIN ? -h[i] : h[i];
        KVT_RETURN_IF(v < 1 || v > L2C_MAX_FIELD, KVT_ERR_CORRUPT,
                      "%s: header field %s = %d is outside [1, %d] (not a llama2.c legacy "
                      "checkpoint?)",
                      path, names[i], (int)h[i], L2C_MAX_FIELD);
    }
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->shared_classifier = h[5] > 0;
    c->vocab_size = h[5] > 0 ? h[5] : -h[5];
    c->seq_len = h[6];
    KVT_RETURN_IF(c->dim % c->n_heads != 0, KVT_ERR_CORRUPT,
                  "%s: dim %d is not a multiple of n_heads %d", path, c->dim, c->n_heads);
    KVT_RETURN_IF(c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0, KVT_ERR_CORRUPT,
                  "%s: n_kv_heads %d must divide n_heads %d", path, c->n_kv_heads, c->n_heads);
    c->head_dim = c->dim / c->n_heads;
    KVT_RETURN_IF(c->head_dim % 2 != 0, KVT_ERR_CORRUPT,
                  "%s: head_dim %d is odd (RoPE rotates pairs)", path, c->head_dim);
    c->kv_dim = c->n_kv_heads * c->head_dim;
    return KVT_OK;
}

/* Number of floats after the header, or false on overflow. */
static bool expected_floats(const kvt_llama2c_config *c, bool shared, uint64_t *out)
{
    uint64_t L = (uint64_t)c->n_layers, d = (uint64_t)c->dim, hd = (uint64_t)c->hidden_dim;
    uint64_t kv = (uint64_t)c->kv_dim, V = (uint64_t)c->vocab_size, S = (uint64_t)c->seq_len;
    /* every factor is <= 2^20, so each product below fits in 64 bits */
    uint64_t n = V * d;              /* token embedding */
    n += L * d;                      /* attention RMSNorm */
    n += L * d * d + 2 * L * kv * d; /* wq, wk, wv */
    n += L * d * d;                  /* wo */
    n += L * d;                      /* FFN RMSNorm */
    n += 3 * L * hd * d;             /* w1, w2, w3 */
    n += d;                          /* final RMSNorm */
    n += S * (uint64_t)c->head_dim;  /* two legacy RoPE tables of S*D/2 */
    if (!shared)
        n += V * d;
    *out = n;
    return n < (UINT64_MAX - L2C_HDR_BYTES) / 4;
}

kvt_status kvt_llama2c_model_open(const char *path, kvt_llama2c_model **out)
{
    KVT_RETURN_IF(!path || !out, KVT_ERR_INVALID_ARG, "null argument");
    *out = NULL;
    kvt_status st;
    int fd = kvt_open_regular(path);
    KVT_RETURN_IF(fd < 0, KVT_ERR_IO, "%s", kvt_open_error(path));
    kvt_llama2c_model *m = NULL;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = kvt_error_set(KVT_ERR_IO, "%s is not a regular file", path);
        goto out_close;
    }
    uint64_t size = (uint64_t)sb.st_size;
    if (size < L2C_HDR_BYTES) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: %llu bytes, shorter than the 28-byte header", path,
                           (unsigned long long)size);
        goto out_close;
    }
    uint8_t hb[L2C_HDR_BYTES];
    st = read_all(fd, hb, sizeof(hb), path);
    if (st != KVT_OK)
        goto out_close;
    int32_t h[7];
    for (int i = 0; i < 7; i++)
        h[i] = le_i32(hb + 4 * i);
    m = kvt_calloc(1, sizeof(*m));
    if (!m) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_close;
    }
    st = check_config(h, path, &m->cfg);
    if (st != KVT_OK)
        goto out_free_m;
    const kvt_llama2c_config *c = &m->cfg;
    uint64_t nf, nf_other;
    if (!expected_floats(c, c->shared_classifier, &nf) ||
        !expected_floats(c, !c->shared_classifier, &nf_other) || nf > SIZE_MAX / 4) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: the header describes an impossibly large model",
                           path);
        goto out_free_m;
    }
    uint64_t want = L2C_HDR_BYTES + 4 * nf;
    if (size != want) {
        const char *hint = size == L2C_HDR_BYTES + 4 * nf_other
                               ? c->shared_classifier
                                     ? " (the size fits a separate classifier: vocab_size "
                                       "should be negative)"
                                     : " (the size fits a shared classifier: vocab_size "
                                       "should be positive)"
                               : "";
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: file is %llu bytes but its header (dim %d, hidden %d, layers %d, "
                           "heads %d/%d, vocab %d, seq_len %d, %s classifier) needs %llu%s",
                           path, (unsigned long long)size, c->dim, c->hidden_dim, c->n_layers,
                           c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len,
                           c->shared_classifier ? "shared" : "separate", (unsigned long long)want,
                           hint);
        goto out_free_m;
    }
    m->data = kvt_malloc((size_t)nf * sizeof(float));
    if (!m->data) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory (%llu bytes of weights)",
                           (unsigned long long)(nf * 4));
        goto out_free_m;
    }
    st = read_all(fd, m->data, (size_t)nf * sizeof(float), path);
    if (st != KVT_OK)
        goto out_free_data;
    if (!host_is_le()) {
        uint8_t *b = (uint8_t *)m->data;
        for (size_t i = 0; i < (size_t)nf; i++) {
            uint8_t t0 = b[4 * i], t1 = b[4 * i + 1];
            b[4 * i] = b[4 * i + 3];
            b[4 * i + 1] = b[4 * i + 2];
            b[4 * i + 2] = t1;
            b[4 * i + 3] = t0;
        }
    }
    for (size_t i = 0; i < (size_t)nf; i++) {
        if (!isfinite(m->data[i])) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: weight %zu (file offset %zu) is not finite",
                               path, i, (size_t)L2C_HDR_BYTES + 4 * i);
            goto out_free_data;
        }
    }
    size_t L = (size_t)c->n_layers, d = (size_t)c->dim, hd = (size_t)c->hidden_dim;
    size_t kv = (size_t)c->kv_dim, V = (size_t)c->vocab_size, S = (size_t)c->seq_len;
    const float *p = m->data;
    m->tok_emb = p;
    p += V * d;
    m->rms_att = p;
    p += L * d;
    m->wq = p;
    p += L * d * d;
    m->wk = p;
    p += L * kv * d;
    m->wv = p;
    p += L * kv * d;
    m->wo = p;
    p += L * d * d;
    m->rms_ffn = p;
    p += L * d;
    m->w1 = p;
    p += L * hd * d;
    m->w2 = p;
    p += L * d * hd;
    m->w3 = p;
    p += L * hd * d;
    m->rms_out = p;
    p += d;
    p += S * (size_t)c->head_dim; /* legacy freq_cis_real and freq_cis_imag */
    m->wcls = c->shared_classifier ? m->tok_emb : p;
    close(fd);
    *out = m;
    return KVT_OK;

out_free_data:
    kvt_free(m->data);
out_free_m:
    kvt_free(m);
out_close:
    close(fd);
    return st;
}

void kvt_llama2c_model_close(kvt_llama2c_model *m)
{
    if (!m)
        return;
    kvt_free(m->data);
    kvt_free(m);
}

const kvt_llama2c_config *kvt_llama2c_model_config(const kvt_llama2c_model *m)
{
    return &m->cfg;
}

/* ---- state ---- */

void kvt_llama2c_state_free(kvt_llama2c_state *st)
{
    if (!st)
        return;
    kvt_free(st->x);
    kvt_free(st->xb);
    kvt_free(st->xb2);
    kvt_free(st->hb);
    kvt_free(st->hb2);
    kvt_free(st->q);
    kvt_free(st->att);
    kvt_free(st->logits);
    kvt_free(st->key_cache);
    kvt_free(st->value_cache);
    kvt_free(st->queries);
    kvt_free(st->rope_cos);
    kvt_free(st->rope_sin);
    kvt_free(st);
}

kvt_status kvt_llama2c_state_create(const kvt_llama2c_model *m, bool keep_queries,
                                    kvt_llama2c_state **out)
{
    KVT_RETURN_IF(!m || !out, KVT_ERR_INVALID_ARG, "null argument");
    *out = NULL;
    const kvt_llama2c_config *c = &m->cfg;
    kvt_llama2c_state *st = kvt_calloc(1, sizeof(*st));
    KVT_RETURN_IF(!st, KVT_ERR_NOMEM, "out of memory");
    size_t L = (size_t)c->n_layers, S = (size_t)c->seq_len, d = (size_t)c->dim;
    size_t half = (size_t)c->head_dim / 2;
    st->m = m;
    st->keep_queries = keep_queries;
    st->x = kvt_calloc(d, sizeof(float));
    st->xb = kvt_calloc(d, sizeof(float));
    st->xb2 = kvt_calloc(d, sizeof(float));
    st->hb = kvt_calloc((size_t)c->hidden_dim, sizeof(float));
    st->hb2 = kvt_calloc((size_t)c->hidden_dim, sizeof(float));
    st->q = kvt_calloc(d, sizeof(float));
    st->att = kvt_calloc(S, sizeof(float));
    st->logits = kvt_calloc((size_t)c->vocab_size, sizeof(float));
    st->key_cache = kvt_calloc(L * S, (size_t)c->kv_dim * sizeof(float));
    st->value_cache = kvt_calloc(L * S, (size_t)c->kv_dim * sizeof(float));
    st->queries = kvt_calloc(L * (keep_queries ? S : 1), d * sizeof(float));
    st->rope_cos = kvt_calloc(S * half, sizeof(float));
    st->rope_sin = kvt_calloc(S * half, sizeof(float));
    if (!st->x || !st->xb || !st->xb2 || !st->hb || !st->hb2 || !st->q || !st->att || !st->logits ||
        !st->key_cache || !st->value_cache || !st->queries || !st->rope_cos || !st->rope_sin) {
        kvt_llama2c_state_free(st);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory (inference state)");
    }
    /* angles in double: p * theta^(-2i/D) loses ~p ulps in f32 */
    for (size_t p = 0; p < S; p++) {
        for (size_t i = 0; i < half; i++) {
            double freq = pow(KVT_LLAMA2C_ROPE_THETA, -(double)(2 * i) / (double)c->head_dim);
            double a = (double)p * freq;
            st->rope_cos[p * half + i] = (float)cos(a);
            st->rope_sin[p * half + i] = (float)sin(a);
        }
    }
    *out = st;
    return KVT_OK;
}

uint32_t kvt_llama2c_state_n_pos(const kvt_llama2c_state *st)
{
    return st->n_pos;
}

kvt_status kvt_llama2c_state_set_mask(kvt_llama2c_state *st, const uint8_t *keep, uint32_t n_masked)
{
    KVT_RETURN_IF(!st || (!keep && n_masked), KVT_ERR_INVALID_ARG, "null argument");
    KVT_RETURN_IF(n_masked > (uint32_t)st->m->cfg.seq_len, KVT_ERR_INVALID_ARG,
                  "mask of %u positions for a context of %d", n_masked, st->m->cfg.seq_len);
    st->keep = n_masked ? keep : NULL;
    st->n_masked = n_masked;
    return KVT_OK;
}

kvt_status kvt_llama2c_state_rewind(kvt_llama2c_state *st, uint32_t pos)
{
    KVT_RETURN_IF(!st, KVT_ERR_INVALID_ARG, "null argument");
    KVT_RETURN_IF(pos > st->n_pos, KVT_ERR_INVALID_ARG, "cannot rewind to position %u: %u run", pos,
                  st->n_pos);
    st->n_pos = pos; /* the cache rows from pos on are overwritten by the next forwards */
    return KVT_OK;
}

kvt_status kvt_llama2c_state_set_merged(kvt_llama2c_state *st, const uint8_t *flag, const float *mk,
                                        const float *mv, uint32_t n_masked)
{
    KVT_RETURN_IF(!st || ((!flag || !mk || !mv) && n_masked), KVT_ERR_INVALID_ARG, "null argument");
    KVT_RETURN_IF(n_masked > (uint32_t)st->m->cfg.seq_len, KVT_ERR_INVALID_ARG,
                  "merged entries of %u positions for a context of %d", n_masked,
                  st->m->cfg.seq_len);
    st->mflag = n_masked ? flag : NULL;
    st->mk = mk, st->mv = mv;
    st->n_merged = n_masked;
    return KVT_OK;
}

const float *kvt_llama2c_state_keys(const kvt_llama2c_state *st, int layer)
{
    const kvt_llama2c_config *c = &st->m->cfg;
    return st->key_cache + (size_t)layer * (size_t)c->seq_len * (size_t)c->kv_dim;
}

const float *kvt_llama2c_state_values(const kvt_llama2c_state *st, int layer)
{
    const kvt_llama2c_config *c = &st->m->cfg;
    return st->value_cache + (size_t)layer * (size_t)c->seq_len * (size_t)c->kv_dim;
}

const float *kvt_llama2c_state_queries(const kvt_llama2c_state *st, int layer)
{
    const kvt_llama2c_config *c = &st->m->cfg;
    size_t rows = st->keep_queries ? (size_t)c->seq_len : 1;
    return st->queries + (size_t)layer * rows * (size_t)c->dim;
}

/* ---- forward ---- */

/* o = w * x / rms(x), n elements */
static void rmsnorm(float *o, const float *x, const float *w, int n)
{
    float ss = 0.0f;
    for (int j = 0; j < n; j++)
        ss += x[j] * x[j];
    ss = ss / (float)n + KVT_LLAMA2C_NORM_EPS;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < n; j++)
        o[j] = w[j] * (ss * x[j]);
}

/* out[i] = sum_j w[i, j] x[j]; w is [d, n] */
static void matmul(float *out, const float *x, const float *w, int n, int d)
{
    for (int i = 0; i < d; i++) {
        const float *row = w + (size_t)i * (size_t)n;
        float v = 0.0f;
        for (int j = 0; j < n; j++)
            v += row[j] * x[j];
        out[i] = v;
    }
}

static void softmax(float *x, int n)
{
    float mx = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > mx)
            mx = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] /= sum;
}

/* Rotate pairs (2i, 2i+1) of each head of vec ([n_heads, D]) by angle pos * theta^(-2i/D). */
static void rope(float *vec, int n_heads, int head_dim, const float *cs, const float *sn)
{
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * (size_t)head_dim;
        for (int i = 0; i < head_dim / 2; i++) {
            float v0 = v[2 * i], v1 = v[2 * i + 1];
            v[2 * i] = v0 * cs[i] - v1 * sn[i];
            v[2 * i + 1] = v0 * sn[i] + v1 * cs[i];
        }
    }
}

kvt_status kvt_llama2c_forward(kvt_llama2c_state *st, int32_t token, const float **logits)
{
    KVT_RETURN_IF(!st || !logits, KVT_ERR_INVALID_ARG, "null argument");
    const kvt_llama2c_model *m = st->m;
    const kvt_llama2c_config *c = &m->cfg;
    KVT_RETURN_IF(token < 0 || token >= c->vocab_size, KVT_ERR_INVALID_ARG,
                  "token %d outside the vocabulary [0, %d)", (int)token, c->vocab_size);
    KVT_RETURN_IF(st->n_pos >= (uint32_t)c->seq_len, KVT_ERR_STATE,
                  "the context is full (seq_len %d)", c->seq_len);
    int dim = c->dim, kv_dim = c->kv_dim, hs = c->head_dim, hidden = c->hidden_dim;
    int kv_mul = c->n_heads / c->n_kv_heads;
    size_t pos = st->n_pos, S = (size_t)c->seq_len;
    const float *cs = st->rope_cos + pos * (size_t)(hs / 2);
    const float *sn = st->rope_sin + pos * (size_t)(hs / 2);
    float scale = 1.0f / sqrtf((float)hs);
    float *x = st->x;
    memcpy(x, m->tok_emb + (size_t)token * (size_t)dim, (size_t)dim * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        size_t lo = (size_t)l;
        rmsnorm(st->xb, x, m->rms_att + lo * (size_t)dim, dim);
        float *kc = st->key_cache + lo * S * (size_t)kv_dim;   /* [S, kv_dim] */
        float *vc = st->value_cache + lo * S * (size_t)kv_dim; /* [S, kv_dim] */
        float *k = kc + pos * (size_t)kv_dim;
        float *v = vc + pos * (size_t)kv_dim;
        matmul(st->q, st->xb, m->wq + lo * (size_t)dim * (size_t)dim, dim, dim);
        matmul(k, st->xb, m->wk + lo * (size_t)kv_dim * (size_t)dim, dim, kv_dim);
        matmul(v, st->xb, m->wv + lo * (size_t)kv_dim * (size_t)dim, dim, kv_dim);
        rope(st->q, c->n_heads, hs, cs, sn);
        rope(k, c->n_kv_heads, hs, cs, sn);
        float *qkeep = st->queries + lo * (st->keep_queries ? S : 1) * (size_t)dim +
                       (st->keep_queries ? pos * (size_t)dim : 0);
        memcpy(qkeep, st->q, (size_t)dim * sizeof(float));

        /* a compressed cache: a position past the mask attends to the kept ones of it */
        const uint8_t *keep = st->keep && pos >= st->n_masked
                                  ? st->keep + lo * (size_t)c->n_heads * st->n_masked
                                  : NULL;
        /* a merged one: those entries' keys and values replaced, as each query head sees them */
        const size_t nmg = st->n_merged;
        const uint8_t *merged =
            st->mflag && pos >= nmg ? st->mflag + lo * (size_t)c->n_heads * nmg : NULL;
        for (int h = 0; h < c->n_heads; h++) {
            const float *qh = st->q + (size_t)h * (size_t)hs;
            size_t koff = (size_t)(h / kv_mul) * (size_t)hs;
            const uint8_t *kh = keep ? keep + (size_t)h * st->n_masked : NULL;
            const uint8_t *mh = merged ? merged + (size_t)h * nmg : NULL;
            const size_t mrow = (lo * (size_t)c->n_heads + (size_t)h) * nmg; /* row of (l, h, 0) */
            for (size_t t = 0; t <= pos; t++) {
                if (kh && t < st->n_masked && !kh[t]) {
                    st->att[t] = -INFINITY; /* dropped: no weight after the softmax */
                    continue;
                }
                const float *kt = mh && t < nmg && mh[t] ? st->mk + (mrow + t) * (size_t)hs
                                                         : kc + t * (size_t)kv_dim + koff;
                float score = 0.0f;
                for (int i = 0; i < hs; i++)
                    score += qh[i] * kt[i];
                st->att[t] = score * scale;
            }
            softmax(st->att, (int)pos + 1);
            float *xbh = st->xb + (size_t)h * (size_t)hs;
            memset(xbh, 0, (size_t)hs * sizeof(float));
            for (size_t t = 0; t <= pos; t++) {
                const float *vt = mh && t < nmg && mh[t] ? st->mv + (mrow + t) * (size_t)hs
                                                         : vc + t * (size_t)kv_dim + koff;
                float a = st->att[t];
                for (int i = 0; i < hs; i++)
                    xbh[i] += a * vt[i];
            }
        }
        matmul(st->xb2, st->xb, m->wo + lo * (size_t)dim * (size_t)dim, dim, dim);
        for (int i = 0; i < dim; i++)
            x[i] += st->xb2[i];

        rmsnorm(st->xb, x, m->rms_ffn + lo * (size_t)dim, dim);
        matmul(st->hb, st->xb, m->w1 + lo * (size_t)hidden * (size_t)dim, dim, hidden);
        matmul(st->hb2, st->xb, m->w3 + lo * (size_t)hidden * (size_t)dim, dim, hidden);
        for (int i = 0; i < hidden; i++) {
            float a = st->hb[i];
            st->hb[i] = a * (1.0f / (1.0f + expf(-a))) * st->hb2[i];
        }
        matmul(st->xb, st->hb, m->w2 + lo * (size_t)dim * (size_t)hidden, hidden, dim);
        for (int i = 0; i < dim; i++)
            x[i] += st->xb[i];
    }
    rmsnorm(x, x, m->rms_out, dim);
    matmul(st->logits, x, m->wcls, dim, c->vocab_size);
    st->n_pos++;
    *logits = st->logits;
    return KVT_OK;
}

int32_t kvt_llama2c_argmax(const float *logits, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}

int32_t kvt_llama2c_sample(const float *logits, int n, float temperature, kvt_rng *rng)
{
    if (!(temperature > 0.0f))
        return kvt_llama2c_argmax(logits, n);
    double mx = logits[kvt_llama2c_argmax(logits, n)], sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += exp(((double)logits[i] - mx) / temperature);
    double coin = kvt_rng_uniform(rng) * sum, cdf = 0.0;
    for (int i = 0; i < n; i++) {
        cdf += exp(((double)logits[i] - mx) / temperature);
        if (coin < cdf)
            return i;
    }
    return n - 1; /* rounding */
}

kvt_status kvt_llama2c_read_ids(const char *path, int vocab, int32_t **ids, uint32_t *n_ids)
{
    KVT_RETURN_IF(!path || !ids || !n_ids, KVT_ERR_INVALID_ARG, "null argument");
    *ids = NULL;
    *n_ids = 0;
    FILE *f = kvt_fopen_regular(path);
    KVT_RETURN_IF(!f, KVT_ERR_IO, "%s", kvt_open_error(path));
    kvt_status st = KVT_OK;
    int32_t *buf = NULL;
    size_t n = 0, cap = 0;
    char word[64];
    int ch;
    for (;;) {
        size_t wl = 0;
        while ((ch = fgetc(f)) != EOF && (ch == ' ' || ch == '\n' || ch == '\t' || ch == '\r'))
            ;
        if (ch == EOF)
            break;
        while (ch != EOF && !(ch == ' ' || ch == '\n' || ch == '\t' || ch == '\r')) {
            if (wl + 1 < sizeof(word))
                word[wl++] = (char)ch;
            else
                wl = sizeof(word); /* too long: reported below */
            ch = fgetc(f);
        }
        if (wl >= sizeof(word)) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: token %zu is not an integer", path, n + 1);
            goto out;
        }
        word[wl] = '\0';
        char *end;
        errno = 0;
        long v = strtol(word, &end, 10);
        if (*end != '\0' || errno != 0) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: token %zu ('%s') is not an integer", path,
                               n + 1, word);
            goto out;
        }
        if (v < 0 || v >= vocab) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: token %zu is %ld, outside the vocabulary [0, %d)", path, n + 1,
                               v, vocab);
            goto out;
        }
        if (n == cap) {
            size_t nc = cap ? 2 * cap : 256;
            int32_t *nb = kvt_realloc(buf, nc * sizeof(*nb));
            if (!nb) {
                st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                goto out;
            }
            buf = nb;
            cap = nc;
        }
        buf[n++] = (int32_t)v;
        if (n > UINT32_MAX - 1) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: too many tokens", path);
            goto out;
        }
    }
    if (ferror(f)) {
        st = kvt_error_set(KVT_ERR_IO, "reading %s: %s", path, strerror(errno));
        goto out;
    }
    if (n == 0) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: no token ids", path);
        goto out;
    }
    *ids = buf;
    *n_ids = (uint32_t)n;
    buf = NULL;
out:
    kvt_free(buf);
    fclose(f);
    return st;
}

/* ---- KVzip's context-reconstruction pass ---- */

/* every id of a token list inside the vocabulary; `what` names the list in the message */
static kvt_status check_ids(const int32_t *ids, uint32_t n, int vocab, const char *what)
{
    for (uint32_t i = 0; i < n; i++)
        KVT_RETURN_IF(ids[i] < 0 || ids[i] >= vocab, KVT_ERR_INVALID_ARG,
                      "%s token %u is %d, outside the vocabulary [0, %d)", what, i, (int)ids[i],
                      vocab);
    return KVT_OK;
}

/* the most repeat rows a chunk of C tokens runs: the instruction, the previous chunk's tail
 * (every chunk but the first), the chunk */
static int64_t kvzip_rows(uint32_t T, uint32_t n_instr, int64_t C)
{
    if (C >= T)
        return (int64_t)n_instr + T;
    const int64_t tail = C < KVT_KVZIP_TAIL ? C : KVT_KVZIP_TAIL, later = T - C < C ? T - C : C;
    return (int64_t)n_instr + (C > tail + later ? C : tail + later);
}

kvt_status kvt_llama2c_kvzip_chunk(const kvt_llama2c_config *c, uint32_t T, uint32_t n_instr,
                                   uint32_t want, uint32_t *chunk)
{
    KVT_RETURN_IF(!c || !chunk || T < 1, KVT_ERR_INVALID_ARG, "kvzip: bad arguments");
    const int64_t room = (int64_t)c->seq_len - T; /* positions after the prompt */
    int64_t fit = T < KVT_KVZIP_MAX_CHUNK ? T : KVT_KVZIP_MAX_CHUNK;
    while (fit >= 1 && kvzip_rows(T, n_instr, fit) > room)
        fit--;
    KVT_RETURN_IF(fit < 1, KVT_ERR_INVALID_ARG,
                  "kvzip: the reconstruction pass repeats the prompt after it, and %u prompt "
                  "tokens leave %lld of the model's %d positions for %u instruction tokens and "
                  "2 or more repeated ones (a shorter prompt, or a shorter instruction)",
                  T, (long long)(room > 0 ? room : 0), c->seq_len, n_instr);
    if (want == 0) {
        *chunk = (uint32_t)fit;
        return KVT_OK;
    }
    KVT_RETURN_IF(kvzip_rows(T, n_instr, want) > room, KVT_ERR_INVALID_ARG,
                  "kvzip: chunk %u does not fit: a chunk's repeat rows (%u instruction, up to %d "
                  "of the previous chunk, the chunk) run after the %u prompt tokens, %lld rows "
                  "where the model's %d positions leave %lld; the largest chunk that fits is %lld",
                  want, n_instr, KVT_KVZIP_TAIL, T, (long long)kvzip_rows(T, n_instr, want),
                  c->seq_len, (long long)room, (long long)fit);
    *chunk = want;
    return KVT_OK;
}

/* one chunk's scores: the repeat rows [T, T + q) have run; tokens [a, b) of the prompt */
static void kvzip_chunk_scores(const kvt_llama2c_state *st, uint32_t T, uint32_t q, uint32_t a,
                               uint32_t b, double *logit, float *score)
{
    const kvt_llama2c_config *c = &st->m->cfg;
    const int D = c->head_dim, Gs = c->n_heads / c->n_kv_heads;
    const uint32_t sink = a < KVT_KVZIP_SINKS ? a : KVT_KVZIP_SINKS, n_ctx = b - a;
    const double scale = 1.0 / sqrt((double)D);
    for (int l = 0; l < c->n_layers; l++) {
        const float *K = kvt_llama2c_state_keys(st, l), *Q = kvt_llama2c_state_queries(st, l);
        for (int g = 0; g < c->n_kv_heads; g++) {
            float *out = score + ((size_t)l * c->n_kv_heads + g) * T;
            for (uint32_t j = a; j < b; j++)
                out[j] = 0.0f;
            for (int u = 0; u < Gs; u++) {
                const int h = g * Gs + u;
                for (uint32_t r = 0; r < q; r++) {
                    const float *qv = Q + (size_t)(T + r) * c->dim + (size_t)h * D;
                    /* the key set: sinks, the chunk, the repeat rows up to r */
                    const uint32_t n = sink + n_ctx + r + 1;
                    double mx = -INFINITY, sum = 0.0;
                    for (uint32_t i = 0; i < n; i++) {
                        const uint32_t t = i < sink           ? i
                                           : i < sink + n_ctx ? a + i - sink
                                                              : T + i - sink - n_ctx;
                        const float *kv = K + (size_t)t * c->kv_dim + (size_t)g * D;
                        double d = 0.0;
                        for (int e = 0; e < D; e++)
                            d += (double)qv[e] * kv[e];
                        logit[i] = d * scale;
                        if (logit[i] > mx)
                            mx = logit[i];
                    }
                    for (uint32_t i = 0; i < n; i++)
                        sum += logit[i] = exp(logit[i] - mx);
                    for (uint32_t i = 0; i < n_ctx; i++) {
                        const float p = (float)(logit[sink + i] / sum);
                        if (p > out[a + i])
                            out[a + i] = p;
                    }
                }
            }
        }
    }
}

/* kvt_llama2c_kvzip, asking keep_going (may be NULL) before each chunk: false stops the pass
   there (*stopped; the state rewound to T, the scores incomplete) */
static kvt_status kvzip_pass(kvt_llama2c_state *st, const int32_t *prompt, uint32_t T,
                             const int32_t *instr, uint32_t n_instr, uint32_t chunk, float *score,
                             bool (*keep_going)(void *, uint32_t), void *user, bool *stopped)
{
    *stopped = false;
    KVT_RETURN_IF(!st || !prompt || !score || (n_instr && !instr) || chunk < 1, KVT_ERR_INVALID_ARG,
                  "kvzip: bad arguments");
    KVT_RETURN_IF(!st->keep_queries || st->n_pos != T, KVT_ERR_INVALID_ARG,
                  "kvzip: the state must keep its queries and have run exactly the %u prompt "
                  "tokens (it ran %u)",
                  T, st->n_pos);
    const kvt_llama2c_config *c = &st->m->cfg;
    uint32_t fit;
    KVT_FORWARD(kvt_llama2c_kvzip_chunk(c, T, n_instr, chunk, &fit));
    KVT_FORWARD(check_ids(instr, n_instr, c->vocab_size, "kvzip instruction"));
    /* a chunk's key set: the sinks, the chunk and the repeat rows, at most seq_len */
    double *logit = kvt_malloc(((size_t)c->seq_len + KVT_KVZIP_SINKS + 1) * sizeof(double));
    KVT_RETURN_IF(!logit, KVT_ERR_NOMEM, "kvzip: out of memory");
    kvt_status s = KVT_OK;
    const float *lg;
    for (uint32_t a = 0; a < T && !s; a += chunk) {
        if (keep_going && !keep_going(user, T)) { /* positions T.. run the repeat input */
            *stopped = true;
            break;
        }
        const uint32_t b = T - a < chunk ? T : a + chunk;
        const uint32_t tail = a ? (chunk < KVT_KVZIP_TAIL ? chunk : KVT_KVZIP_TAIL) : 0;
        for (uint32_t i = 0; i < n_instr && !s; i++)
            s = kvt_llama2c_forward(st, instr[i], &lg);
        for (uint32_t i = a - tail; i < a && !s; i++)
            s = kvt_llama2c_forward(st, prompt[i], &lg);
        for (uint32_t i = a; i < b && !s; i++)
            s = kvt_llama2c_forward(st, prompt[i], &lg);
        if (!s)
            kvzip_chunk_scores(st, T, n_instr + tail + (b - a), a, b, logit, score);
        kvt_status r = kvt_llama2c_state_rewind(st, T);
        if (!s)
            s = r;
    }
    kvt_free(logit);
    return s;
}

kvt_status kvt_llama2c_kvzip(kvt_llama2c_state *st, const int32_t *prompt, uint32_t T,
                             const int32_t *instr, uint32_t n_instr, uint32_t chunk, float *score)
{
    bool stopped;
    return kvzip_pass(st, prompt, T, instr, n_instr, chunk, score, NULL, NULL, &stopped);
}

/* ---- capture ---- */

static void model_name_from_path(const char *path, char *out, size_t cap)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    snprintf(out, cap, "%s", b);
    size_t n = strlen(out);
    if (n > 4 && !strcmp(out + n - 4, ".bin"))
        out[n - 4] = '\0';
    kvt_utf8_sanitize(out); /* the header's JSON holds UTF-8 only: a file named in Latin-1 */
}

/* Submit the prompt of every layer: K, V from the caches ([S, Hkv, D] seen as [Hkv, T, D])
 * and the queries ([S, Hq, D] seen as [Hq, T, D]); strides express the layouts. */
static kvt_status submit_prompt(kvt_capture_session *cap, const kvt_llama2c_state *st, uint32_t T)
{
    const kvt_llama2c_config *c = &st->m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        struct kvt_tensor_view k = {.data = kvt_llama2c_state_keys(st, l),
                                    .dtype = KVT_DTYPE_F32,
                                    .ndim = 3,
                                    .shape = {c->n_kv_heads, T, c->head_dim},
                                    .stride = {c->head_dim, c->kv_dim, 1}};
        struct kvt_tensor_view v = k;
        v.data = kvt_llama2c_state_values(st, l);
        struct kvt_tensor_view q = {.data = kvt_llama2c_state_queries(st, l),
                                    .dtype = KVT_DTYPE_F32,
                                    .ndim = 3,
                                    .shape = {c->n_heads, T, c->head_dim},
                                    .stride = {c->head_dim, c->dim, 1}};
        KVT_FORWARD(kvt_capture_submit_kv(cap, l, 0, &k, &v));
        KVT_FORWARD(kvt_capture_submit_queries(cap, l, 0, &q));
    }
    return KVT_OK;
}

/* Submit decode step g (position T + g) of every layer. */
static kvt_status submit_step(kvt_capture_session *cap, const kvt_llama2c_state *st, uint32_t g,
                              uint32_t pos)
{
    const kvt_llama2c_config *c = &st->m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        const float *q = kvt_llama2c_state_queries(st, l);
        if (st->keep_queries)
            q += (size_t)pos * (size_t)c->dim;
        struct kvt_tensor_view qv, kv, vv;
        kvt_tensor_view_hTd(&qv, q, KVT_DTYPE_F32, c->n_heads, 1, c->head_dim);
        kvt_tensor_view_hTd(&kv, kvt_llama2c_state_keys(st, l) + (size_t)pos * (size_t)c->kv_dim,
                            KVT_DTYPE_F32, c->n_kv_heads, 1, c->head_dim);
        kvt_tensor_view_hTd(&vv, kvt_llama2c_state_values(st, l) + (size_t)pos * (size_t)c->kv_dim,
                            KVT_DTYPE_F32, c->n_kv_heads, 1, c->head_dim);
        KVT_FORWARD(kvt_capture_submit_decode(cap, l, g, &qv, &kv, &vv));
    }
    return KVT_OK;
}

/* Close a session stopped inside the prompt. Nothing replayable was captured (the prompt's
 * records are submitted only once all T positions ran), so the file the session wrote is
 * removed: the new trace, or, replacing an existing trace (writer.force), the temporary next to
 * it, and the existing trace stays as it was. The close's KVT_ERR_STATE (incomplete prompt) is
 * expected; after another close error the file is removed all the same and that error
 * returned, unless the file cannot be removed: that error names the file left behind. */
static kvt_status close_and_discard(kvt_capture_session *cap, struct kvt_capture_stats *stats)
{
    char *file = kvt_strdup(kvt_capture_file(cap)); /* valid only until the close */
    kvt_status s = kvt_capture_close(cap, stats);
    if (s == KVT_ERR_STATE)
        s = KVT_OK;
    if (!file)
        return kvt_error_set(KVT_ERR_NOMEM,
                             "out of memory: the file the interrupted capture wrote is left");
    if (unlink(file) != 0 && errno != ENOENT)
        s = kvt_error_set(KVT_ERR_IO, "interrupted inside the prompt: cannot remove %s: %s", file,
                          strerror(errno));
    kvt_free(file);
    return s;
}

static kvt_status capture_json(const char *model_path, const struct kvt_llama2c_capture_opts *o,
                               uint32_t kvzip_chunk, char *buf, size_t cap)
{
    char file[256];
    model_name_from_path(model_path, file, sizeof(file));
    for (char *p = file; *p; p++) /* keep the JSON simple: no quotes or escapes */
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
            *p = '_';
    int n;
    if (o->prompt_ids)
        n = snprintf(buf, cap,
                     "{\"checkpoint\":\"%s\",\"prompt\":{\"source\":\"ids\"},"
                     "\"decode\":\"greedy\"}",
                     file);
    else
        n = snprintf(buf, cap,
                     "{\"checkpoint\":\"%s\",\"prompt\":{\"source\":\"sampled from BOS\","
                     "\"bos\":%d,\"seed\":%llu,\"temperature\":%.9g},\"decode\":\"greedy\"}",
                     file, KVT_LLAMA2C_BOS, (unsigned long long)o->seed,
                     (double)(o->temperature > 0.0f ? o->temperature : 0.0f));
    KVT_RETURN_IF(n < 0 || (size_t)n >= cap, KVT_ERR_INVALID_ARG, "capture metadata too long");
    if (o->with_kvzip) { /* how the kvzip_score records were made */
        n--;             /* over the closing brace */
        int k = snprintf(buf + n, cap - (size_t)n,
                         ",\"kvzip\":{\"chunk\":%u,\"n_sink\":%d,\"tail\":%d,"
                         "\"instruction_ids\":%u}}",
                         kvzip_chunk, KVT_KVZIP_SINKS, KVT_KVZIP_TAIL, o->kvzip_n_instr);
        KVT_RETURN_IF(k < 0 || (size_t)k >= cap - (size_t)n, KVT_ERR_INVALID_ARG,
                      "capture metadata too long");
    }
    return KVT_OK;
}

kvt_status kvt_llama2c_capture(const char *model_path, const struct kvt_llama2c_capture_opts *o,
                               const char *out_path, struct kvt_llama2c_capture_result *res,
                               bool want_logits)
{
    KVT_RETURN_IF(!model_path || !o || !out_path, KVT_ERR_INVALID_ARG, "null argument");
    if (res)
        memset(res, 0, sizeof(*res));
    kvt_llama2c_model *m = NULL;
    kvt_llama2c_state *st = NULL;
    kvt_capture_session *cap = NULL;
    int32_t *tokens = NULL;
    float *all_logits = NULL;
    kvt_status s = kvt_llama2c_model_open(model_path, &m);
    if (s != KVT_OK)
        return s;
    const kvt_llama2c_config *c = kvt_llama2c_model_config(m);
    uint32_t T = o->n_prompt, G = o->n_decode, V = (uint32_t)c->vocab_size;
    if (T < 1 || T > (uint32_t)c->seq_len || G > (uint32_t)c->seq_len - T) {
        s = kvt_error_set(KVT_ERR_INVALID_ARG,
                          "%u prompt tokens + %u decode steps do not fit the model's context "
                          "of %d (and the prompt needs at least 1 token)",
                          T, G, c->seq_len);
        goto out_free_model;
    }
    if (o->window < 1 || o->window > T) {
        s = kvt_error_set(KVT_ERR_INVALID_ARG, "window %u must be in [1, %u prompt tokens]",
                          o->window, T);
        goto out_free_model;
    }
    if (o->prompt_ids && (s = check_ids(o->prompt_ids, T, c->vocab_size, "prompt")))
        goto out_free_model;
    uint32_t kvzip_chunk = 0; /* the pass's options, checked before anything is written */
    if (o->with_kvzip &&
        ((s = kvt_llama2c_kvzip_chunk(c, T, o->kvzip_n_instr, o->kvzip_chunk, &kvzip_chunk)) ||
         (s = check_ids(o->kvzip_instr, o->kvzip_n_instr, c->vocab_size, "kvzip instruction"))))
        goto out_free_model;
    tokens = kvt_calloc((size_t)T + G + 1, sizeof(int32_t));
    if (want_logits)
        all_logits = kvt_calloc(((size_t)T + G) * V, sizeof(float));
    if (!tokens || (want_logits && !all_logits)) {
        s = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free_tokens;
    }
    s = kvt_llama2c_state_create(m, true, &st);
    if (s != KVT_OK)
        goto out_free_tokens;

    char name[256], cj[512];
    if (o->model_name)
        snprintf(name, sizeof(name), "%s", o->model_name);
    else
        model_name_from_path(model_path, name, sizeof(name));
    s = capture_json(model_path, o, kvzip_chunk, cj, sizeof(cj));
    if (s != KVT_OK)
        goto out_free_state;
    struct kvt_capture_model cm = {
        .name = name,
        .arch = "llama",
        .n_layers = c->n_layers,
        .n_q_heads = c->n_heads,
        .n_kv_heads = c->n_kv_heads,
        .head_dim = c->head_dim,
        .kv_dtype = o->kv_dtype == KVT_DTYPE_INVALID ? KVT_DTYPE_F32 : o->kv_dtype,
        .rope = KVT_ROPE_DEFAULT,
        .rope_theta = KVT_LLAMA2C_ROPE_THETA,
        .rope_pairs = KVT_ROPE_PAIRS_INTERLEAVED,
        .engine_name = "kvtrace-llama2c",
        .engine_version = kvt_version_string(),
        .gpu = NULL,
    };
    struct kvt_capture_opts co = {.n_tokens = T,
                                  .window = o->window,
                                  .n_decode = G,
                                  .with_colsum = o->with_colsum,
                                  .with_q_all = o->with_q_all,
                                  .decode_chunk = o->decode_chunk,
                                  .capture_json = cj,
                                  .writer = o->writer};
    s = kvt_capture_open(out_path, &cm, &co, &cap);
    if (s != KVT_OK)
        goto out_free_state;
    s = kvt_capture_set_timeline_absent(cap, "CPU engine (llama2.c): no GPU activity to time");
    if (s != KVT_OK)
        goto out_close;

    /* prefill: the prompt is either given or sampled as it is run (causal, so the same) */
    kvt_rng rng;
    kvt_rng_seed(&rng, o->seed);
    const float *logits = NULL;
    bool stopped = false;
    uint32_t n_run = 0; /* prompt positions run */
    for (uint32_t p = 0; p < T; p++) {
        if (o->keep_going && !o->keep_going(o->keep_going_user, p)) {
            stopped = true; /* no prompt records: nothing to keep (close_and_discard) */
            goto out_close;
        }
        n_run = p + 1;
        if (o->prompt_ids)
            tokens[p] = o->prompt_ids[p];
        else
            tokens[p] =
                p == 0 ? KVT_LLAMA2C_BOS : kvt_llama2c_sample(logits, (int)V, o->temperature, &rng);
        s = kvt_llama2c_forward(st, tokens[p], &logits);
        if (s != KVT_OK)
            goto out_close;
        if (all_logits)
            memcpy(all_logits + (size_t)p * V, logits, V * sizeof(float));
    }
    int32_t *pos_ids = kvt_malloc((size_t)T * sizeof(int32_t));
    uint8_t *mod = kvt_calloc(T, 1);
    if (!pos_ids || !mod) {
        kvt_free(pos_ids);
        kvt_free(mod);
        s = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_close;
    }
    for (uint32_t p = 0; p < T; p++)
        pos_ids[p] = (int32_t)p;
    s = kvt_capture_set_tokens(cap, tokens, mod, pos_ids, 1);
    kvt_free(pos_ids);
    kvt_free(mod);
    if (s != KVT_OK)
        goto out_close;
    s = submit_prompt(cap, st, T);
    if (s != KVT_OK)
        goto out_close;

    /* greedy decode: step g feeds the argmax of the previous logits at position T + g */
    tokens[T] = kvt_llama2c_argmax(logits, (int)V);
    if (o->with_kvzip) { /* before decoding, which the pass leaves as it was */
        float *kz = kvt_malloc((size_t)c->n_layers * c->n_kv_heads * T * sizeof(float));
        s = kz ? kvzip_pass(st, tokens, T, o->kvzip_instr, o->kvzip_n_instr, kvzip_chunk, kz,
                            o->keep_going, o->keep_going_user, &stopped)
               : kvt_error_set(KVT_ERR_NOMEM, "out of memory (kvzip scores)");
        for (int l = 0; l < c->n_layers && !s && !stopped; l++)
            s = kvt_capture_submit_kvzip(cap, l, kz + (size_t)l * c->n_kv_heads * T);
        kvt_free(kz);
        if (s != KVT_OK)
            goto out_close;
        if (stopped && res) /* the prompt alone: no scores, no decode step */
            res->kvzip_stopped = true;
        if (stopped)
            G = 0;
    }
    for (uint32_t g = 0; g < G; g++) {
        if (o->keep_going && !o->keep_going(o->keep_going_user, T + g)) {
            stopped = true;
            G = g;
            break;
        }
        s = kvt_capture_submit_decode_token(cap, g, tokens[T + g]);
        if (s == KVT_OK)
            s = kvt_llama2c_forward(st, tokens[T + g], &logits);
        if (s == KVT_OK)
            s = submit_step(cap, st, g, T + g);
        if (s != KVT_OK)
            goto out_close;
        if (all_logits)
            memcpy(all_logits + (size_t)(T + g) * V, logits, V * sizeof(float));
        tokens[T + g + 1] = kvt_llama2c_argmax(logits, (int)V);
    }

out_close:
    if (s == KVT_OK && stopped && n_run < T) {
        s = close_and_discard(cap, res ? &res->stats : NULL);
    } else if (s == KVT_OK) {
        s = kvt_capture_close(cap, res ? &res->stats : NULL);
    } else {
        /* keep the first error's message: close only adds the records' loss */
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", kvt_error_msg());
        kvt_status cs = kvt_capture_close(cap, NULL);
        (void)cs;
        kvt_error_set(s, "%s", msg);
    }
    if (s == KVT_OK && res) {
        res->interrupted = stopped;
        res->n_prompt_run = n_run;
        res->tokens = tokens;
        res->n_tokens = n_run < T ? n_run : T + G + 1;
        res->logits = all_logits;
        tokens = NULL;
        all_logits = NULL;
    }
out_free_state:
    kvt_llama2c_state_free(st);
out_free_tokens:
    kvt_free(all_logits);
    kvt_free(tokens);
out_free_model:
    kvt_llama2c_model_close(m);
    return s;
}
