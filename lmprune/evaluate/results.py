"""The eval JSON (`lmprune.eval`, docs/formats.md) and its continuations file: one writer (`lmprune
eval`) and one reader for everything that reads results (the gates, run and compare reports,
the like-for-like references)."""

from __future__ import annotations

import json
from pathlib import Path

from lmprune import __version__
from lmprune.core.errors import LmpruneError
from lmprune.core.io import read_json, write_jsonl_atomic, write_text_atomic

FORMAT = "lmprune.eval"
FORMAT_VERSION = 1


def new_result(**fields) -> dict:
    """A result stamped with the format, then the given fields in order."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lmprune_version": __version__,
            **fields}


def records_path(out: Path) -> Path:
    return out.with_name(out.stem + ".continuations.jsonl")


def write_result(out: Path, result: dict, records: list[dict] | None) -> None:
    """The JSON and, with `records`, the per-prompt continuations beside it, atomically."""
    if records is not None:
        side = records_path(out)
        write_jsonl_atomic(side, records)
        result["toxicity"]["records_file"] = side.name
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")


def read_result(path: str | Path, required: bool = False) -> dict | None:
    """An eval JSON: None when the file is missing (or with `required` an error saying so); a
    corrupt file or another format is named either way."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise LmpruneError(f"evaluation not found: {path} (write it with `lmprune eval "
                               f"--json {path}`)")
        return None
    result = read_json(path, "evaluate again to rewrite it")
    if result.get("format") != FORMAT:
        raise LmpruneError(f"{path} is not an lmprune evaluation (format '{FORMAT}')")
    return result


def read_records(eval_json: Path, result: dict) -> list[dict]:
    """The per-prompt records written beside `eval_json` (its `result`), or [] if there are none."""
    name = (result.get("toxicity") or {}).get("records_file")
    path = eval_json.with_name(name) if name else None
    if path is None or not path.is_file():
        return []
    # JSON lines end at "\n" only: model output may hold U+2028 or U+0085, which splitlines() cuts
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
