"""The summary of `lmprune compare`: every number (compare.json), the table and the targets
(compare.md) and toxicity against perplexity (compare.png), read from the rows' eval files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lmprune.compare import PLOT_FILE, CompareFolder, CompareRecipe, row_names
from lmprune.evaluate.command import read_records
from lmprune.evaluate.toxicity import distinct_n
from lmprune.io import save_figure_atomic, write_json_atomic, write_text_atomic

# a row's numbers in the table, before and after fine-tuning (and spread over random seeds)
COLUMNS = ("toxicity_probability", "expected_max_toxicity", "perplexity", "distinct_2")


def _metrics(path: Path) -> dict | None:
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    tox = ev.get("toxicity") or {}
    ppl = ((ev.get("perplexity") or {}).get("sliding_window") or {})
    return {
        "toxicity_probability": tox.get("toxicity_probability"),
        "toxicity_probability_interval": tox.get("toxicity_probability_interval"),
        "expected_max_toxicity": tox.get("expected_max_toxicity"),
        "expected_max_toxicity_interval": tox.get("expected_max_toxicity_interval"),
        "mean_toxicity": tox.get("mean_toxicity"),
        "perplexity": ppl.get("token_perplexity"),
        # from the records: eval files written before `distinct` existed have them too
        "distinct_2": distinct_n([r["continuations"] for r in read_records(path, ev)], 2),
    }


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _seconds(folder: CompareFolder, stage: str) -> float | None:
    marker = folder.read_marker(stage) or {}
    return marker.get("seconds") if marker.get("state") == "done" else None


def summarize(recipe: CompareRecipe, folder: CompareFolder) -> dict:
    """Every number of the comparison, the random controls' spread and the targets."""
    rows = {}
    for name in row_names(recipe):
        meta_path = folder.row_model(name) / "lmprune.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        rows[name] = {
            "pruned": _metrics(folder.row_eval(name, False)),
            "finetuned": _metrics(folder.row_eval(name, True)),
            "neurons_zeroed": meta.get("num_pruned", 0 if name == "base" else None),
            "neurons_dampened": sum(len(v) for v in (meta.get("dampened_neurons") or {}).values()),
            "per_layer": {k: len(v) for k, v in (meta.get("pruned_neurons") or {}).items()},
            "seconds": {s: _seconds(folder, f"{s}:{name}") for s in ("prune", "finetune")},
        }
    if recipe.induce is not None:
        rows["induced"]["seconds"]["induce"] = _seconds(folder, "induce")
        rows["induced"]["routed"] = _metrics(folder.induced_routed_eval)
    random = {}
    for group, prefix in (("random", "random-"), ("induced-random", "induced-random-")):
        members = [n for n in rows if n.startswith(prefix)]
        for stage in ("pruned", "finetuned"):
            for metric in COLUMNS:
                values = [rows[n][stage][metric] for n in members
                          if rows[n][stage] and rows[n][stage][metric] is not None]
                if values:
                    random.setdefault(group, {}).setdefault(stage, {})[metric] = _spread(values)
    first = next(iter(rows.values()))["pruned"] or {}
    return {"format": "lmprune.compare", "format_version": 1, "recipe": recipe.name,
            "model": recipe.run.model, "headline": recipe.headline.name,
            "protocol": _protocol(folder, recipe), "rows": rows, "random": random,
            "targets": targets(recipe, rows, random),
            "base_perplexity": first.get("perplexity")}


def _protocol(folder: CompareFolder, recipe: CompareRecipe) -> dict:
    path = folder.row_eval("base", False)
    ev = json.loads(path.read_text()) if path.is_file() else {}
    tox, ppl = ev.get("toxicity") or {}, ev.get("perplexity") or {}
    return {"scorer": tox.get("scorer"), "prompts": tox.get("prompts"),
            "num_prompts": tox.get("num_prompts"), "samples_per_prompt":
            tox.get("samples_per_prompt"), "decoding": tox.get("decoding"),
            "perplexity": {k: ppl.get(k) for k in ("corpus", "tokens")},
            "finetune": {k: getattr(recipe.finetune, k) for k in
                         ("data", "max_steps", "lr", "batch_size", "seq_len", "seed")}}


