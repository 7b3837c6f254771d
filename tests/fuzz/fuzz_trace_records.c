/* fuzz_trace_records.c - libFuzzer entry point for traces whose every record passes its
 * checksums but whose records do not fit together, as a buggy engine or capture could write
 * them. Random bytes as a trace (fuzz_trace_read) rarely get past the checksums; here the input
 * is a program for the trace writer instead: the model shape and the header (which may lie by
 * one about a field), then for each tensor of each layer (K, V, Q_window, the decode kinds, the
 * column sums, the token tables) how its block is cut into records along heads and tokens, in
 * which order they are appended, and a fault: a record left out, one token or head too many, a
 * record of another dim or dtype, a tensor missing or written twice, NaN or Inf in it. The trace
 * goes through verify, kvtrace's whole replay (kvt_replay_trace), and, for layer 0, a
 * differential check of the two ways a replay reads K and V: in f32 through
 * kvt_trace_reader_read (the CPU path) and as the trace stores them, some records read ahead
 * and the rest through the input's kv_rest (the path `replay --device cuda` takes, its pieces
 * checked by the same cover tracker before they reach the GPU). The two must fail together or
 * give the same metrics bit for bit; a difference aborts. Runs over the checked-in corpus as the
 * ctest fuzz_trace_records_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "kvt_replay.h"
#include "kvt_trace.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static char g_path[256], g_lw[256];
/* without and with decode queries; fastv, vl-cache (modality table); cake, elastic-cache, chunkkv
   reuse; leverage; kvzip (kvzip_score records); h2o-greedy (Q_all records); layer_weights= */
static kvt_policy **g_pols[12];
static size_t g_n_pol[12];
/* set 11 (rkv, expected-attention:decoding=): budgets above rkv's window */
static kvt_budget *g_budgets11;
static size_t g_n_budgets11;

