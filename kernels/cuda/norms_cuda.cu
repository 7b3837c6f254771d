/* norms_cuda.cu - row norms and unit rows (kvt_row_norms_ref, kvt_unit_rows_ref): one warp
 * per row, the squares summed in double across lanes. The mean unit row is summed in a fixed
 * order (the same bits on every run): each block sums 32 dimensions over a part of
 * kvt_unit_mean_rows rows on 8 row lanes, merged in lane order, and one thread per dimension
 * then adds the parts in order; the reference sums the rows in order, so the two agree to
 * rounding.
 */
#include "cuda_util.cuh"

#define WARPS_PER_BLOCK 8

/* sum of squares of row `row` of x [n, D] in double, the same in every lane */
static __device__ double row_sq(const float *x, int D, int row, int lane)
{
    const float *r = x + (size_t)row * D;
    double s = 0.0;
    for (int d = lane; d < D; d += 32) {
        double v = r[d];
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_down_sync(0xffffffffu, s, o);
    return __shfl_sync(0xffffffffu, s, 0);
}

static __global__ void row_norms_k(const float *x, int n, int D, double *out)
{
    int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) /* whole warps leave together */
        return;
    double s = row_sq(x, D, row, lane);
    if (lane == 0)
        out[row] = sqrt(s);
}

static __global__ void unit_rows_k(const float *x, int n, int D, float *ku, double *inv)
{
    int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n)
        return;
    double nrm = sqrt(row_sq(x, D, row, lane));
    double iv = 1.0 / (nrm > 1e-12 ? nrm : 1e-12);
    if (lane == 0)
        inv[row] = iv;
    if (ku)
        for (int d = lane; d < D; d += 32)
            ku[(size_t)row * D + d] = (float)((double)x[(size_t)row * D + d] * iv);
}

#define UM_LANES 8 /* row lanes per block of 32 dimensions */

/* rows per part: 1024, more when the parts would exceed a grid's 65535 rows of blocks */
static int unit_mean_rows(int n)
{
    int r = 1024;
    if ((n + r - 1) / r > 65535)
        r = (n + 65534) / 65535;
    return r;
}

extern "C" size_t kvt_unit_rows_cuda_work(int n, int D)
{
    if (n < 0 || D <= 0)
        return 0;
    int r = unit_mean_rows(n);
    return (size_t)n + (size_t)((n + r - 1) / r) * D;
}

/* part [blockIdx.y, D]: the sum over rows [y R, (y+1) R) of x[t][d] inv[t], for the block's 32
 * dimensions; lane l adds rows y R + l, + 2l, ... in order, then the lanes are added in order */
static __global__ void unit_mean_part_k(const float *x, int n, int D, int R, const double *inv,
                                        double *part)
{
    __shared__ double sm[UM_LANES][33];
    const int dl = threadIdx.x % 32, lane = threadIdx.x / 32, d = blockIdx.x * 32 + dl;
    const int r0 = blockIdx.y * R, r1 = n - r0 < R ? n : r0 + R;
    double m = 0.0;
    if (d < D)
        for (int t = r0 + lane; t < r1; t += UM_LANES)
            m = __dadd_rn(m, __dmul_rn((double)x[(size_t)t * D + d], inv[t]));
    sm[lane][dl] = m;
    __syncthreads();
    if (lane == 0 && d < D) {
        for (int l = 1; l < UM_LANES; l++)
            m = __dadd_rn(m, sm[l][dl]);
        part[(size_t)blockIdx.y * D + d] = m;
    }
}

static __global__ void unit_mean_sum_k(const double *part, int n_part, int n, int D, double *mean)
{
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D)
        return;
    double m = 0.0;
    for (int c = 0; c < n_part; c++)
        m = __dadd_rn(m, part[(size_t)c * D + d]);
    mean[d] = n > 0 ? m / n : 0.0;
}

