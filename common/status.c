/* status.c - status names, the per-thread last-error message and stderr logging.
 * Libraries report failures as a kvt_status plus a message here; only the CLI prints.
 */
#include "kvt_common.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *kvt_status_str(kvt_status s)
{
    switch (s) {
    case KVT_OK:
        return "ok";
    case KVT_ERR_IO:
        return "I/O error";
    case KVT_ERR_CORRUPT:
        return "corrupt input";
    case KVT_ERR_VERSION:
        return "unsupported format version";
    case KVT_ERR_NOMEM:
        return "out of memory";
    case KVT_ERR_NO_CUDA:
        return "CUDA not available";
    case KVT_ERR_CUDA:
        return "CUDA error";
    case KVT_ERR_INVALID_ARG:
        return "invalid argument";
    case KVT_ERR_NOT_FOUND:
        return "not found";
    case KVT_ERR_STATE:
        return "call out of order";
    case KVT_ERR_OVERFLOW:
        return "size overflow";
    case KVT_ERR_TRUNCATED:
        return "truncated input";
    case KVT_ERR_CHECKSUM:
        return "checksum mismatch";
    case KVT_ERR_UNSUPPORTED:
        return "unsupported";
    case KVT_ERR_NAN:
        return "NaN or Inf in input";
    }
    return "unknown status";
}

static _Thread_local char tl_msg[512];

kvt_status kvt_error_set(kvt_status s, const char *fmt, ...)
{
    /* format into a local buffer first: callers often pass kvt_error_msg() itself as an
     * argument to prefix context ("writing X: %s"), and vsnprintf into its own source is
     * undefined (it came out empty) */
    char buf[sizeof(tl_msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    memcpy(tl_msg, buf, sizeof(buf));
    return s;
}

const char *kvt_error_msg(void)
{
    return tl_msg;
}

void kvt_error_clear(void)
{
    tl_msg[0] = '\0';
}

static int g_log_level = -1;

void kvt_log_set_level(kvt_log_level lvl)
{
    g_log_level = (int)lvl;
}

static int log_level(void)
{
    if (g_log_level < 0) {
        const char *e = getenv("KVT_LOG");
        int l = KVT_LOG_WARN;
        if (e && !strcmp(e, "error"))
            l = KVT_LOG_ERROR;
        else if (e && !strcmp(e, "info"))
            l = KVT_LOG_INFO;
        else if (e && !strcmp(e, "debug"))
            l = KVT_LOG_DEBUG;
        g_log_level = l;
    }
    return g_log_level;
}

/* one message at a time (the trace writer's threads may log), written by the hook if one is
 * set. A fork while another thread holds the lock must not leave the child's copy locked
 * (the Python binding's users fork): the lock is taken around fork and released in both. */
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static kvt_log_hook g_log_hook;
static void *g_log_hook_user;
static pthread_once_t g_log_once = PTHREAD_ONCE_INIT;

static void log_fork_prepare(void)
{
    pthread_mutex_lock(&g_log_mu);
}

static void log_fork_release(void)
{
    pthread_mutex_unlock(&g_log_mu);
}

static void log_init(void)
{
    pthread_atfork(log_fork_prepare, log_fork_release, log_fork_release);
}

void kvt_log_set_hook(kvt_log_hook write_line, void *user)
{
    pthread_once(&g_log_once, log_init);
    pthread_mutex_lock(&g_log_mu);
    g_log_hook = write_line;
    g_log_hook_user = user;
    pthread_mutex_unlock(&g_log_mu);
}

void kvt_log(kvt_log_level lvl, const char *fmt, ...)
{
    static const char *names[] = {"error", "warning", "info", "debug"};
    if ((int)lvl > log_level())
        return;
    char buf[1024], line[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    snprintf(line, sizeof(line), "kvtrace: %s: %s\n", names[lvl], buf);
    pthread_once(&g_log_once, log_init);
    pthread_mutex_lock(&g_log_mu);
    if (g_log_hook)
        g_log_hook(g_log_hook_user, line);
    else
        fputs(line, stderr);
    pthread_mutex_unlock(&g_log_mu);
}
