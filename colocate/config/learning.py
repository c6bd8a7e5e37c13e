"""Config sections of what is learned and how: the data, the draft, the training loop,
the metrics and the checkpoints."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from colocate.config.parse import require


@dataclass(kw_only=True)
class DataSection:
    path: str = "examples/tiny/data/conversations.jsonl"
    """JSONL of conversations: OpenAI `messages` (role/content) or ShareGPT `conversations`
    (from/value)."""
    max_length: int = 512
    """Tokens per conversation; longer ones are truncated (counted and reported)."""
    tokens_per_micro_step: int = 2048
    """Token budget of one packed micro-step (sizes the ring slots)."""
    last_assistant_turn_only: bool = False
    """Train on the last assistant turn only (a sample may override it with its own
    `last_assistant_turn_only` field)."""
    skip_invalid: bool = False
    """Count and skip malformed lines instead of failing on the first one."""
    chat_template: str = ""
    """Jinja chat template (inline, or a path to a file). Empty: the tokenizer's own."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3.
    `colocate generate` and training must use the same ones (they decide the prompt)."""
    holdout: int = 0
    """Conversations held out of training (the same lines in every run on this file):
    validation during training and the prompts `colocate eval` serves by default."""
    shuffle: bool = True
    """Shuffle conversation order per epoch (deterministic in run.seed and the epoch)."""
    cache_dir: str = ""
    """Where tokenized data and draft vocabularies are cached. Empty: RUN_DIR/../.cache."""
    source: str = "dataset"
    """dataset: train on data.path's replies as written. generate: online decode, the engine
    ranks answer data.path's prompts with the target while training runs (generate.*
    settings) and train on those answers (colocate/generate/online.py)."""

    def __post_init__(self):
        require(bool(self.path), "data.path", "set the JSONL file to train on")
        require(self.source in ("dataset", "generate"), "data.source",
                 f"got {self.source!r}; use dataset or generate")
        require(self.max_length >= 2, "data.max_length", f"got {self.max_length}; must be >= 2")
        require(isinstance(self.chat_template_kwargs, dict), "data.chat_template_kwargs",
                 f"expected a mapping, e.g. {{enable_thinking: false}}, got "
                 f"{self.chat_template_kwargs!r}")
        require(self.holdout >= 0, "data.holdout", f"got {self.holdout}; use 0 (none) or a "
                 "number of conversations")
        require(self.tokens_per_micro_step >= self.max_length, "data.tokens_per_micro_step",
                 f"{self.tokens_per_micro_step} is below data.max_length ({self.max_length}); "
                 "a micro-step must hold one whole conversation")


@dataclass(kw_only=True)
class DraftSection:
    method: str = "eagle3"
    """Which draft to train: eagle3 (chain drafting, sglang EAGLE3) or dflash (block
    drafting, sglang DFLASH). Each is a recipe in colocate/draft/recipes.py."""
    draft_vocab_size: int = 32000
    """Size of the draft's reduced vocabulary (top loss-masked token frequencies). Clamped
    to the target vocabulary with a warning when larger."""
    unroll_steps: int = 7
    """Test-time-training unroll length."""
    position_decay: float = 0.8
    """Loss weight of unroll position k is position_decay**k."""
    intermediate_size: int = 0
    """Draft MLP width. 0: the target's."""
    attention: str = "auto"
    """TTT attention: auto (flex on CUDA when torch.nn.attention.flex_attention and Triton are
    usable, else loop), loop (per-sequence reference), or flex (block-sparse flex_attention,
    compiled on CUDA; on CPU eager and forward-only, as torch allows there)."""
    kernels: str = "auto"
    """Norms, RoPE, SiLU and the soft cross-entropy: auto (fused by torch.compile on CUDA when
    Triton is usable, else eager), eager, or compiled (see colocate/draft/kernels.py)."""
    teacher_argmax: str = "exact"
    """eagle3: how the teacher decides whether the target's full-vocabulary argmax is a draft
    token (positions where it is not are not trained): exact (full-vocabulary logits in the
    head's dtype) or fp8 (the draft tokens' logits exact, the other tokens' from a row-scaled
    FP8 GEMM: only near-ties can flip; colocate/draft/teacher.py). fp8 needs FP8 matmul
    (CUDA sm89+, or CPU in recent torch), checked at start-up."""
    num_layers: int = 5
    """dflash: draft decoder layers (5 suits an 8B target). eagle3 always has one."""
    block_size: int = 16
    """dflash: tokens per drafted block (the anchor token and block_size - 1 predictions)."""
    num_anchors: int = 512
    """dflash: anchors (block starts) drawn per sequence; a fixed count, padded, so compiled
    shapes stay static."""
    block_decay: float = 7.0
    """dflash: block position k >= 1 weighs exp(-(k - 1) / block_decay) in the loss."""
    mask_token_id: int = -1
    """dflash: token id whose frozen embedding fills a block's unknown positions. -1: the
    tokenizer's mask token, else its pad token, else the last id of the target vocabulary."""
    init_from: str = ""
    """Warm start: an exported draft of draft.method (config.json + model.safetensors in
    the layout sglang serves: ours, RUN_DIR/export, or another tool's EAGLE3 export) whose
    weights the run starts from; its shape, target layers and (Eagle3) vocabulary maps must
    be this run's, checked before training (docs/training.md). Weights only: optimizer,
    step and data start fresh; a run resuming its own checkpoint ignores it. Empty: a
    random init."""

    def __post_init__(self):
        require(self.method in ("eagle3", "dflash"), "draft.method",
                 f"got {self.method!r}; use eagle3 or dflash")
        require(1 <= self.num_layers <= 64, "draft.num_layers", f"got {self.num_layers}; use 1..64")
        require(2 <= self.block_size <= 64, "draft.block_size",
                 f"got {self.block_size}; use 2..64 (16 is DFlash's default)")
        require(self.num_anchors >= 1, "draft.num_anchors", f"got {self.num_anchors}; must be >= 1")
        require(self.block_decay > 0, "draft.block_decay", f"got {self.block_decay}; must be > 0")
        require(self.draft_vocab_size >= 2, "draft.draft_vocab_size",
                 f"got {self.draft_vocab_size}; must be >= 2")
        require(1 <= self.unroll_steps <= 32, "draft.unroll_steps",
                 f"got {self.unroll_steps}; use 1..32 (7 is Eagle3's default)")
        require(0.0 < self.position_decay <= 1.0, "draft.position_decay",
                 f"got {self.position_decay}; use (0, 1]")
        require(self.intermediate_size >= 0, "draft.intermediate_size", "must be >= 0")
        require(self.attention in ("auto", "loop", "flex"), "draft.attention",
                 f"got {self.attention!r}; use auto, loop or flex")
        require(self.kernels in ("auto", "eager", "compiled"), "draft.kernels",
                 f"got {self.kernels!r}; use auto, eager or compiled")
        require(self.teacher_argmax in ("exact", "fp8"), "draft.teacher_argmax",
                 f"got {self.teacher_argmax!r}; use exact or fp8")


