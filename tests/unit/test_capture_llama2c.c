/* test_capture_llama2c.c - the llama2.c engine against the independent NumPy oracle
 * (tests/oracle/llama2c_oracle.py), on the real stories260K checkpoint and on a synthetic
 * GQA checkpoint with a separate classifier (negative vocab_size):
 * - logits at every prompt and decode position match to 1e-4 (max |diff| / max |oracle|);
 * - the captured K, V, Q_window, Q_all, decode Q/K/V and column sums, read back as f32, equal
 *   the oracle's post-RoPE tensors to the same tolerance; the token tables are exact;
 * - greedy decoding agrees with the oracle's argmax and is deterministic: two captures give
 *   byte-identical traces; a bf16 capture is exactly the f32 one rounded;
 * - a compressed cache (set_mask, rewind): see check_mask.
 * Skips (77) when no Python with NumPy is available (KVT_PYTHON).
 */
#include <sys/stat.h>
#include <sys/wait.h>

#include "kvt_llama2c.h"
#include "kvt_test.h"
#include "kvt_trace.h"

/* f32 engine vs f64 oracle: a few hundred f32 roundings deep; 1e-4 is the bound. */
#define ORACLE_RTOL 1e-4

static char tmpdir[256];
static double worst_logit_err, worst_tensor_err;

static double *load_f64(const char *dir, const char *name, size_t want)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/%s.f64", dir, name);
    size_t n = 0;
    double *d = (void *)kvt_test_slurp(p, &n);
    if (!d || n != want * sizeof(double)) {
        fprintf(stderr, "oracle output %s: %zu bytes, want %zu\n", p, n, want * sizeof(double));
        exit(1);
    }
    return d;
}

typedef struct oracle {
    int L, Hq, Hkv, D, V, N, T;
    double *logits, *q, *k, *v, *colsum;
} oracle;

/* Run the oracle over `ids` (prompt T then decode inputs). Returns false to skip. */
static bool run_oracle(const char *python, const char *model, const int32_t *ids, uint32_t n,
                       uint32_t T, const char *tag, oracle *o)
{
    char ids_path[512], out[512], cmd[2048];
    snprintf(ids_path, sizeof(ids_path), "%s/%s_ids.txt", tmpdir, tag);
    snprintf(out, sizeof(out), "%s/%s_oracle", tmpdir, tag);
    FILE *f = fopen(ids_path, "w");
    if (!f)
        exit(1);
    for (uint32_t i = 0; i < n; i++)
        fprintf(f, "%d%c", (int)ids[i], i + 1 == n ? '\n' : ' ');
    fclose(f);
    const char *root = getenv("KVT_SOURCE_ROOT");
    snprintf(cmd, sizeof(cmd),
             "'%s' '%s/tests/oracle/llama2c_oracle.py' --model '%s' --ids '%s' --prompt %u "
             "--out '%s'",
             python, root ? root : ".", model, ids_path, T, out);
    int rc = system(cmd);
    if (rc != 0 && WIFEXITED(rc) && WEXITSTATUS(rc) == 77)
        return false;
    if (rc != 0) {
        fprintf(stderr, "oracle failed (%d): %s\n", rc, cmd);
        exit(1);
    }
    char sp[600];
    snprintf(sp, sizeof(sp), "%s/shape.txt", out);
    f = fopen(sp, "r");
    if (!f ||
        fscanf(f, "%d %d %d %d %d %d %d", &o->L, &o->Hq, &o->Hkv, &o->D, &o->V, &o->N, &o->T) != 7)
        exit(1);
    fclose(f);
    size_t L = (size_t)o->L, N = (size_t)o->N;
    o->logits = load_f64(out, "logits", N * (size_t)o->V);
    o->q = load_f64(out, "q", L * N * (size_t)(o->Hq * o->D));
    o->k = load_f64(out, "k", L * N * (size_t)(o->Hkv * o->D));
    o->v = load_f64(out, "v", L * N * (size_t)(o->Hkv * o->D));
    o->colsum = load_f64(out, "colsum", L * (size_t)o->Hq * (size_t)o->T);
    return true;
}

static void oracle_free(oracle *o)
{
    free(o->logits);
    free(o->q);
    free(o->k);
    free(o->v);
    free(o->colsum);
}

