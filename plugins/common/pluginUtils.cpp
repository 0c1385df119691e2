/* The shared part of the deploykit TensorRT plugins; see pluginUtils.h. */
#include "pluginUtils.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <limits>

namespace deploykit::plugin
{

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;
using nvinfer1::IDimensionExpr;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

namespace
{

//! "[1, 2, 3]"
template <typename Int>
std::string intsText(Int const* values, size_t count)
{
    std::string text{"["};
    for (size_t i = 0; i < count; ++i)
    {
        text += (i == 0 ? "" : ", ") + std::to_string(values[i]);
    }
    return text + "]";
}

std::string intsText(std::vector<int32_t> const& values)
{
    return intsText(values.data(), values.size());
}

//! The first field of `fc` named `name`, or null.
PluginField const* findField(nvinfer1::PluginFieldCollection const& fc, char const* name)
{
    for (int32_t i = 0; i < fc.nbFields; ++i)
    {
        if (fc.fields[i].name != nullptr && std::strcmp(fc.fields[i].name, name) == 0)
        {
            return &fc.fields[i];
        }
    }
    return nullptr;
}

//! INT64 field values as int32, the type the plugins keep and serialize.
std::vector<int32_t> narrowInts(int64_t const* values, int32_t length, char const* name)
{
    std::vector<int32_t> ints;
    for (int32_t i = 0; i < length; ++i)
    {
        if (values[i] < std::numeric_limits<int32_t>::min() || values[i] > std::numeric_limits<int32_t>::max())
        {
            throw std::invalid_argument(std::string("field ") + name + " holds " + std::to_string(values[i])
                + ", which does not fit in 32 bits");
        }
        ints.push_back(static_cast<int32_t>(values[i]));
    }
    return ints;
}

//! The `length` integers of `field`, which may be INT32 or INT64.
std::vector<int32_t> readInts(PluginField const& field, int32_t length)
{
    if (field.data == nullptr || field.length != length)
    {
        throw std::invalid_argument(std::string("field ") + field.name + " must hold " + std::to_string(length)
            + " integer(s), got " + (field.data == nullptr ? "no data" : std::to_string(field.length)));
    }
    switch (field.type)
    {
    case PluginFieldType::kINT32:
    {
        auto const* values = static_cast<int32_t const*>(field.data);
        return std::vector<int32_t>(values, values + length);
    }
    case PluginFieldType::kINT64: return narrowInts(static_cast<int64_t const*>(field.data), length, field.name);
    default:
        throw std::invalid_argument(std::string("field ") + field.name + " must be INT32 or INT64, got PluginFieldType "
            + std::to_string(static_cast<int32_t>(field.type)));
    }
}

//! Every field of `contract` read from `fc`; other fields, such as the ONNX parser's plugin_namespace and
//! plugin_version strings, are ignored.
FieldValues parseFields(OpContract const& contract, nvinfer1::PluginFieldCollection const& fc)
{
    if (fc.nbFields > 0 && fc.fields == nullptr)
    {
        throw std::invalid_argument("the PluginFieldCollection has " + std::to_string(fc.nbFields) + " null fields");
    }
    FieldValues values;
    for (int32_t i = 0; i < contract.nbFields; ++i)
    {
        PluginField const* field = findField(fc, contract.fieldNames[i]);
        if (field == nullptr)
        {
            throw std::invalid_argument(std::string("field ") + contract.fieldNames[i] + " is missing");
        }
        values.push_back(readInts(*field, contract.fieldLengths[i]));
    }
    return values;
}

//! Throws std::invalid_argument unless the callback sees the contract's inputs and one output.
void checkCounts(OpContract const& contract, int32_t nbInputs, int32_t nbOutputs)
{
    if (nbInputs != contract.nbInputs || nbOutputs != 1)
    {
        throw std::invalid_argument("got " + std::to_string(nbInputs) + " inputs and " + std::to_string(nbOutputs)
            + " outputs, expected " + std::to_string(contract.nbInputs) + " and 1");
    }
}

//! (extent + padding - dilation * (kernel - 1) - 1) / stride + 1, ONNX Conv's output extent, as a shape expression.
IDimensionExpr const* outputExtent(nvinfer1::IExprBuilder& builder, IDimensionExpr const& extent,
    IDimensionExpr const& kernel, int32_t padding, int32_t stride, int32_t dilation)
{
    IDimensionExpr const* dilatedKernel
        = builder.operation(DimensionOperation::kPROD, *builder.constant(dilation), kernel);
    IDimensionExpr const* padded
        = builder.operation(DimensionOperation::kSUM, extent, *builder.constant(padding + dilation - 1));
    IDimensionExpr const* span = builder.operation(DimensionOperation::kSUB, *padded, *dilatedKernel);
    IDimensionExpr const* steps = builder.operation(DimensionOperation::kFLOOR_DIV, *span, *builder.constant(stride));
    return builder.operation(DimensionOperation::kSUM, *steps, *builder.constant(1));
}

//! The rank of an input as each callback describes it.
int32_t rankOf(nvinfer1::DimsExprs const& dims)
{
    return dims.nbDims;
}

int32_t rankOf(nvinfer1::DynamicPluginTensorDesc const& desc)
{
    return desc.desc.dims.nbDims;
}

int32_t rankOf(nvinfer1::PluginTensorDesc const& desc)
{
    return desc.dims.nbDims;
}

//! What a launcher status means.
char const* statusText(int32_t status)
{
    switch (status)
    {
    case DEPLOYKIT_INVALID_SHAPE: return "DEPLOYKIT_INVALID_SHAPE, the shapes make no convolution";
    case DEPLOYKIT_UNSUPPORTED_TYPE: return "DEPLOYKIT_UNSUPPORTED_TYPE, the element type is neither FP32 nor FP16";
    case DEPLOYKIT_MISSING_INPUT: return "DEPLOYKIT_MISSING_INPUT, a required tensor pointer is null";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "an unknown deploykit status";
    }
}

} // namespace

nvinfer1::PluginFieldCollection const* FieldCollection::set(OpContract const& contract, FieldValues const* values)
{
    mFields.clear();
    for (int32_t i = 0; i < contract.nbFields; ++i)
    {
        void const* data = values != nullptr ? values->at(i).data() : nullptr;
        mFields.emplace_back(contract.fieldNames[i], data, PluginFieldType::kINT32, contract.fieldLengths[i]);
    }
    mCollection = nvinfer1::PluginFieldCollection{static_cast<int32_t>(mFields.size()), mFields.data()};
    return &mCollection;
}

void logMessage(nvinfer1::ILogger::Severity severity, char const* message) noexcept
{
    if (nvinfer1::ILogger* logger = ::getLogger())
    {
        logger->log(severity, message);
    }
    else
    {
        std::fprintf(stderr, "%s\n", message);
    }
}

void logError(OpContract const& op, char const* layer, char const* callback, char const* message) noexcept
{
    try
    {
        std::string const text = std::string(kPLUGIN_NAMESPACE) + "::" + op.name + " '" + layer + "' " + callback
            + ": " + message;
        logMessage(nvinfer1::ILogger::Severity::kERROR, text.c_str());
    }
    catch (...)
    {
        logMessage(nvinfer1::ILogger::Severity::kERROR, message);
    }
}

DeploykitDataType toDeploykitType(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return DEPLOYKIT_FLOAT32;
    case DataType::kHALF: return DEPLOYKIT_FLOAT16;
    default:
        throw std::invalid_argument(
            "tensors of DataType " + std::to_string(static_cast<int32_t>(type)) + " are not supported (FP32, FP16)");
    }
}

