/* misc.c - clock, CPU count, available memory and the deterministic xorshift64* generator shared by
 * tests, the synthetic trace generator and the seeded random policy.
 */
#include "kvt_common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
    *v = (uint64_t)x;
    return ok;
}

/* the process's cgroup v2 directory under /sys/fs/cgroup (from /proc/self/cgroup "0::/path") */
static bool cgroup2_dir(char *dir, size_t cap)
{
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f)
        return false;
    char line[1024];
    bool ok = false;
    while (!ok && fgets(line, sizeof(line), f))
        if (!strncmp(line, "0::", 3)) {
            line[strcspn(line, "\n")] = 0;
            int n = snprintf(dir, cap, "/sys/fs/cgroup%s", strcmp(line + 3, "/") ? line + 3 : "");
            ok = n > 0 && (size_t)n < cap;
        }
    fclose(f);
    return ok;
}

static void take_min(uint64_t *best, uint64_t v)
{
    if (*best == 0 || v < *best)
        *best = v;
}

uint64_t kvt_mem_available(void)
{
    uint64_t best = 0, lim, use;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof(line), f))
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
                take_min(&best, (uint64_t)kb * 1024);
                break;
            }
        fclose(f);
    }
    char dir[1100], path[1200];
    if (cgroup2_dir(dir, sizeof(dir))) {
        snprintf(path, sizeof(path), "%s/memory.max", dir);
        if (read_u64_file(path, &lim)) { /* "max" (no limit) does not parse */
            snprintf(path, sizeof(path), "%s/memory.current", dir);
            take_min(&best, read_u64_file(path, &use) && use < lim ? lim - use : 1);
        }
    }
    if (read_u64_file("/sys/fs/cgroup/memory/memory.limit_in_bytes", &lim) &&
        lim < (UINT64_C(1) << 60) && /* v1 without a limit: a huge number */
        read_u64_file("/sys/fs/cgroup/memory/memory.usage_in_bytes", &use))
        take_min(&best, use < lim ? lim - use : 1);
    return best;
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
