"""The registry of training methods: one module per method in this package, each calling
`register(...)` at import. `get(name)` imports the package's method modules on first use, so a new
method file needs no other change (a method defined elsewhere, e.g. in a test, calls `register`).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from training.methods.base import Method

_METHODS: dict[str, Method] = {}
_LOADED = False
_NOT_METHODS = {"base"}


def register(method: Method) -> Method:
    """Add a method instance under `method.name` (re-registering the same name replaces it)."""
    if not method.name or not method.phases:
        raise ValueError("a method needs a name and at least one phase")
    for name, phase in method.phases.items():
        if phase.name != name:
            raise ValueError(f"method '{method.name}': phase key '{name}' != its name '{phase.name}'")
        if phase.init is not None and phase.init not in method.phases:
            raise ValueError(f"method '{method.name}': phase '{name}' starts from unknown phase '{phase.init}'")
    _METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{mod.name}")


def names() -> list[str]:
    """Registered method names (sorted)."""
    _load_builtin()
    return sorted(_METHODS)


def get(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        raise KeyError(f"unknown method '{name}'; registered: {', '.join(sorted(_METHODS)) or 'none'}")
    return _METHODS[name]


def resolve(method: Optional[str] = None, phase: Optional[str] = None, stage: Optional[int | str] = None) -> tuple[Method, str]:
    """(method, phase name) from `--method/--phase`, or `--stage N`: the phase alias N of `--method`,
    or of the one registered method that declares alias N."""
    if stage is not None:
        if phase is not None:
            raise ValueError("give --phase or --stage, not both")
        stage = str(stage)
        if method is not None:
            m = get(method)
            if stage not in m.stage_aliases:
                raise ValueError(f"method '{method}' has no stage {stage} (aliases: {dict(m.stage_aliases) or 'none'})")
            return m, m.stage_aliases[stage]
        owners = [get(n) for n in names() if stage in get(n).stage_aliases]
        if len(owners) != 1:
            raise ValueError(f"--stage {stage} is ambiguous or unknown (methods declaring it: "
                             f"{[m.name for m in owners]}); use --method M --phase P")
        return owners[0], owners[0].stage_aliases[stage]
    if method is None or phase is None:
        raise ValueError("give --method M --phase P (or --stage N)")
    m = get(method)
    m.phase(phase)
    return m, phase
