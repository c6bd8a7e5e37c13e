"""A draft method is a recipe: one object owns everything that differs between methods.

The engine, the trainer, metrics and export never branch on `draft.method`; they ask the
run's recipe (`recipe_for(cfg)`):

    engine side   layer_ids(num_layers)     target layers whose outputs the engine captures
                  needs_last_hidden         whether it also ships the final norm's output
                  plan_batch(batch, key)    extra ring tensors of one micro-batch (host) and
                                            its per-position label counts (loss denominators)
    trainer side  feature_needs(...)        the ring tensors it requires, shapes and dtypes
                  build_model / shard       the draft module and its FSDP2 wrapping
                  forward(...)              loss (with grad) and the stats vector
                  summary(values)           loss and metrics from a reduced stats vector
    sequence      sp_halo                   rows a chunk carries past its end (engine too)
    parallelism   check_sequence_parallel   what train.sp_size asks of the draft's shape
    export        export(...)               the checkpoint layout sglang serves
                  served_algorithm          sglang's speculative_algorithm for it
    warm start    export_config(...)        the config.json this run's export writes
                  init_keys, vocab_maps     what a draft.init_from export must share with it

Every method's stats vector has the layout colocate/metrics.py documents, with K =
`num_positions` scored positions per draft (Eagle3: unroll steps; DFlash: block positions).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from colocate import metrics
from colocate.sequence_parallel import HALO_FEATURES
from colocate.transport.layout import Need, feature_needs


@dataclass
class DraftStepResult:
    """What every recipe's `forward` returns for one micro-step (K = `num_positions`)."""

    loss: torch.Tensor
    """Scalar with grad: this micro-step's share of the step's per-token loss."""
    ce_sum: torch.Tensor
    """[K] cross-entropy summed over each position's scored labels."""
    hits: torch.Tensor
    """[K] int64 scored labels where the draft's argmax is the label."""
    counted: torch.Tensor
    """[K] int64 labels each position is scored on (the recipe's label counts)."""
    sim: torch.Tensor
    """[2] int64 (reply tokens, verify cycles) of the serving simulation."""

    def stats(self) -> torch.Tensor:
        """The micro-step's float64 stats vector (`colocate.metrics` layout), detached."""
        return metrics.stats_vector(self.ce_sum, self.hits, self.counted, self.sim)


@dataclass(frozen=True)
class FrozenTarget:
    """The target tensors a trainer borrows, never trained: the input embedding [V, H], the
    lm_head [V, H], and the draft vocabulary's target ids [Vd] (Eagle3's reduced head)."""

    embed: torch.Tensor
    lm_head: torch.Tensor
    draft_ids: torch.Tensor


@dataclass(frozen=True)
class StepKey:
    """Identifies one micro-batch for anything drawn at random (DFlash's anchors): the same
    key draws the same values in a resumed run."""

    seed: int
    step: int
    micro: int
    shard: int
    """The data shard (`Topology.dp_index`), not the pair: the pairs of a sequence-parallel
    group pack the same micro-batches and must draw the same anchors for them."""

    def generator(self) -> torch.Generator:
        # Mixed through fixed odd multipliers so neighbouring keys do not share streams.
        mixed = (self.seed * 1_000_003 + self.step * 8_191 + self.micro * 131 + self.shard) % 2**63
        return torch.Generator().manual_seed(mixed)


