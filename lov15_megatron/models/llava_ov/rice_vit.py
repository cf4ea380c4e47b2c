"""The Rice ViT vision tower and the 2×2 patch merger of LLaVA-OneVision-1.5 on Megatron-Core.

What is computed (``docs/rice-vit.md``):

* patch embedding of every flattened patch row (``[Σ h·w, C·P·P]``, channel-major) with a
  bias-free ``Conv2d`` (kernel = stride = P), written as one matmul over the row;
* one learned class token per image, prepended to that image's patches, with learned rotary
  angles ``class_pos_emb``;
* ``pre_layernorm``, then a Megatron-Core :class:`TransformerBlock` of pre-LN layers (LayerNorm,
  fused QKV with bias, exact-GELU MLP with biases, no final norm) whose attention is
  bidirectional and confined to each image;
* 2-D rotary embedding per token (:func:`vision_rotary_pos_emb`);
* output ``[Σ h·w, hidden]`` in 2×2-merge order with each image's class token (and only it)
  removed; :class:`PatchMerger` turns it into ``Σ h·w / 4`` LM tokens.

Packed variable-resolution images: the packed sequence always goes to the core attention in THD
format with ``cu_seqlens`` = cumulative ``h·w + 1`` (bidirectional within each image): TE's
attention on the TE spec, :class:`~lov15_megatron.models.attention.PackedSequenceAttention`
otherwise (``model.attention_backend``). No ``S×S`` mask is ever built. See ``docs/rice-vit.md``.

Which module class goes where (the TE or the local layer, the merger's linears, the norm class)
is in ``vit_specs.py``, kept apart as Megatron-Core keeps its layer specs. The
``TransformerConfig`` builders stay here, beside :func:`build_rice_vit` and
:func:`build_patch_merger` that use them: a spec is classes only, while a config is numbers from
the run config (widths, heads, parallel sizes, recomputation), as ``qwen3/model.py`` keeps its
config beside its builder and ``qwen3/specs.py`` its specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)

from lov15_megatron.config import RunConfig
from lov15_megatron.models.backend import (
    core_attention_module,
    device_config_kwargs,
    recompute_config_kwargs,
    use_transformer_engine,
)
from lov15_megatron.models.llava_ov.hf_mapping import vision_of
from lov15_megatron.models.llava_ov.vit_specs import (
    patch_merger_submodules,
    rice_vit_block_spec,
    vit_modules,
)
from lov15_megatron.models.norms import TorchNormFactory

# --------------------------------------------------------------------------------------------
# Configs and process groups (the specs are in vit_specs.py)
# --------------------------------------------------------------------------------------------


def _common_config_kwargs(cfg: RunConfig) -> dict:
    """TransformerConfig fields shared by the ViT and the merger."""
    v, p = vision_of(cfg), cfg.parallel
    return dict(
        num_query_groups=v.num_attention_heads,
        num_attention_heads=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.norm_epsilon,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU
        add_bias_linear=True,
        add_qkv_bias=True,
        qk_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.model.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        # The tower lives whole on the first pipeline stage; under CP each rank runs it on its
        # own whole images (vision_cp.py), so no image sequence is ever cut over CP ranks.
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        # Released layout: no sequence parallelism inside the ViT (the VLM scatters to the SP
        # region only after the image embeddings are merged into the LM input).
        sequence_parallel=False,
        # Megatron's fused bias-GELU is the tanh approximation; the model uses exact GELU.
        bias_activation_fusion=False,
        # (apply_rope_fusion stays off: TE's fused THD RoPE restarts positions at 0 in every
        # sequence; ours are per token.)
        rotary_interleaved=False,
        **device_config_kwargs(cfg),
    )


def _vision_recompute_kwargs(cfg: RunConfig) -> dict:
    kwargs = recompute_config_kwargs(cfg, vision=True)
    if kwargs.get("recompute_method") == "block":  # at most every layer of the tower
        kwargs["recompute_num_layers"] = min(
            kwargs["recompute_num_layers"], vision_of(cfg).num_layers
        )
    return kwargs


def rice_vit_transformer_config(cfg: RunConfig) -> TransformerConfig:
    """Megatron ``TransformerConfig`` of the Rice ViT blocks (``cfg.model.vision``)."""
    v = vision_of(cfg)
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        **_common_config_kwargs(cfg),
        **_vision_recompute_kwargs(cfg),
    )


def patch_merger_transformer_config(cfg: RunConfig) -> TransformerConfig:
    """``TransformerConfig`` of the merger MLP: ``hidden_size`` is the LM width (its output),
    ``ffn_hidden_size`` the merger's intermediate width (``hidden·merge²`` by default)."""
    v = vision_of(cfg)
    merged = v.hidden_size * v.spatial_merge_size**2
    return TransformerConfig(
        num_layers=1,
        hidden_size=cfg.model.language.hidden_size,
        ffn_hidden_size=v.merger_hidden_size or merged,
        **_common_config_kwargs(cfg),
    )


