/* test_synth.c - the synthetic trace generator (traces/kvt_synth.h): option checks, every
 * shape's dimensions, determinism (same seed => identical bytes whatever the thread count,
 * another seed => different), the file equals the in-memory layers, and the planted
 * structure is measurable from the tensors: sinks, retrieval and local heads, per-head key
 * redundancy spread, image spans more redundant than text, decode queries that resemble
 * the window queries without equalling them, heavy and tiny values, and the attention
 * column sums against a brute-force computation.
 */
#include <cjson/cJSON.h>

#include "kvt_synth.h"
#include "kvt_test.h"

static char p1[256], p2[256], p3[256];

static kvt_synth_opts opts(const char *shape, uint32_t T)
{
    kvt_synth_opts o;
    kvt_synth_opts_init(&o);
    o.shape = shape;
    o.n_tokens = T;
    o.colsum = KVT_SYNTH_OFF;
    return o;
}

static uint8_t *read_all(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(sz > 0 ? (size_t)sz : 1);
    *n = fread(b, 1, (size_t)sz, f);
    fclose(f);
    return b;
}

static bool same_file(const char *a, const char *b)
{
    size_t na, nb;
    uint8_t *x = read_all(a, &na), *y = read_all(b, &nb);
    bool same = x && y && na == nb && !memcmp(x, y, na);
    free(x);
    free(y);
    return same;
}

/* kvtrace verify finds nothing wrong with the file */
static void expect_verifies(const char *path)
{
    kvt_verify_report rep;
    KVT_EXPECT_STATUS(kvt_trace_verify(path, &rep), KVT_OK);
    KVT_EXPECT(rep.n_problems == 0);
    kvt_verify_report_free(&rep);
}

static void test_options(void)
{
    kvt_synth_opts o = opts("tiny", 10), r;
    const kvt_synth_shape *sh;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_OK);
    KVT_EXPECT_EQ_U64(r.window, 10); /* default min(32, T) */
    KVT_EXPECT_EQ_U64(r.dtype, KVT_DTYPE_BF16);
    o.window = 11;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "W=11") && strstr(kvt_error_msg(), "T=10"));
    o = opts("tiny", 0);
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    o = opts("nosuch", 10);
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "llama3-8b") && strstr(kvt_error_msg(), "qwen2-vl-7b"));
    o = opts("tiny", 10);
    o.image_frac = 1.0;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    o.image_frac = -1;
    o.dtype = KVT_DTYPE_I32;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    o = opts("tiny", 4096);
    o.colsum = KVT_SYNTH_AUTO;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_OK);
    KVT_EXPECT(r.colsum == KVT_SYNTH_ON);
    o.n_tokens = 4097;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_OK);
    KVT_EXPECT(r.colsum == KVT_SYNTH_OFF);
    /* the file is not created when the options are bad */
    o = opts("tiny", 8);
    o.window = 9;
    kvt_test_tmp(p1, sizeof(p1), "bad.kvt");
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p1, NULL), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(access(p1, F_OK) != 0);
}

