"""Accuracy check of a deployed model against PyTorch, through Polygraphy's comparator.

The PyTorch outputs are a Polygraphy `RunResults` (runner "pytorch"), so the same comparison can be replayed
outside deploykit with ``polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs
torch_outputs.json --atol ... --rtol ...`` (`polygraphy_command` writes that line).

Tolerance: an element passes if ``|a - b| <= atol`` or ``|a - b| <= rtol * |b|`` (Polygraphy's elementwise
check, b = PyTorch). By default ``atol = rtol * max|b|`` per output, i.e. errors are measured relative to the
output's range, so a near-zero logit cannot fail on a harmless 1e-7 difference; `rel_to_range` in the report is
exactly that statistic (max |a - b| / max |b|).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, CompareFunc, RunResults

from deploykit.log import polygraphy_quiet

DEFAULT_RTOL = 1e-4
FP16_RTOL = 1e-2  # an FP16 engine's tolerance: half precision keeps ~3 significant digits
TORCH_RUNNER = "pytorch"
ONNXRT_RUNNER = "onnxruntime"
Feed = dict[str, np.ndarray]


@dataclass
class OutputCheck:
    """Errors of one output in one iteration (one input batch)."""

    name: str
    iteration: int
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float  # Polygraphy's elementwise |a-b| / |b|: large wherever b is near zero
    rel_to_range: float  # max |a-b| / max |b|
    atol: float
    rtol: float
    passed: bool


@dataclass
class Verification:
    runner: str
    reference: str
    outputs: list[OutputCheck]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def worst(self) -> OutputCheck:
        return max(self.outputs, key=lambda o: o.rel_to_range)

    def as_dict(self) -> dict:
        return {"runner": self.runner, "reference": self.reference, "passed": self.passed,
                "outputs": [asdict(o) for o in self.outputs]}


def rel_to_range(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error measure of every parity check in deploykit."""
    expected = np.asarray(expected, dtype=np.float64)
    peak = float(np.abs(expected).max(initial=0.0))
    error = float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max(initial=0.0))
    return error / peak if peak > 0 else error


def torch_results(model: torch.nn.Module, feeds: Sequence[Feed], output_names: Sequence[str]) -> RunResults:
    """Run `model` on each feed (one input tensor each) and record the outputs as Polygraphy RunResults."""
    iterations = []
    with torch.inference_mode():
        for feed in feeds:
            outputs = model(*(torch.from_numpy(array) for array in feed.values()))
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            iterations.append({name: out.detach().cpu().numpy() for name, out in zip(output_names, outputs)})
    results = RunResults()
    results.add(iterations, runner_name=TORCH_RUNNER)
    return results


def onnxrt_results(session, feeds: Sequence[Feed]) -> RunResults:
    """Run an onnxruntime session through Polygraphy's runner on each feed."""
    with polygraphy_quiet():
        return Comparator.run([OnnxrtRunner(session, name=ONNXRT_RUNNER)], data_loader=list(feeds))


def default_atols(reference: RunResults, rtol: float) -> dict[str, float]:
    """Per-output absolute tolerance ``rtol * max|reference|`` (over all iterations)."""
    peaks: dict[str, float] = {}
    for _, iterations in reference.items():
        for iteration in iterations:
            for name, array in iteration.items():
                peaks[name] = max(peaks.get(name, 0.0), float(np.abs(array).max(initial=0.0)))
    return {name: rtol * peak if peak > 0 else rtol for name, peak in peaks.items()}


def compare(candidate: RunResults, reference: RunResults, rtol: float | None = None,
            atol: float | Mapping[str, float] | None = None) -> Verification:
    """Compare one runner's results with the reference's, output by output and iteration by iteration.

    Args:
        candidate: results of the deployed model (one runner).
        reference: results of PyTorch (one runner).
        rtol: relative tolerance. Defaults to 1e-4.
        atol: absolute tolerance, one number or per output name. Defaults to ``rtol * max|reference|`` per output.
    """
    rtol = DEFAULT_RTOL if rtol is None else rtol
    atols = default_atols(reference, rtol) if atol is None else atol
    atols = dict(atols) if isinstance(atols, Mapping) else {"": float(atols)}
    (runner, candidate_iterations), (reference_runner, reference_iterations) = candidate[0], reference[0]
    results = RunResults()
    results.extend(candidate)
    results.extend(reference)
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=atols, rtol=rtol, check_error_stat="elemwise"))
    # One AccuracyResult per comparison function (we pass one): runner pair -> per-iteration {output: result}.
    per_iteration = accuracy[0][(runner, reference_runner)]
    checks = []
    for index, outputs in enumerate(per_iteration):
        for name, result in outputs.items():
            expected = reference_iterations[index][name]
            actual = candidate_iterations[index][name]
            checks.append(OutputCheck(
                name=name, iteration=index, shape=list(expected.shape), max_abs=result.max_absdiff,
                mean_abs=result.mean_absdiff, max_rel=result.max_reldiff,
                rel_to_range=rel_to_range(actual, expected),
                atol=atols.get(name, atols.get("", 0.0)), rtol=rtol, passed=bool(result)))
    return Verification(runner=runner, reference=reference_runner, outputs=checks)


def polygraphy_command(model: str, inputs: str, outputs: str, verification: Verification) -> str:
    """The ``polygraphy run`` line that replays `verification` from the saved artifacts."""
    atols = {}
    for check in verification.outputs:
        atols[check.name] = max(atols.get(check.name, 0.0), check.atol)
    rtol = verification.outputs[0].rtol if verification.outputs else DEFAULT_RTOL
    atol_args = " ".join(f"{name}:{value:.6g}" for name, value in atols.items())
    return (f"polygraphy run {shlex.quote(model)} --onnxrt --load-inputs {shlex.quote(inputs)} "
            f"--load-outputs {shlex.quote(outputs)} --atol {atol_args} --rtol {rtol:g}")


