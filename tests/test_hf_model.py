"""Tests of the Hugging Face-side LLaVA-OneVision-1.5 model (``lov15_megatron.hf``).

Tiny random models built here; nothing comes from a hub. References are independent
``transformers`` models: ``MLCDVisionModel`` for the ViT, ``Qwen3ForCausalLM`` for the LM.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import raster_to_merge_order, read_safetensors, rice_vit_from_mlcd
from safetensors.torch import save_file
from tolerances import assert_close_fp32
from transformers import AutoModelForCausalLM, MLCDVisionConfig, MLCDVisionModel, Qwen3ForCausalLM

from lov15_megatron.hf import (
    AUTO_MAP,
    QWEN3_8B_TEXT_CONFIG,
    LLaVAOneVision1_5_Config,
    LLaVAOneVision1_5_ForConditionalGeneration,
    RiceViTConfig,
    RiceViTModel,
    merge_order_positions,
    save_pretrained_with_code,
)

PATCH = 14
VISION = {"depth": 2, "embed_dim": 64, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4}
TEXT = {
    "vocab_size": 1024,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": False,
}
IMAGE, VIDEO, V_START, V_END = 1000, 1001, 1002, 1003
# images as (h, w) in patches of 14 px: different sizes and aspect ratios
GRIDS = [(4, 6), (2, 2), (6, 4)]
# Longest reductions (docs/tolerances.md): the ViT's patch embedding (3·14·14 inputs; its MLP
# 128, sequences ≤ 24), the merger's 4·64, the LM's MLP (96; sequences ≤ 13).
VIT_LEN, MERGER_LEN = 3 * PATCH * PATCH, 4 * VISION["hidden_size"]
TEXT_LEN = TEXT["intermediate_size"]
FULL_LEN = max(VIT_LEN, MERGER_LEN, TEXT_LEN)


def tiny_config() -> LLaVAOneVision1_5_Config:
    return LLaVAOneVision1_5_Config(
        vision_config=dict(VISION),
        text_config=dict(TEXT),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (norm weights/biases included) so no mapping hides behind init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="module")
def model() -> LLaVAOneVision1_5_ForConditionalGeneration:
    torch.manual_seed(0)
    m = LLaVAOneVision1_5_ForConditionalGeneration(tiny_config()).eval()
    randomize_(m, seed=1)
    return m


def image(h: int, w: int, seed: int) -> torch.Tensor:
    """Random normalised image ``[3, 14h, 14w]``."""
    return torch.randn(3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(seed))


def patchify(img: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` -> ``[h*w, 588]`` rows in 2x2-merge order, each row (3, 14, 14) flattened."""
    _, height, width = img.shape
    bh, bw = height // (2 * PATCH), width // (2 * PATCH)
    x = img.reshape(3, bh, 2, PATCH, bw, 2, PATCH)  # c, br, ir, pr, bc, ic, pc
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # br, bc, ir, ic, c, pr, pc
    return x.reshape(bh * bw * 4, 3 * PATCH * PATCH)


