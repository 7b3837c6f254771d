/* misc.c - clock, CPU count, available memory and the deterministic xorshift64* generator shared by
 * tests, the synthetic trace generator and the seeded random policy.
 */
#include "kvt_common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

uint64_t kvt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int kvt_cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

/* the first number of a file (a cgroup limit or usage); false for "max" or unreadable */
static bool read_u64_file(const char *path, uint64_t *v)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    unsigned long long x;
    bool ok = fscanf(f, "%llu", &x) == 1;
    fclose(f);
    if (ok)
        *v = (uint64_t)x;
    return ok;
}

/* the value of `key` in a "key value" file (meminfo, memory.stat); false if absent */
static bool read_keyed(const char *path, const char *key, uint64_t *v)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    char line[256];
    size_t n = strlen(key);
    bool ok = false;
    while (!ok && fgets(line, sizeof(line), f)) {
        unsigned long long x;
        if (!strncmp(line, key, n) && (line[n] == ' ' || line[n] == ':') &&
            sscanf(line + n + 1, " %llu", &x) == 1) {
            *v = (uint64_t)x;
            ok = true;
        }
    }
    fclose(f);
    return ok;
}

static void take_min(uint64_t *best, uint64_t v)
{
    if (*best == 0 || v < *best)
        *best = v;
}

/* The room under the memory limits of cgroup directory `dir` and of each of its ancestors up to
 * `top` (a limit set on a parent, as Slurm and systemd do, binds too): limit - (usage - the
 * inactive page cache, which the kernel reclaims before it kills). v2: memory.max,
 * memory.current, memory.stat inactive_file; v1: memory.limit_in_bytes (no limit: a huge
 * number), memory.usage_in_bytes, memory.stat total_inactive_file. A level whose usage cannot
 * be read is skipped (unknown, not full). */
static void cgroup_room(char *dir, size_t top, bool v2, uint64_t *best)
{
    char path[4200];
    for (;;) {
        uint64_t lim, use, cache = 0;
        snprintf(path, sizeof(path), "%s/%s", dir, v2 ? "memory.max" : "memory.limit_in_bytes");
        if (read_u64_file(path, &lim) && (v2 || lim < (UINT64_C(1) << 60))) {
            snprintf(path, sizeof(path), "%s/%s", dir,
                     v2 ? "memory.current" : "memory.usage_in_bytes");
            if (read_u64_file(path, &use)) {
                snprintf(path, sizeof(path), "%s/memory.stat", dir);
                if (read_keyed(path, v2 ? "inactive_file" : "total_inactive_file", &cache) &&
                    cache < use)
                    use -= cache;
                take_min(best, use < lim ? lim - use : 1);
            }
        }
        char *slash = strrchr(dir, '/');
        if (!slash || (size_t)(slash - dir) < top)
            break;
        *slash = '\0'; /* the parent */
    }
}

uint64_t kvt_mem_available_in(const char *root)
{
    uint64_t best = 0, kb;
    char path[4200], base[4096], line[4096];
    if (!root)
        root = "";
    snprintf(path, sizeof(path), "%s/proc/meminfo", root);
    if (read_keyed(path, "MemAvailable", &kb))
        take_min(&best, kb * 1024);
    /* the process's cgroups: "0::/path" (v2), "N:memory:/path" or "N:a,memory,b:/path" (v1).
       Inside a container the path may name the host's hierarchy, which the container's
       /sys/fs/cgroup does not have: the walk then starts at the first directory that exists
       and always reaches the mount's root (the container's own limit) */
    snprintf(path, sizeof(path), "%s/proc/self/cgroup", root);
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof(line), f)) {
        size_t len = strlen(line);
        if (len && line[len - 1] != '\n' && !feof(f)) { /* longer than the buffer: skip it */
            int ch;
            while ((ch = fgetc(f)) != EOF && ch != '\n')
                ;
            continue;
        }
        line[strcspn(line, "\n")] = '\0';
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2)
            continue;
        *c2 = '\0';
        const char *ctrl = c1 + 1, *cg = c2 + 1;
        bool v2 = !strncmp(line, "0:", 2) && !*ctrl, v1 = false;
        for (const char *t = ctrl; !v2 && *t; t += strcspn(t, ",")) {
            t += *t == ',';
            v1 |= !strncmp(t, "memory", 6) && (t[6] == ',' || !t[6]);
        }
        if (!v2 && !v1)
            continue;
        int n = snprintf(base, sizeof(base), "%s/sys/fs/cgroup%s", root, v2 ? "" : "/memory");
        size_t top = n > 0 ? (size_t)n : 0;
        if (n < 0 || snprintf(base + top, sizeof(base) - top, "%s", strcmp(cg, "/") ? cg : "") >=
                         (int)(sizeof(base) - top))
            continue;
        struct stat st; /* from the deepest directory that exists */
        while (strlen(base) > top && stat(base, &st) != 0)
            base[strrchr(base, '/') - base] = '\0';
        cgroup_room(base, top, v2, &best);
    }
    if (f)
        fclose(f);
    return best;
}

