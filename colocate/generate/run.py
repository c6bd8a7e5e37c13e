"""One `colocate generate` run: read the input in chunks, regenerate, store, summarise."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from colocate.config import Config, ConfigError, describe_path
from colocate.data.cache import update_with_file, update_with_tokenizer_files
from colocate.data.conversations import Conversation, read_lines, skip_invalid_line
from colocate.data.errors import DataError
from colocate.data.stats import DataStats
from colocate.data.template import Renderer
from colocate.data.tokenized import renderer_for
from colocate.generate.engines import Generator, Sampling, build_generator, resolve_backend
from colocate.generate.rewrite import ChunkRewriter
from colocate.generate.store import GenerateError, PartStore
from colocate.progress import GenerateProgress
from colocate.target import check_model_dir, context_length, load_tokenizer, stop_token_ids

log = logging.getLogger(__name__)

Item = tuple[int, Conversation | DataError]


def generation_renderer(cfg: Config, tokenizer) -> Renderer:
    """data.chat_template(_kwargs) as training renders them, with enable_thinking=false
    added when generate.thinking is false."""
    renderer = renderer_for(cfg.data, tokenizer, cfg.target.path)
    if cfg.generate.thinking:
        if renderer.kwargs.get("enable_thinking") is False:
            raise ConfigError("generate.thinking: true keeps the model's reasoning, but "
                              "data.chat_template_kwargs.enable_thinking is false; set "
                              "generate.thinking=false, or drop enable_thinking")
        return renderer
    if "enable_thinking" not in renderer.template:
        log.warning("generate.thinking=false: the chat template has no enable_thinking "
                    "switch, so prompts render as with thinking on")
    return Renderer(tokenizer, renderer.template, {**renderer.kwargs, "enable_thinking": False})


def _fingerprint(data_path: str, target_path: str, settings: dict) -> str:
    """Hash of everything that decides the output: input bytes, the target's tokenizer and
    config files (not its weights: gigabytes), engine, dtype, load format, template and
    sampling settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + b"\0")
    update_with_file(h, data_path)
    h.update(b"\0target\0")
    update_with_tokenizer_files(h, target_path)
    return h.hexdigest()