NOTHING_TO_REDUCE = ("the base model gave no toxic continuation under this protocol: there is "
                     "nothing to reduce, so the target is not judged met")


def targets(recipe: CompareRecipe, rows: dict, random: dict) -> dict:
    """The issue's targets, each with the values it compares and whether it holds."""
    cfg = recipe.compare
    base, head = rows["base"], rows[recipe.headline.name]
    out = {}

    def tp(row, stage):
        return (row.get(stage) or {}).get("toxicity_probability")

    def ppl(row, stage):
        return (row.get(stage) or {}).get("perplexity")

    b_tp, b_ppl = tp(base, "pruned"), ppl(base, "pruned")
    h_tp, h_ppl, p_tp = tp(head, "finetuned"), ppl(head, "finetuned"), tp(head, "pruned")
    if None not in (b_tp, b_ppl, h_tp, h_ppl):
        # a ratio exists only where both are toxic sometimes (and JSON has no infinity)
        reduction = b_tp / h_tp if b_tp > 0 and h_tp > 0 else None
        out["toxicity_reduction"] = {
            "base_tp": b_tp, "headline_tp_finetuned": h_tp, "reduction": reduction,
            "target": cfg.tp_reduction,
            "met": b_tp > 0 and (h_tp == 0 or reduction >= cfg.tp_reduction)}
        if b_tp == 0:
            out["toxicity_reduction"]["note"] = NOTHING_TO_REDUCE
        out["perplexity_after_finetuning"] = {
            "base": b_ppl, "headline_finetuned": h_ppl, "ratio": h_ppl / b_ppl,
            "target_ratio": 1 + cfg.ppl_tolerance, "met": h_ppl <= (1 + cfg.ppl_tolerance) * b_ppl,
            "base_finetuned": ppl(base, "finetuned")}
    if "aura" in rows:
        aura = rows["aura"]
        checks = {}
        for stage in ("pruned", "finetuned"):
            a_tp, a_ppl = tp(aura, stage), ppl(aura, stage)
            m_tp, m_ppl = tp(head, stage), ppl(head, stage)
            if None not in (a_tp, a_ppl, m_tp, m_ppl):
                checks[stage] = {"aura_tp": a_tp, "aura_ppl": a_ppl, "headline_tp": m_tp,
                                 "headline_ppl": m_ppl, "met": m_tp < a_tp and m_ppl <= a_ppl}
        if checks:
            out["better_than_aura"] = {**checks, "met": all(c["met"] for c in checks.values())}
    rand = (random.get("random") or {}).get("pruned", {}).get("toxicity_probability")
    if rand and b_tp is not None:
        out["random_control_near_base"] = {
            "base_tp": b_tp, "random_tp_mean": rand["mean"], "random_tp_std": rand["std"],
            "seeds": rand["n"], "target": f">= (1 - {cfg.random_tolerance}) x base",
            "met": b_tp > 0 and rand["mean"] >= (1 - cfg.random_tolerance) * b_tp}
        if b_tp == 0:
            out["random_control_near_base"]["note"] = NOTHING_TO_REDUCE
    if None not in (p_tp, h_tp):
        out["no_relearning"] = {
            "tp_after_pruning": p_tp, "tp_after_finetuning": h_tp,
            "target": f"<= (1 + {cfg.relearning_tolerance}) x after pruning",
            "met": h_tp <= (1 + cfg.relearning_tolerance) * p_tp + 1e-12}
    return out


def _cell(metrics: dict | None, key: str, digits: int) -> str:
    if not metrics or metrics.get(key) is None:
        return "–"
    return f"{metrics[key]:.{digits}f}"


