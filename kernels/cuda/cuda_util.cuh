/* cuda_util.cuh - shared by the CUDA kernels: CUDA errors as kvt_status (KVT_ERR_CUDA with the
 * call and CUDA's message), the stream cast, grid sizes, the sweeps' chunk tables, the
 * references' dot product, tiles of logits and their warp-wide max and exponential sum. Internal to
 * kernels/cuda/.
 */
#ifndef KVT_CUDA_UTIL_CUH
#define KVT_CUDA_UTIL_CUH

#include <cuda_runtime.h>
#include <math.h>

#include "kvt_kernels_cuda.h"

#define KVT_CU(call)                                                                               \
    do {                                                                                           \
        cudaError_t kvt_e_ = (call);                                                               \
        if (kvt_e_ != cudaSuccess)                                                                 \
            return kvt_error_set(KVT_ERR_CUDA, "%s: %s", #call, cudaGetErrorString(kvt_e_));       \
    } while (0)

/* after a launch: a bad configuration shows up here, a fault at the next synchronisation */
#define KVT_CU_LAUNCHED() KVT_CU(cudaGetLastError())

static inline cudaStream_t kvt_cu_stream(void *s)
{
    return (cudaStream_t)s;
}

static inline unsigned kvt_cu_blocks(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0x7fffffffu ? 0x7fffffffu : (b ? b : 1));
}

/* the number of chunks kvt_cu_chunk_table_k writes, and (*n_fwd_chunk) the forward ones */
static inline int kvt_cu_chunk_count(const int32_t *cuts, int n_cut, int n_fwd, int T, int chunk,
                                     int *n_fwd_chunk)
{
    int n = 0;
    for (int ci = 0; ci < n_fwd; ci++)
        n += (cuts[ci] - (ci ? cuts[ci - 1] : 0) + chunk - 1) / chunk;
    *n_fwd_chunk = n;
    for (int ci = n_fwd; ci < n_cut; ci++)
        n += ((ci + 1 < n_cut ? cuts[ci + 1] : T) - cuts[ci] + chunk - 1) / chunk;
    return n;
}

/* The sweeps' chunk tables built on the device from n_cut <= KVT_CU_PCUTS cuts passed by value
 * (kvt_cu_chunk_table_k in sweep_cuda.cu, which says what the table holds), on the stream */
#define KVT_CU_PCUTS 128
cudaError_t kvt_cu_chunk_table(const int32_t *cuts, int n_cut, int n_fwd, int T, int chunk,
                               int32_t *cs, int32_t *ce, int32_t *cend, int32_t *cuts_out,
                               int32_t *zero_at, cudaStream_t st);
/* the same table built on the host (for more cuts than a launch takes); returns the count */
int kvt_cu_chunks_host(const int32_t *cuts, int n_cut, int n_fwd, int T, int chunk, int32_t *cs,
                       int32_t *ce, int32_t *cend, int *n_fwd_chunk);

/* s + a b for a and b f32 values held in double, rounded as the CPU references round
 * s + a * b (a product, then a sum), in one fused multiply-add instead of two instructions: the
 * product of two f32 values is exact in double (24 + 24 significant bits, and its exponent
 * within double's normal range, subnormal f32 operands included), so rounding it first changes
 * nothing and the sum is rounded once either way, the sign of a zero sum included. Only for
 * operands that are f32 values (the references' products of f32 data); elsewhere the fused
 * and the separate forms differ. */
static __device__ inline double kvt_cu_madd_f32(double s, double a, double b)
{
    return __fma_rn(a, b, s);
}

/* Dot product of two f32 vectors in double, d in order, each product and sum rounded as the
 * CPU references round them (kvt_cu_madd_f32). */
static __device__ inline double kvt_cu_dot_f32(const float *a, const float *b, int D)
{
    double s = 0.0;
    for (int d = 0; d < D; d++)
        s = kvt_cu_madd_f32(s, (double)a[d], (double)b[d]);
    return s;
}

/* A 32 x 64 tile of logits for a block of 128 threads (ty = warp, tx = lane):
 * acc[u][c] = q row (r0 + KVT_TILE_RPW ty + u) . key (j0 + tx + 32 c), in double, d in order,
 * each product and sum rounded as the references' kvt_dot_f32 rounds them (kvt_cu_madd_f32:
 * bitwise kvt_cu_dot_f32 and the references). Keys j < T come from k (row kidx[j] of it when
 * kidx is not NULL), keys T <= j < n_all from k2[j - T]; rows >= n_q and keys >= n_all read as
 * 0. The rows and keys are staged in shared memory KVT_TILE_DC dimensions at a time, as doubles
 * (converted once per value, not once per product). Every thread of the block must call it (it
 * synchronises). A thread's 8 rows x 2 keys use each key value it loads 8 times, and a row's
 * values come two dimensions per (broadcast) load, so that the shared memory keeps up with the
 * f64 units (an SM serves one 128-byte wavefront a cycle): with 4 rows per thread and one
 * dimension per load the loads took twice the fused multiply-adds' time. */
