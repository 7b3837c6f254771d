/* kvt_cli.h - shared helpers of the kvtrace command: the subcommand table entry type, one-line
 * error reporting, progress on stderr, and small option parsers. Only cli/ includes this.
 */
#ifndef KVT_CLI_H
#define KVT_CLI_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvt_common.h"
#include "kvt_replay.h"
#include "kvt_report.h"
#include "kvt_trace.h"

typedef struct kvt_cli_command {
    const char *name;
    const char *summary;
    int (*run)(int argc, char **argv); /* argv[0] is the command name */
} kvt_cli_command;

/** Print "kvtrace CMD: error: MSG" (one line) to stderr; returns 1 (the exit code). */
int kvt_cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/** Same, for a failed library call: appends the status name and the library's message. */
int kvt_cli_fail_status(const char *cmd, kvt_status s, const char *what);
/** From now on kvt_cli_fail keeps its first line (without the newline) in buf[cap] instead of
 *  printing it (buf is emptied); cap == 0 prints again. For the ranks of an MPI launch, whose
 *  rank 0 prints every distinct line once (cli_mpi.c). */
void kvt_cli_hold_errors(char *buf, size_t cap);

/* An MPI launch of `kvtrace replay` (cli_mpi.c): `mpirun -n N kvtrace replay ...` replays
 * shard r/N in process r, and rank 0 merges the parts and writes the one result. Every
 * function is collective unless said otherwise: each process calls it, in the same order. In
 * a kvtrace built without MPI, or outside a launch, there is one process and they do nothing.
 */
typedef struct kvt_cli_mpi {
    int rank, size;   /* 0 and 1 unless launched with more processes */
    int local_size;   /* processes of the launch on this node (1 outside one) */
    int local_rank;   /* this one's rank among them (0 outside a launch) */
    bool initialized; /* MPI_Init was called; kvt_cli_mpi_end finalizes */
    int agreed;       /* kvt_cli_mpi_agree calls made so far */
    bool failed;      /* one of them combined a failure (and said why) */
    char held[1024];  /* this process's first error line, printed by rank 0 */
} kvt_cli_mpi;
/** Not collective. Detects a launch (mpirun/mpiexec/srun set OMPI_COMM_WORLD_SIZE, PMI_SIZE,
 *  PMI_RANK or PMIX_RANK) and initialises MPI; with more than one process, error lines are held
 *  back for kvt_cli_mpi_agree. Returns 0, or an exit code after printing why: a launch of
 *  N > 1 processes of a kvtrace built without MPI (every process would write the whole result).
 */
int kvt_cli_mpi_begin(kvt_cli_mpi *m, const char *cmd);
/** Combines every process's exit code so far (0: going on): rank 0 prints each distinct held
 *  error line once, naming the ranks it came from unless it is rank 0's or everyone's. Returns
 *  the combined code: rank 0's if it failed, else the lowest failed rank's, else 0. */
int kvt_cli_mpi_agree(kvt_cli_mpi *m, int rc);
/** Rank 0 receives every process's text: texts[r] (NUL-terminated, kvt_free each but
 *  texts[0], which is `txt` itself) and lens[r]; other ranks send theirs and get NULL. Rank 0
 *  returns KVT_ERR_NOMEM when a text does not fit in memory (the rest is still received). */
kvt_status kvt_cli_mpi_gather(kvt_cli_mpi *m, char *txt, size_t len, char ***texts, size_t **lens);
/** Not collective: send n bytes and a number `aux` to rank 0 (n = UINT64_MAX: no bytes, a
 *  marker the receiver sees as such). Messages to rank 0 arrive in the order sent. */
kvt_status kvt_cli_mpi_send(kvt_cli_mpi *m, const char *bytes, uint64_t n, uint64_t aux);
/** Not collective, rank 0: receive what rank `from` sent next. With keep, *bytes is the
 *  NUL-terminated copy (kvt_free it; NULL for the marker); without, or when it does not fit in
 *  memory (KVT_ERR_NOMEM), the bytes are received and dropped, so the sender never waits. */
kvt_status kvt_cli_mpi_recv(kvt_cli_mpi *m, int from, bool keep, char **bytes, uint64_t *n,
                            uint64_t *aux);