std::string dimsText(nvinfer1::Dims const& dims)
{
    return intsText(dims.d, static_cast<size_t>(dims.nbDims));
}

void requireDims(char const* input, nvinfer1::Dims const& dims, std::initializer_list<int64_t> expected)
{
    bool same = dims.nbDims == static_cast<int32_t>(expected.size());
    for (size_t i = 0; same && i < expected.size(); ++i)
    {
        same = dims.d[i] == expected.begin()[i];
    }
    if (!same)
    {
        throw std::invalid_argument(std::string("input ") + input + " is " + dimsText(dims) + ", expected "
            + intsText(expected.begin(), expected.size()));
    }
}

// --- ConvPluginBase ------------------------------------------------------------------------------------------------

ConvPluginBase::ConvPluginBase(
    OpContract const& contract, std::string name, nvinfer1::PluginFieldCollection const& fields)
    : mContract(&contract)
    , mName(std::move(name))
    , mFields(parseFields(contract, fields))
{
    requireFieldAtLeast(kSTRIDES, 1);
    requireFieldAtLeast(kPADS, 0);
    requireFieldAtLeast(kDILATIONS, 1);
    requireFieldAtLeast(kGROUP, 1);
}

nvinfer1::IPluginCapability* ConvPluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

char const* ConvPluginBase::getPluginName() const noexcept
{
    return mContract->name;
}