static void test_shapes(void)
{
    static const struct {
        const char *name;
        int L, Hq, Hkv, D, P;
        double theta;
    } want[] = {{"tiny", 2, 4, 2, 16, 1, 1e4},
                {"llama3-8b", 32, 32, 8, 128, 1, 5e5},
                {"qwen2-vl-7b", 28, 28, 4, 128, 3, 1e6}};
    KVT_EXPECT(kvt_synth_n_shapes() >= 3);
    KVT_EXPECT(kvt_synth_shape_find("nosuch") == NULL);
    KVT_EXPECT(kvt_synth_shape_at(kvt_synth_n_shapes()) == NULL);
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        const kvt_synth_shape *s = kvt_synth_shape_find(want[i].name);
        KVT_EXPECT(s != NULL);
        if (!s)
            continue;
        KVT_EXPECT(s->n_layers == want[i].L && s->n_q_heads == want[i].Hq &&
                   s->n_kv_heads == want[i].Hkv && s->head_dim == want[i].D);
        KVT_EXPECT(s->rope_theta == want[i].theta);
        KVT_EXPECT((s->rope == KVT_SYNTH_ROPE_MROPE) == (want[i].P == 3));
    }
    for (size_t i = 0; i < kvt_synth_n_shapes(); i++) {
        const kvt_synth_shape *s = kvt_synth_shape_at(i);
        KVT_EXPECT(strstr(kvt_synth_shape_names(), s->name) != NULL);
        KVT_EXPECT(s->n_q_heads % s->n_kv_heads == 0 && s->head_dim % 2 == 0);
        if (s->rope == KVT_SYNTH_ROPE_MROPE)
            KVT_EXPECT(s->mrope_section[0] + s->mrope_section[1] + s->mrope_section[2] ==
                       s->head_dim / 2);
        /* every shape generates a layer with the right dims (small T; the last layer) */
        kvt_synth_opts o = opts(s->name, 40);
        o.n_decode = 3;
        o.q_all = true;
        o.colsum = KVT_SYNTH_ON;
        kvt_synth_tokens *tok = NULL;
        kvt_synth_layer *x = NULL;
        KVT_EXPECT_STATUS(kvt_synth_tokens_create(&o, &tok), KVT_OK);
        KVT_EXPECT_STATUS(kvt_synth_layer_create(&o, tok, s->n_layers - 1, &x), KVT_OK);
        kvt_synth_layer *bad = NULL;
        KVT_EXPECT_STATUS(kvt_synth_layer_create(&o, tok, s->n_layers, &bad), KVT_ERR_INVALID_ARG);
        KVT_EXPECT(bad == NULL);
        if (tok)
            KVT_EXPECT(tok->n_pos == (s->rope == KVT_SYNTH_ROPE_MROPE ? 3 : 1));
        if (!x) {
            kvt_synth_tokens_free(tok);
            continue;
        }
        KVT_EXPECT(x->n_q_heads == s->n_q_heads && x->n_kv_heads == s->n_kv_heads &&
                   x->head_dim == s->head_dim && x->n_tokens == 40 && x->window == 32 &&
                   x->n_decode == 3);
        KVT_EXPECT(x->k && x->v && x->q_window && x->q_decode && x->k_decode && x->v_decode &&
                   x->q_all && x->attn_colsum);
        /* Q_window is the last W rows of Q_all */
        size_t D = (size_t)x->head_dim, T = x->n_tokens, W = x->window;
        bool eq = true;
        for (int h = 0; h < x->n_q_heads; h++)
            eq &= !memcmp(x->q_window + h * W * D, x->q_all + (h * T + T - W) * D,
                          W * D * sizeof(float));
        KVT_EXPECT(eq);
        kvt_synth_layer_free(x);
        kvt_synth_tokens_free(tok);
    }
}

static void test_edges(void)
{
    /* T = 1, W = 1, no decode; and T = W */
    kvt_synth_opts o = opts("tiny-vl", 1);
    o.n_decode = 0;
    o.colsum = KVT_SYNTH_ON;
    kvt_synth_layer *x = NULL;
    KVT_EXPECT_STATUS(kvt_synth_layer_create(&o, NULL, 0, &x), KVT_OK);
    if (x) {
        KVT_EXPECT(x->window == 1 && !x->q_decode && x->n_needles == 0);
        KVT_EXPECT_NEAR(x->attn_colsum[0], 1.0, 1e-6);
    }
    kvt_synth_layer_free(x);
    o = opts("tiny", 32);
    o.window = 32;
    KVT_EXPECT_STATUS(kvt_synth_write(&o, kvt_test_tmp(p1, sizeof(p1), "tw.kvt"),
                                      &(kvt_writer_opts){.force = true}),
                      KVT_OK);
    unlink(p1);
}

/* Determinism and the file: same options => identical bytes (1 or 3 generator threads, 0 or
 * 2 compression threads); another seed => different bytes; the file holds the layers. */
