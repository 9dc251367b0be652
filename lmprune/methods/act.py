"""Linear-AcT: transport each MLP neuron's activations on offensive text onto their distribution
on clean text with an affine map, folded into the weights.

Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations" (arXiv
2410.23054, 2024); reference code github.com/apple/ml-act (`linear_ot`: act/hooks/transport.py
`LinearOTHook`, act/optimal_transport/archs.py `LinearProj.optimize`, ot_maps.py `solve_ot_1d`,
act/configs/intervention_params/linear_ot.yaml).

For each edited layer l, in order, as the reference does:
  1. samples: every document's MLP hidden activations (the neurons: the input of the output
     projection, where `lmprune.core.hooks.NeuronHooks` reads), mean-pooled over its tokens
     (ml-act's `pooling_op: mean`, a nanmean over the attention mask: padding left out, the
     first token counted), on `max_docs` offensive documents (the source) and as many clean
     ones (the target);
  2. per neuron, both samples sorted (the optimal transport between two equal-size samples on a
     line matches them in sorted order), and w, b fitted by least squares so that w x_(i) + b ~
     y_(i): w = cov(x_sorted, y_sorted) / var(x), b = mean(y) - w mean(x), in float64;
  3. incrementally (ml-act's default `incremental: incr`): layer l's samples are taken with the
     maps of the layers before it already applied at full strength, so that each map is fitted on
     the activations it will transform (`--no-incremental`: every layer from one pass, `atonce`);
  4. the intervention at strength lambda in [0, 1], on every token (`intervention_position:
     all`): h' = (1 - lambda) h + lambda (w h + b) = a h + c, a = 1 + lambda (w - 1), c =
     lambda b. The maps are fitted at strength 1 and blended afterwards, as ml-act varies the
     strength of maps learned once.

A weight edit: h' feeds only the output projection W, so W <- W diag(a) and its bias <- bias +
W c; the result is an ordinary checkpoint that every other stage loads. GPT-2 (`c_proj`, Conv1D:
[d_mlp, d_model]), GPT-J, GPT-NeoX, OPT and Phi have that bias of their own; LLaMA and Granite
get one from `mlp_bias: true` in their config (the gate and up projections' new biases are
zero); models with neither (Qwen2, Mistral, Gemma, ...: `lmprune.core.arch` `output_bias`,
`bias_key`) are refused before any weight is read. Strength 0 changes nothing, bit for bit.

Where this differs from the reference: ml-act transports a value only where it lies inside the
source sample's range for that neuron (`quantiles_src: q_0_100`) and leaves it alone outside; a
mask that depends on the value is no weight edit, so here every value is transported. ml-act's
default modules for text are the layer norms' outputs (GPT-2: every `ln_*`; Gemma-2: the post-
attention and post-feedforward norms; its `icml24` setting the MLP projections' outputs); here
only the MLP hidden neurons, the units every other lmprune method addresses. The samples are the
first `max_docs` documents of each corpus (ml-act: a random class-balanced subset of Jigsaw
toxic and non-toxic comments), the longer corpus cut to the shorter's count. A neuron whose
source sample is constant (a pruned one: always 0) keeps w = 1, b = mean(y) - mean(x) (ml-act
adds 1e-8 noise to x instead), so zeroed neurons stay zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmprune.core.arch import ARCHITECTURES, NeuronMap, parse_layers
from lmprune.core.config import StageSpec, check_bounds, option
from lmprune.core.data import Corpus, load_corpus
from lmprune.core.errors import LmpruneError, warn
from lmprune.core.hooks import NeuronHooks
from lmprune.core.io import check_out_dir
from lmprune.core.lineage import LINEAGE_FILE, command_line, read_lineage, stamp, utc_now
from lmprune.core.masks import count_neurons, neurons_to_json, normalize_neurons
from lmprune.core.specs import WeightEditSpec

# a source sample whose spread is below this share of its size counts as constant
FLAT = 1e-9

Maps = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""{layer: (scale, shift)}, each [d_mlp]: the neurons of `layer` become scale * h + shift."""


