"""`draft.init_from`: start training from an exported Eagle3 draft's weights.

The export is sglang's EAGLE3 draft layout (`LlamaForCausalLMEagle3`): ours (colocate/export.py)
or another tool's, `config.json` + `model.safetensors` with `fc.weight`, `midlayer.*`,
`norm.weight`, `lm_head.weight`, `d2t`, `t2d` and optionally `embed_tokens.weight` (ignored:
the draft reads the frozen target embedding). Only the weights are taken: the optimizer,
the step and the data position start fresh, and the learning-rate schedule (warmup
included) runs from step 0. A run that resumes from its own checkpoint ignores init_from.

Two checks, each refusing the run before its first step with the key and both values:
1. `check_init_config` (colocate train, before any process group): architecture, geometry
   (hidden size, heads, KV heads, head dim, intermediate size, layers), the target and
   draft vocabulary sizes, and the target layers the draft reads, against this run's.
2. `load_init_weights` (each trainer, once the engine's plan names the draft vocabulary):
   d2t / t2d against the vocabulary this run built from its data, then the tensors.
"""

from __future__ import annotations

import json
import os

from colocate.config import Config, ConfigError, describe_path

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
IGNORED = ("embed_tokens.weight",)
"""Tensors an export may carry that the draft does not train (the target's embedding)."""


def read_init_config(cfg: Config) -> dict:
    """The export's config.json, after checking that both files are there."""
    path = cfg.draft.init_from
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(f"draft.init_from {describe_path(path)}: no {name}; point it at "
                              f"an exported draft ({CONFIG_NAME} + {WEIGHTS_NAME}, e.g. "
                              "RUN_DIR/export)")
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"draft.init_from {path}/{CONFIG_NAME}: not valid JSON ({e})") from None


def expected_config(cfg: Config, target_config, layer_ids: list[int] | None) -> dict:
    """What this run's draft is, in the export's config.json keys (colocate/export.py)."""
    text = target_config.get_text_config() if hasattr(target_config, "get_text_config") \
        else target_config
    heads = text.num_attention_heads
    return {
        "hidden_size": text.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "intermediate_size": cfg.draft.intermediate_size or text.intermediate_size,
        "num_hidden_layers": 1,
        "vocab_size": text.vocab_size,
        "draft_vocab_size": min(cfg.draft.draft_vocab_size, text.vocab_size),
        "eagle_config.eagle_aux_hidden_state_layer_ids": (None if layer_ids is None
                                                          else list(layer_ids)),
    }


def _run_key(key: str) -> str:
    """The setting of this run that decides an export key (for the fix in the message)."""
    return {"draft_vocab_size": "draft.draft_vocab_size",
            "intermediate_size": "draft.intermediate_size",
            "eagle_config.eagle_aux_hidden_state_layer_ids": "target.aux_layer_ids"}.get(
                key, "target.path")


def check_init_config(cfg: Config, target_config, layer_ids: list[int] | None) -> None:
    """Refuse an export that is not an Eagle3 draft of this run's shape (see the module
    docstring); no-op without draft.init_from. layer_ids None: not checked (the pre-flight
    without torch cannot resolve a recipe's default layers)."""
    if not cfg.draft.init_from:
        return
    if cfg.draft.method != "eagle3":
        raise ConfigError("draft.init_from supports eagle3 exports only for now; "
                          f"draft.method is {cfg.draft.method}")
    init = read_init_config(cfg)
    where = f"draft.init_from {cfg.draft.init_from}/{CONFIG_NAME}"
    architectures = init.get("architectures") or []
    if ARCHITECTURE not in architectures:
        raise ConfigError(f"{where}: architectures {architectures}, not [{ARCHITECTURE}]; "
                          "draft.init_from takes an Eagle3 export")
    eagle = init.get("eagle_config") or {}
    got = {**init, "eagle_config.eagle_aux_hidden_state_layer_ids":
           eagle.get("eagle_aux_hidden_state_layer_ids")}
    if got.get("head_dim") is None and init.get("num_attention_heads"):
        got["head_dim"] = init["hidden_size"] // init["num_attention_heads"]
    for key, want in expected_config(cfg, target_config, layer_ids).items():
        if want is None:
            continue
        value = got.get(key)
        if isinstance(value, list):
            value = [int(i) for i in value]
        if value != want:
            raise ConfigError(f"{where}: {key} is {value}, this run's draft has {want}; "
                              f"warm start needs the same shape (check {_run_key(key)}, or "
                              "start without draft.init_from)")


def load_init_weights(cfg: Config, vocab: dict) -> dict:
    """The export's draft tensors (float32, names as the draft's state dict), after checking
    its d2t / t2d against this run's draft vocabulary `vocab` (the engine's plan)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(cfg.draft.init_from, WEIGHTS_NAME)
    tensors = load_file(path)
    for name in ("d2t", "t2d"):
        if name not in tensors:
            raise ConfigError(f"draft.init_from {path}: no {name} tensor; an Eagle3 export "
                              "holds its vocabulary maps d2t and t2d")
        theirs, ours = tensors.pop(name), vocab[name].cpu()
        if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.dtype), ours):
            differ = (f"shape {tuple(theirs.shape)}, this run's {tuple(ours.shape)}"
                      if theirs.shape != ours.shape else
                      f"{int((theirs.to(ours.dtype) != ours).sum())} of {ours.numel()} entries "
                      "differ")
            raise ConfigError(
                f"draft.init_from {path}: {name} ({differ}) is not this run's draft vocabulary, "
                "which data.path and draft.draft_vocab_size decide; train on the data the "
                "export's vocabulary was built from, or start without draft.init_from")
    for name in IGNORED:
        tensors.pop(name, None)
    return {name: tensor.float() for name, tensor in tensors.items()}


def apply_init_weights(model, tensors: dict, path: str) -> None:
    """Load `tensors` into the unsharded draft `model` (strict: a missing or extra tensor
    would leave part of the draft at its random init, or silently drop weights)."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise ConfigError(f"draft.init_from {path}/{WEIGHTS_NAME}: its tensors do not fit "
                          f"this run's draft ({' '.join(lines[1:3]).strip()}); it needs "
                          "sglang's LlamaForCausalLMEagle3 names (fc, midlayer.*, norm, "
                          "lm_head)") from None
