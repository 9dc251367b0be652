"""The stage registry: every stage in flow order, each declared once by its own module as a
`StageSpec` (lmprune/core/config.py: name, config class, `run`, the fields naming its outputs,
inputs, wired keys and sources, a runner step and a pre-flight check; its corpus keys come from
its config's fields). The CLI makes one subcommand of each; `lmprune run` and `lmprune compare`
read the same specs to wire stages together, check recipes and key their cache."""

from __future__ import annotations

from lmprune import collect, evaluate, finetune, induce, locate, prune
from lmprune.core.config import StageSpec
from lmprune.finetune import relearn
from lmprune.methods import act, dpo, profs
from lmprune.publish import hub

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    collect.STAGE, locate.STAGE, prune.STAGE, evaluate.STAGE, finetune.STAGE, induce.STAGE,
    relearn.STAGE, profs.STAGE, act.STAGE, dpo.STAGE, hub.STAGE,
)}
