"""Non-finite steps: skip the optimizer step, count it, stop after too many in a row.

A non-finite loss makes every gradient non-finite, so the global gradient norm (reduced over
the trainers, the same on each of them) decides for the whole step and every trainer skips
together. Skipping means the optimizer does not step at all: zeroed gradients are not
enough, since AdamW's momentum and weight decay would still move the weights.

On CUDA the optimizer is fused, and the fused AdamW kernel takes a `found_inf` tensor (the
mechanism of torch's GradScaler): the skip is decided on the device, the step counters are
put back, no host sync (the same on CPU when the optimizer is fused). The host learns about it one step later, from a copy made without
blocking, to count skips in a row. On CPU tensors are host memory: the check is plain.
"""

from __future__ import annotations

import torch

from colocate.exit_codes import Diverged
from colocate.train import faults


class NonFiniteGuard:
    """Steps the optimizer only when the step's global gradient norm is finite."""

    def __init__(self, max_in_a_row: int, device: torch.device):
        self.max_in_a_row = max_in_a_row
        self.cuda = device.type == "cuda"
        self.in_a_row = 0
        self.num_skipped = 0
        self._pending: tuple[int, torch.Tensor, object] | None = None  # CUDA: (step, flag, event)
        self._nan_steps = faults.nan_grad_steps()

    def inject(self, step: int, grads: list[torch.Tensor], first_trainer: bool) -> None:
        """faults.py's NaN gradient, at optimizer step `step` (0-based here)."""
        if first_trainer and step + 1 in self._nan_steps and grads:
            grads[0].view(-1)[0] = float("nan")

    def step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor, step: int) -> None:
        """optimizer.step() unless `norm` is non-finite; then count the streak (0-based `step`)."""
        nonfinite = ~torch.isfinite(norm)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = nonfinite.float()  # read by the fused kernel, on the device
            optimizer.step()
            if not self.cuda:
                self._count(step, bool(nonfinite))
                return
            self._check_previous()
            flag = nonfinite.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (step, flag, event)
            return
        skipped = bool(nonfinite)  # host tensor (or a non-fused CUDA optimizer: one sync)
        if not skipped:
            optimizer.step()
        self._count(step, skipped)

    def _check_previous(self) -> None:
        if self._pending is not None:
            step, flag, event = self._pending
            self._pending = None
            event.synchronize()  # recorded a whole step ago: long done
            self._count(step, bool(flag))

    def finish(self) -> None:
        """Count the last step too (CUDA reads the flag one step late)."""
        self._check_previous()

    def _count(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.num_skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise Diverged(
                f"the gradient norm was non-finite (NaN or inf) for {self.in_a_row} optimizer "
                f"steps in a row, up to step {step + 1}; every one was skipped. Training has "
                "diverged: lower train.lr, keep train.grad_clip on, or resume from an earlier "
                "checkpoint (checkpoint.resume=PATH); train.max_nonfinite_steps sets the limit")
