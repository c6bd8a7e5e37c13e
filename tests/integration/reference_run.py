"""A single-process reference of colocated training: the same target forward and the same
draft step as the torchrun job, with plain tensors instead of the ring, one unsharded draft
instead of FSDP2, and torch's own grad clipping. Used by the parity test.

The loss normalization is computed here independently of the job's (engine label counts,
trainer all-reduce, loss scaling against FSDP's average): every micro-step of both pairs is
packed first, N_k is counted by a plain loop over sequences, and the step's loss is
sum_k decay^k * (CE summed over all micro-steps of all pairs) / N_k."""

import torch
from transformers import AutoConfig

from colocate.config import Config
from colocate.data import DataStream
from colocate.draft import DraftArch, Eagle3Draft, eagle3_unroll, target_distribution
from colocate.engine import build_engine, resolve_aux_layer_ids
from colocate.train.engine_loop import prepare_data
from colocate.train.schedule import lr_at
from colocate.target import load_embed_and_head, load_tokenizer


class DictWriter:
    """Stands in for a ring slot: the engine allocates plain tensors."""

    def __init__(self):
        self.tensors, self.meta = {}, {}

    def alloc(self, name, shape, dtype):
        self.tensors[name] = torch.empty(shape, dtype=dtype)
        return self.tensors[name]

    def put(self, name, tensor):
        self.alloc(name, tuple(tensor.shape), tensor.dtype).copy_(tensor)


def reference_losses(cfg: Config, num_pairs: int,
                     init_state: dict | None = None) -> tuple[list[float], list[float]]:
    """(loss, grad norm before clipping) of every optimizer step. init_state: draft weights
    to start from instead of the seeded init (a warm start)."""
    device = torch.device("cpu")
    target_config = AutoConfig.from_pretrained(cfg.target.path, local_files_only=True)
    aux = resolve_aux_layer_ids(cfg.target.aux_layer_ids, target_config.num_hidden_layers)
    tokenized, vocab, _ = prepare_data(cfg, load_tokenizer(cfg.target.path),
                                       target_config.vocab_size)
    streams = [DataStream(tokenized, seed=cfg.run.seed, shuffle=cfg.data.shuffle, shard_index=p,
                          num_shards=num_pairs,
                          tokens_per_micro_step=cfg.data.tokens_per_micro_step)
               for p in range(num_pairs)]
    engine = build_engine(cfg, device)
    embed, head = load_embed_and_head(cfg.target.path, tie_word_embeddings=False,
                                      dtype=torch.float32, device=device)
    model = Eagle3Draft(DraftArch.from_target_config(target_config, cfg.draft, len(aux)))
    model.init_weights(torch.Generator().manual_seed(cfg.run.seed))
    if init_state is not None:
        model.load_state_dict(init_state)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas,
                            weight_decay=t.weight_decay, foreach=False)
    budget = cfg.data.tokens_per_micro_step
    losses, grad_norms = [], []
    for step in range(cfg.last_step):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps,
                                max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)
        batches = [stream.next_micro_batch() for stream in streams
                   for _ in range(t.micro_steps)]
        totals = count_labels(batches, cfg.draft.unroll_steps)
        total = 0.0
        for batch in batches:
            w = DictWriter()
            engine.prefill(batch, w, budget=budget)
            f = w.tensors
            with torch.no_grad():
                target = target_distribution(f["last_hidden"], head, vocab.draft_ids)
            r = eagle3_unroll(model, embed, f["aux_hidden"], target,
                              f["input_ids"], f["loss_mask"], f["positions"],
                              batch.seq_lens.tolist(), cfg.draft.unroll_steps,
                              cfg.draft.position_decay)
            loss = sum(cfg.draft.position_decay ** k * r.ce_sum[k] / max(totals[k], 1)
                       for k in range(cfg.draft.unroll_steps))
            loss.backward()
            total += loss.item()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, grad_norms


def count_labels(batches, unroll_steps: int) -> list[int]:
    """N_k by definition: label index j = t + 2 + k of a sequence, loss-masked."""
    counts = [0] * unroll_steps
    for batch in batches:
        start = 0
        for length in batch.seq_lens.tolist():
            mask = batch.loss_mask[start:start + length].tolist()
            for k in range(unroll_steps):
                counts[k] += sum(mask[t + 2 + k] for t in range(length) if t + 2 + k < length)
            start += length
    return counts
