/* main.c - the kvtrace command: dispatches to one cmd_<name>.c per subcommand. Adding a
 * command is one file plus one line in the table below.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "kvt_cli.h"
#include "kvt_kernels.h"

int kvt_cmd_info(int argc, char **argv);
int kvt_cmd_verify(int argc, char **argv);
int kvt_cmd_replay(int argc, char **argv);
int kvt_cmd_capture_llama2c(int argc, char **argv);
int kvt_cmd_synth(int argc, char **argv);
int kvt_cmd_merge(int argc, char **argv);
int kvt_cmd_recommend(int argc, char **argv);
int kvt_cmd_report(int argc, char **argv);
int kvt_cmd_e2e_llama2c(int argc, char **argv);

static const kvt_cli_command commands[] = {
    {"info", "show a trace's model, shapes, tensors and compression", kvt_cmd_info},
    {"verify", "check every checksum of a trace; report damaged or missing records",
     kvt_cmd_verify},
    {"replay", "replay compression policies at many budgets; write results.json", kvt_cmd_replay},
    {"capture-llama2c", "capture a trace from a llama2.c model (CPU)", kvt_cmd_capture_llama2c},
    {"synth", "write a model-shaped synthetic trace (tests, benchmarks)", kvt_cmd_synth},
    {"merge", "combine the partial results of replay --shard into one results.json", kvt_cmd_merge},
    {"recommend", "cheapest policy and budget meeting a quality target", kvt_cmd_recommend},
    {"report", "write an HTML report with PNG figures of a results.json", kvt_cmd_report},
    {"e2e-llama2c",
     "check the replay's proxies end to end: decode a llama2.c model with each "
     "policy's kept sets",
     kvt_cmd_e2e_llama2c},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: kvtrace <command> [options]\n\n"
               "kvtrace records the KV cache of an inference run once and replays KV-cache\n"
               "compression policies offline.\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-16s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n'kvtrace <command> --help' (or 'kvtrace help <command>') describes a command. "
               "'kvtrace --version' prints the version.\n");
}

int main(int argc, char **argv)
{
    /* a file size limit (ulimit -f) must surface as a write error (EFBIG) that the commands
     * report and clean up after, not as a kill by SIGXFSZ that leaves partial outputs */
    signal(SIGXFSZ, SIG_IGN);
    /* an interrupted command removes the temporary files it was writing (the outputs it
       replaces stay as they were); capture-llama2c handles SIGINT itself: it finishes the
       trace, or keeps the interrupted one beside the old */
    if (argc > 1 && strcmp(argv[1], "capture-llama2c"))
        kvt_tmp_remove_on_signals();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    /* the commands that run dense products (and --version, which says which kernels they use)
       must not run on OpenBLAS's generic kernels when it did not recognise this CPU */
    if (!strcmp(argv[1], "replay") || !strcmp(argv[1], "capture-llama2c") ||
        !strcmp(argv[1], "e2e-llama2c") || !strcmp(argv[1], "--version"))
        kvt_kernels_blas_reexec(argv);
    if (!strcmp(argv[1], "help") && argc > 2 && strcmp(argv[2], "help")) { /* = CMD --help */
        for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
            if (!strcmp(argv[2], commands[i].name)) {
                char *args[] = {argv[2], "--help", NULL};
                return commands[i].run(2, args);
            }
        fprintf(stderr, "kvtrace: error: unknown command '%s' (try 'kvtrace --help')\n", argv[2]);
        return 2;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvtrace %s\n", kvt_version_string());
        const char *mpi = kvt_cli_mpi_library();
        printf("mpirun kvtrace replay: %s\n", mpi ? mpi : "no (built without MPI)");
        char blas[160];
        kvt_kernels_cpu_describe(blas, sizeof(blas));
        printf("CPU dense products: %s\n", blas);
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvtrace: error: unknown command '%s' (try 'kvtrace --help')\n", argv[1]);
    return 2;
}
