"""The DFlash export against what sglang 0.5.17's loader does with it.

sglang cannot be imported here (no CUDA), so its loader is transcribed below from the
source, each piece citing the file and function it comes from:

* `sglang_config(cfg)`: `parse_dflash_draft_config` and `DFlashDraftConfig.resolve_*`
  (srt/speculative/dflash_utils.py), `_handle_dflash` (srt/arg_groups/speculative_hook.py:
  speculative_num_draft_tokens from block_size), `_resolve_mask_token_id`
  (srt/speculative/dflash_worker_v2.py, tokenizer skipped), `set_dflash_layers_to_capture`
  (srt/models/qwen3.py) and `_get_dflash_layer_attention_params` (srt/models/dflash.py).
* `sglang_parameters(cfg)`: `DFlashDraftModel.__init__` and its `DFlashDecoderLayer` /
  `DFlashAttention` / `DFlashMLP` (srt/models/dflash.py) at tensor-parallel size 1.
* `sglang_load(params, tensors)`: `DFlashDraftModel.load_weights` (srt/models/dflash.py)
  with the shard layouts of `QKVParallelLinear` (q, k, v rows) and
  `MergedColumnParallelLinear` (gate rows, then up rows).
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from colocate.config import DraftSection
from colocate.draft.dflash import DFlashArch, DFlashDraft
from colocate.export import ExportError
from colocate.export_dflash import dflash_weight_shapes, export_dflash

TARGET = SimpleNamespace(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling=None, max_position_embeddings=256, vocab_size=96,
                         num_hidden_layers=8, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def tiny_arch(num_layers=3, target_layer_ids=(1, 3, 6), block_size=8, mask_token_id=95):
    section = DraftSection(num_layers=num_layers, block_size=block_size, intermediate_size=40)
    return DFlashArch.from_target_config(TARGET, section, list(target_layer_ids), mask_token_id)


# ----------------------------------------------------------- sglang 0.5.17, transcribed


def sglang_config(cfg: dict, target_num_layers: int) -> dict:
    """What the server resolves from the draft's config.json (no tokenizer)."""
    # parse_dflash_draft_config: dflash_config first, then top-level keys.
    dcfg = cfg.get("dflash_config") or {}
    num_layers = cfg.get("num_hidden_layers")
    block_size = dcfg.get("block_size", cfg.get("block_size"))
    layer_ids = dcfg.get("target_layer_ids", cfg.get("target_layer_ids"))
    mask_token_id = dcfg.get("mask_token_id")
    assert isinstance(mask_token_id, int) and not isinstance(mask_token_id, bool)
    # resolve_target_layer_ids: None -> build_target_layer_ids(L, num_hidden_layers), one
    # per DRAFT layer; given ids are checked against 0 <= id < L.
    assert layer_ids is not None, "sglang would derive the ids from the draft depth"
    assert all(0 <= int(i) < target_num_layers for i in layer_ids)
    # _handle_dflash: speculative_num_draft_tokens = resolve_block_size(default=None), else 16.
    # _get_dflash_layer_attention_params: full_attention and not is_causal -> ENCODER_ONLY.
    layer_types = cfg.get("layer_types")
    encoder_only = (layer_types is None or all(t == "full_attention" for t in layer_types)) \
        and not cfg.get("is_causal", False)
    return {"num_hidden_layers": int(num_layers), "block_size": int(block_size),
            "num_draft_tokens": int(block_size if block_size is not None else 16),
            "target_layer_ids": [int(i) for i in layer_ids],
            # set_dflash_layers_to_capture: before layer id + 1, i.e. the output of layer id.
            "layers_to_capture": [int(i) + 1 for i in layer_ids],
            "mask_token_id": mask_token_id, "encoder_only": encoder_only,
            "num_context_features": len(layer_ids)}


