"""Shared by the draft GPU scripts (bench_draft_attention.py, profile_trainer.py), imported
as a sibling when they run as files: the Qwen3-8B target shape and the bf16 comparison."""

from __future__ import annotations

import torch

QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936, num_hidden_layers=36,
                rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960)
DRAFT_VOCAB = 32000
NUM_AUX = 3
REL_TOL = 2e-2  # bf16 carries ~3 significant digits; attention sums a few thousand terms


def mismatches(ref_loss: float, ref_grads: dict[str, torch.Tensor], loss: float,
               grads: dict[str, torch.Tensor]) -> list[str]:
    """The loss and each gradient (with their relative error) that differ by more than
    REL_TOL (relative L2 for gradients)."""
    bad = []
    # `not <=`: a NaN compares false both ways, and a NaN loss or gradient must count.
    if not abs(loss - ref_loss) <= REL_TOL * max(abs(ref_loss), 1e-6):
        bad.append(f"loss ({ref_loss:.5f} vs {loss:.5f})")
    for name, grad in ref_grads.items():
        err = ((grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)).item()
        if not err <= REL_TOL:
            bad.append(f"grad {name} (rel L2 {err:.3g})")
    return bad
