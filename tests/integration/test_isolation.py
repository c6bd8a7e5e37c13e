"""Nobody else on the node gets into a job: a process of another user (a real child process
switched to uid/gid 65534) cannot join a pair channel, open a ring slot or enter the job's
MPS pipe directory, and a same-user process that is not the peer is refused by the channel.
Acting as another user needs root (CI runs as root); elsewhere these tests skip."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from colocate import mps, mps_daemon
from colocate.transport.channel import PairChannel, PeerId
from colocate.transport.slots import ShmSlots

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def as_user(uid: int | None, action) -> str:
    """`action()` in a forked child switched to `uid` (None: stays us); returns what it
    returned, or the name of the exception it raised. (Forked, not exec'd: this Python
    may live where the other user cannot read it.)"""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            try:
                result = str(action())
            except Exception as e:  # noqa: BLE001 - reported to the parent
                result = type(e).__name__
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return result


def intrude(address: str):
    """Connect to a pair channel, send a frame header, read what comes back."""
    def action():
        deadline = time.monotonic() + 20
        while True:  # until the engine side has bound the address
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(address)
                break
            except ConnectionRefusedError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.settimeout(20)
        try:
            s.sendall(b"\0" * 8)
            data = s.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"  # before or after our frame arrived
        return "closed" if not data else f"got {len(data)} bytes"
    return action


@pytest.mark.parametrize("uid", [NOBODY, None], ids=["another-user", "same-user-not-peer"])
def test_the_pair_channel_takes_only_its_peer(uid):
    if uid is not None and os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    address = f"\0colocate-test-isolation-{os.getpid()}-{uid}"
    me = PeerId("trainer", 0, os.getpid())  # the peer the engine expects: this process
    accepted = {}

    def engine():
        accepted["channel"] = PairChannel.listen(address, "engine rank 1", me, timeout_s=60)

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        # It reaches the socket (abstract addresses have no permissions) and is closed
        # without a byte: the listener checked its pid and kept waiting.
        assert as_user(uid, intrude(address)) == "closed"
        assert thread.is_alive()
        ours = PairChannel.connect(address, "trainer rank 0", PeerId("engine", 1, os.getpid()),
                                   timeout_s=30)
        thread.join(30)
        accepted["channel"].send("hello", n=1)
        assert ours.recv("hello", 10, "the greeting") == ("hello", {"n": 1})
    finally:
        thread.join(60)


@needs_root
def test_another_user_cannot_open_a_ring_slot():
    slots = ShmSlots.create(2, 4096, f"colocate-test-isolation-{os.getpid()}")
    try:
        path = slots.export()["paths"][0]
        assert as_user(NOBODY, lambda: open(path, "r+b").close()) == "PermissionError"
        assert as_user(None, lambda: open(path, "r+b").close()) == "None"  # the same user may
    finally:
        slots.close()


@needs_root
def test_another_user_cannot_enter_the_mps_pipe_dir_nor_plant_one():
    shared = tempfile.mkdtemp(prefix="colocate-test-isolation-", dir="/tmp")
    try:
        os.chmod(shared, 0o1777)  # like /tmp itself: everybody may pass and create
        assert as_user(NOBODY, lambda: os.listdir(shared)) == "[]"  # the way in is open
        pipe = os.path.join(shared, "colocate-mps-job", "pipe")
        mps_daemon.make_private_dir(pipe)
        assert as_user(NOBODY, lambda: os.listdir(os.path.dirname(pipe))) == "['pipe']"
        assert as_user(NOBODY, lambda: os.listdir(pipe)) == "PermissionError"
        # A directory another user created first (to reach the daemon through) is refused.
        planted = os.path.join(shared, "colocate-mps-other", "pipe")
        assert as_user(NOBODY, lambda: (os.makedirs(planted), os.chmod(planted, 0o777))) == \
            "(None, None)"
        with pytest.raises(mps.MpsError, match=r"not private to this user \(owner uid 65534"):
            mps_daemon.make_private_dir(planted)
    finally:
        shutil.rmtree(shared)
