/*
 * Runs the GPU kernels' shared code on the CPU, block by block and thread by thread, with the same phases as the
 * CUDA kernel between its barriers. The ops' forward passes (deformConv2d.h, dynamicConv2d.h) are the very code the
 * .cu launchers run; only the executor differs. Tests build this file with the host compiler and call it through
 * ctypes, so the kernels' indexing, tiling and bounds are checked on machines without a GPU.
 */
#include <cstdint>
#include <vector>

#include "deform_conv2d/deformConv2d.h"
#include "dynamic_conv2d/dynamicConv2d.h"

namespace
{

class HostExecutor
{
public:
    template <typename Step>
    void forEach(Step const& step, int64_t count)
    {
        for (int64_t i = 0; i < count; ++i)
        {
            step(i);
        }
    }

    template <typename Tile>
    void convolve(Tile const& tile)
    {
        deploykit::SharedTiles tiles{};
        std::vector<deploykit::Accumulator> accumulators(deploykit::kThreads);
        for (int64_t y = 0; y < tile.gridY(); ++y)
        {
            for (int64_t x = 0; x < tile.gridX(); ++x)
            {
                auto const block = tile.block(x, y);
                for (auto& acc : accumulators)
                {
                    acc = deploykit::Accumulator{};
                }
                for (int64_t firstK = 0; firstK < tile.g.reduction; firstK += deploykit::kTileK)
                {
                    for (int thread = 0; thread < deploykit::kThreads; ++thread)
                    {
                        tile.load(block, thread, firstK, tiles);
                    }
                    for (int thread = 0; thread < deploykit::kThreads; ++thread)
                    {
                        tile.accumulate(thread, tiles, accumulators[thread]);
                    }
                }
                for (int thread = 0; thread < deploykit::kThreads; ++thread)
                {
                    tile.store(block, thread, accumulators[thread]);
                }
            }
        }
    }

    int status() const
    {
        return DEPLOYKIT_SUCCESS;
    }
};

} // namespace

extern "C" int emulateDeformConv2dForward(DeploykitConv2dShape const* shape, int32_t offsetGroup,
    DeploykitDataType type, void const* X, void const* W, void const* offset, void const* B, void const* mask, void* Y)
{
    HostExecutor executor;
    return deploykit::deformConv2dForward(executor, shape, offsetGroup, type, X, W, offset, B, mask, Y);
}

extern "C" size_t emulateDynamicConv2dWorkspaceSize(DeploykitConv2dShape const* shape, DeploykitDataType type)
{
    return deploykit::dynamicConv2dWorkspaceSize(*shape, type);
}

extern "C" int emulateDynamicConv2dForward(DeploykitConv2dShape const* shape, int64_t experts, int64_t tapSamples,
    DeploykitDataType type, void const* X, void const* W, void const* A, void const* B, void const* S, void* Y,
    void* workspace)
{
    HostExecutor executor;
    return deploykit::dynamicConv2dForward(executor, shape, experts, tapSamples, type, X, W, A, B, S, Y, workspace);
}
