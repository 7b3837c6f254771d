/* misc.c - clock, CPU count and the deterministic xorshift64* generator shared by tests,
 * the synthetic trace generator and the seeded random policy.
 */
#include "kvt_common.h"

#include <math.h>
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
