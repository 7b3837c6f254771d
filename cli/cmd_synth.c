/* cmd_synth.c - `kvtrace synth`: write a model-shaped synthetic trace with planted structure
 * (traces/SYNTH.md) for tests and benchmarks. Thin: parses options, calls kvt_synth_write.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "kvt_cli.h"
#include "kvt_synth.h"

static void help(void)
{
    printf("usage: kvtrace synth --shape NAME --tokens T [options] -o FILE\n\n"
           "Write a synthetic trace shaped like a real model, deterministic by seed, with\n"
           "structure that KV-cache policies can find: attention sinks, local and retrieval\n"
           "heads, near-duplicate key clusters whose share varies per head, image spans more\n"
           "redundant than text, decode queries that resemble the window queries\n"
           "(traces/SYNTH.md). Not real KV: do not quote its numbers as model results.\n\n"
           "options:\n"
           "  --shape NAME       model shape (see below)\n"
           "  --tokens T         prompt tokens (1..%u; k/M suffixes are x1000)\n"
           "  --window W         window queries Q_window, W <= T (default min(32, T))\n"
           "  --decode G         decode steps (default 16; 0 = none)\n"
           "  --image-frac F     share of image tokens in [0, 1) (default: the shape's)\n"
           "  --seed S           seed (default 1); same options => byte-identical file\n"
           "  --dtype D          bf16 (default), f16 or f32\n"
           "  --colsum on|off|auto  attention column sums, O(T^2 D) per head (default\n"
           "                     auto: on when T <= %u)\n"
           "  --q-all            also store every prompt query (Q_all)\n"
           "  --layers N         only the shape's first N layers (their records are those\n"
           "                     of the whole trace; default: all)\n"
           "  --level N          zstd level (default 3)\n"
           "  --record-bytes N   split each tensor into records of at most N bytes, or one\n"
           "                     token row of a head when that is larger (K/M/G suffixes;\n"
           "                     default 4M, as a capture writes them)\n"
           "  --threads N        generator and compression threads (default: CPU count)\n"
           "  --force            overwrite FILE\n"
           "  -o, --output FILE  output trace\n\nshapes:\n",
           KVT_SYNTH_MAX_TOKENS, KVT_SYNTH_COLSUM_AUTO_MAX_T);
    for (size_t i = 0; i < kvt_synth_n_shapes(); i++) {
        const kvt_synth_shape *s = kvt_synth_shape_at(i);
        printf("  %-12s %s\n", s->name, s->description);
    }
}

static void on_progress(void *user, uint64_t done, uint64_t total)
{
    kvt_progress_update(user, done, total);
}

/* The value of option argv[*i] (advancing *i), or NULL after printing the error. */
static const char *value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        kvt_cli_fail("synth", "option %s needs a value", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

int kvt_cmd_synth(int argc, char **argv)
{
    kvt_synth_opts o;
    kvt_synth_opts_init(&o);
    kvt_writer_opts wo = {0};
    const char *out = NULL, *v;
    bool have_tokens = false, have_threads = false;
    int threads = 1;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        uint64_t u;
        double f;
        if (!strcmp(a, "--q-all")) {
            o.q_all = true;
        } else if (!strcmp(a, "--force")) {
            wo.force = true;
        } else if (!strcmp(a, "--shape")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            o.shape = v;
        } else if (!strcmp(a, "--tokens")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_u64(v, &u) || u > KVT_SYNTH_MAX_TOKENS)
                return kvt_cli_fail("synth", "--tokens wants an integer in 1..%u (got '%s')",
                                    KVT_SYNTH_MAX_TOKENS, v),
                       2;
            o.n_tokens = (uint32_t)u;
            have_tokens = true;
        } else if (!strcmp(a, "--window")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_u64(v, &u) || u < 1 || u > KVT_SYNTH_MAX_TOKENS)
                return kvt_cli_fail("synth", "--window wants a positive integer (got '%s')", v), 2;
            o.window = (uint32_t)u;
        } else if (!strcmp(a, "--decode")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_u64(v, &u) || u > KVT_SYNTH_MAX_DECODE)
                return kvt_cli_fail("synth", "--decode wants an integer in 0..%u (got '%s')",
                                    KVT_SYNTH_MAX_DECODE, v),
                       2;
            o.n_decode = (uint32_t)u;
        } else if (!strcmp(a, "--layers")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_int(v, 1, 1 << 20, &o.n_layers))
                return kvt_cli_fail("synth", "--layers wants a positive integer (got '%s')", v), 2;
        } else if (!strcmp(a, "--image-frac")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_double(v, &f) || f < 0 || f >= 1)
                return kvt_cli_fail("synth", "--image-frac wants a number in [0, 1) (got '%s')", v),
                       2;
            o.image_frac = f;
        } else if (!strcmp(a, "--seed")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_u64(v, &u))
                return kvt_cli_fail("synth", "--seed wants a non-negative integer (got '%s')", v),
                       2;
            o.seed = u;
        } else if (!strcmp(a, "--dtype")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            o.dtype = kvt_dtype_from_name(v);
            if (!kvt_dtype_is_float(o.dtype))
                return kvt_cli_fail("synth", "--dtype wants bf16, f16 or f32 (got '%s')", v), 2;
        } else if (!strcmp(a, "--colsum")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!strcmp(v, "on"))
                o.colsum = KVT_SYNTH_ON;
            else if (!strcmp(v, "off"))
                o.colsum = KVT_SYNTH_OFF;
            else if (!strcmp(v, "auto"))
                o.colsum = KVT_SYNTH_AUTO;
            else
                return kvt_cli_fail("synth", "--colsum wants on, off or auto (got '%s')", v), 2;
        } else if (!strcmp(a, "--level")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_int(v, 1, 22, &wo.level))
                return kvt_cli_fail("synth", "--level wants an integer in 1..22 (got '%s')", v), 2;
        } else if (!strcmp(a, "--record-bytes")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_size(v, &wo.max_record_bytes) || wo.max_record_bytes < 64)
                return kvt_cli_fail("synth",
                                    "--record-bytes wants a size of 64 bytes or more "
                                    "(got '%s')",
                                    v),
                       2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            if (!kvt_cli_parse_int(v, 1, 256, &threads))
                return kvt_cli_fail("synth", "--threads wants an integer in 1..256 (got '%s')", v),
                       2;
            have_threads = true;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (!(v = value(argc, argv, &i)))
                return 2;
            out = v;
        } else {
            return kvt_cli_fail("synth", "unknown argument '%s' (see kvtrace synth --help)", a), 2;
        }
    }
    if (!o.shape)
        return kvt_cli_fail("synth", "--shape is required (valid: %s)", kvt_synth_shape_names()), 2;
    if (!have_tokens || o.n_tokens == 0)
        return kvt_cli_fail("synth", "--tokens T is required and must be at least 1"), 2;
    if (!out)
        return kvt_cli_fail("synth", "no output file (-o FILE)"), 2;
    if (!have_threads)
        threads = kvt_cpu_count();
    o.n_threads = threads;
    wo.n_threads = threads;

    kvt_synth_opts r;
    const kvt_synth_shape *sh;
    kvt_status s = kvt_synth_opts_resolve(&o, &r, &sh);
    if (s != KVT_OK)
        return kvt_cli_fail("synth", "%s", kvt_error_msg()), 2;
    uint64_t raw = 0;
    kvt_synth_raw_bytes(&r, &raw);
    /* the image span starts after the preamble and ends before the window: a share that does
       not fit is cut, and the header's image_tokens says so; say it here too */
    kvt_synth_tokens *tk = NULL;
    if (r.image_frac > 0 && kvt_synth_tokens_create(&r, &tk) == KVT_OK) {
        double want = floor(r.image_frac * (double)r.n_tokens + 0.5);
        uint32_t got = tk->image_end - tk->image_begin;
        if ((double)got < want)
            fprintf(stderr,
                    "kvtrace synth: warning: an image share of %g is %u of %u tokens here, not "
                    "%.0f: the image span starts after the sinks and a text preamble and ends "
                    "before the %u-token window (traces/SYNTH.md)\n",
                    r.image_frac, got, r.n_tokens, want, r.window);
    }
    kvt_synth_tokens_free(tk);

    kvt_progress prog;
    kvt_progress_start(&prog, "synth: layers");
    o.progress = on_progress;
    o.progress_user = &prog;
    uint64_t t0 = kvt_now_ns();
    s = kvt_synth_write(&o, out, &wo);
    kvt_progress_end(&prog);
    if (s != KVT_OK)
        return kvt_cli_fail_status("synth", s, out);
    double secs = (double)(kvt_now_ns() - t0) * 1e-9;
    struct stat st;
    double file = stat(out, &st) == 0 ? (double)st.st_size : 0.0;
    char a[24], b[24];
    printf("%s: synthetic-%s, L=%d Hq=%d Hkv=%d D=%d, T=%u W=%u G=%u, %s%s%s: %s raw -> %s file "
           "(%.2fx) in %.1f s\n",
           out, sh->name, r.n_layers, sh->n_q_heads, sh->n_kv_heads, sh->head_dim, r.n_tokens,
           r.window, r.n_decode, kvt_dtype_name(r.dtype),
           r.colsum == KVT_SYNTH_ON ? ", colsum" : "", r.q_all ? ", Q_all" : "",
           kvt_cli_bytes_text((double)raw, a, sizeof(a)), kvt_cli_bytes_text(file, b, sizeof(b)),
           file > 0 ? (double)raw / file : 0.0, secs);
    return 0;
}
