"""Target engines: run the target's prefill and write the draft's features into a ring slot.

Typical use on an engine rank::

    engine = build_engine(cfg, device)
    ring = RingProducer.start(..., slot_bytes=engine.slot_bytes(budget, max_sequences=budget))
    writer = ring.acquire()
    engine.prefill(micro_batch, writer, budget=cfg.data.tokens_per_micro_step)
    ring.publish(writer)

and on its trainer: `RingConsumer.start(..., needs=recipe.feature_needs(H, num_aux, dtype))`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from colocate.engine.base import FEATURE_NAMES, TargetEngine, resolve_aux_layer_ids
from colocate.engine.fake import FakeEngine

if TYPE_CHECKING:
    from colocate.config import Config

__all__ = ["FEATURE_NAMES", "FakeEngine", "TargetEngine", "build_engine", "resolve_aux_layer_ids", "resolve_target_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_target_dtype(name: str, device: torch.device) -> torch.dtype:
    """`target.dtype`; auto is bfloat16 on CUDA and float32 on the CPU (where bf16 matmuls
    are slow and the reference tests want full precision)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"target.dtype: got {name!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[name]


def build_engine(cfg: "Config", device: torch.device) -> TargetEngine:
    """The engine `cfg.engine.backend` names, loaded from `cfg.target` onto `device`,
    capturing what the run's draft recipe reads."""
    from colocate.draft.recipe import recipe_for

    dtype = resolve_target_dtype(cfg.target.dtype, device)
    recipe = recipe_for(cfg)
    if cfg.engine.backend == "hf":
        from colocate.engine.hf import HFTargetEngine  # imports transformers: only when used

        engine = HFTargetEngine(cfg.target.path, dtype=dtype, device=device,
                                aux_layer_ids=cfg.target.aux_layer_ids,
                                default_layer_ids=recipe.default_layer_ids,
                                load_format=cfg.target.load_format, seed=cfg.run.seed)
    elif cfg.engine.backend == "sglang":
        from colocate.engine.sglang import SGLangTargetEngine  # imports sglang: only when used

        engine = SGLangTargetEngine(cfg, device, default_layer_ids=recipe.default_layer_ids)
    else:
        raise ValueError(f"engine.backend: got {cfg.engine.backend!r}; use hf or sglang")
    engine.use_needs(recipe.feature_needs(engine.hidden_size, engine.num_aux, engine.dtype))
    return engine