def sglang_parameters(cfg: dict, num_context_features: int) -> dict[str, tuple[int, ...]]:
    """named_parameters() of DFlashDraftModel(config), tp size 1, attention_bias False."""
    hidden, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    num_kv = cfg.get("num_key_value_heads", num_heads)
    head_dim = cfg.get("head_dim", hidden // num_heads)
    inter = cfg["intermediate_size"]
    params = {"fc.weight": (hidden, num_context_features * hidden),
              "hidden_norm.weight": (hidden,), "norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        params.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.qkv_proj.weight": ((num_heads + 2 * num_kv) * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, num_heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_up_proj.weight": (2 * inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    return params


def sglang_load(cfg: dict, params: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]):
    """load_weights: (parameter -> rows filled, names ignored). Raises on a shape the
    weight loaders would reject."""
    num_heads = cfg["num_attention_heads"]
    num_kv = cfg.get("num_key_value_heads", num_heads)
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // num_heads)
    inter = cfg["intermediate_size"]
    q, kv = num_heads * head_dim, num_kv * head_dim
    shard_rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv),
                  0: (0, inter), 1: (inter, 2 * inter)}
    stacked = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
               ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
               ("gate_up_proj", "up_proj", 1)]

    def resolve(name):  # resolve_param_name: as is, or with/without a "model." prefix
        if name in params:
            return name
        other = name[len("model."):] if name.startswith("model.") else "model." + name
        return other if other in params else None

    filled = {name: torch.zeros(shape[0], dtype=torch.int64) for name, shape in params.items()}
    ignored = []
    for name, weight in tensors.items():
        for param_name, weight_name, shard in stacked:
            if f".{weight_name}." not in name:
                continue
            resolved = resolve(name.replace(weight_name, param_name))
            if resolved is None:
                continue
            lo, hi = shard_rows[shard]
            assert tuple(weight.shape) == (hi - lo,) + params[resolved][1:], (name, weight.shape)
            filled[resolved][lo:hi] += 1
            break
        else:
            resolved = resolve(name)
            if resolved is None:  # "Ignore unexpected weights"
                ignored.append(name)
                continue
            assert tuple(weight.shape) == params[resolved], (name, weight.shape)
            filled[resolved] += 1
    return filled, ignored


# ------------------------------------------------------------------------------ tests


@pytest.fixture
def exported(tmp_path):
    arch = tiny_arch()
    model = DFlashDraft(arch)
    model.init_weights(torch.Generator().manual_seed(0), std=0.1)
    out = export_dflash(model.state_dict(), arch, target_config=TARGET,
                        out_dir=str(tmp_path / "export"))
    return arch, model, out


def test_every_loader_parameter_gets_exactly_one_tensor(exported):
    arch, model, out = exported
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    served = sglang_config(cfg, TARGET.num_hidden_layers)
    params = sglang_parameters(cfg, served["num_context_features"])
    filled, ignored = sglang_load(cfg, params, tensors)
    assert ignored == []
    assert {name: rows.tolist() for name, rows in filled.items() if not (rows == 1).all()} == {}
    assert len(params) == 3 + 8 * arch.num_layers
    # The table the export checks against agrees with the model's own state dict.
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dflash_weight_shapes(arch)


def test_config_parses_to_the_trained_layers_block_and_mask(exported):
    arch, _, out = exported
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["DFlashDraftModel"]
    served = sglang_config(cfg, TARGET.num_hidden_layers)
    assert served == {"num_hidden_layers": 3, "block_size": 8, "num_draft_tokens": 8,
                      "target_layer_ids": [1, 3, 6], "layers_to_capture": [2, 4, 7],
                      "mask_token_id": 95, "encoder_only": True, "num_context_features": 3}
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"]) == (32, 4, 2, 16, 40)
    assert cfg["num_target_layers"] == 8 and cfg["vocab_size"] == 96
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}


def test_weights_reload_bit_exact_in_bf16(exported):
    _, model, out = exported
    tensors = load_file(os.path.join(out, "model.safetensors"))
    state = model.state_dict()
    assert tensors.keys() == state.keys()
    for name, value in state.items():
        assert tensors[name].dtype == torch.bfloat16
        assert torch.equal(tensors[name], value.to(torch.bfloat16)), name


def test_refuses_names_sglang_would_drop_and_wrong_shapes(tmp_path):
    arch = tiny_arch()
    state = DFlashDraft(arch).state_dict()
    with pytest.raises(ExportError, match="silently drop"):
        export_dflash({**state, "embed_tokens.weight": torch.zeros(96, 32)}, arch,
                      target_config=TARGET, out_dir=str(tmp_path / "a"))
    with pytest.raises(ExportError, match="missing .*layers.2.mlp.down_proj"):
        export_dflash({k: v for k, v in state.items() if k != "layers.2.mlp.down_proj.weight"},
                      arch, target_config=TARGET, out_dir=str(tmp_path / "b"))
    with pytest.raises(ExportError, match="wrong shape .*fc.weight"):
        export_dflash({**state, "fc.weight": torch.zeros(32, 64)}, arch, target_config=TARGET,
                      out_dir=str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_refuses_the_last_target_layer(tmp_path):
    # sglang would capture "before layer 8" of an 8-layer target: never, so fc gets 2 of 3.
    arch = tiny_arch(target_layer_ids=(1, 3, 7))
    with pytest.raises(ExportError, match=r"\[7\] cannot be captured .*\(valid 0\.\.6\)"):
        export_dflash(DFlashDraft(arch).state_dict(), arch, target_config=TARGET,
                      out_dir=str(tmp_path / "x"))
