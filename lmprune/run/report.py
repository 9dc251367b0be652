"""The report of a `lmprune run` folder (`report.md`), its toxicity-vs-perplexity plot, and the
model cards of the pruned and fine-tuned checkpoints.

Everything is read back from the files the stages wrote (eval JSON and continuations, the module
map, the checkpoints' lmprune.json, the relearning curve), so the report says what is on disk.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmprune.core.io import save_figure_atomic, write_text_atomic
from lmprune.core.lineage import read_lineage
from lmprune.core.module_map import read_module_map
from lmprune.evaluate.results import read_records, read_result
from lmprune.finetune.command import read_curve
from lmprune.run.recipe import eval_targets, final_target, like_targets, transfer_name

PLOT_FILE = "toxicity_vs_perplexity.png"
CONTENT_WARNING = ("> **Content warning.** The examples below are model outputs for prompts "
                   "chosen to provoke offensive text; they contain offensive language.")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _with_interval_digits(block: dict, key: str, digits: int) -> str:
    low, high = block.get(f"{key}_interval") or (None, None)
    if low is None:
        return _fmt(block.get(key), digits)
    return f"{_fmt(block[key], digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _with_interval(tox: dict, key: str) -> str:
    return _with_interval_digits(tox, key, 3)


def _ppl(ev: dict) -> float | None:
    return ((ev.get("perplexity") or {}).get("sliding_window") or {}).get("token_perplexity")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    text = " ".join(str(text).split()).replace("<", "&lt;")
    for char in "\\|*_`[]":  # markdown syntax shown as written
        text = text.replace(char, "\\" + char)
    return text


# --------------------------------------------------------------------------------------------
# Sections


def results_table(rows: list[tuple[str, str, dict, int | None]]) -> list[str]:
    """rows: (label, stage description, eval result, neurons zeroed). Every scorer of the same
    continuations gets its own Toxicity Probability column; fluency of the continuations and
    BLiMP where they were measured."""
    extra = list(dict.fromkeys(spec for _, _, ev, _ in rows
                               for spec in ((ev.get("toxicity") or {}).get("by_scorer") or {})))
    lines = ["| model | neurons zeroed | Expected Max. Toxicity | Toxicity Probability | "
             + "".join(f"TP {_cell(spec)} | " for spec in extra)
             + "mean toxicity | perplexity | fluency | BLiMP |",
             "|---|---:|---|---|" + "---|" * len(extra) + "---|---:|---|---:|"]
    for label, _, ev, zeroed in rows:
        tox = ev.get("toxicity") or {}
        others = tox.get("by_scorer") or {}
        fluency = ev.get("fluency") or {}
        lines.append(f"| {label} | {'–' if zeroed is None else f'{zeroed:,}'} | "
                     f"{_with_interval(tox, 'expected_max_toxicity')} | "
                     f"{_with_interval(tox, 'toxicity_probability')} | "
                     + "".join(f"{_with_interval(others.get(spec) or {}, 'toxicity_probability')}"
                               f" | " for spec in extra)
                     + f"{_with_interval(tox, 'mean_toxicity')} | {_fmt(_ppl(ev), 2)} | "
                     f"{_with_interval_digits(fluency, 'token_perplexity', 2)} | "
                     f"{_fmt((ev.get('blimp') or {}).get('accuracy'))} |")
    return lines


def protocol_text(ev: dict) -> str:
    tox, ppl = ev.get("toxicity") or {}, ev.get("perplexity") or {}
    parts = []
    if tox:
        prompts = tox.get("prompts") or {}
        decoding = tox.get("decoding") or {}
        parts.append(
            f"Toxicity: scorer `{tox['scorer']}`; {tox['num_prompts']} prompts of "
            f"`{prompts.get('spec', '?')}` x {tox['samples_per_prompt']} sampled continuations "
            f"each (top-p {decoding.get('top_p')}, {decoding.get('max_new_tokens')} new tokens, "
            f"seed {decoding.get('seed')}); a prompt counts as toxic when a continuation scores "
            f">= {tox.get('threshold', 0.5)}; 95% bootstrap intervals over prompts in brackets.")
        if tox["samples_per_prompt"] < 25:
            parts.append(f"This is a reduced protocol ({tox['num_prompts']} prompts x "
                         f"{tox['samples_per_prompt']} samples instead of the published 25 "
                         f"samples per prompt on all challenging prompts), sized to run on a "
                         f"CPU: compare only with figures measured the same way.")
    for spec, other in (tox.get("by_scorer") or {}).items():
        parts.append(f"Second scorer `{spec}`: {other['scorer']}, on the same continuations.")
    fluency, blimp = ev.get("fluency") or {}, ev.get("blimp") or {}
    if fluency:
        parts.append(f"Fluency: perplexity of the continuations, each given its prompt, under "
                     f"the judge `{fluency['judge']}` (token-weighted; 95% bootstrap over "
                     f"prompts).")
    if blimp:
        parts.append(f"BLiMP: accuracy over {blimp['pairs']:,} minimal pairs of "
                     f"{blimp['paradigms']} paradigms (mean over paradigms; the grammatical "
                     f"sentence must get the higher log-probability).")
    if ppl:
        sw = ppl["sliding_window"]
        corpus = ppl.get("corpus") or {}
        parts.append(f"Perplexity: token-level, sliding window (Hugging Face's guide, window "
                     f"{sw['max_length']}, stride {sw['stride']}) over the first "
                     f"{ppl['tokens']:,} tokens of `{corpus.get('spec', '?')}`.")
    return " ".join(parts)


def plot_tradeoff(points: list[tuple[str, dict]], path: Path) -> Path | None:
    """Toxicity Probability (with its interval) against perplexity and, where measured, against
    the fluency of the generations: one point per model, one panel per fluency measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [(label, ev) for label, ev in points
              if (ev.get("toxicity") or {}).get("toxicity_probability") is not None
              and _ppl(ev) is not None]
    if not usable:
        return None
    axes_of = [("perplexity (sliding-window, token level)", _ppl)]
    if all((ev.get("fluency") or {}).get("token_perplexity") for _, ev in usable):
        axes_of.append(("fluency: perplexity of the continuations under the judge",
                        lambda ev: ev["fluency"]["token_perplexity"]))
    fig, axes = plt.subplots(1, len(axes_of), figsize=(6.4 * len(axes_of), 4.4), squeeze=False)
    for ax, (xlabel, x_of) in zip(axes[0], axes_of, strict=True):
        for i, (label, ev) in enumerate(usable):
            tox = ev["toxicity"]
            value = tox["toxicity_probability"]
            low, high = tox.get("toxicity_probability_interval") or (value, value)
            ax.errorbar([x_of(ev)], [value], yerr=[[value - low], [high - value]], fmt="o",
                        capsize=4, color=f"C{i}", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Toxicity Probability (95% interval)")
        ax.grid(alpha=0.3)
    scorer = usable[0][1]["toxicity"]["scorer"].split(" ")[0]
    fig.suptitle(f"toxicity vs fluency ({scorer}); lower left is better")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def modules_section(mmap: dict, lineage: dict, run_dir: Path, modules_file: Path) -> list[str]:
    settings = mmap.get("settings") or {}
    modules = mmap["modules"]
    record = lineage.get("modules") or {}
    chosen_ids = record.get("ids") or []
    by_id = {m["id"]: m for m in modules}
    exact = sum(1 for m in modules if m["scores"].get("causal_measured") == "ablation")
    lines = ["## Modules", "",
             f"{len(modules)} modules ({settings.get('method')} clustering, k = "
             f"{settings.get('k')}, scope {settings.get('scope')}, kNN {settings.get('knn')}) "
             f"from co-activation graphs; {exact} of them were ablated for real (the rest "
             f"carry a first-order estimate). Causal effect = Δloss offensive − Δloss clean on "
             f"held-out text; selectivity = causal / (|Δloss offensive| + |Δloss clean|), 1 "
             f"when only the offensive loss moves. Controls: random neuron sets of the same "
             f"per-layer sizes.", ""]
    rule = f"`--select {record.get('select')}`, ranked by `{record.get('rank_by')}`"
    if record.get("min_selectivity") is not None:
        rule += (f", only modules with selectivity >= {record['min_selectivity']} "
                 f"({record.get('eligible')} eligible)")
    lines += [f"Pruned: {len(chosen_ids)} module(s), {lineage.get('num_pruned', 0):,} neurons "
              f"({lineage.get('fraction_pruned', 0):.2%} of the MLP neurons); rule: {rule}.", ""]
    if chosen_ids:
        lines += ["| id | size | layers | causal | Δloss off | Δloss clean | selectivity | "
                  "control percentile | control z |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for mid in chosen_ids:
            m = by_id[mid]
            s = m["scores"]
            layers = ", ".join(map(str, m["layers"]))
            lines.append(f"| {mid} | {m['size']} | {layers} | {_fmt(s.get('causal'), 4)} | "
                         f"{_fmt(s.get('loss_delta_offensive'), 4)} | "
                         f"{_fmt(s.get('loss_delta_clean'), 4)} | "
                         f"{_fmt(s.get('selectivity'), 2)} | "
                         f"{_fmt(s.get('control_percentile'), 2)} | "
                         f"{_fmt(s.get('control_z'), 2)} |")
        lines.append("")
    clus = mmap.get("clusterability") or {}
    if clus:
        lines += ["### Clusterability", "",
                  f"n-cut of the partition {_fmt(clus.get('ncut'), 2)} vs "
                  f"{_fmt(clus.get('shuffled_mean'), 2)} on weight-shuffled graphs "
                  f"({clus.get('num_shuffles')} shuffles per graph, "
                  f"{len(clus.get('per_graph') or {})} graphs): combined z = "
                  f"{_fmt(clus.get('z'), 2)}, largest p = {_fmt(clus.get('p_max'), 3)} "
                  f"(lower n-cut than shuffled, negative z: more modular than chance).", ""]
    stem = modules_file.with_suffix("").name
    for suffix, caption in (("_specificity", "module specificity vs causal effect, with "
                             "controls"), ("_ncut", "n-cut vs shuffled graphs")):
        plot = modules_file.with_name(f"{stem}{suffix}.png")
        if plot.is_file():
            lines += [f"![{caption}]({plot.relative_to(run_dir).as_posix()})", ""]
    return lines


def relearning_section(curve: dict, run_dir: Path, plot: Path) -> list[str]:
    lines = ["## Relearning during fine-tuning", "",
             "Toxicity and perplexity re-measured while fine-tuning the pruned model on clean "
             "text with the pruned weights held at zero (a smaller evaluation than the table "
             "above: compare the points with each other, not with the table).", ""]
    if plot.is_file():
        lines += [f"![relearning curve]({plot.relative_to(run_dir).as_posix()})", ""]
    points = curve.get("points") or []
    metrics = sorted({k for p in points for k in p["metrics"]}, key=lambda k: ("toxic" not in k, k))
    if points and metrics:
        lines += ["| step | " + " | ".join(k.replace("_", " ") for k in metrics) + " |",
                  "|---:|" + "---:|" * len(metrics)]
        base = curve.get("base")
        if base:
            lines.append("| unpruned base | " + " | ".join(_fmt(base.get(k)) for k in metrics)
                         + " |")
        stride = math.ceil(len(points) / 12)  # at most about a dozen rows; the last always
        shown = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
        for p in shown:
            lines.append(f"| {p['step']} | "
                         + " | ".join(_fmt(p["metrics"].get(k)) for k in metrics) + " |")
        lines.append("")
    return lines


def examples_section(models: list[tuple[str, Path, dict]], count: int) -> list[str]:
    """The prompts on which the first model was most toxic, with each model's most toxic
    continuation for them."""
    records = {label: read_records(path, ev) for label, path, ev in models}
    first = records[models[0][0]]
    if count <= 0 or not first:
        return []
    worst = sorted(first, key=lambda r: -r["max_score"])[:count]
    lines = ["## Examples", "", CONTENT_WARNING, "",
             "For the prompts on which the base model's continuations scored highest: each "
             "model's highest-scoring continuation (score in brackets).", ""]
    for rec in worst:
        lines += [f"**Prompt:** {_cell(rec['prompt'])}", "", "| model | continuation |",
                  "|---|---|"]
        for label, _, _ in models:
            other = next((r for r in records[label] if r["index"] == rec["index"]), None)
            if other is None:
                continue
            j = max(range(len(other["scores"])), key=other["scores"].__getitem__)
            lines.append(f"| {label} | {_cell(other['continuations'][j])} "
                         f"({other['scores'][j]:.2f}) |")
        lines.append("")
    return lines


def _beyond(low_side: dict | None, high_side: dict | None) -> bool | None:
    """Whether `low_side`'s TP interval lies wholly below `high_side`'s (None when unknown)."""
    try:
        return low_side["toxicity_probability_interval"][1] < \
            high_side["toxicity_probability_interval"][0]
    except (TypeError, KeyError, IndexError):
        return None


def _mark(holds: bool | None) -> str:
    return {True: "holds", False: "**does not hold**", None: "not measured"}[holds]


def verdict_section(folder, recipe) -> list[str]:
    """What a person reads first: the final model against the base treated the same way and the
    random control treated the same way, on every scorer and fluency measure, on the dev prompts
    and on each `transfer:` prompt set, and whether each target of `report:` holds."""
    from lmprune.evaluate.reference import row_metrics

    names = like_targets(recipe)

    def metrics(prompts: str | None) -> list[dict | None]:
        return [row_metrics(folder.eval_json(transfer_name(name, prompts) if prompts else name),
                            recipe.eval.scorer) if name else None for name in names.values()]

    sets = [(None, metrics(None))] + [(p, metrics(p)) for p in recipe.transfer.prompts]
    result, base, _ = sets[0][1]
    if not result or not base:
        return []
    treatment = "fine-tuned the same way" if names["result"] == "finetuned" else "as it is"
    tol, factor = recipe.report.fluency_tolerance, recipe.report.toxicity_factor
    lines = ["## Verdict", "",
             f"The final model (`{names['result']}/`) against its like: the base {treatment}, "
             f"and a random set of as many neurons per layer {treatment}.", "",
             f"| measure | result | base {treatment} | random control {treatment} |",
             "|---|---:|---:|---:|"]
    checks = []
    for prompts, rows in sets:
        where = f" on `{prompts}`" if prompts else ""
        mine, theirs, control = ((r or {}).get("scorers") or {} for r in rows)
        for spec, tox in mine.items():
            cells = [_with_interval(s.get(spec) or {}, "toxicity_probability")
                     for s in (mine, theirs, control)]
            lines.append(f"| Toxicity Probability ({spec}){where} | " + " | ".join(cells) + " |")
            for like, other in ((f"the base {treatment}", theirs),
                                (f"the random control {treatment}", control)):
                checks.append((f"{spec}{where}: less toxic than {like}, beyond both intervals",
                               _beyond(tox, other.get(spec))))
            if not prompts:
                ref = (theirs.get(spec) or {}).get("toxicity_probability")
                tp = tox.get("toxicity_probability")
                checks.append((f"{spec}: Toxicity Probability at least {factor:g}x below the "
                               f"base {treatment} ({_fmt(tp)} vs {_fmt(ref)})",
                               None if None in (tp, ref) else tp * factor <= ref))
        measures = [("fluency_perplexity", "generation fluency (perplexity)", 2, True)]
        if not prompts:
            measures = [("perplexity", "perplexity", 2, True), *measures,
                        ("blimp_accuracy", "BLiMP accuracy", 3, False)]
        for key, label, digits, lower_is_better in measures:
            lines.append(f"| {label}{where} | " + " | ".join(_fmt((r or {}).get(key), digits)
                                                            for r in rows) + " |")
            value, ref = ((r or {}).get(key) for r in rows[:2])
            holds = None if None in (value, ref) else (
                value <= ref * (1 + tol) if lower_is_better else value >= ref * (1 - tol))
            checks.append((f"{label}{where} within {tol:.0%} of the base {treatment}", holds))
    lines += [""] + [f"- {text}: {_mark(holds)}" for text, holds in checks]
    return lines + ["", "Intervals: 95% bootstrap over prompts; "
                    "`report.toxicity_factor` and `report.fluency_tolerance` set the targets.",
                    ""]


def like_for_like_section(folder, recipe) -> list[str]:
    """The pruned model against the base, the fine-tuned one against the base fine-tuned the
    same way: ratios per scorer and fluency measure, and where the scorers disagree."""
    from lmprune.evaluate.reference import (
        REFERENCE,
        row_metrics,
        scorer_disagreements,
        versus_reference,
    )

    def metrics(name: str):
        return row_metrics(folder.eval_json(name), recipe.eval.scorer)

    rows = {"base": {"pruned": metrics("base"), "finetuned": metrics("base-finetuned")},
            "result": {"pruned": metrics("pruned"), "finetuned": metrics("finetuned")}}
    if not rows["base"]["pruned"] or not rows["result"]["pruned"]:
        return []
    ratios = versus_reference(rows)["result"]
    lines = ["### Against its like", "",
             "| model | against | Toxicity Probability ratio (per scorer) | perplexity ratio | "
             "fluency ratio | BLiMP ratio |",
             "|---|---|---|---:|---:|---:|"]
    for stage, label in (("pruned", "after pruning"), ("finetuned", "after pruning + "
                                                                     "fine-tuning")):
        if stage not in ratios or not rows["base"][stage]:
            continue
        r = ratios[stage]
        tps = ", ".join(f"{spec} {_fmt(v, 2)}x" for spec, v in
                        r["toxicity_probability_ratio"].items())
        lines.append(f"| {label} | {REFERENCE[stage]} | {tps or '–'} | "
                     f"{_fmt(r['perplexity_ratio'], 3)} | "
                     f"{_fmt(r['fluency_perplexity_ratio'], 3)} | "
                     f"{_fmt(r['blimp_accuracy_ratio'], 3)} |")
    if not rows["base"]["finetuned"] and rows["result"]["finetuned"]:
        lines += ["", "The base was not fine-tuned (`control.finetune_base: false`): the "
                  "fine-tuned model has no like to be measured against."]
    for item in scorer_disagreements(rows):
        said = ", ".join(f"{spec}: {d}" for spec, d in item["directions"].items())
        lines += ["", f"**The scorers disagree** {item['stage']} (against {item['against']}): "
                  f"{said}."]
    return lines + ["", "Ratios below 1 mean less toxic, more fluent (perplexity) or, for "
                    "BLiMP, less capable; the references are measured with the same "
                    "protocol.", ""]


# --------------------------------------------------------------------------------------------
# The whole report


def write_run_report(folder, recipe) -> Path:
    """report.md of a run folder (a `lmprune.run.recipe.RunFolder`), its plot, the model cards."""
    from lmprune.publish.modelcard import CONTENT_WARNING as CARD_WARNING
    from lmprune.publish.modelcard import write_model_card

    run_dir = folder.root
    evals = {name: read_result(folder.eval_json(name))
             for name, _ in eval_targets(recipe, folder)}
    lineage = read_lineage(folder.pruned) or {}

    def zeroed(name: str) -> int | None:
        checkpoint = {"base": None, "pruned": folder.pruned, "finetuned": folder.finetuned,
                      "base-finetuned": folder.base_finetuned}.get(name)
        if checkpoint is None and name.startswith("control-"):
            checkpoint = run_dir / name
        meta = read_lineage(checkpoint) if checkpoint else None
        return (meta or {}).get("num_pruned", 0 if checkpoint else None)

    labels = {"base": "base (unpruned)", "pruned": "after pruning",
              "finetuned": "after pruning + fine-tuning",
              "base-finetuned": "base + the same fine-tuning"}

    def label(name: str) -> str:
        if name in labels:
            return labels[name]
        seed = name.split("-")[1]
        tuned = " + fine-tuning" if name.endswith("finetuned") else ""
        return f"random control (seed {seed}){tuned}"

    rows = [(label(name), name, ev, zeroed(name)) for name, ev in evals.items() if ev]
    base_ev = evals.get("base") or {}
    title = recipe.run.title or f"lmprune run: {recipe.name}"
    lines = [f"# {title}", "", CARD_WARNING, "",
             f"Model `{recipe.run.model}`; offensive corpus `{recipe.collect.offensive}`, clean "
             f"corpus `{recipe.collect.clean}`"
             + (f"; fine-tuned on `{recipe.finetune.data}` for "
                f"{recipe.finetune.max_steps or 'one epoch of'} steps"
                if recipe.finetune is not None else "")
             + ". The recipe as run: [recipe.yaml](recipe.yaml).", ""]
    lines += verdict_section(folder, recipe)
    plot = plot_tradeoff([(label, ev) for label, _, ev, _ in rows], run_dir / PLOT_FILE)
    if plot is not None:
        lines += [f"![toxicity vs fluency]({PLOT_FILE})", ""]
    lines += ["## Results", ""]
    lines += results_table(rows)
    lines += ["", protocol_text(base_ev), ""]
    lines += like_for_like_section(folder, recipe)

    mmap = read_module_map(folder.modules) if folder.modules.is_file() else None
    if mmap:
        lines += modules_section(mmap, lineage, run_dir, folder.modules)
    curve = read_curve(folder.finetuned)
    if curve:
        lines += relearning_section(curve, run_dir, folder.finetuned / "relearning.png")
    shown = [(label(name), folder.eval_json(name), ev) for name, ev in evals.items()
             if ev and not name.startswith("control-")]
    lines += examples_section(shown, recipe.report.examples)

    cards = []
    like = like_targets(recipe)["base"] if final_target(recipe) == "finetuned" else None
    for name, checkpoint in (("pruned", folder.pruned), ("finetuned", folder.finetuned)):
        if evals.get(name) and (checkpoint / "lmprune.json").is_file():
            # the fine-tuned model's card sets it against the base fine-tuned the same way
            reference = like if name == "finetuned" and evals.get(like or "") else "base"
            write_model_card(checkpoint, eval_results=evals[name],
                             base_eval=evals.get(reference),
                             reference=labels.get(reference, reference))
            cards.append(f"[{name}/README.md]({name}/README.md)")
    if cards:
        lines += ["## Checkpoints", "",
                  f"Final model: `{final_target(recipe)}/`. Model cards: {', '.join(cards)}.",
                  ""]
    write_text_atomic(folder.report, "\n".join(lines).rstrip() + "\n")
    return folder.report
