"""The target answering prompts: token ids in, the ids it generates out.

One small interface, `Generator.generate(prompts, seeds) -> list[Generation]`, two backends:

* hf: transformers `generate` on any device (the CPU path, CI, the reference). Prompts are
  sorted by length and batched with LEFT padding plus an attention mask, so every row's
  new tokens start at the same column. transformers derives the positions from the mask,
  and in fp32 on CPU a batched row matched the same prompt generated alone token for token
  (tests/unit/test_generate.py). The model's own generation_config is replaced by ours:
  a checkpoint's suggested top_k / repetition penalty must not change what we sample.
* sglang: ONE offline `sglang.Engine` over every visible GPU (tp_size GPUs per replica,
  the rest data parallel through sglang's dp_size), prompts as input_ids, every sampling
  parameter explicit. (`Engine.generate` applies no generation_config.json sampling
  defaults: in sglang 0.5.17 only the OpenAI chat server reads them; an Engine adds only
  server_args.preferred_sampling_params, which we leave unset.) Per-request seeds need
  `enable_deterministic_inference`, set when sampling (temperature > 0).
  sglang is imported only here, inside functions: it is a GPU-host dependency.

Both stop on the same ids, the ones `colocate eval` stops on too
(`colocate.target.stop_token_ids`). A reply that stopped keeps its stop id (the draft must
learn to stop).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

if TYPE_CHECKING:
    from colocate.config import Config

log = logging.getLogger(__name__)

# generate.batch_size=0 on hf. The tiny target on 2 busy CPU cores, 500 records x 256 new
# tokens: batch 16 gave 542 tok/s, 32 gave 805, 64 gave 669 (longer padded rows).
_HF_BATCH = 32


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    """0: greedy."""
    top_p: float
    stop_ids: tuple[int, ...]


@dataclass(frozen=True)
class Generation:
    ids: list[int]
    """The generated ids, ending with the stop id when the reply stopped on one."""
    finish_reason: str
    """"stop" (ended on a stop id) or "length" (cut at max_new_tokens)."""


class Generator(Protocol):
    name: str
    """The engine's name (generate.engine's value for the built-in ones): in the summary and
    the resume fingerprint."""

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 on_batch: Callable[[int, int], None] | None = None,
                 max_new_tokens: list[int] | None = None) -> list[Generation]:
        """One reply per prompt, in order. `seeds` seed sampling per prompt where the backend
        can; `on_batch(num_replies, num_tokens)` is called as batches finish (progress);
        `max_new_tokens`: a per-prompt cap below the sampling's (online decode fits replies
        to the training length)."""

    def close(self) -> None: ...


def split_stop(generated: list[int], stop_ids: tuple[int, ...]) -> Generation:
    """Cut raw generated ids after the first stop id (hf pads finished rows after it)."""
    for n, token in enumerate(generated):
        if token in stop_ids:
            return Generation(generated[:n + 1], "stop")
    return Generation(generated, "length")


def resolve_engine(name: str, device_type: str) -> str:
    """generate.engine, with auto decided: sglang when the run's device is CUDA and sglang
    is installed (checked without importing it: the import alone takes ~25 s)."""
    if name == "auto":
        usable = device_type == "cuda" and importlib.util.find_spec("sglang") is not None
        return "sglang" if usable else "hf"
    if name == "sglang" and device_type != "cuda":
        raise ValueError("generate.engine: sglang needs CUDA GPUs (and run.device auto or "
                         "cuda); use generate.engine=hf or auto on this machine")
    return name


@dataclass(frozen=True)
class Backend:
    """What decodes: generate.engine resolved on this machine, with its device and dtype."""

    engine: str
    device: torch.device
    dtype: torch.dtype


def resolve_backend(cfg: "Config") -> Backend:
    """generate.engine, run.device and target.dtype as they resolve here (decided before any
    model loads: the resume fingerprint holds them)."""
    from colocate.engine import resolve_target_dtype
    from colocate.topology import resolve_device_type

    device = torch.device(resolve_device_type(cfg.run.device))
    return Backend(resolve_engine(cfg.generate.engine, device.type), device,
                   resolve_target_dtype(cfg.target.dtype, device))


def build_generator(cfg: "Config", sampling: Sampling, pad_id: int,
                    device: torch.device | None = None) -> Generator:
    """The backend generate.engine names, with the target of cfg.target loaded. `device`:
    online decode on an engine rank, which answers on its own GPU only (sglang: one replica
    there, in half of the engine's memory share unless generate.mem_fraction says)."""
    backend = resolve_backend(cfg)
    gen = cfg.generate
    log.info("generate: %s engine on %s, %s", backend.engine, backend.device.type,
             str(backend.dtype).removeprefix("torch."))
    if backend.engine == "hf":
        if gen.kv_cache_dtype != "auto":
            raise ValueError(f"generate.kv_cache_dtype={gen.kv_cache_dtype}: the hf engine "
                             "caches at the target's dtype; use generate.kv_cache_dtype=auto "
                             "or generate.engine=sglang")
        return HFGenerator(cfg.target.path, sampling=sampling, device=device or backend.device,
                           dtype=backend.dtype, batch_size=gen.batch_size, pad_id=pad_id,
                           load_format=cfg.target.load_format, seed=cfg.run.seed)
    if device is None:
        return SGLangGenerator(cfg.target.path, sampling=sampling, dtype=backend.dtype,
                               tp_size=gen.tp_size, mem_fraction=gen.mem_fraction or 0.85,
                               seed=cfg.run.seed, batch_size=gen.batch_size,
                               load_format=cfg.target.load_format, cuda_graph=gen.cuda_graph,
                               kv_cache_dtype=gen.kv_cache_dtype,
                               cuda_graph_max_batch=gen.cuda_graph_max_batch)
    if gen.tp_size != 1:
        raise ValueError("generate.tp_size: online decode answers on each engine's own GPU; "
                         "use generate.tp_size=1 with data.source=generate")
    from colocate.engine.sglang import static_mem_fraction
    from colocate.generate.child import ChildGenerator

    # Its share of the GPU, as sglang counts it (a fraction of the memory free right now:
    # the prefill engine is loaded, the trainer not yet).
    free, total = torch.cuda.mem_get_info(device)
    share = gen.mem_fraction or cfg.mps.engine_mem_fraction / 2
    return ChildGenerator(SGLangGenerator, dict(
        path=cfg.target.path, sampling=sampling, dtype=backend.dtype, tp_size=1,
        mem_fraction=static_mem_fraction(share, total, free), seed=cfg.run.seed,
        batch_size=gen.batch_size, load_format=cfg.target.load_format,
        cuda_graph=gen.cuda_graph, kv_cache_dtype=gen.kv_cache_dtype,
        cuda_graph_max_batch=gen.cuda_graph_max_batch, gpu=device.index),
        timeout_s=cfg.run.startup_timeout_s, who=f"the engine on {device}")


class HFGenerator:
    """transformers `generate`, batched with left padding."""

    name = "hf"

    def __init__(self, path: str, *, sampling: Sampling, device: torch.device,
                 dtype: torch.dtype, batch_size: int, pad_id: int, load_format: str = "auto",
                 seed: int = 0):
        from transformers import GenerationConfig

        from colocate.engine.hf import dummy_causal_lm, load_causal_lm

        model = (dummy_causal_lm(path, dtype, "sdpa", device, seed) if load_format == "dummy"
                 else load_causal_lm(path, dtype, "sdpa"))
        self.model = model.requires_grad_(False).eval().to(device)
        sample = sampling.temperature > 0
        # Ours only (top_k=0: no top-k, where transformers would default to 50).
        extra = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0) \
            if sample else {}
        self.model.generation_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=sample,
            eos_token_id=list(sampling.stop_ids), pad_token_id=pad_id, **extra)
        self.sampling = sampling
        self.device = torch.device(device)
        self.batch_size = batch_size or _HF_BATCH
        self.pad_id = pad_id

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 on_batch: Callable[[int, int], None] | None = None,
                 max_new_tokens: list[int] | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        limits = max_new_tokens or [self.sampling.max_new_tokens] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            for i, generation in zip(rows, self._batch([prompts[i] for i in rows],
                                                       seeds[rows[0]], [limits[i] for i in rows])):
                out[i] = generation
            if on_batch is not None:
                on_batch(len(rows), sum(len(out[i].ids) for i in rows))
        return out

    def _batch(self, prompts: list[list[int]], seed: int, limits: list[int]
               ) -> list[Generation]:
        """One generate call; row i is cut at limits[i] new tokens (greedy: what generating
        with that limit gives; the call runs to the largest)."""
        width = max(len(p) for p in prompts)
        ids_BL = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros_like(ids_BL)
        for row, prompt in enumerate(prompts):
            ids_BL[row, width - len(prompt):] = torch.tensor(prompt)
            mask_BL[row, width - len(prompt):] = 1
        if self.sampling.temperature > 0:
            torch.manual_seed(seed)  # one stream per batch: deterministic for the same batches
        with torch.no_grad():
            out_BT = self.model.generate(input_ids=ids_BL.to(self.device),
                                         attention_mask=mask_BL.to(self.device),
                                         max_new_tokens=max(limits))
        return [split_stop(row[:limit], self.sampling.stop_ids)
                for row, limit in zip(out_BT[:, width:].tolist(), limits)]

    def close(self) -> None:
        del self.model


