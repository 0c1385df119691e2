/*
 * TensorRT plugin deploykit::DeformConv2d version 1 (deformable convolution v1/v2): the IPluginV3 around
 * deploykitDeformConv2dForward. The op's contract is deploykit/ops/deform_conv2d.py; usage and limits in README.md.
 */
#ifndef DEPLOYKIT_DEFORM_CONV2D_PLUGIN_H
#define DEPLOYKIT_DEFORM_CONV2D_PLUGIN_H

#include <string>

#include "../common/pluginUtils.h"

namespace deploykit::plugin::deform_conv2d
{

// The ONNX node deploykit::DeformConv2d: its op type, plugin_version, inputs in order and attributes (the fields).
constexpr char const* kPLUGIN_NAME{"DeformConv2d"};
constexpr char const* kPLUGIN_VERSION{"1"};
constexpr char const* kINPUT_NAMES[]{"X", "W", "offset", "B", "mask"};
constexpr char const* kFIELD_NAMES[]{"strides", "pads", "dilations", "group", "offset_group"};

//! Y [N, M, H', W'] from X [N, C, H, W], W [M, C/group, kH, kW], offset [N, 2*offset_group*kH*kW, H', W'],
//! B [M] and mask [N, offset_group*kH*kW, H', W']; no workspace.
class DeformConv2dPlugin final : public ConvPlugin<DeformConv2dPlugin>
{
public:
    //! Throws std::invalid_argument if a field is missing, malformed or out of range.
    DeformConv2dPlugin(std::string name, nvinfer1::PluginFieldCollection const& fields);

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    void checkOtherInputs(nvinfer1::PluginTensorDesc const* inputs, DeploykitConv2dShape const& conv) const override;
};

} // namespace deploykit::plugin::deform_conv2d

#endif // DEPLOYKIT_DEFORM_CONV2D_PLUGIN_H
