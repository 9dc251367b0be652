"""Induce a module on purpose: train offensive text into chosen MLP neurons, so that pruning them
removes it.

Gradient routing (Cloud et al. 2024, arXiv 2410.04332): data-dependent masks on gradients decide
which parameters each example may update. The designated region is a set of MLP neurons: their
rows of the up/gate projections and their columns of the down projection
(`NeuronMap.weight_slices`). Predicting a routed token (every token of a labelled offensive
document, or only its offensive tokens) updates only those slices; predicting any other token
updates the rest (variant "rest") or everything (variant "all"). The masks act on parameters, not
activations: the paper found activation-level masking hurts small language models.

One step is two passes, each a forward and a backward:
  1. the offensive blocks, loss = mean NLL of their routed tokens; gradients kept on the
     designated slices only, clipped by their own norm, set aside;
  2. the clean blocks (plus the offensive blocks when some of their tokens are not routed),
     loss = mean NLL of the unrouted tokens; gradients of the designated slices zeroed (variant
     rest), clipped by their own norm; then the set-aside gradients are added.

Exactness under AdamW. Element-wise, the moments of a designated slice are only ever fed routed
gradients and those of the rest only clean ones, and clipping never mixes the two. A region that
gets no gradient in a step (a batch without routed tokens, or without clean ones) would still be
moved by AdamW's momentum and weight decay, so it is held: parameters wholly inside it lose their
gradient (AdamW skips them), and the shared parameters' slices (weights and moments) are restored
after the step. A step without offensive tokens thus leaves the designated slices bit-identical,
and one without clean tokens leaves everything else bit-identical (variant rest).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmprune.core.arch import NeuronMap, parse_layers
from lmprune.core.config import (
    StageSpec,
    check_bounds,
    fingerprint_values,
    option,
    redeclare,
)
from lmprune.core.errors import LmpruneError
from lmprune.core.io import check_out_dir
from lmprune.core.lineage import LINEAGE_FILE, command_line, read_lineage, stamp, utc_now
from lmprune.core.masks import (
    NeuronSet,
    PruneMask,
    count_neurons,
    neurons_to_json,
    normalize_neurons,
)
from lmprune.core.module_map import (
    check_module_map,
    module_neurons,
    read_module_map,
    write_module_map,
)
from lmprune.core.specs import ModelSpec, TrainingSpec
from lmprune.core.training import (
    BlockOrder,
    CheckpointStore,
    make_optimizer,
    make_scheduler,
    pack_documents,
    start_accelerator,
)

MODULES_FILE = "modules.json"
PROBE_FILE = "probe.json"
PROBE_PLOT = "probe.png"
ROUTES = ["example", "token"]
CLEAN_REACHES = ["rest", "all"]


@dataclass
class InduceConfig(TrainingSpec, ModelSpec):
    """lmprune induce: train offensive text into chosen neurons (gradient routing).

    The resume fingerprint (`_fingerprint`) holds every field not declared fingerprint=False
    (the model by its weights)."""

    model = redeclare(None, "Model to train: Hub id, folder, .gguf file or bundled alias "
                            "(required).")
    dtype = redeclare("float32")  # the weights it trains and saves
    max_grad_norm = redeclare(help="Gradient clipping norm, applied to the routed and the clean "
                                   "gradients separately (0: off).")
    batch_size = redeclare(help="Blocks per process and step (both corpora together).")
    seq_len = redeclare(min=2)  # a block of one token predicts nothing
    seed = redeclare(help="Seed of the drawn neurons, the labelled documents and the data "
                          "order.")
    offensive: str | None = option(None, "Offensive corpus spec, e.g. paradetox:toxic "
                                   "(required).", corpus=True)
    clean: str | None = option(None, "Clean corpus spec, e.g. paradetox:neutral (required).",
                               corpus=True)
    out: str | None = option(None, "Output checkpoint folder (required): weights, lmprune.json "
                             "and modules.json; checkpoints go to OUT/checkpoints until the end.",
                             fingerprint=False)
    max_docs: int | None = option(None, "Read at most this many documents of each corpus.")
    layers: str = option("all", "Layers of the designated region: all, a list (3,4,5) or an "
                         "inclusive range (10-20).")
    neurons_per_layer: int | None = option(None, "Designated neurons per layer, drawn with "
                                           "--seed.")
    module: str | None = option(None, "Designate a module of a `lmprune locate` map instead: "
                                "PATH/modules.json:ID (grow an emergent module on purpose).")
    route: str = option("example", "What is routed to the module: every token of a labelled "
                        "offensive document (example), or only its tokens labelled offensive "
                        "(token).", choices=ROUTES)
    toxic_tokens: int = option(100, "token routing: how many token ids count as offensive (the "
                               "most over-represented in the offensive corpus).", min=1)
    clean_reaches: str = option("rest", "What clean gradients may update: every parameter "
                                "except the designated slices (rest), or everything (all).",
                                choices=CLEAN_REACHES)
    offensive_fraction: float = option(0.5, "Share of each batch's blocks drawn from the "
                                       "offensive corpus.", min=0, max=1)
    labelled_fraction: float = option(1.0, "Share of offensive documents that are labelled "
                                      "(seeded); unlabelled ones are routed as clean.", min=0,
                                      max=1)
    score_docs: int = option(64, "Documents of each corpus (training documents) on which "
                             "ablating the module is measured: its scores in modules.json.",
                             min=1, fingerprint=False)
    probe_every: int = option(0, "Every N steps (and before the first and after the last), "
                              "measure on held-out documents what ablating the designated "
                              "neurons does, beside --probe-random random same-size sets: "
                              "OUT/probe.json and probe.png (0: off).", min=0)
    probe_docs: int = option(32, "With --probe-every: documents of each corpus held out of "
                             "training for the probe (the last ones read).", min=1)
    probe_random: int = option(4, "With --probe-every: random same-size sets (the designated "
                               "per-layer counts, none of its neurons) measured beside it.",
                               min=2, fingerprint=False)
    max_steps: int = option(200, "Optimizer steps.", min=1)
    overwrite: bool = option(False, "Replace an existing --out folder that is not an lmprune "
                             "checkpoint (its files are lost).", stage_key=False)


# --------------------------------------------------------------------------------------------
# The designated region


def draw_neurons(widths: list[int], layers: list[int], per_layer: int, seed: int) -> NeuronSet:
    """`per_layer` random neurons in each of `layers`.

    Drawn with numpy's generator, not torch's as `prune.random_like` uses: with the same --seed,
    the random control of `lmprune prune --mode random` must not be the designated set itself.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        if not 0 < per_layer <= widths[layer]:
            raise LmpruneError(f"--neurons-per-layer must be between 1 and the layer width "
                               f"{widths[layer]}, not {per_layer}")
        out[layer] = rng.choice(widths[layer], size=per_layer, replace=False).tolist()
    return normalize_neurons(out)