# The keys of one method that the other ignores, by the method that ignores them.
# (draft.draft_vocab_size is not one: DFlash drafts over the whole vocabulary, but the
# vocabulary the engines build, cache and checkpoint still follows it.)
METHOD_ONLY_DRAFT_KEYS = {
    "eagle3": ("num_layers", "block_size", "num_anchors", "block_decay", "mask_token_id"),
    "dflash": ("unroll_steps", "position_decay", "teacher_argmax"),
}


def warn_other_method_keys(draft: DraftSection) -> None:
    """A setting of the other method does nothing: say so rather than ignore it silently
    (once per job: on rank 0, or outside torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    defaults = DraftSection.__dataclass_fields__
    other = "dflash" if draft.method == "eagle3" else "eagle3"
    for key in METHOD_ONLY_DRAFT_KEYS[draft.method]:
        if getattr(draft, key) != defaults[key].default:
            warnings.warn(f"draft.{key}={getattr(draft, key)} has no effect with "
                          f"draft.method={draft.method} (it belongs to draft.method={other})",
                          UserWarning, stacklevel=3)


@dataclass(kw_only=True)
class TrainSection:
    max_steps: int = 0
    """Optimizer steps of the whole run (sets the learning-rate schedule). Set this or
    train.epochs (exactly one)."""
    epochs: int = 0
    """Passes over the training data instead of train.max_steps: the engines count the
    packed micro-batches of that many epochs at start-up and the run trains
    ceil(the busiest pair's count / train.micro_steps) steps (printed at start; the schedule
    spans them). See docs/training.md."""
    stop_at_step: int = 0
    """Stop after this many steps with a checkpoint (time-limited allocations); a later
    run resumes and goes on to the end. 0: run to the end."""
    micro_steps: int = 2
    """Micro-steps (ring messages) accumulated per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    log_every_s: float = 2.0
    """Minimum seconds between progress lines."""
    val_every_steps: int = 0
    """Validate on the data.holdout conversations every N optimizer steps and after the
    last one (teacher-forced forward only: val_loss, val_acc_k, val_sim_accept_length in
    metrics.jsonl). 0: never."""
    tensorboard: bool = False
    """Deprecated: use metrics.report_to: [jsonl, tensorboard]. true still works (with a
    warning): it adds tensorboard to metrics.report_to."""
    max_nonfinite_steps: int = 10
    """A step whose loss or gradient norm is NaN/inf is skipped (no optimizer step;
    metrics.jsonl `skipped: 1`); this many skipped in a row stop the run with an error.
    So do this many steps in a row whose gradient norm is exactly 0 (a trainer computing
    nothing)."""
    sp_size: int = 1
    """Sequence parallelism: s consecutive trainer/engine pairs (GPUs of one node) train
    each micro-batch together, every trainer on 1/s of its tokens, so sequences s times
    longer fit. 1: off. Must divide the GPUs per node (Eagle3, whose Ulysses all-to-all
    splits heads: also the draft's attention and key/value heads); the sglang engine then
    runs with engine.tp_size = s. Eagle3 and DFlash. See docs/sequence-parallel.md."""

    def __post_init__(self):
        require(self.max_steps >= 0, "train.max_steps", f"got {self.max_steps}; must be >= 1")
        require(self.epochs >= 0, "train.epochs", f"got {self.epochs}; must be >= 1")
        require(not (self.max_steps and self.epochs), "train.max_steps",
                 f"{self.max_steps} and train.epochs {self.epochs} are both set; set one of "
                 "them (the other to 0)")
        require(self.stop_at_step >= 0, "train.stop_at_step",
                 f"got {self.stop_at_step}; use 0 (run to the end) or a step")
        require(not self.max_steps or self.stop_at_step <= self.max_steps, "train.stop_at_step",
                 f"got {self.stop_at_step}; use 0 (run to the end) or 1..train.max_steps")
        self._epoch_steps = 0  # train.epochs resolved (resolve_epochs); not a config key
        require(self.micro_steps >= 1, "train.micro_steps", f"got {self.micro_steps}; must be >= 1")
        require(self.val_every_steps >= 0, "train.val_every_steps",
                 f"got {self.val_every_steps}; use 0 (never) or a step interval")
        require(self.lr > 0, "train.lr", f"got {self.lr}; must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "use a ratio in [0, 1]")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
                 f"got {self.max_nonfinite_steps}; must be >= 1 (steps skipped in a row "
                 "before the run stops)")
        require(self.sp_size >= 1, "train.sp_size", f"got {self.sp_size}; use 1 (off) or the "
                 "number of GPUs that share each sequence")
        self.betas = tuple(float(b) for b in self.betas)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 f"got {self.betas}; give two numbers in [0, 1)")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: train.max_steps, or the count train.epochs
        resolved to at start-up (`resolve_epochs`)."""
        assert self.max_steps or self._epoch_steps, "train.epochs is not resolved yet"
        return self.max_steps or self._epoch_steps

    def resolve_epochs(self, total_steps: int) -> None:
        """Fix the step count of train.epochs (what the engines counted in the packed data,
        colocate/train/epochs.py) for this process. The saved config keeps train.epochs."""
        self._epoch_steps = total_steps
        require(self.stop_at_step <= total_steps, "train.stop_at_step",
                 f"{self.stop_at_step} is past the end: train.epochs={self.epochs} is "
                 f"{total_steps} steps on this data; use 0 (run to the end) or "
                 f"1..{total_steps}")


TRACKERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}
"""metrics.report_to names -> the package each needs (installed by the extra of that name)."""


@dataclass(kw_only=True)
class MetricsSection:
    """Where the per-step metrics rows go (colocate/trackers.py; the first trainer writes)."""

    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Trackers: jsonl (RUN_DIR/metrics.jsonl; required: resume, the model card and the
    demo read it), tensorboard (RUN_DIR/tb; pip install 'colocate[tensorboard]'), wandb
    (Weights & Biases, files in RUN_DIR/wandb; pip install 'colocate[wandb]')."""
    wandb_project: str = "colocate"
    """W&B project."""
    wandb_run_name: str = ""
    """W&B run name. Empty: the name of run.dir."""
    wandb_mode: str = ""
    """W&B mode: empty (wandb's own choice: the WANDB_MODE environment variable, else
    online), online, offline (no network; `wandb sync` uploads later) or disabled."""

    def __post_init__(self):
        unknown = [name for name in self.report_to if name not in TRACKERS]
        require(not unknown, "metrics.report_to",
                 f"unknown tracker(s) {unknown}; use any of {', '.join(TRACKERS)}")
        require(len(set(self.report_to)) == len(self.report_to), "metrics.report_to",
                 f"{self.report_to} names a tracker twice")
        require("jsonl" in self.report_to, "metrics.report_to",
                 f"{self.report_to} lacks jsonl, which resume, the model card and the demo read; "
                 f"use e.g. [jsonl, {', '.join(self.report_to) or 'wandb'}]")
        require(self.wandb_mode in ("", "online", "offline", "disabled"), "metrics.wandb_mode",
                 f"got {self.wandb_mode!r}; use online, offline, disabled or leave it empty")


@dataclass(kw_only=True)
class CheckpointSection:
    every_steps: int = 50
    """Save every N optimizer steps (and at the end). 0: only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a successful save."""
    resume: str = "auto"
    """auto (latest checkpoint in run.dir if any), never, or a checkpoint directory."""

    def __post_init__(self):
        require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        require(bool(self.resume), "checkpoint.resume", "use auto, never or a directory")