static void remove_lw(void)
{
    unlink(g_lw);
}
static kvt_budget *g_budgets;
static size_t g_n_budgets;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    kvt_fuzz_scratch_path(g_path, sizeof(g_path), "records");
    /* policies that read K and V on the host (knorm, keydiff, mixkv's diversity, qfilter, which
       also calibrates on the window queries), the window's attention (snapkv, adakv), positions
       alone (streamingllm), the decode queries, AdaKV's shares of knorm's scores, and
       keydiff-block's ranking per budget, merge= (merged sets from K and V read on the host),
       simlayerkv (the window probabilities read on the host), dms= (DMSPress's threshold,
       each head's count of its own; tova's one score for every head) */
    /* and, on a trace with a modality table, fastv: its ranking read from layer 0 by the policy
       itself (the window queries' last row and K; the column sums or Q_all) before the replay;
       lookm's text prior (the column sums, a ranking per budget, merged and not); vl-cache,
       whose bind reads every layer's last window query and keys after the last visual token
       (a trace without one, or ending with one, is refused), and aircache-like, whose bind reads
       the same and ranks the visual tokens by the elite instruction tokens; and on every
       trace cake, whose bind reads every layer's window queries and keys for the layer budgets,
       and elastic-cache (the column sums; merged into anchors by position), and chunkkv with
       reuse=2 (its bind computes each layer pair's first window scores); and leverage (the
       keys un-rotated with the header's RoPE, sketched and exact; an odd head_dim is refused);
       and, on a trace with kvzip_score records, kvzip, whose bind reads every layer's scores
       (a NaN or a score above 1 is refused); and, on a trace with Q_all, h2o-greedy (the
       attention rows from Q_all and K read on the host, a ranking per budget; window=0 lets
       the newest token leave) beside h2o's column sums computed from Q_all; the first set has
       knorm with think= (its kept keys' channels pruned by the window query); and, on a trace
       with decode queries, policies with layer_weights= of two layers (each layer its own
       budgets, the oracle at them; a one-layer trace refused before any layer) and with
       chunk_length= (the budget shared over chunks of the prompt); and, on a trace with Q_all,
       chunk_scores= (each chunk scored on its own from its last queries, turned by the
       header's RoPE; refused before any layer where a chunk holds no more than the window),
       and expected-attention, streamingllm, lagkv, cur, leverage and compactor with
       chunk_scores=; and, on a trace with decode queries, knorm, keydiff, qfilter, tova and
       streamingllm with decoding=, knorm with dms_decoding=1 and h2o-greedy with decode=1 (caches
       of prompt and decode tokens through the decode steps; a trace without K_decode and V_decode,
       or without Q_all for h2o-greedy, refused before any layer), and rkv and
       expected-attention with decoding= at budgets 2, 4 and 50% (above rkv's window) */
    const char *set[7] = {
        "snapkv:window=1,knorm,keydiff,streamingllm:sinks=1,adakv:window=1,"
        "mixkv-snapkv:window=1,qfilter,keydiff-block:block=3,"
        "snapkv:window=1,merge=pivot,knorm:think=0.5,think_window=1,think_recent=1",
        "snapkv:window=1,knorm,keydiff,streamingllm:sinks=1,adakv:window=1,"
        "oracle,quest:page=2,dense_layers=0,knorm:adaptive=1,"
        "streamingllm:sinks=1,merge=weighted,simlayerkv:threshold=0.3,"
        "knorm:dms=-1,dms_window=2,keydiff:dms=-0.5,heads=query,dms_window=0,"
        "tova:dms=0.1,dms_window=1",
        "fastv:dense_layers=1,last=1,fastv:dense_layers=1,lookm,"
        "lookm:merge=none,heads=query,vl-cache:last=1,"
        "vl-cache:last=1,heads=query,window=1,threshold=0.2,aircache-like:last=1,"
        "aircache-like:last=2,heads=query,threshold=0",
        "cake:window=2,cake:window=2,heads=query,tau1=1.6,tau2=0.4,gamma=50,"
        "elastic-cache:sinks=1,elastic-cache:heads=query,"
        "chunkkv:window=1,chunk=2,reuse=2",
        "leverage:sketch=3,leverage:sketch=0,heads=query,adaptive=1",
        "kvzip,kvzip:layerwise=1,sinks=0",
        "h2o-greedy:window=1,h2o-greedy:heads=query,reduce=max,window=0,"
        "h2o:window=1"};
    for (int i = 0; i < 7; i++)
        if (kvt_policy_list_parse(set[i], NULL, &g_pols[i], &g_n_pol[i]))
            abort();
    /* layer_weights= of two layers (a trace of one is refused before any layer): each layer's
       own budgets, the oracle at them, merged sets by think= */
    kvt_fuzz_scratch_path(g_lw, sizeof(g_lw), "layer_weights");
    FILE *f = fopen(g_lw, "w");
    if (!f || fputs("1 3\n", f) < 0 || fclose(f))
        abort();
    atexit(remove_lw);
    char lw[4 * sizeof(g_lw) + 256];
    snprintf(lw, sizeof(lw),
             "snapkv:window=1,layer_weights=%s,streamingllm:sinks=1,heads=query,layer_weights=%s,"
             "knorm:think=0.5,think_window=1,layer_weights=%s,oracle:layer_weights=%s,"
             "snapkv:window=1,chunk_length=3,keydiff-block:block=3,chunk_length=2",
             g_lw, g_lw, g_lw, g_lw);
    if (kvt_policy_list_parse(lw, NULL, &g_pols[7], &g_n_pol[7]))
        abort();
    if (kvt_policy_list_parse("snapkv:window=1,chunk_length=3,chunk_scores=kvpress,"
                              "tova:chunk_length=4,chunk_scores=own,heads=query,"
                              "keydiff:chunk_length=2,chunk_scores=own,window=1",
                              NULL, &g_pols[8], &g_n_pol[8]))
        abort();
    if (kvt_policy_list_parse("expected-attention:sinks=1,chunk_length=5,chunk_scores=kvpress,"
                              "streamingllm:sinks=1,chunk_length=5,chunk_scores=own,"
                              "lagkv:sinks=1,lag=2,chunk_length=6,chunk_scores=own,"
                              "cur:local=2,sinks=1,chunk_length=4,chunk_scores=own,"
                              "leverage:sketch=0,chunk_length=5,chunk_scores=own,heads=query,"
                              "compactor:sinks=1,recent=1,chunk=2,chunk_length=5,"
                              "chunk_scores=kvpress",
                              NULL, &g_pols[9], &g_n_pol[9]))
        abort();
    if (kvt_policy_list_parse("knorm:decoding=1,keydiff:decoding=2,prefill=1,heads=query,"
                              "qfilter:decoding=1,prefill=1,tova:decoding=1,prefill=1,"
                              "tova:decoding=2,heads=query,h2o-greedy:window=1,decode=1,"
                              "streamingllm:sinks=1,decoding=1,prefill=1,"
                              "knorm:dms=-1,dms_decoding=1,dms_window=1",
                              NULL, &g_pols[10], &g_n_pol[10]))
        abort();
    if (kvt_policy_list_parse("rkv:window=1,interval=2,rkv:window=1,interval=1,heads=query,"
                              "reduce=mean,lambda=1,expected-attention:decoding=2,sinks=1,"
                              "expected-attention:decoding=3,sinks=1,heads=query,cov=0",
                              NULL, &g_pols[11], &g_n_pol[11]) ||
        kvt_budgets_parse("2,4,50%", &g_budgets11, &g_n_budgets11))
        abort();
    if (kvt_budgets_parse("1,3,50%", &g_budgets, &g_n_budgets))
        abort();
    return 0;
}

