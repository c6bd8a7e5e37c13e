"""Config sections of the job's machinery: the run, MPS, the transport ring, the frozen
target and the engine that prefills it."""

from __future__ import annotations

from dataclasses import dataclass

from colocate.config.parse import require


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
        require(self.device in ("auto", "cuda", "cpu"), "run.device",
                 f"got {self.device!r}; use auto, cuda or cpu")
        require(self.timeout_s > 0, "run.timeout_s", "must be > 0 seconds")
        require(self.startup_timeout_s >= self.timeout_s, "run.startup_timeout_s",
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
    wait. A driver whose MPS lacks client priorities ignores it. Measured with online
    decode on an H200 (docs/online.md): both sides got slower."""
    engine_priority: str = "normal"
    """The same for the engine ranks: low lets the trainer's kernels go first. Measured on an
    H200 (examples/bench/README.md), where the trainer is the slower side: colocated K=3
    steps took 0.85 s either way, trainer stream time (with the starved engine, the trainer
    waited for features 25% of its time)."""
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
        require(self.mode in ("auto", "required", "off"), "mps.mode",
                 f"got {self.mode!r}; use auto, required or off")
        for key in ("trainer_priority", "engine_priority"):
            v = getattr(self, key)
            require(v in ("normal", "low"), f"mps.{key}", f"got {v!r}; use normal or low")
        require(not self.trainer_priority == self.engine_priority == "low", "mps.engine_priority",
                "trainer and engine both low: only the difference between them matters; set "
                "one of them back to normal")
        for key in ("trainer_sm_percent", "engine_sm_percent"):
            v = getattr(self, key)
            require(1 <= v <= 100, f"mps.{key}", f"got {v}; use a percentage in 1..100")
        for key in ("trainer_mem_fraction", "engine_mem_fraction", "reserve_mem_fraction"):
            v = getattr(self, key)
            require(0.0 <= v < 1.0, f"mps.{key}", f"got {v}; use a fraction in [0, 1)")
        total = self.trainer_mem_fraction + self.engine_mem_fraction + self.reserve_mem_fraction
        require(total <= 1.0 + 1e-9, "mps.trainer_mem_fraction",
                 f"trainer ({self.trainer_mem_fraction}) + engine ({self.engine_mem_fraction}) + "
                 f"reserve ({self.reserve_mem_fraction}) = {total:.3f} > 1; lower one of them")


@dataclass(kw_only=True)
class TransportSection:
    num_slots: int = 2
    """Ring slots per pair. >= 2 lets the engine prefill micro-step n+1 while the trainer
    learns on n; 1 is the serial baseline."""

    def __post_init__(self):
        require(1 <= self.num_slots <= 16, "transport.num_slots",
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
        require(bool(self.path), "target.path", "set the local directory of the target model")
        require(self.dtype in ("auto", "bfloat16", "float16", "float32"), "target.dtype",
                 f"got {self.dtype!r}; use auto, bfloat16, float16 or float32")
        require(self.load_format in ("auto", "dummy"), "target.load_format",
                 f"got {self.load_format!r}; use auto or dummy")
        if self.aux_layer_ids is not None:
            require(len(self.aux_layer_ids) > 0, "target.aux_layer_ids",
                     "give at least one layer id, or leave it null for Eagle3's default")


@dataclass(kw_only=True)
class EngineSection:
    backend: str = "hf"
    """hf (transformers; any device, the reference) or sglang (in-process, the fast path)."""
    tp_size: int = 1
    """Engine tensor parallelism: engine ranks that share one target replica."""
    attention_backend: str = "triton"
    """sglang attention backend (sglang backend only)."""
    quantization: str = "none"
    """none, or fp8: sglang quantizes the target's linear layers to FP8 as it loads them
    (per-tensor weights, dynamic activations) and prefills with FP8 GEMMs. Only the
    training engine's features change, toward those of a target served in FP8; the
    trainer's teacher head stays bf16. sglang backend only. Measured on one H200
    (examples/bench/README.md, 2026-12-02): the Qwen3-8B-shaped engine alone 43.5k ->
    55.7k tok/s, colocated K=3 18.8k -> 21.6k; on the tiny target it moved the features by
    7-8% (relative); a draft trained on them served 2.60 against 2.65 (hf bf16 features) and
    simulated 2.60 against 2.72 (sglang bf16 features). Off by default: it trades draft
    quality for speed, and that trade was measured on a tiny model only, one run each."""

    def __post_init__(self):
        require(self.backend in ("hf", "sglang"), "engine.backend",
                 f"got {self.backend!r}; use hf or sglang")
        require(self.quantization in ("none", "fp8"), "engine.quantization",
                 f"got {self.quantization!r}; use none or fp8")
        require(self.tp_size >= 1, "engine.tp_size", f"got {self.tp_size}; must be >= 1")
