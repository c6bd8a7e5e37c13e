"""Config sections of the commands beside training: `bench`, `generate` (also online
decode's answering) and `eval`."""

from __future__ import annotations

from dataclasses import dataclass

from colocate.config.parse import require


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
        require(self.engine in ("run", "replay"), "bench.engine",
                 f"got {self.engine!r}; use run or replay")
        require(self.trainer in ("train", "discard"), "bench.trainer",
                 f"got {self.trainer!r}; use train or discard")
        require(not (self.engine == "replay" and self.trainer == "discard"), "bench.engine",
                 "replay with bench.trainer=discard measures nothing; set one of them only")
        require(self.replay_micro_steps >= 1, "bench.replay_micro_steps", "must be >= 1")


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
        require(self.engine in ("auto", "hf", "sglang"), "generate.engine",
                 f"got {self.engine!r}; use auto, hf or sglang")
        require(self.max_new_tokens >= 1, "generate.max_new_tokens",
                 f"got {self.max_new_tokens}; must be >= 1")
        require(self.temperature >= 0, "generate.temperature",
                 f"got {self.temperature}; use 0 (greedy) or a positive temperature")
        require(0 < self.top_p <= 1, "generate.top_p", f"got {self.top_p}; use (0, 1]")
        require(self.batch_size >= 0, "generate.batch_size",
                 f"got {self.batch_size}; use 0 (auto) or a number of prompts")
        require(self.chunk_records >= 1, "generate.chunk_records",
                 f"got {self.chunk_records}; must be >= 1")
        require(0 <= self.mem_fraction < 1, "generate.mem_fraction",
                 f"got {self.mem_fraction}; use 0 (auto) or a fraction in (0, 1)")
        require(self.ahead_chunks >= 1, "generate.ahead_chunks",
                 f"got {self.ahead_chunks}; must be >= 1")
        require(self.keep_greedy_mb >= 0, "generate.keep_greedy_mb",
                 f"got {self.keep_greedy_mb}; use 0 (off) or a size in MB")
        require(self.tp_size >= 1, "generate.tp_size", f"got {self.tp_size}; must be >= 1")
        require(self.cuda_graph_max_batch >= 0, "generate.cuda_graph_max_batch",
                 f"got {self.cuda_graph_max_batch}; use 0 (sglang's default) or a batch size")
        require(self.cuda_graph or not self.cuda_graph_max_batch, "generate.cuda_graph_max_batch",
                f"{self.cuda_graph_max_batch} has no effect without CUDA graphs; set "
                "generate.cuda_graph=true, or leave it 0")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES, "generate.kv_cache_dtype",
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
        require(self.engine in ("auto", "hf", "sglang", "both"), "eval.engine",
                 f"got {self.engine!r}; use auto, hf, sglang or both")
        require(self.num_prompts >= 1, "eval.num_prompts", f"got {self.num_prompts}; must be >= 1")
        require(1 <= self.steps <= 32, "eval.steps", f"got {self.steps}; use 1..32 (4 is typical)")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens",
                 f"got {self.max_new_tokens}; must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", f"got {self.batch_size}; must be >= 1")
        require(0 < self.mem_fraction < 1, "eval.mem_fraction",
                 f"got {self.mem_fraction}; use a fraction in (0, 1)")
        require(self.every_steps >= 0, "eval.every_steps",
                 f"got {self.every_steps}; use 0 (never) or a step interval")
        require(self.timeout_s > 0, "eval.timeout_s", f"got {self.timeout_s}; must be > 0")
