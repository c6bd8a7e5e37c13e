"""Config loading: YAML + dotted overrides, validation messages that name the key."""

import argparse
import re

import pytest

from colocate.config import (Config, ConfigError, describe_path, float_arg, int_arg, load_config,
                             save_config)


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=5", "target.aux_layer_ids=[1, 2, 3]",
                             "train.betas=[0.9, 0.99]", "run.dir=runs/x"])
    assert cfg.train.max_steps == 5 and cfg.target.aux_layer_ids == [1, 2, 3]
    assert cfg.train.betas == (0.9, 0.99) and cfg.run.dir == "runs/x"
    assert cfg.last_step == 5


def test_off_stays_a_string_and_only_true_false_are_booleans(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mps:\n  mode: off\ndata:\n  shuffle: true\n")
    cfg = load_config(str(path), ["engine.backend=hf"])
    assert cfg.mps.mode == "off" and cfg.data.shuffle is True
    with pytest.raises(ConfigError, match="data.shuffle: expected true or false, got 'no'"):
        load_config(None, ["data.shuffle=no"])


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "train.max_stepz: unknown key; did you mean train.max_steps?"),
    ("trian.lr=1", "trian: unknown key; did you mean train?"),
    ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
    ("train.max_steps=1.5", "train.max_steps: expected an integer"),
    ("mps.engine_mem_fraction=0.9", "mps.trainer_mem_fraction: trainer (0.45) + engine (0.9)"),
    ("mps.trainer_priority=high", "mps.trainer_priority: got 'high'; use normal or low"),
    ("mps.engine_priority=lowest", "mps.engine_priority: got 'lowest'; use normal or low"),
    ("data.max_length=4096", "data.tokens_per_micro_step: 2048 is below data.max_length"),
    ("transport.num_slots=0", "transport.num_slots: got 0"),
    ("train.stop_at_step=-1", "train.stop_at_step: got -1"),
    ("bench.engine=replay", None),
    ("target.load_format=safetensors", "target.load_format: got 'safetensors'"),
    ("train.max_steps", "expected key=value"),
    ("generate.engine=vllm", "generate.engine: got 'vllm'; use auto, hf or sglang"),
    ("generate.top_p=0", "generate.top_p: got 0.0"),
    ("generate.temperature=-1", "generate.temperature: got -1.0"),
    ("generate.mem_fraction=1", "generate.mem_fraction: got 1.0"),
    ("generate.chunk_records=0", "generate.chunk_records: got 0"),
    ("generate.cuda_graph_max_batch=512", "generate.cuda_graph_max_batch: 512 has no effect "
     "without CUDA graphs; set generate.cuda_graph=true"),
    ("generate.kv_cache_dtype=fp8", "generate.kv_cache_dtype: got 'fp8'; use one of auto, "
     "fp8_e4m3, fp8_e5m2"),
    ("eval.engine=vllm", "eval.engine: got 'vllm'; use auto, hf, sglang or both"),
    ("eval.steps=40", "eval.steps: got 40"),
    ("eval.every_steps=-1", "eval.every_steps: got -1"),
    ("eval.mem_fraction=0", "eval.mem_fraction: got 0.0; use a fraction in (0, 1)"),
    ("eval.cuda_graph=maybe", "eval.cuda_graph: expected"),
])
def test_bad_values_name_the_key(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("?", r"\?").replace("+", r"\+")):
        load_config(None, [override])


def test_priorities_low_on_both_sides_are_refused():
    with pytest.raises(ConfigError, match="mps.engine_priority: trainer and engine both low"):
        load_config(None, ["mps.trainer_priority=low", "mps.engine_priority=low"])


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 5e-3 as a string; a learning rate written so must still work.
    assert load_config(None, ["train.lr=5e-3"]).train.lr == 0.005


