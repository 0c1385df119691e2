"""Accuracy check of a deployed model against PyTorch, anchored in float64.

A deployed model is one more float32 implementation of the network, with another summation order: its error is
of the same order as PyTorch's own float32 error, and a deep network's float32 rounding noise can be of the order of
any fixed tolerance. Comparing it with PyTorch's float32 output therefore blames the deployment for PyTorch's
rounding (and the margin depends on which kernels the CPU picks). So PyTorch also runs the model in float64 (a deep
copy), and each input sample n is judged on two errors relative to the float64 output's range:

    e_dep = max |deployed[n] - fp64[n]| / max |fp64[n]|          the deployment's error
    e_ref = max |pytorch_fp32[n] - fp64[n]| / max |fp64[n]|      PyTorch's own float32 error on that input
    e_probe = max |pytorch_fp32(x'[n]) - fp64[n]| / max |fp64[n]|  the same with every input element moved by one
                                                                  float32 ulp (random direction; the larger of
                                                                  `PROBES` seeded draws)

PyTorch's float32 run is one draw of float32 rounding; on an input where the network amplifies rounding-level
changes (near-tied attention softmaxes, ReLU boundaries) that draw can land close to float64 by luck while every
other float32 implementation lands far away. The ulp probes are more draws that expose such inputs (measured on
od_mobilenetv2_100_4x: e_ref 7.2e-4, e_probe 5.2e-3, onnxruntime 1.0e-2; on its well-behaved inputs all three are
~1e-6). With e_fp32 = max(e_ref, e_probe), `sample_status` decides (tol = rtol, default 1e-4;
K = `REFERENCE_ERROR_FACTOR`, U = `INSTABILITY_FACTOR`):

- stable input (e_fp32 <= U·tol): *passed* if e_dep <= max(tol, K·e_fp32), else *failed*;
- unstable input (e_fp32 > U·tol: the network is chaotic there, PyTorch's own float32 result is off by more than
  ten tolerances, so no float32 implementation can be checked on it): *passed* if e_dep <= tol, else *unstable*.

The run's verdict is *failed* if any sample failed, *passed* if none failed and at least one passed, and
*inconclusive* if every sample was unstable. A model that cannot run in float64 falls back to a float32
reference (said in the report): a sample then passes iff e_dep <= tol.

The saved reference (``torch_outputs.json``, a Polygraphy `RunResults`, runner "pytorch") is the float64 output
rounded to float32, and ``polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs
torch_outputs.json --atol ... --rtol ...`` (`polygraphy_command`) replays the comparison with per-output absolute
tolerances derived from the verdict: the loosest bound the verdict allowed when it passed, the tightest bound a
failed sample broke when it failed, so the replay agrees with the verdict (`Verification.polygraphy_passed`).
"""

from __future__ import annotations

import contextlib
import copy
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from polygraphy.comparator import Comparator, CompareFunc, RunResults

from deploykit.config import RTOL_RANGE
from deploykit.errors import DeployError
from deploykit.log import polygraphy_quiet
from deploykit.memory import check_fits, memory_errors, out_of_memory
from deploykit.signature import flatten_outputs

DEFAULT_RTOL = 1e-4
FP16_RTOL = 1e-2  # an FP16 engine's tolerance: half precision keeps ~3 significant digits
# K: the deployment may be up to 4x as far from float64 as PyTorch's own float32. Measured (docs/verification.md, "How
# verification decides"): correct deployments of the zoo stay within 1.3x, while a 1% error in one layer puts
# e_dep at >= 1.5e-3 of the range, above every bound a stable input allows (at most 4e-3 only where PyTorch's own
# error is already 1e-3).
REFERENCE_ERROR_FACTOR = 4.0
# U: an input on which PyTorch's own float32 output is more than 10 tolerances from float64 is unstable.
INSTABILITY_FACTOR = 10.0
# Float32 runs of PyTorch on ulp-nudged copies of the input: more draws of its float32 rounding noise.
PROBES = 2
PASSED, FAILED, UNSTABLE, INCONCLUSIVE = "passed", "failed", "unstable", "inconclusive"
_FLOAT32_EPSILON = float(np.finfo(np.float32).eps)
TORCH_RUNNER = "pytorch"
ONNXRT_RUNNER = "onnxruntime"
Feed = dict[str, np.ndarray]
Iterations = list[dict[str, np.ndarray]]


