/* norms_cuda.cu - row norms and unit rows (kvt_row_norms_ref, kvt_unit_rows_ref): one warp
 * per row, the squares summed in double across lanes; the mean unit row is summed in row order
 * by one thread per dimension, as the reference sums it.
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

static __global__ void unit_mean_k(const float *x, int n, int D, const double *inv, double *mean)
{
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D)
        return;
    double m = 0.0;
    for (int t = 0; t < n; t++) /* row order, like the reference */
        m += (double)x[(size_t)t * D + d] * inv[t];
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
        unit_mean_k<<<kvt_cu_blocks((size_t)D, 128), 128, 0, st>>>(x, n, D, inv_work, mean);
        KVT_CU_LAUNCHED();
    }
    return KVT_OK;
}
