"""The built-in toxicity scorers: profanity_check, detoxify and hf (any sequence classifier),
registered in lmprune/evaluate/registry.py (which also lists their names and options)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from lmprune.core.errors import LmpruneError
from lmprune.evaluate.registry import Scorer, package_version, register_scorer

_TOXIC_WORDS = ("toxic", "offensive", "hate", "abusive", "insult", "profan")


class ProfanityCheckScorer(Scorer):
    """alt-profanity-check's `predict_prob`: its model ships inside the wheel."""

    def __init__(self, batch_size: int = 1024):
        try:
            import profanity_check
        except ImportError as err:
            raise LmpruneError("scorer profanity_check needs alt-profanity-check: "
                               "pip install alt-profanity-check") from err
        self._predict_prob = profanity_check.predict_prob
        version = package_version("alt-profanity-check")
        super().__init__(f"profanity_check (alt-profanity-check {version})", batch_size)

    def _score_batch(self, texts):
        return self._predict_prob(texts).tolist()


@register_scorer("profanity_check", "profanity_check")
def _load_profanity_check(target: str, device: str, options: dict) -> ProfanityCheckScorer:
    return ProfanityCheckScorer(int(options.pop("batch_size", 1024)))


class ClassifierScorer(Scorer):
    """A transformers sequence classifier: probability of one label (softmax, or sigmoid for
    multi-label models)."""

    def __init__(self, name: str, model, tokenizer, label_index: int, multi_label: bool,
                 device: str, batch_size: int, max_length: int, details: dict):
        super().__init__(name, batch_size)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.label_index = label_index
        self.multi_label = multi_label
        self.device = device
        self.max_length = max_length
        self.details = details

    @torch.inference_mode()
    def _score_batch(self, texts):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        logits = self.model(**enc).logits.float()  # [batch, labels]
        probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        return probs[:, self.label_index].cpu().tolist()

    def describe(self) -> dict:
        return {"name": self.name, **self.details}


def _pick_label(id2label: dict, wanted: str | None, where: str) -> tuple[int, str]:
    """The index of the label to score: the one asked for, a toxic-sounding one, else 1."""
    labels = {int(i): str(name) for i, name in id2label.items()}
    if wanted is not None:
        for i, name in labels.items():
            if name.lower() == wanted.lower() or str(i) == wanted:
                return i, name
        raise LmpruneError(f"{where} has no label '{wanted}' (labels: "
                           f"{', '.join(labels[i] for i in sorted(labels))}); choose one with "
                           f"?label=NAME")
    for i in sorted(labels):
        if any(word in labels[i].lower() for word in _TOXIC_WORDS) and \
                not labels[i].lower().startswith(("non", "not")):
            return i, labels[i]
    if len(labels) < 2:
        raise LmpruneError(f"{where} has a single label; name the one to score with ?label=NAME")
    return 1, labels[1]


def _detoxify_checkpoint(variant: str, options: dict) -> tuple[dict, str]:
    """(checkpoint dict, where it came from) for a Detoxify variant name or a local file."""
    import detoxify.detoxify as dx

    trust = options.pop("trust_checkpoint", "0") == "1"
    path = Path(variant).expanduser()
    if path.suffix == ".ckpt" or path.exists():
        if not path.is_file():
            raise LmpruneError(f"detoxify checkpoint not found: {path}")
        where, load = str(path), lambda: torch.load(path, map_location="cpu",
                                                     weights_only=not trust)
    elif variant in dx.MODEL_URLS:
        url = dx.MODEL_URLS[variant]
        where = url
        load = lambda: torch.hub.load_state_dict_from_url(  # noqa: E731
            url, map_location="cpu", weights_only=not trust)
    else:
        raise LmpruneError(f"detoxify model '{variant}' unknown: use one of "
                           f"{', '.join(dx.MODEL_URLS)} or a local .ckpt file")
    try:
        checkpoint = load()
    except pickle.UnpicklingError as err:
        raise LmpruneError(f"detoxify checkpoint {where} holds Python objects besides tensors; "
                           f"lmprune loads weights only. If you trust the file, add "
                           f"?trust_checkpoint=1") from err
    except Exception as err:  # download refused offline, corrupt file: said the same way
        raise LmpruneError(
            f"detoxify:{variant} cannot load its checkpoint from {where} "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
            f"offline, use a local checkpoint and config folder: "
            f"detoxify:/path/model.ckpt?config=/path/hf_config_folder") from err
    if not isinstance(checkpoint, dict) or "config" not in checkpoint \
            or "state_dict" not in checkpoint:
        raise LmpruneError(f"{where} is not a Detoxify checkpoint: it needs 'config' (the "
                           f"training config) and 'state_dict'")
    return checkpoint, where