/* max |a - b| / max |b| over n values */
static double rel_err(const float *a, const double *b, size_t n)
{
    double mx = 0, md = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= md))
            md = d; /* NaN propagates */
        if (fabs(b[i]) > mx)
            mx = fabs(b[i]);
    }
    return mx > 0 ? md / mx : md;
}

/* Compare trace tensor (layer, kind) [H, n, D] with oracle rows src[l][t0 + t][h][d] of an
 * [L, N, H, D] array. */
static void check_tensor(kvt_trace_reader *r, int layer, int kind, const double *src, int H, int D,
                         int N, int t0, int n, const char *what)
{
    uint32_t nh, nt, dim;
    kvt_dtype dt;
    KVT_EXPECT_STATUS(kvt_trace_reader_shape(r, layer, kind, &nh, &nt, &dim, &dt), KVT_OK);
    KVT_EXPECT_EQ_U64(nh, H);
    KVT_EXPECT_EQ_U64(nt, n);
    KVT_EXPECT_EQ_U64(dim, D);
    size_t cnt = (size_t)H * n * D;
    float *got = calloc(cnt, sizeof(float));
    double *want = calloc(cnt, sizeof(double));
    KVT_EXPECT_STATUS(kvt_trace_reader_read(r, layer, kind, 0, (uint32_t)H, KVT_DTYPE_F32, got,
                                            cnt * sizeof(float)),
                      KVT_OK);
    const double *base = src + (size_t)layer * N * H * D;
    for (int h = 0; h < H; h++)
        for (int t = 0; t < n; t++)
            for (int d = 0; d < D; d++)
                want[((size_t)h * n + t) * D + d] = base[((size_t)(t0 + t) * H + h) * D + d];
    double e = rel_err(got, want, cnt);
    if (e > worst_tensor_err)
        worst_tensor_err = e;
    KVT_EXPECT_MSG(e <= ORACLE_RTOL, "%s layer %d: rel err %.3g", what, layer, e);
    free(got);
    free(want);
}

static void check_i32(kvt_trace_reader *r, int kind, const int32_t *want, uint32_t n)
{
    int32_t *got = calloc(n, sizeof(int32_t));
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, -1, kind, 0, 1, KVT_DTYPE_INVALID, got, n * sizeof(int32_t)),
        KVT_OK);
    KVT_EXPECT_MSG(!memcmp(got, want, n * sizeof(int32_t)), "%s differs", kvt_kind_name(kind));
    free(got);
}

