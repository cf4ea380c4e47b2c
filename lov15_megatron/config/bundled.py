"""The YAML configs shipped with the package, so that documented commands work from any directory.

The repository's ``configs/`` folder is installed as package data (``lov15_megatron/configs``;
see ``pyproject.toml``). A ``--config`` path that does not exist is looked up there, so
``--config configs/quickstart/stage1.yaml`` means the same file in a source checkout, in any
working directory, and after ``pip install .``. A path that exists is always used as given, so a
user's own edited copy wins.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def configs_dir() -> Path | None:
    """The shipped configs: inside an installed package, else the source checkout's ``configs/``."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def find_config(path: str | os.PathLike[str]) -> Path:
    """``path`` if it exists, else the shipped config of that name (``configs/`` is optional)."""
    given = Path(path)
    root = configs_dir()
    if given.exists() or given.is_absolute() or root is None:
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    shipped = root.joinpath(*parts) if parts else root
    return shipped if shipped.is_file() else given


__all__ = ["configs_dir", "find_config"]
