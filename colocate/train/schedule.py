"""Step schedules: the learning rate (linear warmup, then cosine decay to lr * min_lr_ratio)
and which steps end with a validation pass."""

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def validates_after(step: int, *, every: int, last_step: int) -> bool:
    """Whether optimizer step `step` (0-based) is followed by a validation pass: every
    `every` steps and after the last one (never when `every` is 0). The engine and the
    trainer both ask, so both know which ring messages are validation micro-steps."""
    return every > 0 and ((step + 1) % every == 0 or step + 1 == last_step)