@dataclass
class ActConfig(WeightEditSpec):
    """lmprune act: transport MLP neuron activations from offensive to clean text (Linear-AcT)."""

    offensive: str = option("paradetox:toxic", "Corpus spec of offensive text: the source "
                            "distribution (see lmprune.core.data).", corpus=True)
    clean: str = option("paradetox:neutral", "Corpus spec of clean text: the target "
                        "distribution.", corpus=True)
    max_docs: int = option(512, "Documents of each corpus, the first ones (the longer corpus is "
                           "cut to the shorter's count: the sorted samples pair one to one).",
                           min=1)
    strength: float = option(1.0, "The paper's lambda in [0, 1]: h' = (1 - lambda) h + lambda "
                             "(w h + b); 0 leaves the model unchanged.", min=0, max=1)
    layers: str = option("all", "Layers whose MLP neurons are transported: all, a list (3,4,5) "
                         "or an inclusive range (10-20).")
    incremental: bool = option(True, "Fit the layers in order, each on activations the maps of "
                               "the layers before it have transported (ml-act's default); "
                               "--no-incremental fits every layer from the untouched model.")
    max_length: int = option(128, "Tokens per document (ml-act: 128).", min=1)
    batch_size: int = option(32, "Documents per forward pass.", min=1)
    overwrite: bool = option(False, "Replace an existing --out folder that is not an lmprune "
                             "checkpoint (its files are lost).", stage_key=False)


def check_config(config: ActConfig) -> None:
    """The checks that need neither the model nor the corpora."""
    check_bounds(config)


# --------------------------------------------------------------------------------------------
# The map


def fit_linear_map(source, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, b, constant), each [d], of the least-squares lines through the sorted samples of
    every column of `source` and `target` [n, d] (float64): w x_(i) + b ~ y_(i). A column whose
    source sample is constant (`constant` True) gets w = 1, b = mean(y) - mean(x)."""
    x = torch.as_tensor(source, dtype=torch.float64).sort(dim=0).values
    y = torch.as_tensor(target, dtype=torch.float64).sort(dim=0).values
    if x.shape != y.shape or x.dim() != 2 or len(x) == 0:
        raise ValueError(f"need two samples of the same shape [n, d], not {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    mean_x, mean_y = x.mean(0), y.mean(0)
    dx, dy = x - mean_x, y - mean_y
    var_x = dx.square().mean(0)
    constant = var_x.sqrt() <= FLAT * mean_x.abs().clamp(min=1.0)
    w = torch.where(constant, 1.0, (dx * dy).mean(0) / torch.where(constant, 1.0, var_x))
    return w, mean_y - w * mean_x, constant


def blend(w: torch.Tensor, b: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) of h' = (1 - strength) h + strength (w h + b) = a h + c; strength 0 gives exactly
    (1, 0), and so does a neuron with w = 1, b = 0 at any strength."""
    return 1 + strength * (w - 1), strength * b


def transport_hooks(model: nn.Module, maps: Maps, neuron_map: NeuronMap | None = None
                    ) -> NeuronHooks:
    """Hooks (a context manager) that apply `maps` {layer: (a, c)} to the neurons on the fly:
    h' = a * h + c at the input of each output projection; what the folded weights compute."""
    return NeuronHooks(model, lambda layer, acts: transported(maps, layer, acts), sorted(maps),
                       neuron_map)


def transported(maps: Maps, layer: int, acts: torch.Tensor) -> torch.Tensor | None:
    """a * acts + c with the map {layer: (a, c)} of `layer`, in the activations' device and
    dtype; None (unchanged) for a layer without one."""
    if layer not in maps:
        return None
    a, c = (t.to(acts.device, acts.dtype) for t in maps[layer])
    return acts * a + c


# --------------------------------------------------------------------------------------------
# Samples


@dataclass
class _Batch:
    index: torch.Tensor
    """Positions of its documents in the corpus."""
    ids: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    """[batch, pos, 1] float64: 1 / (real tokens) on real tokens, 0 on padding: the token mean."""


def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int,
             device) -> list[_Batch]:
    """The corpus tokenized once, right-padded, documents of similar length sharing a batch."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True,
                                             max_length=max_length).input_ids]
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(texts), batch_size):
        index = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, padding_side="right")
        mask = enc.attention_mask
        weights = (mask / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(-1)
        batches.append(_Batch(torch.as_tensor(index), enc.input_ids.to(device), mask.to(device),
                              weights.to(device, torch.float64)))
    return batches


class _Caught(Exception):
    """Raised by the pre-hook of the first block once it has seen that block's inputs."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("first block reached")
        self.inputs, self.kwargs = args, kwargs


