"""Counts of what happened to the input while it became training sequences."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DataStats:
    """Every non-blank line ends in exactly one bucket, so ``lines == conversations +
    held_out + skipped_invalid + skipped_no_assistant + skipped_unmaskable +
    skipped_no_trainable``.
    """

    lines: int = 0
    """Non-blank lines read."""
    conversations: int = 0
    """Conversations kept as training sequences."""
    held_out: int = 0
    """Lines of the other split (data.holdout): never trained on here."""
    skipped_invalid: int = 0
    """Malformed lines skipped (only with data.skip_invalid=true; otherwise they raise)."""
    skipped_no_assistant: int = 0
    """Conversations without an assistant turn (nothing to learn from)."""
    skipped_unmaskable: int = 0
    """Conversations the chat template fails to render, or whose replies it renders where
    no loss mask can find them (logged with FILE:LINE)."""
    skipped_no_trainable: int = 0
    """Conversations with no trainable token left (after truncation, or empty replies)."""
    truncated: int = 0
    """Kept conversations cut to data.max_length tokens."""
    tokens: int = 0
    """Tokens in the kept sequences."""
    trainable_tokens: int = 0
    """Of those, tokens inside the loss mask."""
    replies_own_ids: int = 0
    """Replies trained on the target's own token ids (data from `colocate generate`)."""
    replies_ids_unusable: int = 0
    """Replies with token ids that the template renders as other text (trained as text)."""

    def format(self) -> str:
        """One line for the log."""
        share = 100.0 * self.trainable_tokens / self.tokens if self.tokens else 0.0
        line = (f"{self.lines:,} lines -> {self.conversations:,} conversations "
                f"({self.held_out:,} held out; skipped: {self.skipped_invalid:,} invalid, "
                f"{self.skipped_no_assistant:,} without assistant, "
                f"{self.skipped_unmaskable:,} unmaskable, "
                f"{self.skipped_no_trainable:,} without trainable tokens; "
                f"{self.truncated:,} truncated), {self.tokens:,} tokens, "
                f"{self.trainable_tokens:,} trainable ({share:.1f}%)")
        if self.replies_own_ids or self.replies_ids_unusable:
            line += (f"; {self.replies_own_ids:,} replies on the target's own token ids, "
                     f"{self.replies_ids_unusable:,} rendered otherwise (trained as text)")
        return line

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> "DataStats":
        return cls(**values)
