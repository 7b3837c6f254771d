/* cli_util.c - error lines, progress display and number parsing for the kvtrace command. */
#include "kvt_cli.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char *s_held; /* kvt_cli_hold_errors: where the first error line goes */
static size_t s_held_cap;

void kvt_cli_hold_errors(char *buf, size_t cap)
{
    s_held = cap ? buf : NULL;
    s_held_cap = cap;
    if (s_held)
        s_held[0] = '\0';
}

int kvt_cli_fail(const char *cmd, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (!s_held)
        fprintf(stderr, "kvtrace %s: error: %s\n", cmd, buf);
    else if (!s_held[0])
        snprintf(s_held, s_held_cap, "kvtrace %s: error: %s", cmd, buf);
    return 1;
}

int kvt_cli_fail_status(const char *cmd, kvt_status s, const char *what)
{
    if (what && !*what) /* the open's ": No such file" would print as ": : No such file" */
        return kvt_cli_fail(cmd, "an empty path: give a file name");
    const char *m = kvt_error_msg();
    size_t n = what ? strlen(what) : 0;
    if (m && *m && n && !strncmp(m, what, n) && (m[n] == ':' || m[n] == ' '))
        return kvt_cli_fail(cmd, "%s", m); /* the message already names it */
    if (m && *m)
        return kvt_cli_fail(cmd, "%s: %s", what, m);
    return kvt_cli_fail(cmd, "%s: %s", what, kvt_status_str(s));
}

static bool progress_enabled(void)
{
    const char *e = getenv("KVT_PROGRESS");
    if (e)
        return strcmp(e, "0") != 0;
    return isatty(2);
}

/* the line, under p->mu; done == total ends it */
static void progress_draw(kvt_progress *p, uint64_t now)
{
    if (p->ended || now - p->t0_ns < 1000000000ull)
        return;
    double el = (double)(now - p->t0_ns) * 1e-9;
    if (p->total)
        fprintf(stderr, "\r%s: %llu/%llu (%.0f%%) %.1fs", p->label, (unsigned long long)p->done,
                (unsigned long long)p->total, 100.0 * (double)p->done / (double)p->total, el);
    else
        fprintf(stderr, "\r%s: %.1fs", p->label, el);
    p->shown = true;
    if (p->total && p->done >= p->total) {
        fputc('\n', stderr);
        p->ended = true;
    }
    fflush(stderr);
}

static void *progress_ticker(void *arg)
{
    kvt_progress *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 500000000L;
        if (ts.tv_nsec >= 1000000000L)
            ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&p->cv, &p->mu, &ts);
        if (!p->stop)
            progress_draw(p, kvt_now_ns());
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* a library message: end the progress line so the message gets a line of its own, and write
 * it, both under p->mu so no redraw comes between; the next draw starts a fresh line (lock
 * order: the log's, then p->mu) */
static void progress_log_line(void *user, const char *line)
{
    kvt_progress *p = user;
    pthread_mutex_lock(&p->mu);
    if (p->shown && !p->ended) {
        fputc('\n', stderr);
        p->shown = false;
    }
    fputs(line, stderr);
    fflush(stderr);
    pthread_mutex_unlock(&p->mu);
}

void kvt_progress_start(kvt_progress *p, const char *label)
{
    memset(p, 0, sizeof(*p));
    p->label = label;
    p->t0_ns = kvt_now_ns();
    p->enabled = progress_enabled();
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca; /* timed waits on the monotonic clock: a clock change cannot stall */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &ca);
    pthread_condattr_destroy(&ca);
    p->ticking = p->enabled && pthread_create(&p->th, NULL, progress_ticker, p) == 0;
    if (p->enabled)
        kvt_log_set_hook(progress_log_line, p);
}

void kvt_progress_update(kvt_progress *p, uint64_t done, uint64_t total)
{
    if (!p->enabled)
        return;
    pthread_mutex_lock(&p->mu);
    p->done = done, p->total = total;
    if (done >= total) /* the last step: drawn now, if the work took over a second */
        progress_draw(p, kvt_now_ns());
    pthread_mutex_unlock(&p->mu);
}

void kvt_progress_end(kvt_progress *p)
{
    if (p->enabled)
        kvt_log_set_hook(NULL, NULL);
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    if (p->ticking)
        pthread_join(p->th, NULL);
    if (p->shown && !p->ended) /* stopped early (an error): end the line before the message */
        fputc('\n', stderr);
    p->ended = true;
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
}

