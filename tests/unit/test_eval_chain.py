"""Greedy chain speculative decoding: sglang's accounting, checked by hand on fake models."""

import pytest

from colocate.eval.chain import AcceptStats, chain_generate, num_accepted

WRONG = 9999  # a token the fake target never emits


class ScriptedModels:
    """A target whose greedy output is `sequence` (whatever the prompt), and a draft that is
    right for `correct[i]` tokens at verify step i, then wrong."""

    def __init__(self, sequence, correct):
        self.sequence, self.correct = list(sequence), list(correct)
        self.pos = 0  # tokens emitted and committed so far
        self.commits = []
        self._window = None

    def prefill(self, prompt):
        self.pos = 1
        return self.sequence[0]

    def propose(self, num_steps):
        m = self.correct[len(self.commits)]
        truth = self.sequence[self.pos:self.pos + num_steps]
        return truth[:m] + [WRONG] * (num_steps - min(m, num_steps))

    def verify(self, tokens):
        assert tokens[0] == self.sequence[self.pos - 1]  # the last emitted token comes first
        greedy, right = [], True
        for i, token in enumerate(tokens):
            right = right and (i == 0 or token == self.sequence[self.pos + i - 1])
            greedy.append(self.sequence[self.pos + i] if right else WRONG - 1)
        return greedy

    def commit(self, num_accepted, bonus):
        assert bonus == self.sequence[self.pos + num_accepted]
        self.commits.append(num_accepted)
        self.pos += num_accepted + 1


SEQ = list(range(100, 200))


def test_right_for_two_of_four_then_capped_by_max_new_tokens():
    models = ScriptedModels(SEQ, correct=[2] * 10)
    gen = chain_generate(models, [1, 2, 3], num_steps=4, max_new_tokens=12, stop_ids={7})
    # 1 (prefill) + 3 + 3 + 3 = 10 after three verify steps; the fourth emits 3 more, of
    # which 2 fit under max_new_tokens=12. It still counts as a verify step.
    assert gen.tokens == SEQ[:12]
    assert gen.num_verify_steps == 4
    assert gen.histogram == [0, 0, 4, 0, 0]
    assert models.commits == [2, 2, 2]  # no commit after the last (finished) verify
    stats = AcceptStats()
    stats.add(len(gen.tokens), gen.num_verify_steps, gen.histogram)
    assert stats.accept_length == 12 / 4


def test_varying_acceptance_by_hand():
    models = ScriptedModels(SEQ, correct=[0, 4, 1, 3, 0])
    gen = chain_generate(models, [5], num_steps=4, max_new_tokens=100, stop_ids={SEQ[13]})
    # Token indices emitted: prefill 0 | a=0: 1 | a=4: 2..5 + bonus 6 | a=1: 7 + bonus 8 |
    # a=3: 9..11 + bonus 12 | a=0: bonus 13, the stop token. 14 tokens, 5 verify steps.
    assert gen.tokens == SEQ[:14]
    assert gen.num_verify_steps == 5
    assert gen.histogram == [2, 1, 0, 1, 1]
    assert len(gen.tokens) / gen.num_verify_steps == pytest.approx(14 / 5)


def test_stop_token_inside_accepted_drafts():
    models = ScriptedModels(SEQ, correct=[4])
    gen = chain_generate(models, [5], num_steps=4, max_new_tokens=100, stop_ids={SEQ[3]})
    # The verify step accepts all 4 drafts (seq 1..4) and the bonus (seq 5); the output is
    # cut after the stop token seq[3]; sglang's histogram counts the 4 accepted drafts.
    assert gen.tokens == SEQ[:4]
    assert gen.num_verify_steps == 1 and gen.histogram == [0, 0, 0, 0, 1]
    assert models.commits == []


def test_first_token_stops_or_fills_the_budget():
    gen = chain_generate(ScriptedModels(SEQ, []), [5], num_steps=4, max_new_tokens=50,
                         stop_ids={SEQ[0]})
    assert gen.tokens == SEQ[:1] and gen.num_verify_steps == 0
    gen = chain_generate(ScriptedModels(SEQ, []), [5], num_steps=4, max_new_tokens=1,
                         stop_ids=set())
    assert gen.tokens == SEQ[:1] and gen.num_verify_steps == 0
    stats = AcceptStats()
    stats.add(1, 0, gen.histogram)
    assert stats.accept_length == 1.0  # no draft token was ever used


def test_no_draft_is_plain_greedy():
    models = ScriptedModels(SEQ, [0] * 20)
    gen = chain_generate(models, [5], num_steps=0, max_new_tokens=10, stop_ids=set())
    assert gen.tokens == SEQ[:10]
    assert gen.num_verify_steps == 9 and gen.histogram == [9]


def test_stats_sum_histograms_of_different_lengths():
    # sglang's per-request histograms only grow as far as the largest count seen.
    stats = AcceptStats()
    stats.add(10, 4, [1, 0, 3])
    stats.add(7, 5, [2, 3])
    stats.add(1, 0, [])
    assert stats.histogram == [3, 3, 3]
    assert stats.completion_tokens == 18 and stats.verify_steps == 9
    assert stats.accept_length == 2.0 and stats.num_requests == 3


def test_num_accepted():
    assert num_accepted([1, 2, 3], [1, 2, 4, 5]) == 2
    assert num_accepted([9, 2], [1, 2, 3]) == 0
    assert num_accepted([1, 2], [1, 2, 3]) == 2
    assert num_accepted([], [4]) == 0