@dataclass
class TorchReference:
    """PyTorch's outputs on the verification feeds: float32 (what users run) and float64 (the anchor).

    `float64` is None when the model cannot run in float64; `fallback_reason` then says why."""

    float32: Iterations
    float64: Iterations | None
    float32_probes: list[Iterations] = field(default_factory=list)  # float32 on ulp-nudged inputs (none without
    #                                                                   float64)
    fallback_reason: str | None = None

    @property
    def precision(self) -> str:
        return "float64" if self.float64 is not None else "float32"

    @property
    def anchor(self) -> Iterations:
        """The outputs every deployment is measured against."""
        return self.float64 if self.float64 is not None else self.float32

    def saved_results(self) -> RunResults:
        """The anchor rounded to float32, as the Polygraphy RunResults saved in ``torch_outputs.json``."""
        results = RunResults()
        results.add([{name: array.astype(np.float32) for name, array in it.items()} for it in self.anchor],
                    runner_name=TORCH_RUNNER)
        return results


@dataclass
class SampleCheck:
    """One output of one input sample, judged by `sample_status`."""

    iteration: int
    sample: int  # index within the iteration's batch
    output: str
    e_dep: float  # deployed vs anchor, relative to the anchor's range on this sample
    e_ref: float | None  # PyTorch float32 vs float64 (None without a float64 reference)
    e_probe: float | None  # PyTorch float32 on the ulp-nudged inputs vs float64 (the largest)
    bound: float  # the largest e_dep this sample allowed
    status: str  # passed / failed / unstable


@dataclass
class OutputCheck:
    """Errors of one output in one iteration (one input batch) against the anchor, as Polygraphy replays them."""

    name: str
    iteration: int
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float  # Polygraphy's elementwise |a-b| / |b|: large wherever b is near zero
    rel_to_range: float  # max |a-b| / max |b|
    atol: float
    rtol: float
    passed: bool  # Polygraphy's elementwise verdict with these tolerances


@dataclass
class Verification:
    """A deployed model's check: per-sample statuses, the verdict, and Polygraphy's replay of it."""

    runner: str
    reference: str  # "float64" or "float32"
    tolerance: float
    samples: list[SampleCheck]
    outputs: list[OutputCheck]
    reference_note: str | None = None
    agreement: dict = field(default_factory=dict)
    first_divergence: dict | None = None

    @property
    def verdict(self) -> str:
        return verdict_of([s.status for s in self.samples])

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    @property
    def counts(self) -> dict[str, int]:
        return {status: sum(s.status == status for s in self.samples) for status in (PASSED, FAILED, UNSTABLE)}

    @property
    def polygraphy_passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def worst(self) -> SampleCheck:
        """The sample closest to (or furthest past) its bound."""
        return max(self.samples, key=lambda s: s.e_dep / s.bound if s.bound > 0 else float("inf"))

    def as_dict(self) -> dict:
        return {"runner": self.runner, "reference": self.reference, "reference_note": self.reference_note,
                "verdict": self.verdict, "passed": self.passed, "tolerance": self.tolerance,
                "rule": {"reference_error_factor": REFERENCE_ERROR_FACTOR, "instability_factor": INSTABILITY_FACTOR},
                "counts": self.counts,
                "samples": [asdict(s) for s in self.samples], "agreement": self.agreement,
                "first_divergence": self.first_divergence, "polygraphy_passed": self.polygraphy_passed,
                "replay_note": self.replay_note, "outputs": [asdict(o) for o in self.outputs]}

    @property
    def replay_note(self) -> str | None:
        """What the `polygraphy run` line cannot express: its atol is one number per output for every sample."""
        unstable = [s for s in self.samples if s.status == UNSTABLE]
        if self.verdict == PASSED and unstable:
            return (f"{len(unstable)} unstable sample(s) could not be checked; their observed errors are included in "
                    f"the replay's atol, so the replay is looser than the verdict on the other samples")
        return None


