"""Run configuration: nested dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Every field is documented right under it. Each section validates itself in
``__post_init__``; cross-section checks live in ``Config.__post_init__``. User mistakes raise
``ConfigError`` (a ``ValueError``) naming the dotted key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the dotted key and the fix."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass(kw_only=True)
class RunSection:
    dir: str = "runs/tiny"
    """Run directory: checkpoints, metrics.jsonl, the resolved config and the export."""
    seed: int = 0
    """Seed for data order and draft initialisation."""
    device: str = "auto"
    """auto (cuda when available), cuda, or cpu (gloo everywhere, shared-memory ring)."""
    timeout_s: float = 300.0
    """Bound on every wait after the first optimizer step (peer messages, slots, barriers)."""
    startup_timeout_s: float = 900.0
    """Bound on waits until the first step completes (model loading, compilation)."""

    def __post_init__(self):
        _require(self.device in ("auto", "cuda", "cpu"), "run.device",
                 f"got {self.device!r}; use auto, cuda or cpu")
        _require(self.timeout_s > 0, "run.timeout_s", "must be > 0 seconds")
        _require(self.startup_timeout_s >= self.timeout_s, "run.startup_timeout_s",
                 f"must be >= run.timeout_s ({self.timeout_s})")


@dataclass(kw_only=True)
class MpsSection:
    mode: str = "auto"
    """auto (use MPS if a daemon can serve clients, else warn and time-slice), required, off."""
    trainer_sm_percent: int = 100
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for trainer ranks (share of SMs it may use)."""
    engine_sm_percent: int = 100
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for engine ranks."""
    trainer_priority: str = "normal"
    """MPS client priority of the trainer ranks (CUDA_MPS_CLIENT_PRIORITY): normal, or low
    (below normal), so that the engine's kernels, e.g. online decode's, go first when both
    wait. A driver whose MPS lacks client priorities ignores it. Not yet measured."""
    trainer_mem_fraction: float = 0.45
    """Cap on the trainer's share of GPU memory (torch.cuda.set_per_process_memory_fraction)."""
    engine_mem_fraction: float = 0.45
    """Cap on the engine's share of GPU memory (the engine's static memory fraction)."""
    reserve_mem_fraction: float = 0.05
    """Memory left free for CUDA contexts, NCCL buffers and fragmentation."""
    pinned_mem_limit: bool = False
    """Also set MPS's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT per role from the fractions above."""
    pipe_dir: str = ""
    """MPS pipe directory. Empty: a job-private one under the system temp dir."""

    def __post_init__(self):
        _require(self.mode in ("auto", "required", "off"), "mps.mode",
                 f"got {self.mode!r}; use auto, required or off")
        _require(self.trainer_priority in ("normal", "low"), "mps.trainer_priority",
                 f"got {self.trainer_priority!r}; use normal or low")
        for key in ("trainer_sm_percent", "engine_sm_percent"):
            v = getattr(self, key)
            _require(1 <= v <= 100, f"mps.{key}", f"got {v}; use a percentage in 1..100")
        for key in ("trainer_mem_fraction", "engine_mem_fraction", "reserve_mem_fraction"):
            v = getattr(self, key)
            _require(0.0 <= v < 1.0, f"mps.{key}", f"got {v}; use a fraction in [0, 1)")
        total = self.trainer_mem_fraction + self.engine_mem_fraction + self.reserve_mem_fraction
        _require(total <= 1.0 + 1e-9, "mps.trainer_mem_fraction",
                 f"trainer ({self.trainer_mem_fraction}) + engine ({self.engine_mem_fraction}) + "
                 f"reserve ({self.reserve_mem_fraction}) = {total:.3f} > 1; lower one of them")


@dataclass(kw_only=True)
class TransportSection:
    num_slots: int = 2
    """Ring slots per pair. >= 2 lets the engine prefill micro-step n+1 while the trainer
    learns on n; 1 is the serial baseline."""

    def __post_init__(self):
        _require(1 <= self.num_slots <= 16, "transport.num_slots",
                 f"got {self.num_slots}; use 1..16 (2 overlaps engine and trainer)")


