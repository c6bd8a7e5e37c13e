"""An exported draft directory (`colocate export` / training's RUN_DIR/export): read it, check
it belongs to the target at hand, and load it into the project's own `Eagle3Draft`.

The export's config.json is the draft's geometry (what sglang will build); the target's
config decides whether the draft can run on it at all. The draft is checked against the
target before anything is loaded, so a draft trained for another model fails with one line
naming both files instead of a shape error deep inside a forward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from colocate.config import DraftSection, describe_path
from colocate.draft import DraftArch, Eagle3Draft

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
VOCAB_TENSORS = ("d2t", "t2d")


class EvalError(ValueError):
    """A user mistake the eval command reports in one line (file or key, and the fix)."""


@dataclass(frozen=True)
class ExportedDraft:
    path: str
    """The export directory (what sglang's speculative_draft_model_path points at)."""
    config: dict
    """Its config.json."""

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [""])[0]

    @property
    def aux_layer_ids(self) -> list[int]:
        """Target layers the draft reads, our convention (aux id i = output of layer i)."""
        eagle = self.config.get("eagle_config") or {}
        return [int(i) for i in eagle.get("eagle_aux_hidden_state_layer_ids") or []]

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_NAME)


def read_export(path: str) -> ExportedDraft:
    """The export's config, after checking both files exist and the config is readable."""
    if not os.path.isdir(path):
        raise EvalError(f"--draft {describe_path(path)}: no such directory; give an export directory "
                        "(RUN_DIR/export of a training run, or `colocate export RUN_DIR OUT`)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise EvalError(f"--draft {path}: no {name}; an export holds {CONFIG_NAME} and "
                            f"{WEIGHTS_NAME} (re-export with `colocate export RUN_DIR {path}`)")
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise EvalError(f"{config_path}: not valid JSON ({e}); re-export the draft") from None
    export = ExportedDraft(path, config)
    if not export.aux_layer_ids:
        raise EvalError(f"{config_path}: no eagle_config.eagle_aux_hidden_state_layer_ids; "
                        "it is not an Eagle3 export of colocate (re-export the draft)")
    return export


def check_target(export: ExportedDraft, target_config, target_path: str) -> None:
    """Fail when the draft was exported for another target (vocabulary, width, depth)."""
    text = target_config.get_text_config() if hasattr(target_config, "get_text_config") \
        else target_config
    num_layers = int(text.num_hidden_layers)
    got = export.config
    checks = [("vocab_size", got.get("vocab_size"), int(text.vocab_size)),
              ("hidden_size", got.get("target_hidden_size", got.get("hidden_size")),
               int(text.hidden_size))]
    for key, draft_value, target_value in checks:
        if draft_value != target_value:
            raise EvalError(f"{export.config_path}: {key} {draft_value} but the target "
                            f"{target_path} has {target_value}; the draft was exported for "
                            "another target: set target.path to the model it was trained with")
    bad = [i for i in export.aux_layer_ids if not 0 <= i <= num_layers - 2]
    if bad:
        raise EvalError(f"{export.config_path}: aux layer ids {bad} do not exist in the target "
                        f"{target_path} ({num_layers} layers, valid 0..{num_layers - 2}); the "
                        "draft was exported for another target: set target.path to the model "
                        "it was trained with")


def draft_arch(export: ExportedDraft) -> DraftArch:
    """The draft's shape from its own config.json (a Llama config of one layer)."""
    c = export.config
    section = DraftSection(draft_vocab_size=int(c["draft_vocab_size"]),
                           intermediate_size=int(c["intermediate_size"]))
    return DraftArch.from_target_config(SimpleNamespace(**c), section,
                                        len(export.aux_layer_ids))


def load_draft(export: ExportedDraft, *, dtype: torch.dtype, device: torch.device,
               kernels: str = "eager") -> tuple[Eagle3Draft, torch.Tensor]:
    """(Eagle3Draft holding the exported weights, in eval mode; d2t int64 [Vd] on device)."""
    from safetensors.torch import load_file

    weights_path = os.path.join(export.path, WEIGHTS_NAME)
    tensors = load_file(weights_path)
    d2t = tensors.pop("d2t", None)
    tensors.pop("t2d", None)
    if d2t is None:
        raise EvalError(f"{weights_path}: no d2t tensor (the draft-to-target vocabulary map); "
                        "re-export the draft")
    model = Eagle3Draft(draft_arch(export), attention="loop", kernels=kernels)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise EvalError(f"{weights_path}: does not match its {CONFIG_NAME} "
                        f"({' '.join(first[:2])}); re-export the draft") from None
    model.requires_grad_(False).eval().to(device)
    for param in model.parameters():  # not the RoPE inv_freq buffer: it stays float32
        param.data = param.data.to(dtype)
    return model, d2t.to(device=device, dtype=torch.long)
