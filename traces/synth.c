/* synth.c - the synthetic trace generator behind `kvtrace synth` (kvt_synth.h). Builds each
 * layer's K, V, window/decode/all queries and causal attention column sums in memory as f32
 * from a per-layer seed, with planted structure (sinks, local/retrieval/semantic heads,
 * near-duplicate key clusters, redundant image spans, heavy values), rounds them to the trace
 * dtype and streams them through the trace writer in layer order. The model and its measured
 * numbers are in traces/SYNTH.md.
 *
 * Units: a key is kscale * (sqrt(D) * sum_u kappa_u * u_hat + noise), where the energies
 * kappa_u^2 and the noise energy of an ordinary token sum to 1. A query component
 * (lambda / (kscale * kappa_u)) * u_hat then adds exactly `lambda` to the logit
 * q.k / sqrt(D) of every key holding kappa_u * u_hat, so the structure is set in logits.
 */
#include "kvt_synth.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

/* ---- the shape table ---- */

static const kvt_synth_shape shapes[] = {
    {"tiny",
     "llama",
     2,
     4,
     2,
     16,
     KVT_SYNTH_ROPE_DEFAULT,
     10000.0,
     {0, 0, 0},
     0.0,
     32000,
     1,
     31999,
     "L2 Hq4 Hkv2 D16, RoPE theta 1e4 (unit tests)"},
    {"tiny-vl",
     "qwen2_vl",
     2,
     4,
     2,
     16,
     KVT_SYNTH_ROPE_MROPE,
     1000000.0,
     {2, 3, 3},
     0.6,
     32000,
     1,
     31999,
     "L2 Hq4 Hkv2 D16, M-RoPE, 60% image tokens (unit tests)"},
    {"llama3-8b",
     "llama",
     32,
     32,
     8,
     128,
     KVT_SYNTH_ROPE_DEFAULT,
     500000.0,
     {0, 0, 0},
     0.0,
     128256,
     128000,
     128255,
     "Llama-3-8B: L32 Hq32 Hkv8 D128, RoPE theta 5e5"},
    {"llama2-7b",
     "llama",
     32,
     32,
     32,
     128,
     KVT_SYNTH_ROPE_DEFAULT,
     10000.0,
     {0, 0, 0},
     0.0,
     32000,
     1,
     31999,
     "Llama-2-7B: L32 Hq32 Hkv32 (MHA) D128, RoPE theta 1e4"},
    {"qwen2-vl-7b",
     "qwen2_vl",
     28,
     28,
     4,
     128,
     KVT_SYNTH_ROPE_MROPE,
     1000000.0,
     {16, 24, 24},
     0.6,
     152064,
     151644,
     151655,
     "Qwen2-VL-7B: L28 Hq28 Hkv4 D128, M-RoPE theta 1e6 sections 16/24/24, 60% image"},
};
#define N_SHAPES (sizeof(shapes) / sizeof(shapes[0]))

size_t kvt_synth_n_shapes(void)
{
    return N_SHAPES;
}

const kvt_synth_shape *kvt_synth_shape_at(size_t i)
{
    return i < N_SHAPES ? &shapes[i] : NULL;
}

const kvt_synth_shape *kvt_synth_shape_find(const char *name)
{
    for (size_t i = 0; name && i < N_SHAPES; i++)
        if (!strcmp(shapes[i].name, name))
            return &shapes[i];
    return NULL;
}

const char *kvt_synth_shape_names(void)
{
    return "tiny, tiny-vl, llama3-8b, llama2-7b, qwen2-vl-7b";
}

const char *kvt_synth_role_name(int role)
{
    static const char *const names[] = {"local", "retrieval", "sink", "semantic"};
    return role >= 0 && role < 4 ? names[role] : "?";
}

/* ---- options ---- */

void kvt_synth_opts_init(kvt_synth_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->n_decode = 16;
    o->image_frac = -1.0;
    o->seed = 1;
    o->dtype = KVT_DTYPE_BF16;
    o->colsum = KVT_SYNTH_AUTO;
}

kvt_status kvt_synth_opts_resolve(const kvt_synth_opts *o, kvt_synth_opts *out,
                                  const kvt_synth_shape **shape)
{
    KVT_RETURN_IF(!o || !out, KVT_ERR_INVALID_ARG, "synth: NULL options");
    KVT_RETURN_IF(!o->shape, KVT_ERR_INVALID_ARG, "synth: no shape (valid: %s)",
                  kvt_synth_shape_names());
    const kvt_synth_shape *sh = kvt_synth_shape_find(o->shape);
    KVT_RETURN_IF(!sh, KVT_ERR_INVALID_ARG, "unknown shape '%s' (valid: %s)", o->shape,
                  kvt_synth_shape_names());
    KVT_RETURN_IF(o->n_tokens == 0, KVT_ERR_INVALID_ARG, "tokens must be at least 1");
    KVT_RETURN_IF(o->n_tokens > KVT_SYNTH_MAX_TOKENS, KVT_ERR_INVALID_ARG,
                  "tokens %u is more than the maximum %u", o->n_tokens, KVT_SYNTH_MAX_TOKENS);
    KVT_RETURN_IF(o->window > o->n_tokens, KVT_ERR_INVALID_ARG,
                  "window W=%u is larger than tokens T=%u", o->window, o->n_tokens);
    KVT_RETURN_IF(o->n_decode > KVT_SYNTH_MAX_DECODE, KVT_ERR_INVALID_ARG,
                  "decode %u is more than the maximum %u", o->n_decode, KVT_SYNTH_MAX_DECODE);
    KVT_RETURN_IF(o->image_frac != o->image_frac || o->image_frac >= 1.0, KVT_ERR_INVALID_ARG,
                  "image fraction must be in [0, 1) (got %g)", o->image_frac);
    kvt_dtype dt = o->dtype == KVT_DTYPE_INVALID ? KVT_DTYPE_BF16 : o->dtype;
    KVT_RETURN_IF(dt != KVT_DTYPE_F16 && dt != KVT_DTYPE_BF16 && dt != KVT_DTYPE_F32,
                  KVT_ERR_INVALID_ARG, "dtype must be f16, bf16 or f32");
    KVT_RETURN_IF(o->colsum != KVT_SYNTH_AUTO && o->colsum != KVT_SYNTH_ON &&
                      o->colsum != KVT_SYNTH_OFF,
                  KVT_ERR_INVALID_ARG, "colsum must be auto, on or off");
    KVT_RETURN_IF(o->n_threads < 0 || o->n_threads > 1024, KVT_ERR_INVALID_ARG,
                  "threads must be in [0, 1024]");
    KVT_RETURN_IF(o->n_layers < 0 || o->n_layers > sh->n_layers, KVT_ERR_INVALID_ARG,
                  "layers %d: shape '%s' has %d (want 1..%d)", o->n_layers, sh->name, sh->n_layers,
                  sh->n_layers);
    kvt_synth_opts r = *o;
    if (r.n_layers == 0)
        r.n_layers = sh->n_layers;
    if (r.window == 0)
        r.window = r.n_tokens < 32 ? r.n_tokens : 32;
    r.dtype = dt;
    if (r.image_frac < 0)
        r.image_frac = sh->image_frac;
    if (r.colsum == KVT_SYNTH_AUTO)
        r.colsum = r.n_tokens <= KVT_SYNTH_COLSUM_AUTO_MAX_T ? KVT_SYNTH_ON : KVT_SYNTH_OFF;
    if (r.n_threads == 0)
        r.n_threads = 1;
    *out = r;
    if (shape)
        *shape = sh;
    return KVT_OK;
}

kvt_status kvt_synth_raw_bytes(const kvt_synth_opts *o, uint64_t *out)
{
    kvt_synth_opts r;
    const kvt_synth_shape *sh;
    KVT_FORWARD(kvt_synth_opts_resolve(o, &r, &sh));
    uint64_t T = r.n_tokens, W = r.window, G = r.n_decode, D = (uint64_t)sh->head_dim;
    uint64_t Hq = (uint64_t)sh->n_q_heads, Hkv = (uint64_t)sh->n_kv_heads;
    uint64_t es = kvt_dtype_size(r.dtype);
    uint64_t npos = sh->rope == KVT_SYNTH_ROPE_MROPE ? 3 : 1;
    uint64_t per_layer = (2 * Hkv * T * D + Hq * W * D + Hq * G * D + 2 * Hkv * G * D) * es;
    if (r.colsum == KVT_SYNTH_ON)
        per_layer += Hq * T * 4;
    if (r.q_all)
        per_layer += Hq * T * D * es;
    *out = per_layer * (uint64_t)r.n_layers + T * (4 + 1 + 4 * npos) + G * 4;
    return KVT_OK;
}

/* ---- deterministic randomness: independent streams from (seed, tag, indices) ---- */