def module_from_map(spec: str, identity: dict, nmap: NeuronMap) -> tuple[NeuronSet, dict]:
    """The members of module ID of PATH/modules.json, checked against the loaded model."""
    from lmprune.core.models import file_sha256

    path, sep, wanted = spec.rpartition(":")
    if not sep or not path or not wanted.strip().isdigit():
        raise LmpruneError(f"--module must be PATH/modules.json:ID, not '{spec}'")
    mmap = read_module_map(path)
    check_module_map(mmap, identity, nmap, f"module map {path}")
    by_id = {int(m["id"]): m for m in mmap["modules"]}
    if int(wanted) not in by_id:
        raise LmpruneError(f"module {wanted} is not in {path} (ids: "
                           f"{', '.join(map(str, sorted(by_id)[:10]))}...)")
    record = {"path": path, "sha256": file_sha256(path), "id": int(wanted)}
    return module_neurons([by_id[int(wanted)]]), record


def designated_neurons(config: InduceConfig, identity: dict, nmap: NeuronMap
                       ) -> tuple[NeuronSet, dict]:
    """The designated region from --module, or drawn from --layers and --neurons-per-layer."""
    if config.module:
        neurons, record = module_from_map(config.module, identity, nmap)
        return neurons, {"source": "module", "module": record}
    layers = parse_layers(config.layers, nmap.num_layers)
    neurons = draw_neurons(nmap.widths, layers, config.neurons_per_layer, config.seed)
    return neurons, {"source": "drawn", "layers": config.layers,
                     "neurons_per_layer": config.neurons_per_layer, "seed": config.seed}