def rel_to_range(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error measure of every parity check in deploykit."""
    expected = np.asarray(expected, dtype=np.float64)
    peak = float(np.abs(expected).max(initial=0.0))
    error = float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max(initial=0.0))
    return error / peak if peak > 0 else error


def sample_status(e_dep: float, e_ref: float | None, tolerance: float) -> tuple[str, float]:
    """(status, bound) of one sample under the module docstring's rule; `e_ref` is PyTorch's float32 error on the
    input (the larger of e_ref and e_probe), None without a float64 anchor."""
    if e_ref is None:  # no float64 anchor: the plain tolerance
        return (PASSED if e_dep <= tolerance else FAILED), tolerance
    if e_ref > INSTABILITY_FACTOR * tolerance:
        return (PASSED if e_dep <= tolerance else UNSTABLE), tolerance
    bound = max(tolerance, REFERENCE_ERROR_FACTOR * e_ref)
    return (PASSED if e_dep <= bound else FAILED), bound


def verdict_of(statuses: Sequence[str]) -> str:
    """failed if any sample failed; passed if none did and one passed; inconclusive if all were unstable."""
    if FAILED in statuses:
        return FAILED
    return PASSED if PASSED in statuses else INCONCLUSIVE


def combined_verdict(verdicts: Sequence[str]) -> str:
    """The verdict of several checks of one run (onnxruntime, TensorRT): the worst of them."""
    for verdict in (FAILED, INCONCLUSIVE):
        if verdict in verdicts:
            return verdict
    return PASSED


def nudged(feeds: Sequence[Feed], seed: int = 0) -> list[Feed]:
    """`feeds` with every floating-point element moved by one float32 ulp up or down (seeded random signs)."""
    rng = np.random.default_rng(seed)
    moved = []
    for feed in feeds:
        moved.append({name: np.nextafter(a, np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype))
                      if np.issubdtype(a.dtype, np.floating) else a for name, a in feed.items()})
    return moved


def run_torch(model: torch.nn.Module, feeds: Sequence[Feed], output_names: Sequence[str],
              dtype: torch.dtype = torch.float32) -> Iterations:
    """`model`'s outputs on each feed, with floating-point inputs cast to `dtype` (and, for float64, float64 as
    the default dtype, so tensors the forward creates itself, e.g. a ``torch.linspace`` grid, are float64 too);
    the outputs are flattened as the export flattens them (`deploykit.signature.flatten_outputs`)."""
    iterations = []
    with torch.inference_mode(), default_dtype(dtype):
        for feed in feeds:
            inputs = (torch.from_numpy(a).to(dtype) if np.issubdtype(a.dtype, np.floating) else torch.from_numpy(a)
                      for a in feed.values())
            outputs = flatten_outputs(model(*inputs))
            iterations.append({name: out.detach().cpu().numpy() for name, (_, out) in zip(output_names, outputs)})
    return iterations


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default floating-point dtype set to `dtype` (when it is one) for the block."""
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy of `model` (the original is left as is)."""
    return copy.deepcopy(model).double().eval()


def torch_reference(model: torch.nn.Module, feeds: Sequence[Feed], output_names: Sequence[str]) -> TorchReference:
    """Run `model` in float32, in float32 on `PROBES` ulp-nudged inputs, and (a deep copy) in float64. Errors of the
    float32 run propagate (they mean the model cannot take the input), except running out of memory, which is
    said as such (`deploykit.memory`); a model that cannot run in float64 falls back to the float32 reference."""
    shape = "x".join(map(str, next(iter(feeds[0].values())).shape))
    what = f"Running the model in PyTorch on inputs of shape {shape}"
    # A lower bound of what the run holds at once: the inputs in float32 and float64, and the float64 copy's weights.
    check_fits(sum(a.size for feed in feeds for a in feed.values()) * (4 + 8)
               + sum(p.numel() for p in model.parameters()) * 8, what)
    with memory_errors(what):
        float32 = run_torch(model, feeds, output_names)
        try:
            float64 = run_torch(float64_copy(model), feeds, output_names, torch.float64)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
            if out_of_memory(err, what) is not None:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return TorchReference(float32, None,
                                  fallback_reason=f"the model cannot run in float64 ({reason.rstrip('.')})")
        computed_in = {str(a.dtype) for it in float64 for a in it.values() if np.issubdtype(a.dtype, np.floating)}
        if computed_in != {"float64"}:
            return TorchReference(float32, None, fallback_reason=f"the model's float64 copy returns "
                                                                 f"{', '.join(sorted(computed_in))} outputs, so it "
                                                                 f"computes in lower precision internally")
        probes = [run_torch(model, nudged(feeds, seed), output_names) for seed in range(PROBES)]
    return TorchReference(float32, float64, probes)


def check_absolute_tolerance(atol: float | None, reference: TorchReference) -> None:
    """Refuse, before the slow export, an --atol that cannot judge these outputs: per sample it becomes atol / the
    sample's range, so it must lie within `RTOL_RANGE` times the outputs' largest magnitude."""
    peak = max((float(np.abs(a).max(initial=0.0)) for outputs in reference.anchor for a in outputs.values()),
               default=0.0)
    low, high = RTOL_RANGE
    if atol is None or peak == 0 or low * peak <= atol <= high * peak:
        return
    what = "more than a tenth" if atol > high * peak else "below float32's resolution"
    raise DeployError(f"--atol {atol:g} is {what} of the outputs' largest magnitude ({peak:.3g}), so it cannot tell a "
                      f"working export from a broken one; pass an --atol from {low * peak:.2g} to {high * peak:.2g}, "
                      f"or an --rtol.")


def runner_results(runner, feeds: Sequence[Feed]) -> RunResults:
    """Run any runtime's runner (`deploykit.runtime.base.Runner`) on each feed, as Polygraphy `RunResults` under the
    runner's name."""
    shape = "x".join(map(str, next(iter(feeds[0].values())).shape))
    results = RunResults()
    with memory_errors(f"Running the exported model in {runner.name} on inputs of shape {shape}"):
        results.add([runner.run(feed) for feed in feeds], runner_name=runner.name)
    return results


