"""The engine interface: turn one packed micro-batch into the features the draft learns from.

An engine rank runs the target model's prefill on a `MicroBatch` and writes, into one ring
slot, everything its trainer needs (the wire format, `transport.layout.feature_needs`, which
the draft recipe's `feature_needs` returns and the engine writes):

    input_ids    int64 [T]              the packed tokens
    positions    int64 [T]              position within its own sequence
    loss_mask    bool  [T]              trainable tokens
    seq_lens     int32 [S]              lengths of the S packed sequences (sum T)
    aux_hidden   dtype [T, num_aux * H] outputs of layers `aux_layer_ids`, concatenated in
                                        that order (Eagle3's `fc` input)
    last_hidden  dtype [T, H]           the final norm's output (the trainer applies lm_head);
                                        only when the recipe needs it (Eagle3's teacher)

`TargetEngine.prefill` owns the checks and the slot layout; a backend only implements
`_forward`, which fills the two hidden-state views in place on the device.

Layer-id convention (mind it when adding backends): aux layer `i` means the OUTPUT of decoder
layer `i` (0-based; the residual stream after the layer), i.e. transformers'
`hidden_states[i + 1]`. A forward hook on layer `i` (the hf backend) captures exactly that.
sglang instead captures the INPUT of layer `i + 1` (hidden + residual at that layer's start),
which is the same tensor: its `set_eagle3_layers_to_capture(ids)` takes ids in our convention
and adds the one itself (its default [2, L//2, L-3] is our [1, L//2-1, L-4] shifted), and
the exported draft's `eagle_aux_hidden_state_layer_ids` uses our convention too. So the
sglang backend must pass `aux_layer_ids` through unchanged, never add one again, and a test
must compare its features with the hf backend's from the same weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from colocate.data.packing import MicroBatch, positions_from_lens
from colocate.hostcopy import to_device
from colocate.sequence_parallel import HALO_FEATURES, SpChunk, chunk_features, chunk_rows
from colocate.transport.layout import HALO_DIM, Need, concrete_shapes, feature_needs
from colocate.transport.ring import SlotWriter, layout_bytes

FEATURE_NAMES = tuple(feature_needs(1, 1, torch.float32, last_hidden=True))
"""Tensors of one ring message, in the order the engine writes them."""

# --------------------------------------------------------------------------- aux layer ids


def resolve_aux_layer_ids(configured: list[int] | None, num_layers: int,
                          default: Callable[[int], list[int]] | None = None) -> list[int]:
    """`configured` checked against the target's depth, or `default(num_layers)` when None
    (the draft recipe's choice; Eagle3's [1, L//2-1, L-4] when no recipe is given).

    Valid ids are 0..L-2: the output of the last layer (L-1) is the final norm's input, and
    the draft already receives the final norm's output as `last_hidden`."""
    if configured is None:
        if default is None:
            from colocate.draft.eagle3_recipe import eagle3_layer_ids as default
        return default(num_layers)
    ids = [int(i) for i in configured]
    if not ids:
        raise ValueError("target.aux_layer_ids: empty; give at least one layer id, or leave it "
                         "null for the draft method's default")
    bad = [i for i in ids if not 0 <= i <= num_layers - 2]
    if bad:
        raise ValueError(
            f"target.aux_layer_ids: {bad} out of range for a target with {num_layers} decoder "
            f"layers; valid ids are 0..{num_layers - 2} (0-based layer outputs; the last layer "
            f"{num_layers - 1} is excluded because its output is the final norm's input, which "
            f"the draft gets normalised as last_hidden). Fix the ids, or leave the key null for "
            f"the draft method's default")
    return ids


# --------------------------------------------------------------------------- interface


class TargetEngine(ABC):
    """One small interface for every backend; `prefill` is the only entry point callers use."""

    _needs: dict[str, Need] | None = None  # set by `use_needs`

    def use_needs(self, needs: dict[str, Need]) -> None:
        """Write exactly the tensors of `needs` (the run's draft recipe's `feature_needs`):
        e.g. no `last_hidden` for DFlash, which saves a sixth of its slot bytes."""
        self._needs = needs

    @property
    def needs(self) -> dict[str, Need]:
        """What `prefill` writes: the recipe's needs, or (an engine built on its own) every
        feature, halo features sized for sequence-parallel chunks."""
        if self._needs is None:
            self._needs = feature_needs(self.hidden_size, self.num_aux, self.dtype,
                                        last_hidden=True, halo_features=HALO_FEATURES)
        return self._needs

    # Backends set these six in __init__; callers read them through the properties below.
    _hidden_size: int
    _num_layers: int
    _vocab_size: int
    _aux_layer_ids: list[int]
    _dtype: torch.dtype
    _device: torch.device

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def aux_layer_ids(self) -> list[int]:
        return list(self._aux_layer_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def device(self) -> torch.device:
        return self._device

    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 aux_out: torch.Tensor, last_out: torch.Tensor | None) -> None:
        """Backend hook: run the target on the packed batch (all arguments on `self.device`)
        and fill `aux_out` [T, num_aux * H] and `last_out` [T, H] (when not None) in place,
        without a host round trip. The inputs are already checked."""

    # ------------------------------------------------------------------ derived

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    def _shapes(self, num_tokens: int, num_sequences: int, rows_with_halo: int | None = None
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Concrete shapes of `needs`; `rows_with_halo`: a sequence-parallel chunk's halo
        features (None: no halo, they have num_tokens rows like the rest)."""
        return concrete_shapes(self.needs, {"T": num_tokens, "S": num_sequences,
                                            HALO_DIM: rows_with_halo or num_tokens})

    def slot_bytes(self, tokens_per_micro_step: int, max_sequences: int,
                   chunk: SpChunk | None = None) -> int:
        """Bytes of a ring slot that holds any micro-batch within the budget (every tensor's
        offset is aligned, so the total does not depend on the order of the writes); with
        `chunk`, its sequence-parallel chunk of one (plus the padding sequence)."""
        if chunk is None:
            return layout_bytes(list(self._shapes(tokens_per_micro_step, max_sequences).values()))
        rows, rows_with_halo = chunk.max_rows(tokens_per_micro_step)
        return layout_bytes(list(self._shapes(rows, max_sequences + 1, rows_with_halo).values()))

    # ------------------------------------------------------------------ public entry point

    def prefill(self, batch: MicroBatch, writer: SlotWriter, *, budget: int,
                chunk: SpChunk | None = None) -> None:
        """Check `batch`, write it and the target's features into `writer`'s slot (with
        `chunk`: the whole batch prefilled, its sequence-parallel chunk written).

        Ordered on the current stream: the H2D copies of the ids, the forward that reads
        them from the slot, and the writes of the features; the caller publishes after."""
        if chunk is not None:
            return self._prefill_chunk(batch, writer, budget, chunk)
        num_tokens, num_sequences = self._check(batch, budget)
        shapes = self._shapes(num_tokens, num_sequences)
        on_device: dict[str, torch.Tensor] = {}
        for name, src in (("input_ids", batch.input_ids), ("positions", batch.positions),
                          ("loss_mask", batch.loss_mask), ("seq_lens", batch.seq_lens)):
            view = writer.alloc(name, *shapes[name])
            # non_blocking: asynchronous from pinned memory; from pageable memory the copy
            # is staged and still correct. The forward reads the slot copy, so the ids cross
            # the bus once.
            view.copy_(src.reshape(view.shape), non_blocking=True)
            on_device[name] = view
        aux_out = writer.alloc("aux_hidden", *shapes["aux_hidden"])
        last_out = (writer.alloc("last_hidden", *shapes["last_hidden"])
                    if "last_hidden" in shapes else None)
        with torch.no_grad():
            self._forward(on_device["input_ids"], on_device["positions"], on_device["seq_lens"],
                          aux_out, last_out)
        writer.meta.update(num_tokens=num_tokens, num_sequences=num_sequences,
                           aux_layer_ids=list(self.aux_layer_ids))

    def _prefill_chunk(self, batch: MicroBatch, writer: SlotWriter, budget: int,
                       chunk: SpChunk) -> None:
        """The whole batch through the target, then this rank's chunk (and halo) of every
        per-token tensor into the slot; seq_lens whole, with the padding sequence (see
        colocate/sequence_parallel.py). The hidden states of the whole batch live only
        for this call."""
        num_tokens, num_sequences = self._check(batch, budget)
        host = {"input_ids": batch.input_ids, "positions": batch.positions,
                "loss_mask": batch.loss_mask, "seq_lens": batch.seq_lens}
        # The bookkeeping rows first, before the forward is queued: a copy from pageable
        # memory queued behind it would make the host wait for the whole prefill.
        parts, (start, end) = chunk_features(host, chunk)
        for name, part in parts.items():
            src = part.pin_memory() if self.device.type == "cuda" else part
            writer.alloc(name, tuple(part.shape), self.needs[name].dtype).copy_(
                src, non_blocking=True)
        shapes = self._shapes(num_tokens, num_sequences)
        whole = {name: torch.empty(*shapes[name][0], dtype=self.dtype, device=self.device)
                 for name in ("aux_hidden", "last_hidden") if name in shapes}
        ids, pos, lens = (to_device(t, self.device) for t in
                          (batch.input_ids, batch.positions, batch.seq_lens))
        with torch.no_grad():
            self._forward(ids, pos, lens, whole["aux_hidden"], whole.get("last_hidden"))
        for name, tensor in whole.items():
            part = chunk_rows(name, tensor, chunk, num_tokens)
            writer.alloc(name, tuple(part.shape), self.dtype).copy_(part)
        writer.meta.update(num_tokens=max(0, min(end, num_tokens) - start),
                           num_sequences=num_sequences, sp_chunk=[start, end],
                           seq_lens=parts["seq_lens"].tolist(),  # with the padding sequence
                           aux_layer_ids=list(self.aux_layer_ids))

    def _check(self, batch: MicroBatch, budget: int) -> tuple[int, int]:
        """(T, S) of a well-formed batch that fits the budget; ValueError otherwise.

        Runs on the batch's own tensors, which the packer builds on the CPU (no device sync)."""
        ids, pos, mask, lens = batch.input_ids, batch.positions, batch.loss_mask, batch.seq_lens
        num_tokens, num_sequences = ids.numel(), lens.numel()
        what = f"the micro-batch has {num_tokens} tokens in {num_sequences} sequences"
        if num_tokens > budget:
            # Never truncate: a draft trained on a cut sequence learns from a context the
            # target never saw.
            raise ValueError(f"{what}, over the budget data.tokens_per_micro_step={budget}; the "
                             "packer must not exceed it (raise data.tokens_per_micro_step, "
                             "which also sizes the ring slots)")
        if num_tokens == 0 or num_sequences == 0:
            raise ValueError(f"{what}: empty micro-batch")
        for name, t in (("input_ids", ids), ("positions", pos), ("loss_mask", mask)):
            if t.dim() != 1 or t.numel() != num_tokens:
                raise ValueError(f"{what}, but {name} has shape {list(t.shape)}; expected "
                                 f"[{num_tokens}]")
        lens64 = lens.to(torch.int64)
        if lens.dim() != 1 or bool((lens64 <= 0).any()) or int(lens64.sum()) != num_tokens:
            raise ValueError(f"{what}, but seq_lens {lens.tolist()} do not sum to {num_tokens} "
                             "(or one is not positive)")
        expected = positions_from_lens(lens64)
        if not torch.equal(pos.to(torch.int64), expected.to(pos.device)):
            first = int((pos.to(expected.device) != expected).nonzero()[0, 0])
            raise ValueError(f"{what}, but positions are not 0..len-1 per sequence (first "
                             f"mismatch at token {first}: {int(pos[first])}, expected "
                             f"{int(expected[first])}); the target would attend across "
                             "sequence boundaries")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            # Checked here because an out-of-range id is an opaque device-side assert on CUDA.
            raise ValueError(f"{what}, with token ids in [{low}, {high}] outside the target's "
                             f"vocabulary of {self.vocab_size}; the tokenizer does not match "
                             "target.path")
        return num_tokens, num_sequences
