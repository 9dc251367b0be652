"""Fine-tune a (pruned) checkpoint with its masks held at zero, and re-measure toxicity and
perplexity every N steps: does what was pruned come back ("relearning")?

Built on Accelerate: one process, or several (`torchrun --nproc_per_node N -m lmprune.cli
finetune ...` on CPU, `accelerate launch` on GPUs). Each process reads its own slice of every
global batch from a seeded block order, so the data position is just the step count, and a run
killed at any point resumes from its last checkpoint to the same weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lmprune.core.config import (
    Need,
    StageSpec,
    check_bounds,
    fingerprint_fields,
    fingerprint_values,
    option,
    prefixed,
    redeclare,
)
from lmprune.core.data import Corpus, load_corpus
from lmprune.core.errors import ConfigError, LmpruneError, warn
from lmprune.core.io import check_out_dir, read_json, save_figure_atomic, write_json_atomic
from lmprune.core.lineage import (
    LINEAGE_FILE,
    command_line,
    model_or_base_of,
    read_lineage,
    stamp,
    utc_now,
)
from lmprune.core.lock import folder_lock
from lmprune.core.masks import PruneMask
from lmprune.core.specs import ModelSpec, PerplexityProtocol, ToxicityProtocol, TrainingSpec
from lmprune.core.training import (
    BlockOrder,
    CheckpointStore,
    Distillation,
    fresh_unless_resumed,
    make_optimizer,
    make_scheduler,
    pack_blocks,
    start_accelerator,
    train_step,
)

# evaluate(model, tokenizer, step) -> {metric name: value}
Evaluator = Callable[[nn.Module, object, int], dict[str, float]]
CURVE_FILE = "relearning.json"
PLOT_FILE = "relearning.png"


# The relearning curve measures toxicity as `lmprune eval` does, on fewer prompts and samples:
# the protocol's fields under the prefix eval_ (the scorer keeps its name).
CurveToxicity = prefixed(ToxicityProtocol, "eval_", keep=("scorer",), limit=redeclare(20),
                         samples=redeclare(5))


@dataclass
class FinetuneConfig(PerplexityProtocol, CurveToxicity, TrainingSpec, ModelSpec):
    """lmprune finetune: train a checkpoint on a corpus with its pruned weights held at zero.

    The resume fingerprint (`_fingerprint`) holds the fields not declared fingerprint=False: the
    input model by its weights, the data by its hash, the step count as computed, and the
    curve's settings not at all (they change nothing that is trained)."""

    model = redeclare(None, "Checkpoint folder to fine-tune (its lmprune.json masks are held at "
                            "zero), or any model (required).")
    # trains in float32 unless asked; the fingerprint has never held the dtype
    dtype = redeclare("float32", fingerprint=False)
    ppl_max_tokens = redeclare(4096)
    data: str | None = option(None, "Training corpus spec, e.g. wikitext2:valid (required).",
                              corpus=True, fingerprint=False)
    out: str | None = option(None, "Output checkpoint folder (required); checkpoints go to "
                             "OUT/checkpoints until the run ends.", fingerprint=False)
    max_docs: int | None = option(None, "Read at most this many documents of --data.",
                                  fingerprint=False)
    holdout_last: int = option(0, "Leave the last N documents of --data out of training: the "
                               "general text `lmprune locate --general` scored modules on "
                               "(`lmprune run` and `compare` set it).", min=0, fingerprint=False)
    max_steps: int | None = option(None, "Optimizer steps (default: --epochs over the data).",
                                   min=1, fingerprint=False)
    epochs: float = option(1.0, "Passes over the packed data when --max-steps is not given.",
                           fingerprint=False)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", min=1)
    mixed_precision: str = option("no", "Autocast precision.", choices=["no", "bf16", "fp16"])
    eval_every: int = option(0, "Measure toxicity and perplexity every N steps (0: never).",
                             fingerprint=False)
    distill_from: str | None = option(
        None, "Train towards a teacher's next-token distribution on --data (KL(teacher || "
              "model) per token) instead of the corpus's own tokens: 'base' for the "
              "checkpoint's unpruned base model (from its lineage; for an unpruned model, "
              "itself), or any model with the same vocabulary. The model learns what the "
              "teacher would write next, not the corpus's tokens and style.", fingerprint=False)
    distill_weight: float = option(1.0, "With --distill-from: the KL's share of the loss, the "
                                   "rest the corpus's cross-entropy.", min=0.0, max=1.0,
                                   fingerprint=False)
    base_model: str | None = option(None, "Unpruned model measured once for the curve's "
                                    "reference line (default: the checkpoint's base model; "
                                    "'none' to skip).", fingerprint=False)
    overwrite: bool = option(False, "Replace an existing --out folder that is not an lmprune "
                             "checkpoint (its files are lost).", stage_key=False)


