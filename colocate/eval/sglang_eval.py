"""The served numbers: sglang's own speculative decoder with the exported draft.

GPU ONLY. Not run in CI (sglang is not installed there and needs CUDA); it is kept small so
that it can be read against sglang 0.5.17 and verified on an H200. The Engine arguments are
the ones the probe that served our export used (`shared/sglang/probes/serve_eagle3.py`);
the speculative ones come from the export's kind (`colocate.eval.methods`: EAGLE3 chain or
DFLASH block).

Each measurement runs in its own spawned process: sglang keeps module-level state, so one
process holds one engine, and the process exit hands the GPU back for the next one. Two
engines are measured over the same token-id prompts, greedy: the target with the draft
(speculative_num_steps=K, topk 1, K+1 draft tokens: a chain) and the target alone. Each
decodes the prompts one request at a time (batch 1) and then `eval.batch_size` per
`generate` call, after an untimed warm-up request. Accept length and histogram come from
sglang's meta_info (completion_tokens, spec_verify_ct, spec_correct_drafts_histogram) of the
batch-1 run with the draft.
"""

from __future__ import annotations

import queue
import time
import traceback
from multiprocessing import get_context
from typing import TYPE_CHECKING, Collection

from colocate.eval.chain import AcceptStats, EngineRun
from colocate.eval.exported import ExportedDraft

if TYPE_CHECKING:
    import torch

ENGINE_TIMEOUT_S = 3600.0
"""Bound on one engine's whole measurement (start-up, warm-up, both batch sizes)."""


def sglang_available() -> bool:
    """CUDA is there and sglang imports (what eval.engine=auto asks)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import sglang  # noqa: F401
    except ImportError:
        return False
    return True


def speculative_args(export: ExportedDraft, num_steps: int) -> dict:
    """The Engine arguments that serve `export` (`colocate.eval.methods` decides which)."""
    return export.method.sglang_args(export, num_steps)


def _measure(engine_kwargs: dict, prompts: list[list[int]], sampling: dict,
             batch_size: int) -> dict:
    """In a fresh process: one engine, warm-up, batch 1, then batch `batch_size`."""
    from colocate.engine.sglang_env import offline_engine_env

    offline_engine_env()
    import sglang

    engine = sglang.Engine(**engine_kwargs)
    try:
        engine.generate(input_ids=prompts[:1], sampling_params=sampling)  # warm-up, untimed
        start = time.perf_counter()
        single = [engine.generate(input_ids=[p], sampling_params=sampling)[0] for p in prompts]
        seconds_1 = time.perf_counter() - start
        start = time.perf_counter()
        batched = []
        for i in range(0, len(prompts), batch_size):
            batched += engine.generate(input_ids=prompts[i:i + batch_size],
                                       sampling_params=sampling)
        seconds_b = time.perf_counter() - start
    finally:
        engine.shutdown()
    metas = [_spec_counts(r["meta_info"]) for r in single]
    tokens_1 = sum(m["completion_tokens"] for m in metas)
    tokens_b = sum(r["meta_info"]["completion_tokens"] for r in batched)
    return {"outputs": [list(r["output_ids"]) for r in single], "metas": metas,
            "rate_1": tokens_1 / seconds_1, "rate_b": tokens_b / seconds_b}


def _spec_counts(meta: dict) -> dict:
    """One request's counts from sglang's meta_info. The histogram of verify steps by
    accepted drafts is `spec_correct_drafts_histogram`; 0.5.17 also sends it as
    `spec_accept_histogram`, an alias marked for removal. Both are absent without a draft
    or when no verify step ran."""
    histogram = meta.get("spec_correct_drafts_histogram")
    if histogram is None:
        histogram = meta.get("spec_accept_histogram")
    return {"completion_tokens": meta["completion_tokens"],
            "spec_verify_ct": meta.get("spec_verify_ct") or 0, "histogram": histogram or []}


def _child_main(results, *args) -> None:
    try:
        results.put((True, _measure(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        results.put((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _last_word(results, proc) -> tuple[bool, object]:
    """The answer of a child found dead: it may have posted it and exited between the
    parent's last wait and its liveness check."""
    try:
        return results.get(timeout=1.0)
    except queue.Empty:
        raise RuntimeError(f"the sglang engine process died (exit code {proc.exitcode}) "
                           "before reporting") from None


def _in_child(*args) -> dict:
    """`_measure(*args)` in a spawned process, bounded by ENGINE_TIMEOUT_S; a process that
    dies without an answer is noticed within seconds."""
    ctx = get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(results, *args))
    proc.start()
    deadline = time.monotonic() + ENGINE_TIMEOUT_S
    try:
        while True:
            try:
                ok, value = results.get(timeout=5.0)
                break
            except queue.Empty:
                if not proc.is_alive():
                    ok, value = _last_word(results, proc)
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the sglang engine did not finish within "
                                       f"{ENGINE_TIMEOUT_S:.0f} s") from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if not ok:
        raise RuntimeError(f"the sglang engine failed: {value}")
    return value


def sglang_eval(target_path: str, export: ExportedDraft, prompts: list[list[int]], *,
                num_steps: int, max_new_tokens: int, stop_ids: Collection[int], batch_size: int,
                dtype: "torch.dtype", attention_backend: str, seed: int, mem_fraction: float,
                cuda_graph: bool = False, baseline: bool = True) -> EngineRun:
    """Accept length of `export` served by sglang, and tokens/s with it and (`baseline`)
    without it."""
    from colocate.engine.sglang_env import offline_engine_env, offline_engine_kwargs

    offline_engine_env()  # before any engine process starts: children inherit the switch
    common = offline_engine_kwargs(target_path, dtype=dtype, mem_fraction=mem_fraction,
                                   seed=seed, cuda_graph=cuda_graph,
                                   attention_backend=attention_backend, disable_radix_cache=True)
    sampling = {"temperature": 0.0, "max_new_tokens": max_new_tokens,
                "stop_token_ids": sorted(stop_ids)}
    spec = _in_child({**common, **speculative_args(export, num_steps)}, prompts, sampling,
                     batch_size)
    plain = _in_child(common, prompts, sampling, batch_size) if baseline else None

    stats = AcceptStats()
    for meta in spec["metas"]:
        stats.add(meta["completion_tokens"], meta["spec_verify_ct"], meta["histogram"])
    stats.histogram += [0] * (num_steps + 1 - len(stats.histogram))

    alone = plain or {"rate_1": None, "rate_b": None, "outputs": None}
    return EngineRun(
        engine="sglang", stats=stats, outputs=spec["outputs"],
        tokens_per_s={1: (spec["rate_1"], alone["rate_1"]),
                      batch_size: (spec["rate_b"], alone["rate_b"])},
        same_as_target=None if plain is None else
        sum(a == b for a, b in zip(spec["outputs"], plain["outputs"])))
