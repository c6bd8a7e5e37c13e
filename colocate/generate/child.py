"""A `Generator` that runs in a child process of its own.

Online decode on an sglang engine rank needs a second sglang model (an offline `Engine`,
which batches decoding continuously) beside the in-process ModelRunner that prefills for
the trainer. sglang publishes process-wide runtime settings when either starts
(`sglang.srt.runtime_context`), so the two must not share a process: the Engine is built
and driven in a spawned child, and the engine rank talks to it over a pipe (token ids in,
token ids out; a few kilobytes per chunk). The child inherits the rank's environment (the
node's MPS pipe and thread share) like every process the job starts, less torchrun's
variables: sglang's scheduler initialises torch.distributed with a `tcp://` address of its
own, and under TORCHELASTIC_USE_AGENT_STORE torch would instead wait, as a client, for a
store that torchrun's agent never started there (a hang, seen on an H200).

Every wait is bounded and names the child; the child exits when the pipe closes (its
parent is gone) or on "close".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Callable

from colocate.generate.engines import Generation


def _leave_the_job() -> None:
    """The answering engine is no worker of the job."""
    from colocate.topology import is_launcher_var

    for name in [name for name in os.environ if is_launcher_var(name)]:
        del os.environ[name]


def _serve(conn, factory: Callable, kwargs: dict) -> None:
    _leave_the_job()  # before anything (sglang's processes) inherits the environment
    try:
        generator = factory(**kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", generator.name))
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:  # the parent is gone
                return
            if request[0] == "close":
                return
            _, prompts, seeds, limits = request
            try:
                replies = generator.generate(prompts, seeds, None, limits)
                conn.send(("ok", [(g.ids, g.finish_reason) for g in replies]))
            except BaseException:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
    finally:
        generator.close()


class ChildGenerator:
    """`factory(**kwargs)` (picklable) builds the real generator in the child."""

    def __init__(self, factory: Callable, kwargs: dict, *, timeout_s: float, who: str):
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA state
        self._conn, child_end = ctx.Pipe()
        # Not daemonic: the sglang Engine starts processes of its own.
        self._proc = ctx.Process(target=_serve, args=(child_end, factory, kwargs),
                                 name="colocate-decode-engine")
        self._proc.start()
        child_end.close()
        self.timeout_s = timeout_s
        self.who = f"{who}'s answering engine (pid {self._proc.pid})"
        self.name = self._reply("start")[0]

    def _reply(self, what: str):
        if not self._conn.poll(self.timeout_s):
            self.close()
            raise TimeoutError(f"{self.who}: no answer to {what} within {self.timeout_s:.0f} s; "
                               "raise run.startup_timeout_s, or lower generate.chunk_records")
        try:
            kind, *payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            code = self._proc.exitcode
            raise RuntimeError(f"{self.who} died during {what} (exit code {code})") from None
        if kind == "error":
            raise RuntimeError(f"{self.who} failed during {what}:\n{payload[0]}")
        return payload

    def generate(self, prompts: list[list[int]], seeds: list[int], on_batch=None,
                 max_new_tokens: list[int] | None = None) -> list[Generation]:
        self._conn.send(("generate", prompts, seeds, max_new_tokens))
        replies = [Generation(ids, reason) for ids, reason in self._reply("generate")[0]]
        if on_batch is not None:
            on_batch(len(replies), sum(len(g.ids) for g in replies))
        return replies

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close",))
            except OSError:
                pass
            self._proc.join(60)  # the Engine's shutdown stops its own processes
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._conn.close()
