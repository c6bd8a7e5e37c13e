"""`colocate generate`: the hf engine against transformers' own greedy generate, the written
records against the training pipeline, resume after real interruptions, counted skips."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from colocate import cli
from colocate.config import ConfigError, load_config
from colocate.data import (DataStats, Renderer, encode_conversation, encode_prompt,
                           read_conversations)
from colocate.generate.engines import Generation
from colocate.generate.rewrite import round_trips
from colocate.generate.run import generate_file
from colocate.generate.store import GenerateError, PartStore
from tests.chat_templates import FAILING_TEMPLATE
from tests.unit.test_data_reasoning_templates import QWEN3_STYLE, _not_round_tripping_ids

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny", "config.yaml")
END = "<|im_end|>"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two OpenMP threads made tiny-model decoding ~10x slower on the 2-core CI machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(target: str, data: str, *extra: str):
    return load_config(CONFIG, [f"target.path={target}", f"data.path={data}",
                                "run.device=cpu", "generate.engine=hf", *extra])


def write_jsonl(path, lines) -> str:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def head(tiny_assets, tmp_path, n: int) -> str:
    with open(tiny_assets["data"]) as f:
        lines = [next(f).rstrip("\n") for _ in range(n)]
    return write_jsonl(tmp_path / f"head{n}.jsonl", lines)


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


class ScriptedGenerator:
    """A hand-written engine that answers with given ids and keeps the prompts it got."""

    name = "scripted"

    def __init__(self, replies: list[tuple[list[int], str]]):
        self.replies = list(replies)
        self.prompts: list[list[int]] = []

    def generate(self, prompts, seeds, on_batch=None, max_new_tokens=None):
        self.prompts += prompts
        return [Generation(*self.replies.pop(0)) for _ in prompts]

    def close(self):
        pass


# --------------------------------------------------------------------------- hf = transformers


def greedy_alone(model, prompt: list[int], max_new: int, stops: list[int]) -> list[int]:
    """transformers' own greedy generate on one prompt, cut after its first stop id."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=stops, pad_token_id=0)[0, len(prompt):].tolist()
    for n, token in enumerate(out):
        if token in stops:
            return out[:n + 1]
    return out


def test_hf_equals_transformers_greedy_turn_by_turn_and_training_reads_it_back(
        tiny_assets, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tok, max_new = tiny_tokenizer, 12
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["target_llama"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    data = head(tiny_assets, tmp_path, 8)  # both forms; lines 5 and 7 have two replies
    renderer = Renderer(tok, tok.chat_template)
    # An extra stop id the target certainly emits (the first greedy token on record 1 that
    # differs from its first), put in the model's generation_config.json: both finish
    # reasons occur, and the model's own eos ids are honoured next to the tokenizer's.
    first = next(read_conversations(data, skip_invalid=False, stats=DataStats()))
    alone = greedy_alone(model, encode_prompt(first, renderer, 2), max_new, [])
    extra_stop = next((t for t in alone if t != alone[0]), alone[-1])
    stops = [tok.eos_token_id, extra_stop]
    target = tmp_path / "target"
    shutil.copytree(tiny_assets["target_llama"], target)
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))

    out = str(tmp_path / "out.jsonl")
    summary = generate_file(tiny_cfg(str(target), data, f"generate.max_new_tokens={max_new}",
                                     "generate.batch_size=3", "generate.chunk_records=4"),
                            data_path=data, out_path=out)
    assert summary["complete"] and summary["records_written"] == 8
    assert summary["settings"]["stop_ids"] == stops
    assert summary["finished_stop"] >= 1  # record 1 stops on extra_stop at the latest

    sources, records = read_records(data), read_records(out)
    conversations = list(read_conversations(out, skip_invalid=False, stats=DataStats()))
    num_turns = 0
    for n, (source, record, conv) in enumerate(zip(sources, records, conversations), start=1):
        assert record["generated"]["source_line"] == n
        assert {k: v for k, v in record.items() if k != "generated"}.keys() == source.keys()
        full = encode_conversation(conv, renderer)
        for r, turn in enumerate(conv.assistant_turns):
            ids = list(conv.turns[turn].token_ids)
            prompt = encode_prompt(conv, renderer, turn)  # after the REGENERATED replies
            assert ids == greedy_alone(model, prompt, max_new, stops), (n, turn)
            reason = "stop" if ids[-1] in stops else "length"
            assert record["generated"]["finish_reasons"][r] == reason
            assert conv.turns[turn].content == tok.decode(ids, skip_special_tokens=True)
            assert full.ids[:len(prompt) + len(ids)] == prompt + ids, (n, turn)
            num_turns += 1
        assert full.ids_used == len(conv.assistant_turns)
        # System and user turns as they were (ShareGPT keeps its from/value keys).
        form = "messages" if "messages" in source else "conversations"
        kept = [m for m in source[form] if m.get("role", m.get("from")) not in ("assistant", "gpt")]
        assert [m for m in record[form] if "token_ids" not in m] == kept
    assert summary["turns_generated"] == num_turns == 10
    not_rt = sum(not round_trips(tok, list(c.turns[t].token_ids), tuple(stops))
                 for c in conversations for t in c.assistant_turns)
    assert summary["not_round_tripping"] == not_rt
    with open(out + ".summary.json") as f:
        assert json.load(f) == summary


