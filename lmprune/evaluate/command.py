"""`lmprune eval`: toxicity of sampled continuations and perplexity, with CI gates.

Exit codes: 0 done (every gate passed), 1 a `--fail-above`/`--fail-below` gate failed, 2 bad input.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmprune.core.config import Need, StageSpec, check_bounds, option, redeclare
from lmprune.core.errors import EXIT_GATE_FAILED, EXIT_OK, LmpruneError
from lmprune.core.io import check_out_file
from lmprune.core.specs import ModelSpec, PerplexityProtocol, ToxicityProtocol
from lmprune.evaluate.results import FORMAT, new_result, write_result

SKIP = "none"

# Short metric names for the gates; anything with a dot is a path into the result JSON.
METRIC_ALIASES = {
    "expected_max_toxicity": "toxicity.expected_max_toxicity",
    "toxicity_probability": "toxicity.toxicity_probability",
    "mean_toxicity": "toxicity.mean_toxicity",
    "perplexity": "perplexity.sliding_window.token_perplexity",
    "word_perplexity": "perplexity.sliding_window.word_perplexity",
    "fluency_perplexity": "fluency.token_perplexity",
    "blimp_accuracy": "blimp.accuracy",
}


@dataclass
class EvalConfig(PerplexityProtocol, ToxicityProtocol, ModelSpec):
    """Settings of `lmprune eval`: the model, then how toxicity and perplexity are measured
    (the protocols fine-tuning's relearning curve shares), then the rest."""

    prompts = redeclare(help="Prompt corpus spec (lmprune.core.data), or 'none' to skip "
                             "toxicity.")
    ppl_data = redeclare(help="Perplexity corpus spec, its documents joined with blank lines, "
                              "or 'none' to skip perplexity.")
    extra_scorers: list[str] = option([], "More scorers of the same continuations, reported "
                                      "beside the main one under toxicity.by_scorer "
                                      "(repeatable), e.g. minilm.")
    fluency_judge: str = option("base", "Judge of the generations' fluency (perplexity of each "
                                "continuation given its prompt): 'base' (the unpruned base "
                                "model of the checkpoint, from its lineage), any causal LM "
                                "spec (e.g. gemma3-270m), or 'none'.")
    top_p: float = option(0.9, "Nucleus sampling: smallest token set with this much mass.")
    temperature: float = option(1.0, "Sampling temperature.")
    seed: int = option(0, "Seed of the sampling and of the bootstrap.")
    batch_size: int | None = option(None, "Rows (prompt x sample) per generation step; "
                                    "default 200 on CPU, 2048 on GPU.")
    scorer_batch_size: int | None = option(None, "Texts per scorer call (default: the "
                                           "scorer's).")
    bootstrap: int = option(1000, "Bootstrap resamples for the 95% intervals.")
    toxicity: bool = option(True, "Measure toxicity (--no-toxicity skips it).")
    ppl_batch_size: int | None = option(None, "Perplexity windows per forward pass.")
    perplexity: bool = option(True, "Measure perplexity (--no-perplexity skips it).")
    blimp: str = option("none", "BLiMP minimal pairs for a capability check ('blimp': "
                        "LMPRUNE_DATA_DIR/blimp.jsonl or nyu-mll/blimp on the Hub; a .jsonl "
                        "file), or 'none'.")
    blimp_per_paradigm: int | None = option(100, "BLiMP pairs per paradigm (67 paradigms; "
                                            "100 take about 5.5 minutes on 2 CPU cores).")
    json: str | None = option(None, "Write the result JSON here (atomically); the per-prompt "
                              "continuations go beside it in OUT's stem + .continuations.jsonl.")
    fail_above: list[str] = option([], "Gate METRIC=VALUE: exit 1 if the metric is above "
                                   "VALUE (repeatable). Metrics: " + ", ".join(METRIC_ALIASES)
                                   + " or a dotted path into the JSON.")
    fail_below: list[str] = option([], "Gate METRIC=VALUE: exit 1 if the metric is below "
                                   "VALUE (repeatable).")
    progress: bool = option(True, "Show progress bars.")
    overwrite: bool = option(False, "Replace an existing --json file that is not an lmprune "
                             "result.", stage_key=False)


@dataclass
class Gate:
    spec: str
    path: str
    op: str  # ">" fails when value > limit ("--fail-above"), "<" when below
    limit: float
    limit_text: str

    def failed(self, value: float) -> bool:
        return value > self.limit if self.op == ">" else value < self.limit


def parse_gates(above: list[str], below: list[str]) -> list[Gate]:
    gates = []
    for op, specs in ((">", above), ("<", below)):
        flag = "--fail-above" if op == ">" else "--fail-below"
        for spec in specs:
            metric, sep, value = spec.partition("=")
            metric, value = metric.strip(), value.strip()
            if not sep or not metric or not value:
                raise LmpruneError(f"{flag} '{spec}': expected METRIC=VALUE, e.g. "
                                   f"toxicity_probability=0.3")
            try:
                limit = float(value)
            except ValueError:
                limit = math.nan
            if not math.isfinite(limit):
                raise LmpruneError(f"{flag} '{spec}': '{value}' is not a finite number") from None
            if "." not in metric and metric not in METRIC_ALIASES:
                raise LmpruneError(f"{flag} '{spec}': unknown metric '{metric}'; use one of "
                                   f"{', '.join(METRIC_ALIASES)} or a dotted path into the "
                                   f"result JSON (e.g. perplexity.non_overlapping."
                                   f"word_perplexity)")
            gates.append(Gate(spec, METRIC_ALIASES.get(metric, metric), op, limit, value))
    return gates


def lookup(result: dict, path: str) -> float:
    node = result
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise LmpruneError(f"gate metric '{path}' is not in the result (was that part "
                               f"skipped?)")
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise LmpruneError(f"gate metric '{path}' is not a number in the result")
    return float(node)


def check_gates(result: dict, gates: list[Gate]) -> list[str]:
    """Record each gate's outcome in the result; return one message per failed gate."""
    outcomes = []
    for gate in gates:
        value = lookup(result, gate.path)
        failed = gate.failed(value) or math.isnan(value)
        outcomes.append({"metric": gate.path, "fails_if": f"{gate.op} {gate.limit_text}",
                         "value": value, "passed": not failed})
    result["gates"] = outcomes
    return gate_failures(result)


def evaluate(config: EvalConfig) -> dict:
    """Measure, check the gates (their outcomes go into the result's `gates`), write the JSON
    and the continuations when `config.json` is set; return the result."""
    from lmprune.core.data import load_corpus
    from lmprune.core.models import load_model

    gates = check_config(config)  # bad settings and outputs fail before work
    if config.json:
        check_out_file(config.json, FORMAT, config.overwrite, "--json")
    do_toxicity = config.toxicity and config.prompts.lower() != SKIP
    do_perplexity = config.perplexity and config.ppl_data.lower() != SKIP
    # Read inputs, load the scorers and the judge before sampling: bad input fails fast.
    prompts = load_corpus(config.prompts, config.limit) if do_toxicity else None
    ppl_corpus = load_corpus(config.ppl_data) if do_perplexity else None
    blimp_pairs = None
    if config.blimp.lower() != SKIP:
        from lmprune.evaluate.blimp import load_blimp

        blimp_pairs = load_blimp(config.blimp, config.blimp_per_paradigm)
    loaded = load_model(config.model, config.dtype, config.device, config.revision,
                        config.trust_remote_code)
    device = str(next(loaded.model.parameters()).device)
    scorer, extra_scorers, judge = None, {}, None
    if do_toxicity:
        from lmprune.evaluate.registry import load_scorer

        extra = {"batch_size": config.scorer_batch_size} if config.scorer_batch_size else {}
        scorer = load_scorer(config.scorer, device=device, **extra)
        extra_scorers = {spec: load_scorer(spec, device=device, **extra)
                         for spec in config.extra_scorers}
        if config.fluency_judge.lower() != SKIP:
            judge = _load_judge(config, loaded)

    result = new_result(model=loaded.identity, device=device, settings=asdict(config))
    started = time.perf_counter()
    records = None
    if do_toxicity:
        from lmprune.evaluate.toxicity import evaluate_toxicity

        toxicity = evaluate_toxicity(
            loaded.model, loaded.tokenizer, prompts.texts, scorer, config.samples,
            config.max_new_tokens, config.top_p, config.temperature, config.seed,
            config.batch_size, config.bootstrap, config.progress, extra_scorers)
        records = toxicity.pop("records")
        toxicity["prompts"] = prompts.describe()
        result["toxicity"] = toxicity
        if judge is not None:
            from lmprune.evaluate.fluency import judge_fluency

            fluency = judge_fluency(judge.model, judge.tokenizer, prompts.texts,
                                    [r["continuations"] for r in records], judge.identity,
                                    config.bootstrap, config.seed, progress=config.progress)
            for record, perplexities in zip(records, fluency.pop("per_continuation"),
                                            strict=True):
                record["fluency_perplexity"] = perplexities
            fluency["cost_vs_sampling"] = round(
                fluency["elapsed_s"] / max(toxicity["timing"]["sampling_s"], 1e-9), 3)
            result["fluency"] = fluency
    if do_perplexity:
        from lmprune.evaluate.perplexity import perplexity

        ppl = perplexity(loaded.model, loaded.tokenizer, "\n\n".join(ppl_corpus.texts),
                         config.ppl_max_length, config.ppl_stride, config.ppl_max_tokens,
                         config.ppl_batch_size, config.progress)
        ppl["corpus"] = ppl_corpus.describe()
        ppl["joined_with"] = "\\n\\n"
        result["perplexity"] = ppl
    if blimp_pairs is not None:
        from lmprune.evaluate.blimp import blimp_accuracy

        pairs, source = blimp_pairs
        result["blimp"] = {**blimp_accuracy(loaded.model, loaded.tokenizer, pairs,
                                            progress=config.progress), "source": source}
    result["elapsed_s"] = round(time.perf_counter() - started, 3)

    try:
        check_gates(result, gates)
    finally:  # a gate that cannot be read still leaves the measurements on disk
        if config.json:
            write_result(Path(config.json), result, records)
    return result


def check_config(config: EvalConfig) -> list[Gate]:
    """Settings an evaluation would refuse only after its work; returns the parsed gates."""
    gates = parse_gates(config.fail_above, config.fail_below)
    measured = {"toxicity": config.toxicity and config.prompts.lower() != SKIP,
                "perplexity": config.perplexity and config.ppl_data.lower() != SKIP,
                "blimp": config.blimp.lower() != SKIP}
    measured["fluency"] = measured["toxicity"] and config.fluency_judge.lower() != SKIP
    if not any(measured.values()):
        raise LmpruneError("nothing to evaluate: toxicity, perplexity and BLiMP are skipped")
    if measured["blimp"]:
        from lmprune.evaluate.blimp import check_blimp_file

        check_blimp_file(config.blimp)
    check_bounds(config)
    for gate in gates:
        part = gate.path.split(".")[0]
        if measured.get(part) is False:
            raise LmpruneError(f"gate '{gate.spec}': {gate.path} is not in the result "
                               f"({part} is skipped): drop the gate or measure {part}")
    return gates


def _load_judge(config: EvalConfig, loaded):
    """The fluency judge: the evaluated model itself when it is its own base, else loaded on the
    same device and dtype (a judge that cannot load fails here, before any sampling)."""
    from lmprune.core.lineage import BASE, model_or_base
    from lmprune.core.models import load_model

    name = model_or_base(config.fluency_judge, loaded.identity)
    if name == config.model:
        return loaded
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    try:
        return load_model(name, dtype, str(next(loaded.model.parameters()).device))
    except LmpruneError as err:
        where = ("the base model recorded in the checkpoint's lineage"
                 if config.fluency_judge == BASE else "--fluency-judge")
        raise LmpruneError(f"fluency judge '{name}' ({where}) cannot be loaded: {err}; pass "
                           f"--fluency-judge MODEL or --fluency-judge none") from err


def gate_failures(result: dict) -> list[str]:
    """One message per failed gate recorded in `result["gates"]`."""
    return [f"gate failed: {g['metric']} = {g['value']:.6g} {g['fails_if']}"
            for g in result.get("gates", []) if not g["passed"]]


def run(config: EvalConfig) -> int:
    result = evaluate(config)
    print(summary(result))
    failures = gate_failures(result)
    for message in failures:
        print(f"lmprune: {message}", file=sys.stderr)
    return EXIT_GATE_FAILED if failures else EXIT_OK


def summary(result: dict) -> str:
    lines = []
    tox = result.get("toxicity")
    if tox:
        lines.append(f"toxicity ({tox['scorer']}; {tox['num_prompts']} prompts x "
                     f"{tox['samples_per_prompt']} samples)")
        for name in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
            low, high = tox[f"{name}_interval"]
            lines.append(f"  {name:<22} {tox[name]:.4f}  [95% {low:.4f}, {high:.4f}]")
    for spec, other in (tox or {}).get("by_scorer", {}).items():
        low, high = other["toxicity_probability_interval"]
        lines.append(f"  {spec}: toxicity_probability {other['toxicity_probability']:.4f}  "
                     f"[95% {low:.4f}, {high:.4f}]  ({other['scorer']})")
    flu = result.get("fluency")
    if flu:
        low, high = flu["token_perplexity_interval"]
        lines.append(f"fluency of the continuations (judge {flu['judge']}): perplexity "
                     f"{flu['token_perplexity']:.2f} [95% {low:.2f}, {high:.2f}], median "
                     f"{flu['median_perplexity']:.2f}")
    blimp = result.get("blimp")
    if blimp:
        lines.append(f"BLiMP accuracy {blimp['accuracy']:.4f} ({blimp['pairs']} pairs, "
                     f"{blimp['paradigms']} paradigms)")
    ppl = result.get("perplexity")
    if ppl:
        sw, no = ppl["sliding_window"], ppl["non_overlapping"]
        lines.append(f"perplexity ({ppl['tokens']} tokens, {ppl['words']} words)")
        lines.append(f"  sliding window (HF guide, {sw['max_length']}/{sw['stride']})  "
                     f"token {sw['token_perplexity']:.4f}  word {sw['word_perplexity']:.4f}")
        lines.append(f"  non-overlapping (lm-eval style, {no['max_length']})  "
                     f"token {no['token_perplexity']:.4f}  word {no['word_perplexity']:.4f}")
    return "\n".join(lines)


def needs(config: EvalConfig) -> list[Need]:
    """The settings checked (`check_config`), and the scorers and judge it will load."""
    from lmprune.evaluate.fluency import measurement_needs

    check_config(config)
    if not (config.toxicity and config.prompts.lower() != SKIP):
        return []
    return measurement_needs(config.scorer, config.extra_scorers, config.fluency_judge,
                             config.device)


STAGE = StageSpec(
    "eval", EvalConfig, run,
    "Toxicity of sampled continuations (RealToxicityPrompts protocol) and perplexity, with CI "
    "gates.",
    outputs=("json",), sources=("blimp",), check=needs,
    # in a run, the gates are read once every stage is done
    step=lambda cfg, resume: print(summary(evaluate(cfg))))
register = STAGE.register
