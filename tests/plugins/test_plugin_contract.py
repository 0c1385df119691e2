"""The TensorRT plugins' contract with the exported ONNX, checked on the CPU.

1. The plugin headers declare the op name, version, input order and field names; they equal the Python contract
   (`deploykit.ops.<op>`), and every exported ``deploykit::`` node carries exactly those inputs and attributes plus
   ``plugin_namespace="deploykit"`` / ``plugin_version``.
2. ``onnx.reference`` runs each exported model with the node executed the way the plugin's ``enqueue`` executes it:
   inputs taken by the plugin's input names in the plugin's order, fields read by the plugin's field names, the
   kernel's own code (host emulator) computing the result. The graph then matches the PyTorch layer, so a swapped
   input or a misnamed attribute between exporter and plugin would fail here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from kernel_cases import build_emulator
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from deploykit.export.custom_op import DOMAIN, PLUGIN_NAMESPACE
from deploykit.export.onnx import onnx_from_model
from deploykit.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d
from deploykit.nn.dyconv import DyConv2d
from deploykit.nn.odconv import ODConv2d
from deploykit.ops import deform_conv2d, dynamic_conv2d
from deploykit.runtime.kernels import PLUGINS_DIR
from deploykit.verify import rel_to_range

OPS = {"deform_conv2d": deform_conv2d.DEFORM_CONV2D, "dynamic_conv2d": dynamic_conv2d.DYNAMIC_CONV2D}


def plugin_contract(folder: str) -> dict:
    """The contract lines of plugins/<folder>/<op>Plugin.h."""
    header = next((PLUGINS_DIR / folder).glob("*Plugin.h")).read_text()

    def strings(name: str) -> list[str]:
        match = re.search(rf"constexpr char const\* {name}(?:\[\])?\{{([^}}]*)\}};", header)
        assert match, f"{name} is not declared in the plugin header"
        return re.findall(r'"([^"]*)"', match.group(1))

    return dict(name=strings("kPLUGIN_NAME")[0], version=strings("kPLUGIN_VERSION")[0],
                inputs=strings("kINPUT_NAMES"), fields=strings("kFIELD_NAMES"))


@pytest.mark.parametrize("folder", sorted(OPS))
def test_plugin_header_declares_the_python_contract(folder):
    op, contract = OPS[folder], plugin_contract(folder)
    assert contract["name"] == op.op_type and contract["version"] == op.plugin_version
    assert contract["inputs"] == list(op.inputs)
    assert contract["fields"] == list(op.attributes)
    assert op.plugin == folder


def _emulated_node(op, emulator):
    """An onnx.reference kernel for the node that behaves like the plugin: inputs by the plugin's names, fields by
    its field names, the kernel's code (host emulator) computing."""
    contract = plugin_contract(op.plugin)

    def run(self, *inputs, **attributes):
        named = dict(zip(contract["inputs"], (torch.from_numpy(np.array(x, order="C")) for x in inputs)))  # writable copies
        fields = {name: attributes[name] for name in contract["fields"]}
        if op.op_type == "DeformConv2d":
            y = emulator.deform_conv2d(named["X"], named["W"], named["offset"], named["B"], named["mask"],
                                       fields["strides"], fields["pads"], fields["dilations"], fields["group"],
                                       fields["offset_group"])
        else:
            y = emulator.dynamic_conv2d(named["X"], named["W"], named["A"], named["B"], named["S"], **fields)
        return (y.numpy(),)

    return type(op.op_type, (OpRun,), {"op_domain": DOMAIN, "_run": run})


LAYERS = {  # name: (layer, its input channels, the plugin folder of its custom op)
    "dcn_v2": (lambda: ModulatedDeformConv2d(6, 70, 3, stride=(1, 2), padding=1, dilation=2, groups=2,
                                             deform_groups=3), 6, "deform_conv2d"),
    "dcn_v1": (lambda: DeformConv2d(4, 8, 5, padding=2, deform_groups=2), 4, "deform_conv2d"),
    "odconv": (lambda: ODConv2d(8, 12, 3, stride=2, padding=1, kernel_num=4), 8, "dynamic_conv2d"),
    "dyconv_depthwise": (lambda: DyConv2d(8, 8, 3, padding=1, groups=8, K=4), 8, "dynamic_conv2d"),
}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("emulator"))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_exported_node_run_as_the_plugin_matches_pytorch(layer, emulator):
    make, in_channels, folder = LAYERS[layer]
    torch.manual_seed(7)
    module = make().eval()
    with torch.no_grad():  # non-trivial offsets and attention: the fresh layers start at zero offsets
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(3, in_channels, 11, 13)
    model = onnx_from_model(module, x, lowering="custom")
    op, contract = OPS[folder], plugin_contract(folder)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert nodes and all(n.op_type == contract["name"] for n in nodes)
    for node in nodes:
        attributes = {a.name: a for a in node.attribute}
        assert set(attributes) == set(contract["fields"]) | {"plugin_namespace", "plugin_version"}
        assert attributes["plugin_namespace"].s.decode() == PLUGIN_NAMESPACE
        assert attributes["plugin_version"].s.decode() == contract["version"]
        assert len(node.input) == len(contract["inputs"])
    evaluator = ReferenceEvaluator(model, new_ops=[_emulated_node(op, emulator)])
    with torch.no_grad():
        expected = module(x).numpy()
    assert rel_to_range(evaluator.run(None, {"input": x.numpy()})[0], expected) <= 1e-4
