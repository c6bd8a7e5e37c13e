"""Eagle3 draft model in the parameter layout sglang's `LlamaForCausalLMEagle3` loads.

State-dict names (sglang 0.5.17 `srt/models/llama_eagle3.py`: `load_weights` maps
`midlayer` -> `layers.0`, prefixes `model.` where needed and stacks q/k/v and gate/up):

    fc.weight                                   [H, num_aux * H]
    midlayer.hidden_norm.weight                 [H]
    midlayer.input_layernorm.weight             [H]
    midlayer.self_attn.q_proj.weight            [Hq * D, 2H]
    midlayer.self_attn.k_proj.weight            [Hkv * D, 2H]
    midlayer.self_attn.v_proj.weight            [Hkv * D, 2H]
    midlayer.self_attn.o_proj.weight            [H, Hq * D]
    midlayer.post_attention_layernorm.weight    [H]
    midlayer.mlp.gate_proj.weight               [I, H]
    midlayer.mlp.up_proj.weight                 [I, H]
    midlayer.mlp.down_proj.weight               [H, I]
    norm.weight                                 [H]
    lm_head.weight                              [Vd, H]

Data flow of one step (same as sglang's input layer and SpecForge's `LlamaDecoderLayer`):

    residual = hidden
    x = cat([input_layernorm(embeds), hidden_norm(hidden)])        # embeds first, [T, 2H]
    h = residual + o_proj(attention(x))
    h = h + mlp(post_attention_layernorm(h))                        # next step's hidden
    logits = lm_head(norm(h))

The frozen target embedding is not a parameter: callers pass embeddings in, so FSDP never
shards or updates it. `d2t`/`t2d` vocab maps are written at export, not kept here.
"""

from __future__ import annotations

import torch
from torch import nn

from colocate.draft import kernels
from colocate.draft.arch import DraftArch
from colocate.draft.attention import ttt_attention
from colocate.draft.flex import ttt_flex_attention, use_flex
from colocate.sequence_parallel import heads_to_seq, seq_to_heads

