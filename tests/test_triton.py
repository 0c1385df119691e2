"""Triton model repositories: the layout Triton expects, configs that Triton's own schema (tritonclient's
model_config_pb2) parses and that describe the ONNX graph exactly, the README's commands and client snippet, and
all-or-nothing writes. No server runs here; the TensorRT part uses fake engine bytes and a fake plugin file."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import onnx
import pytest
from conftest import DivergesWhenExported, assert_one_sentence, export_tiny, tiny_conv_net
from tritonclient.grpc import model_config_pb2

from deploykit import ExportConfig, export_model
from deploykit.errors import DeployError
from deploykit.runtime.ort import session_from_onnx
from deploykit.serving import check_triton_target, parse_config, write_triton_repository

PROFILE = {"min": [1, 3, 16, 16], "opt": [2, 3, 16, 16], "max": [4, 3, 16, 16]}
ENGINE = b"not a real engine: layout only"


@pytest.fixture(scope="module")
def dynamic_model() -> onnx.ModelProto:
    return export_tiny(tiny_conv_net())


@pytest.fixture(scope="module")
def static_model() -> onnx.ModelProto:
    return export_tiny(tiny_conv_net(), batch=2, dynamic_batch=False)


@pytest.fixture(scope="module")
def spatial_model(dynamic_model) -> onnx.ModelProto:
    """The tiny net with symbolic height and width (its global pool takes any size)."""
    model = onnx.ModelProto()
    model.CopyFrom(dynamic_model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.value_info[:]  # inferred for 16x16
    return model


@pytest.fixture
def plugin(tmp_path):
    library = tmp_path / "build" / "libdeploykit_plugins.so"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF fake plugin library")
    return library


def files_under(root) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def config_of(repo, model: str) -> model_config_pb2.ModelConfig:
    return parse_config((repo / model / "config.pbtxt").read_text())


def graph_tensors(values) -> list[tuple[str, int, list[int]]]:
    """(name, ONNX elem type, dims with -1 for symbolic) of graph inputs or outputs."""
    return [(v.name, v.type.tensor_type.elem_type,
              [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]) for v in values]


def config_tensors(entries, batched: bool) -> list[tuple[str, int, list[int]]]:
    """The same triple from config entries (Triton type mapped back to ONNX, the batch dim put back)."""
    to_onnx = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_INT64": onnx.TensorProto.INT64}
    return [(e.name, to_onnx[model_config_pb2.DataType.Name(e.data_type)],
             ([-1] if batched else []) + list(e.dims)) for e in entries]


def images(batch: int, height: int = 16, width: int = 16, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def test_dynamic_batch_repository_describes_the_graph(tmp_path, dynamic_model):
    repo = write_triton_repository(tmp_path / "repo", "tiny", dynamic_model)
    assert files_under(repo) == {"README.md", "tiny", "tiny/config.pbtxt", "tiny/1", "tiny/1/model.onnx"}
    config = config_of(repo, "tiny")
    assert (config.name, config.platform, config.backend) == ("tiny", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 8
    assert config_tensors(config.input, True) == graph_tensors(dynamic_model.graph.input)
    assert config_tensors(config.output, True) == graph_tensors(dynamic_model.graph.output)
    assert list(config.input[0].dims) == [3, 16, 16] and list(config.output[0].dims) == [5]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert not config.parameters  # onnxruntime's own thread choice

    served = onnx.load(repo / "tiny" / "1" / "model.onnx")
    assert served == dynamic_model
    x = images(3)
    expected = session_from_onnx(dynamic_model, ["cpu"]).run(None, {"input": x})[0]
    assert np.array_equal(session_from_onnx(served, ["cpu"]).run(None, {"input": x})[0], expected)


def test_static_batch_gpu_instance_and_threads(tmp_path, static_model):
    repo = write_triton_repository(tmp_path / "repo", "tiny", static_model, instance_kind="gpu", threads=2)
    config = config_of(repo, "tiny")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert config_tensors(config.input, False) == graph_tensors(static_model.graph.input)
    assert list(config.input[0].dims) == [2, 3, 16, 16] and list(config.output[0].dims) == [2, 5]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert {key: value.string_value for key, value in config.parameters.items()} == \
        {"intra_op_thread_count": "2", "inter_op_thread_count": "1"}
    readme = (repo / "README.md").read_text()
    assert "docker run --rm --gpus=all " in readme and "--shape input:2,3,16,16 " in readme


def test_dynamic_batch_asked_of_a_static_model_is_refused(tmp_path, static_model):
    with pytest.raises(DeployError) as err:
        write_triton_repository(tmp_path / "repo", "tiny", static_model, dynamic_batch=True)
    assert_one_sentence(err.value, "cannot batch", "'input'")
    assert not (tmp_path / "repo").exists()


def test_symbolic_spatial_dims_become_minus_one(tmp_path, spatial_model):
    with pytest.raises(DeployError) as err:
        write_triton_repository(tmp_path / "repo", "tiny", spatial_model)
    assert_one_sentence(err.value, "example_shapes")
    repo = write_triton_repository(tmp_path / "repo", "tiny", spatial_model,
                                   example_shapes={"input": (1, 3, 20, 24)})
    assert list(config_of(repo, "tiny").input[0].dims) == [3, -1, -1]
    assert "--shape input:3,20,24 " in (repo / "README.md").read_text()
    session = session_from_onnx(onnx.load(repo / "tiny" / "1" / "model.onnx"), ["cpu"])
    for height, width in ((16, 16), (20, 24)):
        assert session.run(None, {"input": images(2, height, width)})[0].shape == (2, 5)


def test_readme_commands_and_client_snippet(tmp_path, dynamic_model, monkeypatch):
    """The README's Python snippet, run against a stand-in client that answers through onnxruntime, sends what
    the config declares and gets the model's answer."""
    import tritonclient.grpc as grpcclient

    repo = write_triton_repository(tmp_path / "repo", "tiny", dynamic_model)
    readme = (repo / "README.md").read_text()
    assert re.search(r"^docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v \"\$PWD\":/models "
                     r"nvcr\.io/nvidia/tritonserver:<yy\.mm>-py3 tritonserver --model-repository=/models$", readme,
                     re.MULTILINE)
    assert "curl -sf localhost:8000/v2/health/ready" in readme and "plugins" not in readme
    assert "perf_analyzer -m tiny --shape input:3,16,16 --concurrency-range 1:4" in readme

    config = config_of(repo, "tiny")
    session = session_from_onnx(onnx.load(repo / "tiny" / "1" / "model.onnx"), ["cpu"])
    answers = []

    class Result:
        def __init__(self, outputs: dict[str, np.ndarray]):
            self.outputs = outputs

        def as_numpy(self, name: str) -> np.ndarray:
            return self.outputs[name]

    class Client:
        def __init__(self, url: str):
            assert url == "localhost:8001"

        def infer(self, model_name: str, inputs):
            assert model_name == config.name
            declared = {e.name: model_config_pb2.DataType.Name(e.data_type) for e in config.input}
            assert {i.name(): "TYPE_" + i.datatype() for i in inputs} == declared
            feeds = {i.name(): namespace["feeds"][i.name()] for i in inputs}
            assert all(list(feeds[i.name()].shape) == i.shape() for i in inputs)
            answers.append((feeds, session.run(None, feeds)[0]))
            return Result({"output": answers[-1][1]})

    monkeypatch.setattr(grpcclient, "InferenceServerClient", Client)
    snippet = readme.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    (feeds, answer), = answers
    assert feeds["input"].std() > 0.5  # a real image-like request, not zeros
    assert np.array_equal(answer, session_from_onnx(dynamic_model, ["cpu"]).run(None, feeds)[0])


