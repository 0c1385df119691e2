/*
 * TensorRT plugin deploykit::DynamicConv2d version 1 (per-sample kernel aggregation + convolution, for CondConv,
 * DyConv and ODConv): the IPluginV3 around deploykitDynamicConv2dForward. The op's contract is
 * deploykit/ops/dynamic_conv2d.py; usage and limits in README.md.
 */
#ifndef DEPLOYKIT_DYNAMIC_CONV2D_PLUGIN_H
#define DEPLOYKIT_DYNAMIC_CONV2D_PLUGIN_H

#include <string>

#include "../common/pluginUtils.h"

namespace deploykit::plugin::dynamic_conv2d
{

// The ONNX node deploykit::DynamicConv2d: its op type, plugin_version, inputs in order and attributes (the fields).
constexpr char const* kPLUGIN_NAME{"DynamicConv2d"};
constexpr char const* kPLUGIN_VERSION{"1"};
constexpr char const* kINPUT_NAMES[]{"X", "W", "A", "B", "S"};
constexpr char const* kFIELD_NAMES[]{"strides", "pads", "dilations", "group"};

//! Y [N, M, H', W'] from X [N, C, H, W], the kernel bank W [K, M, C/group, kH, kW], A [N, K], B [K, M] and
//! S [N or 1, kH, kW]; the workspace holds the batch's mixed kernels and biases.
class DynamicConv2dPlugin final : public ConvPlugin<DynamicConv2dPlugin>
{
public:
    //! Throws std::invalid_argument if a field is missing, malformed or out of range.
    DynamicConv2dPlugin(std::string name, nvinfer1::PluginFieldCollection const& fields);

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    void checkOtherInputs(nvinfer1::PluginTensorDesc const* inputs, DeploykitConv2dShape const& conv) const override;
};

} // namespace deploykit::plugin::dynamic_conv2d

#endif // DEPLOYKIT_DYNAMIC_CONV2D_PLUGIN_H
