/* cuemu_device.cpp - the block scheduler of cuemu (cuda_runtime.h): the threads of a block are
 * fibers, each run until it finishes or reaches a barrier (__syncthreads: every live thread of
 * the block; a warp barrier: every live thread of its warp). Each round runs the runnable
 * fibers in a pseudo-random order (seeded per launch and block, and by CUEMU_SEED, so a run is
 * reproducible), so that two threads touching the same shared memory between barriers (a race)
 * give different results from run to run and a missing barrier shows up. A round in which nobody
 * can run while some wait is a barrier divergence: reported as a launch failure, the block
 * abandoned. The fibers' stacks outlive a block: a fiber that finishes parks at the top of its
 * stack and the next block's thread of the same index starts there, so that a stack is entered
 * with setcontext (two system calls: getcontext and setcontext set the signal mask) once per
 * host thread rather than once per thread of every block; the fibers are then switched with
 * setjmp and longjmp (jump, below), which make none. A stack left in the middle of a kernel (an
 * abandoned block) starts its next thread where its last finished one parked, dropping the
 * frames above, or afresh if none finished there.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <new>
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

/* a switch between fibers: GCC's and Clang's built-in setjmp saves the frame and stack
   pointers and the resumption address only (the compiler keeps nothing else live in registers
   across it), where glibc's saves every callee-saved register and the signal-mask flag and
   unwinds cancellation handlers on the jump (a sixth of a replay's time on the stand-in).
   ThreadSanitizer follows stack switches through glibc's (intercepted), so its build keeps
   them. AddressSanitizer's interception of glibc's jump clears the shadow of the stack it
   leaves and asks the kernel for the signal stack, every time (half of the time of the
   kernels' test under it): its build tells it of each switch instead (its fiber interface). */
#if defined(__SANITIZE_THREAD__)
#define CUEMU_GLIBC_JMP 1
#elif defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN_FIBERS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CUEMU_GLIBC_JMP 1
#elif __has_feature(address_sanitizer)
#define CUEMU_ASAN_FIBERS 1
#endif
#endif
#ifdef CUEMU_ASAN_FIBERS
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef CUEMU_GLIBC_JMP
typedef jmp_buf jbuf;
#define SAVE(b) _setjmp(b)
__attribute__((noinline)) void jump(jbuf b)
{
    _longjmp(b, 1);
}
#else
typedef void *jbuf[5];
#define SAVE(b) __builtin_setjmp(b)
/* not in the function that saves (the built-in's rule); not instrumented (AddressSanitizer
   would clear the stack's shadow before the jump, as in glibc's) */
__attribute__((noinline, no_sanitize_address)) void jump(jbuf b)
{
    __builtin_longjmp(b, 1);
}
#endif

struct Fiber {
    ThreadState st;
    jbuf env; /* where it yielded */
    bool started;
    int state;
    unsigned linear;
};

/* a fiber's stack, kept for the host thread's later blocks */
struct Stack {
    char *mem;      /* mapped, not malloc'd, so a leak checker does not count it at exit */
    ucontext_t ctx; /* its first entry */
    jbuf park;      /* where its last fiber finished, ready for the next block's */
    bool parked;
    void *fake; /* AddressSanitizer's fake stack while another runs */
};

