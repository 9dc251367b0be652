"""ProFS: project a toxic subspace out of the weights with which the MLPs write the residual stream.

Uppaal, Dey, He, Zhong and Hu, "Model Editing as a Robust and Denoised variant of DPO: A Case
Study on Toxicity" (ICLR 2025, arXiv 2405.13967; first titled "DeTox: Toxic Subspace Projection
for Model Editing"); reference code github.com/Uppaal/detox-edit (`detox.py`, `configs/*.ini`).

For each edited layer l, as the reference does:
  1. sentence embeddings: the residual stream after block l (the block's output, before any
     final norm), averaged over the text's tokens, for every offensive text and its clean pair;
  2. the preference matrix T = (offensive - clean) / 2, one row per pair [n_pairs, d_model];
  3. centering: T loses its component along the top right singular vector of the clean
     embeddings, the direction of their large shared mean (the paper's "stopword" direction),
     which every sentence carries and which would otherwise lead the SVD of noisy pairs;
  4. the top `rank` right singular vectors U of T span the toxic subspace [d_model, rank];
  5. the MLP's output projection W (down_proj, c_proj, fc2, dense_4h_to_h, ...) becomes
     (I - U U^T) W, so the MLP can no longer write along U.
No neuron is zeroed, and the projection's bias is kept (the reference edits weights only)
unless `bias` is set. The published settings: rank 2 on GPT-2 medium (10 on the 6-7B models),
layers 10-23 of its 24 (`lowest_layer_to_edit`, `highest_layer_to_edit` exclusive), 500 pairs,
centering on, texts cut at 128 tokens; the keys (MLP input projections) are left alone.

Where this differs from the reference: the pairs default to ParaDetox (a toxic sentence and its
human-written neutral paraphrase; the reference uses the PPLM-perturbed continuations of Lee et
al., 2024); the token mean skips padding (the reference averages padded positions too); a
subsample keeps the pairs aligned (the reference draws the two sides' subsets independently);
and the default layers are the upper half.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmprune.core.arch import NeuronMap, parse_layers
from lmprune.core.config import StageSpec, check_bounds, option
from lmprune.core.data import Pairs, load_pairs
from lmprune.core.errors import ConfigError, LmpruneError, warn
from lmprune.core.io import check_out_dir
from lmprune.core.lineage import LINEAGE_FILE, command_line, read_lineage, stamp, utc_now
from lmprune.core.masks import count_neurons, neurons_to_json, normalize_neurons
from lmprune.core.specs import WeightEditSpec

# singular values recorded per layer: enough to see where the spectrum drops
KEPT_SINGULAR_VALUES = 16


@dataclass
class ProfsConfig(WeightEditSpec):
    """lmprune profs: project a toxic subspace out of the MLP output weights (ProFS)."""

    pairs: str = option("paradetox", "Paired texts, an offensive one and its clean rewrite: "
                        "paradetox, or FILE.tsv|csv|jsonl?offensive=COL&clean=COL, or "
                        "hf:ID?split=S&offensive=COL&clean=COL.")
    max_pairs: int = option(500, "Pairs used, drawn with --seed when there are more (the "
                            "paper: 500).", min=1)
    rank: int = option(2, "Dimensions of the toxic subspace (the paper: 2 on GPT-2, 10 on 7B "
                       "models).", min=1)
    layers: str = option("upper", "Layers whose MLP is edited: upper (the upper half), all, a "
                         "list (3,4,5) or an inclusive range (10-20).")
    centering: bool = option(True, "Project the clean embeddings' top singular direction (their "
                             "shared mean) out of the preference matrix first.")
    first_token: bool = option(True, "Count each text's first token in its mean (the reference "
                               "does). --no-first-token leaves it out: where the first token "
                               "carries a massive activation (Sun et al. 2024), its 1/length "
                               "share makes sentence length lead the SVD (SmolLM2 does).")
    bias: bool = option(False, "Also project the output projection's bias (the reference "
                        "edits weights only).")
    max_length: int = option(128, "Tokens per text.", min=1)
    batch_size: int = option(32, "Texts per forward pass.", min=1)
    seed: int = option(0, "Seed of the drawn pairs.")
    overwrite: bool = option(False, "Replace an existing --out folder that is not an lmprune "
                             "checkpoint (its files are lost).", stage_key=False)


def check_config(config: ProfsConfig) -> None:
    """The checks that need neither the model nor the pairs."""
    check_bounds(config)


def edit_layers(spec: str, num_layers: int) -> list[int]:
    """'upper' (layers L/2 .. L-1) or a `parse_layers` spec ('all', '3,4,5', '10-20')."""
    if spec.strip() == "upper":
        return list(range(num_layers // 2, num_layers))
    return parse_layers(spec, num_layers)


def d_model(nmap: NeuronMap) -> int:
    """Width of the residual stream, read from an output projection."""
    weight = nmap.output_projection(0).weight  # Linear [d_model, d_mlp]; Conv1D [d_mlp, d_model]
    return weight.shape[1] if nmap.layout.conv1d else weight.shape[0]


# --------------------------------------------------------------------------------------------
# Embeddings and the subspace


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], layers: list[int],
                        batch_size: int = 32, max_length: int = 128, desc: str = "texts",
                        first_token: bool = True) -> torch.Tensor:
    """Each text's mean residual stream after each block of `layers` (padding left out, and the
    first token unless `first_token`; a one-token text keeps it), float32 on the CPU, in the
    order of `texts`. [len(layers), len(texts), d_model]"""
    nmap = NeuronMap(model)
    blocks = model.get_submodule(nmap.blocks_path)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module, args, output):
            # a block's own output: HF's last hidden state has the final norm applied
            captured[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    # texts of similar length share a batch (less padding); rows go back to text order below
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True,
                                             max_length=max_length).input_ids]
    order = np.argsort(lengths, kind="stable")
    out = torch.zeros(len(layers), len(texts), d_model(nmap))
    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=f"embeddings: {desc}",
                          unit="batch"):
            index = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length, padding_side="right")
            mask = enc.attention_mask.to(device)  # [batch, pos]
            model(input_ids=enc.input_ids.to(device), attention_mask=mask, use_cache=False)
            counted = mask.clone()
            if not first_token:
                counted[:, 0] *= mask.sum(1) == 1  # right padding: position 0 is the first
            weights = (counted / counted.sum(1, keepdim=True)).unsqueeze(-1).float()
            # [batch, pos, 1]
            for k, layer in enumerate(layers):
                hidden = captured[layer].float()  # [batch, pos, d_model]
                out[k, torch.as_tensor(index)] = (hidden * weights).sum(1).cpu()
    finally:
        for handle in handles:
            handle.remove()
    return out


def toxic_subspace(offensive: torch.Tensor, clean: torch.Tensor, rank: int,
                   centering: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, singular values) of one layer's paired embeddings [n_pairs, d_model] each: U
    [d_model, rank] spans the top right singular vectors of the (centered) preference matrix;
    the singular values are all of them, largest first. [min(n_pairs, d_model)]"""
    prefs = (offensive.float() - clean.float()) / 2  # [n_pairs, d_model]
    if centering:
        mean_dir = torch.linalg.svd(clean.float(), full_matrices=False).Vh[0]  # [d_model]
        prefs = prefs - torch.outer(prefs @ mean_dir, mean_dir)
    _, values, vh = torch.linalg.svd(prefs, full_matrices=False)  # vh [min(n, d), d_model]
    return vh[:rank].T.contiguous(), values


