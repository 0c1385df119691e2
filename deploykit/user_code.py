"""Building the user's own model from their code: ``--arch path/to/net.py:factory`` or ``--arch package.module:factory``.

The factory is called without arguments and must return the ``nn.Module``; ``--model`` then loads a checkpoint into
it strictly (any format `deploykit.checkpoint` reads). No pickle is involved, so a checkpoint never runs code: the
only code that runs is the file the user named. A file is imported the way Python runs a script: its folder goes
first on ``sys.path``, so the packages beside it (even one named ``models``) import as they do for the user.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from deploykit.checkpoint import Checkpoint
from deploykit.errors import DeployError

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_factory(arch: str | None) -> bool:
    """Whether `arch` names a factory in the user's code (``file.py:name`` / ``module:name``), not a zoo model."""
    return arch is not None and ":" in arch


def factory_name(arch: str) -> str:
    """The factory's own name (``net.py:build_detector`` -> ``build_detector``): the default output and Triton name."""
    return arch.rsplit(":", 1)[1]


def build_user_model(arch: str, checkpoint: Checkpoint | None) -> nn.Module:
    """Call the factory `arch` names and load `checkpoint` (if any) into the result strictly; eval mode."""
    factory = load_factory(arch)
    try:
        model = factory()
    except Exception as err:  # the user's code may raise anything; it is their error, reported as such
        raise DeployError(f"--arch {arch}: calling {factory_name(arch)}() raised {type(err).__name__}: "
                          f"{_first_line(err)}.") from err
    if not isinstance(model, nn.Module):
        raise DeployError(f"--arch {arch}: {factory_name(arch)}() returned a {type(model).__name__}, not an "
                          f"nn.Module; return the model.")
    if checkpoint is not None:
        if checkpoint.module is not None:
            raise DeployError(f"{checkpoint.path} holds a whole pickled model, so there is nothing to build with "
                              f"--arch {arch}; drop --arch, or save a state_dict (model.state_dict()).")
        _load_strictly(model, checkpoint, arch)
    return model.eval()


def load_factory(arch: str) -> Callable[[], object]:
    """The callable `arch` names, imported from a file or a module path."""
    location, name = arch.rsplit(":", 1)
    if not name.isidentifier():
        raise DeployError(f"--arch {arch}: {name!r} is not a Python name; write --arch path/to/net.py:factory or "
                          f"--arch package.module:factory.")
    module = _import_file(arch, Path(location)) if location.endswith(".py") or "/" in location or "\\" in location \
        else _import_module(arch, location)
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        hint = f" (it defines {', '.join(found[:6])})" if found else ""
        raise DeployError(f"--arch {arch}: {location} has no {name!r}{hint}.")
    if not callable(factory):
        raise DeployError(f"--arch {arch}: {name} in {location} is a {type(factory).__name__}, not a function or "
                          f"class to call.")
    return factory


def _import_file(arch: str, path: Path):
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DeployError(f"--arch {arch}: {path} {what}; name the Python file that defines the factory.")
    path = path.resolve()
    folder = str(path.parent)
    if folder not in sys.path:  # as when Python runs the file: its neighbours import
        sys.path.insert(0, folder)
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    if loaded is not None:  # another module already has the name: load this one under a private one
        name = f"deploykit_user_{abs(hash(str(path)))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, as `import` does: pickling and dataclasses look it up
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        if isinstance(err, KeyboardInterrupt):
            raise
        raise DeployError(_import_error(arch, str(path), err)) from err
    return module


def _import_module(arch: str, location: str):
    if not _MODULE_PATH.match(location):
        raise DeployError(f"--arch {arch}: {location!r} is neither a .py file nor a module path such as "
                          f"package.module.")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # first, as `python -m` imports from here
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(location)
    except Exception as err:
        raise DeployError(_import_error(arch, location, err)) from err


def _import_error(arch: str, location: str, err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        if location == err.name or location.startswith(err.name + "."):
            return (f"--arch {arch}: no module {err.name!r} can be imported from the current directory or "
                    f"PYTHONPATH; run from the folder that holds it, add that folder to PYTHONPATH, or name the "
                    f".py file.")
        return (f"--arch {arch}: importing {location} failed because module {err.name!r} is not installed or not "
                f"importable; install it or add its folder to PYTHONPATH.")
    return f"--arch {arch}: importing {location} raised {type(err).__name__}: {_first_line(err)}."


def _load_strictly(model: nn.Module, checkpoint: Checkpoint, arch: str) -> None:
    """Load the checkpoint's weights as saved (wrappers and ``module.`` stripped); if they do not fit, the layout
    deploykit reads for zoo models (OpenMMLab backbone, Lightning ``model.*``) is tried before giving up."""
    from deploykit.models import check_state_dict, upgrade_state_dict

    expected = set(model.state_dict())
    candidates = [checkpoint.as_saved or checkpoint.state_dict, checkpoint.state_dict]
    chosen = next((c for c in candidates if set(upgrade_state_dict(model, c)) == expected), candidates[0])
    state_dict = upgrade_state_dict(model, chosen)
    check_state_dict(factory_name(arch) + "()'s model", model, state_dict,
                     hint=f"check that the checkpoint is for the model {factory_name(arch)}() builds")
    model.load_state_dict(state_dict, strict=True)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(err).__name__
