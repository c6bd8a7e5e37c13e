"""FLOP formulas against hand counts, and the disaggregated references."""

import pytest
from transformers import LlamaConfig

from colocate.metrics import (Geometry, disaggregated_references, draft_params,
                              draft_train_flops_per_token, mfu, peak_flops,
                              target_prefill_flops_per_token)

# H=8, I=16, 2 layers, 2 heads of 4, 1 kv head, vocab 100.
G = Geometry(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
             head_dim=4, vocab_size=100)


def test_geometry_from_hf_config():
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    assert Geometry.from_hf_config(cfg) == G


def test_target_prefill_by_hand():
    # per layer: q 8x8=64, k 8x4=32, v 32, o 64, mlp 3x8x16=384 -> 576 params
    assert G.layer_params() == 576
    # seq 3: average context 2; attention 4 * 2 heads * 4 dims * 2 = 64 per layer
    assert target_prefill_flops_per_token(G, 3) == 2 * (2 * 576 + 64)


def test_draft_by_hand():
    # fc 3*8*8=192; layer reads 2H=16: q 16x8=128, k 16x4=64, v 64, o 64, mlp 384 -> 704;
    # lm_head 8 x 10 = 80
    assert draft_params(G, draft_vocab_size=10) == 192 + 704 + 80
    # unroll 2, seq 3 (context 2): matmul 6*(192 + 2*(704+80)) = 10560;
    # attention 3*(4*2*4*2) + 3*(4*2*4*3) = 192 + 288 = 480; teacher 2*8*100 = 1600
    got = draft_train_flops_per_token(G, 3, draft_vocab_size=10, unroll_steps=2)
    assert got == 10560 + 480 + 1600


def test_mfu_and_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA GB200") == 2500e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("Some GPU") is None
    assert mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)


def test_references():
    refs = disaggregated_references(39000.0, 28000.0)
    assert refs["split_1to1"] == 14000.0
    assert refs["split_ideal"] == pytest.approx(39000 * 28000 / 67000)


def test_qwen3_8b_magnitudes():
    # Qwen3-8B: ~6.95B non-embedding matmul params -> ~13.9 GFLOP/token before attention.
    q8b = Geometry(4096, 12288, 36, 32, 8, 128, 151936)
    assert q8b.num_layers * q8b.layer_params() == pytest.approx(6.95e9, rel=0.01)
    assert target_prefill_flops_per_token(q8b, 2048) == pytest.approx(14.5e9, rel=0.01)
