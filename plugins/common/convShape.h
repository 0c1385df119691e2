/*
 * The plain C side of deploykit's GPU kernels: the shape of a 2-D convolution and the launchers' status codes.
 * C, not C++, so that the TensorRT plugins, the tests (through ctypes) and any other host can call the launchers.
 */
#ifndef DEPLOYKIT_CONV_SHAPE_H
#define DEPLOYKIT_CONV_SHAPE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of every tensor a launcher reads and writes (one type per call). */
typedef enum DeploykitDataType
{
    DEPLOYKIT_FLOAT32 = 0,
    DEPLOYKIT_FLOAT16 = 1
} DeploykitDataType;

/* Launcher results: 0, a negative deploykit code, or a positive cudaError_t. */
enum
{
    DEPLOYKIT_SUCCESS = 0,
    DEPLOYKIT_INVALID_SHAPE = -1,
    DEPLOYKIT_UNSUPPORTED_TYPE = -2,
    DEPLOYKIT_MISSING_INPUT = -3
};

/* X [batch, channels, height, width] convolved with W [outChannels, channels / group, kernelH, kernelW]. */
typedef struct DeploykitConv2dShape
{
    int64_t batch;
    int64_t channels;
    int64_t height;
    int64_t width;
    int64_t outChannels;
    int64_t kernelH;
    int64_t kernelW;
    int32_t strides[2];   /* H, W */
    int32_t pads[4];      /* top, left, bottom, right: ONNX's order */
    int32_t dilations[2]; /* H, W */
    int32_t group;
} DeploykitConv2dShape;

static inline int64_t deploykitConv2dOutputHeight(DeploykitConv2dShape const* s)
{
    return (s->height + s->pads[0] + s->pads[2] - s->dilations[0] * (s->kernelH - 1) - 1) / s->strides[0] + 1;
}

static inline int64_t deploykitConv2dOutputWidth(DeploykitConv2dShape const* s)
{
    return (s->width + s->pads[1] + s->pads[3] - s->dilations[1] * (s->kernelW - 1) - 1) / s->strides[1] + 1;
}

/* DEPLOYKIT_SUCCESS if the shape describes a convolution with a non-empty output, else DEPLOYKIT_INVALID_SHAPE. */
static inline int deploykitConv2dCheckShape(DeploykitConv2dShape const* s)
{
    if (s->batch < 1 || s->channels < 1 || s->height < 1 || s->width < 1 || s->outChannels < 1 || s->kernelH < 1
        || s->kernelW < 1 || s->group < 1 || s->channels % s->group != 0 || s->outChannels % s->group != 0)
    {
        return DEPLOYKIT_INVALID_SHAPE;
    }
    for (int i = 0; i < 2; ++i)
    {
        if (s->strides[i] < 1 || s->dilations[i] < 1 || s->pads[i] < 0 || s->pads[i + 2] < 0)
        {
            return DEPLOYKIT_INVALID_SHAPE;
        }
    }
    return deploykitConv2dOutputHeight(s) >= 1 && deploykitConv2dOutputWidth(s) >= 1 ? DEPLOYKIT_SUCCESS
                                                                                      : DEPLOYKIT_INVALID_SHAPE;
}

#ifdef __cplusplus
}
#endif

#endif /* DEPLOYKIT_CONV_SHAPE_H */
