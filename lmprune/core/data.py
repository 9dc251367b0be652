"""Corpora: local txt/jsonl/tsv/csv, Hugging Face datasets, and named shortcuts.

A corpus spec is `SOURCE[?key=value&...]`:

    paradetox:toxic                         named shortcut (see NAMED)
    data/train.txt                          a document per line
    data/train.txt?split=blank              documents separated by blank lines
    prompts.jsonl?field=prompt.text         a (dotted) field of each JSON line
    pairs.tsv?column=toxic                  a column of a tsv/csv file with a header row
    hf:allenai/real-toxicity-prompts?split=train&column=prompt.text&where=challenging
    hf:Salesforce/wikitext:wikitext-2-v1?split=test&column=text
    wikitext2:valid + paradetox:neutral     a mix: the documents of each part, in order

Paired texts (`load_pairs`: an offensive text and its clean rewrite, kept aligned) take a spec
`SOURCE?offensive=COL&clean=COL` over a tsv/csv file (columns), a jsonl file (dotted fields) or
`hf:ID[:CONFIG]` (with `split=`), or a named shortcut of NAMED_PAIRS (`paradetox`).

Named shortcuts read `$LMPRUNE_DATA_DIR` when it is set and the Hub otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from lmprune.core.errors import LmpruneError

# name -> (local file spec under LMPRUNE_DATA_DIR, Hub spec)
NAMED: dict[str, tuple[str, str]] = {
    "paradetox:toxic": ("paradetox.tsv?column=toxic",
                        "hf:s-nlp/paradetox?split=train&column=en_toxic_comment"),
    "paradetox:neutral": ("paradetox.tsv?column=neutral1",
                          "hf:s-nlp/paradetox?split=train&column=en_neutral_comment"),
    "rtp:challenging": (
        "rtp_challenging_dev.jsonl?field=prompt.text",
        "hf:allenai/real-toxicity-prompts?split=train&column=prompt.text&where=challenging",
    ),
    "rtp:nontoxic": (
        "rtp_nontoxic.jsonl?field=prompt.text",
        "hf:allenai/real-toxicity-prompts?split=train&column=prompt.text&where=!challenging",
    ),
    "wikitext2:valid": ("wikitext2_valid.txt",
                        "hf:Salesforce/wikitext:wikitext-2-v1?split=validation&column=text"),
    "wikitext2:test": ("wikitext2_test.txt",
                       "hf:Salesforce/wikitext:wikitext-2-v1?split=test&column=text"),
}
# name -> (local file spec under LMPRUNE_DATA_DIR, Hub spec) of paired texts
NAMED_PAIRS: dict[str, tuple[str, str]] = {
    "paradetox": ("paradetox.tsv?offensive=toxic&clean=neutral1",
                  "hf:s-nlp/paradetox?split=train&offensive=en_toxic_comment"
                  "&clean=en_neutral_comment"),
}
_OPTIONS = {"split", "field", "column", "where", "keep_empty"}
_PAIR_OPTIONS = {"split", "offensive", "clean"}
MIX = " + "


@dataclass
class Corpus:
    """Documents read from one spec, in file order."""

    spec: str
    """What the user asked for."""
    resolved: str
    """The file or dataset it was read from."""
    texts: list[str]

    @property
    def sha256(self) -> str:
        """Content hash of the documents (independent of the file format)."""
        return texts_sha256(self.texts)

    def describe(self) -> dict:
        return {"spec": self.spec, "resolved": self.resolved, "documents": len(self.texts),
                "sha256": self.sha256}


def texts_sha256(texts: list[str]) -> str:
    """Hash of a list of texts, each followed by a NUL byte."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def data_dir() -> Path | None:
    value = os.environ.get("LMPRUNE_DATA_DIR")
    return Path(value) if value else None


def resolve_spec(spec: str) -> str:
    """Turn a named shortcut into a file or Hub spec; other specs pass through."""
    name, _, query = spec.partition("?")
    named = NAMED.get(name) or NAMED_PAIRS.get(name)
    if named is None:
        return spec
    local, hub = named
    folder = data_dir()
    base = str(folder / local) if folder is not None else hub
    return f"{base}&{query}" if query else base


