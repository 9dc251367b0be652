"""README "lmprune act": what ml-act's range mask does on SmolLM2. The maps of `lmprune act`'s
defaults (512 ParaDetox documents per side, every layer, incremental), applied with hooks; the
WikiText-2 test perplexity of its first 2,048 tokens (4 windows of 512) for the base, the
transport as `lmprune act` folds it (every value) at three strengths, and ml-act's `linear_ot`
default (`quantiles_src: q_0_100`: a value moves only inside the source sample's range for its
neuron), which no weight edit can express; and the share of token values inside that range:
    LMPRUNE_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python docs/results/act_range_mask.py"""

import math

import torch

from lmprune.core.data import load_corpus
from lmprune.core.hooks import NeuronHooks
from lmprune.core.models import load_model
from lmprune.methods.act import blend, fit_maps, pooled_activations

torch.set_num_threads(1)
loaded = load_model("smollm2-135m", dtype="float32")
model, tok = loaded.model, loaded.tokenizer
off, clean = (load_corpus(spec, 512).texts for spec in ("paradetox:toxic", "paradetox:neutral"))
layers = list(range(30))
maps, _ = fit_maps(model, tok, off, clean, layers)
# the source samples each map was fitted on: the offensive documents, earlier maps applied
source = pooled_activations(model, tok, off, layers, maps)
low = {k: v.min(0).values.float() for k, v in source.items()}
high = {k: v.max(0).values.float() for k, v in source.items()}
text = " ".join(load_corpus("wikitext2:test").texts)
ids = tok(text, return_tensors="pt").input_ids[:, :2048].view(4, 512)
inside: dict[int, list[float]] = {}


def perplexity(strength: float | None = None, masked: bool = False) -> float:
    if strength is None:
        with torch.no_grad():
            return math.exp(model(ids, labels=ids).loss.item())
    blended = {k: tuple(t.float() for t in blend(w, b, strength)) for k, (w, b) in maps.items()}

    def move(layer, acts):
        a, c = blended[layer]
        moved = acts * a + c
        if masked:
            keep = (acts > low[layer]) & (acts < high[layer])
            inside.setdefault(layer, []).append(float(keep.float().mean()))
            moved = torch.where(keep, moved, acts)
        return moved

    with torch.no_grad(), NeuronHooks(model, move, layers):
        return math.exp(model(ids, labels=ids).loss.item())


print(f"base: perplexity {perplexity():.1f}")
for strength in (1.0, 0.5, 0.25):
    print(f"every value (lmprune act), strength {strength}: perplexity "
          f"{perplexity(strength):.1f}")
print(f"ml-act's range mask, strength 1: perplexity {perplexity(1.0, masked=True):.1f}")
shares = [sum(v) / len(v) for _, v in sorted(inside.items())]
print(f"token values inside the source range: {min(shares):.2f}-{max(shares):.2f} by layer, "
      f"mean {sum(shares) / len(shares):.2f}")
