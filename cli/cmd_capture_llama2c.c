/* cmd_capture_llama2c.c - `kvtrace capture-llama2c`: run a llama2.c checkpoint on the CPU
 * over a prompt (token ids from a file, or sampled from BOS with a seed) and G greedy decode
 * steps, and capture a trace through the capture API (capture/kvt_llama2c.h).
 * Exit status: 0 written; 1 failed (one error line); 2 bad usage.
 */
#include <stdio.h>
#include <string.h>

#include "kvt_cli.h"
#include "kvt_llama2c.h"

#define CMD "capture-llama2c"

static void help(void)
{
    printf("usage: kvtrace capture-llama2c --model FILE [--tokens N | --prompt-ids FILE]\n"
           "                               --decode G --window W -o TRACE [options]\n\n"
           "Run a llama2.c checkpoint (e.g. models/stories260K.bin) on the CPU and capture its\n"
           "KV cache: post-RoPE K and V of the prompt, the last W queries, G greedy decode\n"
           "steps (their queries, keys, values and tokens) and the token tables.\n\n"
           "  --model FILE       llama2.c legacy checkpoint\n"
           "  --tokens N         prompt of N tokens sampled from BOS (id 1) with --seed\n"
           "  --prompt-ids FILE  prompt from a file of whitespace-separated token ids\n"
           "  --decode G         greedy decode steps after the prompt (0 = none)\n"
           "  --window W         last prompt queries stored as Q_window\n"
           "  --colsum           also store H2O's causal attention column sums\n"
           "  --q-all            also store every prompt query (Q_all)\n"
           "  --dtype D          stored dtype of K, V and queries: f32 (default), bf16, f16\n"
           "  --seed S           prompt sampling seed (default 1)\n"
           "  --temperature X    prompt sampling temperature (default 1; 0 = greedy)\n"
           "  --threads N        compression threads (default 0: compress in this thread,\n"
           "                     which keeps the meta_json stall time at 0)\n"
           "  --level L          zstd level (default 3)\n"
           "  -o, --output TRACE output trace\n"
           "  --force            overwrite TRACE if it exists\n\n"
           "The same options give a byte-identical trace. Prompt plus decode must fit the\n"
           "model's context (seq_len, 512 for stories260K).\n");
}

static bool take(int argc, char **argv, int *i, const char **val)
{
    if (*i + 1 >= argc) {
        kvt_cli_fail(CMD, "%s needs a value", argv[*i]);
        return false;
    }
    *val = argv[++*i];
    return true;
}

