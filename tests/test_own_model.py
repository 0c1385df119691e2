"""Users' own models: several inputs and outputs (tuples, lists, dicts, nested), `--arch file.py:factory`, pickles
whose class cannot be imported, default names, and the checks that keep a dynamic batch honest."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import DivergesWhenExported, assert_one_sentence
from deploykit import DeployError, ExportConfig, export_model
from deploykit.runtime.predictor import Predictor
from deploykit.serving import parse_config
from deploykit.signature import fill_template, flatten_outputs, output_template

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {"model.onnx", "inputs.json", "torch_outputs.json", "report.json"}


class ImageAndMeta(nn.Module):
    """Two inputs (an image and a vector), a dict output holding a list: the structures a detector or a
    classifier-plus-embedding returns."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2))
        self.side = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, image, meta):
        features = self.backbone(image)
        pooled = features.mean((2, 3)) + self.side(meta)
        return {"features": [features, pooled], "logits": self.head(pooled)}


class TupleOut(nn.Module):
    """One input, a tuple (class scores, embedding) out."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 5)

    def forward(self, x):
        embedding = self.body(x)
        return self.classifier(embedding), embedding


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


@pytest.fixture(scope="module")
def multi_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "out"
    result = export_model(ExportConfig(model=seeded(ImageAndMeta()), input_shape=[(2, 3, 12, 12), (2, 5)],
                                       output_dir=out, triton_repo=out.parent / "triton"))
    return result


def test_several_inputs_and_nested_outputs_are_named_and_verified(multi_export):
    report = multi_export.report
    assert multi_export.verdict == "passed"
    assert report["export"]["inputs"] == ["image", "meta"]
    assert report["export"]["outputs"] == ["features_0", "features_1", "logits"]
    graph = onnx.load(multi_export.files["model.onnx"]).graph
    assert [i.name for i in graph.input] == ["image", "meta"]
    assert [o.name for o in graph.output] == ["features_0", "features_1", "logits"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.input)
    # Every output of every sample was judged: 3 outputs x (2 + 3 samples).
    samples = report["verification"]["samples"]
    assert {s["output"] for s in samples} == {"features_0", "features_1", "logits"} and len(samples) == 15
    assert report["model"]["name"] == "ImageAndMeta"


def test_replay_covers_every_output(multi_export):
    command = multi_export.report["reproduce"]
    for name in ("features_0:", "features_1:", "logits:"):
        assert name in command
    replay = subprocess.run(shlex.split(command), cwd=multi_export.output_dir, capture_output=True, text=True,
                            timeout=600)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-2000:]


def test_predictor_returns_the_models_structure(multi_export):
    model = seeded(ImageAndMeta())
    generator = torch.Generator().manual_seed(3)
    image, meta = torch.randn(3, 3, 12, 12, generator=generator), torch.randn(3, 5, generator=generator)
    with torch.no_grad():
        expected = model(image, meta)
    got = Predictor(multi_export.output_dir)(image.numpy(), meta.numpy())
    assert set(got) == {"features", "logits"} and isinstance(got["features"], list) and len(got["features"]) == 2
    for actual, wanted in [(got["features"][0], expected["features"][0]), (got["features"][1], expected["features"][1]),
                           (got["logits"], expected["logits"])]:
        assert np.abs(actual - wanted.numpy()).max() <= 1e-4 * np.abs(wanted.numpy()).max()


def test_triton_config_lists_every_input_and_output(multi_export):
    config_file = Path(multi_export.report["triton"]["repository"]) / "ImageAndMeta" / "config.pbtxt"
    config = parse_config(config_file.read_text())
    assert [i.name for i in config.input] == ["image", "meta"]
    assert [list(i.dims) for i in config.input] == [[3, 12, 12], [5]]
    assert [o.name for o in config.output] == ["features_0", "features_1", "logits"]


def test_structure_round_trip_without_torch():
    value = (torch.ones(1), {"a": [torch.zeros(1), torch.ones(2)], "b/c": torch.ones(3)})
    names = [n for n, _ in flatten_outputs(value)]
    assert names == ["output_0", "output_1_a_0", "output_1_a_1", "output_1_b_c"]
    template = json.loads(json.dumps(output_template(value, names)))  # what the report keeps
    filled = fill_template(template, {n: n.upper() for n in names})
    assert filled == ("OUTPUT_0", {"a": ["OUTPUT_1_A_0", "OUTPUT_1_A_1"], "b/c": "OUTPUT_1_B_C"})


def test_a_failing_output_is_named_and_traced(tmp_path, caplog):
    model = seeded(TupleOut())
    model.classifier = DivergesWhenExported(model.classifier)
    result = export_model(ExportConfig(model=model, input_shape=(1, 3, 10, 10), output_names=["scores", "embedding"],
                                       output_dir=tmp_path / "out"))
    assert result.verdict == "failed"
    failed = {s["output"] for s in result.report["verification"]["samples"] if s["status"] == "failed"}
    assert failed == {"scores"}
    divergence = result.report["verification"]["first_divergence"]
    assert divergence["module"] == "classifier" and divergence["output"] == "scores"
    assert "tracing model output 'scores'" in divergence["summary"]


def test_output_names_must_match_the_outputs(tmp_path):
    with pytest.raises(DeployError) as err:
        export_model(ExportConfig(model=seeded(TupleOut()), input_shape=(1, 3, 10, 10), output_names=["only"],
                                  output_dir=tmp_path / "out"))
    assert_one_sentence(err.value, "gives 1 name(s)", "returns 2 tensor(s) (output_0, output_1)")
    assert not (tmp_path / "out").exists()


class SpecialisesTheBatch(nn.Module):
    """Turns the batch into a Python number, as mmcv's deformable convs do with their output size."""

    def forward(self, x):
        batch = int(x.shape[0])
        return x.reshape(batch, -1).mean(1, keepdim=True) + torch.zeros(batch, 1)


