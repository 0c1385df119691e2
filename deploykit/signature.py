"""A model's inputs and outputs as ONNX sees them: flat lists of named tensors.

A PyTorch forward takes several arguments and may return a tensor, or tuples, lists and dicts of tensors, nested.
ONNX has flat, named inputs and outputs. This module is the one place that maps between the two:

* inputs are named after the forward's arguments (``input`` for a model with one input, so a single-input file
  keeps the name every tool here has used);
* outputs are flattened in the order the exporter flattens them (depth first, dict keys in insertion order) and
  named after their place in the structure: ``output`` for a single tensor, ``output_0``, ``output_1`` ... for a
  tuple or list, dict keys for a dict, ``features_0`` for item 0 of a dict's ``features`` list. Names the user gives
  replace them one for one;
* the structure itself is kept as a JSON *template* (`output_template`): the same nesting, with each tensor
  replaced by its output name, kept in the report, so a runtime can give callers back what the PyTorch model
  returned (`fill_template`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError

SINGLE_INPUT = "input"
SINGLE_OUTPUT = "output"
_TUPLE, _LIST = "tuple", "list"  # template tags: JSON has one kind of sequence, Python two
_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_.\-]")

Template = str | dict | list


def input_names(model: nn.Module, count: int) -> list[str]:
    """Names of the model's first `count` forward arguments (``input`` alone for one input)."""
    if count == 1:
        return [SINGLE_INPUT]
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [p.name for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= count and len(set(positional[:count])) == count:
        return positional[:count]
    return [f"input_{i}" for i in range(count)]


def flatten_outputs(outputs: Any, where: str = "The model") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a forward's result, depth first, each with its default name.

    Raises:
        DeployError: the result holds something other than tensors, or nothing at all.
    """
    if isinstance(outputs, torch.Tensor):
        return [(SINGLE_OUTPUT, outputs)]
    flat: list[tuple[str, torch.Tensor]] = []
    _flatten(outputs, [] if isinstance(outputs, Mapping) else [SINGLE_OUTPUT], flat, where)
    if not flat:
        raise DeployError(f"{where} returns no tensor ({type(outputs).__name__} of nothing); return the tensors to "
                          f"export.")
    names = [name for name, _ in flat]
    if len(set(names)) != len(names):  # {"a_0": x, "a": [y]} names two outputs alike: fall back to positions
        return [(f"{SINGLE_OUTPUT}_{i}", tensor) for i, (_, tensor) in enumerate(flat)]
    return flat


def _flatten(value: Any, path: list[str], flat: list[tuple[str, torch.Tensor]], where: str) -> None:
    if isinstance(value, torch.Tensor):
        flat.append(("_".join(path), value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, [*path, _NAME_UNSAFE.sub("_", str(key))], flat, where)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _flatten(item, [*path, str(index)], flat, where)
    else:
        place = "_".join(path) or "its result"
        raise DeployError(f"{where} returns a {type(value).__name__} at {place}, which ONNX cannot carry; return "
                          f"only tensors (in tuples, lists or dicts).")


def output_template(outputs: Any, names: Sequence[str]) -> Template:
    """`outputs`' structure with each tensor replaced by its output name (in flattening order)."""
    remaining = iter(names)

    def walk(value: Any) -> Template:
        if isinstance(value, torch.Tensor):
            return next(remaining)
        if isinstance(value, Mapping):
            return {"dict": {str(key): walk(item) for key, item in value.items()}}
        return {_TUPLE if isinstance(value, tuple) else _LIST: [walk(item) for item in value]}

    return walk(outputs)


def fill_template(template: Template, values: Mapping[str, Any]) -> Any:
    """The structure `template` describes, with each output name replaced by ``values[name]``."""
    if isinstance(template, str):
        return values[template]
    (kind, items), = template.items()
    if kind == "dict":
        return {key: fill_template(item, values) for key, item in items.items()}
    filled = [fill_template(item, values) for item in items]
    return tuple(filled) if kind == _TUPLE else filled


def resolve_output_names(defaults: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    """The user's output names in place of the defaults, one for one."""
    if requested is None:
        return list(defaults)
    requested = list(requested)
    if len(requested) != len(defaults):
        raise DeployError(f"--output-names gives {len(requested)} name(s) but the model returns {len(defaults)} "
                          f"tensor(s) ({', '.join(defaults)}); give one name per tensor, in that order.")
    duplicated = sorted({n for n in requested if requested.count(n) > 1})
    if duplicated:
        raise DeployError(f"--output-names repeats {', '.join(duplicated)}; every output needs its own name.")
    return requested