static void test_determinism(void)
{
    kvt_synth_opts o = opts("tiny-vl", 300);
    o.colsum = KVT_SYNTH_ON;
    o.q_all = true;
    kvt_writer_opts w1 = {.force = true}, w2 = {.force = true, .n_threads = 2};
    kvt_test_tmp(p1, sizeof(p1), "d1.kvt");
    kvt_test_tmp(p2, sizeof(p2), "d2.kvt");
    kvt_test_tmp(p3, sizeof(p3), "d3.kvt");
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p1, &w1), KVT_OK);
    o.n_threads = 3;
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p2, &w2), KVT_OK);
    KVT_EXPECT(same_file(p1, p2));
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p2, NULL), KVT_ERR_IO); /* exists, no force */
    o.seed = 2;
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p3, &w1), KVT_OK);
    KVT_EXPECT(!same_file(p1, p3));

    /* the window queries do not depend on whether Q_all / colsum are generated */
    o.seed = 1;
    kvt_synth_layer *a = NULL, *b = NULL;
    KVT_EXPECT_STATUS(kvt_synth_layer_create(&o, NULL, 1, &a), KVT_OK);
    o.q_all = false;
    o.colsum = KVT_SYNTH_OFF;
    KVT_EXPECT_STATUS(kvt_synth_layer_create(&o, NULL, 1, &b), KVT_OK);
    if (a && b) {
        size_t nq = (size_t)a->n_q_heads * a->window * a->head_dim;
        size_t nk = (size_t)a->n_kv_heads * a->n_tokens * a->head_dim;
        KVT_EXPECT(!memcmp(a->q_window, b->q_window, nq * sizeof(float)));
        KVT_EXPECT(!memcmp(a->k, b->k, nk * sizeof(float)));
    }

    /* the file = the in-memory layer (already rounded to bf16), and the header */
    kvt_trace_reader *r = NULL;
    KVT_EXPECT_STATUS(kvt_trace_reader_open(p1, &r), KVT_OK);
    if (r && a) {
        size_t nk = (size_t)a->n_kv_heads * a->n_tokens * a->head_dim;
        size_t nc = (size_t)a->n_q_heads * a->n_tokens;
        float *buf = malloc(nk * 2 * sizeof(float) + 16);
        KVT_EXPECT_STATUS(
            kvt_trace_reader_read(r, 1, KVT_KIND_K, 0, 2, KVT_DTYPE_F32, buf, nk * sizeof(float)),
            KVT_OK);
        KVT_EXPECT(!memcmp(buf, a->k, nk * sizeof(float)));
        KVT_EXPECT_STATUS(kvt_trace_reader_read(r, 1, KVT_KIND_ATTN_COLSUM, 0, 4, KVT_DTYPE_F32,
                                                buf, nc * sizeof(float)),
                          KVT_OK);
        KVT_EXPECT(!memcmp(buf, a->attn_colsum, nc * sizeof(float)));
        uint32_t nh, nt, dim;
        kvt_dtype dt;
        KVT_EXPECT_STATUS(kvt_trace_reader_shape(r, -1, KVT_KIND_POSITIONS, &nh, &nt, &dim, &dt),
                          KVT_OK);
        KVT_EXPECT(nh == 3 && nt == 300 && dt == KVT_DTYPE_I32);
        KVT_EXPECT_STATUS(kvt_trace_reader_shape(r, 1, KVT_KIND_Q_ALL, &nh, &nt, &dim, &dt),
                          KVT_OK);
        KVT_EXPECT(nh == 4 && nt == 300 && dim == 16 && dt == KVT_DTYPE_BF16);
        free(buf);

        cJSON *h = cJSON_Parse(kvt_trace_reader_header_json(r));
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(h, "model");
        const cJSON *rope = cJSON_GetObjectItemCaseSensitive(m, "rope");
        const cJSON *sy = cJSON_GetObjectItemCaseSensitive(h, "synthetic");
        const cJSON *en = cJSON_GetObjectItemCaseSensitive(h, "engine");
        KVT_EXPECT(h && m && rope && sy && en);
        if (h && m && rope && sy && en) {
            KVT_EXPECT(!strcmp(cJSON_GetObjectItem(h, "format")->valuestring, "kvtrace"));
            KVT_EXPECT(cJSON_IsString(cJSON_GetObjectItem(h, "created_by")));
            KVT_EXPECT(!strcmp(cJSON_GetObjectItem(m, "name")->valuestring, "synthetic-tiny-vl"));
            KVT_EXPECT(cJSON_GetObjectItem(m, "n_layers")->valueint == 2);
            KVT_EXPECT(cJSON_GetObjectItem(m, "n_q_heads")->valueint == 4);
            KVT_EXPECT(cJSON_GetObjectItem(m, "n_kv_heads")->valueint == 2);
            KVT_EXPECT(cJSON_GetObjectItem(m, "head_dim")->valueint == 16);
            KVT_EXPECT(!strcmp(cJSON_GetObjectItem(rope, "type")->valuestring, "mrope"));
            KVT_EXPECT(cJSON_GetObjectItem(rope, "theta")->valuedouble == 1e6);
            KVT_EXPECT(!strcmp(cJSON_GetObjectItem(h, "kv_dtype")->valuestring, "bf16"));
            KVT_EXPECT(cJSON_GetObjectItem(h, "n_tokens")->valueint == 300);
            KVT_EXPECT(cJSON_GetObjectItem(h, "window")->valueint == 32);
            KVT_EXPECT(cJSON_GetObjectItem(h, "n_decode")->valueint == 16);
            KVT_EXPECT(cJSON_IsNull(cJSON_GetObjectItem(h, "gpu")));
            KVT_EXPECT(!strcmp(cJSON_GetObjectItem(en, "name")->valuestring, "kvtrace-synth"));
            KVT_EXPECT(cJSON_GetObjectItem(sy, "seed")->valueint == 1);
            KVT_EXPECT_NEAR(cJSON_GetObjectItem(sy, "image_frac")->valuedouble, 0.6, 1e-12);
            KVT_EXPECT(cJSON_IsString(cJSON_GetObjectItem(sy, "description")));
            const cJSON *ly = cJSON_GetObjectItem(sy, "layers");
            KVT_EXPECT(cJSON_GetArraySize(ly) == 2);
            const cJSON *l1 = cJSON_GetArrayItem(ly, 1);
            const cJSON *nd = cJSON_GetObjectItem(l1, "needles");
            KVT_EXPECT(cJSON_GetArraySize(nd) == (int)a->n_needles);
            if (a->n_needles && cJSON_GetArraySize(nd) > 0)
                KVT_EXPECT(cJSON_GetArrayItem(nd, 0)->valueint == (int)a->needle_idx[0]);
        }
        cJSON_Delete(h);
    }
    kvt_trace_reader_close(r);
    expect_verifies(p1);
    kvt_synth_layer_free(a);
    kvt_synth_layer_free(b);
    unlink(p1);
    unlink(p2);
    unlink(p3);
}

