# kernels/cuda: the CUDA kernels against their references (label gpu; "not run" without a device).
if(KVT_HAVE_CUDA)
    kvt_add_test(test_kernels_cuda SOURCES unit/test_kernels_cuda.c LIBS kvt_kernels_cuda
                 LABELS gpu)
endif()
