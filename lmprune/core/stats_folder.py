"""The collected statistics folder (`lmprune.stats`, docs/formats.md): manifest.json,
stats.safetensors, coact.safetensors. `lmprune collect` writes it (lmprune/collect/collector.py);
this is its one reader."""

from __future__ import annotations

from pathlib import Path

from lmprune.core.errors import LmpruneError
from lmprune.core.io import load_tensors, read_json

MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.safetensors"
COACT_FILE = "coact.safetensors"
FILES = (MANIFEST_FILE, STATS_FILE, COACT_FILE)
AGAIN = "collect the statistics again"


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a finished collection, checked."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise LmpruneError(f"{folder} has no {MANIFEST_FILE}: run `lmprune collect --out "
                           f"{folder}`")
    manifest = read_json(path, AGAIN)
    if not isinstance(manifest.get("model"), dict) or not isinstance(manifest.get("corpora"), dict):
        raise LmpruneError(f"{path} is not a collect manifest (no 'model' and 'corpora'): {AGAIN}")
    if not manifest.get("complete", False):
        raise LmpruneError(f"{folder} holds an unfinished collection: rerun the same "
                           f"`lmprune collect` command to resume it")
    return manifest


def read_tensors(folder: str | Path, name: str) -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise LmpruneError(f"{folder} has no {name}: the collection is incomplete ({AGAIN})")
    return load_tensors(path, AGAIN)


def read_stats(folder: str | Path) -> tuple[dict, dict, dict]:
    """(manifest, per-neuron stats, co-activation stats) of a collect output folder."""
    manifest = read_manifest(folder)
    return manifest, read_tensors(folder, STATS_FILE), read_tensors(folder, COACT_FILE)