@torch.no_grad()
def project_out(nmap: NeuronMap, layer: int, basis: torch.Tensor, bias: bool = False) -> None:
    """W <- (I - U U^T) W for the output projection of `layer`, in place: its output loses the
    component along the orthonormal columns of `basis` U [d_model, rank]."""
    proj = nmap.output_projection(layer)
    weight = proj.weight
    u = basis.to(weight.device, torch.float32)
    w = weight.float()
    if nmap.layout.conv1d:  # [d_mlp, d_model]: the output is h @ W, so W <- W (I - U U^T)
        edited = w - (w @ u) @ u.T
    else:  # Linear [d_model, d_mlp]: the output is W h
        edited = w - u @ (u.T @ w)
    weight.copy_(edited.to(weight.dtype))
    if bias and getattr(proj, "bias", None) is not None:
        b = proj.bias.float()
        proj.bias.copy_((b - u @ (u.T @ b)).to(proj.bias.dtype))


# --------------------------------------------------------------------------------------------
# The stage


def read_pairs(config: ProfsConfig) -> Pairs:
    """The pairs the edit uses: `max_pairs` of them, drawn with `seed`."""
    pairs = load_pairs(config.pairs)
    if len(pairs) < config.rank:
        raise LmpruneError(f"pairs '{config.pairs}' has {len(pairs)} pair(s): a rank-"
                           f"{config.rank} subspace needs at least {config.rank}")
    return pairs.sample(config.max_pairs, config.seed)


