"""On-disk cache helpers: content fingerprints and atomic writes.

Several processes (one engine per GPU) may build the same cache entry at once. Each
writes a private temporary file and renames it into place, so a reader sees either no
file or a whole one; the last writer wins with identical content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import IO, Any, Callable

import torch

log = logging.getLogger(__name__)

# Files in a model directory that cannot change how text tokenizes: skipped so that
# fingerprinting a target directory never reads gigabytes of weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack",
                    ".ckpt", ".index.json", ".onnx")


def update_with_file(h: "hashlib._Hash", path: str) -> None:
    """Feed a file's bytes into ``h`` in chunks (data files can be large)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def update_with_tokenizer_files(h: "hashlib._Hash", tokenizer_path: str) -> None:
    """Feed the tokenizer's files (names and bytes) into ``h``.

    ``tokenizer_path`` may be a directory (every non-weight file in it) or one file.
    """
    if os.path.isfile(tokenizer_path):
        update_with_file(h, tokenizer_path)
        return
    for name in sorted(os.listdir(tokenizer_path)):
        path = os.path.join(tokenizer_path, name)
        if name.startswith(".") or not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES):
            continue
        h.update(name.encode() + b"\0")
        update_with_file(h, path)


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a private temporary file in the same directory, then rename it to
    ``path``: a reader (or a rerun after a crash) sees either no file or a whole one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, value: Any) -> None:
    """``value`` as indented JSON (one trailing newline), written with ``atomic_write``."""
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2) + "\n"), binary=False)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a private temporary file in the same directory, then rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_cached(path: str, key: str) -> dict[str, Any] | None:
    """The cached dict at ``path`` if it exists and was stored under ``key``; else None.

    An unreadable file (e.g. from an older format) is treated as a miss and rebuilt.
    """
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file must not stop training
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    return payload