class SGLangGenerator:
    """One offline sglang Engine: tp_size GPUs per replica, every visible GPU used."""

    name = "sglang"

    def __init__(self, path: str, *, sampling: Sampling, dtype: torch.dtype, tp_size: int,
                 mem_fraction: float, seed: int, batch_size: int, load_format: str = "auto",
                 cuda_graph: bool = False, kv_cache_dtype: str = "auto",
                 cuda_graph_max_batch: int = 0, gpu: int | None = None):
        """`gpu`: one replica on that GPU only (online decode); else every visible GPU.
        `kv_cache_dtype`, `cuda_graph_max_batch`: generate.* of the same names."""
        from colocate.engine.sglang_env import offline_engine_env, offline_engine_kwargs

        num_gpus = torch.cuda.device_count() if gpu is None else 1
        if num_gpus % tp_size:
            raise ValueError(f"generate.tp_size: {tp_size} does not divide the {num_gpus} "
                             "visible GPUs; use a divisor, or set CUDA_VISIBLE_DEVICES")
        offline_engine_env()  # before the Engine spawns its scheduler processes
        import sglang

        # Per-request sampling_seed is honoured only in deterministic mode (sglang 0.5.17,
        # SamplingBatchInfo.from_schedule_batch); greedy needs no seed, and the mode costs
        # speed (batch-invariant kernels), so it is on for sampling only.
        extra = {"enable_deterministic_inference": True} if sampling.temperature > 0 else {}
        if gpu is not None:
            extra["base_gpu_id"] = gpu
        if cuda_graph and cuda_graph_max_batch:
            extra["cuda_graph_max_bs_decode"] = cuda_graph_max_batch
        self.engine = sglang.Engine(**offline_engine_kwargs(
            path, dtype=dtype, mem_fraction=mem_fraction, seed=seed, cuda_graph=cuda_graph,
            load_format=load_format, tp_size=tp_size, dp_size=num_gpus // tp_size,
            kv_cache_dtype=kv_cache_dtype, **extra))
        self.sampling = sampling
        self.batch_size = batch_size
        log.info("sglang engine: %d GPU(s), tp_size %d x dp_size %d", num_gpus, tp_size,
                 num_gpus // tp_size)

    def _params(self, seed: int, max_new_tokens: int) -> dict:
        s = self.sampling
        params = dict(max_new_tokens=max_new_tokens, temperature=s.temperature,
                      top_p=s.top_p, top_k=-1, min_p=0.0, repetition_penalty=1.0,
                      stop_token_ids=list(s.stop_ids))
        if s.temperature > 0:
            params["sampling_seed"] = seed
        return params

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 on_batch: Callable[[int, int], None] | None = None,
                 max_new_tokens: list[int] | None = None) -> list[Generation]:
        out: list[Generation] = []
        limits = max_new_tokens or [self.sampling.max_new_tokens] * len(prompts)
        step = self.batch_size or len(prompts)
        for start in range(0, len(prompts), step):
            window = slice(start, start + step)
            batch = self.engine.generate(
                input_ids=prompts[window],
                sampling_params=[self._params(s, n) for s, n in zip(seeds[window], limits[window])])
            for result in batch:
                reason = result["meta_info"]["finish_reason"]
                reason = reason.get("type") if isinstance(reason, dict) else reason
                if reason == "abort":
                    raise RuntimeError(f"sglang aborted a request: {result['meta_info']}")
                out.append(Generation(list(result["output_ids"]),
                                      "stop" if reason == "stop" else "length"))
            if on_batch is not None:
                on_batch(len(batch), sum(len(g.ids) for g in out[start:]))
        return out

    def close(self) -> None:
        self.engine.shutdown()
