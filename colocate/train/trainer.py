"""Trainer rank: learns the draft (the run's recipe: Eagle3 or DFlash) from the features its engine streams through the ring.

The trainer holds no dataset: the engine sends the draft vocabulary (`plan`) and then one
packed micro-step per ring message; the trainer answers `start` with where to begin (step
and data position from its checkpoint), so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from colocate.bench.hooks import trainer_work
from colocate.config import Config, ConfigError, TrainSection
from colocate.draft.recipe import DraftRecipe, FrozenTarget, recipe_for
from colocate.engine import resolve_target_dtype
from colocate.exit_codes import Interrupted
from colocate.hostcopy import to_device
from colocate.metrics import MetricsLog, colocated_flops_per_token, counts_both_flops, peak_flops
from colocate.progress import PhaseTimer, Progress, peak_gib
from colocate.topology import Topology
from colocate.trackers import open_trackers
from colocate.train import checkpoint as ckpt
from colocate.train import agreement, faults, signals
from colocate.train.health import NonFiniteGuard
from colocate.train.pair_session import PairSession
from colocate.train.schedule import lr_at, validates_after
from colocate.target import dummy_embed_and_head, load_embed_and_head
from colocate.train.warm_start import apply_init_weights, load_init_weights
from colocate.transport import PeerError

log = logging.getLogger(__name__)


def vocab_sha(d2t: torch.Tensor) -> str:
    return hashlib.sha256(d2t.cpu().numpy().tobytes()).hexdigest()[:16]


def clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` in place so their global `norm` is at most `max_norm` (0: no clipping);
    zero them when `norm` is not finite. Decided on the device: no host sync."""
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0) if max_norm else torch.ones_like(norm)
    scale = torch.where(torch.isfinite(norm), scale, torch.zeros_like(scale))
    torch._foreach_mul_(grads, scale)
    for g in grads:  # inf * 0 is nan: clear what the zero scale could not
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def micro_step(recipe: DraftRecipe, model: torch.nn.Module, frozen: FrozenTarget,
               feats: dict[str, torch.Tensor], meta: dict, *,
               label_totals: torch.Tensor | None, num_trainers: int, last: bool,
               timer: PhaseTimer) -> torch.Tensor:
    """Forward and backward of one micro-step; returns its stats vector (on the device).

    With `label_totals` the optimizer step's N_k (all micro-steps, all trainers), the loss
    is this micro-step's share of the step's per-token loss, so the gradients of every
    micro-step on every trainer add up to the gradient of that loss. FSDP2 averages
    gradients over the trainers (it divides their sum by the count), so the loss is scaled
    by `num_trainers` to undo that: the same on every torch version, where FSDP's own divide
    factor setting is not. Gradients are reduced across trainers only on the `last`
    micro-step of an optimizer step.
    """
    model.set_requires_gradient_sync(last)
    result = recipe.forward(model, frozen, feats, meta, label_totals=label_totals, timer=timer)
    timer.mark("forward")
    (result.loss * num_trainers).backward()
    if last:  # the step's weights change now: the next forward gathers the new ones
        reshard(model)
    timer.mark("backward")
    return result.stats()


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    """The draft's FSDP2 units (the recipe's `shard` decides them)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard(model: torch.nn.Module) -> None:
    for unit in fsdp_units(model):
        unit.reshard()


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, group,
                  max_norm: float, guard: NonFiniteGuard, step: int,
                  first_trainer: bool) -> torch.Tensor:
    """Global grad-norm clip over the trainer `group`, then the optimizer step; returns the norm.

    Shards of an FSDP2 gradient are disjoint, so the global squared norm is the sum of the
    local ones. A non-finite norm skips the optimizer step on every trainer (`guard`, see
    health.py); the logged grad_norm shows inf/nan for such a step.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    guard.inject(step, local, first_trainer)
    sq = torch.stack([x.float().pow(2).sum() for x in local]).sum()
    dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    clip_(local, norm, max_norm)
    guard.step(optimizer, norm, step)
    optimizer.zero_grad(set_to_none=True)
    return norm


