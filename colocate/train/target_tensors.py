"""The two target tensors a trainer needs: the input embedding (frozen, feeds the draft) and
the lm_head (frozen, turns the target's last hidden state into the teacher distribution).

Only these are read from the target's safetensors, never the whole model.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight",
               "model.language_model.embed_tokens.weight")
HEAD_NAMES = ("lm_head.weight",)


def _tensor_files(path: str) -> dict[str, str]:
    """tensor name -> file, from the index when the checkpoint is sharded."""
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

    The engine puts the same embedding into its randomly initialised target, so trainer and
    engine agree on the target they pretend to share. Drawn on the host: CUDA's generator
    lays its stream out over a grid sized by the SM count the process sees, so a trainer
    under an MPS SM cap would draw other tables than its uncapped engine (seen on an H200).
    """
    g = torch.Generator().manual_seed(seed)
    rows = max(1, _DUMMY_CHUNK_ELEMENTS // max(1, hidden_size))

    def table() -> torch.Tensor:
        out = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        for start in range(0, vocab_size, rows):
            chunk = torch.empty(min(rows, vocab_size - start), hidden_size)
            out[start:start + len(chunk)] = chunk.normal_(0.0, 0.02, generator=g).to(dtype)
        return out.requires_grad_(False)

    embed = table()
    return embed, table()