/** The end on every path: the agreements not made yet of the n_agree the command makes (with
 *  rc), then rank 0's exit code becomes every process's, and MPI is finalized. Returns the code
 *  to exit with. */
int kvt_cli_mpi_end(kvt_cli_mpi *m, int n_agree, int rc);
/** Not collective: the MPI library this kvtrace was built with ("Open MPI v4.1.4, ..."), or
 *  NULL without MPI. */
const char *kvt_cli_mpi_library(void);

/** Progress on stderr: shown once the operation has run for more than a second, when stderr
 *  is a terminal or KVT_PROGRESS=1 (KVT_PROGRESS=0: never). A ticker thread redraws the line
 *  every 0.5 s with the elapsed time, so a first step that takes long (one big layer) still
 *  shows that work goes on. kvt_progress_update records done/total (done == total finishes
 *  the line); kvt_progress_end stops the ticker and ends the line: call it once on every
 *  path after kvt_progress_start. While the line is shown, a library message (kvt_log) ends
 *  it first, so the message gets a line of its own. */
typedef struct kvt_progress {
    const char *label;
    uint64_t t0_ns;
    bool shown, ended; /* a line is on screen; it was ended with a newline */
    uint64_t done, total;
    bool enabled, ticking, stop;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} kvt_progress;
void kvt_progress_start(kvt_progress *p, const char *label);
void kvt_progress_update(kvt_progress *p, uint64_t done, uint64_t total);
void kvt_progress_end(kvt_progress *p);

/** The policies `--policies all` names (replay's default). */
#define KVT_CLI_ALL_POLICIES                                                                       \
    "full,random,streamingllm,tova,snapkv,chunkkv,pyramidkv,adakv,knorm,vnorm,keydiff,"            \
    "mixkv-snapkv,mixkv-pyramidkv,mixkv-adakv"
/** list + "," + item in a new string (list NULL: item alone); list is freed, also when out of
 *  memory (NULL). */
char *kvt_cli_append_list(char *list, const char *item);
/** A --policies or --policy value appended to *list, each item "all" replaced by
 *  KVT_CLI_ALL_POLICIES: 0; 1 out of memory; 2 a usage error ('all:...', an empty list). Both
 *  errors printed. */
int kvt_cli_append_policies(const char *cmd, char **list, const char *v);

/** The policies' per-trace files against the traces of one replay: a scores= or critical=
 *  file that describes one trace given several, or two traces that would read one DIR file.
 *  Returns 0, or 2 (a usage error) after printing it. */
int kvt_cli_policy_files_ok(const char *cmd, kvt_policy *const *pols, size_t n_pol,
                            const char *const *traces, size_t n_traces);

/* Warnings about the traces and budgets of a run (cli_notes.c), as `replay` and `e2e-llama2c`
 * give them: written to a notes stream the command prints once its results are written, so a
 * run that fails says one line, its error. */
/** What a trace's layers hold of the decode steps (kvt_cli_trace_note), for
 *  kvt_cli_decode_note. */
typedef struct kvt_cli_decode_held {
    int max_g;  /* the most decode queries a layer holds */
    int max_kv; /* the most decode keys and values a layer holds */
    int l_nokv; /* the first layer without decode keys or values (-1: none lacks them) */
} kvt_cli_decode_held;
/** rd's trace (opened from `path`): "is incomplete" to notes (NULL: none) when it was
 *  recovered by scanning; *dh: what its first n_layers layers hold of the decode steps. */
void kvt_cli_trace_note(FILE *notes, const char *cmd, const char *path, const kvt_trace_reader *rd,
                        int n_layers, kvt_cli_decode_held *dh);
/** A trace whose layers hold different numbers of decode steps (cut short): its decode metrics
 *  are from the tr->n_decode steps every layer holds whole, or there are none; one whose layer
 *  lacks the decode keys or values: no layer's decode queries see them. */
void kvt_cli_decode_note(FILE *f, const char *cmd, const char *path, const kvt_trace_result *tr,
                         const kvt_cli_decode_held *dh);
/** Budgets whose rows a reader of the table would misread: every budget keeping the whole
 *  prompt (nothing compressed), budgets below some policies' observation window (those
 *  policies then keep the window's last B tokens and tie), a window covering the whole prompt,
 *  two budgets that keep the same tokens. */