def _parse(spec: str, known: set[str] = _OPTIONS, what: str = "corpus"
           ) -> tuple[str, dict[str, str]]:
    source, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - known
    if unknown:
        raise LmpruneError(f"{what} '{spec}': unknown option(s) {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(sorted(known))}")
    return source, options


def dotted_get(record, path: str):
    for key in path.split("."):
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def mix_parts(spec: str) -> list[str]:
    """The specs a mix `A + B` joins (one for a plain spec)."""
    return [part.strip() for part in spec.split(MIX)]


def load_corpus(spec: str, limit: int | None = None) -> Corpus:
    """Read the documents of `spec` (the first `limit` of them, if given)."""
    parts = mix_parts(spec)
    if len(parts) > 1:
        loaded = [load_corpus(part) for part in parts]
        texts = [t for corpus in loaded for t in corpus.texts][:limit]
        return Corpus(spec, MIX.join(c.resolved for c in loaded), texts)
    resolved = resolve_spec(spec)
    source, options = _parse(resolved)
    if source.startswith("hf:"):
        texts = _read_hub(source[3:], options, spec)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            hint = (" (set LMPRUNE_DATA_DIR to the folder of the shared data sets)"
                    if spec.split("?")[0] in NAMED else "")
            raise LmpruneError(f"corpus file not found: {path}{hint}")
        try:
            texts = _read_file(path, options, spec)
        except UnicodeDecodeError as err:
            raise LmpruneError(f"corpus {path} is not UTF-8 text ({err.reason})") from err
    if options.get("keep_empty") != "1":
        texts = [t for t in texts if t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise LmpruneError(f"corpus '{spec}' ({resolved}) has no documents")
    return Corpus(spec, resolved, texts)


def _read_file(path: Path, options: dict, spec: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, options.get("field", "text"), spec)
    if suffix in {".tsv", ".csv"}:
        return _read_table(path, options.get("column", "text"), "\t" if suffix == ".tsv" else ",",
                           spec)
    text = path.read_text(encoding="utf-8")
    if options.get("split") == "blank":
        return [doc.strip() for doc in text.split("\n\n")]
    return [line.strip() for line in text.splitlines()]


def json_lines(path: Path):
    """(line number, record) of each non-blank line of a JSON lines file; a line that is not
    JSON is named."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise LmpruneError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err


def _read_jsonl(path: Path, field: str, spec: str) -> list[str]:
    texts = []
    for lineno, record in json_lines(path):
        value = dotted_get(record, field)
        if not isinstance(value, str):
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise LmpruneError(f"corpus '{spec}': line {lineno} of {path} has no text field "
                               f"'{field}' (its keys: {keys}); choose one with ?field=NAME")
        texts.append(value)
    return texts


def _read_table(path: Path, column: str, delimiter: str, spec: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise LmpruneError(f"corpus '{spec}': {path} has no column '{column}' (columns: "
                               f"{', '.join(reader.fieldnames or [])}); choose one with ?column=")
        return [row[column] or "" for row in reader]


def _hub_split(dataset: str, options: dict):
    """One split (`split=`, default train) of a Hugging Face dataset `ID[:CONFIG]`."""
    import datasets

    name, _, config = dataset.partition(":")
    split = options.get("split", "train")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # network, auth, missing config: all reported the same way
        raise LmpruneError(f"cannot load dataset '{dataset}' split '{split}' ({err}); offline, "
                           f"set LMPRUNE_DATA_DIR or use a local file") from err


def _read_hub(dataset: str, options: dict, spec: str) -> list[str]:
    """A Hugging Face dataset: `ID[:CONFIG]`, split, column (dotted), optional boolean filter."""
    ds = _hub_split(dataset, options)
    column = options.get("column", "text")
    top = column.split(".")[0]
    if top not in ds.column_names:
        raise LmpruneError(f"corpus '{spec}': dataset has no column '{top}' (columns: "
                           f"{', '.join(ds.column_names)})")
    where = options.get("where")
    texts = []
    for record in ds:
        if where:
            want = not where.startswith("!")
            if bool(record.get(where.lstrip("!"))) != want:
                continue
        value = dotted_get(record, column)
        texts.append(value if isinstance(value, str) else "")
    return texts


# --------------------------------------------------------------------------------------------
# Paired texts


@dataclass
class Pairs:
    """Aligned texts: `offensive[i]` and its clean rewrite `clean[i]`, in file order."""

    spec: str
    resolved: str
    offensive: list[str]
    clean: list[str]
    dropped: int = 0
    """Pairs left out because one side was empty (dropping both sides keeps them aligned)."""

    def __len__(self) -> int:
        return len(self.offensive)

    def sample(self, n: int, seed: int) -> Pairs:
        """`n` pairs drawn without replacement (seeded), kept in file order; all when fewer."""
        if n >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return Pairs(self.spec, self.resolved, [self.offensive[i] for i in keep],
                     [self.clean[i] for i in keep], self.dropped)

    def describe(self) -> dict:
        return {"spec": self.spec, "resolved": self.resolved, "pairs": len(self),
                "dropped_empty": self.dropped,
                "sha256": {"offensive": texts_sha256(self.offensive),
                           "clean": texts_sha256(self.clean)}}


def load_pairs(spec: str) -> Pairs:
    """Read the (offensive, clean) pairs of `spec`; a pair with an empty side is left out."""
    resolved = resolve_spec(spec)
    source, options = _parse(resolved, _PAIR_OPTIONS, "pairs")
    columns = (options.get("offensive", "offensive"), options.get("clean", "clean"))
    if source.startswith("hf:"):
        rows = _hub_pairs(source[3:], options, columns, spec)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            hint = (" (set LMPRUNE_DATA_DIR to the folder of the shared data sets)"
                    if spec.split("?")[0] in NAMED_PAIRS else "")
            raise LmpruneError(f"pairs file not found: {path}{hint}")
        try:
            rows = _file_pairs(path, columns, spec)
        except UnicodeDecodeError as err:
            raise LmpruneError(f"pairs {path} is not UTF-8 text ({err.reason})") from err
    kept = [(o, c) for o, c in rows if o.strip() and c.strip()]
    if not kept:
        raise LmpruneError(f"pairs '{spec}' ({resolved}) has no pair with both texts")
    return Pairs(spec, resolved, [o for o, _ in kept], [c for _, c in kept],
                 len(rows) - len(kept))


def _file_pairs(path: Path, columns: tuple[str, str], spec: str) -> list[tuple[str, str]]:
    suffix = path.suffix.lower()
    choose = "choose them with ?offensive=NAME&clean=NAME"
    if suffix in {".tsv", ".csv"}:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise LmpruneError(f"pairs '{spec}': {path} has no column '{missing[0]}' "
                                   f"(columns: {', '.join(reader.fieldnames or [])}); {choose}")
            return [(row[columns[0]] or "", row[columns[1]] or "") for row in reader]
    if suffix == ".jsonl":
        rows = []
        for lineno, record in json_lines(path):
            values = [dotted_get(record, c) for c in columns]
            missing = [c for c, v in zip(columns, values, strict=True) if not isinstance(v, str)]
            if missing:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise LmpruneError(f"pairs '{spec}': line {lineno} of {path} has no text field "
                                   f"'{missing[0]}' (its keys: {keys}); {choose}")
            rows.append((values[0], values[1]))
        return rows
    raise LmpruneError(f"pairs '{spec}': {path} is not a .tsv, .csv or .jsonl file (pairs need "
                       f"two named columns)")


def _hub_pairs(dataset: str, options: dict, columns: tuple[str, str], spec: str
               ) -> list[tuple[str, str]]:
    ds = _hub_split(dataset, options)
    missing = [c for c in columns if c.split(".")[0] not in ds.column_names]
    if missing:
        raise LmpruneError(f"pairs '{spec}': dataset has no column '{missing[0]}' (columns: "
                           f"{', '.join(ds.column_names)}); choose them with "
                           f"?offensive=NAME&clean=NAME")
    values = [[dotted_get(record, c) for c in columns] for record in ds]
    return [tuple(v if isinstance(v, str) else "" for v in pair) for pair in values]
