"""Slot storage for the ring: K byte buffers shared by one producer and one consumer.

Two backends with one interface, so the protocol in ring.py is identical on CPU and GPU:

* `ShmSlots` (CPU): files in /dev/shm mapped MAP_SHARED by both processes; unlinked as soon
  as the consumer has mapped them, so a crash leaves nothing behind. No events are needed:
  the producer's writes are complete before it sends the message that names the slot.
* `CudaIpcSlots` (GPU): ordinary cudaMalloc'd buffers exported with CUDA IPC handles, plus
  two interprocess events per slot: `written` (producer records after writing, consumer's
  stream waits on it) and `consumed` (consumer records after its last use, producer's stream
  waits on it before overwriting). Waits are stream waits: no host synchronisation.
  Each side records only events it created and waits only on events it opened.

Buffers must not come from expandable segments: their IPC needs pidfd_getfd
(CAP_SYS_PTRACE), often missing in containers, so allocation turns that mode off around it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any

import torch


class SlotPool:
    """K uint8 buffers plus the per-slot ordering primitives of one side of a pair."""

    backend = "base"

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers

    @property
    def num_slots(self) -> int:
        return len(self.buffers)

    @property
    def slot_bytes(self) -> int:
        return self.buffers[0].numel()

    # Ordering hooks; no-ops for shared memory, stream-side event waits for CUDA.
    def record_written(self, slot: int) -> None: ...
    def wait_written(self, slot: int) -> None: ...
    def record_consumed(self, slot: int) -> None: ...
    def wait_consumed(self, slot: int) -> None: ...

    # Handshake pieces (producer exports, consumer opens and answers).
    def export(self) -> dict[str, Any]:
        raise NotImplementedError

    def consumer_reply(self) -> dict[str, Any]:
        return {}

    def accept_reply(self, reply: dict[str, Any]) -> None: ...

    def after_peer_opened(self) -> None: ...

    def close(self) -> None:
        self.buffers = []


# --------------------------------------------------------------------------- CPU


class ShmSlots(SlotPool):
    backend = "shm"

    def __init__(self, buffers: list[torch.Tensor], paths: list[str], owner: bool):
        super().__init__(buffers)
        self._paths = paths
        self._owner = owner

    @classmethod
    def create(cls, num_slots: int, slot_bytes: int, name: str) -> "ShmSlots":
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        paths, buffers = [], []
        try:
            for s in range(num_slots):
                path = os.path.join(root, f"{name}-slot{s}")
                # O_EXCL: a stale file from an old job with the same token is a bug, not data.
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                paths.append(path)  # ours from here on: removed again if a later step fails
                try:
                    os.ftruncate(fd, slot_bytes)
                finally:
                    os.close(fd)
                buffers.append(torch.from_file(path, shared=True, size=slot_bytes,
                                               dtype=torch.uint8))
        except BaseException:
            # No pool object exists yet to close: unlink what we created (e.g. slot 0 when
            # slot 1's name is taken, or every slot when /dev/shm is full).
            cls(buffers, paths, owner=True).close()
            raise
        return cls(buffers, paths, owner=True)

    @classmethod
    def open(cls, exported: dict[str, Any]) -> "ShmSlots":
        buffers = [torch.from_file(p, shared=True, size=exported["slot_bytes"], dtype=torch.uint8)
                   for p in exported["paths"]]
        return cls(buffers, exported["paths"], owner=False)

    def export(self) -> dict[str, Any]:
        return {"backend": self.backend, "paths": self._paths, "slot_bytes": self.slot_bytes}

    def after_peer_opened(self) -> None:
        self._unlink()

    def close(self) -> None:
        super().close()
        self._unlink()

    def _unlink(self) -> None:
        if self._owner:
            for p in self._paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            self._owner = False


# --------------------------------------------------------------------------- GPU


def expandable_segments_env() -> str | None:
    """The allocator variable that turns expandable segments on, or None."""
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if "expandable_segments:true" in os.environ.get(key, "").replace(" ", "").lower():
            return key
    return None


@contextmanager
def _plain_cuda_allocations():
    """Allocate from ordinary cudaMalloc segments even if expandable segments are on."""
    expandable = expandable_segments_env() is not None
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


class CudaIpcSlots(SlotPool):
    backend = "cuda_ipc"

    def __init__(self, buffers: list[torch.Tensor], device: torch.device,
                 written: list[torch.cuda.Event], consumed: list[torch.cuda.Event]):
        super().__init__(buffers)
        self.device = device
        self._written = written
        self._consumed = consumed

    @classmethod
    def create(cls, num_slots: int, slot_bytes: int, device: torch.device) -> "CudaIpcSlots":
        with torch.cuda.device(device), _plain_cuda_allocations():
            buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device)
                       for _ in range(num_slots)]
            written = [torch.cuda.Event(interprocess=True) for _ in range(num_slots)]
        return cls(buffers, device, written, consumed=[])

    @classmethod
    def open(cls, exported: dict[str, Any], device: torch.device) -> "CudaIpcSlots":
        with torch.cuda.device(device):
            buffers = [rebuild(*args) for rebuild, args in exported["handles"]]
            written = [torch.cuda.Event.from_ipc_handle(device, h) for h in exported["events"]]
            consumed = [torch.cuda.Event(interprocess=True) for _ in buffers]
        return cls(buffers, device, written, consumed)

    def export(self) -> dict[str, Any]:
        from torch.multiprocessing.reductions import reduce_tensor

        return {"backend": self.backend, "slot_bytes": self.slot_bytes,
                "handles": [reduce_tensor(b) for b in self.buffers],
                "events": [e.ipc_handle() for e in self._written]}

    def consumer_reply(self) -> dict[str, Any]:
        return {"consumed_events": [e.ipc_handle() for e in self._consumed]}

    def accept_reply(self, reply: dict[str, Any]) -> None:
        self._consumed = [torch.cuda.Event.from_ipc_handle(self.device, h)
                          for h in reply["consumed_events"]]

    def record_written(self, slot: int) -> None:
        self._written[slot].record(torch.cuda.current_stream(self.device))

    def wait_written(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._written[slot])

    def record_consumed(self, slot: int) -> None:
        self._consumed[slot].record(torch.cuda.current_stream(self.device))

    def wait_consumed(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._consumed[slot])

    def close(self) -> None:
        # Finish our own queued work on the buffers before dropping them.
        torch.cuda.synchronize(self.device)
        super().close()
        self._written, self._consumed = [], []
        torch.cuda.ipc_collect()


def open_slots(exported: dict[str, Any], device: torch.device) -> SlotPool:
    """Consumer side: open whatever the producer exported."""
    if exported["backend"] == "shm":
        return ShmSlots.open(exported)
    if exported["backend"] == "cuda_ipc":
        return CudaIpcSlots.open(exported, device)
    raise ValueError(f"unknown slot backend {exported['backend']!r}")