def test_tensorrt_model_with_plugin_library(tmp_path, dynamic_model, plugin):
    repo = write_triton_repository(tmp_path / "repo", "tiny", dynamic_model, engine=ENGINE, engine_profile=PROFILE,
                                   plugin_library=plugin)
    assert files_under(repo) == {"README.md", "tiny", "tiny/config.pbtxt", "tiny/1", "tiny/1/model.onnx",
                                 "tiny_trt", "tiny_trt/config.pbtxt", "tiny_trt/1", "tiny_trt/1/model.plan",
                                 "tiny_trt/libdeploykit_plugins.so"}
    assert (repo / "tiny_trt" / "1" / "model.plan").read_bytes() == ENGINE
    assert (repo / "tiny_trt" / "libdeploykit_plugins.so").read_bytes() == plugin.read_bytes()
    config = config_of(repo, "tiny_trt")
    assert (config.name, config.platform, config.backend) == ("tiny_trt", "tensorrt_plan", "tensorrt")
    assert config.max_batch_size == 4  # the profile's largest batch, not the ONNX model's 8
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config_tensors(config.input, True) == graph_tensors(dynamic_model.graph.input)
    assert config_tensors(config.output, True) == graph_tensors(dynamic_model.graph.output)
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    readme = (repo / "README.md").read_text()
    assert "--gpus=all" in readme
    assert "tritonserver --model-repository=/models --backend-config=tensorrt,plugins=/models/tiny_trt/" \
           "libdeploykit_plugins.so" in readme
    assert "-e LD_PRELOAD=/models/tiny_trt/libdeploykit_plugins.so" in readme
    assert "perf_analyzer -m tiny_trt " in readme


