"""`colocate prepare-vocab --config run.yaml [key=value ...]`: tokenize the data and build
the draft vocabulary ahead of training (one process, no GPU). Training reuses both caches,
so a large dataset is tokenized once instead of on the first engine at start-up."""

from __future__ import annotations

import argparse

from colocate.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")


def main(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from colocate.target import load_tokenizer
    from colocate.train.engine_loop import default_cache_dir, prepare_data

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.target.path)
    vocab_size = AutoConfig.from_pretrained(cfg.target.path, local_files_only=True).vocab_size
    tokenized, vocab, held_out = prepare_data(cfg, tokenizer, vocab_size)
    print(tokenized.stats.format())
    if held_out is not None:
        print(f"held out (data.holdout): {held_out.stats.format()}")
    print(f"draft vocabulary: {vocab.size} of {vocab_size} target tokens; caches in "
          f"{default_cache_dir(cfg)}")
    return 0
