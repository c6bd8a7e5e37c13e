"""Plain-torch greedy speculative decoding: a transformers target with a KV cache and the
exported draft, run through the project's own draft modules. The decoder asks a drafting
object (`Drafter`) for proposals: `IncrementalDraft` below for Eagle3 (a chain), `BlockDraft`
(colocate.eval.block) for DFlash (a block); `colocate.eval.methods` picks it from the export.
Both are verified and accounted by the same loop (`chain.chain_generate`).

The Eagle3 part:

It plays the part sglang's EAGLE3 worker plays when serving (speculative_num_steps=K,
speculative_eagle_topk=1, speculative_num_draft_tokens=K+1), on any device, so the accept
length exists on CPU and in CI and can be set beside sglang's on a GPU.

Draft convention (training's, `colocate.draft.loss`): the draft step at committed index t
takes fc(aux_t) and the token x_{t+1}, at RoPE position t, and predicts x_{t+2}; chain step
j continues from index t with the previous step's pre-norm output and the j-th draft token,
at position t + j, attending to the committed keys (indices <= t) and the chain's own keys.
Serving this means:

* after the target's prefill of x_0..x_{n-1} (which yields x_n), the draft *extends* over
  t = 0..n-1 with (aux_t, x_{t+1}), keeping each position's keys; the last position's
  output is chain step 0 and proposes d_1;
* steps 1..K-1 run on their own keys, which are dropped after the proposal;
* after verification keeps a drafts and a bonus token, the target's cache is cropped to the
  accepted tokens and the draft extends over the a + 1 newly committed positions with the aux
  hidden states the verify forward produced.

Every tensor op of the draft is the training modules' (projections, RMSNorm, `kernels.rope_qk`,
the MLP's `silu_mul`, fc, norm, lm_head); only attention is new: committed keys from a cache
instead of the unroll's packed layout (tests/unit/test_eval_reference.py holds the two equal).
"""

from __future__ import annotations

import inspect
import time
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from colocate.draft import Eagle3Draft, kernels
from colocate.draft.kernels import upcast
from colocate.eval.chain import AcceptStats, EngineRun, chain_generate


class Drafter(Protocol):
    """A draft seen from the reference decoder (one request at a time)."""

    def reset(self) -> None:
        """Forget the request: nothing committed."""

    def extend(self, aux_TA: torch.Tensor, next_tokens: list[int]):
        """Newly committed positions t: the target's aux features [T, A*H] of each and the
        token x_{t+1} after each (the last of them is the target's newest, uncommitted token)."""

    def propose(self, num_steps: int) -> list[int]:
        """`num_steps` target-vocabulary tokens to follow that newest token."""


