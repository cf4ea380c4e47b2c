"""lov15-megatron: LLaVA-OneVision-1.5 pretraining on Megatron-Core."""

from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    """The installed distribution's version; ``pyproject.toml``'s ``[project] version`` is its one
    source. A source checkout that was never installed reads that file directly."""
    try:
        return version("lov15-megatron")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        if not pyproject.is_file():
            return "0+unknown"
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])


__version__ = _version()
