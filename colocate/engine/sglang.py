"""The sglang backend: the target's packed prefill through sglang's ModelRunner, in-process.

Importing this module does not import sglang (it needs CUDA and its own torch); the engine
imports it when constructed, after `colocate.patches.require_sglang` has checked the
installed version and everything the hooks below rely on.

How sglang 0.5.17 sets up distributed state (read from its source)
------------------------------------------------------------------
`ModelRunner.__init__` -> `self.init_torch_distributed()` -> `bootstrap.init_torch_distributed`:
  1. `get_available_gpu_memory(device, gpu)`: local `torch.cuda.mem_get_info`, no collective.
  2. `_init_parallel_groups` (target worker only):
     * `init_distributed_environment(world_size=tp*pp, rank=..., local_rank=gpu_id, ...)`:
       skips `init_process_group` when torch.distributed is initialised (torchrun's world is
       reused), then `_WORLD = init_world_group(list(range(torch world size)), ...)`.
     * `initialize_model_parallel(tp, pp, ...)`: takes the world size from torch, raises
       unless it equals tp * pp, then builds TP, (DCP), attn-CP, attn-TP, MoE-DP, MoE-EP,
       MoE-TP and PP groups as contiguous rank blocks, each through
       `init_model_parallel_group(group_ranks, ...)` -> `GroupCoordinator`. With tp = 1 all
       but TP and PP alias the TP group; with tp > 1 the attn-CP/MoE groups are singletons.
     * `initialize_dp_attention`: reads the TP group; no new groups.
  3. `get_available_gpu_memory(..., distributed=world > 1, cpu_group=WORLD.cpu_group)`: an
     all_reduce(MIN) of free memory over the WORLD group's gloo twin (collective over WORLD).
`GroupCoordinator.__init__` loops over EVERY rank list of the group kind and calls
`torch.distributed.new_group(ranks, backend=nccl)` and `new_group(ranks, backend="gloo")`
for each (collective over torch's default group unless use_local_synchronization=True),
keeps the pair it is a member of, and for world size > 1 builds a PyNccl communicator over
the gloo twin (and custom all-reduce unless disabled). Later collectives on WORLD:
`kv_cache_configurator._profile_available_bytes` (same free-memory all_reduce),
`attention_backend_setup` (world rank/size/cpu group), the loader's structural
all_gather_object and barrier, `dist_barrier_after_load` (monitored_barrier on the TP gloo
group). `ParallelState` (parallel_state_wrapper) is only a frozen record of ranks/sizes the
caller hands to ModelRunner; it creates nothing. `destroy_distributed_environment()` would
destroy torch's default group: never called here.

So, unmodified, sglang's WORLD and group creation span trainers too: trainers would have to
enter every new_group and the WORLD all_reduces, i.e. run sglang. The engine wraps three
functions while ModelRunner is built (colocate/engine/sglang_hooks.py, H1-H3): WORLD =
the engine ranks, the model-parallel rank lists mapped from sglang's contiguous space to
engine ranks, and every new_group made with `use_local_synchronization=True` (only members
call it; the installed torch is checked for the keyword) and refused if it would hold a
trainer. After that, every sglang collective runs on engines-only groups, every NCCL
communicator it creates holds engine ranks only (one per GPU, so no "duplicate GPU"), and
the trainers never enter or wait on anything of sglang's. Runtime hooks were enough: no
patch file is needed for 0.5.17 (`python -m colocate patches check` verifies the hooked
functions and source markers).

What the engine configures (DESIGN section 4)
---------------------------------------------
* CUDA graphs off, radix cache off, overlap schedule off, sampling backend pytorch, custom
  all-reduce off (it needs CUDA IPC buffers between TP ranks; NCCL is enough for prefill).
* Chunked prefill: a scheduler feature; we drive ModelRunner directly, so nothing is ever
  chunked. `chunked_prefill_size` is still set to the union budget so no sglang-side check
  sees a smaller number.
* Memory: `max_total_tokens` = the tokens one forward holds (budget x tp, see below) and
  `max_running_requests` = half of it (sglang caps requests at tokens // 2; every packed
  sequence has >= 2 tokens); `context_length` = data.max_length so the request-to-token
  table is [requests, max_length] int32; `mem_fraction_static` is derived from
  mps.engine_mem_fraction (`static_mem_fraction`). The KV pools are cleared after every
  micro-step, so every forward starts from an empty cache.
* flashinfer: sgl_kernel routes rmsnorm/fused_add_rmsnorm/top-k-top-p to flashinfer when it
  imports, which then JIT-compiles (no sources in the slim bundle);
  `sglang_env.avoid_flashinfer_jit` flips sgl_kernel's switches to its precompiled kernels.

The forward
-----------
ONE extend forward over the packed micro-batch: every packed sequence a separate request
(`Req` -> `ScheduleBatch.prepare_for_extend` -> `ForwardBatch` with CaptureHiddenMode.FULL),
as probe_model_runner.py ran it on an H100. Extend mode without logprobs computes logits for
each sequence's last token only (`LogitsProcessor._get_pruned_states`), not for every
token. `logits_output.hidden_states` is [T, U*H]: the aux layers sglang captured, in
ascending layer order, each id once (`set_eagle3_layers_to_capture` adds one to our ids
itself, so they are passed unchanged). `aux_out` columns follow `target.aux_layer_ids`
order, repeats included, so the columns are copied through a small index map. The final
norm's output for all tokens is what the model hands the logits processor; a forward hook on
`model.model.norm` (output[0]: RMSNorm returns (normed, residual) when fused) copies it into
`last_out`. All copies stay on the device; only the token ids and lengths (already on the
host in the MicroBatch) feed sglang's host-side bookkeeping.

Tensor parallelism (designed; gated, see `build`)
-------------------------------------------------
Each engine must write ITS OWN trainer's micro-step, but a TP group runs one model. So the
TP ranks run the union: every rank all_gathers (over its TP group's gloo twin, which sglang
created engines-only) the token count, sequence count, ids and lengths of every rank's
micro-batch (CPU tensors, two small all_gathers), builds the same requests in TP-rank order,
runs the same forward (hidden states are replicated after each all-reduce) and copies its
own rows [offset_r, offset_r + T_r) into its slot. Memory and request limits are sized for
tp x budget. A slow trainer stalls its TP group's engines: inherent to sharing one model.
"""

