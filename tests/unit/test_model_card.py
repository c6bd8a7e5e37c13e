"""The README.md model card beside an export (issue 16, item 9): what the run did, from the
files the run left, and the sglang command that serves it."""

import json
import os

import yaml

from colocate.config import Config
from colocate.model_card import write_model_card

DRAFT_CONFIG = {"hidden_size": 128, "draft_vocab_size": 512, "vocab_size": 1024,
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]},
                "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1}


def make_run(tmp_path, evals=()):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    cfg = Config().to_dict()
    cfg["target"]["path"] = "/models/target-llama"
    cfg["data"].update(path="/data/gen.jsonl", holdout=48)
    cfg["eval"]["steps"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": s, "tokens": 1000, "sim_accept_length": 1.5 + s / 10} for s in (1, 2, 3, 4)]
    rows[-1]["val_sim_accept_length"] = 1.96
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"st')
    if evals:
        (run / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run / "export" / "config.json").write_text(json.dumps(DRAFT_CONFIG))
    return run


def test_card_lists_what_the_run_did(tmp_path):
    run = make_run(tmp_path, evals=[{"step": 4, "engine": "hf", "accept_length": 1.95,
                                     "num_prompts": 48, "steps": 3}])
    card = open(write_model_card(str(run / "export"), str(run / "export"))).read()
    assert "# EAGLE3 draft for `target-llama`" in card
    assert "| target | `/models/target-llama` |" in card
    assert "| data | `/data/gen.jsonl` (48 conversations held out) |" in card
    assert "| steps | 4 optimizer steps, 4,000 tokens" in card
    assert "| simulated accept length | 1.96 (step 4) held out; 1.75 on training" in card
    assert ("| served accept length | 1.95 (hf, 3 draft tokens, 48 held-out prompts, step 4) |"
            in card)
    assert (f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {run / 'export'} "
            "--speculative-num-steps 3 --speculative-eagle-topk 1 "
            "--speculative-num-draft-tokens 4") in card
    assert "--model-path /models/target-llama" in card


def test_card_without_a_served_eval_or_a_run(tmp_path):
    run = make_run(tmp_path)
    card = open(write_model_card(str(run / "export"), str(run / "export"))).read()
    assert "| served accept length | not measured" in card
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text(json.dumps(DRAFT_CONFIG))
    card = open(write_model_card(str(alone), str(alone))).read()
    assert "| steps |" not in card and "--speculative-algorithm EAGLE3" in card
    assert os.path.basename(write_model_card(str(alone), str(alone))) == "README.md"


def test_card_says_the_answers_were_decoded_online(tmp_path):
    run = make_run(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["source"] = "generate"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 1, "tokens": 1000, "sim_accept_length": 1.5, "decode_records": 1234,
             "decode_tokens": 56789, "decode_truncated": 7}]
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    card = open(write_model_card(str(run / "export"), str(run / "export"))).read()
    assert ("(48 conversations held out); answers decoded online by the target during "
            "training (auto, temperature 0.0, at most 256 tokens): 1,234 records, 56,789 "
            "tokens, 7 cut at the training length (first engine) |") in card


def test_card_names_epochs_and_warm_start(tmp_path):
    run = make_run(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"].update(epochs=2, max_steps=0)
    cfg["draft"]["init_from"] = "/drafts/earlier/export"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    card = open(write_model_card(str(run / "export"), str(run / "export"))).read()
    assert "| steps | 4 optimizer steps (2 epochs of the data), 4,000 tokens" in card
    assert ("| warm start | from the weights of `/drafts/earlier/export` (optimizer and schedule "
            "started fresh) |") in card
    plain = open(write_model_card(str(make_run(tmp_path / "b") / "export"),
                                  str(tmp_path / "b" / "run" / "export"))).read()
    assert "epochs of the data" not in plain and "warm start" not in plain
