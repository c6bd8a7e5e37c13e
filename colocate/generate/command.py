"""`colocate generate`: rewrite every assistant turn of a dataset with the target's answer.

    python -m colocate generate --config run.yaml --out OUT.jsonl [--data IN.jsonl]
        [--engine hf|sglang] [--limit N] [--max-new-tokens N] [--force] [key=value ...]

Input: the JSONL training reads (OpenAI `messages` or ShareGPT `conversations`; default
data.path). Output: the same records in the same form and order, every other field kept,
each assistant turn replaced turn by turn by the target's reply to the conversation so far
(system and user turns unchanged). A regenerated turn carries the target's `token_ids`
(with its stop id when it stopped) and `content` = their text without special tokens; the
record gets `"generated": {"source_line": N, "finish_reasons": ["stop" | "length", ...]}`.
Records without an assistant turn are copied unchanged; malformed lines (with
data.skip_invalid), prompts the template cannot render and prompts that do not fit the
target's context are skipped and counted, with FILE:LINE.

Train on OUT with the same data.chat_template(_kwargs): they decide the prompts, and
training splices each reply's token_ids into exactly the context it was generated from.

Resumable: finished chunks live in OUT.jsonl.parts/ until OUT.jsonl is assembled; a rerun
after a crash (or after --limit) goes on where the parts end (colocate/generate/store.py).
Writes OUT.jsonl.summary.json (counts, tokens/s, settings).
"""

from __future__ import annotations

import argparse

from colocate.config import int_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (target, data, generate)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--data", default=None, help="input JSONL (default: data.path)")
    p.add_argument("--engine", choices=("auto", "hf", "sglang"), default=None,
                   help="generate.engine (default: from the config, auto)")
    p.add_argument("--limit", type=int_arg, default=None,
                   help="only the first N records (a later run without it goes on)")
    p.add_argument("--max-new-tokens", type=int_arg, default=None,
                   help="generate.max_new_tokens")
    p.add_argument("--force", action="store_true",
                   help="regenerate from scratch, discarding OUT and its parts")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")


def main(args: argparse.Namespace) -> int:
    from colocate.config import ConfigError, load_config
    from colocate.generate.rewrite import GenerateCounts
    from colocate.generate.run import generate_file

    overrides = list(args.overrides)
    if args.engine is not None:
        overrides.append(f"generate.engine={args.engine}")
    if args.max_new_tokens is not None:
        overrides.append(f"generate.max_new_tokens={args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: got {args.limit}; use a positive number of records")
    cfg = load_config(args.config, overrides)
    summary = generate_file(cfg, data_path=args.data or cfg.data.path, out_path=args.out,
                            limit=args.limit, force=args.force)
    counts = GenerateCounts.from_dict({k: summary[k] for k in GenerateCounts().to_dict()})
    print(f"generate: {counts.format()}")
    for skip in summary["first_skips"]:
        print(f"  skipped: {skip}")
    state = "complete" if summary["complete"] else "partial (--limit; rerun to go on)"
    print(f"generate: wrote {args.out} ({state}); summary in {args.out}.summary.json; train "
          f"on it with data.chat_template_kwargs={summary['settings']['chat_template_kwargs']}")
    return 0