bool kvt_cli_parse_u64(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-')
        return false;
    errno = 0;
    char *e = NULL;
    unsigned long long v = strtoull(s, &e, 10);
    unsigned long long mu = 1;
    if (errno || e == s)
        return false;
    if (*e == 'k' || *e == 'K')
        mu = 1000ull, e++;
    else if (*e == 'M')
        mu = 1000000ull, e++;
    else if (*e == 'G')
        mu = 1000000000ull, e++;
    if (*e)
        return false;
    if (v > ULLONG_MAX / mu)
        return false;
    *out = (uint64_t)(v * mu);
    return true;
}

bool kvt_cli_parse_int(const char *s, int lo, int hi, int *out)
{
    if (!s || !*s)
        return false;
    errno = 0;
    char *e = NULL;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

bool kvt_cli_parse_size(const char *s, uint64_t *out)
{
    /* plain decimals only (strtod would also take hex, exponents, blanks, inf) */
    size_t digits = s ? strspn(s, "0123456789") : 0, frac = 0;
    if (!digits)
        return false;
    if (s[digits] == '.') {
        frac = 1 + strspn(s + digits + 1, "0123456789");
        if (frac == 1)
            return false; /* "5." */
    }
    errno = 0;
    char *e = NULL;
    double v = strtod(s, &e);
    if (errno || e != s + digits + frac || !(v > 0))
        return false;
    /* [K|M|G|T] then B or iB, any case: 512, 512B, 4k, 4KiB, 40gb */
    static const char units[] = "KMGT";
    char uc = *e >= 'a' && *e <= 'z' ? (char)(*e - 'a' + 'A') : *e;
    const char *u = uc && uc != 'B' ? strchr(units, uc) : NULL;
    if (u) {
        for (const char *k = units; k <= u; k++)
            v *= 1024.0;
        e++;
        if ((e[0] == 'i' || e[0] == 'I') && (e[1] == 'b' || e[1] == 'B') && !e[2])
            e += 2;
    }
    if ((e[0] == 'b' || e[0] == 'B') && !e[1])
        e++;
    if (*e || v < 1 || v >= 18446744073709551616.0)
        return false;
    *out = (uint64_t)v;
    return true;
}

bool kvt_cli_parse_double(const char *s, double *out)
{
    if (!s || !*s)
        return false;
    errno = 0;
    char *e = NULL;
    double v = strtod(s, &e);
    if (errno || e == s || *e || v != v)
        return false;
    *out = v;
    return true;
}

bool kvt_cli_parse_max_kl(const char *cmd, const char *v, double *out)
{
    double x;
    if (!kvt_cli_parse_double(v, &x) || !isfinite(x) || x < 0) {
        kvt_cli_fail(cmd, "--max-kl %s: expected a finite number >= 0 (nats)", v);
        return false;
    }
    *out = x;
    return true;
}

bool kvt_cli_wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--"))
            break;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help"))
            return true;
    }
    return false;
}

bool kvt_cli_json_text_ok(const char *cmd, const char *what, const char *text)
{
    ptrdiff_t bad = kvt_utf8_invalid_at(text);
    if (bad >= 0)
        kvt_cli_fail(cmd,
                     "%s %s is not valid UTF-8 (byte %td): the JSON output that names it cannot "
                     "hold it",
                     what, text, bad);
    return bad < 0;
}

int kvt_cli_label_width(kvt_policy *const *pols, size_t n, int min)
{
    int w = min;
    for (size_t p = 0; p < n; p++) {
        int len = (int)strlen(kvt_policy_label(pols[p]));
        w = len > w ? len : w;
    }
    return w;
}

bool kvt_cli_same_path(const char *a, const char *b)
{
    struct stat x, y;
    if (stat(a, &x) == 0 && stat(b, &y) == 0)
        return x.st_dev == y.st_dev && x.st_ino == y.st_ino;
    char da[4096], db[4096];
    kvt_dir_of(a, da, sizeof(da));
    kvt_dir_of(b, db, sizeof(db));
    const char *ba = strrchr(a, '/'), *bb = strrchr(b, '/');
    ba = ba ? ba + 1 : a, bb = bb ? bb + 1 : b;
    return strcmp(ba, bb) == 0 && stat(da, &x) == 0 && stat(db, &y) == 0 && x.st_dev == y.st_dev &&
           x.st_ino == y.st_ino;
}

