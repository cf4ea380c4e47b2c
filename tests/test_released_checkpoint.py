"""The release's published LLaVA-OneVision-1.5 checkpoints go in as they are.

The fixtures are written by hand in the layout the release's merge script and its 30B-A3B code
produce (not by our writers): ``config.json`` with ``model_type`` ``llavaonevision1_5``, the
release's text ``model_type`` ``LLaVAOneVision1_5_text`` (the Qwen3 fields merged into the
release's own text config), a top-level ``vocab_size`` of 152064 beside the 151936-row text
vocabulary, a ``rice_vit`` vision config without ``rope_theta``; two safetensors shards and
their index, under the release's tensor names (``visual.*``, ``model.*``, ``lm_head.weight``;
the MoE LM's experts one by one as ``mlp.experts.E.{gate,up,down}_proj`` with the router
``mlp.gate``). Tiny widths, random fp32.

Checked through the real CLI: ``hf-to-mcore`` converts; ``verify`` at TP 2 and at PP 2 matches
our HF model within the fp32 bound of docs/tolerances.md; ``mcore-to-hf --hf-template`` gives
the input tensors bit for bit and a config that our remote code loads with identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ok, read_safetensors, verify_layouts
from safetensors.torch import save_file
from tolerances import within_fp32

# The longest reduction of the forward is the ViT patch embedding: 3·14·14 = 588 inputs
# (docs/tolerances.md).
REDUCTION_LEN = 588
TEXT_VOCAB = 151936  # the release's text vocabulary (the image token ids are inside it)
RELEASE_TOP_VOCAB = 152064  # the release's top-level default, which no weight uses

VISION = dict(depth=2, width=32, heads=4, ffn=64)
TEXT = dict(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=64)
EXPERTS = dict(num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2)


def released_config(experts: bool = False) -> dict:
    """``config.json`` as the release's ``merge_model.py`` writes it (tiny widths)."""
    v, t = VISION, TEXT
    text = {
        "model_type": "LLaVAOneVision1_5_text",
        "architectures": ["Qwen3MoeForCausalLM" if experts else "Qwen3ForCausalLM"],
        "vocab_size": TEXT_VOCAB,
        "hidden_size": t["hidden"],
        "intermediate_size": t["ffn"],
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "num_key_value_heads": t["kv_heads"],
        "head_dim": t["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": t["layers"],
        "layer_types": ["full_attention"] * t["layers"],
        "image_token_id": None,
        "video_token_id": None,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "float32",
    }
    if experts:
        text.update(
            EXPERTS,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            router_aux_loss_coef=0.001,
            mlp_only_layers=[],
            output_router_logits=False,
        )
    vision = {
        "model_type": "rice_vit",
        "depth": v["depth"],
        "embed_dim": v["width"],
        "hidden_size": v["width"],
        "hidden_act": "gelu",
        "intermediate_size": v["ffn"],
        "num_heads": v["heads"],
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "text_hidden_size": t["hidden"],
    }  # no rope_theta: the release's Rice ViT fixes it in code
    return {
        "model_type": "llavaonevision1_5",
        "architectures": ["LLaVAOneVision1_5_ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_llavaonevision1_5.Llavaonevision1_5Config",
            "AutoModelForCausalLM": (
                "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"
            ),
        },
        "text_config": text,
        "vision_config": vision,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vocab_size": RELEASE_TOP_VOCAB,
        "torch_dtype": "float32",
        "transformers_version": "4.53.1",
    }


def released_shapes(experts: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor the release's model stores, by its on-disk name."""
    v, t = VISION, TEXT
    w, m = v["width"], v["width"] * 4
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (w, 3, 14, 14),
        "visual.class_embedding": (w,),
        "visual.class_pos_emb": (1, w // v["heads"] // 2),
        "visual.pre_layernorm.weight": (w,),
        "visual.pre_layernorm.bias": (w,),
        "visual.merger.ln_q.weight": (w,),
        "visual.merger.ln_q.bias": (w,),
        "visual.merger.mlp.0.weight": (m, m),
        "visual.merger.mlp.0.bias": (m,),
        "visual.merger.mlp.2.weight": (t["hidden"], m),
        "visual.merger.mlp.2.bias": (t["hidden"],),
    }
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes |= {f"{b}{norm}.weight": (w,), f"{b}{norm}.bias": (w,)}
        shapes |= {
            f"{b}attn.qkv.weight": (3 * w, w),
            f"{b}attn.qkv.bias": (3 * w,),
            f"{b}attn.proj.weight": (w, w),
            f"{b}attn.proj.bias": (w,),
            f"{b}mlp.fc1.weight": (v["ffn"], w),
            f"{b}mlp.fc1.bias": (v["ffn"],),
            f"{b}mlp.fc2.weight": (w, v["ffn"]),
            f"{b}mlp.fc2.bias": (w,),
        }
    h, d = t["hidden"], t["head_dim"]
    shapes |= {
        "model.embed_tokens.weight": (TEXT_VOCAB, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (TEXT_VOCAB, h),
    }
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            f"{p}input_layernorm.weight": (h,),
            f"{p}post_attention_layernorm.weight": (h,),
            f"{p}self_attn.q_proj.weight": (t["heads"] * d, h),
            f"{p}self_attn.k_proj.weight": (t["kv_heads"] * d, h),
            f"{p}self_attn.v_proj.weight": (t["kv_heads"] * d, h),
            f"{p}self_attn.o_proj.weight": (h, t["heads"] * d),
            f"{p}self_attn.q_norm.weight": (d,),
            f"{p}self_attn.k_norm.weight": (d,),
        }
        if not experts:
            shapes |= {
                f"{p}mlp.gate_proj.weight": (t["ffn"], h),
                f"{p}mlp.up_proj.weight": (t["ffn"], h),
                f"{p}mlp.down_proj.weight": (h, t["ffn"]),
            }
            continue
        f = EXPERTS["moe_intermediate_size"]
        shapes[f"{p}mlp.gate.weight"] = (EXPERTS["num_experts"], h)
        for e in range(EXPERTS["num_experts"]):
            x = f"{p}mlp.experts.{e}."
            shapes |= {
                f"{x}gate_proj.weight": (f, h),
                f"{x}up_proj.weight": (f, h),
                f"{x}down_proj.weight": (h, f),
            }
    return shapes


def write_released(path: Path, experts: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released-layout checkpoint directory in two shards with their index, as the release's
    ``save_pretrained`` lays them out; returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in released_shapes(experts).items():
        t = torch.randn(shape, generator=gen) * (0.1 if len(shape) == 1 else 0.2)
        if "norm" in name and name.endswith("weight"):  # norm1/2, ln_q, *_layernorm, q/k_norm
            t += 1.0
        tensors[name] = t
    path.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, t in tensors.items():  # the text embedding alone in the second shard
        shards[sorted(shards)[name == "model.embed_tokens.weight"]][name] = t
    for file, part in shards.items():
        save_file(part, path / file, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": {name: file for file, part in shards.items() for name in part},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(released_config(experts), indent=2))
    return tensors


def _convert(root: Path, experts: bool) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    hf, mc = root / "released", root / "mcore"
    tensors = write_released(hf, experts)
    line = ok("hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(hf),
              "--save-dir", str(mc), "--tp", "2", "--pp", "2")  # fmt: skip
    assert "hf-to-mcore: wrote" in line
    return hf, mc, tensors


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("released_dense"), experts=False)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("released_moe"), experts=True)


def test_released_config_reads_as_qwen3_with_text_vocab(dense):
    _, mc, _ = dense
    model = json.loads((mc / "lov15_model.json").read_text())["model_config"]
    lm, vision = model["language"], model["vision"]
    assert lm["num_experts"] is None
    assert lm["vocab_size"] == TEXT_VOCAB  # text_config's, not the top-level 152064
    assert lm["hidden_size"] == TEXT["hidden"] and lm["num_layers"] == TEXT["layers"]
    assert vision["rope_theta"] == 10000.0  # the release's Rice ViT value (no field in config)
    assert vision["hidden_size"] == VISION["width"]


VERIFY_LAYOUTS = [(2, 1), (1, 2)]


@pytest.fixture(scope="module")
def verified(dense):
    """``verify`` at both layouts in one launch of ranks."""
    hf, mc, _ = dense
    return verify_layouts("llava-ov-1.5", hf, mc, VERIFY_LAYOUTS)


@pytest.mark.parametrize("tp,pp", VERIFY_LAYOUTS)
def test_verify_logit_parity(verified, tp, pp):
    result = verified[tp, pp]
    assert (result["tp"], result["pp"]) == (tp, pp)
    assert result["shape"][-1] == TEXT_VOCAB
    assert within_fp32(result["max_abs_diff"], result["max_rel_diff"], REDUCTION_LEN), result
    assert result["top1_agreement"] == 1.0, result


def _our_logits(model_dir: Path, remote: bool) -> torch.Tensor:
    from lov15_megatron.models.registry import get_family

    if remote:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, trust_remote_code=True, dtype=torch.float32
        )
    else:
        from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration

        model = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32
        )
    model.eval()
    converter = get_family("llava-ov-1.5")
    cfg = converter.run_config(json.loads((model_dir / "config.json").read_text()))
    with torch.no_grad():
        return model(**converter.default_inputs(cfg)).logits