struct Block {
    jbuf sched_env;
    void *sched_fake;
    std::vector<Fiber> f;
    std::vector<unsigned> order;
    std::vector<Stack *> stacks;
    std::vector<uint64_t> slots; /* 2 x 32 per warp, used in turn by its shuffles */
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
thread_local Stack *g_new_stack; /* the stack trampoline starts on */

/* AddressSanitizer's fiber interface: a switch is announced with the stack it goes to, and
   finished on arrival (which, on a fiber, tells the host thread's stack, to go back to) */
#ifdef CUEMU_ASAN_FIBERS
thread_local const void *g_host_stack;
thread_local size_t g_host_stack_size;
inline void to_fiber(Block *b, Stack *s)
{
    __sanitizer_start_switch_fiber(&b->sched_fake, s->mem, STACK);
}
inline void on_fiber(Stack *s)
{
    __sanitizer_finish_switch_fiber(s->fake, &g_host_stack, &g_host_stack_size);
}
inline void to_host(Stack *s)
{
    __sanitizer_start_switch_fiber(&s->fake, g_host_stack, g_host_stack_size);
}
inline void on_host(Block *b)
{
    __sanitizer_finish_switch_fiber(b->sched_fake, nullptr, nullptr);
}
#else
inline void to_fiber(Block *, Stack *)
{
}
inline void on_fiber(Stack *)
{
}
inline void to_host(Stack *)
{
}
inline void on_host(Block *)
{
}
#endif

/* runs on a fiber's stack for as long as the host thread: one kernel thread of a block, then
   parked until the next block's thread of the same index */
void trampoline()
{
    Block *b = g_blk;
    Stack *s = g_new_stack;
    on_fiber(s);
    for (;;) {
        b->fn(b->arg);
        b->cur->state = DONE;
        s->parked = true;
        if (SAVE(s->park) == 0) {
            to_host(s);
            jump(b->sched_env);
        }
        on_fiber(s);
    }
}

void yield_with(int state)
{
    Block *b = g_blk;
    Fiber *me = b->cur;
    Stack *s = b->stacks[me->linear];
    me->state = state;
    if (SAVE(me->env) == 0) {
        to_host(s);
        jump(b->sched_env);
    }
    on_fiber(s);
}

void enter(Block *b, Fiber *f)
{
    Stack *s = b->stacks[f->linear];
    if (SAVE(b->sched_env) == 0) {
        to_fiber(b, s);
        if (f->started)
            jump(f->env);
        f->started = true;
        if (s->parked) /* also one left in the middle of a kernel: its frames are dropped */
            jump(s->park);
        getcontext(&s->ctx);
        s->ctx.uc_stack.ss_sp = s->mem;
        /* the stacks' tops staggered over 64 KiB, a cache line apart: at the same offset in
           each mapping, every fiber's top frames fall in the same cache sets */
        s->ctx.uc_stack.ss_size = STACK - (size_t)(f->linear * 17 % 1024) * 64;
        s->ctx.uc_link = nullptr; /* trampoline never returns */
        makecontext(&s->ctx, trampoline, 0);
        g_new_stack = s;
        setcontext(&s->ctx);
    }
    on_host(b);
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
    Fiber *f = g_blk->cur;
    return &g_blk->slots[((f->linear / 32) * 2 + (f->st.shuffles++ & 1)) * 32];
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
    b->f.resize(n);
    while (b->stacks.size() < n) { /* mapped: see Stack */
        void *st = mmap(NULL, STACK + sizeof(Stack), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (st == MAP_FAILED) {
            cuemu_set_error(cudaErrorMemoryAllocation, "no memory for a block's thread stacks");
            g_blk = prev;
            return;
        }
        Stack *s = new ((char *)st + STACK) Stack();
        s->mem = (char *)st;
        s->parked = false;
        b->stacks.push_back(s);
    }
    b->slots.assign(((n + 31) / 32) * 64, 0);
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
        fb.st.shuffles = 0;
        fb.state = RUNNING;
    }
    unsigned live = n;
    while (live > 0) {
        bool ran = false;
        for (unsigned i = 0; i < n; i++) /* a fresh shuffle each round (Fisher-Yates) */
            b->order[i] = i;
        for (unsigned i = n; i > 1; i--) { /* wyrand steps, scaled without a division */
            rng += 0xa0761d6478bd642full;
            unsigned __int128 w = (unsigned __int128)rng * (rng ^ 0xe7037ed1a0b428dbull);
            uint64_t r = (uint64_t)(w >> 64) ^ (uint64_t)w;
            unsigned j = (unsigned)(((r >> 32) * i) >> 32), t = b->order[i - 1];
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
#ifdef CUEMU_ASAN_FIBERS /* the frames left on its stacks are dropped: so is their shadow */
            for (unsigned i = 0; i < n; i++)
                if (b->f[i].started && b->f[i].state != DONE)
                    ASAN_UNPOISON_MEMORY_REGION(b->stacks[i]->mem, STACK);
#endif
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
