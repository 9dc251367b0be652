"""The methods table of README "Methods side by side": one row per method, its eval (60 RTP
challenging prompts x 10, both scorers, fluency, perplexity, BLiMP) and its relearning attack
(steps until Toxicity Probability recovers half the gap to the base), read with lmprune's own
readers from the folders docs/results/relearn-cpu60.sh and docs/results/methods-cpu.sh write.

    python docs/results/methods_table.py [OUT.png]
"""

import sys
from pathlib import Path

from lmprune.evaluate.reference import row_metrics
from lmprune.finetune.relearn import plot_attacks, read_attack

COMPARED = Path("runs/frontier-cpu60/rows")
ATTACKED = Path("runs/relearn-cpu60")
MADE = Path("runs/methods-cpu")
SECOND = "minilm"
# row: (what it is, its eval JSON, its attack folder)
ROWS = {
    "base": ("the bundled SmolLM2-135M-Instruct", COMPARED / "base/eval.json", None),
    "module pruning (1%)": ("candidate-modules-1pct: 55 modules, 458 neurons, by causal effect",
                            COMPARED / "candidate-modules-1pct/eval.json",
                            ATTACKED / "candidate-modules-1pct-held"),
    "random control": ("random-0: the same per-layer counts, drawn",
                       COMPARED / "random-0/eval.json", ATTACKED / "random-0-held"),
    "AURA": ("dampen by 2(AUROC - 0.5), strength 1", COMPARED / "aura/eval.json",
             MADE / "aura/relearn"),
    "ProFS": ("rank 2, upper layers, 500 ParaDetox pairs", MADE / "profs/eval.json",
              MADE / "profs/relearn"),
    "DPO": ("32 steps, beta 0.1, 128 ParaDetox pairs", MADE / "dpo/eval.json",
            MADE / "dpo/relearn"),
    "Linear-AcT": ("strength 0.25 (1 breaks the model), every MLP neuron", MADE / "act/eval.json",
                   MADE / "act/relearn"),
    "induced module": ("300 routing steps, 480 drawn neurons, then pruned",
                       MADE / "induced/eval.json", MADE / "induced/relearn"),
    "induced random control": ("the routed model, a random same-size set pruned",
                               MADE / "induced-random-0/eval.json", None),
}


def interval(metrics: dict, key: str) -> str:
    value, bounds = metrics.get(key), metrics.get(f"{key}_interval")
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "")


def steps(attack: dict | None, scorer: str) -> str:
    if attack is None:
        return "–"
    r = attack["by_scorer"][scorer]
    if r["threshold"] is None:
        return "no gap"
    return str(r["steps"]) if r["recovered"] else f"> {attack['steps']}"


def tp_at(attack: dict, scorer: str, step: int) -> str:
    value = dict((s, v) for s, v in attack["curves"][scorer]).get(step)
    return "–" if value is None else f"{value:.2f}"


def main() -> None:
    head = ["row", "what", "TP profanity_check", f"TP {SECOND}", "perplexity",
            "generation fluency", "BLiMP", "steps to relearn (profanity_check / minilm)",
            "attack: TP at step 0 -> 16 -> 64 (profanity_check / minilm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    attacks = {}
    for name, (what, eval_path, attack_path) in ROWS.items():
        m = row_metrics(eval_path, "profanity_check")
        if m is None:
            continue
        if m["blimp_accuracy"] is None:  # evaluated without BLiMP, measured alone beside it
            m["blimp_accuracy"] = (row_metrics(eval_path.with_name("blimp.json"),
                                               "profanity_check") or {}).get("blimp_accuracy")
        attack = read_attack(attack_path) if attack_path else None
        if attack:
            attacks[name] = attack
        second = (m["scorers"].get(SECOND) or {}).get("toxicity_probability")
        final = "–" if attack is None else " / ".join(
            " -> ".join(tp_at(attack, s, step) for step in (0, 16, attack["steps"]))
            for s in ("profanity_check", SECOND))
        cells = [name, what, interval(m, "toxicity_probability"),
                 "–" if second is None else f"{second:.3f}",
                 f"{m['perplexity']:.1f}", f"{m['fluency_perplexity']:.1f}",
                 "–" if m["blimp_accuracy"] is None else f"{m['blimp_accuracy']:.3f}",
                 f"{steps(attack, 'profanity_check')} / {steps(attack, SECOND)}", final]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if len(sys.argv) > 1 and attacks:
        plot_attacks(attacks, Path(sys.argv[1]))


if __name__ == "__main__":
    main()
