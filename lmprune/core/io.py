"""Files on disk: atomic writes (a reader, or a resumed run, sees the old file or the whole new
one, never half), with the permissions the umask gives; reads that name a corrupt or truncated
file; and the checks an output path passes before any work (created or proven writable, never a
user's own file or folder replaced without --overwrite)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lmprune.core.errors import LmpruneError, first_line

LOCK_FILE = ".lmprune.core.lock"

# What makes a folder an lmprune output of a kind: any one of these names inside it.
OUTPUT_KINDS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("lmprune.json", "lmprune_source.json", "checkpoints", "relearning.json"),
    # what `models.save_model` replaces when called from Python: any saved model folder too
    "model": ("config.json", "lmprune.json", "lmprune_source.json", "checkpoints",
              "relearning.json"),
    "stats": ("manifest.json", ".checkpoint"),
    "run": (".stages", "recipe.yaml"),
}
KIND_NAMES = {"checkpoint": "an lmprune checkpoint", "model": "a saved model folder",
              "stats": "an lmprune collect folder",
              "run": "an lmprune run folder"}


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def chmod_default(path: str | Path, folder: bool = False) -> None:
    """The permissions a plain `open`/`mkdir` would give (mkstemp/mkdtemp give 0600/0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, payload, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=float) + "\n")


def write_jsonl_atomic(path: str | Path, records) -> Path:
    """One JSON object per line, non-ASCII kept as text (model output)."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in records))


def save_figure_atomic(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as PNG (laid out, then closed)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Reads that name the file


def read_json(path: str | Path, fix: str, expect: type | None = dict):
    """A JSON file's content; a corrupt, truncated or wrongly shaped file is named as such, with
    `fix` (what to do) after it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = "empty" if path.stat().st_size == 0 else getattr(err, "msg", None) or str(err)
        raise LmpruneError(f"{path} is corrupt or truncated (not valid JSON: {reason}): "
                           f"{fix}") from err
    if expect is not None and not isinstance(value, expect):
        raise LmpruneError(f"{path}: expected a JSON {'object' if expect is dict else 'list'}, "
                           f"got {type(value).__name__}: {fix}")
    return value


def load_tensors(path: str | Path, fix: str) -> dict:
    """A safetensors file's tensors; a corrupt or truncated file is named as such."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # SafetensorError: bad header, truncated data
        raise LmpruneError(f"{path} is corrupt or truncated ({first_line(err)}): {fix}") from err


def check_safetensors(folder: str | Path) -> None:
    """Refuse a model folder whose safetensors files are corrupt or truncated (headers only)."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as err:
            raise LmpruneError(f"{path} is corrupt or truncated ({first_line(err)}): save the "
                               f"model again") from err


# --------------------------------------------------------------------------------------------
# Output paths, checked before the work


def _ensure_parent(path: Path, flag: str) -> None:
    """Create the folder `path` goes into and prove it can be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lmprune-probe.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LmpruneError(f"{flag} {path}: cannot write into {path.parent} "
                           f"({err.strerror or first_line(err)}): choose another path") from err


def is_output_of(folder: Path, kind: str) -> bool:
    """Whether a folder is empty (but for a lock file) or an lmprune output of this kind."""
    names = {p.name for p in folder.iterdir()} - {LOCK_FILE}
    return not names or bool(names & set(OUTPUT_KINDS[kind]))


def check_out_dir(path: str | Path, kind: str, overwrite: bool = False,
                  flag: str = "--out") -> Path:
    """An output folder: its parent created and writable; an existing file refused always, an
    existing folder that is not empty nor an lmprune output of `kind` unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmpruneError(f"{flag} {path} is a file, and an output folder never replaces a "
                           f"file: choose another path")
    if path.is_dir() and not overwrite and not is_output_of(path, kind):
        raise LmpruneError(f"{flag} {path} exists and is not {KIND_NAMES[kind]}: its files "
                           f"would be replaced; choose another path or pass --overwrite")
    _ensure_parent(path.resolve(), flag)
    return path


def check_out_file(path: str | Path, fmt: str, overwrite: bool = False,
                   flag: str = "--out") -> Path:
    """An output file: its folder created and writable; an existing folder refused always, an
    existing file that is not lmprune JSON of format `fmt` unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise LmpruneError(f"{flag} {path} is a folder: name a file")
    if path.is_file() and not overwrite:
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("format") == fmt
        except (ValueError, AttributeError):
            ours = False
        if not ours:
            raise LmpruneError(f"{flag} {path} exists and is not an lmprune result ({fmt}): "
                               f"choose another path or pass --overwrite")
    _ensure_parent(path.resolve(), flag)
    return path
