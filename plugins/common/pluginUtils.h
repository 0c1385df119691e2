/*
 * What the deploykit TensorRT plugins share. Both ops are 2-D convolutions: X [N, C, H, W] first, a kernel whose last
 * four dims are [M, C/group, kH, kW] second, ONNX Conv's strides, pads, dilations and group as their first fields,
 * one output Y [N, M, H', W'] of X's type (fp32 or fp16, every tensor linear). So the IPluginV3 boilerplate, the
 * field parsing and serialization, the output shape and the checks of X and W live here; an op plugin adds its
 * contract (the arrays of its header), the checks of its other inputs and its enqueue.
 */
#ifndef DEPLOYKIT_PLUGIN_UTILS_H
#define DEPLOYKIT_PLUGIN_UTILS_H

// TensorRT 10/11's headers still declare the deprecated IPluginV2 API and warn about their own use of it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#include <NvInferRuntime.h>
#pragma GCC diagnostic pop

#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "convShape.h"

namespace deploykit::plugin
{

//! The namespace every deploykit plugin is registered under: the ONNX nodes' `plugin_namespace` attribute.
constexpr char const* kPLUGIN_NAMESPACE{"deploykit"};

//! Results of the TensorRT callbacks that return a status.
constexpr int32_t kSUCCESS{0};
constexpr int32_t kFAILURE{1};

//! Positions of the fields every deploykit conv plugin lists first: ONNX Conv's attributes.
enum ConvField : int32_t
{
    kSTRIDES = 0,   //!< 2 ints: H, W
    kPADS = 1,      //!< 4 ints: top, left, bottom, right
    kDILATIONS = 2, //!< 2 ints: H, W
    kGROUP = 3,     //!< 1 int
    kCONV_FIELD_COUNT = 4
};

//! Positions of the inputs every deploykit conv plugin takes first.
enum ConvInput : int32_t
{
    kX_INPUT = 0, //!< X [N, C, H, W]
    kW_INPUT = 1  //!< the kernel, whose last four dims are [M, C/group, kH, kW]
};

//! What TensorRT and the ONNX node know of one op: its names, the ranks of its inputs and its integer fields.
struct OpContract
{
    char const* name;
    char const* version;
    int32_t nbInputs;
    char const* const* inputNames;
    int32_t const* inputRanks;
    int32_t nbFields;
    char const* const* fieldNames;
    int32_t const* fieldLengths; //!< how many ints each field holds
};

//! The contract of an op from the arrays of its header. Array sizes that differ do not compile, nor (the contract
//! being constexpr) fields that do not start with ConvField's, nor an X or W of another rank.
template <size_t NbInputs, size_t NbFields>
constexpr OpContract makeContract(char const* name, char const* version, char const* const (&inputNames)[NbInputs],
    int32_t const (&inputRanks)[NbInputs], char const* const (&fieldNames)[NbFields],
    int32_t const (&fieldLengths)[NbFields])
{
    static_assert(NbInputs > kW_INPUT && NbFields >= kCONV_FIELD_COUNT, "a conv plugin takes X, W and Conv's fields");
    if (fieldLengths[kSTRIDES] != 2 || fieldLengths[kPADS] != 4 || fieldLengths[kDILATIONS] != 2
        || fieldLengths[kGROUP] != 1 || inputRanks[kX_INPUT] != 4 || inputRanks[kW_INPUT] < 4)
    {
        throw std::logic_error("a conv plugin's fields start with strides[2], pads[4], dilations[2], group[1], "
                               "X is 4-D and W at least 4-D");
    }
    return OpContract{name, version, static_cast<int32_t>(NbInputs), inputNames, inputRanks,
        static_cast<int32_t>(NbFields), fieldNames, fieldLengths};
}

//! A plugin's integer fields: one vector per field of its contract, in the contract's order.
using FieldValues = std::vector<std::vector<int32_t>>;

//! A PluginFieldCollection together with the PluginFields it points to.
class FieldCollection
{
public:
    FieldCollection() = default;
    //! A copy starts empty: the source's PluginFields point into the source's plugin.
    FieldCollection(FieldCollection const& /* other */) noexcept {}
    FieldCollection& operator=(FieldCollection const& /* other */) noexcept
    {
        return *this;
    }