uint64_t kvt_mem_available(void)
{
    const char *root = getenv("KVT_TEST_MEM_ROOT"); /* tests: a made-up machine */
    return kvt_mem_available_in(root ? root : "");
}

void kvt_rng_seed(kvt_rng *r, uint64_t seed)
{
    /* splitmix64 so that small seeds give well-mixed states; state is never 0 */
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    r->s = z ? z : 0x2545f4914f6cdd1dull;
}

uint64_t kvt_rng_u64(kvt_rng *r)
{
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545f4914f6cdd1dull;
}

double kvt_rng_uniform(kvt_rng *r)
{
    return (double)(kvt_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

double kvt_rng_normal(kvt_rng *r)
{
    double u1 = kvt_rng_uniform(r), u2 = kvt_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static char *kvt_tmp_sibling(const char *path)
{
    static unsigned long counter;
    unsigned long n = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path) + 1 : 0, cap = strlen(path) + 64;
    char *buf = kvt_malloc(cap);
    if (!buf)
        return NULL;
    int k = snprintf(buf, cap, "%s.tmp.%ld.%lu", path, (long)getpid(), n);
    if (k < 0 || (size_t)k - dir_len > NAME_MAX) /* too long a name: a short hidden one */
        snprintf(buf, cap, "%.*s.kvt-%ld-%lu.tmp", (int)dir_len, path, (long)getpid(), n);
    return buf;
}

/* The temporary siblings being written (kvt_create_tmp_sibling until kvt_tmp_forget), for a
 * signal handler to remove: fixed slots of static memory, so that the handler (which may run
 * while another thread registers or forgets) never reads freed memory. A slot is 0 free, 1
 * being filled, 2 holding a name. A name that does not fit, or a 33rd, is not registered (it
 * then stays behind on a signal, as every temporary did before). */
#define TMP_SLOTS 32
static volatile sig_atomic_t tmp_state[TMP_SLOTS];
static char tmp_name[TMP_SLOTS][4096];
static pthread_mutex_t tmp_mu = PTHREAD_MUTEX_INITIALIZER;

static void tmp_remember(const char *t)
{
    if (strlen(t) >= sizeof(tmp_name[0]))
        return;
    pthread_mutex_lock(&tmp_mu);
    for (int i = 0; i < TMP_SLOTS; i++)
        if (tmp_state[i] == 0) {
            tmp_state[i] = 1;
            strcpy(tmp_name[i], t);
            atomic_signal_fence(memory_order_seq_cst); /* the name before the state, for a
                                                          handler in this thread */
            tmp_state[i] = 2;
            break;
        }
    pthread_mutex_unlock(&tmp_mu);
}

void kvt_tmp_forget(const char *tmp)
{
    if (!tmp)
        return;
    pthread_mutex_lock(&tmp_mu);
    for (int i = 0; i < TMP_SLOTS; i++)
        if (tmp_state[i] == 2 && !strcmp(tmp_name[i], tmp)) {
            tmp_state[i] = 0;
            break;
        }
    pthread_mutex_unlock(&tmp_mu);
}

/* The temporary directory (one slot, the same protocol as the files'). */
static volatile sig_atomic_t tmpdir_state;
static char tmpdir_name[4096];

void kvt_tmp_dir_remember(const char *dir)
{
    if (strlen(dir) >= sizeof(tmpdir_name))
        return;
    pthread_mutex_lock(&tmp_mu);
    if (tmpdir_state == 0) {
        tmpdir_state = 1;
        strcpy(tmpdir_name, dir);
        atomic_signal_fence(memory_order_seq_cst);
        tmpdir_state = 2;
    }
    pthread_mutex_unlock(&tmp_mu);
}

void kvt_tmp_dir_forget(const char *dir)
{
    pthread_mutex_lock(&tmp_mu);
    if (tmpdir_state == 2 && !strcmp(tmpdir_name, dir))
        tmpdir_state = 0;
    pthread_mutex_unlock(&tmp_mu);
}

/* Remove the registered directory's files and the directory, with system calls only (a
 * signal handler may not use opendir: it allocates). */
static void tmpdir_remove(void)
{
    static char buf[8192] __attribute__((aligned(8)));
    if (tmpdir_state != 2)
        return;
    int fd = open(tmpdir_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    for (long n; fd >= 0 && (n = syscall(SYS_getdents64, fd, buf, sizeof(buf))) > 0;)
        for (long off = 0; off < n;) {
            /* struct linux_dirent64: ino (8), off (8), reclen (2), type (1), name */
            unsigned short reclen;
            memcpy(&reclen, buf + off + 16, sizeof(reclen));
            const char *name = buf + off + 19;
            if (strcmp(name, ".") && strcmp(name, ".."))
                unlinkat(fd, name, 0);
            off += reclen;
        }
    if (fd >= 0)
        close(fd);
    rmdir(tmpdir_name);
}

static void tmp_on_signal(int sig)
{
    int e = errno;
    for (int i = 0; i < TMP_SLOTS; i++)
        if (tmp_state[i] == 2)
            unlink(tmp_name[i]); /* async-signal-safe */
    tmpdir_remove();
    signal(sig, SIG_DFL);
    errno = e;
    raise(sig); /* delivered when the handler returns: the process ends by the signal */
}

void kvt_tmp_remove_on_signals(void)
{
    struct sigaction sa, old;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = tmp_on_signal;
    sigemptyset(&sa.sa_mask);
    const int sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    for (int i = 0; i < 3; i++) /* a signal ignored on entry (nohup, a background job's
                                   SIGINT) stays ignored */
        if (sigaction(sigs[i], NULL, &old) == 0 && old.sa_handler != SIG_IGN)
            sigaction(sigs[i], &sa, NULL);
}

int kvt_create_tmp_sibling(const char *path, unsigned mode, char **tmp)
{
    *tmp = NULL;
    for (int tries = 0; tries < 1000; tries++) { /* the counter moves on at every call */
        char *t = kvt_tmp_sibling(path);
        if (!t) {
            errno = ENOMEM;
            return -1;
        }
        int fd = open(t, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode);
        if (fd >= 0) {
            tmp_remember(t);
            *tmp = t;
            return fd;
        }
        int e = errno;
        kvt_free(t);
        errno = e;
        if (e != EEXIST)
            return -1;
    }
    return -1;
}

int kvt_open_regular(const char *path)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        errno = EINVAL;
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
}

FILE *kvt_fopen_regular(const char *path)
{
    int fd = kvt_open_regular(path);
    if (fd < 0)
        return NULL;
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        int e = errno;
        close(fd);
        errno = e;
    }
    return f;
}

const char *kvt_open_error(const char *path)
{
    static _Thread_local char buf[512];
    if (errno == EINVAL)
        snprintf(buf, sizeof(buf), "%s: not a regular file", path);
    else
        snprintf(buf, sizeof(buf), "%s: %s", path, strerror(errno));
    return buf;
}

void kvt_dir_of(const char *path, char *dir, size_t cap)
{
    const char *slash = strrchr(path, '/');
    snprintf(dir, cap, "%.*s", slash ? (int)(slash == path ? 1 : slash - path) : 1,
             slash ? path : ".");
}

void kvt_fsync_dir_of(const char *path)
{
    char dir[4096];
    kvt_dir_of(path, dir, sizeof(dir));
    int fd = open(dir, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

void kvt_fmt_double(double x, char *buf, size_t cap)
{
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, x);
        if (strtod(buf, NULL) == x)
            return;
    }
}

kvt_status kvt_output_target(const char *path, char **final, int *mode)
{
    *final = NULL;
    *mode = -1;
    struct stat sb;
    char *target = NULL;
    if (lstat(path, &sb) == 0 && S_ISLNK(sb.st_mode)) {
        target = realpath(path, NULL);
        if (!target || stat(target, &sb) != 0) {
            int e = errno;
            free(target); /* realpath's, from malloc */
            return e == ENOENT
                       ? kvt_error_set(KVT_ERR_IO, "%s is a symbolic link to a missing file", path)
                       : kvt_error_set(KVT_ERR_IO, "%s: a symbolic link: %s", path, strerror(e));
        }
        *mode = (int)(sb.st_mode & 07777);
    } else if (lstat(path, &sb) == 0) {
        *mode = (int)(sb.st_mode & 07777);
    }
    *final = kvt_strdup(target ? target : path);
    free(target);
    KVT_RETURN_IF(!*final, KVT_ERR_NOMEM, "out of memory");
    return KVT_OK;
}

kvt_status kvt_write_file_atomic(const char *out, const char *txt, size_t len)
{
    char *tmp = NULL, *path = NULL;
    int mode;
    kvt_status st = kvt_output_target(out, &path, &mode);
    if (st)
        return st;
    int fd = kvt_create_tmp_sibling(path, 0666, &tmp);
    if (fd >= 0 && mode >= 0)
        (void)fchmod(fd, (mode_t)mode); /* the replaced file's permissions */
    if (fd < 0) {
        st = kvt_error_set(errno == ENOMEM ? KVT_ERR_NOMEM : KVT_ERR_IO,
                           "cannot write next to %s: %s", path, strerror(errno));
        goto out_free;
    }
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        st = kvt_error_set(KVT_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
        close(fd);
        goto out_remove;
    }
    bool ok = fwrite(txt, 1, len, f) == len && fputc('\n', f) != EOF && fflush(f) == 0 &&
              fsync(fileno(f)) == 0;
    int err = ok ? 0 : errno;
    if (fclose(f) != 0 && ok) {
        ok = false;
        err = errno;
    }
    if (!ok) {
        st = kvt_error_set(KVT_ERR_IO, "cannot write %s: %s (an existing %s is unchanged)", path,
                           strerror(err), path);
        goto out_remove;
    }
    if (rename(tmp, path) != 0) {
        st = kvt_error_set(KVT_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto out_remove;
    }
    kvt_fsync_dir_of(path); /* make the rename itself durable */
    goto out_free;
out_remove:
    remove(tmp);
out_free:
    kvt_tmp_forget(tmp);
    kvt_free(tmp);
    kvt_free(path);
    return st;
}

kvt_status kvt_read_text_file(const char *path, size_t max_bytes, char **txt, size_t *len)
{
    *txt = NULL;
    *len = 0;
    FILE *f = kvt_fopen_regular(path);
    KVT_RETURN_IF(!f, KVT_ERR_IO, "%s", kvt_open_error(path));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    kvt_status st = KVT_OK;
    for (;;) {
        if (n + 65536 + 1 > cap) {
            cap = cap ? cap * 2 : 1 << 16;
            char *b = kvt_realloc(buf, cap);
            if (!b) {
                st = kvt_error_set(KVT_ERR_NOMEM, "out of memory reading %s", path);
                break;
            }
            buf = b;
        }
        size_t got = fread(buf + n, 1, 65536, f);
        n += got;
        if (n > max_bytes) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s is larger than %zu bytes", path, max_bytes);
            break;
        }
        if (got < 65536) {
            if (ferror(f))
                st = kvt_error_set(KVT_ERR_IO, "cannot read %s: %s", path, strerror(errno));
            break;
        }
    }
    fclose(f);
    if (st) {
        kvt_free(buf);
        return st;
    }
    buf[n] = '\0';
    *txt = buf;
    *len = n;
    return KVT_OK;
}

/* the length of the valid UTF-8 sequence at p (1..4), or 0 */
static int utf8_seq(const unsigned char *p)
{
    int n = *p < 0x80             ? 0
            : (*p & 0xe0) == 0xc0 ? 1
            : (*p & 0xf0) == 0xe0 ? 2
            : (*p & 0xf8) == 0xf0 ? 3
                                  : -1;
    if (n < 0)
        return 0;
    uint32_t c = n == 0 ? *p : n == 1 ? *p & 0x1fu : n == 2 ? *p & 0x0fu : *p & 0x07u;
    for (int k = 1; k <= n; k++) {
        if ((p[k] & 0xc0) != 0x80) /* also stops at the terminating NUL */
            return 0;
        c = (c << 6) | (p[k] & 0x3fu);
    }
    /* no overlong forms, surrogates or code points past U+10FFFF */
    if ((n == 1 && c < 0x80) || (n == 2 && (c < 0x800 || (c >= 0xd800 && c < 0xe000))) ||
        (n == 3 && (c < 0x10000 || c > 0x10ffff)))
        return 0;
    return n + 1;
}

ptrdiff_t kvt_utf8_invalid_at(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int n = utf8_seq(p);
        if (!n)
            return (ptrdiff_t)(p - (const unsigned char *)s);
        p += n;
    }
    return -1;
}

size_t kvt_utf8_sanitize(char *s)
{
    size_t n_bad = 0;
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        int n = utf8_seq(p);
        if (n) {
            p += n;
        } else {
            *p++ = '?';
            n_bad++;
        }
    }
    return n_bad;
}
