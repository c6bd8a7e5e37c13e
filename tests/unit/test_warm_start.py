"""draft.init_from's checks on their own: a wrong method, architecture, shape or vocabulary
map is refused naming the key and both values (the torchrun test covers the happy path)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from colocate.config import ConfigError, load_config
from colocate.train.warm_start import check_init_config, load_init_weights

TARGET = SimpleNamespace(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, intermediate_size=256, vocab_size=1024)
CONFIG = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "intermediate_size": 256, "num_hidden_layers": 1, "vocab_size": 1024,
          "draft_vocab_size": 512, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}}


def export(tmp_path, **changes):
    out = tmp_path / "export"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    d2t = torch.arange(512) * 0 + 1
    save_file({"d2t": d2t, "t2d": torch.ones(1024, dtype=torch.bool),
               "norm.weight": torch.ones(128)}, str(out / "model.safetensors"))
    return str(out)


def cfg_for(path, *extra):
    return load_config(None, [f"draft.init_from={path}", "draft.draft_vocab_size=512", *extra])


def test_a_matching_export_passes(tmp_path):
    check_init_config(cfg_for(export(tmp_path)), TARGET, [1, 2, 3])


@pytest.mark.parametrize("changes, layer_ids, extra, message", [
    ({}, [0, 2, 4], (), "eagle_config.eagle_aux_hidden_state_layer_ids is [1, 2, 3], this "
                        "run's draft has [0, 2, 4]; warm start needs the same shape (check "
                        "target.aux_layer_ids"),
    ({"draft_vocab_size": 256}, [1, 2, 3], (), "draft_vocab_size is 256, this run's draft has "
                                               "512; warm start needs the same shape (check "
                                               "draft.draft_vocab_size"),
    ({"hidden_size": 64}, [1, 2, 3], (), "hidden_size is 64, this run's draft has 128; warm "
                                         "start needs the same shape (check target.path"),
    ({"architectures": ["DFlashDraftModel"]}, [1, 2, 3], (),
     "architectures ['DFlashDraftModel'], not [LlamaForCausalLMEagle3]"),
    ({}, [1, 2, 3], ("draft.method=dflash",),
     "draft.init_from supports eagle3 exports only for now; draft.method is dflash"),
])
def test_mismatches_name_the_key_and_both_values(tmp_path, changes, layer_ids, extra, message):
    with pytest.raises(ConfigError) as e:
        check_init_config(cfg_for(export(tmp_path, **changes), *extra), TARGET, layer_ids)
    assert message in str(e.value)


def test_a_missing_file_and_another_vocabulary(tmp_path):
    with pytest.raises(ConfigError, match="draft.init_from .*nowhere.*: no config.json; point "
                                          "it at an exported draft"):
        check_init_config(cfg_for(tmp_path / "nowhere"), TARGET, [1, 2, 3])
    cfg = cfg_for(export(tmp_path))
    ours = {"d2t": torch.ones(512, dtype=torch.int64), "t2d": torch.ones(1024, dtype=torch.bool)}
    assert set(load_init_weights(cfg, ours)) == {"norm.weight"}
    ours["d2t"][:3] = 7
    with pytest.raises(ConfigError) as e:
        load_init_weights(cfg, ours)
    assert ("model.safetensors: d2t (3 of 512 entries differ) is not this run's draft "
            "vocabulary, which data.path and draft.draft_vocab_size decide") in str(e.value)
