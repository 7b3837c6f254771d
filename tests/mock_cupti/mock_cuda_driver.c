/* mock_cuda_driver.c - a stand-in for the NVIDIA driver library (built as libcuda.so.1, tests
 * only) next to the mock CUPTI (mock_cupti.c): capture/cupti_timeline.c loads the driver to
 * tell "no driver" from CUPTI's own failures and asks it for a stream's context. A stream
 * handle here is KVT_MOCK_STREAM(context id, stream id) and a context is its id.
 */
#include <cuda.h>
#include <stdint.h>

#include "kvt_mock_cupti.h"

__attribute__((visibility("default"))) CUresult cuStreamGetCtx(CUstream stream, CUcontext *ctx)
{
    uintptr_t h = (uintptr_t)stream;
    if (!ctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (!h)
        return CUDA_ERROR_INVALID_CONTEXT; /* the default stream, and no current context */
    if (h >> 16 == 0)
        return CUDA_ERROR_INVALID_HANDLE;
    *ctx = (CUcontext)(h >> 16);
    return CUDA_SUCCESS;
}
