/* widen_args.h - the arguments kvt_widen_stored_ref and kvt_widen_stored_cuda refuse alike
 * (`who` names the function in the message). Internal to kernels/.
 */
#ifndef KVT_WIDEN_ARGS_H
#define KVT_WIDEN_ARGS_H

#include "kvt_kernels.h"

static inline kvt_status kvt_widen_stored_args(const char *who, kvt_dtype dt, int n_heads,
                                               int n_tok, int D, size_t stride_head)
{
    KVT_RETURN_IF(dt != KVT_DTYPE_BF16 && dt != KVT_DTYPE_F16, KVT_ERR_INVALID_ARG,
                  "%s: %s is not a 16-bit float dtype", who,
                  kvt_dtype_name(dt) ? kvt_dtype_name(dt) : "an unknown code");
    KVT_RETURN_IF(n_heads < 0 || n_tok < 0 || D < 1 || stride_head < (size_t)n_tok * D,
                  KVT_ERR_INVALID_ARG, "%s: bad shape %d x %d x %d, head stride %zu", who, n_heads,
                  n_tok, D, stride_head);
    return KVT_OK;
}

#endif /* KVT_WIDEN_ARGS_H */
