/* deploykit::DynamicConv2d's C launchers: the shared forward pass (dynamicConv2d.h) on the GPU. */
#include "../common/cudaExecutor.cuh"
#include "dynamicConv2d.h"
#include "dynamicConv2dKernel.h"

extern "C" size_t deploykitDynamicConv2dWorkspaceSize(DeploykitConv2dShape const* shape, DeploykitDataType type)
{
    return shape != nullptr ? deploykit::dynamicConv2dWorkspaceSize(*shape, type) : 0;
}

extern "C" int deploykitDynamicConv2dForward(DeploykitConv2dShape const* shape, int64_t experts, int64_t tapSamples,
    DeploykitDataType type, void const* X, void const* W, void const* A, void const* B, void const* S, void* Y,
    void* workspace, void* stream)
{
    deploykit::CudaExecutor executor(stream);
    return deploykit::dynamicConv2dForward(executor, shape, experts, tapSamples, type, X, W, A, B, S, Y, workspace);
}
