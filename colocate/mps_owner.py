"""Who owns an MPS daemon, so that a job that died without cleaning up is cleaned up later.

A job stops the daemon it started at its end (`mps_daemon.stop_daemon`, and an atexit hook), but a
SIGKILLed job (OOM killer, `scancel -s KILL`, a node agent) runs neither, and its daemon
keeps serving a private pipe directory no later job will look at (each job's token differs).
So the job that starts a daemon writes an owner record into its private root:

    <tmp>/colocate-mps-<token>/owner.json
        {"host", "uid", "owner_pid", "owner_started", "daemon_pid", "pipe_dir", "control_bin"}

and the next job that starts a daemon on the node first looks for records of this user on
this host whose owner process is gone (its pid is dead, or now names a process started
later: pids are recycled), stops their daemons (`quit` on the control pipe, then SIGTERM)
and removes their directories. `colocate doctor` lists such records first, then its own
MPS check starts (and so cleans up) like any job.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

RECORD = "owner.json"


@dataclass(frozen=True)
class OwnerRecord:
    path: str  # the record file; its directory is the job's private root
    host: str
    uid: int
    owner_pid: int
    owner_started: float
    daemon_pid: int | None
    pipe_dir: str
    control_bin: str

    @property
    def private_root(self) -> str:
        return os.path.dirname(self.path)

    def owner_alive(self) -> bool:
        try:
            process = psutil.Process(self.owner_pid)
            # A recycled pid belongs to a process started after the owner was recorded.
            return (process.status() != psutil.STATUS_ZOMBIE
                    and abs(process.create_time() - self.owner_started) < 1.0)
        except psutil.Error:
            return False

    def describe(self) -> str:
        return (f"daemon pid {self.daemon_pid} serving {self.pipe_dir}, started by pid "
                f"{self.owner_pid} (gone)")


def write_record(private_root: str, *, daemon_pid: int | None, pipe_dir: str,
                 control_bin: str) -> str:
    """Record this process as the owner of the daemon serving `pipe_dir`."""
    me = psutil.Process()
    data = dict(host=socket.gethostname(), uid=os.getuid(), owner_pid=me.pid,
                owner_started=me.create_time(), daemon_pid=daemon_pid, pipe_dir=pipe_dir,
                control_bin=control_bin)
    path = os.path.join(private_root, RECORD)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # a reader never sees half a record
    return path


def read_records(tmp_dir: str | None = None) -> list[OwnerRecord]:
    """Owner records of this user on this host (unreadable ones are skipped)."""
    pattern = os.path.join(tmp_dir or tempfile.gettempdir(), "colocate-mps-*", RECORD)
    out = []
    for path in glob.glob(pattern):
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(path) as f:
                record = OwnerRecord(path=path, **json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if record.host == socket.gethostname() and record.uid == os.getuid():
            out.append(record)
    return out


def stale_records(tmp_dir: str | None = None) -> list[OwnerRecord]:
    """Records whose owner is gone: their daemons (if still running) belong to nobody."""
    return [r for r in read_records(tmp_dir) if not r.owner_alive()]


def stop_stale_daemons(tmp_dir: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """Stop the daemon of every stale record and remove its private root; returns what was
    cleaned, one description each. A daemon that will not stop is reported and kept."""
    from colocate import mps, mps_daemon

    cleaned = []
    for record in stale_records(tmp_dir):
        root = record.private_root
        plan = mps.MpsPlan(mode="required", pipe_dir=record.pipe_dir,
                           log_dir=os.path.join(root, "log"), private_root=root)
        handle = mps_daemon.DaemonHandle(plan, owned=True, control_bin=record.control_bin,
                                         pid=record.daemon_pid)
        if mps_daemon.stop_daemon(handle, timeout_s=timeout_s):  # also removes the private root
            log.warning("mps: stopped a stale daemon left by a job that died: %s",
                        record.describe())
            cleaned.append(record.describe())
    return cleaned
