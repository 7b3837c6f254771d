/* cuemu_device.cpp - the block scheduler of cuemu (cuda_runtime.h): the threads of a block are
 * fibers, each run until it finishes or reaches a barrier (__syncthreads: every live thread of
 * the block; a warp barrier: every live thread of its warp). Each round runs the runnable
 * fibers in a pseudo-random order (seeded per launch and block, and by CUEMU_SEED, so a run is
 * reproducible), so that two threads touching the same shared memory between barriers (a race)
 * give different results from run to run and a missing barrier shows up. A round in which nobody
 * can run while some wait is a barrier divergence: reported as a launch failure, the block
 * abandoned. A fiber is entered once with setcontext and then switched with _setjmp/_longjmp,
 * which, unlike swapcontext, makes no system call.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <vector>

#include "cuda_runtime.h"

namespace cuemu
{

thread_local dim3 g_block_idx, g_block_dim, g_grid_dim;
thread_local ThreadState *g_cur;

namespace
{

enum { RUNNING = 0, AT_BLOCK = 1, AT_WARP = 2, DONE = 3 };
constexpr size_t STACK = 256 * 1024;

struct Fiber {
    ThreadState st;
    ucontext_t ctx; /* first entry */
    jmp_buf env;    /* where it yielded */
    bool started;
    int state;
    unsigned linear;
};

struct Block {
    ucontext_t sched;
    jmp_buf sched_env;
    std::vector<Fiber> f;
    std::vector<unsigned> order;
    std::vector<char *> stacks;
    std::vector<uint64_t> slots; /* 32 per warp */
    Fiber *cur;
    void (*fn)(void *);
    void *arg;
};

thread_local Block *g_blk;

/* set when the thread's exit starts destroying its block scheduler (C++ thread-locals, gone
   before the thread's pthread key destructors run): work run on the thread after that (a
   free's deferred kernels) would use it destroyed */
thread_local bool g_gone;
struct GoneMark {
    ~GoneMark()
    {
        g_gone = true;
    }
};

thread_local uint64_t g_launches;

void trampoline()
{
    Block *b = g_blk;
    b->fn(b->arg);
    b->cur->state = DONE;
    _longjmp(b->sched_env, 1);
}

void yield_with(int state)
{
    Block *b = g_blk;
    Fiber *me = b->cur;
    me->state = state;
    if (_setjmp(me->env) == 0)
        _longjmp(b->sched_env, 1);
}

void enter(Block *b, Fiber *f)
{
    if (_setjmp(b->sched_env) == 0) {
        if (!f->started) {
            f->started = true;
            setcontext(&f->ctx);
        }
        _longjmp(f->env, 1);
    }
}

uint64_t mix(uint64_t x)
{
    x ^= x >> 31;
    x *= 0x9e3779b97f4a7c15ull;
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ull;
    return x ^ (x >> 32);
}

} // namespace

void block_barrier()
{
    yield_with(AT_BLOCK);
}

void warp_barrier()
{
    yield_with(AT_WARP);
}

unsigned lane_id()
{
    return g_blk->cur->linear % 32;
}

uint64_t *warp_slots()
{
    return &g_blk->slots[(g_blk->cur->linear / 32) * 32];
}

void run_block(unsigned n, void (*fn)(void *), void *arg)
{
    static thread_local Block blk;
    static thread_local GoneMark gone_mark; /* destroyed just before blk */
    (void)gone_mark;
    Block *b = &blk;
    Block *prev = g_blk;
    g_blk = b;
    b->fn = fn;
    b->arg = arg;
    b->f.assign(n, Fiber());
    while (b->stacks.size() < n) { /* kept for the thread's later blocks; mapped, not malloc'd,
                                      so a leak checker does not count them at exit */
        void *st = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (st == MAP_FAILED) {
            cuemu_set_error(cudaErrorMemoryAllocation, "no memory for a block's thread stacks");
            g_blk = prev;
            return;
        }
        b->stacks.push_back((char *)st);
    }
    b->slots.assign(((n + 31) / 32) * 32, 0);
    dim3 bd = g_block_dim;
    b->order.resize(n);
    /* CUEMU_SEED=S (default 0): another order for every launch, so that runs with several
       seeds try more interleavings of a block's threads between barriers */
    static const uint64_t seed = [] {
        const char *e = getenv("CUEMU_SEED");
        return e && *e ? strtoull(e, NULL, 10) : 0ull;
    }();
    uint64_t rng = mix(++g_launches * 0x100000001b3ull + g_block_idx.x + 7 * g_block_idx.y +
                       seed * 0x9e3779b97f4a7c15ull);
    for (unsigned i = 0; i < n; i++) {
        Fiber &fb = b->f[i];
        fb.started = false;
        fb.linear = i;
        fb.st.tid = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
        fb.state = RUNNING;
        getcontext(&fb.ctx);
        fb.ctx.uc_stack.ss_sp = b->stacks[i];
        fb.ctx.uc_stack.ss_size = STACK;
        fb.ctx.uc_link = &b->sched;
        makecontext(&fb.ctx, trampoline, 0);
    }
    unsigned live = n;
    while (live > 0) {
        bool ran = false;
        for (unsigned i = 0; i < n; i++) /* a fresh shuffle each round (Fisher-Yates) */
            b->order[i] = i;
        for (unsigned i = n; i > 1; i--) {
            rng = mix(rng + i);
            unsigned j = (unsigned)(rng % i), t = b->order[i - 1];
            b->order[i - 1] = b->order[j];
            b->order[j] = t;
        }
        for (unsigned oi = 0; oi < n; oi++) {
            Fiber &fb = b->f[b->order[oi]];
            if (fb.state != RUNNING)
                continue;
            b->cur = &fb;
            g_cur = &fb.st;
            enter(b, &fb);
            ran = true;
            if (fb.state == DONE)
                live--;
        }
        /* release the warps whose live lanes all wait at a warp barrier */
        bool released = false;
        for (unsigned w = 0; w * 32 < n; w++) {
            unsigned at = 0, alive = 0;
            for (unsigned i = w * 32; i < n && i < w * 32 + 32; i++) {
                alive += b->f[i].state != DONE;
                at += b->f[i].state == AT_WARP;
            }
            if (alive > 0 && at == alive) {
                for (unsigned i = w * 32; i < n && i < w * 32 + 32; i++)
                    b->f[i].state = RUNNING;
                released = true;
            }
        }
        /* release the block when every live thread waits at __syncthreads */
        unsigned at_block = 0;
        for (unsigned i = 0; i < n; i++)
            at_block += b->f[i].state == AT_BLOCK;
        if (live > 0 && at_block == live) {
            for (unsigned i = 0; i < n; i++)
                if (b->f[i].state == AT_BLOCK)
                    b->f[i].state = RUNNING;
            released = true;
        }
        if (live > 0 && !ran && !released) {
            cuemu_set_error(cudaErrorLaunchFailure,
                            "barrier divergence: threads wait at barriers others never reach");
            break;
        }
    }
    g_cur = nullptr;
    g_blk = prev;
}

} // namespace cuemu

extern "C" int cuemu_thread_gone(void)
{
    return cuemu::g_gone;
}
