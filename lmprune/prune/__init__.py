"""Prune: choose neurons (modules of a map, top AUROC, AURA dampening, random controls of the
same per-layer counts), zero them and save a checkpoint whose lineage holds the masks
(`command`)."""

from lmprune.prune.command import STAGE, PruneConfig, register, run

__all__ = ["PruneConfig", "STAGE", "register", "run"]
