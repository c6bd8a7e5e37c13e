"""Non-finite steps: skip the optimizer step, count it, stop after too many in a row. Steps
whose gradient is exactly zero are counted too: a trainer that computes nothing is broken,
not converged (seen on an H200 under an MPS SM cap: a loss and gradient norm of exactly 0,
docs/gpu-logs/online-h200/trainer-sm-cap/), and it must not train on in silence.

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
        self.zero_in_a_row = 0
        self._pending: tuple[int, torch.Tensor, object] | None = None  # CUDA: (step, flags, event)
        self._nan_steps = faults.nan_grad_steps()

    def inject(self, step: int, grads: list[torch.Tensor], first_trainer: bool) -> None:
        """faults.py's NaN gradient, at optimizer step `step` (0-based here)."""
        if first_trainer and step + 1 in self._nan_steps and grads:
            grads[0].view(-1)[0] = float("nan")

    def step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor, step: int) -> None:
        """optimizer.step() unless `norm` is non-finite; then count the streak (0-based `step`)."""
        nonfinite = ~torch.isfinite(norm)
        flags = torch.stack([nonfinite, norm == 0])
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = nonfinite.float()  # read by the fused kernel, on the device
            optimizer.step()
            if not self.cuda:
                self._count(step, *flags.tolist())
                return
            self._check_previous()
            flags = flags.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (step, flags, event)
            return
        skipped, zero = flags.tolist()  # host tensor (or a non-fused CUDA optimizer: one sync)
        if not skipped:
            optimizer.step()
        self._count(step, skipped, zero)

    def _check_previous(self) -> None:
        if self._pending is not None:
            step, flags, event = self._pending
            self._pending = None
            event.synchronize()  # recorded a whole step ago: long done
            self._count(step, *flags.tolist())

    def finish(self) -> None:
        """Count the last step too (CUDA reads the flag one step late)."""
        self._check_previous()

    def _count(self, step: int, skipped: bool, zero: bool = False) -> None:
        self.zero_in_a_row = self.zero_in_a_row + 1 if zero else 0
        if self.zero_in_a_row >= self.max_in_a_row:
            raise Diverged(
                f"the gradient norm was exactly 0 for {self.zero_in_a_row} optimizer steps in a "
                f"row, up to step {step + 1}: the trainer computes nothing from its data (the "
                "loss does not depend on the draft's weights). Seen once on an H200 with "
                "mps.trainer_sm_percent=50 and dummy weights, not explained: keep "
                "mps.trainer_sm_percent and mps.engine_sm_percent at 100; "
                "train.max_nonfinite_steps sets the limit")
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