    //! INT32 fields named after `contract`: pointing into `values` (for serialization; valid while `values` is
    //! unchanged) or, when `values` is null, without data (the creator's list of the fields it needs).
    nvinfer1::PluginFieldCollection const* set(OpContract const& contract, FieldValues const* values);

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

//! Logs through TensorRT's logger, or to stderr while TensorRT has none.
void logMessage(nvinfer1::ILogger::Severity severity, char const* message) noexcept;

//! Logs one error sentence: "deploykit::<op> '<layer>' <callback>: <message>".
void logError(OpContract const& op, char const* layer, char const* callback, char const* message) noexcept;

//! Runs `body`, the work of one TensorRT callback, so that no exception escapes: one is logged and `onError` returned.
template <typename Result, typename Body>
Result guard(OpContract const& op, char const* layer, char const* callback, Result onError, Body&& body) noexcept
{
    try
    {
        return body();
    }
    catch (std::exception const& e)
    {
        logError(op, layer, callback, e.what());
    }
    catch (...)
    {
        logError(op, layer, callback, "unknown exception");
    }
    return onError;
}

//! The launcher's element type for a TensorRT tensor type; throws std::invalid_argument unless kFLOAT or kHALF.
DeploykitDataType toDeploykitType(nvinfer1::DataType type);

//! "[1, 18, 8, 8]"
std::string dimsText(nvinfer1::Dims const& dims);

//! Throws std::invalid_argument "input <name> is [...], expected [...]" unless `dims` are `expected`.
void requireDims(char const* input, nvinfer1::Dims const& dims, std::initializer_list<int64_t> expected);

//! IPluginV3 of a deploykit convolution with its core, build and runtime capabilities, all but enqueue (and, when the
//! op needs one, getWorkspaceSize). Its state is the op's contract, the layer name and the fields, so copies clone it.
class ConvPluginBase : public nvinfer1::IPluginV3,
                       public nvinfer1::IPluginV3OneCore,
                       public nvinfer1::IPluginV3OneBuild,
                       public nvinfer1::IPluginV3OneRuntime
{
public:
    ~ConvPluginBase() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    //! Reads the contract's fields, as INT32 or INT64 (the ONNX parser passes INT32) and ignoring any others. Throws
    //! std::invalid_argument naming a field that is missing, of another type or length, or a ConvField out of range.
    ConvPluginBase(OpContract const& contract, std::string name, nvinfer1::PluginFieldCollection const& fields);
    ConvPluginBase(ConvPluginBase const&) = default;
    ConvPluginBase& operator=(ConvPluginBase const&) = delete;

    //! The one value of a scalar field.
    int32_t scalarField(int32_t field) const;

    //! Throws std::invalid_argument unless every value of `field` is at least `minimum`.
    void requireFieldAtLeast(int32_t field, int32_t minimum) const;

    //! The convolution of X and W (their dims, then this plugin's strides, pads, dilations and group).
    DeploykitConv2dShape convShape(nvinfer1::Dims const& x, nvinfer1::Dims const& w) const;

    //! enqueue's result for a launcher status: kSUCCESS, or the status once the failure is logged.
    int32_t launchResult(int32_t status) const noexcept;

    //! guard() with this plugin's op and layer name.
    template <typename Result, typename Body>
    Result guard(char const* callback, Result onError, Body&& body) const noexcept
    {
        return plugin::guard(*mContract, mName.c_str(), callback, onError, std::forward<Body>(body));
    }

private:
    //! Throws std::invalid_argument naming an input, other than X and W, whose dims do not fit `conv`.
    virtual void checkOtherInputs(nvinfer1::PluginTensorDesc const* inputs, DeploykitConv2dShape const& conv) const
        = 0;

    //! Throws std::invalid_argument unless there are the contract's inputs, of its ranks, and one output.
    template <typename Desc>
    void checkArity(Desc const* inputs, int32_t nbInputs, int32_t nbOutputs) const;

    OpContract const* mContract;
    std::string mName;
    FieldValues mFields;
    FieldCollection mSerialized;
};

//! ConvPluginBase that clones itself as a copy of Derived.
template <typename Derived>
class ConvPlugin : public ConvPluginBase
{
public:
    nvinfer1::IPluginV3* clone() noexcept override
    {
        return guard<nvinfer1::IPluginV3*>(
            "clone", nullptr, [this] { return new Derived(static_cast<Derived const&>(*this)); });
    }

protected:
    using ConvPluginBase::ConvPluginBase;
};

//! IPluginCreatorV3One of a deploykit conv plugin: the contract's name, version and fields, namespace "deploykit".
class ConvPluginCreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit ConvPluginCreatorBase(OpContract const& contract);

    //! Both phases pass the same fields: the node's attributes at build, getFieldsToSerialize's at runtime.
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    //! The op whose plugins this creator makes.
    OpContract const& contract() const noexcept
    {
        return mContract;
    }

private:
    virtual std::unique_ptr<nvinfer1::IPluginV3> create(
        std::string name, nvinfer1::PluginFieldCollection const& fields) const = 0;

    OpContract const& mContract;
    FieldCollection mFieldNames;
    nvinfer1::PluginFieldCollection const* mFieldNameList; //!< mFieldNames' collection, built once
};

//! The creator of Plugin, which is constructed from (layer name, PluginFieldCollection).
template <typename Plugin>
class ConvPluginCreator final : public ConvPluginCreatorBase
{
public:
    using ConvPluginCreatorBase::ConvPluginCreatorBase;

private:
    std::unique_ptr<nvinfer1::IPluginV3> create(
        std::string name, nvinfer1::PluginFieldCollection const& fields) const override
    {
        return std::make_unique<Plugin>(std::move(name), fields);
    }
};

//! Registers `creator` in TensorRT's plugin registry under kPLUGIN_NAMESPACE; logs the outcome.
void registerCreator(ConvPluginCreatorBase& creator) noexcept;

//! Registers the creator of Plugin when the library is loaded (dlopen, LD_PRELOAD, trtexec --staticPlugins): define
//! one object of this type at namespace scope in the plugin's .cpp. Not REGISTER_TENSORRT_PLUGIN, which registers
//! under the namespace "", nor an exported getCreators, which makes loadLibrary fail on the registered creator.
template <typename Plugin>
class StaticRegistration
{
public:
    explicit StaticRegistration(OpContract const& contract)
        : mCreator(contract)
    {
        registerCreator(mCreator);
    }

private:
    ConvPluginCreator<Plugin> mCreator;
};

} // namespace deploykit::plugin

#endif // DEPLOYKIT_PLUGIN_UTILS_H
