"""The tokenized-data cache: reused when inputs match, rebuilt when any input changes."""

from __future__ import annotations

import os
import shutil

import torch

from colocate.config import DataSection
from colocate.data import load_or_build_tokenized


def _load(cfg, tiny_assets, tok, default_cache_dir=""):
    return load_or_build_tokenized(cfg, tok, tiny_assets["tokenizer"], default_cache_dir)


def test_second_load_reuses_the_cache(tiny_assets, tiny_tokenizer, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(tiny_assets["data"], data)
    cache = tmp_path / "cache"
    cfg = DataSection(path=str(data), cache_dir="")  # empty: the caller's default dir
    first = _load(cfg, tiny_assets, tiny_tokenizer, str(cache))
    assert not first.from_cache and os.path.dirname(first.cache_path) == str(cache)
    assert first.stats.conversations == first.num_sequences == 500
    mtime = os.stat(first.cache_path).st_mtime_ns
    second = _load(cfg, tiny_assets, tiny_tokenizer, str(cache))
    assert second.from_cache and second.cache_path == first.cache_path
    assert os.stat(first.cache_path).st_mtime_ns == mtime
    assert torch.equal(first.ids, second.ids) and torch.equal(first.offsets, second.offsets)
    assert torch.equal(first.loss_mask, second.loss_mask)
    assert second.stats == first.stats
    assert os.listdir(cache) == [os.path.basename(first.cache_path)]  # no temp files left


def test_changed_inputs_invalidate_the_cache(tiny_assets, tiny_tokenizer, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(tiny_assets["data"], data)
    cfg = DataSection(path=str(data), cache_dir=str(tmp_path / "cache"))
    base = _load(cfg, tiny_assets, tiny_tokenizer)
    with open(data, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "Hi"}, '
                '{"role": "assistant", "content": "Hello"}]}\n')
    grown = _load(cfg, tiny_assets, tiny_tokenizer)
    assert not grown.from_cache and grown.key != base.key
    assert grown.num_sequences == base.num_sequences + 1
    shorter = _load(DataSection(path=str(data), cache_dir=cfg.cache_dir, max_length=30),
                    tiny_assets, tiny_tokenizer)
    assert not shorter.from_cache and shorter.stats.truncated > 0
    other_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}" \
                     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    templated = _load(DataSection(path=str(data), cache_dir=cfg.cache_dir,
                                  chat_template=other_template), tiny_assets, tiny_tokenizer)
    assert not templated.from_cache and templated.key not in (base.key, grown.key)
    assert _load(cfg, tiny_assets, tiny_tokenizer).from_cache  # the grown entry is still valid


def test_atomic_writes_get_a_plain_files_mode(tmp_path):
    import os
    import stat

    from colocate.data.cache import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "out.jsonl"), lambda f: f.write(b"{}\n"))
    finally:
        os.umask(old)
    # mkstemp's 0600 would leave generated data unreadable to the rest of a team.
    assert stat.S_IMODE(os.stat(tmp_path / "out.jsonl").st_mode) == 0o644