#define KVT_TILE_ROWS    32
#define KVT_TILE_KEYS    64
#define KVT_TILE_DC      32 /* even: the rows' dimensions are read in pairs */
#define KVT_TILE_THREADS 128
#define KVT_TILE_RPW     (KVT_TILE_ROWS / (KVT_TILE_THREADS / 32)) /* rows per warp: 8 */

struct kvt_cu_tile_sm {
    double2 q[KVT_TILE_ROWS][KVT_TILE_DC / 2]; /* [row][pair of dimensions] */
    double k[KVT_TILE_DC][KVT_TILE_KEYS + 1];
};

static __device__ inline void kvt_cu_tile_dots(const float *q, int n_q, int r0, const float *k,
                                               const int32_t *kidx, int T, const float *k2,
                                               int n_all, int j0, int D, kvt_cu_tile_sm &sm,
                                               double acc[KVT_TILE_RPW][2])
{
    const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
#pragma unroll
    for (int u = 0; u < KVT_TILE_RPW; u++)
        acc[u][0] = acc[u][1] = 0.0;
    for (int d0 = 0; d0 < D; d0 += KVT_TILE_DC) {
        const int dc = D - d0 < KVT_TILE_DC ? D - d0 : KVT_TILE_DC;
        __syncthreads(); /* the previous chunk is consumed */
        for (int e = tid; e < KVT_TILE_ROWS * KVT_TILE_DC; e += KVT_TILE_THREADS) {
            int r = e / KVT_TILE_DC, dd = e % KVT_TILE_DC;
            double x = r0 + r < n_q && dd < dc ? (double)q[(size_t)(r0 + r) * D + d0 + dd] : 0.0;
            if (dd & 1)
                sm.q[r][dd >> 1].y = x;
            else
                sm.q[r][dd >> 1].x = x;
        }
        for (int e = tid; e < KVT_TILE_KEYS * KVT_TILE_DC; e += KVT_TILE_THREADS) {
            int c = e / KVT_TILE_DC, dd = e % KVT_TILE_DC, j = j0 + c;
            float x = 0.0f;
            if (dd < dc && j < n_all)
                x = j < T ? k[(size_t)(kidx ? kidx[j] : j) * D + d0 + dd]
                          : k2[(size_t)(j - T) * D + d0 + dd];
            sm.k[dd][c] = (double)x;
        }
        __syncthreads();
        for (int dd = 0; dd < dc; dd += 2) { /* d order, as kvt_dot_f32; f32 values */
            const bool two = dd + 1 < dc;    /* an odd chunk's last dimension alone */
            const double k0 = sm.k[dd][tx], k1 = sm.k[dd][tx + 32];
            const double k2_0 = two ? sm.k[dd + 1][tx] : 0.0,
                         k2_1 = two ? sm.k[dd + 1][tx + 32] : 0.0;
#pragma unroll
            for (int u = 0; u < KVT_TILE_RPW; u++) {
                const double2 x = sm.q[KVT_TILE_RPW * ty + u][dd >> 1];
                acc[u][0] = kvt_cu_madd_f32(acc[u][0], x.x, k0);
                acc[u][1] = kvt_cu_madd_f32(acc[u][1], x.x, k1);
                if (two) {
                    acc[u][0] = kvt_cu_madd_f32(acc[u][0], x.y, k2_0);
                    acc[u][1] = kvt_cu_madd_f32(acc[u][1], x.y, k2_1);
                }
            }
        }
    }
}

/* Over the lanes of a warp, each holding the logits z[0..1] of one row (vis: the row sees that
 * key): *tm = the max of the visible logits, *ts = the sum of exp(z - *tm) over them, both in
 * every lane (fixed shuffle trees: the same bits on every run). A lane with nothing visible adds
 * nothing; a warp with nothing visible gives (-inf, 0). */
static __device__ inline void kvt_cu_warp_max_sumexp(const double z[2], const bool vis[2],
                                                     double *tm, double *ts)
{
    double m = -INFINITY;
    for (int c = 0; c < 2; c++)
        if (vis[c])
            m = z[c] > m ? z[c] : m;
    for (int o = 16; o > 0; o >>= 1) {
        double y = __shfl_down_sync(0xffffffffu, m, o);
        m = y > m ? y : m;
    }
    m = __shfl_sync(0xffffffffu, m, 0);
    double s = 0.0;
    for (int c = 0; c < 2; c++)
        if (vis[c])
            s += exp(__dsub_rn(z[c], m));
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_down_sync(0xffffffffu, s, o);
    *tm = m;
    *ts = __shfl_sync(0xffffffffu, s, 0);
}

#endif /* KVT_CUDA_UTIL_CUH */
