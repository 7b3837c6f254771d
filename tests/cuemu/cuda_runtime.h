/* cuda_runtime.h (cuemu) - the device half of the CPU stand-in for CUDA (README.md): what the
 * kernels of kernels/cuda, capture/ and replay/cuda use, for C++ compiled by the host compiler
 * after tests/cuemu/cuemu_pp.py has turned each `k<<<grid, block, shmem, stream>>>(args)` into
 * `cuemu::cfg(grid, block, shmem, stream).run(k, args)`.
 *
 * A launch runs the grid's blocks one after another; the threads of a block are fibers
 * (ucontext) switched cooperatively at __syncthreads and at warp shuffles, in a shuffled order,
 * so a kernel that relies on a barrier it does not call is likely to fail here too. Barriers
 * are counted, not matched by call site: only live threads of a warp waiting at a shuffle
 * while the others wait at __syncthreads are reported ("barrier divergence"; README.md). __shared__
 * is static thread_local storage: one block at a time per OS thread. Warp shuffles exchange values
 * through a per-warp buffer between two warp barriers. Atomics are plain operations (fibers are
 * never preempted). Arithmetic intrinsics
 * (__fmul_rn, __dadd_rn, ...) are the host's correctly rounded operations, which is what they
 * are on the GPU; expf/exp are the host's libm (a few ulps from CUDA's). Pointer arguments of a
 * kernel must point into device memory from cudaMalloc (or be NULL), else the launch fails with
 * an illegal address, as it would on a GPU.
 */
#ifndef KVT_CUEMU_RUNTIME_H
#define KVT_CUEMU_RUNTIME_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <new>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__      static thread_local
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

/* CUDA's integer and float min/max device functions */
static inline int min(int a, int b)
{
    return a < b ? a : b;
}
static inline int max(int a, int b)
{
    return a > b ? a : b;
}
static inline unsigned min(unsigned a, unsigned b)
{
    return a < b ? a : b;
}
static inline unsigned max(unsigned a, unsigned b)
{
    return a > b ? a : b;
}
static inline long long min(long long a, long long b)
{
    return a < b ? a : b;
}
static inline long long max(long long a, long long b)
{
    return a > b ? a : b;
}
static inline unsigned long long min(unsigned long long a, unsigned long long b)
{
    return a < b ? a : b;
}
static inline unsigned long long max(unsigned long long a, unsigned long long b)
{
    return a > b ? a : b;
}
static inline unsigned min(int a, unsigned b)
{
    return (unsigned)a < b ? (unsigned)a : b;
}
static inline unsigned min(unsigned a, int b)
{
    return a < (unsigned)b ? a : (unsigned)b;
}
static inline float min(float a, float b)
{
    return fminf(a, b);
}
static inline float max(float a, float b)
{
    return fmaxf(a, b);
}
static inline double min(double a, double b)
{
    return fmin(a, b);
}
static inline double max(double a, double b)
{
    return fmax(a, b);
}

struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(16))) double2 {
    double x, y;
};

/* the runtime's typed overloads (C++ only, as in CUDA's header) */
template <typename T> static inline cudaError_t cudaMalloc(T **p, size_t n)
{
    return cudaMalloc((void **)p, n);
}
template <typename T> static inline cudaError_t cudaMallocAsync(T **p, size_t n, cudaStream_t s)
{
    return cudaMallocAsync((void **)p, n, s);
}
template <typename T> static inline cudaError_t cudaHostAlloc(T **p, size_t n, unsigned flags)
{
    return cudaHostAlloc((void **)p, n, flags);
}
template <typename T> static inline cudaError_t cudaMallocHost(T **p, size_t n)
{
    return cudaMallocHost((void **)p, n);
}

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c)
    {
    }
};
typedef dim3 uint3;

