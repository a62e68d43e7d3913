"""Plugins: data stages, commands and params sections declare themselves; the framework names none.

They are Python entry points, declared in `pyproject.toml` and recorded in the package metadata by
`pip install -e .` (`make venv` runs it whenever pyproject.toml changes):

    [project.entry-points."persona.stages"]        NAME = "module:STAGE"     a `Stage` (below)
    [project.entry-points."persona.commands"]      NAME = "module:register"  register(subparsers) adds
                                                                             `persona <command>`s
    [project.entry-points."persona.sections"]      NAME = "module:Config"    a dataclass: params.yaml
                                                                             section NAME, built strictly
                                                                             by `load_params`, read as
                                                                             `params.NAME`
    [project.entry-points."persona.raw_sections"]  NAME = "module:validate"  section NAME kept raw in
                                                                             `params.extra[NAME]`;
                                                                             `validate(params)` is its
                                                                             owner's check (run on use
                                                                             and by `check_params`)

When the framework runs from a checkout (a `pyproject.toml` beside `pipeline/`: PYTHONPATH=<repo>, an
editable install, a Ray Job's uploaded working dir), that file's entry points stand in for the installed
metadata of the same distribution, so a stage added there is seen without reinstalling. Other
distributions' entry points (third-party plugins) always come from their metadata.

A new data stage is one module holding a `Stage`, one entry point and (if it has params) one section
dataclass with its entry point: `persona stage|build|stages`, the run order, the shard join and the
params loader pick it up. `load_params` imports the module of every `persona.sections` target, so keep
those modules light (heavy imports inside functions); `persona.raw_sections` targets are imported only
when validated, so a subsystem (training) keeps its imports out of every params load.

This module is imported by every stage (its `Stage` and `Member` types), so it stays small and pure:
a change here changes every stage's code fingerprint.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

log = logging.getLogger("persona.plugins")

STAGES = "persona.stages"
COMMANDS = "persona.commands"
SECTIONS = "persona.sections"
RAW_SECTIONS = "persona.raw_sections"
ALL = "*"  # `Stage.after` entry: after every other stage that does not also say ALL (a sink, e.g. shards)


@dataclass(frozen=True)
class Member:
    """One member a stage adds to every shard sample: `<key>.<name>` in the tar.

    kind `file`: the blob whose path (relative to the stage folder) is in `column`, copied byte for
    byte; `npy`: that blob is a `.npy` array, checked against `shape` (a face whose array has another
    shape is excluded as `<stage>:bad_shape`) and written as `dtype`; `text`: the value of `column`,
    UTF-8. `missing`: for a text member of an optional stage, the value written when the stage's table
    does not exist (None: the member is absent then). `role`: what the sample grid (grid.png) uses it
    for: `grid` (the face shown), `grid_mask` (tinted over it), `grid_text` (written below it).
    """

    name: str
    column: str
    kind: Literal["file", "npy", "text"] = "file"
    shape: Optional[tuple[int, ...]] = None
    dtype: Optional[str] = None
    missing: Optional[str] = None
    role: Optional[Literal["grid", "grid_mask", "grid_text"]] = None


@dataclass(frozen=True)
class Stage:
    """A data stage, as its module declares it (`STAGE = Stage(...)`, entry point `persona.stages`).

    name      the stage name: `persona stage NAME`, its item-store folder `<data_root>/NAME`
    run       run(ctx: pipeline.stage.Context) -> stats dict (inputs, computed, cached, counts, ...)
    after     stages it reads; `persona build` runs stages in this (topological) order, ties by name;
              ALL = after every stage that does not say ALL
    section   the params.yaml section it reads (registered under `persona.sections`), if any
    shard     its role in the shards: `base` (its `ok` rows are the samples: one per face), `required`
              / `optional` (joined by key; the default membership of `shards.required` / `optional`
              when params.yaml does not list them), None (not joined)
    members   what it adds to every shard sample (`Member`)
    meta      (json key, column) pairs it adds to each sample's `json` metadata; a column holding
              JSON text ([..] or {..}) is parsed. The base stage gives `identity` and `image_id`
              (the identity split and the index count by them).
    model     column prefix of the model that made its rows: `<model>_model`, `<model>_fingerprint`,
              `<model>_weights_real`, recorded in each sample's `json.models[<stage name>]`
    summary   one line for `persona stages` (default: first line of the module docstring)
    """

    name: str
    run: Callable[[Any], dict]
    after: tuple[str, ...] = ()
    section: Optional[str] = None
    shard: Optional[Literal["base", "required", "optional"]] = None
    members: tuple[Member, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    model: Optional[str] = None
    summary: str = ""


class PluginError(RuntimeError):
    """A registration problem: duplicate or unknown names, a cycle, a target of the wrong type."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=None)
