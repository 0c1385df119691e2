/* deploykit::DeformConv2d's C launcher: the shared forward pass (deformConv2d.h) on the GPU. */
#include "../common/cudaExecutor.cuh"
#include "deformConv2d.h"
#include "deformConv2dKernel.h"

extern "C" int deploykitDeformConv2dForward(DeploykitConv2dShape const* shape, int32_t offsetGroup,
    DeploykitDataType type, void const* X, void const* W, void const* offset, void const* B, void const* mask, void* Y,
    void* stream)
{
    deploykit::CudaExecutor executor(stream);
    return deploykit::deformConv2dForward(executor, shape, offsetGroup, type, X, W, offset, B, mask, Y);
}
