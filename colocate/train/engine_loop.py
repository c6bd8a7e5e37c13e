"""Engine rank: owns its pair's data and runs the target's prefill into the ring.

Order (the trainer mirrors it in trainer.py):
  1. tokenize the data (the first engine builds the cache, the others then read it) and
     build the draft vocabulary from loss-masked token frequencies;
  2. load the target (before the trainer allocates its draft, so the engine sizes its
     memory first); with data.source=generate, also the answering engine (online decode,
     colocate/generate/online.py), which answers the held-out prompts before anything else;
  3. send `plan` (vocabulary, data counts); receive `start` (step and data position);
  4. produce (last step - start step) * micro_steps packed micro-steps, then `end`. The
     micro-batches of an optimizer step are packed together before its first prefill
     (`pack_step`), so every message can carry the step's loss denominators. After each
     step that validates (`validates_after`), this pair's held-out micro-steps follow,
     marked split="val" (the last one val_last=True); the trainer runs them forward only.
"""

from __future__ import annotations

import logging
import os
import time
import zlib

import torch
import torch.distributed as dist

from colocate.bench.hooks import engine_feed
from colocate.config import Config
from colocate.data import (DataError, DataStream, TokenizedDataset, load_or_build_tokenized,
                           load_or_build_vocab)
from colocate.data.packing import MicroBatch, pack_once
from colocate.draft.recipe import DraftRecipe, StepKey, recipe_for
from colocate.engine import build_engine
from colocate.sequence_parallel import SpChunk
from colocate.topology import Topology
from colocate.progress import BusyClock, peak_gib
from colocate.target import load_tokenizer
from colocate.train.pair_session import PairSession
from colocate.train.schedule import validates_after

log = logging.getLogger(__name__)


def default_cache_dir(cfg: Config) -> str:
    return cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.run.dir)),
                                              ".cache")


def prepare_data(cfg: Config, tokenizer, target_vocab_size: int):
    """Tokenized training data + draft vocabulary (both cached on disk), and the tokenized
    held-out split (cached too) when data.holdout > 0, else None.

    Online decode (data.source=generate) takes only the vocabulary from here: the target's
    answers do not exist before training, so it is chosen from data.path's own replies."""
    cache_dir = default_cache_dir(cfg)
    tokenized = load_or_build_tokenized(cfg.data, tokenizer, cfg.target.path, cache_dir)
    vocab = load_or_build_vocab(tokenized, cfg.draft.draft_vocab_size, target_vocab_size,
                                cache_dir)
    held_out = None
    if cfg.data.holdout and cfg.data.source == "dataset":
        held_out = load_or_build_tokenized(cfg.data, tokenizer, cfg.target.path, cache_dir,
                                           split="holdout")
    return tokenized, vocab, held_out


def pack_step(stream: DataStream, num_micro_steps: int, recipe: DraftRecipe, *, seed: int,
              step: int, shard: int) -> list[tuple[MicroBatch, dict]]:
    """The next optimizer step's micro-batches, each with its message meta.

    Packed up front (host work only) because the trainer's loss divides by N_k, the counted
    positions of each draft position over the whole step, before its first backward. Meta:
    seq_lens; data_state, the stream's position right after this micro-batch (a checkpoint
    taken after it resumes with the next one); label_counts, this micro-batch's counts;
    step_label_counts, this pair's totals for the step (trainers sum them over pairs);
    step_ids_crc32, a fingerprint of the step's tokens (the first pair's lands in
    metrics.jsonl: two runs trained on the same tokens show the same column); online
    decode's running totals; and whatever the draft recipe plans for the micro-batch
    (DFlash: its anchors, drawn from (seed, step, micro-step, data shard), so a resumed run
    and the pairs of a sequence-parallel group draw the same).
    """
    batches = [stream.next_micro_batch() for _ in range(num_micro_steps)]
    plans = [recipe.plan_batch(b, StepKey(seed=seed, step=step, micro=i, shard=shard))
             for i, b in enumerate(batches)]
    totals = torch.stack([counts for _, counts in plans]).sum(0).tolist()
    crc = 0
    for b in batches:
        crc = zlib.crc32(b.input_ids.numpy().tobytes(), crc)
    stream_state = stream.state()  # identity and position after the last micro-batch
    shared = dict(step_label_counts=totals, step_ids_crc32=crc, **stream.decode_meta())
    return [(b, dict(seq_lens=b.seq_lens.tolist(), data_state={**stream_state, **b.end_state},
                     label_counts=counts.tolist(), **shared, **extra))
            for b, (extra, counts) in zip(batches, plans)]