/* --layers: the shape's first n layers, each record (tables too) with the same payload as in
 * the whole shape's trace; model.n_layers says n; bad counts are refused */
static void test_layers(void)
{
    kvt_synth_opts o = opts("tiny-vl", 200), r;
    const kvt_synth_shape *sh;
    o.q_all = true;
    o.n_layers = 3; /* tiny-vl has 2 */
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "layers 3") && strstr(kvt_error_msg(), "1..2"));
    o.n_layers = -1;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_ERR_INVALID_ARG);
    o.n_layers = 0;
    KVT_EXPECT_STATUS(kvt_synth_opts_resolve(&o, &r, &sh), KVT_OK);
    KVT_EXPECT(r.n_layers == 2);
    uint64_t raw_all = 0, raw_one = 0;
    KVT_EXPECT_STATUS(kvt_synth_raw_bytes(&o, &raw_all), KVT_OK);

    kvt_writer_opts w = {.force = true};
    kvt_test_tmp(p1, sizeof(p1), "l_all.kvt");
    kvt_test_tmp(p2, sizeof(p2), "l_one.kvt");
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p1, &w), KVT_OK);
    o.n_layers = 1;
    KVT_EXPECT_STATUS(kvt_synth_raw_bytes(&o, &raw_one), KVT_OK);
    KVT_EXPECT(raw_one > 0 && raw_one < raw_all);
    KVT_EXPECT_STATUS(kvt_synth_write(&o, p2, &w), KVT_OK);

    kvt_trace_reader *a = NULL, *b = NULL;
    KVT_EXPECT_STATUS(kvt_trace_reader_open(p1, &a), KVT_OK);
    KVT_EXPECT_STATUS(kvt_trace_reader_open(p2, &b), KVT_OK);
    if (a && b) {
        size_t na = kvt_trace_reader_n_records(a), nb = kvt_trace_reader_n_records(b);
        size_t n_l0 = 0, n_l1 = 0, checked = 0;
        for (size_t i = 0; i < na; i++) {
            kvt_record_info ri;
            kvt_trace_reader_record(a, i, &ri);
            n_l0 += ri.layer <= 0;
            n_l1 += ri.layer == 1;
        }
        KVT_EXPECT_EQ_U64(nb, n_l0); /* the tables and layer 0, nothing of layer 1 */
        KVT_EXPECT(n_l1 > 0);
        for (size_t i = 0; i < nb && i < na; i++) {
            kvt_record_info x, y;
            kvt_trace_reader_record(a, i, &x);
            kvt_trace_reader_record(b, i, &y);
            KVT_EXPECT(x.kind == y.kind && x.layer == y.layer && x.head_begin == y.head_begin &&
                       x.head_end == y.head_end && x.raw_bytes == y.raw_bytes && y.layer <= 0);
            if (x.raw_bytes != y.raw_bytes || x.raw_bytes == 0)
                continue;
            uint8_t *px = malloc(x.raw_bytes), *py = malloc(y.raw_bytes);
            KVT_EXPECT_STATUS(kvt_trace_reader_read_record(a, i, px, x.raw_bytes), KVT_OK);
            KVT_EXPECT_STATUS(kvt_trace_reader_read_record(b, i, py, y.raw_bytes), KVT_OK);
            KVT_EXPECT(!memcmp(px, py, x.raw_bytes));
            checked++;
            free(px);
            free(py);
        }
        KVT_EXPECT_EQ_U64(checked, nb);
        cJSON *h = cJSON_Parse(kvt_trace_reader_header_json(b));
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(h, "model");
        const cJSON *sy = cJSON_GetObjectItemCaseSensitive(h, "synthetic");
        KVT_EXPECT(cJSON_GetObjectItem(m, "n_layers")->valueint == 1);
        KVT_EXPECT(cJSON_GetObjectItem(sy, "shape_n_layers")->valueint == 2);
        KVT_EXPECT(cJSON_GetArraySize(cJSON_GetObjectItem(sy, "layers")) == 1);
        cJSON_Delete(h);
    }
    kvt_trace_reader_close(a);
    kvt_trace_reader_close(b);
    expect_verifies(p2);
    unlink(p1);
    unlink(p2);
}

