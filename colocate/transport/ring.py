"""The ring buffer between an engine (producer) and its trainer (consumer) on one GPU.

State machine of slot s (K slots, used round-robin: message n goes to slot n % K)::

    FREE --acquire--> WRITING --publish--> IN_FLIGHT --ack(s)--> FREE
     (producer)         (producer)           (consumer holds it)

Who does what, in order:

1. Start-up (once). The producer allocates K slots (shared-memory files on CPU, ordinary
   cudaMalloc buffers on GPU) and one interprocess `written` event per slot, then sends
   `hello` with the handles. The consumer opens the handles, creates one interprocess
   `consumed` event per slot and answers `hello_ack` with their handles. The producer opens
   those and unlinks the shared-memory files (both sides have them mapped). Handles and
   events are never exchanged again.
2. Producer, message n in slot s = n % K:
   a. if K messages are in flight, receive `ack` for the oldest (bounded wait);
   b. make its stream wait on `consumed[s]` (the consumer's last GPU read of s; no host sync);
   c. write tensors into s, laid out by `layout.py` (offsets aligned to 256 bytes);
   d. record `written[s]` on its stream, send `data(slot, step, layout, meta)`.
3. Consumer, for each `data`: check the layout against what it needs (a mismatch is sent
   back as `error` and raised on both sides, naming the tensor); make its stream wait on
   `written[s]`; hand out views; on release, record `consumed[s]` and send `ack(s)`.
   Acks are pipelined: with K >= 2 the producer fills s+1 while the consumer learns on s.
4. End of stream: the producer sends `end`, then waits for the consumer's `bye` (sent after
   the consumer released every slot and closed its handles) before freeing the buffers,
   because freeing memory that another process still has open is undefined behaviour.
5. Declared pauses: before long work between two receives (a checkpoint, an export) the
   consumer sends `pause(what, bound_s)`; the producer's next wait for it lasts up to
   bound_s instead of `timeout_s`, and its error says which pause overran. The next
   message from the consumer ends the pause.
6. Early stop (the consumer's run was interrupted): the consumer sends `stop` instead of
   its next ack, closes its handles and sends `bye`. The producer reads `stop` where it
   waits for an ack, waits for the `bye`, frees the slots and raises `ConsumerStopped`;
   messages still in flight are dropped.

Every wait is bounded by `timeout_s`; a dead peer is seen at once (EOF on the channel) and
a frozen one after the timeout; both errors name the peer rank, the slot and the step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from colocate.exit_codes import Interrupted
from colocate.transport.channel import PairChannel, PeerDied, PeerError
from colocate.transport.layout import (Need, TensorSpec, align_up, check_layout, dtype_from_name,
                                       dtype_name, nbytes_of)
from colocate.transport.slots import CudaIpcSlots, ShmSlots, SlotPool, open_slots

PROTOCOL_VERSION = 1


class LayoutMismatch(RuntimeError):
    """The producer's tensors are not what the consumer needs."""


class SlotOverflow(ValueError):
    """A message does not fit in a slot."""


class ConsumerStopped(Interrupted):
    """The consumer stopped the stream early (its run was interrupted at a clean point)."""


@dataclass
class RingStats:
    messages: int = 0
    bytes: int = 0
    wait_s: float = 0.0  # time blocked waiting for the peer (free slot / next message)
    handoff_s: float = 0.0  # consumer: host time in receive/release beyond that wait


def _view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    dtype = dtype_from_name(spec.dtype)
    return buffer[spec.offset: spec.offset + spec.nbytes].view(dtype).view(spec.shape)


# --------------------------------------------------------------------------- producer


