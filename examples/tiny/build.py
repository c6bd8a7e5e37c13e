"""Build the tiny CPU demo assets: a BPE tokenizer and two random-weight targets.

    python examples/tiny/build.py [--out examples/tiny] [--force] [--regen-data]

Everything is made locally and deterministically in a few seconds, so tests and the CPU
demo never download from a hub:

* ``data/conversations.jsonl`` (committed, next to this file): synthetic conversations with
  learnable structure (arithmetic, counting, sequences, echo/reverse/sort), mixing OpenAI
  ``messages`` and ShareGPT ``conversations`` forms. ``--regen-data`` rewrites it.
* ``OUT/tokenizer/``: byte-level BPE trained on that data, ChatML chat template.
* ``OUT/target-llama/`` and ``OUT/target-qwen3/``: tiny ``LlamaForCausalLM`` /
  ``Qwen3ForCausalLM`` with seeded random weights (safetensors) plus the tokenizer files.

A stamp file (``OUT/.tiny-build-stamp``) holds a hash of the builder's inputs (this file,
the data, library versions); a later call with the same hash and all outputs present does
nothing. ``--force`` rebuilds anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_PATH = os.path.join(HERE, "data", "conversations.jsonl")
STAMP_NAME = ".tiny-build-stamp"
LM_HEAD_SCALE = 20.0  # see build_target
NUM_CONVERSATIONS = 500
DATA_SEED = 1234
MODEL_SEED = 0
VOCAB_SIZE = 1536

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# ChatML. Each turn renders independently of later ones, so the template is prefix-stable
# (the data pipeline derives loss masks from rendered prefixes).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# --------------------------------------------------------------------------- data

WORDS = ("apple banana cherry grape lemon mango olive peach pear plum river stone cloud "
         "forest window garden candle rocket silver yellow purple orange green blue red "
         "tiger eagle horse rabbit turtle whale zebra piano violin guitar drum bread cheese "
         "honey sugar salt pepper paper pencil table chair lamp clock mirror bottle").split()
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a careful calculator.",
                  "Answer briefly and exactly.")


def _arith(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    turns = [("user", f"What is {a} {op} {b}?"), ("assistant", f"{a} {op} {b} = {value}.")]
    if rng.random() < 0.4:
        c = rng.randint(2, 20)
        turns += [("user", f"Now add {c} to it."),
                  ("assistant", f"{value} + {c} = {value + c}.")]
    return turns


def _count(rng: random.Random) -> list[tuple[str, str]]:
    start = rng.randint(1, 60)
    end = start + rng.randint(4, 14)
    nums = ", ".join(str(i) for i in range(start, end + 1))
    return [("user", f"Count from {start} to {end}."), ("assistant", nums + ".")]


def _sequence(rng: random.Random) -> list[tuple[str, str]]:
    start, step = rng.randint(0, 30), rng.randint(2, 9)
    seq = [start + i * step for i in range(12)]
    shown, rest = seq[:4], seq[4:]
    turns = [("user", "Continue the sequence: " + ", ".join(map(str, shown))),
             ("assistant", ", ".join(map(str, rest)))]
    if rng.random() < 0.3:
        turns += [("user", "What is the step?"), ("assistant", f"The step is {step}.")]
    return turns


def _words(rng: random.Random) -> list[tuple[str, str]]:
    words = rng.sample(WORDS, rng.randint(3, 7))
    text = " ".join(words)
    task = rng.choice(("echo", "reverse", "sort", "upper"))
    if task == "echo":
        turns = [("user", f"Repeat after me: {text}"), ("assistant", text)]
    elif task == "reverse":
        turns = [("user", f"Reverse the words: {text}"), ("assistant", " ".join(words[::-1]))]
    elif task == "sort":
        turns = [("user", f"Sort these words: {text}"), ("assistant", " ".join(sorted(words)))]
    else:
        turns = [("user", f"Uppercase: {text}"), ("assistant", text.upper())]
    if rng.random() < 0.25:
        turns += [("user", "How many words was that?"),
                  ("assistant", f"That was {len(words)} words.")]
    return turns


def _record(rng: random.Random, turns: list[tuple[str, str]]) -> dict:
    if rng.random() < 0.2:
        turns = [("system", rng.choice(SYSTEM_PROMPTS))] + turns
    if rng.random() < 0.5:
        record: dict = {"messages": [{"role": r, "content": c} for r, c in turns]}
    else:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        record = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    n_assistant = sum(r == "assistant" for r, _ in turns)
    if n_assistant > 1 and rng.random() < 0.15:
        record["last_assistant_turn_only"] = True
    return record


def generate_conversations(n: int = NUM_CONVERSATIONS, seed: int = DATA_SEED) -> list[dict]:
    """The bundled conversations; a pure function of (n, seed)."""
    rng = random.Random(seed)
    makers = (_arith, _count, _sequence, _words)
    return [_record(rng, rng.choice(makers)(rng)) for _ in range(n)]


def write_data(path: str = DATA_PATH) -> None:
    """Rewrite the bundled JSONL (atomically)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for record in generate_conversations():
            f.write(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tokenizer


def _training_texts(path: str):
    """Rendered ChatML text of every conversation, so merges cover the template too."""
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "messages" in record:
                turns = [(m["role"], m["content"]) for m in record["messages"]]
            else:
                names = {"human": "user", "gpt": "assistant", "system": "system"}
                turns = [(names[m["from"]], m["value"]) for m in record["conversations"]]
            yield "".join(f"{IM_START}{r}\n{c}{IM_END}\n" for r, c in turns)


def build_tokenizer(data_path: str):
    """Byte-level BPE (every string encodes; decoding is exact) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[PAD, IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_training_texts(data_path)), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None,
        model_max_length=2048)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# --------------------------------------------------------------------------- targets


def build_target(kind: str, tokenizer, out: str) -> None:
    """A tiny random-weight target; seeded so every build writes the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar per tiny shard is noise

    common = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None)
    if kind == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        config, cls = Qwen3Config(head_dim=32, **common), Qwen3ForCausalLM
    torch.manual_seed(MODEL_SEED)
    model = cls(config).eval()
    # With std-0.02 weights the logits have std ~0.2: a nearly uniform teacher whose entropy
    # is all the draft's loss can ever be, so the loss could barely fall. A sharper lm_head
    # gives a peaked teacher, as a trained model has.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------- build


