"""`draft.init_from`: start training from an exported draft's weights.

The export is the layout sglang serves, for the run's `draft.method`: Eagle3's
`LlamaForCausalLMEagle3` (ours, colocate/export.py, or another tool's: `fc.weight`,
`midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d`, optionally
`embed_tokens.weight`, ignored since the draft reads the frozen target embedding) or DFlash's
`DFlashDraftModel` (colocate/export_dflash.py). Only the weights are taken: the optimizer,
the step and the data position start fresh, and the learning-rate schedule (warmup
included) runs from step 0. A run that resumes from its own checkpoint ignores init_from.

What must match is the recipe's (colocate/draft/recipe.py: `export_config`, `init_keys`,
`vocab_maps`); each check refuses the run before its first step, naming the key, both values
and the setting to look at:
1. `read_init_config` (also the pre-flight's, without torch): both files, valid JSON, the
   architecture of the run's method.
2. `check_init_config` (colocate train, before any process group): every `init_keys` entry
   of the export's config.json against the config.json this run's export would write
   (geometry, layers, vocabulary sizes, target layers; DFlash: block size, mask token).
3. `load_init_weights` (each trainer, once the engine's plan names the draft vocabulary):
   the vocabulary maps (Eagle3's d2t / t2d) against the vocabulary this run built from its
   data; then `apply_init_weights` loads the tensors (strict) before FSDP shards the draft.
"""

from __future__ import annotations

import json
import os

from colocate.config import Config, ConfigError, describe_path

ARCHITECTURES = {"eagle3": "LlamaForCausalLMEagle3", "dflash": "DFlashDraftModel"}
"""draft.method -> the export architecture it warm-starts from (torch-free, for the pre-flight)."""
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
IGNORED = ("embed_tokens.weight",)
"""Tensors an export may carry that the draft does not train (the target's embedding)."""


def read_init_config(cfg: Config) -> dict:
    """The export's config.json, after checking the files and its architecture."""
    path = cfg.draft.init_from
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(f"draft.init_from {describe_path(path)}: no {name}; point it at "
                              f"an exported draft ({CONFIG_NAME} + {WEIGHTS_NAME}, e.g. "
                              "RUN_DIR/export)")
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            init = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"draft.init_from {path}/{CONFIG_NAME}: not valid JSON ({e})") from None
    want = ARCHITECTURES[cfg.draft.method]
    got = init.get("architectures") or []
    if want not in got:
        raise ConfigError(f"draft.init_from {path}/{CONFIG_NAME}: architectures {got}, not "
                          f"[{want}]; draft.method={cfg.draft.method} warm-starts from a "
                          f"{want} export")
    return init


def _get(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if dotted == "head_dim" and value is None and config.get("num_attention_heads"):
        value = config["hidden_size"] // config["num_attention_heads"]  # Llama's default
    return [int(i) for i in value] if isinstance(value, (list, tuple)) else value


def check_init_config(cfg: Config, recipe, target_config, layer_ids: list[int]) -> None:
    """Refuse an export of another shape than this run's draft (the module docstring's
    check 2); no-op without draft.init_from. `recipe`: the run's DraftRecipe."""
    if not cfg.draft.init_from:
        return
    init = read_init_config(cfg)
    want = recipe.export_config(target_config, cfg.draft.draft_vocab_size, layer_ids)
    for key, setting in recipe.init_keys.items():
        if _get(init, key) != _get(want, key):
            raise ConfigError(
                f"draft.init_from {cfg.draft.init_from}/{CONFIG_NAME}: {key} is "
                f"{_get(init, key)}, this run's draft has {_get(want, key)}; warm start needs "
                f"the same (check {setting}, or start without draft.init_from)")


def load_init_weights(cfg: Config, recipe, vocab: dict) -> dict:
    """The export's draft tensors (float32, named as the draft's state dict), after checking
    its vocabulary maps against this run's draft vocabulary `vocab` (the engine's plan)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(cfg.draft.init_from, WEIGHTS_NAME)
    tensors = load_file(path)
    for name in recipe.vocab_maps:
        if name not in tensors:
            raise ConfigError(f"draft.init_from {path}: no {name} tensor; an export of "
                              f"draft.method={cfg.draft.method} holds "
                              f"{', '.join(recipe.vocab_maps)}")
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
                          f"this run's draft ({' '.join(lines[1:3]).strip()}); it needs the "
                          "tensor names sglang loads for this draft") from None
