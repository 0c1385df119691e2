/*
 * deploykit::DeformConv2d on the shared implicit-GEMM tile: the deformable sampler and the forward pass, written
 * once for any executor (CudaExecutor in deformConv2dKernel.cu, the host emulator in tests/plugins/).
 */
#ifndef DEPLOYKIT_DEFORM_CONV2D_H
#define DEPLOYKIT_DEFORM_CONV2D_H

#include <math.h>

#include "../common/implicitGemmConv.h"

namespace deploykit
{

/* Sampler of a deformable convolution: the input bilinearly sampled at the tap's position plus its learned offset,
 * times the tap's mask. A neighbour outside the image contributes zero, so a position one pixel or more outside
 * samples 0 (ONNX DeformConv, torchvision and mmcv agree). The offsets and the mask are shared by the channels of
 * an offset group. */
template <typename T>
struct DeformableSampler
{
    T const* input;
    T const* offset;       // [N, offsetGroup * taps * 2, outH, outW], (dy, dx) per tap
    T const* mask;         // [N, offsetGroup * taps, outH, outW], or nullptr for ones
    int64_t offsetGroup;
    int64_t groupChannels; // channels per offset group

    DK_HOST_DEVICE float operator()(ConvGeometry const& g, TapPosition const& p) const
    {
        int64_t const tapRow = (p.sample * offsetGroup + p.channel / groupChannels) * g.taps + p.tap;
        float const y = static_cast<float>(p.y) + toFloat(offset[2 * tapRow * g.pixels + p.pixel]);
        float const x = static_cast<float>(p.x) + toFloat(offset[(2 * tapRow + 1) * g.pixels + p.pixel]);
        float const height = static_cast<float>(g.shape.height);
        float const width = static_cast<float>(g.shape.width);
        if (y <= -1.F || y >= height || x <= -1.F || x >= width)
        {
            return 0.F;
        }
        float const modulation = mask != nullptr ? toFloat(mask[tapRow * g.pixels + p.pixel]) : 1.F;
        T const* plane = input + (p.sample * g.shape.channels + p.channel) * g.shape.height * g.shape.width;
        float const top = floorf(y);
        float const left = floorf(x);
        float const dy = y - top;
        float const dx = x - left;
        int64_t const y0 = static_cast<int64_t>(top);
        int64_t const x0 = static_cast<int64_t>(left);
        float sum = 0.F;
        for (int corner = 0; corner < 4; ++corner)
        {
            int64_t const py = y0 + (corner >> 1);
            int64_t const px = x0 + (corner & 1);
            if (py >= 0 && py < g.shape.height && px >= 0 && px < g.shape.width)
            {
                float const wy = (corner >> 1) ? dy : 1.F - dy;
                float const wx = (corner & 1) ? dx : 1.F - dx;
                sum += wy * wx * toFloat(plane[py * g.shape.width + px]);
            }
        }
        return modulation * sum;
    }
};

template <typename T, typename Executor>
int deformConv2dForwardAs(Executor& executor, DeploykitConv2dShape const& shape, int32_t offsetGroup,
    void const* X, void const* W, void const* offset, void const* B, void const* mask, void* Y)
{
    ConvGeometry const geometry = makeGeometry(shape);
    DeformableSampler<T> const sampler{static_cast<T const*>(X), static_cast<T const*>(offset),
        static_cast<T const*>(mask), offsetGroup, shape.channels / offsetGroup};
    ConvWeights<T> const weights{static_cast<T const*>(W), 0, static_cast<T const*>(B), 0};
    executor.convolve(ConvTile<T, DeformableSampler<T>>{geometry, weights, sampler, static_cast<T*>(Y)});
    return executor.status();
}

/* The launcher's body: check, then dispatch on the element type. */
template <typename Executor>
int deformConv2dForward(Executor& executor, DeploykitConv2dShape const* shape, int32_t offsetGroup,
    DeploykitDataType type, void const* X, void const* W, void const* offset, void const* B, void const* mask, void* Y)
{
    if (shape == nullptr || deploykitConv2dCheckShape(shape) != DEPLOYKIT_SUCCESS || offsetGroup < 1
        || shape->channels % offsetGroup != 0)
    {
        return DEPLOYKIT_INVALID_SHAPE;
    }
    if (X == nullptr || W == nullptr || offset == nullptr || Y == nullptr)
    {
        return DEPLOYKIT_MISSING_INPUT;
    }
    switch (type)
    {
    case DEPLOYKIT_FLOAT32:
        return deformConv2dForwardAs<float>(executor, *shape, offsetGroup, X, W, offset, B, mask, Y);
    case DEPLOYKIT_FLOAT16:
        return deformConv2dForwardAs<__half>(executor, *shape, offsetGroup, X, W, offset, B, mask, Y);
    }
    return DEPLOYKIT_UNSUPPORTED_TYPE;
}

} // namespace deploykit

#endif // DEPLOYKIT_DEFORM_CONV2D_H
