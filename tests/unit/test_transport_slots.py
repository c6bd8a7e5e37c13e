"""Shared-memory slots: nothing is left in /dev/shm when creating them fails half-way."""

import os
import secrets

import pytest

from colocate.transport.slots import ShmSlots


def test_failed_create_removes_the_slots_it_made():
    name = f"colocate-test-{secrets.token_hex(4)}"
    probe = ShmSlots.create(1, 4096, name + "-probe")  # where the backend puts its files
    root = os.path.dirname(probe.export()["paths"][0])
    probe.close()
    stale = os.path.join(root, f"{name}-slot2")
    with open(stale, "wb"):  # a stale file from an "old job": slot 2 cannot be created
        pass
    try:
        with pytest.raises(FileExistsError):
            ShmSlots.create(3, 4096, name)
        assert not os.path.exists(os.path.join(root, f"{name}-slot0"))
        assert not os.path.exists(os.path.join(root, f"{name}-slot1"))
        assert os.path.exists(stale)  # not ours: left alone
    finally:
        for s in range(3):
            try:
                os.unlink(os.path.join(root, f"{name}-slot{s}"))
            except FileNotFoundError:
                pass