bool kvt_cli_output_ok(const char *cmd, const char *out, bool force, const char *const *inputs,
                       size_t n_inputs)
{
    size_t ol = out ? strlen(out) : 0;
    if (!ol || out[ol - 1] == '/') {
        kvt_cli_fail(cmd,
                     !out ? "no output file (-o FILE)"
                     : ol ? "%s: an output file name, not a directory"
                          : "an empty output path: give a file name",
                     out);
        return false;
    }
    /* the directory must take a new file: found now, not after the work is done. A file is
     * made and removed, as access() says yes to root on a read-only mount, /proc or /sys. An
     * output replaces a symbolic link's target (kvt_output_target): its directory is tested,
     * and a link to a missing file is refused here */
    char dir[4096], probe[4200], *target = NULL;
    int mode;
    if (kvt_output_target(out, &target, &mode) != KVT_OK) {
        kvt_cli_fail(cmd, "cannot write %s: %s", out, kvt_error_msg());
        return false;
    }
    kvt_dir_of(target, dir, sizeof(dir));
    kvt_free(target);
    snprintf(probe, sizeof(probe), "%s/.kvtrace-probe.XXXXXX", dir);
    int fd = mkstemp(probe);
    if (fd < 0) {
        kvt_cli_fail(cmd, "cannot write %s: cannot create a file in %s: %s", out, dir,
                     strerror(errno));
        return false;
    }
    close(fd);
    unlink(probe);
    struct stat so;
    if (stat(out, &so) != 0)
        return true;            /* does not exist yet */
    if (!S_ISREG(so.st_mode)) { /* a device, FIFO or directory is never replaced */
        kvt_cli_fail(cmd, "%s exists and is not a regular file: refusing to replace it", out);
        return false;
    }
    for (size_t i = 0; i < n_inputs; i++) {
        struct stat si;
        if (inputs[i] && stat(inputs[i], &si) == 0 && si.st_dev == so.st_dev &&
            si.st_ino == so.st_ino) {
            kvt_cli_fail(cmd, "output %s is also an input: refusing to overwrite it", out);
            return false;
        }
    }
    if (!force) {
        kvt_cli_fail(cmd, "%s exists (use --force to overwrite)", out);
        return false;
    }
    return true;
}

void kvt_cli_target_init(kvt_cli_target *t)
{
    memset(t, 0, sizeof(*t));
    t->o = KVT_RECOMMEND_OPTS_DEFAULT;
}

int kvt_cli_target_arg(const char *cmd, int argc, char **argv, int *i, kvt_cli_target *t)
{
    const char *a = argv[*i];
    if (strcmp(a, "--max-error") && strcmp(a, "--min-recall") && strcmp(a, "--metric"))
        return 0;
    if (*i + 1 >= argc) {
        kvt_cli_fail(cmd, "%s needs a value", a);
        return -1;
    }
    const char *v = argv[++*i];
    if (!strcmp(a, "--metric")) {
        t->metric = v;
        return 1;
    }
    if (!kvt_cli_parse_double(v, &t->o.target) || !isfinite(t->o.target)) {
        kvt_cli_fail(cmd, "%s: '%s' is not a finite number", a, v);
        return -1;
    }
    t->o.target_is_max = !strcmp(a, "--max-error");
    t->have_max |= t->o.target_is_max;
    t->have_min |= !t->o.target_is_max;
    return 1;
}

bool kvt_cli_target_finish(const char *cmd, kvt_cli_target *t)
{
    kvt_status st;
    if (t->have_max && t->have_min) {
        kvt_cli_fail(cmd, "give --max-error or --min-recall, not both");
        return false;
    }
    /* targets no setting can have: errors are >= 0, recalls in [0, 1], coverage in [-1, 1] */
    if (t->have_max && t->o.target < 0) {
        kvt_cli_fail(cmd, "--max-error %g: an output error is >= 0", t->o.target);
        return false;
    }
    if (t->have_min && (t->o.target > 1 || t->o.target < -1)) {
        kvt_cli_fail(cmd,
                     "--min-recall %g: recall and coverage are at most 1 (coverage at least -1)",
                     t->o.target);
        return false;
    }
    if (t->metric && (st = kvt_rec_metric_parse(t->metric, &t->o.metric))) {
        kvt_cli_fail_status(cmd, st, "--metric");
        return false;
    }
    if (t->metric && t->o.metric == KVT_REC_METRIC_HEAD_OVERLAP) {
        kvt_cli_fail(cmd, "--metric head_overlap: it describes how alike the heads' selections "
                          "are, not their quality; it cannot be a target");
        return false;
    }
    if (t->metric && (t->have_max || t->have_min) &&
        kvt_rec_metric_is_error(t->o.metric) != t->have_max) { /* a usage error, exit 2 */
        kvt_cli_fail(cmd, "--metric %s is %s, not %s", t->metric, kvt_rec_metric_kind(t->o.metric),
                     t->have_max ? "--max-error" : "--min-recall");
        return false;
    }
    if (t->metric && !t->have_max && !t->have_min && !kvt_rec_metric_is_error(t->o.metric)) {
        kvt_cli_fail(cmd, "--metric %s needs a target (--min-recall R)", t->metric);
        return false;
    }
    return true;
}