static uint64_t g_rng;

enum fault {
    F_NONE,
    F_GAP,       /* one record left out */
    F_TOK_PAST,  /* one token more than the shape (in the last records along tokens) */
    F_HEAD_PAST, /* one head more than the shape (in the last records along heads) */
    F_DIM,       /* one record of dim + 1 (the writer refuses whichever of the tensor's records
                    disagrees with its first: a gap, or a tensor of that dim) */
    F_DTYPE,     /* one record of another dtype (likewise) */
    F_MISSING,   /* the tensor not written */
    F_TWICE,     /* the tensor written again (refused: overlaps) */
    F_NAN,       /* a NaN in it */
    F_INF,       /* an Inf in it */
    F_N
};

/* the [H, n, dim] block of (layer, kind), cut into records as the input says, with its fault */
static void put_tensor(kvt_fuzz_src *s, kvt_trace_writer *w, int layer, int kind, int H, int n,
                       int dim, kvt_dtype dt)
{
    const unsigned cut = kvt_fuzz_take(s), f = kvt_fuzz_take(s);
    const enum fault fault = f < 160 ? F_NONE : (enum fault)(1 + (f - 160) % (F_N - 1));
    if (fault == F_MISSING)
        return;
    const int hp = 1 + (int)(cut % 3), tp = 1 + (int)(cut / 3 % 4); /* parts along each */
    const bool reverse = cut & 0x80, bad_head = fault == F_HEAD_PAST;
    const int Hw = H + bad_head, nw = n + (fault == F_TOK_PAST);
    const size_t cap = (size_t)Hw * nw * (dim + 1);
    float *f32 = malloc(cap * sizeof(float) + 4);
    uint8_t *buf = malloc(cap * 4 + 4);
    if (!f32 || !buf)
        goto out;
    g_rng =
        0x9E3779B97F4A7C15ull ^ ((uint64_t)kvt_fuzz_take(s) << 32 | (uint64_t)layer << 8 | kind);
    const int n_parts = hp * tp, victim = (int)(kvt_fuzz_take(s) % (unsigned)n_parts);
    for (int rep = 0; rep < (fault == F_TWICE ? 2 : 1); rep++)
        for (int i = 0; i < n_parts; i++) {
            const int k = reverse ? n_parts - 1 - i : i, a = k / tp, b = k % tp;
            kvt_record_info in = {.kind = kind, .layer = layer, .dim = (uint32_t)dim, .dtype = dt};
            in.head_begin = (uint32_t)(a * Hw / hp), in.head_end = (uint32_t)((a + 1) * Hw / hp);
            in.tok_begin = (uint32_t)(b * nw / tp), in.tok_end = (uint32_t)((b + 1) * nw / tp);
            if (in.head_end <= in.head_begin || in.tok_end <= in.tok_begin)
                continue;
            if (k == victim && fault == F_GAP)
                continue;
            if (k == victim && fault == F_DIM)
                in.dim++;
            if (k == victim && fault == F_DTYPE)
                in.dtype = dt == KVT_DTYPE_F32 ? KVT_DTYPE_BF16 : KVT_DTYPE_F32;
            const size_t cnt =
                (size_t)(in.head_end - in.head_begin) * (in.tok_end - in.tok_begin) * in.dim;
            for (size_t e = 0; e < cnt; e++)
                f32[e] = kind == KVT_KIND_ATTN_COLSUM ? fabsf(kvt_fuzz_rnd(&g_rng)) * (float)n
                         : kind == KVT_KIND_KVZIP_SCORE /* a probability, 1 at times */
                             ? fminf(fabsf(kvt_fuzz_rnd(&g_rng)), 1.0f)
                             : kvt_fuzz_rnd(&g_rng);
            if (k == victim && (fault == F_NAN || fault == F_INF))
                f32[cnt / 2] = fault == F_NAN ? nanf("") : -INFINITY;
            const size_t ees = kvt_dtype_size(in.dtype);
            for (size_t e = 0; e < cnt; e++) {
                if (in.dtype == KVT_DTYPE_BF16) {
                    uint16_t v = kvt_f32_to_bf16(f32[e]);
                    memcpy(buf + e * 2, &v, 2);
                } else if (in.dtype == KVT_DTYPE_F16) {
                    uint16_t v = kvt_f32_to_f16(f32[e]);
                    memcpy(buf + e * 2, &v, 2);
                } else {
                    memcpy(buf + e * ees, &f32[e], 4);
                }
            }
            kvt_trace_writer_append(w, &in, buf); /* a refusal is the fault's point */
        }
out:
    free(f32);
    free(buf);
}

