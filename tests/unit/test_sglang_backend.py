"""The sglang backend without sglang: lazy import, hooks on a fake sglang, ServerArgs, config."""

import subprocess
import sys
import types

import pytest
import torch

from colocate.config import ConfigError, load_config
from colocate.engine.sglang_groups import engine_group_layout


def test_importing_the_backend_does_not_import_sglang():
    code = ("import sys, colocate.engine.sglang, colocate.engine.sglang_hooks, colocate.patches; "
            "assert not any(m == 'sglang' or m.startswith('sglang.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_config_checks():
    with pytest.raises(ConfigError, match="engine.backend.*sglang needs CUDA"):
        load_config(None, ["engine.backend=sglang", "run.device=cpu"])
    with pytest.raises(ConfigError, match="engine.tp_size.*needs engine.backend=sglang"):
        load_config(None, ["engine.tp_size=2"])
    cfg = load_config(None, ["engine.backend=sglang", "engine.tp_size=2"])
    assert cfg.engine.tp_size == 2
    with pytest.raises(ConfigError, match="engine.quantization.*needs engine.backend=sglang"):
        load_config(None, ["engine.quantization=fp8"])
    with pytest.raises(ConfigError, match="engine.quantization.*use none or fp8"):
        load_config(None, ["engine.backend=sglang", "engine.quantization=int4"])


def test_server_args_follow_the_design():
    from colocate.engine.sglang import server_args_kwargs, static_mem_fraction

    kw = server_args_kwargs(path="/m", dtype=torch.bfloat16, load_format="dummy",
                            attention_backend="triton", tp_size=2, tokens_per_forward=4096,
                            max_length=512, seed=3, mem_fraction_static=0.4)
    assert kw["disable_cuda_graph"] and kw["disable_radix_cache"]
    assert kw["disable_overlap_schedule"] and kw["skip_tokenizer_init"]
    assert kw["sampling_backend"] == "pytorch" and kw["load_format"] == "dummy"
    assert kw["chunked_prefill_size"] >= 4096 and kw["max_total_tokens"] == 4096
    assert kw["dtype"] == "bfloat16" and kw["tp_size"] == 2 and kw["context_length"] == 512
    assert kw["quantization"] is None  # sglang's own default: the checkpoint's
    fp8 = server_args_kwargs(path="/m", dtype=torch.bfloat16, load_format="auto",
                             attention_backend="triton", tp_size=1, tokens_per_forward=4096,
                             max_length=512, seed=3, mem_fraction_static=0.4, quantization="fp8")
    assert fp8["quantization"] == "fp8"
    assert static_mem_fraction(0.4, 80, 80) == pytest.approx(0.4)
    assert static_mem_fraction(0.4, 80, 40) == pytest.approx(0.8)  # trainer holds half
    assert static_mem_fraction(0.45, 80, 10) == 0.95
    assert static_mem_fraction(0.0, 80, 80) == 0.85


# --------------------------------------------------------------------------- hooks


def _fake_sglang(monkeypatch, calls):
    """sglang's group-creation call chain, reduced to what the hooks see."""
    import torch.distributed as dist

    psm = types.ModuleType("sglang.srt.distributed.parallel_state")
    boot = types.ModuleType("sglang.srt.distributed.bootstrap")

    def init_world_group(ranks, local_rank, backend):
        for r in [ranks]:
            dist.new_group(r, backend="gloo")
        calls.append(("world", list(ranks)))

    def init_model_parallel_group(group_ranks, local_rank, backend, group_name=None):
        for r in group_ranks:  # GroupCoordinator: one new_group per rank list
            dist.new_group(r, backend=backend)
        calls.append((group_name, group_ranks))

    def initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1):
        world = dist.get_world_size()
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        assert world == tp * pp, "sglang's own check"
        psm.init_model_parallel_group([list(range(i, i + tp)) for i in range(0, world, tp)],
                                      0, "nccl", group_name="tp")
        n = world // pp
        psm.init_model_parallel_group([list(range(i, world, n)) for i in range(n)], 0, "nccl",
                                      group_name="pp")

    psm.init_world_group = init_world_group
    psm.init_model_parallel_group = init_model_parallel_group
    psm.initialize_model_parallel = initialize_model_parallel
    boot.initialize_model_parallel = initialize_model_parallel
    pkgs = {name: types.ModuleType(name) for name in ("sglang", "sglang.srt",
                                                       "sglang.srt.distributed")}
    pkgs["sglang.srt.distributed"].parallel_state = psm
    pkgs["sglang.srt.distributed"].bootstrap = boot
    for name, mod in {**pkgs, psm.__name__: psm, boot.__name__: boot}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def fake_new_group(ranks=None, timeout=None, backend=None, pg_options=None,
                       use_local_synchronization=False):
        calls.append(("new_group", list(ranks), use_local_synchronization))

    monkeypatch.setattr(dist, "new_group", fake_new_group)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    return psm, boot, fake_new_group


def test_hooks_confine_sglang_to_the_engine_ranks(monkeypatch):
    import torch.distributed as dist

    from colocate.engine.sglang_hooks import sglang_world

    calls = []
    psm, boot, fake_new_group = _fake_sglang(monkeypatch, calls)
    originals = (psm.init_world_group, psm.init_model_parallel_group,
                 boot.initialize_model_parallel)
    layout = engine_group_layout(3, 8, 2)
    with sglang_world(layout, 8):
        psm.init_world_group(list(range(8)), 1, "nccl")
        boot.initialize_model_parallel(tensor_model_parallel_size=2)
    groups = [c for c in calls if c[0] != "new_group"]
    assert groups == [("world", [1, 3, 5, 7]), ("tp", [[1, 3], [5, 7]]),
                      ("pp", [[1], [3], [5], [7]])]
    made = [c for c in calls if c[0] == "new_group"]
    assert made and all(local for _, _, local in made)  # only members call new_group
    assert all(r % 2 for _, ranks, _ in made for r in ranks)  # no trainer in any group
    # Everything is restored afterwards.
    assert (psm.init_world_group, psm.init_model_parallel_group,
            boot.initialize_model_parallel) == originals
    assert dist.new_group is fake_new_group


def test_hooks_refuse_a_group_holding_a_trainer(monkeypatch):
    import torch.distributed as dist

    from colocate.engine.sglang_hooks import SglangHookError, sglang_world

    _fake_sglang(monkeypatch, [])
    with pytest.raises(SglangHookError, match="non-engine ranks \\[0, 2\\]"):
        with sglang_world(engine_group_layout(1, 4, 1), 4):
            dist.new_group([0, 1, 2])


def test_hooks_fail_clearly_when_a_wrapped_function_is_gone(monkeypatch):
    from colocate.engine.sglang_hooks import SglangHookError, sglang_world

    psm, _, _ = _fake_sglang(monkeypatch, [])
    monkeypatch.delattr(psm, "init_world_group")
    with pytest.raises(SglangHookError, match="init_world_group not found.*patches"):
        with sglang_world(engine_group_layout(1, 2, 1), 2):
            pass
