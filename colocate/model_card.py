"""README.md model card written beside an exported draft (config.json + model.safetensors).

It says what the run did, from the files the run left: the export's config.json (geometry,
aux layers, draft vocabulary), RUN_DIR/config.yaml (target, data, settings),
RUN_DIR/metrics.jsonl (steps, tokens, simulated accept length) and RUN_DIR/evals.jsonl
(the served accept length, when `eval.at_end` / `eval.every_steps` ran), and gives the
sglang command that serves it. The run directory is the nearest one above the export that
holds config.yaml (RUN_DIR/export, RUN_DIR/evals/step_N/export); an export elsewhere gets a
card without the run's numbers.
"""

from __future__ import annotations

import json
import os
import warnings

import yaml

CARD_NAME = "README.md"


def find_run_dir(export_dir: str, max_up: int = 3) -> str | None:
    """The nearest directory above `export_dir` holding a run's config.yaml."""
    path = os.path.abspath(export_dir)
    for _ in range(max_up):
        path = os.path.dirname(path)
        if os.path.isfile(os.path.join(path, "config.yaml")):
            return path
    return None


def _rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a run that died
    return rows


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def epochs_note(train: dict) -> str:
    """", 2 epochs" when the run was set by train.epochs (its steps resolved from the data)."""
    epochs = train.get("epochs") or 0
    return f" ({epochs} epoch{'s' if epochs != 1 else ''} of the data)" if epochs else ""


def model_card(export_dir: str, draft_config: dict, run_dir: str | None) -> str:
    """The card's Markdown text for the export that lives (or will live) at `export_dir`."""
    cfg, rows, evals = {}, [], []
    if run_dir:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
        rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
        evals = _rows(os.path.join(run_dir, "evals.jsonl"))
    target = cfg.get("target", {}).get("path", "TARGET_MODEL_PATH")
    steps = rows[-1]["step"] if rows else None
    last = rows[-4:]
    sim_train = sum(r["sim_accept_length"] for r in last) / len(last) if last and all(
        "sim_accept_length" in r for r in last) else None
    val = next((r for r in reversed(rows) if "val_sim_accept_length" in r), None)
    served = next((e for e in reversed(evals) if steps is None or e.get("step") == steps), None)
    eval_steps = served["steps"] if served else cfg.get("eval", {}).get("steps", 4)
    from colocate.eval.exported import ExportedDraft

    export = ExportedDraft(path=export_dir, config=draft_config)
    method = export.method  # how sglang serves this architecture (colocate/eval/methods.py)
    with warnings.catch_warnings():  # eval.steps vs a DFlash block: eval's warning, not ours
        warnings.simplefilter("ignore")
        args = method.sglang_args(export, method.num_steps(draft_config, eval_steps))
    algorithm = args["speculative_algorithm"]
    lines = [
        f"# {algorithm} draft for `{os.path.basename(os.path.normpath(target))}`",
        "",
        "Trained with colocate (the target's prefill and the draft's training on the same "
        f"GPUs). Files: `config.json` + `model.safetensors`, the layout sglang's {algorithm} "
        "loads.",
        "",
        "| | |",
        "|---|---|",
        f"| target | `{target}` |",
        f"| draft | {draft_config.get('num_hidden_layers')} layer(s), hidden "
        f"{draft_config.get('hidden_size')}, vocabulary "
        f"{draft_config.get('draft_vocab_size', draft_config.get('vocab_size'))} of "
        f"{draft_config.get('vocab_size')}, target layers {method.layer_ids(draft_config)} |",
    ]
    if run_dir:
        data, train, draft = cfg.get("data", {}), cfg.get("train", {}), cfg.get("draft", {})
        tokens = sum(r.get("tokens", 0) for r in rows)
        held_out = (f"{val['val_sim_accept_length']:.2f} (step {val['step']})" if val
                    else "n/a")
        lines += [
            f"| run | `{run_dir}` |",
            f"| data | `{data.get('path')}` ({data.get('holdout', 0)} conversations held out)"
            f"{_online(cfg, rows)} |",
            f"| steps | {steps if steps is not None else 'n/a'} optimizer steps"
            f"{epochs_note(train)}, {tokens:,} tokens (lr {train.get('lr')}, "
            f"{train.get('micro_steps')} micro-steps per step) |",
            f"| simulated accept length | {held_out} held out; {_fmt(sim_train)} on training "
            "data (mean of the last 4 steps) |",
        ]
        if draft.get("init_from"):
            lines.append(f"| warm start | from the weights of `{draft['init_from']}` (optimizer "
                         "and schedule started fresh) |")
        if served:
            lines.append(f"| served accept length | {_fmt(served['accept_length'])} "
                         f"({served['engine']}, {served['steps']} draft tokens, "
                         f"{served['num_prompts']} held-out prompts, step {served['step']}) |")
        else:
            lines.append("| served accept length | not measured (`colocate eval`, or "
                         "eval.at_end=true) |")
    lines += [
        "",
        "## Serve it with sglang",
        "",
        "```bash",
        f"python -m sglang.launch_server --model-path {target} \\",
        "  " + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in args.items()),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(card_dir: str, export_dir: str, run_dir: str | None = None) -> str:
    """Write README.md into `card_dir` (the export's directory, or the temporary one it is
    assembled in) for the export that lives at `export_dir`; returns the card's path.
    run_dir: the run it comes from (default: the nearest run directory above export_dir)."""
    with open(os.path.join(card_dir, "config.json")) as f:
        draft_config = json.load(f)
    path = os.path.join(card_dir, CARD_NAME)
    with open(path, "w") as f:
        f.write(model_card(export_dir, draft_config, run_dir or find_run_dir(export_dir)))
    return path


def _online(cfg: dict, rows: list[dict]) -> str:
    """What online decode did (data.source=generate), from the first pair's running totals."""
    if cfg.get("data", {}).get("source") != "generate":
        return ""
    last = rows[-1] if rows else {}
    gen = cfg.get("generate", {})
    return (f"; answers decoded online by the target during training ({gen.get('engine')}, "
            f"temperature {gen.get('temperature')}, at most {gen.get('max_new_tokens')} "
            f"tokens): {last.get('decode_records', 0):,} records, "
            f"{last.get('decode_tokens', 0):,} tokens, {last.get('decode_truncated', 0):,} cut "
            "at the training length (first engine)")