/* a [1, n] table of layer -1 (token ids, modality codes, positions) */
static void put_table(kvt_fuzz_src *s, kvt_trace_writer *w, int kind, int rows, int n, kvt_dtype dt)
{
    const unsigned f = kvt_fuzz_take(s);
    if (f >= 224) /* missing */
        return;
    const int nw = n + (f >= 200); /* one token too many */
    const size_t es = kvt_dtype_size(dt);
    uint8_t *buf = calloc((size_t)rows * nw + 1, es);
    if (!buf)
        return;
    for (int i = 0; i < rows * nw; i++) {
        const unsigned v = kvt_fuzz_take(s);
        if (dt == KVT_DTYPE_U8)
            buf[i] = (uint8_t)(v % 5); /* modality codes, one past the last */
        else {
            int32_t x = kind == KVT_KIND_POSITIONS ? i % nw + (v >= 250 ? -1 : 0) : (int32_t)v;
            memcpy(buf + (size_t)i * 4, &x, 4);
        }
    }
    kvt_record_info in = {.kind = kind,
                          .layer = -1,
                          .head_end = (uint32_t)rows,
                          .tok_end = (uint32_t)nw,
                          .dim = 1,
                          .dtype = dt};
    kvt_trace_writer_append(w, &in, buf);
    free(buf);
}

typedef struct shape {
    int L, Hq, Hkv, D, T, W, G;
    kvt_dtype dt;
    bool colsum, decode_kv, modality, positions, kvzip, q_all;
    unsigned ahead_k, ahead_v; /* layer 0's K and V records read ahead (modulo their count) */
} shape;

