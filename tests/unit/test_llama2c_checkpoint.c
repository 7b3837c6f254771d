/* test_llama2c_checkpoint.c - checkpoint validation of the llama2.c engine: the real
 * stories260K header is read as documented, and every malformed variant (each bad header
 * field, a size one byte off, the wrong classifier sign, a NaN weight, a missing file, a
 * directory) fails with a clear status and message instead of crashing. Also: prompt id files,
 * context limits, and the sampler.
 */
#include <sys/stat.h>

#include "kvt_llama2c.h"
#include "kvt_test.h"

static char dir[256];
static uint8_t *real;
static size_t real_n;

static void write_file(const char *path, const void *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(b, 1, n, f) != n))
        exit(1);
    fclose(f);
}

/* The real checkpoint with header field i set to v (or -1 to keep) and its size changed. */
static kvt_status open_variant(int field, int32_t v, long size_delta, const char *want_msg)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/variant.bin", dir);
    size_t n = (size_t)((long)real_n + size_delta);
    uint8_t *b = calloc(n + 8, 1);
    memcpy(b, real, n < real_n ? n : real_n);
    if (field >= 0)
        memcpy(b + 4 * field, &v, 4);
    write_file(p, b, n);
    free(b);
    kvt_llama2c_model *m = NULL;
    kvt_status s = kvt_llama2c_model_open(p, &m);
    if (want_msg)
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), want_msg) != NULL, "message '%s' lacks '%s'",
                       kvt_error_msg(), want_msg);
    KVT_EXPECT(s == KVT_OK ? m != NULL : m == NULL);
    kvt_llama2c_model_close(m);
    return s;
}

