"""The frozen target model's one home: its directory check, tokenizer, context length and
stop ids, and the two tensors a trainer needs: the input embedding (feeds the draft) and
the lm_head (turns the target's last hidden state into the teacher distribution), read
from its safetensors (never the whole model) or drawn for target.load_format=dummy. The
engines and the trainer all ask here. torch is imported where a function needs it: the
light commands that use this module do not.
"""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING

from colocate.config import describe_path

if TYPE_CHECKING:
    import torch

_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def check_model_dir(path: str, *, need_weights: bool = True) -> None:
    """A readable error before transformers' own, which may talk about the hub.
    need_weights=False for target.load_format=dummy (config.json and a tokenizer suffice)."""
    if not os.path.isdir(path):
        raise ValueError(f"target.path: {describe_path(path)} is not a directory; set it to a local model "
                         "directory (config.json plus safetensors weights); the hub is not used")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"target.path: {path!r} has no config.json; point it at the model "
                         "directory itself (the one holding config.json and the weights)")
    if need_weights and not any(glob.glob(os.path.join(path, p)) for p in _WEIGHT_PATTERNS):
        raise ValueError(f"target.path: {path!r} has config.json but no weights "
                         f"({', '.join(_WEIGHT_PATTERNS)}); download or copy them there")


def load_tokenizer(path: str):
    """The target's tokenizer, from its local directory only."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"target.path {describe_path(path)}: no such directory; point it at a local "
                                "model directory (config.json, safetensors, tokenizer)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def context_length(target_config) -> int:
    """Tokens the target can attend over (prompt plus reply): max_position_embeddings of its
    text config (a multimodal config nests the language model's)."""
    return int(target_config.get_text_config().max_position_embeddings)


def stop_token_ids(path: str, tokenizer) -> tuple[int, ...]:
    """Every id that ends a reply: the tokenizer's eos, then the eos ids of the model's
    generation_config.json and config.json, in that order, without repeats. Generation and
    evaluation must stop on the same ids, or their replies differ at the end."""
    from transformers import AutoConfig, GenerationConfig

    found = [tokenizer.eos_token_id]
    try:
        found.append(GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id)
    except OSError:  # no generation_config.json
        pass
    found.append(AutoConfig.from_pretrained(path, local_files_only=True)
                 .get_text_config().eos_token_id)
    ids: list[int] = []
    for eos in found:
        for i in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError(f"target.path: {path!r} names no eos token (tokenizer, "
                         "generation_config.json or config.json); replies could never stop. "
                         "Add eos_token_id to its generation_config.json")
    return tuple(ids)


# --------------------------------------------------------------------------- tensors

EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight",
               "model.language_model.embed_tokens.weight")
HEAD_NAMES = ("lm_head.weight",)


def _tensor_files(path: str) -> dict[str, str]:
    """tensor name -> file, from the index when the checkpoint is sharded."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"target.path {path}: no model.safetensors or model.safetensors.index.json; "
            "point target.path at a local transformers checkpoint saved as safetensors")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _load(files: dict[str, str], candidates: tuple[str, ...]) -> torch.Tensor | None:
    from safetensors import safe_open

    for name in candidates:
        if name in files:
            with safe_open(files[name], framework="pt") as f:
                return f.get_tensor(name)
    return None


def load_embed_and_head(path: str, *, tie_word_embeddings: bool, dtype: torch.dtype,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed [V, H], lm_head [V, H]) of the target at `path`, frozen, on `device`."""
    files = _tensor_files(path)
    embed = _load(files, EMBED_NAMES)
    if embed is None:
        raise FileNotFoundError(f"target.path {path}: no input embedding among "
                                f"{', '.join(EMBED_NAMES)} in its safetensors")
    head = None if tie_word_embeddings else _load(files, HEAD_NAMES)
    if head is None and not tie_word_embeddings:
        raise FileNotFoundError(f"target.path {path}: config says tie_word_embeddings=false "
                                "but the safetensors hold no lm_head.weight")
    embed = embed.to(device=device, dtype=dtype)
    head = embed if head is None else head.to(device=device, dtype=dtype)
    return embed.requires_grad_(False), head.requires_grad_(False)


_DUMMY_CHUNK_ELEMENTS = 1 << 26
"""float32 elements drawn per host chunk (256 MiB)."""


def dummy_embed_and_head(vocab_size: int, hidden_size: int, *, seed: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (embed, lm_head) for target.load_format=dummy.

    The engine puts the same embedding into its randomly initialised target (`dummy_embed`,
    the same first table), so trainer and engine agree on the target they pretend to share.
    Drawn on the host: CUDA's generator lays its stream out over a grid sized by the SM
    count the process sees, so a trainer under an MPS SM cap would draw other tables than
    its uncapped engine (seen on an H200).
    """
    embed, head = _dummy_tables(vocab_size, hidden_size, 2, seed=seed, dtype=dtype,
                                device=device)
    return embed, head


def dummy_embed(vocab_size: int, hidden_size: int, *, seed: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The embedding of `dummy_embed_and_head`, without drawing the lm_head (engines)."""
    [embed] = _dummy_tables(vocab_size, hidden_size, 1, seed=seed, dtype=dtype, device=device)
    return embed


def _dummy_tables(vocab_size: int, hidden_size: int, count: int, *, seed: int,
                  dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """`count` [V, H] tables of N(0, 0.02), one stream from `seed`, in order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = max(1, _DUMMY_CHUNK_ELEMENTS // max(1, hidden_size))

    def table() -> torch.Tensor:
        out = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        for start in range(0, vocab_size, rows):
            chunk = torch.empty(min(rows, vocab_size - start), hidden_size)
            out[start:start + len(chunk)] = chunk.normal_(0.0, 0.02, generator=g).to(dtype)
        return out.requires_grad_(False)

    return [table() for _ in range(count)]
