/* gpu_peak.cu - bench_gpu_peak: the device's scalar f64 ceilings, the compute roofline of the
 * replay's CUDA kernels. Those kernels take their logits and sums in double, rounded as the CPU
 * references round them (the project builds CUDA with --fmad=false): their products of f32
 * values as fused multiply-adds (kvt_cu_madd_f32: the same bits), the rest as separate
 * multiplies and adds, which the f64 matmul rate bench/run_gpu.sh measures with torch (tensor
 * cores) does not describe. This program measures, on device 0:
 *   fp64_muladd_Gops  separate f64 multiplies and adds (__dmul_rn, __dadd_rn) per second, in
 *                     billions
 *   fp64_fma_TFLOPps  f64 fused multiply-adds, two FLOP each: the ceiling of the kernels'
 *                     inner loops (dot products, sums of probability x value)
 * each the best of 3 timed launches of many threads, each with 8 independent chains (enough
 * to hide the pipeline's latency), plus the device name and SM count, as one JSON line on
 * stdout. usage: bench_gpu_peak [iterations, default 65536]
 */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 8

#define CU(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "bench_gpu_peak: %s: %s\n", #call, cudaGetErrorString(e_));            \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

/* CHAINS products and CHAINS sums per iteration, none fused; m and c near 1 and 0 keep the
 * values finite, and the sum written at the end keeps the work from being dropped */
static __global__ void muladd_k(int n, double m, double c, double *out)
{
    double x[CHAINS], y[CHAINS];
    for (int i = 0; i < CHAINS; i++)
        x[i] = y[i] = (double)(threadIdx.x + i);
    for (int it = 0; it < n; it++)
#pragma unroll
        for (int i = 0; i < CHAINS; i++) {
            x[i] = __dmul_rn(x[i], m);
            y[i] = __dadd_rn(y[i], c);
        }
    double s = 0.0;
    for (int i = 0; i < CHAINS; i++)
        s = __dadd_rn(s, __dadd_rn(x[i], y[i]));
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

static __global__ void fma_k(int n, double m, double c, double *out)
{
    double x[CHAINS];
    for (int i = 0; i < CHAINS; i++)
        x[i] = (double)(threadIdx.x + i);
    for (int it = 0; it < n; it++)
#pragma unroll
        for (int i = 0; i < CHAINS; i++)
            x[i] = __fma_rn(x[i], m, c);
    double s = 0.0;
    for (int i = 0; i < CHAINS; i++)
        s = __dadd_rn(s, x[i]);
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

/* best of 3 launches, in seconds (*s < 0 when the launch failed) */
static int best_time(int fma, int blocks, int threads, int n, double *out, double *s)
{
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    *s = -1.0;
    for (int rep = 0; rep < 4; rep++) { /* the first warms up */
        CU(cudaEventRecord(a));
        if (fma)
            fma_k<<<blocks, threads>>>(n, 0.999999999, 1e-9, out);
        else
            muladd_k<<<blocks, threads>>>(n, 0.999999999, 1e-9, out);
        CU(cudaGetLastError());
        CU(cudaEventRecord(b));
        CU(cudaEventSynchronize(b));
        float ms = 0.0f;
        CU(cudaEventElapsedTime(&ms, a, b));
        if (rep > 0 && (*s < 0.0 || ms * 1e-3 < *s))
            *s = ms * 1e-3;
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return 0;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 65536;
    if (n < 1) {
        fprintf(stderr, "usage: bench_gpu_peak [iterations >= 1]\n");
        return 2;
    }
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    const int threads = 256, blocks = prop.multiProcessorCount * 16;
    double *out = NULL, t_ma = 0.0, t_fma = 0.0;
    CU(cudaMalloc((void **)&out, (size_t)blocks * threads * sizeof(double)));
    if (best_time(0, blocks, threads, n, out, &t_ma) ||
        best_time(1, blocks, threads, n, out, &t_fma))
        return 1;
    cudaFree(out);
    const double th = (double)blocks * threads;
    printf("{\"device\": \"%s\", \"sms\": %d, \"iterations\": %d, \"fp64_muladd_Gops\": %.1f, "
           "\"fp64_fma_TFLOPps\": %.2f}\n",
           prop.name, prop.multiProcessorCount, n, th * n * 2 * CHAINS / t_ma * 1e-9,
           th * n * 2 * CHAINS / t_fma * 1e-12);
    return 0;
}