class BatchIntoGroups(nn.Module):
    """Per-sample kernels through conv groups = batch, as the official CondConv/DY-CNN/ODConv forwards do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        batch, channels, height, width = x.shape
        kernels = (self.weight[None] * x.mean((1, 2, 3))[:, None, None, None, None]).reshape(batch * 4, 3, 3, 3)
        y = nn.functional.conv2d(x.reshape(1, batch * channels, height, width), kernels, groups=batch)
        return y.reshape(batch, 4, *y.shape[2:])


def test_a_batch_fixed_by_the_exporter_is_an_error_naming_the_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 3), SpecialisesTheBatch()).eval()
    with pytest.raises(DeployError) as err:
        export_model(ExportConfig(model=model, input_shape=(1, 3, 8, 8), output_dir=tmp_path / "out"))
    assert_one_sentence(err.value, "fixed the batch of input 'input' at 2", "1 (SpecialisesTheBatch)",
                        "--static-batch")
    assert not (tmp_path / "out").exists()


def test_batch_in_groups_says_what_to_do(tmp_path):
    with pytest.raises(DeployError) as err:
        export_model(ExportConfig(model=BatchIntoGroups().eval(), input_shape=(1, 3, 8, 8),
                                  output_dir=tmp_path / "out"))
    assert_one_sentence(err.value, "groups", "--static-batch", "--arch")


class GridInForward(nn.Module):
    """Creates a tensor with the default dtype inside forward (ACmix's positional-encoding grid does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        grid = torch.linspace(-1, 1, x.shape[-1])
        return self.conv(x) * grid


def test_float64_reference_runs_with_float64_as_the_default_dtype(tmp_path):
    result = export_model(ExportConfig(model=seeded(GridInForward()), input_shape=(1, 3, 8, 8),
                                       output_dir=tmp_path / "out"))
    assert result.verdict == "passed"
    assert result.report["verification"]["reference"] == "float64"
    assert torch.get_default_dtype() == torch.float32


# --- the CLI: --arch file.py:factory, several --input-shape, .npz per input, names ---------------------------------

NET_PY = """
    import torch
    from torch import nn


    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(2, 4)

        def forward(self, image, extra):
            pooled = self.conv(image).mean((2, 3))
            return pooled + self.fc(extra), pooled


    def build_two_heads():
        return TwoHeads()
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "export.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user")
    (folder / "net.py").write_text(textwrap.dedent(NET_PY))
    sys.path.insert(0, str(folder))
    try:
        import net  # the user's module, to make their checkpoints
        model = seeded(net.build_two_heads())
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("net", None)
    torch.save(model.state_dict(), folder / "weights.pth")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "weights.safetensors")
    generator = np.random.default_rng(0)
    np.savez(folder / "inputs.npz", image=generator.standard_normal((2, 3, 8, 8)).astype(np.float32),
             extra=generator.standard_normal((2, 2)).astype(np.float32))
    return folder


@pytest.mark.parametrize("weights", ["weights.pth", "weights.safetensors"])
def test_arch_factory_loads_a_state_dict_into_the_users_model(user_code, tmp_path, weights):
    done = run("--arch", str(user_code / "net.py") + ":build_two_heads", "--model", str(user_code / weights),
               "--input-shape", "1x3x8x8", "--input-shape", "1x2", "--output-names", "scores,embedding",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "deploykit-out" / "build_two_heads"  # named after the factory
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["inputs"] == ["image", "extra"] and report["export"]["outputs"] == ["scores", "embedding"]
    assert report["model"]["factory"].endswith("net.py:build_two_heads")


def test_npz_gives_one_array_per_input(user_code, tmp_path):
    done = run("--arch", str(user_code / "net.py") + ":build_two_heads", "--model", str(user_code / "weights.pth"),
               "--input-shape", "2x3x8x8", "--input-shape", "2x2", "--inputs", str(user_code / "inputs.npz"),
               "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "inputs.json").read_text())
    # As given, and once more with the first sample repeated: the dynamic batch is checked at a second size.
    assert len(saved) == 2 and all(sorted(feed) == ["extra", "image"] for feed in saved)


@pytest.mark.parametrize("arch, fragments", [
    ("missing.py:build", ["missing.py does not exist"]),
    ("net.py:nothing", ["has no 'nothing'", "build_two_heads"]),
    ("net.py:9x", ["not a Python name"]),
    ("broken.py:build", ["importing", "raised ZeroDivisionError"]),
    ("needs_package.py:build", ["module 'not_installed_anywhere' is not installed"]),
    ("no_such_package.sub:build", ["no module 'no_such_package'", "PYTHONPATH"]),
    ("factories.py:raises", ["calling raises() raised ValueError: bad size"]),
    ("factories.py:not_a_module", ["returned a dict, not an nn.Module"]),
])
def test_user_code_errors_are_reported_as_what_they_are(user_code, tmp_path, capsys, arch, fragments):
    from deploykit import cli

    (user_code / "broken.py").write_text("1 / 0\n")
    (user_code / "needs_package.py").write_text("import not_installed_anywhere\n")
    (user_code / "factories.py").write_text("def raises():\n    raise ValueError('bad size')\n\n\n"
                                            "def not_a_module():\n    return {}\n")
    location, name = arch.split(":")
    target = f"{user_code / location}:{name}" if location.endswith(".py") else arch
    out = tmp_path / "out"
    assert cli.main(["--arch", target, "--model", str(user_code / "weights.pth"), "--input-shape", "1x3x8x8",
                     "-o", str(out)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in message
    assert_one_sentence(message.removeprefix("error: "), *fragments)
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_the_factory(user_code, tmp_path, capsys):
    from deploykit import cli

    torch.save({"conv.weight": torch.randn(4, 3, 3, 3)}, tmp_path / "partial.pth")
    assert cli.main(["--arch", f"{user_code / 'net.py'}:build_two_heads", "--model", str(tmp_path / "partial.pth"),
                     "--input-shape", "1x3x8x8", "--input-shape", "1x2", "-o", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit build_two_heads()'s model" in message and "3 missing (conv.bias, fc.weight" in message


def test_a_pickled_model_whose_class_cannot_be_imported(user_code, tmp_path, capsys):
    """The class lives in the user's net.py; run from elsewhere without PYTHONPATH, unpickling cannot find it."""
    script = (f"import sys, torch; sys.path.insert(0, {str(user_code)!r}); import net; "
              f"torch.save(net.build_two_heads(), {str(tmp_path / 'whole.pt')!r})")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0
    done = run("--model", str(tmp_path / "whole.pt"), "--trust-pickle", "--input-shape", "1x3x8x8", cwd=tmp_path)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()[-1]
    assert_one_sentence(message.removeprefix("error: "), "class cannot be imported here", "module 'net' is missing",
                        "PYTHONPATH")
    assert not (tmp_path / "deploykit-out").exists()


def test_a_user_package_named_models_is_not_shadowed_by_the_zoo(tmp_path):
    """The official ODConv code is a package called `models`; the checkout's zoo folder has that name too."""
    package = tmp_path / "models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mine.py").write_text(textwrap.dedent("""
        from torch import nn


        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    """))
    done = run("--arch", "models.mine:build", "--input-shape", "1x3x8x8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "deploykit-out" / "build" / "model.onnx").is_file()


# --- detection: every level a neck consumes, dynamic batch and size -------------------------------------------------

class TinyDetector(nn.Module):
    """A two-level backbone and a head with a modulated deformable conv shared by both levels, returning per-level
    maps (box decoding and NMS stay outside the graph, as with any detector deployed through ONNX)."""

    def __init__(self) -> None:
        super().__init__()
        from deploykit.nn import ModulatedDeformConv2d

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.level3 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.level4 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = ModulatedDeformConv2d(8, 8, 3, padding=1)
        self.classes = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        p3 = self.level3(self.stem(x))
        p4 = self.level4(p3)
        return {"p3": self.classes(self.head(p3)), "p4": self.classes(self.head(p4))}


def test_a_detector_with_a_deformable_head_exports_every_level(tmp_path):
    model = seeded(TinyDetector())
    with torch.no_grad():  # offsets of about a pixel, so the deformable sampling is exercised, not a plain conv
        model.head.conv_offset.weight.mul_(0.1)
    result = export_model(ExportConfig(model=model, input_shape=(1, 3, 40, 40), dynamic_spatial=True,
                                       output_dir=tmp_path / "out"))
    assert result.verdict == "passed", result.report["verification"]["samples"]
    assert result.report["export"]["outputs"] == ["p3", "p4"]
    assert "deploykit::DeformConv2d" in result.report["export"]["custom_nodes"]
    graph = onnx.load(result.files["model.onnx"]).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    verified = result.report["export"]["dynamic_spatial"]["verified_shapes"]
    assert verified == [[1, 3, 40, 40], [2, 3, 72, 72]]


def test_out_indices_only_for_backbones(tmp_path):
    with pytest.raises(DeployError) as err:
        export_model(ExportConfig(model=seeded(TupleOut()), input_shape=(1, 3, 10, 10), out_indices=(0, 1),
                                  output_dir=tmp_path / "out"))
    assert_one_sentence(err.value, "dcn_resnet50", "TupleOut is not one")
    with pytest.raises(DeployError, match="distinct stages from 0 to 3"):
        ExportConfig(model="x.pt", out_indices=(1, 4))


@pytest.mark.slow
def test_mmdet_dcn_backbone_exports_the_levels_a_neck_consumes(tmp_path):
    """An mmdet detector checkpoint (backbone + neck + head keys): the DCN ResNet-50 backbone with out_indices
    0-3, dynamic batch and size, each level a named output."""
    from deploykit.models import random_model

    backbone = random_model("dcn_resnet50", input_shape=(3, 96, 96))
    state_dict = {f"backbone.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    state_dict["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 256, 1, 1)
    torch.save({"state_dict": state_dict, "meta": {"epoch": 12}}, tmp_path / "faster_rcnn_r50_dconv_c3-c5.pth")
    done = subprocess.run([sys.executable, str(REPO / "export.py"), "--model",
                           str(tmp_path / "faster_rcnn_r50_dconv_c3-c5.pth"), "--arch", "dcn_resnet50",
                           "--out-indices", "0,1,2,3", "--input-shape", "1x3x96x96", "--dynamic-spatial",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["export"]["outputs"] == ["c2", "c3", "c4", "c5"]
    assert {s["output"] for s in report["verification"]["samples"] if s["status"] == "passed"} == \
        {"c2", "c3", "c4", "c5"}


# --- official / third-party layers through the pipeline: converted, and checked against the user's own model -------

from test_convert import FAMILIES, family_input, family_model  # noqa: E402  (the stand-in user models)

import convert_standins as standins  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_official_layers_are_converted_and_verified_against_the_original(tmp_path, family):
    model = family_model(family, torch.float32)
    channels_height_width = FAMILIES[family][1]
    result = export_model(ExportConfig(model=model, input_shape=(1, *channels_height_width),
                                       output_dir=tmp_path / "out"))
    assert result.verdict == "passed", result.report["verification"]["samples"]
    conversion = result.report["conversion"]
    assert {swap["path"] for swap in conversion["swaps"]} == set(FAMILIES[family][2])
    assert conversion["reference"] == "original" and result.report["verification"]["reference"] == "float64"
    # One file, any batch: batch 3 (never verified by the run) against the user's own model in float64.
    x = family_input(family, 3)
    with torch.no_grad():
        expected = model.double()(x).numpy()
    got = Predictor(result.output_dir)(x.float().numpy())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_conversion_that_does_not_reproduce_the_layer_fails_and_names_it(tmp_path, monkeypatch):
    from deploykit import pipeline

    convert = pipeline.convert

    def off_by_one_percent(model):
        conversion = convert(model)
        with torch.no_grad():
            conversion.model.body[0].weight.mul_(1.01)
        return conversion

    monkeypatch.setattr(pipeline, "convert", off_by_one_percent)
    result = export_model(ExportConfig(model=family_model("odconv", torch.float32), input_shape=(1, 3, 9, 10),
                                       output_dir=tmp_path / "out"))
    assert result.verdict == "failed"
    assert result.report["verification"]["first_divergence"]["module"] == "body.0"


class UncompiledModulatedDeformConv2dPack(standins.ModulatedDeformConv2dPack):
    """mmcv's Python layer where mmcv's compiled ops are missing: it cannot run."""

    def forward(self, x):
        raise RuntimeError("mmcv._ext is not available (mmcv was installed without its compiled ops)")


UncompiledModulatedDeformConv2dPack.__name__ = "ModulatedDeformConv2dPack"


def test_a_model_that_cannot_run_here_is_checked_against_its_conversion(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), UncompiledModulatedDeformConv2dPack(4, 4, 3, padding=1))
    result = export_model(ExportConfig(model=seeded(model), input_shape=(1, 3, 9, 9), output_dir=tmp_path / "out"))
    assert result.verdict == "passed"
    conversion = result.report["conversion"]
    assert conversion["reference"] == "converted" and "mmcv._ext is not available" in conversion["reference_note"]
    assert [swap["path"] for swap in conversion["swaps"]] == ["1"]
