/* cmd_capture_llama2c.c - `kvtrace capture-llama2c`: run a llama2.c checkpoint on the CPU
 * over a prompt (token ids from a file, or sampled from BOS with a seed) and G greedy decode
 * steps, and capture a trace through the capture API (capture/kvt_llama2c.h).
 * Exit status: 0 written; 1 failed (one error line); 2 bad usage; 130 (SIGINT) or 143
 * (SIGTERM) interrupted: the run stops at the next position; in the decode steps the trace is
 * closed cleanly with what was captured, inside the prompt (nothing captured) no trace is kept.
 * Test hooks (tests/unit/test_reliability_capture.c): KVT_CAPTURE_STEP_DELAY_US=N sleeps N
 * microseconds before each position, so a test can signal a capture while it runs;
 * KVT_CAPTURE_KILL_AT=P sends SIGKILL to the process itself before position P (prompt
 * positions 0..T-1, then decode positions T..), a crash at an exact, repeatable point;
 * KVT_CAPTURE_STOP_DELAY_US=N sleeps N microseconds once a stop signal was seen (a slow
 * wind-down, so a test can send a second signal during it).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvt_cli.h"
#include "kvt_llama2c.h"

#define CMD "capture-llama2c"

/* the signal that asked us to stop (0: none), and when it came (CLOCK_MONOTONIC ns) */
static volatile sig_atomic_t stop_signal;
static volatile long long stop_ns;

static long long mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* async-signal-safe */
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void on_stop_signal(int sig)
{
    if (!stop_signal) {
        stop_ns = mono_ns();
        stop_signal = sig;
        return;
    }
    /* a second Ctrl-C a second or more after the first kills as usual; sooner it is the same
       request delivered twice (GNU timeout -s INT, and some schedulers, signal the process
       and its group at once) */
    if (sig == SIGINT && mono_ns() - stop_ns >= 1000000000LL) {
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
    }
}

/* SIGINT/SIGTERM stop the run cleanly. A second Ctrl-C, a second or more after the first,
 * kills as usual; a second SIGTERM, or a SIGINT within that second, is the same request
 * (GNU timeout sends one to the process and one to its group), and whoever must stop it at
 * once sends SIGKILL. (SIGXFSZ is ignored for every command in main.c, so a file size limit
 * is a write error.) */
static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask); /* one handler at a time */
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static void restore_signals(void)
{
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
}

/* Stopped inside the prompt, kvt_llama2c_capture closes the session and removes the file it
 * was writing. The only messages the library logs on that path are about that file (the
 * trace writer's note, as it closes, that the new trace stays in its temporary file), so from
 * the stop on they are dropped: the interruption is told in one line. Should the file stay
 * (it cannot be removed), the capture's error names it. */
static void drop_log_line(void *user, const char *line)
{
    (void)user;
    (void)line;
}

struct test_hooks {
    long delay_us;      /* KVT_CAPTURE_STEP_DELAY_US */
    long kill_at;       /* KVT_CAPTURE_KILL_AT, -1 = never */
    long stop_delay_us; /* KVT_CAPTURE_STOP_DELAY_US */
    uint32_t n_prompt;  /* T: a stop before position T is inside the prompt */
    bool quiet;         /* drop_log_line is installed */
};