static void test_tokens(void)
{
    kvt_synth_opts o = opts("qwen2-vl-7b", 1000);
    kvt_synth_tokens *t = NULL;
    KVT_EXPECT_STATUS(kvt_synth_tokens_create(&o, &t), KVT_OK);
    if (!t)
        return;
    uint32_t T = t->n_tokens, n_img = t->image_end - t->image_begin;
    KVT_EXPECT(n_img == 600 && t->image_end <= T - 32);
    KVT_EXPECT(t->grid_h * t->grid_w >= n_img && (t->grid_h - 1) * t->grid_w < n_img);
    uint32_t ib = t->image_begin, cnt = 0;
    for (uint32_t i = 0; i < T; i++)
        cnt += t->modality[i] == KVT_MOD_IMAGE;
    KVT_EXPECT(cnt == n_img);
    KVT_EXPECT(t->token_ids[ib] == 151655 && t->token_ids[0] == 151644);
    const int32_t *pt = t->positions, *ph = t->positions + T, *pw = t->positions + 2 * T;
    bool ok = true;
    for (uint32_t i = 0; i < ib; i++)
        ok &= pt[i] == (int32_t)i && ph[i] == (int32_t)i && pw[i] == (int32_t)i;
    for (uint32_t k = 0; k < n_img; k++) {
        uint32_t i = ib + k;
        ok &= pt[i] == (int32_t)ib && ph[i] == (int32_t)(ib + k / t->grid_w) &&
              pw[i] == (int32_t)(ib + k % t->grid_w);
    }
    int32_t next = (int32_t)(ib + (t->grid_h > t->grid_w ? t->grid_h : t->grid_w));
    ok &= pt[t->image_end] == next && ph[t->image_end] == next && pw[t->image_end] == next;
    ok &= pt[T - 1] == next + (int32_t)(T - 1 - t->image_end);
    ok &= t->decode_positions[0] == pt[T - 1] + 1;
    KVT_EXPECT(ok);
    kvt_synth_tokens_free(t);
    o = opts("llama3-8b", 100);
    KVT_EXPECT_STATUS(kvt_synth_tokens_create(&o, &t), KVT_OK);
    if (t) {
        KVT_EXPECT(t->n_pos == 1 && t->image_end == t->image_begin && t->positions[99] == 99);
        KVT_EXPECT(t->token_ids[0] == 128000);
    }
    kvt_synth_tokens_free(t);
}

/* SnapKV window score of query head h: a[j] = mean over the rows of q (n_q queries at the
 * end of the prompt, causal inside the window when `causal`) of softmax attention. */
static void window_attn(const kvt_synth_layer *x, const float *q, size_t n_q, bool causal, int h,
                        double *a)
{
    size_t T = x->n_tokens, D = (size_t)x->head_dim;
    const float *k = x->k + (size_t)(h / (x->n_q_heads / x->n_kv_heads)) * T * D;
    double *z = malloc(T * sizeof(double));
    memset(a, 0, T * sizeof(double));
    for (size_t i = 0; i < n_q; i++) {
        const float *qi = q + ((size_t)h * n_q + i) * D;
        size_t lim = causal ? T - n_q + i + 1 : T;
        double mx = -1e300, sum = 0;
        for (size_t j = 0; j < lim; j++) {
            double s = 0;
            for (size_t d = 0; d < D; d++)
                s += (double)qi[d] * k[j * D + d];
            z[j] = s / sqrt((double)D);
            mx = z[j] > mx ? z[j] : mx;
        }
        for (size_t j = 0; j < lim; j++)
            sum += z[j] = exp(z[j] - mx);
        for (size_t j = 0; j < lim; j++)
            a[j] += z[j] / sum / (double)n_q;
    }
    free(z);
}

/* |top-k(a) ∩ top-k(b)| / k over the prefix [0, P) */
static double topk_overlap(const double *a, const double *b, size_t P, size_t k)
{
    char *sel = calloc(P, 1);
    size_t ov = 0;
    for (int pass = 0; pass < 2; pass++) {
        const double *s = pass ? b : a;
        for (size_t r = 0; r < k; r++) {
            size_t best = P;
            for (size_t j = 0; j < P; j++)
                if (!(sel[j] & (1 << pass)) && (best == P || s[j] > s[best]))
                    best = j;
            sel[best] |= (char)(1 << pass);
            ov += pass && (sel[best] & 1);
        }
    }
    free(sel);
    return (double)ov / (double)k;
}

