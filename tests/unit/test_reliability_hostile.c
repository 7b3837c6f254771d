/* test_reliability_hostile.c - hostile and odd traces through every kvtrace command that
 * reads them. Each case is written here with the trace writer (so shapes the capture API
 * would refuse can be made), then `kvtrace info`, `verify`, `replay --policies all --budgets
 * 8,16,1000 -o out.json`, `recommend` and `report` run on it; cases with short prompts also
 * replay every policy with window=1 at budgets 1,8,1000. Checked for every command: no crash
 * (no signal, no exit >= 128), an error is exactly one stderr line, and the expected outcome
 * of the case (the table in main, also in tests/RELIABILITY.md): a refusal whose line names
 * the problem, or success. When replay succeeds, results.json holds no bare nan/inf and the
 * report's HTML text (outside scripts) shows no "nan"/"inf" word.
 * Cases: clean control, NaN / Inf in K, V, Q_window, Q_decode and attn_colsum, NaN in K of
 * every layer (replayed 8 more times with 4 threads: the error must name layer 0, the first, as
 * one thread would, whichever layer a thread fails first), all-zero keys,
 * Hq not a multiple of Hkv, a stored window longer than T, T smaller than the policies'
 * window, T = 1, zero layers. KVT_KEEP=1 keeps the temporary directory.
 */
#include <sys/stat.h>
#include <sys/wait.h>

#include "kvt_test.h"
#include "kvt_trace.h"

static const char *bin;
static char dir[256];

typedef struct shape {
    int L, Hq, Hkv, D, T, W, G;
} shape;

enum mutation {
    MUT_NONE,
    MUT_NAN_K,
    MUT_NAN_K_ALL, /* NaN in K of every layer */
    MUT_INF_V,
    MUT_NAN_QWIN,
    MUT_INF_QDEC,
    MUT_ZERO_KEYS,
    MUT_NAN_COLSUM,
    MUT_BAD_SCALE, /* model.attn_scale = -1 in the header */
};

static uint64_t rng_state;
static float rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* [H, n, D] f32 values; the mutation hits element (head 0, token n/2, dim 0) of layer L-1 */
static kvt_status put(kvt_trace_writer *w, int kind, int layer, int H, int n, int D, bool poison,
                      float poison_value, bool zero)
{
    size_t cnt = (size_t)H * (size_t)n * (size_t)D;
    float *buf = malloc(cnt * sizeof(float) + 4);
    for (size_t i = 0; i < cnt; i++)
        buf[i] = zero ? 0.0f : rnd();
    if (poison)
        buf[(size_t)(n / 2) * (size_t)D] = poison_value;
    kvt_record_info in = {.kind = kind,
                          .layer = layer,
                          .head_end = (uint32_t)H,
                          .tok_end = (uint32_t)n,
                          .dim = (uint32_t)D,
                          .dtype = KVT_DTYPE_F32};
    kvt_status s = kvt_trace_writer_append(w, &in, buf);
    free(buf);
    return s;
}

