"""Sequence parallelism (`train.sp_size` = s): one micro-batch, s trainers.

The s consecutive pairs of an SP group get the same micro-batches (the data is sharded by
`dp_index`, not by pair). Each engine prefills the whole micro-batch (sglang: as one
tensor-parallel group of s engines; hf: each alone) and writes only its own trainer's
chunk into its slot:

    T tokens, padded to T_pad = s * Tc with one padding sequence (never loss-masked, so
    nothing in it is ever counted or trained); trainer c gets rows [c * Tc, (c + 1) * Tc)
    of aux_hidden and positions, and `halo` rows more of what the recipe reads ahead:
    Eagle3's step k at index t reads the token and teacher row t + 1 + k and the loss mask
    at t + 2 + k, so input_ids, loss_mask and last_hidden carry Tc + unroll + 1 rows;
    DFlash's block anchored at t reads the ids and mask up to t + block_size - 1 (rows
    past T_pad: zeros, never read). seq_lens stay global (with the padding
    sequence): every trainer knows every boundary without a collective, so nothing is
    gathered inside a recomputed region (DESIGN section 10; a gather inside activation
    recompute hung another project).

Everything per token is then local to the chunk (the TTT unroll's hidden state at t
depends only on t) except attention: around it, an all-to-all turns [Tc, H, D] (own
tokens, all heads) into [T_pad, H / s, D] (all tokens, own heads) and back (`seq_to_heads`,
`heads_to_seq`). Query head groups are contiguous, so head group j of the queries uses
key/value head group j (GQA stays grouped; both head counts must divide by s).

DFlash (colocate/draft/dflash.py) trains, on each trainer, the blocks anchored in its chunk;
their queries read the context of whole documents, so each draft layer all-gathers the
group's context keys/values (`gather_rows`, whose backward reduce-scatters the gradient to
the rows' owners). Statistics that do not split into chunks (the serving replay) are taken
on the gathered rows and counted once per group (`summarize_whole`).

Gradients: every trainer's loss is its chunk's share of the step's per-token loss (the
step's label totals divide the engines' counts by s: the s engines of a group count the
same micro-batch), so FSDP2's reduction over all trainers (data x sequence) is right as
it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SpChunk:
    """Which chunk of each micro-batch one engine writes for its trainer."""

    rank: int
    """Place in the SP group (pair_index % s)."""
    size: int
    """s."""
    halo: int
    """Rows past the chunk's end of input_ids, loss_mask and last_hidden (the recipe's)."""

    def geometry(self, num_tokens: int) -> tuple[int, int, int]:
        """(T_pad, start, end) of this rank's chunk of a `num_tokens`-token micro-batch."""
        chunk = -(-num_tokens // self.size)
        return chunk * self.size, self.rank * chunk, (self.rank + 1) * chunk

    def max_rows(self, budget: int) -> tuple[int, int]:
        """(chunk rows, chunk + halo rows) of the largest micro-batch within `budget`."""
        chunk = -(-budget // self.size)
        return chunk, chunk + self.halo


def padded_seq_lens(seq_lens: torch.Tensor, padded_tokens: int) -> torch.Tensor:
    """`seq_lens` plus one padding sequence up to `padded_tokens` (none when it fits)."""
    pad = padded_tokens - int(seq_lens.sum())
    if pad == 0:
        return seq_lens
    return torch.cat([seq_lens, seq_lens.new_tensor([pad])])


def rows(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """tensor[start:end], zero rows past its end (a copy when it pads)."""
    have = tensor[start:min(end, tensor.shape[0])]
    if have.shape[0] == end - start:
        return have
    out = tensor.new_zeros((end - start, *tensor.shape[1:]))
    out[:have.shape[0]] = have
    return out


HALO_FEATURES = ("input_ids", "loss_mask", "last_hidden")
"""The per-token features a chunk carries `halo` rows past its end."""


def chunk_rows(name: str, tensor: torch.Tensor, chunk: SpChunk, num_tokens: int) -> torch.Tensor:
    """This rank's rows of per-token feature `name` of a `num_tokens`-token micro-batch:
    the chunk, with the halo for HALO_FEATURES, zeros past the end."""
    _, start, end = chunk.geometry(num_tokens)
    return rows(tensor, start, end + (chunk.halo if name in HALO_FEATURES else 0))


def chunk_features(features: dict[str, torch.Tensor], chunk: SpChunk) -> tuple[dict, list[int]]:
    """(this rank's slot tensors, [start, end]) from a whole micro-batch's `features`
    (input_ids, positions, loss_mask, seq_lens, and any per-token others): `chunk_rows`
    of each, positions continued into the padding sequence, seq_lens whole with it."""
    num_tokens = features["input_ids"].shape[0]
    padded, start, end = chunk.geometry(num_tokens)
    seq_lens = features["seq_lens"]
    pad_positions = torch.arange(padded - num_tokens, device=features["positions"].device)
    out = {"seq_lens": padded_seq_lens(seq_lens, padded),
           "positions": torch.cat([features["positions"], pad_positions])[start:end]}
    for name, tensor in features.items():
        if name not in out:
            out[name] = chunk_rows(name, tensor, chunk, num_tokens)
    return out, [start, end]


def check_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    """ValueError naming train.sp_size when the draft's heads do not split into s groups."""
    if num_heads % sp_size or num_kv_heads % sp_size:
        divisors = [d for d in range(1, num_kv_heads + 1)
                    if num_kv_heads % d == 0 and num_heads % d == 0]
        raise ValueError(
            f"train.sp_size: {sp_size} does not divide the draft's {num_heads} attention heads "
            f"and {num_kv_heads} key/value heads (Ulysses gives each trainer of a group a "
            f"1/sp_size share of both); use one of {divisors}")


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # first: empty_like keeps a transposed input's strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """One all-to-all direction (`to_heads`: [Tc, H, D] own tokens and all heads ->
    [s * Tc, H / s, D] all tokens and own heads; else the inverse); its gradient is the
    other direction."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    s = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    # Head group j goes to rank j; rank j's received block i is rank i's chunk of it.
    send = x.reshape(tokens, s, heads // s, dim).transpose(0, 1)
    return _all_to_all(send, group).reshape(s * tokens, heads // s, dim)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    s = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    received = _all_to_all(x.reshape(s, tokens // s, heads, dim), group)
    # Block j holds this rank's tokens for head group j: put head groups side by side.
    return received.transpose(0, 1).reshape(tokens // s, s * heads, dim)


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    return _Exchange.apply(x, group, True)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _Exchange.apply(x, group, False)


class _GatherRows(torch.autograd.Function):
    """All-gather of the group's equal chunks of rows, in rank order. Its gradient is the
    reduce-scatter: a rank's rows get the sum of every rank's gradient for them, because
    every rank's loss may read every row (DFlash's context keys and values)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # first: empty_like keeps a transposed input's strides
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        parts = list(grad.contiguous().chunk(dist.get_world_size(ctx.group)))
        out = torch.empty_like(parts[0])
        # The list forms (here and in forward): torch 2.13 warns that the *_tensor ones are
        # deprecated, and their *_single successors are too new for the torch >= 2.6 we allow.
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """The group's chunks of `x` (equal row counts) in rank order, on every rank;
    differentiable (the gradient is reduce-scattered back to the rows' owners)."""
    return _GatherRows.apply(x, group)


def gather_token_rows(per_token: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The whole micro-batch of each of this rank's per-token integer or bool tensors
    ([Tc] or [Tc, C]: masks, hits, counts), in one all-gather (as int64); dtypes kept."""
    columns = [t.reshape(t.shape[0], -1).long() for t in per_token]
    whole = gather_rows(torch.cat(columns, 1), group)
    parts = whole.split([c.shape[1] for c in columns], 1)
    return [part.reshape(-1, *t.shape[1:]).to(t.dtype) for part, t in zip(parts, per_token)]


def summarize_whole(summarize, per_token: list[torch.Tensor], group) -> torch.Tensor:
    """`summarize(*per_token)` of the whole micro-batch (a statistic that does not split
    into chunks, like the serving walk of a reply that crosses them). With sequence
    parallelism (`group` not None) the group's chunks are gathered first and the value is
    kept on the group's first rank only, zeros elsewhere: summed over the group's
    trainers, it counts once."""
    if group is None:
        return summarize(*per_token)
    value = summarize(*gather_token_rows(per_token, group))
    return value if dist.get_rank(group) == 0 else torch.zeros_like(value)