static double cosine(const float *a, const float *b, size_t D)
{
    double s = 0, na = 0, nb = 0;
    for (size_t d = 0; d < D; d++) {
        s += (double)a[d] * b[d];
        na += (double)a[d] * a[d];
        nb += (double)b[d] * b[d];
    }
    return s / sqrt(na * nb);
}

/* Attention structure on llama3-8b-shaped layers (D = 128, T = 1024). */
static void test_attention_structure(void)
{
    kvt_synth_opts o = opts("llama3-8b", 1024);
    kvt_synth_tokens *tok = NULL;
    KVT_CHECK(kvt_synth_tokens_create(&o, &tok));
    double sink_sum = 0, sink_max = 0, ret_min = 1, ret_sum = 0, loc_min = 1, loc_sum = 0;
    double other_recent = 0, overlap_sum = 0, cos_max = -1, cos_mean = 0;
    int n_heads = 0, n_ret = 0, n_loc = 0, n_other = 0;
    const size_t T = 1024;
    double *a = malloc(T * sizeof(double)), *ad = malloc(T * sizeof(double));
    for (int l = 0; l < 2; l++) {
        kvt_synth_layer *x = NULL;
        KVT_CHECK(kvt_synth_layer_create(&o, tok, l, &x));
        const size_t W = x->window, G = x->n_decode, D = (size_t)x->head_dim;
        KVT_EXPECT(x->n_needles == 2);
        for (int h = 0; h < x->n_q_heads; h++) {
            window_attn(x, x->q_window, W, true, h, a);
            window_attn(x, x->q_decode, G, false, h, ad);
            double sink = 0, needle = 0, recent = 0;
            for (uint32_t j = 0; j < tok->n_sinks; j++)
                sink += a[j];
            for (uint32_t n = 0; n < x->n_needles; n++)
                needle += a[x->needle_idx[n]];
            for (size_t j = T - W - 64; j < T; j++)
                recent += a[j];
            sink_sum += sink;
            sink_max = sink > sink_max ? sink : sink_max;
            n_heads++;
            if (x->head_role[h] == KVT_SYNTH_ROLE_RETRIEVAL) {
                ret_min = needle < ret_min ? needle : ret_min;
                ret_sum += needle;
                n_ret++;
            } else if (x->head_role[h] == KVT_SYNTH_ROLE_LOCAL) {
                loc_min = recent < loc_min ? recent : loc_min;
                loc_sum += recent;
                n_loc++;
            } else {
                other_recent += recent;
                n_other++;
            }
            overlap_sum += topk_overlap(a, ad, T - W, (T - W) / 10);
            for (size_t i = 0; i < G; i++)
                for (size_t w = 0; w < W; w++) {
                    double c =
                        cosine(x->q_decode + (h * G + i) * D, x->q_window + (h * W + w) * D, D);
                    cos_max = c > cos_max ? c : cos_max;
                    cos_mean += c / (double)(G * W);
                }
        }
        /* values: sinks tiny, needles heavy, a few heavy tokens */
        double vmean = 0, vsink = 0, vneedle = 0;
        for (size_t t = 0; t < T; t++) {
            double s = 0;
            for (size_t d = 0; d < D; d++)
                s += (double)x->v[t * D + d] * x->v[t * D + d];
            vmean += sqrt(s) / (double)T;
            if (t < tok->n_sinks)
                vsink += sqrt(s) / tok->n_sinks;
            for (uint32_t k = 0; k < x->n_needles; k++)
                if (x->needle_idx[k] == t)
                    vneedle += sqrt(s) / x->n_needles;
        }
        KVT_EXPECT_MSG(vsink < 0.3 * vmean && vneedle > 2.0 * vmean,
                       "value norms: sinks %.2f needles %.2f mean %.2f", vsink, vneedle, vmean);
        kvt_synth_layer_free(x);
    }
    printf("attention (llama3-8b, T=1024, 2 layers): sink share mean %.3f max %.3f; retrieval "
           "needle share min %.3f mean %.3f; local recent share min %.3f mean %.3f (others "
           "%.3f); decode/window top-10%% overlap %.2f; query cos mean %.2f max %.3f\n",
           sink_sum / n_heads, sink_max, ret_min, ret_sum / n_ret, loc_min, loc_sum / n_loc,
           other_recent / n_other, overlap_sum / n_heads, cos_mean / n_heads, cos_max);
    /* 4 sink tokens of 1024 would get 0.4% of uniform attention */
    KVT_EXPECT(sink_sum / n_heads > 0.15 && sink_max > 0.6);
    KVT_EXPECT(n_ret > 0 && ret_min > 0.25 && ret_sum / n_ret > 0.5);
    KVT_EXPECT(n_loc > 0 && loc_min > 0.25 && loc_sum / n_loc > 4 * other_recent / n_other);
    /* decode queries resemble the window queries without equalling them */
    KVT_EXPECT(overlap_sum / n_heads > 0.4 && overlap_sum / n_heads < 0.95);
    KVT_EXPECT(cos_mean / n_heads > 0.4 && cos_max < 0.99);
    free(a);
    free(ad);
    kvt_synth_tokens_free(tok);
}

