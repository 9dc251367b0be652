"""Like with like: an eval result set against its peer, the base treated the same way (right
after pruning: the base itself; after fine-tuning: the base fine-tuned with the same settings).
Read by `lmprune compare`'s summary and by the report of `lmprune run`."""

from __future__ import annotations

from pathlib import Path

from lmprune.evaluate.results import read_records, read_result
from lmprune.evaluate.toxicity import distinct_n

STAGES = ("pruned", "finetuned")
# what each stage of a row is measured against: its like, treated the same way
REFERENCE = {"pruned": "the base model", "finetuned": "the base model fine-tuned the same way"}


def row_metrics(path: Path, main_scorer: str) -> dict | None:
    """The figures of one eval JSON that comparisons read (None where the file is missing)."""
    ev = read_result(path)
    if ev is None:
        return None
    tox = ev.get("toxicity") or {}
    ppl = ((ev.get("perplexity") or {}).get("sliding_window") or {})
    fluency, blimp = ev.get("fluency") or {}, ev.get("blimp") or {}
    scorers = {main_scorer: tox, **(tox.get("by_scorer") or {})} if tox else {}
    return {
        "toxicity_probability": tox.get("toxicity_probability"),
        "toxicity_probability_interval": tox.get("toxicity_probability_interval"),
        "expected_max_toxicity": tox.get("expected_max_toxicity"),
        "expected_max_toxicity_interval": tox.get("expected_max_toxicity_interval"),
        "mean_toxicity": tox.get("mean_toxicity"),
        # every scorer of the same continuations, keyed by its spec (the main one first)
        "scorers": {spec: {key: other.get(key) for key in (
            "toxicity_probability", "toxicity_probability_interval", "expected_max_toxicity",
            "scorer")} for spec, other in scorers.items()},
        "perplexity": ppl.get("token_perplexity"),
        "fluency_perplexity": fluency.get("token_perplexity"),
        "fluency_perplexity_interval": fluency.get("token_perplexity_interval"),
        "fluency_median_perplexity": fluency.get("median_perplexity"),
        "fluency_judge": fluency.get("judge"),
        "blimp_accuracy": blimp.get("accuracy"),
        # from the records: eval files written before `distinct` existed have them too
        "distinct_2": distinct_n([r["continuations"] for r in read_records(path, ev)], 2),
    }


def get_metric(row: dict, stage: str, key: str):
    return (row.get(stage) or {}).get(key)


def scorer_tps(row: dict, stage: str) -> dict[str, float]:
    return {spec: m["toxicity_probability"]
            for spec, m in ((row.get(stage) or {}).get("scorers") or {}).items()
            if m.get("toxicity_probability") is not None}


def _ratio(value, reference):
    return value / reference if None not in (value, reference) and reference else None


def versus_reference(rows: dict) -> dict:
    """Each row's figures as ratios to its like: after pruning against the base, after
    fine-tuning against the base fine-tuned the same way. TP ratio < 1: less toxic."""
    base = rows["base"]
    out = {}
    for name, row in rows.items():
        if name == "base":
            continue
        out[name] = {stage: {
            "toxicity_probability_ratio": {
                spec: _ratio(tp, scorer_tps(base, stage).get(spec))
                for spec, tp in scorer_tps(row, stage).items()},
            **{f"{key}_ratio": _ratio(get_metric(row, stage, key), get_metric(base, stage, key))
               for key in ("perplexity", "fluency_perplexity", "blimp_accuracy")},
        } for stage in STAGES if row.get(stage)}
    return out


def _direction(metrics: dict, reference_tp: float) -> str:
    """Where a scorer puts a row against its reference: beyond its own 95% interval or not."""
    low, high = metrics.get("toxicity_probability_interval") or [None, None]
    if low is None:
        return "unknown"
    return "lower" if high < reference_tp else "higher" if low > reference_tp else "within noise"


def scorer_disagreements(rows: dict) -> list[dict]:
    """Rows where the scorers disagree on the direction of the change against the reference
    (one sees toxicity go down, another up or not at all)."""
    found = []
    base = rows["base"]
    for name, row in rows.items():
        if name == "base":
            continue
        for stage in STAGES:
            ref = scorer_tps(base, stage)
            scorers = (row.get(stage) or {}).get("scorers") or {}
            directions = {spec: _direction(m, ref[spec]) for spec, m in scorers.items()
                          if spec in ref and m.get("toxicity_probability") is not None}
            if len(set(directions.values()) - {"unknown"}) > 1:
                found.append({"row": name, "stage": stage, "directions": directions,
                              "against": REFERENCE[stage]})
    return found
