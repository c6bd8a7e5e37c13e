"""TTT attention through `torch.nn.attention.flex_attention`: one block-sparse kernel per step.

Same maths as `attention.ttt_attention` (the per-sequence loop, kept as the reference): at
unroll step k the query at packed index t attends to the step-0 keys of its own sequence at
s <= t and to the keys that steps 1..k produced at t itself, with one softmax over the union.

Layout of one call. Keys and values of the steps are concatenated along tokens, each step
padded with zeros from T to Tp = ceil(T / BLOCK) * BLOCK so that step boundaries fall on
block boundaries:

    kv index   [0, Tp)        [Tp, 2Tp)      ...   [k Tp, (k+1) Tp)
    holds      K0 (+ pad)     K1 (+ pad)           Kk (+ pad)

and the mask is expressed through three small int32 lookup tables:

    kv_pos[kv]  token index t of key kv, -1 on padding
    kv_doc[kv]  sequence id of a step-0 key, -1 on padding and on steps >= 1
    q_doc[q]    sequence id of query q (-2 past T, so it matches no key)

    allowed(q, kv) = kv_pos[kv] == q                                      (the diagonal)
                     or (kv_doc[kv] == q_doc[q] and kv_pos[kv] <= q)     (causal, own sequence)

which is the brief's "(kv < T, same sequence, kv <= q) or (kv >= T, kv mod T == q)" with the
padding folded in. Tables instead of Python ints in the mask closure: the compiled kernel
takes captured tensors as inputs, whereas an int would be a guard and recompile per T.

Why this is faster than the loop (not measured here; `tests/gpu/bench_draft_attention.py`
measures it on a GPU):

* Block sparsity. A query block touches only its causal blocks inside its own sequences plus
  exactly k diagonal blocks (the padding keeps each step's diagonal in one block per query
  block); everything else is skipped without loading it.
* No [Hq, L, L] materialisation. The compiled kernel keeps scores in registers/SRAM tiles
  (online softmax) and saves only the output and the log-sum-exp for backward, O(T) memory,
  so backward needs no activation checkpointing and no recompute of the forward pass (the
  loop recomputes every sequence's scores). The backward kernel regenerates score tiles
  from q, k and the log-sum-exp, as flash attention does.
* No host loop over sequences and no per-sequence launches.

Numerics: flex computes in the input dtype with fp32 accumulation and an fp32 softmax
(bf16 in, bf16 out; the loop instead rounds q.k to bf16 before upcasting, so flex is, if
anything, closer to fp32). `scale` is passed explicitly (head_dim ** -0.5 from the caller).

Host synchronisation. None per step: the sequence ids go host -> device once per micro-step
through a pinned non-blocking copy; step 0's block tables (argsort/sum on the device) and the
derivation of later steps are device ops. Block masks are cached per (device, block size,
seq_lens) for the current micro-step only.

Memory of mask building. Eager `create_block_mask` evaluates the mask densely ([T, Tp]
bools per intermediate: 0.27 GB at T = 16k, 4 GB at 64k); it is never called here. Step 0's
block tables come from the sequence starts (`_step0`), steps >= 1 from step 0's by appending
the k diagonal blocks of each query block, O((T / BLOCK)^2) memory either way; the unit
tests hold both to what `create_block_mask` finds on the dense mask.

On CUDA the kernel is `torch.compile(flex_attention)`, made once on first use (see
`compiled_flex_attention` for the choice of dynamic shapes): eager flex materialises the
full score matrix (correct, and what the CPU tests run, but no memory win).

On CPU torch refuses flex backward (`_validate_device`); the eager maths underneath
differentiates fine, and the unit tests lift that one check to compare gradients. Training
on CPU therefore uses the loop (`auto` never picks flex there).

Not verified here (CPU-only host): GPU speed, peak memory, and compile behaviour of the
Triton kernels (compile count across micro-steps, torch 2.6-2.13 differences).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from colocate.draft.kernels import triton_available
from colocate.hostcopy import to_device

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    FLEX_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # torch < 2.5
    FLEX_IMPORT_ERROR = exc

BLOCK_SIZE = 128
"""Sparse block size (query and key): flex's default and its kernels' tile."""

ATTENTION_IMPLS = ("auto", "loop", "flex")


def flex_available(device: torch.device) -> bool:
    """Whether the memory-efficient flex path can run on `device` (compiled, CUDA + Triton)."""
    return FLEX_IMPORT_ERROR is None and triton_available(device)


def use_flex(attention: str, device: torch.device) -> bool:
    """Resolve `draft.attention` for a tensor on `device`: auto -> flex on CUDA when usable."""
    assert attention in ATTENTION_IMPLS, attention
    if attention == "auto":
        return flex_available(device)
    if attention == "flex" and FLEX_IMPORT_ERROR is not None:
        raise RuntimeError(f"draft.attention=flex needs torch >= 2.5: {FLEX_IMPORT_ERROR}")
    return attention == "flex"


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """The compiled kernel, created on first use (compiling happens at the first call).

    dynamic=None (automatic dynamic shapes, SpecForge's setting): the first shape compiles
    static, the first change of T or of the key length recompiles once with those sizes
    symbolic. Static shapes (False) would recompile per micro-step and fall back to eager at
    the recompile limit; dynamic=True fails to build on the CPU inductor backend (torch 2.13:
    undeclared `cur_kvSplitSize3`).
    """
    return torch.compile(flex_attention, dynamic=None)


# --------------------------------------------------------------------------- block masks


@dataclass
class StepMasks:
    """Block masks of one micro-step's unroll (one packing), built lazily per step."""

    num_tokens: int
    padded_tokens: int
    block_size: int
    q_doc: torch.Tensor
    """[Tp] int32 sequence id per query, -2 past T."""
    kv_doc0: torch.Tensor
    """[Tp] int32 sequence id per step-0 key, -1 past T."""
    kv_pos0: torch.Tensor
    """[Tp] int32 token index per key of one step, -1 past T."""
    seq_start: torch.Tensor
    """[T] int64 first index of each token's sequence (step 0's block tables)."""
    masks: dict[int, BlockMask] = field(default_factory=dict)

    @classmethod
    def build(cls, seq_lens: tuple[int, ...], device: torch.device, block_size: int) -> StepMasks:
        num_tokens = sum(seq_lens)
        padded = -(-num_tokens // block_size) * block_size
        lens = torch.tensor(seq_lens, dtype=torch.long)
        doc_T = to_device(torch.repeat_interleave(
            torch.arange(len(seq_lens), dtype=torch.int32), lens), device)
        start_T = to_device(torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens), device)
        pad = padded - num_tokens
        pos = torch.arange(padded, dtype=torch.int32, device=device)
        return cls(num_tokens=num_tokens, padded_tokens=padded, block_size=block_size,
                   q_doc=F.pad(doc_T, (0, pad), value=-2), kv_doc0=F.pad(doc_T, (0, pad), value=-1),
                   kv_pos0=torch.where(pos < num_tokens, pos, -1), seq_start=start_T)

    def mask_mod(self, step: int) -> Callable:
        """Element mask of `step` over keys [K0; K1; ...; Kstep], each padded to Tp."""
        kv_pos = self.kv_pos0.repeat(step + 1)
        kv_doc = F.pad(self.kv_doc0, (0, step * self.padded_tokens), value=-1)
        q_doc = self.q_doc

        def ttt_mask(b, h, q_idx, kv_idx):
            pos = kv_pos[kv_idx]
            return (pos == q_idx) | ((kv_doc[kv_idx] == q_doc[q_idx]) & (pos <= q_idx))
        return ttt_mask

    def block_mask(self, step: int) -> BlockMask:
        if step not in self.masks:
            self.masks[step] = self._step0() if step == 0 else self._with_diagonal(step)
        return self.masks[step]

    def _step0(self) -> BlockMask:
        """Step 0's block tables from the sequence starts, never from a dense [T, Tp] mask
        (which `create_block_mask` would evaluate: 4 GiB of bools at T = 64k).

        Query block i holds queries [qs, qe); query q sees keys [start(q), q], start(q) its
        sequence's first index. Starts never decrease and each new sequence starts right
        after the last, so the block's keys form one range [start(qs), qe - 1]: key block
        j is touched iff it meets that range. It is full iff every query of a whole block
        sees every key of a whole key block: j B + B - 1 <= qs and j B >= start(qs + B - 1)
        (no padding on either side)."""
        size, num_tokens = self.block_size, self.num_tokens
        num_blocks = self.padded_tokens // size
        device = self.q_doc.device
        start_T = self.seq_start
        q_first = torch.arange(num_blocks, device=device) * size           # qs per block
        q_last = torch.clamp(q_first + size, max=num_tokens) - 1            # qe - 1
        lo = start_T[q_first] // size                                       # first key block
        hi = q_last // size                                                 # last key block
        whole = q_first + size <= num_tokens
        full_lo = -(-start_T[torch.clamp(q_first + size - 1, max=num_tokens - 1)] // size)
        full_hi = torch.where(whole, q_first // size - 1, torch.full_like(q_first, -1))
        cols = torch.arange(num_blocks, device=device)[None]
        touched = (cols >= lo[:, None]) & (cols <= hi[:, None])
        full = (cols >= full_lo[:, None]) & (cols <= full_hi[:, None])
        partial = touched & ~full

        def ordered(dense):  # flex's layout: per row the count, then the block ids first
            count = dense.sum(-1, dtype=torch.int32)
            order = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
            return count[None, None], order.to(torch.int32)[None, None]

        return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=size,
                                        mask_mod=self.mask_mod(0),
                                        seq_lengths=(num_tokens, self.padded_tokens))

    def _with_diagonal(self, step: int) -> BlockMask:
        """Step-0 block tables plus, per query block i, the partial blocks j * nb + i, j=1..k.

        Full blocks are unchanged: a diagonal block is never full (one key per query).
        """
        base = self.block_mask(0)
        num_blocks = self.padded_tokens // self.block_size
        width = (step + 1) * num_blocks  # kv_indices must span every key block
        device = base.kv_indices.device
        kv_num = base.kv_num_blocks  # [1, 1, nb]
        kv_idx = F.pad(base.kv_indices, (0, width - base.kv_indices.shape[-1]))
        row = torch.arange(num_blocks, device=device)[:, None]
        diag_cols = row + num_blocks * torch.arange(1, step + 1, device=device)  # [nb, k]
        slots = kv_num[..., None].long() + torch.arange(step, device=device)  # first free
        kv_idx = kv_idx.scatter(-1, slots, diag_cols.to(kv_idx.dtype).expand_as(slots))
        full_idx = F.pad(base.full_kv_indices, (0, width - base.full_kv_indices.shape[-1]))
        return BlockMask.from_kv_blocks(
            kv_num + step, kv_idx, base.full_kv_num_blocks, full_idx,
            BLOCK_SIZE=self.block_size, mask_mod=self.mask_mod(step),
            seq_lengths=(self.num_tokens, (step + 1) * self.padded_tokens))


_cached: tuple[tuple, StepMasks] | None = None


def step_masks(seq_bounds: list[tuple[int, int]], device: torch.device,
               block_size: int = BLOCK_SIZE) -> StepMasks:
    """Masks for this packing. One entry: a new packing (the next micro-step) replaces it."""
    global _cached
    seq_lens = tuple(end - start for start, end in seq_bounds)
    key = (device, block_size, seq_lens)
    if _cached is None or _cached[0] != key:
        _cached = (key, StepMasks.build(seq_lens, device, block_size))
    return _cached[1]


# --------------------------------------------------------------------------- attention


def _concat_steps(parts: list[torch.Tensor], padded_tokens: int) -> torch.Tensor:
    """[T, H, D] per step -> [H, (k+1) Tp, D], each step zero-padded to Tp tokens."""
    num_tokens = parts[0].shape[0]
    if padded_tokens != num_tokens:
        pad = parts[0].new_zeros(padded_tokens - num_tokens, *parts[0].shape[1:])
        parts = [p for part in parts for p in (part, pad)]
    return torch.cat(parts).transpose(0, 1)


def ttt_flex_attention(q_THD: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                       seq_bounds: list[tuple[int, int]], scale: float, *,
                       block_size: int = BLOCK_SIZE, compiled: bool | None = None) -> torch.Tensor:
    """Drop-in for `attention.ttt_attention`: step k = len(keys) - 1, returns [T, Hq, D].

    compiled: use the compiled kernel; None means on CUDA only (eager elsewhere: correct,
    but it materialises the scores).
    """
    num_tokens, num_heads, _ = q_THD.shape
    num_kv_heads = keys[0].shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert seq_bounds and seq_bounds[-1][1] == num_tokens, "seq_lens must sum to T"
    step = len(keys) - 1
    masks = step_masks(seq_bounds, q_THD.device, block_size)
    k_HSD = _concat_steps(keys, masks.padded_tokens)
    v_HSD = _concat_steps(values, masks.padded_tokens)
    if compiled is None:
        compiled = q_THD.device.type == "cuda"
    kernel = compiled_flex_attention() if compiled and not torch.compiler.is_compiling() \
        else flex_attention
    out_1HTD = kernel(q_THD.transpose(0, 1)[None], k_HSD[None], v_HSD[None],
                      block_mask=masks.block_mask(step), scale=scale,
                      enable_gqa=num_heads != num_kv_heads)
    return out_1HTD[0].transpose(0, 1)
