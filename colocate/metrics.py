"""Every number colocate reports: the one place these formulas live (the trackers that write
the per-step rows, metrics.jsonl, TensorBoard and W&B, are colocate/trackers.py).

Training statistics. One micro-step's statistics are *sums over token positions* in one
float64 vector (K = the recipe's scored positions: Eagle3's draft.unroll_steps, DFlash's
draft.block_size - 1; `stats_vector` builds it, `step_summary` reads it):

    [ce_0 .. ce_{K-1} | hits_0 .. hits_{K-1} | counted_0 .. counted_{K-1} | sim_tokens sim_cycles]

ce_k (cross-entropy summed over step k's loss positions), hits_k and counted_k (positions
where step k's draft argmax is the target's, and positions step k is scored on), and the
greedy-serving simulation's reply tokens and verify cycles (Eagle3: `sim_accept_sums`, exact;
DFlash: 1 + leading hits of each sampled block, per block). Sums add
across micro-steps and trainers; ratios are taken once, on the reduced vector, so every token
weighs the same wherever it was trained (a mean of per-micro-step means would let a
micro-step of 10 labels weigh as much as one of 10,000).

FLOPs are counted as model FLOPs (a multiply-add is 2 FLOPs), not hardware FLOPs:
recomputation in backward is not credited.

* Target prefill, per token: 2 x non-embedding matmul parameters (q/k/v/o, MLP; no
  embedding, no lm_head: the engine never runs it over all tokens) + attention
  4 x heads x head_dim x average context per layer (QK^T and PV).
* Draft training, per token: 6 x draft matmul parameters x unroll steps (forward 2, backward
  4) + attention of each unroll step (causal context plus the k diagonal keys, x3 for
  forward + backward) + the frozen target lm_head forward on the trainer (2 x H x V).
MFU divides by the bf16 dense peak of the whole GPU: both processes share it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from colocate.hostcopy import to_device
from colocate.progress import phase_seconds

# ------------------------------------------------------------------ training statistics


def stats_length(unroll_steps: int) -> int:
    """Length of the stats vector for `unroll_steps` draft steps."""
    return 3 * unroll_steps + 2


def stats_vector(ce_sum: torch.Tensor, hits: torch.Tensor, counted: torch.Tensor,
                 sim: torch.Tensor) -> torch.Tensor:
    """The float64 stats vector (layout above) of one micro-step, detached, on the device.
    float64 keeps every count exact (float32 is exact only up to 2**24 positions)."""
    return torch.cat([ce_sum.detach().double(), hits.double(), counted.double(), sim.double()])


def step_summary(values: Sequence[float], position_decay: float = 1.0, *,
                 pooled_weights: Sequence[float] | None = None) -> dict[str, float]:
    """Loss and metrics from a (reduced) stats vector turned into floats.

    loss = sum_k decay^k * ce_k / counted_k (Eagle3: each position a per-token mean), or with
    `pooled_weights` w_k, sum_k w_k * ce_k / sum_k w_k * counted_k (DFlash: one weighted mean
    over all positions): the per-token loss the trainer optimizes when `values` covers a
    whole optimizer step on every trainer. loss_k = ce_k / counted_k either way.
    acc_k = hits_k / counted_k (a
    position whose target token is outside the draft vocabulary is counted, never a hit).
    labels = counted_0, the positions step 0 was scored on.
    """
    num_steps = (len(values) - 2) // 3
    assert len(values) == stats_length(num_steps), f"stats vector of length {len(values)}"
    ce, hits = values[:num_steps], values[num_steps:2 * num_steps]
    counted = values[2 * num_steps:3 * num_steps]
    losses = [c / n if n else 0.0 for c, n in zip(ce, counted)]
    if pooled_weights is None:
        loss = sum(position_decay ** k * x for k, x in enumerate(losses))
    else:
        total = sum(w * n for w, n in zip(pooled_weights, counted))
        loss = sum(w * c for w, c in zip(pooled_weights, ce)) / total if total else 0.0
    row = {"loss": loss}
    row.update({f"loss_{k}": x for k, x in enumerate(losses)})
    row.update({f"acc_{k}": h / n if n else 0.0 for k, (h, n) in enumerate(zip(hits, counted))})
    row["sim_accept_length"] = accept_length(*values[3 * num_steps:])
    row["labels"] = int(counted[0]) if num_steps else 0
    return row


# ------------------------------------------------------------------ accept length


def accept_length(reply_tokens: float, verify_cycles: float) -> float:
    """Reply tokens per verify cycle, sglang's completion_tokens / spec_verify_ct: the served
    accept length (`colocate eval`, sglang's and the reference decoder's counts) and, over
    the simulated cycles, training's sim_accept_length. Without a cycle (no reply longer
    than its prefill token) nothing was drafted: 1.0, the rate of decoding without a draft."""
    return reply_tokens / verify_cycles if verify_cycles else 1.0


def leading_hits(hits_KT: torch.Tensor) -> torch.Tensor:
    """[T] int64: consecutive hits from step 0 on, the draft tokens a chain from t accepts."""
    return hits_KT.long().cumprod(0).sum(0)


def sim_accept_sums(hits_KT: torch.Tensor, loss_mask_T: torch.Tensor,
                    seq_end_T: torch.Tensor) -> torch.Tensor:
    """[2] int64 (reply tokens, verify cycles) of greedy chain drafting, simulated exactly on
    the trained tokens, on the device without host syncs.

    hits_KT [K, T]: draft step k at index t predicted the target's greedy token for
    x_{t+2+k} (and that token is in the draft vocabulary and loss-masked). Teacher forcing
    makes step k at t the chain started at t as long as steps 0..k-1 hit, so a chain
    drafted from t accepts lead(t) = `leading_hits` tokens. Serving one reply (a maximal
    run [a, b) of loss-masked tokens of one sequence; seq_end_T [T] is the exclusive end of
    each token's sequence): x_a comes from the prefill; a verify cycle that starts with
    tokens committed through c drafts from t = c - 1 and commits lead(t) + 1 tokens (the
    accepted drafts and the target's own next token), capped at b - 1; cycles repeat until
    x_{b-1} is committed. The cycles of every reply are counted at once by pointer
    doubling over next(c) = min(c + lead(c - 1) + 1, b - 1), log2(T) rounds of gathers.
    """
    # lead(c - 1): a chain drafted for c starts at c - 1; none at a sequence's first token.
    lead_T = leading_hits(hits_KT)
    starts_seq_T = _sequence_starts(seq_end_T)
    accepted_T = torch.cat([lead_T.new_zeros(1), lead_T[:-1]]).masked_fill(starts_seq_T, 0)
    return replay_serving(accepted_T, loss_mask_T, seq_end_T)


def _sequence_starts(seq_end_T: torch.Tensor) -> torch.Tensor:
    index_T = torch.arange(seq_end_T.numel(), device=seq_end_T.device)
    true = torch.ones(1, dtype=torch.bool, device=seq_end_T.device)
    return torch.cat([true, seq_end_T[:-1] == index_T[1:]])


def replay_serving(accepted_T: torch.Tensor, loss_mask_T: torch.Tensor,
                   seq_end_T: torch.Tensor) -> torch.Tensor:
    """[2] int64 (reply tokens, verify cycles) of serving every reply of a packed micro-step
    with a draft whose verify cycle, started with tokens committed through c, accepts
    accepted_T[c] drafts (any drafting scheme: Eagle3's chain from c - 1, DFlash's block
    anchored at c). The walk of `sim_accept_sums`' docstring, by pointer doubling."""
    num_tokens = loss_mask_T.numel()
    device = loss_mask_T.device
    index_T = torch.arange(num_tokens, device=device)
    mask_T = loss_mask_T.bool()
    false = torch.zeros(1, dtype=torch.bool, device=device)
    starts_seq_T = _sequence_starts(seq_end_T)
    prev_masked_T = torch.cat([false, mask_T[:-1]]) & ~starts_seq_T
    next_masked_T = torch.cat([mask_T[1:], false]) & (index_T + 1 < seq_end_T)
    first_T = mask_T & ~prev_masked_T
    # The last index of each token's reply: the nearest reply end at or after it.
    last_T = torch.where(mask_T & ~next_masked_T, index_T, num_tokens)
    last_T = last_T.flip(0).cummin(0).values.flip(0)
    moving_T = mask_T & (index_T < last_T)
    next_T = torch.where(moving_T, torch.minimum(index_T + accepted_T + 1, last_T), index_T)
    cycles_T = moving_T.long()
    for _ in range(max(1, (num_tokens - 1).bit_length())):  # 2**rounds >= any reply's cycles
        cycles_T = cycles_T + cycles_T[next_T]
        next_T = next_T[next_T]
    return torch.stack([mask_T.sum(), (cycles_T * first_T).sum()])


# ------------------------------------------------------------------ rates and FLOPs


def tokens_per_s(tokens: float, seconds: float) -> float:
    return tokens / max(seconds, 1e-9)


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


def dflash_train_flops_per_token(geom: Geometry, seq_len: int, *, num_layers: int,
                                 block_size: int, num_anchors: int, num_context: int,
                                 intermediate_size: int = 0) -> float:
    """Per trained token of a packed micro-step: fc and every layer's context K/V for every
    token; the block rows (anchors x block_size, at most one anchor per token) through the
    layers, attending to about half the sequence plus their block; the frozen lm_head on the
    predicting rows (forward, and backward to the draft's output only). x3 for forward +
    backward, as above. Anchors per token: num_anchors / seq_len, capped at 1."""
    h, kv = geom.hidden_size, 2 * geom.hidden_size * geom.num_kv_heads * geom.head_dim
    rows = block_size * min(1.0, num_anchors / seq_len)
    context = 6.0 * (num_context * h * h + num_layers * kv)
    layer = geom.layer_params(mlp_width=intermediate_size or None)
    attention = geom.attention_flops(causal_context(seq_len) + block_size)
    blocks = rows * num_layers * (6.0 * layer + 3.0 * attention)
    head = rows * (block_size - 1) / block_size * 4.0 * h * geom.vocab_size
    return context + blocks + head


def colocated_flops_per_token(cfg, target_config=None) -> dict[str, float]:
    """FLOPs per trained token by our count: the engine's prefill, the trainer's step
    (the recipe's formula) and both (what a colocated GPU does). target_config: the
    target's HF config when already loaded (else read from target.path)."""
    from colocate.draft.recipe import recipe_for

    if target_config is None:
        from transformers import AutoConfig

        target_config = AutoConfig.from_pretrained(cfg.target.path, local_files_only=True)
    geom = Geometry.from_hf_config(target_config)
    seq, recipe = cfg.data.max_length, recipe_for(cfg)
    engine = target_prefill_flops_per_token(geom, seq)
    trainer = recipe.train_flops_per_token(geom, seq, len(recipe.layer_ids(geom.num_layers)))
    return {"engine": engine, "trainer": trainer, "both": engine + trainer}


def counts_both_flops(cfg) -> bool:
    """Whether each trained token costs the engine's prefill plus the trainer's step, the
    count `mfu` in metrics.jsonl uses: not when a bench mode skips one side, nor with online
    decode (the answers' decoding is work the count leaves out)."""
    return (cfg.bench.engine == "run" and cfg.bench.trainer == "train"
            and cfg.data.source != "generate")


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_token * tokens_per_s / peak


def disaggregated_references(engine_tps: float, trainer_tps: float) -> dict[str, float]:
    """Per-GPU tokens/s of two disaggregated baselines from engine-alone (E) and
    trainer-alone (T) rates on a full GPU: the 1:1 split (half the GPUs each) and the ideal
    split (GPUs in exact proportion to each side's load, free transport)."""
    return {"split_1to1": min(engine_tps, trainer_tps) / 2,
            "split_ideal": 1.0 / (1.0 / engine_tps + 1.0 / trainer_tps)}


# ------------------------------------------------------------------ the per-step log


class MetricsLog:
    """Per-step metrics without extra synchronisation in the step loop: the first trainer
    hands them to its trackers (`colocate.trackers`: metrics.jsonl, TensorBoard, W&B).

    Each step's stats vector (summed over the trainer's micro-steps), grad norm and token
    count are summed over the trainer group by an asynchronous all-reduce, and turned into
    numbers only when the first trainer writes them (rate-limited): that `.tolist()` is the
    only host sync, and only on that rank.
    """

    # The logged rate. One step's host time says little: the GPU runs behind the host, so
    # host-timed rates of a steady run swing several-fold from step to step. A step the
    # PhaseTimer marked has its time on the trainer's CUDA stream, mark to mark (`stream_s`:
    # the marks chain from step to step, so these times tile the stream's timeline, gaps
    # included): its rate is the step's own. The window rate divides the tokens of the last
    # WINDOW_STEPS steps by their summed times; `bench train` uses the same times.
    WINDOW_STEPS = 20

    def __init__(self, trackers, *, group, device: torch.device, num_pairs: int,
                 summarize: Callable[[list[float]], dict], flush_every_s: float = 10.0,
                 flops_per_token: float | None = None, peak: float | None = None):
        """trackers: the first trainer's `colocate.trackers.Trackers`; None on the others.
        flops_per_token and peak (both known on a GPU whose datasheet peak we have): each
        row's `mfu` over the window, by the bench's count."""
        self.trackers = trackers
        self.flops_per_token, self.peak = flops_per_token, peak
        self._window: deque = deque(maxlen=self.WINDOW_STEPS)  # (step seconds, tokens)
        self._last_end: float | None = None  # host time the previous step ended
        self.group = group
        self.device = device
        self.num_pairs = num_pairs
        self.summarize = summarize  # the draft recipe's: its loss formula (step_summary)
        self.flush_every_s = flush_every_s
        self.pending: list = []
        self.last: dict | None = None
        self._last_flush = time.monotonic()

    def _host_scalar(self, value: float) -> torch.Tensor:
        return to_device(torch.tensor([float(value)], dtype=torch.float64), self.device)

    def record(self, step: int, stats: torch.Tensor, grad_norm: torch.Tensor, *, lr: float,
               tokens: int, seconds: float, phases: list | None = None,
               val_stats: torch.Tensor | None = None, **host: float) -> None:
        """stats: this trainer's stats vector summed over its micro-steps (layout above);
        val_stats: the same over its held-out micro-steps on a validation step (every
        trainer passes one then, or none does); `host`: plain numbers of the first trainer's
        pair (waits, peak memory) written as they are. grad_norm is the same on every
        trainer (clipping reduced it)."""
        parts = [stats.double(), grad_norm.double().reshape(1) / self.num_pairs,
                 self._host_scalar(tokens)]
        if val_stats is not None:
            parts.append(val_stats.double())
        vec = torch.cat(parts)
        work = dist.all_reduce(vec, group=self.group, async_op=True)
        self.pending.append((step, vec, work, dict(lr=lr, seconds=seconds, **host), phases,
                             val_stats is not None, time.monotonic()))
        if self.trackers is None:  # other trainers: nothing to write, just retire the handles
            self._retire(write=False)
        elif time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._retire(write=self.trackers is not None)
        self._last_flush = time.monotonic()

    def _window_rates(self, end: float, tokens: float, stream_s: float | None) -> dict:
        """tokens/s per GPU (one pair per GPU) and MFU over the last WINDOW_STEPS steps. A
        step's seconds: its stream time, or without one (no PhaseTimer marks) the host time
        from the end of the step before, which the first step has not."""
        last_end, self._last_end = self._last_end, end
        if stream_s is None and last_end is None:
            return {}
        self._window.append((end - last_end if stream_s is None else stream_s, tokens))
        seconds = sum(s for s, _ in self._window)
        rate = sum(t for _, t in self._window) / self.num_pairs / max(seconds, 1e-9)
        rates = {"tokens_per_s_per_gpu": rate, "rate_window_steps": len(self._window)}
        if self.flops_per_token and self.peak:
            rates["mfu"] = mfu(self.flops_per_token, rate, self.peak)
        return rates

    def _row(self, step: int, values: list[float], host: dict, phases: list | None,
             has_val: bool, end: float) -> dict:
        val = []
        if has_val:
            num = len(values) // 2 - 1  # [stats, grad_norm, tokens, val_stats], equal stats
            values, val = values[:num + 2], values[num + 2:]
        *stats, grad_norm, tokens = values
        seconds = host.pop("seconds")
        by_phase = phase_seconds(phases or [])
        stream_s = sum(by_phase.values()) if by_phase else None
        row = {"step": step + 1, **self.summarize(stats),
               "grad_norm": grad_norm, "skipped": int(not math.isfinite(grad_norm)),
               "tokens": int(tokens),
               "tokens_per_s": tokens_per_s(tokens, seconds if stream_s is None else stream_s),
               "step_s": seconds, **({"stream_s": stream_s} if by_phase else {}),
               **self._window_rates(end, tokens, stream_s), **host,
               **{f"{name}_s": v for name, v in by_phase.items()}}
        if val:
            row.update({f"val_{k}": v for k, v in self.summarize(val).items()})
        return row

    def _retire(self, write: bool) -> None:
        rows = []
        for step, vec, work, host, phases, has_val, end in self.pending:
            work.wait()
            if write:  # host sync (first trainer)
                rows.append(self._row(step, vec.tolist(), host, phases, has_val, end))
        self.pending.clear()
        if rows:
            self.last = rows[-1]
            self.trackers.write(rows)

    def close(self) -> None:
        """Write what is pending and close the trackers (the end of a run)."""
        self.flush()
        if self.trackers is not None:
            self.trackers.close()
