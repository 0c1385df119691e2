/* deploykit::DynamicConv2d's TensorRT plugin: what differs from the other conv plugin (see dynamicConv2dPlugin.h). */
#include "dynamicConv2dPlugin.h"

#include <iterator>

#include "dynamicConv2dKernel.h"

namespace deploykit::plugin::dynamic_conv2d
{
namespace
{

//! Positions in kINPUT_NAMES after X and W.
enum Input : int32_t
{
    kA_INPUT = 2,
    kB_INPUT = 3,
    kS_INPUT = 4
};
static_assert(std::size(kINPUT_NAMES) == kS_INPUT + 1, "an Input for every name");
static_assert(std::size(kFIELD_NAMES) == kCONV_FIELD_COUNT, "the fields are Conv's");

//! The rank of each input of kINPUT_NAMES, and how many ints each field of kFIELD_NAMES holds.
constexpr int32_t kINPUT_RANKS[]{4, 5, 2, 2, 3};
constexpr int32_t kFIELD_LENGTHS[]{2, 4, 2, 1};
constexpr OpContract kCONTRACT{
    makeContract(kPLUGIN_NAME, kPLUGIN_VERSION, kINPUT_NAMES, kINPUT_RANKS, kFIELD_NAMES, kFIELD_LENGTHS)};

//! Registers the plugin's creator when the library is loaded.
StaticRegistration<DynamicConv2dPlugin> const kREGISTRATION{kCONTRACT};

//! K, the number of kernels in the bank W [K, M, C/group, kH, kW].
int64_t experts(nvinfer1::Dims const& w)
{
    return w.d[0];
}

//! 1 when S [1, kH, kW] is shared by the batch, else N.
int64_t tapSamples(nvinfer1::Dims const& s)
{
    return s.d[0];
}

} // namespace

DynamicConv2dPlugin::DynamicConv2dPlugin(std::string name, nvinfer1::PluginFieldCollection const& fields)
    : ConvPlugin(kCONTRACT, std::move(name), fields)
{
}

void DynamicConv2dPlugin::checkOtherInputs(
    nvinfer1::PluginTensorDesc const* inputs, DeploykitConv2dShape const& conv) const
{
    int64_t const bank = experts(inputs[kW_INPUT].dims);
    int64_t const expectedTapSamples = tapSamples(inputs[kS_INPUT].dims) == 1 ? 1 : conv.batch;
    requireDims(kINPUT_NAMES[kA_INPUT], inputs[kA_INPUT].dims, {conv.batch, bank});
    requireDims(kINPUT_NAMES[kB_INPUT], inputs[kB_INPUT].dims, {bank, conv.outChannels});
    requireDims(kINPUT_NAMES[kS_INPUT], inputs[kS_INPUT].dims, {expectedTapSamples, conv.kernelH, conv.kernelW});
}

size_t DynamicConv2dPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t /* nbInputs */,
    nvinfer1::DynamicPluginTensorDesc const* /* outputs */, int32_t /* nbOutputs */) const noexcept
{
    // The largest shape of the profile: the workspace must serve every smaller one.
    return guard("getWorkspaceSize", size_t{0}, [&] {
        DeploykitConv2dShape const conv = convShape(inputs[kX_INPUT].max, inputs[kW_INPUT].max);
        return deploykitDynamicConv2dWorkspaceSize(&conv, toDeploykitType(inputs[kX_INPUT].desc.type));
    });
}

int32_t DynamicConv2dPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /* outputDesc */, void const* const* inputs, void* const* outputs,
    void* workspace, cudaStream_t stream) noexcept
{
    return guard("enqueue", kFAILURE, [&] {
        DeploykitConv2dShape const conv = convShape(inputDesc[kX_INPUT].dims, inputDesc[kW_INPUT].dims);
        return launchResult(deploykitDynamicConv2dForward(&conv, experts(inputDesc[kW_INPUT].dims),
            tapSamples(inputDesc[kS_INPUT].dims), toDeploykitType(inputDesc[kX_INPUT].type), inputs[kX_INPUT],
            inputs[kW_INPUT], inputs[kA_INPUT], inputs[kB_INPUT], inputs[kS_INPUT], outputs[0], workspace, stream));
    });
}

} // namespace deploykit::plugin::dynamic_conv2d
