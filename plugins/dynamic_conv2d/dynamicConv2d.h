/*
 * deploykit::DynamicConv2d: mix each sample's kernel and bias from the bank, then convolve every sample in one
 * launch of the shared implicit-GEMM tile with per-sample weights. Written once for any executor (CudaExecutor in
 * dynamicConv2dKernel.cu, the host emulator in tests/plugins/).
 */
#ifndef DEPLOYKIT_DYNAMIC_CONV2D_H
#define DEPLOYKIT_DYNAMIC_CONV2D_H

#include <stddef.h>

#include "../common/implicitGemmConv.h"

namespace deploykit
{

/* mixed[n, e] = S[n or 0, tap(e)] * sum_k A[n, k] bank[k, e]: a sample's kernel (e over [M, C/g, kH, kW]) from the
 * kernel bank, or, with no tap attention, its bias (e over [M]) from the bias bank. */
template <typename T>
struct MixBank
{
    T const* bank;         // [experts, perSample]
    T const* attention;    // [N, experts]
    T const* tapAttention; // [tapSamples, taps] or nullptr for ones
    T* mixed;              // [N, perSample]
    int64_t experts;
    int64_t perSample;
    int64_t taps;          // kH * kW
    int64_t tapSamples;    // 1 (shared) or N

    DK_HOST_DEVICE void operator()(int64_t index) const
    {
        int64_t const n = index / perSample;
        int64_t const e = index % perSample;
        float sum = 0.F;
        for (int64_t k = 0; k < experts; ++k)
        {
            sum += toFloat(attention[n * experts + k]) * toFloat(bank[k * perSample + e]);
        }
        if (tapAttention != nullptr)
        {
            sum *= toFloat(tapAttention[(tapSamples == 1 ? 0 : n) * taps + e % taps]);
        }
        mixed[index] = fromFloat<T>(sum);
    }
};

constexpr size_t kWorkspaceAlignment = 256;

inline size_t alignedBytes(size_t bytes)
{
    return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

inline size_t elementBytes(DeploykitDataType type)
{
    return type == DEPLOYKIT_FLOAT16 ? 2 : 4;
}

/* Workspace: the batch's mixed kernels, then its mixed biases. */
inline size_t dynamicConv2dWorkspaceSize(DeploykitConv2dShape const& shape, DeploykitDataType type)
{
    size_t const kernelElements = static_cast<size_t>(shape.batch * shape.outChannels * (shape.channels / shape.group)
        * shape.kernelH * shape.kernelW);
    size_t const biasElements = static_cast<size_t>(shape.batch * shape.outChannels);
    return alignedBytes(kernelElements * elementBytes(type)) + alignedBytes(biasElements * elementBytes(type));
}

template <typename T, typename Executor>
int dynamicConv2dForwardAs(Executor& executor, DeploykitConv2dShape const& shape, int64_t experts,
    int64_t tapSamples, void const* X, void const* W, void const* A, void const* B, void const* S, void* Y,
    void* workspace)
{
    ConvGeometry const geometry = makeGeometry(shape);
    int64_t const perSample = shape.outChannels * geometry.reduction;
    T* const kernels = static_cast<T*>(workspace);
    T* const biases = reinterpret_cast<T*>(
        static_cast<char*>(workspace) + alignedBytes(static_cast<size_t>(shape.batch * perSample) * sizeof(T)));
    executor.forEach(MixBank<T>{static_cast<T const*>(W), static_cast<T const*>(A), static_cast<T const*>(S),
                         kernels, experts, perSample, geometry.taps, tapSamples},
        shape.batch * perSample);
    if (B != nullptr)
    {
        executor.forEach(MixBank<T>{static_cast<T const*>(B), static_cast<T const*>(A), nullptr, biases, experts,
                             shape.outChannels, 1, 1},
            shape.batch * shape.outChannels);
    }
    ConvWeights<T> const weights{kernels, perSample, B != nullptr ? biases : nullptr, shape.outChannels};
    executor.convolve(ConvTile<T, PixelSampler<T>>{geometry, weights, PixelSampler<T>{static_cast<T const*>(X)},
        static_cast<T*>(Y)});
    return executor.status();
}

/* The launcher's body: check, then dispatch on the element type. */
template <typename Executor>
int dynamicConv2dForward(Executor& executor, DeploykitConv2dShape const* shape, int64_t experts, int64_t tapSamples,
    DeploykitDataType type, void const* X, void const* W, void const* A, void const* B, void const* S, void* Y,
    void* workspace)
{
    if (shape == nullptr || deploykitConv2dCheckShape(shape) != DEPLOYKIT_SUCCESS || experts < 1
        || (tapSamples != 1 && tapSamples != shape->batch))
    {
        return DEPLOYKIT_INVALID_SHAPE;
    }
    if (X == nullptr || W == nullptr || A == nullptr || Y == nullptr || workspace == nullptr)
    {
        return DEPLOYKIT_MISSING_INPUT;
    }
    switch (type)
    {
    case DEPLOYKIT_FLOAT32:
        return dynamicConv2dForwardAs<float>(executor, *shape, experts, tapSamples, X, W, A, B, S, Y, workspace);
    case DEPLOYKIT_FLOAT16:
        return dynamicConv2dForwardAs<__half>(executor, *shape, experts, tapSamples, X, W, A, B, S, Y, workspace);
    }
    return DEPLOYKIT_UNSUPPORTED_TYPE;
}

} // namespace deploykit

#endif // DEPLOYKIT_DYNAMIC_CONV2D_H