@register_scorer("detoxify", "detoxify[:VARIANT|:CKPT?config=DIR]", target=True)
def _load_detoxify(variant: str, device: str, options: dict) -> ClassifierScorer:
    """Detoxify's checkpoint format, loaded as detoxify does, but with weights_only=True.

    The checkpoint holds `config.arch.args` (model_type: the base Hub model, model_name: the
    transformers class, tokenizer_name, num_classes), `config.dataset.args.classes` and the
    `state_dict`; `config=FOLDER` is detoxify's `huggingface_config_path`: the config and
    tokenizer files read instead of the base model's, so it loads offline.
    """
    import transformers

    variant = variant or "original"
    checkpoint, where = _detoxify_checkpoint(variant, options)
    try:
        arch = checkpoint["config"]["arch"]["args"]
        classes = list(checkpoint["config"]["dataset"]["args"]["classes"])
        model_class = getattr(transformers, arch["model_name"])
        tokenizer_class = getattr(transformers, arch["tokenizer_name"])
    except (KeyError, TypeError, AttributeError) as err:
        raise LmpruneError(f"{where}: not in Detoxify's checkpoint format ({err})") from err
    # Detoxify renames these classes so that every variant reports "toxicity".
    renamed = {"toxic": "toxicity", "identity_hate": "identity_attack",
               "severe_toxic": "severe_toxicity"}
    classes = [renamed.get(c, c) for c in classes]
    config_folder = options.pop("config", None)
    source = config_folder or arch["model_type"]
    try:
        config = model_class.config_class.from_pretrained(
            source, num_labels=arch["num_classes"], local_files_only=config_folder is not None)
        tokenizer = tokenizer_class.from_pretrained(source,
                                                    local_files_only=config_folder is not None)
    except (OSError, ValueError) as err:
        raise LmpruneError(
            f"detoxify:{variant} needs the config and tokenizer of '{source}' "
            f"({str(err).strip().splitlines()[0]}); offline, pass a local folder with "
            f"config.json and tokenizer files: detoxify:PATH.ckpt?config=FOLDER") from err
    model = model_class(config)
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise LmpruneError(f"{where} does not fit {arch['model_name']} with the config of "
                           f"'{source}' (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wanted = options.pop("label", "toxicity")
    if wanted not in classes:
        raise LmpruneError(f"detoxify:{variant} has no class '{wanted}' (classes: "
                           f"{', '.join(classes)})")
    if Path(variant).expanduser().is_file():
        from lmprune.core.models import file_sha256

        version = f"checkpoint sha256 {file_sha256(Path(variant).expanduser())[:12]}"
    else:
        version = Path(where).name
    name = f"detoxify:{variant} ({wanted}, detoxify {package_version('detoxify')}, {version})"
    details = {"checkpoint": where, "config": source, "label": wanted, "classes": classes,
               "version": version}
    # Detoxify scores every class with a sigmoid (multi-label).
    return ClassifierScorer(name, model, tokenizer, classes.index(wanted), True, device,
                            int(options.pop("batch_size", 64)),
                            int(options.pop("max_length", 512)), details)


@register_scorer("hf", "hf:MODEL[?label=NAME]", target=True)
def _load_hf(target: str, device: str, options: dict) -> ClassifierScorer:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not target:
        raise LmpruneError("scorer hf: needs a model, e.g. hf:s-nlp/roberta_toxicity_classifier")

    revision = options.pop("revision", None)
    local = Path(target).expanduser()
    source = str(local) if local.is_dir() else target
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise LmpruneError(
            f"scorer hf:{target} cannot load ({str(err).strip().splitlines()[0]}); it needs a "
            f"sequence-classification model: a local folder (config.json, weights, tokenizer) "
            f"or a Hub id reachable online or already in the Hugging Face cache") from err
    index, label = _pick_label(model.config.id2label, options.pop("label", None), f"hf:{target}")
    multi = model.config.problem_type == "multi_label_classification"
    if local.is_dir():
        from lmprune.core.models import folder_weights_sha256

        version = f"weights sha256 {folder_weights_sha256(local)[:12]}"
    else:
        version = f"revision {getattr(model.config, '_commit_hash', None) or revision or 'main'}"
    name = f"hf:{target} (label {label}, {version})"
    details = {"model": target, "label": label, "label_index": index, "version": version}
    return ClassifierScorer(name, model, tokenizer, index, multi, device,
                            int(options.pop("batch_size", 64)),
                            int(options.pop("max_length", 512)), details)