def check_samples(candidate: Iterations, reference: TorchReference, rtol: float,
                  atol: float | None = None) -> list[SampleCheck]:
    """Judge every sample of every output (dimension 0 of each output is the batch)."""
    samples = []
    for index, outputs in enumerate(candidate):
        for name, actual in outputs.items():
            anchor = reference.anchor[index][name]
            fp32 = reference.float32[index][name] if reference.float64 is not None else None
            probes = [probe[index][name] for probe in reference.float32_probes]
            rows = range(actual.shape[0]) if actual.ndim else [None]
            for row in rows:
                pick = (lambda a: a) if row is None else (lambda a, row=row: a[row])
                peak = float(np.abs(pick(anchor)).max(initial=0.0))
                tolerance = rtol if atol is None else (atol / peak if peak > 0 else atol)
                e_dep = rel_to_range(pick(actual), pick(anchor))
                e_ref = None if fp32 is None else rel_to_range(pick(fp32), pick(anchor))
                e_probe = max((rel_to_range(pick(p), pick(anchor)) for p in probes), default=None)
                noise = None if e_ref is None else max(e_ref, e_probe or 0.0)
                status, bound = sample_status(e_dep, noise, tolerance)
                samples.append(SampleCheck(index, row or 0, name, e_dep, e_ref, e_probe, bound, status))
    return samples


def replay_atols(samples: Sequence[SampleCheck], reference: TorchReference, rtol: float) -> dict[str, float]:
    """Per-output absolute tolerances under which Polygraphy's elementwise check agrees with the verdict.

    Passed: the loosest bound any sample was allowed (an unstable sample contributes its observed error, which no
    float32 implementation could check). Failed: the tightest bound a failed sample broke, so the replay fails on
    it too (its relative term rtol·|b| is below that bound as well). Inconclusive: the plain tolerance."""
    verdict = verdict_of([s.status for s in samples])
    peaks: dict[tuple[int, int, str], float] = {}
    for s in samples:
        anchor = reference.anchor[s.iteration][s.output]
        peaks[s.iteration, s.sample, s.output] = float(np.abs(anchor[s.sample] if anchor.ndim else anchor).max())
    atols: dict[str, float] = {}
    for s in samples:
        peak = peaks[s.iteration, s.sample, s.output] or 1.0
        ulp = peak * _FLOAT32_EPSILON  # the saved reference is rounded to float32: keep the replay on the same side
        if verdict == PASSED:
            allowed = (s.bound if s.status == PASSED else s.e_dep) * peak + ulp
            atols[s.output] = max(atols.get(s.output, 0.0), allowed)
        elif verdict == FAILED and s.status == FAILED:
            atols[s.output] = min(atols.get(s.output, float("inf")), max(s.bound * peak - ulp, 0.0))
        elif verdict == INCONCLUSIVE:
            atols[s.output] = max(atols.get(s.output, 0.0), rtol * peak)
    for s in samples:  # outputs without a failed sample in a failed run keep their plain tolerance
        peak = max(p for (_, _, output), p in peaks.items() if output == s.output)
        atols.setdefault(s.output, rtol * (peak or 1.0))
    return atols