/* Capture with the engine, then compare everything with the oracle. */
static bool check_model(const char *python, const char *model, const char *tag,
                        const int32_t *prompt, uint32_t T, uint32_t G, uint32_t W)
{
    char trace[512], trace2[512], trace_bf[512];
    snprintf(trace, sizeof(trace), "%s/%s.kvt", tmpdir, tag);
    snprintf(trace2, sizeof(trace2), "%s/%s_again.kvt", tmpdir, tag);
    snprintf(trace_bf, sizeof(trace_bf), "%s/%s_bf16.kvt", tmpdir, tag);
    struct kvt_llama2c_capture_opts o = {.prompt_ids = prompt,
                                         .n_prompt = T,
                                         .seed = 7,
                                         .temperature = 1.0f,
                                         .n_decode = G,
                                         .window = W,
                                         .with_colsum = true,
                                         .with_q_all = true,
                                         .kv_dtype = KVT_DTYPE_F32,
                                         .writer = {.n_threads = 2, .force = true}};
    struct kvt_llama2c_capture_result res, res2;
    KVT_CHECK(kvt_llama2c_capture(model, &o, trace, &res, true));
    KVT_EXPECT_EQ_U64(res.n_tokens, T + G + 1);
    KVT_EXPECT_EQ_U64(res.stats.n_decode, G);
    if (!prompt)
        KVT_EXPECT_EQ_U64(res.tokens[0], KVT_LLAMA2C_BOS);

    /* determinism: same options, other thread count -> same bytes */
    o.writer.n_threads = 0;
    KVT_CHECK(kvt_llama2c_capture(model, &o, trace2, &res2, false));
    KVT_EXPECT(!memcmp(res.tokens, res2.tokens, res.n_tokens * sizeof(int32_t)));
    size_t n1, n2;
    uint8_t *b1 = (void *)kvt_test_slurp(trace, &n1), *b2 = (void *)kvt_test_slurp(trace2, &n2);
    KVT_EXPECT_MSG(b1 && b2 && n1 == n2 && !memcmp(b1, b2, n1), "%s: two captures differ", tag);
    free(b1);
    free(b2);
    kvt_free(res2.tokens);

    oracle orc;
    if (!run_oracle(python, model, res.tokens, T + G, T, tag, &orc)) {
        kvt_free(res.tokens);
        kvt_free(res.logits);
        return false;
    }
    int L = orc.L, Hq = orc.Hq, Hkv = orc.Hkv, D = orc.D, V = orc.V, N = orc.N;
    KVT_EXPECT_EQ_U64(N, T + G);

    /* logits, position by position */
    double le = 0;
    for (int p = 0; p < N; p++) {
        double e = rel_err(res.logits + (size_t)p * V, orc.logits + (size_t)p * V, (size_t)V);
        if (e > le)
            le = e;
    }
    if (le > worst_logit_err)
        worst_logit_err = le;
    KVT_EXPECT_MSG(le <= ORACLE_RTOL, "%s: logits rel err %.3g", tag, le);

    /* greedy agreement: each decode input is the oracle's argmax at the previous position,
     * unless the oracle's top two are too close to call */
    int n_agree = 0;
    for (uint32_t g = 0; g <= G; g++) {
        const double *lg = orc.logits + (size_t)(T - 1 + g) * V;
        int best = 0, second = -1;
        for (int i = 1; i < V; i++) {
            if (lg[i] > lg[best]) {
                second = best;
                best = i;
            } else if (second < 0 || lg[i] > lg[second]) {
                second = i;
            }
        }
        if (lg[best] - lg[second] < 1e-3)
            continue;
        KVT_EXPECT_MSG(best == res.tokens[T + g], "%s: step %u: oracle argmax %d, engine %d", tag,
                       g, best, (int)res.tokens[T + g]);
        n_agree++;
    }
    KVT_EXPECT(n_agree >= (int)G / 2);

    /* captured tensors vs the oracle's */
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(trace, &r));
    KVT_EXPECT(!kvt_trace_reader_recovered(r));
    worst_tensor_err = 0;
    for (int l = 0; l < L; l++) {
        check_tensor(r, l, KVT_KIND_K, orc.k, Hkv, D, N, 0, (int)T, "K");
        check_tensor(r, l, KVT_KIND_V, orc.v, Hkv, D, N, 0, (int)T, "V");
        check_tensor(r, l, KVT_KIND_Q_WINDOW, orc.q, Hq, D, N, (int)(T - W), (int)W, "Q_window");
        check_tensor(r, l, KVT_KIND_Q_ALL, orc.q, Hq, D, N, 0, (int)T, "Q_all");
        check_tensor(r, l, KVT_KIND_Q_DECODE, orc.q, Hq, D, N, (int)T, (int)G, "Q_decode");
        check_tensor(r, l, KVT_KIND_K_DECODE, orc.k, Hkv, D, N, (int)T, (int)G, "K_decode");
        check_tensor(r, l, KVT_KIND_V_DECODE, orc.v, Hkv, D, N, (int)T, (int)G, "V_decode");
        /* column sums: oracle [L, Hq, T] seen as [L, T, Hq, 1]-like rows via a transpose */
        size_t cn = (size_t)Hq * T;
        float *cs = calloc(cn, sizeof(float));
        KVT_EXPECT_STATUS(kvt_trace_reader_read(r, l, KVT_KIND_ATTN_COLSUM, 0, (uint32_t)Hq,
                                                KVT_DTYPE_F32, cs, cn * sizeof(float)),
                          KVT_OK);
        double e = rel_err(cs, orc.colsum + (size_t)l * cn, cn);
        KVT_EXPECT_MSG(e <= ORACLE_RTOL, "colsum layer %d: rel err %.3g", l, e);
        if (e > worst_tensor_err)
            worst_tensor_err = e;
        /* each query row sums to 1, so the column sums of a head add up to T */
        double tot = 0;
        for (size_t i = 0; i < T; i++)
            tot += cs[i];
        KVT_EXPECT_NEAR(tot, T, 1e-3 * T);
        free(cs);
    }
    check_i32(r, KVT_KIND_TOKEN_IDS, res.tokens, T);
    check_i32(r, KVT_KIND_DECODE_TOKEN_IDS, res.tokens + T, G);
    int32_t *pos = malloc(T * sizeof(int32_t));
    for (uint32_t i = 0; i < T; i++)
        pos[i] = (int32_t)i;
    check_i32(r, KVT_KIND_POSITIONS, pos, T);
    free(pos);
    printf("%s: T=%u G=%u W=%u: logits max rel err %.3g, captured tensors max rel err %.3g, "
           "%d/%u greedy steps checked\n",
           tag, T, G, W, le, worst_tensor_err, n_agree, G + 1);

    /* a bf16 capture stores exactly the f32 values rounded to nearest even */
    o.kv_dtype = KVT_DTYPE_BF16;
    KVT_CHECK(kvt_llama2c_capture(model, &o, trace_bf, NULL, false));
    kvt_trace_reader *rb;
    KVT_CHECK(kvt_trace_reader_open(trace_bf, &rb));
    size_t kn = (size_t)Hkv * T * D;
    float *kf = calloc(kn, sizeof(float));
    uint16_t *kb = calloc(kn, sizeof(uint16_t));
    for (int l = 0; l < L; l++) {
        KVT_CHECK(kvt_trace_reader_read(r, l, KVT_KIND_K, 0, (uint32_t)Hkv, KVT_DTYPE_F32, kf,
                                        kn * sizeof(float)));
        KVT_CHECK(kvt_trace_reader_read(rb, l, KVT_KIND_K, 0, (uint32_t)Hkv, KVT_DTYPE_INVALID, kb,
                                        kn * sizeof(uint16_t)));
        size_t bad = 0;
        for (size_t i = 0; i < kn; i++)
            bad += kb[i] != kvt_f32_to_bf16(kf[i]);
        KVT_EXPECT_EQ_U64(bad, 0);
    }
    free(kf);
    free(kb);
    kvt_trace_reader_close(rb);
    kvt_trace_reader_close(r);
    oracle_free(&orc);
    kvt_free(res.tokens);
    kvt_free(res.logits);
    return true;
}