static bool write_trace(kvt_fuzz_src *s, shape *sh)
{
    sh->L = 1 + (int)(kvt_fuzz_take(s) % 2);
    sh->Hkv = 1 + (int)(kvt_fuzz_take(s) % 2);
    sh->Hq = sh->Hkv * (1 + (int)(kvt_fuzz_take(s) % 3));
    sh->D = 1 + (int)(kvt_fuzz_take(s) % 8);
    sh->T = 1 + (int)(kvt_fuzz_take(s) % 40);
    sh->W = 1 + (int)(kvt_fuzz_take(s) % (unsigned)sh->T);
    sh->G = (int)(kvt_fuzz_take(s) % 3);
    static const kvt_dtype dts[3] = {KVT_DTYPE_BF16, KVT_DTYPE_F16, KVT_DTYPE_F32};
    sh->dt = dts[kvt_fuzz_take(s) % 3];
    sh->ahead_k = kvt_fuzz_take(s), sh->ahead_v = kvt_fuzz_take(s);
    const unsigned fl = kvt_fuzz_take(s), lie = kvt_fuzz_take(s);
    sh->colsum = fl & 1, sh->decode_kv = fl & 2, sh->modality = fl & 4, sh->positions = fl & 8;
    sh->kvzip = fl & 32, sh->q_all = fl & 64;
    /* the header, one of its fields off by one when the input says so */
    int hv[7] = {sh->L, sh->Hq, sh->Hkv, sh->D, sh->T, sh->W, sh->G};
    if (lie >= 200)
        hv[lie % 7] += lie & 8 ? 1 : -1;
    char hdr[1024];
    snprintf(hdr, sizeof(hdr),
             "{\"format\":\"kvtrace\",\"created_by\":\"fuzz_trace_records\","
             "\"model\":{\"name\":\"fuzz\",\"arch\":\"llama\",\"n_layers\":%d,\"n_q_heads\":%d,"
             "\"n_kv_heads\":%d,\"head_dim\":%d,\"rope\":{\"type\":\"default\",\"theta\":10000,"
             "\"pairs\":\"half\"}},"
             "\"kv_dtype\":\"%s\",\"n_tokens\":%d,\"window\":%d,\"n_decode\":%d}",
             hv[0], hv[1], hv[2], hv[3], kvt_dtype_name(sh->dt), hv[4], hv[5], hv[6]);
    kvt_writer_opts o = {.force = true, .level = 1, .no_shuffle = fl & 16};
    kvt_trace_writer *w;
    if (kvt_trace_writer_create(g_path, hdr, &o, &w))
        return false;
    for (int l = 0; l < sh->L; l++) {
        put_tensor(s, w, l, KVT_KIND_K, sh->Hkv, sh->T, sh->D, sh->dt);
        put_tensor(s, w, l, KVT_KIND_V, sh->Hkv, sh->T, sh->D, sh->dt);
        put_tensor(s, w, l, KVT_KIND_Q_WINDOW, sh->Hq, sh->W, sh->D, sh->dt);
        if (sh->G > 0)
            put_tensor(s, w, l, KVT_KIND_Q_DECODE, sh->Hq, sh->G, sh->D, sh->dt);
        if (sh->G > 0 && sh->decode_kv) {
            put_tensor(s, w, l, KVT_KIND_K_DECODE, sh->Hkv, sh->G, sh->D, sh->dt);
            put_tensor(s, w, l, KVT_KIND_V_DECODE, sh->Hkv, sh->G, sh->D, sh->dt);
        }
        if (sh->colsum)
            put_tensor(s, w, l, KVT_KIND_ATTN_COLSUM, sh->Hq, sh->T, 1, KVT_DTYPE_F32);
        if (sh->kvzip)
            put_tensor(s, w, l, KVT_KIND_KVZIP_SCORE, sh->Hkv, sh->T, 1, KVT_DTYPE_F32);
        if (sh->q_all)
            put_tensor(s, w, l, KVT_KIND_Q_ALL, sh->Hq, sh->T, sh->D, sh->dt);
    }
    put_table(s, w, KVT_KIND_TOKEN_IDS, 1, sh->T, KVT_DTYPE_I32);
    if (sh->modality)
        put_table(s, w, KVT_KIND_MODALITY, 1, sh->T, KVT_DTYPE_U8);
    if (sh->positions)
        put_table(s, w, KVT_KIND_POSITIONS, 1, sh->T, KVT_DTYPE_I32);
    kvt_status st = kvt_trace_writer_finish(w);
    kvt_trace_writer_free(w);
    return st == KVT_OK;
}

/* K and V as stored: the records replay_run.c reads ahead (the first n_ahead, back to back into
 * a buffer of the tensor's size), and the rest through kv_rest */
typedef struct ahead {
    uint8_t *buf;
    size_t cap, off;
    kvt_trace_piece *pc;
    size_t n, n_max, n_ahead;
} ahead;

