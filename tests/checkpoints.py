"""A tiny checkpoint folder as `lmprune prune` writes it (docs/formats.md), for card/push tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tiny_models import save_tiny


def lineage(base_model: dict | None = None, **extra) -> dict:
    record = {
        "format": "lmprune.checkpoint", "format_version": 1, "lmprune_version": "0.1.0",
        "base_model": base_model or {"name": "smollm2-135m", "kind": "bundled",
                                     "model_type": "llama", "weights_sha256": "ab" * 32},
        "mode": "modules",
        "pruned_neurons": {"0": [1, 5, 7], "1": [2]},
        "modules": {"path": "runs/modules.json", "sha256": "cd" * 32, "ids": [0, 3]},
        "command": "lmprune prune smollm2-135m --modules runs/modules.json --select top:2",
        "history": [
            {"stage": "prune", "select": "top:2", "offensive": "paradetox:toxic",
             "clean": "paradetox:neutral"},
            {"stage": "finetune", "steps": 200, "corpus": "wikitext2:valid", "lr": 1e-5},
        ],
    }
    record.update(extra)
    return record


def tiny_checkpoint(folder: Path, model_type: str = "llama", **lineage_fields) -> Path:
    save_tiny(model_type, folder)
    (folder / "lmprune.json").write_text(json.dumps(lineage(**lineage_fields), indent=2))
    return folder


def pruned_base_pair(root: Path, pruned: dict[int, list[int]], model_type: str = "gpt2") -> None:
    """`root/base` (a tiny random model) and `root/pruned`: it with `pruned` zeroed, as `lmprune
    prune` leaves it (the lineage names `root/base` as its base model)."""
    from lmprune.core.masks import PruneMask
    from lmprune.core.models import load_model, save_model

    save_tiny(model_type, root / "base")
    base = load_model(str(root / "base"), dtype="float32")
    PruneMask(base.model, pruned).apply(base.model)
    meta = {"format": "lmprune.checkpoint", "format_version": 1, "base_model": base.identity,
            "mode": "modules", "pruned_neurons": {str(k): v for k, v in pruned.items()},
            "history": [{"stage": "prune"}]}
    save_model(base.model, base.tokenizer, root / "pruned", extra_files={"lmprune.json": meta})


def randomly_pruned(folder: Path, neurons: dict[int, list[int]]) -> Path:
    """A tiny LLaMA with `neurons` zeroed and a lineage that says so (mode random), as the input
    of a later stage whose zeros must survive it."""
    from tiny_models import tiny_model, tiny_tokenizer, zero_neurons

    from lmprune.core.models import save_model

    model = tiny_model("llama")
    zero_neurons(model, neurons)
    lineage = {"format": "lmprune.checkpoint", "format_version": 1, "mode": "random",
               "base_model": {"name": "tiny", "kind": "folder", "model_type": "llama"},
               "pruned_neurons": {str(k): v for k, v in neurons.items()},
               "history": [{"stage": "prune", "mode": "random"}]}
    save_model(model, tiny_tokenizer(), folder, extra_files={"lmprune.json": lineage})
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (files and folders) -> sha256 of its bytes ("dir" for folders)."""
    return {p.relative_to(folder).as_posix():
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}
