/*
 * deploykit::DynamicConv2d forward on the GPU (per-sample kernel aggregation + convolution), plain C launcher.
 * Contract: deploykit/ops/dynamic_conv2d.py; the TensorRT plugin and the tests call this launcher.
 */
#ifndef DEPLOYKIT_DYNAMIC_CONV2D_KERNEL_H
#define DEPLOYKIT_DYNAMIC_CONV2D_KERNEL_H

#include <stddef.h>

#include "../common/convShape.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of device workspace deploykitDynamicConv2dForward needs: the batch's mixed kernels and biases. */
size_t deploykitDynamicConv2dWorkspaceSize(DeploykitConv2dShape const* shape, DeploykitDataType type);

/*
 * Y[n] = conv(X[n], S[n] * sum_k A[n,k] W[k]) + sum_k A[n,k] B[k], exact for any batch.
 *   X [N, C, H, W], W [experts, M, C/group, kH, kW], A [N, experts], B [experts, M] or NULL (no bias),
 *   S [tapSamples, kH, kW] with tapSamples 1 (shared) or N, or NULL (ones).
 * All tensors contiguous, of `type`; `workspace` holds deploykitDynamicConv2dWorkspaceSize bytes (256-byte
 * aligned); `stream` is a cudaStream_t (NULL: the default stream).
 * Returns DEPLOYKIT_SUCCESS, a negative deploykit code or a cudaError_t.
 */
int deploykitDynamicConv2dForward(DeploykitConv2dShape const* shape, int64_t experts, int64_t tapSamples,
    DeploykitDataType type, void const* X, void const* W, void const* A, void const* B, void const* S, void* Y,
    void* workspace, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DEPLOYKIT_DYNAMIC_CONV2D_KERNEL_H */
