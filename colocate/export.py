"""`colocate export RUN_DIR OUT_DIR`: write the draft as sglang's draft checkpoint (the run's
recipe decides the layout; this module writes Eagle3's and the shared parts).

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
from colocate.draft import DraftArch
from colocate.model_card import write_model_card

EXPECTED_PREFIXES = ("fc.", "midlayer.", "norm.", "lm_head.")


class ExportError(ValueError):
    pass


def rope_keys(arch) -> dict:
    """RoPE in both spellings: transformers 5 reads rope_parameters, older readers
    rope_theta + rope_scaling. `arch`: any draft arch with RoPE geometry."""
    scaling = dict(arch.rope_scaling) if arch.rope_scaling else None
    return {"rope_theta": arch.rope_theta, "rope_scaling": scaling,
            "rope_parameters": {**(scaling or {}), "rope_type": arch.rope_type,
                                "rope_theta": arch.rope_theta}}


def check_names(names, expected_prefixes: tuple[str, ...]) -> None:
    """sglang's loaders skip names they do not know without a word: refuse them here."""
    unknown = [k for k in names if not k.startswith(expected_prefixes)]
    if unknown:
        raise ExportError(f"draft weights {unknown} have names sglang would silently drop")


def write_export(tensors: dict[str, torch.Tensor], config: dict, out_dir: str) -> str:
    """config.json + model.safetensors + README.md (the model card) into `out_dir`,
    atomically: the files are written
    into a sibling temporary directory that then replaces `out_dir` whole."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_model_card(tmp, out_dir)  # README.md: what the run did, how sglang serves it
    from colocate.train.checkpoint import replace_dir

    replace_dir(tmp, out_dir)
    return out_dir


def draft_config(arch: DraftArch, aux_layer_ids: list[int], target_config) -> dict:
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
        **rope_keys(arch),
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
    check_names(state_dict, EXPECTED_PREFIXES)
    if d2t.numel() != arch.draft_vocab_size or t2d.numel() != arch.target_vocab_size:
        raise ExportError(f"d2t ({d2t.numel()}) / t2d ({t2d.numel()}) do not match the draft "
                          f"vocabulary {arch.draft_vocab_size} / target {arch.target_vocab_size}")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    tensors["d2t"] = d2t.to("cpu", torch.int64).contiguous()
    tensors["t2d"] = t2d.to("cpu", torch.bool).contiguous()
    return write_export(tensors, draft_config(arch, aux_layer_ids, target_config), out_dir)


def load_checkpoint_weights(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The draft's weights from a DCP checkpoint, in one process (no process group), read
    into the state dict of `model` (the recipe's module, which names and shapes them)."""
    import inspect

    import torch.distributed.checkpoint as dcp

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
    from colocate.draft.recipe import recipe_for
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
    recipe = recipe_for(cfg)
    layer_ids = recipe.layer_ids(target_config.num_hidden_layers)
    vocab = ckpt.read_vocab(path)
    arch, model = recipe.build_model(target_config, vocab["d2t"].numel(), layer_ids)
    weights = load_checkpoint_weights(path, model)
    recipe.export(weights, arch, vocab=vocab, layer_ids=layer_ids, target_config=target_config,
                  out_dir=args.out_dir)
    # The card again, from the run named here: out_dir need not lie inside it.
    write_model_card(args.out_dir, args.out_dir, run_dir=args.run_dir)
    print(f"exported {path} -> {args.out_dir}")
    return 0
