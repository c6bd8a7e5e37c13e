"""Facts about the frozen target model that several commands need, read from its directory.

(The home for the target's shared pieces; the trainer's embedding/lm_head loading still
lives in colocate/train/target_tensors.py.)
"""

from __future__ import annotations


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