# --------------------------------------------------------------------------- resume


def test_resume_after_limit_and_after_sigkill_gives_the_uninterrupted_output(tiny_assets,
                                                                             tmp_path, capsys):
    data = head(tiny_assets, tmp_path, 12)
    settings = ["generate.max_new_tokens=16", "generate.chunk_records=2",
                "generate.batch_size=2"]
    cfg = tiny_cfg(tiny_assets["target_llama"], data, *settings)
    reference = str(tmp_path / "reference.jsonl")
    generate_file(cfg, data_path=data, out_path=reference)
    with open(reference) as f:
        expected = f.read()
    assert [r["generated"]["source_line"] for r in read_records(reference)] == list(range(1, 13))

    # --limit: a partial OUT (parts kept), then a run without it goes on from there.
    out = str(tmp_path / "limited.jsonl")
    partial = generate_file(cfg, data_path=data, out_path=out, limit=5)  # cuts a chunk
    assert not partial["complete"] and partial["records_read"] == 5
    assert [r["generated"]["source_line"] for r in read_records(out)] == list(range(1, 6))
    assert os.path.isdir(out + ".parts")
    capsys.readouterr()
    full = generate_file(cfg, data_path=data, out_path=out)
    assert full["complete"] and full["records_read"] == 12 and not os.path.exists(out + ".parts")
    assert full["engine"] == "hf" and "generate: 12/12 records | " in capsys.readouterr().out
    with open(out) as f:
        assert f.read() == expected

    # SIGKILL once the first chunk has landed; the rerun redoes only what is missing.
    killed = str(tmp_path / "killed.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "colocate", "generate", "--config", CONFIG,
                             "--out", killed, "--data", data,
                             f"target.path={tiny_assets['target_llama']}", "run.device=cpu",
                             "generate.engine=hf", *settings],
                            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not glob.glob(killed + ".parts/part-*.json") and proc.poll() is None:
        assert time.monotonic() < deadline, "no part file within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert not os.path.exists(killed)
    num_parts = len(glob.glob(killed + ".parts/part-*.json"))
    assert 1 <= num_parts < 6
    resumed = generate_file(cfg, data_path=data, out_path=killed)
    assert resumed["records_read"] == 12 and resumed["records_written"] == 12
    with open(killed) as f:
        assert f.read() == expected

    # Complete: a rerun does nothing; other settings are refused until --force.
    assert generate_file(cfg, data_path=data, out_path=killed) == resumed
    assert "is complete (12 records); nothing to do" in capsys.readouterr().out
    other = tiny_cfg(tiny_assets["target_llama"], data, *settings, "generate.max_new_tokens=8")
    with pytest.raises(GenerateError, match="made from other inputs or settings.*--force"):
        generate_file(other, data_path=data, out_path=killed, limit=3)
    redone = generate_file(other, data_path=data, out_path=killed, limit=3, force=True)
    assert redone["records_read"] == 3 and redone["settings"]["max_new_tokens"] == 8