extern "C" kvt_status kvt_row_norms_cuda(const float *x, int n, int D, double *out, void *stream)
{
    KVT_RETURN_IF(n < 0 || D <= 0, KVT_ERR_INVALID_ARG, "row_norms_cuda: bad shape n=%d D=%d", n,
                  D);
    if (n == 0)
        return KVT_OK;
    row_norms_k<<<kvt_cu_blocks((size_t)n, WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK, 0,
                  kvt_cu_stream(stream)>>>(x, n, D, out);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

extern "C" kvt_status kvt_unit_rows_cuda(const float *x, int n, int D, float *ku, double *mean,
                                         double *inv_work, void *stream)
{
    KVT_RETURN_IF(n < 0 || D <= 0 || !inv_work, KVT_ERR_INVALID_ARG,
                  "unit_rows_cuda: bad shape n=%d D=%d or no workspace", n, D);
    cudaStream_t st = kvt_cu_stream(stream);
    if (n > 0) {
        unit_rows_k<<<kvt_cu_blocks((size_t)n, WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK, 0, st>>>(
            x, n, D, ku, inv_work);
        KVT_CU_LAUNCHED();
    }
    if (mean) {
        const int R = unit_mean_rows(n), n_part = (n + R - 1) / R;
        double *part = inv_work + n;
        if (n_part > 0) {
            unit_mean_part_k<<<dim3((unsigned)(D + 31) / 32, (unsigned)n_part), 32 * UM_LANES, 0,
                               st>>>(x, n, D, R, inv_work, part);
            KVT_CU_LAUNCHED();
        }
        unit_mean_sum_k<<<kvt_cu_blocks((size_t)D, 128), 128, 0, st>>>(part, n_part, n, D, mean);
        KVT_CU_LAUNCHED();
    }
    return KVT_OK;
}

#define RM_THREADS 256

/* One block per row: each thread sums every RM_THREADS-th value (the mass and, with mod, the
 * mass of each modality), then a tree over the threads in shared memory; a fixed order, so
 * the same bits on every run. */
static __global__ void row_mass_k(const float *p, int T, size_t stride, const uint8_t *mod,
                                  double *sum, double *mass)
{
    constexpr int NM = KVT_N_MODALITIES;
    __shared__ double sh[RM_THREADS][NM + 1];
    const float *r = p + (size_t)blockIdx.x * stride;
    const int tid = threadIdx.x;
    double s = 0.0, m[NM];
    for (int k = 0; k < NM; k++)
        m[k] = 0.0;
    for (int j = tid; j < T; j += RM_THREADS) {
        double x = r[j];
        s += x;
        if (mod) {
            const int c = mod[j] < NM ? mod[j] : NM - 1;
#pragma unroll
            for (int k = 0; k < NM; k++) /* compile-time indices keep m in registers */
                if (k == c)
                    m[k] += x;
        }
    }
    sh[tid][0] = s;
    for (int k = 0; k < NM; k++)
        sh[tid][k + 1] = m[k];
    for (int w = RM_THREADS / 2; w > 0; w >>= 1) {
        __syncthreads();
        if (tid < w)
            for (int k = 0; k <= NM; k++)
                sh[tid][k] += sh[tid + w][k];
    }
    if (tid == 0) {
        sum[blockIdx.x] = sh[0][0];
        if (mod && mass)
            for (int k = 0; k < NM; k++)
                mass[(size_t)blockIdx.x * NM + k] = sh[0][k + 1];
    }
}

extern "C" kvt_status kvt_row_mass_cuda(const float *p, int n, int T, size_t stride,
                                        const uint8_t *mod, double *sum, double *mass, void *stream)
{
    KVT_RETURN_IF(n < 0 || T < 0 || stride < (size_t)T || (mod && !mass), KVT_ERR_INVALID_ARG,
                  "row_mass_cuda: bad shape n=%d T=%d stride=%zu", n, T, stride);
    if (n == 0)
        return KVT_OK;
    KVT_RETURN_IF(n > 0x7fffffff, KVT_ERR_UNSUPPORTED, "row_mass_cuda: %d rows", n);
    row_mass_k<<<(unsigned)n, RM_THREADS, 0, kvt_cu_stream(stream)>>>(p, T, stride, mod, sum, mass);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

static __global__ void nf_init_k(unsigned long long *first, unsigned long long n)
{
    *first = n;
}

static __global__ void nf_k(const float *x, size_t n, unsigned long long *first)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        if (!isfinite(x[i]))
            atomicMin(first, (unsigned long long)i);
}

extern "C" kvt_status kvt_first_nonfinite_cuda(const float *x, size_t n, unsigned long long *first,
                                               void *stream)
{
    KVT_RETURN_IF(!first || (n && !x), KVT_ERR_INVALID_ARG, "first_nonfinite_cuda: no buffer");
    cudaStream_t st = kvt_cu_stream(stream);
    nf_init_k<<<1, 1, 0, st>>>(first, (unsigned long long)n);
    KVT_CU_LAUNCHED();
    if (n == 0)
        return KVT_OK;
    const unsigned nb = kvt_cu_blocks(n, 256), grid = nb < 4096 ? nb : 4096;
    nf_k<<<grid, 256, 0, st>>>(x, n, first);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
