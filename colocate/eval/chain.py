"""Greedy chain speculative decoding, as sglang's EAGLE3 runs it with topk=1, written as a
loop over four callables so the accounting can be checked by hand.

One request:

    first = prefill(prompt)                 the target's greedy token after the prompt
    repeat until a stop token or max_new_tokens:
        d_1..d_K = propose(K)               the draft's chain (step 0 comes from the draft's
                                            pass over the committed positions)
        g_0..g_K = verify([x, d_1..d_K])    the target's greedy token after each of them
        a = longest prefix with d_j == g_{j-1}
        emit d_1..d_a, g_a                  a accepted drafts plus the target's bonus token
        commit(a, g_a)                      caches keep x, d_1..d_a; the draft catches up

Accounting follows sglang 0.5.17 (tokenizer_manager / schedule_batch):
* completion tokens are the emitted tokens *including the first one from the prefill*, cut
  after the first stop token and at max_new_tokens (`output_ids_through_stop`);
* a verify step counts once however much of it survives the cut, and the histogram counts
  verify steps by accepted drafts `a` before the cut (`spec_accept_histogram`);
* accept length = completion tokens / verify steps (`colocate.metrics.accept_length`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Protocol, Sequence

from colocate.metrics import accept_length


class ChainModels(Protocol):
    """The target and the draft of one request, seen from the decoding loop."""

    def prefill(self, prompt: list[int]) -> int:
        """Run the target over the prompt; return its greedy next token."""

    def propose(self, num_steps: int) -> list[int]:
        """The draft's chain of `num_steps` target-vocabulary tokens after the last token."""

    def verify(self, tokens: list[int]) -> list[int]:
        """Target greedy token after each of `tokens` (the last emitted token, then drafts)."""

    def commit(self, num_accepted: int, bonus: int) -> None:
        """Keep the last token and the first `num_accepted` drafts of the verify window;
        `bonus` is the new last token (not yet run through the target)."""


@dataclass
class ChainResult:
    """What one request produced."""

    tokens: list[int]
    """Completion token ids, the prefill's token first, cut after a stop token."""
    num_verify_steps: int
    histogram: list[int]
    """[K + 1] verify steps by number of accepted drafts."""


@dataclass
class AcceptStats:
    """Sums over requests; `accept_length` is sglang's completion_tokens / spec_verify_ct."""

    completion_tokens: int = 0
    verify_steps: int = 0
    histogram: list[int] = field(default_factory=list)
    num_requests: int = 0

    def add(self, completion_tokens: int, verify_steps: int, histogram: Sequence[int]) -> None:
        self.completion_tokens += completion_tokens
        self.verify_steps += verify_steps
        if len(histogram) > len(self.histogram):  # sglang's histograms grow as needed
            self.histogram += [0] * (len(histogram) - len(self.histogram))
        for a, count in enumerate(histogram):
            self.histogram[a] += count
        self.num_requests += 1

    @property
    def accept_length(self) -> float:
        """1.0 when no request reached a verify step (all stopped at their first token)."""
        return accept_length(self.completion_tokens, self.verify_steps)

    def to_dict(self) -> dict:
        return {"accept_length": self.accept_length, "completion_tokens": self.completion_tokens,
                "verify_steps": self.verify_steps, "histogram": list(self.histogram),
                "num_prompts": self.num_requests}


def num_accepted(drafts: Sequence[int], greedy: Sequence[int]) -> int:
    """Length of the longest prefix of `drafts` that the target's greedy tokens confirm."""
    a = 0
    while a < len(drafts) and drafts[a] == greedy[a]:
        a += 1
    return a


def chain_generate(models: ChainModels, prompt: list[int], *, num_steps: int,
                   max_new_tokens: int, stop_ids: Collection[int]) -> ChainResult:
    """Decode one request greedily with a `num_steps`-token draft chain per verify step.

    num_steps=0 is plain greedy decoding (one target forward per token, no draft): the
    baseline that the speed-up is measured against, through the same loop.
    """
    assert max_new_tokens >= 1 and num_steps >= 0, (max_new_tokens, num_steps)
    tokens = [models.prefill(prompt)]
    histogram = [0] * (num_steps + 1)
    num_verify = 0
    while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
        drafts = models.propose(num_steps) if num_steps else []
        assert len(drafts) == num_steps, (len(drafts), num_steps)
        greedy = models.verify([tokens[-1]] + drafts)
        a = num_accepted(drafts, greedy)
        num_verify += 1
        histogram[a] += 1
        for token in drafts[:a] + [greedy[a]]:
            tokens.append(token)
            if token in stop_ids or len(tokens) == max_new_tokens:
                return ChainResult(tokens, num_verify, histogram)
        models.commit(a, greedy[a])
    return ChainResult(tokens, num_verify, histogram)


@dataclass
class EngineRun:
    """One engine's measurement over the same prompts."""

    engine: str
    """hf (the plain-torch reference) or sglang."""
    stats: AcceptStats
    outputs: list[list[int]]
    """Completion tokens per prompt, with the draft (batch 1)."""
    tokens_per_s: dict[int, tuple[float, float | None]]
    """batch size -> (tokens/s with the draft, without it; None when not measured)."""
    same_as_target: int | None
    """Prompts whose output with the draft equals the target's alone (greedy is lossless,
    so every one should; low precision may flip near-ties)."""

    def to_dict(self) -> dict:
        rates = {f"batch_{b}": {"with_draft": w, "without_draft": wo,
                                "speedup": w / wo if wo else None}
                 for b, (w, wo) in sorted(self.tokens_per_s.items())}
        return {"engine": self.engine, **self.stats.to_dict(), "tokens_per_s": rates,
                "same_output_as_target": self.same_as_target}
