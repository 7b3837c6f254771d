/* test_common_memory.c - the memory a replay plans its worker threads for: kvt_mem_available
 * on fake /proc and /sys/fs/cgroup trees (kvt_mem_available_in), covering MemAvailable alone,
 * a cgroup v2 limit on an ancestor of the process's cgroup (as Slurm and systemd set them),
 * page cache not counted as used, a usage that cannot be read, a container whose cgroup path
 * names the host's hierarchy, cgroup v1 with the memory controller among others, and a usage
 * above its limit; then kvt_replay_threads' arithmetic.
 */
#include <sys/stat.h>
#include <unistd.h>

#include "kvt_replay.h"
#include "kvt_test.h"

static char g_root[64];

static void put(const char *rel, const char *text)
{
    char path[512], dir[512];
    snprintf(path, sizeof(path), "%s/%s", g_root, rel);
    snprintf(dir, sizeof(dir), "%s", path);
    for (char *p = dir + strlen(g_root) + 1; (p = strchr(p, '/')); p++) { /* mkdir -p */
        *p = '\0';
        mkdir(dir, 0700);
        *p = '/';
    }
    FILE *f = fopen(path, "w");
    KVT_EXPECT(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static void clean(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_root);
    KVT_EXPECT(system(cmd) == 0);
    KVT_EXPECT(mkdir(g_root, 0700) == 0);
}

#define MiB (UINT64_C(1) << 20)

int main(void)
{
    snprintf(g_root, sizeof(g_root), "/tmp/kvt_mem_%d", (int)getpid());
    mkdir(g_root, 0700);
    clean();
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 0); /* nothing readable: unknown */
    put("proc/meminfo", "MemTotal:       4096000 kB\nMemFree: 1 kB\nMemAvailable:    2048000 kB\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), UINT64_C(2048000) * 1024);

    /* v2: no limit on the process's own cgroup, 50 MiB on its parent with 20 MiB used of which
       5 MiB inactive page cache: 35 MiB of room */
    put("proc/self/cgroup", "0::/job_7/step_0\n");
    put("sys/fs/cgroup/job_7/step_0/memory.max", "max\n");
    put("sys/fs/cgroup/job_7/step_0/memory.current", "1048576\n");
    put("sys/fs/cgroup/job_7/memory.max", "52428800\n");
    put("sys/fs/cgroup/job_7/memory.current", "20971520\n");
    put("sys/fs/cgroup/job_7/memory.stat", "anon 15728640\nfile 5242880\ninactive_file 5242880\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 35 * MiB);
    /* a tighter limit deeper down wins; usage above a limit leaves 1 byte */
    put("sys/fs/cgroup/job_7/step_0/memory.max", "10485760\n");
    put("sys/fs/cgroup/job_7/step_0/memory.current", "12582912\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 1);
    /* a usage that cannot be read: that level is unknown, not full */
    put("sys/fs/cgroup/job_7/step_0/memory.current", "?\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 35 * MiB);

    /* a container: the path names the host's hierarchy; the mount's root has the limit */
    clean();
    put("proc/meminfo", "MemAvailable:    2048000 kB\n");
    put("proc/self/cgroup", "0::/docker/abc123\n");
    put("sys/fs/cgroup/memory.max", "104857600\n");
    put("sys/fs/cgroup/memory.current", "41943040\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 60 * MiB);

    /* v1: memory among other controllers; no limit on the process's cgroup (a huge number),
       30 MiB on its parent with 10 MiB used, 2 MiB of it inactive cache */
    clean();
    put("proc/meminfo", "MemAvailable:    2048000 kB\n");
    put("proc/self/cgroup", "5:cpu,cpuacct:/job/x\n4:blkio,memory:/job/x\n1:name=systemd:/\n");
    put("sys/fs/cgroup/memory/job/x/memory.limit_in_bytes", "9223372036854771712\n");
    put("sys/fs/cgroup/memory/job/x/memory.usage_in_bytes", "4096\n");
    put("sys/fs/cgroup/memory/job/memory.limit_in_bytes", "31457280\n");
    put("sys/fs/cgroup/memory/job/memory.usage_in_bytes", "10485760\n");
    put("sys/fs/cgroup/memory/job/memory.stat",
        "cache 3\ninactive_file 7\ntotal_inactive_file 2097152\n");
    put("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 22 * MiB);
    /* a line longer than the reader's buffer is skipped whole: its tail is not a line */
    char longline[6000];
    memset(longline, 'a', sizeof(longline));
    memcpy(longline, "5:cpu:/", 7);
    snprintf(longline + 4090, sizeof(longline) - 4090, "0::/q\n4:blkio,memory:/job/x\n");
    put("proc/self/cgroup", longline);
    put("sys/fs/cgroup/q/memory.max", "1048576\n");
    put("sys/fs/cgroup/q/memory.current", "0\n");
    KVT_EXPECT_EQ_U64(kvt_mem_available_in(g_root), 22 * MiB);
    clean();
    rmdir(g_root);

    /* the real machine: some positive number (MemAvailable at least) */
    KVT_EXPECT(kvt_mem_available() > 0);

    /* kvt_replay_threads: requested as given (at most the layers); else the cores as far as
       the memory holds them, at least 1 */
    int cores = kvt_cpu_count();
    KVT_EXPECT_EQ_U64(kvt_replay_threads(3, 0, 32, 100, 50), 3);
    KVT_EXPECT_EQ_U64(kvt_replay_threads(3, 0, 2, 100, 50), 2);
    KVT_EXPECT_EQ_U64(kvt_replay_threads(0, 0, 64, 100, 250), cores < 2 ? cores : 2);
    KVT_EXPECT_EQ_U64(kvt_replay_threads(0, 0, 64, 100, 50), 1);
    KVT_EXPECT_EQ_U64(kvt_replay_threads(0, 0, 64, 100, 0), cores < 64 ? cores : 64); /* unknown */
    KVT_EXPECT_EQ_U64(kvt_replay_threads(0, 0, 1, 100, 1000000), 1);

    /* kvt_replay_decode_probs_auto (requested, cores, layers, all, group, memory): by group
       when that plans more threads, or when the threads planned do not fit holding all */
    const kvt_decode_probs A = KVT_DECODE_PROBS_ALL, G = KVT_DECODE_PROBS_GROUP;
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 4, 64, 100, 50, 250) == G);  /* 2 -> 4 threads */
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 4, 64, 100, 50, 1000) == A); /* 4 fit */
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 4, 64, 100, 90, 250) == A);  /* 2 either way */
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 4, 64, 300, 200, 250) == G); /* 1 too big */
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 8, 2, 100, 50, 250) == A);   /* 2 layers: 2 */
    KVT_EXPECT(kvt_replay_decode_probs_auto(2, 4, 64, 100, 50, 150) == G);  /* --threads 2 */
    KVT_EXPECT(kvt_replay_decode_probs_auto(1, 4, 64, 100, 50, 150) == A);
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 4, 64, 100, 50, 0) == A);   /* unknown */
    KVT_EXPECT(kvt_replay_decode_probs_auto(0, 4, 64, 100, 100, 50) == A); /* no saving */
    return kvt_test_result("test_common_memory");
}