namespace cuemu
{

struct ThreadState {
    dim3 tid;
    unsigned shuffles; /* how many it made: which of its warp's two sets of slots is next */
};
extern thread_local dim3 g_block_idx, g_block_dim, g_grid_dim;
extern thread_local ThreadState *g_cur;

/* the running block's scheduler */
void block_barrier();
void warp_barrier();
unsigned lane_id();
uint64_t *warp_slots(); /* the next shuffle's 32 exchange slots of the thread's warp */
/* run fn(i) for each of the block's nthreads fibers, with g_cur set */
void run_block(unsigned nthreads, void (*fn)(void *), void *arg);

template <typename T> static inline void check_ptr(const T &, int, bool &)
{
}
template <typename T> static inline void check_ptr(T *const &p, int dev, bool &ok)
{
    if (!cuemu_is_device_on((const void *)p, 1, dev))
        ok = false;
}

struct Launch {
    dim3 grid, block;
    size_t shmem;
    cudaStream_t stream;
    template <typename... P, typename... A> void run(void (*k)(P...), A &&...a)
    {
        std::tuple<typename std::decay<P>::type...> args(std::forward<A>(a)...);
        bool ok = true;
        const int dev = cuemu_launch_device(stream);
        if (dev < 0)
            return;
        std::apply([&](const auto &...x) { (check_ptr(x, dev, ok), ...); }, args);
        if (!ok) {
            cuemu_set_error(cudaErrorIllegalAddress, "kernel launch with a pointer argument "
                                                     "outside its device's memory");
            return;
        }
        if (block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024 || grid.x == 0 ||
            grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
            cuemu_set_error(cudaErrorInvalidValue, "kernel launch: bad configuration");
            return;
        }
        /* the launch with copies of its arguments, run now or when its stream's work runs */
        typedef decltype(args) Args;
        struct Job {
            void (*k)(P...);
            Args a;
            dim3 grid, block;
        };
        Job *job = new (std::nothrow) Job{k, std::move(args), grid, block};
        if (!job) {
            cuemu_set_error(cudaErrorMemoryAllocation, "kernel launch");
            return;
        }
        void (*exec)(void *) = [](void *c) {
            Job *j = (Job *)c;
            void (*body)(void *) = [](void *jj) {
                Job *x = (Job *)jj;
                std::apply(x->k, x->a);
            };
            g_grid_dim = j->grid;
            g_block_dim = j->block;
            for (unsigned z = 0; z < j->grid.z; z++)
                for (unsigned y = 0; y < j->grid.y; y++)
                    for (unsigned x = 0; x < j->grid.x; x++) {
                        g_block_idx = dim3(x, y, z);
                        run_block(j->block.x * j->block.y * j->block.z, body, j);
                    }
        };
        void (*del)(void *) = [](void *c) { delete (Job *)c; };
        cuemu_enqueue(stream, exec, job, del);
    }
};

static inline Launch cfg(dim3 g, dim3 b, size_t shmem = 0, cudaStream_t s = 0)
{
    return Launch{g, b, shmem, s};
}

template <typename T> static inline T shfl_index(T v, unsigned src)
{
    static_assert(sizeof(T) <= 8, "cuemu: shuffles of at most 8 bytes");
    uint64_t *slot = warp_slots();
    unsigned me = lane_id();
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    slot[me] = bits;
    warp_barrier();
    T out = v;
    if (src < 32)
        memcpy(&out, &slot[src], sizeof(T));
    /* no barrier after the read: the next shuffle writes the other set of slots, and the one
       after it writes these only once every lane has passed the next one's barrier, and so
       has read */
    return out;
}

} // namespace cuemu

#define threadIdx (cuemu::g_cur->tid)
#define blockIdx  (cuemu::g_block_idx)
#define blockDim  (cuemu::g_block_dim)
#define gridDim   (cuemu::g_grid_dim)
#define warpSize  32

static inline void __syncthreads(void)
{
    cuemu::block_barrier();
}
static inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    (void)mask;
    cuemu::warp_barrier();
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned d)
{
    (void)mask;
    unsigned l = cuemu::lane_id();
    return cuemu::shfl_index(v, l + d < 32 ? l + d : l);
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int m)
{
    (void)mask;
    return cuemu::shfl_index(v, cuemu::lane_id() ^ (unsigned)m);
}
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src)
{
    (void)mask;
    return cuemu::shfl_index(v, (unsigned)src % 32);
}

static inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v)
{
    unsigned long long o = *p;
    if (v < o)
        *p = v;
    return o;
}

/* correctly rounded arithmetic (the build uses -ffp-contract=off: no fused multiply-adds) */
static inline float __fadd_rn(float a, float b)
{
    return a + b;
}
static inline float __fsub_rn(float a, float b)
{
    return a - b;
}
static inline float __fmul_rn(float a, float b)
{
    return a * b;
}
static inline double __dadd_rn(double a, double b)
{
    return a + b;
}
static inline double __dsub_rn(double a, double b)
{
    return a - b;
}
static inline double __dmul_rn(double a, double b)
{
    return a * b;
}
static inline double __fma_rn(double a, double b, double c)
{
    return fma(a, b, c);
}

#endif /* KVT_CUEMU_RUNTIME_H */
