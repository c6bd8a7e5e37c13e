"""FLOPs per token, MFU and the throughput references: the one place these formulas live.

Counted as model FLOPs (a multiply-add is 2 FLOPs), not hardware FLOPs: recomputation in
backward is not credited.

* Target prefill, per token: 2 x non-embedding matmul parameters (q/k/v/o, MLP; no
  embedding, no lm_head: the engine never runs it over all tokens) + attention
  4 x heads x head_dim x average context per layer (QK^T and PV).
* Draft training, per token: 6 x draft matmul parameters x unroll steps (forward 2, backward
  4) + attention of each unroll step (causal context plus the k diagonal keys, x3 for
  forward + backward) + the frozen target lm_head forward on the trainer (2 x H x V).
MFU divides by the bf16 dense peak of the whole GPU: both processes share it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 peak FLOP/s from the vendors' datasheets (no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12,
             "A100": 312e12, "A800": 312e12, "L40S": 362e12, "B200": 2250e12, "GB200": 2500e12}


def peak_flops(device_name: str) -> float | None:
    """Datasheet bf16 peak for a `torch.cuda.get_device_name()` string, None if unknown."""
    upper = device_name.upper()
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "GB200" before "B200"
        if key in upper:
            return PEAK_BF16[key]
    return None


@dataclass(frozen=True)
class Geometry:
    """The shapes that set the FLOPs of a Llama-style decoder."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config) -> "Geometry":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.hidden_size, text.intermediate_size, text.num_hidden_layers, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim,
                   text.vocab_size)

    def layer_params(self, attn_input: int | None = None, mlp_width: int | None = None) -> int:
        """Matmul parameters of one decoder layer (q/k/v from `attn_input` wide inputs)."""
        h, d = self.hidden_size, self.head_dim
        attn_in = attn_input or h
        qkv = attn_in * (self.num_heads + 2 * self.num_kv_heads) * d
        out = self.num_heads * d * h
        mlp = 3 * h * (mlp_width or self.intermediate_size)
        return qkv + out + mlp

    def attention_flops(self, context: float) -> float:
        """Forward attention FLOPs of one token in one layer at average `context`."""
        return 4.0 * self.num_heads * self.head_dim * context


def causal_context(seq_len: int) -> float:
    """Average number of keys a token attends to in a causal sequence of `seq_len`."""
    return (seq_len + 1) / 2


def target_prefill_flops_per_token(geom: Geometry, seq_len: int) -> float:
    return geom.num_layers * (2.0 * geom.layer_params()
                              + geom.attention_flops(causal_context(seq_len)))


def draft_params(geom: Geometry, *, draft_vocab_size: int, num_aux: int = 3,
                 intermediate_size: int = 0) -> int:
    """Matmul parameters of the Eagle3 draft: fc, one layer reading 2H, lm_head."""
    h = geom.hidden_size
    fc = num_aux * h * h
    layer = geom.layer_params(attn_input=2 * h, mlp_width=intermediate_size or None)
    return fc + layer + h * draft_vocab_size


def draft_train_flops_per_token(geom: Geometry, seq_len: int, *, draft_vocab_size: int,
                                unroll_steps: int, num_aux: int = 3,
                                intermediate_size: int = 0) -> float:
    h = geom.hidden_size
    params = draft_params(geom, draft_vocab_size=draft_vocab_size, num_aux=num_aux,
                          intermediate_size=intermediate_size)
    # fc runs once per micro-step (step 0 only); the layer and lm_head run every step.
    per_step = params - num_aux * h * h
    matmul = 6.0 * (num_aux * h * h + per_step * unroll_steps)
    attention = sum(3.0 * geom.attention_flops(causal_context(seq_len) + k)
                    for k in range(unroll_steps))
    teacher = 2.0 * h * geom.vocab_size
    return matmul + attention + teacher


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_token * tokens_per_s / peak


def disaggregated_references(engine_tps: float, trainer_tps: float) -> dict[str, float]:
    """Per-GPU tokens/s of two disaggregated baselines from engine-alone (E) and
    trainer-alone (T) rates on a full GPU: the 1:1 split (half the GPUs each) and the ideal
    split (GPUs in exact proportion to each side's load, free transport)."""
    return {"split_1to1": min(engine_tps, trainer_tps) / 2,
            "split_ideal": 1.0 / (1.0 / engine_tps + 1.0 / trainer_tps)}
