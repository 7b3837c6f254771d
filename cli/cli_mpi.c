/* cli_mpi.c - `mpirun -n N kvtrace replay ...`: the cluster path of DESIGN.md §6. Process r
 * replays shard r/N of the (trace, layer) units exactly as `replay --shard r/N` does, and rank 0
 * merges the N partial results (kvt_results_merge) into the result one process gives. MPI
 * only carries results and exit codes; the scheduling is the launcher's (mpirun, srun).
 * Built when CMake finds an MPI (KVT_MPI=AUTO|ON|OFF); without one, a launch of more than one
 * process is refused rather than run N times. See kvt_cli.h for the contract.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_cli.h"

#ifdef KVT_HAVE_MPI
#include <mpi.h>
#endif

/* an environment variable as a number, -1 when unset or not a number */
static long env_long(const char *name)
{
    const char *v = getenv(name);
    char *end = NULL;
    if (!v || !*v)
        return -1;
    long x = strtol(v, &end, 10);
    return *end || x < 0 ? -1 : x;
}

/* rank and size as the launcher's environment tells them (-1: not said) */
static void launch_env(long *rank, long *size)
{
    static const char *const ranks[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"};
    static const char *const sizes[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"};
    *rank = *size = -1;
    for (size_t i = 0; i < sizeof(ranks) / sizeof(*ranks) && *rank < 0; i++)
        *rank = env_long(ranks[i]);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(*sizes) && *size < 0; i++)
        *size = env_long(sizes[i]);
    if (*rank >= 0 && *size < 0) /* srun --mpi=pmix sets a rank but no size: the step's tasks */
        *size = env_long("SLURM_STEP_NUM_TASKS");
}

const char *kvt_cli_mpi_library(void)
{
#ifdef KVT_HAVE_MPI
    static char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int n = 0;
    if (!lib[0] && MPI_Get_library_version(lib, &n) == MPI_SUCCESS) {
        lib[n < (int)sizeof(lib) ? n : (int)sizeof(lib) - 1] = '\0';
        char *nl = strchr(lib, '\n'); /* Open MPI appends the repository and date lines */
        if (nl)
            *nl = '\0';
    }
    return lib;
#else
    return NULL;
#endif
}

int kvt_cli_mpi_begin(kvt_cli_mpi *m, const char *cmd)
{
    memset(m, 0, sizeof(*m));
    m->size = m->local_size = 1;
    long rank, size;
    launch_env(&rank, &size);
    if (rank < 0 && size < 0)
        return 0; /* not launched by an MPI launcher */
#ifdef KVT_HAVE_MPI
    int provided = 0, flag = 0;
    /* only the main thread calls MPI */
    if (MPI_Initialized(&flag) != MPI_SUCCESS || flag ||
        MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return kvt_cli_fail(cmd, "MPI_Init failed");
    m->initialized = true;
    MPI_Comm node;
    MPI_Comm_rank(MPI_COMM_WORLD, &m->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &m->size);
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_size(node, &m->local_size);
        MPI_Comm_rank(node, &m->local_rank);
        MPI_Comm_free(&node);
    }
    if (m->size > 1)
        kvt_cli_hold_errors(m->held, sizeof(m->held));
    return 0;
#else
    if (size > 1 || rank > 0) {
        if (rank <= 0) /* one line for the whole launch */
            kvt_cli_fail(cmd,
                         "launched as %ld MPI processes, but this kvtrace was built without MPI "
                         "(install one, e.g. apt-get install libopenmpi-dev, and rebuild; or run "
                         "--shard I/N per process and kvtrace merge)",
                         size);
        return 1;
    }
    return 0;
#endif
}

#ifdef KVT_HAVE_MPI
/* rank 0: print each distinct held line once, with the ranks it came from, unless it is the
 * only line and came from rank 0 alone or from every process */
static void print_held(const kvt_cli_mpi *m, const int *rcs, const char *lines, size_t cap)
{
#define LINE(r) (lines + (size_t)(r)*cap)
    int distinct = 0;
    for (int r = 0; r < m->size; r++) {
        bool seen = false;
        for (int q = 0; q < r && !seen; q++)
            seen = rcs[q] && !strcmp(LINE(q), LINE(r));
        distinct += rcs[r] && !seen;
    }
    for (int r = 0; r < m->size; r++) {
        bool seen = false;
        for (int q = 0; q < r && !seen; q++)
            seen = rcs[q] && !strcmp(LINE(q), LINE(r));
        if (!rcs[r] || seen)
            continue;
        char who[256] = "";
        int n = 0, len = 0;
        for (int q = r; q < m->size; q++)
            n += rcs[q] && !strcmp(LINE(q), LINE(r));
        bool name = distinct > 1 || !(n == m->size || (r == 0 && n == 1));
        for (int q = r; name && q < m->size; q++)
            if (rcs[q] && !strcmp(LINE(q), LINE(r)) && len < (int)sizeof(who) - 32)
                len += snprintf(who + len, sizeof(who) - (size_t)len, "%s%d",
                                len ? ", " : (n > 1 ? " (ranks " : " (rank "), q);
        if (len)
            snprintf(who + len, sizeof(who) - (size_t)len, ")");
        if (LINE(r)[0])
            fprintf(stderr, "%s%s\n", LINE(r), who);
        else if (!m->failed) /* not said already by an earlier agreement */
            fprintf(stderr, "kvtrace: error: MPI rank %d failed%s\n", r, who);
    }
#undef LINE
}
#endif

int kvt_cli_mpi_agree(kvt_cli_mpi *m, int rc)
{
    m->agreed++;
#ifdef KVT_HAVE_MPI
    if (m->size > 1) {
        const size_t cap = sizeof(m->held);
        int *rcs = NULL, all = rc;
        char *lines = NULL;
        if (m->rank == 0) {
            rcs = kvt_calloc((size_t)m->size, sizeof(int));
            lines = kvt_calloc((size_t)m->size, cap);
            if (!rcs || !lines) /* this process cannot say more than that */
                MPI_Abort(MPI_COMM_WORLD, 1);
        }
        MPI_Gather(&rc, 1, MPI_INT, rcs, 1, MPI_INT, 0, MPI_COMM_WORLD);
        MPI_Gather(m->held, (int)cap, MPI_CHAR, lines, (int)cap, MPI_CHAR, 0, MPI_COMM_WORLD);
        if (m->rank == 0) {
            print_held(m, rcs, lines, cap);
            for (int r = 0; r < m->size && !all; r++)
                all = rcs[r];
            fflush(stderr);
        }
        MPI_Bcast(&all, 1, MPI_INT, 0, MPI_COMM_WORLD);
        m->held[0] = '\0'; /* printed */
        m->failed |= all != 0;
        kvt_free(rcs);
        kvt_free(lines);
        return all;
    }
#endif
    return rc;
}

#ifdef KVT_HAVE_MPI
enum { CHUNK = 1 << 24 };   /* MPI counts are int: texts travel in 16 MiB pieces */
static char s_drain[CHUNK]; /* where bytes that found no memory are received */
#endif

kvt_status kvt_cli_mpi_send(kvt_cli_mpi *m, const char *bytes, uint64_t n, uint64_t aux)
{
#ifdef KVT_HAVE_MPI
    uint64_t head[2] = {n, aux};
    MPI_Send(head, 2, MPI_UINT64_T, 0, 0, MPI_COMM_WORLD);
    for (uint64_t off = 0; n != UINT64_MAX && off < n; off += CHUNK) {
        int c = (int)(n - off < CHUNK ? n - off : CHUNK);
        MPI_Send(bytes + off, c, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
    }
    return KVT_OK;
#else
    (void)m, (void)bytes, (void)n, (void)aux;
    return kvt_error_set(KVT_ERR_INVALID_ARG, "this kvtrace was built without MPI");
#endif
}

kvt_status kvt_cli_mpi_recv(kvt_cli_mpi *m, int from, bool keep, char **bytes, uint64_t *n,
                            uint64_t *aux)
{
    *bytes = NULL;
#ifdef KVT_HAVE_MPI
    uint64_t head[2];
    MPI_Recv(head, 2, MPI_UINT64_T, from, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    *n = head[0];
    *aux = head[1];
    if (*n == UINT64_MAX)
        return KVT_OK; /* nothing follows */
    kvt_status st = KVT_OK;
    if (keep && (*n >= SIZE_MAX || !(*bytes = kvt_malloc((size_t)*n + 1))))
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory receiving %llu bytes from MPI rank %d",
                           (unsigned long long)*n, from);
    for (uint64_t off = 0; off < *n; off += CHUNK) {
        int c = (int)(*n - off < CHUNK ? *n - off : CHUNK);
        MPI_Recv(*bytes ? *bytes + off : s_drain, c, MPI_CHAR, from, 0, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
    }
    if (*bytes)
        (*bytes)[*n] = '\0';
    return st;
#else
    (void)m, (void)from, (void)keep, (void)n, (void)aux;
    return kvt_error_set(KVT_ERR_INVALID_ARG, "this kvtrace was built without MPI");
#endif
}

kvt_status kvt_cli_mpi_gather(kvt_cli_mpi *m, char *txt, size_t len, char ***texts, size_t **lens)
{
    *texts = NULL;
    *lens = NULL;
    if (m->rank != 0)
        return kvt_cli_mpi_send(m, txt, len, 0);
    kvt_status st = KVT_OK;
    char **t = kvt_calloc((size_t)m->size, sizeof(char *));
    size_t *l = kvt_calloc((size_t)m->size, sizeof(size_t));
    if (!t || !l)
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory gathering the MPI ranks' results");
    for (int r = 1; r < m->size; r++) {
        char *b = NULL;
        uint64_t n = 0, aux = 0;
        kvt_status rs = kvt_cli_mpi_recv(m, r, !st, &b, &n, &aux);
        st = st ? st : rs;
        if (!st) {
            t[r] = b;
            l[r] = (size_t)n;
        } else
            kvt_free(b);
    }
    if (st) {
        for (int r = 1; t && r < m->size; r++)
            kvt_free(t[r]);
        kvt_free(t);
        kvt_free(l);
        return st;
    }
    t[0] = txt;
    l[0] = len;
    *texts = t;
    *lens = l;
    return KVT_OK;
}

int kvt_cli_mpi_end(kvt_cli_mpi *m, int n_agree, int rc)
{
    while (m->agreed < n_agree)
        rc = kvt_cli_mpi_agree(m, rc);
#ifdef KVT_HAVE_MPI
    if (m->size > 1) {
        if (m->held[0]) /* a failure after the last agreement (rank 0 merging and writing) */
            fprintf(stderr, "%s%s\n", m->held, m->rank ? " (a rank other than 0)" : "");
        MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
        kvt_cli_hold_errors(NULL, 0);
    }
    if (m->initialized)
        MPI_Finalize();
#endif
    m->initialized = false;
    return rc;
}