def test_a_limit_run_finds_parts_that_cover_the_whole_file_complete(tiny_assets, tmp_path):
    from colocate.generate.run import _regenerate, prepare

    data = head(tiny_assets, tmp_path, 5)
    cfg = tiny_cfg(tiny_assets["target_llama"], data, "generate.max_new_tokens=4",
                   "generate.chunk_records=2")
    out = str(tmp_path / "out.jsonl")
    # Every part written, then killed before OUT was assembled.
    job, store = prepare(cfg, data), PartStore(out)
    store.open(job.key, job.settings, force=False)
    _regenerate(cfg, job, store, data, 5, None, None)
    store.close()
    assert not os.path.exists(out)
    summary = generate_file(cfg, data_path=data, out_path=out, limit=2)
    assert summary["complete"] and summary["records_read"] == summary["records_written"] == 5
    assert [r["generated"]["source_line"] for r in read_records(out)] == [1, 2, 3, 4, 5]
    assert not os.path.exists(out + ".parts")


def test_answers_of_another_engine_dtype_or_weights_are_not_resumed(tiny_assets, tmp_path):
    data = head(tiny_assets, tmp_path, 4)
    base = ["generate.max_new_tokens=4", "generate.chunk_records=1"]
    out = str(tmp_path / "out.jsonl")
    partial = generate_file(tiny_cfg(tiny_assets["target_llama"], data, *base), data_path=data,
                            out_path=out, limit=1)
    assert not partial["complete"]
    assert {k: partial["settings"][k] for k in ("engine", "dtype", "load_format")} == \
        {"engine": "hf", "dtype": "float32", "load_format": "auto"}
    for other in ("target.load_format=dummy", "target.dtype=bfloat16"):
        with pytest.raises(GenerateError, match="made from other inputs or settings"):
            generate_file(tiny_cfg(tiny_assets["target_llama"], data, *base, other),
                          data_path=data, out_path=out)
    # A generator handed in under another name is another engine too.
    with pytest.raises(GenerateError, match="made from other inputs or settings"):
        generate_file(tiny_cfg(tiny_assets["target_llama"], data, *base), data_path=data,
                      out_path=out, generator=ScriptedGenerator([]))


def test_an_fp8_kv_cache_is_another_setting_and_auto_keeps_old_fingerprints(tiny_assets,
                                                                             tmp_path):
    from colocate.generate.run import prepare

    data = head(tiny_assets, tmp_path, 2)
    target = tiny_assets["target_llama"]
    auto = prepare(tiny_cfg(target, data), data)
    fp8 = prepare(tiny_cfg(target, data, "generate.kv_cache_dtype=fp8_e4m3"), data)
    assert "kv_cache_dtype" not in auto.settings  # parts written before the key resume
    assert fp8.settings["kv_cache_dtype"] == "fp8_e4m3" and fp8.key != auto.key


def test_a_generator_that_loses_replies_stops_the_run(tiny_assets, tmp_path):
    class Short(ScriptedGenerator):
        def generate(self, prompts, seeds, on_batch=None, max_new_tokens=None):
            return super().generate(prompts[:-1], seeds[:-1], on_batch)

    data = head(tiny_assets, tmp_path, 2)
    with pytest.raises(AssertionError, match="scripted returned 1 replies for 2 prompts"):
        generate_file(tiny_cfg(tiny_assets["target_llama"], data), data_path=data,
                      out_path=str(tmp_path / "o.jsonl"), generator=Short([([2], "stop")]))


# --------------------------------------------------------------------------- skips