/* A random checkpoint: GQA (4 query heads, 2 KV heads), separate classifier (vocab < 0). */
static void write_synthetic(const char *path)
{
    int32_t hdr[7] = {32, 48, 2, 4, 2, -40, 64}; /* dim hidden L Hq Hkv vocab seq_len */
    int dim = 32, hidden = 48, L = 2, kv_dim = 16, V = 40, S = 64, hs = 8;
    size_t n = (size_t)V * dim + (size_t)L * dim + (size_t)L * dim * dim +
               2 * (size_t)L * kv_dim * dim + (size_t)L * dim * dim + (size_t)L * dim +
               3 * (size_t)L * hidden * dim + (size_t)dim + (size_t)S * hs + (size_t)V * dim;
    float *w = malloc(n * sizeof(float));
    kvt_rng rng;
    kvt_rng_seed(&rng, 42);
    for (size_t i = 0; i < n; i++)
        w[i] = (float)(0.3 * kvt_rng_normal(&rng));
    /* RMSNorm weights near 1 so the signal survives the layers */
    size_t off = (size_t)V * dim;
    for (size_t i = 0; i < (size_t)L * dim; i++)
        w[off + i] = 1.0f + 0.1f * w[off + i];
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(hdr, 4, 7, f) != 7 || fwrite(w, sizeof(float), n, f) != n)
        exit(1);
    fclose(f);
    free(w);
}

/* kvt_llama2c_state_set_mask / _rewind (the compressed cache of kvtrace e2e-llama2c): a mask
 * that keeps everything changes no bit; dropping keys changes the decode logits but not the
 * prompt's run; rewinding replays a continuation exactly; bad arguments are refused. The
 * masked logits themselves are checked against the NumPy oracle by test_e2e_llama2c.py. */
