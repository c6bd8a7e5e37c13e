"""TTT attention on packed sequences against an explicit per-position float64 reference."""

import math

import pytest
import torch
from transformers import LlamaConfig

from colocate.config import DraftSection
from colocate.draft import DraftArch, Eagle3Draft
from colocate.draft.attention import seq_bounds_from_lens, ttt_attention


def naive_ttt_attention(q, keys, values, seq_lens):
    """Loops over tokens and heads: step-0 keys of the own sequence at s <= t, plus the keys
    of steps 1..k at t itself, one softmax over all of them."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // keys[0].shape[1]
    seq_start = []
    for start, n in zip(torch.tensor([0] + list(seq_lens)).cumsum(0).tolist(), seq_lens):
        seq_start += [start] * n
    out = torch.zeros_like(q)
    for t in range(num_tokens):
        for h in range(num_heads):
            kv = h // group
            ks = [keys[0][s, kv] for s in range(seq_start[t], t + 1)] + \
                 [k[t, kv] for k in keys[1:]]
            vs = [values[0][s, kv] for s in range(seq_start[t], t + 1)] + \
                 [v[t, kv] for v in values[1:]]
            scores = torch.stack([q[t, h] @ k for k in ks]) / math.sqrt(head_dim)
            weights = torch.softmax(scores, dim=0)
            out[t, h] = sum(w * v for w, v in zip(weights, vs))
    return out


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_matches_naive_reference(step, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(step * 10 + num_kv_heads)
    seq_lens = [5, 1, 7, 3]
    num_tokens, head_dim = sum(seq_lens), 8
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen, dtype=torch.float64)
    keys = [torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
            for _ in range(step + 1)]
    values = [torch.randn_like(k) for k in keys]
    ours = ttt_attention(q, keys, values, seq_bounds_from_lens(seq_lens), head_dim ** -0.5)
    torch.testing.assert_close(ours, naive_ttt_attention(q, keys, values, seq_lens))


def tiny_draft(seed=0):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=64, num_hidden_layers=4)
    draft = Eagle3Draft(DraftArch.from_target_config(cfg, DraftSection(draft_vocab_size=24), 3))
    draft.init_weights(torch.Generator().manual_seed(seed))
    return draft.double()


def run_steps(draft, aux, embeds_per_step, positions, seq_lens):
    kv_cache, hidden, outs = [], aux, []
    for embeds in embeds_per_step:
        hidden, logits = draft(embeds, hidden, positions, seq_bounds_from_lens(seq_lens), kv_cache)
        outs.append((hidden, logits))
    return outs


def test_packed_outputs_equal_unpacked():
    draft = tiny_draft()
    gen = torch.Generator().manual_seed(3)
    lens = [6, 9]
    aux = [torch.randn(n, 96, generator=gen, dtype=torch.float64) for n in lens]
    embeds = [[torch.randn(n, 32, generator=gen, dtype=torch.float64) for n in lens]
              for _ in range(4)]
    positions = [torch.arange(n) for n in lens]
    packed = run_steps(draft, torch.cat(aux), [torch.cat(e) for e in embeds],
                       torch.cat(positions), lens)
    alone = [run_steps(draft, aux[i], [e[i] for e in embeds], positions[i], [lens[i]])
             for i in range(2)]
    for step in range(4):
        for j in range(2):  # hidden, logits
            torch.testing.assert_close(packed[step][j],
                                       torch.cat([alone[0][step][j], alone[1][step][j]]))


def test_bf16_runs_and_is_close_to_float64():
    draft = tiny_draft()
    gen = torch.Generator().manual_seed(4)
    lens = [5, 4]
    aux = torch.randn(9, 96, generator=gen, dtype=torch.float64)
    embeds = [torch.randn(9, 32, generator=gen, dtype=torch.float64) for _ in range(3)]
    positions = torch.cat([torch.arange(5), torch.arange(4)])
    ref = run_steps(draft, aux, embeds, positions, lens)
    low = run_steps(draft.to(torch.bfloat16), aux.bfloat16(), [e.bfloat16() for e in embeds],
                    positions, lens)
    assert low[-1][1].dtype == torch.bfloat16
    torch.testing.assert_close(low[-1][1].double(), ref[-1][1], atol=0.1, rtol=0.1)
