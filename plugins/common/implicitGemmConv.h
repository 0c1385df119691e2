/*
 * Implicit-GEMM convolution shared by deploykit's GPU kernels.
 *
 * A convolution is a GEMM per sample and group: Y[m, q] = sum_k A[m, k] B[k, q] with m an output channel, q an
 * output pixel and k = (input channel, tap). Instead of writing the column matrix B to memory (im2col, which the
 * known deformable-conv plugins do sample by sample before a cuBLAS GEMM), each thread block samples its B tile
 * straight into shared memory through a Sampler: plain zero-padded pixels for a convolution, modulated bilinear
 * samples for a deformable one. B never exists in global memory, the bias is added in the same pass, and every
 * sample of the batch runs in one launch.
 *
 * Everything here is plain C++ marked DK_HOST_DEVICE, so the same tile code runs on the GPU (the .cu launchers)
 * and on the host, where tests/plugins/host_emulator.cpp executes it block by block to check its indexing without
 * a GPU.
 */
#ifndef DEPLOYKIT_IMPLICIT_GEMM_CONV_H
#define DEPLOYKIT_IMPLICIT_GEMM_CONV_H

#include <cuda_fp16.h>
#include <stdint.h>

#include "convShape.h"

#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define DK_UNROLL _Pragma("unroll")
#else
#define DK_UNROLL
#endif

namespace deploykit
{

DK_HOST_DEVICE float toFloat(float value)
{
    return value;
}

DK_HOST_DEVICE float toFloat(__half value)
{
    return __half2float(value);
}

template <typename T>
DK_HOST_DEVICE T fromFloat(float value);

template <>
DK_HOST_DEVICE float fromFloat<float>(float value)
{
    return value;
}

template <>
DK_HOST_DEVICE __half fromFloat<__half>(float value)
{
    return __float2half(value);
}

/* Tile geometry: a block computes kTileM output channels x kTileN output pixels of one (sample, group), reducing
 * over k in steps of kTileK; each of its kThreads threads owns kThreadM x kThreadN outputs, strided by the thread
 * grid (kTileM / kThreadM rows, kTileN / kThreadN columns) so that a warp reads shared memory without bank
 * conflicts and writes consecutive pixels. */
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreadM = 4;
constexpr int kThreadN = 4;
constexpr int kThreadRows = kTileM / kThreadM;
constexpr int kThreadCols = kTileN / kThreadN;
constexpr int kThreads = kThreadRows * kThreadCols;
constexpr int kTilePadM = 4; // breaks the bank conflicts of the transposed weight-tile stores

/* Shared-memory tiles of one reduction step, in float whatever the storage type. */
struct SharedTiles
{
    float weights[kTileK][kTileM + kTilePadM]; // A, transposed: [k][m]
    float samples[kTileK][kTileN];             // B: [k][q]
};

struct Accumulator
{
    float values[kThreadM][kThreadN];
};

/* Output geometry derived once on the host from a DeploykitConv2dShape. */
struct ConvGeometry
{
    DeploykitConv2dShape shape;
    int64_t outH;
    int64_t outW;
    int64_t pixels;         // outH * outW
    int64_t groupIn;        // channels / group
    int64_t groupOut;       // outChannels / group
    int64_t taps;           // kernelH * kernelW
    int64_t reduction;      // groupIn * taps
    int64_t pixelTiles;     // ceil(pixels / kTileN)
    int64_t channelTiles;   // ceil(groupOut / kTileM)
};

inline ConvGeometry makeGeometry(DeploykitConv2dShape const& shape)
{
    ConvGeometry g{};
    g.shape = shape;
    g.outH = deploykitConv2dOutputHeight(&shape);
    g.outW = deploykitConv2dOutputWidth(&shape);
    g.pixels = g.outH * g.outW;
    g.groupIn = shape.channels / shape.group;
    g.groupOut = shape.outChannels / shape.group;
    g.taps = shape.kernelH * shape.kernelW;
    g.reduction = g.groupIn * g.taps;
    g.pixelTiles = (g.pixels + kTileN - 1) / kTileN;
    g.channelTiles = (g.groupOut + kTileM - 1) / kTileM;
    return g;
}

/* Where a tap of an output pixel reads the input, before any learned offset. */
struct TapPosition
{
    int64_t sample;
    int64_t channel;
    int64_t tap;   // i * kernelW + j
    int64_t pixel; // oy * outW + ox
    int64_t y;     // oy * stride - pad + i * dilation
    int64_t x;
};

/* Sampler of a plain convolution: the zero-padded input pixel. */
template <typename T>
struct PixelSampler
{
    T const* input;

    DK_HOST_DEVICE float operator()(ConvGeometry const& g, TapPosition const& p) const
    {
        if (p.y < 0 || p.y >= g.shape.height || p.x < 0 || p.x >= g.shape.width)
        {
            return 0.F;
        }
        return toFloat(input[((p.sample * g.shape.channels + p.channel) * g.shape.height + p.y) * g.shape.width + p.x]);
    }
};

/* Weight source: one kernel bank for the whole batch (sampleStride 0) or one per sample. */
template <typename T>
struct ConvWeights
{
    T const* weights;     // [.., outChannels, groupIn, kernelH, kernelW] per sample
    int64_t sampleStride; // elements between two samples' kernels
    T const* bias;        // [.., outChannels] per sample, or nullptr
    int64_t biasStride;   // elements between two samples' biases
};

/* One thread block's share of the GEMM, split into the phases between barriers so that the host emulator can run
 * them thread by thread: load a reduction step's tiles, accumulate them, store the outputs. */
template <typename T, typename Sampler>
struct ConvTile
{
    ConvGeometry g;
    ConvWeights<T> w;
    Sampler sampler;
    T* output;