def validation_batches(held_out: TokenizedDataset, topo: Topology,
                       tokens_per_micro_step: int) -> list[MicroBatch]:
    """This pair's share of the held-out conversations (every num_dp-th one: the pairs of a
    sequence-parallel group share theirs), packed once.

    Every pair must get at least one: each trainer's validation pass starts with the same
    collective (gathering the sharded draft), so a trainer without held-out data would
    leave the others waiting."""
    if held_out.num_sequences < topo.num_dp:
        raise DataError(f"data.holdout: {held_out.num_sequences} usable held-out "
                        f"conversation(s) for {topo.num_dp} data shards (trainer/engine pairs "
                        "/ train.sp_size); validation needs one per shard at least: raise "
                        "data.holdout")
    indices = list(range(topo.dp_index, held_out.num_sequences, topo.num_dp))
    return pack_once(held_out, indices, tokens_per_micro_step)


def run_engine(cfg: Config, topo: Topology, session: PairSession, *, target_config) -> None:
    info = topo.info

    # 1. Data and vocabulary. The first engine tokenizes; the rest wait on the engine group
    #    and then hit the cache (a gloo barrier among engines only).
    tokenizer = load_tokenizer(cfg.target.path)
    if topo.is_first:
        tokenized, vocab, held_out = prepare_data(cfg, tokenizer, target_config.vocab_size)
        log.info("data: %s", tokenized.stats.format())
    dist.barrier(group=topo.role_cpu_group)
    if not topo.is_first:
        tokenized, vocab, held_out = prepare_data(cfg, tokenizer, target_config.vocab_size)
    stream, total_steps, epochs_line = None, cfg.train.max_steps, ""
    if cfg.data.source == "dataset":
        stream = DataStream(tokenized, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                            shard_index=topo.dp_index, num_shards=topo.num_dp,
                            tokens_per_micro_step=cfg.data.tokens_per_micro_step)
        if cfg.train.epochs:  # the step count of train.epochs, agreed by every engine
            from colocate.train.epochs import plan_epochs

            epochs = plan_epochs(tokenized.lengths().tolist(), stream.sampler,
                                 tokens_per_micro_step=cfg.data.tokens_per_micro_step,
                                 epochs=cfg.train.epochs, micro_steps=cfg.train.micro_steps,
                                 engine_group=topo.role_cpu_group)
            total_steps, epochs_line = epochs.total_steps, epochs.describe()

    # 2. The target model, under the engine's memory cap; online decode's answering
    #    engine beside it (and the held-out answers, answered once now).
    if topo.device.type == "cuda" and cfg.mps.engine_mem_fraction > 0:
        torch.cuda.set_per_process_memory_fraction(cfg.mps.engine_mem_fraction, topo.device)
    engine = build_engine(cfg, topo.device)
    recipe = recipe_for(cfg)
    stats_line = tokenized.stats.format()
    if cfg.data.source == "generate":
        from colocate.generate.online import build_online_stream

        stream, held_out = build_online_stream(cfg, topo)
        stats_line = (f"online decode of {len(stream.records):,} prompts per epoch (draft "
                      f"vocabulary from data.path's own replies: {stats_line})")
    try:
        _stream_to_trainer(cfg, topo, session, engine, recipe, stream, held_out, vocab,
                           dict(stats_line=stats_line, total_steps=total_steps,
                                epochs_line=epochs_line, data_key=stream.key))
    finally:
        stream.close()


