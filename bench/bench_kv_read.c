/* bench_kv_read.c - one layer's K and V read two ways, as replay --device cuda reads them:
 *  - ahead: kvt_trace_reader_read into fresh host buffers (a worker's buffers for its first
 *    layer: every page faulted and zeroed), the byte planes merged on the host (the read
 *    before the streaming, and still the read ahead while the GPU is not ready);
 *  - streamed: kvt_trace_reader_read_sink, each record decompressed into one of two reused
 *    4 MiB buffers (the layer context's pinned staging buffers; no copy made here).
 * Usage: bench_kv_read TRACE [rounds] [threads]: `threads` readers at once (each its own
 * reader of the same file, as the workers), median per-reader time over `rounds`, both ways
 * alternating. Prints one markdown row. Not a test: numbers depend on the machine.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_trace.h"

#define STAGE ((size_t)4 << 20)

typedef struct reader {
    const char *path;
    int rounds;
    double *ahead, *streamed; /* [rounds] seconds */
    char *stage[2];
    int next;
    int failed;
} reader;

static kvt_status room(void *user, size_t bytes, void **buf)
{
    reader *r = user;
    KVT_RETURN_IF(bytes > STAGE, KVT_ERR_INVALID_ARG, "a record over 4 MiB");
    *buf = r->stage[r->next];
    r->next ^= 1;
    return KVT_OK;
}

static kvt_status put(void *user, const kvt_trace_piece *p, void *buf)
{
    (void)user, (void)p, (void)buf;
    return KVT_OK;
}

static void *run(void *arg)
{
    reader *r = arg;
    kvt_trace_reader *rd = NULL;
    uint32_t H, T, D;
    kvt_dtype dt;
    if (kvt_trace_reader_open(r->path, &rd) ||
        kvt_trace_reader_shape(rd, 0, KVT_KIND_K, &H, &T, &D, &dt)) {
        fprintf(stderr, "bench_kv_read: %s\n", kvt_error_msg());
        r->failed = 1;
        kvt_trace_reader_close(rd);
        return NULL;
    }
    const size_t bytes = (size_t)H * T * D * kvt_dtype_size(dt);
    const kvt_trace_sink sink = {room, put, r};
    for (int i = 0; i < r->rounds && !r->failed; i++) {
        void *k = malloc(bytes), *v = malloc(bytes);
        uint64_t t0 = kvt_now_ns();
        if (!k || !v ||
            kvt_trace_reader_read(rd, 0, KVT_KIND_K, 0, H, KVT_DTYPE_INVALID, k, bytes) ||
            kvt_trace_reader_read(rd, 0, KVT_KIND_V, 0, H, KVT_DTYPE_INVALID, v, bytes))
            r->failed = 1;
        r->ahead[i] = (kvt_now_ns() - t0) * 1e-9;
        free(k), free(v);
        t0 = kvt_now_ns();
        if (kvt_trace_reader_read_sink(rd, 0, KVT_KIND_K, 0, &sink, NULL) ||
            kvt_trace_reader_read_sink(rd, 0, KVT_KIND_V, 0, &sink, NULL))
            r->failed = 1;
        r->streamed[i] = (kvt_now_ns() - t0) * 1e-9;
    }
    if (r->failed)
        fprintf(stderr, "bench_kv_read: %s\n", kvt_error_msg());
    kvt_trace_reader_close(rd);
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_kv_read TRACE [rounds] [threads]\n");
        return 2;
    }
    int rounds = argc > 2 ? atoi(argv[2]) : 7, threads = argc > 3 ? atoi(argv[3]) : 1;
    if (rounds < 1 || rounds > 100 || threads < 1 || threads > 64) {
        fprintf(stderr, "bench_kv_read: rounds 1..100, threads 1..64\n");
        return 2;
    }
    reader *rs = calloc((size_t)threads, sizeof(*rs));
    pthread_t *th = calloc((size_t)threads, sizeof(*th));
    double *all = calloc((size_t)(2 * rounds * threads), sizeof(double));
    if (!rs || !th || !all)
        return 1;
    for (int t = 0; t < threads; t++) {
        rs[t] = (reader){argv[1],
                         rounds,
                         all + (size_t)2 * t * rounds,
                         all + (size_t)(2 * t + 1) * rounds,
                         {malloc(STAGE), malloc(STAGE)},
                         0,
                         0};
        if (!rs[t].stage[0] || !rs[t].stage[1])
            return 1;
        memset(rs[t].stage[0], 1, STAGE), memset(rs[t].stage[1], 1, STAGE); /* as pinned */
    }
    for (int t = 0; t < threads; t++)
        pthread_create(&th[t], NULL, run, &rs[t]);
    int failed = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        failed |= rs[t].failed;
    }
    if (failed)
        return 1;
    /* the medians over every reader's rounds */
    double *a = malloc(sizeof(double) * rounds * threads),
           *s = malloc(sizeof(double) * rounds * threads);
    for (int t = 0; t < threads; t++)
        for (int i = 0; i < rounds; i++)
            a[t * rounds + i] = rs[t].ahead[i], s[t * rounds + i] = rs[t].streamed[i];
    size_t n = (size_t)rounds * threads;
    qsort(a, n, sizeof(double), by_value);
    qsort(s, n, sizeof(double), by_value);
    printf("| %s | %d | %d | %.4f | %.4f | %.2fx |\n", argv[1], threads, rounds, a[n / 2], s[n / 2],
           a[n / 2] / s[n / 2]);
    for (int t = 0; t < threads; t++)
        free(rs[t].stage[0]), free(rs[t].stage[1]);
    free(a), free(s), free(all), free(rs), free(th);
    return 0;
}
