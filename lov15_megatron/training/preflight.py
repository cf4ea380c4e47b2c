"""Checks of a run's inputs that need no torch: they run before anything heavy is imported,
so a user's mistake ends in one line within a second (``python -m lov15_megatron.train``).
"""

from __future__ import annotations

from pathlib import Path

from lov15_megatron.config import ConfigError, RunConfig


def check_dataset_paths(cfg: RunConfig) -> None:
    """``data.path`` / ``data.valid_path`` must be Energon datasets (or metadataset YAMLs)
    before any rank starts reading; a ``ConfigError`` names the field and what is wrong."""
    if cfg.data.loader != "energon":
        return
    for field, value in (("data.path", cfg.data.path), ("data.valid_path", cfg.data.valid_path)):
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            raise ConfigError(f"{field}={value}: no such file or directory")
        if path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise ConfigError(
                    f"{field}={value}: a file, but not a metadataset YAML; give the directory "
                    f"that tools/pack_offline.py wrote"
                )
        elif not (path / ".nv-meta" / "dataset.yaml").exists():
            raise ConfigError(
                f"{field}={value}: not an Energon dataset (no .nv-meta/dataset.yaml); make one "
                f"with tools/pack_offline.py"
            )
