/*
 * deploykit::DeformConv2d forward on the GPU (deformable convolution v1/v2), plain C launcher.
 * Contract: deploykit/ops/deform_conv2d.py; the TensorRT plugin and the tests call this launcher.
 */
#ifndef DEPLOYKIT_DEFORM_CONV2D_KERNEL_H
#define DEPLOYKIT_DEFORM_CONV2D_KERNEL_H

#include "../common/convShape.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Y [N, M, H', W'] = sum over taps of W * (mask * bilinear sample of X at the tap's position + offset), + B.
 *   X [N, C, H, W], W [M, C/group, kH, kW], offset [N, 2*offsetGroup*kH*kW, H', W'] (dy, dx interleaved per tap),
 *   B [M] or NULL (no bias), mask [N, offsetGroup*kH*kW, H', W'] or NULL (v1: a mask of ones).
 * All tensors contiguous NCHW of `type`; `stream` is a cudaStream_t (NULL: the default stream).
 * Needs no workspace. Returns DEPLOYKIT_SUCCESS, a negative deploykit code or a cudaError_t.
 */
int deploykitDeformConv2dForward(DeploykitConv2dShape const* shape, int32_t offsetGroup, DeploykitDataType type,
    void const* X, void const* W, void const* offset, void const* B, void const* mask, void* Y, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DEPLOYKIT_DEFORM_CONV2D_KERNEL_H */
