"""The tiny demo assets: deterministic, loadable, consistent with each other."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_committed_data_is_what_the_generator_writes(tiny_builder):
    builder = tiny_builder
    with open(builder.DATA_PATH) as f:
        committed = f.read()
    expected = "".join(json.dumps(r, sort_keys=True) + "\n"
                       for r in builder.generate_conversations())
    assert committed == expected, "run: python examples/tiny/build.py --regen-data"
    assert os.path.getsize(builder.DATA_PATH) < 400_000
    records = [json.loads(line) for line in committed.splitlines()]
    assert 400 <= len(records) <= 600
    assert any("messages" in r for r in records) and any("conversations" in r for r in records)

    def roles(r):
        return ([m["role"] for m in r["messages"]] if "messages" in r
                else [m["from"] for m in r["conversations"]])

    assert any(roles(r)[0] == "system" for r in records)
    assert any(roles(r).count("assistant") + roles(r).count("gpt") > 1 for r in records)
    assert any(r.get("last_assistant_turn_only") for r in records)


def test_tokenizer_and_chat_template(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    assert 1000 <= len(tok) <= 2000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    assert tok.decode(ids) == text  # byte-level BPE round-trips exactly


def test_targets_load_and_match_the_tokenizer(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    for key, model_type in (("target_llama", "llama"), ("target_qwen3", "qwen3")):
        path = tiny_assets[key]
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
        assert _sha(os.path.join(path, "tokenizer.json")) == _sha(
            os.path.join(tiny_assets["tokenizer"], "tokenizer.json"))
        config = AutoConfig.from_pretrained(path)
        assert config.model_type == model_type and config.vocab_size == len(tok)
        assert config.num_hidden_layers == 6 and config.hidden_size == 128
        assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 7, 9]])).logits
        assert logits.shape == (1, 4, len(tok)) and torch.isfinite(logits).all()


def test_build_skips_when_up_to_date_and_force_rebuilds_identically(tiny_builder, tiny_assets):
    builder = tiny_builder
    out = os.path.dirname(tiny_assets["tokenizer"])
    weights = os.path.join(tiny_assets["target_llama"], "model.safetensors")
    mtime, digest = os.stat(weights).st_mtime_ns, _sha(weights)
    assert builder.build(out) == tiny_assets
    assert os.stat(weights).st_mtime_ns == mtime  # nothing rewritten
    builder.build(out, force=True)
    assert os.stat(weights).st_mtime_ns != mtime
    assert _sha(weights) == digest  # seeded: the rebuild writes the same bytes