int kvt_cmd_capture_llama2c(int argc, char **argv)
{
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    const char *model = NULL, *ids_path = NULL, *out = NULL, *val;
    int n_tokens = -1, n_decode = -1, window = -1, threads = 0, level = 3;
    uint64_t seed = 1;
    double temperature = 1.0;
    kvt_dtype dtype = KVT_DTYPE_F32;
    bool colsum = false, q_all = false, force = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--colsum")) {
            colsum = true;
        } else if (!strcmp(a, "--q-all")) {
            q_all = true;
        } else if (!strcmp(a, "--force")) {
            force = true;
        } else if (!strcmp(a, "--model")) {
            if (!take(argc, argv, &i, &model))
                return 2;
        } else if (!strcmp(a, "--prompt-ids")) {
            if (!take(argc, argv, &i, &ids_path))
                return 2;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (!take(argc, argv, &i, &out))
                return 2;
        } else if (!strcmp(a, "--tokens") || !strcmp(a, "--decode") || !strcmp(a, "--window") ||
                   !strcmp(a, "--threads") || !strcmp(a, "--level")) {
            if (!take(argc, argv, &i, &val))
                return 2;
            int *dst = !strcmp(a, "--tokens")   ? &n_tokens
                       : !strcmp(a, "--decode") ? &n_decode
                       : !strcmp(a, "--window") ? &window
                       : !strcmp(a, "--level")  ? &level
                                                : &threads;
            int lo = !strcmp(a, "--tokens") || !strcmp(a, "--window") ? 1
                     : !strcmp(a, "--level")                          ? -7
                                                                      : 0;
            int hi = !strcmp(a, "--threads") ? 256 : !strcmp(a, "--level") ? 22 : 1 << 20;
            if (!kvt_cli_parse_int(val, lo, hi, dst))
                return kvt_cli_fail(CMD, "%s: '%s' is not an integer in [%d, %d]", a, val, lo, hi),
                       2;
        } else if (!strcmp(a, "--seed")) {
            if (!take(argc, argv, &i, &val))
                return 2;
            if (!kvt_cli_parse_u64(val, &seed))
                return kvt_cli_fail(CMD, "--seed: '%s' is not a non-negative integer", val), 2;
        } else if (!strcmp(a, "--temperature")) {
            if (!take(argc, argv, &i, &val))
                return 2;
            if (!kvt_cli_parse_double(val, &temperature) || !(temperature >= 0.0) ||
                temperature > 100.0)
                return kvt_cli_fail(CMD, "--temperature: '%s' is not a number in [0, 100]", val), 2;
        } else if (!strcmp(a, "--dtype")) {
            if (!take(argc, argv, &i, &val))
                return 2;
            dtype = kvt_dtype_from_name(val);
            if (!kvt_dtype_is_float(dtype))
                return kvt_cli_fail(CMD, "--dtype: '%s' is not f32, bf16 or f16", val), 2;
        } else {
            return kvt_cli_fail(CMD, "unknown option %s (try --help)", a), 2;
        }
    }
    if (!model)
        return kvt_cli_fail(CMD, "--model FILE is required"), 2;
    if (!out)
        return kvt_cli_fail(CMD, "-o TRACE is required"), 2;
    if ((n_tokens < 0) == (ids_path == NULL))
        return kvt_cli_fail(CMD, "give exactly one of --tokens N and --prompt-ids FILE"), 2;
    if (n_decode < 0)
        return kvt_cli_fail(CMD, "--decode G is required (0 for no decode steps)"), 2;
    if (window < 0)
        return kvt_cli_fail(CMD, "--window W is required"), 2;

    int32_t *ids = NULL;
    uint32_t n_ids = 0;
    if (ids_path) {
        kvt_llama2c_model *m;
        kvt_status s = kvt_llama2c_model_open(model, &m);
        if (s != KVT_OK)
            return kvt_cli_fail_status(CMD, s, "loading the model");
        int vocab = kvt_llama2c_model_config(m)->vocab_size;
        kvt_llama2c_model_close(m);
        s = kvt_llama2c_read_ids(ids_path, vocab, &ids, &n_ids);
        if (s != KVT_OK)
            return kvt_cli_fail_status(CMD, s, "reading the prompt ids");
    }
    struct kvt_llama2c_capture_opts o = {
        .prompt_ids = ids,
        .n_prompt = ids ? n_ids : (uint32_t)n_tokens,
        .seed = seed,
        .temperature = (float)temperature,
        .n_decode = (uint32_t)n_decode,
        .window = (uint32_t)window,
        .with_colsum = colsum,
        .with_q_all = q_all,
        .kv_dtype = dtype,
        .writer = {.level = level, .n_threads = threads, .force = force},
    };
    struct kvt_llama2c_capture_result res;
    uint64_t t0 = kvt_now_ns();
    kvt_status s = kvt_llama2c_capture(model, &o, out, &res, false);
    kvt_free(ids);
    if (s != KVT_OK)
        return kvt_cli_fail_status(CMD, s, "capture failed");
    double secs = (double)(kvt_now_ns() - t0) / 1e9;
    const struct kvt_capture_stats *st = &res.stats;
    printf("%s: T=%u W=%d G=%u, %llu records, %llu bytes (raw %llu, ratio %.2f), %.2f s, "
           "stall %.1f ms\n",
           out, o.n_prompt, window, st->n_decode, (unsigned long long)st->writer.n_records,
           (unsigned long long)st->writer.file_bytes, (unsigned long long)st->writer.raw_bytes,
           st->writer.comp_bytes ? (double)st->writer.raw_bytes / (double)st->writer.comp_bytes
                                 : 0.0,
           secs, (double)st->stall_ns / 1e6);
    printf("decode tokens:");
    for (uint32_t g = 0; g < st->n_decode; g++)
        printf(" %d", (int)res.tokens[o.n_prompt + g]);
    printf("\n");
    kvt_free(res.tokens);
    kvt_free(res.logits);
    return 0;
}
