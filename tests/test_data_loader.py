"""Energon side: loading packed shards, task encoder consistency, batching, state, blends, DP."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import build_mixed_sources, pack, read_packs

from lov15_megatron.data import special_tokens as st
from lov15_megatron.data.energon_dataset import prepare_raw_webdataset
from lov15_megatron.data.image_processing import DEFAULT_IMAGE_CONFIG
from lov15_megatron.data.loader import build_train_loader, data_parallel_worker_config
from lov15_megatron.data.task_encoder import encode_subsample
from lov15_megatron.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen-offline")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    inputs = build_mixed_sources(root / "src")
    report = pack(inputs, root / "packed", seq_len=160, workers=1)
    caption = pack(inputs[3:], root / "captions", seq_len=160, kind="caption", workers=1)
    return root, report, caption


def _loader(path, tokenizer, batch=1, rank=0, world=1, workers=0):
    return build_train_loader(
        path,
        tokenizer=tokenizer,
        micro_batch_size=batch,
        worker_config=data_parallel_worker_config(rank, world, workers),
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
    )


def _take(loader, count):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out
    return out


def test_batch_equals_sub_samples_encoded_one_by_one(packed, tokenizer):
    root, report, _ = packed
    packs = read_packs(root / "packed")
    assert report["packs"] == len(packs) >= 4
    batches = _take(_loader(root / "packed", tokenizer), len(packs))
    assert sorted(b.__key__[0] for b in batches) == sorted(packs)  # one epoch = every pack
    for batch in batches:
        record, images = packs[batch.__key__[0]]
        ids, labels, positions, pixels, grids, lengths = [], [], [], [], [], []
        for sample in record["samples"]:
            text, processed = encode_subsample(
                sample, images, tokenizer, "instruct", DEFAULT_IMAGE_CONFIG
            )
            assert len(text) == sample["length"]  # packer length == task-encoder length
            ids += text.input_ids
            labels += text.labels
            positions += list(range(len(text)))
            pixels += [torch.from_numpy(p.pixel_values) for p in processed]
            grids += [p.grid_thw for p in processed]
            lengths.append(len(text))
        assert batch.input_ids[0].tolist() == ids
        assert batch.labels[0].tolist() == labels
        assert batch.position_ids[0].tolist() == positions
        assert batch.loss_mask[0].tolist() == [float(x != st.IGNORE_INDEX) for x in labels]
        assert batch.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        assert batch.image_grid_thw.tolist() == [list(g) for g in grids]
        if pixels:
            assert torch.equal(batch.pixel_values, torch.cat(pixels))
        assert (batch.input_ids == st.IMAGE_PAD_ID).sum() * 4 == sum(h * w for _, h, w in grids)


def test_micro_batch_layout(packed, tokenizer):
    root, _, _ = packed
    batch = _take(_loader(root / "packed", tokenizer, batch=2), 1)[0]
    lengths = [sum(row) for row in batch.seqlens]
    width = batch.input_ids.shape[1]
    assert batch.input_ids.shape == (2, max(lengths))
    expected = [0]
    for row, row_lengths in enumerate(batch.seqlens):
        for length in row_lengths:
            expected.append(expected[-1] + length)
        if sum(row_lengths) < width:
            expected.append((row + 1) * width)  # padding tail is its own segment
    assert batch.cu_seqlens.tolist() == expected
    flat_positions = batch.position_ids.reshape(-1)
    starts = batch.cu_seqlens[:-1].long()
    assert (flat_positions[starts] == 0).all()
    short = min(range(2), key=lambda r: lengths[r])
    assert (batch.input_ids[short, lengths[short] :] == st.PAD_ID).all()
    assert (batch.loss_mask[short, lengths[short] :] == 0).all()
    assert batch.max_seqlen == int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())


def test_loader_state_restore_yields_the_remaining_samples(packed, tokenizer):
    root, _, _ = packed
    loader = _loader(root / "packed", tokenizer)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.save_state_rank()
    expected = [next(iterator).__key__ for _ in range(6)]
    restored = _loader(root / "packed", tokenizer)
    restored.restore_state_rank(state)
    assert [b.__key__ for b in _take(restored, 6)] == expected


def test_data_parallel_ranks_get_disjoint_shards(packed, tokenizer):
    root, report, _ = packed
    keys = []
    for rank in range(2):
        loader = _loader(root / "packed", tokenizer, rank=rank, world=2)
        keys.append({b.__key__[0] for b in _take(loader, len(loader))})
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == report["packs"]


def test_blend_metadataset_with_kind_override(packed, tokenizer, tmp_path):
    root, _, caption = packed
    (tmp_path / "blend.yaml").write_text(
        "__module__: megatron.energon\n"
        "__class__: MetadatasetV2\n"
        "splits:\n"
        "  train:\n"
        "    blend:\n"
        f"      - weight: 1\n        path: {root / 'packed'}\n"
        f"      - weight: 1\n        path: {root / 'captions'}\n"
        f"      - weight: 1\n        path: {root / 'captions'}\n"
        "        subflavors: {kind: instruct}\n"
    )
    batches = _take(_loader(tmp_path / "blend.yaml", tokenizer), 60)
    kinds = [b.__subflavors__[0]["kind"] for b in batches]
    assert {"caption", "instruct"} <= set(kinds)
    # the same caption pack trains on more tokens as caption than as instruct
    per_key: dict[str, dict[str, float]] = {}
    for batch, kind in zip(batches, kinds, strict=True):
        if batch.__sources__[0].dataset_path.name == "captions":
            per_key.setdefault(batch.__key__[0], {})[kind] = batch.loss_mask.sum().item()
    both = [v for v in per_key.values() if len(v) == 2]
    assert both and all(v["caption"] > v["instruct"] for v in both)


def test_unpacked_webdataset_through_the_same_encoder(packed, tokenizer):
    root, _, _ = packed
    raw = root / "src"  # wds.tar lives here
    prepare_raw_webdataset(raw, ["wds.tar"], kind="instruct")
    batches = _take(_loader(raw, tokenizer), 4)
    assert sorted(b.__key__[0] for b in batches) == [f"sample{i:03d}" for i in range(4)]
    for batch in batches:
        assert len(batch.seqlens[0]) == 1 and batch.cu_seqlens.tolist() == [0, batch.seqlens[0][0]]
        answer = tokenizer.decode([t for t in batch.labels[0].tolist() if t != st.IGNORE_INDEX])
        assert answer == f"Answer number {int(batch.__key__[0][-3:])}.<|im_end|>"
        assert batch.image_grid_thw.shape == (1, 3)


def test_longest_side_cap_applies_before_the_pixel_budget(tokenizer, tmp_path):
    """The release's stage 2 caps the longest side at 1000 px, then resizes within the pixel
    budget: a 2000 × 600 image arrives with the grid of 1000 × 300 (transformers' smart_resize,
    the independent reference); without the cap it keeps its own size."""
    import io
    import json
    import tarfile

    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from lov15_megatron.data.image_processing import ImageConfig

    raw = tmp_path / "raw"
    raw.mkdir()
    image = io.BytesIO()
    Image.new("RGB", (2000, 600), (200, 30, 30)).save(image, format="PNG")
    record = {"conversations": [{"from": "human", "value": "<image>\nColour?"},
                                {"from": "gpt", "value": "Red."}]}  # fmt: skip
    with tarfile.open(raw / "wide.tar", "w") as archive:
        for name, payload in (("wide.json", json.dumps(record).encode()),
                              ("wide.png", image.getvalue())):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    prepare_raw_webdataset(raw, ["wide.tar"], kind="instruct")
    budget = DEFAULT_IMAGE_CONFIG
    for cap, (height, width) in ((1000, (300, 1000)), (None, (600, 2000))):
        loader = build_train_loader(
            raw, tokenizer=tokenizer, micro_batch_size=1,
            worker_config=data_parallel_worker_config(0, 1, 0),
            image_config=ImageConfig(budget.min_pixels, budget.max_pixels, cap),
            shuffle_buffer_size=None, max_samples_per_sequence=None,
        )  # fmt: skip
        (batch,) = _take(loader, 1)
        h, w = smart_resize(height, width, factor=28, min_pixels=budget.min_pixels,
                            max_pixels=budget.max_pixels)  # fmt: skip
        assert batch.image_grid_thw.tolist() == [[1, h // 14, w // 14]], (cap, h, w)


def test_one_sample_per_pack_with_the_side_cap_reads_back(tokenizer, tmp_path):
    """The release's stage-2 data: tools/pack_offline.py --one-sample-per-pack --max-image-side
    writes one sample per sequence, measured with the cap; the loader with the same cap reads
    every sample back as its own row (and the cap changed the grid of the wide image)."""
    import json as json_lib

    from PIL import Image

    from lov15_megatron.data.image_processing import ImageConfig

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    Image.new("RGB", (2000, 600), (10, 200, 10)).save(src / "images" / "wide.png")
    Image.new("RGB", (300, 200), (10, 10, 200)).save(src / "images" / "small.png")
    records = [
        {"id": f"r{i}", "image": f"images/{name}.png",
         "conversations": [{"from": "human", "value": "<image>\nColour?"},
                           {"from": "gpt", "value": f"Answer {i}."}]}
        for i, name in enumerate(["wide", "small", "wide", "small", "small"])
    ]  # fmt: skip
    (src / "data.json").write_text(json_lib.dumps(records))
    out = tmp_path / "unpacked"
    report = pack([str(src / "data.json")], out, seq_len=2048, kind="instruct",
                  max_image_side=1000, one_sample_per_pack=True, max_packs_per_shard=2)  # fmt: skip
    assert (report["packs"], report["samples_per_pack"]) == (5, 1.0)
    assert report["algorithm"] == "one_sample_per_pack" and report["max_image_side"] == 1000
    budget = DEFAULT_IMAGE_CONFIG
    loader = build_train_loader(
        out, tokenizer=tokenizer, micro_batch_size=1,
        worker_config=data_parallel_worker_config(0, 1, 0),
        image_config=ImageConfig(budget.min_pixels, budget.max_pixels, 1000),
        shuffle_buffer_size=None, max_samples_per_sequence=None,
    )  # fmt: skip
    batches = _take(loader, 5)
    assert sorted(len(b.seqlens[0]) for b in batches) == [1] * 5  # one sample per row
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(300, 1000, factor=28, min_pixels=budget.min_pixels,
                        max_pixels=budget.max_pixels)  # fmt: skip
    grids = [tuple(b.image_grid_thw[0].tolist()) for b in batches]
    assert grids.count((1, h // 14, w // 14)) == 2  # both wide images arrive capped