def cached_attention(q_MHD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention of the last M of N positions: query i sees keys 0..N-M+i.

    Scores and softmax in float32 (as the training attention), matmuls in the input dtype;
    grouped-query heads share their KV head without repeating it. Returns [M, Hq, D].
    """
    num_q, num_heads, head_dim = q_MHD.shape
    num_keys, num_kv_heads = k_NKD.shape[:2]
    group = num_heads // num_kv_heads
    q_KGMD = q_MHD.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    scores = q_KGMD.reshape(num_kv_heads, group * num_q, head_dim) @ k_NKD.permute(1, 2, 0)
    scores_KGMN = upcast(scores.view(num_kv_heads, group, num_q, num_keys)) * scale
    offset = num_keys - num_q
    future_MN = torch.ones(num_q, num_keys, dtype=torch.bool, device=q_MHD.device).triu(offset + 1)
    probs = torch.softmax(scores_KGMN.masked_fill(future_MN, float("-inf")), dim=-1)
    out = probs.to(v_NKD.dtype).reshape(num_kv_heads, group * num_q, num_keys) @ v_NKD.permute(1, 0, 2)
    return out.view(num_kv_heads, group, num_q, head_dim).permute(2, 0, 1, 3).reshape(
        num_q, num_heads, head_dim)


class IncrementalDraft:
    """The exported draft decoding with a KV cache of its committed positions."""

    def __init__(self, model: Eagle3Draft, embed_weight_VH: torch.Tensor, d2t: torch.Tensor):
        self.model, self.embed_weight, self.d2t = model, embed_weight_VH, d2t
        self.reset()

    def reset(self) -> None:
        attn = self.model.midlayer.self_attn
        param = self.model.fc.weight
        empty = torch.empty(0, attn.num_kv_heads, attn.head_dim, dtype=param.dtype,
                            device=param.device)
        self.keys, self.values = empty, empty
        self.num_committed = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden [1, H], logits [1, Vd])

    def _layer(self, embeds_TH: torch.Tensor, hidden_TH: torch.Tensor, positions: torch.Tensor,
               past_k: torch.Tensor, past_v: torch.Tensor):
        """`Eagle3DecoderLayer.forward` with cached attention: (hidden_out, new k, new v)."""
        layer = self.model.midlayer
        attn = layer.self_attn
        num_tokens = embeds_TH.shape[0]
        x_T2H = torch.cat([layer.input_layernorm(embeds_TH.to(hidden_TH.dtype)),
                           layer.hidden_norm(hidden_TH)], dim=-1)
        q = attn.q_proj(x_T2H).view(num_tokens, attn.num_heads, attn.head_dim)
        k = attn.k_proj(x_T2H).view(num_tokens, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(x_T2H).view(num_tokens, attn.num_kv_heads, attn.head_dim)
        rope_qk = kernels.pick(kernels.rope_qk, attn.kernels, q.device)
        q, k = rope_qk(q, k, positions, attn.inv_freq)
        out = cached_attention(q, torch.cat([past_k, k]), torch.cat([past_v, v]),
                               attn.head_dim ** -0.5)
        h = hidden_TH + attn.o_proj(out.reshape(num_tokens, attn.num_heads * attn.head_dim))
        return h + layer.mlp(layer.post_attention_layernorm(h)), k, v

    def _logits(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.norm(hidden_TH))

    def _embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.embed_weight.device)
        return F.embedding(ids, self.embed_weight)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    @torch.no_grad()
    def extend(self, aux_TA: torch.Tensor, next_tokens: list[int]) -> torch.Tensor:
        """Step 0 over newly committed positions: aux_t with token x_{t+1} each; keeps their
        keys. Returns their logits [T, Vd] (the last row proposes the next chain)."""
        assert aux_TA.shape[0] == len(next_tokens) > 0, (aux_TA.shape, len(next_tokens))
        positions = torch.arange(self.num_committed, self.num_committed + len(next_tokens),
                                 device=aux_TA.device)
        hidden = self.model.fc(aux_TA.to(self.model.fc.weight.dtype))
        h, k, v = self._layer(self._embed(next_tokens), hidden, positions, self.keys, self.values)
        self.keys, self.values = torch.cat([self.keys, k]), torch.cat([self.values, v])
        self.num_committed += len(next_tokens)
        logits = self._logits(h)
        self._last = (h[-1:], logits[-1:])
        return logits

    def propose(self, num_steps: int) -> list[int]:
        return self.chain(num_steps)[0]

    @torch.no_grad()
    def chain(self, num_steps: int, teacher_tokens: list[int] | None = None,
              ) -> tuple[list[int], torch.Tensor]:
        """Propose `num_steps` target-vocabulary tokens greedily from the last committed index.

        teacher_tokens: optional inputs of steps 1..num_steps-1 instead of the draft's own
        guesses (teacher forcing, to compare with training). Returns (tokens, logits
        [num_steps, Vd] of steps 0..num_steps-1). The chain's keys are not kept.
        """
        assert self._last is not None, "extend() before chain()"
        hidden, logits = self._last
        keys, values = self.keys, self.values
        start = self.num_committed - 1
        tokens, step_logits = [], [logits[0]]
        for step in range(1, num_steps + 1):
            tokens.append(int(self.to_target(logits[0].argmax())))
            if step == num_steps:
                break
            token = teacher_tokens[step - 1] if teacher_tokens is not None else tokens[-1]
            positions = torch.tensor([start + step], device=hidden.device)
            hidden, k, v = self._layer(self._embed([token]), hidden, positions, keys, values)
            keys, values = torch.cat([keys, k]), torch.cat([values, v])
            logits = self._logits(hidden)
            step_logits.append(logits[0])
        return tokens, torch.stack(step_logits)


class HFTarget:
    """A transformers causal LM with a KV cache; forward hooks on the aux layers capture
    their outputs (aux id i = OUTPUT of decoder layer i) for every position it runs."""

    def __init__(self, model: nn.Module, aux_layer_ids: list[int]):
        self.model, self.aux_layer_ids = model, list(aux_layer_ids)
        self.device = next(model.parameters()).device
        self._captured: dict[int, torch.Tensor] = {}
        layers = model.base_model.layers
        self._hooks = [layers[i].register_forward_hook(self._hook(i))
                       for i in sorted(set(self.aux_layer_ids))]
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns);
        # sglang's pinned 5.12 knows only the old one.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.cache = None

    def _hook(self, layer_id: int):
        def hook(module, args, output) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._captured[layer_id] = hidden[0]  # [1, M, H] -> [M, H]
        return hook

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()  # filled in place by every forward

    @property
    def length(self) -> int:
        """Positions held in the KV cache."""
        return self.cache.get_seq_length()

    @torch.no_grad()
    def forward(self, tokens: list[int]) -> tuple[list[int], torch.Tensor]:
        """Run `tokens` after the cached ones: (greedy next token after each, aux [M, A*H])."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kwarg: self.cache})
        aux = torch.cat([self._captured[i] for i in self.aux_layer_ids], dim=-1)
        return out.logits[0].argmax(-1).tolist(), aux  # .tolist(): the step's one sync

    def close(self) -> None:
        """Drop the model: the hooks' closures refer to this object, and the model's layers
        hold the hooks, so the model stays reachable until they are removed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._captured, self.cache = [], {}, None
        del self.model

    def crop(self, length: int) -> None:
        # A negative count removes that many positions: the one spelling of Cache.crop that
        # transformers 4.x, 5.12 and 5.24 all accept (5.24 refuses an absolute length).
        if self.length > length:
            self.cache.crop(length - self.length)


class ReferenceDecoder:
    """`ChainModels` over an `HFTarget` and a `Drafter` (None: the target alone)."""

    def __init__(self, target: HFTarget, draft: Drafter | None):
        self.target, self.draft = target, draft
        self._window: tuple[int, list[int], torch.Tensor] | None = None

    def prefill(self, prompt: list[int]) -> int:
        self.target.reset()
        greedy, aux = self.target.forward(prompt)
        if self.draft is not None:
            self.draft.reset()
            self.draft.extend(aux, prompt[1:] + [greedy[-1]])
        return greedy[-1]

    def propose(self, num_steps: int) -> list[int]:
        return self.draft.propose(num_steps)

    def verify(self, tokens: list[int]) -> list[int]:
        start = self.target.length
        greedy, aux = self.target.forward(tokens)
        self._window = (start, tokens, aux)
        return greedy

    def commit(self, num_accepted: int, bonus: int) -> None:
        start, tokens, aux = self._window
        kept = num_accepted + 1  # the verified last token and the accepted drafts
        self.target.crop(start + kept)
        if self.draft is not None:
            self.draft.extend(aux[:kept], tokens[1:kept] + [bonus])


def load_reference(target_path: str, export, *, dtype: torch.dtype, device: torch.device,
                   ) -> tuple[HFTarget, Drafter]:
    """The target (sdpa attention, `dtype`, on `device`) and the exported draft's drafting
    object beside it (its kind from the export: `colocate.eval.methods`)."""
    from colocate.engine.hf import load_causal_lm

    model = load_causal_lm(target_path, dtype, "sdpa").requires_grad_(False).eval().to(device)
    draft = export.method.reference_draft(export, model, dtype=dtype, device=device)
    return HFTarget(model, export.aux_layer_ids), draft


def _decode_all(models: ReferenceDecoder, prompts: list[list[int]], num_steps: int,
                max_new_tokens: int, stop_ids: frozenset[int]):
    stats, outputs = AcceptStats(), []
    start = time.perf_counter()
    for prompt in prompts:
        gen = chain_generate(models, prompt, num_steps=num_steps, max_new_tokens=max_new_tokens,
                             stop_ids=stop_ids)
        stats.add(len(gen.tokens), gen.num_verify_steps, gen.histogram)
        outputs.append(gen.tokens)
    return stats, outputs, time.perf_counter() - start


def reference_eval(target: HFTarget, draft: Drafter, prompts: list[list[int]], *,
                   num_steps: int, max_new_tokens: int, stop_ids: frozenset[int],
                   baseline: bool = True) -> EngineRun:
    """Accept length of the draft over `prompts`, and tokens/s with it and (`baseline`)
    without it, which also checks that decoding was lossless (one prompt at a time: the
    reference has no batching). A warm-up request runs first, untimed."""
    spec, plain = ReferenceDecoder(target, draft), ReferenceDecoder(target, None)
    for models, k in ((spec, num_steps), (plain, 0))[:2 if baseline else 1]:
        chain_generate(models, prompts[0], num_steps=k, max_new_tokens=min(8, max_new_tokens),
                       stop_ids=stop_ids)
    stats, outputs, seconds = _decode_all(spec, prompts, num_steps, max_new_tokens, stop_ids)
    rate = stats.completion_tokens / seconds
    if not baseline:
        return EngineRun(engine="hf", stats=stats, outputs=outputs,
                         tokens_per_s={1: (rate, None)}, same_as_target=None)
    base, base_outputs, base_seconds = _decode_all(plain, prompts, 0, max_new_tokens, stop_ids)
    return EngineRun(
        engine="hf", stats=stats, outputs=outputs,
        tokens_per_s={1: (rate, base.completion_tokens / base_seconds)},
        same_as_target=sum(a == b for a, b in zip(outputs, base_outputs)))