def check_model(config: ProfsConfig, nmap: NeuronMap) -> list[int]:
    """The edited layers; refuses a rank the residual stream cannot hold."""
    layers = edit_layers(config.layers, nmap.num_layers)
    width = d_model(nmap) - int(config.centering)  # centering takes one direction
    if config.rank > width:
        less = ", less the centering direction" if config.centering else ""
        raise ConfigError("rank", f"{config.rank} is larger than the hidden size "
                                  f"({d_model(nmap)}{less}): at most {width}")
    return layers


def profs_edit(config: ProfsConfig, loaded, pairs: Pairs) -> dict:
    """Edit `loaded.model` in place with `pairs` (`read_pairs`); returns the lmprune.json to
    save with it."""
    started = time.perf_counter()
    nmap = NeuronMap(loaded.model)
    layers = check_model(config, nmap)
    if len(pairs) < config.max_pairs:
        warn(f"--max-pairs {config.max_pairs}, but '{config.pairs}' has {len(pairs)} pairs: "
             f"using them all")
    model, tok = loaded.model, loaded.tokenizer
    embed = {side: sentence_embeddings(model, tok, texts, layers, config.batch_size,
                                       config.max_length, side, config.first_token)
             for side, texts in (("offensive", pairs.offensive), ("clean", pairs.clean))}
    per_layer = {}
    for k, layer in enumerate(tqdm(layers, desc="profs: project", unit="layer")):
        basis, values = toxic_subspace(embed["offensive"][k], embed["clean"][k], config.rank,
                                       config.centering)
        project_out(nmap, layer, basis, config.bias)
        energy = values.square()
        per_layer[str(layer)] = {
            "singular_values": values[:KEPT_SINGULAR_VALUES].tolist(),
            # share of the preference matrix's energy inside the subspace
            "explained": float(energy[:config.rank].sum() / energy.sum()),
        }
    previous = read_lineage(loaded.source.path) if loaded.source.kind == "folder" else None
    previous = previous or {}
    # earlier zeroed neurons stay zero: a zero column of W stays zero in (I - U U^T) W
    pruned = normalize_neurons(previous.get("pruned_neurons", {}))
    record = {"pairs": pairs.describe(), "rank": config.rank, "layers": layers,
              "centering": config.centering, "first_token": config.first_token,
              "bias": config.bias,
              "max_length": config.max_length, "seed": config.seed, "per_layer": per_layer,
              "seconds": round(time.perf_counter() - started, 1)}
    return {
        **previous,
        **stamp(),
        "base_model": loaded.identity.get("base_model") or loaded.identity,
        "source_model": loaded.identity,
        "mode": "profs",
        "pruned_neurons": neurons_to_json(pruned),
        "num_pruned": count_neurons(pruned),
        "fraction_pruned": count_neurons(pruned) / sum(nmap.widths),
        "profs": record,
        "command": command_line(),
        "history": [*previous.get("history", []), {
            "stage": "profs", "rank": config.rank, "layers": layers, "pairs": len(pairs),
            "centering": config.centering, "time": utc_now(), "seconds": record["seconds"]}],
    }


def run(config: ProfsConfig) -> int:
    from lmprune.core.models import save_model

    check_config(config)
    if not config.out:
        raise LmpruneError("--out DIR is required (the folder of the edited checkpoint)")
    check_out_dir(config.out, "checkpoint", config.overwrite)
    pairs = read_pairs(config)
    # layers and rank checked on the model built without weights: bad input costs no load
    check_model(config, NeuronMap(config.skeleton()))
    loaded = config.load()
    meta = profs_edit(config, loaded, pairs)
    save_model(loaded.model, loaded.tokenizer, config.out,
               extra_files={LINEAGE_FILE: meta}, overwrite=config.overwrite)
    record = meta["profs"]
    print(f"projected a rank-{config.rank} toxic subspace out of the MLP output weights of "
          f"{len(record['layers'])} layers ({record['pairs']['pairs']} pairs) -> {config.out}")
    return 0


STAGE = StageSpec(
    "profs", ProfsConfig, run,
    help="ProFS (Uppaal et al. 2025): project a toxic subspace, found by SVD of paired "
         "toxic/clean embeddings, out of the MLP output weights.",
    sources=("pairs",))
register = STAGE.register