    struct Block
    {
        int64_t sample;
        int64_t group;
        int64_t firstChannel; // within the group
        int64_t firstPixel;
    };

    /* Grid: x enumerates (sample, group, pixel tile), y the output-channel tiles of the group. */
    DK_HOST_DEVICE Block block(int64_t x, int64_t y) const
    {
        int64_t const pixelTile = x % g.pixelTiles;
        int64_t const sampleGroup = x / g.pixelTiles;
        return Block{sampleGroup / g.shape.group, sampleGroup % g.shape.group, y * kTileM, pixelTile * kTileN};
    }

    DK_HOST_DEVICE void load(Block const& b, int thread, int64_t firstK, SharedTiles& tiles) const
    {
        // Weights: consecutive threads read consecutive k of one filter (contiguous in memory).
        T const* filters = w.weights + b.sample * w.sampleStride
            + (b.group * g.groupOut + b.firstChannel) * g.reduction;
        for (int e = thread; e < kTileK * kTileM; e += kThreads)
        {
            int const kk = e % kTileK;
            int const mm = e / kTileK;
            int64_t const k = firstK + kk;
            bool const inside = k < g.reduction && b.firstChannel + mm < g.groupOut;
            tiles.weights[kk][mm] = inside ? toFloat(filters[mm * g.reduction + k]) : 0.F;
        }
        // Samples: consecutive threads take consecutive output pixels.
        for (int e = thread; e < kTileK * kTileN; e += kThreads)
        {
            int const kk = e / kTileN;
            int const qq = e % kTileN;
            // 32-bit index arithmetic: a tap count or a map's pixel count never nears 2^31, and 64-bit division
            // costs tens of instructions on the GPU.
            int const k = static_cast<int>(firstK) + kk;
            int const q = static_cast<int>(b.firstPixel) + qq;
            float value = 0.F;
            if (k < g.reduction && q < g.pixels)
            {
                int const taps = static_cast<int>(g.taps);
                int const kernelW = static_cast<int>(g.shape.kernelW);
                int const outW = static_cast<int>(g.outW);
                int const tap = k % taps;
                int const oy = q / outW;
                int const ox = q % outW;
                TapPosition const p{b.sample, b.group * g.groupIn + k / taps, tap, q,
                    oy * g.shape.strides[0] - g.shape.pads[0] + (tap / kernelW) * g.shape.dilations[0],
                    ox * g.shape.strides[1] - g.shape.pads[1] + (tap % kernelW) * g.shape.dilations[1]};
                value = sampler(g, p);
            }
            tiles.samples[kk][qq] = value;
        }
    }

    DK_HOST_DEVICE void accumulate(int thread, SharedTiles const& tiles, Accumulator& acc) const
    {
        int const row = thread / kThreadCols;
        int const col = thread % kThreadCols;
        DK_UNROLL
        for (int kk = 0; kk < kTileK; ++kk)
        {
            float a[kThreadM];
            float s[kThreadN];
            DK_UNROLL
            for (int i = 0; i < kThreadM; ++i)
            {
                a[i] = tiles.weights[kk][row + i * kThreadRows];
            }
            DK_UNROLL
            for (int j = 0; j < kThreadN; ++j)
            {
                s[j] = tiles.samples[kk][col + j * kThreadCols];
            }
            DK_UNROLL
            for (int i = 0; i < kThreadM; ++i)
            {
                DK_UNROLL
                for (int j = 0; j < kThreadN; ++j)
                {
                    acc.values[i][j] += a[i] * s[j];
                }
            }
        }
    }

    DK_HOST_DEVICE void store(Block const& b, int thread, Accumulator const& acc) const
    {
        int const row = thread / kThreadCols;
        int const col = thread % kThreadCols;
        for (int i = 0; i < kThreadM; ++i)
        {
            int64_t const m = b.firstChannel + row + i * kThreadRows;
            if (m >= g.groupOut)
            {
                continue;
            }
            int64_t const channel = b.group * g.groupOut + m;
            float const bias = w.bias != nullptr ? toFloat(w.bias[b.sample * w.biasStride + channel]) : 0.F;
            T* out = output + (b.sample * g.shape.outChannels + channel) * g.pixels;
            for (int j = 0; j < kThreadN; ++j)
            {
                int64_t const q = b.firstPixel + col + j * kThreadCols;
                if (q < g.pixels)
                {
                    out[q] = fromFloat<T>(acc.values[i][j] + bias);
                }
            }
        }
    }

    DK_HOST_DEVICE int64_t gridX() const
    {
        return g.shape.batch * g.shape.group * g.pixelTiles;
    }

    DK_HOST_DEVICE int64_t gridY() const
    {
        return g.channelTiles;
    }
};

} // namespace deploykit

#endif // DEPLOYKIT_IMPLICIT_GEMM_CONV_H
