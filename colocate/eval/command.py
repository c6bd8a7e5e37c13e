"""`colocate eval`: the accept length an exported draft gets, greedy, on held-out prompts.

    python -m colocate eval --config CFG --draft EXPORT_DIR --out EVAL.json [--data JSONL]
        [--engine auto|hf|sglang|both] [--limit N] [--steps K] [--max-new-tokens N] [key=value ...]

Engines: hf, the plain-torch reference decoder (any device, the one CI runs); sglang, the
real server's speculative decoder (GPU). Both report accept length = completion tokens /
verify steps (the prompt's first token included, as sglang counts it), the histogram of
accepted drafts per verify step and tokens/s with and without the draft (sglang at batch 1
and eval.batch_size; the reference decodes one prompt at a time: batch 1 only). EVAL.json holds
each engine's run and, at the top level, the numbers of the served engine (sglang when it
ran, else hf).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

from colocate.config import Config, int_arg, load_config
from colocate.data.cache import atomic_write_json
from colocate.eval.exported import EvalError, check_target, read_export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (target, data, eval)")
    p.add_argument("--draft", required=True, help="export directory (config.json + "
                   "model.safetensors), e.g. RUN_DIR/export")
    p.add_argument("--out", required=True, help="where to write the results (JSON)")
    p.add_argument("--data", default=None, help="held-out JSONL (eval.data)")
    p.add_argument("--engine", default=None, choices=("auto", "hf", "sglang", "both"),
                   help="eval.engine")
    p.add_argument("--limit", type=int_arg, default=None, help="prompts (eval.num_prompts)")
    p.add_argument("--steps", type=int_arg, default=None, help="draft steps K (eval.steps)")
    p.add_argument("--max-new-tokens", type=int_arg, default=None, help="eval.max_new_tokens")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _with_flags(cfg: Config, args: argparse.Namespace) -> Config:
    """Flags win over the config; replacing the sections re-runs their validation."""
    flags = {"data": args.data, "engine": args.engine, "num_prompts": args.limit,
             "steps": args.steps, "max_new_tokens": args.max_new_tokens}
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **changes))


def _engines(setting: str) -> list[str]:
    from colocate.eval.sglang_eval import sglang_available

    if setting == "auto":
        return ["sglang" if sglang_available() else "hf"]
    engines = ["hf", "sglang"] if setting == "both" else [setting]
    if "sglang" in engines and not sglang_available():
        raise EvalError(f"eval.engine={setting} needs CUDA and sglang, and this machine lacks "
                        "one of them; use --engine hf")
    return engines


def run_eval(cfg: Config, draft_dir: str) -> dict:
    """Evaluate the export in `draft_dir` as `cfg.eval` says; returns the EVAL.json dict."""
    import torch
    from transformers import AutoConfig

    from colocate.data import renderer_for
    from colocate.engine import resolve_target_dtype
    from colocate.eval.prompts import eval_conversations, eval_prompts
    from colocate.target import check_model_dir, context_length, load_tokenizer, stop_token_ids

    ev = cfg.eval
    export = read_export(draft_dir)
    check_model_dir(cfg.target.path)
    target_config = AutoConfig.from_pretrained(cfg.target.path, local_files_only=True)
    check_target(export, target_config, cfg.target.path)
    engines = _engines(ev.engine)
    tokenizer = load_tokenizer(cfg.target.path)
    renderer = renderer_for(cfg.data, tokenizer, cfg.target.path)
    conversations, source = eval_conversations(cfg)
    found = eval_prompts(conversations, renderer, limit=ev.num_prompts,
                         context_length=context_length(target_config),
                         max_new_tokens=ev.max_new_tokens, source=source)
    prompts = found.prompts
    stop_ids = stop_token_ids(cfg.target.path, tokenizer)
    num_steps = export.method.num_steps(export.config, ev.steps)  # DFlash: its block
    gen = dict(num_steps=num_steps, max_new_tokens=ev.max_new_tokens, stop_ids=stop_ids)

    runs = {}
    if "hf" in engines:
        from colocate.eval.reference import load_reference, reference_eval

        cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        target, draft = load_reference(cfg.target.path, export, device=device,
                                       dtype=resolve_target_dtype(cfg.target.dtype, device))
        runs["hf"] = reference_eval(target, draft, prompts, **gen, baseline=ev.baseline)
        # sglang sizes its pools from the GPU memory free at its start: hand it all back.
        target.close()
        del target, draft
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "sglang" in engines:
        from colocate.eval.sglang_eval import sglang_eval

        runs["sglang"] = sglang_eval(
            cfg.target.path, export, prompts, **gen, batch_size=ev.batch_size,
            dtype=resolve_target_dtype(cfg.target.dtype, torch.device("cuda")),
            attention_backend=cfg.engine.attention_backend, seed=cfg.run.seed,
            mem_fraction=ev.mem_fraction, cuda_graph=ev.cuda_graph, baseline=ev.baseline)
    return summarize(runs, draft=export.path, target=cfg.target.path, data=source,
                     steps=num_steps, max_new_tokens=ev.max_new_tokens,
                     num_skipped_too_long=found.num_skipped_too_long,
                     num_skipped_unrenderable=found.num_skipped_unrenderable)


def summarize(runs: dict, **header) -> dict:
    """EVAL.json: the header, the served engine's numbers on top, every run under `runs`."""
    primary = runs["sglang"] if "sglang" in runs else runs["hf"]
    top = primary.to_dict()
    result = {**header, "engine": primary.engine,
              **{k: top[k] for k in ("accept_length", "num_prompts", "histogram",
                                     "completion_tokens", "verify_steps")},
              "runs": {name: run.to_dict() for name, run in runs.items()}}
    if len(runs) == 2:
        hf, sgl = runs["hf"].stats.accept_length, runs["sglang"].stats.accept_length
        result["accept_length_rel_diff"] = (sgl - hf) / hf  # both >= 1
        result["same_outputs_hf_sglang"] = sum(
            a == b for a, b in zip(runs["hf"].outputs, runs["sglang"].outputs))
    return result


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(result: dict) -> str:
    """A few lines for the terminal: one row per engine."""
    batches = sorted({b for run in result["runs"].values() for b in run["tokens_per_s"]},
                     key=lambda b: int(b.split("_")[1]))
    head = f"{'engine':8s} {'accept':>7s} {'tokens':>7s} {'verify':>7s}"
    head += "".join(f"  {'tok/s ' + b.replace('_', ' ') + ' draft/alone':>28s}" for b in batches)
    lines = [f"{result['draft']}: {result['num_prompts']} prompts from {result['data']} "
             f"(skipped: {result['num_skipped_too_long']} too long, "
             f"{result['num_skipped_unrenderable']} unrenderable), {result['steps']} draft steps, "
             f"greedy, at most {result['max_new_tokens']} new tokens",
             head + "  verify steps by accepted drafts 0..K"]
    for name, run in result["runs"].items():
        row = (f"{name:8s} {_num(run['accept_length']):>7s} {run['completion_tokens']:7d} "
               f"{run['verify_steps']:7d}")
        for b in batches:
            r = run["tokens_per_s"].get(b)
            cell = "-" if r is None else (f"{_num(r['with_draft'], '.1f')} / "
                                          f"{_num(r['without_draft'], '.1f')} "
                                          f"({_num(r['speedup'])}x)")
            row += f"  {cell:>28s}"
        lines.append(f"{row}  {run['histogram']}")
    if "accept_length_rel_diff" in result:
        lines.append(f"sglang vs hf accept length {_num(result['accept_length_rel_diff'], '+.1%')}, "
                     f"same outputs {result['same_outputs_hf_sglang']}/{result['num_prompts']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = _with_flags(load_config(args.config, args.overrides), args)
    result = run_eval(cfg, args.draft)
    print(format_table(result))
    atomic_write_json(args.out, result)  # training's served-eval hook reads it when it exists
    print(f"wrote {args.out}")
    return 0