@dataclass(kw_only=True)
class TargetSection:
    path: str = "examples/tiny/target-llama"
    """Local directory of the target model (config.json, safetensors, tokenizer). No hub."""
    dtype: str = "auto"
    """auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16 or float32."""
    load_format: str = "auto"
    """auto (the weights in target.path) or dummy (seeded random weights from config.json:
    real shapes without a checkpoint, for benchmarks; target.path still needs a tokenizer)."""
    aux_layer_ids: list[int] | None = None
    """Layers whose outputs feed the draft. None: Eagle3's [1, L//2-1, L-4]."""

    def __post_init__(self):
        _require(bool(self.path), "target.path", "set the local directory of the target model")
        _require(self.dtype in ("auto", "bfloat16", "float16", "float32"), "target.dtype",
                 f"got {self.dtype!r}; use auto, bfloat16, float16 or float32")
        _require(self.load_format in ("auto", "dummy"), "target.load_format",
                 f"got {self.load_format!r}; use auto or dummy")
        if self.aux_layer_ids is not None:
            _require(len(self.aux_layer_ids) > 0, "target.aux_layer_ids",
                     "give at least one layer id, or leave it null for Eagle3's default")


@dataclass(kw_only=True)
class EngineSection:
    backend: str = "hf"
    """hf (transformers; any device, the reference) or sglang (in-process, the fast path)."""
    tp_size: int = 1
    """Engine tensor parallelism: engine ranks that share one target replica."""
    attention_backend: str = "triton"
    """sglang attention backend (sglang backend only)."""

    def __post_init__(self):
        _require(self.backend in ("hf", "sglang"), "engine.backend",
                 f"got {self.backend!r}; use hf or sglang")
        _require(self.tp_size >= 1, "engine.tp_size", f"got {self.tp_size}; must be >= 1")


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
        _require(bool(self.path), "data.path", "set the JSONL file to train on")
        _require(self.source in ("dataset", "generate"), "data.source",
                 f"got {self.source!r}; use dataset or generate")
        _require(self.max_length >= 2, "data.max_length", f"got {self.max_length}; must be >= 2")
        _require(isinstance(self.chat_template_kwargs, dict), "data.chat_template_kwargs",
                 f"expected a mapping, e.g. {{enable_thinking: false}}, got "
                 f"{self.chat_template_kwargs!r}")
        _require(self.holdout >= 0, "data.holdout", f"got {self.holdout}; use 0 (none) or a "
                 "number of conversations")
        _require(self.tokens_per_micro_step >= self.max_length, "data.tokens_per_micro_step",
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
        _require(self.method in ("eagle3", "dflash"), "draft.method",
                 f"got {self.method!r}; use eagle3 or dflash")
        _require(1 <= self.num_layers <= 64, "draft.num_layers", f"got {self.num_layers}; use 1..64")
        _require(2 <= self.block_size <= 64, "draft.block_size",
                 f"got {self.block_size}; use 2..64 (16 is DFlash's default)")
        _require(self.num_anchors >= 1, "draft.num_anchors", f"got {self.num_anchors}; must be >= 1")
        _require(self.block_decay > 0, "draft.block_decay", f"got {self.block_decay}; must be > 0")
        _require(self.draft_vocab_size >= 2, "draft.draft_vocab_size",
                 f"got {self.draft_vocab_size}; must be >= 2")
        _require(1 <= self.unroll_steps <= 32, "draft.unroll_steps",
                 f"got {self.unroll_steps}; use 1..32 (7 is Eagle3's default)")
        _require(0.0 < self.position_decay <= 1.0, "draft.position_decay",
                 f"got {self.position_decay}; use (0, 1]")
        _require(self.intermediate_size >= 0, "draft.intermediate_size", "must be >= 0")
        _require(self.attention in ("auto", "loop", "flex"), "draft.attention",
                 f"got {self.attention!r}; use auto, loop or flex")
        _require(self.kernels in ("auto", "eager", "compiled"), "draft.kernels",
                 f"got {self.kernels!r}; use auto, eager or compiled")


# The keys of one method that the other ignores, by the method that ignores them.
# (draft.draft_vocab_size is not one: DFlash drafts over the whole vocabulary, but the
# vocabulary the engines build, cache and checkpoint still follows it.)
METHOD_ONLY_DRAFT_KEYS = {
    "eagle3": ("num_layers", "block_size", "num_anchors", "block_decay", "mask_token_id"),
    "dflash": ("unroll_steps", "position_decay"),
}


def _warn_other_method_keys(draft: DraftSection) -> None:
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
        _require(self.max_steps >= 0, "train.max_steps", f"got {self.max_steps}; must be >= 1")
        _require(self.epochs >= 0, "train.epochs", f"got {self.epochs}; must be >= 1")
        _require(not (self.max_steps and self.epochs), "train.max_steps",
                 f"{self.max_steps} and train.epochs {self.epochs} are both set; set one of "
                 "them (the other to 0)")
        _require(self.stop_at_step >= 0, "train.stop_at_step",
                 f"got {self.stop_at_step}; use 0 (run to the end) or a step")
        _require(not self.max_steps or self.stop_at_step <= self.max_steps, "train.stop_at_step",
                 f"got {self.stop_at_step}; use 0 (run to the end) or 1..train.max_steps")
        self._epoch_steps = 0  # train.epochs resolved (resolve_epochs); not a config key
        _require(self.micro_steps >= 1, "train.micro_steps", f"got {self.micro_steps}; must be >= 1")
        _require(self.val_every_steps >= 0, "train.val_every_steps",
                 f"got {self.val_every_steps}; use 0 (never) or a step interval")
        _require(self.lr > 0, "train.lr", f"got {self.lr}; must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "use a ratio in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
                 f"got {self.max_nonfinite_steps}; must be >= 1 (steps skipped in a row "
                 "before the run stops)")
        _require(self.sp_size >= 1, "train.sp_size", f"got {self.sp_size}; use 1 (off) or the "
                 "number of GPUs that share each sequence")
        self.betas = tuple(float(b) for b in self.betas)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
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
        _require(self.stop_at_step <= total_steps, "train.stop_at_step",
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
        _require(not unknown, "metrics.report_to",
                 f"unknown tracker(s) {unknown}; use any of {', '.join(TRACKERS)}")
        _require(len(set(self.report_to)) == len(self.report_to), "metrics.report_to",
                 f"{self.report_to} names a tracker twice")
        _require("jsonl" in self.report_to, "metrics.report_to",
                 f"{self.report_to} lacks jsonl, which resume, the model card and the demo read; "
                 f"use e.g. [jsonl, {', '.join(self.report_to) or 'wandb'}]")
        _require(self.wandb_mode in ("", "online", "offline", "disabled"), "metrics.wandb_mode",
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
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(bool(self.resume), "checkpoint.resume", "use auto, never or a directory")


@dataclass(kw_only=True)
class BenchSection:
    engine: str = "run"
    """run, or replay: after bench.replay_micro_steps real prefills the engine re-sends those
    features without running the target (measures the trainer alone)."""
    trainer: str = "train"
    """train, or discard: release every micro-step unread (measures the engine alone)."""
    replay_micro_steps: int = 4
    """Real micro-steps the engine captures before replaying them."""

    def __post_init__(self):
        _require(self.engine in ("run", "replay"), "bench.engine",
                 f"got {self.engine!r}; use run or replay")
        _require(self.trainer in ("train", "discard"), "bench.trainer",
                 f"got {self.trainer!r}; use train or discard")
        _require(not (self.engine == "replay" and self.trainer == "discard"), "bench.engine",
                 "replay with bench.trainer=discard measures nothing; set one of them only")
        _require(self.replay_micro_steps >= 1, "bench.replay_micro_steps", "must be >= 1")


KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
"""generate.kv_cache_dtype values: sglang's names for the KV caches its attention backends
store without per-model scales."""


@dataclass(kw_only=True)
class GenerateSection:
    """`colocate generate`: regenerate a dataset's assistant turns with the target."""

    engine: str = "auto"
    """auto (sglang when CUDA is available and sglang is installed, else hf), hf
    (transformers on run.device; the CPU path and the reference) or sglang (one offline
    sglang Engine over all visible GPUs)."""
    max_new_tokens: int = 256
    """Tokens generated per reply at most (a reply cut there ends with finish reason length)."""
    temperature: float = 0.0
    """0: greedy (the target's most likely answer, what a draft serves against best)."""
    top_p: float = 1.0
    """Nucleus sampling when temperature > 0 (no top-k, whatever the model's
    generation_config suggests: both engines sample from the same distribution)."""
    batch_size: int = 0
    """Prompts per hf generate call / per sglang submission. 0: auto (hf 32; sglang every
    prompt of a round at once, which its scheduler batches itself)."""
    chunk_records: int = 1024
    """Records regenerated together and written as one part file: a crash loses at most one
    chunk. Each chunk runs one round per assistant turn, so larger chunks keep more prompts
    in flight."""
    tp_size: int = 1
    """sglang: GPUs per engine replica; the visible GPUs / tp_size replicas run data
    parallel (sglang dp_size)."""
    mem_fraction: float = 0.0
    """sglang mem_fraction_static: the share of GPU memory for weights and KV cache. 0: auto
    (0.85 for `colocate generate`; online decode: half of mps.engine_mem_fraction, the
    prefill engine keeping the other half)."""
    ahead_chunks: int = 2
    """Online decode (data.source=generate): answered chunks of generate.chunk_records
    records that may wait for the packer (bounds memory; 2 keeps one decoding while one
    is packed)."""
    keep_greedy_mb: int = 1024
    """Online decode with greedy answers (temperature 0): answers kept in host memory, up
    to this many MB per engine (5 bytes per token), and reused by later epochs instead of
    decoded again (greedy answers do not change between epochs). 0: decode every epoch."""
    kv_cache_dtype: str = "auto"
    """sglang: the decoding engine's KV cache, auto (the target's dtype) or fp8_e4m3 /
    fp8_e5m2: half the bytes per cached token, so twice the answers in flight in the same
    memory and half the KV reads per decode step (online decode's batch is bound by them).
    The answers are then those of a target served with an fp8 KV cache, which can differ
    from a bf16-cached target's; the features are prefilled at the target's dtype either way."""
    cuda_graph: bool = False
    """sglang: capture CUDA graphs for decode (faster; the offline bundle's verified
    configuration runs without them)."""
    cuda_graph_max_batch: int = 0
    """sglang with generate.cuda_graph: the largest decode batch captured as a graph (larger
    batches decode eagerly). 0: sglang's default for the GPU (256 on an H200 at tp 1); raise
    it with the answers in flight (generate.chunk_records, the KV cache's room)."""
    thinking: bool = True
    """true: replies keep reasoning text as the model writes it. false: render prompts with
    data.chat_template_kwargs.enable_thinking=false (templates with that switch, e.g.
    Qwen3); train with the same data.chat_template_kwargs then."""

    def __post_init__(self):
        _require(self.engine in ("auto", "hf", "sglang"), "generate.engine",
                 f"got {self.engine!r}; use auto, hf or sglang")
        _require(self.max_new_tokens >= 1, "generate.max_new_tokens",
                 f"got {self.max_new_tokens}; must be >= 1")
        _require(self.temperature >= 0, "generate.temperature",
                 f"got {self.temperature}; use 0 (greedy) or a positive temperature")
        _require(0 < self.top_p <= 1, "generate.top_p", f"got {self.top_p}; use (0, 1]")
        _require(self.batch_size >= 0, "generate.batch_size",
                 f"got {self.batch_size}; use 0 (auto) or a number of prompts")
        _require(self.chunk_records >= 1, "generate.chunk_records",
                 f"got {self.chunk_records}; must be >= 1")
        _require(0 <= self.mem_fraction < 1, "generate.mem_fraction",
                 f"got {self.mem_fraction}; use 0 (auto) or a fraction in (0, 1)")
        _require(self.ahead_chunks >= 1, "generate.ahead_chunks",
                 f"got {self.ahead_chunks}; must be >= 1")
        _require(self.keep_greedy_mb >= 0, "generate.keep_greedy_mb",
                 f"got {self.keep_greedy_mb}; use 0 (off) or a size in MB")
        _require(self.tp_size >= 1, "generate.tp_size", f"got {self.tp_size}; must be >= 1")
        _require(self.cuda_graph_max_batch >= 0, "generate.cuda_graph_max_batch",
                 f"got {self.cuda_graph_max_batch}; use 0 (sglang's default) or a batch size")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "generate.kv_cache_dtype",
                 f"got {self.kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")


@dataclass(kw_only=True)
class EvalSection:
    """`colocate eval`: the accept length a draft gets when served (and in-training hooks)."""

    engine: str = "auto"
    """auto (sglang when CUDA is available and sglang imports, else hf), hf (the plain-torch
    reference decoder, any device), sglang (GPU only), or both (and their difference)."""
    num_prompts: int = 48
    """Held-out prompts to decode (the first N usable ones)."""
    steps: int = 4
    """Draft tokens per verify step (a chain: sglang's speculative_num_steps, topk 1)."""
    max_new_tokens: int = 128
    """Completion tokens per prompt at most (greedy; stop tokens end a prompt earlier)."""
    batch_size: int = 8
    """Prompts per generate call for the larger-batch tokens/s (sglang); batch 1 is always
    measured."""
    baseline: bool = True
    """Also decode without the draft: the speed-up, and (reference) the check that the
    outputs are the same (sglang: a second engine)."""
    cuda_graph: bool = False
    """sglang: decode with CUDA graphs, for tokens/s like a server's (the accept length does
    not depend on it). Off: the offline bundle's verified configuration."""
    mem_fraction: float = 0.3
    """sglang mem_fraction_static: the engine's share of GPU memory. 0.3 holds a target of a
    few B parameters plus the draft; eval runs alone on the GPU (outside a colocated job)."""
    data: str = ""
    """Held-out JSONL of conversations. Empty: the data.holdout split of data.path, which
    training never sees."""
    at_end: bool = False
    """Evaluate the exported draft when training ends."""
    every_steps: int = 0
    """Also evaluate every N optimizer steps during training, in the background (it needs
    room: CPU cores, or GPU memory beside the job's shares). 0: never."""
    timeout_s: float = 3600.0
    """Bound on one in-training evaluation (eval.at_end / eval.every_steps)."""

    def __post_init__(self):
        _require(self.engine in ("auto", "hf", "sglang", "both"), "eval.engine",
                 f"got {self.engine!r}; use auto, hf, sglang or both")
        _require(self.num_prompts >= 1, "eval.num_prompts", f"got {self.num_prompts}; must be >= 1")
        _require(1 <= self.steps <= 32, "eval.steps", f"got {self.steps}; use 1..32 (4 is typical)")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens",
                 f"got {self.max_new_tokens}; must be >= 1")
        _require(self.batch_size >= 1, "eval.batch_size", f"got {self.batch_size}; must be >= 1")
        _require(0 < self.mem_fraction < 1, "eval.mem_fraction",
                 f"got {self.mem_fraction}; use a fraction in (0, 1)")
        _require(self.every_steps >= 0, "eval.every_steps",
                 f"got {self.every_steps}; use 0 (never) or a step interval")
        _require(self.timeout_s > 0, "eval.timeout_s", f"got {self.timeout_s}; must be > 0")


@dataclass(kw_only=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    mps: MpsSection = field(default_factory=MpsSection)
    transport: TransportSection = field(default_factory=TransportSection)
    target: TargetSection = field(default_factory=TargetSection)
    engine: EngineSection = field(default_factory=EngineSection)
    data: DataSection = field(default_factory=DataSection)
    draft: DraftSection = field(default_factory=DraftSection)
    train: TrainSection = field(default_factory=TrainSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    bench: BenchSection = field(default_factory=BenchSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        if self.train.tensorboard:  # the old switch, migrated (the saved config has the new one)
            warnings.warn("train.tensorboard is deprecated: use metrics.report_to: "
                          "[jsonl, tensorboard] (train.tensorboard=true adds it for now)",
                          FutureWarning, stacklevel=2)
            if "tensorboard" not in self.metrics.report_to:
                self.metrics.report_to.append("tensorboard")
            self.train.tensorboard = False
        _require(self.engine.backend != "sglang" or self.run.device != "cpu", "engine.backend",
                 "sglang needs CUDA; use engine.backend=hf with run.device=cpu")
        _require(self.engine.tp_size == 1 or self.engine.backend == "sglang", "engine.tp_size",
                 f"{self.engine.tp_size} needs engine.backend=sglang (the hf engine runs the "
                 "whole target on each engine rank); use engine.tp_size=1")
        sp = self.train.sp_size
        _require(sp == 1 or self.data.source == "dataset", "train.sp_size",
                 f"{sp} with data.source=generate: online decode is not sequence-parallel yet "
                 "(every engine of a group would answer the same prompts); pre-generate the "
                 "answers with `colocate generate` and train on the file, or use train.sp_size=1")
        _require(sp == 1 or self.engine.backend == "hf" or self.engine.tp_size == sp,
                 "engine.tp_size", f"{self.engine.tp_size} with train.sp_size={sp}: the sglang "
                 "engines of one sequence-parallel group prefill each sequence together as one "
                 f"tensor-parallel group; set engine.tp_size={sp}")
        _require(not (self.train.epochs and self.data.source == "generate"), "train.epochs",
                 "online decode (data.source=generate) cannot count its micro-batches ahead: "
                 "its answers do not exist yet; set train.max_steps instead")
        _require(self.eval.engine not in ("sglang", "both") or self.run.device != "cpu",
                 "eval.engine", f"{self.eval.engine} needs CUDA; use eval.engine=hf with "
                 "run.device=cpu")

    def check_training(self) -> None:
        """What only `colocate train` needs (eval and generate read the same file and may
        turn the held-out split off)."""
        _require(bool(self.train.max_steps or self.train.epochs), "train.max_steps",
                 "neither it nor train.epochs is set; set one of them, e.g. "
                 "train.max_steps=1000 or train.epochs=2")
        _require(self.train.val_every_steps == 0 or self.data.holdout > 0,
                 "train.val_every_steps", "validation needs held-out conversations; set "
                 "data.holdout (e.g. 48) or train.val_every_steps=0")
        for name in self.metrics.report_to:
            # find_spec looks for the package without importing it (wandb takes a second).
            package = TRACKERS[name]
            _require(package is None or importlib.util.find_spec(package) is not None,
                     "metrics.report_to", f"{name} needs the {package} package, which is not "
                     f"installed: pip install 'colocate[{name}]' (or drop {name} from "
                     "metrics.report_to)")

    @property
    def last_step(self) -> int:
        """Optimizer steps this invocation runs up to (stop_at_step, or the run's total)."""
        return self.train.stop_at_step or self.train.total_steps

    def to_dict(self) -> dict[str, Any]:
        # Through JSON so tuples become lists and the result is plain YAML.
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans: YAML 1.1 also reads on/off/yes/no as
    booleans, which would turn `mps.mode: off` into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def user_number(value: Any, *, integer: bool) -> int | float | None:
    """A number as users write it (``3e-4``, ``1_000``, ``1e3`` or ``10.0`` for an integer),
    or None when `value` is not one. YAML 1.1 reads ``3e-4`` and ``1e3`` (no dot) as
    strings, so strings are parsed here; a bool is never a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:  # exact for long integers; int() and float() both accept 1_000
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        return None
    if not integer:
        return float(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value


def _arg_type(integer: bool):
    import argparse

    def parse(text: str):
        number = user_number(text, integer=integer)
        if number is None:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if integer else 'a number'}, got {text!r}")
        return number
    parse.__name__ = "int" if integer else "float"
    return parse


int_arg = _arg_type(True)
"""argparse ``type=`` for integers as users write them (1_000, 1e3)."""
float_arg = _arg_type(False)
"""argparse ``type=`` for numbers as users write them (3e-4, 1_000)."""


def describe_path(path: str) -> str:
    """`path` for an error message: a relative one also says where it was looked for
    (relative paths resolve from the working directory of the command)."""
    if os.path.isabs(path):
        return path
    return (f"{path} (looked for {os.path.abspath(path)}; relative paths resolve from the "
            f"working directory {os.getcwd()})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the key."""
    origin, args = get_origin(hint), get_args(hint)
    if value is None:
        _require(type(None) in args, key, "may not be null")
        return None
    if origin in (list, tuple) or (origin is not None and type(None) in args and
                                   get_origin(args[0]) in (list, tuple)):
        seq_hint = args[0] if type(None) in args else hint
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        item = get_args(seq_hint)[0]
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if get_origin(seq_hint) is tuple else items
    if origin is not None and type(None) in args:  # Optional[scalar]
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        number = user_number(value, integer=True)
        _require(number is not None, key, f"expected an integer, got {value!r}")
        return number
    if hint is float:
        number = user_number(value, integer=False)
        _require(number is not None, key, f"expected a number, got {value!r}")
        return number
    if hint is str:
        _require(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
                 f"expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint} (valid: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[name]):
            _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
            kwargs[name] = _build(hints[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    _require(all(path), key, "empty component in dotted key")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return path, value


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Load YAML (optional), apply dotted overrides, validate, and return a Config."""
    values: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {describe_path(path)}: no such file")
        with open(path) as f:
            try:
                loaded = _yaml_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        values = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            _require(isinstance(node, dict), ".".join(keys[: i + 1]), "is not a section")
        node[keys[-1]] = value
    try:
        config = _build(Config, values, "")
    except TypeError as e:  # a missing section type or similar programming slip
        raise ConfigError(str(e)) from None
    _warn_other_method_keys(config.draft)
    return config


def save_config(config: Config, path: str) -> None:
    """Write the resolved config as YAML (atomic)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