static void check_mask(const char *model_path)
{
    enum { T = 30, G = 5 };
    kvt_llama2c_model *m = NULL;
    kvt_llama2c_state *a = NULL, *b = NULL;
    KVT_CHECK(kvt_llama2c_model_open(model_path, &m));
    const kvt_llama2c_config *c = kvt_llama2c_model_config(m);
    const int V = c->vocab_size, L = c->n_layers, Hq = c->n_heads, kv = c->kv_dim;
    KVT_CHECK(kvt_llama2c_state_create(m, false, &a));
    KVT_CHECK(kvt_llama2c_state_create(m, false, &b));
    uint8_t *all = malloc((size_t)L * Hq * T), *half = malloc((size_t)L * Hq * T);
    float *ref = malloc((size_t)G * V * sizeof(float));
    memset(all, 1, (size_t)L * Hq * T);
    for (size_t i = 0; i < (size_t)L * Hq * T; i++)
        half[i] = (uint8_t)(i % T >= T / 2); /* the first half of the prompt dropped */
    int32_t ids[T + G];
    for (int i = 0; i < T + G; i++)
        ids[i] = (int32_t)(1 + (i * 37) % (V - 1));
    const float *lg;
    /* b runs its prompt under a mask that drops everything: the prompt ignores it */
    KVT_CHECK(kvt_llama2c_state_set_mask(b, half, T));
    for (int i = 0; i < T; i++) {
        KVT_CHECK(kvt_llama2c_forward(a, ids[i], &lg));
        KVT_CHECK(kvt_llama2c_forward(b, ids[i], &lg));
    }
    for (int l = 0; l < L; l++)
        KVT_EXPECT(!memcmp(kvt_llama2c_state_keys(a, l), kvt_llama2c_state_keys(b, l),
                           (size_t)T * kv * sizeof(float)));
    for (int g = 0; g < G; g++) {
        KVT_CHECK(kvt_llama2c_forward(a, ids[T + g], &lg));
        memcpy(ref + (size_t)g * V, lg, (size_t)V * sizeof(float));
    }
    /* dropped keys change the continuation */
    double diff = 0;
    for (int g = 0; g < G; g++) {
        KVT_CHECK(kvt_llama2c_forward(b, ids[T + g], &lg));
        for (int v = 0; v < V; v++)
            diff = fmax(diff, fabs(lg[v] - ref[(size_t)g * V + v]));
    }
    KVT_EXPECT_MSG(diff > 1e-3, "dropping half the prompt changed the logits by only %g", diff);
    /* rewound with a mask that keeps everything: bit for bit the unmasked run */
    KVT_CHECK(kvt_llama2c_state_rewind(b, T));
    KVT_EXPECT_EQ_U64(kvt_llama2c_state_n_pos(b), T);
    KVT_CHECK(kvt_llama2c_state_set_mask(b, all, T));
    for (int g = 0; g < G; g++) {
        KVT_CHECK(kvt_llama2c_forward(b, ids[T + g], &lg));
        KVT_EXPECT_MSG(!memcmp(lg, ref + (size_t)g * V, (size_t)V * sizeof(float)),
                       "step %d: a keep-all mask changed the logits", g);
    }
    /* and cleared */
    KVT_CHECK(kvt_llama2c_state_rewind(b, T));
    KVT_CHECK(kvt_llama2c_state_set_mask(b, NULL, 0));
    KVT_CHECK(kvt_llama2c_forward(b, ids[T], &lg));
    KVT_EXPECT(!memcmp(lg, ref, (size_t)V * sizeof(float)));
    /* a merged cache: query head 0 of layer 1 sees token T-1's key and value at token 3; the
       continuation changes, and with the merged entries cleared it is the reference again,
       bit for bit (the cache itself was not touched) */
    const int D = c->head_dim;
    uint8_t *flag = calloc((size_t)L * Hq * T, 1);
    float *mk = calloc((size_t)L * Hq * T * D, sizeof(float));
    float *mv = calloc((size_t)L * Hq * T * D, sizeof(float));
    const size_t e = ((size_t)1 * Hq + 0) * T + 3; /* (layer 1, head 0, token 3) */
    flag[e] = 1;
    memcpy(mk + e * D, kvt_llama2c_state_keys(b, 1) + (size_t)(T - 1) * kv, (size_t)D * 4);
    memcpy(mv + e * D, kvt_llama2c_state_values(b, 1) + (size_t)(T - 1) * kv, (size_t)D * 4);
    KVT_CHECK(kvt_llama2c_state_rewind(b, T));
    KVT_CHECK(kvt_llama2c_state_set_merged(b, flag, mk, mv, T));
    KVT_CHECK(kvt_llama2c_forward(b, ids[T], &lg));
    diff = 0;
    for (int v = 0; v < V; v++)
        diff = fmax(diff, fabs(lg[v] - ref[v]));
    KVT_EXPECT_MSG(diff > 0, "a merged entry left the logits as they were");
    KVT_CHECK(kvt_llama2c_state_rewind(b, T));
    KVT_CHECK(kvt_llama2c_state_set_merged(b, NULL, NULL, NULL, 0));
    KVT_CHECK(kvt_llama2c_forward(b, ids[T], &lg));
    KVT_EXPECT(!memcmp(lg, ref, (size_t)V * sizeof(float)));
    KVT_EXPECT_STATUS(kvt_llama2c_state_set_merged(b, NULL, mk, mv, T), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_state_set_merged(b, flag, mk, mv, (uint32_t)c->seq_len + 1),
                      KVT_ERR_INVALID_ARG);
    free(flag);
    free(mk);
    free(mv);
    KVT_EXPECT_STATUS(kvt_llama2c_state_rewind(b, T + 2), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_state_set_mask(b, NULL, 4), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_state_set_mask(b, all, (uint32_t)c->seq_len + 1),
                      KVT_ERR_INVALID_ARG);
    free(all);
    free(half);
    free(ref);
    kvt_llama2c_state_free(a);
    kvt_llama2c_state_free(b);
    kvt_llama2c_model_close(m);
}

