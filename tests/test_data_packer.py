"""tools/pack_offline.py: completeness, content, bounds, determinism, resume, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import (
    build_mixed_sources,
    image_bytes,
    kill_when_blocked_on,
    pack,
    pack_command,
    packed_tree,
    read_packs,
)

from lov15_megatron.data.offline_packing import PackingError, partial_path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Sources in all four layouts and a reference packing with one worker."""
    root = tmp_path_factory.mktemp("mixed")
    inputs = build_mixed_sources(root / "src")
    report = pack(inputs, root / "ref", workers=1)
    return root, inputs, report


def _expected_samples(root: Path) -> dict[str, tuple[list[dict], list[bytes]]]:
    """origin -> (messages, image bytes), written independently of the readers."""
    src = root / "src"
    role = {"human": "user", "gpt": "assistant"}
    expected = {}
    for index, record in enumerate(json.loads((src / "llava.json").read_text())):
        images = record.get("image", [])
        images = images if isinstance(images, list) else [images]
        messages = [
            {"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]
        ]
        expected[f"{src / 'llava.json'}:record {index} (id {record['id']})"] = (
            messages,
            [(src / name).read_bytes() for name in images],
        )
    for index, line in enumerate((src / "messages.jsonl").read_text().splitlines()):
        record = json.loads(line)
        messages = []
        for turn in record["messages"]:
            content = turn["content"]
            if isinstance(content, list):
                content = "".join(p.get("text", "<image>") for p in content)
            messages.append({"role": turn["role"], "content": content})
        images = [(src / name).read_bytes() for name in record.get("images", [])]
        expected[f"{src / 'messages.jsonl'}:record {index}"] = (messages, images)
    import tarfile

    with tarfile.open(src / "wds.tar") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    for index in range(4):
        key = f"sample{index:03d}"
        record = json.loads(members[f"{key}.json"])
        image = next(
            data
            for name, data in members.items()
            if name.startswith(key + ".") and not name.endswith("json")
        )
        messages = [
            {"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]
        ]
        expected[f"{src / 'wds.tar'}:{key} (tar sample {index})"] = (messages, [image])
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(src / "mid.parquet").to_pylist()):
        messages = [
            {"role": "user", "content": ""},
            {"role": "assistant", "content": row["caption"]},
        ]
        origin = f"{src / 'mid.parquet'}:row {index} (id {row['id']})"
        expected[origin] = (messages, [row["image"]["bytes"]])
    return expected


def test_every_sample_in_exactly_one_pack_unchanged(mixed):
    root, _, report = mixed
    expected = _expected_samples(root)
    seen: dict[str, int] = {}
    for record, images in read_packs(root / "ref").values():
        assert sum(s["length"] for s in record["samples"]) <= report["seq_len"]
        for sample in record["samples"]:
            seen[sample["origin"]] = seen.get(sample["origin"], 0) + 1
            messages, image_data = expected[sample["origin"]]
            assert sample["messages"] == messages
            assert [images[name] for name in sample["images"]] == image_data
    assert seen == dict.fromkeys(expected, 1)
    assert report["samples_in"] == report["samples_packed"] == len(expected) == 15
    assert report["samples_skipped"] == {}
    assert report["packs"] == len(read_packs(root / "ref")) >= 3
    for key in ("samples_per_pack", "fill_efficiency", "padding_compression", "length_histogram"):
        assert key in report
    assert sum(report["length_histogram"]["counts"]) == 15
    on_disk = json.loads((root / "ref" / "pack_report.json").read_text())
    assert on_disk["packs"] == report["packs"] and "wall_time_s" in on_disk


def test_deterministic_across_runs_and_worker_counts(mixed, tmp_path):
    root, inputs, _ = mixed
    pack(inputs, tmp_path / "w2", workers=2)
    pack(inputs, tmp_path / "w3", workers=3)
    reference = packed_tree(root / "ref")
    assert len([name for name in reference if name.endswith(".tar")]) >= 3
    assert packed_tree(tmp_path / "w2") == reference
    assert packed_tree(tmp_path / "w3") == reference


def test_resume_after_killed_run(mixed, tmp_path):
    """The one-command run, SIGKILLed while writing its third shard, then run again."""
    root, inputs, report = mixed
    output = tmp_path / "out"
    shards = partial_path(output) / "dataset" / "shards"
    shards.mkdir(parents=True)
    kill_when_blocked_on(pack_command(inputs, output), shards / "pack-000002.tar.tmp")
    assert not output.exists()  # nothing complete-looking
    done = sorted(path.name for path in shards.glob("*.tar"))
    assert done == ["pack-000000.tar", "pack-000001.tar"]
    before = (shards / done[0]).stat()
    pack(inputs, output)  # the same arguments, in-process
    after = (output / "shards" / done[0]).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not redone
    resumed = json.loads((output / "pack_report.json").read_text())
    assert resumed["shards_written_this_run"] == report["shards"] - 2
    assert not partial_path(output).exists()
    assert packed_tree(output) == packed_tree(root / "ref")


def _bad_inputs(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(image_bytes(40, 40, "PNG"))
    (root / "images" / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")

    def record(user, answer="Fine.", image=None):
        out = {
            "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        }
        if image:
            out["image"] = image
        return json.dumps(out)

    lines = [
        record("<image> ok", image="images/ok.png"),
        "{not json",
        record("<image> gone", image="images/missing.png"),
        record("<image> corrupt", image="images/bad.jpg"),
        record("<image><image> two", image="images/ok.png"),
        record("long " * 400),
        json.dumps({"id": "no-turns"}),
    ]
    path = root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_inputs_are_counted_with_skip(tmp_path):
    source = _bad_inputs(tmp_path / "src")
    report = pack([str(source)], tmp_path / "out", on_error="skip")
    assert report["samples_in"] == 7 and report["samples_packed"] == 1
    assert report["samples_skipped"] == {
        "corrupt_image": 1,
        "image_count_mismatch": 1,
        "malformed_record": 2,
        "missing_image": 1,
        "too_long": 1,
    }
    examples = "\n".join(report["skipped_examples"])
    for record in (1, 2, 3, 4, 5, 6):
        assert f"{source}:record {record}" in examples


def test_bad_input_fails_naming_file_and_record(tmp_path):
    source = _bad_inputs(tmp_path / "src")
    with pytest.raises(PackingError, match=rf"{source}:record 1.*malformed_record"):
        pack([str(source)], tmp_path / "out", on_error="fail")
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


def test_cli_exits_2_on_bad_input_and_energon_info_works(mixed, tmp_path):
    source = _bad_inputs(tmp_path / "src")
    command = pack_command([str(source)], tmp_path / "out")
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: bad input: ") and "Traceback" not in failed.stderr
    assert f"{source}:record 1" in failed.stderr
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()
    missing = subprocess.run(
        pack_command([str(tmp_path / "nope.jsonl")], tmp_path / "out"),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: --input ")
    root, _, report = mixed
    energon = Path(sys.executable).with_name("energon")
    info = subprocess.run([str(energon), "info", str(root / "ref")], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert f"{report['packs']} samples" in info.stdout and "PackedVLMSample" in info.stdout


def test_balanced_vision_cost_keeps_samples_and_pack_lengths(mixed, tmp_path):
    root, inputs, report = mixed
    balanced = pack(inputs, tmp_path / "bal", balance_vision=True)
    spread = balanced["vision_balance"]
    assert spread["enabled"] and spread["without"] == report["vision_balance"]["without"]
    assert spread["with"]["vit_cost_max_over_mean"] <= spread["without"]["vit_cost_max_over_mean"]
    assert balanced["fill_efficiency"] == report["fill_efficiency"]
    reference, packs = read_packs(root / "ref"), read_packs(tmp_path / "bal")
    assert sorted(packs) == sorted(reference)

    def lengths(record):
        return sorted(sample["length"] for sample in record["samples"])

    assert {k: lengths(r) for k, (r, _) in packs.items()} == {
        k: lengths(r) for k, (r, _) in reference.items()
    }
    origins = [s["origin"] for record, _ in packs.values() for s in record["samples"]]
    assert sorted(origins) == sorted(
        s["origin"] for record, _ in reference.values() for s in record["samples"]
    )
    assert len(set(origins)) == len(origins) == report["samples_packed"]