def compare(candidate: RunResults, reference: TorchReference, rtol: float | None = None,
            atol: float | None = None) -> Verification:
    """Check one runner's results against PyTorch, sample by sample, and replay the verdict through Polygraphy.

    Args:
        candidate: results of the deployed model (one runner).
        reference: PyTorch's float32 and float64 results (`torch_reference`).
        rtol: the tolerance, relative to each sample's output range. Defaults to 1e-4.
        atol: an absolute tolerance instead (converted per sample to rtol terms). Defaults to None.
    """
    rtol = DEFAULT_RTOL if rtol is None else rtol
    runner, iterations = candidate[0]
    candidate_iterations = [dict(it.items()) for it in iterations]
    samples = check_samples(candidate_iterations, reference, rtol, atol)
    atols = replay_atols(samples, reference, rtol)
    results = RunResults()
    results.extend(candidate)
    saved = reference.saved_results()
    results.extend(saved)
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=atols, rtol=rtol, check_error_stat="elemwise"))
    # One AccuracyResult per comparison function (we pass one): runner pair -> per-iteration {output: result}.
    per_iteration = accuracy[0][(runner, TORCH_RUNNER)]
    checks = []
    for index, outputs in enumerate(per_iteration):
        for name, result in outputs.items():
            expected = reference.anchor[index][name]
            checks.append(OutputCheck(
                name=name, iteration=index, shape=list(expected.shape), max_abs=float(result.max_absdiff),
                mean_abs=float(result.mean_absdiff), max_rel=float(result.max_reldiff),
                rel_to_range=rel_to_range(candidate_iterations[index][name], expected),
                atol=atols[name], rtol=rtol, passed=bool(result)))
    return Verification(runner=runner, reference=reference.precision, tolerance=rtol, samples=samples,
                        outputs=checks, reference_note=reference.fallback_reason,
                        agreement=agreement(candidate_iterations, reference.float32))


def agreement(candidate: Iterations, pytorch: Iterations) -> dict:
    """How the deployed model's decisions agree with PyTorch's (float32) on the first output, over all samples:
    top-1 and top-5 agreement for class scores ([N, classes]), and the smallest per-sample cosine similarity
    (embeddings, feature maps)."""
    name = next(iter(candidate[0])) if candidate and candidate[0] else None
    if name is None or candidate[0][name].ndim == 0:
        return {}
    # Per sample: feature maps of a dynamic-size export differ in size from one verification batch to the next.
    pairs = [(a.astype(np.float64).ravel(), e.astype(np.float64).ravel())
             for it, ref in zip(candidate, pytorch) for a, e in zip(it[name], ref[name])]
    cosine = np.array([np.dot(a, e) / (np.linalg.norm(a) * np.linalg.norm(e) or 1.0) for a, e in pairs])
    result = {"output": name, "samples": len(pairs), "cosine_min": float(cosine.min())}
    if candidate[0][name].ndim == 2 and candidate[0][name].shape[1] > 1:
        actual = np.concatenate([it[name] for it in candidate]).astype(np.float64)
        expected = np.concatenate([it[name] for it in pytorch]).astype(np.float64)
        result["top1"] = float(np.mean(actual.argmax(1) == expected.argmax(1)))
        if actual.shape[1] >= 5:
            top5 = lambda scores: np.sort(np.argsort(-scores, axis=1)[:, :5], axis=1)  # noqa: E731
            result["top5"] = float(np.mean(np.all(top5(actual) == top5(expected), axis=1)))
    return result


def replay_tolerances(verification: Verification) -> tuple[dict[str, float], float]:
    """The per-output atols and the rtol that `polygraphy run` needs to replay `verification`."""
    atols: dict[str, float] = {}
    for check in verification.outputs:
        atols[check.name] = max(atols.get(check.name, 0.0), check.atol)
    return atols, verification.tolerance


def polygraphy_command(model: str, inputs: str, outputs: str, verification: Verification) -> str:
    """The ``polygraphy run`` line that replays `verification` from the saved artifacts."""
    atols, rtol = replay_tolerances(verification)
    atol_args = " ".join(f"{name}:{value:.9g}" for name, value in atols.items())
    return (f"polygraphy run {shlex.quote(model)} --onnxrt --load-inputs {shlex.quote(inputs)} "
            f"--load-outputs {shlex.quote(outputs)} --atol {atol_args} --rtol {rtol:g}")