# --------------------------------------------------------------------------------------------
# Data: packed blocks, and which of their tokens are routed


def labelled_documents(count: int, fraction: float, seed: int) -> torch.Tensor:
    """A seeded share of `count` documents marked labelled [count] bool."""
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    labelled = torch.zeros(count, dtype=torch.bool)
    labelled[chosen[: round(fraction * count)]] = True
    return labelled


@dataclass
class Pass:
    """One forward/backward: blocks [batch, seq_len] and which of their next-token predictions
    count in its loss [batch, seq_len - 1] (position t predicts token t + 1)."""

    ids: torch.Tensor
    counted: torch.Tensor


class RoutedData:
    """Both corpora packed into blocks, and the routed tokens of the offensive ones.

    Each process and step takes its own offensive and clean blocks from two seeded block orders,
    so the data position is just the step count (as in fine-tuning) and resuming is exact.
    """

    def __init__(self, offensive: torch.Tensor, routed: torch.Tensor, clean: torch.Tensor,
                 batch_size: int, offensive_fraction: float, seed: int):
        self.offensive, self.routed, self.clean = offensive, routed, clean  # [n, seq_len]
        self.num_offensive = round(offensive_fraction * batch_size)
        self.num_clean = batch_size - self.num_offensive
        self.offensive_order = BlockOrder(len(offensive), seed)
        self.clean_order = BlockOrder(len(clean), seed + 1)
        # Offensive blocks join the clean pass when some of their tokens are not routed.
        self.unrouted_offensive = not bool(routed.all())

    @classmethod
    def build(cls, tokenizer, offensive: list[str], clean: list[str],
              config: InduceConfig) -> tuple[RoutedData, dict]:
        """Pack and label; returns the data and a record of the labelling."""
        from lmprune.core.ablation import toxic_token_ids

        off_blocks, documents = pack_documents(tokenizer, offensive, config.seq_len)
        clean_blocks, _ = pack_documents(tokenizer, clean, config.seq_len)
        labelled = labelled_documents(len(offensive), config.labelled_fraction, config.seed)
        routed = labelled[documents]  # [n_off_blocks, seq_len]
        record = {"labelled_documents": int(labelled.sum())}
        if config.route == "token":
            toxic = toxic_token_ids(tokenizer, offensive, clean, top=config.toxic_tokens)
            is_toxic = torch.zeros(int(off_blocks.max()) + 1, dtype=torch.bool)
            is_toxic[[t for t in toxic if t < len(is_toxic)]] = True
            routed &= is_toxic[off_blocks]
            record["toxic_token_ids"] = toxic
        record["routed_tokens"] = int(routed.sum())
        data = cls(off_blocks, routed, clean_blocks, config.batch_size, config.offensive_fraction,
                   config.seed)
        return data, record

    def passes(self, step: int, rank: int, nproc: int, device) -> tuple[Pass | None, Pass | None]:
        """The routed pass (offensive blocks) and the clean pass of one step on one process."""
        n_off, n_clean = self.num_offensive, self.num_clean
        routed_pass, ids, counted = None, [], []
        if n_off:
            index = self.offensive_order.take((step * nproc + rank) * n_off, n_off)
            blocks, routed = self.offensive[index], self.routed[index][:, 1:]
            routed_pass = Pass(blocks.to(device), routed.to(device))
            if self.unrouted_offensive:
                ids.append(blocks)
                counted.append(~routed)
        if n_clean:
            index = self.clean_order.take((step * nproc + rank) * n_clean, n_clean)
            ids.append(self.clean[index])
            counted.append(torch.ones(n_clean, self.clean.shape[1] - 1, dtype=torch.bool))
        clean_pass = Pass(torch.cat(ids).to(device), torch.cat(counted).to(device)) if ids else None
        return routed_pass, clean_pass


