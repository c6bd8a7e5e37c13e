"""draft.init_from's checks and loading on their own, for both recipes: a wrong architecture,
shape or vocabulary map is refused naming the key, both values and the setting; a DFlash
export loads back into a fresh draft exactly (the torchrun test covers Eagle3 end to end)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, Qwen3Config

from colocate.config import ConfigError, load_config
from colocate.draft.recipe import recipe_for
from colocate.train.warm_start import apply_init_weights, check_init_config, load_init_weights

LLAMA = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, num_hidden_layers=6, vocab_size=1024)
QWEN3 = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, num_hidden_layers=6, vocab_size=256)
DFLASH = ["draft.method=dflash", "draft.num_layers=2", "draft.block_size=4",
          "draft.num_anchors=8", "draft.mask_token_id=5", "target.aux_layer_ids=[1,4]"]


def eagle3_export(tmp_path, **changes):
    cfg = load_config(None, ["draft.draft_vocab_size=512"])
    config = recipe_for(cfg).export_config(LLAMA, 512, [1, 2, 3])
    out = tmp_path / "export"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    save_file({"d2t": torch.zeros(512, dtype=torch.int64),
               "t2d": torch.ones(1024, dtype=torch.bool), "norm.weight": torch.ones(128)},
              str(out / "model.safetensors"))
    return str(out)


def checked(path, *extra, layer_ids=(1, 2, 3), target=LLAMA):
    cfg = load_config(None, [f"draft.init_from={path}", "draft.draft_vocab_size=512", *extra])
    check_init_config(cfg, recipe_for(cfg), target, list(layer_ids))
    return cfg


@pytest.mark.parametrize("changes, layer_ids, message", [
    ({}, [0, 2, 4], "eagle_config.eagle_aux_hidden_state_layer_ids is [1, 2, 3], this run's "
                    "draft has [0, 2, 4]; warm start needs the same (check target.aux_layer_ids"),
    ({"draft_vocab_size": 256}, [1, 2, 3], "draft_vocab_size is 256, this run's draft has 512; "
                                           "warm start needs the same (check "
                                           "draft.draft_vocab_size"),
    ({"hidden_size": 64}, [1, 2, 3], "hidden_size is 64, this run's draft has 128; warm start "
                                     "needs the same (check target.path"),
    ({"architectures": ["DFlashDraftModel"]}, [1, 2, 3],
     "architectures ['DFlashDraftModel'], not [LlamaForCausalLMEagle3]; draft.method=eagle3 "
     "warm-starts from a LlamaForCausalLMEagle3 export"),
])
def test_eagle3_mismatches_name_the_key_and_both_values(tmp_path, changes, layer_ids, message):
    checked(eagle3_export(tmp_path))  # as exported: accepted
    with pytest.raises(ConfigError) as e:
        checked(eagle3_export(tmp_path, **changes), layer_ids=layer_ids)
    assert message in str(e.value)


def test_another_tools_export_without_head_dim_and_another_vocabulary(tmp_path):
    path = eagle3_export(tmp_path)
    config = json.loads(open(f"{path}/config.json").read())
    del config["head_dim"]  # Llama's default: hidden_size / heads
    open(f"{path}/config.json", "w").write(json.dumps(config))
    cfg = checked(path)
    ours = {"d2t": torch.zeros(512, dtype=torch.int64), "t2d": torch.ones(1024, dtype=torch.bool)}
    assert set(load_init_weights(cfg, recipe_for(cfg), ours)) == {"norm.weight"}
    ours["d2t"][:3] = 7
    with pytest.raises(ConfigError) as e:
        load_init_weights(cfg, recipe_for(cfg), ours)
    assert ("model.safetensors: d2t (3 of 512 entries differ) is not this run's draft "
            "vocabulary, which data.path and draft.draft_vocab_size decide") in str(e.value)
    with pytest.raises(ConfigError, match="draft.init_from .*nowhere.*: no config.json; point "
                                          "it at an exported draft"):
        checked(tmp_path / "nowhere")


def test_a_dflash_export_loads_back_exactly(tmp_path):
    cfg = load_config(None, DFLASH)
    recipe = recipe_for(cfg)
    arch, trained = recipe.build_model(QWEN3, 0, [1, 4])
    out = recipe.export(trained.state_dict(), arch, vocab={}, layer_ids=[1, 4],
                        target_config=QWEN3, out_dir=str(tmp_path / "export"))
    warm = checked(out, *DFLASH, "run.seed=1", layer_ids=[1, 4], target=QWEN3)
    _, fresh = recipe_for(warm).build_model(QWEN3, 0, [1, 4])  # another seed: other weights
    apply_init_weights(fresh, load_init_weights(warm, recipe_for(warm), vocab={}), out)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor.to(torch.bfloat16).float()), name
    with pytest.raises(ConfigError) as e:
        checked(out, *DFLASH, "draft.block_size=8", layer_ids=[1, 4], target=QWEN3)
    assert ("config.json: block_size is 4, this run's draft has 8; warm start needs the same "
            "(check draft.block_size, or start without draft.init_from)") in str(e.value)
