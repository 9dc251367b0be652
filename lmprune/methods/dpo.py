"""DPO: train the model to prefer a clean text over its toxic counterpart (Direct Preference
Optimization), the alignment baseline the pruning is measured against.

Rafailov, Sharma, Mitchell, Ermon, Manning and Finn, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model" (NeurIPS 2023, arXiv 2305.18290), used against toxicity
as Lee, Bai, Pres, Wattenberg, Kummerfeld and Mihalcea do in "A Mechanistic Understanding of
Alignment Algorithms: A Case Study on DPO and Toxicity" (ICML 2024, arXiv 2401.01967; reference
code github.com/ajyl/dpo_toxic, `toxicity/train_dpo/`).

For a pair (x, y_w, y_l) the loss is -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) -
(log pi(y_l|x) - log ref(y_l|x)))), each log-probability summed over the completion's tokens;
the reference `ref` is a frozen copy of the input model. Training runs on TRL's `DPOTrainer`
(loss type `sigmoid`), which also reports the implicit rewards beta * (log pi - log ref) of both
sides and their margin.

The pairs: y_w is ParaDetox's neutral paraphrase, y_l the toxic original (Lee et al.: y_w GPT-2's
own continuation of a Wikitext prompt, y_l the PPLM-steered toxic continuation of the same prompt,
`pplm_dataset.py`: `unpert_gen_text`, `pert_gen_text`). ParaDetox has no prompt, so x is one
start token, the tokenizer's BOS or else its EOS (lm-eval's prefix token, as `lmprune eval`'s
BLiMP scores sentences), or nothing when the tokenizer opens every text with a BOS of its own:
every token of both texts is then scored.
Taking the words the two texts share as the prompt instead would change nothing: a shared
prefix has the same log-probability under the policy in y_w and y_l (and likewise under the
reference), so it cancels from the loss. TRL appends EOS to both texts.

Published settings (Lee et al., GPT-2 medium: `config/config.yaml`, `config/loss/dpo.yaml`): beta
0.1, RMSprop at lr 1e-6 with 150 linear warmup steps then constant, batch 4, max_grad_norm 10,
up to 5 epochs with early stopping on validation loss (thousands of steps). Ours default to what
fits well under 20 minutes for SmolLM2-135M on a 2-core CPU shared with other work (measured: 12
min wall, 656 s of it training): beta 0.1,
RMSprop, batch 4 and max_grad_norm 10 as published, 32 steps at lr 1e-5 (10x theirs, for 32
steps instead of thousands) with 4 warmup steps, 128 training pairs, 32 held-out pairs measured
at the end.

A pruned input checkpoint keeps its masks: the pruned slices' gradients are zeroed before each
optimizer step and the slices zeroed again after it (`lmprune.core.masks.PruneMask`), and the saved
lineage keeps its `pruned_neurons`.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass

from torch import nn

from lmprune.core.arch import NeuronMap
from lmprune.core.config import StageSpec, check_bounds, option, redeclare
from lmprune.core.data import Pairs, load_pairs
from lmprune.core.errors import ConfigError, LmpruneError, warn
from lmprune.core.io import check_out_dir
from lmprune.core.lineage import LINEAGE_FILE, command_line, read_lineage, stamp, utc_now
from lmprune.core.masks import PruneMask, count_neurons, neurons_to_json
from lmprune.core.specs import ModelSpec

DEVICES = ("auto", "cpu", "cuda")
# TRL's metric names (without the eval_ prefix) -> ours in lmprune.json
METRICS = {"loss": "loss", "rewards/chosen": "reward_chosen",
           "rewards/rejected": "reward_rejected", "rewards/margins": "reward_margin",
           "rewards/accuracies": "reward_accuracy"}


@dataclass
class DpoConfig(ModelSpec):
    """lmprune dpo: Direct Preference Optimization on clean (chosen) / toxic (rejected) pairs."""

    model = redeclare(help="Hub id, local folder, .gguf file or bundled alias; a pruned "
                           "checkpoint keeps its masks at zero.")
    dtype = redeclare("float32", "Weights dtype (training runs in it: no autocast).")
    device = redeclare(help="Device: cpu, cuda or auto.")  # check_config refuses cuda:N
    out: str | None = option(None, "Output checkpoint folder (required).")
    pairs: str = option("paradetox", "Paired texts, an offensive one (rejected) and its clean "
                        "rewrite (chosen): paradetox, or FILE.tsv|csv|jsonl?offensive=COL&"
                        "clean=COL, or hf:ID?split=S&offensive=COL&clean=COL.")
    max_pairs: int = option(128, "Training pairs, drawn with --seed when there are more (the "
                            "steps cycle through them if steps x batch size is larger).", min=1)
    eval_pairs: int = option(32, "Pairs held out of training (drawn with --seed) whose loss and "
                             "reward margin are measured after it (0: none).", min=0)
    beta: float = option(0.1, "DPO's beta: the weight of the implicit KL penalty to the "
                         "reference (Lee et al.: 0.1).", above=0)
    lr: float = option(1e-5, "Learning rate after warmup (Lee et al.: 1e-6 for GPT-2 medium, "
                       "over thousands of steps).", above=0)
    optimizer: str = option("rmsprop", "Optimizer (Lee et al.: RMSprop; TRL's default: AdamW).",
                            choices=["rmsprop", "adamw"])
    warmup_steps: int = option(4, "Linear warmup steps, then a constant rate (Lee et al.: 150).",
                               min=0)
    max_steps: int = option(32, "Optimizer steps.", min=1)
    batch_size: int = option(4, "Pairs per step (Lee et al.: 4).", min=1)
    max_length: int = option(128, "Tokens per prompt + text; longer texts are cut at the end.",
                             min=1)
    max_grad_norm: float = option(10.0, "Gradient clipping norm (Lee et al.: 10; 0: off).", min=0)
    seed: int = option(0, "Seed of the drawn pairs and their order.")
    overwrite: bool = option(False, "Replace an existing --out folder that is not an lmprune "
                             "checkpoint (its files are lost).", stage_key=False)


def check_config(config: DpoConfig) -> None:
    """The checks that need neither the model nor the pairs."""
    check_bounds(config)
    if config.device not in DEVICES:
        raise ConfigError("device", f"'{config.device}' is not one of {', '.join(DEVICES)}")


# --------------------------------------------------------------------------------------------
# Pairs and the prompt


def read_pairs(config: DpoConfig) -> tuple[Pairs, Pairs | None]:
    """(training pairs, held-out pairs or None): `eval_pairs` drawn first, then `max_pairs` of
    the rest, both with `seed`; refuses fewer training pairs than one batch."""
    pairs = load_pairs(config.pairs)
    order = list(range(len(pairs)))
    random.Random(config.seed).shuffle(order)
    held, rest = sorted(order[:config.eval_pairs]), sorted(order[config.eval_pairs:])
    if len(rest) < config.batch_size:
        held_out = f" after holding {len(held)} out (--eval-pairs)" if held else ""
        raise LmpruneError(f"pairs '{config.pairs}' has {len(rest)} training pair(s){held_out}: "
                           f"a batch needs --batch-size {config.batch_size}")
    if len(rest) < config.max_pairs:
        warn(f"--max-pairs {config.max_pairs}, but '{config.pairs}' has {len(rest)} training "
             f"pairs: using them all")

    def subset(index: list[int]) -> Pairs:
        return Pairs(pairs.spec, pairs.resolved, [pairs.offensive[i] for i in index],
                     [pairs.clean[i] for i in index], pairs.dropped)

    train = subset(rest).sample(config.max_pairs, config.seed)
    return train, subset(held) if held else None


def prompt_text(tokenizer) -> str:
    """The text every pair follows: '' when the tokenizer starts each text with its own BOS,
    else its BOS token (or EOS), so that the first word of each text is scored too."""
    from lmprune.core.models import prefix_token_id

    if tokenizer("")["input_ids"]:
        return ""
    return tokenizer.convert_ids_to_tokens(prefix_token_id(tokenizer))


def preference_dataset(pairs: Pairs, prompt: str):
    """TRL's standard preference format: prompt, chosen (clean), rejected (offensive)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [prompt] * len(pairs), "chosen": pairs.clean,
                              "rejected": pairs.offensive})


