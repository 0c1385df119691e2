"""The custom-op mechanism, proven with a tiny op: one `deploykit::` node, a standard-op body, any runtime.

`ScaleShift(X, S, alpha) = X * S + alpha` is exported from a torch custom op; the test checks the node and its
TensorRT attributes survive export and the graph passes, that onnxruntime and onnx.reference run the file by
inlining the body at several batch sizes, that shape inference sees through the node, and that the export leaves
no ONNX schema registered behind it.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnxscript import opset20 as op
from onnxscript import script

from deploykit.errors import DeployError
from deploykit.export.custom_op import DEPLOYKIT_OPSET, DOMAIN, PLUGIN_NAMESPACE, CustomOp
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import check_custom_nodes, run_passes
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range


@torch.library.custom_op("deploykit_test::scale_shift", mutates_args=())
def scale_shift(X: torch.Tensor, S: torch.Tensor, alpha: float) -> torch.Tensor:
    return X * S + alpha


@scale_shift.register_fake
def _(X, S, alpha):
    return torch.empty_like(X)


@script(DEPLOYKIT_OPSET, default_opset=op)
def ScaleShift(X, S, alpha: float):
    return op.Add(op.Mul(X, S), op.CastLike(op.Constant(value_float=alpha), X))


SCALE_SHIFT = CustomOp.from_script(torch.ops.deploykit_test.scale_shift.default, ScaleShift)


class TinyNet(torch.nn.Module):
    """conv -> ScaleShift -> relu: the custom node sits between standard ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(scale_shift(self.conv(x), self.scale, 0.25))


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    net = TinyNet().eval()
    model = onnx_from_model(net, torch.randn(2, 3, 7, 9), custom_ops=[SCALE_SHIFT])
    return net, model


def test_op_exports_as_one_custom_node_with_plugin_attributes(exported):
    _, model = exported
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in custom] == ["ScaleShift"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attributes == {"alpha": pytest.approx(0.25), "plugin_namespace": PLUGIN_NAMESPACE.encode(),
                          "plugin_version": b"1"}
    assert (DOMAIN, 1) in {(o.domain, o.version) for o in model.opset_import}


def test_function_body_uses_standard_ops_at_the_model_opset(exported):
    _, model = exported
    [function] = model.functions
    assert (function.domain, function.name) == (DOMAIN, "ScaleShift")
    assert all(node.domain == "" for node in function.node)
    model_opset = next(o.version for o in model.opset_import if o.domain == "")
    assert {(o.domain, o.version) for o in function.opset_import} == {("", model_opset)}


def test_export_leaves_no_schema_registered(exported):
    assert not onnx.defs.has("ScaleShift", DOMAIN)


def test_node_survives_passes_and_shapes_are_inferred(exported):
    _, model = exported
    model, _ = run_passes(model)
    [node] = [n for n in model.graph.node if n.domain == DOMAIN]
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in model.graph.value_info}
    assert shapes[node.output[0]] == ["batch", 4, 7, 9]


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnx.reference"])
def test_runtimes_inline_the_body_at_any_batch(exported, runtime):
    net, model = exported
    model, _ = run_passes(model)
    if runtime == "onnxruntime":
        run = session_from_onnx(model, ["cpu"]).run
    else:
        run = ReferenceEvaluator(model).run
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 7, 9)
        with torch.no_grad():
            expected = net(x).numpy()
        assert rel_to_range(run(None, {"input": x.numpy()})[0], expected) <= 1e-5


def test_custom_node_without_body_is_rejected(exported):
    _, model = exported
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.functions[:]
    with pytest.raises(DeployError, match="without a function body"):
        check_custom_nodes(bare)
