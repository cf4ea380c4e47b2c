"""The registered model families' names and summaries, read from their folders without importing
them.

The converter's ``--help``, its usage errors and its unknown-``--model`` error need only each
family's ``name``, ``summary`` and whether it is a language model (the listing's order), but
importing a family imports its model: torch, Megatron-Core and transformers, seconds of start-up.
So the catalog reads each family folder's ``family.py`` as source, as setuptools reads a
``__version__`` without importing its module: the class decorated with ``@register_family`` states
these attributes as literals in its body, or inherits them from the family class it subclasses
(``qwen3-moe`` is built on ``qwen3``). The registry (``models/registry.py``) imports the same
modules (:func:`family_modules`) to register the classes themselves and checks that the names
agree; ``tests/test_registry.py`` checks every attribute.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

from lov15_megatron.convert.errors import ConversionError

#: Where an attribute the listing reads is not stated: ``ModelFamily``'s default.
_DEFAULTS: dict[str, object] = {"is_language_model": False}
_MISSING = object()
_ClassKey = tuple[str, str]  # (module, class name)
T = TypeVar("T")


@dataclass(frozen=True)
class FamilyEntry:
    """What the listing knows of one registered family."""

    name: str  # the ``--model`` name
    summary: str  # one line for ``--help``
    is_language_model: bool
    module: str  # the ``family.py`` module that registers it


@dataclass(frozen=True)
class _ClassSource:
    """One class of a ``family.py`` as written: its literal attributes, bases and decorator."""

    literals: dict[str, object]
    bases: list[_ClassKey]
    registered: bool


def family_modules() -> dict[str, Path]:
    """The ``family`` module of every family folder (each subpackage of ``lov15_megatron.models``
    with a ``family.py``) by module name, with its source file."""
    import lov15_megatron.models as models

    found: dict[str, Path] = {}
    for info in pkgutil.iter_modules(models.__path__):
        if not info.ispkg:
            continue
        spec = importlib.util.find_spec(f"{models.__name__}.{info.name}.family")
        if spec is not None and spec.origin is not None:
            found[spec.name] = Path(spec.origin)
    return found


def _classes(module: str, path: Path) -> dict[_ClassKey, _ClassSource]:
    """The top-level classes of one ``family.py``; a base is resolved through the file's
    ``from … import`` lines (or is the file's own class)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imported: dict[str, _ClassKey] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    classes: dict[_ClassKey, _ClassSource] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        literals: dict[str, object] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                target, value = stmt.target, stmt.value
            else:
                continue
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
                literals[target.id] = value.value
        bases = [imported.get(b.id, (module, b.id)) for b in node.bases if isinstance(b, ast.Name)]
        decorators = node.decorator_list
        registered = any(isinstance(d, ast.Name) and d.id == "register_family" for d in decorators)
        classes[(module, node.name)] = _ClassSource(literals, bases, registered)
    return classes


def _attribute(classes: dict[_ClassKey, _ClassSource], key: _ClassKey, attr: str) -> object:
    """A class's literal ``attr``, its own or inherited from a family class (``_MISSING``)."""
    source = classes.get(key)
    if source is None:  # a class outside the family folders (ModelFamily)
        return _MISSING
    if attr in source.literals:
        return source.literals[attr]
    for base in source.bases:
        value = _attribute(classes, base, attr)
        if value is not _MISSING:
            return value
    return _MISSING


def _stated(classes: dict[_ClassKey, _ClassSource], key: _ClassKey, attr: str, kind: type[T],
            path: Path) -> T:  # fmt: skip
    """A registered class's ``attr`` (its own literal, inherited or ``ModelFamily``'s default)."""
    value = _attribute(classes, key, attr)
    value = _DEFAULTS.get(attr, value) if value is _MISSING else value
    if not isinstance(value, kind):
        raise TypeError(
            f"{path}: @register_family class {key[1]} must state {attr} as a {kind.__name__} "
            "literal in its body (or inherit one): the catalog reads it without importing it"
        )
    return value


@cache
def catalog() -> dict[str, FamilyEntry]:
    """Every registered family by name: the language models first (those the others are built
    over), each group by name; the registry lists its families in this order."""
    modules = family_modules()
    classes: dict[_ClassKey, _ClassSource] = {}
    for module, path in modules.items():
        classes.update(_classes(module, path))
    entries = [
        FamilyEntry(
            name=_stated(classes, key, "name", str, modules[key[0]]),
            summary=_stated(classes, key, "summary", str, modules[key[0]]),
            is_language_model=_stated(classes, key, "is_language_model", bool, modules[key[0]]),
            module=key[0],
        )
        for key, source in classes.items()
        if source.registered
    ]
    entries.sort(key=lambda e: (not e.is_language_model, e.name))
    return {e.name: e for e in entries}


def check_model_name(name: str) -> None:
    """ConversionError listing the registered names unless ``name`` is one; imports no family."""
    known = catalog()
    if name not in known:
        raise ConversionError(f"unknown --model {name!r}; registered models: {', '.join(known)}")