/* Key redundancy r per KV head: spread, matches the design, image > text. */
static void test_redundancy(void)
{
    kvt_synth_opts o = opts("llama3-8b", 512);
    double rmin = 1, rmax = 0, err = 0;
    for (int l = 0; l < 3; l++) {
        kvt_synth_layer *x = NULL;
        KVT_CHECK(kvt_synth_layer_create(&o, NULL, l, &x));
        for (int g = 0; g < x->n_kv_heads; g++) {
            double r = kvt_synth_redundancy(x->k + (size_t)g * 512 * 128, 128, 0, 512);
            rmin = r < rmin ? r : rmin;
            rmax = r > rmax ? r : rmax;
            double e = fabs(r - x->r_target[g]);
            err = e > err ? e : err;
        }
        kvt_synth_layer_free(x);
    }
    printf("redundancy (llama3-8b, T=512, 3 layers x 8 KV heads): r in [%.3f, %.3f], max "
           "|r - r_target| %.3f\n",
           rmin, rmax, err);
    KVT_EXPECT(rmin < 0.2 && rmax > 0.85 && err < 0.07);

    /* near-duplicates: keys of one cluster are much closer to each other than to the rest */
    o = opts("llama3-8b", 512);
    kvt_synth_layer *x = NULL;
    KVT_CHECK(kvt_synth_layer_create(&o, NULL, 0, &x));
    double in_min = 1, out_max = -1;
    for (int g = 0; g < x->n_kv_heads; g++) {
        const float *k = x->k + (size_t)g * 512 * 128;
        const int16_t *c = x->key_cluster + (size_t)g * 512;
        double in = 0, out = 0;
        int n_in = 0, n_out = 0;
        for (size_t s1 = 0; s1 < 512; s1++)
            for (size_t s2 = s1 + 1; s2 < 512; s2++) {
                if (c[s1] < 0 || c[s2] < 0)
                    continue;
                double cs = cosine(k + s1 * 128, k + s2 * 128, 128);
                if (c[s1] == c[s2])
                    in += cs, n_in++;
                else
                    out += cs, n_out++;
            }
        if (n_in && n_out) {
            in_min = in / n_in < in_min ? in / n_in : in_min;
            out_max = out / n_out > out_max ? out / n_out : out_max;
            /* the gap over the head's baseline r is most of what is left */
            KVT_EXPECT(in / n_in - out / n_out > 0.5 * (1 - out / n_out));
        }
    }
    printf("near-duplicate clusters (llama3-8b layer 0): mean cosine within a cluster >= %.3f "
           "(between clusters <= %.3f)\n",
           in_min, out_max);
    KVT_EXPECT(in_min > 0.8);
    kvt_synth_layer_free(x);

    o = opts("tiny-vl", 1024);
    kvt_synth_tokens *tok = NULL;
    KVT_CHECK(kvt_synth_tokens_create(&o, &tok));
    double gap_min = 1, gap_mean = 0, img_min = 1, txt_max = 0;
    for (int l = 0; l < 2; l++) {
        x = NULL;
        KVT_CHECK(kvt_synth_layer_create(&o, tok, l, &x));
        for (int g = 0; g < x->n_kv_heads; g++) {
            const float *k = x->k + (size_t)g * 1024 * 16;
            double ri = kvt_synth_redundancy(k, 16, tok->image_begin, tok->image_end);
            double rt = kvt_synth_redundancy(k, 16, tok->image_end, 1024);
            /* the share of the remaining dissimilarity 1 - r_text that images remove */
            double gap = (ri - rt) / (1.0 - rt);
            gap_min = gap < gap_min ? gap : gap_min;
            gap_mean += (ri - rt) / 4;
            img_min = ri < img_min ? ri : img_min;
            txt_max = rt > txt_max ? rt : txt_max;
        }
        kvt_synth_layer_free(x);
    }
    printf("image vs text (tiny-vl, T=1024): r_image - r_text mean %.3f, min over heads of "
           "(r_image - r_text) / (1 - r_text) %.3f; r_image min %.3f, r_text max %.3f\n",
           gap_mean, gap_min, img_min, txt_max);
    KVT_EXPECT(gap_min > 0.3 && gap_mean > 0.2);
    kvt_synth_tokens_free(tok);
}

