"""`colocate export RUN_DIR OUT_DIR`: write the draft as sglang's EAGLE3 draft checkpoint.

Output: `config.json` (architectures ["LlamaForCausalLMEagle3"], the draft vocabulary size,
the target layers it reads, the target's geometry) and `model.safetensors` with the draft's
weights under the names sglang's `LlamaForCausalLMEagle3.load_weights` maps (it silently
skips names it does not know, hence the check below) plus `d2t` / `t2d`.

Training calls `export_draft` at the end (RUN_DIR/export); the command re-exports any
checkpoint in one process, without a process group.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from colocate.config import describe_path
from colocate.draft import DraftArch, Eagle3Draft
from colocate.model_card import write_model_card

EXPECTED_PREFIXES = ("fc.", "midlayer.", "norm.", "lm_head.")


class ExportError(ValueError):
    pass


def draft_config(arch: DraftArch, aux_layer_ids: list[int], target_config) -> dict:
    scaling = dict(arch.rope_scaling) if arch.rope_scaling else None
    rope = {**(scaling or {}), "rope_type": arch.rope_type, "rope_theta": arch.rope_theta}
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position_embeddings,
        "vocab_size": arch.target_vocab_size,
        "draft_vocab_size": arch.draft_vocab_size,
        "target_hidden_size": arch.hidden_size,
        "tie_word_embeddings": False,
        # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
        "rope_theta": arch.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "bos_token_id": getattr(target_config, "bos_token_id", None),
        "eos_token_id": getattr(target_config, "eos_token_id", None),
        "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
                         "use_aux_hidden_state": True},
    }


def export_draft(state_dict: dict[str, torch.Tensor], arch: DraftArch, *, d2t: torch.Tensor,
                 t2d: torch.Tensor, aux_layer_ids: list[int], target_config, out_dir: str,
                 dtype: torch.dtype = torch.bfloat16) -> str:
    """Write config.json + model.safetensors atomically into `out_dir`; returns it."""
    unknown = [k for k in state_dict if not k.startswith(EXPECTED_PREFIXES)]
    if unknown:
        raise ExportError(f"draft weights {unknown} have names sglang would silently drop")
    if d2t.numel() != arch.draft_vocab_size or t2d.numel() != arch.target_vocab_size:
        raise ExportError(f"d2t ({d2t.numel()}) / t2d ({t2d.numel()}) do not match the draft "
                          f"vocabulary {arch.draft_vocab_size} / target {arch.target_vocab_size}")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    tensors["d2t"] = d2t.to("cpu", torch.int64).contiguous()
    tensors["t2d"] = t2d.to("cpu", torch.bool).contiguous()
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(draft_config(arch, aux_layer_ids, target_config), f, indent=2)
    write_model_card(tmp, out_dir)  # README.md: what the run did, how sglang serves it
    from colocate.train.checkpoint import replace_dir

    replace_dir(tmp, out_dir)
    return out_dir


def load_checkpoint_weights(path: str, arch: DraftArch) -> dict[str, torch.Tensor]:
    """The draft's weights from a DCP checkpoint, in one process (no process group)."""
    import inspect

    import torch.distributed.checkpoint as dcp

    model = Eagle3Draft(arch)
    state = {"model": model.state_dict()}
    # torch 2.6's dcp.load has no `no_dist` keyword (it infers it from an uninitialised
    # process group, as later versions also do); pass it only where it exists.
    kwargs = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
    dcp.load(state, checkpoint_id=path, **kwargs)
    return state["model"]


# ------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (holds config.yaml, checkpoints/)")
    p.add_argument("out_dir", help="where to write config.json + model.safetensors")
    p.add_argument("--checkpoint", default="", help="a step_* directory (default: the latest)")


def main(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from colocate.config import load_config
    from colocate.engine.base import resolve_aux_layer_ids
    from colocate.train import checkpoint as ckpt

    config_path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ExportError(f"{describe_path(args.run_dir)}: no config.yaml; is it a colocate run "
                          "directory?")
    cfg = load_config(config_path)
    path = args.checkpoint or ckpt.find_resume(args.run_dir, "auto")
    if not path:
        raise ExportError(f"{args.run_dir}: no complete checkpoint under "
                          f"{ckpt.checkpoint_root(args.run_dir)}")
    target_config = AutoConfig.from_pretrained(cfg.target.path, local_files_only=True)
    aux = resolve_aux_layer_ids(cfg.target.aux_layer_ids, target_config.num_hidden_layers)
    vocab = ckpt.read_vocab(path)
    draft = cfg.draft
    draft.draft_vocab_size = vocab["d2t"].numel()
    arch = DraftArch.from_target_config(target_config, draft, len(aux))
    weights = load_checkpoint_weights(path, arch)
    export_draft(weights, arch, d2t=vocab["d2t"], t2d=vocab["t2d"], aux_layer_ids=aux,
                 target_config=target_config, out_dir=args.out_dir)
    print(f"exported {path} -> {args.out_dir}")
    return 0