class _Sweep:
    """One corpus carried through the blocks one at a time: the hidden states entering the
    current block are kept per batch, so each layer costs a pass of its own block (ml-act's
    incremental fitting re-runs the model from the start for every layer: L / 2 passes of the
    whole model). The blocks' other inputs (mask, positions, rotary embeddings) are those the
    model gives its first block; every architecture `lmprune act` folds into gives all its
    blocks the same."""

    def __init__(self, model: nn.Module, nmap: NeuronMap, batches: list[_Batch]):
        self.model, self.nmap, self.batches = model, nmap, batches
        self.blocks = model.get_submodule(nmap.blocks_path)
        self.states: list[torch.Tensor] = []
        self.extra: list[tuple[tuple, dict]] = []
        self.layer = 0
        handle = self.blocks[0].register_forward_pre_hook(self._catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    try:
                        model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
                    except _Caught as caught:
                        self.states.append(caught.inputs[0])
                        self.extra.append((caught.inputs[1:], caught.kwargs))
                    else:
                        raise LmpruneError(f"{type(model).__name__} never called its first "
                                           f"block ({nmap.blocks_path}.0)")
        finally:
            handle.remove()

    @staticmethod
    def _catch(module, args, kwargs):
        if not args:  # the hidden states passed by keyword
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        raise _Caught(args, kwargs)

    @torch.no_grad()
    def run(self, n_docs: int | None = None, maps: Maps | None = None,
            advance: bool = True) -> torch.Tensor | None:
        """Run the current block over every batch, with `maps` {layer: (a, c)} applied to its
        neurons, and (`advance`) move on to the next block. With `n_docs`, returns the block's
        neuron activations before the map, mean-pooled per document: [n_docs, d_mlp] float64,
        CPU."""
        layer, block = self.layer, self.blocks[self.layer]
        maps = maps or {}
        rows: list[torch.Tensor] = []
        current: list[_Batch] = []

        def fn(hooked: int, acts: torch.Tensor):
            if n_docs is not None:
                rows.append((acts.double() * current[0].weights).sum(1).cpu())
            return transported(maps, hooked, acts)

        hooks = NeuronHooks(self.model, fn, [layer], self.nmap)
        with hooks:
            for k, batch in enumerate(self.batches):
                current[:] = [batch]
                hooks.batch_shape = tuple(batch.ids.shape[:2])
                args, kwargs = self.extra[k]
                out = block(self.states[k], *args, **kwargs)
                if advance:
                    self.states[k] = out[0] if isinstance(out, tuple) else out
        hooks.forwards = len(self.batches)  # the blocks ran without the model's own pre-hook
        hooks.check_fired()
        if advance:
            self.layer += 1
        if n_docs is None:
            return None
        pooled = torch.zeros(n_docs, rows[0].shape[-1], dtype=torch.float64)
        pooled[torch.cat([b.index for b in self.batches])] = torch.cat(rows)
        return pooled


@torch.no_grad()
def pooled_activations(model: nn.Module, tokenizer, texts: list[str], layers: list[int],
                       maps: Maps | None = None, after: bool = False, batch_size: int = 32,
                       max_length: int = 128) -> dict[int, torch.Tensor]:
    """Each text's neuron activations at each of `layers`, mean-pooled over its tokens (padding
    left out), from whole forward passes with `maps` {layer: (a, c)} applied on the way; `after`
    pools a layer's activations after its own map. {layer: [len(texts), d_mlp] float64, CPU}"""
    nmap = NeuronMap(model)
    device = next(model.parameters()).device
    maps = maps or {}
    out = {layer: torch.zeros(len(texts), nmap.width(layer), dtype=torch.float64)
           for layer in layers}
    current: list[_Batch] = []

    def fn(layer: int, acts: torch.Tensor):
        moved = transported(maps, layer, acts)
        if layer in out:
            seen = moved if after and moved is not None else acts
            out[layer][current[0].index] = (seen.double() * current[0].weights).sum(1).cpu()
        return moved

    hooks = NeuronHooks(model, fn, sorted(set(layers) | set(maps)), nmap)
    with hooks:
        for batch in _batches(tokenizer, texts, batch_size, max_length, device):
            current[:] = [batch]
            model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    hooks.check_fired()
    return out


def fit_maps(model: nn.Module, tokenizer, offensive: list[str], clean: list[str],
             layers: list[int], incremental: bool = True, batch_size: int = 32,
             max_length: int = 128) -> tuple[Maps, dict[int, torch.Tensor]]:
    """({layer: (w, b)} at strength 1, {layer: constant-source mask}) fitted on pooled
    activations of the two corpora (equal counts), layer by layer."""
    if len(offensive) != len(clean):
        raise ValueError("the two corpora need as many documents each")
    nmap = NeuronMap(model)
    device = next(model.parameters()).device
    sweeps = {side: _Sweep(model, nmap, _batches(tokenizer, texts, batch_size, max_length,
                                                 device))
              for side, texts in (("offensive", offensive), ("clean", clean))}
    n = len(offensive)
    maps: Maps = {}
    constant: dict[int, torch.Tensor] = {}
    wanted = set(layers)
    for layer in tqdm(range(max(layers) + 1), desc="act: fit", unit="layer"):
        if layer not in wanted:
            for sweep in sweeps.values():
                sweep.run()
        elif incremental:  # fit on what the earlier maps left, then carry this map forward
            x, y = (sweeps[side].run(n, advance=False) for side in ("offensive", "clean"))
            w, b, constant[layer] = fit_linear_map(x, y)
            maps[layer] = (w, b)
            if layer < max(layers):
                for sweep in sweeps.values():
                    sweep.run(maps={layer: (w, b)})
        else:  # every layer from the untouched model: one pass
            x, y = (sweeps[side].run(n) for side in ("offensive", "clean"))
            w, b, constant[layer] = fit_linear_map(x, y)
            maps[layer] = (w, b)
    return maps, constant


# --------------------------------------------------------------------------------------------
# The weight edit


def fold_support(nmap: NeuronMap) -> str | None:
    """How the output projections get the bias the fold writes: None when they have one of their
    own, else the config flag that adds one; refuses a model with neither."""
    if getattr(nmap.output_projection(0), "bias", None) is not None:
        return None
    if nmap.layout.bias_key:
        return nmap.layout.bias_key
    own = sorted(t for t, layout in ARCHITECTURES.items() if layout.output_bias)
    flag = sorted(t for t, layout in ARCHITECTURES.items() if layout.bias_key)
    raise LmpruneError(
        f"lmprune act cannot fold its transport into model_type '{nmap.model_type}': the MLP "
        f"output projection ({nmap.layout.output}) has no bias and no config flag adds one; "
        f"supported: {', '.join(own)} (a bias of their own) and {', '.join(flag)} (mlp_bias)")


@torch.no_grad()
def add_mlp_biases(model: nn.Module, nmap: NeuronMap, key: str) -> None:
    """Set the config flag `key` (LLaMA's `mlp_bias`) and give every MLP projection of every
    layer the zero bias that flag builds, so that the saved folder reloads as it is."""
    config = getattr(model.config, "text_config", None) or model.config
    setattr(config, key, True)
    for mlp in nmap.mlps:
        for name in (*nmap.layout.inputs, nmap.layout.output):
            proj = getattr(mlp, name)
            if proj.bias is None:
                weight = proj.weight
                proj.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                     device=weight.device))