static void write_trace(const char *path, shape sh, enum mutation m)
{
    char hdr[1024];
    snprintf(hdr, sizeof(hdr),
             "{\"format\":\"kvtrace\",\"created_by\":\"test_reliability_hostile\","
             "\"model\":{\"name\":\"hostile\",\"arch\":\"llama\",\"n_layers\":%d,\"n_q_heads\":%d,"
             "\"n_kv_heads\":%d,\"head_dim\":%d,%s\"rope\":{\"type\":\"default\",\"theta\":10000,"
             "\"pairs\":\"half\"}},"
             "\"kv_dtype\":\"f32\",\"n_tokens\":%d,\"window\":%d,\"n_decode\":%d}",
             sh.L, sh.Hq, sh.Hkv, sh.D, m == MUT_BAD_SCALE ? "\"attn_scale\":-1," : "", sh.T, sh.W,
             sh.G);
    kvt_writer_opts o = {.force = true};
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(path, hdr, &o, &w));
    rng_state = 0x9E3779B97F4A7C15ull;
    kvt_status s = KVT_OK;
    float nan = nanf(""), inf = INFINITY;
    for (int l = 0; l < sh.L && s == KVT_OK; l++) {
        bool last = l == sh.L - 1;
        s = put(w, KVT_KIND_K, l, sh.Hkv, sh.T, sh.D,
                (last && m == MUT_NAN_K) || m == MUT_NAN_K_ALL, nan, m == MUT_ZERO_KEYS);
        if (s == KVT_OK)
            s = put(w, KVT_KIND_V, l, sh.Hkv, sh.T, sh.D, last && m == MUT_INF_V, inf, false);
        if (s == KVT_OK)
            s = put(w, KVT_KIND_Q_WINDOW, l, sh.Hq, sh.W, sh.D, last && m == MUT_NAN_QWIN, nan,
                    false);
        if (s == KVT_OK) /* H2O's column sums [Hq, T, 1]: random, H2O only ranks them */
            s = put(w, KVT_KIND_ATTN_COLSUM, l, sh.Hq, sh.T, 1, last && m == MUT_NAN_COLSUM, nan,
                    false);
        if (sh.G > 0 && s == KVT_OK)
            s = put(w, KVT_KIND_Q_DECODE, l, sh.Hq, sh.G, sh.D, last && m == MUT_INF_QDEC, -inf,
                    false);
        if (sh.G > 0 && s == KVT_OK)
            s = put(w, KVT_KIND_K_DECODE, l, sh.Hkv, sh.G, sh.D, false, 0, false);
        if (sh.G > 0 && s == KVT_OK)
            s = put(w, KVT_KIND_V_DECODE, l, sh.Hkv, sh.G, sh.D, false, 0, false);
    }
    int32_t *ids = calloc((size_t)sh.T + 1, sizeof(int32_t));
    for (int t = 0; t < sh.T; t++)
        ids[t] = 1 + t % 500;
    kvt_record_info ti = {.kind = KVT_KIND_TOKEN_IDS,
                          .layer = -1,
                          .head_end = 1,
                          .tok_end = (uint32_t)sh.T,
                          .dim = 1,
                          .dtype = KVT_DTYPE_I32};
    if (s == KVT_OK)
        s = kvt_trace_writer_append(w, &ti, ids);
    free(ids);
    if (s == KVT_OK)
        s = kvt_trace_writer_finish(w);
    kvt_trace_writer_free(w);
    KVT_CHECK(s);
}

/* Run `kvtrace ARGS` with stdout and stderr to files; returns the exit code, or 200 + signal
 * when the command died of a signal. */
static int run(const char *args, const char *tag)
{
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "%s %s >%s/%s.out 2>%s/%s.err", bin, args, dir, tag, dir, tag);
    int ws = system(cmd);
    if (WIFSIGNALED(ws))
        return 200 + WTERMSIG(ws);
    return WIFEXITED(ws) ? WEXITSTATUS(ws) : 255;
}

static char *slurp(const char *tag, const char *ext)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/%s.%s", dir, tag, ext);
    char *b = (char *)kvt_test_slurp(p, NULL);
    return b ? b : calloc(1, 1);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* expected outcome of a command: 0 ok, 1 refused with `msg` in its one line, -1 either */
typedef struct expect {
    int code;
    const char *msg;
} expect;
static const expect ok = {0, NULL}, any = {-1, NULL};

/* Check one command's outcome; returns its exit code. */
static int check_cmd(const char *name, const char *cmd, const char *args, expect e)
{
    char tag[128];
    snprintf(tag, sizeof(tag), "%s_%s", name, cmd);
    int rc = run(args, tag);
    char *err = slurp(tag, "err");
    KVT_EXPECT_MSG(rc < 128, "%s: kvtrace %s crashed (exit/signal %d): %s", name, cmd, rc, err);
    if (rc != 0 && rc < 128 && !(rc == 1 && !strcmp(cmd, "verify")))
        KVT_EXPECT_MSG(count_lines(err) == 1, "%s: kvtrace %s failed with %d stderr lines:\n%s",
                       name, cmd, count_lines(err), err);
    if (e.code >= 0)
        KVT_EXPECT_MSG(rc == e.code, "%s: kvtrace %s exit %d, want %d: %s", name, cmd, rc, e.code,
                       err);
    if (e.msg) {
        char *out = slurp(tag, "out");
        KVT_EXPECT_MSG(strstr(err, e.msg) || strstr(out, e.msg),
                       "%s: kvtrace %s does not say '%s': %s%s", name, cmd, e.msg, out, err);
        free(out);
    }
    char first[160] = "";
    snprintf(first, sizeof(first), "%s", err);
    char *nl = strchr(first, '\n');
    if (nl)
        *nl = '\0';
    printf("  %-9s exit %d%s%s\n", cmd, rc, first[0] ? ": " : "", first);
    free(err);
    return rc;
}

