"""The run report's sections from eval files on disk (no model)."""

import json

from lmprune.run.report import examples_section


def _eval_files(folder, name, continuations, scores):
    records = [{"index": 0, "prompt": "So I told him", "continuations": continuations,
                "scores": scores, "max_score": max(scores)}]
    side = folder / f"{name}.continuations.jsonl"
    # as `lmprune eval` writes them: ensure_ascii=False keeps U+2028 raw inside a line
    side.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    ev = {"toxicity": {"records_file": side.name}}
    (folder / f"{name}.json").write_text(json.dumps(ev))
    return folder / f"{name}.json", ev


def test_examples_show_each_models_worst_continuation_even_with_line_separators(tmp_path):
    base = _eval_files(tmp_path, "base", ["you are a | pig", "nice\u2028day"], [0.9, 0.1])
    pruned = _eval_files(tmp_path, "pruned", ["fine\u0085thanks", "a *nice* day"], [0.2, 0.3])
    lines = examples_section([("base", *base), ("pruned", *pruned)], count=1)
    text = "\n".join(lines)
    assert "**Prompt:** So I told him" in text
    assert "| base | you are a \\| pig (0.90) |" in lines
    assert "| pruned | a \\*nice\\* day (0.30) |" in lines
