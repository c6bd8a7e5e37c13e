"""Build the tiny CPU demo assets: a BPE tokenizer, a trained Llama target, a random Qwen3 one.

    python examples/tiny/build.py [--out examples/tiny] [--force] [--regen-data]

Everything is made locally and deterministically (about half a minute on 2 CPU cores), so
tests and the CPU demo never download from a hub:

* ``data/conversations.jsonl`` (committed, next to this file): synthetic conversations with
  learnable structure (arithmetic, counting, sequences, echo/reverse/sort), mixing OpenAI
  ``messages`` and ShareGPT ``conversations`` forms. ``--regen-data`` rewrites it.
* ``OUT/tokenizer/``: byte-level BPE trained on that data, ChatML chat template.
* ``OUT/target-llama/``: a tiny ``LlamaForCausalLM`` (hidden 128, 6 layers) trained for
  200 small steps (~25 s) on the assistant replies of the whole bundled set, so its greedy
  answers look like the data and end with ``<|im_end|>``: most bundled prompts are
  answered exactly, most new ones in the right form (often with wrong numbers or words).
  A random target answers everything with repeated junk, which makes a draft's training
  targets and served acceptance meaningless. That the target has seen every bundled prompt
  is fine for a demo target: a draft's held-out prompts (chosen by its training config)
  are still unseen by the draft.
* ``OUT/target-qwen3/``: a tiny ``Qwen3ForCausalLM`` with seeded random weights, for engine
  parity tests, where only the forward math matters.

Both targets come with the tokenizer files. A stamp file (``OUT/.tiny-build-stamp``) holds a
hash of the builder's inputs (this file, the data, the colocate data modules that mask the
replies, library versions); a later call with the same hash and all outputs present does
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
DATA_PATH = os.path.join(HERE, "data", "conversations.jsonl")
STAMP_NAME = ".tiny-build-stamp"
# The data pipeline's reply masks train the Llama target (see _reply_examples).
MASKING_SOURCES = tuple(os.path.join(REPO_ROOT, "colocate", "data", f"{name}.py")
                        for name in ("conversations", "template", "encode"))
NUM_CONVERSATIONS = 500
DATA_SEED = 1234
MODEL_SEED = 0
VOCAB_SIZE = 1536
TRAIN_SEED = 0
TRAIN_STEPS = 200
TRAIN_BATCH = 16  # conversations per step
TRAIN_LR = 3e-3
TRAIN_WARMUP = 10

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


def _config(kind: str, tokenizer):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None)
    if kind == "qwen3":
        return Qwen3Config(head_dim=32, **common)
    # Initial weights with std 0.1 (~1/sqrt(hidden)) rather than transformers' 0.02: attention
    # scores differ from the start and training is much faster (reply loss after the 200
    # steps of train_target: 0.07 rather than 0.78).
    return LlamaConfig(initializer_range=0.1, **common)


def _reply_examples(tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(ids, trainable) per bundled conversation, masked by the project's own pipeline: every
    assistant reply and its <|im_end|>, whatever the record's last_assistant_turn_only says
    (that flag is for drafts; the target should answer every turn)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)  # the checkout's colocate, as `python -m colocate` uses
    from colocate.data import DataStats, Renderer, encode_conversation, read_conversations

    renderer = Renderer(tokenizer, CHAT_TEMPLATE)
    conversations = read_conversations(DATA_PATH, skip_invalid=False, stats=DataStats())
    return [(e.ids, e.mask) for e in (encode_conversation(c, renderer) for c in conversations)]


def _length_sorted_batches(lengths: list[int], batch_size: int, generator):
    """One epoch of batches of similar length (little padding), in a seeded random order.
    A stable sort of a random permutation keeps the order among equal lengths random."""
    import torch

    order = sorted(torch.randperm(len(lengths), generator=generator).tolist(),
                   key=lengths.__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def _padded(examples, pad_id: int):
    """Right-padded ids and reply mask. Causal attention never lets a real token see the
    padding after it, so no attention mask is needed."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids_BT = torch.full((len(examples), width), pad_id)
    mask_BT = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, (ids, mask) in enumerate(examples):
        ids_BT[b, :len(ids)] = torch.tensor(ids)
        mask_BT[b, :len(ids)] = torch.tensor(mask)
    return ids_BT, mask_BT


def reply_loss(model, ids_BT, mask_BT):
    """Mean next-token cross-entropy over the reply tokens. The head runs only where a reply
    token is predicted (about 40% of positions), which saves time on a CPU."""
    import torch.nn.functional as F

    hidden_BTD = model.model(input_ids=ids_BT).last_hidden_state
    predicts_reply_BT = mask_BT[:, 1:]  # position t predicts token t + 1
    logits_NV = model.lm_head(hidden_BTD[:, :-1][predicts_reply_BT])
    return F.cross_entropy(logits_NV, ids_BT[:, 1:][predicts_reply_BT])


