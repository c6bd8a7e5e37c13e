"""Online decode (`data.source: generate`): an engine rank trains its trainer on the
target's own answers, decoded while training runs.

The prompts are data.path's conversations (each assistant turn is re-asked, turn by turn,
after the target's own earlier replies: `ChunkRewriter`, the same code as `colocate
generate`). A decode thread on the engine rank walks this pair's shard in sampler order
(`ShardedSampler`: the order training on a pre-generated file of the same answers would
take), answers a chunk of records at a time, encodes each answered record exactly as the
tokenized dataset encodes a line of a generated file (`encode_sample`), and queues it.
The engine's main thread packs micro-batches from that queue and prefills them into the
ring, so decoding runs ahead of the prefill that runs ahead of the trainer.

Bounds: at most `generate.ahead_chunks` decoded chunks wait in the queue (memory); the
packer waits at most run.timeout_s (run.startup_timeout_s for the first answers, which
include loading the model) for the decode thread, and says so when it gives up.

Resume: the stream's state is the sampler position of the next record the PACKER takes
(not the decode thread's, which is ahead), so a resumed run re-decodes what was decoded
but not trained on. Reply seeds come from (run.seed, epoch, line, turn), never from the
batch, so greedy and sampled answers are the same after a resume. Epoch 0 uses
`colocate generate`'s own seeds: a pre-generated file of the same prompts holds the same
answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from colocate.data.conversations import Conversation, parse_record
from colocate.data.errors import DataError
from colocate.data.packing import MicroBatch, micro_batch_from
from colocate.data.sampler import ShardedSampler
from colocate.data.stream import SampledStream
from colocate.data.stats import DataStats
from colocate.data.template import Renderer
from colocate.data.tokenized import TokenizedDataset, encode_sample
from colocate.generate.rewrite import ChunkRewriter

if TYPE_CHECKING:
    from colocate.config import Config
    from colocate.topology import Topology

log = logging.getLogger(__name__)

Sample = tuple[list[int], list[bool]]


def epoch_seed(seed: int, epoch: int) -> int:
    """The reply seed base of `epoch`: run.seed itself in epoch 0 (as `colocate generate`
    seeds), a fresh one per later epoch so sampled answers differ between epochs."""
    if epoch == 0:
        return seed
    digest = hashlib.sha256(f"colocate-online:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Decoded:
    """One record's outcome, in shard order."""

    index: int
    """The record's index among the prompts."""
    sample: Sample | None
    """What training sees (ids, loss mask); None when nothing of it is trainable (a skip)."""
    state_after: dict
    """Sampler state after this record: resuming there continues with the next one."""


@dataclass
class DecodeCounts:
    """Running totals of one engine's decode thread (ride in every ring message's meta)."""

    records: int = 0
    """Records answered (skipped ones included)."""
    tokens: int = 0
    """Tokens the target generated."""
    seconds: float = 0.0
    """Time the generator took for them."""
    truncated: int = 0
    """Records cut at the training length (data.max_length or the target's context)."""
    skipped: int = 0
    """Records with nothing trainable (prompt past the limit, template errors, no reply)."""
    reused: int = 0
    """Records of a later epoch served from kept greedy answers, not decoded again."""
    stats: DataStats = field(default_factory=DataStats)
    """How the answered records encoded (kept, truncated, tokens, skips)."""

    def meta(self, ahead: int) -> dict:
        return {"decode_records": self.records, "decode_tokens": self.tokens,
                "decode_s": self.seconds, "decode_truncated": self.truncated,
                "decode_skipped": self.skipped, "decode_reused": self.reused,
                "decode_ahead": ahead}


