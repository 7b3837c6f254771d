/* bench_trace.c - trace writer and reader throughput, and what the byte-plane filter buys.
 * Usage: bench_trace TRACE [max_threads]
 * Loads every tensor record of TRACE into memory, then
 *  - writes them to a new trace with 0..max_threads compression threads (MB/s of raw data),
 *  - reads them back with 1..max_threads reader threads, each reading whole layers,
 *  - compares the stored size with byte planes + zstd against plain zstd at levels 1 and 3.
 * Prints a markdown table for bench/RESULTS.md. Not a test: numbers depend on the machine.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvt_trace.h"

typedef struct rec {
    kvt_record_info info;
    uint8_t *data;
} rec;

static rec *recs;
static size_t n_recs;
static uint64_t raw_total;
static const char *out_path = "/tmp/kvt_bench_out.kvt";

static double write_all(int threads, int level, bool no_shuffle, uint64_t *file_bytes)
{
    kvt_writer_opts o = {
        .n_threads = threads, .level = level, .no_shuffle = no_shuffle, .force = true};
    kvt_trace_writer *w;
    uint64_t t0 = kvt_now_ns();
    if (kvt_trace_writer_create(out_path, "{\"format\":\"kvtrace\",\"bench\":true}", &o, &w)) {
        fprintf(stderr, "bench: %s\n", kvt_error_msg());
        exit(1);
    }
    for (size_t i = 0; i < n_recs; i++)
        if (kvt_trace_writer_append(w, &recs[i].info, recs[i].data)) {
            fprintf(stderr, "bench: %s\n", kvt_error_msg());
            exit(1);
        }
    if (kvt_trace_writer_finish(w)) {
        fprintf(stderr, "bench: %s\n", kvt_error_msg());
        exit(1);
    }
    kvt_writer_stats st;
    kvt_trace_writer_get_stats(w, &st);
    kvt_trace_writer_free(w);
    *file_bytes = st.file_bytes;
    return (double)(kvt_now_ns() - t0) * 1e-9;
}

typedef struct rjob {
    kvt_trace_reader *r;
    int first, step, n_layers;
    uint64_t bytes;
} rjob;

static void *read_layers(void *arg)
{
    rjob *j = arg;
    static const int kinds[] = {KVT_KIND_K, KVT_KIND_V, KVT_KIND_Q_WINDOW};
    for (int l = j->first; l < j->n_layers; l += j->step) {
        for (int k = 0; k < 3; k++) {
            uint32_t h, t, d;
            kvt_dtype dt;
            if (kvt_trace_reader_shape(j->r, l, kinds[k], &h, &t, &d, &dt))
                continue;
            size_t n = (size_t)h * t * d;
            void *buf = malloc(n * kvt_dtype_size(dt));
            if (kvt_trace_reader_read(j->r, l, kinds[k], 0, h, KVT_DTYPE_INVALID, buf,
                                      n * kvt_dtype_size(dt)) == KVT_OK)
                j->bytes += n * kvt_dtype_size(dt);
            free(buf);
        }
    }
    return NULL;
}

static double read_all(int threads, int n_layers, uint64_t *bytes)
{
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(out_path, &r)) {
        fprintf(stderr, "bench: %s\n", kvt_error_msg());
        exit(1);
    }
    pthread_t th[64];
    rjob jobs[64];
    uint64_t t0 = kvt_now_ns();
    for (int i = 0; i < threads; i++) {
        jobs[i] = (rjob){r, i, threads, n_layers, 0};
        pthread_create(&th[i], NULL, read_layers, &jobs[i]);
    }
    *bytes = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        *bytes += jobs[i].bytes;
    }
    double s = (double)(kvt_now_ns() - t0) * 1e-9;
    kvt_trace_reader_close(r);
    return s;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_trace TRACE [max_threads]\n");
        return 2;
    }
    int max_threads = argc > 2 ? atoi(argv[2]) : kvt_cpu_count();
    if (max_threads < 1 || max_threads > 64)
        max_threads = 2;
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(argv[1], &r)) {
        fprintf(stderr, "bench: %s\n", kvt_error_msg());
        return 1;
    }
    n_recs = kvt_trace_reader_n_records(r);
    recs = calloc(n_recs, sizeof(*recs));
    int n_layers = 0;
    for (size_t i = 0; i < n_recs; i++) {
        kvt_trace_reader_record(r, i, &recs[i].info);
        recs[i].data = malloc(recs[i].info.raw_bytes);
        if (kvt_trace_reader_read_record(r, i, recs[i].data, recs[i].info.raw_bytes)) {
            fprintf(stderr, "bench: %s\n", kvt_error_msg());
            return 1;
        }
        raw_total += recs[i].info.raw_bytes;
        if (recs[i].info.layer + 1 > n_layers)
            n_layers = recs[i].info.layer + 1;
    }
    kvt_trace_reader_close(r);
    double mb = (double)raw_total / 1e6;
    printf("input: %s, %zu records, %.1f MB raw, %d layers, %d cores\n\n", argv[1], n_recs, mb,
           n_layers, kvt_cpu_count());

    printf("| writer threads | level | filter | seconds | raw MB/s | ratio |\n");
    printf("|---|---|---|---|---|---|\n");
    uint64_t fb;
    for (int t = 0; t <= max_threads; t++) {
        double s = write_all(t, 3, false, &fb);
        printf("| %d | 3 | byte planes | %.3f | %.0f | %.3f |\n", t, s, mb / s,
               (double)raw_total / (double)fb);
    }
    for (int lv = 1; lv <= 3; lv += 2) {
        double s = write_all(max_threads, lv, true, &fb);
        printf("| %d | %d | none (plain zstd) | %.3f | %.0f | %.3f |\n", max_threads, lv, s, mb / s,
               (double)raw_total / (double)fb);
        s = write_all(max_threads, lv, false, &fb);
        printf("| %d | %d | byte planes | %.3f | %.0f | %.3f |\n", max_threads, lv, s, mb / s,
               (double)raw_total / (double)fb);
    }
    printf("\n| reader threads | seconds | raw MB/s |\n|---|---|---|\n");
    for (int t = 1; t <= max_threads; t++) {
        uint64_t bytes;
        double s = read_all(t, n_layers, &bytes);
        printf("| %d | %.3f | %.0f |\n", t, s, (double)bytes / 1e6 / s);
    }
    unlink(out_path);
    for (size_t i = 0; i < n_recs; i++)
        free(recs[i].data);
    free(recs);
    return 0;
}