/* colsum against a brute-force causal softmax in double */
static void test_colsum(void)
{
    kvt_synth_opts o = opts("tiny", 77);
    o.colsum = KVT_SYNTH_ON;
    o.q_all = true;
    o.dtype = KVT_DTYPE_F16;
    kvt_synth_layer *x = NULL;
    KVT_CHECK(kvt_synth_layer_create(&o, NULL, 1, &x));
    const size_t T = 77, D = 16;
    double worst = 0;
    for (int h = 0; h < x->n_q_heads; h++) {
        const float *q = x->q_all + (size_t)h * T * D;
        const float *k = x->k + (size_t)(h / 2) * T * D;
        double ref[77] = {0}, total = 0;
        for (size_t i = 0; i < T; i++) {
            double z[77], mx = -1e300, sum = 0;
            for (size_t j = 0; j <= i; j++) {
                double s = 0;
                for (size_t d = 0; d < D; d++)
                    s += (double)q[i * D + d] * k[j * D + d];
                z[j] = s / 4.0;
                mx = z[j] > mx ? z[j] : mx;
            }
            for (size_t j = 0; j <= i; j++)
                sum += z[j] = exp(z[j] - mx);
            for (size_t j = 0; j <= i; j++)
                ref[j] += z[j] / sum;
        }
        for (size_t j = 0; j < T; j++) {
            double got = x->attn_colsum[(size_t)h * T + j];
            double e = fabs(got - ref[j]) / (1e-6 + fabs(ref[j]));
            worst = e > worst ? e : worst;
            total += got;
        }
        KVT_EXPECT_NEAR(total, (double)T, 1e-3); /* every row sums to 1 */
        /* the sinks collect much more than a uniform share */
        KVT_EXPECT(x->attn_colsum[(size_t)h * T] > 1.0);
    }
    printf("colsum vs brute force (tiny, T=77, f16): max relative error %.2e\n", worst);
    KVT_EXPECT(worst < 1e-4);
    kvt_synth_layer_free(x);

    /* the blockwise kernel alone, T not a multiple of the block, odd keys */
    float q[37 * 3], k[37 * 3], out[37];
    kvt_rng r;
    kvt_rng_seed(&r, 5);
    for (int i = 0; i < 37 * 3; i++) {
        q[i] = (float)(3 * kvt_rng_normal(&r));
        k[i] = (float)kvt_rng_normal(&r);
    }
    KVT_EXPECT_STATUS(kvt_synth_colsum_head(q, k, 37, 3, out), KVT_OK);
    double tot = 0;
    for (int j = 0; j < 37; j++)
        tot += out[j];
    KVT_EXPECT_NEAR(tot, 37.0, 1e-4);
    KVT_EXPECT_STATUS(kvt_synth_colsum_head(NULL, k, 37, 3, out), KVT_ERR_INVALID_ARG);
}

/* Fail the n-th allocation for n = 1, 2, ... until the call succeeds: every failure is a
 * clean KVT_ERR_NOMEM (or the writer's error), with nothing leaked (ASan build). */
static void test_alloc_failures(void)
{
    kvt_synth_opts o = opts("tiny-vl", 64);
    o.colsum = KVT_SYNTH_ON;
    o.q_all = true;
    kvt_status s = KVT_ERR_NOMEM;
    int n = 1, bad = 0;
    for (; n < 1000 && s != KVT_OK; n++) {
        kvt_synth_layer *x = NULL;
        kvt_alloc_fail_at((uint64_t)n);
        s = kvt_synth_layer_create(&o, NULL, 0, &x);
        bad += s != KVT_OK && (s != KVT_ERR_NOMEM || x != NULL);
        kvt_synth_layer_free(x);
    }
    kvt_alloc_fail_at(0);
    KVT_EXPECT(s == KVT_OK && bad == 0);
    kvt_writer_opts wo = {.force = true};
    kvt_test_tmp(p1, sizeof(p1), "fault.kvt");
    o.n_threads = 2;
    s = KVT_ERR_NOMEM;
    for (n = 1; n < 2000 && s != KVT_OK; n++) {
        kvt_alloc_fail_at((uint64_t)n);
        s = kvt_synth_write(&o, p1, &wo);
    }
    kvt_alloc_fail_at(0);
    KVT_EXPECT_STATUS(s, KVT_OK);
    printf("allocation failures: synth_write succeeded after %d injected failures\n", n - 2);
    unlink(p1);
}

int main(void)
{
    test_options();
    test_shapes();
    test_edges();
    test_tokens();
    test_determinism();
    test_layers();
    test_redundancy();
    test_attention_structure();
    test_colsum();
    test_alloc_failures();
    return kvt_test_result("test_synth");
}