static uint64_t mix64(uint64_t a, uint64_t b)
{
    uint64_t z = a ^ (b * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull + (a << 6) + (a >> 2));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

enum {
    TAG_TOKENS = 1,
    TAG_LAYER,
    TAG_PLAN,
    TAG_DIRS,
    TAG_KEYS,
    TAG_VALUES,
    TAG_QUERY,
    TAG_DECODE_Q,
    TAG_DECODE_KV,
};

static uint64_t stream_seed(uint64_t base, uint64_t tag, uint64_t i, uint64_t j)
{
    return mix64(mix64(mix64(base, tag), i), j);
}

/* Normal deviates by Marsaglia's polar method (both values used; no trig). */
typedef struct nrng {
    kvt_rng r;
    bool has_spare;
    double spare;
} nrng;

static void nrng_seed(nrng *g, uint64_t seed)
{
    kvt_rng_seed(&g->r, seed);
    g->has_spare = false;
}

static double nrng_uniform(nrng *g)
{
    return kvt_rng_uniform(&g->r);
}

static uint32_t nrng_below(nrng *g, uint32_t n)
{
    return (uint32_t)((kvt_rng_u64(&g->r) >> 32) * (uint64_t)n >> 32);
}

static double nrng_normal(nrng *g)
{
    if (g->has_spare) {
        g->has_spare = false;
        return g->spare;
    }
    double u, v, s;
    do {
        u = 2.0 * kvt_rng_uniform(&g->r) - 1.0;
        v = 2.0 * kvt_rng_uniform(&g->r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    double f = sqrt(-2.0 * log(s) / s);
    g->spare = v * f;
    g->has_spare = true;
    return u * f;
}

/* ---- token tables ---- */

#define N_SINKS_MAX  4u
#define IMAGE_OFFSET 11u /* text tokens between the sinks and the image (system prompt...) */
#define TEXT_RUN_MAX 6u  /* near-duplicate text runs are 1..6 tokens long */
#define IMAGE_REGION 3u  /* image clusters are laid on 3x3-patch regions */

kvt_status kvt_synth_tokens_create(const kvt_synth_opts *opts, kvt_synth_tokens **out)
{
    kvt_synth_opts o;
    const kvt_synth_shape *sh;
    KVT_RETURN_IF(!out, KVT_ERR_INVALID_ARG, "synth: NULL out");
    *out = NULL;
    KVT_FORWARD(kvt_synth_opts_resolve(opts, &o, &sh));
    uint32_t T = o.n_tokens, G = o.n_decode, W = o.window;
    int P = sh->rope == KVT_SYNTH_ROPE_MROPE ? 3 : 1;
    kvt_synth_tokens *t = kvt_calloc(1, sizeof(*t));
    if (!t)
        return kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (tokens)");
    t->n_tokens = T;
    t->n_decode = G;
    t->n_pos = P;
    t->token_ids = kvt_malloc((size_t)T * sizeof(int32_t));
    t->modality = kvt_calloc(T, 1);
    t->positions = kvt_malloc((size_t)P * T * sizeof(int32_t));
    if (G) {
        t->decode_token_ids = kvt_malloc((size_t)G * sizeof(int32_t));
        t->decode_positions = kvt_malloc((size_t)P * G * sizeof(int32_t));
    }
    if (!t->token_ids || !t->modality || !t->positions ||
        (G && (!t->decode_token_ids || !t->decode_positions))) {
        kvt_synth_tokens_free(t);
        return kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (tokens)");
    }

    t->n_sinks = T < N_SINKS_MAX ? T : N_SINKS_MAX;
    /* The image sits in the prefix, after a short text preamble, never in the window. */
    uint32_t ib = t->n_sinks + IMAGE_OFFSET;
    uint32_t avail = T > W + ib ? T - W - ib : 0;
    double want = floor(o.image_frac * (double)T + 0.5);
    uint32_t n_img = want < (double)avail ? (uint32_t)want : avail;
    t->image_begin = n_img ? ib : 0;
    t->image_end = n_img ? ib + n_img : 0;
    if (n_img) {
        t->grid_w = (uint32_t)ceil(sqrt((double)n_img));
        t->grid_h = (n_img + t->grid_w - 1) / t->grid_w;
    }

    nrng g;
    nrng_seed(&g, stream_seed(o.seed, TAG_TOKENS, 0, 0));
    int32_t pos = 0;
    for (uint32_t i = 0; i < T; i++) {
        bool img = i >= t->image_begin && i < t->image_end;
        t->modality[i] = img ? KVT_MOD_IMAGE : KVT_MOD_TEXT;
        int32_t id = (int32_t)nrng_below(&g, (uint32_t)sh->vocab);
        t->token_ids[i] = i == 0 ? sh->bos_id : img ? sh->image_token_id : id;
        if (!img || P == 1) {
            for (int p = 0; p < P; p++)
                t->positions[(size_t)p * T + i] = P == 1 ? (int32_t)i : pos;
            pos++;
            continue;
        }
        /* M-RoPE image token k of the grid: t fixed, h = row, w = column (Qwen2-VL) */
        uint32_t k = i - t->image_begin;
        int32_t s = pos - (int32_t)k; /* position of the first image token */
        t->positions[i] = s;
        t->positions[(size_t)T + i] = s + (int32_t)(k / t->grid_w);
        t->positions[(size_t)2 * T + i] = s + (int32_t)(k % t->grid_w);
        pos++;
        if (i + 1 == t->image_end) /* text resumes after the largest image position */
            pos = s + (int32_t)(t->grid_h > t->grid_w ? t->grid_h : t->grid_w);
    }
    int32_t next = T ? t->positions[T - 1] + 1 : 0; /* the last prompt token is text */
    if (P == 1)
        next = (int32_t)T;
    for (uint32_t i = 0; i < G; i++) {
        t->decode_token_ids[i] = (int32_t)nrng_below(&g, (uint32_t)sh->vocab);
        for (int p = 0; p < P; p++)
            t->decode_positions[(size_t)p * G + i] = next + (int32_t)i;
    }
    *out = t;
    return KVT_OK;
}

void kvt_synth_tokens_free(kvt_synth_tokens *t)
{
    if (!t)
        return;
    kvt_free(t->token_ids);
    kvt_free(t->modality);
    kvt_free(t->positions);
    kvt_free(t->decode_token_ids);
    kvt_free(t->decode_positions);
    kvt_free(t);
}

/* ---- the per-layer plan: scalars (cheap, also go to the JSON header) ---- */

#define N_TEXT_CLU 24 /* text key clusters per KV head */
#define N_IMG_CLU  8  /* image key clusters per KV head */
/* key energy split of the non-shared part R = 1 - rho of an ordinary token */
#define CARRIER_SHARE 0.30 /* rotary positional carrier (makes local heads local) */
#define IMAGE_SHARE   0.30 /* image-modality direction shared by all image tokens */
#define CLUSTER_SHARE 0.95 /* of the rest, for a cluster member (the rest is noise) */
#define CARRIER_NOISE 0.35 /* key noise std in the carrier band, relative (content: more) */
#define LOCAL_FAR_STD 1.2  /* cap on a local head's logit noise from far tokens' carrier */
#define SINK_GAMMA0   2.5  /* sink component of token 0 (tokens 1..3: SINK_GAMMA1) */
#define SINK_GAMMA1   1.0
#define NEEDLE_ETA    1.5 /* needle component of a needle token */
#define Q_BIAS        1.0 /* logit std of a head's persistent query preference */
#define Q_NOISE       0.7 /* logit std of per-query noise */
#define Q_DRIFT       0.6 /* logit std of a head's decode-only drift */
#define DECODE_JITTER 0.2 /* relative jitter of needle strengths across decode steps */

enum { DIR_MEAN = 0, DIR_SINK, DIR_IMAGE, DIR_CARRIER, DIR_NEEDLE };
#define DIR_CLU (DIR_NEEDLE + KVT_SYNTH_MAX_NEEDLES)
#define N_DIRS  (DIR_CLU + N_TEXT_CLU + N_IMG_CLU)

typedef struct q_plan {
    int role;
    double lam_sink, lam_loc, lam_img, lam_clu;
    double lam_needle[KVT_SYNTH_MAX_NEEDLES];
    int clu; /* targeted cluster (0..N_TEXT_CLU+N_IMG_CLU-1) or -1 */
} q_plan;

typedef struct kv_plan {
    double rho;                   /* energy of the shared mean direction = designed redundancy */
    double share_text, share_img; /* chance a text run / image region is a near-duplicate */
} kv_plan;

typedef struct layer_scalars {
    uint32_t n_needles;
    uint32_t needle[KVT_SYNTH_MAX_NEEDLES];
    double kscale, vscale;
    kv_plan *kv; /* [Hkv] */
    q_plan *q;   /* [Hq] */
} layer_scalars;

static void scalars_free(layer_scalars *s)
{
    kvt_free(s->kv);
    kvt_free(s->q);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static kvt_status scalars_create(const kvt_synth_opts *o, const kvt_synth_shape *sh,
                                 const kvt_synth_tokens *tok, int layer, layer_scalars *s)
{
    const int Hq = sh->n_q_heads, Hkv = sh->n_kv_heads;
    const uint32_t T = o->n_tokens, W = o->window;
    memset(s, 0, sizeof(*s));
    s->kv = kvt_calloc((size_t)Hkv, sizeof(*s->kv));
    s->q = kvt_calloc((size_t)Hq, sizeof(*s->q));
    if (!s->kv || !s->q) {
        scalars_free(s);
        return kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (plan)");
    }
    nrng g;
    nrng_seed(&g, stream_seed(o->seed, TAG_PLAN, (uint64_t)layer, 0));
    s->kscale = 0.8 + 0.8 * nrng_uniform(&g);
    s->vscale = 0.3 + 0.7 * nrng_uniform(&g);

    /* Needles: distant prefix tokens, away from the sinks and at least 64 tokens before the
     * window (16 in short prompts), out of reach of the local heads. */
    uint32_t lo = tok->n_sinks + 4, hi = T > W + 16 ? T - W - 16 : 0;
    if (T > W + 64 && T - W - 64 >= lo + 64)
        hi = T - W - 64;
    uint32_t want = T / 512 < 2                       ? 2
                    : T / 512 > KVT_SYNTH_MAX_NEEDLES ? KVT_SYNTH_MAX_NEEDLES
                                                      : T / 512;
    uint32_t span = hi > lo ? hi - lo : 0;
    s->n_needles = span / 8 < want ? span / 8 : want;
    for (uint32_t n = 0; n < s->n_needles; n++) {
        uint32_t c;
        bool dup;
        do { /* distinct: span >= 8 * n_needles, so this ends quickly */
            c = lo + nrng_below(&g, span);
            dup = false;
            for (uint32_t m = 0; m < n; m++)
                dup |= s->needle[m] == c;
        } while (dup);
        s->needle[n] = c;
    }
    qsort(s->needle, s->n_needles, sizeof(uint32_t), cmp_u32);

    /* Redundancy: spread over [0.08, 0.92] across the KV heads of every layer, in a random
     * order, so each layer has highly redundant heads and barely redundant ones. */
    int perm[1024];
    for (int i = 0; i < Hkv; i++)
        perm[i] = i;
    for (int i = Hkv - 1; i > 0; i--) {
        int j = (int)nrng_below(&g, (uint32_t)i + 1), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    for (int k = 0; k < Hkv; k++) {
        double x = Hkv > 1 ? (double)perm[k] / (Hkv - 1) + 0.1 * (nrng_uniform(&g) - 0.5)
                           : nrng_uniform(&g);
        x = x < 0 ? 0 : x > 1 ? 1 : x;
        s->kv[k].rho = 0.08 + 0.84 * x;
        s->kv[k].share_text = 0.05 + 0.35 * x;
        s->kv[k].share_img = 0.35 + 0.5 * x;
    }

    const double lnT = log(T < 2 ? 2.0 : (double)T);
    const double lnN = log(s->n_needles ? (double)s->n_needles : 1.0);
    const bool has_img = tok->image_end > tok->image_begin;
    for (int h = 0; h < Hq; h++) {
        q_plan *q = &s->q[h];
        q->role = (h + layer) % 4;
        q->lam_sink = lnT + (q->role == KVT_SYNTH_ROLE_SINK ? 1.0 + nrng_uniform(&g)
                                                            : -3.0 + 2.5 * nrng_uniform(&g));
        q->lam_loc = q->role == KVT_SYNTH_ROLE_LOCAL ? 6.0 + 2.0 * nrng_uniform(&g)
                                                     : 0.5 + 1.5 * nrng_uniform(&g);
        /* Far from the query the NC rotated carrier pairs leave a logit noise of std
         * lam_loc / sqrt(2 NC): cap it (small head dims have few pairs). */
        double cap = LOCAL_FAR_STD * sqrt(2.0 * (sh->head_dim / 4 > 0 ? sh->head_dim / 4 : 1));
        q->lam_loc = q->lam_loc < cap ? q->lam_loc : cap;
        for (uint32_t n = 0; n < s->n_needles; n++)
            q->lam_needle[n] = q->role == KVT_SYNTH_ROLE_RETRIEVAL
                                   ? lnT - lnN + 1.0 + 1.5 * nrng_uniform(&g)
                                   : -1.0 + 2.5 * nrng_uniform(&g);
        bool visual = (h * 5 + layer * 3) % 3 == 0;
        double u = nrng_uniform(&g);
        q->lam_img = !has_img ? 0.0 : visual ? 1.0 + 1.5 * u : -1.0 + 1.5 * u;
        q->clu = -1;
        u = nrng_uniform(&g);
        uint32_t c = nrng_below(&g, N_TEXT_CLU), ci = nrng_below(&g, N_IMG_CLU);
        if (q->role == KVT_SYNTH_ROLE_SEMANTIC) {
            q->lam_clu = 2.5 + 1.5 * u;
            q->clu = has_img && (c & 1) ? (int)(N_TEXT_CLU + ci) : (int)c;
        }
    }
    return KVT_OK;
}

/* ---- the per-layer plan: direction vectors and rotary tables ---- */

typedef struct layer_gen {
    const kvt_synth_opts *o;
    const kvt_synth_shape *sh;
    const kvt_synth_tokens *tok;
    int layer;
    int D, NC; /* head dim; rotary pairs [0, NC) carry the positional carrier */
    layer_scalars s;
    float *dirs;   /* [Hkv, N_DIRS, D] unit vectors (the carrier before rotation) */
    float *vclu;   /* [Hkv, N_TEXT_CLU + N_IMG_CLU, D] value cluster centres */
    float *chan;   /* [Hkv, D] per-channel noise scale (mean square 1) */
    float *qbias;  /* [Hq, D] persistent query preference, structure removed */
    float *qdrift; /* [Hq, D] decode-only drift, structure removed */
    float *rot;    /* [T + G, NC, 2] cos, sin of each token's carrier angles */
    int16_t *clu;  /* [Hkv, T] cluster of each key, -1 for none */
} layer_gen;

static bool in_content_band(int d, int D, int NC)
{
    return d % (D / 2) >= NC;
}

static double dot(const float *a, const float *b, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

/* Remove from x its components along the unit vectors u[0..n), then normalise; false if
 * nothing is left (the band is full), in which case x is only normalised. */
static bool orth_normalize(float *x, const float *const *u, int n, int D)
{
    float keep[1024];
    memcpy(keep, x, (size_t)D * sizeof(float));
    for (int k = 0; k < n; k++) {
        double c = dot(x, u[k], D);
        for (int d = 0; d < D; d++)
            x[d] -= (float)(c * u[k][d]);
    }
    double nn = sqrt(dot(x, x, D));
    double n0 = sqrt(dot(keep, keep, D));
    bool ok = nn > 1e-3 * n0;
    if (!ok) {
        memcpy(x, keep, (size_t)D * sizeof(float));
        nn = n0;
    }
    for (int d = 0; d < D; d++)
        x[d] = nn > 0 ? (float)(x[d] / nn) : 0.0f;
    return ok;
}

static void random_band(nrng *g, float *x, int D, int NC, bool content)
{
    for (int d = 0; d < D; d++)
        x[d] = in_content_band(d, D, NC) == content ? (float)nrng_normal(g) : 0.0f;
}

static void plan_dirs(layer_gen *L, int kv)
{
    const int D = L->D, NC = L->NC;
    float *dir = L->dirs + (size_t)kv * N_DIRS * D;
    nrng g;
    nrng_seed(&g, stream_seed(L->o->seed, TAG_DIRS, (uint64_t)L->layer, (uint64_t)kv));
    const float *basis[3 + KVT_SYNTH_MAX_NEEDLES];

    /* the shared mean: a few outlier channels hold about half of its energy */
    float *m = dir + (size_t)DIR_MEAN * D;
    random_band(&g, m, D, NC, true);
    int n_content = D - 2 * NC;
    for (int k = 0; k < 2 && n_content > 0; k++) {
        int c = (int)nrng_below(&g, (uint32_t)n_content); /* c-th content channel */
        for (int d = 0; d < D; d++)
            if (in_content_band(d, D, NC) && c-- == 0) {
                m[d] += (float)((nrng_uniform(&g) < 0.5 ? -1 : 1) * sqrt(n_content / 2.0));
                break;
            }
    }
    orth_normalize(m, basis, 0, D);
    basis[0] = m;
    for (int k = DIR_SINK; k <= DIR_IMAGE; k++) {
        float *x = dir + (size_t)k * D;
        random_band(&g, x, D, NC, true);
        orth_normalize(x, basis, k, D);
        basis[k] = x;
    }
    /* the carrier: equal energy in every carrier pair, random phase, so that far from the
     * query the rotated pairs average out as fast as NC pairs allow */
    float *car = dir + (size_t)DIR_CARRIER * D;
    random_band(&g, car, D, NC, NC == 0); /* with no carrier band (D < 4), a content vector */
    for (int p = 0; p < NC; p++) {
        double ph = 6.283185307179586 * nrng_uniform(&g);
        car[p] = (float)cos(ph);
        car[p + D / 2] = (float)sin(ph);
    }
    orth_normalize(car, basis, 0, D);
    int nb = 3;
    for (int n = 0; n < KVT_SYNTH_MAX_NEEDLES; n++) {
        float *x = dir + (size_t)(DIR_NEEDLE + n) * D;
        random_band(&g, x, D, NC, true);
        if (orth_normalize(x, basis, nb, D))
            basis[nb++] = x;
    }
    for (int c = 0; c < N_TEXT_CLU + N_IMG_CLU; c++) {
        float *x = dir + (size_t)(DIR_CLU + c) * D;
        random_band(&g, x, D, NC, true);
        orth_normalize(x, basis, 3, D);
    }
    float *vc = L->vclu + (size_t)kv * (N_TEXT_CLU + N_IMG_CLU) * D;
    for (size_t i = 0; i < (size_t)(N_TEXT_CLU + N_IMG_CLU) * D; i++)
        vc[i] = (float)nrng_normal(&g);
    float *ch = L->chan + (size_t)kv * D;
    double ms = 0;
    for (int d = 0; d < D; d++) {
        ch[d] = (float)exp(0.3 * nrng_normal(&g));
        ms += (double)ch[d] * ch[d];
    }
    ms = sqrt(ms / D);
    for (int d = 0; d < D; d++)
        ch[d] = (float)(ch[d] / ms);
}

/* Remove the sink, image and needle directions of KV head kv from x (query noise must not
 * shift the planted logits). */
static void remove_structure(const layer_gen *L, int kv, float *x)
{
    const int D = L->D;
    const float *dir = L->dirs + (size_t)kv * N_DIRS * D;
    for (int k = DIR_SINK; k < DIR_NEEDLE + (int)L->s.n_needles; k++) {
        if (k == DIR_CARRIER)
            continue;
        const float *u = dir + (size_t)k * D;
        double c = dot(x, u, D);
        for (int d = 0; d < D; d++)
            x[d] -= (float)(c * u[d]);
    }
}

/* cos/sin of the carrier angles of every prompt and decode token. Pair p rotates by
 * pos * theta^(-2p/D); with M-RoPE the position is the t, h or w id of p's section. */
static void plan_rotary(layer_gen *L)
{
    const kvt_synth_tokens *tok = L->tok;
    const uint32_t T = tok->n_tokens, G = tok->n_decode;
    const int D = L->D, NC = L->NC;
    for (uint32_t i = 0; i < T + G; i++) {
        const int32_t *pos = i < T ? tok->positions + i : tok->decode_positions + (i - T);
        size_t stride = i < T ? T : G;
        for (int p = 0; p < NC; p++) {
            int sec = 0;
            if (L->sh->rope == KVT_SYNTH_ROPE_MROPE)
                sec = p < L->sh->mrope_section[0]                             ? 0
                      : p < L->sh->mrope_section[0] + L->sh->mrope_section[1] ? 1
                                                                              : 2;
            double a =
                (double)pos[(size_t)sec * stride] * pow(L->sh->rope_theta, -2.0 * p / (double)D);
            L->rot[((size_t)i * NC + p) * 2] = (float)cos(a);
            L->rot[((size_t)i * NC + p) * 2 + 1] = (float)sin(a);
        }
    }
}

/* x += c * (carrier of KV head kv rotated to token i's position), rotate_half pairing */
static void add_carrier(const layer_gen *L, int kv, uint32_t i, double c, float *x)
{
    const int D = L->D, NC = L->NC;
    const float *h = L->dirs + ((size_t)kv * N_DIRS + DIR_CARRIER) * D;
    const float *cs = L->rot + (size_t)i * NC * 2;
    if (NC == 0) {
        for (int d = 0; d < D; d++)
            x[d] += (float)(c * h[d]);
        return;
    }
    for (int p = 0; p < NC; p++) {
        double a = h[p], b = h[p + D / 2], co = cs[2 * p], si = cs[2 * p + 1];
        x[p] += (float)(c * (a * co - b * si));
        x[p + D / 2] += (float)(c * (a * si + b * co));
    }
}

static void layer_gen_free(layer_gen *L)
{
    scalars_free(&L->s);
    kvt_free(L->dirs);
    kvt_free(L->vclu);
    kvt_free(L->chan);
    kvt_free(L->qbias);
    kvt_free(L->qdrift);
    kvt_free(L->rot);
    kvt_free(L->clu);
}

static void *alloc_floats(size_t a, size_t b, size_t c, bool *fail)
{
    size_t n;
    if (kvt_mul_overflow(a, b, &n) || kvt_mul_overflow(n, c, &n) ||
        kvt_mul_overflow(n, sizeof(float), &n)) {
        *fail = true;
        return NULL;
    }
    void *p = kvt_malloc(n ? n : 1);
    *fail |= !p;
    return p;
}

static kvt_status assign_clusters(const layer_gen *L, int kv, nrng *g)
{
    const kvt_synth_tokens *tok = L->tok;
    const uint32_t T = tok->n_tokens;
    const kv_plan *kp = &L->s.kv[kv];
    int16_t *clu = L->clu + (size_t)kv * T;
    for (uint32_t i = 0; i < T;) {
        if (tok->modality[i] == KVT_MOD_IMAGE) {
            i++;
            continue;
        }
        uint32_t run = 1 + nrng_below(g, TEXT_RUN_MAX);
        bool member = nrng_uniform(g) < kp->share_text;
        int16_t c = (int16_t)nrng_below(g, N_TEXT_CLU);
        for (uint32_t k = 0; k < run && i < T && tok->modality[i] != KVT_MOD_IMAGE; k++, i++)
            clu[i] = member ? c : -1;
    }
    if (tok->image_end > tok->image_begin) {
        /* regions of IMAGE_REGION x IMAGE_REGION patches: near-duplicate or detailed */
        uint32_t rw = (tok->grid_w + IMAGE_REGION - 1) / IMAGE_REGION;
        uint32_t rh = (tok->grid_h + IMAGE_REGION - 1) / IMAGE_REGION;
        int16_t *region = kvt_malloc((size_t)rw * rh * sizeof(int16_t));
        if (!region)
            return kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (image regions)");
        for (uint32_t r = 0; r < rw * rh; r++) {
            bool member = nrng_uniform(g) < kp->share_img;
            int16_t c = (int16_t)(N_TEXT_CLU + nrng_below(g, N_IMG_CLU));
            region[r] = member ? c : -1;
        }
        for (uint32_t i = tok->image_begin; i < tok->image_end; i++) {
            uint32_t k = i - tok->image_begin, row = k / tok->grid_w, col = k % tok->grid_w;
            clu[i] = region[(row / IMAGE_REGION) * rw + col / IMAGE_REGION];
        }
        kvt_free(region);
    }
    for (uint32_t i = 0; i < tok->n_sinks; i++)
        clu[i] = -1;
    for (uint32_t n = 0; n < L->s.n_needles; n++)
        clu[L->s.needle[n]] = -1;
    return KVT_OK;
}

static int needle_of(const layer_gen *L, uint32_t i)
{
    for (uint32_t n = 0; n < L->s.n_needles; n++)
        if (L->s.needle[n] == i)
            return (int)n;
    return -1;
}

/* One key (row of K or K_decode) of KV head kv for token i (i >= T: decode step i - T). */
static void gen_key(const layer_gen *L, int kv, uint32_t i, nrng *g, float *out)
{
    const int D = L->D;
    const uint32_t T = L->tok->n_tokens;
    const kv_plan *kp = &L->s.kv[kv];
    const float *dir = L->dirs + (size_t)kv * N_DIRS * D;
    const float *ch = L->chan + (size_t)kv * D;
    const double R = 1.0 - kp->rho, sD = sqrt((double)D);
    bool img = i < T && L->tok->modality[i] == KVT_MOD_IMAGE;
    int c = i < T ? L->clu[(size_t)kv * T + i] : -1;
    double e_img = img ? IMAGE_SHARE * R : 0.0;
    double rest = R - CARRIER_SHARE * R - e_img;
    double e_clu = c >= 0 ? CLUSTER_SHARE * rest : 0.0, e_noise = rest - e_clu;
    /* noise is quieter in the carrier band (as high-frequency rotary dims are in real
     * models), so that local heads' recency is not drowned; mean square stays 1 */
    const double sn = sqrt(e_noise), lo = CARRIER_NOISE, hi = sqrt(2.0 - lo * lo);
    for (int d = 0; d < D; d++)
        out[d] = (float)(sn * ch[d] * (L->NC && !in_content_band(d, D, L->NC) ? lo : hi) *
                         nrng_normal(g));
    double w_mean = sD * sqrt(kp->rho), w_img = sD * sqrt(e_img), w_clu = sD * sqrt(e_clu);
    const float *m = dir + (size_t)DIR_MEAN * D, *im = dir + (size_t)DIR_IMAGE * D;
    const float *cv = c >= 0 ? dir + (size_t)(DIR_CLU + c) * D : m;
    for (int d = 0; d < D; d++)
        out[d] += (float)(w_mean * m[d] + w_img * im[d] + w_clu * cv[d] * (c >= 0));
    add_carrier(L, kv, i, sD * sqrt(CARRIER_SHARE * R), out);
    if (i < L->tok->n_sinks) {
        double gam = sD * (i == 0 ? SINK_GAMMA0 : SINK_GAMMA1);
        const float *sk = dir + (size_t)DIR_SINK * D;
        for (int d = 0; d < D; d++)
            out[d] += (float)(gam * sk[d]);
    }
    int n = i < T ? needle_of(L, i) : -1;
    if (n >= 0) {
        const float *nv = dir + (size_t)(DIR_NEEDLE + n) * D;
        for (int d = 0; d < D; d++)
            out[d] += (float)(sD * NEEDLE_ETA * nv[d]);
    }
    for (int d = 0; d < D; d++)
        out[d] = (float)(out[d] * L->s.kscale);
}

/* One value row of KV head kv for token i: sinks tiny, needles and a few others heavy. */
static void gen_value(const layer_gen *L, int kv, uint32_t i, nrng *g, float *out)
{
    const int D = L->D;
    const uint32_t T = L->tok->n_tokens;
    const float *ch = L->chan + (size_t)kv * D;
    int c = i < T ? L->clu[(size_t)kv * T + i] : -1;
    double norm = exp(0.25 * nrng_normal(g));
    double heavy = nrng_uniform(g);
    if (i < L->tok->n_sinks)
        norm = 0.15;
    else if (i < T && needle_of(L, i) >= 0)
        norm = 3.0;
    else if (heavy < 0.03)
        norm = 2.5 + 50.0 * heavy; /* 2.5 .. 4 */
    const float *vc = L->vclu + ((size_t)kv * (N_TEXT_CLU + N_IMG_CLU) + (c >= 0 ? c : 0)) * D;
    double a = c >= 0 ? 0.8 : 0.0, b = c >= 0 ? 0.6 : 1.0;
    for (int d = 0; d < D; d++)
        out[d] = (float)(L->s.vscale * norm * (a * vc[d] + b * ch[d] * nrng_normal(g)));
}

/* One query of head h at prompt token i (i < T) or decode step i - T. */
static void gen_query(const layer_gen *L, int h, uint32_t i, float *out)
{
    const int D = L->D, Hq = L->sh->n_q_heads, Hkv = L->sh->n_kv_heads;
    const uint32_t T = L->tok->n_tokens;
    const int kv = h / (Hq / Hkv);
    const bool decode = i >= T;
    const kv_plan *kp = &L->s.kv[kv];
    const q_plan *qp = &L->s.q[h];
    const float *dir = L->dirs + (size_t)kv * N_DIRS * D;
    const double R = 1.0 - kp->rho, S = L->s.kscale;
    nrng g;
    nrng_seed(&g, stream_seed(L->o->seed, decode ? TAG_DECODE_Q : TAG_QUERY,
                              (uint64_t)L->layer * 65536 + (uint64_t)h, decode ? i - T : i));
    for (int d = 0; d < D; d++)
        out[d] = (float)(Q_NOISE * nrng_normal(&g));
    remove_structure(L, kv, out);
    const float *bias = L->qbias + (size_t)h * D, *drift = L->qdrift + (size_t)h * D;
    for (int d = 0; d < D; d++)
        out[d] += bias[d] + (decode ? drift[d] : 0.0f);
    /* planted logits: lambda / kappa along each structural direction */
    const float *sk = dir + (size_t)DIR_SINK * D;
    for (int d = 0; d < D; d++)
        out[d] += (float)(qp->lam_sink / SINK_GAMMA0 * sk[d]);
    for (uint32_t n = 0; n < L->s.n_needles; n++) {
        double lam = qp->lam_needle[n];
        if (decode)
            lam *= 1.0 + DECODE_JITTER * nrng_normal(&g);
        const float *nv = dir + (size_t)(DIR_NEEDLE + n) * D;
        for (int d = 0; d < D; d++)
            out[d] += (float)(lam / NEEDLE_ETA * nv[d]);
    }
    if (qp->lam_img != 0.0 && R > 0) {
        const float *im = dir + (size_t)DIR_IMAGE * D;
        double c = qp->lam_img / sqrt(IMAGE_SHARE * R);
        for (int d = 0; d < D; d++)
            out[d] += (float)(c * im[d]);
    }
    if (qp->clu >= 0 && R > 0) {
        double rest = qp->clu >= N_TEXT_CLU ? (1.0 - CARRIER_SHARE - IMAGE_SHARE) * R
                                            : (1.0 - CARRIER_SHARE) * R;
        double c = qp->lam_clu / sqrt(CLUSTER_SHARE * rest);
        const float *cv = dir + (size_t)(DIR_CLU + qp->clu) * D;
        for (int d = 0; d < D; d++)
            out[d] += (float)(c * cv[d]);
    }
    if (R > 0)
        add_carrier(L, kv, i, qp->lam_loc / sqrt(CARRIER_SHARE * R), out);
    for (int d = 0; d < D; d++)
        out[d] = (float)(out[d] / S);
}

static kvt_status layer_gen_create(const kvt_synth_opts *o, const kvt_synth_shape *sh,
                                   const kvt_synth_tokens *tok, int layer, layer_gen *L)
{
    memset(L, 0, sizeof(*L));
    L->o = o;
    L->sh = sh;
    L->tok = tok;
    L->layer = layer;
    L->D = sh->head_dim;
    L->NC = sh->head_dim / 4;
    KVT_FORWARD(scalars_create(o, sh, tok, layer, &L->s));
    const size_t Hq = (size_t)sh->n_q_heads, Hkv = (size_t)sh->n_kv_heads, D = (size_t)L->D;
    const size_t T = tok->n_tokens, G = tok->n_decode;
    bool fail = false;
    L->dirs = alloc_floats(Hkv, N_DIRS, D, &fail);
    L->vclu = alloc_floats(Hkv, N_TEXT_CLU + N_IMG_CLU, D, &fail);
    L->chan = alloc_floats(Hkv, D, 1, &fail);
    L->qbias = alloc_floats(Hq, D, 1, &fail);
    L->qdrift = alloc_floats(Hq, D, 1, &fail);
    L->rot = alloc_floats(T + G, (size_t)L->NC, 2, &fail);
    L->clu = kvt_malloc(Hkv * T * sizeof(int16_t) + 1);
    if (fail || !L->clu) {
        layer_gen_free(L);
        return kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (layer plan)");
    }
    for (size_t kv = 0; kv < Hkv; kv++)
        plan_dirs(L, (int)kv);
    plan_rotary(L);
    for (size_t h = 0; h < Hq; h++) {
        nrng g;
        nrng_seed(&g, stream_seed(o->seed, TAG_QUERY, (uint64_t)layer * 65536 + h, ~0ull));
        int kv = (int)(h / (Hq / Hkv));
        float *b = L->qbias + h * D, *dr = L->qdrift + h * D;
        for (size_t d = 0; d < D; d++)
            b[d] = (float)(Q_BIAS * nrng_normal(&g));
        for (size_t d = 0; d < D; d++)
            dr[d] = (float)(Q_DRIFT * nrng_normal(&g));
        remove_structure(L, kv, b);
        remove_structure(L, kv, dr);
    }
    return KVT_OK;
}

/* ---- causal column sums ---- */

#define CS_ROWS 16 /* query rows per block (4 vectors of 4): logits buffer CS_ROWS x T */

/* zr[r] = sum_d qt[d][r] * kj[d] for the CS_ROWS rows of a block, summed in d order (the
 * same order as a plain loop). Four 4-float vector accumulators stay in registers (GCC/clang
 * vector extension; -O2 alone does not keep them there). */
typedef float kvt_v4f __attribute__((vector_size(16)));

static void logits_block(float *zr, const float *qt, const float *kj, size_t D)
{
    kvt_v4f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (size_t d = 0; d < D; d++) {
        kvt_v4f q0, q1, q2, q3;
        const float *qd = qt + d * CS_ROWS;
        memcpy(&q0, qd, sizeof(q0));
        memcpy(&q1, qd + 4, sizeof(q1));
        memcpy(&q2, qd + 8, sizeof(q2));
        memcpy(&q3, qd + 12, sizeof(q3));
        const float kd = kj[d];
        a0 += q0 * kd;
        a1 += q1 * kd;
        a2 += q2 * kd;
        a3 += q3 * kd;
    }
    memcpy(zr, &a0, sizeof(a0));
    memcpy(zr + 4, &a1, sizeof(a1));
    memcpy(zr + 8, &a2, sizeof(a2));
    memcpy(zr + 12, &a3, sizeof(a3));
}

/* The same for two keys at once (kj and kj + D): each query load feeds two keys. */
static void logits_block2(float *zr, float *zs, const float *qt, const float *kj, size_t D)
{
    kvt_v4f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (size_t d = 0; d < D; d++) {
        kvt_v4f q0, q1, q2, q3;
        const float *qd = qt + d * CS_ROWS;
        memcpy(&q0, qd, sizeof(q0));
        memcpy(&q1, qd + 4, sizeof(q1));
        memcpy(&q2, qd + 8, sizeof(q2));
        memcpy(&q3, qd + 12, sizeof(q3));
        const float kd = kj[d], ke = kj[D + d];
        a0 += q0 * kd;
        a1 += q1 * kd;
        a2 += q2 * kd;
        a3 += q3 * kd;
        b0 += q0 * ke;
        b1 += q1 * ke;
        b2 += q2 * ke;
        b3 += q3 * ke;
    }
    memcpy(zr, &a0, sizeof(a0));
    memcpy(zr + 4, &a1, sizeof(a1));
    memcpy(zr + 8, &a2, sizeof(a2));
    memcpy(zr + 12, &a3, sizeof(a3));
    memcpy(zs, &b0, sizeof(b0));
    memcpy(zs + 4, &b1, sizeof(b1));
    memcpy(zs + 8, &b2, sizeof(b2));
    memcpy(zs + 12, &b3, sizeof(b3));
}

kvt_status kvt_synth_colsum_head(const float *q, const float *k, uint32_t n_tokens, int head_dim,
                                 float *out)
{
    KVT_RETURN_IF(!q || !k || !out || head_dim <= 0, KVT_ERR_INVALID_ARG,
                  "synth: bad colsum arguments");
    const size_t T = n_tokens, D = (size_t)head_dim;
    float *z = kvt_malloc(CS_ROWS * (T ? T : 1) * sizeof(float));
    float *qt = kvt_malloc(D * CS_ROWS * sizeof(float));
    double *acc = kvt_calloc(T ? T : 1, sizeof(double));
    kvt_status st = KVT_OK;
    if (!z || !qt || !acc) {
        st = kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (colsum)");
        goto out_free;
    }
    const float scale = (float)(1.0 / sqrt((double)D));
    for (size_t i0 = 0; i0 < T; i0 += CS_ROWS) {
        size_t nr = T - i0 < CS_ROWS ? T - i0 : CS_ROWS;
        /* qt is (D, CS_ROWS): the block's queries transposed and pre-scaled */
        for (size_t d = 0; d < D; d++)
            for (size_t r = 0; r < CS_ROWS; r++)
                qt[d * CS_ROWS + r] = r < nr ? q[(i0 + r) * D + d] * scale : 0.0f;
        size_t nk = i0 + nr, j = 0;
        for (; j + 1 < nk; j += 2) {
            float zr[CS_ROWS], zs[CS_ROWS];
            logits_block2(zr, zs, qt, k + j * D, D);
            for (size_t r = 0; r < nr; r++) {
                z[r * T + j] = zr[r];
                z[r * T + j + 1] = zs[r];
            }
        }
        for (; j < nk; j++) {
            float zr[CS_ROWS];
            logits_block(zr, qt, k + j * D, D);
            for (size_t r = 0; r < nr; r++)
                z[r * T + j] = zr[r];
        }
        for (size_t r = 0; r < nr; r++) {
            float *zrow = z + r * T;
            size_t n = i0 + r + 1; /* causal: keys 0..i */
            float mx = zrow[0];
            for (size_t c = 1; c < n; c++)
                mx = zrow[c] > mx ? zrow[c] : mx;
            double sum = 0;
            for (size_t c = 0; c < n; c++) {
                zrow[c] = expf(zrow[c] - mx);
                sum += zrow[c];
            }
            double inv = 1.0 / sum;
            for (size_t c = 0; c < n; c++)
                acc[c] += zrow[c] * inv;
        }
    }
    for (size_t j = 0; j < T; j++)
        out[j] = (float)acc[j];
out_free:
    kvt_free(acc);
    kvt_free(qt);
    kvt_free(z);
    return st;
}

double kvt_synth_redundancy(const float *x, int head_dim, uint32_t begin, uint32_t end)
{
    if (!x || head_dim <= 0 || end <= begin + 1)
        return 0.0;
    const size_t D = (size_t)head_dim;
    double m[1024] = {0};
    double *mm = D <= 1024 ? m : kvt_calloc(D, sizeof(double));
    if (!mm)
        return 0.0;
    for (size_t t = begin; t < end; t++) {
        const float *r = x + t * D;
        double nn = sqrt(dot(r, r, (int)D));
        if (nn < 1e-12)
            nn = 1e-12; /* F.normalize's eps */
        for (size_t d = 0; d < D; d++)
            mm[d] += r[d] / nn;
    }
    double N = (double)(end - begin), s = 0;
    for (size_t d = 0; d < D; d++)
        s += (mm[d] / N) * (mm[d] / N);
    if (mm != m)
        kvt_free(mm);
    return (N * s - 1.0) / (N - 1.0);
}

/* ---- a whole layer ---- */

static void round_to(kvt_dtype dt, float *x, size_t n)
{
    if (!x || dt == KVT_DTYPE_F32)
        return;
    for (size_t i = 0; i < n; i++)
        x[i] = dt == KVT_DTYPE_BF16 ? kvt_bf16_to_f32(kvt_f32_to_bf16(x[i]))
                                    : kvt_f16_to_f32(kvt_f32_to_f16(x[i]));
}

void kvt_synth_layer_free(kvt_synth_layer *x)
{
    if (!x)
        return;
    kvt_free(x->k);
    kvt_free(x->v);
    kvt_free(x->q_window);
    kvt_free(x->q_decode);
    kvt_free(x->k_decode);
    kvt_free(x->v_decode);
    kvt_free(x->q_all);
    kvt_free(x->attn_colsum);
    kvt_free(x->head_role);
    kvt_free(x->r_target);
    kvt_free(x->key_cluster);
    kvt_free(x);
}

kvt_status kvt_synth_layer_create(const kvt_synth_opts *opts, const kvt_synth_tokens *tok_in,
                                  int layer, kvt_synth_layer **out)
{
    kvt_synth_opts o;
    const kvt_synth_shape *sh;
    KVT_RETURN_IF(!out, KVT_ERR_INVALID_ARG, "synth: NULL out");
    *out = NULL;
    KVT_FORWARD(kvt_synth_opts_resolve(opts, &o, &sh));
    KVT_RETURN_IF(layer < 0 || layer >= sh->n_layers, KVT_ERR_INVALID_ARG,
                  "synth: layer %d out of range [0, %d)", layer, sh->n_layers);
    KVT_RETURN_IF(tok_in && (tok_in->n_tokens != o.n_tokens || tok_in->n_decode != o.n_decode),
                  KVT_ERR_INVALID_ARG, "synth: token tables are for other options");
    kvt_synth_tokens *own_tok = NULL;
    if (!tok_in)
        KVT_FORWARD(kvt_synth_tokens_create(&o, &own_tok));
    const kvt_synth_tokens *tok = tok_in ? tok_in : own_tok;

    kvt_status st = KVT_OK;
    layer_gen L;
    kvt_synth_layer *x = NULL;
    float *qscratch = NULL;
    st = layer_gen_create(&o, sh, tok, layer, &L);
    if (st != KVT_OK)
        goto out_tok;
    const size_t Hq = (size_t)sh->n_q_heads, Hkv = (size_t)sh->n_kv_heads, D = (size_t)L.D;
    const size_t T = o.n_tokens, W = o.window, G = o.n_decode;
    const bool colsum = o.colsum == KVT_SYNTH_ON;
    bool fail = false;
    x = kvt_calloc(1, sizeof(*x));
    if (!x) {
        st = kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (layer)");
        goto out_gen;
    }
    x->layer = layer;
    x->n_tokens = o.n_tokens;
    x->window = o.window;
    x->n_decode = o.n_decode;
    x->n_q_heads = sh->n_q_heads;
    x->n_kv_heads = sh->n_kv_heads;
    x->head_dim = sh->head_dim;
    x->k = alloc_floats(Hkv, T, D, &fail);
    x->v = alloc_floats(Hkv, T, D, &fail);
    x->q_window = alloc_floats(Hq, W, D, &fail);
    if (G) {
        x->q_decode = alloc_floats(Hq, G, D, &fail);
        x->k_decode = alloc_floats(Hkv, G, D, &fail);
        x->v_decode = alloc_floats(Hkv, G, D, &fail);
    }
    if (o.q_all)
        x->q_all = alloc_floats(Hq, T, D, &fail);
    else if (colsum)
        qscratch = alloc_floats(T, D, 1, &fail);
    if (colsum)
        x->attn_colsum = alloc_floats(Hq, T, 1, &fail);
    x->head_role = kvt_malloc(Hq);
    x->r_target = alloc_floats(Hkv, 1, 1, &fail);
    x->key_cluster = kvt_malloc(Hkv * T * sizeof(int16_t) + 1);
    if (fail || !x->head_role || !x->key_cluster) {
        st = kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (layer %d tensors)", layer);
        goto out_free;
    }
    x->n_needles = L.s.n_needles;
    memcpy(x->needle_idx, L.s.needle, sizeof(x->needle_idx));
    for (size_t h = 0; h < Hq; h++)
        x->head_role[h] = (uint8_t)L.s.q[h].role;

    for (size_t kv = 0; kv < Hkv; kv++) {
        x->r_target[kv] = (float)L.s.kv[kv].rho;
        nrng g;
        nrng_seed(&g, stream_seed(o.seed, TAG_KEYS, (uint64_t)layer, kv));
        st = assign_clusters(&L, (int)kv, &g);
        if (st != KVT_OK)
            goto out_free;
        for (size_t t = 0; t < T; t++)
            gen_key(&L, (int)kv, (uint32_t)t, &g, x->k + (kv * T + t) * D);
        nrng_seed(&g, stream_seed(o.seed, TAG_VALUES, (uint64_t)layer, kv));
        for (size_t t = 0; t < T; t++)
            gen_value(&L, (int)kv, (uint32_t)t, &g, x->v + (kv * T + t) * D);
        nrng_seed(&g, stream_seed(o.seed, TAG_DECODE_KV, (uint64_t)layer, kv));
        for (size_t i = 0; i < G; i++) {
            gen_key(&L, (int)kv, (uint32_t)(T + i), &g, x->k_decode + (kv * G + i) * D);
            gen_value(&L, (int)kv, (uint32_t)(T + i), &g, x->v_decode + (kv * G + i) * D);
        }
    }
    memcpy(x->key_cluster, L.clu, Hkv * T * sizeof(int16_t));
    round_to(o.dtype, x->k, Hkv * T * D);
    round_to(o.dtype, x->v, Hkv * T * D);
    round_to(o.dtype, x->k_decode, Hkv * G * D);
    round_to(o.dtype, x->v_decode, Hkv * G * D);

    for (size_t h = 0; h < Hq; h++) {
        for (size_t i = 0; i < G; i++)
            gen_query(&L, (int)h, (uint32_t)(T + i), x->q_decode + (h * G + i) * D);
        float *qa = x->q_all ? x->q_all + h * T * D : qscratch;
        if (qa) { /* every prompt query (the window is its last W rows) */
            for (size_t t = 0; t < T; t++)
                gen_query(&L, (int)h, (uint32_t)t, qa + t * D);
            round_to(o.dtype, qa, T * D);
            memcpy(x->q_window + h * W * D, qa + (T - W) * D, W * D * sizeof(float));
        } else {
            for (size_t w = 0; w < W; w++)
                gen_query(&L, (int)h, (uint32_t)(T - W + w), x->q_window + (h * W + w) * D);
        }
        if (colsum) {
            size_t kv = h / (Hq / Hkv);
            st = kvt_synth_colsum_head(qa, x->k + kv * T * D, (uint32_t)T, (int)D,
                                       x->attn_colsum + h * T);
            if (st != KVT_OK)
                goto out_free;
        }
    }
    round_to(o.dtype, x->q_window, Hq * W * D);
    round_to(o.dtype, x->q_decode, Hq * G * D);
    *out = x;
    x = NULL;
out_free:
    kvt_synth_layer_free(x);
    kvt_free(qscratch);
out_gen:
    layer_gen_free(&L);
out_tok:
    kvt_synth_tokens_free(own_tok);
    return st;
}

/* ---- the JSON header ---- */

static kvt_status build_header(const kvt_synth_opts *o, const kvt_synth_shape *sh,
                               const kvt_synth_tokens *tok, const kvt_writer_opts *wo, char **out)
{
    kvt_status st = KVT_OK;
    char buf[160];
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (header)");
    cJSON_AddStringToObject(root, "format", "kvtrace");
    cJSON *fv = cJSON_AddArrayToObject(root, "format_version");
    if (fv) {
        cJSON_AddItemToArray(fv, cJSON_CreateNumber(KVT_FORMAT_MAJOR));
        cJSON_AddItemToArray(fv, cJSON_CreateNumber(KVT_FORMAT_MINOR));
    }
    snprintf(buf, sizeof(buf), "kvtrace %s synth", kvt_version_string());
    cJSON_AddStringToObject(root, "created_by", buf);
    cJSON_AddStringToObject(root, "endianness", "little");
    cJSON *mo = cJSON_AddObjectToObject(root, "model");
    if (mo) {
        snprintf(buf, sizeof(buf), "synthetic-%s", sh->name);
        cJSON_AddStringToObject(mo, "name", buf);
        cJSON_AddStringToObject(mo, "arch", sh->arch);
        cJSON_AddNumberToObject(mo, "n_layers", o->n_layers);
        cJSON_AddNumberToObject(mo, "n_q_heads", sh->n_q_heads);
        cJSON_AddNumberToObject(mo, "n_kv_heads", sh->n_kv_heads);
        cJSON_AddNumberToObject(mo, "head_dim", sh->head_dim);
        cJSON_AddNumberToObject(mo, "attn_scale", 1.0 / sqrt((double)sh->head_dim));
        cJSON_AddNumberToObject(mo, "vocab_size", sh->vocab);
        cJSON *ro = cJSON_AddObjectToObject(mo, "rope");
        if (ro) {
            bool mrope = sh->rope == KVT_SYNTH_ROPE_MROPE;
            cJSON_AddStringToObject(ro, "type", mrope ? "mrope" : "default");
            cJSON_AddNumberToObject(ro, "theta", sh->rope_theta);
            cJSON_AddStringToObject(ro, "pairs", "half"); /* add_carrier's rotate_half pairing */
            if (mrope)
                cJSON_AddItemToObject(ro, "mrope_section",
                                      cJSON_CreateIntArray(sh->mrope_section, 3));
        }
    }
    cJSON_AddStringToObject(root, "kv_dtype", kvt_dtype_name(o->dtype));
    cJSON_AddNumberToObject(root, "n_tokens", o->n_tokens);
    cJSON_AddNumberToObject(root, "window", o->window);
    cJSON_AddNumberToObject(root, "n_decode", o->n_decode);
    cJSON *en = cJSON_AddObjectToObject(root, "engine");
    if (en) {
        cJSON_AddStringToObject(en, "name", "kvtrace-synth");
        cJSON_AddStringToObject(en, "version", kvt_version_string());
    }
    cJSON_AddNullToObject(root, "gpu");
    cJSON *ca = cJSON_AddObjectToObject(root, "capture");
    if (ca) {
        cJSON_AddStringToObject(ca, "api", "kvt_synth");
        cJSON_AddBoolToObject(ca, "with_colsum", o->colsum == KVT_SYNTH_ON);
        cJSON_AddBoolToObject(ca, "with_q_all", o->q_all);
        cJSON_AddNumberToObject(ca, "zstd_level", wo && wo->level ? wo->level : 3);
        cJSON_AddBoolToObject(ca, "byteplane", !(wo && wo->no_shuffle));
    }
    cJSON *sy = cJSON_AddObjectToObject(root, "synthetic");
    if (!sy || !mo || !en || !ca)
        goto out_nomem;
    if (o->seed <= (1ull << 53)) {
        cJSON_AddNumberToObject(sy, "seed", (double)o->seed);
    } else {
        snprintf(buf, sizeof(buf), "%llu", (unsigned long long)o->seed);
        cJSON_AddStringToObject(sy, "seed", buf);
    }
    cJSON_AddNumberToObject(sy, "generator_version", KVT_SYNTH_GENERATOR_VERSION);
    cJSON_AddStringToObject(sy, "shape", sh->name);
    if (o->n_layers < sh->n_layers) /* the first n_layers of the shape's layers */
        cJSON_AddNumberToObject(sy, "shape_n_layers", sh->n_layers);
    cJSON_AddNumberToObject(sy, "image_frac", o->image_frac);
    cJSON_AddNumberToObject(sy, "image_tokens", tok->image_end - tok->image_begin);
    cJSON_AddStringToObject(
        sy, "description",
        "not real KV. Post-RoPE keys = shared mean direction (energy r_target, a few outlier "
        "channels) + near-duplicate clusters (text runs, image 3x3-patch regions; share varies "
        "per KV head) + a rotary positional carrier + noise; image tokens share an extra "
        "direction (more redundant than text). Tokens [0, n_sinks) are attention sinks, "
        "`needles` are distant tokens retrieval heads attend to; head roles local, retrieval, "
        "sink, semantic. Decode queries = the same head plan + drift + fresh noise. Values: "
        "sinks tiny, needles and 3% of tokens heavy. See traces/SYNTH.md.");
    cJSON_AddNumberToObject(sy, "n_sinks", tok->n_sinks);
    int span[2] = {(int)tok->image_begin, (int)tok->image_end};
    int grid[2] = {(int)tok->grid_h, (int)tok->grid_w};
    cJSON_AddItemToObject(sy, "image_span", cJSON_CreateIntArray(span, 2));
    cJSON_AddItemToObject(sy, "image_grid", cJSON_CreateIntArray(grid, 2));
    cJSON *layers = cJSON_AddArrayToObject(sy, "layers");
    if (!layers)
        goto out_nomem;
    for (int l = 0; l < o->n_layers; l++) {
        layer_scalars s;
        st = scalars_create(o, sh, tok, l, &s);
        if (st != KVT_OK)
            goto out;
        cJSON *lo = cJSON_CreateObject();
        cJSON_AddItemToArray(layers, lo);
        int nd[KVT_SYNTH_MAX_NEEDLES];
        double rt[1024];
        char roles[1025];
        for (uint32_t n = 0; n < s.n_needles; n++)
            nd[n] = (int)s.needle[n];
        for (int k = 0; k < sh->n_kv_heads; k++)
            rt[k] = floor(s.kv[k].rho * 1000 + 0.5) / 1000;
        for (int h = 0; h < sh->n_q_heads; h++)
            roles[h] = "LRSC"[s.q[h].role];
        roles[sh->n_q_heads] = 0;
        if (lo) {
            cJSON_AddItemToObject(lo, "needles", cJSON_CreateIntArray(nd, (int)s.n_needles));
            cJSON_AddItemToObject(lo, "r_target", cJSON_CreateDoubleArray(rt, sh->n_kv_heads));
            cJSON_AddStringToObject(lo, "roles", roles);
        }
        scalars_free(&s);
    }
    cJSON_AddStringToObject(sy, "roles_legend",
                            "one letter per query head: L local, R retrieval, S sink, C semantic "
                            "(cluster)");
    *out = cJSON_PrintUnformatted(root);
    if (!*out)
        goto out_nomem;
    goto out;
out_nomem:
    st = kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (header)");
out:
    cJSON_Delete(root);
    return st;
}

/* ---- writing: generator threads, appends in layer order ---- */

typedef struct gen_pool {
    const kvt_synth_opts *o;
    const kvt_synth_tokens *tok;
    int n_layers;
    int ahead; /* layers generated but not yet written, at most */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int next_gen, next_write;
    kvt_synth_layer **slot; /* [L] */
    kvt_status err;
    bool stop;
    char err_msg[256];
} gen_pool;

static void *gen_worker(void *arg)
{
    gen_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->next_gen < p->n_layers && p->next_gen >= p->next_write + p->ahead)
            pthread_cond_wait(&p->cv, &p->mu);
        if (p->stop || p->next_gen >= p->n_layers)
            break;
        int l = p->next_gen++;
        pthread_mutex_unlock(&p->mu);
        kvt_synth_layer *x = NULL;
        kvt_status s = kvt_synth_layer_create(p->o, p->tok, l, &x);
        pthread_mutex_lock(&p->mu);
        if (s != KVT_OK && p->err == KVT_OK) {
            p->err = s;
            snprintf(p->err_msg, sizeof(p->err_msg), "%s", kvt_error_msg());
            p->stop = true;
        }
        p->slot[l] = x;
        pthread_cond_broadcast(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static kvt_status append(kvt_trace_writer *w, int kind, int32_t layer, size_t heads, size_t toks,
                         size_t dim, kvt_dtype dt, const void *data)
{
    kvt_record_info in = {.kind = kind,
                          .layer = layer,
                          .head_end = (uint32_t)heads,
                          .tok_end = (uint32_t)toks,
                          .dim = (uint32_t)dim,
                          .dtype = dt};
    return kvt_trace_writer_append(w, &in, data);
}

/* Append one float tensor in the trace dtype (conv: scratch of at least n elements). */
static kvt_status append_float(kvt_trace_writer *w, int kind, int32_t layer, size_t heads,
                               size_t toks, size_t dim, kvt_dtype dt, const float *x, void *conv)
{
    if (!x || !heads || !toks)
        return KVT_OK;
    if (dt == KVT_DTYPE_F32)
        return append(w, kind, layer, heads, toks, dim, dt, x);
    KVT_FORWARD(kvt_convert_from_f32(dt, x, conv, heads * toks * dim));
    return append(w, kind, layer, heads, toks, dim, dt, conv);
}

static kvt_status write_layer(kvt_trace_writer *w, const kvt_synth_opts *o,
                              const kvt_synth_layer *x, void *conv)
{
    const size_t Hq = (size_t)x->n_q_heads, Hkv = (size_t)x->n_kv_heads, D = (size_t)x->head_dim;
    const size_t T = x->n_tokens, W = x->window, G = x->n_decode;
    const int32_t l = x->layer;
    const kvt_dtype dt = o->dtype;
    KVT_FORWARD(append_float(w, KVT_KIND_K, l, Hkv, T, D, dt, x->k, conv));
    KVT_FORWARD(append_float(w, KVT_KIND_V, l, Hkv, T, D, dt, x->v, conv));
    KVT_FORWARD(append_float(w, KVT_KIND_Q_WINDOW, l, Hq, W, D, dt, x->q_window, conv));
    KVT_FORWARD(append_float(w, KVT_KIND_Q_DECODE, l, Hq, G, D, dt, x->q_decode, conv));
    KVT_FORWARD(append_float(w, KVT_KIND_K_DECODE, l, Hkv, G, D, dt, x->k_decode, conv));
    KVT_FORWARD(append_float(w, KVT_KIND_V_DECODE, l, Hkv, G, D, dt, x->v_decode, conv));
    KVT_FORWARD(
        append_float(w, KVT_KIND_ATTN_COLSUM, l, Hq, T, 1, KVT_DTYPE_F32, x->attn_colsum, conv));
    KVT_FORWARD(append_float(w, KVT_KIND_Q_ALL, l, Hq, T, D, dt, x->q_all, conv));
    return KVT_OK;
}

static kvt_status write_tokens(kvt_trace_writer *w, const kvt_synth_tokens *tok)
{
    const size_t T = tok->n_tokens, G = tok->n_decode, P = (size_t)tok->n_pos;
    KVT_FORWARD(append(w, KVT_KIND_TOKEN_IDS, -1, 1, T, 1, KVT_DTYPE_I32, tok->token_ids));
    KVT_FORWARD(append(w, KVT_KIND_MODALITY, -1, 1, T, 1, KVT_DTYPE_U8, tok->modality));
    KVT_FORWARD(append(w, KVT_KIND_POSITIONS, -1, P, T, 1, KVT_DTYPE_I32, tok->positions));
    if (G)
        KVT_FORWARD(append(w, KVT_KIND_DECODE_TOKEN_IDS, -1, 1, G, 1, KVT_DTYPE_I32,
                           tok->decode_token_ids));
    return KVT_OK;
}

kvt_status kvt_synth_write(const kvt_synth_opts *opts, const char *path, const kvt_writer_opts *wo)
{
    kvt_synth_opts o;
    const kvt_synth_shape *sh;
    KVT_RETURN_IF(!path, KVT_ERR_INVALID_ARG, "synth: NULL path");
    KVT_FORWARD(kvt_synth_opts_resolve(opts, &o, &sh));
    const int L = o.n_layers;
    kvt_synth_tokens *tok = NULL;
    char *hdr = NULL;
    kvt_trace_writer *w = NULL;
    void *conv = NULL;
    pthread_t th[64];
    int n_started = 0;
    gen_pool p;
    memset(&p, 0, sizeof(p));
    kvt_status st = kvt_synth_tokens_create(&o, &tok);
    if (st != KVT_OK)
        return st;
    st = build_header(&o, sh, tok, wo, &hdr);
    if (st != KVT_OK)
        goto out_tok;
    /* the largest tensor, for the dtype conversion scratch */
    size_t T = o.n_tokens, D = (size_t)sh->head_dim, Hq = (size_t)sh->n_q_heads, big, n;
    big = (size_t)sh->n_kv_heads * T;
    big = big > Hq * T ? big : Hq * T;
    big = big > Hq * o.window ? big : Hq * o.window;
    big = big > Hq * o.n_decode ? big : Hq * o.n_decode;
    if (kvt_mul_overflow(big, D * sizeof(float), &n)) {
        st = kvt_error_set(KVT_ERR_OVERFLOW, "synth: trace too large");
        goto out_hdr;
    }
    conv = o.dtype == KVT_DTYPE_F32 ? NULL : kvt_malloc(n / 2);
    if (o.dtype != KVT_DTYPE_F32 && !conv) {
        st = kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory (conversion buffer)");
        goto out_hdr;
    }
    st = kvt_trace_writer_create(path, hdr, wo, &w);
    if (st != KVT_OK)
        goto out_conv;
    st = write_tokens(w, tok);
    if (st != KVT_OK)
        goto out_writer;

    p.o = &o;
    p.tok = tok;
    p.n_layers = L;
    p.ahead = o.n_threads > 64 ? 64 : o.n_threads;
    p.slot = kvt_calloc((size_t)L, sizeof(*p.slot));
    if (!p.slot) {
        st = kvt_error_set(KVT_ERR_NOMEM, "synth: out of memory");
        goto out_writer;
    }
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.cv, NULL);
    int n_threads = p.ahead < L ? p.ahead : L;
    if (n_threads > 1)
        for (; n_started < n_threads; n_started++)
            if (pthread_create(&th[n_started], NULL, gen_worker, &p) != 0)
                break;
    for (int l = 0; l < L && st == KVT_OK; l++) {
        kvt_synth_layer *x = NULL;
        if (n_started == 0) {
            st = kvt_synth_layer_create(&o, tok, l, &x);
        } else {
            pthread_mutex_lock(&p.mu);
            while (!p.slot[l] && p.err == KVT_OK)
                pthread_cond_wait(&p.cv, &p.mu);
            x = p.slot[l];
            p.slot[l] = NULL;
            if (!x) {
                st = p.err;
                kvt_error_set(st, "%s", p.err_msg);
            }
            pthread_mutex_unlock(&p.mu);
        }
        if (st == KVT_OK)
            st = write_layer(w, &o, x, conv);
        kvt_synth_layer_free(x);
        pthread_mutex_lock(&p.mu);
        p.next_write = l + 1;
        if (st != KVT_OK)
            p.stop = true;
        pthread_cond_broadcast(&p.cv);
        pthread_mutex_unlock(&p.mu);
        if (st == KVT_OK && o.progress)
            o.progress(o.progress_user, (uint64_t)l + 1, (uint64_t)L);
    }
    pthread_mutex_lock(&p.mu);
    p.stop = true;
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
    for (int i = 0; i < n_started; i++)
        pthread_join(th[i], NULL);
    for (int l = 0; l < L; l++)
        kvt_synth_layer_free(p.slot[l]);
    kvt_free(p.slot);
    pthread_cond_destroy(&p.cv);
    pthread_mutex_destroy(&p.mu);
    if (st == KVT_OK)
        st = kvt_trace_writer_finish(w);
out_writer:
    if (st == KVT_OK)
        kvt_trace_writer_free(w);
    else /* deterministic: a part of it is worth nothing, and would fill the disk it filled */
        kvt_trace_writer_discard(w);
out_conv:
    kvt_free(conv);
out_hdr:
    cJSON_free(hdr);
out_tok:
    kvt_synth_tokens_free(tok);
    return st;
}