char const* ConvPluginBase::getPluginVersion() const noexcept
{
    return mContract->version;
}

char const* ConvPluginBase::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t ConvPluginBase::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    return guard("configurePlugin", kFAILURE, [&] {
        checkArity(in, nbInputs, nbOutputs);
        return kSUCCESS;
    });
}

int32_t ConvPluginBase::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guard("getOutputDataTypes", kFAILURE, [&] {
        checkCounts(*mContract, nbInputs, nbOutputs);
        outputTypes[0] = inputTypes[kX_INPUT];
        return kSUCCESS;
    });
}

int32_t ConvPluginBase::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    return guard("getOutputShapes", kFAILURE, [&] {
        checkArity(inputs, nbInputs, nbOutputs);
        nvinfer1::DimsExprs const& x = inputs[kX_INPUT];
        nvinfer1::DimsExprs const& w = inputs[kW_INPUT];
        int32_t const m = w.nbDims - 4; // W's last four dims: [M, C/group, kH, kW]
        std::vector<int32_t> const& pads = mFields[kPADS];
        std::vector<int32_t> const& strides = mFields[kSTRIDES];
        std::vector<int32_t> const& dilations = mFields[kDILATIONS];
        nvinfer1::DimsExprs& y = outputs[0];
        y.nbDims = 4;
        y.d[0] = x.d[0];
        y.d[1] = w.d[m];
        y.d[2] = outputExtent(exprBuilder, *x.d[2], *w.d[m + 2], pads[0] + pads[2], strides[0], dilations[0]);
        y.d[3] = outputExtent(exprBuilder, *x.d[3], *w.d[m + 3], pads[1] + pads[3], strides[1], dilations[1]);
        return kSUCCESS;
    });
}

bool ConvPluginBase::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
    int32_t /* nbInputs */, int32_t /* nbOutputs */) noexcept
{
    // One type for every tensor, X's: positions before `pos` are already decided, so X's type is known here.
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    bool const floating = desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    return desc.format == nvinfer1::TensorFormat::kLINEAR && floating && desc.type == inOut[kX_INPUT].desc.type;
}

int32_t ConvPluginBase::getNbOutputs() const noexcept
{
    return 1;
}

int32_t ConvPluginBase::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    // The runtime dims are known here, before enqueue: the last chance to refuse what the kernels would misread.
    return guard("onShapeChange", kFAILURE, [&] {
        checkArity(in, nbInputs, nbOutputs);
        nvinfer1::Dims const& x = in[kX_INPUT].dims;
        nvinfer1::Dims const& w = in[kW_INPUT].dims;
        DeploykitConv2dShape const conv = convShape(x, w);
        if (deploykitConv2dCheckShape(&conv) != DEPLOYKIT_SUCCESS)
        {
            throw std::invalid_argument(std::string("inputs X ") + dimsText(x) + " and W " + dimsText(w)
                + " make no convolution with these fields (empty output, or group not dividing C and M)");
        }
        if (w.d[w.nbDims - 3] * conv.group != conv.channels)
        {
            throw std::invalid_argument(std::string("input W is ") + dimsText(w) + ": X's "
                + std::to_string(conv.channels) + " channels in " + std::to_string(conv.group)
                + " group(s) need a C/group dim of " + std::to_string(conv.channels / conv.group));
        }
        checkOtherInputs(in, conv);
        return kSUCCESS;
    });
}

nvinfer1::IPluginV3* ConvPluginBase::attachToContext(nvinfer1::IPluginResourceContext* /* context */) noexcept
{
    return clone(); // no per-context resources
}

nvinfer1::PluginFieldCollection const* ConvPluginBase::getFieldsToSerialize() noexcept
{
    return guard<nvinfer1::PluginFieldCollection const*>(
        "getFieldsToSerialize", nullptr, [this] { return mSerialized.set(*mContract, &mFields); });
}