static kvt_status ahead_room(void *user, size_t bytes, void **buf)
{
    ahead *a = user;
    *buf = NULL;
    if (a->n >= a->n_ahead || a->n >= a->n_max)
        return KVT_OK;
    if (bytes > a->cap - a->off)
        return kvt_error_set(KVT_ERR_CORRUPT, "K or V records larger than the tensor");
    *buf = a->buf + a->off;
    a->off += bytes;
    return KVT_OK;
}

static kvt_status ahead_put(void *user, const kvt_trace_piece *pc, void *buf)
{
    (void)buf;
    ahead *a = user;
    a->pc[a->n++] = *pc;
    return KVT_OK;
}

static kvt_status rest_read(void *user, int kind, size_t first, const kvt_trace_sink *sink)
{
    return kvt_trace_reader_read_sink(user, 0, kind, first, sink, NULL);
}

static bool same_bits(const kvt_head_metrics *a, const kvt_head_metrics *b, size_t n)
{
    return memcmp(a, b, n * sizeof(*a)) == 0;
}

/* layer 0 read both ways; they must agree */
static void differential(const shape *sh)
{
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(g_path, &r))
        return;
    uint32_t hk, tk, dk, hv, tv, dv, hq, wq, dq, hd = 0, gd = 0, dd = 0;
    kvt_dtype tk_, tv_, tq, td;
    float *k = NULL, *v = NULL, *q = NULL, *qd = NULL;
    uint16_t *k16 = NULL, *v16 = NULL;
    kvt_trace_piece *kp = NULL, *vp = NULL;
    kvt_head_metrics *m1 = NULL, *m2 = NULL;
    if (kvt_trace_reader_shape(r, 0, KVT_KIND_K, &hk, &tk, &dk, &tk_) ||
        kvt_trace_reader_shape(r, 0, KVT_KIND_V, &hv, &tv, &dv, &tv_) ||
        kvt_trace_reader_shape(r, 0, KVT_KIND_Q_WINDOW, &hq, &wq, &dq, &tq))
        goto out;
    /* the shapes the layer context takes; anything else is refused before K and V are read */
    if (hv != hk || tv != tk || dv != dk || dq != dk || tk_ != tv_ || hq % hk || wq > tk ||
        (tk_ != KVT_DTYPE_BF16 && tk_ != KVT_DTYPE_F16) || !kvt_dtype_is_float(tq) ||
        (uint64_t)hk * tk * dk > 4096 || (uint64_t)hq * wq * dq > 4096)
        goto out;
    const bool has_dec = !kvt_trace_reader_shape(r, 0, KVT_KIND_Q_DECODE, &hd, &gd, &dd, &td) &&
                         hd == hq && dd == dk && kvt_dtype_is_float(td) && gd <= 64;
    const size_t n = (size_t)hk * tk * dk, nq = (size_t)hq * wq * dq;
    const size_t n_rec =
        kvt_trace_reader_n_pieces(r, 0, KVT_KIND_K) + kvt_trace_reader_n_pieces(r, 0, KVT_KIND_V);
    k = malloc(n * 4), v = malloc(n * 4), q = malloc(nq * 4);
    qd = malloc((size_t)hq * (gd ? gd : 1) * dk * 4);
    k16 = malloc(n * 2), v16 = malloc(n * 2);
    kp = malloc((n_rec + 1) * sizeof(*kp)), vp = malloc((n_rec + 1) * sizeof(*vp));
    const int pi = has_dec ? 1 : 0;
    const size_t n_m = g_n_pol[pi] * 3 * hq;
    m1 = malloc(n_m * sizeof(*m1)), m2 = malloc(n_m * sizeof(*m2));
    if (!k || !v || !q || !qd || !k16 || !v16 || !kp || !vp || !m1 || !m2)
        goto out;
    if (kvt_trace_reader_read(r, 0, KVT_KIND_Q_WINDOW, 0, hq, KVT_DTYPE_F32, q, nq * 4) ||
        (has_dec && kvt_trace_reader_read(r, 0, KVT_KIND_Q_DECODE, 0, hq, KVT_DTYPE_F32, qd,
                                          (size_t)hq * gd * dk * 4)))
        goto out;
    kvt_layer_input in = {.layer = 0,
                          .n_layers = sh->L,
                          .T = (int)tk,
                          .D = (int)dk,
                          .Hq = (int)hq,
                          .Hkv = (int)hk,
                          .W = (int)wq,
                          .G = has_dec ? (int)gd : 0,
                          .q_window = q,
                          .q_decode = has_dec ? qd : NULL};
    const int bt[3] = {1, 3, (int)(tk + 1) / 2};
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = 4};
    /* 1: f32, as the CPU replay reads them */
    kvt_status s1 = kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, hk, KVT_DTYPE_F32, k, n * 4);
    if (!s1)
        s1 = kvt_trace_reader_read(r, 0, KVT_KIND_V, 0, hk, KVT_DTYPE_F32, v, n * 4);
    kvt_layer_input in1 = in;
    in1.k = k, in1.v = v;
    if (!s1)
        s1 = kvt_replay_layer_metrics(&in1, g_pols[pi], g_n_pol[pi], bt, 3, &o, m1);
    char e1[300];
    snprintf(e1, sizeof(e1), "%s", s1 ? kvt_error_msg() : "");
    /* 2: as stored, the first records read ahead, the rest through kv_rest */
    ahead ak = {(uint8_t *)k16, n * 2, 0, kp, 0, n_rec, sh->ahead_k % (n_rec + 1)};
    ahead av = {(uint8_t *)v16, n * 2, 0, vp, 0, n_rec, sh->ahead_v % (n_rec + 1)};
    const kvt_trace_sink sk = {ahead_room, ahead_put, &ak}, sv = {ahead_room, ahead_put, &av};
    kvt_status s2 = kvt_trace_reader_read_sink(r, 0, KVT_KIND_K, 0, &sk, NULL);
    if (!s2)
        s2 = kvt_trace_reader_read_sink(r, 0, KVT_KIND_V, 0, &sv, NULL);
    kvt_layer_input in2 = in;
    in2.k16 = k16, in2.v16 = v16, in2.k16_dtype = tk_;
    in2.k_pieces = kp, in2.n_k_pieces = ak.n, in2.v_pieces = vp, in2.n_v_pieces = av.n;
    in2.kv_rest = rest_read, in2.kv_user = r;
    if (!s2)
        s2 = kvt_replay_layer_metrics(&in2, g_pols[pi], g_n_pol[pi], bt, 3, &o, m2);
    if (!s1 != !s2 || (!s1 && !same_bits(m1, m2, n_m))) {
        fprintf(stderr,
                "fuzz_trace_records: K and V in f32 (%s) and as stored with %zu + %zu records "
                "read ahead (%s) disagree%s\n",
                s1 ? e1 : "ok", ak.n, av.n, s2 ? kvt_error_msg() : "ok",
                !s1 && !s2 ? ": different metrics" : "");
        abort();
    }
