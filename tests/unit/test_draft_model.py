"""Eagle3 draft: sglang parameter layout, arch derivation, RoPE, deterministic init."""

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from colocate.config import DraftSection
from colocate.draft import DraftArch, Eagle3Draft
from colocate.draft.kernels import apply_rope, rope_cos_sin


def qwen3_config(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                intermediate_size=96, vocab_size=300, num_hidden_layers=4)
    return Qwen3Config(**{**base, **kw})


def sglang_expected_shapes(H, Hq, Hkv, D, I, Vd, num_aux):
    # What sglang 0.5.17 python/sglang/srt/models/llama_eagle3.py loads: LlamaModel.fc
    # (hidden_size_in * num_aux_hidden_states -> hidden), the input decoder layer with
    # qkv over 2 * hidden (embeds + hidden), hidden_norm, LlamaMLP, final norm, and
    # ParallelLMHead(draft_vocab_size, hidden). load_weights renames midlayer -> layers.0,
    # prefixes model. and stacks q/k/v -> qkv_proj, gate/up -> gate_up_proj.
    return {
        "fc.weight": (H, num_aux * H),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (Hq * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": (Hkv * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (Hkv * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, Hq * D),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,),
        "lm_head.weight": (Vd, H),
    }


def sglang_param_name(name: str) -> str:
    """Apply sglang's LlamaForCausalLMEagle3.load_weights renaming to one checkpoint name."""
    name = name.replace("midlayer", "layers.0")
    for shard, stacked in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"),
                           (".v_proj", ".qkv_proj"), (".gate_proj", ".gate_up_proj"),
                           (".up_proj", ".gate_up_proj")):
        name = name.replace(shard, stacked)
    return name if name == "lm_head.weight" else f"model.{name}"


@pytest.mark.parametrize("make_config", [
    lambda: LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=300, num_hidden_layers=4),
    qwen3_config,  # head_dim != hidden / heads
])
def test_state_dict_matches_sglang_layout(make_config):
    cfg = make_config()
    arch = DraftArch.from_target_config(cfg, DraftSection(draft_vocab_size=100, intermediate_size=80), 3)
    draft = Eagle3Draft(arch)
    shapes = {name: tuple(t.shape) for name, t in draft.state_dict().items()}
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert shapes == sglang_expected_shapes(cfg.hidden_size, cfg.num_attention_heads,
                                            cfg.num_key_value_heads, D, 80, 100, 3)
    # Every tensor lands on one of sglang's parameters; embed_tokens is not exported (sglang's
    # EAGLE3 worker calls set_embed with the target's embedding).
    sglang_params = {"model.fc.weight", "model.layers.0.hidden_norm.weight",
                     "model.layers.0.input_layernorm.weight",
                     "model.layers.0.self_attn.qkv_proj.weight",
                     "model.layers.0.self_attn.o_proj.weight",
                     "model.layers.0.post_attention_layernorm.weight",
                     "model.layers.0.mlp.gate_up_proj.weight",
                     "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"}
    assert {sglang_param_name(n) for n in shapes} == sglang_params
    assert not any("embed" in n for n in shapes)


def test_arch_from_configs():
    arch = DraftArch.from_target_config(qwen3_config(), DraftSection(draft_vocab_size=100), 3)
    assert (arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (64, 4, 2, 32)
    assert arch.intermediate_size == 96  # 0 in DraftSection: the target's
    assert (arch.target_vocab_size, arch.draft_vocab_size, arch.num_aux) == (300, 100, 3)
    assert arch.rope_theta == 10000.0 and arch.rope_type == "default"
    with pytest.warns(UserWarning, match="exceeds the target vocabulary"):
        big = DraftArch.from_target_config(qwen3_config(), DraftSection(draft_vocab_size=1000), 3)
    assert big.draft_vocab_size == 300
    with pytest.raises(ValueError, match="yarn"):
        DraftArch.from_target_config(
            qwen3_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
            DraftSection(draft_vocab_size=100), 3)


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
])
def test_rope_matches_transformers(rope):
    kw = {"rope_parameters": rope} if rope else {}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=50, num_hidden_layers=2,
                      max_position_embeddings=4096, **kw)
    arch = DraftArch.from_target_config(cfg, DraftSection(draft_vocab_size=20), 3)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 1000, 3000])
    x = torch.randn(8, 4, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(positions, arch.inv_freq())
    ours = apply_rope(x, cos.double(), sin.double())
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(x.float(), positions[None])
    ref, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None],
                                  ref_cos.double(), ref_sin.double())
    # float32 phases at position 3000 differ by ~1e-4 rad between the two computations;
    # a wrong frequency would be off by O(1).
    torch.testing.assert_close(ours, ref[0].transpose(0, 1), atol=5e-4, rtol=0)


def test_init_is_deterministic_and_sane():
    arch = DraftArch.from_target_config(qwen3_config(), DraftSection(draft_vocab_size=100), 3)
    a, b = Eagle3Draft(arch), Eagle3Draft(arch)
    a.init_weights(torch.Generator().manual_seed(7))
    b.init_weights(torch.Generator().manual_seed(7))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.all(pa == 1)
        else:
            assert abs(pa.std().item() - 0.02) < 0.005, name
    c = Eagle3Draft(arch)
    c.init_weights(torch.Generator().manual_seed(8))
    assert not torch.equal(a.fc.weight, c.fc.weight)
