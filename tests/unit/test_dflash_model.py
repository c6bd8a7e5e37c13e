"""DFlash draft: sglang's parameter layout, arch derivation, and the forward against an
independent implementation of sglang's DFlash math (one block at a time)."""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
import torch.nn.functional as F
from transformers import Qwen3Config

from colocate.config import DraftSection
from colocate.draft.dflash import DFlashArch, DFlashDraft, default_target_layer_ids
from colocate.draft.dflash_blocks import BlockLayout

H, HQ, HKV, D, I, V = 32, 4, 2, 8, 48, 40
MASK_ID = V - 1


def qwen3_config(**kw):
    base = dict(hidden_size=H, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                intermediate_size=I, vocab_size=V, num_hidden_layers=8, rope_theta=1000.0)
    return Qwen3Config(**{**base, **kw})


def make_draft(num_layers=2, block_size=4, layer_ids=(1, 3, 5), seed=0, **kw):
    arch = DFlashArch.from_target_config(
        qwen3_config(), DraftSection(method="dflash", num_layers=num_layers,
                                     block_size=block_size), list(layer_ids), MASK_ID)
    model = DFlashDraft(arch, **kw)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.2)
    with torch.no_grad():  # non-trivial norms, so a missing or misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_state_dict_names_and_shapes_are_sglangs():
    # sglang 0.5.17 srt/models/dflash.py: DFlashDraftModel has layers.{i} (Qwen3-style:
    # qkv_proj <- q/k/v_proj, q_norm/k_norm per head, gate_up_proj <- gate/up_proj), fc
    # (K*H -> H, no bias), hidden_norm and norm; no embedding, no lm_head.
    model = make_draft(num_layers=2, layer_ids=(1, 3, 5))
    expected = {"fc.weight": (H, 3 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(2):
        p = f"layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (HQ * D, H),
            p + "self_attn.k_proj.weight": (HKV * D, H),
            p + "self_attn.v_proj.weight": (HKV * D, H),
            p + "self_attn.o_proj.weight": (H, HQ * D),
            p + "self_attn.q_norm.weight": (D,),
            p + "self_attn.k_norm.weight": (D,),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_arch_from_qwen3_config():
    arch = make_draft().arch
    assert (arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (H, HQ, HKV, D)
    assert arch.rope_theta == 1000.0 and arch.rope_type == "default"
    assert arch.target_layer_ids == (1, 3, 5) and arch.num_context_features == 3
    assert (arch.num_layers, arch.block_size, arch.mask_token_id) == (2, 4, MASK_ID)
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashArch.from_target_config(qwen3_config(), DraftSection(method="dflash"), [1], V)
    with pytest.raises(ValueError, match="outside the target"):
        DFlashArch.from_target_config(qwen3_config(), DraftSection(method="dflash"), [8], 0)


def test_default_target_layer_ids_are_sglangs():
    # sglang build_target_layer_ids: round(1 + i * (L - 4) / (K - 1)); K = 1: the middle.
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(28, 5) == [1, 7, 13, 19, 25]
    assert default_target_layer_ids(8, 1) == [4]


def test_init_is_deterministic():
    a, b = make_draft(seed=3), make_draft(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.fc.weight, make_draft(seed=4).fc.weight)


# ------------------------------------------------------------------ independent reference


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x_LhD, pos_L, theta):
    half = x_LhD.shape[-1] // 2
    inv = 1.0 / theta ** (torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
    ang = (pos_L.double()[:, None] * inv[None]).float()[:, None, :]
    x1, x2 = x_LhD[..., :half], x_LhD[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def reference_block(sd, num_layers, theta, target_hidden_CK, ctx_pos_C, block_embeds_BH, block_pos_B):
    """sglang's DFlash for ONE block: ctx K/V = k_proj/v_proj(hidden_norm(fc(.))) with k_norm
    and RoPE at the context positions; the block attends to [ctx; block] without a mask."""
    ctx = rms(target_hidden_CK @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    h = block_embeds_BH
    nb, nc = h.shape[0], ctx.shape[0]
    for i in range(num_layers):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        x = rms(h, w["input_layernorm.weight"])
        q = rope(rms((x @ w["self_attn.q_proj.weight"].T).view(nb, HQ, D), w["self_attn.q_norm.weight"]), block_pos_B, theta)
        kc = rope(rms((ctx @ w["self_attn.k_proj.weight"].T).view(nc, HKV, D), w["self_attn.k_norm.weight"]), ctx_pos_C, theta)
        kb = rope(rms((x @ w["self_attn.k_proj.weight"].T).view(nb, HKV, D), w["self_attn.k_norm.weight"]), block_pos_B, theta)
        vc = (ctx @ w["self_attn.v_proj.weight"].T).view(nc, HKV, D)
        vb = (x @ w["self_attn.v_proj.weight"].T).view(nb, HKV, D)
        k = torch.cat([kc, kb]).repeat_interleave(HQ // HKV, dim=1)
        v = torch.cat([vc, vb]).repeat_interleave(HQ // HKV, dim=1)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * D ** -0.5, dim=-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(nb, HQ * D)
        h = h + attn @ w["self_attn.o_proj.weight"].T
        y = rms(h, w["post_attention_layernorm.weight"])
        h = h + (F.silu(y @ w["mlp.gate_proj.weight"].T) * (y @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    return rms(h, sd["norm.weight"])


def packed_example(seed=0, seq_lens=(9, 6), block_size=4):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(seq_lens)
    target_hidden = torch.randn(num_tokens, 3 * H, generator=gen)
    embed = torch.randn(V, H, generator=gen)
    ids = torch.randint(0, V - 1, (num_tokens,), generator=gen)
    # Positions as a packed batch has them, offset in the second sequence to show that the
    # block positions come from the `positions` tensor.
    positions = torch.cat([torch.arange(seq_lens[0]), torch.arange(seq_lens[1]) + 3])
    anchors = torch.tensor([[0, 4, 7], [2, -1, -1]])
    return target_hidden, embed, ids, positions, list(seq_lens), anchors


@pytest.mark.parametrize("attention", ["loop", "flex"])
def test_forward_equals_sglang_math_block_by_block(attention):
    model = make_draft(num_layers=2, block_size=4)
    target_hidden, embed, ids, positions, seq_lens, anchors = packed_example()
    layout = BlockLayout.build(seq_lens, anchors, 4)
    mask = layout.flex_mask(sparse_block_size=8) if attention == "flex" else layout.dense_mask()
    block_ids, block_pos = layout.block_inputs(ids, positions, MASK_ID)
    with torch.no_grad():
        out = model(embed[block_ids], block_pos, model.project_context(target_hidden),
                    positions, mask)
    sd = model.state_dict()
    starts = [0, seq_lens[0]]
    for j, (s, n) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]):
        a = int(anchors[s, n])
        got = out[j * 4:(j + 1) * 4]
        if a < 0:  # a padded anchor attends to nothing; its rows are finite and unused
            assert torch.isfinite(got).all()
            continue
        g = starts[s] + a
        block = torch.tensor([ids[g]] + [MASK_ID] * 3)
        ref = reference_block(sd, 2, 1000.0, target_hidden[starts[s]:g], positions[starts[s]:g],
                              embed[block], positions[g] + torch.arange(4))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"block {j}: {m}")


def test_flex_gradients_equal_dense(monkeypatch):
    # torch refuses flex backward on CPU in its front end only (see test_draft_flex.py).
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    model = make_draft(num_layers=2, block_size=4)
    target_hidden, embed, ids, positions, seq_lens, anchors = packed_example(seed=1)
    layout = BlockLayout.build(seq_lens, anchors, 4)
    block_ids, block_pos = layout.block_inputs(ids, positions, MASK_ID)
    grad_out = torch.randn(layout.num_queries, H, generator=torch.Generator().manual_seed(5))
    results = []
    for mask in (layout.dense_mask(), layout.flex_mask(sparse_block_size=8)):
        model.zero_grad()
        out = model(embed[block_ids], block_pos, model.project_context(target_hidden),
                    positions, mask)
        out.backward(grad_out)
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense_out, dense_grads), (flex_out, flex_grads) = results
    torch.testing.assert_close(flex_out, dense_out, rtol=1e-5, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