/* "nan" or "inf" as a word (case-insensitive) in an HTML file's text: outside tags and
 * outside <script> and <style> (the inlined chart code mentions NaN) */
static bool html_has_nan(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return false;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *h = calloc((size_t)n + 1, 1);
    if (fread(h, 1, (size_t)n, f) != (size_t)n)
        h[0] = '\0';
    fclose(f);
    for (char *p = h; *p; p++)
        *p = (char)((*p >= 'A' && *p <= 'Z') ? *p + 32 : *p);
    bool found = false;
    char word[8];
    size_t wn = 0;
    for (char *p = h; *p && !found; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_') { /* a word char */
            if (wn < sizeof(word) - 1)
                word[wn] = *p;
            wn++;
            continue;
        }
        if (wn == 3 && (!strncmp(word, "nan", 3) || !strncmp(word, "inf", 3)))
            found = true;
        wn = 0;
        if (!strncmp(p, "<script", 7) || !strncmp(p, "<style", 6)) {
            char *e = strstr(p, p[2] == 'c' ? "</script" : "</style");
            if (!e)
                break;
            p = e;
        }
        if (*p == '<') {
            char *e = strchr(p, '>');
            if (!e)
                break;
            p = e;
        }
    }
    free(h);
    return found;
}

/* a bare word other than true/false/null outside JSON strings (nan, inf, -nan, Infinity) */
static bool json_has_nonfinite(const char *j)
{
    bool in_str = false;
    for (const char *p = j; *p; p++) {
        if (in_str) {
            if (*p == '\\' && p[1])
                p++;
            else if (*p == '"')
                in_str = false;
            continue;
        }
        if (*p == '"') {
            in_str = true;
        } else if (strchr("nNiI", *p) && *p) { /* not an exponent 'e'; null is allowed */
            if (strncmp(p, "null", 4))
                return true;
            p += 3;
        }
    }
    return false;
}

/* recommend and report on a results.json: no crash, no nan/inf in the JSON or the HTML text */
static void check_results(const char *name, const char *out, const char *rep, bool skip_nan)
{
    char args[2048];
    snprintf(args, sizeof(args), "recommend %s", out);
    int rr = check_cmd(name, "recommend", args, any);
    KVT_EXPECT_MSG(rr == 0 || rr == 3, "%s: recommend exit %d", name, rr);
    snprintf(args, sizeof(args), "report %s -o %s", out, rep);
    check_cmd(name, "report", args, ok);
    char html[700];
    snprintf(html, sizeof(html), "%s/index.html", rep);
    if (!skip_nan)
        KVT_EXPECT_MSG(!html_has_nan(html), "%s: the report's text shows nan/inf", name);
    char *json = NULL;
    {
        FILE *f = fopen(out, "rb");
        if (f) {
            fseek(f, 0, SEEK_END);
            long n = ftell(f);
            fseek(f, 0, SEEK_SET);
            json = calloc((size_t)n + 1, 1);
            if (fread(json, 1, (size_t)n, f) != (size_t)n)
                json[0] = '\0';
            fclose(f);
        }
    }
    KVT_EXPECT_MSG(json && !json_has_nonfinite(json), "%s: results.json holds a nan/inf", name);
    free(json);
}

typedef struct hcase {
    const char *name;
    shape sh;
    enum mutation m;
    expect info, verify, replay;
    bool small_window; /* also replay every policy with window=1 */
} hcase;

/* every policy that needs no extra input file and no Q_all, with window=1 where it has a
   window */
