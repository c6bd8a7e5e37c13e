"""Runtime hooks that confine sglang's distributed state to the engine ranks.

sglang (0.5.17) assumes it owns torch's world; colocate's world also holds the trainers.
Three sglang/torch functions are wrapped, from outside and only while `ModelRunner` is being
constructed on an engine rank (`sglang_world`), then restored:

  H1 parallel_state.init_world_group(ranks=range(torch world), ...)
       -> called with the explicit engine ranks: sglang's WORLD = the engines only, so its
          memory probes (`get_available_gpu_memory(distributed=True)`), structural
          all_gathers and barriers run on an engines-only gloo group.
  H2 bootstrap.initialize_model_parallel(tp, pp=1, ...)
       -> called with pp = torch_world // tp (sglang checks world == tp * pp and reads the
          world size from torch), while parallel_state.init_model_parallel_group is wrapped
          to map the virtual rank lists to global engine ranks (`translate_groups`): TP,
          attention, MoE groups become blocks of engines; the inflated "pp" groups become
          singletons (the real pipeline degree is 1); groups of padding ranks are dropped.
  H3 torch.distributed.new_group(...)
       -> forced to `use_local_synchronization=True` and checked to hold engine ranks only.
          Without it new_group is collective over the default group: every rank, trainers
          included, would have to call it in the same order; with it only members call it
          (non-members return at once) and the group gets a name hashed from its ranks and
          the caller's group count, which the engines agree on because topology created the
          same groups on every rank before. Trainers therefore never enter sglang's group
          creation, and a trainer-only group made later cannot collide with an sglang one.

`HOOK_TARGETS` and `SOURCE_MARKERS` list what these hooks rely on; `colocate patches check`
verifies them against the installed sglang files without importing sglang, and a unit test
fails when a marker disappears from a fake tree.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

from colocate.engine.sglang_groups import EngineGroupLayout, translate_groups

SUPPORTED_SGLANG = ("0.5.17",)

# (file under the sglang package, function that must exist there, why we need it)
HOOK_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("srt/distributed/parallel_state.py", "init_world_group",
     "H1: WORLD group over the engine ranks"),
    ("srt/distributed/parallel_state.py", "init_model_parallel_group",
     "H2: TP/attention/MoE/PP rank lists translated to engine ranks"),
    ("srt/distributed/parallel_state.py", "initialize_model_parallel",
     "H2: the function run with a padded pipeline degree"),
    ("srt/distributed/bootstrap.py", "init_torch_distributed",
     "the entry point ModelRunner calls; it must reach H2 through bootstrap's name"),
    ("srt/distributed/bootstrap.py", "_init_parallel_groups",
     "calls initialize_model_parallel by the name H2 replaces"),
)

# (file, exact text, why): behaviour the hooks depend on beyond a function's existence.
SOURCE_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("srt/distributed/parallel_state.py",
     "ranks = list(range(torch.distributed.get_world_size()))",
     "H1 expects sglang to ask for a WORLD over the whole torch world"),
    ("srt/distributed/parallel_state.py", "_WORLD = init_world_group(",
     "H1 wraps the name init_distributed_environment calls"),
    ("srt/distributed/parallel_state.py", "torch.distributed.new_group(",
     "H3 wraps torch.distributed.new_group as GroupCoordinator calls it"),
    ("srt/distributed/bootstrap.py", "initialize_model_parallel(",
     "H2 replaces bootstrap's imported name"),
    ("srt/model_executor/model_runner.py", "bootstrap.init_torch_distributed(",
     "ModelRunner reaches the hooked functions through bootstrap"),
    ("srt/models/llama.py", "[val + 1 for val in layer_ids]",
     "Eagle3 ids are passed unchanged: sglang adds the one itself"),
    ("srt/models/qwen2.py", "[val + 1 for val in layer_ids]",
     "same for Qwen2-family models"),
    ("srt/models/qwen3.py", "[val + 1 for val in layer_ids]",
     "same for Qwen3"),
    ("srt/mem_cache/memory_pool.py", "def clear(self):",
     "the KV pools are cleared after every micro-step"),
)


class SglangHookError(RuntimeError):
    """The installed sglang no longer has what a hook wraps; names the hook and the fix."""


def _require(module, name: str, hook: str):
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SglangHookError(
            f"{hook}: {module.__name__}.{name} not found in the installed sglang; colocate "
            f"supports sglang {', '.join(SUPPORTED_SGLANG)} (run `python -m colocate patches "
            "check`)")
    return fn


@contextlib.contextmanager
def sglang_world(layout: EngineGroupLayout, torch_world_size: int) -> Iterator[None]:
    """Hooks H1-H3 active for the body (constructing ModelRunner), restored afterwards.

    Only engine ranks enter; the body runs single-threaded on the rank's main thread (group
    creation happens nowhere else then), so swapping module attributes is safe."""
    import torch.distributed as dist
    from sglang.srt.distributed import bootstrap
    from sglang.srt.distributed import parallel_state as psm

    orig_world = _require(psm, "init_world_group", "H1")
    orig_group = _require(psm, "init_model_parallel_group", "H2")
    orig_init_mp = _require(bootstrap, "initialize_model_parallel", "H2")
    orig_new_group = dist.new_group
    if "use_local_synchronization" not in inspect.signature(orig_new_group).parameters:
        raise SglangHookError("H3: this torch's new_group has no use_local_synchronization "
                              "(torch >= 2.2 needed for the sglang backend)")
    world = tuple(layout.world)

    def init_world_group(ranks, local_rank, backend, *args, **kwargs):
        if list(ranks) != list(range(torch_world_size)):
            raise SglangHookError(f"H1: sglang asked for a WORLD of {list(ranks)}, expected "
                                  f"range({torch_world_size}); its world setup changed")
        return orig_world(list(world), local_rank, backend, *args, **kwargs)

    def init_model_parallel_group(group_ranks, local_rank, backend, *args, group_name=None,
                                  **kwargs):
        return orig_group(translate_groups(group_name, group_ranks, world), local_rank,
                          backend, *args, group_name=group_name, **kwargs)

    def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                                  pipeline_model_parallel_size: int = 1, **kwargs):
        tp = tensor_model_parallel_size
        if pipeline_model_parallel_size != 1 or torch_world_size % tp:
            raise SglangHookError(f"H2: pp={pipeline_model_parallel_size}, tp={tp} in a torch "
                                  f"world of {torch_world_size}; colocate runs pp=1 and a tp "
                                  "dividing the engines (engine.tp_size)")
        psm.init_model_parallel_group = init_model_parallel_group
        try:  # padded pp: sglang's world == tp * pp check passes; phantoms are dropped
            return orig_init_mp(tensor_model_parallel_size=tp,
                                pipeline_model_parallel_size=torch_world_size // tp, **kwargs)
        finally:
            psm.init_model_parallel_group = orig_group

    def new_group(ranks=None, *args, **kwargs):
        members = list(range(torch_world_size)) if ranks is None else list(ranks)
        stray = sorted(set(members) - set(world))
        if stray:
            raise SglangHookError(f"H3: sglang tried to create a group {members} holding "
                                  f"non-engine ranks {stray}; engines are {list(world)}")
        kwargs["use_local_synchronization"] = True
        return orig_new_group(members, *args, **kwargs)

    psm.init_world_group = init_world_group
    bootstrap.initialize_model_parallel = initialize_model_parallel
    dist.new_group = new_group
    try:
        yield
    finally:
        psm.init_world_group = orig_world
        bootstrap.initialize_model_parallel = orig_init_mp
        dist.new_group = orig_new_group
