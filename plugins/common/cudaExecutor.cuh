/*
 * Runs the shared kernel code (implicitGemmConv.h and the ops' element-wise steps) on the GPU. The host emulator in
 * tests/plugins/ runs the same code through an executor with the same two methods.
 */
#ifndef DEPLOYKIT_CUDA_EXECUTOR_CUH
#define DEPLOYKIT_CUDA_EXECUTOR_CUH

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "implicitGemmConv.h"

namespace deploykit
{

template <typename Tile>
__global__ void __launch_bounds__(kThreads) implicitGemmConvKernel(Tile const tile)
{
    __shared__ SharedTiles tiles;
    auto const block = tile.block(blockIdx.x, blockIdx.y);
    Accumulator acc{};
    for (int64_t firstK = 0; firstK < tile.g.reduction; firstK += kTileK)
    {
        tile.load(block, threadIdx.x, firstK, tiles);
        __syncthreads();
        tile.accumulate(threadIdx.x, tiles, acc);
        __syncthreads();
    }
    tile.store(block, threadIdx.x, acc);
}

template <typename Step>
__global__ void forEachKernel(Step const step, int64_t const count)
{
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        step(i);
    }
}

/* Launches on one stream and keeps the first error, so a launcher checks once at the end. */
class CudaExecutor
{
public:
    explicit CudaExecutor(void* stream)
        : mStream(static_cast<cudaStream_t>(stream))
    {
    }

    /* step(i) for every i < count, one thread per index (grid-stride beyond the grid's size). */
    template <typename Step>
    void forEach(Step const& step, int64_t count)
    {
        if (count <= 0 || mStatus != DEPLOYKIT_SUCCESS)
        {
            return;
        }
        constexpr int kBlock = 256;
        int64_t const blocks = (count + kBlock - 1) / kBlock;
        forEachKernel<<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kBlock, 0, mStream>>>(
            step, count);
        record(cudaGetLastError());
    }

    template <typename Tile>
    void convolve(Tile const& tile)
    {
        if (mStatus != DEPLOYKIT_SUCCESS)
        {
            return;
        }
        if (tile.gridX() > std::numeric_limits<int32_t>::max() || tile.gridY() > 65535)
        {
            mStatus = DEPLOYKIT_INVALID_SHAPE;
            return;
        }
        dim3 const grid(static_cast<unsigned>(tile.gridX()), static_cast<unsigned>(tile.gridY()));
        implicitGemmConvKernel<<<grid, kThreads, 0, mStream>>>(tile);
        record(cudaGetLastError());
    }

    int status() const
    {
        return mStatus;
    }

private:
    static constexpr int64_t kMaxBlocks = 65535;

    void record(cudaError_t error)
    {
        if (error != cudaSuccess && mStatus == DEPLOYKIT_SUCCESS)
        {
            mStatus = static_cast<int>(error);
        }
    }

    cudaStream_t mStream;
    int mStatus{DEPLOYKIT_SUCCESS};
};

} // namespace deploykit

#endif // DEPLOYKIT_CUDA_EXECUTOR_CUH
