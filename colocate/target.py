"""Facts about the frozen target model that several commands need, read from its directory:
its directory check, tokenizer, context length and stop ids.

(The home for the target's shared pieces; the trainer's embedding/lm_head loading still
lives in colocate/train/target_tensors.py.)
"""

from __future__ import annotations

import glob
import os

from colocate.config import describe_path

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
