"""DFlash draft model in the parameter layout sglang 0.5.17's `DFlashDraftModel` loads.

State-dict names (sglang `srt/models/dflash.py`: `load_weights` stacks q/k/v into qkv_proj
and gate/up into gate_up_proj, accepts names with or without a `model.` prefix, and
silently drops names it does not know):

    fc.weight                                   [H, K * H]      K = len(target_layer_ids)
    hidden_norm.weight                          [H]
    layers.{i}.input_layernorm.weight           [H]
    layers.{i}.self_attn.q_proj.weight          [Hq * D, H]
    layers.{i}.self_attn.k_proj.weight          [Hkv * D, H]
    layers.{i}.self_attn.v_proj.weight          [Hkv * D, H]
    layers.{i}.self_attn.o_proj.weight          [H, Hq * D]
    layers.{i}.self_attn.q_norm.weight          [D]             per-head RMSNorm (Qwen3)
    layers.{i}.self_attn.k_norm.weight          [D]
    layers.{i}.post_attention_layernorm.weight  [H]
    layers.{i}.mlp.gate_proj.weight             [I, H]
    layers.{i}.mlp.up_proj.weight               [I, H]
    layers.{i}.mlp.down_proj.weight             [H, I]
    norm.weight                                 [H]

No embedding and no lm_head: serving embeds the block with the target's embedding and
applies the target's lm_head directly to this model's `norm` output (no target final norm).

Data flow (sglang: `project_target_hidden`, `_append_target_hidden_sequential`, the layers
with AttentionType.ENCODER_ONLY, i.e. no causal mask inside the attended set):

    ctx = hidden_norm(fc(H))                       H: K target layer outputs, [T, K*H]
    per layer, h the block's residual stream (h = block embeddings before layer 0):
        x = input_layernorm(h)
        q = rope(q_norm(q_proj(x)), block positions)
        keys   = [rope(k_norm(k_proj(ctx)), ctx positions) ; rope(k_norm(k_proj(x)), block positions)]
        values = [v_proj(ctx) ; v_proj(x)]           ctx is NOT input_layernormed
        h = h + o_proj(attention(q, keys, values, mask))
        h = h + mlp(post_attention_layernorm(h))
    out = norm(h)

The mask says which keys a query sees (`colocate.draft.dflash_blocks`): the context of its
own sequence strictly before its anchor, and every token of its own block (bidirectional).

Sequence parallelism (`use_sequence_parallel`, colocate/sequence_parallel.py): each trainer
of a group projects its chunk of the context and trains the blocks anchored in it. A block
reads the context of its whole sequence, which other chunks hold, so every layer all-gathers
the context keys (after RoPE) and values of the group; the gradient of that gather is a
reduce-scatter, which hands each rank the gradient of every rank's loss for its rows (and so
on to fc, hidden_norm and the layer's k/v weights). Gathering keys/values per layer rather
than the context features once keeps the k/v projections of each context row on one rank;
nothing is recomputed, so no collective runs inside a recomputed region (DESIGN section 10).
Unlike Eagle3's Ulysses all-to-all, nothing is split by heads: any head count works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from colocate.config import DraftSection
from colocate.draft import kernels
from colocate.draft.arch import RopeGeometry, rope_from_hf
from colocate.draft.eagle3 import Eagle3MLP, RMSNorm, init_draft_weights
from colocate.draft.flex import FLEX_IMPORT_ERROR, compiled_flex_attention
from colocate.draft.kernels import upcast
from colocate.sequence_parallel import gather_rows

if FLEX_IMPORT_ERROR is None:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
else:  # torch < 2.5: only dense masks
    BlockMask = ()


def default_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """sglang's `build_target_layer_ids`: the layers whose outputs form the context (0-based;
    the output of layer l is the input sglang captures before layer l + 1)."""
    if num_features == 1:
        return [num_target_layers // 2]
    if num_target_layers < 4:
        raise ValueError(f"DFlash needs a target with >= 4 layers, got {num_target_layers}")
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_features - 1))) for i in range(num_features)]


@dataclass(frozen=True, kw_only=True)
class DFlashArch(RopeGeometry):
    hidden_size: int
    """Draft width == target width (the draft eats target embeddings and hidden states)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    """HF rope parameters minus rope_theta; None or rope_type 'default' means plain RoPE."""
    max_position_embeddings: int
    num_layers: int
    """Draft decoder layers (`draft.num_layers`)."""
    target_layer_ids: tuple[int, ...]
    """Target layers whose outputs are concatenated into `fc` (K = len)."""
    block_size: int
    """Tokens per block: the anchor and block_size - 1 predictions (`draft.block_size`)."""
    mask_token_id: int
    """Token whose frozen target embedding fills block positions 1..B-1."""
    target_vocab_size: int

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)
        assert self.num_layers >= 1 and self.block_size >= 2, (self.num_layers, self.block_size)
        if not self.target_layer_ids:
            raise ValueError("DFlash target_layer_ids is empty: the context needs >= 1 layer")
        if not 0 <= self.mask_token_id < self.target_vocab_size:
            raise ValueError(f"draft.mask_token_id={self.mask_token_id} is outside the target "
                             f"vocabulary [0, {self.target_vocab_size}); pick an id inside it")
        self.check_rope_type("DFlash")

    @property
    def num_context_features(self) -> int:
        return len(self.target_layer_ids)

    @classmethod
    def from_target_config(cls, hf_config: Any, draft: DraftSection,
                           target_layer_ids: list[int], mask_token_id: int) -> DFlashArch:
        """Derive the draft shape from a target `Qwen3Config`/`LlamaConfig`-like object.

        target_layer_ids: 0-based target layers (`default_target_layer_ids` for sglang's
        default); mask_token_id: already resolved (draft.mask_token_id = -1 is the caller's).
        """
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"target hidden_act {hf_config.hidden_act!r}: the DFlash draft "
                             "(sglang DFlashMLP) supports silu only")
        num_target_layers = hf_config.num_hidden_layers
        bad = [i for i in target_layer_ids if not 0 <= i < num_target_layers]
        if bad:
            raise ValueError(f"DFlash target_layer_ids {bad} are outside the target's "
                             f"{num_target_layers} layers")
        hidden = hf_config.hidden_size
        num_heads = hf_config.num_attention_heads
        theta, scaling = rope_from_hf(hf_config)
        return cls(
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hidden // num_heads,
            intermediate_size=draft.intermediate_size or hf_config.intermediate_size,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            num_layers=draft.num_layers,
            target_layer_ids=tuple(int(i) for i in target_layer_ids),
            block_size=draft.block_size,
            mask_token_id=int(mask_token_id),
            target_vocab_size=hf_config.vocab_size,
        )


