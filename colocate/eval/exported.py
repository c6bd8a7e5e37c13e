"""An exported draft directory (`colocate export` / training's RUN_DIR/export): read it, check
it belongs to the target at hand, and load it into the project's own `Eagle3Draft` or
`DFlashDraft` (which one is `colocate.eval.methods`' call, from config.json's architectures).

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
    def method(self):
        """Its `colocate.eval.methods` entry (EvalError for an unknown architecture)."""
        from colocate.eval.methods import served_method

        return served_method(self)

    @property
    def aux_layer_ids(self) -> list[int]:
        """Target layers the draft reads, our convention (aux id i = output of layer i)."""
        return self.method.layer_ids(self.config)

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
        raise EvalError(f"{config_path}: no {export.method.layer_ids_key}; it is not an "
                        f"{export.architecture} export of colocate (re-export the draft)")
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


def _load_weights(export: ExportedDraft, model: torch.nn.Module,
                  tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                  device: torch.device) -> None:
    """`tensors` into `model` (strict), then eval mode on `device` with parameters in `dtype`."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise EvalError(f"{os.path.join(export.path, WEIGHTS_NAME)}: does not match its "
                        f"{CONFIG_NAME} ({' '.join(first[:2])}); re-export the draft") from None
    model.requires_grad_(False).eval().to(device)
    for param in model.parameters():  # not the RoPE inv_freq buffer: it stays float32
        param.data = param.data.to(dtype)


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
    _load_weights(export, model, tensors, dtype=dtype, device=device)
    return model, d2t.to(device=device, dtype=torch.long)


def dflash_arch(export: ExportedDraft):
    """The DFlash draft's shape from its own config.json (`colocate.export_dflash`'s keys)."""
    from colocate.draft.arch import rope_from_hf
    from colocate.draft.dflash import DFlashArch

    c = export.config
    dflash = c.get("dflash_config") or {}
    try:
        theta, scaling = rope_from_hf(SimpleNamespace(**c))
        return DFlashArch(
            hidden_size=int(c["hidden_size"]), num_heads=int(c["num_attention_heads"]),
            num_kv_heads=int(c["num_key_value_heads"]), head_dim=int(c["head_dim"]),
            intermediate_size=int(c["intermediate_size"]), rms_norm_eps=float(c["rms_norm_eps"]),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(c["max_position_embeddings"]),
            num_layers=int(c["num_hidden_layers"]),
            target_layer_ids=tuple(int(i) for i in dflash["target_layer_ids"]),
            block_size=export.method.block_size(c), mask_token_id=int(dflash["mask_token_id"]),
            target_vocab_size=int(c["vocab_size"]))
    except KeyError as e:
        raise EvalError(f"{export.config_path}: no {e.args[0]!r}; re-export the draft") from None


def load_dflash(export: ExportedDraft, *, dtype: torch.dtype, device: torch.device,
                kernels: str = "eager"):
    """DFlashDraft holding the exported weights, in eval mode (BlockDraft hands it dense
    masks; attention="loop" only keeps a training loss from choosing flex)."""
    from safetensors.torch import load_file

    from colocate.draft.dflash import DFlashDraft

    model = DFlashDraft(dflash_arch(export), attention="loop", kernels=kernels)
    _load_weights(export, model, load_file(os.path.join(export.path, WEIGHTS_NAME)),
                  dtype=dtype, device=device)
    return model
