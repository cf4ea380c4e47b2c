"""The package installed non-editably works without the repository.

The repository's files (tracked and not ignored) are copied to a temporary folder, built into a
wheel and installed with ``pip install --no-deps`` into a fresh virtual environment. Its
dependencies come from this environment's ``site-packages`` through a ``.pth`` file listing a
folder of links to everything there except this project's own (editable) install, so no
dependency is downloaded and the project can only be imported from the new environment. From a
third, empty directory the test then runs ``--help`` of every console script, loads a shipped
config by its documented path, and runs the quickstart's first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # builds and installs a wheel into a fresh environment

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))}\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    )
    return out


def _dependency_links(target: Path) -> Path:
    """A folder of links to this environment's installed distributions, minus this project."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("lov15_megatron", "__editable__", "_lov15")) or name.endswith(".pth"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from a wheel of its tracked files."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).write_bytes((ROOT / rel).read_bytes())
    # Not --quiet: the build backend's own output is what the install shows a user, and it must
    # carry no warning (e.g. configs/ subfolders "absent from the `packages` configuration", or a
    # deprecated project.license table).
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-v", "-w", str(base / "dist"), str(source)], cwd=base)  # fmt: skip
    warnings = [line for line in (build.stdout + build.stderr).splitlines() if "Warning" in line]
    assert warnings == [], warnings
    (wheel,) = (base / "dist").glob("lov15_megatron-*.whl")

    venv = base / "venv"
    _run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    venv_site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
             cwd=base).stdout.strip()
    )  # fmt: skip
    deps = _dependency_links(base / "deps")
    (venv_site / "_lov15_test_deps.pth").write_text(f"{deps}\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
         cwd=base)  # fmt: skip
    return venv


def test_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path) -> None:
    code = (
        "import json, lov15_megatron, lov15_megatron.config.bundled as b; "
        "print(json.dumps([lov15_megatron.__file__, str(b.configs_dir())]))"
    )
    out = _run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path)
    module, configs = json.loads(out.stdout.splitlines()[-1])
    assert Path(module).is_relative_to(installed), module
    assert Path(configs).is_relative_to(installed) and Path(configs).name == "configs", configs
    shipped = sorted(p.relative_to(configs).as_posix() for p in Path(configs).rglob("*.yaml"))
    repo = ROOT / "configs"
    assert shipped == sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*.yaml"))


def test_every_console_script_answers_help_from_any_directory(installed, tmp_path) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 7
    for name in scripts:
        out = _run([str(installed / "bin" / name), "--help"], cwd=tmp_path)
        assert "usage:" in out.stdout, (name, out.stdout[:500])


def test_shipped_config_and_quickstart_first_step_from_any_directory(installed, tmp_path) -> None:
    data = tmp_path / "packed"
    (data / ".nv-meta").mkdir(parents=True)
    (data / ".nv-meta" / "dataset.yaml").write_text("{}\n")
    code = (
        "from lov15_megatron.config import load_config; "
        f"c = load_config('configs/quickstart/stage1.yaml', ['data.path={data}']); "
        "print(c.train.trainable, c.parallel.tensor_model_parallel_size)"
    )
    out = _run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path)
    assert out.stdout.split() == ["['merger']", "2"], out.stdout

    qs = tmp_path / "qs"
    out = _run([str(installed / "bin" / "lov15-quickstart"), "--size", "small", "--out", "qs",
                "--stop-after", "data"], cwd=tmp_path)  # fmt: skip
    assert "stopped after step 'data'" in out.stdout
    assert sorted(p.name for p in (qs / "data").iterdir()) == [
        "caption", "eval", "instruct", "metadata.json",
    ]  # fmt: skip
    assert not (qs / "stage0_hf").exists()  # it stopped where it was told
