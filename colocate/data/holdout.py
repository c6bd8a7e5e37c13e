"""The held-out split: `data.holdout` conversations that training never sees.

Validation during training and `colocate eval` use them, so a draft is measured on prompts
it was not trained on. The split is a pure function of the file's line numbers (the
`count` non-blank lines whose hash of the line number is smallest), not of the seed or
the content: every run on the same file holds out the same lines, whatever its seed, and
editing one conversation does not reshuffle the split.
"""

from __future__ import annotations

import hashlib
import heapq

from colocate.data.conversations import Conversation, read_conversations
from colocate.data.errors import DataError
from colocate.data.stats import DataStats


def _line_rank(line_no: int) -> bytes:
    return hashlib.sha256(f"colocate-holdout:{line_no}".encode()).digest()[:8]


def holdout_lines(path: str, count: int) -> frozenset[int]:
    """1-based numbers of the `count` held-out lines of the JSONL at `path`."""
    if count <= 0:
        return frozenset()
    with open(path, encoding="utf-8") as f:
        numbers = [n for n, line in enumerate(f, start=1) if line.strip()]
    if count >= len(numbers):
        raise DataError(f"data.holdout: {count} held-out conversations leave none of the "
                        f"{len(numbers)} lines of {path} to train on; lower data.holdout")
    return frozenset(heapq.nsmallest(count, numbers, key=_line_rank))


def read_holdout_conversations(data, *, skip_invalid: bool | None = None) -> list[Conversation]:
    """The held-out conversations of `data` (a DataSection), in file order."""
    if data.holdout <= 0:
        raise DataError("data.holdout is 0: no conversations are held out; set data.holdout "
                        "(e.g. 48) for training, or pass held-out data explicitly")
    lines = holdout_lines(data.path, data.holdout)
    stats = DataStats()
    skip = data.skip_invalid if skip_invalid is None else skip_invalid
    return list(read_conversations(data.path, skip_invalid=skip, stats=stats,
                                   keep_line=lines.__contains__))