def _checkout() -> tuple[Optional[str], dict[str, tuple[importlib.metadata.EntryPoint, ...]]]:
    """(distribution name, {group: entry points}) of the pyproject.toml beside `pipeline/`, if any."""
    pp = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pp.is_file():
        return None, {}
    project = tomllib.loads(pp.read_text()).get("project", {})
    groups = {g: tuple(importlib.metadata.EntryPoint(n, v, g) for n, v in table.items())
              for g, table in project.get("entry-points", {}).items()}
    return project.get("name"), groups


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The entry points of `group`, sorted by name; a name registered twice is an error. The
    checkout's pyproject.toml replaces its own distribution's installed metadata (module doc)."""
    dist, local = _checkout()
    installed = [ep for ep in importlib.metadata.entry_points(group=group)
                 if not (dist and ep.dist is not None and _norm(ep.dist.name) == _norm(dist))]
    eps = sorted(installed + list(local.get(group, ())), key=lambda e: (e.name, e.value))
    seen: dict[str, str] = {}
    for ep in eps:
        if ep.name in seen and seen[ep.name] != ep.value:
            raise PluginError(f"{group}: '{ep.name}' is registered twice ({seen[ep.name]} and {ep.value})")
        seen[ep.name] = ep.value
    unique = {ep.name: ep for ep in eps}
    return [unique[n] for n in sorted(unique)]


def _not_installed(group: str) -> PluginError:
    return PluginError(
        f"nothing is registered under '{group}': the project's entry points come from the pyproject.toml "
        "beside pipeline/ or from its installed metadata (`pip install -e .`, which `make venv` runs)"
    )


# ------------------------------------------------------------------------------------- stages


def stage_names() -> list[str]:
    """Registered stage names, sorted (no stage module is imported)."""
    return [ep.name for ep in entry_points(STAGES)]


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Stage:
    eps = {ep.name: ep for ep in entry_points(STAGES)}
    if not eps:
        raise _not_installed(STAGES)
    if name not in eps:
        raise KeyError(f"unknown stage '{name}'; available: {', '.join(s.name for s in _load_stages())}")
    ep = eps[name]
    st = ep.load()
    if not isinstance(st, Stage):
        raise PluginError(f"{STAGES}: '{ep.name}' = {ep.value} is a {type(st).__name__}, not a pipeline.plugins.Stage")
    if st.name != ep.name:
        raise PluginError(f"{STAGES}: entry point '{ep.name}' points at stage '{st.name}'")
    if not st.summary:
        doc = (getattr(importlib.import_module(ep.module), "__doc__", None) or "").strip()
        object.__setattr__(st, "summary", doc.splitlines()[0] if doc else "")
    return st


@functools.lru_cache(maxsize=None)
def _load_stages() -> tuple[Stage, ...]:
    names = stage_names()
    if not names:
        raise _not_installed(STAGES)
    return tuple(order({n: _load(n) for n in names}))


def order(stages: dict[str, Stage]) -> list[Stage]:
    """Topological order of `stages` by `after` (Kahn; ready stages by name, so the order is stable)."""
    sinks = {n for n, s in stages.items() if ALL in s.after}
    deps: dict[str, set[str]] = {}
    for n, s in stages.items():
        d = {a for a in s.after if a != ALL}
        unknown = sorted(d - stages.keys())
        if unknown:
            raise PluginError(f"stage '{n}' runs after unknown stage(s) {unknown}; registered: {sorted(stages)}")
        if n in sinks:
            d |= set(stages) - sinks
        deps[n] = d - {n}
    out: list[Stage] = []
    done: set[str] = set()
    while len(out) < len(stages):
        ready = sorted(n for n in stages if n not in done and deps[n] <= done)
        if not ready:
            raise PluginError(f"stages {sorted(set(stages) - done)} wait for each other (a cycle in `after`)")
        done.add(ready[0])
        out.append(stages[ready[0]])
    return out


def data_stages() -> list[Stage]:
    """Every registered stage, in pipeline order (imports the stage modules)."""
    return list(_load_stages())


def stage(name: str) -> Stage:
    """The registered stage `name` (imports only its module); KeyError naming the registered ones."""
    return _load(name)


# ----------------------------------------------------------------------------------- commands


def add_commands(subparsers) -> list[str]:
    """Call every `persona.commands` register(subparsers); returns the names added. A command whose
    own module is not installed (a slimmed image) is skipped with a debug line."""
    added = []
    for ep in entry_points(COMMANDS):
        try:
            register = ep.load()
        except ModuleNotFoundError as e:
            if e.name and (ep.module == e.name or ep.module.startswith(e.name + ".")):
                log.debug("command '%s' skipped: %s is not installed", ep.name, e.name)
                continue
            raise
        register(subparsers)
        added.append(ep.name)
    return added


# ----------------------------------------------------------------------------------- sections


@functools.lru_cache(maxsize=None)
def typed_sections() -> dict[str, type]:
    """{section name: its dataclass} of every `persona.sections` entry point (imports them)."""
    import dataclasses

    out = {}
    for ep in entry_points(SECTIONS):
        cls = ep.load()
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise PluginError(f"{SECTIONS}: '{ep.name}' = {ep.value} is not a dataclass")
        out[ep.name] = cls
    return out


def raw_section_names() -> list[str]:
    """Names of the sections validated by their owners (nothing is imported)."""
    return [ep.name for ep in entry_points(RAW_SECTIONS)]


def raw_section_validators() -> dict[str, Callable[[Any], Any]]:
    """{section name: its owner's validate(params)} (imports the owners)."""
    return {ep.name: ep.load() for ep in entry_points(RAW_SECTIONS)}


def clear_caches() -> None:
    """Forget loaded plugins (tests that register a plugin at run time)."""
    _checkout.cache_clear()
    _load.cache_clear()
    _load_stages.cache_clear()
    typed_sections.cache_clear()