class AnswerEncoder:
    """Answers records with the target and encodes them for training: one chunk per call.

    Greedy answers are the same in every epoch, so with `keep_bytes` > 0 they are kept
    (compactly, up to that many bytes) and a record answered before is served from them
    instead of being decoded again (a pair's shard changes between epochs: a record may
    be new to this engine in a later epoch)."""

    def __init__(self, rewriter: ChunkRewriter, renderer: Renderer, *, max_length: int,
                 last_assistant_turn_only: bool, seed: int, keep_bytes: int = 0):
        self.rewriter = rewriter
        self.renderer = renderer  # training's (data.chat_template_kwargs), not the prompts'
        self.max_length = max_length
        self.last_assistant_turn_only = last_assistant_turn_only
        self.seed = seed
        self.keep_bytes = keep_bytes  # 0: decode every epoch (sampled answers must)
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # line -> sample
        self._kept_bytes = 0

    def close(self) -> None:
        self.rewriter.generator.close()

    def answer(self, records: list[tuple[int, Conversation]], epoch: int,
               counts: DecodeCounts) -> list[Sample | None]:
        """The training sample of each record (None: nothing trainable), counted."""
        fresh = [record for record in records if record[0] not in self._kept]
        answered = self._answer(fresh, epoch, counts) if fresh else {}
        counts.reused += len(records) - len(fresh)
        return [answered[line_no] if line_no in answered else self._unpack(self._kept[line_no])
                for line_no, _ in records]

    def _answer(self, records: list[tuple[int, Conversation]], epoch: int,
                counts: DecodeCounts) -> dict[int, Sample | None]:
        """Decode and encode `records`: {line: sample}."""
        self.rewriter.seed = epoch_seed(self.seed, epoch)
        start = time.perf_counter()
        result = self.rewriter.run(records)
        counts.seconds += time.perf_counter() - start
        counts.records += len(records)
        counts.tokens += result.counts.generated_tokens
        counts.truncated += result.truncated_at_context
        by_line = dict(zip(result.written, result.lines))
        samples = {}
        for line_no, conversation in records:
            line = by_line.get(line_no)
            sample = None if line is None else self._encode(line, conversation.where, counts)
            counts.skipped += sample is None
            samples[line_no] = sample
            self._keep(line_no, sample)
        return samples

    def _keep(self, line_no: int, sample: Sample | None) -> None:
        size = 0 if sample is None else 5 * len(sample[0])  # int32 ids + bool mask
        if not self.keep_bytes or self._kept_bytes + size > self.keep_bytes:
            return
        self._kept[line_no] = None if sample is None else (
            torch.tensor(sample[0], dtype=torch.int32), torch.tensor(sample[1]))
        self._kept_bytes += size

    @staticmethod
    def _unpack(kept) -> Sample | None:
        return None if kept is None else (kept[0].tolist(), kept[1].tolist())

    def _encode(self, line: str, where: str, counts: DecodeCounts) -> Sample | None:
        """The generated record as training on a generated file reads it back."""
        try:
            return encode_sample(parse_record(json.loads(line), where), self.renderer,
                                 max_length=self.max_length,
                                 last_assistant_turn_only=self.last_assistant_turn_only,
                                 stats=counts.stats)
        except DataError:
            return None  # counted (and the first few logged) by encode_sample