def pack(grids: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` and ``image_grid_thw`` for images of the given patch grids."""
    images = [image(h, w, seed + i) for i, (h, w) in enumerate(grids)]
    pixel_values = torch.cat([patchify(img) for img in images])
    return pixel_values, torch.tensor([[1, h, w] for h, w in grids])


def prompt(grids: list[tuple[int, int]], text: list[int]) -> list[int]:
    ids = [5, 6]
    for h, w in grids:
        ids += [V_START] + [IMAGE] * (h * w // 4) + [V_END]
    return ids + text


def expected_tensor_shapes(config: LLaVAOneVision1_5_Config) -> dict[str, tuple[int, ...]]:
    """On-disk names and shapes, written out from the table in docs/model-reference.md §7."""
    v, t = config.vision_config, config.text_config
    d, hd, p = v.embed_dim, v.embed_dim // v.num_heads, v.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (d, 3, p, p),
        "visual.class_embedding": (d,),
        "visual.class_pos_emb": (1, hd // 2),
        "visual.pre_layernorm.weight": (d,),
        "visual.pre_layernorm.bias": (d,),
        "visual.merger.ln_q.weight": (d,),
        "visual.merger.ln_q.bias": (d,),
        "visual.merger.mlp.0.weight": (4 * d, 4 * d),
        "visual.merger.mlp.0.bias": (4 * d,),
        "visual.merger.mlp.2.weight": (t.hidden_size, 4 * d),
        "visual.merger.mlp.2.bias": (t.hidden_size,),
        "model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        "model.norm.weight": (t.hidden_size,),
        "lm_head.weight": (t.vocab_size, t.hidden_size),
    }
    for i in range(v.depth):
        b = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (d,)
        shapes |= {
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (v.intermediate_size, d),
            b + "mlp.fc1.bias": (v.intermediate_size,),
            b + "mlp.fc2.weight": (d, v.intermediate_size),
            b + "mlp.fc2.bias": (d,),
        }
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        b = f"model.layers.{i}."
        shapes |= {
            b + "self_attn.q_proj.weight": (q, t.hidden_size),
            b + "self_attn.k_proj.weight": (kv, t.hidden_size),
            b + "self_attn.v_proj.weight": (kv, t.hidden_size),
            b + "self_attn.o_proj.weight": (t.hidden_size, q),
            b + "self_attn.q_norm.weight": (t.head_dim,),
            b + "self_attn.k_norm.weight": (t.head_dim,),
            b + "mlp.gate_proj.weight": (t.intermediate_size, t.hidden_size),
            b + "mlp.up_proj.weight": (t.intermediate_size, t.hidden_size),
            b + "mlp.down_proj.weight": (t.hidden_size, t.intermediate_size),
            b + "input_layernorm.weight": (t.hidden_size,),
            b + "post_attention_layernorm.weight": (t.hidden_size,),
        }
    return shapes


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------


def test_default_config_matches_spec() -> None:
    config = LLaVAOneVision1_5_Config()
    assert config.model_type == "llavaonevision1_5"
    assert config.vision_config.model_type == "rice_vit"
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (
        151655,
        151656,
        151652,
    )
    t, v = config.text_config, config.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.head_dim) == (151936, 2560, 36, 128)
    assert t.rope_parameters["rope_theta"] == 5_000_000.0 and not config.tie_word_embeddings
    assert (v.depth, v.embed_dim, v.num_heads, v.intermediate_size) == (24, 1024, 16, 4096)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 1)
    assert v.text_hidden_size == 2560 and v.layer_norm_eps == 1e-5 and v.hidden_act == "gelu"
    saved = config.to_dict()
    assert saved["text_config"]["rope_theta"] == 5_000_000.0
    assert LLaVAOneVision1_5_Config.from_dict(saved).to_dict() == saved


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="text_hidden_size"):
        LLaVAOneVision1_5_Config(
            vision_config={**VISION, "text_hidden_size": 99}, text_config=dict(TEXT)
        )
    with pytest.raises(ValueError, match="multiple of 4"):
        RiceViTConfig(embed_dim=36, hidden_size=36, num_heads=6)  # head dim 6
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        LLaVAOneVision1_5_Config(vision_config=dict(VISION), text_config=dict(TEXT))


def test_rotary_frequencies_general_head_dim() -> None:
    """d/4 frequencies per axis with exponent -2j/(d/2); for d = 64: 16 and -2j/32."""
    for heads, width in ((4, 64), (16, 1024), (2, 64)):  # head dims 16, 64, 32
        vit = RiceViTModel(
            RiceViTConfig(depth=0, embed_dim=width, hidden_size=width, num_heads=heads)
        )
        d = width // heads
        inv = vit.rotary_inv_freq()
        assert inv.shape == (d // 4,) and vit.class_pos_emb.shape == (1, d // 2)
        j = torch.arange(d // 4, dtype=torch.float64)
        torch.testing.assert_close(inv.double(), 10000.0 ** (-2 * j / (d // 2)), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------
# vision tower
# ------------------------------------------------------------------------------------------


def test_merge_order_positions() -> None:
    pos = merge_order_positions(4, 6, 2)
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert sorted(map(tuple, pos.tolist())) == [(r, c) for r in range(4) for c in range(6)]
    raster = torch.arange(24).view(4, 6)
    assert torch.equal(raster[pos[:, 0], pos[:, 1]], raster_to_merge_order(4, 6))


@pytest.fixture(scope="module")
def mlcd_and_rice() -> tuple[MLCDVisionModel, RiceViTModel]:
    torch.manual_seed(0)
    mlcd_config = MLCDVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=PATCH,
        image_size=56,
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    mlcd = MLCDVisionModel(mlcd_config).eval()
    mlcd.set_attn_implementation("eager")
    randomize_(mlcd, seed=2)
    rice = RiceViTModel(RiceViTConfig(**VISION, text_hidden_size=48)).eval()
    missing, unexpected = rice.load_state_dict(
        rice_vit_from_mlcd(mlcd.state_dict(), rice=""), strict=False
    )
    assert not unexpected and all(k.startswith("merger.") for k in missing) and missing
    return mlcd, rice


def mlcd_features(mlcd: MLCDVisionModel, img: torch.Tensor) -> torch.Tensor:
    """MLCD's patch outputs (class token at index 0 dropped), reordered raster -> merge order."""
    hidden = mlcd(pixel_values=img.unsqueeze(0)).last_hidden_state[0]
    _, height, width = img.shape
    return hidden[1:][raster_to_merge_order(height // PATCH, width // PATCH)]


@torch.no_grad()
def test_vit_matches_mlcd_single_image(mlcd_and_rice) -> None:
    mlcd, rice = mlcd_and_rice
    img = image(4, 6, seed=10)
    ours = rice.get_vision_features(patchify(img), torch.tensor([[1, 4, 6]]))
    ref = mlcd_features(mlcd, img)
    assert ours.shape == (24, 64)
    assert ref.abs().max() > 0.5  # a real signal, not all zeros
    assert_close_fp32(ours, ref, VIT_LEN)


@torch.no_grad()
def test_vit_packed_images_equal_each_alone(mlcd_and_rice) -> None:
    """Several images in one call: each one's features equal running it alone (and MLCD).

    Guards against the release's class-token removal bug (docs/model-reference.md §2), which
    shifts every image after the first by one token.
    """
    mlcd, rice = mlcd_and_rice
    pixel_values, grid = pack(GRIDS, seed=20)
    packed = rice.get_vision_features(pixel_values, grid)
    assert packed.shape == (sum(h * w for h, w in GRIDS), 64)
    offset = 0
    for i, (h, w) in enumerate(GRIDS):
        img = image(h, w, seed=20 + i)
        alone = rice.get_vision_features(patchify(img), torch.tensor([[1, h, w]]))
        assert_close_fp32(packed[offset : offset + h * w], alone, VIT_LEN)
        assert_close_fp32(alone, mlcd_features(mlcd, img), VIT_LEN)
        offset += h * w


@torch.no_grad()
def test_merger_concatenates_2x2_blocks(model) -> None:
    vit = model.visual
    pixel_values, grid = pack([(4, 6)], seed=30)
    feats = vit.get_vision_features(pixel_values, grid)
    merged = vit(pixel_values, grid)
    assert merged.shape == (6, 48)
    # every 4 consecutive merge-order tokens are one 2x2 spatial block
    pos = merge_order_positions(4, 6, 2).view(6, 4, 2)
    assert torch.equal(
        pos - pos[:, :1], torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]).expand(6, 4, 2)
    )
    m = vit.merger
    for b in range(6):
        normed = [
            F.layer_norm(feats[4 * b + k], (64,), m.ln_q.weight, m.ln_q.bias, 1e-5)
            for k in range(4)
        ]
        hidden = F.gelu(torch.cat(normed) @ m.mlp[0].weight.T + m.mlp[0].bias, approximate="none")
        assert_close_fp32(merged[b], hidden @ m.mlp[2].weight.T + m.mlp[2].bias, MERGER_LEN)


@pytest.mark.parametrize(
    ("grid", "rows", "message"),
    [
        ([[2, 2, 2]], 8, "only images"),
        ([[1, 3, 2]], 6, "multiples of the merge size"),
        ([[1, 2, 2]], 8, "describes 4 patches but pixel_values has 8"),
    ],
)
def test_vit_bad_grid(model, grid, rows, message) -> None:
    with pytest.raises(ValueError, match=message):
        model.visual(torch.zeros(rows, 588), torch.tensor(grid))


# ------------------------------------------------------------------------------------------
# language model and full model
# ------------------------------------------------------------------------------------------


def qwen_reference(model) -> Qwen3ForCausalLM:
    qwen = Qwen3ForCausalLM(model.config.text_config).eval()
    lm_state = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    qwen.load_state_dict(lm_state, strict=True)
    return qwen


@torch.no_grad()
def test_text_only_matches_qwen3(model) -> None:
    qwen = qwen_reference(model)
    ids = torch.randint(0, 900, (2, 11), generator=torch.Generator().manual_seed(3))
    ours = model(input_ids=ids).logits
    assert ours.shape == (2, 11, 1024)
    assert_close_fp32(ours, qwen(input_ids=ids).logits, TEXT_LEN)
    gen_kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **gen_kwargs), qwen.generate(ids, **gen_kwargs))


@torch.no_grad()
def test_images_scattered_in_order(model) -> None:
    """Two sequences, three images: features land on the pad tokens row-major, in order."""
    pixel_values, grid = pack(GRIDS, seed=40)
    rows = [prompt(GRIDS[:2], [7, 8, 9]), prompt(GRIDS[2:], [7, 8, 9, 10, 11, 12])]
    ids = torch.tensor(rows)
    logits = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits

    features = model.visual(pixel_values, grid)
    embeds = model.model.embed_tokens(ids).clone()
    next_feature = 0
    for b, row in enumerate(rows):
        for s, token in enumerate(row):
            if token == IMAGE:
                embeds[b, s] = features[next_feature]
                next_feature += 1
    assert next_feature == features.shape[0] == sum(h * w // 4 for h, w in GRIDS)
    expected = qwen_reference(model)(inputs_embeds=embeds).logits
    assert_close_fp32(logits, expected, FULL_LEN)
    # and the images matter
    text_only = qwen_reference(model)(input_ids=ids).logits
    assert (logits - text_only).abs().max() > 1e-3


@torch.no_grad()
def test_loss_with_labels(model) -> None:
    pixel_values, grid = pack([(2, 2)], seed=41)
    ids = torch.tensor([prompt([(2, 2)], [7, 8, 9])])
    labels = ids.clone()
    labels[ids == IMAGE] = -100
    out = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, labels=labels)
    shift_logits, shift_labels = out.logits[0, :-1], labels[0, 1:]
    torch.testing.assert_close(
        out.loss, F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    )


def test_image_token_count_mismatch(model) -> None:
    pixel_values, grid = pack([(4, 6)], seed=42)  # 6 LM tokens
    ids = torch.tensor([prompt([(2, 2)], [7]) + [IMAGE] * 4])  # 1 + 4 = 5 pad tokens
    with pytest.raises(ValueError, match=r"5 image tokens .* 6 features"):
        model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


@torch.no_grad()
def test_generate_with_image_uses_cache_correctly(model) -> None:
    """Greedy ``generate`` (pixel_values on prefill only, KV cache) = full recomputation."""
    pixel_values, grid = pack([(4, 6), (2, 2)], seed=43)
    ids = torch.tensor([prompt([(4, 6), (2, 2)], [7, 8])])
    out = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (1, ids.shape[1] + 5)
    running = ids
    for _ in range(5):
        logits = model(input_ids=running, pixel_values=pixel_values, image_grid_thw=grid).logits
        running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, running)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------


def test_release_4b_tensor_names_and_shapes() -> None:
    """The default (4B) model has exactly the 698 on-disk tensors of docs/model-reference.md §7."""
    config = LLaVAOneVision1_5_Config()
    with torch.device("meta"):
        m = LLaVAOneVision1_5_ForConditionalGeneration(config)
    state = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = expected_tensor_shapes(config)
    assert len(expected) == 698
    assert state == expected
    assert state["visual.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert state["visual.merger.mlp.2.weight"] == (2560, 4096)
    assert state["model.layers.35.mlp.gate_proj.weight"] == (9728, 2560)
    # parameter count: docs/model-reference.md §1
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 2) == 4.74


def test_release_8b_parameter_count() -> None:
    config = LLaVAOneVision1_5_Config(text_config=dict(QWEN3_8B_TEXT_CONFIG))
    with torch.device("meta"):
        m = LLaVAOneVision1_5_ForConditionalGeneration(config)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected_tensor_shapes(config)
    # parameter count: docs/model-reference.md §1
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 2) == 8.53


@torch.no_grad()
def test_save_load_round_trip(model, tmp_path) -> None:
    save_dir = save_pretrained_with_code(model, tmp_path / "ckpt")
    on_disk = read_safetensors(save_dir)
    assert {k: tuple(v.shape) for k, v in on_disk.items()} == expected_tensor_shapes(model.config)
    state = model.state_dict()
    for key, tensor in on_disk.items():
        assert torch.equal(tensor, state[key]), key

    config = json.loads((save_dir / "config.json").read_text())
    assert config["model_type"] == "llavaonevision1_5"
    assert config["architectures"] == ["LLaVAOneVision1_5_ForConditionalGeneration"]
    assert config["auto_map"] == AUTO_MAP
    assert config["vision_config"]["model_type"] == "rice_vit"
    assert config["text_config"]["head_dim"] == 16 and config["image_token_id"] == IMAGE

    loaded = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(save_dir).eval()
    assert_same_weights(model, loaded)
    pixel_values, grid = pack(GRIDS[:2], seed=50)
    ids = torch.tensor([prompt(GRIDS[:2], [7, 8])])
    kwargs = {"input_ids": ids, "pixel_values": pixel_values, "image_grid_thw": grid}
    assert torch.equal(model(**kwargs).logits, loaded(**kwargs).logits)

    # sharded save (model.safetensors.index.json) loads the same
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert read_safetensors(tmp_path / "sharded").keys() == on_disk.keys()
    sharded = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(tmp_path / "sharded")
    assert_same_weights(model, sharded)


@torch.no_grad()
def test_load_newer_key_spelling(model, tmp_path) -> None:
    """``model.visual.*`` / ``model.language_model.*`` load; re-saving writes the release names."""
    newer = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key.removeprefix("model.")
        newer[key] = tensor.contiguous()
    src = tmp_path / "newer"
    src.mkdir()
    save_file(newer, src / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(src)

    loaded = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(src)
    assert_same_weights(model, loaded)
    loaded.save_pretrained(tmp_path / "resaved")
    assert read_safetensors(tmp_path / "resaved").keys() == model.state_dict().keys()


def test_modeling_files_are_self_contained() -> None:
    """The copied files import only the standard library, torch / transformers /
    huggingface_hub (the processor also numpy / PIL, which transformers requires, and PyAV, `av`,
    when it reads a video file) and each other."""
    import sys

    import lov15_megatron.hf.remote_code.modeling_llavaonevision1_5 as modeling

    allowed = {"torch", "transformers", "huggingface_hub", "numpy", "PIL", "av"}
    allowed |= set(sys.stdlib_module_names) | {"__future__"}
    for path in Path(modeling.__file__).parent.glob("*_llavaonevision1_5.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling configuration file
                    assert node.module == "configuration_llavaonevision1_5", path
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots)


@torch.no_grad()
def test_trust_remote_code_load_and_generate(model, tmp_path, isolated_hf_modules) -> None:
    save_dir = save_pretrained_with_code(model, tmp_path / "export")

    remote = AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True).eval()
    assert type(remote).__name__ == "LLaVAOneVision1_5_ForConditionalGeneration"
    assert not type(remote).__module__.startswith("lov15_megatron")
    assert re.match(r"transformers_modules\.", type(remote).__module__)
    assert_same_weights(model, remote)

    pixel_values, grid = pack([(2, 4)], seed=60)
    ids = torch.tensor([prompt([(2, 4)], [7])])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    out = remote.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, **kwargs)
    ref = model.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, **kwargs)
    assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out, ref)
