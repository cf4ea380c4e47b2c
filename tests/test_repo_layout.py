"""The package's layout: its import graph has no cycle and no arrow back up, and the README's
layout table and ``pyproject.toml``'s package list match the tree.

The import graph is read from the source (every ``import``, also those inside functions, plus
the implicit import of each parent package), so an import that only runs on some path counts.
One subprocess then imports every module, which catches what the static graph cannot (a
module that fails to import, a name that moved).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lov15_megatron"

#: Layers, lowest first. A module may import from its own layer or below, never from above.
LAYERS: dict[str, int] = {
    "config": 0,
    "runtime": 1,
    "data": 1,
    "checkpoint_dir": 1,
    "hf": 2,
    "convert": 3,
    "models": 4,
    "training": 5,
    "evaluation": 6,
    "train": 6,
    "verify": 6,
    "plan": 6,
    "cli": 7,
    "demo": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _imports(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (anywhere in the file), parents included."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target.startswith("lov15_megatron"):
                parts = target.split(".")
                found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    found.discard(name)
    return {t for t in found if not name.startswith(t + ".")}  # own parents run first anyway


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, modules) for name, file in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_cycle_between_modules_or_packages():
    graph = _graph()
    assert _cycles(graph) == []
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(_top(module), set()).update(_top(t) for t in targets)
    for package, targets in packages.items():
        targets.discard(package)
    assert _cycles(packages) == [], "cycle between subpackages"


def test_every_import_goes_down_the_layers():
    graph = _graph()
    unknown = sorted({_top(m) for m in graph} - set(LAYERS) - {""})
    assert unknown == [], f"give these a layer in LAYERS (and a README row): {unknown}"
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _top(module) and _top(target) and LAYERS[_top(target)] > LAYERS[_top(module)]
    ]
    assert upward == []


def test_the_graph_sees_function_level_imports():
    """The check would notice a deferred import that goes up (the case that hid cycles)."""
    graph = _graph()
    assert "lov15_megatron.training.checkpointing" in graph["lov15_megatron.verify"]
    assert "lov15_megatron.hf" in graph["lov15_megatron.models.llava_ov.stage0"]  # a parent package


def test_every_module_imports_in_one_fresh_interpreter():
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, *names],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def _layout_rows() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|]+) \|", section, flags=re.MULTILINE)
    return {p.strip("` ") for row in rows for p in row.split(",") if p.strip().startswith("`")}


def _tracked_top_level() -> set[str]:
    out = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True)
    entries = set()
    for line in out.stdout.splitlines():
        first, sep, _ = line.partition("/")
        if not first.startswith("."):
            entries.add(first + "/" if sep else first)
    return entries


def test_readme_layout_table_lists_every_package_and_top_level_entry():
    rows = _layout_rows()
    wanted = {e for e in _tracked_top_level() if e.endswith("/") or e == "Dockerfile"}
    wanted |= {
        f"lov15_megatron/{p.name}/" if p.is_dir() else f"lov15_megatron/{p.name}"
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.stem != "__init__")
    }
    assert sorted(wanted - rows) == [], "rows missing from the README's layout table"
    assert sorted(r for r in rows if not (ROOT / r).exists()) == [], "rows naming no path"


def test_pyproject_lists_every_package():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")} | {
        "lov15_megatron.configs"
    }
    assert listed == found