def _inputs_hash(data_path: str) -> str:
    # Package metadata, not imports: an up-to-date check should not pay for importing torch.
    from importlib.metadata import version

    h = hashlib.sha256()
    for path in (os.path.abspath(__file__), data_path):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update("|".join(version(p) for p in ("torch", "transformers", "tokenizers")).encode())
    return h.hexdigest()


def build(out_dir: str = HERE, force: bool = False) -> dict[str, str]:
    """Build (or reuse) the tiny assets under ``out_dir``; return their paths.

    Keys: ``tokenizer``, ``target_llama``, ``target_qwen3`` (directories) and ``data``
    (the bundled JSONL, which is read, never copied).
    """
    out_dir = os.path.abspath(out_dir)
    paths = {
        "tokenizer": os.path.join(out_dir, "tokenizer"),
        "target_llama": os.path.join(out_dir, "target-llama"),
        "target_qwen3": os.path.join(out_dir, "target-qwen3"),
        "data": DATA_PATH,
    }
    if not os.path.isfile(DATA_PATH):
        write_data(DATA_PATH)
    stamp_path = os.path.join(out_dir, STAMP_NAME)
    digest = _inputs_hash(DATA_PATH)
    outputs = [os.path.join(paths["tokenizer"], "tokenizer.json")] + [
        os.path.join(paths[k], f) for k in ("target_llama", "target_qwen3")
        for f in ("config.json", "model.safetensors", "tokenizer.json")]
    if not force and os.path.isfile(stamp_path) and all(map(os.path.isfile, outputs)):
        with open(stamp_path) as f:
            if f.read().strip() == digest:
                return paths

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # a crash below must not leave a stale stamp behind
    for key in ("tokenizer", "target_llama", "target_qwen3"):
        shutil.rmtree(paths[key], ignore_errors=True)
    tokenizer = build_tokenizer(DATA_PATH)
    tokenizer.save_pretrained(paths["tokenizer"])
    build_target("llama", tokenizer, paths["target_llama"])
    build_target("qwen3", tokenizer, paths["target_qwen3"])
    with open(stamp_path, "w") as f:
        f.write(digest + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="output directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--regen-data", action="store_true",
                        help=f"rewrite {os.path.relpath(DATA_PATH)} from the generator first")
    args = parser.parse_args(argv)
    if args.regen_data:
        write_data(DATA_PATH)
        print(f"wrote {DATA_PATH}")
    paths = build(args.out, force=args.force)
    for key, path in paths.items():
        print(f"{key:13s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