def table(summary: dict) -> list[str]:
    lines = ["| row | neurons zeroed | TP | EMT | perplexity | distinct-2 | TP after FT | "
             "EMT after FT | perplexity after FT | distinct-2 after FT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in summary["rows"].items():
        zeroed = "–" if row["neurons_zeroed"] is None else f"{row['neurons_zeroed']:,}"
        if row["neurons_dampened"]:
            zeroed += f" (+{row['neurons_dampened']:,} dampened)"
        lines.append(f"| {name} | {zeroed} | " + " | ".join(
            _cell(row[stage], key, 2 if key == "perplexity" else 3)
            for stage in ("pruned", "finetuned") for key in COLUMNS) + " |")
    for group, stats in summary["random"].items():
        n = next(iter(next(iter(stats.values())).values()))["n"]
        if n < 2:  # one seed: its own row above says it all
            continue
        cells = []
        for stage in ("pruned", "finetuned"):
            for key in COLUMNS:
                s = (stats.get(stage) or {}).get(key)
                digits = 2 if key == "perplexity" else 3
                cells.append("–" if s is None else
                             f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}")
        lines.append(f"| {group} (mean ± sd, {n} seeds) | | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict, path: Path) -> Path | None:
    """Toxicity Probability against perplexity: each row an arrow from after pruning to after
    fine-tuning; the random controls as mean ± sd."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    drawn = 0
    for name, row in summary["rows"].items():
        if name.startswith(("random-", "induced-random-")):
            continue
        points = {s: (row[s]["perplexity"], row[s]["toxicity_probability"])
                  for s in ("pruned", "finetuned")
                  if row[s] and row[s]["perplexity"] is not None}
        if not points:
            continue
        color = f"C{drawn % 10}"
        if "pruned" in points:
            ax.plot(*points["pruned"], "o", mfc="none", color=color,
                    label=None if "finetuned" in points else name)
        if "finetuned" in points:
            if "pruned" in points:
                ax.annotate("", xy=points["finetuned"], xytext=points["pruned"],
                            arrowprops={"arrowstyle": "->", "color": color})
            ax.plot(*points["finetuned"], "o", color=color, label=name)
        drawn += 1
    for j, (group, stats) in enumerate(summary["random"].items()):
        for stage, fill in (("pruned", "none"), ("finetuned", None)):
            s = stats.get(stage) or {}
            if "perplexity" in s and "toxicity_probability" in s:
                ax.errorbar(s["perplexity"]["mean"], s["toxicity_probability"]["mean"],
                            xerr=s["perplexity"]["std"], yerr=s["toxicity_probability"]["std"],
                            fmt="s", mfc=fill, color="gray" if j == 0 else "black", capsize=3,
                            label=f"{group} (mean ± sd)" if stage == "finetuned" else None)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    proto = summary["protocol"]
    ax.set_xscale("log")
    ax.set_xlabel("token perplexity (log scale)")
    ax.set_ylabel("Toxicity Probability")
    ax.set_title(f"{summary['model']}: {proto.get('num_prompts')} prompts x "
                 f"{proto.get('samples_per_prompt')}, {str(proto.get('scorer')).split(' ')[0]}"
                 f"\nhollow: after pruning, filled: after fine-tuning", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the data
    return save_figure_atomic(fig, path)


def write_summary(recipe: CompareRecipe, folder: CompareFolder) -> dict:
    summary = summarize(recipe, folder)
    write_json_atomic(folder.root / "compare.json", summary)
    lines = [f"# Comparison: {recipe.run.title or recipe.name}", "", *table(summary), ""]
    proto = summary["protocol"]
    lines += [f"Scorer `{proto['scorer']}`; {proto['num_prompts']} prompts of "
              f"`{(proto['prompts'] or {}).get('spec')}` x {proto['samples_per_prompt']} "
              f"samples; perplexity over {(proto['perplexity'] or {}).get('tokens')} tokens of "
              f"`{((proto['perplexity'] or {}).get('corpus') or {}).get('spec')}`; every row "
              f"fine-tuned with the same settings ({proto['finetune']}). Headline: "
              f"`{summary['headline']}`.", "", "## Targets", ""]
    for name, check in summary["targets"].items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in check.items()
                 if k != "met"}
        lines.append(f"- {name}: **{'met' if check['met'] else 'not met'}** {shown}")
    if plot(summary, folder.root / PLOT_FILE):
        lines += ["", f"![toxicity vs perplexity]({PLOT_FILE})"]
    curve = folder.row(summary["headline"]) / "finetuned" / "relearning.png"
    if curve.is_file():
        lines += ["", "Relearning curve of the headline (toxicity and perplexity during "
                  "fine-tuning):", "", f"![relearning]({curve.relative_to(folder.root)})"]
    write_text_atomic(folder.root / "compare.md", "\n".join(lines) + "\n")
    return summary
