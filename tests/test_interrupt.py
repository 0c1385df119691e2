"""Interruption and concurrency: Ctrl-C / SIGTERM at any stage leave nothing behind; two runs writing the same
output directory end with one complete, consistent set of artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from polygraphy.comparator import RunResults
from torch import nn

from deploykit import artifacts, fileio
from deploykit.errors import DeployError

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {"model.onnx", "inputs.json", "torch_outputs.json", "report.json"}


def tree(root: Path) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(directory, name), root) for name in dirs + files]
    return sorted(found)


def as_foreground_job() -> None:
    """Run in the child before exec: Ctrl-C's default action, as an interactive shell gives a foreground job. A test
    run started in the background of a script (``pytest &``) ignores SIGINT, and a child inherits an ignored signal:
    the export would then never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent(out: Path) -> dict:
    """Exactly the artifacts, nothing hidden, and the report's checksums are those of the files present."""
    assert set(os.listdir(out)) == ARTIFACTS, os.listdir(out)
    report = json.loads((out / "report.json").read_text())
    for name in ARTIFACTS - {"report.json"}:
        assert report["artifacts"][name]["sha256"] == sha256(out / name), f"{name} is from another run"
        assert report["artifacts"][name]["bytes"] == (out / name).stat().st_size
    return report


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A trusted-pickle module of standard layers: its export in a fresh process still takes a few seconds (the
    exporter's first use), long enough to be interrupted in the middle of it."""
    torch.manual_seed(0)
    layers = [m for i in range(4) for m in (nn.Conv2d(8 if i else 3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    torch.save(nn.Sequential(*layers).eval(), path)
    return path


@pytest.mark.parametrize("signum, status, message", [(signal.SIGINT, 130, "interrupted: no artifacts were written"),
                                                     (signal.SIGTERM, 143, "terminated: no artifacts were written")])
def test_signal_during_the_export_leaves_nothing(tmp_path, small_checkpoint, signum, status, message):
    before = tree(tmp_path)  # the default output directory, deploykit-out/<class>, would appear here
    process = subprocess.Popen([sys.executable, str(REPO / "export.py"), "--model", str(small_checkpoint),
                                "--trust-pickle", "--input-shape", "1x3x16x16"], cwd=tmp_path, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, preexec_fn=as_foreground_job)
    lines = []
    try:
        for line in process.stderr:  # wait until the export stage has started
            lines.append(line.rstrip("\n"))
            if line.startswith("Exporting ONNX"):
                process.send_signal(signum)
                break
        rest = process.stderr.read().splitlines()
        assert process.wait(timeout=120) == status, "\n".join(lines + rest)
    finally:
        if process.poll() is None:
            process.kill()
    assert lines and lines[-1].startswith("Exporting ONNX"), lines
    assert rest == [message], rest  # one line, no traceback
    assert tree(tmp_path) == before  # no deploykit-out/, no partial file, no staging directory


def tiny_onnx(tag: str) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], tag,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, doc_string=tag * 1000)
    return model


def write(out: Path, tag: str, engine: bytes | None = None) -> dict:
    feeds = [{"input": np.full((1, 3), len(tag), np.float32)}]
    report = {"run": tag}
    artifacts.write_artifacts(out, tiny_onnx(tag), feeds, RunResults(), report, engine)
    return report


def test_concurrent_writers_never_mix_their_files(tmp_path, monkeypatch):
    """Two writers into one directory at once, each slowed down between its files: without the lock they
    interleave (one run's model.onnx beside the other's report.json; checked: this test fails with the lock off)."""
    def slow(obj, path, *args, **kwargs):  # (polygraphy's own save_json is not thread-safe on first use)
        time.sleep(0.2)
        Path(path).write_text(json.dumps([{k: v.tolist() for k, v in feed.items()} for feed in obj]))

    real_replace = os.replace

    def slow_replace(src, dst):
        time.sleep(0.05)
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts, "save_json", slow)
    monkeypatch.setattr(os, "replace", slow_replace)
    out = tmp_path / "a" / "out"  # neither the directory nor its parent exists yet: both runs create them
    errors = []

    def run(tag):
        try:
            write(out, tag)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    for round_ in range(3):
        threads = [threading.Thread(target=run, args=(f"run{round_}{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        report = assert_consistent(out)
        model = onnx.load(out / "model.onnx")
        assert model.graph.name == report["run"]


def test_a_second_writer_gives_up_with_one_sentence(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(fileio, "LOCK_WAIT_S", 0.3)
    with fileio.output_directory(out):  # another run holds the lock
        with pytest.raises(DeployError, match=r"Another deploykit run has been writing to .* for over 0 s; wait"):
            write(out, "second")
    assert os.listdir(out) == []  # the lock file goes with its holder; the refused run left nothing


def test_interrupted_commit_keeps_the_previous_set(tmp_path, monkeypatch):
    """Ctrl-C while the files are being renamed into place: the previous run's complete set stays."""
    out = tmp_path / "out"
    first = write(out, "first", engine=b"plan")  # with a model.plan, which a run without an engine removes
    assert set(os.listdir(out)) == ARTIFACTS | {"model.plan"}
    before = {name: sha256(out / name) for name in os.listdir(out)}
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(out, "second")
    monkeypatch.undo()
    assert {name: sha256(out / name) for name in os.listdir(out)} == before
    assert json.loads((out / "report.json").read_text())["run"] == first["run"]
    write(out, "third")  # and a run without an engine replaces the whole set, the old plan included
    assert assert_consistent(out)["run"] == "third"


def test_failed_write_removes_the_directory_it_created(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts.onnx, "save_model", lambda model, path: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "new" / "out", "x")
    assert tree(tmp_path) == []


@pytest.mark.slow  # ~15 s; test_concurrent_writers_never_mix_their_files checks the same lock in-process
def test_two_export_py_runs_into_one_directory(tmp_path):
    """The real thing: two export.py processes with the same --output-dir, started together."""
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), tmp_path / "a.pt")
    torch.save(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh()), tmp_path / "b.pt")
    out = tmp_path / "out"
    processes = [subprocess.Popen([sys.executable, str(REPO / "export.py"), "--model", str(tmp_path / f"{name}.pt"),
                                   "--trust-pickle", "--input-shape", "1x3x8x8", "-o", str(out)], cwd=tmp_path,
                                  stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
                 for name in ("a", "b")]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    report = assert_consistent(out)
    assert report["config"]["model"] in (str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