def _orthogonalized(update_GMN):
    """Newton-Schulz iteration that pushes every singular value of each update toward 1
    (Muon's quintic coefficients), in float32, for G same-shaped matrices at once."""
    x = update_GMN / (update_GMN.norm(dim=(1, 2), keepdim=True) + 1e-7)
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.mT
    for _ in range(5):
        gram = x @ x.mT
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x.mT if tall else x


class _Muon:
    """Muon (Nesterov momentum, orthogonalized, scaled to AdamW's update size) for the
    hidden layers' weight matrices. Measured with otherwise equal settings, the reply loss
    after 200 steps is 0.07, with AdamW alone 0.38. torch.optim.Muon computes the same
    update, but in bfloat16, which a CPU without bfloat16 units emulates: 6x slower on the
    build machine, and not float32. Same-shaped matrices go through the iteration together
    (a few batched matmuls rather than 42 small ones: a third of the step time saved)."""

    def __init__(self, matrices, momentum: float = 0.95):
        import torch

        by_shape: dict[tuple[int, ...], list] = {}
        for p in matrices:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.groups = [(ps, torch.zeros(len(ps), *shape)) for shape, ps in by_shape.items()]
        self.momentum = momentum

    def step(self, lr: float) -> None:
        import torch

        with torch.no_grad():
            for params, momentum_GMN in self.groups:
                grad_GMN = torch.stack([p.grad for p in params])
                momentum_GMN.mul_(self.momentum).add_(grad_GMN)
                update_GMN = _orthogonalized(grad_GMN + self.momentum * momentum_GMN)
                scale = -lr * 0.2 * max(params[0].shape) ** 0.5
                for p, update in zip(params, update_GMN):
                    p.add_(update, alpha=scale)


def _lr_at(step: int) -> float:
    """Linear warmup, then linear decay to a tenth."""
    return TRAIN_LR * min(1.0, (step + 1) / TRAIN_WARMUP, 0.1 + 0.9 * (1 - step / TRAIN_STEPS))


def train_target(model, tokenizer) -> list[float]:
    """Teacher-forced next-token cross-entropy on the assistant replies; returns the losses.

    TRAIN_STEPS steps of TRAIN_BATCH conversations (about 6 passes over the bundled set),
    float32 on the CPU, in a seeded order, so every build ends with the same weights. Muon
    updates the layers' matrices, AdamW the embeddings, head and norms.
    """
    import torch

    examples = _reply_examples(tokenizer)
    lengths = [len(ids) for ids, _ in examples]
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    matrices = [p for name, p in model.named_parameters() if ".layers." in name and p.ndim == 2]
    others = [p for name, p in model.named_parameters()
              if not (".layers." in name and p.ndim == 2)]
    muon = _Muon(matrices)
    adamw = torch.optim.AdamW(others, lr=TRAIN_LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, batches = [], []
    for step in range(TRAIN_STEPS):
        if not batches:
            batches = _length_sorted_batches(lengths, TRAIN_BATCH, generator)
        ids_BT, mask_BT = _padded([examples[i] for i in batches.pop()], tokenizer.pad_token_id)
        loss = reply_loss(model, ids_BT, mask_BT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = _lr_at(step)
        for group in adamw.param_groups:
            group["lr"] = lr
        adamw.step()
        muon.step(lr)
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_target(kind: str, tokenizer, out: str) -> None:
    """A tiny target with seeded weights: the Llama one trained on the bundled replies, the
    Qwen3 one left random. Every build writes the same bytes."""
    import torch
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar per tiny shard is noise

    torch.manual_seed(MODEL_SEED)
    cls = LlamaForCausalLM if kind == "llama" else Qwen3ForCausalLM
    model = cls(_config(kind, tokenizer)).eval()
    if kind == "llama":
        started = time.monotonic()
        losses = train_target(model, tokenizer)
        print(f"target-llama: trained {len(losses)} steps in {time.monotonic() - started:.0f} s, "
              f"reply loss {losses[0]:.2f} -> {losses[-1]:.2f}", file=sys.stderr)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------- build


def _inputs_hash(data_path: str) -> str:
    # Package metadata, not imports: an up-to-date check should not pay for importing torch.
    from importlib.metadata import version

    h = hashlib.sha256()
    for path in (os.path.abspath(__file__), data_path, *MASKING_SOURCES):
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