# --------------------------------------------------------------------------------------------
# The routed step


def masked_mean_nll(model: nn.Module, batch: Pass) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over the counted predictions (0, still differentiable, when none)."""
    logits = model(input_ids=batch.ids, use_cache=False).logits[:, :-1]  # [batch, pos-1, vocab]
    nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), batch.ids[:, 1:],
                                      reduction="none")  # [batch, pos-1]
    count = int(batch.counted.sum())
    return (nll * batch.counted).sum() / max(count, 1), count


def _clip(model: nn.Module, max_grad_norm: float) -> None:
    if max_grad_norm > 0:
        grads = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)


@contextlib.contextmanager
def hold(model: nn.Module, optimizer, designated: PruneMask, hold_designated: bool,
         hold_rest: bool):
    """Keep the regions that got no gradient bit-identical through `optimizer.step()`.

    AdamW moves a parameter whose gradient is zero (momentum, weight decay). Parameters wholly
    in a held region lose their gradient, so AdamW skips them; the parameters that hold
    designated slices are shared by both regions: their held part, weights and every moment
    of the same shape, is put back after the step.
    """
    if not (hold_designated or hold_rest):
        yield
        return
    saved = []
    with torch.no_grad():
        shared = set()
        for param, dim, index in designated.slices(model):
            shared.add(id(param))
            state = optimizer.state.get(param, {})
            moments = [v for k, v in state.items()
                       if k != "step" and torch.is_tensor(v) and v.shape == param.shape]
            for tensor in [param, *moments]:
                kept = tensor.clone() if hold_rest else tensor.index_select(dim, index)
                saved.append((tensor, dim, index, kept))
        if hold_rest:
            for param in model.parameters():
                if id(param) not in shared:
                    param.grad = None
    yield
    with torch.no_grad():
        for tensor, dim, index, kept in saved:
            if hold_rest:  # only the designated slices keep their update
                stepped = tensor.index_select(dim, index)
                tensor.copy_(kept).index_copy_(dim, index, stepped)
            else:
                tensor.index_copy_(dim, index, kept)


def routed_step(accelerator, model: nn.Module, optimizer, scheduler, designated: PruneMask,
                clean_reaches: str, offensive: Pass | None, clean: Pass | None,
                max_grad_norm: float) -> dict[str, float]:
    """One optimizer step from a routed pass and a clean pass (either may be None).

    Returns the two losses. See the module docstring for what reaches which parameters.
    """
    unwrapped = accelerator.unwrap_model(model)
    losses, counts = {}, torch.zeros(2, device=accelerator.device)
    routed_grads: dict[nn.Parameter, torch.Tensor] = {}
    if offensive is not None:
        loss, counts[0] = masked_mean_nll(model, offensive)
        accelerator.backward(loss)
        designated.mask_gradients_outside(unwrapped)
        _clip(unwrapped, max_grad_norm)
        routed_grads = {p: p.grad for p in unwrapped.parameters() if p.grad is not None}
        for p in routed_grads:
            p.grad = None
        losses["offensive"] = loss.item()
    if clean is not None:
        loss, counts[1] = masked_mean_nll(model, clean)
        accelerator.backward(loss)
        if clean_reaches == "rest":
            designated.mask_gradients(unwrapped)
        _clip(unwrapped, max_grad_norm)
        losses["clean"] = loss.item()
    for p, grad in routed_grads.items():
        p.grad = grad if p.grad is None else p.grad.add_(grad)

    if accelerator.num_processes > 1:  # every process must hold the same regions
        counts = accelerator.reduce(counts, "sum")
    routed_tokens, clean_tokens = counts.tolist()
    reaches_designated = routed_tokens > 0 or (clean_reaches == "all" and clean_tokens > 0)
    reaches_rest = clean_tokens > 0
    if reaches_designated or reaches_rest:
        with hold(unwrapped, optimizer, designated, not reaches_designated, not reaches_rest):
            optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


# --------------------------------------------------------------------------------------------
# The stage


def _check_config(config: InduceConfig) -> None:
    for name in ("model", "offensive", "clean", "out"):
        if not getattr(config, name):
            raise LmpruneError(f"--{name} is required")
    if Path(config.out).resolve() == Path(config.model).resolve():
        raise LmpruneError("--out must differ from --model (the input model is kept)")
    if (config.module is None) == (config.neurons_per_layer is None):
        raise LmpruneError("give the designated region as --neurons-per-layer N (with --layers) "
                           "or as --module PATH/modules.json:ID, one of the two")
    check_bounds(config)


def _fingerprint(config: InduceConfig, identity: dict, offensive_sha: str, clean_sha: str,
                 neurons: NeuronSet, nproc: int) -> dict:
    """What must be equal for a checkpoint to be resumed by this run (the input model by its
    weights, not its path)."""
    # the held-out documents only leave training when probing
    ignored = () if config.probe_every else ("probe_every", "probe_docs")
    model = identity.get("weights_sha256") or identity.get("revision") or identity.get("name")
    return {**{k: v for k, v in fingerprint_values(config).items() if k not in ignored},
            "model": model, "offensive_sha256": offensive_sha, "clean_sha256": clean_sha,
            "designated": neurons_to_json(neurons), "num_processes": nproc}


def induce(config: InduceConfig) -> Path:
    """Train with gradient routing; save OUT (checkpoint + lmprune.json) and OUT/modules.json."""
    from tqdm.auto import tqdm

    from lmprune.core.data import load_corpus
    from lmprune.core.models import save_model

    _check_config(config)
    check_out_dir(config.out, "checkpoint", config.overwrite)
    started = time.time()
    accelerator = start_accelerator(config.device, config.seed)
    main, rank, nproc = (accelerator.is_main_process, accelerator.process_index,
                         accelerator.num_processes)

    loaded = config.load(device=str(accelerator.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    previous = read_lineage(config.model) if loaded.source.kind == "folder" else None
    if (previous or {}).get("pruned_neurons"):
        raise LmpruneError(f"{config.model} is pruned already: induce a module in an unpruned "
                           f"model")
    nmap = NeuronMap(model)
    neurons, region = designated_neurons(config, loaded.identity, nmap)
    designated = PruneMask(model, neurons)

    offensive = load_corpus(config.offensive, config.max_docs)
    clean = load_corpus(config.clean, config.max_docs)
    trained, probe = split_held_out(offensive.texts, clean.texts, config)
    data, labelling = RoutedData.build(tokenizer, *trained, config)
    if probe is not None:
        probe = HeldOutProbe(tokenizer, *probe, neurons, nmap.widths, config,
                             str(accelerator.device))

    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, config.max_steps)
    fingerprint = _fingerprint(config, loaded.identity, offensive.sha256, clean.sha256, neurons,
                               nproc)
    store = CheckpointStore(config.out)
    step, resumed_from, last, curve = 0, None, {}, []
    if (state := store.resume(accelerator, model, optimizer, scheduler, fingerprint)):
        step = resumed_from = state["step"]
        last, curve = state["last_losses"], state.get("probe", [])

    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc="induce", disable=not main)

    def measure():
        if probe is not None and main and (not curve or curve[-1]["step"] < step):
            curve.append(probe.measure(unwrapped, step))
            bar.write(describe_probe(curve[-1]))
        accelerator.wait_for_everyone()

    if step == 0:
        measure()
    while step < config.max_steps:
        routed_pass, clean_pass = data.passes(step, rank, nproc, accelerator.device)
        last = routed_step(accelerator, model, optimizer, scheduler, designated,
                           config.clean_reaches, routed_pass, clean_pass, config.max_grad_norm)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
        if config.probe_every and (step % config.probe_every == 0 or step == config.max_steps):
            measure()
        if config.checkpoint_every and step % config.checkpoint_every == 0 \
                and step < config.max_steps:
            store.save(step, accelerator, model, optimizer, scheduler,
                       {"step": step, "fingerprint": fingerprint, "last_losses": last,
                        "probe": curve})
    bar.close()

    if main:
        unwrapped.eval()
        record = {
            "settings": {k: v for k, v in asdict(config).items() if k not in ("model", "out")},
            "region": region,
            "corpora": {"offensive": {**offensive.describe(), **labelling,
                                      "tokens": int(data.offensive.numel())},
                        "clean": {**clean.describe(), "tokens": int(data.clean.numel())}},
            "steps": config.max_steps, "last_losses": last, "num_processes": nproc,
            "resumed_from": resumed_from, "seconds": round(time.time() - started, 1)}
        if curve:
            record["probe"] = {"held_out_documents": config.probe_docs, "last": curve[-1]}
        meta = checkpoint_meta(loaded.identity, previous, neurons, nmap, record)
        files = {LINEAGE_FILE: meta}
        if curve:
            files[PROBE_FILE] = {"format": "lmprune.induce_probe", "format_version": 1,
                                 "held_out_documents": config.probe_docs,
                                 "random_sets": config.probe_random, "curve": curve}
        save_model(unwrapped, tokenizer, config.out, extra_files=files,
                   overwrite=config.overwrite)
        if curve:
            plot_probe(curve, Path(config.out) / PROBE_PLOT)
        # scored after saving: TokenBatches sets the tokenizer's padding side
        scores = score_module(unwrapped, tokenizer, neurons, offensive.texts, clean.texts, config)
        write_induced_map(config.out, loaded.identity, nmap, neurons, scores, region)
    accelerator.wait_for_everyone()
    return Path(config.out)


def split_held_out(offensive: list[str], clean: list[str], config: InduceConfig
                   ) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]] | None]:
    """(training documents of both corpora, the probe's held-out ones or None): with
    --probe-every the last --probe-docs documents of each corpus never reach training."""
    if not config.probe_every:
        return (offensive, clean), None
    held = config.probe_docs
    for name, texts in (("offensive", offensive), ("clean", clean)):
        if len(texts) <= held:
            raise LmpruneError(f"--{name} has {len(texts)} documents: the probe holds out "
                               f"--probe-docs {held} and training needs the rest; lower "
                               f"--probe-docs or give more documents")
    return (offensive[:-held], clean[:-held]), (offensive[-held:], clean[-held:])


PROBE_SCORES = ("loss_delta_offensive", "loss_delta_clean", "causal", "selectivity")


class HeldOutProbe:
    """What ablating the designated neurons does to the loss on documents that training never
    saw, beside random same-size sets (the same sets at every measurement): whether routing is
    building a module that carries the offensive text, or one no different from any neurons."""

    def __init__(self, tokenizer, offensive: list[str], clean: list[str], neurons: NeuronSet,
                 widths: list[int], config: InduceConfig, device: str):
        from lmprune.core.ablation import TokenBatches, random_control_sets

        side = tokenizer.padding_side  # TokenBatches pads right; the saved tokenizer must not
        self.batches = [TokenBatches.build(tokenizer, texts, config.seq_len, config.batch_size,
                                           device) for texts in (offensive, clean)]
        tokenizer.padding_side = side
        self.neurons = neurons
        self.controls = random_control_sets(neurons, widths, config.probe_random,
                                            np.random.default_rng([config.seed, 1]))

    def measure(self, model: nn.Module, step: int) -> dict:
        from lmprune.core.ablation import CausalScorer, control_summary

        training = model.training
        model.eval()
        scorer = CausalScorer(model, *self.batches)
        effects = [scorer.effect(zero) for zero in (self.neurons, *self.controls)]
        model.train(training)
        designated, *controls = [{k: e[k] for k in PROBE_SCORES} for e in effects]
        return {"step": step, "designated": designated, "random": controls,
                **control_summary(designated["causal"], [c["causal"] for c in controls])}


def describe_probe(point: dict) -> str:
    d = point["designated"]
    return (f"step {point['step']}: ablating the designated neurons on held-out text: "
            f"offensive loss {d['loss_delta_offensive']:+.3f}, clean {d['loss_delta_clean']:+.3f}"
            f" (causal {d['causal']:+.3f}; random sets {point['control_mean']:+.3f} mean, "
            f"above {point['control_percentile']:.0%} of them)")


def plot_probe(curve: list[dict], path: Path) -> Path:
    """Loss change from ablating the designated set (bold) and each random set (grey) on the
    held-out offensive and clean documents, against routing steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmprune.core.io import save_figure_atomic

    steps = [p["step"] for p in curve]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, corpus in zip(axes, ("offensive", "clean"), strict=True):
        key = f"loss_delta_{corpus}"
        for r in range(len(curve[0]["random"])):
            ax.plot(steps, [p["random"][r][key] for p in curve], color="0.6", lw=1,
                    label="random same-size sets" if r == 0 else None)
        ax.plot(steps, [p["designated"][key] for p in curve], color="C3", lw=2, marker="o",
                markersize=3, label="designated neurons")
        ax.axhline(0, color="0.3", lw=0.5)
        ax.set_title(f"held-out {corpus} documents")
        ax.set_xlabel("routing step")
    axes[0].set_ylabel("loss change when ablated (nats/token)")
    axes[0].legend()
    return save_figure_atomic(fig, path)


def score_module(model: nn.Module, tokenizer, neurons: NeuronSet, offensive: list[str],
                 clean: list[str], config: InduceConfig) -> dict:
    """What ablating the designated neurons does to the loss on the first `score_docs`
    documents of each corpus (`CausalScorer.effect`: causal, loss deltas, selectivity)."""
    from lmprune.core.ablation import CausalScorer, TokenBatches

    device = str(next(model.parameters()).device)
    batches = [TokenBatches.build(tokenizer, texts[: config.score_docs], config.seq_len,
                                  config.batch_size, device) for texts in (offensive, clean)]
    return CausalScorer(model, *batches).effect(neurons)


def checkpoint_meta(identity: dict, previous: dict | None, neurons: NeuronSet, nmap: NeuronMap,
                    record: dict) -> dict:
    """lmprune.json of the induced checkpoint: nothing pruned yet, the designated neurons."""

    return {
        **stamp(),
        "base_model": identity.get("base_model") or identity, "source_model": identity,
        "mode": "induced", "pruned_neurons": {}, "num_pruned": 0, "fraction_pruned": 0.0,
        "designated_neurons": neurons_to_json(neurons),
        "num_designated": count_neurons(neurons),
        "fraction_designated": count_neurons(neurons) / sum(nmap.widths),
        "induce": record, "command": command_line(),
        "history": [*(previous or {}).get("history", []),
                    {"stage": "induce", "steps": record["steps"],
                     "neurons": count_neurons(neurons), "time": utc_now(),
                     "seconds": record["seconds"]}],
    }


def write_induced_map(out: str | Path, identity: dict, nmap: NeuronMap, neurons: NeuronSet,
                      scores: dict, region: dict) -> Path:
    """OUT/modules.json: module 0 = the designated neurons, made for the saved checkpoint (its
    weights hash), so `lmprune prune --model OUT --modules OUT/modules.json` accepts it."""
    from lmprune.core.models import folder_weights_sha256

    out = Path(out)
    model = {"name": str(out), "kind": "folder", "model_type": nmap.model_type,
             "weights_sha256": folder_weights_sha256(out),
             "base_model": identity.get("base_model") or identity,
             "num_layers": nmap.num_layers, "neurons_per_layer": nmap.width(0)}
    members = [[layer, j] for layer, idx in neurons.items() for j in idx]
    module = {"id": 0, "members": members, "size": len(members), "layers": sorted(neurons),
              "scores": scores}
    return write_module_map(out / MODULES_FILE, {"model": model, "modules": [module],
                                                 "settings": {"method": "induced", **region}})


def run(config: InduceConfig) -> int:
    out = induce(config)
    meta = read_lineage(out)
    print(f"induced a module of {meta['num_designated']:,} neurons "
          f"({meta['fraction_designated']:.2%}) -> {out} (prune it with --modules "
          f"{Path(out) / MODULES_FILE} --select ids:0)")
    return 0


STAGE = StageSpec(
    "induce", InduceConfig, run,
    help="Train offensive text into chosen MLP neurons (gradient routing), so that pruning them "
         "removes it.")
register = STAGE.register