class OnlineStream(SampledStream):
    """The DataStream of online decode: `next_micro_batch`, `state`, `load_state`, plus
    `start` (after load_state) and `close`."""

    what = "online decode"
    resume_fix = ("Restore the original data, target, generate.* settings, seed and GPU "
                  "count")

    def __init__(self, records: list[tuple[int, Conversation]], encoder: AnswerEncoder, *,
                 key: str, seed: int, shuffle: bool, shard_index: int, num_shards: int,
                 tokens_per_micro_step: int, chunk_records: int, ahead_chunks: int,
                 timeout_s: float, first_timeout_s: float, who: str):
        self.records = records
        self.encoder = encoder
        self.key = key
        self.tokens_per_micro_step = tokens_per_micro_step
        self.chunk_records = chunk_records
        self.sampler = ShardedSampler(len(records), seed=seed, shuffle=shuffle,
                                      shard_index=shard_index, num_shards=num_shards)
        self.timeout_s, self.first_timeout_s, self.who = timeout_s, first_timeout_s, who
        self.counts = DecodeCounts()
        self._queue: queue.Queue = queue.Queue(maxsize=ahead_chunks)
        self._pending: list[Decoded] = []  # decoded, not yet packed (front first)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._got_first = False

    # ------------------------------------------------------------------ DataStream API

    def load_state(self, state: dict) -> None:
        assert self._thread is None, "load_state before start: the decoder starts there"
        super().load_state(state)

    def next_micro_batch(self) -> MicroBatch:
        """Records in shard order until the next sample would pass the token budget (skipped
        records are consumed on the way), as `pack_micro_batch` packs a file's."""
        start_state = self.sampler.state()
        picked: list[Decoded] = []
        used = 0
        while True:
            item = self._peek()
            if item.sample is not None:
                length = len(item.sample[0])
                if picked and used + length > self.tokens_per_micro_step:
                    break
                picked.append(item)
                used += length
            self._pending.pop(0)
            self.sampler.load_state(item.state_after)
            if used == self.tokens_per_micro_step:
                break
        return micro_batch_from([d.sample for d in picked], [d.index for d in picked],
                                start_state, self.sampler.state())

    def decode_meta(self) -> dict:
        """The decode thread's totals, for the ring message's meta."""
        with self._queue.mutex:  # chunks end at an epoch's end: count, not qsize * size
            queued = sum(len(c) for c in self._queue.queue if isinstance(c, list))
        return self.counts.meta(ahead=len(self._pending) + queued)

    # ------------------------------------------------------------------ decode thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._decode, name="colocate-decode",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the decode thread (it finishes its current chunk: bounded by one generate
        call) and free the generator."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # unblock a put() waiting for room
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)
        self.encoder.close()

    def _peek(self) -> Decoded:
        while not self._pending:
            limit = self.timeout_s if self._got_first else self.first_timeout_s
            try:
                chunk = self._queue.get(timeout=limit)
            except queue.Empty:
                alive = self._thread is not None and self._thread.is_alive()
                raise TimeoutError(
                    f"{self.who}: waited {limit:.0f} s for the decode thread's next answers "
                    f"(thread {'alive' if alive else 'gone'}; {self.counts.records:,} records "
                    f"answered so far); raise run.timeout_s, or lower generate.chunk_records "
                    "or generate.max_new_tokens") from None
            if isinstance(chunk, BaseException):
                raise chunk
            self._got_first = True
            self._pending.extend(chunk)
        return self._pending[0]

    def _decode(self) -> None:
        try:
            sampler = ShardedSampler(len(self.records), seed=self.sampler.seed,
                                     shuffle=self.sampler.shuffle,
                                     shard_index=self.sampler.shard_index,
                                     num_shards=self.sampler.num_shards)
            sampler.load_state(self.sampler.state())
            while not self._stop.is_set():
                # A chunk never crosses an epoch: a record appears at most once in it.
                epoch = sampler.epoch
                size = min(self.chunk_records, sampler.shard_len - sampler.cursor)
                indices, states = [], []
                for _ in range(size):
                    indices.append(sampler.advance())
                    states.append(sampler.state())
                samples = self.encoder.answer([self.records[i] for i in indices], epoch,
                                              self.counts)
                self._put([Decoded(i, s, st) for i, s, st in zip(indices, samples, states)])
        except BaseException as e:  # noqa: BLE001 - handed to the packer, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


def answered_dataset(records: list[tuple[int, Conversation]], encoder: AnswerEncoder,
                     key: str) -> TokenizedDataset:
    """`records` answered once (epoch 0) and held as a tokenized dataset: the held-out split
    of online decode, which validation scores every time against the same answers."""
    counts = DecodeCounts()
    samples = [s for s in encoder.answer(records, 0, counts) if s is not None]
    if not samples:
        raise DataError(f"data.holdout: none of the {len(records)} held-out conversations "
                        f"gave a trainable answer ({counts.stats.format()})")
    lengths = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    ids = torch.tensor([t for s, _ in samples for t in s], dtype=torch.int32)
    mask = torch.tensor([m for _, s in samples for m in s], dtype=torch.bool)
    return TokenizedDataset(ids, mask, offsets, counts.stats, key)


