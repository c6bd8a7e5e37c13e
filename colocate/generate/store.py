"""Where `colocate generate` keeps its work: part files while it runs, OUT.jsonl at the end.

Layout while running (all next to OUT.jsonl)::

    OUT.jsonl.parts/lock                 flock'ed by the one process writing OUT
    OUT.jsonl.parts/run.json             the fingerprint of inputs and settings
    OUT.jsonl.parts/part-<LINE>.jsonl    output lines of the chunk starting at input LINE
    OUT.jsonl.parts/part-<LINE>.json     its meta: the input line range it accounts for
                                         (written, copied and skipped records), its counts

Guarantees:
* No torn line, no duplicate. Every file is written to a temporary name and renamed into
  place (`atomic_write`); the meta is renamed after its .jsonl, so a meta proves a whole
  part. A killed run loses at most the chunk in flight; a rerun skips every input line a
  meta accounts for and redoes the rest, overwriting any .jsonl left without a meta.
* OUT.jsonl is assembled from the parts in input order (written to a temporary name,
  renamed), then OUT.jsonl.summary.json, then the parts are removed. A crash in between
  leaves parts, so a rerun reassembles. A run cut short by --limit keeps its parts, and
  its summary says "complete": false: a later run without --limit goes on from there.
* A rerun against a complete OUT.jsonl with the same fingerprint prints that it is
  complete and exits 0 (--force regenerates). A different fingerprint (other input bytes,
  target tokenizer/config, template or sampling settings) is an error naming --force:
  mixing answers of two setups in one file would be silent corruption.
"""

from __future__ import annotations

import bisect
import fcntl
import glob
import json
import os
import shutil

from colocate.data.cache import atomic_write, atomic_write_json
from colocate.generate.rewrite import MAX_LISTED_SKIPS, ChunkResult, GenerateCounts


class GenerateError(ValueError):
    """A user mistake around `colocate generate`'s output (a mismatched resume, a second
    writer); the message names the file and the fix."""


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class PartStore:
    def __init__(self, out_path: str):
        self.out_path = out_path
        self.dir = f"{out_path}.parts"
        self.summary_path = f"{out_path}.summary.json"
        self._lock_file = None
        self._metas: list[dict] = []
        self._starts: list[int] = []  # first_line of each meta, sorted (for covers())

    # ------------------------------------------------------------------ opening

    def complete_summary(self, key: str) -> dict | None:
        """The summary of a complete OUT for these inputs, if there is one; raises when OUT
        was made from other inputs."""
        summary = _read_json(self.summary_path) if os.path.isfile(self.out_path) else None
        if summary is None:
            return None
        if summary.get("key") != key:
            raise self._mismatch(self.summary_path)
        return summary if summary.get("complete") else None

    def open(self, key: str, settings: dict, *, force: bool) -> None:
        """Take the lock and load finished parts (after clearing everything with `force`)."""
        os.makedirs(self.dir, exist_ok=True)
        self._lock_file = open(os.path.join(self.dir, "lock"), "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GenerateError(f"{self.out_path}: another `colocate generate` is writing it "
                                f"(it holds {self.dir}/lock); wait for it or use another --out"
                                ) from None
        if force:
            for path in glob.glob(os.path.join(self.dir, "part-*")) + [self.out_path,
                                                                       self.summary_path]:
                if os.path.exists(path):
                    os.remove(path)
            if os.path.exists(os.path.join(self.dir, "run.json")):
                os.remove(os.path.join(self.dir, "run.json"))
        run = _read_json(os.path.join(self.dir, "run.json"))
        if run is not None and run.get("key") != key:
            raise self._mismatch(os.path.join(self.dir, "run.json"))
        summary = _read_json(self.summary_path)
        if summary is not None and summary.get("key") != key:
            raise self._mismatch(self.summary_path)
        atomic_write_json(os.path.join(self.dir, "run.json"), {"key": key, "settings": settings})
        for path in glob.glob(os.path.join(self.dir, "part-*.json")):
            meta = _read_json(path)
            if not os.path.isfile(os.path.join(self.dir, meta["file"])):
                raise GenerateError(f"{path}: its part {meta['file']} is missing; rerun with "
                                    "--force to regenerate everything")
            self._metas.append(meta)
        self._metas.sort(key=lambda m: m["first_line"])
        self._starts = [m["first_line"] for m in self._metas]

    def _mismatch(self, path: str) -> GenerateError:
        return GenerateError(f"{self.out_path}: {path} was made from other inputs or settings "
                             "(data bytes, target tokenizer/config, target.load_format/dtype, "
                             "generate.engine, chat template, "
                             "generate.max_new_tokens/temperature/top_p/thinking); pass --force "
                             "to regenerate it, or choose another --out")

    # ------------------------------------------------------------------ parts

    def covers(self, line_no: int) -> bool:
        """Whether a finished part accounts for input line `line_no`."""
        i = bisect.bisect_right(self._starts, line_no) - 1
        return i >= 0 and line_no <= self._metas[i]["last_line"]

    def totals(self) -> tuple[GenerateCounts, list[str]]:
        """Counts and first skips over every finished part."""
        counts, skips = GenerateCounts(), []
        for meta in self._metas:
            counts.add(GenerateCounts.from_dict(meta["counts"]))
            skips.extend(meta["skips"])
        return counts, skips[:MAX_LISTED_SKIPS]

    def write(self, result: ChunkResult) -> None:
        name = f"part-{result.first_line:010d}"
        meta = {"first_line": result.first_line, "last_line": result.last_line,
                "file": f"{name}.jsonl", "counts": result.counts.to_dict(),
                "skips": result.skips}
        atomic_write(os.path.join(self.dir, meta["file"]),
                     lambda f: f.write("".join(line + "\n" for line in result.lines)),
                     binary=False)
        atomic_write_json(os.path.join(self.dir, f"{name}.json"), meta)  # last: marks the part whole
        i = bisect.bisect_right(self._starts, result.first_line)
        self._metas.insert(i, meta)
        self._starts.insert(i, result.first_line)

    # ------------------------------------------------------------------ the end

    def assemble(self, summary: dict) -> None:
        """Write OUT.jsonl from the parts, then the summary; drop the parts when complete."""
        for before, after in zip(self._metas, self._metas[1:]):
            assert before["last_line"] < after["first_line"], (before, after)

        def concatenate(f) -> None:
            for meta in self._metas:
                with open(os.path.join(self.dir, meta["file"]), "rb") as part:
                    shutil.copyfileobj(part, f)

        atomic_write(self.out_path, concatenate)
        atomic_write_json(self.summary_path, summary)
        if summary["complete"]:
            shutil.rmtree(self.dir)
        self.close()

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
