"""The video sampling a training run records from its data (``checkpoint_dir``): one packed
directory, or a metadataset YAML over several, whose packed directories with videos must agree.

The packed directories are written here by hand: only their ``pack_report.json`` matters, and
its ``videos`` entry is written from the documented fields (``mode``, ``videos``, ``frames`` and
the six sampling flags ``fps``, ``fps_min_frames``, ``fps_max_frames``, ``frame_min_pixels``,
``frame_max_pixels``, ``video_max_pixels``); the metadatasets are Energon ``MetadatasetV2`` YAML
as a user writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lov15_megatron.checkpoint_dir import describe_model, packed_video_settings
from lov15_megatron.config import ConfigError, config_from_dict

RELEASE = {  # the release's defaults: fps 2, 4…768 frames, 128·28² … 768·28², 65536·28²
    "fps": 2.0,
    "fps_min_frames": 4,
    "fps_max_frames": 768,
    "frame_min_pixels": 100352,
    "frame_max_pixels": 602112,
    "video_max_pixels": 51380224,
}


def _packed(directory: Path, videos: dict | None) -> Path:
    """A packed directory whose report has ``videos`` (``None``: an image-only packer run)."""
    directory.mkdir(parents=True)
    entry = {"mode": "skip", "videos": 0, "frames": 0}
    if videos is not None:
        entry = {"mode": "pack", "videos": 3, "frames": 24, **RELEASE, **videos}
    report = {"samples_packed": 5, "videos": entry}
    (directory / "pack_report.json").write_text(json.dumps(report))
    return directory


def _blend(path: Path, *entries: str, val: str | None = None) -> Path:
    lines = ["__module__: megatron.energon", "__class__: MetadatasetV2", "splits:", "  train:"]
    lines.append("    blend:")
    for entry in entries:
        lines += ["      - weight: 1", f"        path: {entry}"]
    lines += ["  val:", f"    path: {val or entries[0]}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_metadataset_records_the_video_sampling_its_packed_dirs_agree_on(tmp_path, capsys):
    _packed(tmp_path / "clips_a", {"fps": 1.0})
    _packed(tmp_path / "clips_b", {"fps": 1.0})
    _packed(tmp_path / "images", None)
    (tmp_path / "raw").mkdir()  # a dataset without a pack report
    (tmp_path / "sub").mkdir()
    nested = _blend(tmp_path / "sub" / "nested.yaml", "../clips_b", "../raw")
    (tmp_path / "sub" / "unused.yaml").write_text("not: [a metadataset")
    # relative paths from the YAML's folder; a nested metadataset followed
    blend = _blend(
        tmp_path / "blend.yaml", "clips_a", str(tmp_path / "images"), f"sub/{nested.name}"
    )
    expected = {
        "fps": 1.0,
        "min_frames": 4,
        "max_frames": 768,
        "frame_min_pixels": 100352,
        "frame_max_pixels": 602112,
        "video_max_pixels": 51380224,
    }
    assert packed_video_settings(blend) == expected
    # the run trains on the train split only: another sampling in the val split is not its own
    _packed(tmp_path / "clips_c", {"fps": 1.0, "fps_min_frames": 8})
    assert packed_video_settings(_blend(tmp_path / "v.yaml", "clips_a", val="clips_c")) == expected
    cfg = config_from_dict({"data": {"loader": "energon", "path": str(blend)}})
    assert describe_model(cfg, None, "llava-ov-1.5")["video"] == expected
    # image-only dirs alone: no video settings, as for one image-only packed dir
    only_images = _blend(tmp_path / "images.yaml", "images", "raw")
    assert packed_video_settings(only_images) is None
    assert packed_video_settings(tmp_path / "images") is None

    # A train split over dirs packed with other frame floors: an export carries one sampling.
    mixed = _blend(tmp_path / "mixed.yaml", "images", "clips_a", "clips_c")
    with pytest.raises(ConfigError) as error:
        packed_video_settings(mixed)
    message = str(error.value)
    assert f"{tmp_path / 'clips_a'} and {tmp_path / 'clips_c'}" in message
    assert "--fps-min-frames (4 vs 8)" in message

    # At training start: one line naming both dirs and the setting, exit 2, nothing built.
    from lov15_megatron.train import main

    status = main(
        ["--config", "configs/tiny/model.yaml", "runtime.device=cpu", f"data.path={mixed}"]
    )
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and err == [f"config error: {message}"]
    assert err[0].startswith(f"config error: data.path={mixed}: ")
    broken = tmp_path / "broken.yaml"
    broken.write_text("splits: [unclosed\n")
    assert main(["--config", "configs/tiny/model.yaml", f"data.path={broken}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "not a readable metadataset YAML" in line and str(broken) in line