from __future__ import annotations

import logging
import os
from array import array
from types import SimpleNamespace

import torch

from colocate.engine.base import TargetEngine, resolve_aux_layer_ids
from colocate.engine.sglang_env import avoid_flashinfer_jit, offline_engine_kwargs
from colocate.engine.sglang_groups import (engine_group_layout, micro_batch_offsets,
                                           validate_engine_tp)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure helpers


def static_mem_fraction(engine_mem_fraction: float, total_bytes: int, free_bytes: int) -> float:
    """sglang's `mem_fraction_static` so that its static memory matches our engine cap.

    sglang budgets weights + KV as mem_fraction_static x (free memory before loading); on a
    shared GPU that free memory already excludes the trainer, so rescale the engine's share
    of the WHOLE GPU to a share of what is free. 0 (no cap) keeps sglang near its usual."""
    if engine_mem_fraction <= 0:
        return 0.85
    return min(0.95, max(0.05, engine_mem_fraction * total_bytes / max(free_bytes, 1)))


def server_args_kwargs(*, path: str, dtype: torch.dtype, load_format: str, attention_backend: str,
                       tp_size: int, tokens_per_forward: int, max_length: int, seed: int,
                       mem_fraction_static: float, quantization: str = "none") -> dict:
    """Keyword arguments of sglang's ServerArgs for one engine (reasons in the docstring)."""
    return offline_engine_kwargs(
        path, dtype=dtype, mem_fraction=mem_fraction_static, seed=seed, cuda_graph=False,
        attention_backend=attention_backend, load_format=load_format,
        quantization=None if quantization == "none" else quantization,
        disable_radix_cache=True,
        disable_overlap_schedule=True,
        disable_custom_all_reduce=True,
        chunked_prefill_size=tokens_per_forward,
        max_total_tokens=tokens_per_forward,
        max_running_requests=max(1, tokens_per_forward // 2),
        context_length=max_length,
        tp_size=tp_size,
    )


class _NoPrefixCache(SimpleNamespace):
    """What ScheduleBatch needs of the scheduler's tree cache when nothing is cached."""

    def supports_swa(self): return False
    def supports_mamba(self): return False
    def is_chunk_cache(self): return False
    def is_tree_cache(self): return True
    def evict(self, params): pass


# --------------------------------------------------------------------------- engine


class SGLangTargetEngine(TargetEngine):
    """sglang ModelRunner prefill with Eagle3 capture; one per engine process."""

    def __init__(self, cfg, device: torch.device, *, default_layer_ids=None,
                 rank: int | None = None,
                 world_size: int | None = None, local_world_size: int | None = None):
        from colocate.engine import resolve_target_dtype
        from colocate.patches import require_sglang

        import torch.distributed as dist

        require_sglang()
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError("engine.backend: sglang needs a CUDA device; use engine.backend=hf "
                             "on CPU")
        if not dist.is_initialized():
            raise ValueError("engine.backend=sglang runs on an engine rank of a torchrun job "
                             "(torch.distributed initialised by colocate's topology)")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        local_world_size = (int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
                            if local_world_size is None else local_world_size)
        tp = cfg.engine.tp_size
        validate_engine_tp(world_size, local_world_size, tp)
        if tp > 1 and rank % 2 == 1 and engine_group_layout(rank, world_size, tp).tp_rank == 0:
            # Ran end to end once (2 x H200, tiny target: loss fell, no hang); its features
            # have not been compared with tp_size=1 the way tests/gpu/sglang_parity.py does.
            log.warning("engine.tp_size=%d: the tensor-parallel engine path is new; its "
                        "features are not yet parity-checked against tp_size=1", tp)
        self.layout = engine_group_layout(rank, world_size, tp)
        self._dtype = resolve_target_dtype(cfg.target.dtype, device)
        self._device = device
        self._budget = cfg.data.tokens_per_micro_step
        # train.sp_size = tp: the TP group's engines hold the same micro-batch (one
        # sequence-parallel group) and prefill it once, together, instead of each its own;
        # one forward is then one micro-batch, not tp of them (the KV pool is sized by it).
        self._same_batch_in_tp = cfg.train.sp_size > 1
        self._tokens_per_forward = self._budget * (1 if self._same_batch_in_tp else tp)
        self._host_batch = None  # the CPU MicroBatch during prefill (no D2H for metadata)
        self._runner = self._build_runner(cfg)
        self._setup_capture(cfg.target.aux_layer_ids, default_layer_ids)

    # ------------------------------------------------------------------ construction

    def _build_runner(self, cfg):
        import torch.distributed as dist

        from colocate.engine.sglang_hooks import sglang_world

        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed.parallel_state_wrapper import ParallelState
        from sglang.srt.layers.dp_attention import compute_dp_attention_world_info
        from sglang.srt.layers.moe import initialize_moe_config
        from sglang.srt.layers.quantization.fp4_utils import initialize_fp4_gemm_config
        from sglang.srt.layers.quantization.fp8_utils import initialize_fp8_gemm_config
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.server_args import PortArgs, ServerArgs

        avoid_flashinfer_jit()
        gpu = self._device.index if self._device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(gpu)
        server_args = ServerArgs(**server_args_kwargs(
            path=cfg.target.path, dtype=self._dtype, load_format=cfg.target.load_format,
            attention_backend=cfg.engine.attention_backend, tp_size=self.layout.tp_size,
            tokens_per_forward=self._tokens_per_forward, max_length=cfg.data.max_length,
            seed=cfg.run.seed, quantization=cfg.engine.quantization,
            mem_fraction_static=static_mem_fraction(cfg.mps.engine_mem_fraction, total, free)))
        port_args = PortArgs.init_new(server_args)  # nccl_port is unused: torch is initialised
        initialize_moe_config(server_args)
        initialize_fp8_gemm_config(server_args)
        initialize_fp4_gemm_config(server_args)
        model_config = ModelConfig.from_server_args(server_args)
        tp, tp_rank = self.layout.tp_size, self.layout.tp_rank
        a_tp_rank, a_tp_size, a_dp_rank, a_dp_size = compute_dp_attention_world_info(
            False, tp_rank, tp, server_args.dp_size, server_args.attn_cp_size)
        ps = ParallelState(
            tp_rank=tp_rank, tp_size=tp, pp_rank=0, pp_size=1, dp_rank=None,
            dp_size=server_args.dp_size, attn_tp_rank=a_tp_rank, attn_tp_size=a_tp_size,
            attn_cp_rank=0, attn_cp_size=server_args.attn_cp_size, attn_dp_rank=a_dp_rank,
            attn_dp_size=a_dp_size, moe_ep_rank=0, moe_ep_size=server_args.ep_size,
            moe_dp_rank=None, moe_dp_size=server_args.moe_dp_size,
            dcp_size=server_args.dcp_size, gpu_id=gpu)
        with sglang_world(self.layout, dist.get_world_size()):
            runner = ModelRunner(model_config=model_config,
                                 mem_fraction_static=server_args.mem_fraction_static, gpu_id=gpu,
                                 ps=ps, nccl_port=port_args.nccl_port, server_args=server_args)
            if cfg.target.load_format == "dummy":
                self._seed_dummy_embedding(runner.model, cfg.run.seed)
            runner.alloc_memory_pool()
            runner.init_attention_backends()
            runner.init_cuda_graphs()  # no-op with disable_cuda_graph; kept for sglang's state
        self._server_args = server_args
        text = model_config.hf_text_config
        self._hidden_size = int(text.hidden_size)
        self._vocab_size = int(text.vocab_size)
        self._num_layers = int(text.num_hidden_layers)
        if runner.max_total_num_tokens < self._tokens_per_forward:
            raise ValueError(
                f"mps.engine_mem_fraction: sglang's KV pool holds {runner.max_total_num_tokens} "
                f"tokens, fewer than one forward's {self._tokens_per_forward} "
                f"(data.tokens_per_micro_step x engine.tp_size); raise mps.engine_mem_fraction "
                "or lower data.tokens_per_micro_step")
        self._max_requests = int(runner.max_running_requests)
        return runner

    def _seed_dummy_embedding(self, model, seed: int) -> None:
        """The trainer's seeded embedding (`target.dummy_embed`) into sglang's dummy model,
        this rank's VocabParallelEmbedding shard only; padding rows zeroed."""
        from colocate.target import dummy_embed

        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        embed = dummy_embed(int(text.vocab_size), int(text.hidden_size), seed=seed,
                            dtype=self._dtype, device=self._device)
        layer = model.model.embed_tokens
        weight = layer.weight
        idx = getattr(layer, "shard_indices", None)
        start, end = (idx.org_vocab_start_index, idx.org_vocab_end_index) if idx else \
            (0, embed.shape[0])
        with torch.no_grad():
            weight.zero_()
            weight[: end - start].copy_(embed[start:end])
        del embed
        torch.cuda.empty_cache()  # the whole table is transient; sglang profiles free memory next

    def _setup_capture(self, configured_ids, default_layer_ids=None) -> None:
        model = self._runner.model
        self._aux_layer_ids = resolve_aux_layer_ids(configured_ids, self._num_layers,
                                                    default=default_layer_ids)
        captured = sorted(set(self._aux_layer_ids))
        # sglang adds one to each id itself (captures layer id+1's input = layer id's output).
        model.set_eagle3_layers_to_capture(captured)
        self._aux_columns = [captured.index(i) for i in self._aux_layer_ids]
        self._norm_out: list[torch.Tensor] = []
        model.model.norm.register_forward_hook(self._norm_hook)

    def _norm_hook(self, module, args, output) -> None:
        # Fused RMSNorm returns (normed, residual); plain RMSNorm the normed tensor. The
        # reference is dropped after the forward; the data is copied out before then.
        self._norm_out.append(output[0] if isinstance(output, (tuple, list)) else output)

    # ------------------------------------------------------------------ prefill

    def prefill(self, batch, writer, *, budget: int, chunk=None) -> None:
        self._host_batch = batch  # host ids/lengths for sglang's bookkeeping, no D2H sync
        try:
            super().prefill(batch, writer, budget=budget, chunk=chunk)
        finally:
            self._host_batch = None

    def _host_inputs(self, input_ids: torch.Tensor, seq_lens: torch.Tensor):
        if self._host_batch is not None:
            return (self._host_batch.input_ids.to(torch.int64).cpu(),
                    self._host_batch.seq_lens.to(torch.int64).cpu())
        # Called directly (tests): one device->host copy of the ids.
        return input_ids.to(torch.int64).cpu(), seq_lens.to(torch.int64).cpu()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 aux_out: torch.Tensor, last_out: torch.Tensor | None) -> None:
        ids, lens = self._host_inputs(input_ids, seq_lens)
        offset, num_tokens = 0, ids.numel()
        if self.layout.tp_size > 1 and not self._same_batch_in_tp:
            all_ids, all_lens = exchange_micro_batches(ids, lens)
            offset = micro_batch_offsets([t.numel() for t in all_ids])[self.layout.tp_rank]
            ids, lens = torch.cat(all_ids), torch.cat(all_lens)
        if lens.numel() > self._max_requests:
            raise ValueError(f"the forward has {lens.numel()} sequences, over sglang's "
                             f"{self._max_requests} requests (max_running_requests); sequences "
                             "shorter than 2 tokens? check the data")
        self._norm_out.clear()
        try:
            hidden = self._run_extend(ids, lens)
            h, rows = self.hidden_size, slice(offset, offset + num_tokens)
            assert hidden is not None and hidden.shape[1] == h * len(set(self._aux_columns)), \
                "sglang returned no Eagle3 capture (set_eagle3_layers_to_capture not in effect)"
            assert len(self._norm_out) == 1, "the final norm hook fired %d times" % len(self._norm_out)
            mine = hidden[rows]
            if self._aux_columns == list(range(len(self._aux_columns))):
                aux_out.copy_(mine)
            else:
                for i, j in enumerate(self._aux_columns):
                    aux_out[:, i * h:(i + 1) * h].copy_(mine[:, j * h:(j + 1) * h])
            if last_out is not None:
                last_out.copy_(self._norm_out[0][rows])
        finally:
            self._norm_out.clear()
            # Every micro-step starts from empty pools: nothing is cached across steps.
            self._runner.req_to_token_pool.clear()
            self._runner.token_to_kv_pool_allocator.clear()

    def _run_extend(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """One extend forward, one request per sequence; returns the packed aux capture."""
        from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch
        from sglang.srt.sampling.sampling_params import SamplingParams
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        runner = self._runner
        reqs, start = [], 0
        for i, n in enumerate(lens.tolist()):  # host tensors: no device sync
            req = Req(rid=str(i), origin_input_text="",
                      origin_input_ids=array("q", ids[start:start + n].tolist()),
                      sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
            req.full_untruncated_fill_ids = req.origin_input_ids
            req.logprob_start_len = -1
            req.set_extend_range(len(req.prefix_indices), len(req.origin_input_ids))
            reqs.append(req)
            start += n
        cache = _NoPrefixCache(page_size=self._server_args.page_size, device=runner.device,
                               token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator)
        batch = ScheduleBatch.init_new(
            reqs=reqs, req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, tree_cache=cache,
            model_config=runner.model_config, enable_overlap=False,
            spec_algorithm=SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device, non_blocking=True)
            batch.prefill_input_ids_cpu = None
        forward_batch = ForwardBatch.init_new(batch, runner,
                                              capture_hidden_mode=CaptureHiddenMode.FULL,
                                              return_hidden_states_before_norm=False)
        return runner.forward(forward_batch).logits_output.hidden_states

def exchange_micro_batches(ids: torch.Tensor, lens: torch.Tensor
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """tp > 1: every TP rank's (ids, seq_lens), in TP-rank order, over the TP group's gloo
    twin (CPU tensors; two small all_gathers: sizes, then padded payloads)."""
    import torch.distributed as dist
    from sglang.srt.distributed import get_tp_group

    group = get_tp_group().cpu_group
    n = dist.get_world_size(group)
    sizes = torch.tensor([ids.numel(), lens.numel()], dtype=torch.int64)
    all_sizes = [torch.zeros(2, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(all_sizes, sizes, group=group)
    max_t = max(int(s[0]) for s in all_sizes)
    max_s = max(int(s[1]) for s in all_sizes)
    payload = torch.zeros(max_t + max_s, dtype=torch.int64)
    payload[:ids.numel()] = ids
    payload[max_t:max_t + lens.numel()] = lens
    gathered = [torch.zeros_like(payload) for _ in range(n)]
    dist.all_gather(gathered, payload, group=group)
    out_ids = [g[:int(s[0])] for g, s in zip(gathered, all_sizes)]
    out_lens = [g[max_t:max_t + int(s[1])] for g, s in zip(gathered, all_sizes)]
    return out_ids, out_lens
