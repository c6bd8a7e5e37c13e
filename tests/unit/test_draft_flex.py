"""flex_attention TTT path against the per-sequence loop (`ttt_attention`, the reference).

The CPU runs here use eager flex, which evaluates the mask densely and ignores the block
tables; the tables are therefore checked on their own against `create_block_mask` over the
full element mask, and one compiled-CPU case runs the block-sparse kernel end to end.
"""

import shutil

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask
from transformers import LlamaConfig

from colocate.config import ConfigError, DraftSection
from colocate.draft import DraftArch, Eagle3Draft
from colocate.draft import flex
from colocate.draft.attention import seq_bounds_from_lens, ttt_attention
from colocate.draft.flex import step_masks, ttt_flex_attention, use_flex

SEQ_LENS = [5, 1, 7, 3, 9]  # 25 tokens: a length-1 sequence, and padding for blocks of 4 and 8


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch's front end refuses flex backward on CPU (`_validate_device`), although the eager
    implementation underneath it (dense math, the same on every device) differentiates fine.
    Lifting that one check lets the gradients of our mask, layout and GQA be compared here."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def random_inputs(step, num_heads, num_kv_heads, seq_lens=SEQ_LENS, head_dim=8,
                  dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(seq_lens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    q = randn(num_tokens, num_heads, head_dim)
    keys = [randn(num_tokens, num_kv_heads, head_dim) for _ in range(step + 1)]
    values = [randn(num_tokens, num_kv_heads, head_dim) for _ in range(step + 1)]
    return q, keys, values


def output_and_grads(fn, q, keys, values, seq_lens, grad_out):
    out = fn(q, keys, values, seq_bounds_from_lens(seq_lens), q.shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, [q, *keys, *values], grad_out)
    return out, grads


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_matches_loop_outputs_and_grads(cpu_flex_backward, step, num_heads, num_kv_heads,
                                        block_size):
    q, keys, values = random_inputs(step, num_heads, num_kv_heads, seed=step + num_kv_heads)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = output_and_grads(ttt_attention, q, keys, values, SEQ_LENS, grad_out)

    def flex_fn(*args):
        return ttt_flex_attention(*args, block_size=block_size)
    out, grads = output_and_grads(flex_fn, q, keys, values, SEQ_LENS, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    names = ["q"] + [f"k{i}" for i in range(step + 1)] + [f"v{i}" for i in range(step + 1)]
    for name, grad, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def dense_blocks(num_blocks, indices, num_cols):
    """Ordered block table [1, 1, R] / [1, 1, R, C] -> bool [R, num_cols]."""
    dense = torch.zeros(indices.shape[-2], num_cols, dtype=torch.bool)
    for row, count in enumerate(num_blocks[0, 0].tolist()):
        dense[row, indices[0, 0, row, :count].long()] = True
    return dense


PACKINGS = [SEQ_LENS, [16], [3, 13, 4, 12], [20, 1, 1, 22, 9], [4, 4, 4, 4]]
"""Sequences inside a block, across several, ending on block edges, T a multiple of B."""


@pytest.mark.parametrize("seq_lens", PACKINGS)
@pytest.mark.parametrize("block_size", [4, 8, 128])
def test_block_tables_equal_create_block_mask_on_full_mask(block_size, seq_lens):
    """The tables come from the sequence starts; they must be exactly what
    create_block_mask finds on the dense [T, Tp] mask (partial and full blocks)."""
    flex._cached = None
    masks = step_masks(seq_bounds_from_lens(seq_lens), torch.device("cpu"), block_size)
    ours = masks.block_mask()
    ref = create_block_mask(masks.mask_mod(), None, None, sum(seq_lens), masks.padded_tokens,
                            device="cpu", BLOCK_SIZE=block_size)
    assert ours.seq_lengths == ref.seq_lengths
    num_cols = masks.padded_tokens // block_size
    for table in ("kv", "full_kv"):
        got = dense_blocks(getattr(ours, f"{table}_num_blocks"), getattr(ours, f"{table}_indices"),
                           num_cols)
        want = dense_blocks(getattr(ref, f"{table}_num_blocks"), getattr(ref, f"{table}_indices"),
                            num_cols)
        assert torch.equal(got, want), table


def test_mask_matches_definition():
    """Element mask over step 0's padded keys: causal inside the query's own sequence."""
    flex._cached = None
    masks = step_masks(seq_bounds_from_lens(SEQ_LENS), torch.device("cpu"), 8)
    mask = flex_module.create_mask(masks.mask_mod(), None, None, sum(SEQ_LENS),
                                   masks.padded_tokens, device="cpu")[0, 0]
    seq_of = torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS))
    for q in range(sum(SEQ_LENS)):
        for kv in range(masks.padded_tokens):
            want = kv < sum(SEQ_LENS) and bool(kv <= q and seq_of[kv] == seq_of[q])
            assert bool(mask[q, kv]) == want, (q, kv)