out:
    free(k), free(v), free(q), free(qd), free(k16), free(v16), free(kp), free(vp);
    free(m1), free(m2);
    kvt_trace_reader_close(r);
}

#ifdef KVT_FUZZ_CUDA
/* Built on cuemu (the ctest fuzz_trace_records_cuemu): the whole replay with --device cuda
 * must fail where the CPU's fails and agree with it otherwise, within the bounds
 * test_replay_fast_vs_ref.sh documents between the CPU's fast kernels and the references (which
 * the CUDA kernels follow): coverage from f32 cosine tables within 1e-6, output errors within
 * 1e-3 (an f32 ulp of a probability, amplified by a small ||o||), every other metric within
 * 1e-9; NaN where NaN. */
static bool near(double a, double b, double tol)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    const double m = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
    return fabs(a - b) <= tol * (m > 1.0 ? m : 1.0);
}

/* the bound of the metric at byte offset off of kvt_head_metrics */
static double bound(size_t off)
{
    const size_t cm = offsetof(kvt_head_metrics, coverage_mod);
    if (off == offsetof(kvt_head_metrics, err_window) ||
        off == offsetof(kvt_head_metrics, err_decode))
        return 1e-3;
    if (off == offsetof(kvt_head_metrics, coverage) ||
        off == offsetof(kvt_head_metrics, coverage_radius) ||
        off == offsetof(kvt_head_metrics, coverage_dropped) ||
        (off >= cm && off < cm + sizeof(((kvt_head_metrics *)0)->coverage_mod)))
        return 1e-6;
    return 1e-9;
}

