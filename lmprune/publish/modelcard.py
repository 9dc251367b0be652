"""The model card (README.md) of a pruned or fine-tuned checkpoint folder.

The YAML header is huggingface_hub's `ModelCardData`: base model, data sets, tags, license and the
evaluation numbers as a structured `model-index` (one `EvalResult` per metric), so the Hub shows
them. The markdown body says the same in words: a before/after table naming the scorer, prompts and
samples per prompt, how the model was made (from `lmprune.json`), limitations and a content warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from lmprune.core.errors import LmpruneError
from lmprune.core.io import write_text_atomic
from lmprune.core.lineage import read_lineage
from lmprune.core.module_map import read_module_map
from lmprune.core.stats_folder import read_manifest

CARD_FILE = "README.md"
TAGS = ["lmprune", "detoxification", "pruning"]

# Facts about base models the card cannot look up offline: license (Hub identifier), language.
KNOWN_BASE_MODELS: dict[str, dict] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {"license": "apache-2.0", "language": "en"},
    "google/gemma-3-270m": {"license": "gemma"},
}

_MODES = {
    "modules": "whole co-activation modules (clusters of MLP neurons) were zeroed",
    "neurons": "individually selected MLP neurons were zeroed",
    "dampen": "MLP neuron activations were scaled down (AURA-style dampening), not zeroed",
    "random": "randomly chosen MLP neurons were zeroed: a control for comparison, "
              "not a detoxified model",
    "induced": "a module grown on purpose with gradient routing was zeroed",
    "profs": "a toxic subspace, found from paired toxic and non-toxic sentence embeddings, was "
             "projected out of the MLP output weights (ProFS, Uppaal et al. 2025); no neuron "
             "was zeroed",
    "act": "each MLP neuron's activations were transported, by an affine map fitted on toxic and "
           "non-toxic text, towards their distribution on non-toxic text, the map folded into the "
           "weights (Linear-AcT, Rodriguez et al. 2024); no neuron was zeroed",
    "dpo": "the model was trained with DPO (Rafailov et al. 2023) to prefer neutral paraphrases "
           "over their toxic originals, as Lee et al. 2024 do; no neuron was zeroed",
}

# (key in eval["toxicity"], label); lower is better for all of them.
_TOXICITY_METRICS = [
    ("expected_max_toxicity", "Expected Maximum Toxicity"),
    ("toxicity_probability", "Toxicity Probability"),
    ("mean_toxicity", "Mean toxicity"),
]
_RTP_HUB_ID = "allenai/real-toxicity-prompts"
_WIKITEXT_HUB_ID = "Salesforce/wikitext"
_WIKITEXT_TEST = {"dataset_type": _WIKITEXT_HUB_ID, "dataset_name": "WikiText-2 test",
                  "dataset_config": "wikitext-2-v1", "dataset_split": "test"}

CONTENT_WARNING = (
    "> **Content warning.** This model was made and evaluated with corpora that contain offensive "
    "language (ParaDetox, RealToxicityPrompts). Pruning lowers how often the model writes "
    "offensive text; it does not stop it: the model can still produce toxic, biased or otherwise "
    "harmful output."
)


def base_model_hub_id(identity) -> str | None:
    """The Hub id behind a model identity: a Hub model as is, a bundled alias through
    `lmprune.core.models.BUNDLED`, a local checkpoint through the `base_model` it records."""
    from lmprune.core.models import BUNDLED

    seen = 0
    while isinstance(identity, dict) and seen < 16:  # lineage chains are short; guard cycles
        name, kind = identity.get("name"), identity.get("kind")
        if kind == "hub" and isinstance(name, str):
            return name
        if kind == "bundled" and name in BUNDLED:
            return BUNDLED[name].hub_id
        identity = identity.get("base_model")
        seen += 1
    return None


def _named_corpus_hub_ids() -> dict[str, str]:
    """Named corpus shortcut -> Hub dataset id, read off `lmprune.core.data.NAMED`."""
    from lmprune.core.data import NAMED

    ids = {}
    for name, (_, hub_spec) in NAMED.items():
        source = hub_spec.removeprefix("hf:").split("?")[0]
        ids[name] = source.split(":")[0]  # drop a config name (Salesforce/wikitext:wikitext-2-v1)
    return ids


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _corpus_specs(lineage: dict) -> list[str]:
    """Corpus specs recorded by the stages: in `lineage` itself and, when the files are still
    there, in the module map and statistics manifest it points to."""
    specs = list(_strings(lineage.get("history", [])))
    modules_path = (lineage.get("modules") or {}).get("path")
    try:
        modules = read_module_map(modules_path)
        stats = Path(modules["stats"]["path"])
        manifest = read_manifest(stats if stats.is_dir() else stats.parent)
        specs += [c.get("spec", "") for c in manifest.get("corpora", {}).values()]
    except (TypeError, KeyError, OSError, ValueError, AttributeError, LmpruneError):
        pass  # the files moved or were never written: the card lists what lineage names
    return specs


def _dataset_ids(lineage: dict, evaluated: list[dict]) -> list[str]:
    named = _named_corpus_hub_ids()
    ids = []
    for spec in _corpus_specs(lineage):
        name = spec.split("?")[0]
        if name in named:
            ids.append(named[name])
        elif name.startswith("hf:"):
            ids.append(name[3:].split(":")[0])
    for ev in evaluated:
        if _number(_toxicity(ev).get("expected_max_toxicity")) is not None:
            ids.append(_RTP_HUB_ID)
        if _perplexities(ev):
            ids.append(_perplexity_dataset(ev)["dataset_type"])
    return list(dict.fromkeys(ids))


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _toxicity(ev: dict | None) -> dict:
    section = (ev or {}).get("toxicity")
    return section if isinstance(section, dict) else {}


def _perplexities(ev: dict | None) -> dict[tuple[str, str], float]:
    """(method, level) -> perplexity from an eval dict: level "token" (`token_perplexity`, or
    plain `perplexity`) and "word" (`word_perplexity`), per method such as `sliding_window`."""
    section = (ev or {}).get("perplexity")
    if not isinstance(section, dict):
        return {}
    found = {}
    for method, entry in section.items():
        if not isinstance(entry, dict):
            continue
        for level, keys in (("token", ("token_perplexity", "perplexity")),
                            ("word", ("word_perplexity",))):
            value = next((_number(entry[k]) for k in keys if _number(entry.get(k)) is not None),
                         None)
            if value is not None:
                found[method, level] = value
    return found


def _perplexity_dataset(ev: dict | None) -> dict:
    """EvalResult dataset fields of the perplexity corpus: WikiText-2 test unless the eval dict
    records another corpus (`perplexity.corpus`, a spec or `Corpus.describe()`)."""
    corpus = ((ev or {}).get("perplexity") or {}).get("corpus")
    spec = str(corpus.get("spec", "") if isinstance(corpus, dict) else corpus or "")
    if not spec or spec.split("?")[0] == "wikitext2:test":
        return _WIKITEXT_TEST
    name = spec.split("?")[0]
    hub_id = _named_corpus_hub_ids().get(name) or (name[3:].split(":")[0]
                                                   if name.startswith("hf:") else "local")
    return {"dataset_type": hub_id, "dataset_name": spec}


def _prompt_spec(tox: dict) -> str:
    """The prompts' corpus spec: a string, or `Corpus.describe()`'s dict."""
    prompts = tox.get("prompts") or tox.get("corpus") or ""
    return str(prompts.get("spec", "")) if isinstance(prompts, dict) else str(prompts)


def _prompt_set_name(tox: dict) -> str:
    spec = _prompt_spec(tox)
    if "nontoxic" in spec:
        return "RealToxicityPrompts (non-toxic prompts)"
    if "challenging" in spec or not spec:
        return "RealToxicityPrompts (challenging prompts)"
    return f"RealToxicityPrompts ({spec})"


def eval_results_for(ev: dict | None) -> list[EvalResult]:
    """The `model-index` entries of one eval dict (`lmprune eval --json`): what it holds."""
    if not ev:
        return []
    results = []
    tox = _toxicity(ev)
    dataset_args = {k: tox[k] for k in ("num_prompts", "samples_per_prompt") if k in tox}
    for key, label in _TOXICITY_METRICS:
        value = _number(tox.get(key))
        if value is None:
            continue
        results.append(EvalResult(
            task_type="text-generation", task_name="Toxicity of sampled continuations",
            dataset_type=_RTP_HUB_ID, dataset_name=_prompt_set_name(tox),
            dataset_args=dataset_args or None,
            metric_type=key, metric_name=label, metric_value=value,
            metric_config=str(tox["scorer"]) if tox.get("scorer") else None,
        ))
    for (method, level), value in _perplexities(ev).items():
        results.append(EvalResult(
            task_type="text-generation", task_name="Language modelling",
            **_perplexity_dataset(ev),
            metric_type="perplexity" if level == "token" else "word_perplexity",
            metric_name=f"{_ppl_label(method, level)}", metric_value=value, metric_config=method,
        ))
    return results


def _interval(tox: dict, key: str) -> tuple[float, float] | None:
    """The interval recorded for a metric: `{key}_ci` or `{key}_interval`, as [lo, hi] or as
    {"low"/"lo", "high"/"hi"}."""
    raw = tox.get(f"{key}_ci") or tox.get(f"{key}_interval")
    if isinstance(raw, dict):
        raw = [raw.get("low", raw.get("lo")), raw.get("high", raw.get("hi"))]
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and None not in map(_number, raw):
        return float(raw[0]), float(raw[1])
    return None


def _ppl_label(method: str, level: str) -> str:
    return f"{'Perplexity' if level == 'token' else 'Word perplexity'} ({method.replace('_', ' ')})"


def _fmt(value: float | None, interval: tuple[float, float] | None = None) -> str:
    if value is None:
        return "—"
    text = f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"
    if interval:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "—"
    return f"{after - before:+.3f}" if abs(after) < 10 else f"{after - before:+.2f}"


def _prompts_text(tox: dict) -> str:
    count = f"{tox['num_prompts']} " if "num_prompts" in tox else ""
    spec = _prompt_spec(tox)
    return f"{count}{_prompt_set_name(tox)}" + (f" (`{spec}`)" if spec else "")


def _protocol(tox: dict) -> tuple:
    """What must match for two toxicity results to be comparable."""
    return (tox.get("scorer"), tox.get("num_prompts"), tox.get("samples_per_prompt"),
            _prompt_spec(tox), tox.get("prompts_sha256"), _settings_text(tox))


def _settings_text(tox: dict) -> str:
    """Decoding settings, flat in the toxicity dict or under `decoding`."""
    settings = {**tox, **(tox.get("decoding") if isinstance(tox.get("decoding"), dict) else {})}
    return ", ".join(f"{k.replace('_', ' ')} {settings[k]}"
                     for k in ("top_p", "max_new_tokens", "temperature", "seed") if k in settings)


def _protocol_rows(before: dict, after: dict) -> list[str]:
    """Table rows naming the scorer, prompts, samples per prompt and decoding settings."""
    def describe(tox: dict) -> list[str]:
        if not tox:
            return ["—"] * 4
        return [f"`{tox['scorer']}`" if "scorer" in tox else "—", _prompts_text(tox),
                str(tox.get("samples_per_prompt", "—")), _settings_text(tox) or "—"]

    labels = ["toxicity scorer", "prompts", "samples per prompt", "sampling"]
    return [f"| *{label}* | {b} | {a} | |"
            for label, b, a in zip(labels, describe(before), describe(after), strict=True)
            if b != "—" or a != "—"]


def evaluation_section(after: dict | None, before: dict | None,
                       reference: str = "base model") -> str:
    """The evaluation table: this model against `before`, measured on `reference` (the base
    model, or its like: the base fine-tuned the same way)."""
    if not after and not before:
        return ("## Evaluation\n\nNot evaluated yet: run `lmprune eval` on this folder and on the "
                "base model, then write the card again with both results.\n")
    after, before = after or {}, before or {}
    tox_a, tox_b = _toxicity(after), _toxicity(before)
    rows = [f"| metric (lower is better) | {reference} | this model | change |",
            "|---|---|---|---|"]
    for key, label in _TOXICITY_METRICS:
        a, b = _number(tox_a.get(key)), _number(tox_b.get(key))
        if a is None and b is None:
            continue
        rows.append(f"| {label} | {_fmt(b, _interval(tox_b, key))} | "
                    f"{_fmt(a, _interval(tox_a, key))} | {_delta(b, a)} |")
    ppl_a, ppl_b = _perplexities(after), _perplexities(before)
    for key in dict.fromkeys([*ppl_b, *ppl_a]):
        a, b = ppl_a.get(key), ppl_b.get(key)
        rows.append(f"| {_ppl_label(*key)}, {_perplexity_dataset(after or before)['dataset_name']}"
                    f" | {_fmt(b)} | {_fmt(a)} | {_delta(b, a)} |")
    for spec in dict.fromkeys([*(tox_b.get("by_scorer") or {}), *(tox_a.get("by_scorer") or {})]):
        other_a = (tox_a.get("by_scorer") or {}).get(spec) or {}
        other_b = (tox_b.get("by_scorer") or {}).get(spec) or {}
        a, b = _number(other_a.get("toxicity_probability")), \
            _number(other_b.get("toxicity_probability"))
        rows.append(f"| Toxicity Probability, scorer {spec} | "
                    f"{_fmt(b, _interval(other_b, 'toxicity_probability'))} | "
                    f"{_fmt(a, _interval(other_a, 'toxicity_probability'))} | {_delta(b, a)} |")
    flu_a, flu_b = after.get("fluency") or {}, before.get("fluency") or {}
    for key, label in (("token_perplexity", "Fluency: perplexity of the continuations"),
                       ("median_perplexity", "Fluency: median per-continuation perplexity")):
        a, b = _number(flu_a.get(key)), _number(flu_b.get(key))
        if a is not None or b is not None:
            judge = flu_a.get("judge") or flu_b.get("judge")
            rows.append(f"| {label} (judge {judge}) | {_fmt(b, _interval(flu_b, key))} | "
                        f"{_fmt(a, _interval(flu_a, key))} | {_delta(b, a)} |")
    blimp_a, blimp_b = (after.get("blimp") or {}).get("accuracy"), \
        (before.get("blimp") or {}).get("accuracy")
    if blimp_a is not None or blimp_b is not None:
        rows.append(f"| BLiMP accuracy (higher is better) | {_fmt(_number(blimp_b))} | "
                    f"{_fmt(_number(blimp_a))} | {_delta(_number(blimp_b), _number(blimp_a))} |")
    if tox_a or tox_b:  # the protocol in the table, so a mismatch shows at a glance
        rows += _protocol_rows(tox_b, tox_a)
    lines = ["## Evaluation", "", *rows, ""]
    if tox_a or tox_b:
        lines.append("Toxicity follows the RealToxicityPrompts protocol: each prompt's "
                     "continuations are sampled and scored; Expected Maximum Toxicity is the mean "
                     "over prompts of the highest score, Toxicity Probability the share of prompts "
                     "with at least one continuation scoring >= 0.5. Brackets hold the intervals "
                     "the evaluation recorded. Numbers from another scorer, prompt set or sample "
                     "count are not comparable.")
        if tox_a and tox_b and _protocol(tox_a) != _protocol(tox_b):
            lines.append(f"\n**Not like for like**: the {reference} and this model were measured "
                         "with different scorers, prompts, sample counts or decoding settings "
                         "(see the table).")
    if ppl_a or ppl_b:
        lines.append("\nPerplexity: sliding window (Hugging Face's perplexity guide) and "
                     "non-overlapping windows (as lm-evaluation-harness) differ; compare a method "
                     "only with itself.")
    return "\n".join(lines) + "\n"


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _shape(folder: Path) -> tuple[int | None, int | None]:
    """(number of layers, neurons per layer) from config.json; None where it does not say."""
    from lmprune.core.arch import ARCHITECTURES

    config = _read_config(folder)
    text = config.get("text_config") or config  # multimodal configs nest the decoder's
    layout = ARCHITECTURES.get(config.get("model_type", ""))
    width = text.get(layout.width_key) if layout else None
    if width is None and config.get("model_type") == "gpt2":
        width = 4 * config.get("n_embd", 0) or None  # GPT-2's n_inner defaults to 4 x n_embd
    layers = text.get("num_hidden_layers") or text.get("n_layer")
    return (layers if isinstance(layers, int) else None, width if isinstance(width, int) else None)


def pruning_section(folder: Path, lineage: dict) -> str:
    mode = lineage.get("mode", "not recorded")
    lines = ["## How it was made", "",
             f"Made with lmprune from the base model "
             f"`{_identity_text(lineage.get('base_model'))}`. Mode `{mode}`: "
             f"{_MODES.get(mode, 'see lmprune.json')}.", ""]
    pruned = {int(k): v for k, v in (lineage.get("pruned_neurons") or {}).items()}
    num_layers, width = _shape(folder)
    if pruned:
        total = sum(len(v) for v in pruned.values())
        where = f"{len(pruned)} of {num_layers} layers" if num_layers else f"{len(pruned)} layers"
        share = f" ({total / (width * num_layers):.2%} of all MLP neurons)" \
            if width and num_layers else ""
        lines += [f"Zeroed MLP neurons: {total:,} in {where}{share}. Their weight slices (rows "
                  f"of the up/gate projections and biases, columns of the down projection) are "
                  f"exactly zero; every tensor keeps its shape, so the folder loads with plain "
                  f"`AutoModelForCausalLM.from_pretrained`. The indices are in `lmprune.json` "
                  f"(`pruned_neurons`).", "",
                  "| layer | neurons zeroed |" + (" share of the layer |" if width else ""),
                  "|---|---|" + ("---|" if width else "")]
        for layer in sorted(pruned):
            count = len(pruned[layer])
            lines.append(f"| {layer} | {count} |" + (f" {count / width:.1%} |" if width else ""))
        lines.append("")
    dampened = lineage.get("dampened_neurons") or {}
    if dampened:
        count = sum(len(v) for v in dampened.values())
        lines += [f"Dampened neurons: {count:,} in {len(dampened)} layers (scale factors in "
                  f"`lmprune.json`, `dampened_neurons`).", ""]
    modules = lineage.get("modules") or {}
    if modules.get("ids") is not None:
        lines += [f"Modules removed: ids {', '.join(map(str, modules['ids']))} of the module map "
                  f"`{modules.get('path', '?')}`.", ""]
    history = lineage.get("history") or []
    if history:
        lines += ["Stages, in order:", ""]
        for step in history:
            if not isinstance(step, dict):
                continue
            details = ", ".join(f"{k} {_short(v)}" for k, v in step.items() if k != "stage")
            lines.append(f"1. **{step.get('stage', '?')}**" + (f": {details}" if details else ""))
        lines.append("")
    if lineage.get("command"):
        lines += ["Command:", "", "```bash", str(lineage["command"]), "```", ""]
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in list(value.items())[:6]) + \
            (", ..." if len(value) > 6 else "") + "}"
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 6 else "[" + ", ".join(map(_short, value)) \
            + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _identity_text(identity) -> str:
    hub_id = base_model_hub_id(identity)
    if isinstance(identity, dict):
        name = identity.get("name", "?")
        return f"{name} ({hub_id})" if hub_id and hub_id != name else str(name)
    return str(identity) if identity else "not recorded"


LIMITATIONS = """## Limitations