def build_online_stream(cfg: "Config", topo: "Topology", *, generator=None
                        ) -> tuple[OnlineStream, TokenizedDataset | None]:
    """This engine's online stream and, when data.holdout > 0, the held-out split answered
    now (both from data.path, with the target of cfg.target). `generator`: a ready one
    (tests); by default generate.engine's, on this engine's device."""
    from colocate.data.conversations import read_lines, skip_invalid_line
    from colocate.data.holdout import holdout_lines
    from colocate.data.tokenized import renderer_for
    from colocate.generate.engines import build_generator
    from colocate.generate.run import prepare
    from colocate.target import context_length

    from transformers import AutoConfig

    data, gen = cfg.data, cfg.generate
    job = prepare(cfg, data.path)
    held_out_lines = holdout_lines(data.path, data.holdout)
    records: list[tuple[int, Conversation]] = []
    held_out: list[tuple[int, Conversation]] = []
    stats = DataStats()
    for line_no, item in read_lines(data.path, stats=stats):
        if isinstance(item, DataError):
            skip_invalid_line(item, skip_invalid=data.skip_invalid, stats=stats)
        elif item.has_assistant:
            (held_out if line_no in held_out_lines else records).append((line_no, item))
    if not records:
        raise DataError(f"data.path: {data.path} has no conversation with an assistant turn "
                        "to answer (online decode re-asks each assistant turn's prompt)")
    context = context_length(AutoConfig.from_pretrained(cfg.target.path, local_files_only=True))
    if generator is None:
        pad_id = job.tokenizer.pad_token_id
        generator = build_generator(cfg, job.sampling, job.sampling.stop_ids[0]
                                    if pad_id is None else pad_id, device=topo.device)
    rewriter = ChunkRewriter(generator, job.renderer, max_prompt_tokens=job.max_prompt_tokens,
                             stop_ids=job.sampling.stop_ids, seed=cfg.run.seed,
                             context_limit=min(context, data.max_length),
                             max_new_tokens=gen.max_new_tokens)
    encoder = AnswerEncoder(rewriter, renderer_for(data, job.tokenizer, cfg.target.path),
                            max_length=data.max_length,
                            last_assistant_turn_only=data.last_assistant_turn_only,
                            seed=cfg.run.seed,
                            keep_bytes=gen.keep_greedy_mb * 2**20 if gen.temperature == 0 else 0)
    # What decides the samples beyond the answers: how training encodes them.
    training = {"max_length": data.max_length, "last_only": data.last_assistant_turn_only,
                "kwargs": data.chat_template_kwargs, "template": encoder.renderer.template,
                "holdout": data.holdout}
    key = hashlib.sha256((job.key + json.dumps(training, sort_keys=True)).encode()).hexdigest()
    answered = answered_dataset(held_out, encoder, key + ":holdout") if held_out else None
    info = topo.info
    stream = OnlineStream(records, encoder, key=key, seed=cfg.run.seed,
                          shuffle=data.shuffle, shard_index=info.pair_index,
                          num_shards=info.num_pairs,
                          tokens_per_micro_step=data.tokens_per_micro_step,
                          chunk_records=gen.chunk_records, ahead_chunks=gen.ahead_chunks,
                          timeout_s=cfg.run.timeout_s, first_timeout_s=cfg.run.startup_timeout_s,
                          who=topo.info.name)
    log.info("online decode: %d prompts (%d held out) with the %s engine, %d-token replies "
             "at most, cut to %d tokens in all", len(records), len(held_out), generator.name,
             gen.max_new_tokens, min(context, data.max_length))
    return stream, answered