static void same_on_device(int pi, kvt_status st_cpu, const kvt_trace_result *cpu)
{
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = 4, .device = KVT_DEVICE_CUDA};
    kvt_trace_result *gpu = NULL;
    char e_cpu[300];
    snprintf(e_cpu, sizeof(e_cpu), "%s", st_cpu ? kvt_error_msg() : "ok");
    const kvt_status st =
        kvt_replay_trace(g_path, g_pols[pi], g_n_pol[pi], pi == 11 ? g_budgets11 : g_budgets,
                         pi == 11 ? g_n_budgets11 : g_n_budgets, &o, &gpu);
    bool same = !st == !st_cpu;
    if (same && !st) {
        const size_t n = cpu->n_policies * cpu->n_budgets * (size_t)cpu->n_layers *
                         (size_t)cpu->n_q_heads * (sizeof(kvt_head_metrics) / sizeof(double));
        const double *a = (const double *)cpu->m, *b = (const double *)gpu->m;
        const size_t per = sizeof(kvt_head_metrics) / sizeof(double);
        for (size_t i = 0; i < n && same; i++)
            same = near(a[i], b[i], bound(i % per * sizeof(double)));
        for (int i = 0; i < cpu->n_layers * cpu->n_kv_heads && same; i++)
            same = near(cpu->r_all[i], gpu->r_all[i], 1e-9);
    }
    if (!same) {
        fprintf(stderr,
                "fuzz_trace_records: the replay on the CPU (%s) and with --device cuda "
                "(%s) disagree\n",
                e_cpu, st ? kvt_error_msg() : "ok");
        abort();
    }
    kvt_trace_result_free(gpu);
}
#endif

/* the whole replay of policy set pi (with cuemu also on the device, which must agree); the
 * check a replay of many traces makes first (kvt_replay_check_trace, the policies' check hooks
 * in place of their binds) must not refuse a trace the replay accepts */
static void replay_set(int pi)
{
    const kvt_budget *budgets = pi == 11 ? g_budgets11 : g_budgets;
    const size_t n_budgets = pi == 11 ? g_n_budgets11 : g_n_budgets;
    kvt_replay_opts o = {.n_threads = 1, .coverage_probes = 4};
    kvt_trace_result *res = NULL;
    const kvt_status chk =
        kvt_replay_check_trace(g_path, g_pols[pi], g_n_pol[pi], budgets, n_budgets);
    char e_chk[300];
    snprintf(e_chk, sizeof(e_chk), "%s", chk ? kvt_error_msg() : "ok");
    const kvt_status st =
        kvt_replay_trace(g_path, g_pols[pi], g_n_pol[pi], budgets, n_budgets, &o, &res);
    if (chk && !st) {
        fprintf(stderr, "the check refused a trace the replay of set %d accepts: %s\n", pi, e_chk);
        abort();
    }
#ifdef KVT_FUZZ_CUDA
    same_on_device(pi, st, st ? NULL : res);
#endif
    if (st == KVT_OK)
        kvt_trace_result_free(res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvt_fuzz_src s = {data, size};
    shape sh;
    if (!write_trace(&s, &sh)) {
        unlink(g_path);
        return 0;
    }
    kvt_verify_report rep;
    if (kvt_trace_verify(g_path, &rep) == KVT_OK)
        kvt_verify_report_free(&rep);
    int n_layers, n_tokens;
    if (kvt_replay_trace_shape(g_path, &n_layers, &n_tokens) == KVT_OK) {
        replay_set(sh.G > 0);
        if (sh.modality)
            replay_set(2);
        replay_set(3);
        replay_set(4);
        if (sh.kvzip)
            replay_set(5);
        if (sh.q_all) {
            replay_set(6);
            replay_set(8);
            replay_set(9);
        }
        if (sh.G > 0) {
            replay_set(7);
            replay_set(10);
            replay_set(11);
        }
    }
    differential(&sh);
    kvt_error_clear();
    unlink(g_path);
    return 0;
}