# --------------------------------------------------------------------------------------------
# The relearning curve


def write_curve(curve: dict, out_dir: str | Path) -> None:
    """relearning.json and relearning.png (one panel per metric against step), atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / CURVE_FILE, curve)
    plot_curve(curve, out_dir / PLOT_FILE)


def read_curve(out_dir: str | Path, hint: str = "fine-tune again to rewrite it") -> dict | None:
    """The relearning curve of a fine-tuned (or attacked) checkpoint: None when it has none."""
    path = Path(out_dir) / CURVE_FILE
    return read_json(path, hint) if path.is_file() else None


def plot_curve(curve: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, base = curve["points"], curve.get("base") or {}
    # toxicity panels first, then perplexity and anything else
    metrics = sorted({k for p in points for k in p["metrics"]},
                     key=lambda k: ("toxic" not in k, k))
    if not metrics:
        return
    start = next((p["metrics"] for p in points if p["step"] == 0), {})
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6.4, 2.4 * len(metrics)), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], metrics, strict=True):
        steps = [p["step"] for p in points if key in p["metrics"]]
        ax.plot(steps, [p["metrics"][key] for p in points if key in p["metrics"]],
                marker="o", label="fine-tuning")
        if key in base:
            ax.axhline(base[key], linestyle="--", color="gray", label="unpruned base")
        if key in start:
            ax.axhline(start[key], linestyle=":", color="C3", label="pruned start")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[0, 0].set_title(curve.get("title", "relearning during fine-tuning"))
    axes[-1, 0].set_xlabel("fine-tuning step")
    save_figure_atomic(fig, path)


def _measure(evaluate: Evaluator, model: nn.Module, tokenizer, step: int) -> dict[str, float]:
    """Run the evaluator in eval mode with the training RNG untouched (sampling uses its own)."""
    was_training = model.training
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = evaluate(model, tokenizer, step)
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# Training


def _fingerprint(config: FinetuneConfig, identity: dict, corpus_sha: str, num_blocks: int,
                 total_steps: int, num_processes: int, hold_masks: bool = True) -> dict:
    """What must be equal for a checkpoint to be resumed by this run: the input model by its
    weights (a folder re-pruned at the same path is another model), settings and data."""
    model = identity.get("weights_sha256") or identity.get("revision") or identity.get("name")
    released = {} if hold_masks else {"masks": "released"}
    # only when distilling: checkpoints of runs that predate it still resume
    distilled = {"distill_from": teacher_name(config), "distill_weight": config.distill_weight} \
        if config.distill_from else {}
    return {**fingerprint_values(config), "model": model, "data_sha256": corpus_sha,
            "num_blocks": num_blocks, "total_steps": total_steps, "num_processes": num_processes,
            **released, **distilled}


def check_finetune_config(config: FinetuneConfig) -> None:
    for name in ("model", "data", "out"):
        if not getattr(config, name):
            raise ConfigError(name, "is required")
    if Path(config.out).resolve() == Path(config.model).resolve():
        raise LmpruneError("--out must differ from --model (the input checkpoint is kept)")
    check_bounds(config)


def training_corpus(spec: str, holdout_last: int, max_docs: int | None):
    """The documents of `spec` fine-tuning trains on: all but the last `holdout_last`, then
    the first `max_docs`."""
    corpus = load_corpus(spec)
    if holdout_last >= len(corpus.texts):
        raise LmpruneError(f"--holdout-last {holdout_last} leaves no document of --data {spec} "
                           f"({len(corpus.texts)} documents) to train on")
    texts = corpus.texts[:len(corpus.texts) - holdout_last][:max_docs]
    return Corpus(corpus.spec, corpus.resolved, texts)


def finetune(config: FinetuneConfig, evaluate: Evaluator | None = None,
             corpus: Corpus | None = None, hold_masks: bool = True) -> Path:
    """Train, checkpoint, evaluate every `eval_every` steps, save the final checkpoint.

    `evaluate(model, tokenizer, step) -> {metric: value}` is called on the main process at step
    0 (the pruned start), every `eval_every` steps and at the end; None skips evaluation.
    `corpus` replaces the documents `config.data` names (the relearning attack picks its own);
    `hold_masks=False` re-draws the pruned weights (`PruneMask.reinitialize`) and lets them
    train (the attack's check: can freed capacity relearn what was cut?).
    """
    check_finetune_config(config)
    check_out_dir(config.out, "checkpoint", config.overwrite)
    accelerator = start_accelerator(config.device, config.seed, config.mixed_precision)
    # one writer: the main process holds OUT's lock until the final checkpoint is saved
    with folder_lock(config.out) if accelerator.is_main_process else contextlib.nullcontext():
        return _train(config, evaluate, accelerator, corpus, hold_masks)


def _train(config: FinetuneConfig, evaluate: Evaluator | None, accelerator,
           corpus: Corpus | None, hold_masks: bool) -> Path:
    from tqdm.auto import tqdm

    from lmprune.core.models import save_model

    started = time.time()
    main, rank, nproc = (accelerator.is_main_process, accelerator.process_index,
                         accelerator.num_processes)

    loaded = config.load(device=str(accelerator.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    meta = read_lineage(config.model) if loaded.source.kind == "folder" else None
    mask = PruneMask(model, (meta or {}).get("pruned_neurons", {}))
    mask.apply(model)
    held = mask if hold_masks else None
    if not hold_masks:
        mask.reinitialize(model, config.seed)
    distill = _distillation(config, loaded, accelerator.device)

    if corpus is None:
        corpus = training_corpus(config.data, config.holdout_last, config.max_docs)
    blocks = pack_blocks(tokenizer, corpus.texts, config.seq_len)  # [n_blocks, seq_len]
    order = BlockOrder(len(blocks), config.seed)
    per_step = config.batch_size * config.grad_accum * nproc
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(blocks) / per_step))

    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, total_steps)
    fingerprint = _fingerprint(config, loaded.identity, corpus.sha256, len(blocks), total_steps,
                               nproc, hold_masks)
    store = CheckpointStore(config.out)
    every = config.eval_every if evaluate is not None else 0
    curve = {"format": "lmprune.relearning", "model": config.model, "data": config.data,
             "base": None, "points": []}
    step, resumed_from, loss_sum, loss_count = 0, None, 0.0, 0
    if (state := store.resume(accelerator, model, optimizer, scheduler, fingerprint)):
        step = resumed_from = state["step"]
        curve, loss_sum, loss_count = state["curve"], state["loss_sum"], state["loss_count"]

    if evaluate is not None and every and step == 0 and main:
        curve["base"] = _measure_base(config, meta, evaluate, accelerator.device)
        curve["points"].append({"step": 0, "metrics": _measure(evaluate, model, tokenizer, 0)})
        write_curve(curve, config.out)
    accelerator.wait_for_everyone()

    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", disable=not main)
    while step < total_steps:
        micro_batches = [
            blocks[order.take(((step * config.grad_accum + micro) * nproc + rank)
                              * config.batch_size, config.batch_size)].to(accelerator.device)
            for micro in range(config.grad_accum)]
        loss_sum += train_step(accelerator, model, optimizer, scheduler, micro_batches,
                               held, config.max_grad_norm, distill)
        loss_count += config.grad_accum
        step += 1
        bar.update(1)

        if every and (step % every == 0 or step == total_steps):
            if main:
                point = {"step": step, "metrics": _measure(evaluate, unwrapped, tokenizer, step),
                         "train_loss": loss_sum / max(loss_count, 1)}
                curve["points"].append(point)
                write_curve(curve, config.out)
                bar.set_postfix(loss=f"{point['train_loss']:.3f}")
            loss_sum, loss_count = 0.0, 0
            accelerator.wait_for_everyone()
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            store.save(step, accelerator, model, optimizer, scheduler,
                       {"step": step, "fingerprint": fingerprint, "curve": curve,
                        "loss_sum": loss_sum, "loss_count": loss_count})
    bar.close()

    if main:
        if held is not None:
            held.check(unwrapped)
        meta_out = _final_meta(config, meta, loaded.identity, corpus, blocks, total_steps, nproc,
                               resumed_from, time.time() - started, hold_masks)
        extra = {LINEAGE_FILE: meta_out}
        if curve["points"]:
            extra[CURVE_FILE] = curve
        save_model(unwrapped, tokenizer, config.out, extra_files=extra, overwrite=config.overwrite)
        if curve["points"]:
            plot_curve(curve, Path(config.out) / PLOT_FILE)
    accelerator.wait_for_everyone()
    return Path(config.out)


def teacher_name(config: FinetuneConfig) -> str | None:
    """The model spec --distill-from names ('base' resolved through the input's lineage)."""
    return model_or_base_of(config.distill_from, config.model) if config.distill_from else None


def _distillation(config: FinetuneConfig, student, device) -> Distillation | None:
    """The frozen teacher of --distill-from, checked to share the student's vocabulary."""
    from lmprune.core.models import load_model

    name = teacher_name(config)
    if name is None:
        return None
    try:
        teacher = load_model(name, dtype=config.dtype, device=str(device))
    except LmpruneError as err:
        raise LmpruneError(f"--distill-from: teacher '{name}' cannot be loaded: {err}") from err
    sizes = [m.model.get_output_embeddings().weight.shape[0] for m in (teacher, student)]
    if sizes[0] != sizes[1] or teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise LmpruneError(f"--distill-from: teacher '{name}' has another vocabulary than "
                           f"{config.model} ({sizes[0]} vs {sizes[1]} logits): distillation "
                           f"compares next-token distributions token by token")
    teacher.model.eval().requires_grad_(False)
    return Distillation(teacher.model, config.distill_weight)


def _measure_base(config: FinetuneConfig, meta: dict | None, evaluate: Evaluator,
                  device) -> dict[str, float] | None:
    """The unpruned base model's metrics: the reference line of the curve."""
    from lmprune.core.models import load_model

    name = config.base_model
    if name is None and meta:
        name = (meta.get("base_model") or {}).get("name")
    if not name or name == "none":
        return None
    try:
        base = load_model(name, dtype=config.dtype, device=str(device))
    except LmpruneError as err:
        warn(f"base model '{name}' not measured ({err}); pass --base-model")
        return None
    metrics = _measure(evaluate, base.model, base.tokenizer, 0)
    del base
    return metrics


def _final_meta(config: FinetuneConfig, meta: dict | None, identity: dict, corpus, blocks,
                total_steps: int, nproc: int, resumed_from: int | None, seconds: float,
                hold_masks: bool = True) -> dict:
    """The input's lmprune.json with this fine-tuning appended to its history. Released masks
    move to `released_neurons`: those weights are no longer zero."""
    from lmprune import __version__

    out = dict(meta) if meta else {
        **stamp(), "base_model": identity,
        "mode": "none", "pruned_neurons": {}, "history": []}
    out["lmprune_version"] = __version__
    out["command"] = command_line()
    if not hold_masks and out.get("pruned_neurons"):
        out["released_neurons"] = out["pruned_neurons"]
        out.update(pruned_neurons={}, num_pruned=0, fraction_pruned=0.0)
    out["history"] = [*out.get("history", []), {
        "stage": "finetune", "steps": total_steps, "from": identity,
        "data": {**corpus.describe(), "tokens": int(blocks.numel())},
        **{k: v for k, v in asdict(config).items() if k in fingerprint_fields(config)},
        **({} if hold_masks else {"masks": "released"}),
        **({"distill_from": config.distill_from, "teacher": teacher,
            "distill_weight": config.distill_weight}
           if (teacher := teacher_name(config)) else {}),
        "num_processes": nproc, "resumed_from": resumed_from, "time": utc_now(),
        "seconds": round(seconds, 1)}]
    return out


# --------------------------------------------------------------------------------------------
# The evaluation the CLI runs


def build_evaluator(config: FinetuneConfig, extra_scorers: list[str] = (),
                    judge=None) -> Evaluator | None:
    """Toxicity of sampled continuations plus perplexity, from lmprune.evaluate.

    `extra_scorers` score the same continuations (`toxicity_probability@SPEC`, ...); `judge` (a
    loaded model) adds the continuations' perplexity under it (`generation_fluency`)."""
    if config.eval_every <= 0:
        return None
    from lmprune.core.models import resolve_device
    from lmprune.evaluate.fluency import judge_fluency
    from lmprune.evaluate.perplexity import perplexity
    from lmprune.evaluate.registry import load_scorer
    from lmprune.evaluate.toxicity import evaluate_toxicity

    protocol, ppl_protocol = config.toxicity_protocol(), config.perplexity_protocol()
    prompts = load_corpus(protocol.prompts, protocol.limit).texts
    ppl_text = "\n\n".join(load_corpus(ppl_protocol.ppl_data).texts)
    device = resolve_device(config.device)
    scorer = load_scorer(protocol.scorer, device=device)
    others = {spec: load_scorer(spec, device=device) for spec in extra_scorers}

    def evaluate(model, tokenizer, step):
        tox = evaluate_toxicity(model, tokenizer, prompts, scorer, samples=protocol.samples,
                                max_new_tokens=protocol.max_new_tokens, seed=config.seed,
                                extra_scorers=others)
        ppl = perplexity(model, tokenizer, ppl_text, ppl_protocol.ppl_max_length,
                         ppl_protocol.ppl_stride, max_tokens=ppl_protocol.ppl_max_tokens,
                         progress=False)
        metrics = {k: tox[k] for k in ("expected_max_toxicity", "toxicity_probability",
                                       "mean_toxicity")}
        for spec, summary in tox["by_scorer"].items():
            metrics.update({f"{k}@{spec}": summary[k]
                            for k in ("expected_max_toxicity", "toxicity_probability")})
        metrics["perplexity"] = ppl["sliding_window"]["token_perplexity"]
        if judge is not None:
            continuations = [r["continuations"] for r in tox["records"]]
            metrics["generation_fluency"] = judge_fluency(
                judge.model, judge.tokenizer, prompts, continuations, judge.identity,
                progress=False)["token_perplexity"]
        return metrics

    return evaluate


def run(config: FinetuneConfig) -> int:
    out = finetune(config, build_evaluator(config))
    print(f"fine-tuned -> {out}")
    return 0


def needs(config: FinetuneConfig) -> list[Need]:
    """The settings checked, and the scorer of the relearning curve when there is one."""
    from lmprune.evaluate.fluency import measurement_needs

    check_finetune_config(config)  # the curve scores with one scorer and no judge
    found = measurement_needs(config.scorer, [], "none", config.device) \
        if config.eval_every > 0 else []
    teacher = teacher_name(config)
    if teacher and Path(teacher).resolve() != Path(config.model).resolve():
        found.append(Need("teacher", teacher, config.device, "distill_from"))
    return found


STAGE = StageSpec(
    "finetune", FinetuneConfig, run,
    help="Fine-tune a pruned checkpoint with its masks held at zero; re-measure toxicity and "
         "perplexity every N steps.",
    wired=("model", "base_model"), sources=("base_model",), step=fresh_unless_resumed(run),
    check=needs)
register = STAGE.register
