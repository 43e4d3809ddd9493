"""Loading the scripts in experiments/ (not a package) in tests, from their paths.

Example:
    >>> from _experiments import EXPERIMENTS, load_experiment
    >>> decode = load_experiment("decode")        # experiments/decode.py, as ``decode``
"""

import importlib.util
import pathlib
import sys
import types

EXPERIMENTS = pathlib.Path(__file__).parents[1] / "experiments"


def load_experiment(name: str, module_name: str | None = None) -> types.ModuleType:
    """experiments/<name>.py as a module, registered in ``sys.modules``.

    experiments/ goes on ``sys.path`` first: scripts import each other by name
    (``import _common``; cost_check imports throughput), and some do not put their folder
    there themselves (throughput_report).

    Args:
        name: the script's file name without ``.py``.
        module_name: None: the module under its own name, the one the scripts import, loaded
            once (a later call returns it). A name: a private copy under that name, loaded
            afresh on every call (one a test can change without touching the shared one).

    Returns:
        The module, run.

    Example:
        >>> common = load_experiment("_common")
        >>> private = load_experiment("_common", module_name="output__common")
        >>> private is common
        False
    """
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    if module_name is None:
        module_name = name
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location(module_name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module
