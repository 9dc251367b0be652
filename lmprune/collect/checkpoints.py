"""Durable files of a collection: the per-process checkpoints and the pointer file that a
killed run resumes from, and the atomic write of a safetensors file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmprune.collect.processes import Processes
from lmprune.core.errors import LmpruneError
from lmprune.core.io import write_json_atomic


class Checkpoints:
    """Per-process state files plus one pointer file; the pointer is replaced atomically only
    after every process has written its state, so any kill leaves a complete checkpoint."""

    def __init__(self, out: Path, procs: Processes, fingerprint: str):
        self.dir = out / ".checkpoint"
        self.procs, self.fingerprint = procs, fingerprint
        self.pointer = self.dir / "checkpoint.json"

    def read(self) -> dict | None:
        if not self.pointer.is_file():
            return None
        info = json.loads(self.pointer.read_text())
        if info.get("fingerprint") != self.fingerprint:
            raise LmpruneError(f"{self.dir.parent} holds an unfinished collection with other "
                               f"settings; rerun that command, or pass --no-resume to start over")
        return info

    def load_state(self, info: dict) -> dict[str, torch.Tensor]:
        return load_file(self.dir / f"{info['tag']}.rank{self.procs.rank}.safetensors")

    def save(self, tag: str, state: dict[str, torch.Tensor], info: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{tag}.rank{self.procs.rank}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
        self.procs.barrier()
        if self.procs.main:
            write_json_atomic(self.pointer, {**info, "tag": tag, "fingerprint": self.fingerprint})
        self.procs.barrier()
        for old in self.dir.glob(f"*.rank{self.procs.rank}.safetensors"):
            if old.name != path.name:
                old.unlink()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
