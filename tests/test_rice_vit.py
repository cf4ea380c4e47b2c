"""Rice ViT + patch merger on Megatron-Core against the HF-side ``RiceViTModel``.

A tiny random HF Rice ViT (2 layers, hidden 64, 4 heads of 16, merger to 48) with every
parameter perturbed (norms, biases, class token and its angles too) is converted with
``rice_vit_rows`` into the Megatron ``RiceViT`` + ``PatchMerger`` (local spec: packed THD
attention, one sequence per image). Four images of different sizes go through in one packed
call. One 2-rank launch runs, in turn:

1. TP=1 (DP=2): load the converted weights, compare ViT features and merger output with HF,
   check the round trip ``to_hf(to_megatron(x))`` bit-exactly and the bad-grid errors, save a
   distributed checkpoint;
2. TP=2: load that checkpoint (resharded), compare with HF again, inspect the sharded state
   dict (replicated tensors stored once, split ones in two halves), save at TP=2;
3. TP=1: load the TP=2 checkpoint into a freshly initialised model and compare with HF.

fp32 tolerance: ``fp32_abs_tol`` of ``tests/tolerances.py`` for the longest reduction, the patch
embedding's 588 inputs: 2.3e-5 relative to the largest output, 1.2e-4 on outputs up to |5|
(measured ≤ 5e-6; the HF model's own fp32-vs-fp64 difference is 4e-6 here, see
``docs/rice-vit.md``).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import packed_images_attention_mask
from tolerances import fp32_abs_tol

from lov15_megatron.runtime.launch import run_ranks

PATCH, CHANNELS, MERGE = 14, 3, 2
# The longest reduction (docs/tolerances.md): the patch embedding's 3·14·14 inputs (the MLP's is
# 128, the merger's 4·64, the longest image 24 patches).
REDUCTION_LEN = CHANNELS * PATCH * PATCH
VISION = {
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "patch_size": PATCH,
    "in_channels": CHANNELS,
    "spatial_merge_size": MERGE,
    "norm_epsilon": 1e-5,
    "rope_theta": 10000.0,
}
TEXT_HIDDEN = 48
# The VLM's image token ids, inside the language model's default 256-token vocabulary.
IMAGE_TOKEN_IDS = {"image_token_id": 255, "vision_start_token_id": 253, "vision_end_token_id": 254}
GRIDS = [[1, 4, 6], [1, 2, 2], [1, 6, 4], [1, 2, 8]]
BAD_GRIDS = {
    "video": ([[1, 4, 6], [2, 2, 2]], 28),
    "odd_width": ([[1, 4, 6], [1, 2, 2], [1, 4, 3]], 40),
    "count": ([[1, 4, 6], [1, 2, 2]], 27),
}


def run_config(tp: int):
    from lov15_megatron.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "language": {"hidden_size": TEXT_HIDDEN, "num_attention_heads": 4},
                "vision": {**VISION, **IMAGE_TOKEN_IDS},
            },
            "parallel": {"tensor_model_parallel_size": tp},
            "runtime": {"device": "cpu"},
        }
    )


def make_hf_vit(seed: int = 0):
    """A tiny random ``RiceViTModel`` with every parameter perturbed away from its init."""
    from lov15_megatron.hf import RiceViTConfig, RiceViTModel

    config = RiceViTConfig(
        depth=VISION["num_layers"],
        embed_dim=VISION["hidden_size"],
        hidden_size=VISION["hidden_size"],
        intermediate_size=VISION["ffn_hidden_size"],
        num_heads=VISION["num_attention_heads"],
        patch_size=PATCH,
        in_channels=CHANNELS,
        spatial_merge_size=MERGE,
        layer_norm_eps=VISION["norm_epsilon"],
        text_hidden_size=TEXT_HIDDEN,
    )
    torch.manual_seed(seed)
    model = RiceViTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:  # LayerNorm weights near 1, biases near 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.startswith("class_"):  # the class token and its rotary angles
                p.normal_(0.0, 1.0)
            else:  # keeps activations O(1), so that fp32 rounding stays within the tolerance
                p.normal_(0.0, 0.08)
    return model


class _Tower:
    """Builds a module holding ``vision_model`` and ``vision_projection`` (as the VLM will)."""

    @staticmethod
    def build(cfg):
        from megatron.core.transformer.module import MegatronModule

        from lov15_megatron.models.llava_ov.rice_vit import (
            build_patch_merger,
            build_rice_vit,
            rice_vit_transformer_config,
        )

        class Tower(MegatronModule):
            def __init__(self) -> None:
                super().__init__(config=rice_vit_transformer_config(cfg))
                self.vision_model = build_rice_vit(cfg)
                self.vision_projection = build_patch_merger(cfg)

            def forward(self, pixel_values, grid):
                features = self.vision_model(pixel_values, grid)
                return features, self.vision_projection(features)

        return Tower()


def _outputs(tower, pixel_values, grid) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        features, merged = tower(pixel_values, grid)
    return {"features": features.clone(), "merged": merged.clone()}


def _rank_checks(hf_state, pixel_values, grid, bad_inputs, ckpt_dir) -> dict:
    """Runs in each of 2 ranks: TP=1 → save → TP=2 → save → TP=1 (see module docstring)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    from lov15_megatron.convert.mapping import MappingTable
    from lov15_megatron.models.llava_ov.hf_mapping import rice_vit_rows
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training.checkpointing import load_model_weights, save_model_weights

    out: dict = {}

    # 1. TP=1: converted weights, round trip, errors, save.
    cfg = run_config(1)
    distributed.initialize(cfg)
    tower = _Tower.build(cfg)
    table = MappingTable(rice_vit_rows(cfg))
    converted, used, roundtrip_bad = {}, [], []
    for name, param in tower.state_dict().items():
        if name.endswith("_extra_state"):  # no weights (as in convert/core.py)
            converted[name] = param
            continue
        row, hf_names = table.resolve(name)
        tensor = row.transform.to_megatron([hf_state[n] for n in hf_names])
        converted[name] = tensor
        used += hf_names
        back = row.transform.to_hf(tensor.clone())
        for hf_name, b in zip(hf_names, back, strict=True):
            if b.dtype != hf_state[hf_name].dtype or not torch.equal(b, hf_state[hf_name]):
                roundtrip_bad.append(hf_name)
        assert tensor.shape == param.shape, (name, tensor.shape, param.shape)
    tower.load_state_dict(converted, strict=True)
    out["megatron_names"] = sorted(n for n in converted if not n.endswith("_extra_state"))
    out["hf_names_used"] = sorted(used)
    out["roundtrip_bad"] = roundtrip_bad
    out["tp1"] = _outputs(tower, pixel_values, grid)
    errors = {}
    for case, (bad_grid, rows) in bad_inputs.items():
        try:
            tower.vision_model(pixel_values[:rows], bad_grid)
            errors[case] = "no error"
        except ValueError as e:
            errors[case] = str(e)
    out["errors"] = errors
    save_model_weights([tower], f"{ckpt_dir}/tp1")

    # 2. TP=2: load the TP=1 checkpoint (resharded), inspect the sharding, save at TP=2.
    distributed.initialize(run_config(2))
    tower = _Tower.build(run_config(2))
    load_model_weights([tower], f"{ckpt_dir}/tp1")
    out["tp2"] = _outputs(tower, pixel_values, grid)
    out["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    out["sharding"] = {
        name: (
            sh.key,
            tuple(sh.global_shape),
            tuple(sh.local_shape),
            tuple(sh.global_offset),
            tuple(sh.replica_id) if isinstance(sh.replica_id, tuple) else (sh.replica_id,),
        )
        for name, sh in tower.sharded_state_dict().items()
        if isinstance(sh, ShardedTensor)
    }
    save_model_weights([tower], f"{ckpt_dir}/tp2")

    # 3. TP=1 again: a fresh random model loads the TP=2 checkpoint.
    distributed.initialize(run_config(1))
    tower = _Tower.build(run_config(1))
    out["fresh"] = _outputs(tower, pixel_values, grid)
    load_model_weights([tower], f"{ckpt_dir}/tp2")
    out["reloaded"] = _outputs(tower, pixel_values, grid)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf = make_hf_vit()
    grid = torch.tensor(GRIDS)
    torch.manual_seed(1)
    pixel_values = torch.randn(sum(h * w for _, h, w in GRIDS), CHANNELS * PATCH * PATCH)
    with torch.no_grad():
        reference = {
            "features": hf.get_vision_features(pixel_values, grid),
            "merged": hf(pixel_values, grid),
        }
    bad = {name: (torch.tensor(g), rows) for name, (g, rows) in BAD_GRIDS.items()}
    state = {f"visual.{k}": v.clone() for k, v in hf.state_dict().items()}  # on-disk names
    ckpt = str(tmp_path_factory.mktemp("rice_vit_ckpt"))
    ranks = run_ranks(2, _rank_checks, state, pixel_values, grid, bad, ckpt)
    return reference, state, ranks


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("stage", ["tp1", "tp2", "reloaded"])
def test_matches_hf_reference(results, stage):
    reference, _, ranks = results
    n_patches = sum(h * w for _, h, w in GRIDS)
    assert reference["features"].shape == (n_patches, VISION["hidden_size"])
    assert reference["merged"].shape == (n_patches // 4, TEXT_HIDDEN)
    for rank in ranks:
        for what in ("features", "merged"):
            diff = _max_diff(rank[stage][what], reference[what])
            print(f"{stage} {what}: max |ref| {reference[what].abs().max():.3g}, diff {diff:.3g}")
            tol = fp32_abs_tol(REDUCTION_LEN, reference[what].abs().max().item())
            assert diff < tol, f"{stage} {what}: max abs diff {diff:.3g} (tolerance {tol:.3g})"
    assert math.isfinite(reference["merged"].abs().max().item())


def test_fresh_model_differs_before_loading(results):
    """The reload check is meaningful: a randomly initialised model is far from HF."""
    reference, _, ranks = results
    assert _max_diff(ranks[0]["fresh"]["merged"], reference["merged"]) > 1e-2


def test_rows_cover_every_tensor_and_round_trip_bit_exact(results):
    _, state, ranks = results
    rank = ranks[0]
    assert rank["roundtrip_bad"] == []
    assert sorted(set(rank["hf_names_used"])) == sorted(state), "every HF tensor is used"
    assert len(rank["hf_names_used"]) == len(set(rank["hf_names_used"])), "used exactly once"
    assert len(rank["megatron_names"]) == len(state)


def test_bad_grids_name_the_image(results):
    errors = results[2][0]["errors"]
    assert "image 1" in errors["video"] and "t=2" in errors["video"]
    assert "image 2" in errors["odd_width"] and "w=3" in errors["odd_width"]
    assert "merge size 2" in errors["odd_width"]
    assert "28 patches" in errors["count"] and "27 rows" in errors["count"]


def test_sharded_state_dict_replicates_and_splits(results):
    """At TP=2: replicated tensors are whole on both ranks and stored by TP rank 0 only
    (replica id ``(0, tp_rank, dp_rank)``); split ones hold one half each at distinct offsets.
    Layer tensors carry the leading layer axis of Megatron's stacked ``layers.`` keys."""
    by_rank = {r["tp_rank"]: r["sharding"] for r in results[2]}
    assert sorted(by_rank) == [0, 1]
    replicated = [
        "vision_model.class_embedding",
        "vision_model.class_pos_emb",
        "vision_model.patch_embed.weight",
        "vision_model.pre_layernorm.weight",
        "vision_model.decoder.layers.0.input_layernorm.bias",
        "vision_model.decoder.layers.1.self_attention.linear_proj.bias",
        "vision_projection.layernorm.bias",
        "vision_projection.encoder.linear_fc2.bias",
    ]
    split = [  # (name, split axis of the local tensor)
        ("vision_model.decoder.layers.0.self_attention.linear_qkv.weight", 0),
        ("vision_model.decoder.layers.0.self_attention.linear_qkv.bias", 0),
        ("vision_model.decoder.layers.1.self_attention.linear_proj.weight", 1),
        ("vision_model.decoder.layers.1.mlp.linear_fc1.bias", 0),
        ("vision_model.decoder.layers.1.mlp.linear_fc2.weight", 1),
        ("vision_projection.encoder.linear_fc1.weight", 0),
        ("vision_projection.encoder.linear_fc2.weight", 1),
    ]
    for rank, sharding in by_rank.items():
        for name in replicated:
            _, global_shape, local, offset, replica = sharding[name]
            lead = len(global_shape) - len(local)  # 1 for stacked layer tensors
            assert global_shape[lead:] == local and not any(offset[lead:]), name
            assert replica == (0, rank, 0), name
        for name, axis in split:
            _, global_shape, local, offset, replica = sharding[name]
            lead = len(global_shape) - len(local)  # 1 for stacked layer tensors
            assert local[axis] * 2 == global_shape[lead + axis], name
            assert offset[lead + axis] == rank * local[axis], name
            assert replica == (0, 0, 0), name
    # the local norms are filed under the TE spec's fused-norm keys
    assert by_rank[0]["vision_model.decoder.layers.0.input_layernorm.weight"][0] == (
        "vision_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    )
    expected_keys = len(by_rank[0])
    assert all(len(s) == expected_keys for s in by_rank.values())


# ---- in-process checks of the pieces (no ranks) ---------------------------------------------


def test_transformer_config_follows_the_spec():
    import torch.nn.functional as F

    from lov15_megatron.models.llava_ov.rice_vit import (
        patch_merger_transformer_config,
        rice_vit_transformer_config,
    )

    config = rice_vit_transformer_config(run_config(2))
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 128)
    assert config.num_query_groups == config.num_attention_heads == 4 and config.kv_channels == 16
    assert config.normalization == "LayerNorm" and config.layernorm_epsilon == 1e-5
    assert config.activation_func is F.gelu and not config.bias_activation_fusion  # exact GELU
    assert config.add_bias_linear and config.add_qkv_bias and not config.qk_layernorm
    assert config.hidden_dropout == config.attention_dropout == 0.0
    assert config.tensor_model_parallel_size == 2 and not config.sequence_parallel
    assert not config.apply_rope_fusion and not config.rotary_interleaved
    merger = patch_merger_transformer_config(run_config(2))
    assert (merger.hidden_size, merger.ffn_hidden_size) == (TEXT_HIDDEN, 4 * 64)


def test_merge_order_positions_and_rotary_formula():
    from lov15_megatron.models.llava_ov.rice_vit import (
        PackedImages,
        merge_order_positions,
        vision_rotary_pos_emb,
    )

    grids = ((2, 4), (4, 2))
    expected = [
        (2 * br + ir, 2 * bc + ic)
        for h, w in grids
        for br in range(h // 2)
        for bc in range(w // 2)
        for ir in range(2)
        for ic in range(2)
    ]
    positions = merge_order_positions(grids, 2, torch.device("cpu"))
    assert positions.tolist() == [list(p) for p in expected]

    head_dim, theta = 8, 100.0  # 2 frequencies per axis: theta^0, theta^(-1/2)
    class_angles = torch.tensor([[0.3, -0.7, 1.1, 2.0]])
    emb = vision_rotary_pos_emb(
        PackedImages(grids), class_angles, head_dim, theta, 2, torch.device("cpu")
    )
    assert emb.shape == (8 + 1 + 8 + 1, 1, 1, head_dim) and emb.dtype == torch.float32
    inv = [1.0, theta**-0.5]
    rows = [class_angles[0].tolist()]
    rows += [[r * inv[0], r * inv[1], c * inv[0], c * inv[1]] for r, c in expected[:8]]
    rows += [class_angles[0].tolist()]
    rows += [[r * inv[0], r * inv[1], c * inv[0], c * inv[1]] for r, c in expected[8:]]
    want = torch.tensor(rows)
    torch.testing.assert_close(emb[:, 0, 0], torch.cat([want, want], dim=-1))


def test_packed_layout_thd_params_and_mask_agree():
    from lov15_megatron.models.llava_ov.rice_vit import PackedImages

    layout = PackedImages(((4, 6), (2, 2), (2, 8)))
    cpu = torch.device("cpu")
    params = layout.packed_seq_params(cpu)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 25, 30, 47] == params.cu_seqlens_kv.tolist()
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == params.max_seqlen_kv == 25
    assert layout.class_positions(cpu).tolist() == [0, 25, 30]
    mask = packed_images_attention_mask(layout)[0, 0]
    image = torch.bucketize(torch.arange(47), params.cu_seqlens_q[1:].long(), right=True)
    assert torch.equal(mask, image[:, None] != image[None, :])  # True = masked out


class _OneRankGroup:
    """Stand-in process group of one rank (Megatron's THD RoPE only asks size and rank)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def test_thd_rope_path_equals_the_mask_path_rope():
    """The tower always runs THD, so Megatron applies our per-token ``rotary_pos_emb`` through
    its unfused THD RoPE; since it covers every packed token it takes the exact-offset branch, so
    each token gets its own angles, as the plain ``[s, b, h, d]`` application gives them."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from lov15_megatron.models.llava_ov.rice_vit import PackedImages, vision_rotary_pos_emb
    from lov15_megatron.models.llava_ov.rice_vit import rice_vit_transformer_config as vit_config

    config = vit_config(run_config(1))
    layout = PackedImages(((4, 6), (2, 2), (2, 8)))
    cpu = torch.device("cpu")
    emb = vision_rotary_pos_emb(layout, torch.randn(1, 8), 16, 10000.0, 2, cpu)
    q = torch.randn(layout.num_tokens, 1, 4, 16)
    sbhd = apply_rotary_pos_emb(q, emb, config=config, cp_group=_OneRankGroup())
    thd = apply_rotary_pos_emb(
        q.squeeze(1),
        emb,
        config=config,
        cu_seqlens=layout.cu_seqlens(cpu),
        cp_group=_OneRankGroup(),
    )
    torch.testing.assert_close(thd, sbhd.squeeze(1), rtol=0, atol=0)


def test_te_spec_names_resolve_to_the_same_hf_tensors():
    from lov15_megatron.convert.mapping import MappingTable
    from lov15_megatron.models.llava_ov.hf_mapping import rice_vit_rows

    table = MappingTable(rice_vit_rows(run_config(1)))
    layer = "vision_model.decoder.layers.1."
    for te_name, local_name, hf_name in (
        ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", "norm1.weight"),
        ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias", "norm1.bias"),
        ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight", "norm2.weight"),
        ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias", "norm2.bias"),
    ):
        assert table.resolve(layer + te_name)[1] == [f"visual.blocks.1.{hf_name}"]
        assert table.resolve(layer + local_name)[1] == [f"visual.blocks.1.{hf_name}"]
    prefixed = MappingTable(rice_vit_rows(run_config(1), "m.v.", "m.p.", "model.visual."))
    assert prefixed.resolve("m.p.encoder.linear_fc2.bias")[1] == ["model.visual.merger.mlp.2.bias"]


def test_vision_config_round_trips_through_hf():
    from lov15_megatron.config import VisionModelConfig
    from lov15_megatron.convert.mapping import ConversionError
    from lov15_megatron.hf import RiceViTConfig
    from lov15_megatron.models.llava_ov.hf_mapping import hf_vision_config, vision_config_from_hf

    release = RiceViTConfig(text_hidden_size=2560).to_dict()
    assert vision_config_from_hf(release) == VisionModelConfig()  # defaults = the release
    ours = VisionModelConfig(**VISION)
    written = hf_vision_config(ours, TEXT_HIDDEN)
    RiceViTConfig(**{k: v for k, v in written.items() if k != "model_type"})  # loadable
    assert vision_config_from_hf(written) == ours
    with pytest.raises(ConversionError, match="hidden_act"):
        vision_config_from_hf({**release, "hidden_act": "quick_gelu"})
    with pytest.raises(ConversionError, match="depth"):
        vision_config_from_hf({k: v for k, v in release.items() if k != "depth"})