class SlotWriter:
    """Lays tensors out in one slot. Use `alloc` to get a view to write into (zero-copy,
    e.g. as a kernel's output) or `put` to copy a tensor in."""

    def __init__(self, ring: "RingProducer", slot: int, step: int):
        self._ring = ring
        self.slot = slot
        self.step = step
        self.meta: dict[str, Any] = {}
        self._specs: list[TensorSpec] = []
        self._used = 0

    def alloc(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if any(s.name == name for s in self._specs):
            raise ValueError(f"tensor '{name}' written twice into slot {self.slot}")
        shape = tuple(int(d) for d in shape)
        spec = TensorSpec(name, dtype_name(dtype), shape, self._used)
        end = spec.offset + spec.nbytes
        if end > self._ring.slot_bytes:
            sizes = ", ".join(f"{s.describe()} ({s.nbytes} B)" for s in self._specs + [spec])
            raise SlotOverflow(
                f"{self._ring.channel.me}: step {self.step} needs {end} bytes but a slot holds "
                f"{self._ring.slot_bytes} bytes ({sizes}); raise the slot capacity (the token "
                "budget per micro-step) or send less")
        self._specs.append(spec)
        self._used = align_up(end)
        return _view(self._ring.slots.buffers[self.slot], spec)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.alloc(name, tuple(tensor.shape), tensor.dtype).copy_(tensor)

    @property
    def specs(self) -> list[TensorSpec]:
        return list(self._specs)

    def views(self) -> dict[str, torch.Tensor]:
        """Everything written so far, as views into the slot."""
        buffer = self._ring.slots.buffers[self.slot]
        return {s.name: _view(buffer, s) for s in self._specs}


class RingProducer:
    """Engine side of the ring. Owns the slot memory."""

    def __init__(self, channel: PairChannel, slots: SlotPool, timeout_s: float):
        self.channel = channel
        self.slots = slots
        self.timeout_s = timeout_s
        self.stats = RingStats()
        self._next_step = 0
        self._in_flight: deque[tuple[int, int]] = deque()  # (slot, step), oldest first
        self._closed = False
        self._pause: tuple[float, str] | None = None  # (deadline, what): the consumer's pause

    @classmethod
    def start(cls, channel: PairChannel, *, num_slots: int, slot_bytes: int,
              device: torch.device, name: str, timeout_s: float) -> "RingProducer":
        """Allocate the slots and do the one-time handshake with the consumer."""
        if device.type == "cuda":
            slots: SlotPool = CudaIpcSlots.create(num_slots, slot_bytes, device)
        else:
            slots = ShmSlots.create(num_slots, slot_bytes, name)
        try:
            channel.send("hello", protocol=PROTOCOL_VERSION, slots=slots.export())
            _, reply = channel.recv("hello_ack", timeout_s, "the trainer to open the ring slots")
            slots.accept_reply(reply)
            slots.after_peer_opened()
        except BaseException:
            slots.close()
            raise
        return cls(channel, slots, timeout_s)

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    @property
    def slot_bytes(self) -> int:
        return self.slots.slot_bytes

    def acquire(self) -> SlotWriter:
        """Wait until the next slot is free and return a writer for it."""
        step = self._next_step
        slot = step % self.num_slots
        while self._in_flight and (len(self._in_flight) >= self.num_slots or self.channel.poll()):
            self._receive_ack(f"the ack of slot {self._in_flight[0][0]} (step "
                              f"{self._in_flight[0][1]}) so step {step} can use slot {slot}")
        self.slots.wait_consumed(slot)
        return SlotWriter(self, slot, step)

    def publish(self, writer: SlotWriter) -> None:
        """Make the slot's contents visible to the consumer and send its description."""
        assert writer.step == self._next_step, "publish slots in acquire order"
        self.slots.record_written(writer.slot)
        specs = writer.specs
        try:
            self.channel.send("data", slot=writer.slot, step=writer.step, layout=specs,
                              meta=writer.meta, t_publish_ns=time.monotonic_ns())
        except PeerDied:
            self._raise_if_stopped()  # the consumer stopped and left before we read its stop
            raise
        self._in_flight.append((writer.slot, writer.step))
        self._next_step += 1
        self.stats.messages += 1
        self.stats.bytes += sum(s.nbytes for s in specs)

    def drain(self) -> None:
        """Wait until the consumer has acked every published message."""
        while self._in_flight:
            self._receive_ack(f"the ack of slot {self._in_flight[0][0]} (step "
                              f"{self._in_flight[0][1]})")

    def _receive_ack(self, waiting_for: str) -> None:
        slot, step = self._in_flight[0]
        t0 = time.monotonic()
        _, ack = self._recv_consumer("ack", waiting_for)
        self.stats.wait_s += time.monotonic() - t0
        if (ack["slot"], ack["step"]) != (slot, step):
            raise PeerError(f"{self.channel.me}: {self.channel.peer} acked slot {ack['slot']} "
                            f"step {ack['step']}, expected slot {slot} step {step}")
        self._in_flight.popleft()

    def _recv_consumer(self, expect: str, waiting_for: str) -> tuple[str, dict]:
        """The consumer's next `expect` message, bounded by `timeout_s` or by the pause it
        declared; its `stop` ends the stream here (ConsumerStopped)."""
        while True:
            timeout_s, note = self.timeout_s, ""
            if self._pause is not None:
                timeout_s = max(timeout_s, self._pause[0] - time.monotonic())
                note = f", after its declared pause ({self._pause[1]})"
            kind, msg = self.channel.recv((expect, "pause", "stop"), timeout_s,
                                          waiting_for + note)
            if kind == "pause":
                self._pause = (time.monotonic() + msg["bound_s"],
                               f"{msg['what']}, up to {msg['bound_s']:.0f} s")
                continue
            self._pause = None
            if kind == "stop":
                self._closed = True
                try:
                    self.channel.recv("bye", self.timeout_s, "the trainer to close the ring slots")
                finally:
                    self.slots.close()
                raise ConsumerStopped(f"{self.channel.me}: {self.channel.peer} stopped the "
                                      f"stream after its step {msg['step']} ({msg['reason']})")
            return kind, msg

    def _raise_if_stopped(self) -> None:
        """Read what the departed consumer left unread; raise ConsumerStopped if it said
        `stop` (then `bye`, as it does) before closing."""
        try:
            while self.channel.poll():
                self._recv_consumer("ack", "the trainer's last messages")
        except (PeerError, OSError):
            pass

    def close(self, reason: str = "done") -> None:
        """End the stream: collect outstanding acks and the consumer's `bye`, then free."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self.channel.send("end", reason=reason)
            except PeerDied:
                self._raise_if_stopped()
                raise
            self.drain()
            self._recv_consumer("bye", "the trainer to close the ring slots")
        finally:
            self.slots.close()


# --------------------------------------------------------------------------- consumer


class Delivery:
    """One received message: tensor views into a slot, valid until `release()`."""

    def __init__(self, ring: "RingConsumer", slot: int, step: int, tensors: dict[str, torch.Tensor],
                 meta: dict[str, Any], published_ns: int):
        self._ring = ring
        self.slot = slot
        self.step = step
        self.tensors = tensors
        self.meta = meta
        self.published_ns = published_ns  # producer's time.monotonic_ns() at publish
        self._released = False

    def release(self) -> None:
        """Give the slot back: the producer may overwrite it once our queued reads finish."""
        if not self._released:
            self._released = True
            self.tensors = {}
            self._ring._ack(self.slot, self.step)

    def __enter__(self) -> "Delivery":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RingConsumer:
    """Trainer side of the ring. Opens the producer's slots; never allocates them."""

    def __init__(self, channel: PairChannel, slots: SlotPool, needs: dict[str, Need],
                 timeout_s: float):
        self.channel = channel
        self.slots = slots
        self.needs = needs
        self.timeout_s = timeout_s
        self.stats = RingStats()
        self._expected_step = 0
        self._held = 0
        self._ended = False
        self._closed = False

    @classmethod
    def start(cls, channel: PairChannel, *, device: torch.device, needs: dict[str, Need],
              timeout_s: float) -> "RingConsumer":
        _, hello = channel.recv("hello", timeout_s, "the engine to export the ring slots")
        if hello["protocol"] != PROTOCOL_VERSION:
            text = (f"ring protocol {hello['protocol']} from {channel.peer}, trainer speaks "
                    f"{PROTOCOL_VERSION}: both ranks must run the same colocate version")
            channel.report_error(text)
            raise PeerError(f"{channel.me}: {text}")
        slots = open_slots(hello["slots"], device)
        channel.send("hello_ack", **slots.consumer_reply())
        return cls(channel, slots, needs, timeout_s)

    def receive(self) -> Delivery | None:
        """Next message, or None once the producer ended the stream."""
        if self._ended:
            return None
        step = self._expected_step
        t0 = time.monotonic()
        kind, msg = self.channel.recv(("data", "end"), self.timeout_s,
                                      f"step {step} (slot {step % self.slots.num_slots})")
        t_arrived = time.monotonic()
        self.stats.wait_s += t_arrived - t0
        if kind == "end":
            self._ended = True
            return None
        slot, specs = msg["slot"], msg["layout"]
        if msg["step"] != step or slot != step % self.slots.num_slots:
            raise PeerError(f"{self.channel.me}: got step {msg['step']} in slot {slot} from "
                            f"{self.channel.peer}, expected step {step}")
        size = self.slots.slot_bytes
        problems = [f"tensor '{s.name}' at bytes {s.offset}..{s.offset + s.nbytes} lies outside "
                    f"the {size}-byte slot" for s in specs
                    if s.offset < 0 or s.offset + s.nbytes > size] + check_layout(specs, self.needs)
        if problems:
            text = (f"ring layout mismatch at step {step} (slot {slot}): " + "; ".join(problems))
            self.channel.report_error(text)
            raise LayoutMismatch(f"{self.channel.me}: {text}")
        self.slots.wait_written(slot)
        buffer = self.slots.buffers[slot]
        tensors = {s.name: _view(buffer, s) for s in specs}
        self._expected_step += 1
        self._held += 1
        self.stats.messages += 1
        self.stats.bytes += sum(s.nbytes for s in specs)
        self.stats.handoff_s += time.monotonic() - t_arrived
        return Delivery(self, slot, step, tensors, msg["meta"], msg["t_publish_ns"])

    def _ack(self, slot: int, step: int) -> None:
        t0 = time.monotonic()
        self.slots.record_consumed(slot)
        self._held -= 1
        self.channel.send("ack", slot=slot, step=step)
        self.stats.handoff_s += time.monotonic() - t0

    def pause(self, what: str, bound_s: float) -> None:
        """Declare long work before our next receive or release (`what`, e.g. "checkpoint at
        step 40"): the producer waits up to `bound_s` for us instead of its timeout."""
        self.channel.send("pause", what=what, bound_s=float(bound_s))

    def stop(self, step: int, reason: str) -> None:
        """End the stream early, at an optimizer-step boundary (`step` steps done): every
        delivery must be released. The producer frees the slots after our `bye`."""
        self.channel.send("stop", step=step, reason=reason)
        self.close()

    def close(self) -> None:
        """After the producer's `end` (or our `stop`): close our handles and tell it the
        memory is free."""
        if self._closed:
            return
        self._closed = True
        if self._held:
            raise RuntimeError(f"{self.channel.me}: closing the ring with {self._held} "
                               "deliveries not released")
        self.slots.close()
        self.channel.send("bye")


def layout_bytes(tensors: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Slot bytes needed for these (shape, dtype) tensors under the ring's alignment."""
    used = 0
    for shape, dtype in tensors:
        used = align_up(used + nbytes_of(shape, dtype))
    return used