class DraftRecipe(ABC):
    method: ClassVar[str]
    needs_last_hidden: ClassVar[bool]
    served_algorithm: ClassVar[str]

    def __init__(self, cfg):
        self.cfg = cfg

    # ------------------------------------------------------------------ engine side

    @abstractmethod
    def default_layer_ids(self, num_layers: int) -> list[int]:
        """The target layers (0-based outputs) this method reads when target.aux_layer_ids
        is null."""

    def layer_ids(self, num_layers: int) -> list[int]:
        from colocate.engine.base import resolve_aux_layer_ids

        return resolve_aux_layer_ids(self.cfg.target.aux_layer_ids, num_layers,
                                     default=self.default_layer_ids)

    @property
    @abstractmethod
    def num_positions(self) -> int:
        """K: scored positions per draft (length of each block of the stats vector)."""

    @abstractmethod
    def plan_batch(self, batch, key: StepKey) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(extra ring tensors on the host, label counts int64 [K]) of one micro-batch."""

    # ------------------------------------------------------------------ trainer side

    def feature_needs(self, hidden_size: int, num_layers: int,
                      dtype: torch.dtype) -> dict[str, Need]:
        """The ring tensors this recipe trains from (the engine writes exactly these)."""
        # With sequence parallelism a chunk has T rows, some features a halo beyond them.
        return feature_needs(hidden_size, num_layers, dtype, last_hidden=self.needs_last_hidden,
                             halo_features=HALO_FEATURES if self.cfg.train.sp_size > 1 else ())

    @property
    def sp_halo(self) -> int:
        """Rows past a sequence-parallel chunk's end this recipe reads (input_ids, loss_mask,
        last_hidden); see colocate/sequence_parallel.py."""
        raise NotImplementedError(f"draft.method={self.method} has no sequence parallelism")

    def check_sequence_parallel(self, target_config) -> None:
        """ValueError naming train.sp_size when this draft of `target_config` cannot split
        over train.sp_size trainers (checked at start-up, before any group exists)."""

    @abstractmethod
    def build_model(self, target_config, draft_vocab_size: int,
                    layer_ids: list[int]) -> tuple[Any, torch.nn.Module]:
        """(arch, model with initialised weights on the CPU)."""

    @abstractmethod
    def shard(self, model: torch.nn.Module, mesh, mp_policy) -> None:
        """Apply FSDP2 to `model` in place."""

    def bind_frozen(self, frozen: FrozenTarget) -> None:
        """Build what this recipe derives from the frozen target once, at start-up (a
        ConfigError naming the key when this device cannot). Default: nothing."""

    @abstractmethod
    def forward(self, model: torch.nn.Module, frozen: FrozenTarget,
                feats: dict[str, torch.Tensor], meta: dict, *,
                label_totals: torch.Tensor | None = None, timer=None):
        """One micro-step's forward, no backward: a `DraftStepResult`. `feats`: the ring
        tensors; `meta`: the message's meta (seq_lens and what `plan_batch` added);
        `label_totals`: the step's [K] counts (None: this micro-step's own); `timer`: a
        PhaseTimer to mark sub-phases on (e.g. "teacher")."""

    @abstractmethod
    def train_flops_per_token(self, geom, seq_len: int, num_layers: int) -> float:
        """Model FLOPs of training per token (metrics.Geometry of the target; `num_layers`
        target layers read), for MFU."""

    @abstractmethod
    def summary(self, values) -> dict[str, float]:
        """Loss and metrics of a reduced stats vector (metrics.step_summary)."""

    # ------------------------------------------------------------------ export

    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], arch, *, vocab: dict,
               layer_ids: list[int], target_config, out_dir: str) -> str:
        """Write the sglang checkpoint into `out_dir`; returns it."""

    @abstractmethod
    def export_config(self, target_config, draft_vocab_size: int,
                      layer_ids: list[int]) -> dict:
        """The config.json `export` writes for this run's draft (no weights built)."""

    # ------------------------------------------------------------------ warm start

    init_keys: ClassVar[dict[str, str]]
    """Dotted config.json keys a draft.init_from export must share with `export_config`,
    each with the setting of this run that decides it (named in the refusal)."""
    vocab_maps: ClassVar[tuple[str, ...]] = ()
    """Tensors of an export that are the run's draft vocabulary: checked, not loaded."""


def recipe_for(cfg) -> DraftRecipe:
    """The recipe `cfg.draft.method` names."""
    from colocate.draft.dflash_recipe import DFlashRecipe
    from colocate.draft.eagle3_recipe import Eagle3Recipe

    recipes: dict[str, type[DraftRecipe]] = {"eagle3": Eagle3Recipe, "dflash": DFlashRecipe}
    if cfg.draft.method not in recipes:
        raise ValueError(f"draft.method: {cfg.draft.method!r} has no recipe here; use one of "
                         f"{', '.join(sorted(recipes))}")
    return recipes[cfg.draft.method](cfg)