/* KVzip's reconstruction pass: chunk sizes that fit the context (stories260K: seq_len 512),
 * worked by hand; the pass leaves the state as it was, so the decode steps after it are bit for
 * bit those without it; every score is a probability (tests/oracle/test_kvzip.py checks their
 * values against NumPy). */
static void check_kvzip(const char *model_path)
{
    enum { T = 200, G = 4 };
    kvt_llama2c_model *m = NULL;
    kvt_llama2c_state *a = NULL, *b = NULL, *nq = NULL;
    KVT_CHECK(kvt_llama2c_model_open(model_path, &m));
    const kvt_llama2c_config *c = kvt_llama2c_model_config(m);
    KVT_EXPECT(c->seq_len == 512);
    uint32_t ch = 0;
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 448, 0, 0, &ch)); /* 64 positions left: tail 8 + 56 */
    KVT_EXPECT_EQ_U64(ch, 56);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 448, 3, 0, &ch)); /* 3 of them for the instruction */
    KVT_EXPECT_EQ_U64(ch, 53);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 100, 0, 0, &ch)); /* 412 left: one chunk, no tail */
    KVT_EXPECT_EQ_U64(ch, 100);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 256, 0, 0, &ch)); /* exactly one chunk's room */
    KVT_EXPECT_EQ_U64(ch, 256);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 257, 0, 0, &ch)); /* 255 left: 255, then 8 + 2 */
    KVT_EXPECT_EQ_U64(ch, 255);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 300, 3, 0, &ch)); /* 212 left: 3 + 209, 3 + 8 + 91 */
    KVT_EXPECT_EQ_U64(ch, 209);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 300, 0, 205, &ch)); /* 205, then 8 + 95 */
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip_chunk(c, 300, 0, 213, &ch), KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 100, 0, 600, &ch)); /* larger than T: one chunk */
    KVT_EXPECT_EQ_U64(ch, 600);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 448, 0, 56, &ch));
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip_chunk(c, 448, 0, 57, &ch), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "largest chunk that fits is 56") != NULL, "%s",
                   kvt_error_msg());
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 500, 0, 0, &ch)); /* 12 left: 6 + a 6-token tail */
    KVT_EXPECT_EQ_U64(ch, 6);
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip_chunk(c, 500, 0, 7, &ch), KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 497, 0, 0, &ch)); /* 15 left: 7 + 7 */
    KVT_EXPECT_EQ_U64(ch, 7);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 496, 0, 0, &ch)); /* 16 left: 8 + 8 */
    KVT_EXPECT_EQ_U64(ch, 8);
    KVT_CHECK(kvt_llama2c_kvzip_chunk(c, 510, 0, 0, &ch)); /* 2 left: 1 + 1 */
    KVT_EXPECT_EQ_U64(ch, 1);
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip_chunk(c, 511, 0, 0, &ch), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "a shorter prompt") != NULL);

    const int V = c->vocab_size, L = c->n_layers, Hkv = c->n_kv_heads;
    KVT_CHECK(kvt_llama2c_state_create(m, true, &a));
    KVT_CHECK(kvt_llama2c_state_create(m, true, &b));
    KVT_CHECK(kvt_llama2c_state_create(m, false, &nq));
    int32_t ids[T + G];
    for (int i = 0; i < T + G; i++)
        ids[i] = i == 0 ? KVT_LLAMA2C_BOS : (int32_t)(2 + (i * 37) % (V - 2));
    const float *lg;
    for (int i = 0; i < T; i++) {
        KVT_CHECK(kvt_llama2c_forward(a, ids[i], &lg));
        KVT_CHECK(kvt_llama2c_forward(b, ids[i], &lg));
        KVT_CHECK(kvt_llama2c_forward(nq, ids[i], &lg));
    }
    float *sc = malloc((size_t)L * Hkv * T * sizeof(float));
    const int32_t instr[2] = {5, 9}, bad_instr[1] = {V};
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip(nq, ids, T, NULL, 0, 64, sc), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip(b, ids, T - 1, NULL, 0, 64, sc), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip(b, ids, T, bad_instr, 1, 64, sc), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_kvzip(b, ids, T, NULL, 0, 0, sc), KVT_ERR_INVALID_ARG);
    for (size_t i = 0; i < (size_t)L * Hkv * T; i++)
        sc[i] = -1.0f;
    KVT_CHECK(kvt_llama2c_kvzip(b, ids, T, instr, 2, 64, sc)); /* chunks 64, 64, 64, 8 */
    KVT_EXPECT_EQ_U64(kvt_llama2c_state_n_pos(b), T);
    int bad = 0;
    for (size_t i = 0; i < (size_t)L * Hkv * T; i++)
        bad += !(sc[i] >= 0.0f && sc[i] <= 1.0f);
    KVT_EXPECT_MSG(bad == 0, "%d scores are not probabilities (or were not written)", bad);
    for (int g = 0; g < G; g++) {
        KVT_CHECK(kvt_llama2c_forward(a, ids[T + g], &lg));
        float *ref = malloc((size_t)V * sizeof(float));
        memcpy(ref, lg, (size_t)V * sizeof(float));
        KVT_CHECK(kvt_llama2c_forward(b, ids[T + g], &lg));
        KVT_EXPECT_MSG(!memcmp(lg, ref, (size_t)V * sizeof(float)),
                       "decode step %d after the kvzip pass differs", g);
        free(ref);
    }
    free(sc);
    kvt_llama2c_state_free(a);
    kvt_llama2c_state_free(b);
    kvt_llama2c_state_free(nq);
    kvt_llama2c_model_close(m);
}