def test_profile_with_variable_sizes_gives_minus_one(tmp_path, spatial_model):
    profile = {"min": [1, 3, 16, 16], "opt": [2, 3, 32, 32], "max": [8, 3, 64, 64]}
    repo = write_triton_repository(tmp_path / "repo", "tiny", spatial_model, engine=ENGINE, engine_profile=profile,
                                   example_shapes={"input": (1, 3, 32, 32)})
    config = config_of(repo, "tiny_trt")
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [3, -1, -1]


def test_a_previous_export_is_replaced_whole_and_other_models_stay(tmp_path, dynamic_model, plugin):
    repo = tmp_path / "repo"
    write_triton_repository(repo, "tiny", dynamic_model, engine=ENGINE, engine_profile=PROFILE, plugin_library=plugin)
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('backend: "python"\n')
    write_triton_repository(repo, "tiny", dynamic_model, max_batch=16)
    assert config_of(repo, "tiny").max_batch_size == 16
    assert not (repo / "tiny_trt").exists()  # the previous export's engine would not match the new model
    assert (repo / "other" / "config.pbtxt").read_text() == 'backend: "python"\n'
    assert not [p for p in (*repo.iterdir(), *tmp_path.iterdir()) if p.name.startswith(".")]  # no staging left


def test_a_failed_write_leaves_the_repository_as_it_was(tmp_path, dynamic_model, plugin, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_space)  # the plugin copy is the last file staged
    fresh = tmp_path / "new" / "repo"
    with pytest.raises(DeployError) as err:
        write_triton_repository(fresh, "tiny", dynamic_model, engine=ENGINE, engine_profile=PROFILE,
                                plugin_library=plugin)
    assert_one_sentence(err.value, "No space left on device")
    assert not (tmp_path / "new").exists()  # not even the folders it created

    repo = tmp_path / "repo"
    monkeypatch.undo()
    write_triton_repository(repo, "tiny", dynamic_model, max_batch=2)
    before = {name: (repo / name).read_bytes() for name in files_under(repo) if (repo / name).is_file()}
    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(DeployError):
        write_triton_repository(repo, "tiny", dynamic_model, engine=ENGINE, engine_profile=PROFILE,
                                plugin_library=plugin)
    assert {name: (repo / name).read_bytes() for name in files_under(repo) if (repo / name).is_file()} == before


@pytest.mark.parametrize("which", ["old_out", "new_in"])
def test_a_failed_rename_puts_the_previous_export_back(tmp_path, dynamic_model, monkeypatch, which):
    repo = tmp_path / "repo"
    write_triton_repository(repo, "tiny", dynamic_model, max_batch=2)
    before = files_under(repo)
    real_replace = os.replace
    failures = []

    def fail_on_readme(source, destination):
        """One of the commit's last renames fails: the old README moved aside, or the new one moved in."""
        moving_aside = ".replaced" in str(destination)
        if not failures and os.path.basename(destination) == "README.md" and moving_aside == (which == "old_out"):
            failures.append(source)
            raise OSError(5, "Input/output error")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", fail_on_readme)
    with pytest.raises(DeployError):
        write_triton_repository(repo, "tiny", dynamic_model, max_batch=16)
    assert failures and files_under(repo) == before and config_of(repo, "tiny").max_batch_size == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "read_only"])
def test_unwritable_repository_is_refused_and_nothing_is_left(tmp_path, dynamic_model, where):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    repo = {"under_a_file": blocker / "repo", "is_a_file": blocker, "read_only": tmp_path / "ro" / "repo"}[where]
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders: the permission check cannot be shown")
        repo.parent.mkdir()
        repo.parent.chmod(0o500)
    before = files_under(tmp_path)
    with pytest.raises(DeployError) as err:
        write_triton_repository(repo, "tiny", dynamic_model)
    assert_one_sentence(err.value, str(repo))
    assert files_under(tmp_path) == before and blocker.read_text() == "a file, not a folder\n"


def test_foreign_readme_is_not_overwritten(tmp_path, dynamic_model):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# Our production models\n")
    with pytest.raises(DeployError) as err:
        write_triton_repository(repo, "tiny", dynamic_model)
    assert_one_sentence(err.value, "not written by deploykit")
    assert files_under(repo) == {"README.md"}