def test_failures_are_counted_reported_with_file_line_and_skipped(tiny_assets, tmp_path,
                                                                  caplog):
    good = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                         {"role": "assistant", "content": "5.", "reasoning_content": "add"}],
            "id": "keep-me"}
    fails = {"messages": [{"role": "user", "content": "FAIL now"},
                          {"role": "assistant", "content": "x"}]}
    long = {"messages": [{"role": "user", "content": "apple " * 3000},
                         {"role": "assistant", "content": "x"}]}
    no_reply = {"conversations": [{"from": "human", "value": "Hello?"}]}
    fails_later = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "a"},
                                {"role": "user", "content": "FAIL later"},
                                {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl",
                       [good, '{"messages": [', fails, long, "", no_reply, fails_later])
    template = tmp_path / "failing.jinja"
    template.write_text(FAILING_TEMPLATE)
    cfg = tiny_cfg(tiny_assets["target_llama"], path, "generate.max_new_tokens=8",
                   "data.skip_invalid=true", f"data.chat_template={template}")
    out = str(tmp_path / "out.jsonl")
    with caplog.at_level("WARNING"):
        summary = generate_file(cfg, data_path=path, out_path=out)
    assert {k: summary[k] for k in ("records_read", "records_written", "copied_no_assistant",
                                    "skipped_invalid", "skipped_template_error",
                                    "skipped_prompt_too_long", "turns_generated")} == {
        "records_read": 6, "records_written": 2, "copied_no_assistant": 1,
        "skipped_invalid": 1, "skipped_template_error": 2, "skipped_prompt_too_long": 1,
        "turns_generated": 1}
    skips = summary["first_skips"]
    assert [s.split(": ")[0] for s in skips] == [f"{path}:{n}" for n in (2, 3, 4, 7)]
    assert "not valid JSON" in skips[0] and "cannot render FAIL" in skips[1]
    assert "fit the target's context" in skips[2]
    for n in (2, 3, 4, 7):
        assert f"{path}:{n}" in caplog.text
    written, copied = read_records(out)
    assert written["id"] == "keep-me" and "reasoning_content" not in written["messages"][1]
    assert copied == no_reply
    # Without data.skip_invalid the malformed line stops the run, naming it.
    strict = tiny_cfg(tiny_assets["target_llama"], path, "generate.max_new_tokens=8",
                      f"data.chat_template={template}")
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        generate_file(strict, data_path=path, out_path=str(tmp_path / "strict.jsonl"))


def test_round_trip_count_and_turn_two_prompt_carry_the_targets_ids(tiny_assets,
                                                                    tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    eos = tok.convert_tokens_to_ids(END)
    odd = _not_round_tripping_ids(tok)  # decodes to text that tokenizes otherwise
    plain = tok.encode("4 + 4 = 8.")
    assert not round_trips(tok, odd + [eos], (eos,)) and round_trips(tok, plain + [eos], (eos,))
    record = {"messages": [{"role": "user", "content": "Say it."},
                           {"role": "assistant", "content": "old"},
                           {"role": "user", "content": "And 4 + 4?"},
                           {"role": "assistant", "content": "old"}]}
    one = {"messages": [{"role": "user", "content": "Cut short?"},
                        {"role": "assistant", "content": "old"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record, one])
    # Round 0 answers both records (line order), round 1 the second turn of the first.
    scripted = ScriptedGenerator([(odd + [eos], "stop"), (plain[:3], "length"),
                                  (plain + [eos], "stop")])
    out = str(tmp_path / "out.jsonl")
    summary = generate_file(tiny_cfg(tiny_assets["target_llama"], path), data_path=path,
                            out_path=out, generator=scripted)
    assert (summary["turns_generated"], summary["not_round_tripping"]) == (3, 1)
    assert (summary["finished_stop"], summary["finished_length"]) == (2, 1)
    first, second = read_records(out)
    assert first["messages"][1]["token_ids"] == odd + [eos]
    assert first["messages"][1]["content"] == tok.decode(odd)
    assert second["messages"][1]["token_ids"] == plain[:3]
    assert first["generated"]["finish_reasons"] == ["stop", "stop"]
    # Turn 2 was asked with turn 1 spliced in as the target's ids, not re-tokenized text.
    renderer = Renderer(tok, tok.chat_template)
    conv = next(read_conversations(out, skip_invalid=False, stats=DataStats()))
    assert scripted.prompts[2] == encode_prompt(conv, renderer, 3)
    head_ids = encode_prompt(conv, renderer, 1)
    assert scripted.prompts[2][len(head_ids):len(head_ids) + len(odd) + 1] == odd + [eos]


# --------------------------------------------------------------------------- settings, CLI


def test_thinking_false_renders_enable_thinking_false(tiny_assets, tiny_tokenizer, tmp_path,
                                                     caplog):
    tok = tiny_tokenizer
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "old"}]}])
    eos = tok.convert_tokens_to_ids(END)
    scripted = ScriptedGenerator([(tok.encode("Hello.") + [eos], "stop")])
    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3_STYLE)
    cfg = tiny_cfg(tiny_assets["target_llama"], path, "generate.thinking=false",
                   f"data.chat_template={template}")
    summary = generate_file(cfg, data_path=path, out_path=str(tmp_path / "o.jsonl"),
                            generator=scripted)
    assert tok.decode(scripted.prompts[0]).endswith("assistant\n<think>\n\n</think>\n\n")
    assert summary["settings"]["chat_template_kwargs"] == {"enable_thinking": False}
    contradiction = tiny_cfg(tiny_assets["target_llama"], path,
                             "data.chat_template_kwargs={enable_thinking: false}")
    with pytest.raises(ConfigError, match="generate.thinking: true .*set generate.thinking=false"):
        generate_file(contradiction, data_path=path, out_path=str(tmp_path / "c.jsonl"))
    no_switch = tiny_cfg(tiny_assets["target_llama"], path, "generate.thinking=false")
    with caplog.at_level("WARNING"):
        generate_file(no_switch, data_path=path, out_path=str(tmp_path / "n.jsonl"),
                      generator=ScriptedGenerator([([eos], "stop")]))
    assert "has no enable_thinking switch" in caplog.text