int main(void)
{
    const char *python = getenv("KVT_PYTHON");
    const char *root = getenv("KVT_SOURCE_ROOT");
    if (!python || !*python) {
        printf("SKIP: no Python for the NumPy oracle (KVT_PYTHON)\n");
        return 77;
    }
    char model[512];
    snprintf(model, sizeof(model), "%s/models/stories260K.bin", root ? root : ".");
    check_mask(model);
    check_kvzip(model);
    kvt_test_tmp(tmpdir, sizeof(tmpdir), "llama2c");
    mkdir(tmpdir, 0755);

    /* the real model: the bundled sample's shape (448 sampled tokens, W=32, 64 steps) */
    if (!check_model(python, model, "stories260K", NULL, 448, 64, 32)) {
        printf("SKIP: the NumPy oracle is not available\n");
        return 77;
    }
    /* a synthetic GQA checkpoint with a separate classifier, prompt from ids */
    char synth[512];
    snprintf(synth, sizeof(synth), "%s/synthetic_gqa.bin", tmpdir);
    write_synthetic(synth);
    int32_t prompt[20];
    for (int i = 0; i < 20; i++)
        prompt[i] = (int32_t)((i * 7 + 3) % 40);
    check_model(python, synth, "synthetic_gqa", prompt, 20, 12, 5);

    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return kvt_test_result("test_capture_llama2c");
}
