"""Defenses from outside the package: the user's own files and modules, imported before a config is checked.

A plugin is a Python file (``run.plugins: [my_defense.py]``), an importable module (``my_pkg.module``)
or an installed package's entry point in the group ``booster_jax.methods``. Importing it runs its
``booster_jax.register(MethodSpec(...))`` calls, so its methods (and their config sections) exist when
the config is validated. Every failure -- the import itself, a name registered twice, a bad config
section -- becomes one problem line naming the file, reported with the config's other problems.

This module knows nothing of methods or configs (they sit above it): it imports and remembers what it
imported. ``methods.base.register`` records the file that called it, whose content is then part of
the method's stage fingerprints.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback

from booster_jax.errors import BoosterInputError

ENTRY_POINT_GROUP = "booster_jax.methods"

_loaded: dict[str, str] = {}  # plugin file (real path) -> digest of its content when imported
_entry_points_problems: list[str] | None = None  # None = not loaded yet


def is_file(name: str) -> bool:
    """A plugin entry names a file (imported from its path) rather than a module (imported by name)."""
    return name.endswith(".py") or "/" in name or os.sep in name


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _where(exc: BaseException, path: str) -> str:
    """' (line N)' of the deepest traceback frame inside ``path``, or of a SyntaxError in it."""
    if isinstance(exc, SyntaxError) and exc.lineno and os.path.realpath(exc.filename or "") == path:
        return f" (line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def _describe(exc: BaseException, path: str) -> str:
    if isinstance(exc, BoosterInputError):  # a bad registration: its message already says what is wrong
        return f"{exc}{_where(exc, path)}"
    return f"cannot import it: {type(exc).__name__}: {exc}{_where(exc, path)}"


def _import_file(path: str) -> None:
    real = os.path.realpath(path)
    if os.path.isdir(real) or (os.path.isfile(real) and not real.endswith(".py")):
        raise BoosterInputError(f"{'a directory' if os.path.isdir(real) else 'not a Python file'}; a plugin is a "
                                ".py file or an importable module name (my_pkg.defenses)")
    if not os.path.isfile(real):
        raise FileNotFoundError(f"no such file: {path}")
    digest = _digest(real)
    if _loaded.get(real) == digest:
        return  # imported already, unchanged (a grid checks its config once per variant)
    stem = os.path.splitext(os.path.basename(real))[0]
    name = f"booster_jax_plugin_{stem}_{hashlib.sha256(real.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, real)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look a class's module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _loaded[real] = digest


def imported(path: str) -> bool:
    """The plugin file at ``path`` was imported without an error."""
    return os.path.realpath(path) in _loaded


def _import_module(name: str) -> None:
    importlib.import_module(name)


def _origin(module: str) -> str:
    """The file a module name would import (its real path), or the name itself when it cannot be found."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    return os.path.realpath(origin) if origin and os.path.isfile(origin) else module


def load(names, key: str = "run.plugins") -> list[tuple[str, str]]:
    """Import each plugin in ``names`` (files by path, else module names) and the installed entry points;
    returns ``(key, problem)`` pairs, one per plugin that failed, each naming its file or module."""
    problems = [(f"{ENTRY_POINT_GROUP} entry point", p) for p in load_entry_points()]
    for i, name in enumerate(names):
        name = str(name)
        try:
            _import_file(name) if is_file(name) else _import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's code becomes a config problem
            path = os.path.realpath(name) if is_file(name) else _origin(name)
            shown = name if is_file(name) or path == name else f"{name} ({path})"
            problems.append((f"{key}[{i}]", f"{shown}: {_describe(e, path)}"))
    return problems


def load_entry_points() -> list[str]:
    """Import every installed ``booster_jax.methods`` entry point once; the problems, one per failure."""
    global _entry_points_problems
    if _entry_points_problems is None:
        _entry_points_problems = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001
                origin = _origin(ep.value.split(":")[0])
                _entry_points_problems.append(f"{ep.name} = {ep.value} ({origin}): {_describe(e, origin)}")
    return list(_entry_points_problems)


def require(names=()) -> None:
    """``load`` that raises one ``BoosterInputError`` listing every problem (for callers without a config)."""
    problems = load(names)
    if problems:
        raise BoosterInputError("\n".join([f"{len(problems)} plugin problem(s):"] +
                                          [f"  {k}: {m}" for k, m in problems]))
