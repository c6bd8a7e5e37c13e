"""The wire format of one ring message: which tensors sit where in a slot.

The engine (producer) defines the layout of what it wrote and sends it with every message;
the trainer (consumer) checks it against what it needs and fails loudly naming the missing
or mismatched tensor. The trainer never derives the layout from its own config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised kernels


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in ring layout")
    return dtype


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the slot start

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, dtype_from_name(self.dtype))

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class Need:
    """What the consumer requires of one tensor. `shape` entries: an int (exact), a str
    (a named dimension that must agree across tensors, e.g. "T" tokens) or None (any)."""

    dtype: torch.dtype | None
    shape: tuple[int | str | None, ...]


HALO_DIM = "E"
"""The rows of a sequence-parallel chunk's halo features: its own T rows plus the halo."""


def feature_needs(hidden_size: int, num_aux: int, dtype: torch.dtype, *, last_hidden: bool,
                  halo_features: tuple[str, ...] = ()) -> dict[str, Need]:
    """The tensors of one micro-step's message, the one definition both sides use: the
    trainer checks what arrives against it (`DraftRecipe.feature_needs`) and the engine
    lays out its slot by it (`TargetEngine`). Named dims: "T" tokens (this trainer's rows),
    "S" sequences, and `HALO_DIM` for `halo_features` (sequence parallelism)."""
    needs = {
        "input_ids": Need(torch.int64, ("T",)),
        "positions": Need(torch.int64, ("T",)),
        "loss_mask": Need(torch.bool, ("T",)),
        "seq_lens": Need(torch.int32, ("S",)),
        "aux_hidden": Need(dtype, ("T", num_aux * hidden_size)),
    }
    if last_hidden:
        needs["last_hidden"] = Need(dtype, ("T", hidden_size))
    for name in halo_features:
        if name in needs:
            needs[name] = Need(needs[name].dtype, (HALO_DIM, *needs[name].shape[1:]))
    return needs


def concrete_shapes(needs: dict[str, Need], dims: dict[str, int]
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`needs` with every named dimension replaced by its size in `dims`."""
    return {name: (tuple(dims[d] if isinstance(d, str) else d for d in need.shape), need.dtype)
            for name, need in needs.items()}


def check_layout(specs: list[TensorSpec], needs: dict[str, Need]) -> list[str]:
    """Problems of `specs` against `needs`, one readable line each (empty: fine)."""
    problems = []
    have = {s.name: s for s in specs}
    bound: dict[str, tuple[int, str]] = {}
    for name, need in needs.items():
        spec = have.get(name)
        if spec is None:
            problems.append(f"tensor '{name}' is missing (the engine sent: "
                            f"{', '.join(s.describe() for s in specs) or 'nothing'})")
            continue
        if need.dtype is not None and spec.dtype != dtype_name(need.dtype):
            problems.append(f"tensor '{name}' has dtype {spec.dtype}, the trainer needs "
                            f"{dtype_name(need.dtype)}")
        if len(spec.shape) != len(need.shape):
            problems.append(f"tensor '{name}' has shape {list(spec.shape)}, the trainer needs "
                            f"{len(need.shape)} dims {list(need.shape)}")
            continue
        for axis, (got, want) in enumerate(zip(spec.shape, need.shape)):
            if isinstance(want, int) and got != want:
                problems.append(f"tensor '{name}' dim {axis} is {got}, the trainer needs {want} "
                                f"(shape {list(spec.shape)})")
            elif isinstance(want, str):
                if want in bound and bound[want][0] != got:
                    first_size, first_name = bound[want]
                    problems.append(f"tensor '{name}' dim {axis} is {got} but '{first_name}' "
                                    f"gave {want}={first_size}")
                bound.setdefault(want, (got, name))
    return problems