static bool keep_going(void *user, uint32_t pos)
{
    struct test_hooks *h = user;
    if (h->kill_at >= 0 && (long)pos == h->kill_at)
        raise(SIGKILL);
    long delay_us = h->delay_us;
    if (delay_us > 0 && !stop_signal) {
        struct timespec ts = {.tv_sec = delay_us / 1000000, .tv_nsec = (delay_us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
    bool stop = stop_signal != 0; /* read once: the answer and the hook agree */
    if (stop && h->stop_delay_us > 0) {
        struct timespec ts = {.tv_sec = h->stop_delay_us / 1000000,
                              .tv_nsec = (h->stop_delay_us % 1000000) * 1000};
        h->stop_delay_us = 0;
        while (nanosleep(&ts, &ts) != 0) /* a second signal interrupts the sleep */
            ;
    }
    if (stop && pos < h->n_prompt && !h->quiet) {
        kvt_log_set_hook(drop_log_line, NULL);
        h->quiet = true;
    }
    return !stop;
}

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
           "  --kvzip            also store KVzip's scores (kvzip_score, for the kvzip\n"
           "                     policy): after the prompt, the model repeats it chunk by\n"
           "                     chunk; a key's score is the largest attention it gets\n"
           "  --kvzip-chunk N    chunk size of that pass (default: the largest that fits the\n"
           "                     context, at most 2048; every chunk but the first is preceded\n"
           "                     by the last 8 tokens of the one before)\n"
           "  --kvzip-prompt-ids FILE  token ids of the instruction before each chunk\n"
           "                     (default none: llama2.c checkpoints have no tokenizer here)\n"
           "  --dtype D          stored dtype of K, V and queries: f32 (default), bf16, f16\n"
           "  --seed S           prompt sampling seed (default 1)\n"
           "  --temperature X    prompt sampling temperature (default 1; 0 = greedy)\n"
           "  --threads N        compression threads (default 0: compress in this thread,\n"
           "                     which keeps the meta_json stall time at 0)\n"
           "  --level L          zstd level (default 3)\n"
           "  --decode-chunk N   decode steps per record (default 64; 1 = a record per step)\n"
           "  -o, --output TRACE output trace\n"
           "  --force            overwrite TRACE if it exists\n\n"
           "The same options give a byte-identical trace. W is at most the prompt's length,\n"
           "and prompt plus decode must fit the model's context (seq_len, 512 for\n"
           "stories260K). Ctrl-C (SIGINT) or SIGTERM stops the run at the next token (exit 130\n"
           "or 143): in the decode steps the trace is closed with the prompt and the steps run\n"
           "so far (kvtrace info shows both counts), in the --kvzip pass (at its next chunk)\n"
           "with the prompt alone; inside the prompt nothing is captured, so\n"
           "no trace is kept (with --force, TRACE stays as it was). A trace cut short by a\n"
           "crash or kill is recovered by kvtrace verify.\n");
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
    const char *model = NULL, *ids_path = NULL, *out = NULL, *val, *kz_path = NULL;
    int n_tokens = -1, n_decode = -1, window = -1, threads = 0, level = 3, chunk = 0;
    int kz_chunk = 0;
    uint64_t seed = 1;
    double temperature = 1.0;
    const char *sampling = NULL; /* --seed or --temperature given: they shape a sampled prompt */
    kvt_dtype dtype = KVT_DTYPE_F32;
    bool colsum = false, q_all = false, force = false, kvzip = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--colsum")) {
            colsum = true;
        } else if (!strcmp(a, "--q-all")) {
            q_all = true;
        } else if (!strcmp(a, "--kvzip")) {
            kvzip = true;
        } else if (!strcmp(a, "--kvzip-prompt-ids")) {
            if (!take(argc, argv, &i, &kz_path))
                return 2;
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
                   !strcmp(a, "--threads") || !strcmp(a, "--level") ||
                   !strcmp(a, "--decode-chunk") || !strcmp(a, "--kvzip-chunk")) {
            if (!take(argc, argv, &i, &val))
                return 2;
            int *dst = !strcmp(a, "--tokens")         ? &n_tokens
                       : !strcmp(a, "--decode")       ? &n_decode
                       : !strcmp(a, "--window")       ? &window
                       : !strcmp(a, "--level")        ? &level
                       : !strcmp(a, "--decode-chunk") ? &chunk
                       : !strcmp(a, "--kvzip-chunk")  ? &kz_chunk
                                                      : &threads;
            int lo = !strcmp(a, "--tokens") || !strcmp(a, "--window") ||
                             !strcmp(a, "--decode-chunk") || !strcmp(a, "--kvzip-chunk")
                         ? 1
                     : !strcmp(a, "--level") ? -7
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
            sampling = "--seed";
        } else if (!strcmp(a, "--temperature")) {
            if (!take(argc, argv, &i, &val))
                return 2;
            if (!kvt_cli_parse_double(val, &temperature) || !(temperature >= 0.0) ||
                temperature > 100.0)
                return kvt_cli_fail(CMD, "--temperature: '%s' is not a number in [0, 100]", val), 2;
            sampling = "--temperature";
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
    if (ids_path && sampling) /* the decode steps are greedy: nothing else would use it */
        return kvt_cli_fail(CMD, "%s samples a prompt (--tokens N); --prompt-ids gives it",
                            sampling),
               2;
    if (n_decode < 0)
        return kvt_cli_fail(CMD, "--decode G is required (0 for no decode steps)"), 2;
    if (window < 0)
        return kvt_cli_fail(CMD, "--window W is required"), 2;
    if (!kvzip && (kz_chunk || kz_path))
        return kvt_cli_fail(CMD, "%s is an option of --kvzip, which is not given",
                            kz_chunk ? "--kvzip-chunk" : "--kvzip-prompt-ids"),
               2;
    /* combinations the command line alone rules out are usage errors too; those that depend
     * on an input (the model's context, the prompt file's length) are found by the capture */
    if (n_tokens > 0 && window > n_tokens)
        return kvt_cli_fail(CMD,
                            "--window %d is more than the %d prompt tokens of --tokens (the "
                            "window is the last W prompt queries)",
                            window, n_tokens),
               2;
    /* never overwrite an input, even with --force (the writer refuses an existing TRACE
     * without --force itself) */
    const char *inputs[3] = {model, ids_path, kz_path};
    if (!kvt_cli_output_ok(CMD, out, true, inputs, 3))
        return 1;

    int32_t *ids = NULL, *kz_ids = NULL;
    uint32_t n_ids = 0, n_kz = 0;
    if (ids_path || kz_path) {
        kvt_llama2c_model *m;
        kvt_status s = kvt_llama2c_model_open(model, &m);
        if (s != KVT_OK)
            return kvt_cli_fail_status(CMD, s, "loading the model");
        int vocab = kvt_llama2c_model_config(m)->vocab_size;
        kvt_llama2c_model_close(m);
        if (ids_path && (s = kvt_llama2c_read_ids(ids_path, vocab, &ids, &n_ids)))
            return kvt_cli_fail_status(CMD, s, "reading the prompt ids");
        if (kz_path && (s = kvt_llama2c_read_ids(kz_path, vocab, &kz_ids, &n_kz))) {
            kvt_free(ids);
            return kvt_cli_fail_status(CMD, s, "reading the kvzip instruction ids");
        }
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
        .decode_chunk = (uint32_t)chunk,
        .with_kvzip = kvzip,
        .kvzip_chunk = (uint32_t)kz_chunk,
        .kvzip_instr = kz_ids,
        .kvzip_n_instr = n_kz,
        .writer = {.level = level, .n_threads = threads, .force = force},
    };
    const char *delay_env = getenv("KVT_CAPTURE_STEP_DELAY_US");
    const char *kill_env = getenv("KVT_CAPTURE_KILL_AT");
    const char *stop_env = getenv("KVT_CAPTURE_STOP_DELAY_US");
    struct test_hooks hooks = {.delay_us = delay_env ? strtol(delay_env, NULL, 10) : 0,
                               .kill_at = kill_env ? strtol(kill_env, NULL, 10) : -1,
                               .stop_delay_us = stop_env ? strtol(stop_env, NULL, 10) : 0,
                               .n_prompt = o.n_prompt};
    o.keep_going = keep_going;
    o.keep_going_user = &hooks;
    struct kvt_llama2c_capture_result res;
    uint64_t t0 = kvt_now_ns();
    bool replacing = force && access(out, F_OK) == 0; /* an interrupt leaves it as it is */
    stop_signal = 0;
    install_signals();
    kvt_status s = kvt_llama2c_capture(model, &o, out, &res, false);
    restore_signals();
    kvt_free(ids);
    kvt_free(kz_ids);
    if (hooks.quiet)
        kvt_log_set_hook(NULL, NULL);
    if (s != KVT_OK)
        return kvt_cli_fail_status(CMD, s, "capture failed");
    double secs = (double)(kvt_now_ns() - t0) / 1e9;
    const struct kvt_capture_stats *st = &res.stats;
    if (res.interrupted) {
        int sig = (int)stop_signal;
        if (res.n_prompt_run < o.n_prompt) /* the library removed what it wrote */
            fprintf(stderr,
                    "kvtrace %s: interrupted (%s) at prompt token %u of %u: nothing captured; "
                    "%s%s\n",
                    CMD, sig == SIGTERM ? "SIGTERM" : "SIGINT", res.n_prompt_run, o.n_prompt,
                    replacing ? out : "no trace written", replacing ? " is unchanged" : "");
        else if (res.kvzip_stopped)
            fprintf(stderr,
                    "kvtrace %s: interrupted (%s) in the kvzip pass: %s closed with the prompt "
                    "alone (no kvzip scores, no decode step), %llu records\n",
                    CMD, sig == SIGTERM ? "SIGTERM" : "SIGINT", out,
                    (unsigned long long)st->writer.n_records);
        else
            fprintf(stderr,
                    "kvtrace %s: interrupted (%s) after %u of %u decode steps: %s closed with "
                    "%llu records\n",
                    CMD, sig == SIGTERM ? "SIGTERM" : "SIGINT", st->n_decode, o.n_decode, out,
                    (unsigned long long)st->writer.n_records);
        kvt_free(res.tokens);
        kvt_free(res.logits);
        return 128 + (sig ? sig : SIGINT);
    }
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