def vision_process_groups() -> ProcessGroupCollection | None:
    """Process groups for the tower: Megatron's, except a one-rank CP group under CP > 1.

    Under CP each rank runs the tower on its own whole images (``vision_cp.py``), never on a
    CP part of one; Megatron's THD RoPE would otherwise divide each image's sequence by the CP
    size. So no CP collective runs inside the tower. Collective over the members only
    (``use_local_synchronization``). ``None`` (Megatron's defaults) when CP is 1.
    """
    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.cp = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return groups


# --------------------------------------------------------------------------------------------
# Packed images: validation, layout, 2-D RoPE
# --------------------------------------------------------------------------------------------


def check_image_grid(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, patch_dim: int, merge_size: int
) -> list[tuple[int, int]]:
    """Validate packed images against their grids; return ``[(h, w), …]``.

    Raises ``ValueError`` naming the image index for ``t != 1`` and for ``h``/``w`` that are not
    positive multiples of ``merge_size``, and naming both counts when the patch rows disagree.
    """
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(
            f"pixel_values must have shape [num_patches, {patch_dim}], "
            f"got {tuple(pixel_values.shape)}"
        )
    if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3 or image_grid_thw.shape[0] == 0:
        raise ValueError(
            f"image_grid_thw must have shape [num_images >= 1, 3], "
            f"got {tuple(image_grid_thw.shape)}"
        )
    grids = []
    for index, (t, h, w) in enumerate(image_grid_thw.tolist()):
        if t != 1:
            raise ValueError(
                f"image {index}: grid t={t}, but only single images (t=1) are supported"
            )
        if h <= 0 or w <= 0 or h % merge_size or w % merge_size:
            raise ValueError(
                f"image {index}: grid h={h}, w={w} must be positive multiples of the spatial "
                f"merge size {merge_size}"
            )
        grids.append((int(h), int(w)))
    total = sum(h * w for h, w in grids)
    if total != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw describes {total} patches ({[h * w for h, w in grids]} per image) "
            f"but pixel_values has {pixel_values.shape[0]} rows"
        )
    return grids


@dataclass(frozen=True)
class PackedImages:
    """Where every token of a packed image sequence sits.

    Image ``i`` occupies ``cu_seqlens[i] : cu_seqlens[i+1]`` of the packed sequence: its class
    token first, then its ``h·w`` patches in the order of ``pixel_values`` (2×2-merge order).
    """

    grids: tuple[tuple[int, int], ...]

    @property
    def num_images(self) -> int:
        return len(self.grids)

    @property
    def seqlens(self) -> list[int]:
        return [h * w + 1 for h, w in self.grids]

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens)

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        lengths = torch.tensor([0, *self.seqlens], dtype=torch.int32, device=device)
        return lengths.cumsum(0, dtype=torch.int32)

    def class_positions(self, device: torch.device) -> torch.Tensor:
        return self.cu_seqlens(device)[:-1].long()

    def patch_positions(self, device: torch.device) -> torch.Tensor:
        """Packed positions of all patches, in ``pixel_values`` order."""
        is_patch = torch.ones(self.num_tokens, dtype=torch.bool, device=device)
        is_patch[self.class_positions(device)] = False
        return is_patch.nonzero().squeeze(1)

    def gather_index(self, device: torch.device) -> torch.Tensor:
        """Index into ``cat([per-image class rows (n), patch rows (Σ h·w)])`` for each token."""
        index = torch.empty(self.num_tokens, dtype=torch.long, device=device)
        index[self.class_positions(device)] = torch.arange(self.num_images, device=device)
        patches = self.patch_positions(device)
        index[patches] = self.num_images + torch.arange(patches.numel(), device=device)
        return index

    def packed_seq_params(self, device: torch.device) -> PackedSeqParams:
        """THD parameters: one packed sequence per image, no padding."""
        cu = self.cu_seqlens(device)
        longest = max(self.seqlens)
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )


