/* test_cli_progress.c - the command's progress line on stderr: drawn after a second, ended
 * before a library message (kvt_log) so the message starts a line of its own, and ended once
 * by kvt_progress_end.
 */
#include "kvt_cli.h"
#include "kvt_test.h"

#include <fcntl.h>
#include <time.h>

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* the text written to fd so far (malloc'ed) */
static char *text_of(int fd)
{
    off_t n = lseek(fd, 0, SEEK_END);
    char *text = calloc((size_t)n + 1, 1);
    KVT_EXPECT(pread(fd, text, (size_t)n, 0) == n);
    return text;
}

/* waits (up to 20 s: a busy machine delays the ticker) until the text after `from` bytes
 * holds `what`; returns whether it did */
static bool wait_for(int fd, size_t from, const char *what)
{
    for (int i = 0; i < 400; i++) {
        char *t = text_of(fd);
        bool found = strlen(t) > from && strstr(t + from, what) != NULL;
        free(t);
        if (found)
            return true;
        sleep_ms(50);
    }
    return false;
}

/* runs the progress line with stderr sent to a file; returns the file's text */
static char *capture_stderr(bool warn, bool enabled)
{
    char path[256];
    int fd =
        open(kvt_test_tmp(path, sizeof(path), "progress.txt"), O_RDWR | O_CREAT | O_TRUNC, 0600);
    KVT_EXPECT(fd >= 0);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    kvt_progress p;
    kvt_progress_start(&p, "replaying");
    kvt_progress_update(&p, 1, 4);
    bool drawn = true, redrawn = true;
    if (enabled) /* past the first second the ticker draws the line */
        drawn = wait_for(fd, 0, "\rreplaying: 1/4");
    else
        sleep_ms(1500);
    if (warn) {
        off_t at = lseek(fd, 0, SEEK_END);
        kvt_log(KVT_LOG_WARN, "something to say");
        if (enabled) /* and draws it again after the message */
            redrawn = wait_for(fd, (size_t)at + 10, "\rreplaying: ");
    }
    kvt_progress_update(&p, 2, 4);
    kvt_progress_end(&p);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    KVT_EXPECT(drawn && redrawn);
    char *text = text_of(fd);
    close(fd);
    unlink(path);
    return text;
}

int main(void)
{
    setenv("KVT_PROGRESS", "1", 1);
    setenv("KVT_LOG", "warn", 1);

    char *t = capture_stderr(true, true);
    /* the message has a line of its own: at the start of the text or after a newline */
    const char *m = strstr(t, "kvtrace: warning: something to say\n");
    KVT_EXPECT_MSG(m && (m == t || m[-1] == '\n'), "stderr was: %s", t);
    KVT_EXPECT(strstr(t, "\rreplaying: 1/4 (25%)") != NULL && strstr(t, "\rreplaying: 1/4") < m);
    /* drawn again after the message, and the text ends with one newline */
    KVT_EXPECT_MSG(m && strstr(m, "\rreplaying: ") != NULL, "stderr was: %s", t);
    size_t n = strlen(t);
    KVT_EXPECT(n >= 2 && t[n - 1] == '\n' && t[n - 2] != '\n');
    free(t);

    t = capture_stderr(false, true); /* no message: one line, ended once */
    n = strlen(t);
    KVT_EXPECT(n >= 2 && t[n - 1] == '\n' && strchr(t, '\n') == t + n - 1);
    free(t);

    setenv("KVT_PROGRESS", "0", 1); /* off: nothing but the message */
    t = capture_stderr(true, false);
    KVT_EXPECT_MSG(!strcmp(t, "kvtrace: warning: something to say\n"), "stderr was: %s", t);
    free(t);
    return kvt_test_result("test_cli_progress");
}
