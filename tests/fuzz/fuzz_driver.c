/* fuzz_driver.c - runs a libFuzzer entry point over files and directories given on the
 * command line, so fuzz targets double as regression tests in plain ctest (no clang needed).
 * Calls the target's LLVMFuzzerInitialize first when it has one, as libFuzzer does.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional, as in libFuzzer: a target that defines it gets it called once before any input. */
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(n > 0 ? (size_t)n : 1);
    if (!b || fread(b, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(b);
        return 1;
    }
    fclose(f);
    fprintf(stderr, "input %s (%ld bytes)\n", path, n); /* names the input that crashes */
    LLVMFuzzerTestOneInput(b, (size_t)n);
    free(b);
    return 0;
}

int main(int argc, char **argv)
{
    int n_files = 0, bad = 0;
    /* paths are resolved before LLVMFuzzerInitialize, which may change the directory */
    char **paths = calloc((size_t)argc, sizeof(char *));
    if (!paths)
        return 1;
    for (int i = 1; i < argc; i++)
        if (!(paths[i] = realpath(argv[i], NULL))) {
            fprintf(stderr, "missing input %s\n", argv[i]);
            return 1;
        }
    int n_args = argc;
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < n_args; i++) {
        struct stat st;
        if (stat(paths[i], &st) != 0) {
            fprintf(stderr, "missing input %s\n", paths[i]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            bad += run_file(paths[i]);
            n_files++;
            continue;
        }
        DIR *d = opendir(paths[i]);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            char p[4096];
            snprintf(p, sizeof(p), "%s/%s", paths[i], e->d_name);
            if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) {
                bad += run_file(p);
                n_files++;
            }
        }
        if (d)
            closedir(d);
    }
    for (int i = 1; i < n_args; i++)
        free(paths[i]);
    free(paths);
    printf("%d inputs run, %d unreadable\n", n_files, bad);
    return bad ? 1 : (n_files ? 0 : 1);
}