void kvt_cli_budget_notes(FILE *f, const char *cmd, const char *path, const kvt_trace_result *tr);

/** Parse a non-negative integer with optional k/M/G suffix; false on junk or overflow. */
bool kvt_cli_parse_u64(const char *s, uint64_t *out);
bool kvt_cli_parse_int(const char *s, int lo, int hi, int *out);
/** A size in bytes: a positive decimal number with an optional binary suffix K, M, G or T (any
 *  case; KiB...; "B", "iB" after it accepted), e.g. 512M, 1.5G, 40GiB, 4k; false for anything
 *  else (hex, exponents, blanks, 0). */
bool kvt_cli_parse_size(const char *s, uint64_t *out);
bool kvt_cli_parse_double(const char *s, double *out);
/** --max-kl's value (recommend --e2e, report --e2e): a finite number >= 0 into *out, else false
 *  with the one-line error of command cmd printed. */
bool kvt_cli_parse_max_kl(const char *cmd, const char *v, double *out);

/** Check an output path before any work: it must be given, its directory must exist and be
 *  writable, it must not exist unless `force`, an existing one must be a regular file (a
 *  device, FIFO or directory is never replaced), and it must never be one of the inputs (same
 *  file, whatever the path spelling). Prints the one-line error itself and returns false when
 *  the output is not acceptable. */
bool kvt_cli_output_ok(const char *cmd, const char *out, bool force, const char *const *inputs,
                       size_t n_inputs);

/** The quality target of `recommend` and `report`: --max-error E | --min-recall R and
 *  --metric NAME. */
typedef struct kvt_cli_target {
    kvt_recommend_opts o; /* default --max-error 0.1 on the automatic metric */
    const char *metric;   /* --metric, parsed by kvt_cli_target_finish */
    bool have_max, have_min;
} kvt_cli_target;
void kvt_cli_target_init(kvt_cli_target *t);
/** If argv[*i] is --max-error, --min-recall or --metric: consume it and its value (*i moves
 *  on) and return 1; 0 if it is another argument; -1 after printing the error (exit 2). */
int kvt_cli_target_arg(const char *cmd, int argc, char **argv, int *i, kvt_cli_target *t);
/** After the last argument: refuses both --max-error and --min-recall, an unknown metric, and
 *  a recall metric without --min-recall. false after printing the error (exit 2). */
bool kvt_cli_target_finish(const char *cmd, kvt_cli_target *t);

/** true if `text` (what: "the path", "--policies", ...) is valid UTF-8, which a JSON output
 *  that holds it needs (JSON text is UTF-8: a raw 0xFF byte would make the whole file
 *  unreadable to other parsers); else prints one error line for cmd and returns false. */
bool kvt_cli_json_text_ok(const char *cmd, const char *what, const char *text);

/** The width of a table's policy column: the longest label of pols[0..n), at least min (so
 *  that two specs never print alike). */
int kvt_cli_label_width(kvt_policy *const *pols, size_t n, int min);

/** true if a and b name the same file, whether or not it exists yet (same directory and
 *  name, however spelt: "x" and "./x"). */
bool kvt_cli_same_path(const char *a, const char *b);

/** v bytes in the binary unit that fits ("812 B", "97.3 KiB", "12.6 MiB"), as every command
 *  prints sizes; returns buf. */
const char *kvt_cli_bytes_text(double v, char *buf, size_t cap);
/* What a file is, from its first bytes: a selection export (binary or JSON; *hlen: the binary
 * layout's header_len, else 0), a results.json (then refused for cmd in one line on stderr,
 * naming the commands that read it), or anything else (a trace, or a file the trace reader
 * will name the trouble with) */
enum { KVT_CLI_FILE_OTHER = 0, KVT_CLI_FILE_SELECTION = 1, KVT_CLI_FILE_RESULTS = 2 };
int kvt_cli_sniff(const char *cmd, const char *path, uint32_t *hlen);

/** true if argv contains -h or --help (before any "--"). */
bool kvt_cli_wants_help(int argc, char **argv);

#endif /* KVT_CLI_H */