# --------------------------------------------------------------------------------------------
# Training


def hold_masks_callback(mask: PruneMask):
    """A TrainerCallback keeping `mask`'s slices at zero: gradients masked before each optimizer
    step (after clipping), the slices zeroed again after it. A fully zeroed neuron gets zero
    gradients anyway (a stationary point); this makes the zeros a guarantee rather than a
    property of the optimizer's settings (weight decay, stale moments)."""
    from transformers import TrainerCallback

    class HoldMasks(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            mask.mask_gradients(model)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            mask.apply(model)

    return HoldMasks()


def build_trainer(config: DpoConfig, model: nn.Module, tokenizer, train: Pairs,
                  held_out: Pairs | None, output_dir: str, mask: PruneMask | None = None):
    """TRL's DPOTrainer on `model`, against a frozen copy of it as the reference."""
    from trl import DPOConfig, DPOTrainer

    from lmprune.core.models import resolve_device

    with warnings.catch_warnings():  # TRL's default sets transformers' renamed option
        warnings.filterwarnings("ignore", "`gradient_checkpointing` is deprecated", FutureWarning)
        args = DPOConfig(
            output_dir=output_dir, report_to=[], save_strategy="no",  # lmprune saves the model
            beta=config.beta, loss_type=["sigmoid"], learning_rate=config.lr,
            optim="rmsprop" if config.optimizer == "rmsprop" else "adamw_torch",
            lr_scheduler_type="constant_with_warmup", warmup_steps=config.warmup_steps,
            max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size, max_length=config.max_length,
            max_grad_norm=config.max_grad_norm, seed=config.seed, data_seed=config.seed,
            # TRL's defaults are bf16 autocast and activation checkpointing (GPU memory savers)
            bf16=False, fp16=False, gradient_checkpointing=False,
            use_cpu=resolve_device(config.device) == "cpu",
            logging_steps=max(1, math.ceil(config.max_steps / 8)))
    prompt = prompt_text(tokenizer)
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return DPOTrainer(
        model=model, ref_model=reference, args=args, processing_class=tokenizer,
        train_dataset=preference_dataset(train, prompt),
        eval_dataset=preference_dataset(held_out, prompt) if held_out else None,
        callbacks=[hold_masks_callback(mask)] if mask is not None and mask.entries else None)


def _summary(logs: dict, prefix: str = "") -> dict:
    return {ours: logs[prefix + theirs] for theirs, ours in METRICS.items()
            if prefix + theirs in logs}


def dpo_train(config: DpoConfig, loaded, train: Pairs, held_out: Pairs | None) -> dict:
    """Train `loaded.model` in place (`read_pairs` gives the pairs); returns the lmprune.json to
    save with it."""
    started = time.perf_counter()
    model, tok = loaded.model, loaded.tokenizer
    previous = read_lineage(loaded.source.path) if loaded.source.kind == "folder" else None
    previous = previous or {}
    mask = PruneMask(model, previous.get("pruned_neurons", {}))
    mask.apply(model)
    with tempfile.TemporaryDirectory(prefix="lmprune-dpo-") as scratch:
        trainer = build_trainer(config, model, tok, train, held_out, scratch, mask)
        result = trainer.train()
        # the last logged window: the mean over the last `logging_steps` steps
        last = next(h for h in reversed(trainer.state.log_history) if "loss" in h)
        evaluated = trainer.evaluate() if held_out else None
    # TRL patches a fused LM head onto the instance; the class's forward is the model's own
    model.__dict__.pop("forward", None)
    model.eval()
    mask.check(model)
    record = {
        "pairs": train.describe(), "held_out": held_out.describe() if held_out else None,
        "prompt": prompt_text(tok), "beta": config.beta, "lr": config.lr,
        "optimizer": config.optimizer, "warmup_steps": config.warmup_steps,
        "max_steps": config.max_steps, "batch_size": config.batch_size,
        "max_length": config.max_length, "max_grad_norm": config.max_grad_norm,
        "seed": config.seed, "trainer": "trl.DPOTrainer (loss_type sigmoid)",
        "train": {"mean_loss": result.training_loss, "last": _summary(last)},
        "eval": _summary(evaluated, "eval_") if evaluated else None,
        "seconds": round(time.perf_counter() - started, 1)}
    pruned = mask.pruned_neurons
    return {
        **previous,
        **stamp(),
        "base_model": loaded.identity.get("base_model") or loaded.identity,
        "source_model": loaded.identity,
        "mode": "dpo",
        "pruned_neurons": neurons_to_json(pruned),
        "num_pruned": count_neurons(pruned),
        "fraction_pruned": count_neurons(pruned) / sum(NeuronMap(model).widths),
        "dpo": record,
        "command": command_line(),
        "history": [*previous.get("history", []), {
            "stage": "dpo", "pairs": len(train), "beta": config.beta, "lr": config.lr,
            "steps": config.max_steps, "batch_size": config.batch_size, "time": utc_now(),
            "seconds": record["seconds"]}],
    }


def run(config: DpoConfig) -> int:
    from lmprune.core.models import save_model

    check_config(config)
    if not config.out:
        raise LmpruneError("--out DIR is required (the folder of the trained checkpoint)")
    check_out_dir(config.out, "checkpoint", config.overwrite)
    config.load_config()  # an unknown or unsupported model costs no weights read
    train, held_out = read_pairs(config)
    loaded = config.load()
    meta = dpo_train(config, loaded, train, held_out)
    save_model(loaded.model, loaded.tokenizer, config.out,
               extra_files={LINEAGE_FILE: meta}, overwrite=config.overwrite)
    record = meta["dpo"]
    last = record["train"]["last"]
    held = (f"; held-out margin {record['eval']['reward_margin']:.3f}, accuracy "
            f"{record['eval']['reward_accuracy']:.2f}" if record["eval"] else "")
    print(f"DPO: {config.max_steps} steps on {len(train)} pairs, last loss {last['loss']:.3f}, "
          f"reward margin {last['reward_margin']:.3f}{held} -> {config.out}")
    return 0


STAGE = StageSpec(
    "dpo", DpoConfig, run,
    help="DPO (Rafailov et al. 2023) as Lee et al. 2024 use it against toxicity: prefer each "
         "clean paraphrase over its toxic original, against a frozen copy of the model.",
    sources=("pairs",))
register = STAGE.register