def _export(mc: Path, hf: Path, out: Path) -> dict:
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(mc), "--save-dir", str(out),
       "--hf-template", str(hf))  # fmt: skip
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_export_with_released_template(variant, request, tmp_path, isolated_hf_modules):
    hf, mc, tensors = request.getfixturevalue(variant)
    out = tmp_path / "export"
    config = _export(mc, hf, out)

    exported = read_safetensors(out)
    assert sorted(exported) == sorted(tensors)  # the release's names, experts one by one
    assert all(torch.equal(exported[k], tensors[k]) for k in tensors)

    released = released_config(experts=variant == "moe")
    assert config["model_type"] == "llavaonevision1_5"
    assert config["architectures"] == ["LLaVAOneVision1_5_ForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "LLaVAOneVision1_5_text"
    assert config["vocab_size"] == RELEASE_TOP_VOCAB
    assert config["auto_map"]["AutoModelForCausalLM"].endswith(
        "LLaVAOneVision1_5_ForConditionalGeneration"
    )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "rope_theta", *EXPERTS):
        assert config["text_config"].get(key) == released["text_config"].get(key), key

    theirs = _our_logits(out, remote=True)  # the export's own code, trust_remote_code
    ours = _our_logits(hf, remote=False)  # our package's classes on the released directory
    assert theirs.shape[-1] == TEXT_VOCAB
    assert torch.equal(theirs, ours)


