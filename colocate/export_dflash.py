"""Write a DFlash draft as the checkpoint sglang 0.5.17 serves with speculative_algorithm=DFLASH.

Output (`export_dflash`): `config.json`, a Qwen3 config of the draft's own layers that
sglang's `DFlashDraftModel` (srt/models/dflash.py) and `parse_dflash_draft_config`
(srt/speculative/dflash_utils.py) read:

* `architectures: ["DFlashDraftModel"]`, `model_type: qwen3`, the draft's geometry
  (`num_hidden_layers` = draft layers, the rest copied from the target);
* `block_size` (top level, where the 0.5.17 parser looks after `dflash_config`): the
  server infers `speculative_num_draft_tokens` from it;
* `num_target_layers`: the target's depth (sglang only warns when the served target differs);
* `dflash_config.target_layer_ids`: our convention, the OUTPUT of layer i (HF style). sglang
  uses the same convention here and adds the one itself (`set_dflash_layers_to_capture`
  captures before layer i + 1), so the ids pass through unchanged. Without the key sglang
  would pick `build_target_layer_ids(L, num_hidden_layers)`, one per DRAFT layer: wrong as
  soon as the feature count differs from the draft depth, hence always written;
* `dflash_config.mask_token_id`: always written. Without it sglang looks the mask token
  ("<|MASK|>") up in the tokenizer, which our engines skip (skip_tokenizer_init), and it may
  add it to the vocabulary;
* `layer_types` all "full_attention" and no `is_causal`: sglang then runs every draft layer
  as ENCODER_ONLY attention (the block sees all of itself), as the draft was trained.

`model.safetensors` (bf16) holds exactly `dflash_weight_shapes(arch)`: sglang's loader stacks
q/k/v into qkv_proj and gate/up into gate_up_proj, and silently skips any other name, so the
export refuses a state dict with a missing, extra or misshapen tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from colocate.export import ExportError, check_names, rope_keys, write_export

if TYPE_CHECKING:
    from colocate.draft.dflash import DFlashArch

ARCHITECTURE = "DFlashDraftModel"
EXPECTED_PREFIXES = ("fc.", "hidden_norm.", "layers.", "norm.")


def dflash_weight_shapes(arch: "DFlashArch") -> dict[str, tuple[int, ...]]:
    """Every tensor of the export, name -> shape (H hidden, D head dim, I intermediate)."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q_out, kv_out = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    shapes = {"fc.weight": (hidden, len(arch.target_layer_ids) * hidden),
              "hidden_norm.weight": (hidden,), "norm.weight": (hidden,)}
    for i in range(arch.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (arch.intermediate_size, hidden),
            p + "mlp.up_proj.weight": (arch.intermediate_size, hidden),
            p + "mlp.down_proj.weight": (hidden, arch.intermediate_size),
        })
    return shapes


def check_target_layer_ids(layer_ids, num_target_layers: int) -> None:
    """sglang captures layer i's output as the input of layer i + 1, so the last layer
    (L - 1, whose output only reaches the final norm) is never captured: valid ids are
    0..L-2, like Eagle3's (colocate.engine.base)."""
    bad = [i for i in layer_ids if not 0 <= int(i) <= num_target_layers - 2]
    if bad:
        raise ExportError(f"DFlash target_layer_ids {bad} cannot be captured from a target of "
                          f"{num_target_layers} layers (valid 0..{num_target_layers - 2})")


def dflash_config(arch: "DFlashArch", target_config) -> dict:
    """config.json for sglang's DFlashDraftModel (see the module docstring for each key)."""
    num_target_layers = int(target_config.num_hidden_layers)
    check_target_layer_ids(arch.target_layer_ids, num_target_layers)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": arch.num_layers,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position_embeddings,
        "vocab_size": arch.target_vocab_size,
        "tie_word_embeddings": False,
        **rope_keys(arch),
        "layer_types": ["full_attention"] * arch.num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": getattr(target_config, "bos_token_id", None),
        "eos_token_id": getattr(target_config, "eos_token_id", None),
        "torch_dtype": "bfloat16",
        "block_size": arch.block_size,
        "num_target_layers": num_target_layers,
        "dflash_config": {"mask_token_id": int(arch.mask_token_id),
                          "target_layer_ids": [int(i) for i in arch.target_layer_ids]},
    }


def export_dflash(state_dict: dict[str, torch.Tensor], arch: "DFlashArch", *, target_config,
                  out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write config.json + model.safetensors atomically into `out_dir`; returns it.

    state_dict: `DFlashDraft.state_dict()` (no buffers are persistent there)."""
    check_names(state_dict, EXPECTED_PREFIXES)
    want = dflash_weight_shapes(arch)
    missing = sorted(want.keys() - state_dict.keys())
    extra = sorted(state_dict.keys() - want.keys())
    if missing or extra:
        raise ExportError(f"DFlash draft weights do not match the arch: missing {missing[:5]}, "
                          f"unexpected {extra[:5]} (sglang would load a partial draft)")
    bad = {k: tuple(v.shape) for k, v in state_dict.items() if tuple(v.shape) != want[k]}
    if bad:
        raise ExportError(f"DFlash draft weights of the wrong shape {bad}; expected "
                          f"{ {k: want[k] for k in bad} }")
    config = dflash_config(arch, target_config)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    return write_export(tensors, config, out_dir)