int main(void)
{
    const char *root = getenv("KVT_SOURCE_ROOT");
    char model[512];
    snprintf(model, sizeof(model), "%s/models/stories260K.bin", root ? root : ".");
    kvt_test_tmp(dir, sizeof(dir), "l2c_ckpt");
    mkdir(dir, 0755);
    FILE *f = fopen(model, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", model);
        return 1;
    }
    real = malloc(2u << 20);
    real_n = fread(real, 1, 2u << 20, f);
    fclose(f);

    /* the real model */
    kvt_llama2c_model *m;
    KVT_CHECK(kvt_llama2c_model_open(model, &m));
    const kvt_llama2c_config *c = kvt_llama2c_model_config(m);
    KVT_EXPECT(c->dim == 64 && c->hidden_dim == 172 && c->n_layers == 5 && c->n_heads == 8 &&
               c->n_kv_heads == 4 && c->vocab_size == 512 && c->seq_len == 512 &&
               c->head_dim == 8 && c->kv_dim == 32 && c->shared_classifier);

    /* forward: context limit, token range; the state is reusable up to seq_len */
    kvt_llama2c_state *st;
    KVT_CHECK(kvt_llama2c_state_create(m, false, &st));
    const float *lg;
    KVT_EXPECT_STATUS(kvt_llama2c_forward(st, 512, &lg), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_forward(st, -1, &lg), KVT_ERR_INVALID_ARG);
    for (int p = 0; p < 512; p++)
        KVT_CHECK(kvt_llama2c_forward(st, KVT_LLAMA2C_BOS, &lg));
    KVT_EXPECT_STATUS(kvt_llama2c_forward(st, KVT_LLAMA2C_BOS, &lg), KVT_ERR_STATE);
    KVT_EXPECT_EQ_U64(kvt_llama2c_state_n_pos(st), 512);
    kvt_llama2c_state_free(st);

    /* sampler: greedy at temperature 0, deterministic with a seed, in range */
    float logits[5] = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f};
    kvt_rng a, b;
    kvt_rng_seed(&a, 3);
    kvt_rng_seed(&b, 3);
    KVT_EXPECT_EQ_U64(kvt_llama2c_argmax(logits, 5), 1);
    KVT_EXPECT_EQ_U64(kvt_llama2c_sample(logits, 5, 0.0f, &a), 1);
    int hist[5] = {0};
    for (int i = 0; i < 2000; i++) {
        int32_t x = kvt_llama2c_sample(logits, 5, 1.0f, &a);
        KVT_EXPECT(x == kvt_llama2c_sample(logits, 5, 1.0f, &b));
        if (x >= 0 && x < 5)
            hist[x]++;
    }
    KVT_EXPECT(hist[1] > 500 && hist[3] > 500 && hist[2] < hist[0]);

    /* malformed checkpoints */
    const char *names[7] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                            "n_kv_heads", "vocab_size", "seq_len"};
    for (int i = 0; i < 7; i++) {
        KVT_EXPECT_STATUS(open_variant(i, 0, 0, names[i]), KVT_ERR_CORRUPT);
        KVT_EXPECT_STATUS(open_variant(i, INT32_MIN, 0, names[i]), KVT_ERR_CORRUPT);
        KVT_EXPECT_STATUS(open_variant(i, 1 << 21, 0, names[i]), KVT_ERR_CORRUPT);
    }
    KVT_EXPECT_STATUS(open_variant(-1, 0, 0, NULL), KVT_OK);
    KVT_EXPECT_STATUS(open_variant(4, 3, 0, "n_kv_heads 3 must divide"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(4, 16, 0, "must divide"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(3, 7, 0, "not a multiple of n_heads"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(3, 64, 0, "head_dim 1 is odd"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(-1, 0, -1, "needs 1056540"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(-1, 0, 1, "needs 1056540"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(-1, 0, -1000, "bytes"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(-1, 0, -(long)real_n + 10, "shorter than the 28-byte header"),
                      KVT_ERR_CORRUPT);
    /* negative vocab needs a classifier: the size then fits a shared one, and the message
     * says so */
    KVT_EXPECT_STATUS(open_variant(5, -512, 0, "should be positive"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(5, -512, 512 * 64 * 4, NULL), KVT_OK);
    KVT_EXPECT_STATUS(open_variant(5, 512, 512 * 64 * 4, "should be negative"), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(open_variant(2, 6, 0, "needs"), KVT_ERR_CORRUPT);
    /* a NaN weight */
    {
        char p[512];
        snprintf(p, sizeof(p), "%s/nan.bin", dir);
        uint8_t *bb = malloc(real_n);
        memcpy(bb, real, real_n);
        float nan = NAN;
        memcpy(bb + 28 + 4 * 1000, &nan, 4);
        write_file(p, bb, real_n);
        free(bb);
        kvt_llama2c_model *mm = NULL;
        KVT_EXPECT_STATUS(kvt_llama2c_model_open(p, &mm), KVT_ERR_CORRUPT);
        KVT_EXPECT(strstr(kvt_error_msg(), "weight 1000") != NULL);
    }
    kvt_llama2c_model *mm = NULL;
    KVT_EXPECT_STATUS(kvt_llama2c_model_open("/nonexistent/x.bin", &mm), KVT_ERR_IO);
    KVT_EXPECT_STATUS(kvt_llama2c_model_open(dir, &mm), KVT_ERR_IO);

    /* prompt id files */
    char ids_path[512];
    snprintf(ids_path, sizeof(ids_path), "%s/ids.txt", dir);
    int32_t *ids;
    uint32_t n;
    write_file(ids_path, " 1 2\n\t511  0\r\n", 14);
    KVT_CHECK(kvt_llama2c_read_ids(ids_path, 512, &ids, &n));
    KVT_EXPECT(n == 4 && ids[0] == 1 && ids[1] == 2 && ids[2] == 511 && ids[3] == 0);
    kvt_free(ids);
    write_file(ids_path, "1 512", 5);
    KVT_EXPECT_STATUS(kvt_llama2c_read_ids(ids_path, 512, &ids, &n), KVT_ERR_CORRUPT);
    KVT_EXPECT(strstr(kvt_error_msg(), "token 2 is 512") != NULL);
    write_file(ids_path, "1 x2", 4);
    KVT_EXPECT_STATUS(kvt_llama2c_read_ids(ids_path, 512, &ids, &n), KVT_ERR_CORRUPT);
    write_file(ids_path, "1 -3", 4);
    KVT_EXPECT_STATUS(kvt_llama2c_read_ids(ids_path, 512, &ids, &n), KVT_ERR_CORRUPT);
    write_file(ids_path, " \n", 2);
    KVT_EXPECT_STATUS(kvt_llama2c_read_ids(ids_path, 512, &ids, &n), KVT_ERR_CORRUPT);
    write_file(ids_path, "1 99999999999999999999999", 25);
    KVT_EXPECT_STATUS(kvt_llama2c_read_ids(ids_path, 512, &ids, &n), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(kvt_llama2c_read_ids("/nonexistent/ids", 512, &ids, &n), KVT_ERR_IO);

    /* capture option checks: context, window, token range */
    char out[512];
    snprintf(out, sizeof(out), "%s/o.kvt", dir);
    struct kvt_llama2c_capture_opts o = {
        .n_prompt = 500, .n_decode = 13, .window = 4, .writer = {.force = true}};
    KVT_EXPECT_STATUS(kvt_llama2c_capture(model, &o, out, NULL, false), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "context of 512") != NULL);
    o.n_prompt = 8;
    o.window = 9;
    KVT_EXPECT_STATUS(kvt_llama2c_capture(model, &o, out, NULL, false), KVT_ERR_INVALID_ARG);
    int32_t bad[3] = {1, 600, 2};
    o.prompt_ids = bad;
    o.n_prompt = 3;
    o.window = 2;
    KVT_EXPECT_STATUS(kvt_llama2c_capture(model, &o, out, NULL, false), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_llama2c_capture("/nonexistent.bin", &o, out, NULL, false), KVT_ERR_IO);
    KVT_EXPECT(access(out, F_OK) != 0); /* nothing written for a rejected run */

    kvt_llama2c_model_close(m);
    free(real);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return kvt_test_result("test_llama2c_checkpoint");
}
