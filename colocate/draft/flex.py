"""TTT attention through `torch.nn.attention.flex_attention`: one block-sparse kernel per step.

Same maths as `attention.ttt_attention` (the per-sequence loop, kept as the reference): at
unroll step k the query at packed index t attends to the step-0 keys of its own sequence at
s <= t and to the keys that steps 1..k produced at t itself, with one softmax over the union.

The two parts are computed apart and merged by their log-sum-exps:

* causal part: flex attention over step 0's keys only, the same block mask at every step,
  returning its output O_c and log-sum-exp L_c per query and head;
* diagonal part: k scores s_i = q . k_i per query and head, elementwise (no key block is
  loaded for them);
* merge (`diag_merge.merge_diagonal`, a Triton kernel on CUDA): with L = logsumexp(L_c, s_1..s_k),
  out = exp(L_c - L) O_c + sum_i exp(s_i - L) v_i, which is the one softmax over the union.

Gradients reach flex through both O_c and L_c (flex differentiates its log-sum-exp since
torch 2.5). Why not one flex call over [K0; K1; ...; Kk] with a diagonal mask, as before
2026-12-02: each query block then computed k whole 128 x 128 key blocks of which one entry
per row counts, about a quarter of the kernel's blocks over a 7-step unroll of 2k-token
documents, and every step concatenated all earlier keys anew.

Step 0's keys are padded with zeros from T to Tp = ceil(T / BLOCK) * BLOCK, and the mask is
expressed through small int32 lookup tables:

    kv_pos[kv]  token index of key kv, -1 on padding
    kv_doc[kv]  sequence id of key kv, -1 on padding
    q_doc[q]    sequence id of query q (-2 past T, so it matches no key)

    allowed(q, kv) = kv_doc[kv] == q_doc[q] and kv_pos[kv] <= q     (causal, own sequence)

Tables instead of Python ints in the mask closure: the compiled kernel takes captured
tensors as inputs, whereas an int would be a guard and recompile per T.

Why this is faster than the loop (`tests/gpu/bench_draft_attention.py` measures it):

* Block sparsity. A query block touches only its causal blocks inside its own sequences;
  everything else is skipped without loading it.
* No [Hq, L, L] materialisation. The compiled kernel keeps scores in registers/SRAM tiles
  (online softmax) and saves only the output and the log-sum-exp for backward, O(T) memory,
  so backward needs no activation checkpointing and no recompute of the forward pass (the
  loop recomputes every sequence's scores). The backward kernel regenerates score tiles
  from q, k and the log-sum-exp, as flash attention does.
* No host loop over sequences and no per-sequence launches.

Numerics: flex computes in the input dtype with fp32 accumulation and an fp32 softmax; the
diagonal scores are rounded to the input dtype before upcasting, as the loop's are, and the
merge runs in float32. `scale` is passed explicitly (head_dim ** -0.5 from the caller).

Host synchronisation. None per step: the sequence ids go host -> device once per micro-step
through a pinned non-blocking copy; the block tables are built by device ops. The block
mask is cached per (device, block size, seq_lens) for the current micro-step only.

Memory of mask building. Eager `create_block_mask` evaluates the mask densely ([T, Tp]
bools per intermediate: 0.27 GB at T = 16k, 4 GB at 64k); it is never called here. The block
tables come from the sequence starts (`_tables`), O((T / BLOCK)^2) memory; the unit tests
hold them to what `create_block_mask` finds on the dense mask.

On CUDA the kernel is `torch.compile(flex_attention)`, made once on first use (see
`compiled_flex_attention` for the choice of dynamic shapes): eager flex materialises the
full score matrix (correct, and what the CPU tests run, but no memory win).

On CPU torch refuses flex backward (`_validate_device`); the eager maths underneath
differentiates fine, and the unit tests lift that one check to compare gradients. Training
on CPU therefore uses the loop (`auto` never picks flex there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from colocate.draft import diag_merge
from colocate.draft.kernels import triton_available
from colocate.hostcopy import to_device

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    FLEX_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # torch < 2.5
    FLEX_IMPORT_ERROR = exc
try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9: `return_lse=True` instead
    AuxRequest = None

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
    """The block mask of one micro-step's packing (the same at every unroll step)."""

    num_tokens: int
    padded_tokens: int
    block_size: int
    q_doc: torch.Tensor
    """[Tp] int32 sequence id per query, -2 past T."""
    kv_doc: torch.Tensor
    """[Tp] int32 sequence id per key, -1 past T."""
    kv_pos: torch.Tensor
    """[Tp] int32 token index per key, -1 past T."""
    seq_start: torch.Tensor
    """[T] int64 first index of each token's sequence (the block tables)."""
    _block_mask: BlockMask | None = None

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
                   q_doc=F.pad(doc_T, (0, pad), value=-2), kv_doc=F.pad(doc_T, (0, pad), value=-1),
                   kv_pos=torch.where(pos < num_tokens, pos, -1), seq_start=start_T)

    def mask_mod(self) -> Callable:
        """Element mask over step 0's keys, padded to Tp: causal inside each sequence."""
        kv_pos, kv_doc, q_doc = self.kv_pos, self.kv_doc, self.q_doc

        def causal_in_sequence(b, h, q_idx, kv_idx):
            return (kv_doc[kv_idx] == q_doc[q_idx]) & (kv_pos[kv_idx] <= q_idx)
        return causal_in_sequence

    def block_mask(self) -> BlockMask:
        if self._block_mask is None:
            self._block_mask = self._tables()
        return self._block_mask

    def _tables(self) -> BlockMask:
        """Block tables from the sequence starts, never from a dense [T, Tp] mask (which
        `create_block_mask` would evaluate: 4 GiB of bools at T = 64k).

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
                                        mask_mod=self.mask_mod(),
                                        seq_lengths=(num_tokens, self.padded_tokens))


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


def _pad_tokens(x_THD: torch.Tensor, padded_tokens: int) -> torch.Tensor:
    """[T, H, D] -> [1, H, Tp, D], zero rows past T."""
    x_THD = F.pad(x_THD, (0, 0, 0, 0, 0, padded_tokens - x_THD.shape[0]))
    return x_THD.transpose(0, 1)[None]


def _flex_with_lse(kernel: Callable, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) from flex: `return_aux` since torch 2.9, `return_lse` before."""
    if AuxRequest is not None:
        out, aux = kernel(*args, return_aux=AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return kernel(*args, return_lse=True, **kwargs)


def ttt_flex_attention(q_THD: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                       seq_bounds: list[tuple[int, int]], scale: float, *,
                       block_size: int = BLOCK_SIZE, compiled: bool | None = None) -> torch.Tensor:
    """Drop-in for `attention.ttt_attention`: step k = len(keys) - 1, returns [T, Hq, D].

    compiled: use the compiled flex kernel; None means on CUDA only (eager elsewhere:
    correct, but it materialises the scores).
    """
    num_tokens, num_heads, _ = q_THD.shape
    num_kv_heads = keys[0].shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert seq_bounds and seq_bounds[-1][1] == num_tokens, "seq_lens must sum to T"
    masks = step_masks(seq_bounds, q_THD.device, block_size)
    if compiled is None:
        compiled = q_THD.device.type == "cuda"
    kernel = compiled_flex_attention() if compiled and not torch.compiler.is_compiling() \
        else flex_attention
    args = (q_THD.transpose(0, 1)[None], _pad_tokens(keys[0], masks.padded_tokens),
            _pad_tokens(values[0], masks.padded_tokens))
    kwargs = dict(block_mask=masks.block_mask(), scale=scale,
                  enable_gqa=num_heads != num_kv_heads)
    if len(keys) == 1:
        return kernel(*args, **kwargs)[0].transpose(0, 1)
    out_1HTD, lse_1HT = _flex_with_lse(kernel, *args, **kwargs)
    return diag_merge.merge_diagonal(
        out_1HTD[0].transpose(0, 1), lse_1HT[0].transpose(0, 1), q_THD,
        torch.stack(keys[1:], dim=2), torch.stack(values[1:], dim=2), scale)
