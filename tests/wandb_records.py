"""Reading an offline W&B run back in tests: the records of its ``run-<id>.wandb`` file.

An offline run keeps its history, summary and config only in that file (``files/`` gets the media, not
``wandb-summary.json``), and wandb no longer ships a Python reader for it. The file is a LevelDB-style log: a 7-byte
header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (checksum, length, type:
1 full, 2 first, 3 middle, 4 last); a chunk header never straddles a block. The payloads are wandb's own protobuf
``Record`` messages, parsed with wandb's own classes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + HEADER])
        pos += HEADER
        if kind == 0:  # zero-filled rest of a block
            pos += left - HEADER
            continue
        pending += data[pos: pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """History rows, the final summary and the config of one offline run, values decoded from JSON."""

    directory: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, wandb_dir: Path) -> OfflineRun:
        (directory,) = sorted(Path(wandb_dir).glob("offline-run-*"))
        (file,) = directory.glob("run-*.wandb")
        run = cls(directory)
        for record in records(file):
            which = record.WhichOneof("record_type")
            if which == "history":
                run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif which == "summary":
                run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif which == "config":
                run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        return run
