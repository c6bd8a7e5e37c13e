"""Pair control channel: one Unix socket between a trainer and its engine on the same node.

Why a socket: a process that dies has its descriptors closed by the kernel, so the survivor's
next read returns EOF at once (no heartbeat needed). A peer that is alive but frozen is
caught by the timeout every receive carries. Both failures raise `PeerError` naming the
peer's role and rank and what was awaited.

Framing: 8-byte big-endian length, then a pickled `(kind, payload)` tuple. Pickle is only
read after the connection is authenticated: both ends check the peer's pid with
SO_PEERCRED against the pid the topology gathered at start-up, so no other local process
can inject or squat on the (abstract-namespace) address.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

_HEADER = struct.Struct("!Q")
_MAX_MESSAGE = 1 << 30  # a control message is metadata; anything larger is corruption


class PeerError(RuntimeError):
    """The peer died, stopped answering, or reported an error of its own."""


class PeerDied(PeerError):
    pass


class PeerTimeout(PeerError):
    pass


class PeerReportedError(PeerError):
    pass


@dataclass(frozen=True)
class PeerId:
    role: str
    rank: int
    pid: int

    def __str__(self) -> str:
        return f"{self.role} rank {self.rank}"


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


class PairChannel:
    """A connected, authenticated message channel to one peer."""

    def __init__(self, sock: socket.socket, me: str, peer: PeerId):
        self._sock = sock
        self.me = me  # e.g. "engine rank 1" — used in every error message
        self.peer = peer
        self._closed = False
        self._unread: list[tuple[str, dict[str, Any]]] = []  # read past, not yet received

    # ------------------------------------------------------------------ set-up
    @classmethod
    def listen(cls, address: str, me: str, peer: PeerId, timeout_s: float) -> "PairChannel":
        """Bind `address` and accept the peer (the engine side calls this)."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(address)
            server.listen(1)
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimeout(
                        f"{me}: {peer} did not connect to the pair channel within {timeout_s:.0f} s "
                        "(it may have failed during start-up; see its log)")
                server.settimeout(remaining)
                try:
                    sock, _ = server.accept()
                except socket.timeout:
                    continue
                if _peer_pid(sock) == peer.pid:
                    return cls(sock, me, peer)
                sock.close()  # not our peer: ignore it and keep waiting
        finally:
            server.close()

    @classmethod
    def connect(cls, address: str, me: str, peer: PeerId, timeout_s: float) -> "PairChannel":
        """Connect to the peer's `address`, retrying until it is bound (the trainer side)."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                last_error = e
                time.sleep(0.05)
                continue
            if _peer_pid(sock) != peer.pid:
                sock.close()
                raise PeerError(
                    f"{me}: the pair channel address is held by pid {_peer_pid(sock)}, not by "
                    f"{peer} (pid {peer.pid}); another process squats on it")
            return cls(sock, me, peer)
        raise PeerTimeout(
            f"{me}: could not connect to {peer}'s pair channel within {timeout_s:.0f} s "
            f"({last_error}); the peer may have failed during start-up, see its log")

    # ------------------------------------------------------------------ traffic
    send_timeout_s = 300.0
    """Bound on one send. Sends block only while the peer's receive buffer is full (a large
    message such as the vocabulary plan, or a peer that stopped reading)."""

    def send(self, kind: str, **payload: Any) -> None:
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        # The socket keeps whatever timeout the last receive left (possibly milliseconds).
        self._sock.settimeout(self.send_timeout_s)
        try:
            self._sock.sendall(_HEADER.pack(len(data)) + data)
        except socket.timeout:
            raise PeerTimeout(
                f"{self.me}: {self.peer} did not take our '{kind}' message within "
                f"{self.send_timeout_s:.0f} s (its receive buffer stayed full: frozen, or "
                "not reading the pair channel)") from None
        except (BrokenPipeError, ConnectionResetError) as e:
            self._raise_pending_error()  # the peer may have said why before it left
            raise PeerDied(f"{self.me}: {self.peer} closed the pair channel while we sent "
                           f"'{kind}' ({e}); the peer process died or exited early") from None

    def _raise_pending_error(self) -> None:
        """If the peer's last words before closing were an `error`, raise that instead. The
        ordinary messages it sent before are kept for `recv` (a `stop` may be among them)."""
        unread = []
        try:
            while self.poll():
                message = self._read(time.monotonic() + 1.0, 1.0, "the peer's last message")
                if message[0] == "error":
                    raise PeerReportedError(f"{self.me}: {self.peer} failed: "
                                            f"{message[1]['text']}")
                unread.append(message)
        except (PeerDied, PeerTimeout, OSError, pickle.UnpicklingError):
            pass
        finally:
            self._unread.extend(unread)

    def _read(self, deadline: float, timeout_s: float, waiting_for: str
              ) -> tuple[str, dict[str, Any]]:
        if self._unread:
            return self._unread.pop(0)
        header = self._recv_exact(_HEADER.size, deadline, timeout_s, waiting_for)
        (size,) = _HEADER.unpack(header)
        if size > _MAX_MESSAGE:
            raise PeerError(f"{self.me}: corrupt message header from {self.peer} ({size} bytes)")
        return pickle.loads(self._recv_exact(size, deadline, timeout_s, waiting_for))

    def recv(self, expect: str | tuple[str, ...], timeout_s: float, waiting_for: str
             ) -> tuple[str, dict[str, Any]]:
        """Next message, which must be one of `expect`; "error" from the peer is raised."""
        kind, payload = self._read(time.monotonic() + timeout_s, timeout_s, waiting_for)
        if kind == "error":
            raise PeerReportedError(f"{self.me}: {self.peer} failed: {payload['text']}")
        expected = (expect,) if isinstance(expect, str) else expect
        if kind not in expected:
            raise PeerError(f"{self.me}: protocol error: got '{kind}' from {self.peer} while "
                            f"waiting for {waiting_for} (expected {' or '.join(expected)})")
        return kind, payload

    def poll(self) -> bool:
        """True when a message (or EOF) is ready to read without blocking."""
        if self._unread:
            return True
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def report_error(self, text: str) -> None:
        """Tell the peer why we are failing; best effort (the peer may already be gone)."""
        try:
            self.send("error", text=text)
        except (PeerError, OSError):
            pass

    def _recv_exact(self, n: int, deadline: float, timeout_s: float, waiting_for: str) -> bytes:
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerTimeout(
                    f"{self.me}: no answer from {self.peer} within {timeout_s:.1f} s while waiting "
                    f"for {waiting_for}; the peer is alive but not responding (frozen, or slower "
                    "than the timeout: raise run.timeout_s / --timeout if that is expected)")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(min(n - got, 1 << 20))
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise PeerDied(
                    f"{self.me}: {self.peer} closed the pair channel while we waited for "
                    f"{waiting_for}; the peer process died or exited early (see its log)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass


def pair_address(job_token: str, pair_index: int) -> str:
    """Abstract-namespace socket name: nothing on disk to clean up after a crash."""
    return f"\0colocate-{job_token}-pair{pair_index}-{os.getuid()}"