#define WINDOW1_POLICIES                                                                           \
    "full,random:window=1,streamingllm,h2o:window=1,tova,snapkv:window=1,pyramidkv:window=1,"      \
    "adakv:window=1,knorm,vnorm,keydiff,mixkv-snapkv:window=1,mixkv-pyramidkv:window=1,"           \
    "mixkv-adakv:window=1,oracle,quest,hybridkv-like:window=1,lightkv-like:window=1,"              \
    "chunkkv:window=1,simlayerkv:threshold=0.5,snapkv:window=1,merge=pivot,cam:window=1,lookm,"    \
    "elastic-cache,leverage,leverage:sketch=0"

int main(void)
{
    bin = getenv("KVT_BIN");
    if (!bin) {
        printf("SKIP: KVT_BIN not set\n");
        return 77;
    }
    char tmpl[] = "/tmp/kvt_hostile_XXXXXX";
    if (!mkdtemp(tmpl)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(dir, sizeof(dir), "%s", tmpl);
    { /* the checkers themselves */
        char p[400];
        snprintf(p, sizeof(p), "%s/probe.html", dir);
        FILE *f = fopen(p, "w");
        fputs("<script>NaN</script><table><tr><td>0.5</td><td>NaN</td></tr></table>", f);
        fclose(f);
        KVT_EXPECT(html_has_nan(p));
        f = fopen(p, "w");
        fputs("<script>x=NaN</script><p>Infinity inference nano</p><td>/a/nan_k.kvt</td>", f);
        fclose(f);
        KVT_EXPECT(!html_has_nan(p));
        KVT_EXPECT(json_has_nonfinite("{\"a\": nan}") && json_has_nonfinite("[1, -inf]"));
        KVT_EXPECT(!json_has_nonfinite("{\"inferred\": null, \"x\": 1e-05}"));
    }
    const shape base = {.L = 2, .Hq = 4, .Hkv = 2, .D = 8, .T = 64, .W = 32, .G = 4};
    shape hq6 = base, wbig = base, tsmall = base, t1 = base, l0 = base, l6 = base;
    l6.L = 6;
    hq6.Hq = 6; /* Hkv = 2 divides 6, so Hkv = 4 */
    hq6.Hkv = 4;
    wbig.T = 20; /* stored window of 32 queries over 20 tokens */
    tsmall.T = 12, tsmall.W = 12;
    t1.T = 1, t1.W = 1;
    l0.L = 0;
    const hcase cases[] = {
        {"clean", base, MUT_NONE, ok, ok, ok, true},
        {"nan_k", base, MUT_NAN_K, ok, ok, {1, "is not finite"}, false},
        {"nan_k_all_layers", l6, MUT_NAN_K_ALL, ok, ok, {1, "layer 0: K element"}, false},
        {"inf_v", base, MUT_INF_V, ok, ok, {1, "is not finite"}, false},
        {"nan_qwindow", base, MUT_NAN_QWIN, ok, ok, {1, "is not finite"}, false},
        {"inf_qdecode", base, MUT_INF_QDEC, ok, ok, {1, "is not finite"}, false},
        {"zero_keys", base, MUT_ZERO_KEYS, ok, ok, ok, true},
        {"nan_colsum", base, MUT_NAN_COLSUM, ok, ok, ok, false},
        {"bad_attn_scale", base, MUT_BAD_SCALE, ok, ok, {1, "model.attn_scale"}, false},
        {"hq_not_multiple", hq6, MUT_NONE, any, any, {1, "multiple"}, false},
        {"window_gt_T", wbig, MUT_NONE, any, any, {1, NULL}, false},
        {"T_lt_policy_window", tsmall, MUT_NONE, ok, ok, {1, "window=32 needs 32"}, true},
        /* budgets 8, 16 and 1000 all above T = 1: kept whole, no window read (short prompt) */
        {"T_1", t1, MUT_NONE, ok, ok, ok, true},
        {"zero_layers", l0, MUT_NONE, any, any, {1, "n_layers"}, false},
    };
    const size_t n_cases = sizeof(cases) / sizeof(cases[0]);
    /* A case whose replay expectation fails because of a bug in replay/ can be parked by
     * naming it in KVT_HOSTILE_SKIP_REPLAY (comma list; none today), with the bug written up
     * in tests/RELIABILITY.md, so the other cases stay a regression test. */
    const char *skip = getenv("KVT_HOSTILE_SKIP_REPLAY");
    /* e.g. "--device cuda" (test_reliability_hostile_cuemu): the same cases on that path */
    const char *extra = getenv("KVT_HOSTILE_REPLAY_ARGS") ? getenv("KVT_HOSTILE_REPLAY_ARGS") : "";
    for (size_t i = 0; i < n_cases; i++) {
        const hcase *c = &cases[i];
        char trace[512], args[2048], out[600], rep[600];
        snprintf(trace, sizeof(trace), "%s/%s.kvt", dir, c->name);
        snprintf(out, sizeof(out), "%s/%s.json", dir, c->name);
        snprintf(rep, sizeof(rep), "%s/%s_report", dir, c->name);
        write_trace(trace, c->sh, c->m);
        printf("%s (L=%d Hq=%d Hkv=%d D=%d T=%d W=%d G=%d):\n", c->name, c->sh.L, c->sh.Hq,
               c->sh.Hkv, c->sh.D, c->sh.T, c->sh.W, c->sh.G);
        snprintf(args, sizeof(args), "info %s", trace);
        check_cmd(c->name, "info", args, c->info);
        snprintf(args, sizeof(args), "verify %s", trace);
        check_cmd(c->name, "verify", args, c->verify);
        bool skip_replay = false;
        if (skip && *skip) {
            char key[80];
            snprintf(key, sizeof(key), ",%s,", c->name);
            char list[1024];
            snprintf(list, sizeof(list), ",%s,", skip);
            skip_replay = strstr(list, key) != NULL;
        }
        snprintf(args, sizeof(args),
                 "replay %s --policies all --budgets 8,16,1000 --threads 2 %s -o %s", trace, extra,
                 out);
        int rc = check_cmd(c->name, "replay", args, skip_replay ? any : c->replay);
        if (skip_replay)
            printf("  (replay expectation skipped: known bug, see tests/RELIABILITY.md)\n");
        if (rc == 0)
            check_results(c->name, out, rep, skip_replay);
        for (int r = 0; c->m == MUT_NAN_K_ALL && r < 8; r++) { /* whatever the threads' timing */
            snprintf(args, sizeof(args),
                     "replay %s --policies snapkv,knorm --budgets 8 --threads 4 %s -o %s/t4.json",
                     trace, extra, dir);
            check_cmd(c->name, "replay_t4", args, (expect){1, "layer 0: K element"});
        }
        if (c->m == MUT_NAN_COLSUM) { /* only H2O, LOOK-M and Elastic Cache read the column sums */
            snprintf(args, sizeof(args), "replay %s --policies h2o --budgets 8 %s -o %s/h2o.json",
                     trace, extra, dir);
            check_cmd(c->name, "replay_h2o", args, (expect){1, "is not finite"});
            snprintf(args, sizeof(args),
                     "replay %s --policies lookm --budgets 8 %s -o %s/lookm.json", trace, extra,
                     dir);
            check_cmd(c->name, "replay_lookm", args, (expect){1, "is not finite"});
            snprintf(args, sizeof(args),
                     "replay %s --policies elastic-cache --budgets 8 %s -o %s/elastic.json", trace,
                     extra, dir);
            check_cmd(c->name, "replay_elastic", args, (expect){1, "is not finite"});
        }
        if (!c->small_window)
            continue;
        /* the same trace with every policy's window at 1, so short prompts replay too */
        char name2[128];
        snprintf(name2, sizeof(name2), "%s_w1", c->name);
        snprintf(out, sizeof(out), "%s/%s.json", dir, name2);
        snprintf(rep, sizeof(rep), "%s/%s_report", dir, name2);
        snprintf(args, sizeof(args),
                 "replay %s --policies %s --budgets 1,8,1000 --threads 2 %s -o %s", trace,
                 WINDOW1_POLICIES, extra, out);
        if (check_cmd(name2, "replay", args, ok) == 0)
            check_results(name2, out, rep, false);
    }
    char cmd[400];
    snprintf(cmd, sizeof(cmd), getenv("KVT_KEEP") ? "true %s" : "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return kvt_test_result("test_reliability_hostile");
}
