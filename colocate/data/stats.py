"""Counts of what happened to the input while it became training sequences."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DataStats:
    """Every non-blank line ends in exactly one bucket, so
    ``lines == conversations + skipped_invalid + skipped_no_assistant + skipped_no_trainable``.
    """

    lines: int = 0
    """Non-blank lines read."""
    conversations: int = 0
    """Conversations kept as training sequences."""
    skipped_invalid: int = 0
    """Malformed lines skipped (only with data.skip_invalid=true; otherwise they raise)."""
    skipped_no_assistant: int = 0
    """Conversations without an assistant turn (nothing to learn from)."""
    skipped_no_trainable: int = 0
    """Conversations with no trainable token left (after truncation, or empty replies)."""
    truncated: int = 0
    """Kept conversations cut to data.max_length tokens."""
    tokens: int = 0
    """Tokens in the kept sequences."""
    trainable_tokens: int = 0
    """Of those, tokens inside the loss mask."""

    def format(self) -> str:
        """One line for the log."""
        share = 100.0 * self.trainable_tokens / self.tokens if self.tokens else 0.0
        return (f"{self.lines:,} lines -> {self.conversations:,} conversations "
                f"(skipped: {self.skipped_invalid:,} invalid, "
                f"{self.skipped_no_assistant:,} without assistant, "
                f"{self.skipped_no_trainable:,} without trainable tokens; "
                f"{self.truncated:,} truncated), {self.tokens:,} tokens, "
                f"{self.trainable_tokens:,} trainable ({share:.1f}%)")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> "DataStats":
        return cls(**values)