class Carried:
    """The unroll's running hidden state, handed to the draft's FSDP2 units inside a plain
    object so that FSDP2 registers no post-backward hook on it.

    Every unroll step calls each unit again. FSDP2 reduce-scatters a unit's gradients in the
    post-backward hook of the first call whose input gradient backward reaches, and again in
    its final callback for the calls after it: two reduce-scatters per optimizer step
    (tests/unit/test_fsdp_gathers.py counted them). With no hooked input, the final
    callback reduces each unit once, with every step's gradient in it.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def uncarry(hidden: torch.Tensor | Carried) -> torch.Tensor:
    return hidden.tensor if isinstance(hidden, Carried) else hidden


class KVCache:
    """Keys/values of the unroll steps so far, one (k, v) pair per step.

    A plain class on purpose, not a list: FSDP2's mixed-precision input cast (and any
    forward pre-hook that maps over inputs) rebuilds the lists it traverses, so appends made
    inside `forward` would land in a copy and the next step would see an empty cache.
    """

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def append(self, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.entries.append(kv)
"""Keys/values ([T, Hkv, D] each, RoPE applied) of the unroll steps so far, step 0 first."""


@torch.no_grad()
def init_draft_weights(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Deterministic init of any draft: normal(0, std) linears, ones for norms.

    Values are drawn on the CPU from `generator` in parameter-name order, so the result is
    the same on every device. Call before sharding (FSDP params are DTensors).
    """
    for name, param in sorted(module.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(
                0.0, std, generator=generator)
            param.copy_(values)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.pick(kernels.rms_norm, self.kernels, x.device)(x, self.weight, self.eps)


class Eagle3Attention(nn.Module):
    def __init__(self, arch: DraftArch, attention: str = "auto", kernels: str = "auto"):
        super().__init__()
        # draft.attention (auto, loop or flex) and draft.kernels, resolved per call against
        # the input's device: the module may be built on CPU or meta and moved afterwards.
        self.attention, self.kernels = attention, kernels
        in_features = 2 * arch.hidden_size  # [embeds, hidden]
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_proj = nn.Linear(in_features, arch.num_heads * arch.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, arch.num_kv_heads * arch.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, arch.num_kv_heads * arch.head_dim, bias=False)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False)
        # Not a parameter and not persistent: derived from the arch, so checkpoints and the
        # sglang export carry only the weights above.
        self.register_buffer("inv_freq", arch.inv_freq(), persistent=False)
        # train.sp_size > 1: the trainers of one sequence-parallel group (Ulysses all-to-all
        # around the attention, colocate/sequence_parallel.py); None: the whole sequence here.
        self.sp_group = None

    def forward(self, x_T2H: torch.Tensor, positions: torch.Tensor,
                seq_bounds: list[tuple[int, int]], kv_cache: KVCache) -> torch.Tensor:
        num_tokens = x_T2H.shape[0]
        step = len(kv_cache)
        q = self.q_proj(x_T2H).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x_T2H).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_T2H).view(num_tokens, self.num_kv_heads, self.head_dim)
        # Step k sits k positions further on, as the k-th draft token does when serving
        # (SpecForge rotates q and the new k with `position_ids + lck`).
        rope_qk = kernels.pick(kernels.rope_qk, self.kernels, q.device)
        q, k = rope_qk(q, k, positions + step, self.inv_freq)
        if self.sp_group is not None:  # own tokens, all heads -> all tokens, own heads
            q, k, v = (seq_to_heads(x, self.sp_group) for x in (q, k, v))
        kv_cache.append((k, v))
        impl = ttt_flex_attention if use_flex(self.attention, q.device) else ttt_attention
        out = impl(q, [kk for kk, _ in kv_cache], [vv for _, vv in kv_cache], seq_bounds,
                   scale=self.head_dim ** -0.5)
        if self.sp_group is not None:
            out = heads_to_seq(out, self.sp_group)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class Eagle3MLP(nn.Module):
    def __init__(self, arch: DraftArch, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        silu_mul = kernels.pick(kernels.silu_mul, self.kernels, x.device)
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, arch: DraftArch, attention: str = "auto", kernels: str = "auto"):
        super().__init__()
        eps = arch.rms_norm_eps
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, kernels)
        self.hidden_norm = RMSNorm(arch.hidden_size, eps, kernels)
        self.self_attn = Eagle3Attention(arch, attention, kernels)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, kernels)
        self.mlp = Eagle3MLP(arch, kernels)

    def forward(self, embeds_TH: torch.Tensor, hidden_TH: torch.Tensor | Carried,
                positions: torch.Tensor, seq_bounds: list[tuple[int, int]],
                kv_cache: KVCache) -> torch.Tensor:
        hidden_TH = uncarry(hidden_TH)
        x_T2H = torch.cat([self.input_layernorm(embeds_TH), self.hidden_norm(hidden_TH)], dim=-1)
        h = hidden_TH + self.self_attn(x_T2H, positions, seq_bounds, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    """One TTT step per `forward` call.

    Each step goes through `forward` (not a helper method) so that FSDP2's pre/post-forward
    hooks, which gather and free the sharded parameters, run for every step. `forward`
    appends to `kv_cache`: do not wrap it whole in activation checkpointing (a recompute
    would append again); checkpoint inside it (e.g. the MLP) if memory demands.
    """

    def __init__(self, arch: DraftArch, attention: str = "auto", kernels: str = "auto"):
        """attention: `draft.attention` (auto: flex on CUDA when usable, else the loop);
        kernels: `draft.kernels` (auto: compiled on CUDA when usable, else eager)."""
        super().__init__()
        self.arch = arch
        self.kernels = kernels  # also read by the loss (`eagle3_unroll`)
        self.fc = nn.Linear(arch.num_aux * arch.hidden_size, arch.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(arch, attention, kernels)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels)
        self.lm_head = nn.Linear(arch.hidden_size, arch.draft_vocab_size, bias=False)

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        init_draft_weights(self, generator, std)

    @property
    def sp_group(self):
        """The sequence-parallel group (None: off); see colocate/sequence_parallel.py."""
        return self.midlayer.self_attn.sp_group

    def use_sequence_parallel(self, group) -> None:
        self.midlayer.self_attn.sp_group = group

    def forward(self, embeds_TH: torch.Tensor, hidden: torch.Tensor | Carried,
                positions: torch.Tensor, seq_bounds: list[tuple[int, int]],
                kv_cache: KVCache, head_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run unroll step k = len(kv_cache) (appends its keys/values to `kv_cache`).

        embeds_TH: [T, H] target embeddings of the input tokens of this step.
        hidden: step 0 (empty cache): aux hidden states [T, num_aux * H], projected by `fc`;
            later steps: the previous step's output [T, H]; either may come `Carried`.
        positions: [T] per-sequence positions (reset at every sequence start).
        seq_bounds: host-side [start, end) of each packed sequence (with sequence
            parallelism: of the whole micro-batch, whose chunk of T rows this is).
        head_rows: [M] rows to compute logits for (None: all T); the others need none.
        Returns (hidden_out [T, H] pre-norm, the next step's input; logits [M, Vd]).
        """
        hidden = uncarry(hidden)
        if not kv_cache:
            hidden = self.fc(hidden.to(self.fc.weight.dtype))
        hidden_out = self.midlayer(embeds_TH.to(hidden.dtype), Carried(hidden), positions,
                                   seq_bounds, kv_cache)
        head_in = hidden_out if head_rows is None else hidden_out[head_rows]
        return hidden_out, self.lm_head(self.norm(head_in))