@torch.no_grad()
def fold(nmap: NeuronMap, layer: int, a: torch.Tensor, c: torch.Tensor) -> None:
    """Make the output projection of `layer` read a * h + c where it read h, in place: W <- W
    diag(a), bias <- bias + W c (the bias must exist: `fold_support`, `add_mlp_biases`)."""
    proj = nmap.output_projection(layer)
    weight = proj.weight
    w = weight.double()
    a, c = a.to(weight.device, torch.float64), c.to(weight.device, torch.float64)
    if nmap.layout.conv1d:  # GPT-2's Conv1D: [d_mlp, d_model], the output is h @ W + bias
        shift, edited = c @ w, w * a[:, None]
    else:  # Linear [d_model, d_mlp]: W h + bias
        shift, edited = w @ c, w * a[None, :]
    weight.copy_(edited.to(weight.dtype))
    if bool(c.ne(0).any()):
        proj.bias.copy_((proj.bias.double() + shift).to(proj.bias.dtype))


def _summary(w: torch.Tensor, b: torch.Tensor, constant: torch.Tensor) -> dict:
    """What lmprune.json keeps of one layer's fitted map."""
    q = torch.quantile(w, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"w_quantiles_5_50_95": [round(v, 6) for v in q],
            "b_abs_mean": round(float(b.abs().mean()), 6),
            "constant_source": int(constant.sum())}


# --------------------------------------------------------------------------------------------
# The stage


