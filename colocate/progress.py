"""What the first trainer prints (progress lines), and the timers the step loop reads without
host synchronisation. Numbers come from `colocate.metrics` (its `MetricsLog` rows); this module
only formats them.
"""

from __future__ import annotations

import sys
import time

import torch


def peak_gib(device: torch.device) -> float:
    """Peak memory this process allocated on `device` (allocator stats: no sync)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _stamp(cuda: bool):
    """A point in time: a CUDA event recorded on the current stream, or the wall clock."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


class PhaseTimer:
    """Time spent in each phase of a step, without host synchronisation.

    On CUDA each `mark` records an event on the current stream, so a phase is the GPU time
    between two marks; the events are read only when the metrics are written (a sync point
    already). On CPU the marks are wall-clock times. Disabled timers record nothing.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.marks: list[tuple[str, object]] = []

    def mark(self, phase: str) -> None:
        """End the phase `phase` here (the first mark of a step starts it)."""
        if self.enabled:
            self.marks.append((phase, _stamp(self.cuda)))

    def take(self) -> list[tuple[str, object]]:
        """This step's marks; the timer starts the next step from the last one."""
        marks = self.marks
        self.marks = marks[-1:] if marks else []
        return marks


def phase_seconds(marks: list[tuple[str, object]]) -> dict[str, float]:
    """Seconds per phase from `PhaseTimer.take()` marks (waits for CUDA events to finish)."""
    out: dict[str, float] = {}
    for (_, start), (phase, end) in zip(marks, marks[1:]):
        if isinstance(end, torch.cuda.Event):
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = end - start
        out[phase] = out.get(phase, 0.0) + seconds
    return out


class BusyClock:
    """Cumulative time inside begin()/end() intervals, read without host synchronisation:
    on CUDA an interval counts once its end event has completed (`query`), so the total
    may lag by the intervals still in flight."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total_s = 0.0
        self._open = None
        self._pending: list[tuple[object, object]] = []

    def begin(self) -> None:
        self._open = _stamp(self.cuda)

    def end(self) -> None:
        self._pending.append((self._open, _stamp(self.cuda)))
        self._open = None

    def read(self) -> float:
        still = []
        for start, end in self._pending:
            if not self.cuda:
                self.total_s += end - start
            elif end.query():
                self.total_s += start.elapsed_time(end) / 1e3
            else:
                still.append((start, end))
        self._pending = still
        return self.total_s


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """One line per micro-step on the first trainer, at most every `every_s` seconds."""

    def __init__(self, *, enabled: bool, max_steps: int, micro_steps: int, every_s: float,
                 stream=None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.micro_steps = micro_steps
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.steps_done = 0
        self.first_step = 0
        self.last: dict | None = None  # latest written metrics row
        self._last_print = 0.0
        self._tokens = 0  # this pair's tokens in finished steps

    def micro(self, step: int, micro: int, *, step_tokens: int, trainer_wait_s: float,
              engine_wait_s: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_print < self.every_s:
            return
        self._last_print = now
        elapsed = max(now - self.start, 1e-9)
        done = self.steps_done + (micro + 1) / self.micro_steps
        eta = elapsed / done * (self.max_steps - self.first_step - done)
        metrics = self.last or {}
        loss = f"loss {metrics['loss']:.4f} acc_0 {metrics['acc_0']:.3f}" if metrics else \
            "loss -- acc_0 --"
        print(f"step {step + 1}/{self.max_steps} micro {micro + 1}/{self.micro_steps} | "
              f"{(self._tokens + step_tokens) / elapsed:,.0f} tok/s/GPU | "
              f"ETA {_duration(eta)} | {loss} | wait: trainer {100 * trainer_wait_s / elapsed:.0f}% "
              f"engine {100 * engine_wait_s / elapsed:.0f}%", file=self.stream, flush=True)

    def step_done(self, step: int, metrics: dict | None, tokens: int) -> None:
        if self.steps_done == 0:
            self.first_step = step
        self.steps_done += 1
        self._tokens += tokens
        self.last = metrics

    def validation(self, metrics: dict | None) -> None:
        """The held-out numbers of a validation step."""
        if not self.enabled or not metrics or "val_loss" not in metrics:
            return
        print(f"validation after step {metrics['step']}: loss {metrics['val_loss']:.4f} | "
              f"acc_0 {metrics['val_acc_0']:.3f} | sim_accept_length "
              f"{metrics['val_sim_accept_length']:.2f} on {metrics['val_labels']:,} held-out "
              "labels", file=self.stream, flush=True)

    def finish(self, metrics: dict | None) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if metrics:
            accs = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("acc_"))
            print(f"done: {self.steps_done} steps in {_duration(elapsed)} | final loss "
                  f"{metrics['loss']:.4f} | {accs} | sim_accept_length "
                  f"{metrics['sim_accept_length']:.2f}", file=self.stream, flush=True)


class GenerateProgress:
    """`colocate generate`: records done / total, generated tokens/s and ETA. A line at most
    every `every_s` seconds while replies come in, and one per finished chunk.

    Records finish only with their chunk (its last round), so the ETA comes from turns: the
    turn rate so far against the turns still due, estimated from the turns per record of
    the chunks seen so far."""

    def __init__(self, *, total: int, done: int, every_s: float = 2.0, stream=None):
        self.total = total
        self.done = done  # including records finished by earlier runs
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self._todo = total - done  # records this run started with
        self._seen = [0, 0]  # records, turns of the chunks started in this run
        self._turns = 0
        self._tokens = 0
        self._last_print = self.start

    def chunk(self, num_records: int, num_turns: int) -> None:
        """A chunk starts: `num_turns` assistant turns to generate for its records."""
        self._seen[0] += num_records
        self._seen[1] += num_turns

    def replies(self, num_replies: int, num_tokens: int) -> None:
        self._turns += num_replies
        self._tokens += num_tokens
        if time.monotonic() - self._last_print >= self.every_s:
            self._print()

    def records(self, num_records: int) -> None:
        """A chunk is written."""
        self.done += num_records
        self._print()

    def _print(self) -> None:
        now = time.monotonic()
        self._last_print = now
        elapsed = max(now - self.start, 1e-9)
        eta = "--"
        if self._turns and self._seen[0]:
            due = self._seen[1] / self._seen[0] * self._todo - self._turns
            eta = _duration(max(due, 0) * elapsed / self._turns)
        print(f"generate: {self.done:,}/{self.total:,} records | {self._tokens / elapsed:,.0f} "
              f"tok/s | ETA {eta}", file=self.stream, flush=True)