def test_bf16_close_to_float32_loop(cpu_flex_backward):
    q, keys, values = random_inputs(3, 8, 2, dtype=torch.bfloat16)
    bounds = seq_bounds_from_lens(SEQ_LENS)
    out = ttt_flex_attention(q, keys, values, bounds, 8 ** -0.5, block_size=8)
    assert out.dtype == torch.bfloat16
    ref = ttt_attention(q.float(), [k.float() for k in keys], [v.float() for v in values],
                        bounds, 8 ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_masks_cached_per_packing():
    flex._cached = None
    cpu = torch.device("cpu")
    first = step_masks(seq_bounds_from_lens([3, 4]), cpu)
    assert step_masks(seq_bounds_from_lens([3, 4]), cpu) is first
    assert first.block_mask() is first.block_mask()
    assert step_masks(seq_bounds_from_lens([4, 3]), cpu) is not first


def test_attention_setting():
    cpu = torch.device("cpu")
    assert not use_flex("auto", cpu)  # auto means the compiled kernel: CUDA only
    assert use_flex("flex", cpu) and not use_flex("loop", cpu)
    assert DraftSection().attention == "auto"
    with pytest.raises(ConfigError, match="draft.attention"):
        DraftSection(attention="fused")


def tiny_draft(attention):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=64, num_hidden_layers=4)
    arch = DraftArch.from_target_config(cfg, DraftSection(draft_vocab_size=24), 3)
    draft = Eagle3Draft(arch, attention=attention)
    draft.init_weights(torch.Generator().manual_seed(0))
    return draft


def test_draft_unroll_flex_equals_loop(cpu_flex_backward):
    """Four unroll steps of the whole draft: logits and every parameter gradient agree."""
    gen = torch.Generator().manual_seed(5)
    lens = [6, 1, 9]
    aux = torch.randn(16, 96, generator=gen)
    embeds = [torch.randn(16, 32, generator=gen) for _ in range(4)]
    positions = torch.cat([torch.arange(n) for n in lens])
    results = []
    for attention in ("loop", "flex"):
        draft = tiny_draft(attention)
        kv_cache, hidden, loss = [], aux, 0.0
        for embed in embeds:
            hidden, logits = draft(embed, hidden, positions, seq_bounds_from_lens(lens), kv_cache)
            loss = loss + logits.square().mean()
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in draft.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(shutil.which("g++") is None, reason="compiled CPU flex needs a C++ compiler")
def test_compiled_cpu_kernel_matches_loop():
    """The block-sparse kernel itself (inductor CPU; forward only, as torch supports on CPU):
    two 128-blocks of queries with padding. Step 0: on CPU, compiled flex returns no
    log-sum-exp (torch 2.13), which later steps need; the merge is compared compiled
    against eager in test_draft_kernels.py. Compiles once, ~15-20 s."""
    lens = [40, 1, 70, 30]
    q, keys, values = random_inputs(0, 4, 2, seq_lens=lens, head_dim=16)
    q, keys, values = q.detach(), [k.detach() for k in keys], [v.detach() for v in values]
    bounds = seq_bounds_from_lens(lens)
    out = ttt_flex_attention(q, keys, values, bounds, 0.25, compiled=True)
    ref = ttt_attention(q, keys, values, bounds, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
