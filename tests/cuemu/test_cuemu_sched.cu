/* test_cuemu_sched.cu - cuemu's block scheduler (cuemu_device.cpp) does what the kernels' tests
 * rely on it for: the threads of a block run in a shuffled order, a fresh one after each
 * barrier and in each block, so that a read of shared memory another thread writes without a
 * barrier in between gets the old value for some threads and the new one for others (a missing
 * __syncthreads fails a test) while with the barrier every thread reads the new one; five warp
 * shuffles in a row exchange the lanes' values (each with one barrier, the exchange slots used
 * in turn: one set for all fails it); a barrier divergence fails the launch, and the launches
 * after it (on the fibers' stacks it left in the middle of a kernel) run correctly; blocks of 32
 * to 1024 threads one after another, each thread on its own stack. Only on cuemu (the shuffle
 * is the stand-in's, not a GPU's).
 */
#include <cuda_runtime.h>

#include "kvt_test.h"

#define NT   64
#define NBLK 4

/* every thread stamps its slot, then reads its neighbour's, with a barrier between or not */
__global__ void neighbour_k(int sync, int stamp, int *out)
{
    __shared__ int s[1024];
    const int t = (int)threadIdx.x, n = (int)blockDim.x;
    s[t] = stamp;
    if (sync)
        __syncthreads();
    out[blockIdx.x * n + t] = s[(t + 1) % n];
}

/* each thread's place in its block's order before and after a barrier (one counter per block:
   the stand-in's threads are never preempted, so the increment is atomic) */
__global__ void order_k(int *ctr, int *first, int *second)
{
    const int t = (int)threadIdx.x, i = (int)(blockIdx.x * blockDim.x) + t;
    first[i] = ctr[blockIdx.x]++;
    __syncthreads();
    second[i] = ctr[blockIdx.x]++;
}

/* each warp's sum of its threads' indices by butterfly shuffles */
__global__ void warp_sum_k(int *out)
{
    int v = (int)threadIdx.x;
    for (int m = 16; m > 0; m >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, m);
    out[threadIdx.x] = v;
}

/* half of each warp waits at a warp barrier, the other half at the block's: a deadlock */
__global__ void diverge_k(int *out)
{
    if (threadIdx.x % 32 < 16)
        __syncwarp();
    else
        __syncthreads();
    out[threadIdx.x] = 1;
}

static int *dev_ints(int n)
{
    int *p = NULL;
    KVT_EXPECT(cudaMalloc((void **)&p, sizeof(int) * (size_t)n) == cudaSuccess);
    KVT_EXPECT(cudaMemset(p, 0, sizeof(int) * (size_t)n) == cudaSuccess);
    return p;
}

static void get_ints(int *h, const int *d, int n)
{
    KVT_EXPECT(cudaDeviceSynchronize() == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(h, d, sizeof(int) * (size_t)n, cudaMemcpyDeviceToHost) == cudaSuccess);
}

/* threads of NBLK blocks of nt that read their neighbour's stamp (the rest read an older one) */
static int neighbours_stamped(int sync, int stamp, int nt, int *d_out)
{
    static int h[NBLK * 1024];
    neighbour_k<<<NBLK, nt>>>(sync, stamp, d_out);
    KVT_EXPECT(cudaGetLastError() == cudaSuccess);
    get_ints(h, d_out, NBLK * nt);
    int n = 0;
    for (int i = 0; i < NBLK * nt; i++)
        n += h[i] == stamp;
    return n;
}

static bool is_permutation(const int *r, int n)
{
    bool seen[NT] = {false};
    for (int i = 0; i < n; i++) {
        if (r[i] < 0 || r[i] >= n || seen[r[i]])
            return false;
        seen[r[i]] = true;
    }
    return true;
}

int main(void)
{
    int *d_out = dev_ints(NBLK * 1024);

    /* a missing barrier: some threads read the old stamp, some the new; with it, all the new */
    int stale = neighbours_stamped(0, 1, NT, d_out);
    KVT_EXPECT_MSG(stale > 0 && stale < NBLK * NT, "%d of %d read the new stamp", stale, NBLK * NT);
    KVT_EXPECT(neighbours_stamped(1, 2, NT, d_out) == NBLK * NT);

    /* the order: a permutation, not the threads' own, another after the barrier, another in
       the next block */
    int *d_ctr = dev_ints(NBLK), *d_first = dev_ints(NBLK * NT), *d_second = dev_ints(NBLK * NT);
    order_k<<<NBLK, NT>>>(d_ctr, d_first, d_second);
    KVT_EXPECT(cudaGetLastError() == cudaSuccess);
    int first[NBLK * NT], second[NBLK * NT];
    get_ints(first, d_first, NBLK * NT);
    get_ints(second, d_second, NBLK * NT);
    for (int b = 0; b < NBLK; b++) {
        int f[NT], s[NT], own = 0, same = 0, prev_block = 0;
        for (int t = 0; t < NT; t++) {
            f[t] = first[b * NT + t];
            s[t] = second[b * NT + t] - NT;
            own += f[t] == t;
            same += f[t] == s[t];
            prev_block += b > 0 && f[t] == first[(b - 1) * NT + t];
        }
        KVT_EXPECT_MSG(is_permutation(f, NT) && is_permutation(s, NT), "block %d", b);
        /* a shuffle of 64 keeps about one thread in place: 16 would be a broken shuffle */
        KVT_EXPECT_MSG(own < 16 && same < 16 && prev_block < 16,
                       "block %d: %d in their own place, %d in the same after the barrier, %d "
                       "as in the block before",
                       b, own, same, prev_block);
    }

    /* shuffles */
    int *d_sum = dev_ints(256);
    warp_sum_k<<<1, 256>>>(d_sum);
    KVT_EXPECT(cudaGetLastError() == cudaSuccess);
    int sum[256];
    get_ints(sum, d_sum, 256);
    for (int t = 0; t < 256; t++)
        KVT_EXPECT_MSG(sum[t] == 32 * (t / 32 * 32) + 496, "thread %d: %d", t, sum[t]);

    /* a barrier divergence fails the launch; the launches after it run as before, on the stacks
       it left in the middle of the kernel, in blocks of every size */
    diverge_k<<<2, 64>>>(d_out);
    cudaDeviceSynchronize();
    KVT_EXPECT(cudaGetLastError() == cudaErrorLaunchFailure);
    KVT_EXPECT(cudaGetLastError() == cudaSuccess);
    const int sizes[] = {32, 1024, 64, 96, 1024, 33};
    for (int i = 0; i < (int)(sizeof(sizes) / sizeof(sizes[0])); i++)
        KVT_EXPECT_MSG(neighbours_stamped(1, 10 + i, sizes[i], d_out) == NBLK * sizes[i],
                       "blocks of %d", sizes[i]);
    warp_sum_k<<<1, 256>>>(d_sum);
    get_ints(sum, d_sum, 256);
    KVT_EXPECT(sum[0] == 496 && sum[255] == 32 * 224 + 496);

    cudaFree(d_out);
    cudaFree(d_ctr);
    cudaFree(d_first);
    cudaFree(d_second);
    cudaFree(d_sum);
    return kvt_test_result("test_cuemu_sched");
}
