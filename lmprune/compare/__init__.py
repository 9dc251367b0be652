"""`lmprune compare RECIPE`: module pruning against its controls and published baselines on one
protocol (same prompts, samples, scorer, perplexity text and seeds), every row before and after
the same fine-tuning.

Rows:
  base            the model itself (fine-tuned too: fine-tuning alone moves toxicity)
  NAME            module pruning, one row per entry of `modules:` (the configurations searched;
                  `compare.headline` names the one the controls copy, default the first)
  random-S        random neurons with the headline's per-layer counts, one row per seed
  aura            AURA dampening: each neuron scaled by 1 - 2(AUROC - 0.5) where AUROC > 0.5
  top-auroc       the single neurons with the highest AUROC, as many as the headline zeroes
  profs           (with `compare.profs`) ProFS: a rank-k toxic subspace of paired embeddings
                  (ParaDetox) projected out of the upper layers' MLP output weights; nothing
                  zeroed (lmprune/methods/profs.py)
  act             (with `compare.act`) Linear-AcT: each MLP neuron's pooled activations on
                  offensive text transported onto those on clean text by an affine map, folded
                  into the output projections; nothing zeroed (lmprune/methods/act.py)
  dpo             (with `compare.dpo`) DPO as Lee et al. 2024 use it: trained to prefer each
                  clean ParaDetox paraphrase over its toxic original, against a frozen copy of
                  the model; nothing zeroed (lmprune/methods/dpo.py)
  induced         (with an `induce:` section) gradient routing into a designated module, that
                  module pruned; `induced-random-S` ablate a random same-size set of the same
                  routed model instead
  frontier-*      the toxicity-fluency frontier (`compare.frontier_budgets`,
                  `compare.aura_strengths`): the headline's settings at other module budgets,
                  a random same-size set at each, AURA at other strengths alpha
With a `relearn:` section, chosen rows (default: base, the headline, AURA, ProFS, Linear-AcT,
DPO, the first random control, induced) also face the relearning attack
(lmprune/finetune/relearn.py) for each `docs` count and `masks` setting, from their pruned
model, after everything else.
Every row is measured against its like: a pruned row against the base, a fine-tuned row against
the base fine-tuned with the same settings (the targets use these pairs).
Stages are cached with the markers of `lmprune run`: an interrupted comparison resumes where it
stopped and a finished one is read back. At the end of every call the summary is rewritten from
the rows' files (lmprune/compare/report.py): OUT/compare.json holds every number, OUT/compare.md
the table and the targets, OUT/compare.png toxicity against perplexity.
"""

from lmprune.compare.recipe import (
    CompareConfig,
    CompareFolder,
    CompareRecipe,
    load_compare,
    parse_compare,
    relearn_attacks,
    row_names,
)
from lmprune.compare.run import plan_compare, register, run_compare

__all__ = ["CompareConfig", "CompareFolder", "CompareRecipe", "load_compare", "parse_compare",
           "plan_compare", "register", "relearn_attacks", "row_names", "run_compare"]
