"""Graph passes: generic constant folding touches only input-independent subgraphs; checks reject bad graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.errors import DeployError
from deploykit.export.passes import check, fold_constants, run_passes
from deploykit.runtime.ort import session_from_onnx


def weight_generating_model() -> onnx.ModelProto:
    """y = Relu(x * Exp(Sin(w))) + Exp(x): `Exp(Sin(w))` depends on no input, `Exp(x)` does."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8, 1, 1), "w")
    nodes = [
        helper.make_node("Sin", ["w"], ["sin_w"], name="gen_sin"),
        helper.make_node("Exp", ["sin_w"], ["weight"], name="gen_exp"),
        helper.make_node("Mul", ["x", "weight"], ["scaled"], name="mul"),
        helper.make_node("Relu", ["scaled"], ["relu"], name="relu"),
        helper.make_node("Exp", ["x"], ["exp_x"], name="exp_x"),
        helper.make_node("Add", ["relu", "exp_x"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 4, 5])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_fold_constants_folds_only_input_independent_nodes():
    model = weight_generating_model()
    folded = fold_constants(model)
    assert sorted(n.name for n in folded.graph.node) == ["add", "exp_x", "mul", "relu"]
    [weight] = folded.graph.initializer
    expected = np.exp(np.sin(np.linspace(-1, 1, 8))).reshape(1, 8, 1, 1)
    np.testing.assert_allclose(numpy_helper.to_array(weight), expected, rtol=1e-6)


def test_folded_and_unfolded_graphs_compute_the_same():
    model = weight_generating_model()
    folded, report = run_passes(model)
    assert report.folded_nodes == 2 and report.after.nodes == 4
    x = np.random.default_rng(0).standard_normal((3, 8, 4, 5)).astype(np.float32)
    before = session_from_onnx(model, ["cpu"]).run(None, {"x": x})[0]
    after = session_from_onnx(folded, ["cpu"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("batch", [3, "batch"])
def test_shape_ranges_fold_to_the_dims_they_name(batch):
    """y = x * Gather(Shape(x, start=2), 1) + Sum(Shape(x, start=2)): the width and height+width, whether the whole
    shape is static or only the sliced dims are (onnx-graphsurgeon 0.6.1 alone folds both wrongly)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["size"], name="size", start=2),
        helper.make_node("Gather", ["size", "one"], ["width"], name="width"),
        helper.make_node("ReduceSum", ["size"], ["extent"], name="extent"),
        helper.make_node("Add", ["width", "extent"], ["both"], name="both"),
        helper.make_node("Cast", ["both"], ["factor"], name="factor", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "factor"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 18, 12, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.int64(1), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    folded, _ = run_passes(model)
    assert [n.op_type for n in folded.graph.node] == ["Mul"]
    x = np.random.default_rng(0).standard_normal((3, 18, 12, 9)).astype(np.float32)
    np.testing.assert_allclose(session_from_onnx(folded, ["cpu"]).run(None, {"x": x})[0], x * (9 + 12 + 9), rtol=1e-6)


def test_check_rejects_an_invalid_model():
    model = weight_generating_model()
    model.graph.node[2].input[1] = "does_not_exist"
    with pytest.raises(DeployError, match="invalid"):
        check(model)