def merge_order_positions(
    grids: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    merge_size: int,
    device: torch.device,
) -> torch.Tensor:
    """``[Σ h·w, 2]`` (row, col) of every patch of every image, in 2×2-merge order.

    Patch ``k`` of an image is nested (block_row, block_col, in_row, in_col):
    ``row = m·block_row + in_row``, ``col = m·block_col + in_col`` (m = merge size).
    """
    counts = torch.tensor([h * w for h, w in grids], device=device)
    widths = torch.tensor([w for _, w in grids], device=device)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    k = torch.arange(int(counts.sum()), device=device) - starts
    blocks_per_row = torch.repeat_interleave(widths // merge_size, counts)
    in_col = k % merge_size
    in_row = (k // merge_size) % merge_size
    block = k // (merge_size * merge_size)
    row = (block // blocks_per_row) * merge_size + in_row
    col = (block % blocks_per_row) * merge_size + in_col
    return torch.stack([row, col], dim=-1)


def vision_rotary_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``inv_freq_j = θ^(−2j/(head_dim/2))``, ``j = 0 … head_dim/4 − 1`` (fp32)."""
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim
    return 1.0 / (theta**exponents)


def vision_rotary_pos_emb(
    layout: PackedImages,
    class_pos_emb: torch.Tensor,
    head_dim: int,
    theta: float,
    merge_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Rotary angles of every packed token as Megatron's ``rotary_pos_emb`` ``[s, 1, 1, d]``.

    A patch at (r, c) gets ``a = [r·inv_freq, c·inv_freq]`` (``d/2`` values, height first); a
    class token gets ``class_pos_emb`` (learned, used directly as angles). The result is
    ``[a, a]``, which Megatron applies rotate-half style (``rotary_interleaved=False``):
    ``q·cos + rotate_half(q)·sin``. Computed in fp32.
    """
    inv_freq = vision_rotary_inv_freq(head_dim, theta, device)
    positions = merge_order_positions(layout.grids, merge_size, device).float()
    patch_angles = (positions.unsqueeze(-1) * inv_freq).flatten(1)  # [Σ h·w, d/2]
    class_angles = class_pos_emb.float().expand(layout.num_images, -1)
    angles = torch.cat([class_angles, patch_angles])[layout.gather_index(device)]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class PatchEmbed(torch.nn.Module):
    """Bias-free ``Conv2d(C → hidden, kernel = stride = P)`` on flattened patch rows.

    The weight keeps the convolution layout ``[hidden, C, P, P]`` (the HF tensor as is); since
    each row of ``pixel_values`` is one channel-major ``(C, P, P)`` patch, the convolution is the
    matmul ``rows @ weight.flatten(1).T``.
    """

    def __init__(
        self, in_channels: int, patch_size: int, hidden_size: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(hidden_size, in_channels, patch_size, patch_size, dtype=dtype)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, C·P·P]`` → ``[N, hidden]``."""
        return F.linear(pixel_values.to(self.weight.dtype), self.weight.flatten(1))


class RiceViT(MegatronModule):
    """The Rice ViT over packed variable-resolution images (held by the VLM as ``vision_model``).

    Parameters: ``patch_embed.weight`` ``[hidden, C, P, P]``, ``class_embedding`` ``[hidden]``,
    ``class_pos_emb`` ``[1, head_dim/2]``, ``pre_layernorm.{weight,bias}`` (all replicated over
    tensor parallelism) and ``decoder`` (a :class:`TransformerBlock`; attention and MLP split
    over TP, no final norm).

    Args:
        config: from :func:`rice_vit_transformer_config`.
        spec: the block's layers (:func:`rice_vit_block_spec`).
        norm: class of ``pre_layernorm`` (``TENorm`` or :class:`TorchNormFactory`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        spec: TransformerBlockSubmodules | ModuleSpec,
        *,
        patch_size: int = 14,
        in_channels: int = 3,
        spatial_merge_size: int = 2,
        rope_theta: float = 10000.0,
        norm: type | ModuleSpec = TorchNormFactory,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        head_dim = config.kv_channels
        if head_dim % 4:
            raise ValueError(f"Rice ViT head dim {head_dim} must be divisible by 4 (2-D RoPE)")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.spatial_merge_size = spatial_merge_size
        self.rope_theta = rope_theta
        self.head_dim = head_dim

        hidden, dtype = config.hidden_size, config.params_dtype
        self.patch_embed = PatchEmbed(in_channels, patch_size, hidden, dtype)
        self.class_embedding = torch.nn.Parameter(torch.empty(hidden, dtype=dtype))
        self.class_pos_emb = torch.nn.Parameter(torch.empty(1, head_dim // 2, dtype=dtype))
        self.pre_layernorm = build_module(
            norm, config=config, hidden_size=hidden, eps=config.layernorm_epsilon
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=spec,
            post_layer_norm=False,
            pre_process=True,
            post_process=True,
            pg_collection=pg_collection,
        )
        if config.perform_initialization:
            self._init_own_parameters()

    @torch.no_grad()
    def _init_own_parameters(self) -> None:
        # Drawn from the default generator, which every TP rank seeds identically, so the
        # replicated parameters start equal on all of them.
        self.config.init_method(self.patch_embed.weight)
        self.class_embedding.normal_(0.0, self.config.hidden_size**-0.5)
        self.class_pos_emb.normal_(0.0, (self.head_dim // 2) ** -0.5)

    @property
    def patch_dim(self) -> int:
        """Length of one ``pixel_values`` row (``C·P·P``)."""
        return self.in_channels * self.patch_size * self.patch_size

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Pipeline hook (the tower is always whole on its stage)."""
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """``[Σ h·w, C·P·P]`` patches + ``[n, 3]`` grids → ``[Σ h·w, hidden]`` features.

        Rows stay in the input (2×2-merge) order; each image's class token is removed.
        """
        layout = PackedImages(
            tuple(
                check_image_grid(
                    pixel_values, image_grid_thw, self.patch_dim, self.spatial_merge_size
                )
            )
        )
        device = pixel_values.device
        patches = self.patch_embed(pixel_values)
        classes = self.class_embedding.to(patches.dtype).expand(layout.num_images, -1)
        hidden = torch.cat([classes, patches])[layout.gather_index(device)]
        hidden = self.pre_layernorm(hidden).unsqueeze(1)  # [s, b=1, h]

        rotary = vision_rotary_pos_emb(
            layout,
            self.class_pos_emb,
            self.head_dim,
            self.rope_theta,
            self.spatial_merge_size,
            device,
        )
        hidden = self.decoder(
            hidden_states=hidden,
            attention_mask=None,
            rotary_pos_emb=rotary,
            packed_seq_params=layout.packed_seq_params(device),
        )
        return hidden.squeeze(1)[layout.patch_positions(device)]


class PatchMerger(MegatronModule):
    """LayerNorm per patch → every ``merge²`` consecutive tokens as one vector → Linear (bias)
    → exact GELU → Linear (bias) to the LM width (held by the VLM as ``vision_projection``).

    ``layernorm`` is replicated over TP; ``encoder`` is Megatron's :class:`MLP` with a
    column-parallel ``linear_fc1`` and a row-parallel ``linear_fc2`` (split over TP, output
    all-reduced), as in Megatron-Core's ``MultimodalProjector``.

    Args:
        config: from :func:`patch_merger_transformer_config` (``hidden_size`` = output width).
        submodules: :func:`patch_merger_submodules`.
        input_size: ViT width.
        merge_size: spatial merge size (2: four tokens per output token).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        *,
        input_size: int,
        merge_size: int = 2,
        norm: type | ModuleSpec = TorchNormFactory,
    ) -> None:
        super().__init__(config=config)
        self.input_size = input_size
        self.group = merge_size * merge_size
        self.layernorm = build_module(
            norm, config=config, hidden_size=input_size, eps=config.layernorm_epsilon
        )
        self.encoder = MLP(
            config=config,
            submodules=submodules,
            input_size=input_size * self.group,
            ffn_hidden_size=config.ffn_hidden_size,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[Σ h·w, input_size]`` in merge order → ``[Σ h·w / merge², hidden_size]``."""
        if features.ndim != 2 or features.shape[1] != self.input_size:
            raise ValueError(
                f"merger input must be [tokens, {self.input_size}], got {tuple(features.shape)}"
            )
        if features.shape[0] % self.group:
            raise ValueError(
                f"merger input has {features.shape[0]} tokens, not a multiple of {self.group}"
            )
        merged = self.layernorm(features).reshape(-1, 1, self.input_size * self.group)
        output, bias = self.encoder(merged)
        if bias is not None:
            output = output + bias
        return output.squeeze(1)


def build_rice_vit(cfg: RunConfig, config: TransformerConfig | None = None) -> RiceViT:
    """The Rice ViT of ``cfg`` with the TE spec (THD attention) or the local spec (mask)."""
    v = vision_of(cfg)
    config = config or rice_vit_transformer_config(cfg)
    te = use_transformer_engine(cfg)
    return RiceViT(
        config,
        rice_vit_block_spec(config, te, core_attention_module(cfg)),
        patch_size=v.patch_size,
        in_channels=v.in_channels,
        spatial_merge_size=v.spatial_merge_size,
        rope_theta=v.rope_theta,
        norm=vit_modules(te).norm,
        pg_collection=vision_process_groups(),
    )


def build_patch_merger(cfg: RunConfig, config: TransformerConfig | None = None) -> PatchMerger:
    """The 2×2 patch merger of ``cfg`` (output width ``cfg.model.language.hidden_size``)."""
    v = vision_of(cfg)
    te = use_transformer_engine(cfg)
    return PatchMerger(
        config or patch_merger_transformer_config(cfg),
        patch_merger_submodules(te),
        input_size=v.hidden_size,
        merge_size=v.spatial_merge_size,
        norm=vit_modules(te).norm,
    )