int32_t ConvPluginBase::scalarField(int32_t field) const
{
    return mFields.at(field).at(0);
}

void ConvPluginBase::requireFieldAtLeast(int32_t field, int32_t minimum) const
{
    for (int32_t value : mFields.at(field))
    {
        if (value < minimum)
        {
            throw std::invalid_argument(std::string("field ") + mContract->fieldNames[field] + " must be at least "
                + std::to_string(minimum) + ", got " + intsText(mFields[field]));
        }
    }
}

DeploykitConv2dShape ConvPluginBase::convShape(nvinfer1::Dims const& x, nvinfer1::Dims const& w) const
{
    int32_t const m = w.nbDims - 4; // W's last four dims: [M, C/group, kH, kW]
    DeploykitConv2dShape shape{};
    shape.batch = x.d[0];
    shape.channels = x.d[1];
    shape.height = x.d[2];
    shape.width = x.d[3];
    shape.outChannels = w.d[m];
    shape.kernelH = w.d[m + 2];
    shape.kernelW = w.d[m + 3];
    for (int32_t i = 0; i < 2; ++i)
    {
        shape.strides[i] = mFields[kSTRIDES][i];
        shape.dilations[i] = mFields[kDILATIONS][i];
    }
    for (int32_t i = 0; i < 4; ++i)
    {
        shape.pads[i] = mFields[kPADS][i];
    }
    shape.group = scalarField(kGROUP);
    return shape;
}

int32_t ConvPluginBase::launchResult(int32_t status) const noexcept
{
    if (status == DEPLOYKIT_SUCCESS)
    {
        return kSUCCESS;
    }
    char text[256];
    std::snprintf(text, sizeof(text), "the CUDA launcher failed with status %d (%s)", status, statusText(status));
    logError(*mContract, mName.c_str(), "enqueue", text);
    return status;
}

template <typename Desc>
void ConvPluginBase::checkArity(Desc const* inputs, int32_t nbInputs, int32_t nbOutputs) const
{
    checkCounts(*mContract, nbInputs, nbOutputs);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (rankOf(inputs[i]) != mContract->inputRanks[i])
        {
            throw std::invalid_argument(std::string("input ") + mContract->inputNames[i] + " has rank "
                + std::to_string(rankOf(inputs[i])) + ", expected " + std::to_string(mContract->inputRanks[i]));
        }
    }
}

// --- ConvPluginCreatorBase -----------------------------------------------------------------------------------------

ConvPluginCreatorBase::ConvPluginCreatorBase(OpContract const& contract)
    : mContract(contract)
    , mFieldNameList(mFieldNames.set(contract, nullptr))
{
}

nvinfer1::IPluginV3* ConvPluginCreatorBase::createPlugin(
    char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /* phase */) noexcept
{
    char const* layer = name != nullptr ? name : "";
    return guard<nvinfer1::IPluginV3*>(mContract, layer, "createPlugin", nullptr, [&] {
        if (fc == nullptr)
        {
            throw std::invalid_argument("no PluginFieldCollection");
        }
        return create(layer, *fc).release();
    });
}

nvinfer1::PluginFieldCollection const* ConvPluginCreatorBase::getFieldNames() noexcept
{
    return mFieldNameList;
}

char const* ConvPluginCreatorBase::getPluginName() const noexcept
{
    return mContract.name;
}

char const* ConvPluginCreatorBase::getPluginVersion() const noexcept
{
    return mContract.version;
}

char const* ConvPluginCreatorBase::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

void registerCreator(ConvPluginCreatorBase& creator) noexcept
{
    nvinfer1::IPluginRegistry* registry = ::getPluginRegistry();
    bool const registered = registry != nullptr && registry->registerCreator(creator, kPLUGIN_NAMESPACE);
    char text[256];
    std::snprintf(text, sizeof(text),
        registered ? "registered the TensorRT plugin %s::%s version %s"
                   : "could not register the TensorRT plugin %s::%s version %s: is the library loaded twice?",
        kPLUGIN_NAMESPACE, creator.contract().name, creator.contract().version);
    logMessage(registered ? nvinfer1::ILogger::Severity::kVERBOSE : nvinfer1::ILogger::Severity::kERROR, text);
}

} // namespace deploykit::plugin