@pytest.mark.parametrize("folder", ["tiny", "tiny_trt"])
def test_a_model_folder_deploykit_did_not_write_is_never_replaced_or_removed(tmp_path, dynamic_model, folder):
    """A model of the same name (or its _trt twin, which an export without an engine would remove) that is someone
    else's is refused, and stays byte for byte."""
    repo = tmp_path / "repo"
    (repo / folder / "1").mkdir(parents=True)
    (repo / folder / "config.pbtxt").write_text('backend: "python"\n')
    (repo / folder / "1" / "model.py").write_text("# their model\n")
    before = {name: (repo / name).read_bytes() for name in files_under(repo) if (repo / name).is_file()}
    with pytest.raises(DeployError) as err:
        write_triton_repository(repo, "tiny", dynamic_model)
    assert_one_sentence(err.value, f"already holds {folder}, which deploykit did not write")
    assert {name: (repo / name).read_bytes() for name in files_under(repo) if (repo / name).is_file()} == before


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "../up"}, "cannot name a Triton model"),
    ({"max_batch": 0}, "max_batch_size"),
    ({"instance_kind": "tpu"}, "instance kind"),
    ({"threads": 0}, "thread count"),
    ({"engine": ENGINE}, "optimisation profile"),
    ({"engine": ENGINE, "engine_profile": {"min": [1, 3], "opt": [1, 3], "max": [4, 3]}}, "does not fit"),
    ({"engine": ENGINE, "engine_profile": PROFILE, "plugin_library": "/nonexistent/lib.so"}, "does not exist"),
    ({"example_shapes": {"image": (1, 3, 16, 16)}}, "image"),
])
def test_bad_arguments_are_refused_before_any_write(tmp_path, dynamic_model, kwargs, fragment):
    arguments = {"repo_dir": tmp_path / "repo", "name": "tiny", "onnx_model": dynamic_model, **kwargs}
    with pytest.raises(DeployError) as err:
        write_triton_repository(**arguments)
    assert_one_sentence(err.value, fragment)
    assert not (tmp_path / "repo").exists()


def test_preflight_check_creates_nothing(tmp_path):
    """What the pipeline runs before exporting: the same refusals as the write, without touching the disk."""
    check_triton_target(tmp_path / "new" / "repo", "tiny", max_batch=4, instance_kind="gpu", threads=2)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x\n")
    with pytest.raises(DeployError) as err:
        check_triton_target(tmp_path / "file" / "repo", "tiny")
    assert_one_sentence(err.value, "cannot be created", "is not a directory")
    with pytest.raises(DeployError) as err:
        check_triton_target(tmp_path, "tiny", instance_kind="tpu")
    assert_one_sentence(err.value, "'tpu'")


def test_parse_config_rejects_what_triton_would():
    with pytest.raises(DeployError) as err:
        parse_config('name: "x"\nmax_batch_size: "eight"\n')
    assert "not a valid Triton model configuration" in str(err.value)


# --- through the pipeline (export_model / export.py) ------------------------------------------------------------

def test_a_passed_export_writes_a_repository_whose_model_runs(tmp_path):
    repo = tmp_path / "models"
    result = export_model(ExportConfig(model=tiny_conv_net(), input_shape=(1, 3, 16, 16), output_dir=tmp_path / "out",
                                       triton_repo=repo, triton_name="tiny", max_batch=4))
    assert result.verdict == "passed" and result.report["triton"] == {
        "repository": str(repo), "name": "tiny", "written": True, "models": ["tiny"], "forced": False}
    config = config_of(repo, "tiny")
    assert config.max_batch_size == 4 and config.platform == "onnxruntime_onnx"
    served = onnx.load(repo / "tiny" / "1" / "model.onnx")
    x = images(3)
    expected = session_from_onnx(onnx.load(result.files["model.onnx"]), ["cpu"]).run(None, {"input": x})[0]
    assert np.array_equal(session_from_onnx(served, ["cpu"]).run(None, {"input": x})[0], expected)


@pytest.mark.parametrize("force", [False, True])
def test_a_failed_verification_writes_no_repository_unless_forced(tmp_path, force):
    repo = tmp_path / "models"
    diverging = DivergesWhenExported(tiny_conv_net()).eval()
    result = export_model(ExportConfig(model=diverging, input_shape=(1, 3, 16, 16),
                                       output_dir=tmp_path / "out", triton_repo=repo, force=force))
    assert result.verdict == "failed" and result.report["triton"]["written"] is force
    # Named after the class of the module given as is.
    assert (repo / "DivergesWhenExported" / "config.pbtxt").is_file() is force and repo.exists() is force


def test_triton_options_without_a_repository_are_refused():
    with pytest.raises(DeployError, match="--triton-repo"):
        ExportConfig(model="x.pt", triton_name="tiny")
