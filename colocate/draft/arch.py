"""`DraftArch`: the few numbers that shape an Eagle3 draft, derived from the target's HF config.

The draft is one Llama decoder layer with the target's hidden size (it consumes the target's
hidden states and token embeddings), so most numbers are copied from the target. RoPE is
computed here from theta and the scaling dict, the way sglang's `get_rope` will do it when
it serves the exported draft; only the rope types Llama/Qwen3 targets use are supported.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from colocate.config import DraftSection

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RopeGeometry:
    """RoPE of a draft, shared by every draft arch: needs `head_dim`, `rope_theta` and
    `rope_scaling` fields on the dataclass that mixes it in."""

    head_dim: int
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def check_rope_type(self, draft_name: str) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"target rope type {self.rope_type!r} is not supported by the "
                             f"{draft_name} draft (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] in float32 (neox layout, rotate-half)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        rope_type, s = self.rope_type, self.rope_scaling
        if rope_type == "linear":
            inv_freq = inv_freq / s["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_scale(inv_freq, s["factor"], s["low_freq_factor"],
                                     s["high_freq_factor"], s["original_max_position_embeddings"])
        return inv_freq.float()


def rope_from_hf(hf_config: Any) -> tuple[float, Mapping[str, Any] | None]:
    """(rope_theta, rope_scaling minus theta or None) of an HF config. transformers >= 5
    keeps theta inside rope_parameters; older configs use rope_theta + rope_scaling."""
    rope = dict(getattr(hf_config, "rope_parameters", None)
                or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    return theta, (MappingProxyType(rope) if rope else None)


@dataclass(frozen=True, kw_only=True)
class DraftArch(RopeGeometry):
    hidden_size: int
    """Draft width == target width (the draft eats target hidden states and embeddings)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    """HF rope parameters minus rope_theta; None or rope_type 'default' means plain RoPE."""
    max_position_embeddings: int
    target_vocab_size: int
    draft_vocab_size: int
    num_aux: int
    """Number of target hidden states concatenated into `fc` (3 for Eagle3)."""

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)
        assert 2 <= self.draft_vocab_size <= self.target_vocab_size, self.draft_vocab_size
        self.check_rope_type("Eagle3")

    @classmethod
    def from_target_config(cls, hf_config: Any, draft: DraftSection, num_aux: int) -> DraftArch:
        """Derive the draft shape from a target `LlamaConfig`/`Qwen3Config`-like object."""
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"target hidden_act {hf_config.hidden_act!r}: the Eagle3 draft "
                             "(sglang LlamaMLP) supports silu only")
        hidden = hf_config.hidden_size
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hidden // num_heads
        vocab = hf_config.vocab_size
        draft_vocab = draft.draft_vocab_size
        if draft_vocab > vocab:
            warnings.warn(f"draft.draft_vocab_size={draft_vocab} exceeds the target vocabulary "
                          f"({vocab}); using {vocab}")
            draft_vocab = vocab
        theta, scaling = rope_from_hf(hf_config)
        return cls(
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=draft.intermediate_size or hf_config.intermediate_size,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            target_vocab_size=vocab,
            draft_vocab_size=draft_vocab,
            num_aux=num_aux,
        )


def _llama3_scale(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                  high_freq_factor: float, old_context_len: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in
    # between interpolated smoothly.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, out)