def build_sharded_draft(recipe: DraftRecipe, target_config, draft_vocab_size: int,
                        layer_ids: list[int], mesh, dtype: torch.dtype, device: torch.device,
                        init: tuple[dict, str] | None = None):
    """(arch, the draft initialised identically on every trainer and sharded over `mesh`:
    FSDP2, float32 master weights, `dtype` compute). init: (tensors, path) of a warm start,
    loaded before sharding, so every trainer keeps its shard of the same full weights with
    no collective."""
    arch, model = recipe.build_model(target_config, draft_vocab_size, layer_ids)
    if init is not None:
        apply_init_weights(model, *init)
    model.to(device)
    recipe.shard(model, mesh, MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    # The unroll calls the same layers several times per micro-step; resharding after each
    # call's backward would all-gather them again for the next one back (unroll - 1 extra
    # all-gathers per micro-step, on every micro-step). Gathered once per optimizer step
    # instead: kept until `micro_step` reshards after the step's last backward.
    model.set_reshard_after_backward(False)
    return arch, model


def make_optimizer(model: torch.nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (one launch for all parameters, not ~10 per step)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas,
                             weight_decay=t.weight_decay, fused=on_cuda or None,
                             foreach=False if on_cuda else None)


class DraftTrainer:
    def __init__(self, cfg: Config, topo: Topology, session: PairSession, *, target_config,
                 aux_layer_ids: list[int], evals=None):
        """evals: the first trainer's `ServedEvals` for eval.every_steps (None elsewhere)."""
        self.cfg, self.topo, self.session = cfg, topo, session
        self.target_config, self.aux_layer_ids, self.evals = target_config, aux_layer_ids, evals
        self.recipe = recipe = recipe_for(cfg)
        device = topo.device
        dtype = resolve_target_dtype(cfg.target.dtype, device)  # draft compute dtype

        # 1. The engine's plan: the draft vocabulary it built from the data.
        plan = session.receive_plan()
        self.vocab = {"d2t": plan["d2t"], "t2d": plan["t2d"]}
        self.vocab_sha = vocab_sha(plan["d2t"])
        draft_ids = plan["draft_ids"].to(device)
        if cfg.train.epochs:  # the engines counted the steps of train.epochs in the data
            cfg.train.resolve_epochs(plan["total_steps"])
            signals.RUN.last_step = cfg.last_step
        if topo.is_first:
            log.info("data: %s", plan["stats_line"])
            if plan["epochs_line"]:
                log.info("%s", plan["epochs_line"])
        # Every trainer must train the same thing: same config, data and vocabulary (a node
        # with another copy of the data would otherwise train silently on something else).
        agreement.check_trainers_agree(cfg, group=topo.role_cpu_group, rank=topo.info.rank,
                                       node=topo.nodes[topo.info.rank], data_key=plan["data_key"],
                                       vocab_sha=self.vocab_sha)

        # 2. Frozen target tensors: input embedding for the draft, lm_head for the teacher.
        if cfg.target.load_format == "dummy":
            embed, lm_head = dummy_embed_and_head(
                target_config.vocab_size, target_config.hidden_size, seed=cfg.run.seed,
                dtype=dtype, device=device)
        else:
            embed, lm_head = load_embed_and_head(
                cfg.target.path, tie_word_embeddings=bool(getattr(target_config,
                                                                  "tie_word_embeddings", False)),
                dtype=dtype, device=device)
        self.frozen = FrozenTarget(embed=embed, lm_head=lm_head, draft_ids=draft_ids)
        recipe.bind_frozen(self.frozen)

        # 3. The draft, sharded over trainers. The plan's vocabulary is already clamped to
        # the target's (and warned about once). draft.init_from: its weights, unless this
        # run resumes its own checkpoint (which replaces them below).
        init, resume_path = None, ckpt.find_resume(cfg.run.dir, cfg.checkpoint.resume)
        if cfg.draft.init_from and not resume_path:
            init = (load_init_weights(cfg, recipe, self.vocab), cfg.draft.init_from)
            if topo.is_first:
                log.info("draft.init_from: starting from the weights of %s", cfg.draft.init_from)
        elif cfg.draft.init_from and topo.is_first:
            log.warning("draft.init_from=%s ignored: resuming from %s, whose weights are newer",
                        cfg.draft.init_from, resume_path)
        self.arch, self.model = build_sharded_draft(
            recipe, target_config, len(draft_ids), aux_layer_ids, topo.trainer_mesh(), dtype,
            device, init=init)
        model = self.model
        if topo.sp_group is not None:  # Eagle3's all-to-all, DFlash's context gather
            model.use_sequence_parallel(topo.sp_group)
        self.num_trainers = dist.get_world_size(topo.role_group)  # FSDP2 averages over these

        # 4. AdamW over float32 master weights.
        t = cfg.train
        self.optimizer = make_optimizer(model, cfg.train)

        # 5. Resume: model, optimizer and where the data stream stood.
        self.start_step, data_state, path = 0, None, resume_path
        if path:
            meta = ckpt.load_checkpoint(path, model, self.optimizer, group=topo.role_cpu_group,
                                        role_rank=topo.role_rank)
            if meta.vocab_sha != self.vocab_sha:
                raise ConfigError(f"checkpoint {path} was trained with another draft vocabulary "
                                 "(data or tokenizer changed); use checkpoint.resume=never or "
                                 "a new run.dir")
            self.start_step = meta.step
            if len(meta.data_states) != topo.info.num_pairs:
                raise ConfigError(
                    f"checkpoint {path} was written by {len(meta.data_states)} trainer/engine "
                    f"pair(s), this run has {topo.info.num_pairs}: the data positions are per "
                    "pair; resume with the same GPU count, or start fresh with "
                    "checkpoint.resume=never (or a new run.dir)")
            data_state = meta.data_states[topo.info.pair_index]
            if topo.is_first:
                log.info("resumed from %s at step %d", path, meta.step)
        self.data_state = data_state
        session.send_start(start_step=self.start_step, data_state=data_state)

        # 6. The ring: open the engine's slots; check every message against what we need.
        needs = recipe.feature_needs(target_config.hidden_size, len(aux_layer_ids), dtype)
        self.ring = session.open_consumer(device=device, needs=needs)

        self.progress = Progress(enabled=topo.is_first, max_steps=cfg.last_step,
                                 micro_steps=t.micro_steps, every_s=t.log_every_s)
        # 7. Trackers (metrics.report_to): the first trainer writes every row.
        trackers = open_trackers(cfg, resumed_at=self.start_step) if topo.is_first else None
        peak, flops = None, None
        if topo.is_first and device.type == "cuda" and counts_both_flops(cfg):
            peak = peak_flops(torch.cuda.get_device_name(device))
            flops = colocated_flops_per_token(cfg, target_config)["both"] if peak else None
        self.metrics = MetricsLog(trackers, group=topo.role_group, device=device,
                                  num_pairs=topo.info.num_pairs, summarize=recipe.summary,
                                  flush_every_s=t.log_every_s, peak=peak, flops_per_token=flops)

    # ------------------------------------------------------------------ the loop
    def step_label_totals(self, meta: dict) -> torch.Tensor:
        """N_k of the optimizer step: the totals this pair's engine packed for the step (in
        every message's meta), summed over the trainers; divided by train.sp_size, as the
        engines of a sequence-parallel group count the same micro-batches. A tiny
        all-reduce on the device: no host sync."""
        totals = to_device(torch.tensor(meta["step_label_counts"], dtype=torch.int64),
                           self.topo.device)
        dist.all_reduce(totals, group=self.topo.role_group)
        return totals // self.topo.sp_size if self.topo.sp_size > 1 else totals

    def train(self) -> None:
        t = self.cfg.train
        work = trainer_work(self.cfg.bench, self, self.recipe.num_positions, self.topo.device)
        # Step-time breakdown of the first trainer (the one that writes metrics.jsonl).
        self.timer = PhaseTimer(self.topo.device, enabled=self.topo.is_first)
        self.timer.mark("start")
        self.guard = NonFiniteGuard(t.max_nonfinite_steps, self.topo.device)
        signals.RUN.step = self.start_step
        for step in range(self.start_step, self.cfg.last_step):
            lr = lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.total_steps,
                       min_lr_ratio=t.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            step_start = time.monotonic()
            sums, tokens, engine_wait = None, 0, 0.0
            for micro in range(t.micro_steps):
                delivery = self.ring.receive()
                self.timer.mark("receive")  # GPU time: includes the wait for the slot's data
                if delivery is None:
                    raise PeerError(f"{self.session.rank_name}: the engine ended the stream at "
                                    f"step {step} micro-step {micro}, before the last step")
                with delivery:
                    stats = work.learn(delivery, micro, last=micro == t.micro_steps - 1)
                    tokens += delivery.meta["num_tokens"]
                    engine_wait = delivery.meta["engine_wait_s"]
                    engine_peak = delivery.meta["engine_peak_gib"]
                    delivery_meta = delivery.meta
                    self.data_state = delivery.meta["data_state"]
                sums = stats if sums is None else sums + stats
                self.progress.micro(step, micro, step_tokens=tokens,
                                    trainer_wait_s=self.ring.stats.wait_s,
                                    engine_wait_s=engine_wait)
            grad_norm = work.optimizer_step(step)
            self.timer.mark("optimizer")
            validate = validates_after(step, every=t.val_every_steps, last_step=self.cfg.last_step)
            val_stats = self.validate(step) if validate else None
            self.metrics.record(step, sums, grad_norm, val_stats=val_stats, lr=lr, tokens=tokens,
                                seconds=time.monotonic() - step_start,
                                trainer_wait_s=self.ring.stats.wait_s, engine_wait_s=engine_wait,
                                handoff_s=self.ring.stats.handoff_s,
                                engine_prefill_s=delivery_meta.get("engine_prefill_s", 0.0),
                                engine_clock_s=delivery_meta.get("engine_clock_s", 0.0),
                                step_ids_crc32=delivery_meta["step_ids_crc32"],
                                **{k: v for k, v in delivery_meta.items()
                                   if k.startswith("decode_")},
                                phases=self.timer.take(),
                                trainer_peak_gib=peak_gib(self.topo.device),
                                engine_peak_gib=engine_peak)
            if validate:
                self.metrics.flush()  # a sync on the first trainer, on validation steps only
                self.progress.validation(self.metrics.last)
            self.progress.step_done(step, self.metrics.last, tokens)
            self.session.enter_steady_state()  # after the first step: tighten every wait
            every = self.cfg.checkpoint.every_steps
            saved = bool(every and (step + 1) % every == 0 and step + 1 < self.cfg.last_step)
            if saved:
                self.save(step + 1)
            self.served_eval(step)
            signals.RUN.step = step + 1
            if step + 1 < self.cfg.last_step and signals.STOP.agreed(self.topo.role_cpu_group):
                self.stop_early(step + 1, saved=saved)
        self.guard.finish()
        if self.cfg.last_step > self.start_step:
            self.save(self.cfg.last_step)
        self.progress.finish(self.metrics.last)

    def learn(self, delivery, micro: int, last: bool) -> torch.Tensor:
        """Forward and backward of one delivered micro-step (`train`'s work unless a bench
        hook stands in: colocate/bench/hooks.py); its stats vector."""
        if micro == 0:
            self._label_totals = self.step_label_totals(delivery.meta)
        return micro_step(self.recipe, self.model, self.frozen, delivery.tensors, delivery.meta,
                          label_totals=self._label_totals, num_trainers=self.num_trainers,
                          last=last, timer=self.timer)

    def optimizer_step(self, step: int) -> torch.Tensor:
        """Clip and step (health.py's guard may skip it); the gradient norm."""
        return clip_and_step(self.model, self.optimizer, self.topo.role_group,
                             self.cfg.train.grad_clip, self.guard, step, self.topo.is_first)

    def stop_early(self, step: int, *, saved: bool) -> None:
        """A stop signal (signals.py): checkpoint at this step boundary, end the engine's
        stream, leave with `Interrupted` (every trainer does this at the same step)."""
        if not saved:
            self.save(step)
        how = signals.STOP.signal_name
        self.ring.stop(step, reason=f"stopped by {how}")
        raise Interrupted(f"stopped by {how} (checkpoint written)")

    def validate(self, step: int) -> torch.Tensor:
        """Forward-only stats (summed) of this pair's held-out micro-steps, which the engine
        sends right after the step's last micro-step.

        The sharded draft is gathered first, explicitly, on every trainer at once: then the
        forwards below run no collective across pairs, so pairs may hold different numbers
        of held-out micro-steps (with train.sp_size > 1 they run the all-to-alls of their
        SP group, whose pairs hold the same held-out micro-steps). The draft stays gathered
        (as after any training forward) until it is resharded: after the next optimizer
        step's last backward, or by a checkpoint or export's state dict before that."""
        for unit in fsdp_units(self.model):
            unit.unshard()
        sums = None
        with torch.no_grad():
            while True:
                delivery = self.ring.receive()
                if delivery is None or delivery.meta.get("split") != "val":
                    raise PeerError(f"{self.session.rank_name}: expected the held-out micro-steps "
                                    f"after step {step + 1}; the engine sent "
                                    f"{'the end' if delivery is None else 'a training one'}")
                with delivery:
                    stats = self.recipe.forward(self.model, self.frozen, delivery.tensors,
                                                delivery.meta).stats()
                    last = delivery.meta["val_last"]
                sums = stats if sums is None else sums + stats
                if last:
                    return sums

    def served_eval(self, step: int) -> None:
        """eval.every_steps: export the draft (every trainer takes part in the gather) and
        start its served evaluation in the background; report the ones that finished."""
        every = self.cfg.eval.every_steps
        if every and (step + 1) % every == 0 and step + 1 < self.cfg.last_step:
            out = self.export(os.path.join(self.cfg.run.dir, "evals", f"step_{step + 1:08d}",
                                           "export"))
            if self.evals is not None:
                self.evals.launch(step + 1, out)
        if self.evals is not None:
            self.evals.poll()

    def export(self, out_dir: str) -> str | None:
        """Write the draft in the layout sglang serves it from into `out_dir` (on the first
        trainer; returns it there, None elsewhere). Every trainer gathers the full weights."""
        with self.session.long_pause(f"export to {out_dir}"):
            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        if not self.topo.is_first:
            return None
        return self.recipe.export(full, self.arch, vocab=self.vocab,
                                  layer_ids=self.aux_layer_ids, target_config=self.target_config,
                                  out_dir=out_dir)

    def save(self, step: int) -> None:
        with self.session.long_pause(f"checkpoint at step {step}"):
            self._save(step)

    def _save(self, step: int) -> None:
        # Rows up to the checkpoint on disk first: a resume keeps those and writes the rest.
        self.metrics.flush()
        faults.slow_checkpoint(step)
        ckpt.save_checkpoint(self.cfg.run.dir, step, self.model, self.optimizer,
                             data_state=self.data_state, vocab=self.vocab,
                             vocab_sha=self.vocab_sha, group=self.topo.role_cpu_group,
                             is_first=self.topo.is_first, keep_last=self.cfg.checkpoint.keep_last,
                             total_steps=self.cfg.train.total_steps, epochs=self.cfg.train.epochs)

    def close(self) -> None:
        # The engine sends `end` after its last micro-step; release our side of the ring.
        if self.ring.receive() is not None:
            raise PeerError(f"{self.session.rank_name}: the engine sent more micro-steps than "
                            f"{self.cfg.last_step} steps need")
        self.ring.close()
        self.metrics.close()
