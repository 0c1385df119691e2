/* deploykit::DeformConv2d's TensorRT plugin: what differs from the other conv plugin (see deformConv2dPlugin.h). */
#include "deformConv2dPlugin.h"

#include <iterator>

#include "deformConv2dKernel.h"

namespace deploykit::plugin::deform_conv2d
{
namespace
{

//! Positions in kINPUT_NAMES after X and W.
enum Input : int32_t
{
    kOFFSET_INPUT = 2,
    kB_INPUT = 3,
    kMASK_INPUT = 4
};
static_assert(std::size(kINPUT_NAMES) == kMASK_INPUT + 1, "an Input for every name");

//! Position of offset_group in kFIELD_NAMES, after the ConvField ones.
constexpr int32_t kOFFSET_GROUP_FIELD{kCONV_FIELD_COUNT};
static_assert(std::size(kFIELD_NAMES) == kOFFSET_GROUP_FIELD + 1, "offset_group is the last field");

//! The rank of each input of kINPUT_NAMES, and how many ints each field of kFIELD_NAMES holds.
constexpr int32_t kINPUT_RANKS[]{4, 4, 4, 1, 4};
constexpr int32_t kFIELD_LENGTHS[]{2, 4, 2, 1, 1};
constexpr OpContract kCONTRACT{
    makeContract(kPLUGIN_NAME, kPLUGIN_VERSION, kINPUT_NAMES, kINPUT_RANKS, kFIELD_NAMES, kFIELD_LENGTHS)};

//! Registers the plugin's creator when the library is loaded.
StaticRegistration<DeformConv2dPlugin> const kREGISTRATION{kCONTRACT};

} // namespace

DeformConv2dPlugin::DeformConv2dPlugin(std::string name, nvinfer1::PluginFieldCollection const& fields)
    : ConvPlugin(kCONTRACT, std::move(name), fields)
{
    requireFieldAtLeast(kOFFSET_GROUP_FIELD, 1);
}

void DeformConv2dPlugin::checkOtherInputs(
    nvinfer1::PluginTensorDesc const* inputs, DeploykitConv2dShape const& conv) const
{
    int32_t const offsetGroup = scalarField(kOFFSET_GROUP_FIELD);
    if (conv.channels % offsetGroup != 0)
    {
        throw std::invalid_argument(std::string("field ") + kFIELD_NAMES[kOFFSET_GROUP_FIELD] + " "
            + std::to_string(offsetGroup) + " does not divide X's " + std::to_string(conv.channels) + " channels");
    }
    int64_t const taps = offsetGroup * conv.kernelH * conv.kernelW;
    int64_t const outH = deploykitConv2dOutputHeight(&conv);
    int64_t const outW = deploykitConv2dOutputWidth(&conv);
    requireDims(kINPUT_NAMES[kOFFSET_INPUT], inputs[kOFFSET_INPUT].dims, {conv.batch, 2 * taps, outH, outW});
    requireDims(kINPUT_NAMES[kB_INPUT], inputs[kB_INPUT].dims, {conv.outChannels});
    requireDims(kINPUT_NAMES[kMASK_INPUT], inputs[kMASK_INPUT].dims, {conv.batch, taps, outH, outW});
}

int32_t DeformConv2dPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /* outputDesc */, void const* const* inputs, void* const* outputs,
    void* /* workspace */, cudaStream_t stream) noexcept
{
    return guard("enqueue", kFAILURE, [&] {
        DeploykitConv2dShape const conv = convShape(inputDesc[kX_INPUT].dims, inputDesc[kW_INPUT].dims);
        return launchResult(deploykitDeformConv2dForward(&conv, scalarField(kOFFSET_GROUP_FIELD),
            toDeploykitType(inputDesc[kX_INPUT].type), inputs[kX_INPUT], inputs[kW_INPUT], inputs[kOFFSET_INPUT],
            inputs[kB_INPUT], inputs[kMASK_INPUT], outputs[0], stream));
    });
}

} // namespace deploykit::plugin::deform_conv2d