def test_moe_released_config_reads_as_qwen3_moe(moe):
    # The MoE VLM's logit parity is tests/test_convert_qwen3_moe.py's (the same table); here the
    # release's text config must come out as that model, experts and all.
    _, mc, _ = moe
    model = json.loads((mc / "lov15_model.json").read_text())["model_config"]["language"]
    assert model["num_experts"] == EXPERTS["num_experts"]
    assert model["moe_ffn_hidden_size"] == EXPERTS["moe_intermediate_size"]
    assert model["moe_router_topk"] == EXPERTS["num_experts_per_tok"]
    assert model["moe_norm_topk_prob"] is True and model["vocab_size"] == TEXT_VOCAB


def write_fused(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same MoE checkpoint with its experts as transformers ≥ 5 holds them (and writes them
    with ``save_original_format=False``): per layer ``mlp.experts.gate_up_proj``
    ``[E, 2F, H]`` (expert e's gate rows, then its up rows) and ``mlp.experts.down_proj``
    ``[E, H, F]``."""
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    experts = range(EXPERTS["num_experts"])
    for i in range(TEXT["layers"]):
        p = f"model.layers.{i}.mlp.experts."
        gate, up = "gate_proj.weight", "up_proj.weight"
        gate_up = [torch.cat([tensors[f"{p}{e}.{gate}"], tensors[f"{p}{e}.{up}"]]) for e in experts]
        fused[f"{p}gate_up_proj"] = torch.stack(gate_up)
        fused[f"{p}down_proj"] = torch.stack([tensors[f"{p}{e}.down_proj.weight"] for e in experts])
    path.mkdir(parents=True)
    save_file(fused, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(released_config(experts=True), indent=2))
    return fused


def test_moe_fused_layout_converts_and_exports_as_the_template(moe, tmp_path):
    hf, mc, tensors = moe
    fused_dir = tmp_path / "fused"
    fused = write_fused(fused_dir, tensors)
    ok("hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(fused_dir),
       "--save-dir", str(tmp_path / "fused_mc"))  # fmt: skip

    # Read fused, written one by one (a per-expert template): the released tensors exactly.
    _export(tmp_path / "fused_mc", hf, tmp_path / "per_expert")
    per_expert = read_safetensors(tmp_path / "per_expert")
    assert sorted(per_expert) == sorted(tensors)
    assert all(torch.equal(per_expert[k], tensors[k]) for k in tensors)

    # Read one by one, written fused (a fused template): the fused tensors exactly.
    _export(mc, fused_dir, tmp_path / "fused_export")
    exported = read_safetensors(tmp_path / "fused_export")
    assert sorted(exported) == sorted(fused)
    assert all(torch.equal(exported[k], fused[k]) for k in fused)


def test_release_text_model_type_resolution_and_errors(tmp_path, capsys):
    from lov15_megatron.hf.remote_code.configuration_llavaonevision1_5 import text_model_type

    dense_text = released_config()["text_config"]
    moe_text = released_config(experts=True)["text_config"]
    assert text_model_type(dense_text) == "qwen3"
    assert text_model_type(moe_text) == "qwen3_moe"
    assert text_model_type({**dense_text, "num_experts": 0}) == "qwen3"  # the release: dense
    assert text_model_type({"model_type": "qwen3_moe"}) == "qwen3_moe"
    assert text_model_type({}) == "qwen3"

    from lov15_megatron.convert.mapping import ConversionError
    from lov15_megatron.models.llava_ov.hf_mapping import vision_config_from_hf

    vision = released_config()["vision_config"]
    assert vision_config_from_hf(vision).rope_theta == 10000.0
    with pytest.raises(ConversionError, match="hidden_size 64 differs from embed_dim 32"):
        vision_config_from_hf({**vision, "hidden_size": 64})

    # Experts without their other fields: one line naming them, exit 2, nothing written.
    bad = tmp_path / "bad"
    write_released(bad, experts=True)
    config = released_config(experts=True)
    del config["text_config"]["moe_intermediate_size"]
    (bad / "config.json").write_text(json.dumps(config))
    from lov15_megatron.cli.convert_checkpoint import main  # in process: the CLI's own error path

    code = main(["hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(bad),
                 "--save-dir", str(tmp_path / "mc")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "moe_intermediate_size" in err
    assert not (tmp_path / "mc").exists()


def test_image_token_ids_come_from_config_json(tmp_path, capsys):
    """``hf-to-mcore`` reads the image block's ids from ``config.json`` (absent ones: the
    release's); ``mcore-to-hf`` writes the run config's ids over a template's."""
    from lov15_megatron.models.registry import get_family

    family = get_family("llava-ov-1.5")
    released = released_config()
    names = ("image_token_id", "vision_start_token_id", "vision_end_token_id")

    def ids(cfg) -> tuple[int, ...]:
        return tuple(getattr(cfg.model.vision, name) for name in names)

    assert ids(family.run_config(released)) == (151655, 151652, 151653)
    other = dict(zip(names, (151000, 151001, 151002), strict=True))
    cfg = family.run_config({**released, **other})
    assert ids(cfg) == (151000, 151001, 151002)
    written = family.hf_config(cfg, released)  # the template says 151655
    assert {k: written[k] for k in names} == other
    assert written["video_token_id"] == released["video_token_id"]  # not ours: the template's

    # An id outside the text vocabulary: one line naming the field, exit 2, nothing written.
    bad = tmp_path / "bad"
    write_released(bad)
    (bad / "config.json").write_text(json.dumps({**released, "image_token_id": TEXT_VOCAB}))
    from lov15_megatron.cli.convert_checkpoint import main

    code = main(["hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(bad),
                 "--save-dir", str(tmp_path / "mc")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"model.vision.image_token_id={TEXT_VOCAB} is outside the vocabulary" in err
    assert not (tmp_path / "mc").exists()
