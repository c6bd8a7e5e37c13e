"""Online decode's stream (colocate/generate/online.py) against training on a file that
`colocate generate` wrote with the same answers: same micro-batches, exact resume, replies
cut at the training length and counted, decode failures and stalls reported, not hung."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

from colocate.data import DataStats, DataStream, load_or_build_tokenized
from colocate.data.conversations import read_lines
from colocate.data.holdout import holdout_lines
from colocate.generate.engines import Generation, split_stop
from colocate.generate.online import build_online_stream
from colocate.generate.run import generate_file
from tests.unit.test_generate import head, tiny_cfg


class LengthGenerator:
    """Answers every prompt with the same few words and a number that depends on the prompt
    only (never on the batch), ending on the stop id; honours per-prompt limits."""

    name = "length"

    def __init__(self, tokenizer, stop_id: int, *, fail: bool = False, delay_s: float = 0.0):
        self.tokenizer, self.stop_id = tokenizer, stop_id
        self.fail, self.delay_s = fail, delay_s
        self.calls = 0

    def generate(self, prompts, seeds, on_batch=None, max_new_tokens=None):
        self.calls += 1
        if self.fail:
            raise RuntimeError("the answering engine broke")
        time.sleep(self.delay_s)
        out = []
        for i, prompt in enumerate(prompts):
            text = f" the answer to {len(prompt)} is {sum(prompt) % 97}" * (1 + len(prompt) % 3)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop_id]
            limit = max_new_tokens[i] if max_new_tokens else 96
            out.append(split_stop(ids[:limit], (self.stop_id,)))
        return out

    def close(self):
        pass


def topo(pair: int = 0, num_pairs: int = 2):
    info = SimpleNamespace(pair_index=pair, num_pairs=num_pairs, name=f"engine rank {2 * pair + 1}")
    return SimpleNamespace(info=info, device=torch.device("cpu"))


def config(tiny_assets, data, *extra):
    return tiny_cfg(tiny_assets["target_llama"], data, "data.holdout=0", "data.source=generate",
                    "data.tokens_per_micro_step=512", "data.max_length=256",
                    "generate.chunk_records=4", "run.timeout_s=60", *extra)


def generator(tiny_tokenizer, **kwargs):
    return LengthGenerator(tiny_tokenizer, tiny_tokenizer.eos_token_id, **kwargs)


def take(stream, n):
    return [stream.next_micro_batch() for _ in range(n)]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
        assert torch.equal(x.seq_lens, y.seq_lens)


@pytest.mark.parametrize("keep_mb", [1024, 0])
def test_online_micro_batches_equal_training_on_the_generated_file(tiny_assets, tiny_tokenizer,
                                                                   tmp_path, keep_mb):
    data = head(tiny_assets, tmp_path, 20)
    cfg = config(tiny_assets, data, f"generate.keep_greedy_mb={keep_mb}")
    # Offline: `colocate generate` writes the answers, training tokenizes and packs the file.
    out = str(tmp_path / "answers.jsonl")
    generate_file(cfg, data_path=data, out_path=out, generator=generator(tiny_tokenizer))
    offline_data = tiny_cfg(tiny_assets["target_llama"], out, "data.holdout=0",
                            "data.max_length=256").data
    tokenized = load_or_build_tokenized(offline_data, tiny_tokenizer, cfg.target.path,
                                        str(tmp_path / "cache"))
    for pair in (0, 1):
        offline = DataStream(tokenized, seed=cfg.run.seed, shuffle=True, shard_index=pair,
                             num_shards=2, tokens_per_micro_step=512)
        online, held_out = build_online_stream(cfg, topo(pair),
                                               generator=generator(tiny_tokenizer))
        assert held_out is None
        online.start()
        try:
            # 8 micro-batches of 512 tokens run through this pair's 10 records 3 times and more:
            # epochs, chunk edges (4 records) and the decode-ahead queue are all crossed.
            same(take(online, 8), take(offline, 8))
            assert online.state()["epoch"] == offline.state()["epoch"] >= 2
            meta = online.decode_meta()
            assert meta["decode_tokens"] > 0
            total = meta["decode_records"] + meta["decode_reused"]
            assert total >= 30
            if keep_mb:  # greedy: each of the 20 records is decoded once at most, then reused
                assert meta["decode_records"] <= 20 and meta["decode_reused"] >= total - 20
            else:
                assert meta["decode_records"] >= 30 and meta["decode_reused"] == 0
        finally:
            online.close()


def test_resume_continues_with_the_same_micro_batches(tiny_assets, tiny_tokenizer, tmp_path):
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20))
    straight, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer))
    straight.start()
    first = take(straight, 3)
    saved = dict(straight.state())
    rest = take(straight, 4)
    straight.close()
    resumed, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer))
    resumed.load_state(saved)
    resumed.start()
    try:
        same(take(resumed, 4), rest)
    finally:
        resumed.close()
    assert first[-1].end_state == {k: saved[k] for k in ("epoch", "cursor")}
    # Another seed's position is refused, naming what differs.
    other, _ = build_online_stream(config(tiny_assets, cfg.data.path, "run.seed=1"), topo(),
                                   generator=generator(tiny_tokenizer))
    with pytest.raises(Exception, match="seed: saved 0, now 1"):
        other.load_state(saved)


def test_answers_past_the_training_length_are_cut_and_counted(tiny_assets, tiny_tokenizer,
                                                              tmp_path):
    # 96-token budget per conversation: long prompts plus answers cannot fit.
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20), "data.max_length=96",
                 "data.tokens_per_micro_step=192")
    stream, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer))
    stream.start()
    try:
        batches = take(stream, 6)
    finally:
        stream.close()
    assert all(int(b.seq_lens.max()) <= 96 for b in batches)
    meta = stream.decode_meta()
    assert meta["decode_truncated"] > 0  # cut, counted, and training went on
    assert stream.counts.stats.conversations > 0


def test_a_failing_decoder_is_raised_not_hung(tiny_assets, tiny_tokenizer, tmp_path):
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20))
    stream, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer, fail=True))
    stream.start()
    with pytest.raises(RuntimeError, match="the answering engine broke"):
        stream.next_micro_batch()
    stream.close()


def test_a_stalled_decoder_times_out_naming_it(tiny_assets, tiny_tokenizer, tmp_path):
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20), "run.timeout_s=0.3",
                 "run.startup_timeout_s=0.3")
    stream, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer,
                                                                     delay_s=2.0))
    stream.start()
    with pytest.raises(TimeoutError, match=r"engine rank 1: waited 0 s for the decode thread"):
        stream.next_micro_batch()
    stream.close()  # returns once the stalled call ends: the thread never outlives it


def test_held_out_prompts_are_answered_once(tiny_assets, tiny_tokenizer, tmp_path):
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20), "data.holdout=4")
    gen = generator(tiny_tokenizer)
    stream, held_out = build_online_stream(cfg, topo(), generator=gen)
    # One rewriter run over the 4 held-out records: one generate call per assistant-turn round.
    lines = holdout_lines(cfg.data.path, 4)
    rounds = max(len(c.assistant_turns) for n, c in read_lines(cfg.data.path, stats=DataStats())
                 if n in lines)
    assert held_out.num_sequences == 4 and gen.calls == rounds
    assert len(stream.records) == 16
    assert held_out.loss_mask.any()


def _broken_factory():
    raise ValueError("no such model")


def test_a_generator_in_a_child_process_answers_as_in_process(tiny_assets, tiny_tokenizer):
    # Online decode's sglang Engine runs like this (colocate/generate/child.py); here the hf
    # engine in a real spawned child against the same engine in this process.
    from colocate.generate.child import ChildGenerator
    from colocate.generate.engines import HFGenerator, Sampling

    kwargs = dict(path=tiny_assets["target_llama"],
                  sampling=Sampling(12, 0.0, 1.0, (tiny_tokenizer.eos_token_id,)),
                  device=torch.device("cpu"), dtype=torch.float32, batch_size=4,
                  pad_id=tiny_tokenizer.eos_token_id)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("hello there", "what is 7 plus 5",
                                                        "tell me a story about a cat")]
    limits = [12, 3, 8]
    here = HFGenerator(**kwargs).generate(prompts, [0, 0, 0], None, limits)
    child = ChildGenerator(HFGenerator, kwargs, timeout_s=120, who="test")
    try:
        assert child.name == "hf"
        assert child.generate(prompts, [0, 0, 0], None, limits) == here
        assert [len(g.ids) <= n for g, n in zip(here, limits)] == [True] * 3
    finally:
        child.close()
    assert not child._proc.is_alive()
    with pytest.raises(RuntimeError, match="(?s)failed during start.*no such model"):
        ChildGenerator(_broken_factory, {}, timeout_s=120, who="test")


class _EnvReport:
    """A generator whose name is the torchrun variables its process sees."""

    def __init__(self):
        self.name = " ".join(sorted(k for k in os.environ
                                    if k in ("RANK", "MASTER_PORT") or k.startswith("TORCHELASTIC_")))

    def close(self):
        pass


def test_the_answering_child_is_no_torchrun_worker(monkeypatch):
    # Under torchrun, sglang's scheduler (a grandchild) would wait for an agent store that
    # does not exist (TORCHELASTIC_USE_AGENT_STORE): the child drops torchrun's variables.
    from colocate.generate.child import ChildGenerator

    for name, value in (("RANK", "1"), ("MASTER_PORT", "29500"),
                        ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("KEEP_ME", "1")):
        monkeypatch.setenv(name, value)
    child = ChildGenerator(_EnvReport, {}, timeout_s=120, who="test")
    try:
        assert child.name == ""
    finally:
        child.close()
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # this process keeps them


def test_epochs_are_refused_with_online_decode(tiny_assets, tmp_path):
    from colocate.config import ConfigError

    with pytest.raises(ConfigError, match="train.epochs: online decode .* set train.max_steps"):
        config(tiny_assets, head(tiny_assets, tmp_path, 4), "train.epochs=2", "train.max_steps=0")


def test_sampled_answers_are_decoded_again_every_epoch(tiny_assets, tiny_tokenizer, tmp_path):
    # Only greedy answers repeat: with a temperature every epoch is decoded afresh.
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20), "generate.temperature=0.7")
    online, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer))
    online.start()
    try:
        take(online, 8)
        assert online.state()["epoch"] >= 2
        meta = online.decode_meta()
        assert meta["decode_records"] >= 30 and meta["decode_reused"] == 0
    finally:
        online.close()


def test_nothing_is_kept_when_keeping_is_off():
    # A sampled run (keep_bytes 0) keeps neither answers nor skips: a record skipped once
    # may give a trainable answer when asked again.
    from colocate.generate.online import AnswerEncoder

    off = AnswerEncoder(None, None, max_length=64, last_assistant_turn_only=False, seed=0)
    off._keep(1, None)
    off._keep(2, ([5, 6], [False, True]))
    assert off._kept == {}
    on = AnswerEncoder(None, None, max_length=64, last_assistant_turn_only=False, seed=0,
                       keep_bytes=12)
    on._keep(1, None)
    on._keep(2, ([5, 6], [False, True]))   # 10 bytes
    on._keep(3, ([7], [True]))             # 5 more: past the budget, not kept
    assert sorted(on._kept) == [1, 2] and on._unpack(on._kept[2]) == ([5, 6], [False, True])


def test_records_ahead_count_chunks_cut_at_the_epoch_end(tiny_assets, tiny_tokenizer, tmp_path):
    # A chunk never crosses an epoch: 1000-record chunks of a 10-record shard hold 10 each,
    # and decode_ahead counts those records (it once counted 1000 per queued chunk).
    cfg = config(tiny_assets, head(tiny_assets, tmp_path, 20), "generate.chunk_records=1000")
    stream, _ = build_online_stream(cfg, topo(), generator=generator(tiny_tokenizer))
    stream.start()
    try:
        def queue_full():  # both queued chunks answered (ahead_chunks = 2)
            deadline = time.monotonic() + 30
            while not stream._queue.full():
                assert time.monotonic() < deadline, "the decode thread did not fill its queue"
                time.sleep(0.05)

        queue_full()
        assert stream.decode_meta()["decode_ahead"] == 20
        stream.next_micro_batch()  # packs a chunk's records, then peeks into the next chunk
        queue_full()  # refilled: 20 records queued again, plus what is left of the peeked one
        assert len(stream._pending) <= 10  # left of the peeked chunk
        assert stream.decode_meta()["decode_ahead"] == 20 + len(stream._pending)
    finally:
        stream.close()