def _count_records(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _chunks(items: Iterator[Item], size: int, skip_invalid: bool) -> Iterator[list[Item]]:
    stats = DataStats()  # the reader's: logs the first few malformed lines
    chunk: list[Item] = []
    for line_no, item in items:
        if isinstance(item, DataError):
            skip_invalid_line(item, skip_invalid=skip_invalid, stats=stats)
        chunk.append((line_no, item))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Job:
    """Everything decided before the first prompt: how prompts render, when replies stop,
    how long they may be, and the fingerprint of it all."""

    tokenizer: Any
    renderer: Renderer
    sampling: Sampling
    max_prompt_tokens: int
    settings: dict
    key: str


def prepare(cfg: Config, data_path: str, engine: str | None = None) -> Job:
    """Check the inputs (one readable error each) and settle the job's settings. `engine`:
    the name of a generator handed in ready-made (else generate.engine's, resolved here)."""
    from transformers import AutoConfig

    if not os.path.isfile(data_path):
        raise DataError(f"--data / data.path: {describe_path(data_path)} is not a file; point it at a JSONL "
                        "of conversations")
    check_model_dir(cfg.target.path, need_weights=cfg.target.load_format != "dummy")
    gen = cfg.generate
    tokenizer = load_tokenizer(cfg.target.path)
    renderer = generation_renderer(cfg, tokenizer)
    stop_ids = stop_token_ids(cfg.target.path, tokenizer)
    context = context_length(AutoConfig.from_pretrained(cfg.target.path, local_files_only=True))
    if context <= gen.max_new_tokens:
        raise ConfigError(f"generate.max_new_tokens: {gen.max_new_tokens} leaves no room for a "
                          f"prompt in the target's context of {context} tokens; lower it")
    backend = resolve_backend(cfg)
    # Answers of another engine, dtype, KV cache or weight source are other answers: a
    # resumed run must not splice them together.
    settings = {"engine": engine or backend.engine,
                "dtype": str(backend.dtype).removeprefix("torch."),
                "load_format": cfg.target.load_format,
                "thinking": gen.thinking, "max_new_tokens": gen.max_new_tokens,
                "temperature": gen.temperature, "top_p": gen.top_p,
                "seed": cfg.run.seed if gen.temperature > 0 else None,
                "stop_ids": list(stop_ids), "chat_template": renderer.template,
                "chat_template_kwargs": dict(renderer.kwargs)}
    # An fp8-cached target may answer otherwise. Absent when auto, so that parts written
    # before the key existed still resume.
    if gen.kv_cache_dtype != "auto":
        settings["kv_cache_dtype"] = gen.kv_cache_dtype
    return Job(tokenizer, renderer,
               Sampling(gen.max_new_tokens, gen.temperature, gen.top_p, stop_ids),
               context - gen.max_new_tokens, settings,
               _fingerprint(data_path, cfg.target.path, settings))


def generate_file(cfg: Config, *, data_path: str, out_path: str, limit: int | None = None,
                  force: bool = False, generator: Generator | None = None,
                  stream=None) -> dict:
    """Regenerate every assistant turn of `data_path` into `out_path` (the first `limit`
    records only, when given) and return the summary (also in OUT.summary.json).

    `generator`: a ready backend (tests); by default generate.engine's is loaded once
    there is a record left to regenerate, and closed at the end."""
    if os.path.abspath(out_path) == os.path.abspath(data_path):
        raise GenerateError(f"--out {out_path} is the input file; write the answers elsewhere")
    job = prepare(cfg, data_path, None if generator is None else generator.name)
    store = PartStore(out_path)
    done = None if force else store.complete_summary(job.key)
    if done is not None:
        print(f"generate: {out_path} is complete ({done['records_written']:,} records); "
              "nothing to do (--force regenerates it)", file=stream, flush=True)
        return done
    store.open(job.key, job.settings, force=force)
    try:
        num_lines = _count_records(data_path)
        total = num_lines if limit is None else min(num_lines, limit)
        _regenerate(cfg, job, store, data_path, total, generator, stream)
        counts, skips = store.totals()
        if counts.turns_generated == 0:
            first = f"; first skip: {skips[0]}" if skips else ""
            raise DataError(f"{data_path}: no usable prompt ({counts.format()}){first}")
        # Whole when the parts, of this run and earlier ones, account for every line (a
        # --limit run may find them all done already).
        summary = {"complete": counts.records_read == num_lines,
                   "input": os.path.abspath(data_path),
                   "output": os.path.abspath(out_path),
                   "target": os.path.abspath(cfg.target.path),
                   "engine": job.settings["engine"],
                   **counts.to_dict(),
                   "tokens_per_s": counts.generated_tokens / max(counts.generate_seconds, 1e-9),
                   "first_skips": skips, "settings": job.settings, "key": job.key}
        store.assemble(summary)
    finally:
        store.close()
    return summary


def _regenerate(cfg: Config, job: Job, store: PartStore, data_path: str, total: int,
                generator: Generator | None, stream) -> None:
    """Every record among the first `total` that no part accounts for yet, chunk by chunk,
    into `store`."""
    seen = 0

    def keep(line_no: int) -> bool:  # called once per non-blank line, in order
        nonlocal seen
        seen += 1
        return seen <= total and not store.covers(line_no)

    items = read_lines(data_path, stats=DataStats(), keep_line=keep)
    rewriter, progress, own = None, None, generator is None
    try:
        for chunk in _chunks(items, cfg.generate.chunk_records, cfg.data.skip_invalid):
            if rewriter is None:  # loaded only when there is work: a model takes minutes
                if generator is None:
                    pad_id = job.tokenizer.pad_token_id
                    generator = build_generator(cfg, job.sampling, job.sampling.stop_ids[0]
                                                if pad_id is None else pad_id)
                # Started after loading, so its rates are generation's own.
                progress = GenerateProgress(total=total, done=store.totals()[0].records_read,
                                            stream=stream)
                rewriter = ChunkRewriter(generator, job.renderer,
                                         max_prompt_tokens=job.max_prompt_tokens,
                                         stop_ids=job.sampling.stop_ids, seed=cfg.run.seed,
                                         on_batch=progress.replies)
            progress.chunk(len(chunk), sum(len(item.assistant_turns) for _, item in chunk
                                           if isinstance(item, Conversation)))
            start = time.perf_counter()
            result = rewriter.run(chunk)
            result.counts.generate_seconds = time.perf_counter() - start
            store.write(result)
            progress.records(len(chunk))
    finally:
        if own and generator is not None:
            generator.close()