def _stream_to_trainer(cfg: Config, topo: Topology, session: PairSession, engine, recipe,
                       stream, held_out, vocab, plan: dict) -> None:
    info = topo.info
    val_batches = (validation_batches(held_out, topo, cfg.data.tokens_per_micro_step)
                   if cfg.train.val_every_steps else [])

    # 3. Tell the trainer what it trains against; learn where to start.
    session.send_plan(d2t=vocab.d2t, t2d=vocab.t2d, draft_ids=vocab.draft_ids, **plan)
    if cfg.train.epochs:  # after the plan: a stop_at_step past the end is the trainer's to say
        cfg.train.resolve_epochs(plan["total_steps"])
    start = session.receive_start()
    if start["data_state"] is not None:
        stream.load_state(start["data_state"])
    if cfg.data.source == "generate":
        stream.start()  # decodes from the position training resumes at

    # 4. Stream micro-steps through the ring: each optimizer step's micro-steps, then, after
    #    the steps that validate, this pair's held-out micro-steps (forward only).
    budget = cfg.data.tokens_per_micro_step
    # train.sp_size > 1: this pair's trainer gets its chunk of every micro-batch.
    chunk = SpChunk(topo.sp_rank, topo.sp_size, recipe.sp_halo) if topo.sp_size > 1 else None
    ring = session.open_producer(num_slots=cfg.transport.num_slots,
                                 slot_bytes=engine.slot_bytes(budget, budget, chunk),
                                 device=topo.device,
                                 name=f"colocate-{topo.job_token}-pair{info.pair_index}")
    feed = engine_feed(cfg.bench)  # a run prefills every micro-step; bench hooks may not
    busy = BusyClock(topo.device)  # prefill time, read without syncing the engine's stream
    clock_start = time.monotonic()  # the engine's own timeline, for its wait/prefill shares
    num_sent = 0

    def send(batch: MicroBatch | None, meta: dict) -> None:
        """One ring message: `batch` prefilled (None: the feed fills it without the target)."""
        nonlocal num_sent
        writer = ring.acquire()
        if batch is None:
            feed.replay_into(writer)
        else:
            writer.meta.update(meta)  # first: a chunked prefill pads its seq_lens
            busy.begin()
            engine.prefill(batch, writer, budget=budget, chunk=chunk)
            busy.end()
            feed.after_prefill(writer)
        writer.meta.update(engine_wait_s=ring.stats.wait_s, engine_peak_gib=peak_gib(topo.device),
                           engine_prefill_s=busy.read(),
                           engine_clock_s=time.monotonic() - clock_start)
        ring.publish(writer)
        num_sent += 1
        if num_sent == cfg.train.micro_steps + cfg.transport.num_slots + 1:
            # The trainer finished its first optimizer step: start-up is over.
            session.enter_steady_state()

    for step in range(start["start_step"], cfg.last_step):
        def pack(step: int = step):
            return pack_step(stream, cfg.train.micro_steps, recipe, seed=cfg.run.seed,
                             step=step, shard=topo.dp_index)

        for batch, meta in feed.step_batches(pack, cfg.train.micro_steps):
            send(batch, meta)
        if validates_after(step, every=cfg.train.val_every_steps, last_step=cfg.last_step):
            for i, batch in enumerate(val_batches):
                # Held-out anchors are drawn once per batch (step -1): every validation
                # scores the same positions, so its numbers compare across steps.
                extra, _ = recipe.plan_batch(batch, StepKey(seed=cfg.run.seed, step=-1, micro=i,
                                                            shard=topo.dp_index))
                send(batch, dict(split="val", val_last=i == len(val_batches) - 1,
                                 seq_lens=batch.seq_lens.tolist(), **extra))
    ring.close()
