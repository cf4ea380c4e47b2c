"""Tests of the stage-0 builder (``tools/make_stage0.py``,
``lov15_megatron.models.llava_ov.stage0``).

Tiny random source checkpoints are built here: a ``transformers`` ``MLCDVisionModel`` (the Rice
ViT's layout) and ``Qwen3ForCausalLM`` models, one tied and one untied, every parameter
perturbed (norms and biases included) so that no mapping error hides behind an init value. The
real CLI runs in subprocesses; the result is checked against the source models themselves
(``MLCDVisionModel`` features in 2x2-merge order with the class token dropped, ``Qwen3`` logits).
Bad inputs run the CLI's ``main`` in-process (and one of them as a real subprocess).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import raster_to_merge_order, read_safetensors, rice_vit_from_mlcd
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from tolerances import assert_close_fp32
from transformers import (
    AutoModelForCausalLM,
    MLCDVisionConfig,
    MLCDVisionModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lov15_megatron.hf import AUTO_MAP, LLaVAOneVision1_5_ForConditionalGeneration
from lov15_megatron.models.llava_ov.stage0 import init_merger, make_stage0, plan_stage0

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_stage0.py"
PATCH = 14
MLCD = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": PATCH,
    "image_size": 56,
    "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
}
TEXT = {
    "vocab_size": 1024,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_theta": 1_000_000.0,
}
# the tiny tokenizer: 1000 words, then these special tokens from id 1000 on
SPECIALS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
V_START, V_END, IMAGE, VIDEO = 1000, 1001, 1003, 1004
# Longest reductions (docs/tolerances.md): the ViT's patch embedding (3·14·14 inputs; its MLP
# 128, sequences ≤ 24) and the LM's MLP (96; sequences of 13).
VIT_LEN, TEXT_LEN = 3 * PATCH * PATCH, TEXT["intermediate_size"]
SEED = 7
GRIDS = [(4, 6), (2, 2)]


# ------------------------------------------------------------------------------------------
# source checkpoints
# ------------------------------------------------------------------------------------------


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (norm weights/biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    for path in directory.glob("*.safetensors*"):
        path.unlink()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def save_tokenizer(directory: Path) -> None:
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def make_qwen(directory: Path, tied: bool, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    qwen = Qwen3ForCausalLM(Qwen3Config(**TEXT, tie_word_embeddings=tied)).eval()
    randomize_(qwen, seed)
    qwen.save_pretrained(directory)
    return qwen


class Sources:
    """The source checkpoints (and the models they hold)."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.mlcd = MLCDVisionModel(MLCDVisionConfig(**MLCD)).eval()
        self.mlcd.set_attn_implementation("eager")
        randomize_(self.mlcd, seed=1)
        self.vit = root / "vit"  # transformers 5 layout: no prefix
        self.mlcd.save_pretrained(self.vit)
        assert "pre_layrnorm.weight" in read_safetensors(self.vit)
        # transformers 4.x / released layout: every name under ``vision_model.``
        self.vit_legacy = root / "vit_legacy"
        shutil.copytree(self.vit, self.vit_legacy)
        prefixed = {f"vision_model.{k}": v for k, v in read_safetensors(self.vit).items()}
        write_tensors(self.vit_legacy, prefixed)

        self.llm_untied = root / "qwen_untied"
        self.qwen_untied = make_qwen(self.llm_untied, tied=False, seed=2)
        save_tokenizer(self.llm_untied)
        self.llm_tied = root / "qwen_tied"
        self.qwen_tied = make_qwen(self.llm_tied, tied=True, seed=3)
        assert "lm_head.weight" not in read_safetensors(self.llm_tied)  # tied: not stored
        self.tokenizer = root / "tokenizer"
        save_tokenizer(self.tokenizer)


def cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TOOL), *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Run the CLI (in parallel subprocesses): untied, tied, and one bad input."""
    root = tmp_path_factory.mktemp("stage0")
    src = Sources(root)
    bad_vit = root / "vit_without_config"
    shutil.copytree(src.vit, bad_vit)
    (bad_vit / "config.json").unlink()

    out = {"untied": root / "out_untied", "tied": root / "out_tied", "bad": root / "out_bad"}
    procs = {
        "untied": cli(
            "--vit-dir", src.vit, "--llm-dir", src.llm_untied, "--save-dir", out["untied"],
            "--seed", SEED, "--dtype", "float32", "--max-shard-gb", 0.0001,
        ),
        "tied": cli(
            "--vit-dir", src.vit_legacy, "--llm-dir", src.llm_tied, "--save-dir", out["tied"],
            "--tokenizer-dir", src.tokenizer, "--seed", SEED,
        ),
        "bad": cli("--vit-dir", bad_vit, "--llm-dir", src.llm_untied, "--save-dir", out["bad"]),
    }  # fmt: skip
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    for name in ("untied", "tied"):
        assert results[name][0] == 0, results[name][2]
    return {"src": src, "out": out, "results": results}


def load(directory: Path) -> LLaVAOneVision1_5_ForConditionalGeneration:
    return LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(directory).eval()


# ------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------


def image(h: int, w: int, seed: int) -> torch.Tensor:
    """Random normalised image ``[3, 14h, 14w]``."""
    return torch.randn(3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(seed))


def patchify(img: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` -> ``[h*w, 588]`` rows in 2x2-merge order (docs/model-reference.md §2)."""
    _, height, width = img.shape
    bh, bw = height // (2 * PATCH), width // (2 * PATCH)
    x = img.reshape(3, bh, 2, PATCH, bw, 2, PATCH).permute(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(bh * bw * 4, 3 * PATCH * PATCH)


def mlcd_features(mlcd: MLCDVisionModel, img: torch.Tensor) -> torch.Tensor:
    """MLCD ``last_hidden_state`` without the class token (index 0), raster -> merge order.

    ``last_hidden_state`` is the last block's output; MLCD's ``post_layernorm`` only touches
    the pooled class token, which is why the stage-0 builder drops it.
    """
    hidden = mlcd(pixel_values=img.unsqueeze(0)).last_hidden_state[0]
    return hidden[1:][raster_to_merge_order(img.shape[1] // PATCH, img.shape[2] // PATCH)]


def spec_shapes(vit: dict, text: dict) -> dict[str, tuple[int, ...]]:
    """Release on-disk names and shapes (docs/model-reference.md §7), written out from the table."""
    d, p, hd = (
        vit["hidden_size"],
        vit["patch_size"],
        vit["hidden_size"] // vit["num_attention_heads"],
    )
    ff, h, v = vit["intermediate_size"], text["hidden_size"], text["vocab_size"]
    shapes = {
        "visual.patch_embed.proj.weight": (d, 3, p, p),
        "visual.class_embedding": (d,),
        "visual.class_pos_emb": (1, hd // 2),
        "visual.pre_layernorm.weight": (d,),
        "visual.pre_layernorm.bias": (d,),
        "visual.merger.ln_q.weight": (d,),
        "visual.merger.ln_q.bias": (d,),
        "visual.merger.mlp.0.weight": (4 * d, 4 * d),
        "visual.merger.mlp.0.bias": (4 * d,),
        "visual.merger.mlp.2.weight": (h, 4 * d),
        "visual.merger.mlp.2.bias": (h,),
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(vit["num_hidden_layers"]):
        b = f"visual.blocks.{i}."
        shapes |= {
            b + n: (d,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
        }
        shapes |= {
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (ff, d),
            b + "mlp.fc1.bias": (ff,),
            b + "mlp.fc2.weight": (d, ff),
            b + "mlp.fc2.bias": (d,),
        }
    q, kv, ffn = (
        text["num_attention_heads"] * text["head_dim"],
        text["num_key_value_heads"] * text["head_dim"],
        text["intermediate_size"],
    )
    for i in range(text["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes |= {
            b + "self_attn.q_proj.weight": (q, h),
            b + "self_attn.k_proj.weight": (kv, h),
            b + "self_attn.v_proj.weight": (kv, h),
            b + "self_attn.o_proj.weight": (h, q),
            b + "self_attn.q_norm.weight": (text["head_dim"],),
            b + "self_attn.k_norm.weight": (text["head_dim"],),
            b + "mlp.gate_proj.weight": (ffn, h),
            b + "mlp.up_proj.weight": (ffn, h),
            b + "mlp.down_proj.weight": (h, ffn),
            b + "input_layernorm.weight": (h,),
            b + "post_attention_layernorm.weight": (h,),
        }
    return shapes


# ------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_layout_config_and_files(built, which) -> None:
    out: Path = built["out"][which]
    _, stdout, stderr = built["results"][which]
    assert re.fullmatch(
        r"make-stage0: wrote 60 tensors \(vision 29, merger 6 new, language 25\).*\n", stdout
    )
    assert "post_layernorm dropped" in stderr  # progress / description on stderr
    assert not out.with_name(out.name + ".tmp").exists()

    tensors = read_safetensors(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == spec_shapes(MLCD, TEXT)
    assert len(tensors) == 60
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (which == "untied")  # --max-shard-gb 0.0001 forces shards
    assert all(t.dtype == torch.float32 for t in tensors.values())

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llavaonevision1_5"
    assert config["architectures"] == ["LLaVAOneVision1_5_ForConditionalGeneration"]
    assert config["auto_map"] == AUTO_MAP
    assert config["dtype"] == "float32"
    assert (config["image_token_id"], config["video_token_id"]) == (IMAGE, VIDEO)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (V_START, V_END)
    assert config["tie_word_embeddings"] is False
    v, t = config["vision_config"], config["text_config"]
    assert v["model_type"] == "rice_vit"
    assert (v["depth"], v["embed_dim"], v["hidden_size"], v["num_heads"]) == (2, 64, 64, 4)
    assert (v["intermediate_size"], v["patch_size"], v["in_channels"]) == (128, PATCH, 3)
    assert (v["spatial_merge_size"], v["temporal_patch_size"], v["layer_norm_eps"]) == (2, 1, 1e-5)
    assert v["hidden_act"] == "gelu" and v["text_hidden_size"] == 48
    assert t["model_type"] == "qwen3" and t["tie_word_embeddings"] is False
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
        assert t[key] == TEXT[key], key
    assert (t["num_attention_heads"], t["num_key_value_heads"]) == (4, 2)
    assert t["rope_theta"] == 1_000_000.0

    for name in ("configuration_llavaonevision1_5.py", "modeling_llavaonevision1_5.py"):
        assert (out / name).is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    # ours (eos <|im_end|>), written in both cases, with the processor and chat template
    for name in ("generation_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("which", ["untied", "tied"])
@torch.no_grad()
def test_vit_matches_mlcd(built, which) -> None:
    """The ViT part = MLCDVisionModel's patch outputs in merge order, class token dropped."""
    mlcd = built["src"].mlcd
    model = load(built["out"][which])
    expected_vit = rice_vit_from_mlcd(mlcd.state_dict(), rice="visual.")
    state = model.state_dict()
    assert expected_vit.keys() == {
        k for k in state if k.startswith("visual.") and ".merger." not in k
    }
    for key, tensor in expected_vit.items():
        assert torch.equal(state[key], tensor), key

    images = [image(h, w, seed=10 + i) for i, (h, w) in enumerate(GRIDS)]
    packed = model.visual.get_vision_features(
        torch.cat([patchify(img) for img in images]), torch.tensor([[1, h, w] for h, w in GRIDS])
    )
    offset = 0
    for img, (h, w) in zip(images, GRIDS, strict=True):
        ref = mlcd_features(mlcd, img)
        assert ref.abs().max() > 0.5
        alone = model.visual.get_vision_features(patchify(img), torch.tensor([[1, h, w]]))
        assert_close_fp32(alone, ref, VIT_LEN)
        assert_close_fp32(packed[offset : offset + h * w], ref, VIT_LEN)
        offset += h * w


@pytest.mark.parametrize("which", ["untied", "tied"])
@torch.no_grad()
def test_lm_matches_qwen3(built, which) -> None:
    src = built["src"]
    qwen_dir = src.llm_untied if which == "untied" else src.llm_tied
    qwen = Qwen3ForCausalLM.from_pretrained(qwen_dir).eval()  # the source, from disk
    model = load(built["out"][which])
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(4))
    ref = qwen(input_ids=ids).logits
    assert_close_fp32(model(input_ids=ids).logits, ref, TEXT_LEN)

    embed = qwen.model.embed_tokens.weight
    if which == "tied":  # untied by copying the embeddings
        assert torch.equal(model.lm_head.weight, embed)
    else:
        assert torch.equal(model.lm_head.weight, qwen.lm_head.weight)
        assert not torch.equal(model.lm_head.weight, embed)


def test_untied_output_trains_lm_head_separately(built) -> None:
    """The copied lm_head is a separate parameter: updating it leaves the embeddings alone."""
    model = load(built["out"]["tied"])
    before = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_merger_init_deterministic(built, tmp_path) -> None:
    outs = {k: read_safetensors(built["out"][k]) for k in ("untied", "tied")}
    merger = {k: v for k, v in outs["untied"].items() if ".merger." in k}
    assert len(merger) == 6
    for key, tensor in merger.items():  # same seed, same shapes, two runs -> same merger
        assert torch.equal(outs["tied"][key], tensor), key
    d = 4 * MLCD["hidden_size"]
    assert torch.equal(merger["visual.merger.ln_q.weight"], torch.ones(MLCD["hidden_size"]))
    assert torch.equal(merger["visual.merger.ln_q.bias"], torch.zeros(MLCD["hidden_size"]))
    assert torch.equal(merger["visual.merger.mlp.0.bias"], torch.zeros(d))
    assert torch.equal(merger["visual.merger.mlp.2.bias"], torch.zeros(TEXT["hidden_size"]))
    for name in ("visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight"):
        w = merger[name]
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, name

    # the documented recipe: one generator seeded with the seed, mlp.0 then mlp.2, N(0, 0.02²)
    gen = torch.Generator().manual_seed(SEED)
    w0 = torch.randn((d, d), generator=gen) * 0.02
    w2 = torch.randn((TEXT["hidden_size"], d), generator=gen) * 0.02
    assert torch.equal(merger["visual.merger.mlp.0.weight"], w0)
    assert torch.equal(merger["visual.merger.mlp.2.weight"], w2)

    src = built["src"]
    plan = plan_stage0(src.vit, src.llm_untied)
    other = init_merger(plan.tensors, seed=SEED + 1)
    assert not torch.equal(other["visual.merger.mlp.0.weight"], w0)
    assert torch.equal(init_merger(plan.tensors, seed=SEED)["visual.merger.mlp.2.weight"], w2)


def test_bfloat16_output(built, tmp_path) -> None:
    src = built["src"]
    summary = make_stage0(
        src.vit,
        src.llm_tied,
        tmp_path / "bf16",
        tokenizer_dir=src.tokenizer,
        dtype="bfloat16",
        seed=SEED,
        progress=False,
    )
    tensors = read_safetensors(summary.output)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((summary.output / "config.json").read_text())["dtype"] == "bfloat16"
    ref = read_safetensors(built["out"]["tied"])
    for key, tensor in tensors.items():
        assert torch.equal(tensor, ref[key].to(torch.bfloat16)), key
    assert summary.tokenizer_files == [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "generation_config.json",
    ]


@torch.no_grad()
def test_trust_remote_code_load(built, isolated_hf_modules) -> None:
    modules_cache = isolated_hf_modules
    out = built["out"]["untied"]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__name__ == "LLaVAOneVision1_5_ForConditionalGeneration"
    assert type(remote).__module__.startswith("transformers_modules.")
    assert any(modules_cache.rglob("modeling_llavaonevision1_5.py"))

    local = load(out)
    pixel_values = patchify(image(2, 4, seed=20))
    ids = torch.tensor([[5, V_START] + [IMAGE] * 2 + [V_END, 7, 8]])
    kwargs = {
        "input_ids": ids,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, 2, 4]]),
    }
    torch.testing.assert_close(remote(**kwargs).logits, local(**kwargs).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def tool_main():
    spec = importlib.util.spec_from_file_location("make_stage0_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_input_subprocess(built) -> None:
    """The real process: exit 2, one line naming the file, nothing written."""
    rc, stdout, stderr = built["results"]["bad"]
    out: Path = built["out"]["bad"]
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert f"{built['src'].vit.parent / 'vit_without_config' / 'config.json'} is missing" in stderr
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def _copy(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        write_tensors(dst, tensors(read_safetensors(src)))
    if config is not None:
        path = dst / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    return dst


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _set(d: dict, **kw) -> dict:
    return {**d, **kw}


def _bad_cases(src: Sources, tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv without --save-dir, expected message fragments joined by ``|``)."""
    vit, llm = src.vit, src.llm_untied

    def args(v: Path = vit, lm: Path = llm, *extra: str) -> list:
        return ["--vit-dir", v, "--llm-dir", lm, *extra]

    extra_layer = _copy(vit, tmp / "v_extra", tensors=lambda t: {
        **t, "encoder.layers.2.mlp.fc1.bias": torch.zeros(128)})  # fmt: skip
    return {
        "missing vit dir": (args(tmp / "nope"), "--vit-dir directory"),
        "missing vit config": (args(_nocfg(vit, tmp)), "v_nocfg/config.json is missing"),
        "missing vit tensor": (
            args(_copy(vit, tmp / "v_miss", tensors=lambda t: _without(t, "pre_layrnorm.bias"))),
            "tensor 'pre_layrnorm.bias' is missing from",
        ),
        "missing vit qkv part": (
            args(
                _copy(
                    vit,
                    tmp / "v_miss_k",
                    tensors=lambda t: _without(t, "encoder.layers.1.self_attn.k_proj.bias"),
                )
            ),
            "tensor 'encoder.layers.1.self_attn.k_proj.bias' is missing from",
        ),
        "missing prefixed vit tensor": (
            args(
                _copy(
                    src.vit_legacy,
                    tmp / "vl_miss",
                    tensors=lambda t: _without(
                        t, "vision_model.encoder.layers.0.self_attn.q_proj.weight"
                    ),
                )
            ),
            "'vision_model.encoder.layers.0.self_attn.q_proj.weight' is missing",
        ),
        "unexpected vit tensor": (
            args(extra_layer),
            "unexpected tensor 'encoder.layers.2.mlp.fc1.bias'",
        ),
        "vit width vs config": (
            args(_copy(vit, tmp / "v_width", config=lambda c: _set(c, hidden_size=32))),
            "has shape [64], expected [32] from",
        ),
        "vit not mlcd": (
            args(
                _copy(vit, tmp / "v_type", config=lambda c: _set(c, model_type="clip_vision_model"))
            ),
            "model_type 'clip_vision_model' is not an MLCD vision model",
        ),
        "qwen3 shape mismatch": (
            args(vit, _copy(llm, tmp / "q_shape", config=lambda c: _set(c, intermediate_size=80))),
            "tensor 'model.layers.0.mlp.gate_proj.weight' in|intermediate_size=80",
        ),
        "qwen3 missing lm_head": (
            args(vit, _copy(llm, tmp / "q_head", tensors=lambda t: _without(t, "lm_head.weight"))),
            "tensor 'lm_head.weight' is missing",
        ),
        "qwen3 unexpected tensor": (
            args(
                vit,
                _copy(
                    llm,
                    tmp / "q_extra",
                    tensors=lambda t: {**t, "model.rotary_emb.inv_freq": torch.zeros(8)},
                ),
            ),
            "unexpected tensor 'model.rotary_emb.inv_freq'",
        ),
        "not qwen3": (
            args(vit, _copy(llm, tmp / "q_type", config=lambda c: _set(c, model_type="llama"))),
            "model_type 'llama' is not 'qwen3'",
        ),
        "moe lm": (
            args(vit, _copy(llm, tmp / "q_moe", config=lambda c: _set(c, model_type="qwen3_moe"))),
            "a Qwen3-MoE language model (model_type 'qwen3_moe') is not supported by make_stage0",
        ),
        "token ids outside vocab": (
            args(vit, src.llm_tied),  # no tokenizer there: release ids 151655... > vocab 1024
            "image_token_id 151655 (release default",
        ),
        "tied lm_head differs": (
            args(
                vit,
                _copy(
                    src.llm_tied,
                    tmp / "q_tied_bad",
                    tensors=lambda t: {**t, "lm_head.weight": torch.zeros(1024, 48)},
                ),
                "--tokenizer-dir",
                src.tokenizer,
            ),
            "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight'",
        ),
    }


def _nocfg(vit: Path, tmp: Path) -> Path:
    dst = _copy(vit, tmp / "v_nocfg")
    (dst / "config.json").unlink()
    return dst


def test_bad_inputs_named_and_nothing_written(built, tmp_path, capsys) -> None:
    main = tool_main()
    cases = _bad_cases(built["src"], tmp_path)
    for name, (argv, fragment) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        rc = main([*map(str, argv), "--save-dir", str(out), "--quiet"])
        captured = capsys.readouterr()
        assert rc == 2, (name, captured.err)
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, name
        for part in fragment.split("|"):
            assert part in captured.err, (name, captured.err)
        assert captured.out == "", name
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists(), name


def test_unwritable_or_occupied_output(built, tmp_path, capsys) -> None:
    main = tool_main()
    src = built["src"]
    base = ["--vit-dir", str(src.vit), "--llm-dir", str(src.llm_untied), "--quiet"]

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    assert main([*base, "--save-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to") and str(out) in err
    assert blocker.read_text() == "not a directory"

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    assert main([*base, "--save-dir", str(occupied)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (occupied / "keep.txt").read_text() == "precious"
    assert not occupied.with_name("occupied.tmp").exists()

    inside = src.llm_untied / "stage0"
    assert main([*base, "--save-dir", str(inside)]) == 2
    assert "overlaps the input directory" in capsys.readouterr().err
    assert not inside.exists()

    assert main([*base, "--save-dir", str(occupied), "--overwrite"]) == 0
    assert not (occupied / "keep.txt").exists() and (occupied / "config.json").is_file()