def dense_attention(q_MHD: torch.Tensor, k_LKD: torch.Tensor, v_LKD: torch.Tensor,
                    mask_ML: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference attention under a bool mask [M, L] (True = may attend), GQA, fp32 softmax.

    A row that may attend to nothing (a padded anchor) gets output 0, as flex gives it:
    the softmax runs over a finite fill and its probabilities are then zeroed by the mask.
    """
    num_q, num_heads, head_dim = q_MHD.shape
    num_kv_heads = k_LKD.shape[1]
    group = num_heads // num_kv_heads
    q_KGMD = q_MHD.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    scores_KGML = upcast(q_KGMD @ k_LKD.permute(1, 2, 0)[:, None]) * scale
    scores_KGML = scores_KGML.masked_fill(~mask_ML, torch.finfo(scores_KGML.dtype).min)
    probs_KGML = (torch.softmax(scores_KGML, dim=-1) * mask_ML).to(v_LKD.dtype)
    out_KGMD = probs_KGML @ v_LKD.permute(1, 0, 2)[:, None]
    return out_KGMD.permute(2, 0, 1, 3).reshape(num_q, num_heads, head_dim)


def masked_attention(q_MHD: torch.Tensor, k_LKD: torch.Tensor, v_LKD: torch.Tensor,
                     mask: torch.Tensor | BlockMask, scale: float) -> torch.Tensor:
    """Dense reference for a bool mask, flex_attention for a BlockMask (compiled on CUDA)."""
    if isinstance(mask, torch.Tensor):
        return dense_attention(q_MHD, k_LKD, v_LKD, mask, scale)
    compiled = q_MHD.device.type == "cuda" and not torch.compiler.is_compiling()
    kernel = compiled_flex_attention() if compiled else flex_attention
    out = kernel(q_MHD.transpose(0, 1)[None], k_LKD.transpose(0, 1)[None],
                 v_LKD.transpose(0, 1)[None], block_mask=mask, scale=scale,
                 enable_gqa=q_MHD.shape[1] != k_LKD.shape[1])
    return out[0].transpose(0, 1)


def gather_context(k_LKD: torch.Tensor, v_LKD: torch.Tensor, num_ctx: int,
                   group) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [this rank's context; its blocks] -> [the group's context, in rank
    order; this rank's blocks], both in one all-gather (its backward a reduce-scatter)."""
    head_dim = k_LKD.shape[-1]
    ctx_kv = gather_rows(torch.cat([k_LKD[:num_ctx], v_LKD[:num_ctx]], dim=-1), group)
    ctx_k, ctx_v = ctx_kv.split(head_dim, dim=-1)
    return torch.cat([ctx_k, k_LKD[num_ctx:]]), torch.cat([ctx_v, v_LKD[num_ctx:]])


class DFlashAttention(nn.Module):
    def __init__(self, arch: DFlashArch, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        hidden = arch.hidden_size
        self.q_proj = nn.Linear(hidden, arch.num_heads * arch.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, arch.num_kv_heads * arch.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, arch.num_kv_heads * arch.head_dim, bias=False)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, kernels)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, kernels)
        # Derived from the arch, not a weight: kept out of checkpoints and the export.
        self.register_buffer("inv_freq", arch.inv_freq(), persistent=False)
        # train.sp_size > 1: the trainers of one sequence-parallel group, whose context
        # keys/values this layer gathers (module docstring); None: the whole context here.
        self.sp_group = None

    def forward(self, x_MH: torch.Tensor, positions_M: torch.Tensor, ctx_TH: torch.Tensor,
                ctx_positions_T: torch.Tensor, mask: torch.Tensor | BlockMask) -> torch.Tensor:
        num_q, num_ctx = x_MH.shape[0], ctx_TH.shape[0]
        # Keys/values of [context; block] in one matmul each; q only for the block.
        kv_in_LH = torch.cat([ctx_TH.to(x_MH.dtype), x_MH])
        q = self.q_norm(self.q_proj(x_MH).view(num_q, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(kv_in_LH).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(kv_in_LH).view(-1, self.num_kv_heads, self.head_dim)
        cos, sin = kernels.rope_cos_sin(torch.cat([ctx_positions_T, positions_M]), self.inv_freq)
        rope = kernels.pick(kernels.apply_rope, self.kernels, q.device)
        k = rope(k, cos, sin)
        q = rope(q, cos[num_ctx:], sin[num_ctx:])
        if self.sp_group is not None:
            k, v = gather_context(k, v, num_ctx, self.sp_group)
        out = masked_attention(q, k, v, mask, scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(num_q, self.num_heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, arch: DFlashArch, kernels: str = "auto"):
        super().__init__()
        eps = arch.rms_norm_eps
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, kernels)
        self.self_attn = DFlashAttention(arch, kernels)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, kernels)
        self.mlp = Eagle3MLP(arch, kernels)  # the same Llama/Qwen3 SwiGLU MLP

    def forward(self, h_MH: torch.Tensor, positions_M: torch.Tensor, ctx_TH: torch.Tensor,
                ctx_positions_T: torch.Tensor, mask: torch.Tensor | BlockMask) -> torch.Tensor:
        h_MH = h_MH + self.self_attn(self.input_layernorm(h_MH), positions_M, ctx_TH,
                                     ctx_positions_T, mask)
        return h_MH + self.mlp(self.post_attention_layernorm(h_MH))


class DFlashDraft(nn.Module):
    """The whole block draft: context projection and the block layers.

    Training calls `forward(..., project=True)` with the raw target features, so the
    projection runs inside the root module's forward (FSDP2 gathers `fc` and `hidden_norm`
    with the root's parameters only then); incremental decoding projects each new token's
    features once with `project_context` and passes the cached context. Neither keeps state
    between calls.
    """

    def __init__(self, arch: DFlashArch, attention: str = "auto", kernels: str = "auto"):
        """attention: `draft.attention`, read by the loss to pick the mask kind (auto: a flex
        BlockMask on CUDA when usable, else dense; loop: the dense reference; flex: always
        flex, eager and forward-only on CPU as torch allows there); kernels: `draft.kernels`."""
        super().__init__()
        self.arch = arch
        self.attention, self.kernels = attention, kernels
        hidden = arch.hidden_size
        self.fc = nn.Linear(arch.num_context_features * hidden, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, arch.rms_norm_eps, kernels)
        self.layers = nn.ModuleList(DFlashDecoderLayer(arch, kernels)
                                    for _ in range(arch.num_layers))
        self.norm = RMSNorm(hidden, arch.rms_norm_eps, kernels)

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """normal(0, std) linears, ones for every norm (`eagle3.init_draft_weights`)."""
        init_draft_weights(self, generator, std)

    @property
    def sp_group(self):
        """The sequence-parallel group (None: off); see the module docstring."""
        return self.layers[0].self_attn.sp_group

    def use_sequence_parallel(self, group) -> None:
        for layer in self.layers:
            layer.self_attn.sp_group = group

    def project_context(self, target_hidden_TKH: torch.Tensor) -> torch.Tensor:
        """[T, K*H] concatenated target layer outputs -> context features [T, H]
        (sglang `project_target_hidden`: hidden_norm(fc(.)))."""
        return self.hidden_norm(self.fc(target_hidden_TKH.to(self.fc.weight.dtype)))

    def forward(self, block_embeds_MH: torch.Tensor, block_positions_M: torch.Tensor,
                ctx_TH: torch.Tensor, ctx_positions_T: torch.Tensor,
                mask: torch.Tensor | BlockMask, *, project: bool = False) -> torch.Tensor:
        """Hidden states [M, H] of M block tokens after the final `norm` (the target lm_head
        applies to them directly).

        block_embeds_MH: target embeddings of the blocks' tokens; block_positions_M: their
        RoPE positions; ctx_TH: `project_context` output, or with `project` the raw target
        features [T, K*H] it is computed from here; ctx_positions_T: its positions;
        mask: bool [M, T + M] (True = may attend; keys ordered [context; block tokens]) or a
        flex BlockMask over the same [M, T + M] grid. With sequence parallelism ctx_TH and
        ctx_positions_T are this rank's chunk, and T in the mask is the whole micro-batch's.
        """
        if project:
            ctx_TH = self.project_context(ctx_TH)
        h_MH = block_embeds_MH.to(self.fc.weight.dtype)
        for layer in self.layers:
            h_MH = layer(h_MH, block_positions_M, ctx_TH, ctx_positions_T, mask)
        return self.norm(h_MH)