def test_numbers_as_users_write_them(tmp_path):
    # YAML and key=value alike: exponents without a dot, underscores, 1e3 for an integer.
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  lr: 3e-4\n  max_steps: 1_000\n  warmup_steps: 1e2\n"
                         "run:\n  timeout_s: 1_200\n  startup_timeout_s: 2e3\n")
    cfg = load_config(str(yaml_file), ["train.min_lr_ratio=1e-1", "data.max_length=2_048",
                                       "data.tokens_per_micro_step=4e3", "train.betas=[9e-1, 0.95]"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_steps) == (3e-4, 1000, 100)
    assert (cfg.run.timeout_s, cfg.run.startup_timeout_s) == (1200.0, 2000.0)
    assert (cfg.train.min_lr_ratio, cfg.data.max_length) == (0.1, 2048)
    assert cfg.data.tokens_per_micro_step == 4000 and cfg.train.betas == (0.9, 0.95)
    assert isinstance(cfg.train.max_steps, int) and isinstance(cfg.run.timeout_s, float)
    for bad, message in (("train.max_steps=1.5", "expected an integer, got 1.5"),
                         ("train.max_steps=2.5e0", "expected an integer, got '2.5e0'"),
                         ("train.lr=fast", "expected a number, got 'fast'"),
                         ("train.lr=.nan", "expected a number, got nan"),
                         ("train.lr=true", "expected a number, got True")):
        with pytest.raises(ConfigError, match=bad.split("=")[0] + ": " + re.escape(message)):
            load_config(None, [bad])


def test_command_line_numbers_as_users_write_them():
    assert int_arg("1_000") == 1000 and int_arg("16e6") == 16_000_000
    assert float_arg("3e-4") == 3e-4 and float_arg("1_000.5") == 1000.5
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '1.5'"):
        int_arg("1.5")


def test_relative_paths_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(
            f"--config conf/run.yaml (looked for {tmp_path}/conf/run.yaml; relative paths "
            f"resolve from the working directory {tmp_path}): no such file")):
        load_config("conf/run.yaml")
    assert describe_path("/abs/x.jsonl") == "/abs/x.jsonl"


def test_cross_section_check():
    with pytest.raises(ConfigError, match="engine.backend: sglang needs CUDA"):
        load_config(None, ["engine.backend=sglang", "run.device=cpu"])
    with pytest.raises(ConfigError, match="eval.engine: both needs CUDA"):
        load_config(None, ["eval.engine=both", "run.device=cpu"])


def test_sequence_parallel_combinations_that_cannot_work_are_refused():
    load_config(None, ["train.sp_size=2"])  # eagle3, dataset, hf: fine
    load_config(None, ["train.sp_size=2", "engine.backend=sglang", "engine.tp_size=2"])
    load_config(None, ["train.sp_size=2", "draft.method=dflash"])  # built for both methods
    for overrides, message in [
        (["train.sp_size=0"], "train.sp_size: got 0; use 1 (off)"),
        (["train.sp_size=2", "data.source=generate"],
         "train.sp_size: 2 with data.source=generate: online decode is not sequence-parallel"),
        (["train.sp_size=2", "engine.backend=sglang"],
         "engine.tp_size: 1 with train.sp_size=2: the sglang engines of one sequence-parallel "
         "group prefill each sequence together as one tensor-parallel group; set "
         "engine.tp_size=2")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides)


def test_validation_without_a_holdout_fails_only_for_training():
    cfg = load_config(None, ["train.val_every_steps=5", "data.holdout=0",  # eval may read it
                             "train.max_steps=10"])
    with pytest.raises(ConfigError, match="train.val_every_steps: validation needs held-out "
                                          "conversations; set data.holdout"):
        cfg.check_training()
    load_config(None, ["train.val_every_steps=5", "data.holdout=8",
                       "train.max_steps=10"]).check_training()


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="--config .*nope.yaml: no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "mps.mode=off", "target.aux_layer_ids=[1,2]"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert isinstance(Config().to_dict()["train"]["betas"], list)


def test_a_setting_of_the_other_draft_method_is_named_not_ignored(monkeypatch):
    import warnings

    monkeypatch.delenv("RANK", raising=False)

    with pytest.warns(UserWarning) as caught:
        load_config(None, ["draft.method=dflash", "draft.unroll_steps=3", "draft.block_size=8"])
    assert [str(w.message) for w in caught] == [
        "draft.unroll_steps=3 has no effect with draft.method=dflash "
        "(it belongs to draft.method=eagle3)"]
    with pytest.warns(UserWarning, match=r"draft.num_anchors=64 has no effect with "
                                         r"draft.method=eagle3 \(it belongs to draft.method=dflash\)"):
        load_config(None, ["draft.num_anchors=64"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["draft.method=dflash", "draft.block_size=8", "draft.num_layers=2"])
    monkeypatch.setenv("RANK", "3")  # said once per job, by rank 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["draft.method=dflash", "draft.unroll_steps=3"])