def read_corpora(config: ActConfig, quiet: bool = False) -> tuple[Corpus, Corpus]:
    """The first `max_docs` documents of each corpus, the longer one cut to the shorter's count;
    a warning says so, and when a corpus has fewer than `max_docs` (none with `quiet`)."""
    offensive = load_corpus(config.offensive, limit=config.max_docs)
    clean = load_corpus(config.clean, limit=config.max_docs)
    n = min(len(offensive.texts), len(clean.texts))
    for corpus in () if quiet else (offensive, clean):
        if len(corpus.texts) < config.max_docs:
            warn(f"--max-docs {config.max_docs}, but '{corpus.spec}' has {len(corpus.texts)} "
                 f"documents")
    if not quiet and len(offensive.texts) != len(clean.texts):
        warn(f"using {n} documents of each corpus (sorting pairs equal-size samples)")
    return (Corpus(offensive.spec, offensive.resolved, offensive.texts[:n]),
            Corpus(clean.spec, clean.resolved, clean.texts[:n]))


def check_model(config: ActConfig, nmap: NeuronMap) -> list[int]:
    """The edited layers; refuses a model whose output projections cannot take the fold."""
    fold_support(nmap)
    return parse_layers(config.layers, nmap.num_layers)


def act_edit(config: ActConfig, loaded, offensive: Corpus, clean: Corpus) -> dict:
    """Fit the maps on the two corpora (`read_corpora`) and fold them into `loaded.model` in
    place; returns the lmprune.json to save with it."""
    started = time.perf_counter()
    model = loaded.model
    nmap = NeuronMap(model)
    layers = check_model(config, nmap)
    maps, constant = fit_maps(model, loaded.tokenizer, offensive.texts, clean.texts, layers,
                              config.incremental, config.batch_size, config.max_length)
    blended = {layer: blend(w, b, config.strength) for layer, (w, b) in maps.items()}
    edited = sum(int(((a != 1) | (c != 0)).sum()) for a, c in blended.values())
    key = fold_support(nmap)
    shifted = any(bool(c.ne(0).any()) for _, c in blended.values())
    if key and shifted:
        add_mlp_biases(model, nmap, key)
    for layer, (a, c) in blended.items():
        fold(nmap, layer, a, c)
    previous = read_lineage(loaded.source.path) if loaded.source.kind == "folder" else None
    previous = previous or {}
    # earlier zeroed neurons stay zero: a neuron that is always 0 keeps w = 1, b = 0
    pruned = normalize_neurons(previous.get("pruned_neurons", {}))
    record = {
        "offensive": offensive.describe(), "clean": clean.describe(),
        "documents": len(offensive.texts), "strength": config.strength, "layers": layers,
        "incremental": config.incremental, "pooling": "mean over each document's tokens",
        "max_length": config.max_length, "neurons_edited": edited,
        "neurons_in_layers": sum(nmap.width(layer) for layer in layers),
        "bias_added": key if key and shifted else None,
        "per_layer": {str(layer): _summary(*maps[layer], constant[layer]) for layer in layers},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return {
        **previous,
        **stamp(),
        "base_model": loaded.identity.get("base_model") or loaded.identity,
        "source_model": loaded.identity,
        "mode": "act",
        "pruned_neurons": neurons_to_json(pruned),
        "num_pruned": count_neurons(pruned),
        "fraction_pruned": count_neurons(pruned) / sum(nmap.widths),
        "act": record,
        "command": command_line(),
        "history": [*previous.get("history", []), {
            "stage": "act", "strength": config.strength, "layers": layers,
            "documents": len(offensive.texts), "neurons_edited": edited, "time": utc_now(),
            "seconds": record["seconds"]}],
    }


def run(config: ActConfig) -> int:
    from lmprune.core.models import save_model

    check_config(config)
    if not config.out:
        raise LmpruneError("--out DIR is required (the folder of the edited checkpoint)")
    check_out_dir(config.out, "checkpoint", config.overwrite)
    # layers and the fold checked on the model built without weights: bad input costs no load
    check_model(config, NeuronMap(config.skeleton()))
    offensive, clean = read_corpora(config)
    loaded = config.load()
    meta = act_edit(config, loaded, offensive, clean)
    save_model(loaded.model, loaded.tokenizer, config.out,
               extra_files={LINEAGE_FILE: meta}, overwrite=config.overwrite)
    record = meta["act"]
    print(f"transported {record['neurons_edited']} of {record['neurons_in_layers']} MLP neurons "
          f"in {len(record['layers'])} layers at strength {config.strength:g} "
          f"({record['documents']} documents per corpus) -> {config.out}")
    return 0


STAGE = StageSpec(
    "act", ActConfig, run,
    help="Linear-AcT (Rodriguez et al. 2024): per MLP neuron, an affine map transporting its "
         "activations on offensive text onto those on clean text, folded into the output "
         "projection.")
register = STAGE.register