@pytest.mark.parametrize("case, message", [
    ("no_data", "is not a file; point it at a JSONL"),
    ("no_config", "no config.json"),
    ("no_prompt", "no usable prompt"),
    ("fp8_kv_on_hf", "generate.kv_cache_dtype=fp8_e4m3: the hf engine caches at the target's "
                     "dtype; use generate.kv_cache_dtype=auto or generate.engine=sglang"),
])
def test_bad_input_is_one_readable_line(tiny_assets, tmp_path, capsys, case, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    target = tiny_assets["target_llama"]
    if case == "no_data":
        data = str(tmp_path / "missing.jsonl")
    elif case == "no_config":
        target = str(tmp_path)
    extra = ["generate.kv_cache_dtype=fp8_e4m3"] if case == "fp8_kv_on_hf" else []
    code = cli.main(["generate", "--config", CONFIG, "--out", str(tmp_path / "o.jsonl"),
                     "--data", data, f"target.path={target}", "run.device=cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("colocate generate: error: ")


def test_sampling_is_seeded_by_run_seed(tiny_assets, tmp_path):
    data = head(tiny_assets, tmp_path, 4)
    # At temperature 100 any target's distribution is nearly flat over its vocabulary, so
    # 4 records x 8 tokens drawn with two seeds (or greedily) cannot plausibly agree.
    sampled = ["generate.temperature=100", "generate.top_p=0.95", "generate.max_new_tokens=8"]

    def run(name: str, *extra: str) -> str:
        out = str(tmp_path / name)
        generate_file(tiny_cfg(tiny_assets["target_llama"], data, *extra),
                      data_path=data, out_path=out)
        with open(out) as f:
            return f.read()

    first = run("a.jsonl", *sampled)
    assert run("b.jsonl", *sampled) == first  # same run.seed: the same samples
    assert run("c.jsonl", *sampled, "run.seed=1") != first
    assert run("greedy.jsonl", "generate.max_new_tokens=8") != first


def test_one_writer_per_output(tiny_assets, tmp_path):
    out = str(tmp_path / "o.jsonl")
    first = PartStore(out)
    first.open("key", {}, force=False)
    with pytest.raises(GenerateError, match="another `colocate generate` is writing it"):
        PartStore(out).open("key", {}, force=False)
    first.close()
    PartStore(out).open("key", {}, force=False)  # released
    data = head(tiny_assets, tmp_path, 1)
    with pytest.raises(GenerateError, match="is the input file"):
        generate_file(tiny_cfg(tiny_assets["target_llama"], data), data_path=data,
                      out_path=data)