- Toxicity is measured by an automatic scorer on English web prompts. Scorers disagree with each
  other and with people, miss implicit or context-dependent harm, and over-flag identity terms and
  dialects; a lower score is not a guarantee of safe output.
- Only the listed prompt set and sample count were measured: other prompts, languages, decoding
  settings or chat templates can give different results.
- Zeroing neurons can cost general ability: compare the perplexity above, and test the tasks you
  care about before use.
- The zeroed neurons stay in the tensors as zeros. Further fine-tuning without lmprune's masks
  brings them back, and suppressed behaviour is known to return after fine-tuning.
- Nothing here evaluates social bias, factuality or other harms.
"""


def build_model_card(checkpoint_dir: str | Path, eval_results: dict | None = None,
                     base_eval: dict | None = None, model_name: str | None = None,
                     reference: str = "base model") -> ModelCard:
    """The card of `checkpoint_dir` (not written): metadata plus markdown body."""
    folder = Path(checkpoint_dir)
    lineage = read_lineage(folder, required=True)
    base_id = base_model_hub_id(lineage.get("base_model"))
    known = KNOWN_BASE_MODELS.get(base_id or "", {})
    model_name = model_name or folder.resolve().name
    results = eval_results_for(eval_results)
    data = ModelCardData(
        base_model=base_id,
        datasets=_dataset_ids(lineage, [e for e in (eval_results, base_eval) if e]) or None,
        tags=TAGS,
        license=known.get("license"),
        language=known.get("language"),
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    body = "\n".join([
        f"# {model_name}", "",
        CONTENT_WARNING, "",
        f"`{_identity_text(lineage.get('base_model'))}` with MLP neurons removed by lmprune, "
        f"which locates the neurons that carry offensive content from their activations on "
        f"offensive and clean text, zeroes them, and can fine-tune the model afterwards with "
        f"the zeros held.", "",
        evaluation_section(eval_results, base_eval, reference),
        pruning_section(folder, lineage),
        "## Usage", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")',
        "```", "",
        LIMITATIONS,
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(checkpoint_dir: str | Path, eval_results: dict | None = None,
                     base_eval: dict | None = None, model_name: str | None = None,
                     reference: str = "base model") -> Path:
    """Write `README.md` into a checkpoint folder (atomically) and return its path.

    `eval_results` / `base_eval` are `lmprune eval --json` results for this model and its base;
    whatever they hold is used. `model_name` (default: the folder name) names the model in the
    card and in the usage snippet: pass the Hub repo id when pushing.
    """
    card = build_model_card(checkpoint_dir, eval_results, base_eval, model_name, reference)
    return write_text_atomic(Path(checkpoint_dir) / CARD_FILE, str(card))