const char *kvt_cli_bytes_text(double v, char *buf, size_t cap)
{
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (v >= 1024.0 && u < 4)
        v /= 1024.0, u++;
    snprintf(buf, cap, u ? "%.1f %s" : "%.0f %s", v, unit[u]);
    return buf;
}

char *kvt_cli_append_list(char *list, const char *item)
{
    size_t n = (list ? strlen(list) + 1 : 0) + strlen(item) + 1;
    char *r = kvt_malloc(n);
    if (r)
        snprintf(r, n, "%s%s%s", list ? list : "", list ? "," : "", item);
    kvt_free(list);
    return r;
}

/* --policies V appended to *list with 'all' expanded: 0, 1 (out of memory) or 2 (a usage
 * error, printed) */
int kvt_cli_append_policies(const char *cmd, char **list, const char *v)
{
    if (!kvt_cli_json_text_ok(cmd, "--policies", v)) /* labels and options go into the JSON */
        return 2;
    char *copy = kvt_strdup(v);
    if (!copy)
        return kvt_cli_fail(cmd, "out of memory");
    char *save = NULL;
    int rc = 0, n = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok && !rc; tok = strtok_r(NULL, ",", &save)) {
        if (!strncmp(tok, "all:", 4)) {
            rc = 2;
            kvt_cli_fail(cmd,
                         "--policies %s: 'all' takes no options; give them per policy "
                         "(snapkv:window=16) or to every window policy (--window 16)",
                         v);
        } else if (!(*list = kvt_cli_append_list(*list,
                                                 strcmp(tok, "all") ? tok : KVT_CLI_ALL_POLICIES)))
            rc = kvt_cli_fail(cmd, "out of memory");
        n++;
    }
    if (!rc && !n) {
        rc = 2;
        kvt_cli_fail(cmd, "--policies '%s': an empty policy list (see --list-policies)", v);
    }
    kvt_free(copy);
    return rc;
}

int kvt_cli_policy_files_ok(const char *cmd, kvt_policy *const *pols, size_t n_pol,
                            const char *const *traces, size_t n_traces)
{
    for (size_t p = 0; p < n_pol; p++) {
        if (n_traces > 1 && kvt_policy_one_trace(pols[p])) {
            kvt_cli_fail(cmd,
                         "%s: a scores or critical= file describes one trace, and %zu are "
                         "given: give a directory instead (scores=DIR, critical=DIR) with one "
                         "NAME.npy per trace NAME.kvt",
                         kvt_policy_label(pols[p]), n_traces);
            return 2;
        }
        /* two traces named alike would read one scores=DIR file */
        for (size_t t = 0; t < n_traces; t++) {
            char a[4096], b[4096];
            if (!kvt_policy_trace_file(pols[p], traces[t], a, sizeof(a)))
                break;
            for (size_t u = 0; u < t; u++)
                if (kvt_policy_trace_file(pols[p], traces[u], b, sizeof(b)) && !strcmp(a, b)) {
                    kvt_cli_fail(cmd,
                                 "%s: %s and %s would both read %s (one NAME.npy per trace "
                                 "NAME.kvt): give the traces different names",
                                 kvt_policy_label(pols[p]), traces[u], traces[t], a);
                    return 2;
                }
        }
    }
    return 0;
}

/* What the file at path is, from its first bytes (kvt_cli.h) */
int kvt_cli_sniff(const char *cmd, const char *path, uint32_t *hlen)
{
    char b[4097];
    *hlen = 0;
    FILE *f = kvt_fopen_regular(path);
    if (!f)
        return KVT_CLI_FILE_OTHER;
    size_t n = fread(b, 1, sizeof(b) - 1, f);
    fclose(f);
    b[n] = '\0';
    if (n >= 16 && !memcmp(b, "KVTSEL", 6)) {
        const unsigned char *u = (const unsigned char *)b + 12;
        *hlen = (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
        return KVT_CLI_FILE_SELECTION;
    }
    size_t i = 0;
    while (i < n && strchr(" \t\r\n", b[i]))
        i++;
    if (i == n || b[i] != '{' || strlen(b) != n) /* JSON text, without NUL bytes */
        return KVT_CLI_FILE_OTHER;
    if (strstr(b, "\"selection_version\""))
        return KVT_CLI_FILE_SELECTION;
    if (!strstr(b, "\"results_version\""))
        return KVT_CLI_FILE_OTHER;
    kvt_cli_fail(cmd,
                 "%s is a results.json (kvtrace replay -o), not a trace: 'kvtrace report %s' and "
                 "'kvtrace recommend %s' read it",
                 path, path, path);
    return KVT_CLI_FILE_RESULTS;
}
