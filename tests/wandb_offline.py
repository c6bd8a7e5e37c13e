"""Read back what a W&B run wrote offline (RUN_DIR/wandb/offline-run-*/run-ID.wandb).

The file is wandb's append-only record log (LevelDB's log format behind a 7-byte ":W&B"
header: 32 KiB blocks of records, each crc32 (4) + length (2, little endian) + type (1:
full, 2: first, 3: middle, 4: last) + data) holding protobuf `Record`s. wandb no longer
ships a Python reader for it, so the tests carry this one.
"""

from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32768


def _records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a wandb run log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_offline_runs(run_dir: str) -> list[dict]:
    """Every offline W&B run under RUN_DIR/wandb (each process that opened one), in no
    particular order: {id, project, name, config,
    history: [{step, **logged values}]}."""
    runs = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run = {"history": [], "config": {}}
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, project=record.run.project,
                           name=record.run.display_name)
                run["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.config.update})
            elif kind == "history":
                # A key arrives in `key` or, split at its dots, in `nested_key`.
                values = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
                          for i in record.history.item}
                run["history"].append({"step": record.history.step.num, **{
                    k: v for k, v in values.items() if not k.startswith("_")}})
        runs.append(run)
    return runs
